//! Guest frames built by hand for integration tests (a client speaking the stream protocol
//! in place of QEMU), and a client that waits for the reply it expects.
//!
//! Builders use smoltcp's packet views; replies are picked apart by the tests themselves.

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use smoltcp::wire::{
    checksum, ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    IpProtocol, Ipv4Packet, Ipv6Packet,
};

pub const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
pub const OUR_MAC: [u8; 6] = [0x9a, 0x55, 0x9a, 0x55, 0x9a, 0x55];
pub const BROADCAST: [u8; 6] = [0xff; 6];
/// The guest's link-local address in these tests.
pub const GUEST_LL: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0x5054, 0xff, 0xfe12, 0x3456);

fn eth(dst: [u8; 6], ethertype: EthernetProtocol, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8; 14 + payload.len()];
    let mut e = EthernetFrame::new_unchecked(&mut f);
    e.set_dst_addr(EthernetAddress(dst));
    e.set_src_addr(EthernetAddress(GUEST_MAC));
    e.set_ethertype(ethertype);
    e.payload_mut().copy_from_slice(payload);
    f
}

fn sum_parts(parts: &[&[u8]]) -> u16 {
    !checksum::combine(&parts.iter().map(|p| checksum::data(p)).collect::<Vec<_>>())
}

pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: IpProtocol, l4: &[u8]) -> Vec<u8> {
    let mut ip = vec![0u8; 20 + l4.len()];
    let mut p = Ipv4Packet::new_unchecked(&mut ip);
    p.set_version(4);
    p.set_header_len(20);
    p.set_total_len((20 + l4.len()) as u16);
    p.set_hop_limit(64);
    p.set_next_header(proto);
    p.set_src_addr(src);
    p.set_dst_addr(dst);
    p.fill_checksum();
    p.payload_mut().copy_from_slice(l4);
    let dst_mac = if dst.is_broadcast() {
        BROADCAST
    } else {
        OUR_MAC
    };
    eth(dst_mac, EthernetProtocol::Ipv4, &ip)
}

pub fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, proto: IpProtocol, hop_limit: u8, l4: &[u8]) -> Vec<u8> {
    let mut ip = vec![0u8; 40 + l4.len()];
    let mut p = Ipv6Packet::new_unchecked(&mut ip);
    p.set_version(6);
    p.set_payload_len(l4.len() as u16);
    p.set_next_header(proto);
    p.set_hop_limit(hop_limit);
    p.set_src_addr(src);
    p.set_dst_addr(dst);
    p.payload_mut().copy_from_slice(l4);
    let dst_mac = if dst.is_multicast() {
        let o = dst.octets();
        [0x33, 0x33, o[12], o[13], o[14], o[15]]
    } else {
        OUR_MAC
    };
    eth(dst_mac, EthernetProtocol::Ipv6, &ip)
}

/// UDP datagram with a complete checksum.
pub fn udp(
    src: std::net::IpAddr,
    dst: std::net::IpAddr,
    sport: u16,
    dport: u16,
    payload: &[u8],
) -> Vec<u8> {
    let len = (8 + payload.len()) as u16;
    let mut d = Vec::with_capacity(len as usize);
    d.extend(sport.to_be_bytes());
    d.extend(dport.to_be_bytes());
    d.extend(len.to_be_bytes());
    d.extend([0, 0]);
    d.extend(payload);
    let pseudo = match (src, dst) {
        (std::net::IpAddr::V4(s), std::net::IpAddr::V4(t)) => {
            checksum::pseudo_header_v4(&s, &t, IpProtocol::Udp, len as u32)
        }
        (std::net::IpAddr::V6(s), std::net::IpAddr::V6(t)) => {
            checksum::pseudo_header_v6(&s, &t, IpProtocol::Udp, len as u32)
        }
        _ => panic!("mixed families"),
    };
    let mut sum = !checksum::combine(&[pseudo, checksum::data(&d)]);
    if sum == 0 {
        sum = 0xffff;
    }
    d[6..8].copy_from_slice(&sum.to_be_bytes());
    d
}

pub fn arp_request(sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let repr = ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Request,
        source_hardware_addr: EthernetAddress(GUEST_MAC),
        source_protocol_addr: sender,
        target_hardware_addr: EthernetAddress([0; 6]),
        target_protocol_addr: target,
    };
    let mut a = vec![0u8; repr.buffer_len()];
    repr.emit(&mut ArpPacket::new_unchecked(&mut a));
    eth(BROADCAST, EthernetProtocol::Arp, &a)
}

/// A DHCPDISCOVER as busybox udhcpc sends it (message type, parameter request list).
pub fn dhcp_discover(xid: u32) -> Vec<u8> {
    let mut b = vec![0u8; 240];
    b[0] = 1; // BOOTREQUEST
    b[1] = 1;
    b[2] = 6;
    b[4..8].copy_from_slice(&xid.to_be_bytes());
    b[10] = 0x80; // broadcast flag
    b[28..34].copy_from_slice(&GUEST_MAC);
    b[236..240].copy_from_slice(&[99, 130, 83, 99]);
    b.extend([53, 1, 1]); // DHCPDISCOVER
    b.extend([55, 7, 1, 3, 6, 12, 15, 26, 119]);
    b.push(255);
    let src = std::net::IpAddr::V4(Ipv4Addr::UNSPECIFIED);
    let dst = std::net::IpAddr::V4(Ipv4Addr::BROADCAST);
    ipv4(
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::BROADCAST,
        IpProtocol::Udp,
        &udp(src, dst, 68, 67, &b),
    )
}

/// ICMP (type 8) or ICMPv6 (type 128) echo request.
pub fn echo_request(
    src: std::net::IpAddr,
    dst: std::net::IpAddr,
    id: u16,
    seq: u16,
    payload: &[u8],
) -> Vec<u8> {
    let v6 = dst.is_ipv6();
    let mut m = vec![if v6 { 128 } else { 8 }, 0, 0, 0];
    m.extend(id.to_be_bytes());
    m.extend(seq.to_be_bytes());
    m.extend(payload);
    match (src, dst) {
        (std::net::IpAddr::V4(s), std::net::IpAddr::V4(d)) => {
            let sum = sum_parts(&[&m]);
            m[2..4].copy_from_slice(&sum.to_be_bytes());
            ipv4(s, d, IpProtocol::Icmp, &m)
        }
        (std::net::IpAddr::V6(s), std::net::IpAddr::V6(d)) => {
            let pseudo = checksum::pseudo_header_v6(&s, &d, IpProtocol::Icmpv6, m.len() as u32);
            let sum = !checksum::combine(&[pseudo, checksum::data(&m)]);
            m[2..4].copy_from_slice(&sum.to_be_bytes());
            ipv6(s, d, IpProtocol::Icmpv6, 64, &m)
        }
        _ => panic!("mixed families"),
    }
}

/// Router solicitation from the guest's link-local address, with its link-layer address.
pub fn router_solicit() -> Vec<u8> {
    let mut m = vec![133, 0, 0, 0, 0, 0, 0, 0, 1, 1];
    m.extend(GUEST_MAC);
    let all_routers: Ipv6Addr = "ff02::2".parse().unwrap();
    let pseudo =
        checksum::pseudo_header_v6(&GUEST_LL, &all_routers, IpProtocol::Icmpv6, m.len() as u32);
    let sum = !checksum::combine(&[pseudo, checksum::data(&m)]);
    m[2..4].copy_from_slice(&sum.to_be_bytes());
    ipv6(GUEST_LL, all_routers, IpProtocol::Icmpv6, 255, &m)
}

/// DHCPv6 SOLICIT with client ID (DUID-LL), IA_NA (IAID 1), Rapid Commit, ORO (DNS, domains).
pub fn dhcpv6_solicit(xid: [u8; 3]) -> Vec<u8> {
    let mut m = vec![1, xid[0], xid[1], xid[2]];
    m.extend([0, 1, 0, 10, 0, 3, 0, 1]); // client ID: DUID-LL, Ethernet
    m.extend(GUEST_MAC);
    m.extend([0, 3, 0, 12, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0]); // IA_NA
    m.extend([0, 14, 0, 0]); // rapid commit
    m.extend([0, 6, 0, 4, 0, 23, 0, 24]); // option request
    let dst: Ipv6Addr = "ff02::1:2".parse().unwrap();
    let d = udp(GUEST_LL.into(), dst.into(), 546, 547, &m);
    ipv6(GUEST_LL, dst, IpProtocol::Udp, 1, &d)
}

/// A stream-protocol client standing in for QEMU.
pub struct StreamClient {
    sock: UnixStream,
    buf: Vec<u8>,
}

/// What reading the stream gave.
enum Next {
    Frame(Vec<u8>),
    Timeout,
    Closed,
}

impl StreamClient {
    pub fn connect(path: &Path) -> StreamClient {
        let sock =
            UnixStream::connect(path).unwrap_or_else(|e| panic!("connect {}: {e}", path.display()));
        StreamClient {
            sock,
            buf: Vec::new(),
        }
    }

    pub fn send(&mut self, frame: &[u8]) {
        self.send_raw(&(frame.len() as u32).to_be_bytes());
        self.send_raw(frame);
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.sock.write_all(bytes).expect("write to passt");
    }

    /// The next whole frame before `deadline`, from what is buffered or read now.
    fn next_frame(&mut self, deadline: Instant) -> Next {
        loop {
            if self.buf.len() >= 4 {
                let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]])
                    as usize;
                if self.buf.len() >= 4 + len {
                    let frame = self.buf[4..4 + len].to_vec();
                    self.buf.drain(..4 + len);
                    return Next::Frame(frame);
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Next::Timeout;
            }
            self.sock.set_read_timeout(Some(left)).unwrap();
            let mut chunk = [0u8; 65536];
            match self.sock.read(&mut chunk) {
                Ok(0) => return Next::Closed,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) if e.kind() == ErrorKind::ConnectionReset => return Next::Closed,
                Err(e) => panic!("read from passt: {e}"),
            }
        }
    }

    /// The next frame, or `None` on EOF; panics after `timeout`.
    pub fn recv(&mut self, timeout: Duration) -> Option<Vec<u8>> {
        match self.next_frame(Instant::now() + timeout) {
            Next::Frame(f) => Some(f),
            Next::Closed => None,
            Next::Timeout => panic!("no frame from passt within {timeout:?}"),
        }
    }

    /// The next frame within `timeout`, `None` if none came (or the connection closed).
    pub fn try_recv(&mut self, timeout: Duration) -> Option<Vec<u8>> {
        match self.next_frame(Instant::now() + timeout) {
            Next::Frame(f) => Some(f),
            Next::Closed | Next::Timeout => None,
        }
    }

    /// The next frame before `deadline`; `None` if none came by then. Panics on EOF.
    pub fn recv_by(&mut self, deadline: Instant) -> Option<Vec<u8>> {
        match self.next_frame(deadline) {
            Next::Frame(f) => Some(f),
            Next::Timeout => None,
            Next::Closed => panic!("passt closed the connection"),
        }
    }

    /// The first frame for which `pick` returns something, skipping others (unsolicited
    /// router advertisements, say); panics after `timeout` listing what was skipped.
    pub fn expect<T>(
        &mut self,
        timeout: Duration,
        what: &str,
        mut pick: impl FnMut(&[u8]) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        let mut skipped = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                panic!(
                    "no {what} within {timeout:?}; skipped {} frames: {skipped:02x?}",
                    skipped.len()
                );
            }
            let frame = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.recv(left)))
                .unwrap_or_else(|_| {
                    panic!(
                        "no {what} within {timeout:?}; skipped {} frames: {skipped:02x?}",
                        skipped.len()
                    )
                });
            match frame {
                None => panic!("passt closed the connection while we waited for {what}"),
                Some(f) => match pick(&f) {
                    Some(t) => return t,
                    None => skipped.push(f),
                },
            }
        }
    }

    /// Whether the other side closed the connection within `timeout` (frames before the
    /// close are discarded).
    pub fn closed_within(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            self.sock.set_read_timeout(Some(left)).unwrap();
            let mut chunk = [0u8; 65536];
            match self.sock.read(&mut chunk) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return false
                }
                Err(_) => return true,
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// TCP segments (tests/tcp.rs): builders and a parser for the guest side of a connection.
// ---------------------------------------------------------------------------------------

pub mod tcp_flag {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const PSH: u8 = 0x08;
    pub const ACK: u8 = 0x10;
}

/// One TCP segment, as the guest sends or receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpSeg {
    pub src: std::net::IpAddr,
    pub dst: std::net::IpAddr,
    pub sport: u16,
    pub dport: u16,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub wnd: u16,
    /// MSS and window scale options, if present.
    pub mss: Option<u16>,
    pub ws: Option<u8>,
    pub payload: Vec<u8>,
}

/// A guest frame carrying `s` (options: MSS and window scale as given), complete checksums.
pub fn tcp_frame(s: &TcpSeg) -> Vec<u8> {
    let mut opts = Vec::new();
    if let Some(m) = s.mss {
        opts.extend([2, 4]);
        opts.extend(m.to_be_bytes());
    }
    if let Some(w) = s.ws {
        opts.extend([1, 3, 3, w]);
    }
    while opts.len() % 4 != 0 {
        opts.push(1);
    }
    let hlen = 20 + opts.len();
    let mut t = vec![0u8; hlen];
    t[0..2].copy_from_slice(&s.sport.to_be_bytes());
    t[2..4].copy_from_slice(&s.dport.to_be_bytes());
    t[4..8].copy_from_slice(&s.seq.to_be_bytes());
    t[8..12].copy_from_slice(&s.ack.to_be_bytes());
    t[12] = ((hlen / 4) as u8) << 4;
    t[13] = s.flags;
    t[14..16].copy_from_slice(&s.wnd.to_be_bytes());
    t[20..].copy_from_slice(&opts);
    t.extend_from_slice(&s.payload);
    let len = t.len() as u32;
    let pseudo = match (s.src, s.dst) {
        (std::net::IpAddr::V4(a), std::net::IpAddr::V4(b)) => {
            checksum::pseudo_header_v4(&a, &b, IpProtocol::Tcp, len)
        }
        (std::net::IpAddr::V6(a), std::net::IpAddr::V6(b)) => {
            checksum::pseudo_header_v6(&a, &b, IpProtocol::Tcp, len)
        }
        _ => panic!("mixed families"),
    };
    let sum = !checksum::combine(&[pseudo, checksum::data(&t)]);
    t[16..18].copy_from_slice(&sum.to_be_bytes());
    match (s.src, s.dst) {
        (std::net::IpAddr::V4(a), std::net::IpAddr::V4(b)) => ipv4(a, b, IpProtocol::Tcp, &t),
        (std::net::IpAddr::V6(a), std::net::IpAddr::V6(b)) => ipv6(a, b, IpProtocol::Tcp, 64, &t),
        _ => unreachable!(),
    }
}

/// The TCP segment in a frame from passt, if it is one; panics on a bad IPv4 header or TCP
/// checksum (passt must send complete checksums).
pub fn parse_tcp(frame: &[u8]) -> Option<TcpSeg> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    let (src, dst, l4): (std::net::IpAddr, std::net::IpAddr, &[u8]) = match eth.ethertype() {
        EthernetProtocol::Ipv4 => {
            let ip = Ipv4Packet::new_checked(&frame[14..]).ok()?;
            if ip.next_header() != IpProtocol::Tcp {
                return None;
            }
            assert!(ip.verify_checksum(), "IPv4 header checksum");
            let (s, d) = (ip.src_addr(), ip.dst_addr());
            let hl = ip.header_len() as usize;
            let tl = ip.total_len() as usize;
            (s.into(), d.into(), &frame[14 + hl..14 + tl])
        }
        EthernetProtocol::Ipv6 => {
            let ip = Ipv6Packet::new_checked(&frame[14..]).ok()?;
            if ip.next_header() != IpProtocol::Tcp {
                return None;
            }
            let pl = ip.payload_len() as usize;
            (
                ip.src_addr().into(),
                ip.dst_addr().into(),
                &frame[54..54 + pl],
            )
        }
        _ => return None,
    };
    let pseudo = match (src, dst) {
        (std::net::IpAddr::V4(a), std::net::IpAddr::V4(b)) => {
            checksum::pseudo_header_v4(&a, &b, IpProtocol::Tcp, l4.len() as u32)
        }
        (std::net::IpAddr::V6(a), std::net::IpAddr::V6(b)) => {
            checksum::pseudo_header_v6(&a, &b, IpProtocol::Tcp, l4.len() as u32)
        }
        _ => panic!("mixed families"),
    };
    assert_eq!(
        !checksum::combine(&[pseudo, checksum::data(l4)]),
        0,
        "TCP checksum of a segment from passt"
    );
    let hlen = usize::from(l4[12] >> 4) * 4;
    let (mut mss, mut ws) = (None, None);
    let mut o = &l4[20..hlen];
    while let Some(&kind) = o.first() {
        match kind {
            0 => break,
            1 => o = &o[1..],
            _ => {
                let len = usize::from(*o.get(1)?);
                if len < 2 || len > o.len() {
                    break;
                }
                if kind == 2 && len == 4 {
                    mss = Some(u16::from_be_bytes([o[2], o[3]]));
                }
                if kind == 3 && len == 3 {
                    ws = Some(o[2]);
                }
                o = &o[len..];
            }
        }
    }
    let be32 = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    Some(TcpSeg {
        src,
        dst,
        sport: u16::from_be_bytes([l4[0], l4[1]]),
        dport: u16::from_be_bytes([l4[2], l4[3]]),
        seq: be32(&l4[4..8]),
        ack: be32(&l4[8..12]),
        flags: l4[13],
        wnd: u16::from_be_bytes([l4[14], l4[15]]),
        mss,
        ws,
        payload: l4[hlen..].to_vec(),
    })
}

// ---------------------------------------------------------------------------------------
// UDP translation tests (tests/udp.rs): datagram frames by socket address, parsers of what
// passt sends back, a receive that reports a timeout instead of panicking.
// ---------------------------------------------------------------------------------------

/// A whole frame carrying a UDP datagram from `src` to `dst` (same family), checksum
/// computed; with `zero_sum`, the checksum field is left at zero ("none", IPv4 only).
pub fn udp_frame(
    src: std::net::SocketAddr,
    dst: std::net::SocketAddr,
    payload: &[u8],
    zero_sum: bool,
) -> Vec<u8> {
    let mut d = udp(src.ip(), dst.ip(), src.port(), dst.port(), payload);
    if zero_sum {
        d[6..8].fill(0);
    }
    match (src.ip(), dst.ip()) {
        (std::net::IpAddr::V4(s), std::net::IpAddr::V4(t)) => ipv4(s, t, IpProtocol::Udp, &d),
        (std::net::IpAddr::V6(s), std::net::IpAddr::V6(t)) => ipv6(s, t, IpProtocol::Udp, 64, &d),
        _ => panic!("mixed families"),
    }
}

/// A UDP datagram passt sent to the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeenUdp {
    pub src: std::net::SocketAddr,
    pub dst: std::net::SocketAddr,
    pub payload: Vec<u8>,
}

/// The UDP datagram in `frame`, if it is one; panics on a wrong IPv4 header checksum, UDP
/// checksum or length, since passt must never send those.
pub fn parse_udp(frame: &[u8]) -> Option<SeenUdp> {
    use std::net::{IpAddr, SocketAddr};
    let eth = EthernetFrame::new_checked(frame).ok()?;
    let (src, dst, l4): (IpAddr, IpAddr, &[u8]) = match eth.ethertype() {
        EthernetProtocol::Ipv4 => {
            let ip = Ipv4Packet::new_checked(&frame[14..]).ok()?;
            if ip.next_header() != IpProtocol::Udp {
                return None;
            }
            assert!(ip.verify_checksum(), "IPv4 header checksum");
            let l4 = &frame[14 + 20..14 + usize::from(ip.total_len())];
            (ip.src_addr().into(), ip.dst_addr().into(), l4)
        }
        EthernetProtocol::Ipv6 => {
            let ip = Ipv6Packet::new_checked(&frame[14..]).ok()?;
            if ip.next_header() != IpProtocol::Udp {
                return None;
            }
            let l4 = &frame[14 + 40..14 + 40 + usize::from(ip.payload_len())];
            (ip.src_addr().into(), ip.dst_addr().into(), l4)
        }
        _ => return None,
    };
    assert!(l4.len() >= 8, "short UDP datagram");
    let len = usize::from(u16::from_be_bytes([l4[4], l4[5]]));
    assert_eq!(len, l4.len(), "UDP length vs IP payload length");
    assert_ne!(&l4[6..8], &[0, 0], "passt always sends a UDP checksum");
    let pseudo = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            checksum::pseudo_header_v4(&s, &d, IpProtocol::Udp, len as u32)
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            checksum::pseudo_header_v6(&s, &d, IpProtocol::Udp, len as u32)
        }
        _ => unreachable!(),
    };
    assert_eq!(
        checksum::combine(&[pseudo, checksum::data(l4)]),
        0xffff,
        "UDP checksum"
    );
    Some(SeenUdp {
        src: SocketAddr::new(src, u16::from_be_bytes([l4[0], l4[1]])),
        dst: SocketAddr::new(dst, u16::from_be_bytes([l4[2], l4[3]])),
        payload: l4[8..].to_vec(),
    })
}

/// An ICMP or ICMPv6 error passt sent to the guest: who from, type, code, and the quoted
/// datagram's source and destination (from its IP and UDP headers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeenIcmpError {
    pub from: std::net::IpAddr,
    pub icmp_type: u8,
    pub code: u8,
    pub quoted_src: std::net::SocketAddr,
    pub quoted_dst: std::net::SocketAddr,
}

/// The ICMP/ICMPv6 error in `frame`, if it is one (checksums verified).
pub fn parse_icmp_error(frame: &[u8]) -> Option<SeenIcmpError> {
    use std::net::{IpAddr, SocketAddr};
    let eth = EthernetFrame::new_checked(frame).ok()?;
    match eth.ethertype() {
        EthernetProtocol::Ipv4 => {
            let ip = Ipv4Packet::new_checked(&frame[14..]).ok()?;
            if ip.next_header() != IpProtocol::Icmp {
                return None;
            }
            let m = ip.payload();
            if !matches!(m.first(), Some(3 | 11)) {
                return None;
            }
            assert_eq!(sum_parts(&[m]), 0, "ICMP checksum");
            let inner = Ipv4Packet::new_checked(&m[8..]).ok()?;
            let q = &m[8 + 20..];
            Some(SeenIcmpError {
                from: ip.src_addr().into(),
                icmp_type: m[0],
                code: m[1],
                quoted_src: SocketAddr::new(
                    inner.src_addr().into(),
                    u16::from_be_bytes([q[0], q[1]]),
                ),
                quoted_dst: SocketAddr::new(
                    inner.dst_addr().into(),
                    u16::from_be_bytes([q[2], q[3]]),
                ),
            })
        }
        EthernetProtocol::Ipv6 => {
            let ip = Ipv6Packet::new_checked(&frame[14..]).ok()?;
            if ip.next_header() != IpProtocol::Icmpv6 {
                return None;
            }
            let m = ip.payload();
            if !matches!(m.first(), Some(1..=3)) {
                return None;
            }
            let (s, d): (IpAddr, IpAddr) = (ip.src_addr().into(), ip.dst_addr().into());
            let pseudo = match (s, d) {
                (IpAddr::V6(s), IpAddr::V6(d)) => {
                    checksum::pseudo_header_v6(&s, &d, IpProtocol::Icmpv6, m.len() as u32)
                }
                _ => unreachable!(),
            };
            assert_eq!(
                checksum::combine(&[pseudo, checksum::data(m)]),
                0xffff,
                "ICMPv6 checksum"
            );
            let inner = Ipv6Packet::new_checked(&m[8..]).ok()?;
            let q = &m[8 + 40..];
            Some(SeenIcmpError {
                from: s,
                icmp_type: m[0],
                code: m[1],
                quoted_src: SocketAddr::new(
                    inner.src_addr().into(),
                    u16::from_be_bytes([q[0], q[1]]),
                ),
                quoted_dst: SocketAddr::new(
                    inner.dst_addr().into(),
                    u16::from_be_bytes([q[2], q[3]]),
                ),
            })
        }
        _ => None,
    }
}
