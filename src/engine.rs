//! The engine: what happens to a frame from the guest. It classifies each frame, lets the
//! [`crate::l2`] services answer what they own (ARP, DHCP, NDP, DHCPv6), hands layer-4
//! traffic to the translation modules, and counts everything it drops.
//!
//! The engine owns the guest's identity as seen on the link (its MAC, learned from its
//! frames) and the layer-4 state; the event loop owns the sockets' epoll registrations and
//! the guest back-end, and lends them for each call.

use std::net::IpAddr;
use std::time::Instant;

use smoltcp::wire::{EthernetFrame, EthernetProtocol, IpProtocol, Ipv4Packet, Ipv6Packet};

use crate::conf::NetConfig;
use crate::event::EpollRegistrar;
use crate::flow::{FlowIdx, FlowRef};
use crate::icmp::Icmp;
use crate::l2::{self, Verdict, REPLY_BUF_LEN};
use crate::logger::Limiter;
use crate::tap::{FrameHandler, Tail, ToGuest, MAX_FRAME};
use crate::tcp::{Macs, Tcp, TcpConfig};
use crate::udp::{Udp, UdpConfig};

const DHCP_SERVER_PORT: u16 = 67;
const DHCPV6_SERVER_PORT: u16 = 547;
const ICMPV6_ROUTER_SOLICIT: u8 = 133;
const ICMPV6_NEIGHBOR_SOLICIT: u8 = 135;
const ICMPV6_NEIGHBOR_ADVERT: u8 = 136;
const UDP_HLEN: usize = 8;

/// Counters of what the engine did with guest frames.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct EngineStats {
    pub frames: u64,
    pub replies: u64,
    pub arp: u64,
    pub dhcp: u64,
    pub ndp: u64,
    pub dhcpv6: u64,
    pub icmp: u64,
    pub tcp: u64,
    /// UDP datagrams handed to [`crate::udp`] (which counts what it drops).
    pub udp: u64,
    /// Truncated, inconsistent, or with a bad checksum.
    pub malformed: u64,
    /// Well-formed, but of a kind we don't translate (yet): other ethertypes, protocols.
    pub unsupported: u64,
    /// Replies the guest back-end had no room for.
    pub reply_drops: u64,
}

/// Guest frames in, replies and socket traffic out.
pub struct Engine {
    net: NetConfig,
    guest_mac: [u8; 6],
    icmp: Option<Icmp>,
    tcp: Option<Box<Tcp>>,
    udp: Option<Udp>,
    reply: Box<[u8]>,
    /// Split frames other than TCP data, copied together to be parsed whole, back to back
    /// for a batch; `linear_used` bytes are taken.
    linear: Box<[u8]>,
    linear_used: usize,
    registrar: EpollRegistrar,
    now: Instant,
    stats: EngineStats,
    log_limit: Limiter,
}

impl Engine {
    pub fn new(net: NetConfig, icmp: bool, registrar: EpollRegistrar) -> Self {
        Engine {
            net,
            guest_mac: [0xff; 6],
            icmp: icmp.then(Icmp::new),
            tcp: None,
            udp: None,
            reply: vec![0u8; REPLY_BUF_LEN].into_boxed_slice(),
            linear: vec![0u8; 4 * MAX_FRAME].into_boxed_slice(),
            linear_used: 0,
            registrar,
            now: Instant::now(),
            stats: EngineStats::default(),
            log_limit: Limiter::new(),
        }
    }

    pub fn stats(&self) -> EngineStats {
        self.stats
    }

    pub fn icmp_stats(&self) -> Option<crate::icmp::IcmpStats> {
        self.icmp.as_ref().map(Icmp::stats)
    }

    /// Turns TCP translation on.
    pub fn enable_tcp(&mut self, cfg: TcpConfig) {
        self.tcp = Some(Box::new(Tcp::new(cfg)));
    }

    /// Watches the listening sockets of forwarded ports (TCP must be on).
    pub fn tcp_listen(&mut self, ls: Vec<crate::fwd::Listener>) -> std::io::Result<()> {
        match self.tcp.as_mut() {
            Some(tcp) => tcp.add_listeners(ls, &mut self.registrar),
            None => Ok(()),
        }
    }

    /// Connections are waiting on a forwarded port's listening socket.
    pub fn tcp_listener_ready(&mut self, i: u32, to_guest: &mut dyn ToGuest) {
        let macs = self.macs();
        if let Some(tcp) = self.tcp.as_mut() {
            tcp.listener_ready(i, self.now, macs, &mut self.registrar, to_guest);
        }
    }

    /// Flows in the TCP table.
    pub fn tcp_flows(&self) -> usize {
        self.tcp.as_ref().map_or(0, |t| t.active_flows())
    }

    pub fn tcp_stats(&self) -> Option<crate::tcp::TcpStats> {
        self.tcp.as_ref().map(|t| t.stats())
    }

    fn macs(&self) -> Macs {
        Macs {
            guest: self.guest_mac,
            ours: self.net.our_mac,
        }
    }

    /// A TCP flow's socket reported `events`.
    pub fn tcp_sock_ready(
        &mut self,
        r: FlowRef,
        events: epoll::Events,
        to_guest: &mut dyn ToGuest,
    ) {
        let macs = self.macs();
        if let Some(tcp) = self.tcp.as_mut() {
            tcp.sock_ready(r, events, self.now, macs, to_guest);
        }
    }

    /// When some TCP flow next needs [`Self::tcp_timer`].
    pub fn tcp_next_deadline(&mut self) -> Option<Instant> {
        self.tcp.as_mut().and_then(|t| t.next_deadline())
    }

    /// TCP timers of the flows that are due: retransmissions, window updates, timeouts.
    pub fn tcp_timer(&mut self, now: Instant, to_guest: &mut dyn ToGuest) {
        let macs = self.macs();
        if let Some(tcp) = self.tcp.as_mut() {
            tcp.timer(now, macs, to_guest);
        }
    }

    /// Learns the guest's own address from a frame's source (or, for Duplicate Address
    /// Detection, the address it claims), for inbound connections and datagrams.
    fn learn_guest_addr(&mut self, src: IpAddr, l4_ndp_target: Option<&[u8]>) {
        let a = match (src, l4_ndp_target) {
            (IpAddr::V6(s), Some(ns)) if s.is_unspecified() => {
                match <[u8; 16]>::try_from(ns.get(8..24).unwrap_or_default()) {
                    Ok(t) => IpAddr::V6(t.into()),
                    Err(_) => return,
                }
            }
            (a, _) => a,
        };
        // Each translation keeps its own copy of the addresses it maps; both learn here.
        if let Some(tcp) = self.tcp.as_mut() {
            tcp.guest_addr_seen(a);
        }
        if let Some(udp) = self.udp.as_mut() {
            udp.guest_addr_seen(a);
        }
    }

    fn tcp_segment(
        &mut self,
        src: IpAddr,
        dst: IpAddr,
        l4: &[u8],
        tail: Tail,
        to_guest: &mut dyn ToGuest,
    ) {
        let macs = self.macs();
        let (now, reg) = (self.now, &mut self.registrar);
        match self.tcp.as_mut() {
            Some(tcp) => {
                self.stats.tcp += 1;
                // SAFETY: `l4` and `tail` are parts of the frame being handled, which stay
                // in place until `end_batch` (FrameHandler), which ends TCP's batch.
                unsafe { tcp.from_guest_split(src, dst, l4, tail, now, macs, reg, to_guest) };
            }
            None => self.stats.unsupported += 1,
        }
    }

    /// Counts a frame and learns the guest's MAC from it.
    fn link_layer<'a>(&mut self, frame: &'a [u8]) -> Option<EthernetFrame<&'a [u8]>> {
        self.stats.frames += 1;
        let Ok(eth) = EthernetFrame::new_checked(frame) else {
            self.malformed("Ethernet");
            return None;
        };
        let src = eth.src_addr();
        if src.is_unicast() {
            self.guest_mac = src.0;
        }
        Some(eth)
    }

    /// A split frame ([`FrameHandler::handle_split_frame`]) carrying TCP data whose
    /// headers all lie in `head`: handed to TCP with its tail where it is. Anything else
    /// (`false`) is left to the whole-frame path, which also counts what is malformed.
    fn split_tcp(&mut self, head: &[u8], tail: Tail, to_guest: &mut dyn ToGuest) -> bool {
        const TCP_HLEN: usize = 20;
        let Some(ip) = head.get(crate::wire::ETH_HLEN..) else {
            return false;
        };
        let ethertype = u16::from_be_bytes([head[12], head[13]]);
        // Addresses, where TCP starts in `ip`, and its length by the IP header.
        let (src, dst, l4_off, l4_len) = match EthernetProtocol::from(ethertype) {
            EthernetProtocol::Ipv4 if self.net.ip4.is_some() && ip.len() >= 20 => {
                let p = Ipv4Packet::new_unchecked(ip);
                let (hl, total) = (usize::from(p.header_len()), usize::from(p.total_len()));
                if p.version() != 4
                    || p.next_header() != IpProtocol::Tcp
                    || !(20..=ip.len()).contains(&hl)
                    || total < hl
                    || !p.verify_checksum()
                {
                    return false;
                }
                (
                    IpAddr::V4(p.src_addr()),
                    IpAddr::V4(p.dst_addr()),
                    hl,
                    total - hl,
                )
            }
            EthernetProtocol::Ipv6 if self.net.ip6.is_some() && ip.len() >= 40 => {
                let p = Ipv6Packet::new_unchecked(ip);
                if p.version() != 6 || p.next_header() != IpProtocol::Tcp {
                    return false;
                }
                let len = usize::from(p.payload_len());
                (IpAddr::V6(p.src_addr()), IpAddr::V6(p.dst_addr()), 40, len)
            }
            _ => return false,
        };
        let l4 = &ip[l4_off..];
        let tcp_hlen = l4.get(12).map_or(usize::MAX, |b| usize::from(b >> 4) * 4);
        if l4_len <= l4.len() || tcp_hlen < TCP_HLEN || tcp_hlen > l4.len() {
            return false;
        }
        let tail_len = l4_len - l4.len();
        if tail_len > tail.len {
            return false; // truncated
        }
        if self.link_layer(head).is_none() {
            return true;
        }
        self.learn_guest_addr(src, None);
        let tail = Tail {
            iov: tail.iov,
            len: tail_len,
        };
        self.tcp_segment(src, dst, l4, tail, to_guest);
        true
    }

    /// Turns on UDP translation (off until called: `--no-udp`).
    pub fn with_udp(mut self, cfg: UdpConfig) -> Self {
        self.udp = Some(Udp::new(cfg));
        self
    }

    pub fn udp_stats(&self) -> Option<crate::udp::UdpStats> {
        self.udp.as_ref().map(Udp::stats)
    }

    /// UDP flows waiting for room towards the guest (see [`Udp::muted_flows`]).
    pub fn udp_muted_flows(&self) -> Option<usize> {
        self.udp.as_ref().map(Udp::muted_flows)
    }

    /// Watches the bound sockets of forwarded UDP ports (UDP must be on).
    pub fn udp_listen(&mut self, ls: Vec<crate::fwd::Listener>) -> std::io::Result<()> {
        match self.udp.as_mut() {
            Some(udp) => udp.add_listeners(ls, &mut self.registrar),
            None => Ok(()),
        }
    }

    /// Datagrams wait on a forwarded UDP port.
    pub fn udp_listener_ready(&mut self, i: u32, to_guest: &mut dyn ToGuest) {
        let macs = (self.guest_mac, self.net.our_mac);
        if let Some(udp) = self.udp.as_mut() {
            udp.listener_ready(i, self.now, macs, &mut self.registrar, to_guest);
        }
    }

    /// A UDP flow socket is readable, or (`err`) reports an error.
    pub fn udp_sock_ready(&mut self, idx: FlowIdx, err: bool, to_guest: &mut dyn ToGuest) {
        if let Some(udp) = self.udp.as_mut() {
            udp.from_sock(
                idx,
                err,
                self.now,
                self.guest_mac,
                self.net.our_mac,
                &mut self.registrar,
                to_guest,
            );
        }
    }

    /// Room towards the guest came back ([`ToGuest::room_returned`]): TCP flows send what
    /// they held back, UDP flows read again.
    pub fn room_returned(&mut self, to_guest: &mut dyn ToGuest) {
        let macs = self.macs();
        if let Some(tcp) = self.tcp.as_mut() {
            tcp.room_returned(self.now, macs, to_guest);
        }
        if let Some(udp) = self.udp.as_mut() {
            udp.room_returned(&mut self.registrar);
        }
    }

    /// Sets the time for the frames of the batch about to be handled.
    pub fn set_now(&mut self, now: Instant) {
        self.now = now;
    }

    /// A guest attached: tell it about the router right away instead of waiting for its
    /// solicitation.
    pub fn guest_attached(&mut self, to_guest: &mut dyn ToGuest) {
        self.guest_mac = [0xff; 6];
        if let Some(n) = l2::ndp::unsolicited_ra(&self.net, &mut self.reply) {
            self.send_reply(n, to_guest);
        }
    }

    /// A ping socket is readable.
    pub fn icmp_sock_ready(&mut self, idx: FlowIdx, to_guest: &mut dyn ToGuest) {
        if let Some(icmp) = self.icmp.as_mut() {
            icmp.from_sock(idx, self.now, self.guest_mac, self.net.our_mac, to_guest);
        }
    }

    /// Periodic housekeeping: idle flows.
    pub fn periodic(&mut self, now: Instant) {
        self.now = now;
        if let Some(icmp) = self.icmp.as_mut() {
            icmp.expire(now);
        }
        if let Some(udp) = self.udp.as_mut() {
            udp.expire(now);
        }
    }

    fn send_reply(&mut self, len: usize, to_guest: &mut dyn ToGuest) {
        self.stats.replies += 1;
        if !to_guest.send(&[&self.reply[..len]]) {
            self.stats.reply_drops += 1;
        }
    }

    fn service(&mut self, verdict: Verdict, to_guest: &mut dyn ToGuest) {
        match verdict {
            Verdict::Reply(n) => self.send_reply(n, to_guest),
            Verdict::Ignored => {}
            Verdict::Malformed => self.malformed("service"),
        }
    }

    fn malformed(&mut self, what: &str) {
        self.stats.malformed += 1;
        crate::limited!(
            self.log_limit,
            self.now,
            debug,
            "dropping malformed {what} frame from the guest"
        );
    }

    /// An ICMP or ICMPv6 message (`ip`: its whole packet) for the echo translation.
    fn icmp_echo(&mut self, ip: &[u8], v6: bool) {
        let (now, reg) = (self.now, &mut self.registrar);
        let handled = self.icmp.as_mut().is_some_and(|icmp| {
            if v6 {
                icmp.from_guest_v6(ip, now, reg)
            } else {
                icmp.from_guest_v4(ip, now, reg)
            }
        });
        if handled {
            self.stats.icmp += 1;
        } else {
            self.stats.unsupported += 1;
        }
    }

    /// A UDP datagram (`ip`: its whole packet) for the UDP translation.
    fn udp_datagram(&mut self, ip: &[u8], v6: bool) {
        let (now, reg) = (self.now, &mut self.registrar);
        let Some(udp) = self.udp.as_mut() else {
            self.stats.unsupported += 1;
            return;
        };
        self.stats.udp += 1;
        // SAFETY: `ip` is part of the frame being handled, whose bytes stay in place until
        // `end_batch` (FrameHandler), which ends UDP's batch.
        unsafe {
            if v6 {
                udp.from_guest_v6(ip, now, reg)
            } else {
                udp.from_guest_v4(ip, now, reg)
            }
        }
    }

    fn ipv4(&mut self, frame: &[u8], ip: &[u8], to_guest: &mut dyn ToGuest) {
        let Ok(pkt) = Ipv4Packet::new_checked(ip) else {
            return self.malformed("IPv4");
        };
        if !pkt.verify_checksum() {
            return self.malformed("IPv4");
        }
        self.learn_guest_addr(IpAddr::V4(pkt.src_addr()), None);
        match pkt.next_header() {
            IpProtocol::Udp if udp_dst_port(pkt.payload()) == Some(DHCP_SERVER_PORT) => {
                self.stats.dhcp += 1;
                let v = l2::dhcp::handle(&self.net, frame, &mut self.reply);
                self.service(v, to_guest);
            }
            IpProtocol::Icmp => self.icmp_echo(ip, false),
            IpProtocol::Tcp => self.tcp_segment(
                IpAddr::V4(pkt.src_addr()),
                IpAddr::V4(pkt.dst_addr()),
                pkt.payload(),
                Tail::default(),
                to_guest,
            ),
            IpProtocol::Udp => self.udp_datagram(ip, false),
            _ => self.stats.unsupported += 1,
        }
    }

    fn ipv6(&mut self, frame: &[u8], ip: &[u8], to_guest: &mut dyn ToGuest) {
        let Ok(pkt) = Ipv6Packet::new_checked(ip) else {
            return self.malformed("IPv6");
        };
        let ns = (pkt.next_header() == IpProtocol::Icmpv6
            && pkt.payload().first() == Some(&ICMPV6_NEIGHBOR_SOLICIT))
        .then(|| pkt.payload());
        self.learn_guest_addr(IpAddr::V6(pkt.src_addr()), ns);
        match pkt.next_header() {
            IpProtocol::Icmpv6 => match pkt.payload().first().copied() {
                Some(ICMPV6_ROUTER_SOLICIT | ICMPV6_NEIGHBOR_SOLICIT) => {
                    self.stats.ndp += 1;
                    let v = l2::ndp::handle(&self.net, frame, &mut self.reply);
                    self.service(v, to_guest);
                }
                // The guest announcing itself: nothing to learn beyond its MAC.
                Some(ICMPV6_NEIGHBOR_ADVERT) => self.stats.ndp += 1,
                Some(_) => self.icmp_echo(ip, true),
                None => self.malformed("ICMPv6"),
            },
            IpProtocol::Udp if udp_dst_port(pkt.payload()) == Some(DHCPV6_SERVER_PORT) => {
                self.stats.dhcpv6 += 1;
                let v = l2::dhcpv6::handle(&self.net, frame, &mut self.reply);
                self.service(v, to_guest);
            }
            IpProtocol::Tcp => self.tcp_segment(
                IpAddr::V6(pkt.src_addr()),
                IpAddr::V6(pkt.dst_addr()),
                pkt.payload(),
                Tail::default(),
                to_guest,
            ),
            IpProtocol::Udp => self.udp_datagram(ip, true),
            _ => self.stats.unsupported += 1,
        }
    }
}

fn udp_dst_port(l4: &[u8]) -> Option<u16> {
    (l4.len() >= UDP_HLEN).then(|| u16::from_be_bytes([l4[2], l4[3]]))
}

impl FrameHandler for Engine {
    fn handle_frame(&mut self, frame: &[u8], to_guest: &mut dyn ToGuest) {
        let Some(eth) = self.link_layer(frame) else {
            return;
        };
        let payload = eth.payload();
        match eth.ethertype() {
            EthernetProtocol::Arp => {
                self.stats.arp += 1;
                let v = l2::arp::handle(&self.net, frame, &mut self.reply);
                self.service(v, to_guest);
            }
            EthernetProtocol::Ipv4 if self.net.ip4.is_some() => self.ipv4(frame, payload, to_guest),
            EthernetProtocol::Ipv6 if self.net.ip6.is_some() => self.ipv6(frame, payload, to_guest),
            _ => self.stats.unsupported += 1,
        }
    }

    /// TCP data keeps its tail in guest memory, to be sent from there; anything else is
    /// copied together (the services and the other translations parse whole frames), into
    /// an arena that lasts as long as the batch: UDP sends its datagrams from there at
    /// [`FrameHandler::end_batch`].
    fn handle_split_frame(&mut self, head: &[u8], tail: Tail<'_>, to_guest: &mut dyn ToGuest) {
        if self.split_tcp(head, tail, to_guest) {
            return;
        }
        let len = head.len() + tail.len;
        if len > self.linear.len() {
            return self.malformed("oversized");
        }
        if self.linear.len() - self.linear_used < len {
            // The arena is full: the batch ends early (its frames are still in place).
            self.end_batch(to_guest);
        }
        let at = self.linear_used;
        let mut linear = std::mem::take(&mut self.linear);
        linear[at..at + head.len()].copy_from_slice(head);
        let n = head.len() + tail.copy_to(&mut linear[at + head.len()..at + len]);
        self.linear_used = at + n.next_multiple_of(8);
        self.handle_frame(&linear[at..at + n], to_guest);
        self.linear = linear;
    }

    fn end_batch(&mut self, to_guest: &mut dyn ToGuest) {
        let macs = self.macs();
        if let Some(tcp) = self.tcp.as_mut() {
            tcp.end_batch(self.now, macs, to_guest);
        }
        // UDP sends the batch's datagrams, each flow's with one `sendmmsg`.
        if let Some(udp) = self.udp.as_mut() {
            udp.end_batch(self.now);
        }
        self.linear_used = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Sink(Vec<Vec<u8>>);
    impl ToGuest for Sink {
        fn send(&mut self, parts: &[&[u8]]) -> bool {
            self.0.push(parts.concat());
            true
        }
        fn flush(&mut self) {}
    }

    fn engine() -> Engine {
        let net = NetConfig {
            ip4: Some(crate::conf::Ip4 {
                addr: "192.0.2.2".parse().unwrap(),
                prefix_len: 24,
                gateway: "192.0.2.1".parse().unwrap(),
                dns: vec![],
            }),
            ip6: Some(crate::conf::Ip6 {
                addr: "2001:db8::2".parse().unwrap(),
                prefix_len: 64,
                gateway: "fe80::1".parse().unwrap(),
                our_ll: "fe80::1".parse().unwrap(),
                dns: vec![],
            }),
            ..NetConfig::default()
        };
        Engine::new(net, false, EpollRegistrar { epoll_fd: -1 })
    }

    #[test]
    fn garbage_is_counted_never_fatal() {
        let mut e = engine();
        let mut sink = Sink(Vec::new());
        let mut x: u32 = 0x1234_5678;
        let mut frame = [0u8; 200];
        for round in 0..5000 {
            for b in frame.iter_mut() {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                *b = x as u8;
            }
            // Steer some rounds into the IPv4 and IPv6 paths.
            match round % 3 {
                0 => frame[12..14].copy_from_slice(&[0x08, 0x00]),
                1 => frame[12..14].copy_from_slice(&[0x86, 0xdd]),
                _ => {}
            }
            let len = (x as usize) % frame.len();
            e.handle_frame(&frame[..len], &mut sink);
        }
        let s = e.stats();
        assert_eq!(s.frames, 5000);
        assert!(s.malformed > 0);
    }

    /// Random UDP over IPv4 and IPv6 reaches the UDP module and is counted, never fatal.
    #[test]
    fn garbage_udp_is_counted_never_fatal() {
        let mut e = engine().with_udp(UdpConfig {
            idle_timeout: std::time::Duration::from_secs(180),
            nat: crate::conf::Nat::default(),
            fwd_nat: crate::fwd::Nat::default(),
        });
        let mut sink = Sink(Vec::new());
        let mut x: u32 = 0x9e37_79b9;
        let mut frame = [0u8; 200];
        for round in 0..5000 {
            for b in frame.iter_mut() {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                *b = x as u8;
            }
            if round % 2 == 0 {
                // IPv4, 20-byte header, UDP, valid header checksum.
                frame[12..14].copy_from_slice(&[0x08, 0x00]);
                frame[14] = 0x45;
                frame[16..18].copy_from_slice(&100u16.to_be_bytes());
                frame[20..22].fill(0);
                frame[23] = 17;
                frame[24..26].fill(0);
                let mut ip = smoltcp::wire::Ipv4Packet::new_unchecked(&mut frame[14..34]);
                ip.fill_checksum();
            } else {
                frame[12..14].copy_from_slice(&[0x86, 0xdd]);
                frame[14] = 0x60;
                frame[18..20].copy_from_slice(&100u16.to_be_bytes());
                frame[20] = 17;
            }
            let len = 60 + (x as usize) % (frame.len() - 60);
            e.handle_frame(&frame[..len], &mut sink);
        }
        let udp = e.udp_stats().unwrap();
        assert!(e.stats().udp > 0);
        assert!(udp.malformed + udp.bad_checksum > 0);
        assert_eq!(
            udp.flows_opened, 0,
            "no socket can be watched without epoll"
        );
        assert!(sink.0.is_empty());
    }

    /// A guest TCP segment to 198.51.100.1:80 with `n` bytes of payload, as a frame.
    fn tcp_frame(n: usize) -> Vec<u8> {
        use crate::tcp::conn::{emit_segment, flag, Header};
        let mut sink = Sink(Vec::new());
        let payload: Vec<u8> = (0..n).map(|i| (i * 7) as u8).collect();
        let h = Header {
            seq: 1,
            ack: 1,
            flags: flag::ACK,
            wnd: 1000,
        };
        let (g, r) = (
            "192.0.2.2".parse().unwrap(),
            "198.51.100.1".parse().unwrap(),
        );
        assert!(emit_segment(
            &mut sink,
            [1; 6],
            [2; 6],
            (g, 1000),
            (r, 80),
            h,
            &[],
            &payload
        ));
        sink.0.remove(0)
    }

    /// Hands `frame` over split at 256 bytes, its tail in two pieces of which the last
    /// `short` bytes are missing, and ends the batch.
    fn split(e: &mut Engine, frame: &[u8], short: usize, sink: &mut Sink) {
        hand_split(e, frame, short, sink);
        e.end_batch(sink);
    }

    /// [`split`] without ending the batch.
    fn hand_split(e: &mut Engine, frame: &[u8], short: usize, sink: &mut Sink) {
        let (head, tail) = frame.split_at(256);
        let (a, b) = tail.split_at(tail.len() / 2);
        let iov = [a, b].map(|p| libc::iovec {
            iov_base: p.as_ptr().cast_mut().cast(),
            iov_len: p.len(),
        });
        let tail = Tail {
            iov: &iov,
            len: tail.len() - short,
        };
        e.handle_split_frame(head, tail, sink);
    }

    /// A guest datagram from 192.0.2.2:5000 to the gateway at `dport`, as a frame (UDP
    /// checksum zero, which IPv4 allows).
    fn udp_frame(dport: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 14 + 20 + 8 + payload.len()];
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        let ip_len = (f.len() - 14) as u16;
        f[14] = 0x45;
        f[16..18].copy_from_slice(&ip_len.to_be_bytes());
        f[22] = 64;
        f[23] = 17;
        f[26..30].copy_from_slice(&[192, 0, 2, 2]);
        f[30..34].copy_from_slice(&[192, 0, 2, 1]);
        Ipv4Packet::new_unchecked(&mut f[14..34]).fill_checksum();
        f[34..36].copy_from_slice(&5000u16.to_be_bytes());
        f[36..38].copy_from_slice(&dport.to_be_bytes());
        f[38..40].copy_from_slice(&(ip_len - 20).to_be_bytes());
        f[42..].copy_from_slice(payload);
        f
    }

    /// Two split datagrams in one batch: both copied whole into the batch's arena, the
    /// first still waiting there for the batch's `sendmmsg` while the second is copied. A
    /// server on the loopback (the gateway's mapping) gets both intact, in order.
    #[test]
    fn split_udp_frames_of_one_batch_keep_their_payloads() {
        let epoll_fd = epoll::create(true).expect("epoll");
        let mut e =
            Engine::new(engine().net, false, EpollRegistrar { epoll_fd }).with_udp(UdpConfig {
                idle_timeout: std::time::Duration::from_secs(180),
                nat: crate::conf::Nat::default(),
                // The gateway is the host's loopback: nothing leaves this machine.
                fwd_nat: crate::fwd::Nat {
                    map_host_loopback4: Some("192.0.2.1".parse().unwrap()),
                    ..crate::fwd::Nat::default()
                },
            });
        let server = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        server
            .set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let port = server.local_addr().unwrap().port();
        let payloads: Vec<Vec<u8>> = (0..2u8)
            .map(|k| (0..1000).map(|i| (i as u8).wrapping_mul(3) ^ k).collect())
            .collect();
        let mut sink = Sink(Vec::new());
        for p in &payloads {
            hand_split(&mut e, &udp_frame(port, p), 0, &mut sink);
        }
        assert_eq!(e.udp_stats().unwrap().flows_opened, 1);
        e.end_batch(&mut sink);
        let mut buf = [0u8; 2000];
        for p in &payloads {
            let n = server
                .recv(&mut buf)
                .unwrap_or_else(|err| panic!("{err}: {:?}", e.udp_stats()));
            assert_eq!(&buf[..n], &p[..]);
        }
        drop(e);
        // SAFETY: the epoll fd created above, used by nothing else any more.
        unsafe { libc::close(epoll_fd) };
    }

    #[test]
    fn split_tcp_frames_are_checked_where_they_lie_and_others_made_whole() {
        let mut e = engine();
        e.enable_tcp(crate::tcp::TcpConfig {
            max_flows: 16,
            ..Default::default()
        });
        let mut sink = Sink(Vec::new());
        let mut frame = tcp_frame(3000);
        // Good: parsed, checksum over both parts; no flow, so a RST.
        split(&mut e, &frame, 0, &mut sink);
        let t = e.tcp_stats().unwrap();
        assert_eq!((t.segments, t.malformed, t.rst_unknown), (1, 0, 1));
        assert_eq!(sink.0.len(), 1);
        // A byte flipped in the tail's last piece: the checksum tells.
        let last = frame.len() - 1;
        frame[last] ^= 0x40;
        split(&mut e, &frame, 0, &mut sink);
        let t = e.tcp_stats().unwrap();
        assert_eq!((t.segments, t.malformed, t.rst_unknown), (2, 1, 1));
        // Shorter than its IP header says: the whole-frame path calls it malformed.
        split(&mut e, &frame, 10, &mut sink);
        assert_eq!(e.tcp_stats().unwrap().segments, 2);
        assert_eq!(e.stats().malformed, 1);
        // Not TCP (UDP is off): copied together and counted as the whole-frame path does.
        frame[14 + 9] = 17;
        Ipv4Packet::new_unchecked(&mut frame[14..34]).fill_checksum();
        split(&mut e, &frame, 0, &mut sink);
        let s = e.stats();
        assert_eq!((s.frames, s.malformed, s.unsupported), (4, 1, 1));
    }
}
