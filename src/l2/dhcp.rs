//! DHCPv4 server with a pool of one: the guest gets the host's own address.
//!
//! # Theory of operation
//!
//! There is one client (the guest) and one address to give ([`Ip4::addr`]), so there is no
//! lease table and no state: every answer follows from the request and [`NetConfig`].
//! - DISCOVER: OFFER of [`Ip4::addr`].
//! - REQUEST: ACK if the address asked for (option 50, else `ciaddr`, else none at all)
//!   is [`Ip4::addr`], NAK otherwise, so a guest remembering another address starts over.
//!   A REQUEST naming another server (option 54) chose that server's offer: ignored.
//! - INFORM: ACK with the configuration but no address and no lease time (RFC 2131 §3.4).
//! - RELEASE, DECLINE, anything else: ignored. A DECLINE would mean the host's address is
//!   in use on the guest's link, where nothing but us can be.
//!
//! The lease is infinite (`0xffffffff`, as upstream passt): the address can't be given to
//! anyone else, and a guest that never renews can't be caught with a stale lease. Our
//! server identifier, and the source of our replies, is the gateway: that is the address
//! the guest sees us as.
//!
//! Replies are broadcast at the IP layer (`255.255.255.255`), except ACKs to a client that
//! has an address (`ciaddr`: renewals, INFORM), and unicast to the client's MAC at the
//! Ethernet layer: the link is point-to-point. Checksums are complete, never offloaded:
//! clients read replies from raw sockets, which see what we wrote.
//!
//! # Options and sizes
//!
//! Sent in every OFFER and ACK, whatever the parameter request list says (clients ignore
//! what they didn't ask for; ordering by the list would buy nothing): message type, server
//! identifier, lease time (not for INFORM), subnet mask, router, then as room allows and in
//! this order of precedence: the client identifier echoed (RFC 6842), classless static
//! routes (121, only if the gateway is off the guest's subnet: a /32 route to it and a
//! default route through it, RFC 3442, for a guest given a host route), interface MTU (26),
//! DNS servers (6), host name (12), domain name (15: the first search domain), FQDN (81,
//! RFC 4702) and domain search list (119, RFC 3397, uncompressed, split in 255-byte
//! pieces as RFC 3396 says, cut at a whole domain). NAKs carry the message type, server
//! identifier and client identifier only.
//!
//! "As room allows": a client must accept a 576-byte IP datagram (308 bytes of options,
//! RFC 2131 §2), more if it says so with option 57; busybox's udhcpc drops anything
//! larger than its announced size. Options that don't fit are left out rather than moved
//! into `sname`/`file` (option overload): nobody configures that many.
//!
//! Parsing is by hand on top of [`DhcpPacket`]'s getters rather than with
//! [`DhcpRepr::parse`], which drops options running past the end silently (we call that
//! malformed), refuses 7-byte client identifiers of hardware types other than Ethernet,
//! and doesn't keep option 81. Replies are emitted with [`DhcpRepr::emit`], our options
//! going in `additional_options`, encoded in fixed-size arrays on the stack.
//!
//! [`Ip4::addr`]: crate::conf::Ip4::addr

use std::net::Ipv4Addr;

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    ArpHardware, DhcpMessageType, DhcpOpCode, DhcpOption, DhcpPacket, DhcpRepr, EthernetAddress,
    EthernetFrame, EthernetProtocol, EthernetRepr, IpAddress, IpProtocol, Ipv4Packet, Ipv4Repr,
    UdpPacket, UdpRepr, DHCP_CLIENT_PORT, DHCP_SERVER_PORT, ETHERNET_HEADER_LEN, IPV4_HEADER_LEN,
    UDP_HEADER_LEN,
};

use super::{Verdict, REPLY_BUF_LEN};
use crate::conf::{Ip4, NetConfig};

/// Lease time we give: infinite.
const LEASE_TIME_S: u32 = u32::MAX;
/// Fixed part of a DHCP message: BOOTP header and magic cookie.
const DHCP_FIXED_LEN: usize = 240;
/// Offset of the magic cookie; options follow it.
const MAGIC_COOKIE: u32 = 0x6382_5363;
/// Smallest BOOTP message (RFC 1542 §2.1): some relays and old clients drop shorter ones.
const BOOTP_MIN_LEN: usize = 300;
/// Smallest IP datagram every client accepts, RFC 2131 §2; also option 57's minimum.
const MIN_DHCP_DATAGRAM: usize = 576;
/// All headers in front of the options of a reply.
const REPLY_HEADERS_LEN: usize =
    ETHERNET_HEADER_LEN + IPV4_HEADER_LEN + UDP_HEADER_LEN + DHCP_FIXED_LEN;
/// TTL of our replies.
const REPLY_TTL: u8 = 64;
/// Longest option payload.
const OPT_MAX_LEN: usize = u8::MAX as usize;
/// Room for the encoded search list, split into pieces of [`OPT_MAX_LEN`]: more than any
/// client accepts in practice (see [`options_budget`]).
const SEARCH_BUF_LEN: usize = 1024;
/// Most options we add to what [`DhcpRepr`] emits itself: client identifier, routes,
/// MTU, DNS, host name, domain name, FQDN, and the pieces of the search list.
const MAX_EXTRA_OPTIONS: usize = 7 + SEARCH_BUF_LEN.div_ceil(OPT_MAX_LEN);

/// Option codes we read or write beyond those [`DhcpRepr`] handles.
mod opt {
    pub const PAD: u8 = 0;
    pub const END: u8 = 255;
    pub const DNS: u8 = 6;
    pub const HOST_NAME: u8 = 12;
    pub const DOMAIN_NAME: u8 = 15;
    pub const MTU: u8 = 26;
    pub const REQUESTED_IP: u8 = 50;
    pub const MESSAGE_TYPE: u8 = 53;
    pub const SERVER_ID: u8 = 54;
    pub const MAX_SIZE: u8 = 57;
    pub const CLIENT_ID: u8 = 61;
    pub const FQDN: u8 = 81;
    pub const SEARCH: u8 = 119;
    pub const CLASSLESS_ROUTES: u8 = 121;
}

/// Flags of option 81 (RFC 4702 §2.1).
mod fqdn {
    /// Server: "I update the A record", so the client doesn't.
    pub const S: u8 = 0x01;
    /// Server: "I overrode your S bit".
    pub const O: u8 = 0x02;
    /// Name in canonical wire format, not ASCII.
    pub const E: u8 = 0x04;
    /// RCODE1 and RCODE2, as servers should send them.
    pub const RCODE: u8 = 255;
}

/// Answers one DHCP message from the guest.
///
/// `frame` is a whole Ethernet frame: IPv4, UDP, destination port 67. The reply, if any,
/// is written to the start of `out`. It never exceeds [`REPLY_BUF_LEN`] bytes, nor `out`:
/// optional options are left out to fit a short `out`, and if even the mandatory ones
/// don't fit, the request is [`Verdict::Ignored`].
///
/// [`Verdict::Malformed`] (checked before anything else, so it's counted even with DHCP
/// off): truncated or inconsistent Ethernet, IPv4, UDP or DHCP lengths; bad IPv4 header
/// or UDP checksum (a zero UDP checksum is accepted); IP fragments (no reassembly here);
/// BOOTP op other than request; hardware type other than Ethernet with 6-byte addresses;
/// options running past the end; options 50, 53, 54 or 57 of the wrong length.
///
/// [`Verdict::Ignored`]: DHCP disabled or no IPv4 configuration; not UDP to port 67;
/// plain BOOTP (no magic cookie or no message type); messages we don't answer (see the
/// module documentation).
pub fn handle(cfg: &NetConfig, frame: &[u8], out: &mut [u8]) -> Verdict {
    let (client_mac, req) = match parse(frame) {
        Ok(parsed) => parsed,
        Err(verdict) => return verdict,
    };
    let Some(ip4) = cfg.ip4.as_ref().filter(|_| cfg.dhcp) else {
        return Verdict::Ignored;
    };
    let Some(kind) = answer(ip4, &req) else {
        return Verdict::Ignored;
    };
    emit(cfg, ip4, client_mac, &req, kind, out)
}

/// What we learnt from a request.
struct Request<'a> {
    message_type: DhcpMessageType,
    xid: u32,
    broadcast: bool,
    ciaddr: Ipv4Addr,
    giaddr: Ipv4Addr,
    chaddr: EthernetAddress,
    requested_ip: Option<Ipv4Addr>,
    server_id: Option<Ipv4Addr>,
    client_id: Option<&'a [u8]>,
    /// Option 57, at least [`MIN_DHCP_DATAGRAM`].
    max_size: Option<usize>,
    /// Flags of the client's option 81.
    fqdn_flags: Option<u8>,
}

/// Validates the frame down to the DHCP options; returns the sender's MAC and the request.
fn parse(frame: &[u8]) -> Result<(EthernetAddress, Request<'_>), Verdict> {
    let caps = ChecksumCapabilities::default();
    let eth = EthernetFrame::new_checked(frame).map_err(|_| Verdict::Malformed)?;
    if eth.ethertype() != EthernetProtocol::Ipv4 {
        return Err(Verdict::Ignored);
    }
    // `new_checked` checks the header and total lengths against the buffer (Ethernet
    // padding may follow); `parse` checks version, header checksum and fragmentation.
    let ip = Ipv4Packet::new_checked(eth.payload()).map_err(|_| Verdict::Malformed)?;
    let ip_repr = Ipv4Repr::parse(&ip, &caps).map_err(|_| Verdict::Malformed)?;
    if ip_repr.next_header != IpProtocol::Udp {
        return Err(Verdict::Ignored);
    }
    let udp = UdpPacket::new_checked(ip.payload()).map_err(|_| Verdict::Malformed)?;
    if usize::from(udp.len()) != ip.payload().len() {
        return Err(Verdict::Malformed);
    }
    let (src, dst) = (
        IpAddress::Ipv4(ip_repr.src_addr),
        IpAddress::Ipv4(ip_repr.dst_addr),
    );
    let udp_repr = UdpRepr::parse(&udp, &src, &dst, &caps).map_err(|_| Verdict::Malformed)?;
    if udp_repr.dst_port != DHCP_SERVER_PORT {
        return Err(Verdict::Ignored);
    }

    let dhcp = DhcpPacket::new_checked(udp.payload()).map_err(|_| Verdict::Malformed)?;
    if dhcp.opcode() != DhcpOpCode::Request
        || dhcp.hardware_type() != ArpHardware::Ethernet
        || dhcp.hardware_len() != 6
    {
        return Err(Verdict::Malformed);
    }
    if dhcp.magic_number() != MAGIC_COOKIE {
        return Err(Verdict::Ignored);
    }
    let mut message_type = None;
    let mut req = Request {
        message_type: DhcpMessageType::Unknown(0), // From option 53, below.
        xid: dhcp.transaction_id(),
        broadcast: dhcp.flags().contains(smoltcp::wire::DhcpFlags::BROADCAST),
        ciaddr: dhcp.client_ip(),
        giaddr: dhcp.relay_agent_ip(),
        chaddr: dhcp.client_hardware_address(),
        requested_ip: None,
        server_id: None,
        client_id: None,
        max_size: None,
        fqdn_flags: None,
    };
    for o in options(udp.payload().get(DHCP_FIXED_LEN..).unwrap_or_default()) {
        let Some(o) = o else {
            return Err(Verdict::Malformed);
        };
        match (o.kind, o.data) {
            (opt::MESSAGE_TYPE, &[t]) => message_type = Some(DhcpMessageType::from(t)),
            (opt::REQUESTED_IP, &[a, b, c, d]) => req.requested_ip = Some([a, b, c, d].into()),
            (opt::SERVER_ID, &[a, b, c, d]) => req.server_id = Some([a, b, c, d].into()),
            (opt::MAX_SIZE, &[a, b]) => {
                let size = usize::from(u16::from_be_bytes([a, b]));
                req.max_size = Some(size.max(MIN_DHCP_DATAGRAM));
            }
            (opt::MESSAGE_TYPE | opt::REQUESTED_IP | opt::SERVER_ID | opt::MAX_SIZE, _) => {
                return Err(Verdict::Malformed)
            }
            (opt::CLIENT_ID, id) if !id.is_empty() => req.client_id = Some(id),
            (opt::FQDN, &[flags, ..]) => req.fqdn_flags = Some(flags),
            _ => {}
        }
    }
    req.message_type = message_type.ok_or(Verdict::Ignored)?;
    Ok((eth.src_addr(), req))
}

/// The options in `area`, up to END or the end of `area`, then `None` if the last one
/// runs past the end. smoltcp's iterator stops there silently, and borrows the packet view
/// rather than the buffer.
fn options(area: &[u8]) -> impl Iterator<Item = Option<DhcpOption<'_>>> {
    let mut rest = area;
    std::iter::from_fn(move || loop {
        match *rest {
            [] | [opt::END, ..] => return None,
            [opt::PAD, ref tail @ ..] => rest = tail,
            [kind, len, ref tail @ ..] if tail.len() >= usize::from(len) => {
                let (data, tail) = tail.split_at(usize::from(len));
                rest = tail;
                return Some(Some(DhcpOption { kind, data }));
            }
            _ => {
                rest = &[];
                return Some(None);
            }
        }
    })
}

/// The kind of reply we send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    Offer,
    Ack,
    Nak,
    /// ACK to an INFORM: configuration, no address, no lease.
    InformAck,
}

fn answer(ip4: &Ip4, req: &Request<'_>) -> Option<Answer> {
    match req.message_type {
        DhcpMessageType::Discover => Some(Answer::Offer),
        DhcpMessageType::Request => {
            if req.server_id.is_some_and(|s| s != ip4.gateway) {
                return None;
            }
            let asked = req
                .requested_ip
                .or((!req.ciaddr.is_unspecified()).then_some(req.ciaddr));
            if asked.is_none_or(|a| a == ip4.addr) {
                Some(Answer::Ack)
            } else {
                Some(Answer::Nak)
            }
        }
        DhcpMessageType::Inform => Some(Answer::InformAck),
        _ => None,
    }
}

/// Bytes of options (END included) a reply may carry, given what the client accepts and
/// the room in `out`.
fn options_budget(req: &Request<'_>, out_len: usize) -> usize {
    let client = req.max_size.unwrap_or(MIN_DHCP_DATAGRAM)
        - (IPV4_HEADER_LEN + UDP_HEADER_LEN + DHCP_FIXED_LEN);
    client.min(out_len.min(REPLY_BUF_LEN).saturating_sub(REPLY_HEADERS_LEN))
}

/// Option payloads we encode ourselves, on the stack.
struct Encoded {
    routes: [u8; 14],
    routes_len: usize,
    mtu: [u8; 2],
    dns: [u8; 4 * (OPT_MAX_LEN / 4)],
    dns_len: usize,
    fqdn: [u8; 3 + OPT_MAX_LEN],
    fqdn_len: usize,
    search: [u8; SEARCH_BUF_LEN],
}

/// A bounded list of extra options, filled in order of precedence while room lasts.
struct Extra<'a> {
    options: [DhcpOption<'a>; MAX_EXTRA_OPTIONS],
    count: usize,
    room: usize,
}

impl<'a> Extra<'a> {
    /// Adds `data` as one option if it fits; returns whether it did.
    fn push(&mut self, kind: u8, data: &'a [u8]) -> bool {
        if data.is_empty() || data.len() > OPT_MAX_LEN || 2 + data.len() > self.room {
            return false;
        }
        let Some(slot) = self.options.get_mut(self.count) else {
            return false;
        };
        *slot = DhcpOption { kind, data };
        self.count += 1;
        self.room -= 2 + data.len();
        true
    }

    fn as_slice(&self) -> &[DhcpOption<'a>] {
        &self.options[..self.count]
    }
}

/// Bytes option(s) carrying `len` bytes of data take, split per RFC 3396.
fn split_option_len(len: usize) -> usize {
    len + 2 * len.div_ceil(OPT_MAX_LEN)
}

fn emit(
    cfg: &NetConfig,
    ip4: &Ip4,
    client_mac: EthernetAddress,
    req: &Request<'_>,
    answer: Answer,
    out: &mut [u8],
) -> Verdict {
    let server = ip4.gateway;
    let configures = answer != Answer::Nak;
    let mut repr = DhcpRepr {
        message_type: match answer {
            Answer::Offer => DhcpMessageType::Offer,
            Answer::Ack | Answer::InformAck => DhcpMessageType::Ack,
            Answer::Nak => DhcpMessageType::Nak,
        },
        transaction_id: req.xid,
        secs: 0,
        client_hardware_address: req.chaddr,
        client_ip: match answer {
            Answer::Ack | Answer::InformAck => req.ciaddr,
            Answer::Offer | Answer::Nak => Ipv4Addr::UNSPECIFIED,
        },
        your_ip: match answer {
            Answer::Offer | Answer::Ack => ip4.addr,
            Answer::InformAck | Answer::Nak => Ipv4Addr::UNSPECIFIED,
        },
        server_ip: Ipv4Addr::UNSPECIFIED,
        router: configures.then_some(ip4.gateway),
        subnet_mask: configures.then(|| ip4.netmask()),
        relay_agent_ip: req.giaddr,
        broadcast: req.broadcast,
        requested_ip: None,
        client_identifier: None,
        server_identifier: Some(server),
        parameter_request_list: None,
        dns_servers: None,
        max_size: None,
        lease_duration: matches!(answer, Answer::Offer | Answer::Ack).then_some(LEASE_TIME_S),
        renew_duration: None,
        rebind_duration: None,
        additional_options: &[],
    };
    // `buffer_len` counts the message type, END and the options set above.
    let Some(room) = options_budget(req, out.len()).checked_sub(repr.buffer_len() - DHCP_FIXED_LEN)
    else {
        return Verdict::Ignored;
    };

    let mut enc = Encoded {
        routes: [0; 14],
        routes_len: 0,
        mtu: [0; 2],
        dns: [0; 4 * (OPT_MAX_LEN / 4)],
        dns_len: 0,
        fqdn: [0; 3 + OPT_MAX_LEN],
        fqdn_len: 0,
        search: [0; SEARCH_BUF_LEN],
    };
    if configures {
        encode_options(cfg, ip4, req, &mut enc);
    }
    let mut extra = Extra {
        options: [DhcpOption {
            kind: opt::PAD,
            data: &[],
        }; MAX_EXTRA_OPTIONS],
        count: 0,
        room,
    };
    if let Some(id) = req.client_id {
        extra.push(opt::CLIENT_ID, id);
    }
    if configures {
        extra.push(opt::CLASSLESS_ROUTES, &enc.routes[..enc.routes_len]);
        if cfg.mtu.is_some() {
            extra.push(opt::MTU, &enc.mtu);
        }
        // As many servers as fit, in order.
        let fit = extra.room.saturating_sub(2) / 4 * 4;
        extra.push(opt::DNS, &enc.dns[..enc.dns_len.min(fit)]);
        if let Some(name) = &cfg.hostname {
            extra.push(opt::HOST_NAME, name.as_bytes());
        }
        if let Some(domain) = cfg.dns_search.first() {
            let domain = domain.strip_suffix('.').unwrap_or(domain);
            extra.push(opt::DOMAIN_NAME, domain.as_bytes());
        }
        extra.push(opt::FQDN, &enc.fqdn[..enc.fqdn_len]);
        let search_len = encode_search(&cfg.dns_search, &mut enc.search, extra.room);
        for piece in enc.search[..search_len].chunks(OPT_MAX_LEN) {
            extra.push(opt::SEARCH, piece);
        }
    }
    repr.additional_options = extra.as_slice();

    let dhcp_len = repr.buffer_len().max(BOOTP_MIN_LEN);
    let udp_len = UDP_HEADER_LEN + dhcp_len;
    let ip_len = IPV4_HEADER_LEN + udp_len;
    let frame_len = ETHERNET_HEADER_LEN + ip_len;
    let Some(buf) = out.get_mut(..frame_len) else {
        return Verdict::Ignored;
    };

    let dst = if answer != Answer::Nak && !req.ciaddr.is_unspecified() {
        req.ciaddr
    } else {
        Ipv4Addr::BROADCAST
    };
    let caps = ChecksumCapabilities::default();
    let mut eth = EthernetFrame::new_unchecked(buf);
    EthernetRepr {
        src_addr: EthernetAddress(cfg.our_mac),
        dst_addr: client_mac,
        ethertype: EthernetProtocol::Ipv4,
    }
    .emit(&mut eth);
    let mut ip = Ipv4Packet::new_unchecked(eth.payload_mut());
    Ipv4Repr {
        src_addr: server,
        dst_addr: dst,
        next_header: IpProtocol::Udp,
        payload_len: udp_len,
        hop_limit: REPLY_TTL,
    }
    .emit(&mut ip, &caps);
    let mut emitted = false;
    UdpRepr {
        src_port: DHCP_SERVER_PORT,
        dst_port: DHCP_CLIENT_PORT,
    }
    .emit(
        &mut UdpPacket::new_unchecked(ip.payload_mut()),
        &IpAddress::Ipv4(server),
        &IpAddress::Ipv4(dst),
        dhcp_len,
        |payload| {
            // Zeroes are the padding after END, up to the BOOTP minimum.
            payload.fill(0);
            emitted = repr.emit(&mut DhcpPacket::new_unchecked(payload)).is_ok();
        },
        &caps,
    );
    if emitted {
        Verdict::Reply(frame_len)
    } else {
        // Sized by `buffer_len` above: not reached.
        Verdict::Ignored
    }
}

/// Fills the payloads of options 121, 26, 6 and 81.
fn encode_options(cfg: &NetConfig, ip4: &Ip4, req: &Request<'_>, enc: &mut Encoded) {
    if !ip4.on_link(ip4.gateway) {
        // RFC 3442: width, significant octets of the destination, router. The router of
        // the /32 route is 0.0.0.0: on-link.
        let gw = ip4.gateway.octets();
        let mut routes = [0u8; 14];
        routes[0] = 32;
        routes[1..5].copy_from_slice(&gw);
        // routes[5..9]: 0.0.0.0, routes[9]: width 0 (default route), no octets.
        routes[10..14].copy_from_slice(&gw);
        enc.routes = routes;
        enc.routes_len = routes.len();
    }
    if let Some(mtu) = cfg.mtu {
        enc.mtu = mtu.to_be_bytes();
    }
    for (slot, addr) in enc.dns.chunks_exact_mut(4).zip(&ip4.dns) {
        slot.copy_from_slice(&addr.octets());
        enc.dns_len += 4;
    }
    if let Some(name) = &cfg.fqdn {
        // We (pretend to) update DNS, so the client must not: S set, O if the client
        // asked otherwise.
        let mut flags = fqdn::S | fqdn::E;
        if req.fqdn_flags.is_some_and(|f| f & fqdn::S == 0) {
            flags |= fqdn::O;
        }
        enc.fqdn[..3].copy_from_slice(&[flags, fqdn::RCODE, fqdn::RCODE]);
        if let Some(len) = encode_name(name, &mut enc.fqdn[3..]) {
            enc.fqdn_len = 3 + len;
        }
    }
}

/// Encodes as many whole domains of `search` as fit in `buf` and in `room` bytes of options
/// (split per RFC 3396); returns the encoded length. Invalid names are skipped.
fn encode_search(search: &[String], buf: &mut [u8], room: usize) -> usize {
    let mut len = 0;
    for domain in search {
        let Some(rest) = buf.get_mut(len..) else {
            break;
        };
        let Some(n) = encode_name(domain, rest) else {
            continue;
        };
        if split_option_len(len + n) > room {
            break;
        }
        len += n;
    }
    len
}

/// Writes `name` in DNS wire format (length-prefixed labels, then the root label) at the
/// start of `buf`; returns its length, or `None` if the name is empty, has an empty or
/// over-long label, is over 255 bytes encoded, or doesn't fit in `buf`.
fn encode_name(name: &str, buf: &mut [u8]) -> Option<usize> {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() {
        return None;
    }
    let mut len = 0;
    for label in name.split('.') {
        let bytes = label.as_bytes();
        if bytes.is_empty() || bytes.len() > 63 {
            return None;
        }
        let end = len + 1 + bytes.len();
        let dst = buf.get_mut(len..end)?;
        dst[0] = bytes.len() as u8;
        dst[1..].copy_from_slice(bytes);
        len = end;
    }
    *buf.get_mut(len)? = 0;
    len += 1;
    (len <= OPT_MAX_LEN).then_some(len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::l2::test_util::csum;
    use std::collections::BTreeMap;

    const CLIENT_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
    const OUR_MAC: [u8; 6] = [0x9a, 0x55, 0x9a, 0x55, 0x9a, 0x55];
    const GUEST: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
    const GW: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
    const XID: u32 = 0x3903_f326;

    fn cfg() -> NetConfig {
        NetConfig {
            our_mac: OUR_MAC,
            mtu: Some(65520),
            ip4: Some(Ip4 {
                addr: GUEST,
                prefix_len: 24,
                gateway: GW,
                dns: vec![
                    Ipv4Addr::new(198, 51, 100, 53),
                    Ipv4Addr::new(198, 51, 100, 54),
                ],
            }),
            dns_search: vec!["example.test".into(), "corp.example.test.".into()],
            hostname: Some("guest".into()),
            fqdn: Some("guest.example.test".into()),
            ..NetConfig::default()
        }
    }

    /// Recomputes the IPv4 and UDP checksums of a frame built by [`request`], as far as
    /// its length fields allow (so mutated frames still get past the checksums).
    fn fix_checksums(f: &mut [u8]) {
        let Some(ip) = f.get_mut(14..) else { return };
        if ip.len() < 20 {
            return;
        }
        let ihl = usize::from(ip[0] & 0xf) * 4;
        let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
        if ihl < 20 || ihl > ip.len() {
            return;
        }
        ip[10..12].fill(0);
        let c = csum(&[&ip[..ihl]]);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        if total < ihl + 8 || total > ip.len() {
            return;
        }
        let udp_len = usize::from(u16::from_be_bytes([ip[ihl + 4], ip[ihl + 5]]));
        if udp_len < 8 || ihl + udp_len > ip.len() {
            return;
        }
        let mut pseudo = [0u8; 12];
        pseudo[..8].copy_from_slice(&ip[12..20]);
        pseudo[9] = 17;
        pseudo[10..].copy_from_slice(&(udp_len as u16).to_be_bytes());
        ip[ihl + 6..ihl + 8].fill(0);
        let c = csum(&[&pseudo, &ip[ihl..ihl + udp_len]]);
        ip[ihl + 6..ihl + 8].copy_from_slice(&(if c == 0 { 0xffff } else { c }).to_be_bytes());
    }

    /// A client message as Linux clients send it (raw socket), built byte by byte:
    /// `options` go after the magic cookie, END included by the caller.
    fn request(
        src: Ipv4Addr,
        dst: Ipv4Addr,
        ciaddr: Ipv4Addr,
        flags: u16,
        options: &[u8],
    ) -> Vec<u8> {
        let mut bootp = vec![1, 1, 6, 0];
        bootp.extend_from_slice(&XID.to_be_bytes());
        bootp.extend_from_slice(&3u16.to_be_bytes()); // secs
        bootp.extend_from_slice(&flags.to_be_bytes());
        bootp.extend_from_slice(&ciaddr.octets());
        bootp.extend_from_slice(&[0; 12]); // yiaddr, siaddr, giaddr
        bootp.extend_from_slice(&CLIENT_MAC);
        bootp.extend_from_slice(&[0; 10 + 64 + 128]);
        bootp.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
        bootp.extend_from_slice(options);

        let udp_len = 8 + bootp.len();
        let mut f = Vec::new();
        f.extend_from_slice(&[0xff; 6]);
        f.extend_from_slice(&CLIENT_MAC);
        f.extend_from_slice(&[0x08, 0x00]);
        f.extend_from_slice(&[0x45, 0x10]);
        f.extend_from_slice(&((20 + udp_len) as u16).to_be_bytes());
        f.extend_from_slice(&[0, 0, 0, 0, 64, 17, 0, 0]);
        f.extend_from_slice(&src.octets());
        f.extend_from_slice(&dst.octets());
        f.extend_from_slice(&68u16.to_be_bytes());
        f.extend_from_slice(&67u16.to_be_bytes());
        f.extend_from_slice(&(udp_len as u16).to_be_bytes());
        f.extend_from_slice(&[0, 0]);
        f.extend_from_slice(&bootp);
        fix_checksums(&mut f);
        f
    }

    /// Options of busybox udhcpc 1.35: client id, max size 576, request list, vendor class.
    fn busybox_options(msg: u8, extra: &[u8]) -> Vec<u8> {
        let mut o = vec![53, 1, msg, 61, 7, 1];
        o.extend_from_slice(&CLIENT_MAC);
        o.extend_from_slice(extra);
        o.extend_from_slice(&[57, 2, 0x02, 0x40]);
        o.extend_from_slice(&[55, 7, 1, 3, 6, 12, 15, 28, 42]);
        o.extend_from_slice(&[60, 12]);
        o.extend_from_slice(b"udhcp 1.35.0");
        o.push(255);
        o
    }

    fn discover() -> Vec<u8> {
        let o = busybox_options(1, &[]);
        request(
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::BROADCAST,
            Ipv4Addr::UNSPECIFIED,
            0,
            &o,
        )
    }

    fn request_for(addr: Ipv4Addr) -> Vec<u8> {
        let mut ext = vec![50, 4];
        ext.extend_from_slice(&addr.octets());
        ext.extend_from_slice(&[54, 4]);
        ext.extend_from_slice(&GW.octets());
        let o = busybox_options(3, &ext);
        request(
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::BROADCAST,
            Ipv4Addr::UNSPECIFIED,
            0,
            &o,
        )
    }

    fn run(cfg: &NetConfig, frame: &[u8]) -> (Verdict, Vec<u8>) {
        let mut out = vec![0u8; REPLY_BUF_LEN];
        let v = handle(cfg, frame, &mut out);
        if let Verdict::Reply(n) = v {
            out.truncate(n);
        }
        (v, out)
    }

    /// A reply taken apart with smoltcp, checking what every reply must satisfy.
    struct Reply {
        ip_dst: Ipv4Addr,
        repr_type: DhcpMessageType,
        ciaddr: Ipv4Addr,
        yiaddr: Ipv4Addr,
        broadcast: bool,
        /// Options by code, pieces of split options concatenated.
        options: BTreeMap<u8, Vec<u8>>,
        /// Bytes of options, END included.
        options_len: usize,
        /// How many options of code 119 there were.
        search_pieces: usize,
    }

    fn parse_reply(out: &[u8]) -> Reply {
        parse_reply_from(out, GW)
    }

    fn parse_reply_from(out: &[u8], server: Ipv4Addr) -> Reply {
        let eth = EthernetFrame::new_checked(out).unwrap();
        assert_eq!(eth.dst_addr(), EthernetAddress(CLIENT_MAC));
        assert_eq!(eth.src_addr(), EthernetAddress(OUR_MAC));
        assert_eq!(eth.ethertype(), EthernetProtocol::Ipv4);
        let ip = Ipv4Packet::new_checked(eth.payload()).unwrap();
        assert!(ip.verify_checksum());
        assert_eq!(usize::from(ip.total_len()), eth.payload().len());
        let ip_repr = Ipv4Repr::parse(&ip, &ChecksumCapabilities::default()).unwrap();
        assert_eq!(ip_repr.src_addr, server);
        assert_eq!(ip_repr.hop_limit, 64);
        assert_eq!(ip_repr.next_header, IpProtocol::Udp);
        let udp = UdpPacket::new_checked(ip.payload()).unwrap();
        assert_eq!(usize::from(udp.len()), ip.payload().len());
        assert_ne!(udp.checksum(), 0, "UDP checksum left out");
        let (s, d) = (IpAddress::Ipv4(server), IpAddress::Ipv4(ip_repr.dst_addr));
        assert!(udp.verify_checksum(&s, &d));
        assert_eq!((udp.src_port(), udp.dst_port()), (67, 68));

        let payload = udp.payload();
        assert!(payload.len() >= BOOTP_MIN_LEN);
        let dhcp = DhcpPacket::new_checked(payload).unwrap();
        assert_eq!(dhcp.opcode(), DhcpOpCode::Reply);
        assert_eq!(dhcp.hardware_type(), ArpHardware::Ethernet);
        assert_eq!(dhcp.hardware_len(), 6);
        assert_eq!(dhcp.hops(), 0);
        assert_eq!(dhcp.transaction_id(), XID);
        assert_eq!(dhcp.secs(), 0);
        assert_eq!(dhcp.client_hardware_address(), EthernetAddress(CLIENT_MAC));
        assert_eq!(dhcp.server_ip(), Ipv4Addr::UNSPECIFIED);
        assert_eq!(dhcp.relay_agent_ip(), Ipv4Addr::UNSPECIFIED);
        assert_eq!(dhcp.magic_number(), 0x6382_5363);
        assert!(
            payload[34..236].iter().all(|&b| b == 0),
            "chaddr pad, sname, file"
        );
        let repr = DhcpRepr::parse(&dhcp).unwrap();

        let mut options = BTreeMap::new();
        let mut search_pieces = 0;
        for o in dhcp.options() {
            if o.kind == opt::SEARCH {
                search_pieces += 1;
            } else {
                assert!(!options.contains_key(&o.kind), "option {} twice", o.kind);
            }
            options
                .entry(o.kind)
                .or_insert_with(Vec::new)
                .extend_from_slice(o.data);
        }
        // Where END is, and only padding after it.
        let area = &payload[DHCP_FIXED_LEN..];
        let mut at = 0;
        while area[at] != opt::END {
            at += 2 + usize::from(area[at + 1]);
        }
        assert!(area[at + 1..].iter().all(|&b| b == 0));
        Reply {
            ip_dst: ip_repr.dst_addr,
            repr_type: repr.message_type,
            ciaddr: dhcp.client_ip(),
            yiaddr: dhcp.your_ip(),
            broadcast: repr.broadcast,
            options,
            options_len: at + 1,
            search_pieces,
        }
    }

    fn client_id() -> Vec<u8> {
        let mut id = vec![1];
        id.extend_from_slice(&CLIENT_MAC);
        id
    }

    /// Options the test configuration gives, with `kind` as message type.
    fn full_options(kind: u8, lease: bool) -> BTreeMap<u8, Vec<u8>> {
        let mut m = BTreeMap::new();
        m.insert(53, vec![kind]);
        m.insert(54, GW.octets().to_vec());
        if lease {
            m.insert(51, vec![0xff; 4]);
        }
        m.insert(1, vec![255, 255, 255, 0]);
        m.insert(3, GW.octets().to_vec());
        m.insert(61, client_id());
        m.insert(26, vec![0xff, 0xf0]);
        m.insert(6, vec![198, 51, 100, 53, 198, 51, 100, 54]);
        m.insert(12, b"guest".to_vec());
        m.insert(15, b"example.test".to_vec());
        m.insert(81, b"\x05\xff\xff\x05guest\x07example\x04test\x00".to_vec());
        m.insert(
            119,
            b"\x07example\x04test\x00\x04corp\x07example\x04test\x00".to_vec(),
        );
        m
    }

    #[test]
    fn discover_gets_offer() {
        let (v, out) = run(&cfg(), &discover());
        assert!(matches!(v, Verdict::Reply(_)), "{v:?}");
        let r = parse_reply(&out);
        assert_eq!(r.repr_type, DhcpMessageType::Offer);
        assert_eq!(r.ip_dst, Ipv4Addr::BROADCAST);
        assert_eq!((r.ciaddr, r.yiaddr), (Ipv4Addr::UNSPECIFIED, GUEST));
        assert!(!r.broadcast);
        assert_eq!(r.options, full_options(2, true));
        assert_eq!(r.search_pieces, 1);
        // No padding past END: the message is over the BOOTP minimum.
        assert_eq!(out.len(), 14 + 20 + 8 + 240 + r.options_len);
    }

    #[test]
    fn broadcast_flag_is_echoed() {
        let o = busybox_options(1, &[]);
        let f = request(
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::BROADCAST,
            Ipv4Addr::UNSPECIFIED,
            0x8000,
            &o,
        );
        let r = parse_reply(&run(&cfg(), &f).1);
        assert!(r.broadcast);
    }

    #[test]
    fn request_for_our_address_gets_ack() {
        let (v, out) = run(&cfg(), &request_for(GUEST));
        assert!(matches!(v, Verdict::Reply(_)), "{v:?}");
        let r = parse_reply(&out);
        assert_eq!(r.repr_type, DhcpMessageType::Ack);
        assert_eq!(r.ip_dst, Ipv4Addr::BROADCAST);
        assert_eq!((r.ciaddr, r.yiaddr), (Ipv4Addr::UNSPECIFIED, GUEST));
        assert_eq!(r.options, full_options(5, true));
    }

    #[test]
    fn request_for_another_address_gets_nak() {
        let (v, out) = run(&cfg(), &request_for(Ipv4Addr::new(10, 0, 2, 15)));
        assert!(matches!(v, Verdict::Reply(_)), "{v:?}");
        let r = parse_reply(&out);
        assert_eq!(r.repr_type, DhcpMessageType::Nak);
        assert_eq!(r.ip_dst, Ipv4Addr::BROADCAST);
        assert_eq!(
            (r.ciaddr, r.yiaddr),
            (Ipv4Addr::UNSPECIFIED, Ipv4Addr::UNSPECIFIED)
        );
        let expected =
            BTreeMap::from([(53, vec![6]), (54, GW.octets().to_vec()), (61, client_id())]);
        assert_eq!(r.options, expected);
    }

    #[test]
    fn request_for_another_server_is_ignored() {
        let mut ext = vec![50, 4];
        ext.extend_from_slice(&GUEST.octets());
        ext.extend_from_slice(&[54, 4, 192, 0, 2, 254]);
        let o = busybox_options(3, &ext);
        let f = request(
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::BROADCAST,
            Ipv4Addr::UNSPECIFIED,
            0,
            &o,
        );
        assert_eq!(run(&cfg(), &f).0, Verdict::Ignored);
    }

    #[test]
    fn renewal_is_acked_to_ciaddr() {
        let o = busybox_options(3, &[]);
        let f = request(GUEST, GW, GUEST, 0, &o);
        let r = parse_reply(&run(&cfg(), &f).1);
        assert_eq!(r.repr_type, DhcpMessageType::Ack);
        assert_eq!(r.ip_dst, GUEST);
        assert_eq!((r.ciaddr, r.yiaddr), (GUEST, GUEST));
        assert_eq!(r.options, full_options(5, true));

        // Renewing an address we don't give: NAK, broadcast.
        let other = Ipv4Addr::new(192, 0, 2, 99);
        let f = request(other, GW, other, 0, &o);
        let r = parse_reply(&run(&cfg(), &f).1);
        assert_eq!(r.repr_type, DhcpMessageType::Nak);
        assert_eq!(r.ip_dst, Ipv4Addr::BROADCAST);
        assert_eq!(r.ciaddr, Ipv4Addr::UNSPECIFIED);
    }

    #[test]
    fn request_naming_no_address_is_acked() {
        let o = busybox_options(3, &[]);
        let f = request(
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::BROADCAST,
            Ipv4Addr::UNSPECIFIED,
            0,
            &o,
        );
        let r = parse_reply(&run(&cfg(), &f).1);
        assert_eq!(r.repr_type, DhcpMessageType::Ack);
        assert_eq!(r.yiaddr, GUEST);
    }

    #[test]
    fn inform_gets_ack_without_address_or_lease() {
        let o = busybox_options(8, &[]);
        let f = request(GUEST, Ipv4Addr::BROADCAST, GUEST, 0, &o);
        let (v, out) = run(&cfg(), &f);
        assert!(matches!(v, Verdict::Reply(_)), "{v:?}");
        let r = parse_reply(&out);
        assert_eq!(r.repr_type, DhcpMessageType::Ack);
        assert_eq!(r.ip_dst, GUEST);
        assert_eq!((r.ciaddr, r.yiaddr), (GUEST, Ipv4Addr::UNSPECIFIED));
        assert_eq!(r.options, full_options(5, false));
    }

    #[test]
    fn release_decline_and_server_messages_are_ignored() {
        for msg in [2, 4, 5, 6, 7, 9, 200] {
            let o = busybox_options(msg, &[]);
            let f = request(GUEST, GW, GUEST, 0, &o);
            assert_eq!(run(&cfg(), &f).0, Verdict::Ignored, "type {msg}");
        }
        // Plain BOOTP: no message type, or no magic cookie.
        let f = request(
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::BROADCAST,
            Ipv4Addr::UNSPECIFIED,
            0,
            &[255],
        );
        assert_eq!(run(&cfg(), &f).0, Verdict::Ignored);
        let mut f = discover();
        f[14 + 20 + 8 + 236] = 0;
        fix_checksums(&mut f);
        assert_eq!(run(&cfg(), &f).0, Verdict::Ignored);
    }

    #[test]
    fn disabled_or_no_ipv4_is_ignored() {
        let off = NetConfig {
            dhcp: false,
            ..cfg()
        };
        assert_eq!(run(&off, &discover()).0, Verdict::Ignored);
        let no4 = NetConfig { ip4: None, ..cfg() };
        assert_eq!(run(&no4, &discover()).0, Verdict::Ignored);
        // Malformed still counts as such.
        assert_eq!(run(&off, &discover()[..30]).0, Verdict::Malformed);
    }

    #[test]
    fn not_udp_port_67_is_ignored() {
        let mut f = discover();
        f[14 + 20 + 2..14 + 20 + 4].copy_from_slice(&68u16.to_be_bytes());
        fix_checksums(&mut f);
        assert_eq!(run(&cfg(), &f).0, Verdict::Ignored);
        let mut f = discover();
        f[14 + 9] = 6;
        fix_checksums(&mut f);
        assert_eq!(run(&cfg(), &f).0, Verdict::Ignored);
    }

    #[test]
    fn host_route_gets_classless_routes() {
        let mut c = cfg();
        let ip4 = c.ip4.as_mut().unwrap();
        ip4.prefix_len = 32;
        let far_gw = Ipv4Addr::new(203, 0, 113, 1);
        ip4.gateway = far_gw;
        let r = parse_reply_from(&run(&c, &discover()).1, far_gw);
        assert_eq!(r.options[&1], vec![255; 4]);
        assert_eq!(r.options[&3], vec![203, 0, 113, 1]);
        assert_eq!(r.options[&54], vec![203, 0, 113, 1]);
        assert_eq!(
            r.options[&121],
            vec![32, 203, 0, 113, 1, 0, 0, 0, 0, 0, 203, 0, 113, 1]
        );
        // On-link gateway: no routes.
        let r = parse_reply(&run(&cfg(), &discover()).1);
        assert!(!r.options.contains_key(&121));
    }

    #[test]
    fn minimal_configuration_sends_minimal_options() {
        let c = NetConfig {
            our_mac: OUR_MAC,
            mtu: None,
            ip4: Some(Ip4 {
                addr: GUEST,
                prefix_len: 16,
                gateway: GW,
                dns: vec![],
            }),
            ..NetConfig::default()
        };
        let o = [53, 1, 1, 255];
        let f = request(
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::BROADCAST,
            Ipv4Addr::UNSPECIFIED,
            0,
            &o,
        );
        let (_, out) = run(&c, &f);
        // Padded to the BOOTP minimum.
        assert_eq!(out.len(), 14 + 20 + 8 + 300);
        let r = parse_reply(&out);
        let expected = BTreeMap::from([
            (53, vec![2]),
            (54, GW.octets().to_vec()),
            (51, vec![0xff; 4]),
            (1, vec![255, 255, 0, 0]),
            (3, GW.octets().to_vec()),
        ]);
        assert_eq!(r.options, expected);
    }

    #[test]
    fn fqdn_flags_override_client() {
        // A client asking to do its own A update (S clear) is overridden.
        let mut o = vec![53, 1, 1, 81, 9, 0x00, 0, 0];
        o.extend_from_slice(b"\x04host\x00");
        o.push(255);
        let f = request(
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::BROADCAST,
            Ipv4Addr::UNSPECIFIED,
            0,
            &o,
        );
        let r = parse_reply(&run(&cfg(), &f).1);
        assert_eq!(r.options[&81][..3], [0x07, 0xff, 0xff]);
        // One that lets us do it is not.
        o[5] = 0x01;
        let f = request(
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::BROADCAST,
            Ipv4Addr::UNSPECIFIED,
            0,
            &o,
        );
        let r = parse_reply(&run(&cfg(), &f).1);
        assert_eq!(r.options[&81][..3], [0x05, 0xff, 0xff]);
    }

    fn many_domains() -> Vec<String> {
        (0..40)
            .map(|i| format!("domain-number-{i:02}.example.test"))
            .collect()
    }

    fn encoded(domains: &[String]) -> Vec<u8> {
        let mut v = Vec::new();
        for d in domains {
            for l in d.split('.') {
                v.push(l.len() as u8);
                v.extend_from_slice(l.as_bytes());
            }
            v.push(0);
        }
        v
    }

    #[test]
    fn options_fit_what_the_client_accepts() {
        let mut c = cfg();
        c.dns_search = many_domains();
        // No option 57: 576-byte datagram, 308 bytes of options.
        let o = busybox_options(1, &[]);
        let f = request(
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::BROADCAST,
            Ipv4Addr::UNSPECIFIED,
            0,
            &o,
        );
        let (_, out) = run(&c, &f);
        assert!(out.len() - 14 <= 576, "{}", out.len());
        let r = parse_reply(&out);
        assert!(r.options_len <= 308);
        let kept = &r.options[&119];
        let n = (1..c.dns_search.len())
            .find(|&n| encoded(&c.dns_search[..n]) == *kept)
            .expect("search list cut at a whole domain");
        // The next domain would not have fitted.
        let cost = |l: usize| l + 2 * l.div_ceil(255);
        let next = encoded(&c.dns_search[n..=n]).len();
        assert!(r.options_len - cost(kept.len()) + cost(kept.len() + next) > 308);
        for code in [1, 3, 6, 12, 15, 26, 51, 53, 54, 61, 81] {
            assert!(r.options.contains_key(&code), "option {code}");
        }

        // Option 57 of 1500: the whole list of 20, in pieces of 255 bytes at most.
        c.dns_search.truncate(20);
        let o = [53, 1, 1, 57, 2, 0x05, 0xdc, 255];
        let f = request(
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::BROADCAST,
            Ipv4Addr::UNSPECIFIED,
            0,
            &o,
        );
        let (_, out) = run(&c, &f);
        assert!(out.len() - 14 <= 1500);
        let r = parse_reply(&out);
        assert_eq!(r.options[&119], encoded(&c.dns_search));
        assert_eq!(r.search_pieces, 3);

        // Option 57 below the RFC minimum counts as 576.
        let o = [53, 1, 1, 57, 2, 0x01, 0x00, 255];
        let f = request(
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::BROADCAST,
            Ipv4Addr::UNSPECIFIED,
            0,
            &o,
        );
        let r = parse_reply(&run(&c, &f).1);
        assert!(r.options_len <= 308 && r.options_len > 250);
    }

    #[test]
    fn many_dns_servers_are_cut_to_fit() {
        let mut c = cfg();
        c.ip4.as_mut().unwrap().dns = (0..100).map(|i| Ipv4Addr::new(10, 0, 0, i)).collect();
        let r = parse_reply(&run(&c, &discover()).1);
        let dns = &r.options[&6];
        assert!(!dns.is_empty() && dns.len() % 4 == 0);
        assert_eq!(dns[..8], [10, 0, 0, 0, 10, 0, 0, 1]);
        assert!(r.options_len <= 308);
    }

    #[test]
    fn short_output_buffer_is_not_a_panic() {
        let f = discover();
        let full = match run(&cfg(), &f).0 {
            Verdict::Reply(n) => n,
            v => panic!("{v:?}"),
        };
        let mut out = vec![0u8; REPLY_BUF_LEN];
        for len in 0..=full {
            match handle(&cfg(), &f, &mut out[..len]) {
                Verdict::Reply(n) => {
                    assert!(n <= len);
                    parse_reply(&out[..n]);
                }
                v => assert_eq!(v, Verdict::Ignored, "{len}"),
            }
        }
        assert_eq!(handle(&cfg(), &f, &mut out[..100]), Verdict::Ignored);
    }

    #[test]
    fn trailing_ethernet_padding_is_accepted() {
        let mut f = discover();
        f.extend_from_slice(&[0; 16]);
        assert!(matches!(run(&cfg(), &f).0, Verdict::Reply(_)));
    }

    #[test]
    fn zero_udp_checksum_is_accepted() {
        let mut f = discover();
        f[14 + 20 + 6..14 + 20 + 8].fill(0);
        assert!(matches!(run(&cfg(), &f).0, Verdict::Reply(_)));
    }

    const IP: usize = 14;
    const UDP: usize = 14 + 20;
    const BOOTP: usize = 14 + 20 + 8;

    fn set_u16(f: &mut [u8], at: usize, v: u16) {
        f[at..at + 2].copy_from_slice(&v.to_be_bytes());
    }

    #[test]
    fn rejects_truncated_ethernet() {
        assert_eq!(run(&cfg(), &discover()[..13]).0, Verdict::Malformed);
    }

    #[test]
    fn rejects_truncated_ip() {
        let f = discover();
        assert_eq!(run(&cfg(), &f[..IP + 19]).0, Verdict::Malformed);
        // Header length past the end of the datagram.
        let mut f = discover();
        f[IP] = 0x4f;
        set_u16(&mut f, IP + 2, 40);
        fix_checksums(&mut f);
        assert_eq!(run(&cfg(), &f).0, Verdict::Malformed);
    }

    #[test]
    fn rejects_truncated_udp() {
        let mut f = discover();
        f.truncate(UDP + 4);
        set_u16(&mut f, IP + 2, 24);
        fix_checksums(&mut f);
        assert_eq!(run(&cfg(), &f).0, Verdict::Malformed);
    }

    #[test]
    fn rejects_truncated_dhcp() {
        let mut f = discover();
        f.truncate(BOOTP + 239);
        set_u16(&mut f, IP + 2, 20 + 8 + 239);
        set_u16(&mut f, UDP + 4, 8 + 239);
        fix_checksums(&mut f);
        assert_eq!(run(&cfg(), &f).0, Verdict::Malformed);
    }

    #[test]
    fn rejects_bad_ip_checksum() {
        let mut f = discover();
        f[IP + 10] ^= 0x55;
        assert_eq!(run(&cfg(), &f).0, Verdict::Malformed);
    }

    #[test]
    fn rejects_bad_udp_checksum() {
        let mut f = discover();
        f[UDP + 6] ^= 0x55;
        assert_eq!(run(&cfg(), &f).0, Verdict::Malformed);
        // A flipped payload byte under a checksum that was right.
        let mut f = discover();
        f[BOOTP + 5] ^= 1;
        assert_eq!(run(&cfg(), &f).0, Verdict::Malformed);
    }

    #[test]
    fn rejects_lengths_past_the_end() {
        let mut f = discover();
        let total = u16::from_be_bytes([f[IP + 2], f[IP + 3]]);
        set_u16(&mut f, IP + 2, total + 1);
        fix_checksums(&mut f);
        assert_eq!(run(&cfg(), &f).0, Verdict::Malformed);

        let mut f = discover();
        let udp_len = u16::from_be_bytes([f[UDP + 4], f[UDP + 5]]);
        set_u16(&mut f, UDP + 4, udp_len + 1);
        fix_checksums(&mut f);
        assert_eq!(run(&cfg(), &f).0, Verdict::Malformed);

        // UDP length short of the IP payload: inconsistent.
        let mut f = discover();
        set_u16(&mut f, UDP + 4, udp_len - 1);
        fix_checksums(&mut f);
        assert_eq!(run(&cfg(), &f).0, Verdict::Malformed);
    }

    #[test]
    fn rejects_options_past_the_end() {
        // Message type, then an option announcing 10 bytes with 3 left.
        for tail in [&[53, 1, 1, 12, 10, b'a', b'b', b'c'][..], &[53, 1, 1, 12]] {
            let f = request(
                Ipv4Addr::UNSPECIFIED,
                Ipv4Addr::BROADCAST,
                Ipv4Addr::UNSPECIFIED,
                0,
                tail,
            );
            assert_eq!(run(&cfg(), &f).0, Verdict::Malformed, "{tail:?}");
        }
        // Without END but whole: fine.
        let f = request(
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::BROADCAST,
            Ipv4Addr::UNSPECIFIED,
            0,
            &[53, 1, 1, 0, 0],
        );
        assert!(matches!(run(&cfg(), &f).0, Verdict::Reply(_)));
    }

    #[test]
    fn rejects_wrong_op_and_hardware() {
        for (at, byte) in [(0, 2), (0, 3), (1, 6), (2, 8)] {
            let mut f = discover();
            f[BOOTP + at] = byte;
            fix_checksums(&mut f);
            assert_eq!(run(&cfg(), &f).0, Verdict::Malformed, "byte {at}");
        }
    }

    #[test]
    fn rejects_bad_option_lengths() {
        for o in [
            &[53, 2, 1, 1, 255][..],
            &[53, 1, 3, 50, 3, 1, 2, 3, 255],
            &[53, 1, 1, 57, 1, 5, 255],
        ] {
            let f = request(
                Ipv4Addr::UNSPECIFIED,
                Ipv4Addr::BROADCAST,
                Ipv4Addr::UNSPECIFIED,
                0,
                o,
            );
            assert_eq!(run(&cfg(), &f).0, Verdict::Malformed, "{o:?}");
        }
    }

    #[test]
    fn rejects_fragments() {
        let mut f = discover();
        f[IP + 6] = 0x20; // more fragments
        fix_checksums(&mut f);
        assert_eq!(run(&cfg(), &f).0, Verdict::Malformed);
    }

    fn xorshift(mut state: u64) -> impl FnMut() -> u64 {
        move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        }
    }

    #[test]
    fn every_truncation_and_mutation_is_handled() {
        let mut out = vec![0u8; REPLY_BUF_LEN];
        for good in [discover(), request_for(GUEST)] {
            for n in 0..good.len() {
                assert_eq!(
                    handle(&cfg(), &good[..n], &mut out),
                    Verdict::Malformed,
                    "truncated at {n}"
                );
            }
        }
        let mut next = xorshift(0x2545_f491_4f6c_dd1d);
        let mut replies = 0;
        for round in 0..30_000 {
            let mut f = if round % 2 == 0 {
                discover()
            } else {
                request_for(GUEST)
            };
            for _ in 0..=(next() % 4) {
                // Mostly in the DHCP part, where the checks are deepest.
                let at = if next() % 4 == 0 {
                    next() as usize % f.len()
                } else {
                    BOOTP + next() as usize % (f.len() - BOOTP)
                };
                f[at] = next() as u8;
            }
            if next() % 8 == 0 {
                f.truncate(next() as usize % f.len());
            }
            // Half the time past the checksums, so the parsing behind them runs too.
            if round % 4 < 2 {
                fix_checksums(&mut f);
            }
            if let Verdict::Reply(n) = handle(&cfg(), &f, &mut out) {
                assert!(n <= REPLY_BUF_LEN);
                let eth = EthernetFrame::new_checked(&out[..n]).unwrap();
                let ip = Ipv4Packet::new_checked(eth.payload()).unwrap();
                assert!(ip.verify_checksum());
                replies += 1;
            }
        }
        assert!(replies > 100, "mutations never got through: {replies}");
    }
}
