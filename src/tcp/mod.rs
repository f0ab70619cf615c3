//! TCP translation between the guest and host sockets, without a TCP stack of our own.
//!
//! # Theory of operation
//! The host kernel's socket does the real TCP work towards the remote end: congestion
//! control, its own retransmissions, buffering. Towards the guest, we only have to look
//! like a TCP peer on a loss-free link: we map the guest's segments to socket calls, and the
//! socket's events to segments for the guest.
//!
//! **Outbound** connections (the guest connects out):
//! 1. Guest SYN for an unknown 4-tuple: a flow is inserted in the [`FlowTable`], a
//!    non-blocking socket is opened (bound to `-o`/`--outbound-if*` if configured) and
//!    `connect()` starts. Its epoll token carries the flow's index.
//! 2. The socket becomes writable (connected): SYN-ACK to the guest, with our MSS (what
//!    fits the guest's link) and a window scale if the guest offered one. If it fails
//!    instead: RST to the guest, flow freed.
//! 3. Guest data: consecutive in-order segments of a flow within one batch of guest frames
//!    are gathered (a `Run`) and go to the socket in one `sendmsg` at the end of the batch,
//!    answered by one ACK. In vhost-user mode their payload goes straight from guest memory
//!    (only the headers are copied: [`crate::tap::FrameHandler::handle_split_frame`]). The
//!    ACK covers only what the kernel took (the guest retransmits the rest), and the window
//!    we show is the free space of the socket's send buffer as the kernel counts it
//!    (`SO_MEMINFO`). When that window runs low, a zero-timeout `poll()` makes the kernel
//!    mark the socket full, so that it grows the buffer and raises EPOLLOUT once a third is
//!    free again, which reopens the window ([`conn::SockOps::arm_write_space`]).
//! 4. Socket data: peeked (`MSG_PEEK`) at the offset of what is already in flight to the
//!    guest, cut to the guest's MSS, sent as far as the guest's (scaled) window allows.
//!    Bytes leave the socket only when the guest acknowledges them, so a retransmission
//!    (on timeout, or on three duplicate ACKs) is a peek again from the acknowledged
//!    point ("go back N", which is all a virtual link needs).
//! 5. Guest FIN: `shutdown(SHUT_WR)`. End of stream on the socket: FIN to the guest. Either
//!    may come first (half-close). The flow is freed when the guest's FIN is in and ours is
//!    acknowledged. Guest RST: the socket is closed with `SO_LINGER` 0 (RST to the peer);
//!    a socket error: RST to the guest.
//! 6. Timers: each flow has one deadline, what [`Conn::wakeup`] says after every call
//!    (retransmission with backoff, a look at the send buffer every [`conn::WND_POLL`]
//!    while the window we show is clamped, [`conn::ACT_TIMEOUT`] idle and
//!    [`conn::FIN_TIMEOUT`] half-closed timeouts), kept in a [`Timers`] queue. The loop
//!    arms one timerfd to the earliest ([`Tcp::next_deadline`]), and [`Tcp::timer`]
//!    visits only the flows that are due: an idle flow costs nothing per tick.
//!
//! **Inbound** connections (`-t`, see [`crate::fwd`]): each forwarded port has a listening
//! socket ([`Token::TcpListen`]). An accepted connection becomes a flow whose guest end is
//! the guest's address and the mapped port, and whose remote end is the client as the
//! guest should see it ([`crate::fwd::Nat::host_to_guest_src`]: the host itself appears
//! as the host-loopback address). We send the SYN; the guest's SYN-ACK establishes the
//! flow, which from then on is the same as an outbound one. A guest RST, or no answer
//! through the retransmissions of the SYN, resets the client.
//!
//! **Host loopback**: a guest connection to the host-loopback address (the gateway, by
//! default) connects to 127.0.0.1 or ::1 instead ([`crate::fwd::Nat::guest_to_host_dst`]).
//!
//! Bad input: segments with a bad checksum, truncated headers, or impossible flag sets
//! (SYN+FIN, SYN+RST...) are dropped and counted. A segment for an unknown flow gets a RST
//! as a host would send (none for a RST). When the table is full, a new SYN gets a RST and a
//! rate-limited log line.
//!
//! Per connection state is a set of events ([`conn::ev`]); the logic is in [`conn`] and does
//! no I/O itself, the socket side is in [`sock`].
//!
//! # Glossary
//! - `seq_to_tap`: next sequence number we send to the guest.
//! - `seq_ack_from_tap`: the guest's cumulative ACK; the socket's unconsumed data starts
//!   there.
//! - `seq_from_tap`: next sequence number expected from the guest (what we ACK).
//! - `wnd_from_tap`: the guest's receive window in bytes, after scaling.
//!
//! Socket data reaches the guest with one copy where the back-end lends room
//! ([`ToGuest::send_with`]): the peek at `SO_PEEK_OFF` writes straight into the frame (guest
//! RX buffers in vhost-user mode), one segment per frame, and the header follows. Without
//! `SO_PEEK_OFF` (kernels before 6.9) the peek can't start at an offset, so data goes
//! through our buffer as before. If the back-end has no room, the data stays in the socket
//! and the flow is marked; [`Tcp::room_returned`] resumes it.
//!
//! Socket events name their flow by [`FlowRef`], index and generation: an event for a flow
//! closed earlier in the same batch is dropped ([`TcpStats::stale_events`]), even if a new
//! flow took its slot meanwhile.

pub mod conn;
pub mod sock;

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{IpAddress, IpProtocol, TcpControl as Control, TcpPacket, TcpRepr};

use crate::event::{Register, Token};
use crate::flow::timer::Timers;
use crate::flow::{FlowIdx, FlowKey, FlowRef, FlowTable, InsertError};
use crate::fwd::{Listener, Nat};
use crate::logger::Limiter;
use crate::tap::{Tail, ToGuest};
use crate::wire;

use conn::{flag, Conn, Ends, Header, Out, Payload, Seg, SockOps, Verdict};
pub use sock::HostSock;

/// IP protocol number of TCP, in flow keys.
const PROTO_TCP: u8 = 6;
/// Scratch for data peeked from a socket, per call.
const PEEK_BUF: usize = 1 << 20;
/// Largest IP packet a frame may carry (the stream protocol's 65535-byte frame limit).
const MAX_IP_PACKET: usize = 65535 - wire::ETH_HLEN;
/// Shortest wait before a flow's next visit: a deadline already past is served by the next
/// timer pass, not again within this one.
const MIN_STEP: Duration = Duration::from_millis(1);
/// What a flow's socket is watched for: edge-triggered, everything.
const SOCK_EVENTS: epoll::Events = epoll::Events::EPOLLIN
    .union(epoll::Events::EPOLLOUT)
    .union(epoll::Events::EPOLLRDHUP)
    .union(epoll::Events::EPOLLET);
/// Most segments gathered into one `sendmsg` (the kernel's `UIO_MAXIOV`).
const RUN_MAX_SEGS: usize = 1024;

/// Consecutive data segments of one flow, gathered within a batch of guest frames to reach
/// the socket in one `sendmsg` and be acknowledged with one ACK.
///
/// Only plain in-order data joins a run (ACK set, no SYN, FIN or RST, the sequence number
/// the flow or the run expects next); any other segment ends the run first, so segments
/// are still handled in the order the guest sent them. The acknowledgment number and
/// window are the last segment's: cumulative, they supersede the earlier ones.
struct Run {
    flow: Option<FlowIdx>,
    seq: u32,
    next: u32,
    ack: u32,
    wnd: u16,
    len: usize,
    /// Payloads, pointing into the batch's frames ([`crate::tap::FrameHandler::end_batch`]).
    iov: Vec<libc::iovec>,
}

impl Run {
    fn new() -> Self {
        Run {
            flow: None,
            seq: 0,
            next: 0,
            ack: 0,
            wnd: 0,
            len: 0,
            iov: Vec::with_capacity(RUN_MAX_SEGS),
        }
    }

    /// Whether `seg` for flow `idx` continues this run.
    fn extends(&self, idx: FlowIdx, seg: &Seg) -> bool {
        self.flow == Some(idx) && seg.seq == self.next
    }

    /// Whether a segment with this tail would still fit.
    fn has_room(&self, tail: &Tail) -> bool {
        self.iov.len() + 1 + tail.iov.len() <= RUN_MAX_SEGS
    }

    fn push(&mut self, idx: FlowIdx, seg: &Seg, head: &[u8], tail: Tail) {
        if self.flow.is_none() {
            self.flow = Some(idx);
            self.seq = seg.seq;
            self.next = seg.seq;
        }
        let len = head.len() + tail.len;
        self.next = self.next.wrapping_add(len as u32);
        self.ack = seg.ack.unwrap_or(self.ack);
        self.wnd = seg.wnd;
        self.len += len;
        let head = libc::iovec {
            iov_base: head.as_ptr().cast_mut().cast(),
            iov_len: head.len(),
        };
        self.iov.extend(
            std::iter::once(head)
                .chain(tail.pieces())
                .filter(|v| v.iov_len > 0),
        );
    }
}

/// Plain data, the only kind a [`Run`] gathers: its payload, if so.
fn plain_data<'a>(seg: &Seg<'a>) -> Option<(&'a [u8], Tail<'a>)> {
    match seg.payload {
        Payload::Frame { head, tail }
            if !seg.payload.is_empty() && seg.ack.is_some() && !(seg.syn || seg.fin || seg.rst) =>
        {
            Some((head, tail))
        }
        _ => None,
    }
}

/// What the TCP translation needs from the configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TcpConfig {
    /// The guest's MTU (`None`: the largest frame).
    pub mtu: Option<u16>,
    pub outbound4: Option<Ipv4Addr>,
    pub outbound6: Option<Ipv6Addr>,
    pub outbound_if4: Option<String>,
    pub outbound_if6: Option<String>,
    /// Flow table capacity.
    pub max_flows: usize,
    /// Guest addresses and host-loopback mapping.
    pub nat: Nat,
}

/// Counters of the TCP translation.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TcpStats {
    pub segments: u64,
    /// Bad checksum, truncated, bad flags.
    pub malformed: u64,
    pub rst_unknown: u64,
    pub opened: u64,
    pub refused_full: u64,
    pub connect_failed: u64,
    pub closed: u64,
    pub aborted: u64,
    /// Connections accepted on forwarded ports.
    pub accepted: u64,
    /// Accepted connections we couldn't hand to the guest (full table, no address of the
    /// family, duplicate tuple).
    pub accept_refused: u64,
    /// Flows the timer visited (due, or early by design: see [`crate::flow::timer`]).
    pub timer_visits: u64,
    /// Socket events for a flow that was gone (closed earlier in the same batch).
    pub stale_events: u64,
}

/// The host socket type, as [`Tcp`] opens and closes it (a fake one in tests).
pub trait Socket: SockOps + Sized {
    fn connect(remote: SocketAddr, bind: Option<IpAddr>, bind_if: Option<&str>)
        -> io::Result<Self>;
    /// A socket `accept()` returned (non-blocking, connected).
    fn from_accepted(fd: OwnedFd) -> Self;
    fn raw_fd(&self) -> RawFd;
    fn note_events(&mut self, rdhup: bool);
    /// Closes with a RST to the peer.
    fn abort(self);
}

impl Socket for HostSock {
    fn connect(
        remote: SocketAddr,
        bind: Option<IpAddr>,
        bind_if: Option<&str>,
    ) -> io::Result<Self> {
        HostSock::connect(remote, bind, bind_if)
    }
    fn from_accepted(fd: OwnedFd) -> Self {
        HostSock::accepted(fd)
    }
    fn raw_fd(&self) -> RawFd {
        HostSock::raw_fd(self)
    }
    fn note_events(&mut self, rdhup: bool) {
        HostSock::note_events(self, rdhup)
    }
    fn abort(self) {
        HostSock::abort(self)
    }
}

struct Flow<S> {
    conn: Conn,
    sock: S,
}

/// The guest's MACs as segments to it carry them.
#[derive(Debug, Clone, Copy)]
pub struct Macs {
    pub guest: [u8; 6],
    pub ours: [u8; 6],
}

/// All TCP flows and what they share.
pub struct Tcp<S: Socket = HostSock> {
    table: FlowTable<Flow<S>>,
    cfg: TcpConfig,
    buf: Box<[u8]>,
    stats: TcpStats,
    log_limit: Limiter,
    isn_key: u64,
    /// Listening sockets of forwarded ports, indexed by their tokens.
    listeners: Vec<Listener>,
    /// Each flow's next deadline.
    timers: Timers,
    /// Guest data waiting for the end of the batch.
    run: Run,
}

impl<S: Socket> Tcp<S> {
    pub fn new(cfg: TcpConfig) -> Self {
        let mut key = [0u8; 8];
        // SAFETY: getrandom writes at most key.len() bytes into key.
        let got = unsafe { libc::getrandom(key.as_mut_ptr().cast(), key.len(), 0) };
        let isn_key = if got == 8 {
            u64::from_ne_bytes(key)
        } else {
            // Predictable sequence numbers only matter against off-path attackers, and the
            // guest link has none; the time is good enough.
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0x5eed)
        };
        Tcp {
            table: FlowTable::new(cfg.max_flows),
            cfg,
            buf: vec![0; PEEK_BUF].into_boxed_slice(),
            stats: TcpStats::default(),
            log_limit: Limiter::new(),
            isn_key,
            listeners: Vec::new(),
            timers: Timers::new(),
            run: Run::new(),
        }
    }

    /// Takes the listening sockets of forwarded ports and watches them.
    pub fn add_listeners(&mut self, ls: Vec<Listener>, reg: &mut dyn Register) -> io::Result<()> {
        for l in ls {
            let i = self.listeners.len() as u32;
            reg.add(
                l.fd.as_raw_fd(),
                epoll::Events::EPOLLIN,
                Token::TcpListen(i),
            )?;
            self.listeners.push(l);
        }
        Ok(())
    }

    /// The guest sent from (or claimed) address `a`: inbound connections go there.
    pub fn guest_addr_seen(&mut self, a: IpAddr) {
        if self.cfg.nat.guest_addr_seen(a) {
            log::debug!("tcp: guest address {a}");
        }
    }

    pub fn listeners(&self) -> usize {
        self.listeners.len()
    }

    /// A listening socket has connections to accept.
    pub fn listener_ready(
        &mut self,
        li: u32,
        now: Instant,
        macs: Macs,
        reg: &mut dyn Register,
        to_guest: &mut dyn ToGuest,
    ) {
        let Some(l) = self.listeners.get(li as usize) else {
            return;
        };
        let (lfd, guest_port) = (l.fd.as_raw_fd(), l.guest_port);
        loop {
            match crate::fwd::accept(lfd) {
                Ok(Some((fd, peer))) => self.inbound(
                    S::from_accepted(fd),
                    peer,
                    guest_port,
                    now,
                    macs,
                    reg,
                    to_guest,
                ),
                Ok(None) => break,
                Err(e) => {
                    // ECONNABORTED and the like: that one client is gone; EMFILE: the
                    // rest stay queued until a flow closes.
                    crate::limited!(self.log_limit, now, warn, "tcp: accept failed: {e}");
                    if e.raw_os_error() != Some(libc::ECONNABORTED) {
                        break;
                    }
                }
            }
        }
    }

    /// A connection accepted from `peer` for guest port `guest_port`: a flow, and our SYN
    /// to the guest.
    #[allow(clippy::too_many_arguments)]
    pub fn inbound(
        &mut self,
        sock: S,
        peer: SocketAddr,
        guest_port: u16,
        now: Instant,
        macs: Macs,
        reg: &mut dyn Register,
        to_guest: &mut dyn ToGuest,
    ) {
        self.stats.accepted += 1;
        let Some(src) = self.cfg.nat.host_to_guest_src(peer.ip()) else {
            self.stats.accept_refused += 1;
            return sock.abort();
        };
        let Some(dst) = self.cfg.nat.guest_addr(src) else {
            self.stats.accept_refused += 1;
            return sock.abort();
        };
        if self.table.is_full() {
            self.stats.accept_refused += 1;
            crate::limited!(
                self.log_limit,
                now,
                warn,
                "tcp: flow table full ({} flows), refusing connection from {peer}",
                self.table.capacity()
            );
            return sock.abort();
        }
        let key = FlowKey {
            proto: PROTO_TCP,
            guest_addr: dst,
            guest_port,
            remote_addr: src,
            remote_port: peer.port(),
        };
        let ends = Ends {
            guest: (dst, guest_port),
            remote: (src, peer.port()),
        };
        let isn = self.isn(&key);
        let conn = Conn::new_inbound(ends, self.mss_link(dst.is_ipv6()), isn, now);
        let fd = sock.raw_fd();
        let idx = match self.table.insert_watched(key, Flow { conn, sock }, |r| {
            reg.add(fd, SOCK_EVENTS, Token::TcpSock(r))
        }) {
            Ok(idx) => idx,
            Err(e) => {
                self.stats.accept_refused += 1;
                let f = match e {
                    // Two host clients that look the same to the guest (127.0.0.1:p and
                    // the host's address:p): the second one can't be told apart.
                    InsertError::Refused(f) => f,
                    InsertError::Unwatched(f, e) => {
                        crate::limited!(self.log_limit, now, warn, "tcp: can't watch socket: {e}");
                        f
                    }
                };
                return f.sock.abort();
            }
        };
        log::debug!(
            "tcp: flow {} {peer} -> {}:{guest_port} (guest sees {src})",
            idx.0,
            dst
        );
        let Tcp { table, buf, .. } = self;
        if let Some(flow) = table.get_mut(idx) {
            let mut out = Out {
                to_guest,
                guest_mac: macs.guest,
                our_mac: macs.ours,
                buf,
            };
            flow.conn.send_syn(now, &mut flow.sock, &mut out);
        }
        self.reschedule(idx, now);
    }

    pub fn stats(&self) -> TcpStats {
        self.stats
    }

    pub fn active_flows(&self) -> usize {
        self.table.len()
    }

    /// Largest segment that fits the guest's link, for this family.
    fn mss_link(&self, v6: bool) -> u16 {
        let ip_hlen = if v6 { wire::IPV6_HLEN } else { wire::IPV4_HLEN };
        let mtu = self
            .cfg
            .mtu
            .map(usize::from)
            .unwrap_or(MAX_IP_PACKET)
            .min(MAX_IP_PACKET);
        mtu.saturating_sub(ip_hlen + conn::TCP_HLEN)
            .clamp(536, 65535) as u16
    }

    fn isn(&self, key: &FlowKey) -> u32 {
        // RFC 6528: a keyed hash of the tuple plus a 4 µs clock.
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.isn_key.hash(&mut h);
        key.hash(&mut h);
        let ticks = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| (d.as_nanos() >> 12) as u32)
            .unwrap_or(0);
        (h.finish() as u32).wrapping_add(ticks)
    }

    /// A TCP segment from the guest (`l4` starts at the TCP header; `src`, `dst` are the IP
    /// addresses of its packet).
    ///
    /// # Safety
    /// The payload may be kept (as raw pointers) to be sent at [`Self::end_batch`]: `l4`
    /// must stay in place until then ([`crate::tap::FrameHandler::end_batch`]'s contract).
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn from_guest(
        &mut self,
        src: IpAddr,
        dst: IpAddr,
        l4: &[u8],
        now: Instant,
        macs: Macs,
        reg: &mut dyn Register,
        to_guest: &mut dyn ToGuest,
    ) {
        let tail = Tail::default();
        // SAFETY: passed on from our caller.
        unsafe { self.from_guest_split(src, dst, l4, tail, now, macs, reg, to_guest) };
    }

    /// A TCP segment from the guest whose last `tail.len` bytes were left in guest memory
    /// ([`crate::tap::FrameHandler::handle_split_frame`]); `l4`, the rest, holds at least
    /// the whole TCP header.
    ///
    /// # Safety
    /// As for [`Self::from_guest`], for `l4` and the memory `tail` describes.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn from_guest_split(
        &mut self,
        src: IpAddr,
        dst: IpAddr,
        l4: &[u8],
        tail: Tail,
        now: Instant,
        macs: Macs,
        reg: &mut dyn Register,
        to_guest: &mut dyn ToGuest,
    ) {
        self.stats.segments += 1;
        let Ok(pkt) = TcpPacket::new_checked(l4) else {
            self.stats.malformed += 1;
            return;
        };
        let caps = if tail.len == 0 {
            ChecksumCapabilities::default()
        } else {
            // smoltcp would sum only what it sees: the tail is summed where it lies.
            let sum = tail.sum().value();
            if wire::l4_checksum_with(src, dst, IpProtocol::Tcp, l4, tail.len, sum) != 0 {
                self.stats.malformed += 1;
                return;
            }
            ChecksumCapabilities::ignored()
        };
        let Ok(repr) = TcpRepr::parse(&pkt, &IpAddress::from(src), &IpAddress::from(dst), &caps)
        else {
            self.stats.malformed += 1;
            return;
        };
        if !wire::is_unicast(dst) || !wire::is_unicast(src) {
            self.stats.malformed += 1;
            return;
        }
        let seg = Seg {
            seq: repr.seq_number.0 as u32,
            ack: repr.ack_number.map(|a| a.0 as u32),
            syn: repr.control == Control::Syn,
            fin: repr.control == Control::Fin,
            rst: repr.control == Control::Rst,
            wnd: repr.window_len,
            mss: repr.max_seg_size,
            ws: repr.window_scale,
            payload: Payload::Frame {
                head: repr.payload,
                tail,
            },
        };
        let key = FlowKey {
            proto: PROTO_TCP,
            guest_addr: src,
            guest_port: repr.src_port,
            remote_addr: dst,
            remote_port: repr.dst_port,
        };
        let ends = Ends {
            guest: (src, repr.src_port),
            remote: (dst, repr.dst_port),
        };
        let found = self.table.lookup(&key);
        // Plain data extends the run, or starts the next one once this one is sent.
        if let (Some(idx), Some((head, tail))) = (found, plain_data(&seg)) {
            if self.run.extends(idx, &seg) && self.run.has_room(&tail) {
                self.run.push(idx, &seg, head, tail);
                return;
            }
            self.end_batch(now, macs, to_guest);
            if self
                .table
                .get(idx)
                .is_some_and(|f| f.conn.takes_data_at(seg.seq))
            {
                self.run.push(idx, &seg, head, tail);
                return;
            }
        } else {
            self.end_batch(now, macs, to_guest);
        }
        match found {
            Some(idx) => {
                let Tcp { table, buf, .. } = self;
                let Some(flow) = table.get_mut(idx) else {
                    return;
                };
                let mut out = Out {
                    to_guest,
                    guest_mac: macs.guest,
                    our_mac: macs.ours,
                    buf,
                };
                let v = flow.conn.tap_segment(&seg, now, &mut flow.sock, &mut out);
                self.finish(idx, v, now);
            }
            None if seg.syn && seg.ack.is_none() => {
                self.open(key, ends, &seg, now, macs, reg, to_guest)
            }
            None => {
                if !seg.rst {
                    self.stats.rst_unknown += 1;
                    rst_for(&seg, ends, macs, to_guest);
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn open(
        &mut self,
        key: FlowKey,
        ends: Ends,
        syn: &Seg,
        now: Instant,
        macs: Macs,
        reg: &mut dyn Register,
        to_guest: &mut dyn ToGuest,
    ) {
        if self.table.is_full() {
            self.stats.refused_full += 1;
            crate::limited!(
                self.log_limit,
                now,
                warn,
                "tcp: flow table full ({} flows), refusing new connections",
                self.table.capacity()
            );
            rst_for(syn, ends, macs, to_guest);
            return;
        }
        let remote = self
            .cfg
            .nat
            .guest_to_host_dst(SocketAddr::new(key.remote_addr, key.remote_port));
        let (bind, bind_if) = match key.remote_addr {
            // The host's loopback: no outbound address or interface applies.
            _ if remote.ip().is_loopback() => (None, None),
            IpAddr::V4(_) => (
                self.cfg.outbound4.map(IpAddr::V4),
                self.cfg.outbound_if4.as_deref(),
            ),
            IpAddr::V6(_) => (
                self.cfg.outbound6.map(IpAddr::V6),
                self.cfg.outbound_if6.as_deref(),
            ),
        };
        let sock = match S::connect(remote, bind, bind_if) {
            Ok(s) => s,
            Err(e) => {
                self.stats.connect_failed += 1;
                crate::limited!(
                    self.log_limit,
                    now,
                    debug,
                    "tcp: connect to {remote} failed: {e}"
                );
                rst_for(syn, ends, macs, to_guest);
                return;
            }
        };
        let isn = self.isn(&key);
        let conn = Conn::new(ends, syn, self.mss_link(remote.is_ipv6()), isn, now);
        let fd = sock.raw_fd();
        let idx = match self.table.insert_watched(key, Flow { conn, sock }, |r| {
            reg.add(fd, SOCK_EVENTS, Token::TcpSock(r))
        }) {
            Ok(idx) => idx,
            // Checked above: can't happen, and the socket just closes.
            Err(InsertError::Refused(_)) => return,
            Err(InsertError::Unwatched(_, e)) => {
                crate::limited!(self.log_limit, now, warn, "tcp: can't watch socket: {e}");
                return rst_for(syn, ends, macs, to_guest);
            }
        };
        self.stats.opened += 1;
        self.reschedule(idx, now);
        log::debug!(
            "tcp: flow {} {}:{} -> {remote}",
            idx.0,
            key.guest_addr,
            key.guest_port
        );
    }

    /// Ends a batch of guest frames: gathered data goes to its socket, and the guest gets
    /// its ACK. Call before the frames of the batch go away
    /// ([`crate::tap::FrameHandler::end_batch`]).
    pub fn end_batch(&mut self, now: Instant, macs: Macs, to_guest: &mut dyn ToGuest) {
        let Some(idx) = self.run.flow.take() else {
            return;
        };
        let Tcp {
            table, buf, run, ..
        } = self;
        let seg = Seg {
            seq: run.seq,
            ack: Some(run.ack),
            syn: false,
            fin: false,
            rst: false,
            wnd: run.wnd,
            mss: None,
            ws: None,
            payload: Payload::Gathered {
                iov: &run.iov,
                len: run.len,
            },
        };
        let v = match table.get_mut(idx) {
            Some(flow) => {
                let mut out = Out {
                    to_guest,
                    guest_mac: macs.guest,
                    our_mac: macs.ours,
                    buf,
                };
                Some(flow.conn.tap_segment(&seg, now, &mut flow.sock, &mut out))
            }
            None => None,
        };
        run.iov.clear();
        run.len = 0;
        if let Some(v) = v {
            self.finish(idx, v, now);
        }
    }

    /// A flow's socket reported `events`.
    pub fn sock_ready(
        &mut self,
        r: FlowRef,
        events: epoll::Events,
        now: Instant,
        macs: Macs,
        to_guest: &mut dyn ToGuest,
    ) {
        let Tcp { table, buf, .. } = self;
        let Some(flow) = table.get_ref_mut(r) else {
            // Closed earlier in this batch, its slot maybe taken by a new flow since.
            self.stats.stale_events += 1;
            return;
        };
        flow.sock
            .note_events(events.contains(epoll::Events::EPOLLRDHUP));
        let mut out = Out {
            to_guest,
            guest_mac: macs.guest,
            our_mac: macs.ours,
            buf,
        };
        let readable = events.intersects(
            epoll::Events::EPOLLIN | epoll::Events::EPOLLRDHUP | epoll::Events::EPOLLHUP,
        );
        let writable = events.contains(epoll::Events::EPOLLOUT);
        let error = events.intersects(epoll::Events::EPOLLERR | epoll::Events::EPOLLHUP);
        let v = flow
            .conn
            .sock_ready(readable, writable, error, now, &mut flow.sock, &mut out);
        self.finish(r.idx, v, now);
    }

    /// Room towards the guest came back ([`ToGuest::room_returned`]): flows whose socket
    /// data waited for it send now. Their sockets are edge-triggered, so nothing else would
    /// bring that data back before a retransmission timeout.
    pub fn room_returned(&mut self, now: Instant, macs: Macs, to_guest: &mut dyn ToGuest) {
        for i in 0..self.table.high_water() {
            let idx = FlowIdx(i);
            let Tcp { table, buf, .. } = self;
            let Some(flow) = table.get_mut(idx) else {
                continue;
            };
            if !flow.conn.take_tap_blocked() {
                continue;
            }
            let mut out = Out {
                to_guest: &mut *to_guest,
                guest_mac: macs.guest,
                our_mac: macs.ours,
                buf,
            };
            let v = flow.conn.sock_to_tap(now, &mut flow.sock, &mut out);
            self.finish(idx, v, now);
        }
    }

    /// The flows whose deadline has come: retransmissions, window updates, timeouts. Call
    /// when [`Self::next_deadline`] has passed (calling more often costs a heap peek).
    pub fn timer(&mut self, now: Instant, macs: Macs, to_guest: &mut dyn ToGuest) {
        while let Some(idx) = self.timers.pop_due(now) {
            let Tcp { table, buf, .. } = self;
            let Some(flow) = table.get_mut(idx) else {
                continue;
            };
            self.stats.timer_visits += 1;
            let mut out = Out {
                to_guest: &mut *to_guest,
                guest_mac: macs.guest,
                our_mac: macs.ours,
                buf,
            };
            let v = flow.conn.timer(now, &mut flow.sock, &mut out);
            self.finish(idx, v, now);
        }
    }

    /// When [`Self::timer`] next has work: what the loop's timer should be armed to.
    pub fn next_deadline(&mut self) -> Option<Instant> {
        self.timers.earliest()
    }

    /// Files the flow's next deadline after a call that may have moved it. Never within
    /// this instant: a timer pass can't loop on one flow.
    fn reschedule(&mut self, idx: FlowIdx, now: Instant) {
        let at = self
            .table
            .get(idx)
            .map(|f| f.conn.wakeup(now).max(now + MIN_STEP));
        self.timers.schedule(idx, at);
    }

    fn finish(&mut self, idx: FlowIdx, v: Verdict, now: Instant) {
        if v != Verdict::Keep {
            self.timers.cancel(idx);
        }
        match v {
            Verdict::Keep => self.reschedule(idx, now),
            // The log line comes after the socket is closed: tests count descriptors by it.
            Verdict::Close => {
                if let Some(f) = self.table.remove(idx) {
                    self.stats.closed += 1;
                    if !f.conn.has(conn::ev::SOCK_CONNECTED) {
                        self.stats.connect_failed += 1;
                    }
                    drop(f);
                    log::debug!("tcp: flow {} closed", idx.0);
                }
            }
            Verdict::Abort => {
                if let Some(f) = self.table.remove(idx) {
                    self.stats.aborted += 1;
                    f.sock.abort();
                    log::debug!("tcp: flow {} reset", idx.0);
                }
            }
        }
    }
}

/// The RST a host sends for a segment that belongs to no connection (RFC 9293 3.10.7.1).
fn rst_for(seg: &Seg, ends: Ends, macs: Macs, to_guest: &mut dyn ToGuest) {
    let h = match seg.ack {
        Some(ack) => Header {
            seq: ack,
            ack: 0,
            flags: flag::RST,
            wnd: 0,
        },
        None => {
            let len = seg.payload.len() as u32 + u32::from(seg.syn) + u32::from(seg.fin);
            Header {
                seq: 0,
                ack: seg.seq.wrapping_add(len),
                flags: flag::RST | flag::ACK,
                wnd: 0,
            }
        }
    };
    conn::emit_segment(
        to_guest,
        macs.guest,
        macs.ours,
        ends.remote,
        ends.guest,
        h,
        &[],
        &[],
    );
}

#[cfg(test)]
mod tests {
    use super::conn::tests::{decode, FakeSock, Sink};
    use super::*;
    use std::cell::Cell;

    thread_local! {
        static CONNECT_FAILS: Cell<bool> = const { Cell::new(false) };
        static LAST_CONNECT: Cell<Option<(SocketAddr, Option<IpAddr>)>> = const { Cell::new(None) };
    }

    impl Socket for FakeSock {
        fn connect(to: SocketAddr, bind: Option<IpAddr>, _: Option<&str>) -> io::Result<Self> {
            LAST_CONNECT.with(|c| c.set(Some((to, bind))));
            if CONNECT_FAILS.with(Cell::get) {
                return Err(io::ErrorKind::NetworkUnreachable.into());
            }
            Ok(FakeSock {
                space: 1 << 16,
                ..FakeSock::default()
            })
        }
        fn from_accepted(_: OwnedFd) -> Self {
            FakeSock {
                space: 1 << 16,
                ..FakeSock::default()
            }
        }
        fn raw_fd(&self) -> RawFd {
            -1
        }
        fn note_events(&mut self, _: bool) {}
        fn abort(self) {}
    }

    fn fref(idx: u32, gen: u32) -> FlowRef {
        FlowRef {
            idx: FlowIdx(idx),
            gen,
        }
    }

    struct Reg(Vec<Token>);
    impl Register for Reg {
        fn add(&mut self, _: RawFd, _: epoll::Events, t: Token) -> io::Result<()> {
            self.0.push(t);
            Ok(())
        }
        fn modify(&mut self, _: RawFd, _: epoll::Events, _: Token) -> io::Result<()> {
            Ok(())
        }
    }

    const G: [u8; 4] = [192, 0, 2, 2];
    const R: [u8; 4] = [198, 51, 100, 1];
    const MACS: Macs = Macs {
        guest: [2; 6],
        ours: [3; 6],
    };

    /// A guest TCP segment (header + payload) with a correct checksum unless `corrupt`.
    fn segment(
        sport: u16,
        seq: u32,
        ack: Option<u32>,
        flags: u8,
        payload: &[u8],
        corrupt: bool,
    ) -> Vec<u8> {
        let mut sink = Sink {
            frames: vec![],
            room: 1,
        };
        conn::emit_segment(
            &mut sink,
            [0; 6],
            [0; 6],
            (IpAddr::from(G), sport),
            (IpAddr::from(R), 80),
            Header {
                seq,
                ack: ack.unwrap_or(0),
                flags: flags | if ack.is_some() { flag::ACK } else { 0 },
                wnd: 1000,
            },
            &[],
            payload,
        );
        let mut l4 = sink
            .frames
            .remove(0)
            .split_off(wire::ETH_HLEN + wire::IPV4_HLEN);
        if corrupt {
            l4[4] ^= 1;
        }
        l4
    }

    fn tcp(cap: usize) -> Tcp<FakeSock> {
        Tcp::new(TcpConfig {
            max_flows: cap,
            ..TcpConfig::default()
        })
    }

    impl Tcp<FakeSock> {
        /// [`Tcp::from_guest`] for tests, whose frames outlive the batches they are in.
        #[allow(clippy::too_many_arguments)]
        fn guest_seg(
            &mut self,
            src: IpAddr,
            dst: IpAddr,
            l4: &[u8],
            now: Instant,
            macs: Macs,
            reg: &mut dyn Register,
            to_guest: &mut dyn ToGuest,
        ) {
            // SAFETY: each test keeps its frames until it ends the batch.
            unsafe { self.from_guest(src, dst, l4, now, macs, reg, to_guest) }
        }
    }

    /// One segment, as a batch of its own.
    fn feed(t: &mut Tcp<FakeSock>, l4: &[u8], reg: &mut Reg, sink: &mut Sink) {
        let now = Instant::now();
        t.guest_seg(G.into(), R.into(), l4, now, MACS, reg, sink);
        t.end_batch(now, MACS, sink);
    }

    fn sink() -> Sink {
        Sink {
            frames: vec![],
            room: usize::MAX,
        }
    }

    #[test]
    fn unknown_flows_get_rst_except_rst() {
        let mut t = tcp(4);
        let (mut reg, mut s) = (Reg(vec![]), sink());
        feed(
            &mut t,
            &segment(1000, 50, Some(777), 0, b"data", false),
            &mut reg,
            &mut s,
        );
        let g = decode(&s.frames[0]);
        assert_eq!((g.flags, g.seq), (flag::RST, 777));
        feed(
            &mut t,
            &segment(1000, 50, None, flag::FIN, b"ab", false),
            &mut reg,
            &mut s,
        );
        let g = decode(&s.frames[1]);
        assert_eq!((g.flags, g.ack), (flag::RST | flag::ACK, 53));
        feed(
            &mut t,
            &segment(1000, 50, None, flag::RST, b"", false),
            &mut reg,
            &mut s,
        );
        assert_eq!(s.frames.len(), 2, "no RST for a RST");
        assert_eq!(t.stats().rst_unknown, 2);
        assert_eq!(t.active_flows(), 0);
    }

    #[test]
    fn malformed_segments_are_counted_and_dropped() {
        let mut t = tcp(4);
        let (mut reg, mut s) = (Reg(vec![]), sink());
        let good = segment(1000, 50, None, flag::SYN, b"", false);
        feed(
            &mut t,
            &segment(1000, 50, None, flag::SYN, b"", true),
            &mut reg,
            &mut s,
        );
        for cut in 0..good.len() {
            feed(&mut t, &good[..cut], &mut reg, &mut s);
        }
        let mut synfin = segment(1000, 50, None, flag::SYN | flag::FIN, b"", false);
        feed(&mut t, &synfin, &mut reg, &mut s);
        synfin[13] = flag::SYN | flag::RST;
        feed(&mut t, &synfin, &mut reg, &mut s);
        assert!(s.frames.is_empty());
        assert_eq!(t.stats().malformed, 1 + good.len() as u64 + 2);
        assert_eq!(t.active_flows(), 0);
    }

    #[test]
    fn syn_opens_a_flow_and_full_table_refuses_with_rst() {
        let mut t = tcp(2);
        let (mut reg, mut s) = (Reg(vec![]), sink());
        for port in [1000, 1001] {
            feed(
                &mut t,
                &segment(port, 5, None, flag::SYN, b"", false),
                &mut reg,
                &mut s,
            );
        }
        assert_eq!(t.active_flows(), 2);
        assert_eq!(
            reg.0,
            vec![Token::TcpSock(fref(0, 0)), Token::TcpSock(fref(1, 0))]
        );
        assert!(s.frames.is_empty(), "SYN-ACK waits for connect()");
        // A retransmitted SYN is the same flow.
        feed(
            &mut t,
            &segment(1000, 5, None, flag::SYN, b"", false),
            &mut reg,
            &mut s,
        );
        assert_eq!(t.active_flows(), 2);
        feed(
            &mut t,
            &segment(1002, 5, None, flag::SYN, b"", false),
            &mut reg,
            &mut s,
        );
        assert_eq!(t.stats().refused_full, 1);
        let g = decode(&s.frames[0]);
        assert_eq!((g.flags, g.ack), (flag::RST | flag::ACK, 6));
        // Connected: SYN-ACK; a guest RST frees the slot for the next SYN.
        t.sock_ready(
            fref(0, 0),
            epoll::Events::EPOLLOUT,
            Instant::now(),
            MACS,
            &mut s,
        );
        assert_eq!(decode(&s.frames[1]).flags, flag::SYN | flag::ACK);
        feed(
            &mut t,
            &segment(1000, 6, None, flag::RST, b"", false),
            &mut reg,
            &mut s,
        );
        assert_eq!(t.active_flows(), 1);
        feed(
            &mut t,
            &segment(1002, 5, None, flag::SYN, b"", false),
            &mut reg,
            &mut s,
        );
        assert_eq!(t.active_flows(), 2);
        assert_eq!(reg.0.last(), Some(&Token::TcpSock(fref(0, 1))));
    }

    #[test]
    fn connect_error_at_once_is_a_rst() {
        let mut t = tcp(2);
        let (mut reg, mut s) = (Reg(vec![]), sink());
        CONNECT_FAILS.with(|c| c.set(true));
        feed(
            &mut t,
            &segment(1000, 5, None, flag::SYN, b"", false),
            &mut reg,
            &mut s,
        );
        CONNECT_FAILS.with(|c| c.set(false));
        assert_eq!(t.active_flows(), 0);
        assert_eq!(decode(&s.frames[0]).flags, flag::RST | flag::ACK);
    }

    #[test]
    fn mss_fits_the_link() {
        let t = tcp(1);
        assert_eq!(t.mss_link(false), (65535 - 14 - 20 - 20) as u16);
        let t: Tcp<FakeSock> = Tcp::new(TcpConfig {
            mtu: Some(1500),
            ..TcpConfig::default()
        });
        assert_eq!((t.mss_link(false), t.mss_link(true)), (1460, 1440));
    }

    fn nat() -> Nat {
        Nat {
            guest4: Some(G.into()),
            gw4: Some([192, 0, 2, 1].into()),
            map_host_loopback4: Some([192, 0, 2, 1].into()),
            ..Nat::default()
        }
    }

    /// Source and destination of an IPv4 frame to the guest.
    fn ends_of(frame: &[u8]) -> ((IpAddr, u16), (IpAddr, u16)) {
        let ip = smoltcp::wire::Ipv4Packet::new_checked(&frame[wire::ETH_HLEN..]).unwrap();
        let t = TcpPacket::new_checked(ip.payload()).unwrap();
        (
            (IpAddr::V4(ip.src_addr()), t.src_port()),
            (IpAddr::V4(ip.dst_addr()), t.dst_port()),
        )
    }

    #[test]
    fn inbound_connections_come_from_the_client_or_the_gateway() {
        let mut t: Tcp<FakeSock> = Tcp::new(TcpConfig {
            max_flows: 2,
            nat: nat(),
            ..TcpConfig::default()
        });
        let (mut reg, mut s) = (Reg(vec![]), sink());
        let now = Instant::now();
        let sock = || FakeSock::default();
        let peer: SocketAddr = "198.51.100.7:40000".parse().unwrap();
        t.inbound(sock(), peer, 80, now, MACS, &mut reg, &mut s);
        let lo: SocketAddr = "127.0.0.1:40001".parse().unwrap();
        t.inbound(sock(), lo, 80, now, MACS, &mut reg, &mut s);
        assert_eq!(s.frames.len(), 2);
        assert_eq!(decode(&s.frames[0]).flags, flag::SYN);
        assert_eq!(
            ends_of(&s.frames[0]),
            ((peer.ip(), 40000), (IpAddr::from(G), 80))
        );
        assert_eq!(
            ends_of(&s.frames[1]),
            (([192, 0, 2, 1].into(), 40001), (IpAddr::from(G), 80))
        );
        assert_eq!(
            reg.0,
            vec![Token::TcpSock(fref(0, 0)), Token::TcpSock(fref(1, 0))]
        );
        // Full: the next client is refused (reset), nothing to the guest.
        t.inbound(
            sock(),
            "198.51.100.8:1".parse().unwrap(),
            80,
            now,
            MACS,
            &mut reg,
            &mut s,
        );
        assert_eq!((t.stats().accepted, t.stats().accept_refused), (3, 1));
        assert_eq!(s.frames.len(), 2);
        // The guest refuses the first: flow gone.
        let syn = decode(&s.frames[0]);
        let rst = {
            let mut sink = Sink {
                frames: vec![],
                room: 1,
            };
            conn::emit_segment(
                &mut sink,
                [0; 6],
                [0; 6],
                (IpAddr::from(G), 80),
                (peer.ip(), 40000),
                Header {
                    seq: 0,
                    ack: syn.seq.wrapping_add(1),
                    flags: flag::RST | flag::ACK,
                    wnd: 0,
                },
                &[],
                &[],
            );
            sink.frames
                .remove(0)
                .split_off(wire::ETH_HLEN + wire::IPV4_HLEN)
        };
        t.guest_seg(G.into(), peer.ip(), &rst, now, MACS, &mut reg, &mut s);
        assert_eq!(t.active_flows(), 1);
        assert_eq!(t.stats().aborted, 1);
    }

    #[test]
    fn gateway_connections_go_to_the_host_loopback() {
        let mut t: Tcp<FakeSock> = Tcp::new(TcpConfig {
            max_flows: 2,
            nat: nat(),
            outbound4: Some([192, 0, 2, 2].into()),
            ..TcpConfig::default()
        });
        let (mut reg, mut s) = (Reg(vec![]), sink());
        let syn = segment(1000, 5, None, flag::SYN, b"", false);
        let gw = IpAddr::from([192, 0, 2, 1]);
        t.guest_seg(G.into(), gw, &syn, Instant::now(), MACS, &mut reg, &mut s);
        // segment() builds it for R: its checksum is wrong for the gateway.
        assert_eq!(t.stats().malformed, 1, "checksum covers the destination");
        let mut sink = Sink {
            frames: vec![],
            room: 1,
        };
        conn::emit_segment(
            &mut sink,
            [0; 6],
            [0; 6],
            (IpAddr::from(G), 1000),
            (gw, 22),
            Header {
                seq: 5,
                ack: 0,
                flags: flag::SYN,
                wnd: 1000,
            },
            &[],
            &[],
        );
        let syn = sink
            .frames
            .remove(0)
            .split_off(wire::ETH_HLEN + wire::IPV4_HLEN);
        t.guest_seg(G.into(), gw, &syn, Instant::now(), MACS, &mut reg, &mut s);
        assert_eq!(t.active_flows(), 1);
        assert_eq!(
            LAST_CONNECT.with(Cell::get),
            Some(("127.0.0.1:22".parse().unwrap(), None)),
            "loopback, without the outbound address"
        );
        t.guest_seg(
            G.into(),
            R.into(),
            &segment(1001, 5, None, flag::SYN, b"", false),
            Instant::now(),
            MACS,
            &mut reg,
            &mut s,
        );
        assert_eq!(
            LAST_CONNECT.with(Cell::get),
            Some((
                "198.51.100.1:80".parse().unwrap(),
                Some([192, 0, 2, 2].into())
            ))
        );
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A flow from guest port `port`, established at `t0`: SYN, connect, SYN-ACK, ACK. Also
    /// returns our next sequence number.
    fn establish(
        t: &mut Tcp<FakeSock>,
        port: u16,
        t0: Instant,
        reg: &mut Reg,
        s: &mut Sink,
    ) -> (FlowRef, u32) {
        let syn = segment(port, 5, None, flag::SYN, b"", false);
        t.guest_seg(G.into(), R.into(), &syn, t0, MACS, reg, s);
        let Some(&Token::TcpSock(r)) = reg.0.last() else {
            panic!("no token registered");
        };
        t.sock_ready(r, epoll::Events::EPOLLOUT, t0, MACS, s);
        let synack = decode(s.frames.last().unwrap());
        assert_eq!(synack.flags, flag::SYN | flag::ACK);
        let ack = segment(port, 6, Some(synack.seq.wrapping_add(1)), 0, b"", false);
        t.guest_seg(G.into(), R.into(), &ack, t0, MACS, reg, s);
        assert!(t.table.get(r.idx).unwrap().conn.has(conn::ev::ESTABLISHED));
        s.frames.clear();
        (r, synack.seq.wrapping_add(1))
    }

    #[test]
    fn a_run_of_data_segments_is_one_send_and_one_ack_at_the_end_of_the_batch() {
        let mut t = tcp(8);
        let (mut reg, mut s) = (Reg(vec![]), sink());
        let t0 = Instant::now();
        let (r, our) = establish(&mut t, 1000, t0, &mut reg, &mut s);
        // The frames stay in place until the batch ends, as the back-ends guarantee.
        let frames = [
            segment(1000, 6, Some(our), 0, b"abc", false),
            segment(1000, 9, Some(our), 0, b"defg", false),
            segment(1000, 13, Some(our), 0, b"hi", false),
        ];
        for f in &frames {
            t.guest_seg(G.into(), R.into(), f, t0, MACS, &mut reg, &mut s);
        }
        let sock = |t: &Tcp<FakeSock>| {
            let f = t.table.get(r.idx).unwrap();
            (f.sock.sent.clone(), f.sock.sends)
        };
        assert!(s.frames.is_empty(), "acknowledged before the batch ended");
        assert_eq!(sock(&t), (vec![], 0));
        t.end_batch(t0, MACS, &mut s);
        assert_eq!(sock(&t), (b"abcdefghi".to_vec(), 1));
        assert_eq!(s.frames.len(), 1);
        assert_eq!(decode(&s.frames[0]).ack, 15);
        // Nothing left for a second end.
        t.end_batch(t0, MACS, &mut s);
        assert_eq!((sock(&t).1, s.frames.len()), (1, 1));
    }

    #[test]
    fn runs_end_at_another_flow_or_a_gap_and_ack_only_what_the_socket_took() {
        let mut t = tcp(8);
        let (mut reg, mut s) = (Reg(vec![]), sink());
        let t0 = Instant::now();
        let (a, our_a) = establish(&mut t, 1000, t0, &mut reg, &mut s);
        let (b, our_b) = establish(&mut t, 2000, t0, &mut reg, &mut s);
        let frames = [
            segment(1000, 6, Some(our_a), 0, b"abc", false),
            segment(2000, 6, Some(our_b), 0, b"xyz", false),
            segment(1000, 9, Some(our_a), 0, b"de", false),
            segment(1000, 20, Some(our_a), 0, b"zz", false), // a gap: dropped
            segment(1000, 11, Some(our_a), 0, b"fghij", false),
        ];
        t.table.get_mut(a.idx).unwrap().sock.take_max = Some(3); // per send
        for f in &frames {
            t.guest_seg(G.into(), R.into(), f, t0, MACS, &mut reg, &mut s);
        }
        t.end_batch(t0, MACS, &mut s);
        let (fa, fb) = (t.table.get(a.idx).unwrap(), t.table.get(b.idx).unwrap());
        assert_eq!(
            (fa.sock.sent.as_slice(), fa.sock.sends),
            (&b"abcdefgh"[..], 3)
        );
        assert_eq!((fb.sock.sent.as_slice(), fb.sock.sends), (&b"xyz"[..], 1));
        let acks: Vec<(u16, u32)> = s
            .frames
            .iter()
            .map(|f| {
                let ((_, _), (_, port)) = ends_of(f);
                (port, decode(f).ack)
            })
            .collect();
        // A's first run, B's, A's second, the duplicate ACK for the gap, then A's third,
        // of which the socket took three bytes of five: the guest resends the rest.
        assert_eq!(
            acks,
            vec![(1000, 9), (2000, 9), (1000, 11), (1000, 11), (1000, 14)]
        );
    }

    #[test]
    fn rto_fires_at_its_deadline_and_only_due_flows_are_visited() {
        const IDLE: u16 = 10_000;
        let mut t = tcp(usize::from(IDLE) + 1);
        let (mut reg, mut s) = (Reg(vec![]), sink());
        let t0 = Instant::now();
        let (r, _) = establish(&mut t, 999, t0, &mut reg, &mut s);
        // Many flows with nothing due before their idle timeout (SYN sent, still connecting).
        for port in 1000..1000 + IDLE {
            let syn = segment(port, 5, None, flag::SYN, b"", false);
            t.guest_seg(G.into(), R.into(), &syn, t0, MACS, &mut reg, &mut s);
        }
        assert_eq!(t.active_flows(), usize::from(IDLE) + 1);
        t.table.get_mut(r.idx).unwrap().sock.rx.extend(b"hello");
        t.sock_ready(r, epoll::Events::EPOLLIN, t0, MACS, &mut s);
        let sent = decode(&s.frames[0]);
        assert_eq!(sent.payload, b"hello");
        s.frames.clear();
        assert_eq!(t.next_deadline(), Some(t0 + conn::RTO_INIT));
        // 10 ms ticks up to just before the deadline: nobody is visited.
        let mut now = t0;
        while now + ms(10) < t0 + conn::RTO_INIT {
            now += ms(10);
            t.timer(now, MACS, &mut s);
        }
        assert_eq!(t.stats().timer_visits, 0);
        assert!(s.frames.is_empty());
        // At the deadline: one visit, the retransmission.
        t.timer(t0 + conn::RTO_INIT, MACS, &mut s);
        assert_eq!(t.stats().timer_visits, 1);
        let again = decode(&s.frames[0]);
        assert_eq!(
            (again.seq, again.payload.as_slice()),
            (sent.seq, &b"hello"[..])
        );
        // Backed off: next at twice the interval.
        assert_eq!(t.next_deadline(), Some(t0 + 3 * conn::RTO_INIT));
    }

    #[test]
    fn clamped_window_is_polled_only_while_clamped() {
        let mut t = tcp(2);
        let (mut reg, mut s) = (Reg(vec![]), sink());
        let t0 = Instant::now();
        let (r, our_seq) = establish(&mut t, 1000, t0, &mut reg, &mut s);
        let r = (r, our_seq);
        let idle_deadline = t.next_deadline();
        assert!(
            idle_deadline.is_some_and(|d| d >= t0 + ms(1000)),
            "not polled"
        );
        // The send buffer is nearly full: the guest's data is acknowledged with a clamped
        // window, and the flow is looked at every WND_POLL.
        t.table.get_mut(r.0.idx).unwrap().sock.space = 1000;
        let data = segment(1000, 6, Some(r.1), 0, b"abc", false);
        t.guest_seg(G.into(), R.into(), &data, t0, MACS, &mut reg, &mut s);
        t.end_batch(t0, MACS, &mut s);
        let ack = decode(&s.frames[0]);
        assert_eq!((ack.ack, ack.wnd), (9, 1000));
        s.frames.clear();
        assert_eq!(t.next_deadline(), Some(t0 + conn::WND_POLL));
        // Still clamped: visited at each poll, no news for the guest.
        t.timer(t0 + conn::WND_POLL, MACS, &mut s);
        assert_eq!(t.stats().timer_visits, 1);
        assert!(s.frames.is_empty());
        assert_eq!(t.next_deadline(), Some(t0 + 2 * conn::WND_POLL));
        // Drained: the window update, and no more polling.
        t.table.get_mut(r.0.idx).unwrap().sock.space = 1 << 16;
        t.timer(t0 + 2 * conn::WND_POLL, MACS, &mut s);
        assert_eq!(t.stats().timer_visits, 2);
        assert_eq!(decode(&s.frames[0]).wnd, 65535);
        for i in 3..200 {
            t.timer(t0 + i * conn::WND_POLL, MACS, &mut s);
        }
        assert_eq!(t.stats().timer_visits, 2);
        assert!(t.next_deadline().is_some_and(|d| d >= t0 + ms(1000)));
    }

    #[test]
    fn idle_flows_time_out() {
        let mut t = tcp(2);
        let (mut reg, mut s) = (Reg(vec![]), sink());
        let t0 = Instant::now();
        establish(&mut t, 1000, t0, &mut reg, &mut s);
        // The SYN-ACK's retransmission deadline stays filed (the ACK only cleared it): one
        // early visit that finds nothing due and files the idle timeout.
        assert_eq!(t.next_deadline(), Some(t0 + conn::RTO_INIT));
        t.timer(t0 + conn::RTO_INIT, MACS, &mut s);
        assert!(s.frames.is_empty());
        assert_eq!(t.next_deadline(), Some(t0 + conn::ACT_TIMEOUT));
        t.timer(t0 + conn::ACT_TIMEOUT - ms(1), MACS, &mut s);
        assert_eq!((t.active_flows(), t.stats().timer_visits), (1, 1));
        t.timer(t0 + conn::ACT_TIMEOUT, MACS, &mut s);
        assert_eq!(t.active_flows(), 0);
        assert_eq!(t.stats().aborted, 1);
        assert_eq!(decode(&s.frames[0]).flags, flag::RST | flag::ACK);
        assert_eq!(t.next_deadline(), None, "nothing left to wake up for");
    }

    #[test]
    fn stale_socket_event_misses_the_slots_next_flow() {
        let mut t = tcp(1);
        let (mut reg, mut s) = (Reg(vec![]), sink());
        let t0 = Instant::now();
        let old = segment(1000, 5, None, flag::SYN, b"", false);
        t.guest_seg(G.into(), R.into(), &old, t0, MACS, &mut reg, &mut s);
        let rst = segment(1000, 6, None, flag::RST, b"", false);
        t.guest_seg(G.into(), R.into(), &rst, t0, MACS, &mut reg, &mut s);
        assert_eq!(t.active_flows(), 0);
        let new = segment(1001, 5, None, flag::SYN, b"", false);
        t.guest_seg(G.into(), R.into(), &new, t0, MACS, &mut reg, &mut s);
        assert_eq!(
            reg.0,
            vec![Token::TcpSock(fref(0, 0)), Token::TcpSock(fref(0, 1))]
        );
        // The old socket's event, from the same batch: not the new flow's business.
        t.sock_ready(fref(0, 0), epoll::Events::EPOLLOUT, t0, MACS, &mut s);
        assert!(s.frames.is_empty());
        assert_eq!(t.stats().stale_events, 1);
        t.sock_ready(fref(0, 1), epoll::Events::EPOLLOUT, t0, MACS, &mut s);
        assert_eq!(decode(&s.frames[0]).flags, flag::SYN | flag::ACK);
    }
}
