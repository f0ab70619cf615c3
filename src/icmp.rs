//! ICMP and ICMPv6 echo, translated to the host's unprivileged "ping" sockets
//! (`SOCK_DGRAM`, `IPPROTO_ICMP`/`IPPROTO_ICMPV6`).
//!
//! # Theory of operation
//! A guest echo request opens (or reuses) a flow in its [`FlowTable`], keyed by the guest's
//! address and echo identifier (as its port) and the destination: one ping socket each, so the reply arriving on a socket names its flow
//! without a lookup. The kernel owns the identifier on the wire: it replaces ours with the
//! socket's "port". We ask for the guest's identifier by binding to it, and when the kernel
//! gives us another one, replies are rewritten back to the guest's identifier on the way in
//! (checksum recomputed). Sequence numbers and payload pass through unchanged.
//!
//! Limits: [`MAX_FLOWS`] concurrent flows; a flow idle for [`IDLE_TIMEOUT`] is closed by
//! [`Icmp::expire`]. When the table is full, requests are dropped and counted.
//!
//! If the kernel refuses ping sockets (`net.ipv4.ping_group_range` excludes our group),
//! echo is turned off with one warning; nothing else is affected.

use std::net::{IpAddr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::sys::socket::{
    self, AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType, SockaddrStorage,
};
use smoltcp::wire::{IpProtocol, Ipv4Packet, Ipv6Packet};

use crate::event::{Register, Token};
use crate::flow::{FlowIdx, FlowKey, FlowTable, InsertError};
use crate::logger::Limiter;
use crate::tap::ToGuest;
use crate::wire;

pub const MAX_FLOWS: usize = 1024;
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
const ECHO_REQUEST_V4: u8 = 8;
const ECHO_REPLY_V4: u8 = 0;
const ECHO_REQUEST_V6: u8 = 128;
const ECHO_REPLY_V6: u8 = 129;
const ICMP_HLEN: usize = 8;
/// Largest echo message we relay (an IPv4 packet's payload at most).
const MAX_ECHO: usize = 65535 - wire::IPV4_HLEN;

/// An echo flow: its socket. The [`FlowKey`] holds the rest: the guest's address and echo
/// identifier (as its "port"), the remote address.
struct Flow {
    sock: OwnedFd,
    last_used: Instant,
}

/// Counters of the echo translation.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct IcmpStats {
    pub requests: u64,
    pub replies: u64,
    pub malformed: u64,
    pub dropped: u64,
    pub flows_opened: u64,
    pub flows_expired: u64,
}

/// The ICMP echo flow table.
pub struct Icmp {
    flows: FlowTable<Flow>,
    disabled: bool,
    stats: IcmpStats,
    log_limit: Limiter,
    buf: Box<[u8]>,
}

impl Default for Icmp {
    fn default() -> Self {
        Self::new()
    }
}

impl Icmp {
    pub fn new() -> Self {
        Icmp {
            flows: FlowTable::new(MAX_FLOWS),
            disabled: false,
            stats: IcmpStats::default(),
            log_limit: Limiter::new(),
            buf: vec![0u8; wire::l3_header_len(true) + MAX_ECHO].into_boxed_slice(),
        }
    }

    pub fn stats(&self) -> IcmpStats {
        self.stats
    }

    /// A guest echo request in an IPv4 packet (`ip` starts at the IP header). Returns false
    /// if it is not an echo request (so the caller counts it as something else).
    pub fn from_guest_v4(&mut self, ip: &[u8], now: Instant, reg: &mut dyn Register) -> bool {
        let Ok(pkt) = Ipv4Packet::new_checked(ip) else {
            self.stats.malformed += 1;
            return true;
        };
        let msg = pkt.payload();
        if msg.first() != Some(&ECHO_REQUEST_V4) {
            return false;
        }
        if msg.len() < ICMP_HLEN || wire::icmp4_checksum(&[msg]) != 0 {
            self.stats.malformed += 1;
            return true;
        }
        self.request(
            IpAddr::V4(pkt.src_addr()),
            IpAddr::V4(pkt.dst_addr()),
            msg,
            now,
            reg,
        );
        true
    }

    /// A guest echo request in an IPv6 packet (no extension headers). Returns false if it is
    /// not an echo request.
    pub fn from_guest_v6(&mut self, ip: &[u8], now: Instant, reg: &mut dyn Register) -> bool {
        let Ok(pkt) = Ipv6Packet::new_checked(ip) else {
            self.stats.malformed += 1;
            return true;
        };
        let msg = pkt.payload();
        if msg.first() != Some(&ECHO_REQUEST_V6) {
            return false;
        }
        let (src, dst) = (IpAddr::V6(pkt.src_addr()), IpAddr::V6(pkt.dst_addr()));
        if msg.len() < ICMP_HLEN || wire::l4_checksum(src, dst, IpProtocol::Icmpv6, &[msg]) != 0 {
            self.stats.malformed += 1;
            return true;
        }
        self.request(src, dst, msg, now, reg);
        true
    }

    fn request(
        &mut self,
        guest: IpAddr,
        remote: IpAddr,
        msg: &[u8],
        now: Instant,
        reg: &mut dyn Register,
    ) {
        self.stats.requests += 1;
        if self.disabled || !wire::is_unicast(remote) {
            self.stats.dropped += 1;
            return;
        }
        let key = FlowKey {
            proto: if remote.is_ipv6() {
                libc::IPPROTO_ICMPV6
            } else {
                libc::IPPROTO_ICMP
            } as u8,
            guest_addr: guest,
            guest_port: u16::from_be_bytes([msg[4], msg[5]]),
            remote_addr: remote,
            remote_port: 0,
        };
        let idx = match self.flows.lookup(&key) {
            Some(idx) => idx,
            None => match self.open(key, now, reg) {
                Some(idx) => idx,
                None => {
                    self.stats.dropped += 1;
                    return;
                }
            },
        };
        let Some(flow) = self.flows.get_mut(idx) else {
            return;
        };
        flow.last_used = now;
        let dst: SockaddrStorage = match remote {
            IpAddr::V4(a) => SocketAddrV4::new(a, 0).into(),
            IpAddr::V6(a) => SocketAddrV6::new(a, 0, 0, 0).into(),
        };
        // The kernel fills in identifier and checksum; the rest goes as the guest wrote it.
        if let Err(e) = socket::sendto(flow.sock.as_raw_fd(), msg, &dst, MsgFlags::MSG_DONTWAIT) {
            self.stats.dropped += 1;
            crate::limited!(
                self.log_limit,
                now,
                debug,
                "icmp: echo to {remote} failed: {e}"
            );
        }
    }

    fn open(&mut self, key: FlowKey, now: Instant, reg: &mut dyn Register) -> Option<FlowIdx> {
        if self.flows.is_full() {
            crate::limited!(
                self.log_limit,
                now,
                warn,
                "icmp: flow table full ({MAX_FLOWS} flows), dropping echo request"
            );
            return None;
        }
        let any = wire::unspecified_like(key.remote_addr);
        let (family, proto) = match key.remote_addr {
            IpAddr::V4(_) => (AddressFamily::Inet, SockProtocol::Icmp),
            IpAddr::V6(_) => (AddressFamily::Inet6, SockProtocol::IcmpV6),
        };
        let bind_addr: SockaddrStorage = SocketAddr::new(any, key.guest_port).into();
        let sock = match socket::socket(
            family,
            SockType::Datagram,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            proto,
        ) {
            Ok(s) => s,
            Err(e) if e == nix::errno::Errno::EACCES || e == nix::errno::Errno::EPERM => {
                log::warn!(
                    "ICMP echo disabled: the kernel doesn't allow ping sockets for our group \
                     (see net.ipv4.ping_group_range): {e}"
                );
                self.disabled = true;
                return None;
            }
            Err(e) => {
                crate::limited!(
                    self.log_limit,
                    now,
                    warn,
                    "icmp: can't open ping socket: {e}"
                );
                return None;
            }
        };
        // Keep the guest's identifier where it is free; any other works too (rewritten).
        if socket::bind(sock.as_raw_fd(), &bind_addr).is_err() {
            let _ = socket::bind(
                sock.as_raw_fd(),
                &SockaddrStorage::from(SocketAddr::new(any, 0)),
            );
        }
        let fd = sock.as_raw_fd();
        let flow = Flow {
            sock,
            last_used: now,
        };
        let idx = match self.flows.insert_watched(key, flow, |r| {
            reg.add(fd, epoll::Events::EPOLLIN, Token::IcmpSock(r.idx))
        }) {
            Ok(idx) => idx,
            Err(InsertError::Refused(_)) => return None,
            Err(InsertError::Unwatched(_, e)) => {
                crate::limited!(
                    self.log_limit,
                    now,
                    warn,
                    "icmp: can't watch ping socket: {e}"
                );
                return None;
            }
        };
        self.stats.flows_opened += 1;
        log::debug!(
            "icmp: flow {} for id {} to {}",
            idx.0,
            key.guest_port,
            key.remote_addr
        );
        Some(idx)
    }

    /// A flow's socket is readable: relay every reply to the guest.
    pub fn from_sock(
        &mut self,
        idx: FlowIdx,
        now: Instant,
        guest_mac: [u8; 6],
        our_mac: [u8; 6],
        to_guest: &mut dyn ToGuest,
    ) {
        let Some(&key) = self.flows.key(idx) else {
            return;
        };
        let Some(flow) = self.flows.get_mut(idx) else {
            return;
        };
        let v6 = key.remote_addr.is_ipv6();
        let hlen = wire::l3_header_len(v6);
        loop {
            let n = match socket::recv(
                flow.sock.as_raw_fd(),
                &mut self.buf[hlen..],
                MsgFlags::MSG_DONTWAIT,
            ) {
                Ok(n) => n,
                Err(nix::errno::Errno::EAGAIN) => break,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    crate::limited!(
                        self.log_limit,
                        now,
                        debug,
                        "icmp: receive on flow {} failed: {e}",
                        idx.0
                    );
                    break;
                }
            };
            let expected = if v6 { ECHO_REPLY_V6 } else { ECHO_REPLY_V4 };
            if n < ICMP_HLEN || self.buf[hlen] != expected {
                continue;
            }
            flow.last_used = now;
            let (src, dst) = (key.remote_addr, key.guest_addr);
            let msg = &mut self.buf[hlen..hlen + n];
            msg[4..6].copy_from_slice(&key.guest_port.to_be_bytes());
            msg[2..4].fill(0);
            let sum = if v6 {
                wire::l4_checksum(src, dst, IpProtocol::Icmpv6, &[msg])
            } else {
                wire::icmp4_checksum(&[msg])
            };
            msg[2..4].copy_from_slice(&sum.to_be_bytes());
            let proto = if v6 {
                IpProtocol::Icmpv6
            } else {
                IpProtocol::Icmp
            };
            if wire::emit_l3(
                &mut self.buf[..hlen],
                guest_mac,
                our_mac,
                src,
                dst,
                proto,
                n,
            )
            .is_none()
            {
                continue;
            }
            self.stats.replies += 1;
            to_guest.send(&[&self.buf[..hlen + n]]);
        }
    }

    /// Closes flows idle for [`IDLE_TIMEOUT`]. Dropping the socket also removes it from
    /// epoll.
    pub fn expire(&mut self, now: Instant) {
        for i in 0..self.flows.high_water() {
            let idx = FlowIdx(i);
            let idle = self
                .flows
                .get(idx)
                .is_some_and(|f| now.duration_since(f.last_used) >= IDLE_TIMEOUT);
            if idle && self.flows.remove(idx).is_some() {
                self.stats.flows_expired += 1;
            }
        }
    }

    pub fn active_flows(&self) -> usize {
        self.flows.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;
    use std::os::fd::RawFd;

    struct NoReg;
    impl Register for NoReg {
        fn add(&mut self, _fd: RawFd, _events: epoll::Events, _token: Token) -> io::Result<()> {
            Ok(())
        }
        fn modify(&mut self, _fd: RawFd, _events: epoll::Events, _token: Token) -> io::Result<()> {
            Ok(())
        }
    }

    fn echo_v4(src: [u8; 4], dst: [u8; 4], id: u16, corrupt: bool) -> Vec<u8> {
        let mut icmp = vec![ECHO_REQUEST_V4, 0, 0, 0];
        icmp.extend(id.to_be_bytes());
        icmp.extend(1u16.to_be_bytes());
        icmp.extend(b"payload!");
        let sum = wire::icmp4_checksum(&[&icmp]);
        icmp[2..4].copy_from_slice(&sum.to_be_bytes());
        if corrupt {
            icmp[9] ^= 1;
        }
        let mut frame = vec![0u8; 34];
        wire::emit_l3(
            &mut frame,
            [0; 6],
            [0; 6],
            IpAddr::from(src),
            IpAddr::from(dst),
            IpProtocol::Icmp,
            icmp.len(),
        )
        .unwrap();
        frame.extend(icmp);
        frame.split_off(wire::ETH_HLEN)
    }

    #[test]
    fn bad_checksums_and_truncation_are_counted_not_sent() {
        let mut icmp = Icmp::new();
        let now = Instant::now();
        let bad = echo_v4([192, 0, 2, 2], [127, 0, 0, 1], 7, true);
        assert!(icmp.from_guest_v4(&bad, now, &mut NoReg));
        for cut in 0..bad.len() {
            icmp.from_guest_v4(&bad[..cut], now, &mut NoReg);
        }
        assert_eq!(icmp.stats().requests, 0);
        assert!(icmp.stats().malformed >= 1);
        assert_eq!(icmp.active_flows(), 0);
    }

    #[test]
    fn non_echo_is_not_ours() {
        let mut pkt = echo_v4([192, 0, 2, 2], [127, 0, 0, 1], 7, false);
        pkt[20] = 13; // timestamp request
        assert!(!Icmp::new().from_guest_v4(&pkt, Instant::now(), &mut NoReg));
    }
}
