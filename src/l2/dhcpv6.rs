//! DHCPv6 server (RFC 8415) for one client and one address: the guest gets the host's own
//! IPv6 address (`ip6.addr`), plus DNS servers, search domains and its FQDN.
//!
//! # Theory of operation
//!
//! There is one guest on the link and one address to give, so there are no bindings to keep:
//! every answer is a pure function of the question and the configuration. The server DUID is
//! a DUID-LL built from our MAC (no time component, unlike a DUID-LLT), so it stays the same
//! across restarts and a client's REQUEST or RENEW naming it after a restart still matches.
//!
//! - SOLICIT: ADVERTISE with preference 255 (so the client needn't wait for other servers),
//!   or REPLY at once if the client asked for Rapid Commit (the REPLY then carries the option).
//!   A SOLICIT without any IA_NA gets an ADVERTISE with only a NoAddrsAvail status.
//! - REQUEST, RENEW, REBIND: REPLY. The first IA_NA gets `ip6.addr`; addresses the client
//!   listed that aren't ours are returned with lifetimes 0, so it drops them (RFC 8415
//!   §18.3.4). Any further IA_NA and every IA_TA get NoAddrsAvail, every IA_PD NoPrefixAvail.
//! - CONFIRM: REPLY with status Success if every listed address is `ip6.addr`, NotOnLink
//!   otherwise (so a guest moved to another host starts over); no reply without addresses.
//! - RELEASE, DECLINE: REPLY with status Success: nothing to free.
//! - INFORMATION-REQUEST: REPLY with configuration options only.
//!
//! Lifetimes are infinite, and so are T1 and T2: the address never changes while we run, so
//! there is nothing for the client to renew (RFC 8415 §7.7, §14.2). DNS servers, the client's
//! FQDN and the domain list go in every answer that carries configuration, whether or not the
//! client's Option Request lists them, as upstream passt: clients skip what they didn't ask.
//!
//! Messages that RFC 8415 §16 says a server discards (a Server Identifier naming another
//! server, or present where it must not be, a missing Client Identifier, an IA in an
//! INFORMATION-REQUEST) are [`Verdict::Ignored`]; frames whose lengths or checksum don't add up
//! are [`Verdict::Malformed`]. Replies go from our link-local address and MAC to the client's
//! source address and MAC, UDP 547 to 546, hop limit 255 as upstream passt.
//!
//! smoltcp has no DHCPv6 support: [`Packet`], [`Options`], [`IaRepr`] and [`IaAddrRepr`] are
//! views in its style (`mod field`, `new_checked` checks everything the getters rely on,
//! options iterated in place). Replies are written in place by a bounds-checked writer and
//! never exceed the IPv6 minimum MTU, so any guest link carries them; if one doesn't fit, the
//! request is ignored rather than answered in part.

use std::net::Ipv6Addr;

use smoltcp::wire::{
    EthernetAddress, EthernetFrame, EthernetProtocol, EthernetRepr, IpAddress, IpProtocol,
    Ipv6Packet, Ipv6Repr, UdpPacket, ETHERNET_HEADER_LEN, IPV6_HEADER_LEN, UDP_HEADER_LEN,
};

use super::Verdict;
use crate::conf::{Ip6, NetConfig};

pub const SERVER_PORT: u16 = 547;
pub const CLIENT_PORT: u16 = 546;
/// All_DHCP_Relay_Agents_and_Servers (RFC 8415 §7.1): where clients send everything.
pub const ALL_RELAY_AGENTS_AND_SERVERS: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 1, 2);
/// "Infinity" for lifetimes, T1 and T2 (RFC 8415 §7.7).
pub const INFINITY: u32 = u32::MAX;
/// Hop limit of our replies, as upstream passt uses for every frame to the guest.
const HOP_LIMIT: u8 = 255;
/// Largest IPv6 packet we send: the minimum MTU, so no guest link is too small.
const MAX_IP_LEN: usize = 1280;
/// Longest DUID (RFC 8415 §11.1): 2-byte type and up to 128 bytes.
const MAX_DUID_LEN: usize = 130;
/// DUID-LL (RFC 8415 §11.4) type, and hardware type Ethernet.
const DUID_LL: u16 = 3;
const HWTYPE_ETHERNET: u16 = 1;
/// Length of our Server Identifier: DUID type, hardware type, MAC.
const SERVER_DUID_LEN: usize = 10;
/// Client FQDN flag bits (RFC 4704 §4.1).
const FQDN_S: u8 = 0x01;
const FQDN_O: u8 = 0x02;

/// Option codes (RFC 8415 §21, RFC 3646, RFC 4704).
pub mod opt {
    pub const CLIENT_ID: u16 = 1;
    pub const SERVER_ID: u16 = 2;
    pub const IA_NA: u16 = 3;
    pub const IA_TA: u16 = 4;
    pub const IA_ADDR: u16 = 5;
    pub const PREFERENCE: u16 = 7;
    pub const STATUS_CODE: u16 = 13;
    pub const RAPID_COMMIT: u16 = 14;
    pub const DNS_SERVERS: u16 = 23;
    pub const DOMAIN_LIST: u16 = 24;
    pub const IA_PD: u16 = 25;
    pub const CLIENT_FQDN: u16 = 39;
}

/// Status codes (RFC 8415 §21.13).
pub mod status {
    pub const SUCCESS: u16 = 0;
    pub const NO_ADDRS_AVAIL: u16 = 2;
    pub const NOT_ON_LINK: u16 = 4;
    pub const NO_PREFIX_AVAIL: u16 = 6;
}

/// Parsing failed: the message is truncated or its lengths are inconsistent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Error;

/// Message types (RFC 8415 §7.3); unknown values are kept, so they parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageType {
    Solicit,
    Advertise,
    Request,
    Confirm,
    Renew,
    Rebind,
    Reply,
    Release,
    Decline,
    Reconfigure,
    InformationRequest,
    Unknown(u8),
}

impl From<u8> for MessageType {
    fn from(v: u8) -> Self {
        use MessageType::*;
        match v {
            1 => Solicit,
            2 => Advertise,
            3 => Request,
            4 => Confirm,
            5 => Renew,
            6 => Rebind,
            7 => Reply,
            8 => Release,
            9 => Decline,
            10 => Reconfigure,
            11 => InformationRequest,
            v => Unknown(v),
        }
    }
}

impl From<MessageType> for u8 {
    fn from(t: MessageType) -> u8 {
        use MessageType::*;
        match t {
            Solicit => 1,
            Advertise => 2,
            Request => 3,
            Confirm => 4,
            Renew => 5,
            Rebind => 6,
            Reply => 7,
            Release => 8,
            Decline => 9,
            Reconfigure => 10,
            InformationRequest => 11,
            Unknown(v) => v,
        }
    }
}

/// A client/server message (RFC 8415 §8): type, 24-bit transaction id, options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

mod field {
    use core::ops::{Range, RangeFrom};

    pub const MSG_TYPE: usize = 0;
    pub const XID: Range<usize> = 1..4;
    pub const HEADER_LEN: usize = XID.end;
    pub const OPTIONS: RangeFrom<usize> = HEADER_LEN..;

    /// Option header: code, then length of the data that follows.
    pub const OPT_CODE: Range<usize> = 0..2;
    pub const OPT_LEN: Range<usize> = 2..4;
    pub const OPT_HEADER_LEN: usize = OPT_LEN.end;

    /// IA_NA and IA_PD: IAID, T1, T2, options. IA_TA: IAID, options.
    pub const IA_IAID: Range<usize> = 0..4;
    pub const IA_T1: Range<usize> = 4..8;
    pub const IA_T2: Range<usize> = 8..12;
    pub const IA_TA_OPTIONS: usize = IA_IAID.end;
    pub const IA_OPTIONS: usize = IA_T2.end;

    /// IA Address: address, preferred and valid lifetimes, options.
    pub const IAADDR_ADDR: Range<usize> = 0..16;
    pub const IAADDR_PREFERRED: Range<usize> = 16..20;
    pub const IAADDR_VALID: Range<usize> = 20..24;
    pub const IAADDR_OPTIONS: usize = IAADDR_VALID.end;
}

fn be16(b: &[u8]) -> u16 {
    match b {
        [a, b, ..] => u16::from_be_bytes([*a, *b]),
        _ => 0,
    }
}

fn be32(b: &[u8]) -> u32 {
    match b {
        [a, b, c, d, ..] => u32::from_be_bytes([*a, *b, *c, *d]),
        _ => 0,
    }
}

impl<T: AsRef<[u8]>> Packet<T> {
    pub const fn new_unchecked(buffer: T) -> Packet<T> {
        Packet { buffer }
    }

    /// [`Packet::new_unchecked`] and [`Packet::check_len`].
    pub fn new_checked(buffer: T) -> Result<Packet<T>, Error> {
        let packet = Self::new_unchecked(buffer);
        packet.check_len()?;
        Ok(packet)
    }

    /// The header is there and the options exactly fill the rest: afterwards no getter
    /// panics and [`Packet::options`] sees every option.
    pub fn check_len(&self) -> Result<(), Error> {
        let data = self.buffer.as_ref();
        let options = data.get(field::OPTIONS).ok_or(Error)?;
        Options::new_checked(options).map(|_| ())
    }

    pub fn msg_type(&self) -> MessageType {
        MessageType::from(self.buffer.as_ref()[field::MSG_TYPE])
    }

    pub fn transaction_id(&self) -> [u8; 3] {
        let mut xid = [0; 3];
        xid.copy_from_slice(&self.buffer.as_ref()[field::XID]);
        xid
    }
}

impl<'a, T: AsRef<[u8]> + ?Sized> Packet<&'a T> {
    pub fn options(&self) -> Options<'a> {
        Options {
            rest: &self.buffer.as_ref()[field::OPTIONS],
        }
    }
}

/// One option, borrowed from the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DhcpOption<'a> {
    pub code: u16,
    pub data: &'a [u8],
}

/// Options laid end to end (code, length, data), iterated in place. Stops at the first
/// option that doesn't fit, which [`Options::new_checked`] has ruled out.
#[derive(Debug, Clone)]
pub struct Options<'a> {
    rest: &'a [u8],
}

fn split_option(buf: &[u8]) -> Option<(DhcpOption<'_>, &[u8])> {
    let code = be16(buf.get(field::OPT_CODE)?);
    let len = usize::from(be16(buf.get(field::OPT_LEN)?));
    let (data, rest) = buf.get(field::OPT_HEADER_LEN..)?.split_at_checked(len)?;
    Some((DhcpOption { code, data }, rest))
}

impl<'a> Options<'a> {
    /// Checks that options exactly fill `buf`.
    pub fn new_checked(buf: &'a [u8]) -> Result<Options<'a>, Error> {
        let mut rest = buf;
        while !rest.is_empty() {
            rest = split_option(rest).ok_or(Error)?.1;
        }
        Ok(Options { rest: buf })
    }

    /// Data of the first option with this code.
    pub fn get(&self, code: u16) -> Option<&'a [u8]> {
        self.clone()
            .find(|o: &DhcpOption<'_>| o.code == code)
            .map(|o| o.data)
    }
}

impl<'a> Iterator for Options<'a> {
    type Item = DhcpOption<'a>;

    fn next(&mut self) -> Option<DhcpOption<'a>> {
        let (opt, rest) = split_option(self.rest)?;
        self.rest = rest;
        Some(opt)
    }
}

/// An identity association: IA_NA, IA_TA (no T1, T2) or IA_PD.
#[derive(Debug, Clone)]
pub struct IaRepr<'a> {
    pub code: u16,
    pub iaid: [u8; 4],
    pub t1: u32,
    pub t2: u32,
    pub options: Options<'a>,
}

impl<'a> IaRepr<'a> {
    /// Parses the data of an IA option; `code` says which kind.
    pub fn parse(code: u16, data: &'a [u8]) -> Result<IaRepr<'a>, Error> {
        let iaid = data.get(field::IA_IAID).ok_or(Error)?;
        let (t1, t2, options) = if code == opt::IA_TA {
            (0, 0, data.get(field::IA_TA_OPTIONS..).ok_or(Error)?)
        } else {
            (
                be32(data.get(field::IA_T1).ok_or(Error)?),
                be32(data.get(field::IA_T2).ok_or(Error)?),
                data.get(field::IA_OPTIONS..).ok_or(Error)?,
            )
        };
        let mut id = [0; 4];
        id.copy_from_slice(iaid);
        Ok(IaRepr {
            code,
            iaid: id,
            t1,
            t2,
            options: Options::new_checked(options)?,
        })
    }

    /// The addresses in an IA_NA or IA_TA, parsed.
    pub fn addresses(&self) -> impl Iterator<Item = Result<IaAddrRepr<'a>, Error>> + 'a {
        self.options
            .clone()
            .filter(|o| o.code == opt::IA_ADDR)
            .map(|o| IaAddrRepr::parse(o.data))
    }
}

/// An IA Address option (RFC 8415 §21.6).
#[derive(Debug, Clone)]
pub struct IaAddrRepr<'a> {
    pub addr: Ipv6Addr,
    pub preferred: u32,
    pub valid: u32,
    pub options: Options<'a>,
}

impl<'a> IaAddrRepr<'a> {
    pub fn parse(data: &'a [u8]) -> Result<IaAddrRepr<'a>, Error> {
        let addr: [u8; 16] = data
            .get(field::IAADDR_ADDR)
            .and_then(|a| a.try_into().ok())
            .ok_or(Error)?;
        Ok(IaAddrRepr {
            addr: Ipv6Addr::from(addr),
            preferred: be32(data.get(field::IAADDR_PREFERRED).ok_or(Error)?),
            valid: be32(data.get(field::IAADDR_VALID).ok_or(Error)?),
            options: Options::new_checked(data.get(field::IAADDR_OPTIONS..).ok_or(Error)?)?,
        })
    }
}

/// Writes `name` in DNS wire format (RFC 1035 §3.1, uncompressed): each label after its
/// length, then the root label; a trailing dot is accepted. Returns the length written, or
/// `None` if the name is empty, has an empty or over-long (> 63) label, is longer than 255
/// bytes encoded, or doesn't fit in `out`. Shared with NDP's DNSSL option.
pub(crate) fn encode_dns_name(name: &str, out: &mut [u8]) -> Option<usize> {
    let name = name.strip_suffix('.').unwrap_or(name);
    // One length byte per label replaces each dot, plus the first length and the root.
    let len = name.len() + 2;
    if name.is_empty() || len > 255 {
        return None;
    }
    let mut rest = out.get_mut(..len)?;
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return None;
        }
        let (head, tail) = rest.split_at_mut_checked(1 + label.len())?;
        head[0] = label.len() as u8;
        head[1..].copy_from_slice(label.as_bytes());
        rest = tail;
    }
    *rest.first_mut()? = 0;
    Some(len)
}

/// The reply didn't fit in the output buffer.
#[derive(Debug)]
struct NoRoom;

/// Appends to a buffer, checking every bound; options are opened, filled, then closed to
/// write their length.
struct Writer<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl Writer<'_> {
    fn bytes(&mut self, b: &[u8]) -> Result<(), NoRoom> {
        let end = self.len.checked_add(b.len()).ok_or(NoRoom)?;
        self.buf
            .get_mut(self.len..end)
            .ok_or(NoRoom)?
            .copy_from_slice(b);
        self.len = end;
        Ok(())
    }

    fn u16(&mut self, v: u16) -> Result<(), NoRoom> {
        self.bytes(&v.to_be_bytes())
    }

    fn u32(&mut self, v: u32) -> Result<(), NoRoom> {
        self.bytes(&v.to_be_bytes())
    }

    /// Starts an option; returns where it starts, for [`Writer::close`].
    fn open(&mut self, code: u16) -> Result<usize, NoRoom> {
        let at = self.len;
        self.u16(code)?;
        self.u16(0)?;
        Ok(at)
    }

    fn close(&mut self, at: usize) -> Result<(), NoRoom> {
        let data_len = self.len - at - field::OPT_HEADER_LEN;
        let data_len = u16::try_from(data_len).map_err(|_| NoRoom)?;
        self.buf
            .get_mut(at + field::OPT_LEN.start..at + field::OPT_LEN.end)
            .ok_or(NoRoom)?
            .copy_from_slice(&data_len.to_be_bytes());
        Ok(())
    }

    fn option(&mut self, code: u16, data: &[u8]) -> Result<(), NoRoom> {
        let at = self.open(code)?;
        self.bytes(data)?;
        self.close(at)
    }

    fn status(&mut self, code: u16, message: &str) -> Result<(), NoRoom> {
        let at = self.open(opt::STATUS_CODE)?;
        self.u16(code)?;
        self.bytes(message.as_bytes())?;
        self.close(at)
    }

    fn ia_addr(&mut self, addr: Ipv6Addr, preferred: u32, valid: u32) -> Result<(), NoRoom> {
        let at = self.open(opt::IA_ADDR)?;
        self.bytes(&addr.octets())?;
        self.u32(preferred)?;
        self.u32(valid)?;
        self.close(at)
    }

    /// Writes what `f` writes, or nothing if it doesn't fit.
    fn optional(&mut self, f: impl FnOnce(&mut Self) -> Result<(), NoRoom>) {
        let mark = self.len;
        if f(self).is_err() {
            self.len = mark;
        }
    }
}

/// Our Server Identifier: DUID-LL from our MAC.
fn server_duid(cfg: &NetConfig) -> [u8; SERVER_DUID_LEN] {
    let mut duid = [0; SERVER_DUID_LEN];
    duid[0..2].copy_from_slice(&DUID_LL.to_be_bytes());
    duid[2..4].copy_from_slice(&HWTYPE_ETHERNET.to_be_bytes());
    duid[4..].copy_from_slice(&cfg.our_mac);
    duid
}

/// What a pass over the client's options found, everything in it validated.
#[derive(Default)]
struct Scan<'a> {
    client_id: Option<&'a [u8]>,
    server_id: Option<&'a [u8]>,
    rapid_commit: bool,
    /// Flags of the client's FQDN option, if it sent one.
    fqdn_flags: Option<u8>,
    ia_na: usize,
    /// IA_NA, IA_TA and IA_PD.
    ias: usize,
    /// Addresses listed in IA_NAs and IA_TAs, and whether one of them isn't ours.
    addrs: usize,
    foreign_addr: bool,
}

fn scan<'a>(options: Options<'a>, ours: Ipv6Addr) -> Result<Scan<'a>, Error> {
    let mut s = Scan::default();
    for o in options {
        match o.code {
            opt::CLIENT_ID if s.client_id.is_none() => {
                if !(2..=MAX_DUID_LEN).contains(&o.data.len()) {
                    return Err(Error);
                }
                s.client_id = Some(o.data);
            }
            opt::SERVER_ID if s.server_id.is_none() => s.server_id = Some(o.data),
            opt::RAPID_COMMIT => s.rapid_commit = true,
            opt::CLIENT_FQDN => s.fqdn_flags = Some(*o.data.first().ok_or(Error)?),
            opt::IA_NA | opt::IA_TA | opt::IA_PD => {
                let ia = IaRepr::parse(o.code, o.data)?;
                s.ias += 1;
                if o.code == opt::IA_PD {
                    continue;
                }
                s.ia_na += usize::from(o.code == opt::IA_NA);
                for a in ia.addresses() {
                    s.addrs += 1;
                    s.foreign_addr |= a?.addr != ours;
                }
            }
            _ => {}
        }
    }
    Ok(s)
}

/// What goes in a reply besides the identifiers.
enum Content {
    /// Addresses for the IAs, then configuration; `release`: return the client's other
    /// addresses with lifetimes 0 (not in an ADVERTISE, which commits to nothing).
    Lease { release: bool },
    /// Only a status code.
    Status(u16, &'static str),
    /// Configuration options only.
    Info,
}

/// The guest's frame, taken apart.
struct Request<'a> {
    client_mac: EthernetAddress,
    src: Ipv6Addr,
    dst: Ipv6Addr,
    msg: Packet<&'a [u8]>,
}

/// `Ok(None)`: well-formed, but not DHCPv6 for a server.
fn parse(frame: &[u8]) -> Result<Option<Request<'_>>, Error> {
    let eth = EthernetFrame::new_checked(frame).map_err(|_| Error)?;
    if eth.ethertype() != EthernetProtocol::Ipv6 {
        return Ok(None);
    }
    let ip = Ipv6Packet::new_checked(eth.payload()).map_err(|_| Error)?;
    if ip.version() != 6 {
        return Err(Error);
    }
    if ip.next_header() != IpProtocol::Udp {
        return Ok(None);
    }
    let (src, dst) = (ip.src_addr(), ip.dst_addr());
    let udp_bytes = ip.payload();
    let udp = UdpPacket::new_checked(udp_bytes).map_err(|_| Error)?;
    // IPv6 has no padding of its own: a UDP length short of the payload is inconsistent.
    if usize::from(udp.len()) != udp_bytes.len() {
        return Err(Error);
    }
    if udp.dst_port() != SERVER_PORT {
        return Ok(None);
    }
    // A zero checksum means "none", which IPv6 doesn't allow (RFC 8200 §8.1).
    if udp.checksum() == 0 || !udp.verify_checksum(&IpAddress::Ipv6(src), &IpAddress::Ipv6(dst)) {
        return Err(Error);
    }
    let msg = Packet::new_checked(udp.payload())?;
    Ok(Some(Request {
        client_mac: eth.src_addr(),
        src,
        dst,
        msg,
    }))
}

/// Answers a DHCPv6 message from the guest: `frame` is a whole Ethernet frame, IPv6, UDP to
/// port 547. The reply, if any, is a whole frame written at the start of `out`.
pub fn handle(cfg: &NetConfig, frame: &[u8], out: &mut [u8]) -> Verdict {
    let req = match parse(frame) {
        Ok(Some(req)) => req,
        Ok(None) => return Verdict::Ignored,
        Err(Error) => return Verdict::Malformed,
    };
    let ip6 = match &cfg.ip6 {
        Some(ip6) if cfg.dhcpv6 => ip6,
        _ => return Verdict::Ignored,
    };
    let s = match scan(req.msg.options(), ip6.addr) {
        Ok(s) => s,
        Err(Error) => return Verdict::Malformed,
    };
    // We never send Server Unicast, so clients must multicast; and we can only answer a
    // client that has an address to answer to.
    if req.dst != ALL_RELAY_AGENTS_AND_SERVERS || req.src.is_unspecified() || req.src.is_multicast()
    {
        return Verdict::Ignored;
    }
    if s.server_id.is_some_and(|id| id != server_duid(cfg)) {
        return Verdict::Ignored;
    }
    let names_us = s.server_id.is_some();

    use MessageType::*;
    let ty = req.msg.msg_type();
    // RFC 8415 §16: which messages must, or must not, name a server, and need a client.
    let server_id_ok = match ty {
        Solicit | Confirm | Rebind => !names_us,
        Request | Renew | Release | Decline => names_us,
        InformationRequest => true,
        _ => false,
    };
    if !server_id_ok || (s.client_id.is_none() && ty != InformationRequest) {
        return Verdict::Ignored;
    }
    let (reply_type, content) = match ty {
        Solicit if s.ia_na == 0 => (
            Advertise,
            Content::Status(
                status::NO_ADDRS_AVAIL,
                "one address per client, for an IA_NA",
            ),
        ),
        // A SOLICIT's addresses are hints, not leases: nothing to take back.
        Solicit if s.rapid_commit => (Reply, Content::Lease { release: false }),
        Solicit => (Advertise, Content::Lease { release: false }),
        Request | Renew | Rebind => (Reply, Content::Lease { release: true }),
        // §18.3.3: without addresses there is nothing to confirm, and no reply.
        Confirm if s.addrs == 0 => return Verdict::Ignored,
        Confirm if s.foreign_addr => (
            Reply,
            Content::Status(status::NOT_ON_LINK, "address not on link"),
        ),
        Confirm | Release | Decline => (Reply, Content::Status(status::SUCCESS, "")),
        InformationRequest if s.ias > 0 => return Verdict::Ignored,
        InformationRequest => (Reply, Content::Info),
        _ => return Verdict::Ignored,
    };

    let headers = ETHERNET_HEADER_LEN + IPV6_HEADER_LEN + UDP_HEADER_LEN;
    let cap = out.len().min(ETHERNET_HEADER_LEN + MAX_IP_LEN);
    let Some(payload) = out.get_mut(headers..cap) else {
        return Verdict::Ignored;
    };
    let mut w = Writer {
        buf: payload,
        len: 0,
    };
    let written = write_reply(&mut w, cfg, ip6, &req, &s, reply_type, &content);
    if written.is_err() {
        return Verdict::Ignored;
    }
    let udp_len = UDP_HEADER_LEN + w.len;
    match emit_headers(cfg, ip6, &req, udp_len, out) {
        Some(len) => Verdict::Reply(len),
        None => Verdict::Ignored,
    }
}

fn write_reply(
    w: &mut Writer<'_>,
    cfg: &NetConfig,
    ip6: &Ip6,
    req: &Request<'_>,
    s: &Scan<'_>,
    reply_type: MessageType,
    content: &Content,
) -> Result<(), NoRoom> {
    w.bytes(&[u8::from(reply_type)])?;
    w.bytes(&req.msg.transaction_id())?;
    w.option(opt::SERVER_ID, &server_duid(cfg))?;
    if let Some(id) = s.client_id {
        w.option(opt::CLIENT_ID, id)?;
    }
    match content {
        Content::Status(code, message) => return w.status(*code, message),
        Content::Info => {}
        Content::Lease { release } => {
            if reply_type == MessageType::Reply && req.msg.msg_type() == MessageType::Solicit {
                w.option(opt::RAPID_COMMIT, &[])?;
            }
            if reply_type == MessageType::Advertise {
                // The highest preference: the client can go on without waiting for others.
                w.option(opt::PREFERENCE, &[255])?;
            }
            write_ias(w, ip6.addr, req.msg.options(), *release)?;
        }
    }
    write_config(w, cfg, ip6, s.fqdn_flags);
    Ok(())
}

/// Answers each IA of the request in order: the first IA_NA gets our address.
fn write_ias(
    w: &mut Writer<'_>,
    ours: Ipv6Addr,
    options: Options<'_>,
    release: bool,
) -> Result<(), NoRoom> {
    let mut assigned = false;
    for o in options {
        if !matches!(o.code, opt::IA_NA | opt::IA_TA | opt::IA_PD) {
            continue;
        }
        // Validated by scan().
        let Ok(ia) = IaRepr::parse(o.code, o.data) else {
            continue;
        };
        let at = w.open(o.code)?;
        w.bytes(&ia.iaid)?;
        if o.code == opt::IA_NA && !assigned {
            assigned = true;
            w.u32(INFINITY)?;
            w.u32(INFINITY)?;
            w.ia_addr(ours, INFINITY, INFINITY)?;
            if release {
                for a in ia.addresses().flatten().filter(|a| a.addr != ours) {
                    w.ia_addr(a.addr, 0, 0)?;
                }
            }
        } else {
            if o.code != opt::IA_TA {
                w.u32(0)?;
                w.u32(0)?;
            }
            match o.code {
                opt::IA_PD => w.status(status::NO_PREFIX_AVAIL, "no prefix delegation")?,
                _ => w.status(status::NO_ADDRS_AVAIL, "one address per client")?,
            }
        }
        w.close(at)?;
    }
    Ok(())
}

/// DNS servers, the client's FQDN, search domains: each only if it still fits, the domain
/// list last as the one that can be cut short.
fn write_config(w: &mut Writer<'_>, cfg: &NetConfig, ip6: &Ip6, client_fqdn_flags: Option<u8>) {
    if !ip6.dns.is_empty() {
        w.optional(|w| {
            let at = w.open(opt::DNS_SERVERS)?;
            for d in &ip6.dns {
                w.bytes(&d.octets())?;
            }
            w.close(at)
        });
    }
    if let Some(fqdn) = &cfg.fqdn {
        w.optional(|w| {
            let at = w.open(opt::CLIENT_FQDN)?;
            // S: the server (we, nominally) takes care of the AAAA record, so the client
            // doesn't try to update DNS itself; O: that overrides what the client asked.
            let overridden = client_fqdn_flags.is_some_and(|f| f & FQDN_S == 0);
            w.bytes(&[FQDN_S | if overridden { FQDN_O } else { 0 }])?;
            let n = encode_dns_name(fqdn, w.buf.get_mut(w.len..).ok_or(NoRoom)?).ok_or(NoRoom)?;
            w.len += n;
            w.close(at)
        });
    }
    if !cfg.dns_search.is_empty() {
        w.optional(|w| {
            let at = w.open(opt::DOMAIN_LIST)?;
            let start = w.len;
            for name in &cfg.dns_search {
                if let Some(n) = w
                    .buf
                    .get_mut(w.len..)
                    .and_then(|b| encode_dns_name(name, b))
                {
                    w.len += n;
                }
            }
            if w.len == start {
                return Err(NoRoom);
            }
            w.close(at)
        });
    }
}

/// Ethernet, IPv6 and UDP headers in front of the `udp_len - 8` bytes already written.
fn emit_headers(
    cfg: &NetConfig,
    ip6: &Ip6,
    req: &Request<'_>,
    udp_len: usize,
    out: &mut [u8],
) -> Option<usize> {
    let total = ETHERNET_HEADER_LEN + IPV6_HEADER_LEN + udp_len;
    let mut eth = EthernetFrame::new_unchecked(out.get_mut(..total)?);
    EthernetRepr {
        src_addr: EthernetAddress(cfg.our_mac),
        dst_addr: req.client_mac,
        ethertype: EthernetProtocol::Ipv6,
    }
    .emit(&mut eth);
    let mut ip = Ipv6Packet::new_unchecked(eth.payload_mut());
    Ipv6Repr {
        src_addr: ip6.our_ll,
        dst_addr: req.src,
        next_header: IpProtocol::Udp,
        payload_len: udp_len,
        hop_limit: HOP_LIMIT,
    }
    .emit(&mut ip);
    let mut udp = UdpPacket::new_unchecked(ip.payload_mut());
    udp.set_src_port(SERVER_PORT);
    udp.set_dst_port(CLIENT_PORT);
    udp.set_len(u16::try_from(udp_len).ok()?);
    udp.fill_checksum(&IpAddress::Ipv6(ip6.our_ll), &IpAddress::Ipv6(req.src));
    Some(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::l2::test_util::csum6;

    const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
    const OUR_MAC: [u8; 6] = [0x9a, 0x55, 0x9a, 0x55, 0x9a, 0x55];
    const CLIENT_DUID: [u8; 14] = [
        0, 1, 0, 1, 0x2c, 0x11, 0x22, 0x33, 0x52, 0x54, 0x00, 0x12, 0x34, 0x56,
    ];
    const XID: [u8; 3] = [0xab, 0xcd, 0xef];
    const IAID: [u8; 4] = [0x00, 0x12, 0x34, 0x56];

    fn guest_ll() -> Ipv6Addr {
        "fe80::5054:ff:fe12:3456".parse().unwrap()
    }

    fn addr() -> Ipv6Addr {
        "2001:db8::2".parse().unwrap()
    }

    fn cfg() -> NetConfig {
        NetConfig {
            our_mac: OUR_MAC,
            ip6: Some(Ip6 {
                addr: addr(),
                prefix_len: 64,
                gateway: "fe80::1:1".parse().unwrap(),
                our_ll: "fe80::1:1".parse().unwrap(),
                dns: vec![
                    "2001:db8:ffff::53".parse().unwrap(),
                    "2001:db8:ffff::54".parse().unwrap(),
                ],
            }),
            dns_search: vec!["example.test".into(), "b.example.test.".into()],
            fqdn: Some("guest.example.test".into()),
            ..NetConfig::default()
        }
    }

    fn csum6_udp(src: Ipv6Addr, dst: Ipv6Addr, udp: &[u8]) -> u16 {
        csum6(src, dst, 17, udp)
    }

    fn opt(code: u16, data: &[u8]) -> Vec<u8> {
        let mut v = code.to_be_bytes().to_vec();
        v.extend((data.len() as u16).to_be_bytes());
        v.extend(data);
        v
    }

    fn ia_na(iaid: [u8; 4], addrs: &[Ipv6Addr]) -> Vec<u8> {
        let mut d = iaid.to_vec();
        d.extend([0u8; 8]);
        for a in addrs {
            let mut ad = a.octets().to_vec();
            ad.extend(3600u32.to_be_bytes());
            ad.extend(7200u32.to_be_bytes());
            d.extend(opt(opt::IA_ADDR, &ad));
        }
        opt(opt::IA_NA, &d)
    }

    fn our_duid() -> Vec<u8> {
        let mut d = vec![0, 3, 0, 1];
        d.extend(OUR_MAC);
        d
    }

    fn msg(ty: u8, options: &[Vec<u8>]) -> Vec<u8> {
        let mut m = vec![ty];
        m.extend(XID);
        for o in options {
            m.extend(o);
        }
        m
    }

    /// Ethernet + IPv6 + UDP around `payload`, from the guest's link-local address.
    fn frame_to(dst: Ipv6Addr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
        let src = guest_ll();
        let udp_len = (8 + payload.len()) as u16;
        let mut udp = sport.to_be_bytes().to_vec();
        udp.extend(dport.to_be_bytes());
        udp.extend(udp_len.to_be_bytes());
        udp.extend([0, 0]);
        udp.extend(payload);
        let c = csum6_udp(src, dst, &udp);
        udp[6..8].copy_from_slice(&c.to_be_bytes());
        let mut f = vec![0x33, 0x33, 0, 1, 0, 2];
        f.extend(GUEST_MAC);
        f.extend([0x86, 0xdd]);
        f.extend([0x60, 0, 0, 0]);
        f.extend(udp_len.to_be_bytes());
        f.extend([17, 1]);
        f.extend(src.octets());
        f.extend(dst.octets());
        f.extend(udp);
        f
    }

    fn frame(payload: &[u8]) -> Vec<u8> {
        frame_to(
            ALL_RELAY_AGENTS_AND_SERVERS,
            CLIENT_PORT,
            SERVER_PORT,
            payload,
        )
    }

    fn solicit(rapid: bool) -> Vec<u8> {
        let mut o = vec![
            opt(opt::CLIENT_ID, &CLIENT_DUID),
            opt(6, &[0, 23, 0, 24, 0, 39]),
            ia_na(IAID, &[]),
            opt(39, &[0x01, 0]),
        ];
        if rapid {
            o.push(opt(opt::RAPID_COMMIT, &[]));
        }
        frame(&msg(1, &o))
    }

    fn with_server(ty: u8, sid: &[u8], ias: Vec<Vec<u8>>) -> Vec<u8> {
        let mut o = vec![opt(opt::CLIENT_ID, &CLIENT_DUID), opt(opt::SERVER_ID, sid)];
        o.extend(ias);
        frame(&msg(ty, &o))
    }

    fn request() -> Vec<u8> {
        with_server(3, &our_duid(), vec![ia_na(IAID, &[addr()])])
    }

    fn run(c: &NetConfig, f: &[u8]) -> (Verdict, Vec<u8>) {
        // Junk in the buffer: the reply must set every byte it covers.
        let mut out = vec![0xa5u8; 2048];
        let v = handle(c, f, &mut out);
        if let Verdict::Reply(n) = v {
            out.truncate(n);
        }
        (v, out)
    }

    /// Checks the headers of a reply, independently, and returns the DHCPv6 message.
    fn check_headers(reply: &[u8]) -> Vec<u8> {
        assert_eq!(&reply[0..6], &GUEST_MAC, "to the client's MAC");
        assert_eq!(&reply[6..12], &OUR_MAC);
        assert_eq!(&reply[12..14], &[0x86, 0xdd]);
        let ip = &reply[14..54];
        assert_eq!(&ip[0..4], &[0x60, 0, 0, 0]);
        let plen = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
        assert_eq!(plen, reply.len() - 54);
        assert!(reply.len() - 14 <= MAX_IP_LEN);
        assert_eq!(ip[6], 17);
        assert_eq!(ip[7], 255);
        let src: [u8; 16] = ip[8..24].try_into().unwrap();
        let dst: [u8; 16] = ip[24..40].try_into().unwrap();
        assert_eq!(
            Ipv6Addr::from(src),
            "fe80::1:1".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(Ipv6Addr::from(dst), guest_ll());
        let udp = &reply[54..];
        assert_eq!(&udp[0..2], &547u16.to_be_bytes());
        assert_eq!(&udp[2..4], &546u16.to_be_bytes());
        assert_eq!(usize::from(u16::from_be_bytes([udp[4], udp[5]])), udp.len());
        assert_ne!(&udp[6..8], &[0, 0]);
        assert_eq!(csum6_udp(src.into(), dst.into(), udp), 0, "UDP checksum");
        udp[8..].to_vec()
    }

    fn options_of(m: &[u8]) -> Vec<(u16, Vec<u8>)> {
        let p = Packet::new_checked(m).unwrap();
        p.options().map(|o| (o.code, o.data.to_vec())).collect()
    }

    fn find(opts: &[(u16, Vec<u8>)], code: u16) -> Option<Vec<u8>> {
        opts.iter()
            .find(|(c, _)| *c == code)
            .map(|(_, d)| d.clone())
    }

    fn count(opts: &[(u16, Vec<u8>)], code: u16) -> usize {
        opts.iter().filter(|(c, _)| *c == code).count()
    }

    /// The IA_NA we give out: our address, infinite everything; plus `released` with 0.
    fn check_lease(opts: &[(u16, Vec<u8>)], released: &[Ipv6Addr]) {
        assert_eq!(count(opts, opt::IA_NA), 1);
        let ia = find(opts, opt::IA_NA).unwrap();
        assert_eq!(&ia[0..4], &IAID, "IAID echoed");
        assert_eq!(&ia[4..12], &[0xff; 8], "T1, T2 infinite");
        let mut expect = opt(
            opt::IA_ADDR,
            &[&addr().octets()[..], &[0xff; 8][..]].concat(),
        );
        for r in released {
            expect.extend(opt(opt::IA_ADDR, &[&r.octets()[..], &[0; 8][..]].concat()));
        }
        assert_eq!(&ia[12..], &expect[..]);
        // The same through the views.
        let repr = IaRepr::parse(opt::IA_NA, &ia).unwrap();
        let a: Vec<_> = repr.addresses().map(|a| a.unwrap()).collect();
        assert_eq!(a[0].addr, addr());
        assert_eq!((a[0].preferred, a[0].valid), (INFINITY, INFINITY));
        assert_eq!(a.len(), 1 + released.len());
    }

    fn check_config(opts: &[(u16, Vec<u8>)], fqdn_flags: u8) {
        let mut dns = "2001:db8:ffff::53"
            .parse::<Ipv6Addr>()
            .unwrap()
            .octets()
            .to_vec();
        dns.extend("2001:db8:ffff::54".parse::<Ipv6Addr>().unwrap().octets());
        assert_eq!(find(opts, opt::DNS_SERVERS).unwrap(), dns);
        assert_eq!(
            find(opts, opt::DOMAIN_LIST).unwrap(),
            b"\x07example\x04test\x00\x01b\x07example\x04test\x00".to_vec()
        );
        let mut fq = vec![fqdn_flags];
        fq.extend(b"\x05guest\x07example\x04test\x00");
        assert_eq!(find(opts, opt::CLIENT_FQDN).unwrap(), fq);
    }

    fn check_ids(opts: &[(u16, Vec<u8>)]) {
        assert_eq!(find(opts, opt::SERVER_ID).unwrap(), our_duid());
        assert_eq!(find(opts, opt::CLIENT_ID).unwrap(), CLIENT_DUID.to_vec());
        assert_eq!(count(opts, opt::SERVER_ID), 1);
        assert_eq!(count(opts, opt::CLIENT_ID), 1);
    }

    #[test]
    fn solicit_gets_advertise() {
        let (v, out) = run(&cfg(), &solicit(false));
        assert!(matches!(v, Verdict::Reply(_)), "{v:?}");
        let m = check_headers(&out);
        assert_eq!(m[0], 2, "ADVERTISE");
        assert_eq!(&m[1..4], &XID);
        let p = Packet::new_checked(&m[..]).unwrap();
        assert_eq!(p.msg_type(), MessageType::Advertise);
        assert_eq!(p.transaction_id(), XID);
        let opts = options_of(&m);
        check_ids(&opts);
        check_lease(&opts, &[]);
        assert_eq!(find(&opts, opt::PREFERENCE).unwrap(), vec![255]);
        assert_eq!(count(&opts, opt::RAPID_COMMIT), 0);
        // The client sent S=1 (asking us to update): granted, not overridden.
        check_config(&opts, 0x01);
    }

    #[test]
    fn solicit_with_rapid_commit_gets_reply() {
        let (v, out) = run(&cfg(), &solicit(true));
        assert!(matches!(v, Verdict::Reply(_)), "{v:?}");
        let m = check_headers(&out);
        assert_eq!(m[0], 7, "REPLY");
        assert_eq!(&m[1..4], &XID);
        let opts = options_of(&m);
        check_ids(&opts);
        check_lease(&opts, &[]);
        assert_eq!(find(&opts, opt::RAPID_COMMIT).unwrap(), Vec::<u8>::new());
        assert_eq!(count(&opts, opt::PREFERENCE), 0);
        check_config(&opts, 0x01);
    }

    #[test]
    fn request_gets_reply() {
        let (v, out) = run(&cfg(), &request());
        assert!(matches!(v, Verdict::Reply(_)), "{v:?}");
        let m = check_headers(&out);
        assert_eq!(m[0], 7);
        assert_eq!(&m[1..4], &XID);
        let opts = options_of(&m);
        check_ids(&opts);
        check_lease(&opts, &[]);
        assert_eq!(count(&opts, opt::RAPID_COMMIT), 0);
        // No FQDN option from the client: S set, nothing overridden.
        check_config(&opts, 0x01);
    }

    #[test]
    fn renew_returns_foreign_addresses_with_zero_lifetimes() {
        let old: Ipv6Addr = "2001:db8::99".parse().unwrap();
        let f = with_server(5, &our_duid(), vec![ia_na(IAID, &[old, addr()])]);
        let (v, out) = run(&cfg(), &f);
        assert!(matches!(v, Verdict::Reply(_)), "{v:?}");
        let m = check_headers(&out);
        assert_eq!(m[0], 7);
        let opts = options_of(&m);
        check_ids(&opts);
        check_lease(&opts, &[old]);
    }

    #[test]
    fn rebind_must_not_name_a_server() {
        let f = frame(&msg(
            6,
            &[opt(opt::CLIENT_ID, &CLIENT_DUID), ia_na(IAID, &[addr()])],
        ));
        let (v, out) = run(&cfg(), &f);
        assert!(matches!(v, Verdict::Reply(_)), "{v:?}");
        check_lease(&options_of(&check_headers(&out)), &[]);
        let f = with_server(6, &our_duid(), vec![ia_na(IAID, &[addr()])]);
        assert_eq!(run(&cfg(), &f).0, Verdict::Ignored);
    }

    #[test]
    fn information_request_gets_config_only() {
        let f = frame(&msg(
            11,
            &[opt(opt::CLIENT_ID, &CLIENT_DUID), opt(6, &[0, 23, 0, 24])],
        ));
        let (v, out) = run(&cfg(), &f);
        assert!(matches!(v, Verdict::Reply(_)), "{v:?}");
        let m = check_headers(&out);
        assert_eq!(m[0], 7);
        assert_eq!(&m[1..4], &XID);
        let opts = options_of(&m);
        check_ids(&opts);
        assert_eq!(count(&opts, opt::IA_NA), 0);
        assert_eq!(count(&opts, opt::STATUS_CODE), 0);
        check_config(&opts, 0x01);
        // Without a client identifier (allowed): no Client ID in the reply either.
        let (v, out) = run(&cfg(), &frame(&msg(11, &[])));
        assert!(matches!(v, Verdict::Reply(_)), "{v:?}");
        let opts = options_of(&check_headers(&out));
        assert_eq!(count(&opts, opt::CLIENT_ID), 0);
        assert_eq!(find(&opts, opt::SERVER_ID).unwrap(), our_duid());
        // With an IA: discarded (RFC 8415 §16.12).
        let f = frame(&msg(
            11,
            &[opt(opt::CLIENT_ID, &CLIENT_DUID), ia_na(IAID, &[])],
        ));
        assert_eq!(run(&cfg(), &f).0, Verdict::Ignored);
    }

    #[test]
    fn request_for_another_server_is_ignored() {
        let mut other = our_duid();
        other[9] ^= 1;
        for ty in [3, 5, 8, 9] {
            let f = with_server(ty, &other, vec![ia_na(IAID, &[addr()])]);
            assert_eq!(run(&cfg(), &f).0, Verdict::Ignored, "type {ty}");
        }
        let f = with_server(11, &other, vec![]);
        assert_eq!(run(&cfg(), &f).0, Verdict::Ignored);
        // The same INFORMATION-REQUEST naming us is answered.
        let f = with_server(11, &our_duid(), vec![]);
        assert!(matches!(run(&cfg(), &f).0, Verdict::Reply(_)));
        // And REQUEST naming no server at all.
        let f = frame(&msg(
            3,
            &[opt(opt::CLIENT_ID, &CLIENT_DUID), ia_na(IAID, &[addr()])],
        ));
        assert_eq!(run(&cfg(), &f).0, Verdict::Ignored);
        // SOLICIT naming us is discarded too (RFC 8415 §16.2).
        let f = with_server(1, &our_duid(), vec![ia_na(IAID, &[])]);
        assert_eq!(run(&cfg(), &f).0, Verdict::Ignored);
    }

    #[test]
    fn missing_client_id_is_ignored() {
        let f = frame(&msg(1, &[ia_na(IAID, &[])]));
        assert_eq!(run(&cfg(), &f).0, Verdict::Ignored);
    }

    #[test]
    fn confirm_checks_the_address() {
        let f = frame(&msg(
            4,
            &[opt(opt::CLIENT_ID, &CLIENT_DUID), ia_na(IAID, &[addr()])],
        ));
        let (v, out) = run(&cfg(), &f);
        assert!(matches!(v, Verdict::Reply(_)), "{v:?}");
        let opts = options_of(&check_headers(&out));
        check_ids(&opts);
        assert_eq!(find(&opts, opt::STATUS_CODE).unwrap(), vec![0, 0]);
        assert_eq!(count(&opts, opt::IA_NA), 0);

        let f = frame(&msg(
            4,
            &[
                opt(opt::CLIENT_ID, &CLIENT_DUID),
                ia_na(IAID, &["2001:db8:1::2".parse().unwrap()]),
            ],
        ));
        let (_, out) = run(&cfg(), &f);
        let opts = options_of(&check_headers(&out));
        assert_eq!(&find(&opts, opt::STATUS_CODE).unwrap()[..2], &[0, 4]);

        let f = frame(&msg(
            4,
            &[opt(opt::CLIENT_ID, &CLIENT_DUID), ia_na(IAID, &[])],
        ));
        assert_eq!(run(&cfg(), &f).0, Verdict::Ignored);
    }

    #[test]
    fn release_and_decline_get_success() {
        for ty in [8, 9] {
            let f = with_server(ty, &our_duid(), vec![ia_na(IAID, &[addr()])]);
            let (v, out) = run(&cfg(), &f);
            assert!(matches!(v, Verdict::Reply(_)), "{v:?}");
            let m = check_headers(&out);
            assert_eq!(m[0], 7);
            let opts = options_of(&m);
            check_ids(&opts);
            assert_eq!(find(&opts, opt::STATUS_CODE).unwrap(), vec![0, 0]);
            assert_eq!(opts.len(), 3);
        }
    }

    #[test]
    fn other_ias_get_status() {
        let mut ta = IAID.to_vec();
        ta[3] = 7;
        let mut pd = IAID.to_vec();
        pd[3] = 8;
        pd.extend([0; 8]);
        let second: [u8; 4] = [9, 9, 9, 9];
        let f = frame(&msg(
            1,
            &[
                opt(opt::CLIENT_ID, &CLIENT_DUID),
                opt(opt::IA_TA, &ta),
                ia_na(IAID, &[]),
                ia_na(second, &[]),
                opt(opt::IA_PD, &pd),
            ],
        ));
        let (v, out) = run(&cfg(), &f);
        assert!(matches!(v, Verdict::Reply(_)), "{v:?}");
        let opts = options_of(&check_headers(&out));
        let ias: Vec<_> = opts
            .iter()
            .filter(|(c, _)| matches!(*c, opt::IA_NA | opt::IA_TA | opt::IA_PD))
            .collect();
        assert_eq!(ias.len(), 4);
        let status_of = |d: &[u8], off: usize| {
            let o = Options::new_checked(&d[off..]).unwrap();
            let s = o.get(opt::STATUS_CODE).unwrap();
            u16::from_be_bytes([s[0], s[1]])
        };
        assert_eq!(ias[0].0, opt::IA_TA);
        assert_eq!(&ias[0].1[..4], &ta[..4]);
        assert_eq!(status_of(&ias[0].1, 4), status::NO_ADDRS_AVAIL);
        assert_eq!(ias[1].0, opt::IA_NA);
        assert_eq!(&ias[1].1[..4], &IAID);
        assert_eq!(ias[2].0, opt::IA_NA);
        assert_eq!(&ias[2].1[..4], &second);
        assert_eq!(status_of(&ias[2].1, 12), status::NO_ADDRS_AVAIL);
        assert_eq!(ias[3].0, opt::IA_PD);
        assert_eq!(status_of(&ias[3].1, 12), status::NO_PREFIX_AVAIL);

        // Only an IA_PD: an ADVERTISE with nothing but NoAddrsAvail.
        let f = frame(&msg(
            1,
            &[opt(opt::CLIENT_ID, &CLIENT_DUID), opt(opt::IA_PD, &pd)],
        ));
        let (v, out) = run(&cfg(), &f);
        assert!(matches!(v, Verdict::Reply(_)), "{v:?}");
        let m = check_headers(&out);
        assert_eq!(m[0], 2);
        let opts = options_of(&m);
        check_ids(&opts);
        assert_eq!(opts.len(), 3);
        assert_eq!(
            u16::from_be_bytes(
                find(&opts, opt::STATUS_CODE).unwrap()[..2]
                    .try_into()
                    .unwrap()
            ),
            status::NO_ADDRS_AVAIL
        );
    }

    #[test]
    fn fqdn_override_flag() {
        // The client wants to update DNS itself (S=0): we override, S=1 and O=1.
        let f = frame(&msg(
            1,
            &[
                opt(opt::CLIENT_ID, &CLIENT_DUID),
                ia_na(IAID, &[]),
                opt(opt::CLIENT_FQDN, &[0x00]),
            ],
        ));
        let (_, out) = run(&cfg(), &f);
        let opts = options_of(&check_headers(&out));
        assert_eq!(find(&opts, opt::CLIENT_FQDN).unwrap()[0], 0x03);
    }

    #[test]
    fn config_options_follow_the_configuration() {
        let mut c = cfg();
        c.fqdn = None;
        c.dns_search.clear();
        c.ip6.as_mut().unwrap().dns.clear();
        let (_, out) = run(&c, &request());
        let opts = options_of(&check_headers(&out));
        for code in [opt::DNS_SERVERS, opt::DOMAIN_LIST, opt::CLIENT_FQDN] {
            assert_eq!(count(&opts, code), 0);
        }
        check_lease(&opts, &[]);
        // Names that can't be encoded are skipped, not sent broken.
        c.dns_search = vec!["bad..name".into(), "ok.test".into(), "x".repeat(64)];
        let (_, out) = run(&c, &request());
        let opts = options_of(&check_headers(&out));
        assert_eq!(
            find(&opts, opt::DOMAIN_LIST).unwrap(),
            b"\x02ok\x04test\x00".to_vec()
        );
    }

    #[test]
    fn too_much_configuration_is_cut_not_overflowed() {
        let mut c = cfg();
        c.dns_search = (0..40).map(|i| format!("{i}.{}", "d".repeat(60))).collect();
        let (v, out) = run(&c, &request());
        assert!(matches!(v, Verdict::Reply(_)), "{v:?}");
        let opts = options_of(&check_headers(&out));
        check_lease(&opts, &[]);
        let list = find(&opts, opt::DOMAIN_LIST).unwrap();
        assert!(!list.is_empty() && list.len() < 1200);
        // A buffer too small for even the mandatory part: ignored, no panic.
        let mut small = [0u8; 80];
        assert_eq!(handle(&cfg(), &request(), &mut small), Verdict::Ignored);
        assert_eq!(handle(&cfg(), &request(), &mut []), Verdict::Ignored);
    }

    #[test]
    fn disabled_or_not_for_us() {
        let mut c = cfg();
        c.dhcpv6 = false;
        assert_eq!(run(&c, &request()).0, Verdict::Ignored);
        let mut c = cfg();
        c.ip6 = None;
        assert_eq!(run(&c, &request()).0, Verdict::Ignored);
        // Unicast to us: we never offered Server Unicast.
        let f = frame_to("fe80::1:1".parse().unwrap(), 546, 547, &msg(1, &[]));
        assert_eq!(run(&cfg(), &f).0, Verdict::Ignored);
        // Another port.
        let f = frame_to(ALL_RELAY_AGENTS_AND_SERVERS, 546, 548, &msg(1, &[]));
        assert_eq!(run(&cfg(), &f).0, Verdict::Ignored);
        // Server-to-client and relay messages.
        for ty in [2, 7, 10, 12, 13] {
            let f = frame(&msg(ty, &[opt(opt::CLIENT_ID, &CLIENT_DUID)]));
            assert_eq!(run(&cfg(), &f).0, Verdict::Ignored, "type {ty}");
        }
        // Not IPv6, or not UDP.
        let mut f = request();
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        assert_eq!(run(&cfg(), &f).0, Verdict::Ignored);
        let mut f = request();
        f[20] = 6;
        assert_eq!(run(&cfg(), &f).0, Verdict::Ignored);
    }

    /// Re-does the UDP checksum after a test changed the frame.
    fn fix_csum(f: &mut [u8]) {
        let src: [u8; 16] = f[22..38].try_into().unwrap();
        let dst: [u8; 16] = f[38..54].try_into().unwrap();
        f[60..62].copy_from_slice(&[0, 0]);
        let c = csum6_udp(src.into(), dst.into(), &f[54..]);
        f[60..62].copy_from_slice(&c.to_be_bytes());
    }

    #[test]
    fn reject_truncated_ethernet() {
        assert_eq!(run(&cfg(), &request()[..13]).0, Verdict::Malformed);
    }

    #[test]
    fn reject_truncated_ipv6_header() {
        assert_eq!(run(&cfg(), &request()[..14 + 39]).0, Verdict::Malformed);
    }

    #[test]
    fn reject_payload_length_past_end() {
        let mut f = request();
        let plen = u16::from_be_bytes([f[18], f[19]]) + 1;
        f[18..20].copy_from_slice(&plen.to_be_bytes());
        assert_eq!(run(&cfg(), &f).0, Verdict::Malformed);
    }

    #[test]
    fn reject_truncated_udp_header() {
        let mut f = request();
        f.truncate(14 + 40 + 7);
        f[18..20].copy_from_slice(&7u16.to_be_bytes());
        assert_eq!(run(&cfg(), &f).0, Verdict::Malformed);
    }

    #[test]
    fn reject_udp_length_inconsistent() {
        for delta in [1i32, -1] {
            let mut f = request();
            let ulen = (i32::from(u16::from_be_bytes([f[58], f[59]])) + delta) as u16;
            f[58..60].copy_from_slice(&ulen.to_be_bytes());
            fix_csum(&mut f);
            assert_eq!(run(&cfg(), &f).0, Verdict::Malformed, "{delta}");
        }
    }

    #[test]
    fn reject_bad_checksum() {
        let mut f = request();
        f[61] ^= 0x01;
        assert_eq!(run(&cfg(), &f).0, Verdict::Malformed);
    }

    #[test]
    fn reject_zero_checksum() {
        let mut f = request();
        f[60..62].copy_from_slice(&[0, 0]);
        assert_eq!(run(&cfg(), &f).0, Verdict::Malformed);
    }

    #[test]
    fn reject_truncated_dhcpv6_header() {
        let f = frame(&[1, 0xab, 0xcd]);
        assert_eq!(run(&cfg(), &f).0, Verdict::Malformed);
    }

    #[test]
    fn reject_option_length_past_end() {
        let mut m = msg(1, &[opt(opt::CLIENT_ID, &CLIENT_DUID), ia_na(IAID, &[])]);
        // Client ID's length, one more than there is.
        let claimed = m.len() as u16 - 4 - 4 + 1;
        m[6..8].copy_from_slice(&claimed.to_be_bytes());
        assert_eq!(run(&cfg(), &frame(&m)).0, Verdict::Malformed);
        // A half option header at the end.
        let mut m = msg(1, &[opt(opt::CLIENT_ID, &CLIENT_DUID)]);
        m.extend([0, 3, 0]);
        assert_eq!(run(&cfg(), &frame(&m)).0, Verdict::Malformed);
    }

    #[test]
    fn reject_nested_option_length_past_end() {
        let mut ia = ia_na(IAID, &[addr()]);
        // The IA Address inside claims one byte more than the IA_NA holds.
        ia[16 + 3] += 1;
        let f = frame(&msg(1, &[opt(opt::CLIENT_ID, &CLIENT_DUID), ia]));
        assert_eq!(run(&cfg(), &f).0, Verdict::Malformed);
    }

    #[test]
    fn reject_short_ia_and_ia_addr() {
        let f = frame(&msg(
            1,
            &[opt(opt::CLIENT_ID, &CLIENT_DUID), opt(opt::IA_NA, &[0; 11])],
        ));
        assert_eq!(run(&cfg(), &f).0, Verdict::Malformed);
        let mut d = IAID.to_vec();
        d.extend([0; 8]);
        d.extend(opt(opt::IA_ADDR, &[0; 23]));
        let f = frame(&msg(
            1,
            &[opt(opt::CLIENT_ID, &CLIENT_DUID), opt(opt::IA_NA, &d)],
        ));
        assert_eq!(run(&cfg(), &f).0, Verdict::Malformed);
    }

    #[test]
    fn reject_bad_client_id_length() {
        for len in [0, 1, 131] {
            let f = frame(&msg(
                1,
                &[opt(opt::CLIENT_ID, &vec![1; len]), ia_na(IAID, &[])],
            ));
            assert_eq!(run(&cfg(), &f).0, Verdict::Malformed, "{len}");
        }
    }

    #[test]
    fn ethernet_padding_is_accepted() {
        let mut f = frame(&msg(11, &[]));
        f.resize(f.len().max(60) + 4, 0);
        assert!(matches!(run(&cfg(), &f).0, Verdict::Reply(_)));
    }

    #[test]
    fn dns_name_encoding() {
        let mut b = [0xffu8; 64];
        assert_eq!(encode_dns_name("a.bc", &mut b), Some(6));
        assert_eq!(&b[..6], b"\x01a\x02bc\x00");
        assert_eq!(encode_dns_name("a.bc.", &mut b), Some(6));
        assert_eq!(encode_dns_name("", &mut b), None);
        assert_eq!(encode_dns_name(".", &mut b), None);
        assert_eq!(encode_dns_name("a..b", &mut b), None);
        assert_eq!(encode_dns_name(".a", &mut b), None);
        assert_eq!(encode_dns_name("a.bc", &mut b[..5]), None);
        let long = "x".repeat(63);
        assert_eq!(encode_dns_name(&long, &mut b), None, "doesn't fit");
        let mut big = [0u8; 300];
        assert_eq!(encode_dns_name(&long, &mut big), Some(65));
        assert_eq!(encode_dns_name(&"x".repeat(64), &mut big), None);
        let name = [long.as_str(); 4].join(".");
        assert_eq!(name.len(), 255);
        assert_eq!(encode_dns_name(&name, &mut big), None, "257 bytes encoded");
        let name = [long.as_str(), &long, &long, &"x".repeat(61)].join(".");
        assert_eq!(encode_dns_name(&name, &mut big), Some(255));
    }

    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    fn valid_frames() -> Vec<Vec<u8>> {
        vec![
            solicit(false),
            solicit(true),
            request(),
            with_server(
                5,
                &our_duid(),
                vec![ia_na(IAID, &[addr(), "2001:db8::7".parse().unwrap()])],
            ),
            frame(&msg(11, &[opt(opt::CLIENT_ID, &CLIENT_DUID)])),
            frame(&msg(
                4,
                &[opt(opt::CLIENT_ID, &CLIENT_DUID), ia_na(IAID, &[addr()])],
            )),
        ]
    }

    #[test]
    fn every_truncation_is_malformed() {
        for f in valid_frames() {
            assert!(matches!(run(&cfg(), &f).0, Verdict::Reply(_)));
            for len in 0..f.len() {
                assert_eq!(run(&cfg(), &f[..len]).0, Verdict::Malformed, "at {len}");
            }
        }
    }

    #[test]
    fn random_mutations_never_panic() {
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        let c = cfg();
        let mut replies = 0;
        for f in valid_frames() {
            for _ in 0..3000 {
                let mut m = f.clone();
                let flips = 1 + rng.next() % 4;
                for _ in 0..flips {
                    let i = (rng.next() as usize) % m.len();
                    m[i] = rng.next() as u8;
                }
                // Half the time, keep the checksum right so the mutation reaches DHCPv6.
                if rng.next() % 2 == 0 && m.len() >= 62 && m[54..].len() >= 8 {
                    fix_csum(&mut m);
                }
                let mut out = vec![0u8; 2048];
                if let Verdict::Reply(n) = handle(&c, &m, &mut out) {
                    replies += 1;
                    assert!(n <= out.len());
                    let reply = &out[..n];
                    let udp_len = n - 54;
                    let src: [u8; 16] = reply[22..38].try_into().unwrap();
                    let dst: [u8; 16] = reply[38..54].try_into().unwrap();
                    assert_eq!(csum6_udp(src.into(), dst.into(), &reply[54..]), 0);
                    assert_eq!(
                        usize::from(u16::from_be_bytes([reply[58], reply[59]])),
                        udp_len
                    );
                    assert!(Packet::new_checked(&reply[62..]).is_ok());
                }
            }
        }
        assert!(replies > 0, "some mutations must still be answered");
    }
}
