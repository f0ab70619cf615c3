//! One translated TCP connection, without I/O of its own: guest segments, socket readiness
//! and the clock go in; socket calls go out through [`SockOps`] and segments to the guest
//! through [`ToGuest`]. Tests drive it with a fake socket and a virtual clock.
//!
//! The state is a set of observed events ([`ev`]), not a state machine: each handler asks
//! "has the socket connected?", "has the guest sent its FIN?", and the connection is done
//! when both directions are.

use std::io::{self, ErrorKind};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use smoltcp::wire::{IpProtocol, TcpPacket};

use crate::tap::{BatchWriter, FrameWriter, SendBatch, SendWith, Tail, ToGuest, MAX_BATCH};
use crate::wire;

/// TCP header flags.
pub mod flag {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const PSH: u8 = 0x08;
    pub const ACK: u8 = 0x10;
}

/// Events seen on a connection.
pub mod ev {
    /// `connect()` completed: the SYN-ACK went to the guest.
    pub const SOCK_CONNECTED: u16 = 1 << 0;
    /// The guest acknowledged our SYN-ACK.
    pub const ESTABLISHED: u16 = 1 << 1;
    /// The guest's FIN arrived in order and the socket's write side is shut.
    pub const TAP_FIN_RCVD: u16 = 1 << 2;
    /// The socket reached end of stream and our FIN went to the guest.
    pub const TAP_FIN_SENT: u16 = 1 << 3;
    /// The guest acknowledged our FIN.
    pub const TAP_FIN_ACKED: u16 = 1 << 4;
    /// The window we last showed the guest was smaller than we would like: update it when
    /// the socket's send buffer drains.
    pub const WND_CLAMPED: u16 = 1 << 5;
    /// Accepted on a forwarded port: we sent the SYN, the guest answers with a SYN-ACK.
    pub const INBOUND: u16 = 1 << 6;
}

/// TCP header without options.
pub const TCP_HLEN: usize = 20;
/// Our window scale towards the guest (windows up to 16 MiB), if it offers scaling.
pub const WS_TO_TAP: u8 = 8;
/// MSS the guest gets to assume when it doesn't send the option (RFC 9293).
const DEFAULT_MSS: u16 = 536;
/// Initial retransmission timeout (RFC 6298), doubled on each expiry.
pub const RTO_INIT: Duration = Duration::from_secs(1);
/// Retransmissions of the same data before we give up and reset both sides.
pub const MAX_RETRANS: u8 = 6;
/// Duplicate ACKs that trigger a fast retransmission.
const DUP_ACK_THRESHOLD: u8 = 3;
/// A connection with no traffic for this long is reset.
pub const ACT_TIMEOUT: Duration = Duration::from_secs(7200);
/// A half-closed connection with no traffic for this long is reset.
pub const FIN_TIMEOUT: Duration = Duration::from_secs(60);
/// How often we look at the socket's send buffer while the window we show the guest is
/// clamped ([`ev::WND_CLAMPED`]), in case no EPOLLOUT edge comes
/// ([`SockOps::arm_write_space`]).
pub const WND_POLL: Duration = Duration::from_millis(10);
/// Largest header we emit: Ethernet + IPv6 + TCP with MSS and window scale options.
const HDR_MAX: usize = wire::ETH_HLEN + wire::IPV6_HLEN + TCP_HLEN + 8;

/// The host socket, as the connection logic sees it. Calls never block.
pub trait SockOps {
    /// Writes stream data gathered from `iov` (raw: they may point into guest memory);
    /// `Ok(n)` bytes taken, `WouldBlock` if none.
    fn send(&mut self, iov: &[libc::iovec]) -> io::Result<usize>;
    /// Copies up to `want` bytes of received data, starting `skip` bytes past the first
    /// unconsumed byte, to the start of `buf` (which may be used as scratch beyond that).
    /// `Ok(0)`: end of stream right there; `WouldBlock`: nothing more yet.
    fn peek(&mut self, skip: usize, want: usize, buf: &mut [u8]) -> io::Result<usize>;
    /// How much [`Self::peek`] may be asked for at `skip` with a buffer of `buf_len`.
    fn peek_limit(&self, skip: usize, buf_len: usize) -> usize;
    /// Like [`Self::peek`], but into raw iovecs (guest memory: see
    /// [`crate::tap::FrameWriter::payload`]), as much as they hold. `None` if this socket
    /// can't peek at an offset (no `SO_PEEK_OFF`): the caller peeks into its own buffer.
    fn peek_iov(&mut self, skip: usize, iov: &[libc::iovec]) -> Option<io::Result<usize>>;
    /// Drops `n` bytes the guest acknowledged from the front of the receive queue.
    fn consume(&mut self, n: usize) -> io::Result<()>;
    /// Shuts the write side down (our FIN to the peer).
    fn shutdown_write(&mut self) -> io::Result<()>;
    /// The send buffer: its free space, and whether anything waits in it.
    fn send_space(&mut self) -> SendSpace;
    /// Asks for an EPOLLOUT edge once the send buffer drains. The kernel signals space
    /// only to a socket it has seen full (`SOCK_NOSPACE`), and with the window we show
    /// the guest our sends never fail, so it would never see one; a zero-timeout poll
    /// makes it look. Without this, a guest that used up its window waits for
    /// [`WND_POLL`], and the send buffer, which grows when the kernel finds it full, stays
    /// small.
    fn arm_write_space(&mut self);
    /// The pending socket error, if any (clears it).
    fn take_error(&mut self) -> Option<io::Error>;
}

/// The socket's send buffer, as [`SockOps::send_space`] reports it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SendSpace {
    /// Free space, in bytes of payload.
    pub free: usize,
    /// Data waits in the buffer: only then can `free` grow without anything from the guest.
    pub queued: bool,
}

/// A segment from the guest, validated (checksum, lengths, flags).
#[derive(Debug, Clone, Copy)]
pub struct Seg<'a> {
    pub seq: u32,
    pub ack: Option<u32>,
    pub syn: bool,
    pub fin: bool,
    pub rst: bool,
    pub wnd: u16,
    pub mss: Option<u16>,
    pub ws: Option<u8>,
    pub payload: Payload<'a>,
}

/// A segment's data.
#[derive(Debug, Clone, Copy)]
pub enum Payload<'a> {
    /// One segment's: bytes we hold (copied out of the frame, or a whole private frame),
    /// then possibly a tail left in guest memory ([`Tail`]).
    Frame { head: &'a [u8], tail: Tail<'a> },
    /// A run of consecutive segments the table gathered into one ([`crate::tcp::Tcp`]'s
    /// batching): their payloads in order, as raw iovecs into frames that stay in place
    /// until the batch ends ([`crate::tap::FrameHandler::end_batch`]).
    Gathered { iov: &'a [libc::iovec], len: usize },
}

/// Most pieces a [`Payload::Frame`] is sent in: its head and a tail of up to
/// [`crate::tap::MAX_TAIL_IOV`] pieces.
const FRAME_PIECES: usize = 1 + crate::tap::MAX_TAIL_IOV;
const NO_IOV: libc::iovec = libc::iovec {
    iov_base: std::ptr::null_mut(),
    iov_len: 0,
};

impl<'a> Payload<'a> {
    pub fn len(&self) -> usize {
        match self {
            Payload::Frame { head, tail } => head.len() + tail.len,
            Payload::Gathered { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The data past its first `skip` bytes, as iovecs (a frame's built in `room`). `None`
    /// for a gathered run with `skip` > 0: runs start where the connection expects.
    fn iov_from<'b>(&'b self, skip: usize, room: &'b mut [libc::iovec]) -> Option<&'b [libc::iovec]>
    where
        'a: 'b,
    {
        let (head, tail) = match *self {
            Payload::Gathered { iov, .. } => return (skip == 0).then_some(iov),
            Payload::Frame { head, tail } => (head, tail),
        };
        let head = libc::iovec {
            iov_base: head.as_ptr().cast_mut().cast(),
            iov_len: head.len(),
        };
        let (mut skip, mut n) = (skip, 0);
        for mut v in std::iter::once(head).chain(tail.pieces()) {
            if skip >= v.iov_len {
                skip -= v.iov_len;
                continue;
            }
            v.iov_base = v.iov_base.wrapping_byte_add(skip);
            v.iov_len -= skip;
            skip = 0;
            let Some(slot) = room.get_mut(n) else {
                break; // more pieces than a chain may have: the rest is resent
            };
            *slot = v;
            n += 1;
        }
        Some(&room[..n])
    }
}

impl<'a> From<&'a [u8]> for Payload<'a> {
    fn from(head: &'a [u8]) -> Self {
        Payload::Frame {
            head,
            tail: Tail::default(),
        }
    }
}

/// Addresses of a connection as frames to the guest carry them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ends {
    pub guest: (IpAddr, u16),
    pub remote: (IpAddr, u16),
}

/// Where segments to the guest go: the back-end, the MACs to put on them, and scratch for
/// data peeked from sockets.
pub struct Out<'a> {
    pub to_guest: &'a mut dyn ToGuest,
    pub guest_mac: [u8; 6],
    pub our_mac: [u8; 6],
    pub buf: &'a mut [u8],
}

/// What the table should do with a connection after a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use]
pub enum Verdict {
    Keep,
    /// Both sides are done: close the socket normally.
    Close,
    /// Reset: close the socket abortively (RST to the peer, `SO_LINGER` 0). Any RST due to
    /// the guest has been sent already.
    Abort,
}

/// Signed distance from `b` to `a` in sequence space.
fn seq_diff(a: u32, b: u32) -> i32 {
    a.wrapping_sub(b) as i32
}

/// One connection. Sequence variables are named after the guest side ("tap"), as in passt:
/// `seq_to_tap` is the next sequence number we send to the guest, `seq_from_tap` the next
/// one we expect from it.
#[derive(Debug)]
pub struct Conn {
    pub ends: Ends,
    pub events: u16,
    /// Our initial sequence number (the SYN-ACK's).
    isn: u32,
    /// The window in the last segment we sent (set from `&self` emitters, hence a Cell).
    wnd_to_tap_sent: std::cell::Cell<u16>,
    seq_to_tap: u32,
    /// Highest sequence number sent so far (before any rewind).
    seq_max_to_tap: u32,
    /// Cumulative acknowledgement from the guest.
    seq_ack_from_tap: u32,
    seq_from_tap: u32,
    /// Sequence number of our FIN, once sent.
    seq_fin_to_tap: Option<u32>,
    /// The guest's receive window, in bytes (scaled).
    wnd_from_tap: u32,
    ws_from_tap: u8,
    ws_to_tap: u8,
    /// Segment size towards the guest.
    mss_to_tap: usize,
    /// MSS we announce: what fits the guest's link.
    mss_link: u16,
    dup_acks: u8,
    retrans: u8,
    rto: Option<Instant>,
    last_activity: Instant,
    /// Socket data waits for room towards the guest ([`SendWith::NoRoom`]).
    tap_blocked: bool,
}

impl Conn {
    /// A connection for the guest's SYN `syn`. `mss_link` is the largest segment that fits
    /// the guest's link (MTU and frame limits), `isn` our initial sequence number.
    pub fn new(ends: Ends, syn: &Seg, mss_link: u16, isn: u32, now: Instant) -> Conn {
        let ws_ok = syn.ws.is_some();
        let mss_guest = syn.mss.unwrap_or(DEFAULT_MSS).max(1);
        Conn {
            ends,
            events: 0,
            isn,
            wnd_to_tap_sent: std::cell::Cell::new(0),
            seq_to_tap: isn,
            seq_max_to_tap: isn,
            seq_ack_from_tap: isn,
            seq_from_tap: syn.seq.wrapping_add(1),
            seq_fin_to_tap: None,
            wnd_from_tap: u32::from(syn.wnd),
            ws_from_tap: if ws_ok {
                syn.ws.unwrap_or(0).min(14)
            } else {
                0
            },
            ws_to_tap: if ws_ok { WS_TO_TAP } else { 0 },
            mss_to_tap: usize::from(mss_guest.min(mss_link)),
            mss_link,
            dup_acks: 0,
            retrans: 0,
            rto: None,
            last_activity: now,
            tap_blocked: false,
        }
    }

    /// A connection accepted on a forwarded port, towards the guest: `isn` is our SYN's
    /// sequence number. The socket is connected already; the SYN goes out with
    /// [`Self::send_syn`].
    pub fn new_inbound(ends: Ends, mss_link: u16, isn: u32, now: Instant) -> Conn {
        Conn {
            ends,
            events: ev::SOCK_CONNECTED | ev::INBOUND,
            isn,
            wnd_to_tap_sent: std::cell::Cell::new(0),
            seq_to_tap: isn,
            seq_max_to_tap: isn,
            seq_ack_from_tap: isn,
            seq_from_tap: 0,
            seq_fin_to_tap: None,
            wnd_from_tap: 0,
            ws_from_tap: 0,
            // Offered in our SYN; dropped if the guest's SYN-ACK doesn't carry one.
            ws_to_tap: WS_TO_TAP,
            mss_to_tap: usize::from(DEFAULT_MSS.min(mss_link)),
            mss_link,
            dup_acks: 0,
            retrans: 0,
            rto: None,
            last_activity: now,
            tap_blocked: false,
        }
    }

    pub fn has(&self, e: u16) -> bool {
        self.events & e != 0
    }

    fn set(&mut self, e: u16) {
        self.events |= e;
    }

    /// Bytes sent to the guest and not acknowledged yet (a FIN counts one).
    pub fn in_flight(&self) -> u32 {
        self.seq_to_tap.wrapping_sub(self.seq_ack_from_tap)
    }

    /// The retransmission timeout, if data (or a SYN, a FIN) waits for the guest's ACK.
    pub fn deadline(&self) -> Option<Instant> {
        self.rto
    }

    /// Earliest time [`Self::timer`] has something to do for this connection, as of `now`:
    /// the retransmission timeout, the next look at the send buffer while the window is
    /// clamped, the idle or half-closed timeout. Valid until the next call into the
    /// connection.
    pub fn wakeup(&self, now: Instant) -> Instant {
        let half_closed = self.has(ev::TAP_FIN_RCVD) || self.has(ev::TAP_FIN_SENT);
        let idle = if half_closed {
            FIN_TIMEOUT
        } else {
            ACT_TIMEOUT
        };
        let mut at = self.last_activity + idle;
        if let Some(rto) = self.rto {
            at = at.min(rto);
        }
        if self.waits_for_window() {
            at = at.min(now + WND_POLL);
        }
        at
    }

    /// The socket is writable or failed before it connected: SYN-ACK or RST to the guest.
    pub fn sock_connected(
        &mut self,
        now: Instant,
        sock: &mut dyn SockOps,
        out: &mut Out,
    ) -> Verdict {
        if self.has(ev::SOCK_CONNECTED) {
            return Verdict::Keep;
        }
        if let Some(e) = sock.take_error() {
            log::debug!(
                "tcp: connect to {}:{} failed: {e}",
                self.ends.remote.0,
                self.ends.remote.1
            );
            self.rst_to_tap(out);
            return Verdict::Close;
        }
        self.set(ev::SOCK_CONNECTED);
        self.last_activity = now;
        self.send_syn(now, sock, out);
        Verdict::Keep
    }

    /// Our SYN (inbound) or SYN-ACK (outbound), with our MSS and window scale options.
    pub fn send_syn(&mut self, now: Instant, sock: &mut dyn SockOps, out: &mut Out) {
        let mut opts = [0u8; 8];
        opts[..4].copy_from_slice(&[2, 4, 0, 0]);
        opts[2..4].copy_from_slice(&self.mss_link.to_be_bytes());
        let olen = if self.ws_ok() {
            opts[4..8].copy_from_slice(&[1, 3, 3, self.ws_to_tap]);
            8
        } else {
            4
        };
        // The SYN-ACK's window is never scaled.
        let wnd = sock.send_space().free.min(usize::from(u16::MAX)) as u16;
        self.seq_to_tap = self.isn;
        let (flags, ack) = if self.has(ev::INBOUND) {
            (flag::SYN, 0)
        } else {
            (flag::SYN | flag::ACK, self.seq_from_tap)
        };
        self.emit(out, self.isn, ack, flags, wnd, &opts[..olen], &[]);
        self.seq_to_tap = self.isn.wrapping_add(1);
        self.seq_max_to_tap = self.seq_to_tap;
        self.rto.get_or_insert(now + self.rto_interval());
    }

    fn ws_ok(&self) -> bool {
        self.ws_to_tap > 0
    }

    /// A segment from the guest for this connection.
    pub fn tap_segment(
        &mut self,
        seg: &Seg,
        now: Instant,
        sock: &mut dyn SockOps,
        out: &mut Out,
    ) -> Verdict {
        self.last_activity = now;
        if seg.rst {
            return Verdict::Abort;
        }
        if !self.has(ev::SOCK_CONNECTED) {
            // Still connecting: a retransmitted SYN waits for the same answer.
            return Verdict::Keep;
        }
        if self.has(ev::INBOUND) && !self.has(ev::ESTABLISHED) {
            return self.tap_syn_ack(seg, now, sock, out);
        }
        if seg.syn {
            if !self.has(ev::ESTABLISHED) {
                // Our SYN-ACK was lost: send it again.
                self.send_syn(now, sock, out);
            } else {
                self.send_ack(out, sock);
            }
            return Verdict::Keep;
        }
        let Some(ack) = seg.ack else {
            // Only SYN and RST may come without ACK.
            return Verdict::Keep;
        };
        if !self.has(ev::ESTABLISHED) {
            if ack != self.isn.wrapping_add(1) {
                return Verdict::Keep;
            }
            self.set(ev::ESTABLISHED);
            self.seq_ack_from_tap = ack;
            self.rto = None;
            self.retrans = 0;
        }

        let mut ack_progress = false;
        let acked = seq_diff(ack, self.seq_ack_from_tap);
        if acked > 0 && seq_diff(ack, self.seq_max_to_tap) <= 0 {
            // Data bytes covered: the FIN, if any, takes the sequence number after them.
            let data_end = match self.seq_fin_to_tap {
                Some(fin) if seq_diff(ack, fin) > 0 => {
                    self.set(ev::TAP_FIN_ACKED);
                    fin
                }
                _ => ack,
            };
            let data = seq_diff(data_end, self.seq_ack_from_tap).max(0) as usize;
            if data > 0 {
                if let Err(e) = sock.consume(data) {
                    log::debug!("tcp: discarding acknowledged data failed: {e}");
                    self.rst_to_tap(out);
                    return Verdict::Abort;
                }
            }
            self.seq_ack_from_tap = ack;
            if seq_diff(ack, self.seq_to_tap) > 0 {
                // Acknowledges what we sent before a rewind.
                self.seq_to_tap = ack;
            }
            self.dup_acks = 0;
            self.retrans = 0;
            ack_progress = true;
        }
        let wnd = u32::from(seg.wnd) << self.ws_from_tap;
        if acked == 0
            && seg.payload.is_empty()
            && !seg.fin
            && wnd == self.wnd_from_tap
            && self.in_flight() > 0
        {
            self.dup_acks = self.dup_acks.saturating_add(1);
            if self.dup_acks == DUP_ACK_THRESHOLD {
                self.rewind();
            }
        }
        if acked >= 0 {
            self.wnd_from_tap = wnd;
        }
        if ack_progress || self.rto.is_some() {
            self.rto = (self.in_flight() > 0).then(|| now + self.rto_interval());
        }

        // Data and FIN, in order only: anything else gets a duplicate ACK.
        let mut ack_needed = false;
        let len = seg.payload.len();
        let off = seq_diff(self.seq_from_tap, seg.seq);
        let mut all_taken = true;
        if len > 0 {
            ack_needed = true;
            let mut room = [NO_IOV; FRAME_PIECES];
            match usize::try_from(off).ok().filter(|&o| o <= len) {
                None => all_taken = false,
                Some(_) if self.has(ev::TAP_FIN_RCVD) => {}
                Some(off) => match seg.payload.iov_from(off, &mut room) {
                    None => all_taken = false,
                    Some(iov) => {
                        let n = if off == len {
                            0
                        } else {
                            match sock.send(iov) {
                                Ok(n) => n,
                                Err(e) if e.kind() == ErrorKind::WouldBlock => 0,
                                Err(e) => {
                                    log::debug!("tcp: send to {} failed: {e}", self.ends.remote.0);
                                    self.rst_to_tap(out);
                                    return Verdict::Abort;
                                }
                            }
                        };
                        self.seq_from_tap = self.seq_from_tap.wrapping_add(n as u32);
                        all_taken = n == len - off;
                    }
                },
            }
        }
        if len == 0 && !seg.fin && seq_diff(seg.seq, self.seq_from_tap) < 0 {
            // Keepalive or zero-window probe (an old sequence number): answer with our
            // current ACK and window.
            ack_needed = true;
        }
        if seg.fin {
            ack_needed = true;
            let fin_seq = seg.seq.wrapping_add(len as u32);
            if all_taken && fin_seq == self.seq_from_tap && !self.has(ev::TAP_FIN_RCVD) {
                // Whether it fails or not, nothing more goes that way.
                let _ = sock.shutdown_write();
                self.seq_from_tap = self.seq_from_tap.wrapping_add(1);
                self.set(ev::TAP_FIN_RCVD);
            }
        }
        if ack_needed {
            self.send_ack(out, sock);
        }

        if let v @ (Verdict::Abort | Verdict::Close) = self.sock_to_tap(now, sock, out) {
            return v;
        }
        self.check_done()
    }

    /// The guest's answer to our SYN: a SYN-ACK completes the handshake; anything else
    /// waits for one (our SYN is retransmitted on timeout).
    fn tap_syn_ack(
        &mut self,
        seg: &Seg,
        now: Instant,
        sock: &mut dyn SockOps,
        out: &mut Out,
    ) -> Verdict {
        if !seg.syn || seg.ack != Some(self.isn.wrapping_add(1)) {
            return Verdict::Keep;
        }
        self.set(ev::ESTABLISHED);
        self.seq_from_tap = seg.seq.wrapping_add(1);
        self.seq_ack_from_tap = self.isn.wrapping_add(1);
        match seg.ws {
            Some(ws) => self.ws_from_tap = ws.min(14),
            None => {
                self.ws_from_tap = 0;
                self.ws_to_tap = 0;
            }
        }
        // The SYN-ACK's window is never scaled.
        self.wnd_from_tap = u32::from(seg.wnd);
        self.mss_to_tap = usize::from(seg.mss.unwrap_or(DEFAULT_MSS).max(1).min(self.mss_link));
        self.rto = None;
        self.retrans = 0;
        self.send_ack(out, sock);
        // The client may have sent data (or closed) while we waited.
        self.sock_to_tap(now, sock, out)
    }

    /// Whether in-order data starting at `seq` would go straight to the socket: what a
    /// gathered run ([`Payload::Gathered`]) may start with.
    pub fn takes_data_at(&self, seq: u32) -> bool {
        self.has(ev::ESTABLISHED) && !self.has(ev::TAP_FIN_RCVD) && seq == self.seq_from_tap
    }

    fn check_done(&self) -> Verdict {
        if self.has(ev::TAP_FIN_RCVD) && self.has(ev::TAP_FIN_ACKED) {
            Verdict::Close
        } else {
            Verdict::Keep
        }
    }

    /// Goes back to the first unacknowledged byte: everything after it is sent again,
    /// peeked from the socket where it still is.
    fn rewind(&mut self) {
        self.seq_to_tap = self.seq_ack_from_tap;
        if self
            .seq_fin_to_tap
            .is_some_and(|fin| seq_diff(fin, self.seq_to_tap) >= 0)
        {
            self.seq_fin_to_tap = None;
            self.events &= !ev::TAP_FIN_SENT;
        }
    }

    fn rto_interval(&self) -> Duration {
        RTO_INIT * (1u32 << self.retrans.min(6))
    }

    /// The socket reported readiness after connecting (`readable`: data, end of stream or
    /// an error to find out about; `writable`: send buffer space; `error`: EPOLLERR).
    pub fn sock_ready(
        &mut self,
        readable: bool,
        writable: bool,
        error: bool,
        now: Instant,
        sock: &mut dyn SockOps,
        out: &mut Out,
    ) -> Verdict {
        if !self.has(ev::SOCK_CONNECTED) {
            if readable || writable || error {
                return self.sock_connected(now, sock, out);
            }
            return Verdict::Keep;
        }
        if error {
            if let Some(e) = sock.take_error() {
                log::debug!("tcp: socket error from {}: {e}", self.ends.remote.0);
                self.rst_to_tap(out);
                return Verdict::Abort;
            }
        }
        if writable && self.has(ev::WND_CLAMPED) && self.has(ev::ESTABLISHED) {
            self.send_ack(out, sock);
        }
        if readable {
            return self.sock_to_tap(now, sock, out);
        }
        Verdict::Keep
    }

    /// Sends what the socket holds beyond what is in flight, as the guest's window allows;
    /// our FIN at end of stream.
    pub fn sock_to_tap(&mut self, now: Instant, sock: &mut dyn SockOps, out: &mut Out) -> Verdict {
        if !self.has(ev::ESTABLISHED) || self.has(ev::TAP_FIN_SENT) {
            return Verdict::Keep;
        }
        self.tap_blocked = false;
        match self.sock_to_tap_in_place(now, sock, out) {
            InPlace::Done(v) => return v,
            InPlace::Eof => return self.fin_to_tap(now, sock, out),
            InPlace::Unsupported => {}
        }
        loop {
            let in_flight = self.in_flight();
            if in_flight >= self.wnd_from_tap {
                // Window full or zero: the guest's next ACK or window update resumes us.
                break;
            }
            let skip = in_flight as usize;
            let want = ((self.wnd_from_tap - in_flight) as usize)
                .min(sock.peek_limit(skip, out.buf.len()));
            if want == 0 {
                break;
            }
            let n = match sock.peek(skip, want, out.buf) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::debug!("tcp: receive from {} failed: {e}", self.ends.remote.0);
                    self.rst_to_tap(out);
                    return Verdict::Abort;
                }
            };
            self.last_activity = now;
            if n == 0 {
                return self.fin_to_tap(now, sock, out);
            }
            let wnd = self.window_to_tap(sock);
            let mut sent = 0;
            let mut stalled = false;
            while sent < n {
                let chunk = (n - sent).min(self.mss_to_tap);
                let last = sent + chunk == n;
                let flags = flag::ACK | if last { flag::PSH } else { 0 };
                let (seq, ack) = (self.seq_to_tap, self.seq_from_tap);
                // Split borrow: the payload lives in out.buf, which emit doesn't touch.
                let payload_range = sent..sent + chunk;
                if !emit_split(self, out, seq, ack, flags, wnd, payload_range) {
                    stalled = true;
                    break;
                }
                self.seq_to_tap = self.seq_to_tap.wrapping_add(chunk as u32);
                if seq_diff(self.seq_to_tap, self.seq_max_to_tap) > 0 {
                    self.seq_max_to_tap = self.seq_to_tap;
                }
                sent += chunk;
            }
            self.rto.get_or_insert(now + self.rto_interval());
            // Until the socket says "no more": with edge-triggered events, data and the
            // end of stream arriving together are reported once.
            if stalled {
                break;
            }
        }
        Verdict::Keep
    }

    /// End of stream from the socket: our FIN.
    fn fin_to_tap(&mut self, now: Instant, sock: &mut dyn SockOps, out: &mut Out) -> Verdict {
        self.last_activity = now;
        let seq = self.seq_to_tap;
        let ack = self.seq_from_tap;
        let wnd = self.window_to_tap(sock);
        if self.emit(out, seq, ack, flag::FIN | flag::ACK, wnd, &[], &[]) {
            self.seq_fin_to_tap = Some(seq);
            self.seq_to_tap = seq.wrapping_add(1);
            self.seq_max_to_tap = self.seq_to_tap;
            self.set(ev::TAP_FIN_SENT);
        }
        self.rto.get_or_insert(now + self.rto_interval());
        Verdict::Keep
    }

    /// Socket data peeked straight into frames the back-end lends: one copy (kernel to
    /// guest memory in vhost-user mode). Back-ends that build several frames per call
    /// ([`ToGuest::batches`]) get up to [`MAX_BATCH`] segments per `recvmsg()`; the others
    /// one segment per frame ([`ToGuest::send_with`]).
    fn sock_to_tap_in_place(
        &mut self,
        now: Instant,
        sock: &mut dyn SockOps,
        out: &mut Out,
    ) -> InPlace {
        let wnd = self.window_to_tap(sock);
        let hdr_len = wire::l3_header_len(self.ends.guest.0.is_ipv6()) + TCP_HLEN;
        let batches = out.to_guest.batches();
        let mut sent_any = false;
        let verdict = loop {
            let in_flight = self.in_flight();
            if in_flight >= self.wnd_from_tap {
                break Verdict::Keep;
            }
            let budget = (self.wnd_from_tap - in_flight) as usize;
            let h = Header {
                seq: self.seq_to_tap,
                ack: self.seq_from_tap,
                flags: flag::ACK,
                wnd,
            };
            let frame = FrameInfo {
                guest_mac: out.guest_mac,
                our_mac: out.our_mac,
                src: self.ends.remote,
                dst: self.ends.guest,
                h,
            };
            let step = if batches {
                batch_step(
                    &mut *sock,
                    in_flight as usize,
                    budget,
                    self.mss_to_tap,
                    frame,
                    hdr_len,
                    out,
                )
            } else {
                frame_step(
                    &mut *sock,
                    in_flight as usize,
                    budget.min(self.mss_to_tap),
                    frame,
                    hdr_len,
                    out,
                )
            };
            match step.res {
                SendWith::Sent(n) => {
                    sent_any = true;
                    self.wnd_to_tap_sent.set(wnd);
                    self.last_activity = now;
                    self.seq_to_tap = self.seq_to_tap.wrapping_add(n as u32);
                    if seq_diff(self.seq_to_tap, self.seq_max_to_tap) > 0 {
                        self.seq_max_to_tap = self.seq_to_tap;
                    }
                    // Edge-triggered: new data is reported again, no need to ask now.
                    if step.drained {
                        break Verdict::Keep;
                    }
                }
                SendWith::NoRoom => {
                    self.tap_blocked = true;
                    break Verdict::Keep;
                }
                SendWith::Dropped => break Verdict::Keep,
                SendWith::Abandoned => match step.peeked {
                    None => return InPlace::Unsupported,
                    Some(Ok(0)) => {
                        if sent_any {
                            self.rto.get_or_insert(now + self.rto_interval());
                        }
                        return InPlace::Eof;
                    }
                    Some(Ok(_)) => break Verdict::Keep,
                    Some(Err(e)) if e.kind() == ErrorKind::WouldBlock => break Verdict::Keep,
                    Some(Err(e)) if e.kind() == ErrorKind::Interrupted => continue,
                    Some(Err(e)) => {
                        log::debug!("tcp: receive from {} failed: {e}", self.ends.remote.0);
                        self.rst_to_tap(out);
                        break Verdict::Abort;
                    }
                },
            }
        };
        if sent_any {
            self.rto.get_or_insert(now + self.rto_interval());
        }
        InPlace::Done(verdict)
    }

    /// Whether socket data waited for room towards the guest; clears it. The caller
    /// retries with [`Conn::sock_to_tap`].
    pub fn take_tap_blocked(&mut self) -> bool {
        std::mem::take(&mut self.tap_blocked)
    }

    /// Periodic work: retransmission timeout, window updates, idle and FIN timeouts.
    pub fn timer(&mut self, now: Instant, sock: &mut dyn SockOps, out: &mut Out) -> Verdict {
        let idle = now.saturating_duration_since(self.last_activity);
        let half_closed = self.has(ev::TAP_FIN_RCVD) || self.has(ev::TAP_FIN_SENT);
        if idle >= ACT_TIMEOUT || (half_closed && idle >= FIN_TIMEOUT) {
            self.rst_to_tap(out);
            return Verdict::Abort;
        }
        if self.rto.is_some_and(|d| now >= d) {
            self.retrans = self.retrans.saturating_add(1);
            if self.retrans > MAX_RETRANS {
                log::debug!(
                    "tcp: {}:{} gave up after {MAX_RETRANS} retransmissions",
                    self.ends.remote.0,
                    self.ends.remote.1
                );
                self.rst_to_tap(out);
                return Verdict::Abort;
            }
            self.rto = None;
            if !self.has(ev::SOCK_CONNECTED) {
                // The kernel is still connecting: its own timers cover that.
            } else if !self.has(ev::ESTABLISHED) {
                self.send_syn(now, sock, out);
            } else {
                self.rewind();
                if let v @ (Verdict::Abort | Verdict::Close) = self.sock_to_tap(now, sock, out) {
                    return v;
                }
                if self.in_flight() > 0 {
                    self.rto = Some(now + self.rto_interval());
                }
            }
        }
        if self.waits_for_window() {
            // Only a change is news to the guest.
            let (seq, ack) = (self.seq_to_tap, self.seq_from_tap);
            let wnd = self.window_to_tap(sock);
            if wnd != self.wnd_to_tap_sent.get() {
                self.emit(out, seq, ack, flag::ACK, wnd, &[], &[]);
            }
        }
        Verdict::Keep
    }

    /// Whether the guest sees a clamped window we should reopen as the socket drains.
    pub fn waits_for_window(&self) -> bool {
        self.has(ev::WND_CLAMPED) && self.has(ev::ESTABLISHED)
    }

    /// The window we show the guest: free space in the socket's send buffer, scaled.
    fn window_to_tap(&mut self, sock: &mut dyn SockOps) -> u16 {
        let max = usize::from(u16::MAX) << self.ws_to_tap;
        let SendSpace { free, queued } = sock.send_space();
        let space = free.min(max);
        // Below a few segments, the guest may stall waiting for us: update it when the
        // send buffer drains. With nothing queued nothing drains, and the guest's next data
        // brings us back here: a fresh socket's buffer is smaller than 4 segments at large
        // MTUs, and polling it (WND_POLL) made every idle flow cost CPU, 10,000 of them all
        // of it.
        if queued && space < (4 * usize::from(self.mss_link)).min(max / 2) {
            self.set(ev::WND_CLAMPED);
            sock.arm_write_space();
        } else {
            self.events &= !ev::WND_CLAMPED;
        }
        (space >> self.ws_to_tap) as u16
    }

    fn send_ack(&mut self, out: &mut Out, sock: &mut dyn SockOps) {
        let wnd = self.window_to_tap(sock);
        let (seq, ack) = (self.seq_to_tap, self.seq_from_tap);
        self.emit(out, seq, ack, flag::ACK, wnd, &[], &[]);
    }

    /// RST to the guest, as the remote end's reset would look.
    fn rst_to_tap(&mut self, out: &mut Out) {
        let (seq, ack) = (self.seq_to_tap, self.seq_from_tap);
        self.emit(out, seq, ack, flag::RST | flag::ACK, 0, &[], &[]);
    }

    #[allow(clippy::too_many_arguments)]
    fn emit(
        &self,
        out: &mut Out,
        seq: u32,
        ack: u32,
        flags: u8,
        wnd: u16,
        opts: &[u8],
        payload: &[u8],
    ) -> bool {
        self.wnd_to_tap_sent.set(wnd);
        emit_segment(
            out.to_guest,
            out.guest_mac,
            out.our_mac,
            self.ends.remote,
            self.ends.guest,
            Header {
                seq,
                ack,
                flags,
                wnd,
            },
            opts,
            payload,
        )
    }
}

/// Emits a data segment whose payload is `out.buf[range]`.
fn emit_split(
    conn: &Conn,
    out: &mut Out,
    seq: u32,
    ack: u32,
    flags: u8,
    wnd: u16,
    range: std::ops::Range<usize>,
) -> bool {
    conn.wnd_to_tap_sent.set(wnd);
    emit_segment(
        out.to_guest,
        out.guest_mac,
        out.our_mac,
        conn.ends.remote,
        conn.ends.guest,
        Header {
            seq,
            ack,
            flags,
            wnd,
        },
        &[],
        &out.buf[range],
    )
}

/// Sequence, acknowledgement, flags and window of a segment we build.
#[derive(Debug, Clone, Copy)]
pub struct Header {
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub wnd: u16,
}

/// Smallest segment worth a frame when the back-end has less room than a full one.
const MIN_SEG: usize = 536;

enum InPlace {
    Done(Verdict),
    Eof,
    /// The socket can't peek at an offset: use the copying path.
    Unsupported,
}

/// Addresses and header fields of the data segments one step builds.
#[derive(Clone, Copy)]
struct FrameInfo {
    guest_mac: [u8; 6],
    our_mac: [u8; 6],
    src: (IpAddr, u16),
    dst: (IpAddr, u16),
    /// The first segment's; later ones of a batch follow on in sequence.
    h: Header,
}

impl FrameInfo {
    /// Headers for `len` bytes summing to `payload_sum`, `offset` bytes into the step's
    /// data, pushed (PSH) if `push`.
    fn header(
        &self,
        hdr: &mut [u8],
        offset: usize,
        len: usize,
        payload_sum: u16,
        push: bool,
    ) -> bool {
        let mut h = self.h;
        h.seq = h.seq.wrapping_add(offset as u32);
        if push {
            h.flags |= flag::PSH;
        }
        build_header(
            hdr,
            self.guest_mac,
            self.our_mac,
            self.src,
            self.dst,
            h,
            &[],
            len,
            payload_sum,
        ) == Some(hdr.len())
    }
}

/// What one step of [`Conn::sock_to_tap_in_place`] did.
struct Step {
    /// As [`ToGuest::send_with`] reports it, for a batch too: `Sent(n)` with the bytes of
    /// all its segments (some may have been lost in the back-end, which counts them: the
    /// guest's ACKs then bring them back).
    res: SendWith,
    /// What the peek returned (`None`: not supported, or not called).
    peeked: Option<io::Result<usize>>,
    /// The peek returned less than the room: the socket has nothing more now.
    drained: bool,
}

/// One segment of up to `max` bytes, in a frame of its own ([`ToGuest::send_with`]).
fn frame_step(
    sock: &mut dyn SockOps,
    skip: usize,
    max: usize,
    frame: FrameInfo,
    hdr_len: usize,
    out: &mut Out,
) -> Step {
    let mut w = SegWriter {
        sock,
        skip,
        peeked: None,
        drained: false,
        frame,
    };
    let res = out
        .to_guest
        .send_with(hdr_len, max.min(MIN_SEG), max, &mut w);
    Step {
        res,
        peeked: w.peeked,
        drained: w.drained,
    }
}

/// One data segment built in place: the payload peeked into the frame's room, the header
/// written around it.
struct SegWriter<'a> {
    sock: &'a mut dyn SockOps,
    skip: usize,
    peeked: Option<io::Result<usize>>,
    drained: bool,
    frame: FrameInfo,
}

impl FrameWriter for SegWriter<'_> {
    fn payload(&mut self, room: &[libc::iovec]) -> Option<usize> {
        let res = self.sock.peek_iov(self.skip, room)?;
        let n = match &res {
            Ok(n) if *n > 0 => Some(*n),
            _ => None,
        };
        if let Some(n) = n {
            let cap: usize = room.iter().map(|v| v.iov_len).sum();
            self.drained = n < cap;
        }
        self.peeked = Some(res);
        n
    }

    fn header(&mut self, hdr: &mut [u8], len: usize, payload_sum: u16) -> bool {
        self.frame.header(hdr, 0, len, payload_sum, self.drained)
    }
}

/// Up to `budget` bytes in segments of up to `mss`, one frame each, peeked with one
/// `recvmsg()` ([`ToGuest::send_batch`]).
fn batch_step(
    sock: &mut dyn SockOps,
    skip: usize,
    budget: usize,
    mss: usize,
    frame: FrameInfo,
    hdr_len: usize,
    out: &mut Out,
) -> Step {
    let count = budget.div_ceil(mss.max(1)).min(MAX_BATCH);
    let mut w = SegBatch {
        sock,
        skip,
        budget,
        mss,
        peeked: None,
        drained: false,
        total: 0,
        got: 0,
        offs: [0; MAX_BATCH],
        iov: [NO_IOV; BATCH_IOV],
        frame,
    };
    let res = match out
        .to_guest
        .send_batch(hdr_len, mss.min(budget), mss, count, &mut w)
    {
        SendBatch::Sent { .. } => SendWith::Sent(w.total),
        SendBatch::NoRoom => SendWith::NoRoom,
        SendBatch::Dropped => SendWith::Dropped,
        SendBatch::Abandoned => SendWith::Abandoned,
    };
    Step {
        res,
        peeked: w.peeked,
        drained: w.drained,
    }
}

/// Most pieces of frame room one batch of segments is peeked into: a frame's room may
/// span several guest buffers (MRG_RXBUF).
const BATCH_IOV: usize = 8 * MAX_BATCH;

/// Consecutive data segments built in place, their payloads peeked with one call: each
/// frame's room cut to one segment, the stream's bytes filling the rooms in order.
struct SegBatch<'a> {
    sock: &'a mut dyn SockOps,
    skip: usize,
    /// Bytes the guest's window takes.
    budget: usize,
    mss: usize,
    peeked: Option<io::Result<usize>>,
    drained: bool,
    /// Bytes peeked, over all segments.
    total: usize,
    /// Segments with data, and where each starts in the data.
    got: usize,
    offs: [usize; MAX_BATCH],
    /// The rooms, cut to segments.
    iov: [libc::iovec; BATCH_IOV],
    frame: FrameInfo,
}

impl BatchWriter for SegBatch<'_> {
    fn payloads(&mut self, room: &[libc::iovec], ends: &[usize], lens: &mut [usize]) -> usize {
        let mut caps = [0usize; MAX_BATCH];
        let (mut at, mut prev, mut left, mut m) = (0, 0, self.budget, 0);
        for (i, &end) in ends.iter().enumerate().take(lens.len().min(MAX_BATCH)) {
            let end = end.clamp(prev, room.len());
            let mut want = self.mss.min(left);
            for v in &room[prev..end] {
                if want == 0 || at == BATCH_IOV {
                    break;
                }
                let k = v.iov_len.min(want);
                self.iov[at] = libc::iovec {
                    iov_base: v.iov_base,
                    iov_len: k,
                };
                (at, want, caps[i]) = (at + 1, want - k, caps[i] + k);
            }
            prev = end;
            if caps[i] == 0 {
                break;
            }
            left -= caps[i];
            m = i + 1;
            // A segment cut short by our array: the ones after it would not follow on.
            if left == 0 || at == BATCH_IOV {
                break;
            }
        }
        if m == 0 {
            return 0;
        }
        let res = self.sock.peek_iov(self.skip, &self.iov[..at]);
        let n = match res {
            Some(Ok(n)) if n > 0 => n,
            other => {
                self.peeked = other;
                return 0;
            }
        };
        self.peeked = Some(Ok(n));
        self.total = n;
        self.drained = n < caps[..m].iter().sum();
        let mut rest = n;
        for i in 0..m {
            if rest == 0 {
                break;
            }
            lens[i] = caps[i].min(rest);
            self.offs[i] = n - rest;
            rest -= lens[i];
            self.got = i + 1;
        }
        self.got
    }

    fn overflow(&self, _i: usize) -> &[u8] {
        // Each segment fits its room: the cut above.
        &[]
    }

    fn header(&mut self, i: usize, hdr: &mut [u8], len: usize, payload_sum: u16) -> bool {
        let Some(&off) = self.offs.get(i) else {
            return false;
        };
        let push = self.drained && i + 1 == self.got;
        self.frame.header(hdr, off, len, payload_sum, push)
    }
}

/// Writes Ethernet, IP and TCP headers (with `opts`, a multiple of 4 bytes, at most 8) for
/// a segment of `payload_len` bytes whose sum is `payload_sum`, complete checksums. Returns
/// the header length.
#[allow(clippy::too_many_arguments)]
fn build_header(
    hdr: &mut [u8],
    guest_mac: [u8; 6],
    our_mac: [u8; 6],
    src: (IpAddr, u16),
    dst: (IpAddr, u16),
    h: Header,
    opts: &[u8],
    payload_len: usize,
    payload_sum: u16,
) -> Option<usize> {
    let l3 = wire::l3_header_len(src.0.is_ipv6());
    let thlen = TCP_HLEN + opts.len();
    if opts.len() > 8 || opts.len() % 4 != 0 || hdr.len() < l3 + thlen {
        return None;
    }
    wire::emit_l3(
        &mut hdr[..l3],
        guest_mac,
        our_mac,
        src.0,
        dst.0,
        IpProtocol::Tcp,
        thlen + payload_len,
    )?;
    let tcp = &mut hdr[l3..l3 + thlen];
    {
        let mut p = TcpPacket::new_unchecked(&mut *tcp);
        p.set_src_port(src.1);
        p.set_dst_port(dst.1);
        p.set_seq_number(smoltcp::wire::TcpSeqNumber(h.seq as i32));
        p.set_ack_number(smoltcp::wire::TcpSeqNumber(h.ack as i32));
        p.set_header_len(thlen as u8);
        p.clear_flags();
        p.set_fin(h.flags & flag::FIN != 0);
        p.set_syn(h.flags & flag::SYN != 0);
        p.set_rst(h.flags & flag::RST != 0);
        p.set_psh(h.flags & flag::PSH != 0);
        p.set_ack(h.flags & flag::ACK != 0);
        p.set_window_len(h.wnd);
        p.set_urgent_at(0);
        p.set_checksum(0);
    }
    tcp[TCP_HLEN..].copy_from_slice(opts);
    let sum = wire::l4_checksum_with(src.0, dst.0, IpProtocol::Tcp, tcp, payload_len, payload_sum);
    tcp[16..18].copy_from_slice(&sum.to_be_bytes());
    Some(l3 + thlen)
}

/// Builds one segment from `src` to `dst` (Ethernet, IP, TCP with `opts`, whose length is
/// a multiple of 4 and at most 8) around `payload`, complete checksums, and queues it.
#[allow(clippy::too_many_arguments)]
pub fn emit_segment(
    to_guest: &mut dyn ToGuest,
    guest_mac: [u8; 6],
    our_mac: [u8; 6],
    src: (IpAddr, u16),
    dst: (IpAddr, u16),
    h: Header,
    opts: &[u8],
    payload: &[u8],
) -> bool {
    let mut hdr = [0u8; HDR_MAX];
    let sum = wire::PartialSum::of(payload).value();
    let Some(n) = build_header(
        &mut hdr,
        guest_mac,
        our_mac,
        src,
        dst,
        h,
        opts,
        payload.len(),
        sum,
    ) else {
        return false;
    };
    to_guest.send(&[&hdr[..n], payload])
}

#[cfg(test)]
#[allow(unused_must_use)] // steps whose verdict is Keep; the ones that matter are asserted
pub(crate) mod tests {
    use super::*;
    use smoltcp::wire::{EthernetFrame, IpAddress, Ipv4Packet, TcpRepr};
    use std::collections::VecDeque;

    /// A socket: what we sent, what the peer sent us (`rx`, from the first unconsumed
    /// byte), end of stream, send buffer space, a pending error.
    #[derive(Default)]
    pub struct FakeSock {
        pub sent: Vec<u8>,
        pub rx: VecDeque<u8>,
        pub eof: bool,
        pub space: usize,
        /// Nothing waits in the send buffer (default: something does).
        pub nothing_queued: bool,
        pub take_max: Option<usize>,
        pub error: Option<ErrorKind>,
        pub shut_wr: bool,
        /// Supports [`SockOps::peek_iov`].
        pub in_place: bool,
        /// Calls to [`SockOps::send`].
        pub sends: usize,
        /// Calls to [`SockOps::arm_write_space`].
        pub armed: usize,
        /// Calls to [`SockOps::peek_iov`].
        pub peeks: usize,
    }

    impl SockOps for FakeSock {
        fn send(&mut self, iov: &[libc::iovec]) -> io::Result<usize> {
            self.sends += 1;
            let mut room = self.take_max.unwrap_or(usize::MAX);
            let mut n = 0;
            for v in iov {
                let k = v.iov_len.min(room);
                // SAFETY: the tests' iovecs point at live buffers of their length.
                let data = unsafe { std::slice::from_raw_parts(v.iov_base as *const u8, k) };
                self.sent.extend_from_slice(data);
                (room, n) = (room - k, n + k);
            }
            if n == 0 {
                return Err(ErrorKind::WouldBlock.into());
            }
            Ok(n)
        }
        fn peek(&mut self, skip: usize, want: usize, buf: &mut [u8]) -> io::Result<usize> {
            if skip >= self.rx.len() {
                return if self.eof {
                    Ok(0)
                } else {
                    Err(ErrorKind::WouldBlock.into())
                };
            }
            let n = (self.rx.len() - skip).min(want);
            for (i, b) in self.rx.iter().skip(skip).take(n).enumerate() {
                buf[i] = *b;
            }
            Ok(n)
        }
        fn peek_limit(&self, _skip: usize, buf_len: usize) -> usize {
            buf_len
        }
        fn peek_iov(&mut self, skip: usize, iov: &[libc::iovec]) -> Option<io::Result<usize>> {
            if !self.in_place {
                return None;
            }
            self.peeks += 1;
            let mut n = 0;
            for v in iov {
                // SAFETY: the iovecs a back-end lends are valid for writes of their length.
                let dst =
                    unsafe { std::slice::from_raw_parts_mut(v.iov_base.cast::<u8>(), v.iov_len) };
                let k = self.rx.len().saturating_sub(skip + n).min(dst.len());
                for (i, b) in self.rx.iter().skip(skip + n).take(k).enumerate() {
                    dst[i] = *b;
                }
                n += k;
            }
            if n == 0 && !self.eof {
                return Some(Err(ErrorKind::WouldBlock.into()));
            }
            Some(Ok(n))
        }
        fn consume(&mut self, n: usize) -> io::Result<()> {
            assert!(n <= self.rx.len(), "consumed {n} of {}", self.rx.len());
            self.rx.drain(..n);
            Ok(())
        }
        fn shutdown_write(&mut self) -> io::Result<()> {
            self.shut_wr = true;
            Ok(())
        }
        fn send_space(&mut self) -> SendSpace {
            SendSpace {
                free: self.space,
                queued: !self.nothing_queued,
            }
        }
        fn arm_write_space(&mut self) {
            self.armed += 1;
        }
        fn take_error(&mut self) -> Option<io::Error> {
            self.error.take().map(io::Error::from)
        }
    }

    /// Frames to the guest, kept; `room` frames accepted before it reports drops.
    pub struct Sink {
        pub frames: Vec<Vec<u8>>,
        pub room: usize,
    }

    impl ToGuest for Sink {
        fn send(&mut self, parts: &[&[u8]]) -> bool {
            if self.room == 0 {
                return false;
            }
            self.room -= 1;
            self.frames.push(parts.concat());
            true
        }
        fn flush(&mut self) {}
    }

    /// A segment to the guest, decoded and checked (IPv4 here).
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Got {
        pub seq: u32,
        pub ack: u32,
        pub flags: u8,
        pub wnd: u16,
        pub mss: Option<u16>,
        pub ws: Option<u8>,
        pub payload: Vec<u8>,
    }

    pub fn decode(frame: &[u8]) -> Got {
        let eth = EthernetFrame::new_checked(frame).unwrap();
        let ip = Ipv4Packet::new_checked(eth.payload()).unwrap();
        assert!(ip.verify_checksum());
        let tcp = TcpPacket::new_checked(ip.payload()).unwrap();
        let (s, d) = (
            IpAddress::from(ip.src_addr()),
            IpAddress::from(ip.dst_addr()),
        );
        assert!(tcp.verify_checksum(&s, &d), "TCP checksum");
        let mut f = 0;
        for (b, v) in [
            (tcp.fin(), flag::FIN),
            (tcp.syn(), flag::SYN),
            (tcp.rst(), flag::RST),
            (tcp.psh(), flag::PSH),
            (tcp.ack(), flag::ACK),
        ] {
            if b {
                f |= v;
            }
        }
        let caps = smoltcp::phy::ChecksumCapabilities::default();
        let (mss, ws) = match TcpRepr::parse(&tcp, &s, &d, &caps) {
            Ok(r) => (r.max_seg_size, r.window_scale),
            Err(_) => (None, None), // RST|ACK etc. parse fine; SYN|RST never emitted
        };
        Got {
            seq: tcp.seq_number().0 as u32,
            ack: tcp.ack_number().0 as u32,
            flags: f,
            wnd: tcp.window_len(),
            mss,
            ws,
            payload: tcp.payload().to_vec(),
        }
    }

    const GUEST_ISN: u32 = 0xffff_fff0; // wraps during the tests
    const ISN: u32 = 1000;

    struct T {
        conn: Conn,
        sock: FakeSock,
        sink: Sink,
        /// If set, frames go here instead of `sink`.
        batch: Option<BatchSink>,
        buf: Vec<u8>,
        now: Instant,
    }

    impl T {
        fn out(&mut self) -> (Out<'_>, &mut Conn, &mut FakeSock) {
            let to_guest: &mut dyn ToGuest = match &mut self.batch {
                Some(b) => b,
                None => &mut self.sink,
            };
            (
                Out {
                    to_guest,
                    guest_mac: [2; 6],
                    our_mac: [3; 6],
                    buf: &mut self.buf,
                },
                &mut self.conn,
                &mut self.sock,
            )
        }
        fn seg(&mut self, s: Seg) -> Verdict {
            let now = self.now;
            let (mut out, conn, sock) = self.out();
            conn.tap_segment(&s, now, sock, &mut out)
        }
        fn ready(&mut self, r: bool, w: bool, e: bool) -> Verdict {
            let now = self.now;
            let (mut out, conn, sock) = self.out();
            conn.sock_ready(r, w, e, now, sock, &mut out)
        }
        fn timer(&mut self) -> Verdict {
            let now = self.now;
            let (mut out, conn, sock) = self.out();
            conn.timer(now, sock, &mut out)
        }
        fn take(&mut self) -> Vec<Got> {
            let frames = match &mut self.batch {
                Some(b) => &mut b.frames,
                None => &mut self.sink.frames,
            };
            frames.drain(..).map(|f| decode(&f)).collect()
        }
        /// An ACK from the guest for `ack` with `wnd` (scaled by 2^2 as negotiated).
        fn ack(&mut self, ack: u32, wnd: u16) -> Verdict {
            let seq = self.conn.seq_from_tap;
            self.seg(Seg {
                ack: Some(ack),
                wnd,
                ..data(seq, &[])
            })
        }
    }

    fn data(seq: u32, payload: &[u8]) -> Seg<'_> {
        Seg {
            seq,
            ack: None,
            syn: false,
            fin: false,
            rst: false,
            wnd: 1000,
            mss: None,
            ws: None,
            payload: payload.into(),
        }
    }

    fn ends() -> Ends {
        Ends {
            guest: ("192.0.2.2".parse().unwrap(), 40000),
            remote: ("198.51.100.1".parse().unwrap(), 80),
        }
    }

    /// A connection through SYN, connect, SYN-ACK, ACK; guest MSS 100, window scale 2,
    /// window 1000 << 2.
    fn established() -> T {
        let now = Instant::now();
        let syn = Seg {
            syn: true,
            mss: Some(100),
            ws: Some(2),
            wnd: 65535,
            ..data(GUEST_ISN, &[])
        };
        let mut t = T {
            conn: Conn::new(ends(), &syn, 1460, ISN, now),
            sock: FakeSock {
                space: 1 << 20,
                ..FakeSock::default()
            },
            sink: Sink {
                frames: vec![],
                room: usize::MAX,
            },
            batch: None,
            buf: vec![0; 4096],
            now,
        };
        assert_eq!(t.ready(false, true, false), Verdict::Keep);
        let got = t.take();
        assert_eq!(got.len(), 1);
        let sa = &got[0];
        assert_eq!(sa.flags, flag::SYN | flag::ACK);
        assert_eq!((sa.seq, sa.ack), (ISN, GUEST_ISN.wrapping_add(1)));
        assert_eq!((sa.mss, sa.ws), (Some(1460), Some(WS_TO_TAP)));
        assert_eq!(t.ack(ISN + 1, 1000), Verdict::Keep);
        assert!(t.conn.has(ev::ESTABLISHED));
        assert!(t.take().is_empty(), "a bare ACK isn't answered");
        t
    }

    fn guest_seq(t: &T) -> u32 {
        t.conn.seq_from_tap
    }

    #[test]
    fn handshake_without_window_scaling_and_connect_failure() {
        let now = Instant::now();
        let syn = Seg {
            syn: true,
            ..data(5, &[])
        };
        let mut t = T {
            conn: Conn::new(ends(), &syn, 1460, ISN, now),
            sock: FakeSock::default(),
            sink: Sink {
                frames: vec![],
                room: 10,
            },
            batch: None,
            buf: vec![0; 64],
            now,
        };
        // A retransmitted SYN while connecting: no answer yet.
        assert_eq!(t.seg(syn), Verdict::Keep);
        assert!(t.take().is_empty());
        t.sock.space = 100_000;
        assert_eq!(t.ready(false, true, false), Verdict::Keep);
        let sa = t.take();
        assert_eq!((sa[0].mss, sa[0].ws, sa[0].wnd), (Some(1460), None, 65535));
        // SYN again: the SYN-ACK again.
        assert_eq!(t.seg(syn), Verdict::Keep);
        assert_eq!(t.take()[0].flags, flag::SYN | flag::ACK);

        let mut t2 = T {
            conn: Conn::new(ends(), &syn, 1460, ISN, now),
            ..t
        };
        t2.sock.error = Some(ErrorKind::ConnectionRefused);
        assert_eq!(t2.ready(false, true, true), Verdict::Close);
        let rst = t2.take();
        assert_eq!(rst[0].flags, flag::RST | flag::ACK);
        assert_eq!(rst[0].ack, 6);
    }

    #[test]
    fn guest_data_acked_only_as_far_as_the_kernel_took_it() {
        let mut t = established();
        let s = guest_seq(&t);
        assert_eq!(
            t.seg(Seg {
                ack: Some(ISN + 1),
                ..data(s, b"hello")
            }),
            Verdict::Keep
        );
        assert_eq!(t.sock.sent, b"hello");
        let a = t.take();
        assert_eq!(a[0].ack, s.wrapping_add(5));
        assert_eq!(a[0].wnd, ((1usize << 20) >> WS_TO_TAP) as u16);
        // The kernel takes 3 of 6: only 3 are acknowledged, the window shrinks to the
        // send buffer's free space.
        t.sock.take_max = Some(3);
        t.sock.space = 1024;
        let s = guest_seq(&t);
        t.seg(Seg {
            ack: Some(ISN + 1),
            ..data(s, b"world!")
        });
        assert_eq!(t.sock.sent, b"hellowor");
        let a = t.take();
        assert_eq!(a[0].ack, s.wrapping_add(3));
        assert_eq!(a[0].wnd, 1024 >> WS_TO_TAP);
        assert!(t.conn.has(ev::WND_CLAMPED));
        assert!(t.sock.armed > 0, "no EPOLLOUT edge asked for");
        // The guest retransmits the whole segment: the overlap is skipped.
        t.sock.take_max = None;
        t.seg(Seg {
            ack: Some(ISN + 1),
            ..data(s, b"world!")
        });
        assert_eq!(t.sock.sent, b"helloworld!");
        // Out of order (a gap): not delivered, duplicate ACK.
        let s = guest_seq(&t);
        t.take();
        t.seg(Seg {
            ack: Some(ISN + 1),
            ..data(s.wrapping_add(10), b"later")
        });
        assert_eq!(t.sock.sent, b"helloworld!");
        assert_eq!(t.take()[0].ack, s);
        // Buffer drained: EPOLLOUT brings a window update.
        t.sock.space = 1 << 20;
        t.ready(false, true, false);
        let up = t.take();
        assert_eq!(up.len(), 1);
        assert_eq!(up[0].wnd, ((1usize << 20) >> WS_TO_TAP) as u16);
        assert!(!t.conn.has(ev::WND_CLAMPED));
    }

    #[test]
    fn small_empty_send_buffer_is_not_polled() {
        let mut t = established();
        // A fresh socket's buffer, below 4 segments, nothing in it: the window says so, but
        // nothing can reopen it by draining, so nothing waits for it.
        t.sock.space = 1024;
        t.sock.nothing_queued = true;
        let s = guest_seq(&t);
        t.seg(Seg {
            ack: Some(ISN + 1),
            ..data(s, b"x")
        });
        assert_eq!(t.take()[0].wnd, 1024 >> WS_TO_TAP);
        assert!(!t.conn.has(ev::WND_CLAMPED));
        assert_eq!(t.sock.armed, 0);
        assert_eq!(t.conn.wakeup(t.now), t.now + ACT_TIMEOUT);
        // Once data waits in it, the same window is clamped and watched.
        t.sock.nothing_queued = false;
        let s = guest_seq(&t);
        t.seg(Seg {
            ack: Some(ISN + 1),
            ..data(s, b"y")
        });
        assert!(t.conn.has(ev::WND_CLAMPED));
        assert!(t.sock.armed > 0);
        assert_eq!(t.conn.wakeup(t.now), t.now + WND_POLL);
    }

    #[test]
    fn host_data_segmented_to_mss_and_window_and_consumed_on_ack() {
        let mut t = established();
        t.sock.rx.extend((0..=255u8).cycle().take(5000));
        t.ready(true, false, false);
        let segs = t.take();
        // Window 1000 << 2 = 4000 bytes, MSS 100: 40 segments.
        assert_eq!(segs.len(), 40);
        assert!(segs
            .iter()
            .all(|g| g.payload.len() == 100 && g.flags & flag::ACK != 0));
        assert_eq!(segs[0].seq, ISN + 1);
        assert_eq!(segs[39].flags & flag::PSH, flag::PSH);
        let all: Vec<u8> = segs.iter().flat_map(|g| g.payload.clone()).collect();
        assert_eq!(
            all[..],
            t.sock.rx.iter().copied().take(4000).collect::<Vec<_>>()[..]
        );
        assert_eq!(
            t.sock.rx.len(),
            5000,
            "nothing consumed before the guest ACKs"
        );
        // ACK of 1000 bytes: consumed, and the window slides by as much.
        t.ack(ISN + 1 + 1000, 1000);
        assert_eq!(t.sock.rx.len(), 4000);
        let more = t.take();
        assert_eq!(more.len(), 10);
        assert_eq!(more[0].seq, ISN + 1 + 4000);
        assert_eq!(more[0].payload[0], (4000 % 256) as u8);
    }

    #[test]
    fn host_data_peeked_in_place_into_frames() {
        let mut t = established();
        t.sock.in_place = true;
        t.sock.rx.extend((0..=255u8).cycle().take(5000));
        t.ready(true, false, false);
        let segs = t.take();
        // Window 4000, MSS 100: 40 segments, each a peek into its own frame, checksums
        // over the payload as it landed (decode checks them).
        assert_eq!(segs.len(), 40);
        assert!(segs.iter().all(|g| g.payload.len() == 100));
        let all: Vec<u8> = segs.iter().flat_map(|g| g.payload.clone()).collect();
        assert_eq!(
            all[..],
            t.sock.rx.iter().copied().take(4000).collect::<Vec<_>>()[..]
        );
        assert_eq!(t.sock.rx.len(), 5000, "peeked, not consumed");
        // The rest after an ACK: 1000 bytes, then a short read of 50 is pushed.
        t.ack(ISN + 1 + 4000, 1000);
        let more = t.take();
        assert_eq!(more.len(), 10);
        assert_eq!(more[0].seq, ISN + 1 + 4000);
        t.sock.rx.extend([1u8; 50]);
        t.ready(true, false, false);
        let last = t.take();
        assert_eq!(last.len(), 1);
        assert_eq!(
            (last[0].payload.len(), last[0].flags & flag::PSH),
            (50, flag::PSH)
        );
        // End of stream: FIN right after the data.
        t.sock.eof = true;
        t.ready(true, false, false);
        let fin = t.take();
        assert_eq!(fin.len(), 1);
        assert_eq!(
            (fin[0].flags & flag::FIN, fin[0].seq),
            (flag::FIN, ISN + 1 + 5050)
        );
    }

    /// A back-end that builds several frames per call ([`ToGuest::send_batch`]), each
    /// frame's room made of pieces of `pieces` bytes (cycled): MRG_RXBUF buffers of odd
    /// sizes.
    struct BatchSink {
        frames: Vec<Vec<u8>>,
        pieces: Vec<usize>,
    }

    impl ToGuest for BatchSink {
        fn send(&mut self, parts: &[&[u8]]) -> bool {
            self.frames.push(parts.concat());
            true
        }
        fn flush(&mut self) {}
        fn batches(&self) -> bool {
            true
        }
        fn send_batch(
            &mut self,
            hdr_len: usize,
            size: usize,
            max_payload: usize,
            count: usize,
            w: &mut dyn BatchWriter,
        ) -> SendBatch {
            let mut k = 0;
            let mut rooms: Vec<Vec<Vec<u8>>> = (0..count)
                .map(|_| {
                    let mut msg = vec![];
                    while msg.iter().map(Vec::len).sum::<usize>() < size {
                        msg.push(vec![0u8; self.pieces[k % self.pieces.len()]]);
                        k += 1;
                    }
                    msg
                })
                .collect();
            let (mut iov, mut ends) = (vec![], vec![]);
            for piece in rooms.iter_mut().flatten() {
                iov.push(libc::iovec {
                    iov_base: piece.as_mut_ptr().cast(),
                    iov_len: piece.len(),
                });
            }
            for msg in &rooms {
                ends.push(ends.last().copied().unwrap_or(0) + msg.len());
            }
            let mut lens = vec![0; count];
            let got = w.payloads(&iov, &ends, &mut lens);
            if got == 0 {
                return SendBatch::Abandoned;
            }
            for (i, &len) in lens.iter().enumerate().take(got) {
                assert!(len <= max_payload && w.overflow(i).is_empty());
                let payload = rooms[i].concat()[..len].to_vec();
                let mut hdr = vec![0u8; hdr_len];
                assert!(w.header(i, &mut hdr, len, wire::PartialSum::of(&payload).value()));
                self.frames.push([hdr, payload].concat());
            }
            SendBatch::Sent {
                received: got,
                queued: got,
            }
        }
    }

    #[test]
    fn host_data_peeked_once_per_batch_of_frames() {
        let mut t = established();
        t.sock.in_place = true;
        t.batch = Some(BatchSink {
            frames: vec![],
            pieces: vec![60, 17, 300],
        });
        let data: Vec<u8> = (0..=255u8).cycle().take(5000).collect();
        t.sock.rx.extend(&data);
        t.ready(true, false, false);
        let segs = t.take();
        // Window 4000, MSS 100: 40 segments, in batches of MAX_BATCH, one peek each; each
        // segment cut from rooms of 60 + 17 + 300 bytes.
        assert_eq!(MAX_BATCH, 32);
        assert_eq!(t.sock.peeks, 2);
        assert_eq!(segs.len(), 40);
        for (i, g) in segs.iter().enumerate() {
            assert_eq!((g.seq, g.payload.len()), (ISN + 1 + 100 * i as u32, 100));
            assert_eq!(g.payload[..], data[100 * i..100 * (i + 1)]);
            assert_eq!(g.flags & flag::PSH, 0, "the window, not the data, ended it");
        }
        assert_eq!(t.sock.rx.len(), 5000, "peeked, not consumed");
        // The rest after an ACK: 1000 bytes in one batch, the last segment pushed.
        t.ack(ISN + 1 + 4000, 1000);
        let more = t.take();
        assert_eq!(t.sock.peeks, 3);
        assert_eq!(more.len(), 10);
        assert_eq!(more[0].seq, ISN + 1 + 4000);
        assert_eq!(more[9].payload[..], data[4900..]);
        assert_eq!(more[9].flags & flag::PSH, flag::PSH);
        // A short read: one segment, pushed; then end of stream: the FIN after it.
        t.sock.rx.extend([1u8; 50]);
        t.ready(true, false, false);
        let last = t.take();
        assert_eq!(
            (last.len(), last[0].payload.len(), last[0].flags & flag::PSH),
            (1, 50, flag::PSH)
        );
        t.sock.eof = true;
        t.ready(true, false, false);
        let fin = t.take();
        assert_eq!(
            (fin.len(), fin[0].flags & flag::FIN, fin[0].seq),
            (1, flag::FIN, ISN + 1 + 5050)
        );
    }

    /// A back-end without room for frames built in place.
    struct Full;
    impl ToGuest for Full {
        fn send(&mut self, _: &[&[u8]]) -> bool {
            false
        }
        fn flush(&mut self) {}
        fn send_with(&mut self, _: usize, _: usize, _: usize, _: &mut dyn FrameWriter) -> SendWith {
            SendWith::NoRoom
        }
    }

    #[test]
    fn no_room_keeps_data_in_the_socket_until_room_returns() {
        let mut t = established();
        t.sock.in_place = true;
        t.sock.rx.extend([7u8; 300]);
        let mut buf = vec![0u8; 64];
        let mut out = Out {
            to_guest: &mut Full,
            guest_mac: [2; 6],
            our_mac: [3; 6],
            buf: &mut buf,
        };
        assert_eq!(
            t.conn.sock_to_tap(t.now, &mut t.sock, &mut out),
            Verdict::Keep
        );
        assert_eq!(t.conn.in_flight(), 0, "nothing sent");
        assert!(t.conn.take_tap_blocked());
        assert!(!t.conn.take_tap_blocked(), "cleared");
        // Room again: the retry sends it all.
        t.ready(true, false, false);
        let segs = t.take();
        assert_eq!(segs.iter().map(|g| g.payload.len()).sum::<usize>(), 300);
        assert!(!t.conn.take_tap_blocked());
    }

    #[test]
    fn zero_window_stops_until_the_update() {
        let mut t = established();
        t.ack(ISN + 1, 0);
        t.sock.rx.extend([7u8; 300]);
        t.ready(true, false, false);
        assert!(t.take().is_empty(), "nothing goes into a zero window");
        // Window update (no new ACK): the data flows.
        t.ack(ISN + 1, 50);
        let segs = t.take();
        assert_eq!(segs.len(), 2);
        assert_eq!(segs.iter().map(|g| g.payload.len()).sum::<usize>(), 200);
        // Full again: a readable socket sends nothing more.
        t.ready(true, false, false);
        assert!(t.take().is_empty());
    }

    #[test]
    fn retransmission_on_timeout_then_give_up() {
        let mut t = established();
        t.sock.rx.extend([1u8; 250]);
        t.ready(true, false, false);
        assert_eq!(t.take().len(), 3);
        let deadline = t.conn.deadline().unwrap();
        t.now = deadline - Duration::from_millis(1);
        t.timer();
        assert!(t.take().is_empty(), "nothing before the deadline");
        t.now = deadline;
        t.timer();
        let again = t.take();
        assert_eq!(again.len(), 3, "everything unacknowledged, peeked again");
        assert_eq!(again[0].seq, ISN + 1);
        assert_eq!(t.sock.rx.len(), 250);
        // Backoff doubles; after MAX_RETRANS expiries both sides are reset.
        let mut v = Verdict::Keep;
        for _ in 0..MAX_RETRANS {
            t.now = t.conn.deadline().unwrap();
            v = t.timer();
        }
        assert_eq!(v, Verdict::Abort);
        let last = t.take();
        assert_eq!(last.last().unwrap().flags, flag::RST | flag::ACK);
    }

    #[test]
    fn fast_retransmission_on_duplicate_acks() {
        let mut t = established();
        t.sock.rx.extend([9u8; 300]);
        t.ready(true, false, false);
        assert_eq!(t.take().len(), 3);
        // The first segment arrived, the second was lost: the guest repeats ACK 101.
        t.ack(ISN + 1 + 100, 1000);
        assert!(t.take().is_empty());
        t.ack(ISN + 1 + 100, 1000);
        t.ack(ISN + 1 + 100, 1000);
        assert!(t.take().is_empty(), "two duplicates aren't enough");
        t.ack(ISN + 1 + 100, 1000);
        let re = t.take();
        assert_eq!(re.len(), 2);
        assert_eq!(re[0].seq, ISN + 1 + 100);
        // A late ACK covering everything sent before the rewind is fine.
        t.ack(ISN + 1 + 300, 1000);
        assert_eq!(t.conn.in_flight(), 0);
        assert!(t.sock.rx.is_empty());
        assert!(t.conn.deadline().is_none());
    }

    #[test]
    fn stalled_back_end_keeps_data_in_the_socket() {
        let mut t = established();
        t.sink.room = 1;
        t.sock.rx.extend([5u8; 300]);
        t.ready(true, false, false);
        assert_eq!(t.take().len(), 1);
        assert_eq!(t.conn.in_flight(), 100);
        t.sink.room = usize::MAX;
        t.now = t.conn.deadline().unwrap();
        t.timer();
        assert_eq!(t.take().len(), 3);
    }

    #[test]
    fn fin_from_guest_first() {
        let mut t = established();
        let s = guest_seq(&t);
        let v = t.seg(Seg {
            ack: Some(ISN + 1),
            fin: true,
            ..data(s, b"bye")
        });
        assert_eq!(v, Verdict::Keep);
        assert!(t.sock.shut_wr);
        assert_eq!(t.take()[0].ack, s.wrapping_add(4));
        // Data still comes the other way, then end of stream: FIN to the guest.
        t.sock.rx.extend(b"reply");
        t.sock.eof = true;
        t.ready(true, false, false);
        let g = t.take();
        assert_eq!(g.len(), 2);
        assert_eq!(g[0].payload, b"reply");
        assert_eq!(g[1].flags, flag::FIN | flag::ACK);
        assert_eq!(g[1].seq, ISN + 1 + 5);
        // Data acknowledged, FIN not yet: still open. Then the FIN's ACK closes it.
        assert_eq!(t.ack(ISN + 1 + 5, 1000), Verdict::Keep);
        assert_eq!(t.ack(ISN + 1 + 6, 1000), Verdict::Close);
        assert!(t.sock.rx.is_empty());
    }

    #[test]
    fn fin_from_socket_first_and_lost_fin_resent() {
        let mut t = established();
        t.sock.eof = true;
        t.ready(true, false, false);
        let g = t.take();
        assert_eq!(g[0].flags, flag::FIN | flag::ACK);
        // The guest keeps sending (half-close), its data still goes to the socket.
        let s = guest_seq(&t);
        t.seg(Seg {
            ack: Some(ISN + 1),
            ..data(s, b"more")
        });
        assert_eq!(t.sock.sent, b"more");
        assert_eq!(t.take()[0].ack, s.wrapping_add(4));
        // Our FIN unacknowledged past the timeout: sent again.
        t.now = t.conn.deadline().unwrap();
        t.timer();
        let g = t.take();
        assert_eq!(g[0].flags, flag::FIN | flag::ACK);
        assert_eq!(g[0].seq, ISN + 1);
        // The guest acknowledges it and sends its own FIN: done.
        let s = guest_seq(&t);
        let v = t.seg(Seg {
            ack: Some(ISN + 2),
            fin: true,
            ..data(s, &[])
        });
        assert_eq!(v, Verdict::Close);
        assert_eq!(t.take()[0].ack, s.wrapping_add(1));
    }

    #[test]
    fn keepalive_and_window_probes_are_answered() {
        let mut t = established();
        let s = guest_seq(&t);
        t.seg(Seg {
            ack: Some(ISN + 1),
            ..data(s.wrapping_sub(1), &[])
        });
        let g = t.take();
        assert_eq!(g.len(), 1);
        assert_eq!((g[0].flags, g[0].ack), (flag::ACK, s));
        // With one garbage byte, as some stacks send it: nothing reaches the socket.
        t.seg(Seg {
            ack: Some(ISN + 1),
            ..data(s.wrapping_sub(1), b"x")
        });
        assert_eq!(t.take()[0].ack, s);
        assert!(t.sock.sent.is_empty());
    }

    #[test]
    fn resets_both_ways() {
        let mut t = established();
        let s = guest_seq(&t);
        assert_eq!(
            t.seg(Seg {
                rst: true,
                ..data(s, &[])
            }),
            Verdict::Abort
        );
        assert!(t.take().is_empty(), "no answer to a RST");

        let mut t = established();
        t.sock.error = Some(ErrorKind::ConnectionReset);
        assert_eq!(t.ready(true, false, true), Verdict::Abort);
        let g = t.take();
        assert_eq!(g[0].flags, flag::RST | flag::ACK);
        assert_eq!(g[0].seq, ISN + 1);
    }

    #[test]
    fn idle_and_half_closed_timeouts() {
        let mut t = established();
        t.now += ACT_TIMEOUT - Duration::from_secs(1);
        assert_eq!(t.timer(), Verdict::Keep);
        t.now += Duration::from_secs(1);
        assert_eq!(t.timer(), Verdict::Abort);

        let mut t = established();
        let s = guest_seq(&t);
        t.seg(Seg {
            ack: Some(ISN + 1),
            fin: true,
            ..data(s, &[])
        });
        t.now += FIN_TIMEOUT;
        assert_eq!(t.timer(), Verdict::Abort);
    }

    fn inbound(data_waiting: &[u8]) -> T {
        let now = Instant::now();
        let mut t = T {
            conn: Conn::new_inbound(ends(), 1460, ISN, now),
            sock: FakeSock {
                space: 1 << 20,
                ..FakeSock::default()
            },
            sink: Sink {
                frames: vec![],
                room: usize::MAX,
            },
            batch: None,
            buf: vec![0; 4096],
            now,
        };
        t.sock.rx.extend(data_waiting);
        let (mut out, conn, sock) = t.out();
        conn.send_syn(now, sock, &mut out);
        let syn = t.take();
        assert_eq!(syn.len(), 1);
        assert_eq!((syn[0].flags, syn[0].seq), (flag::SYN, ISN));
        assert_eq!((syn[0].mss, syn[0].ws), (Some(1460), Some(WS_TO_TAP)));
        // Data from the client before the guest answered goes nowhere yet.
        assert_eq!(t.ready(true, true, false), Verdict::Keep);
        assert!(t.take().is_empty());
        t
    }

    #[test]
    fn inbound_handshake_then_data_both_ways() {
        let mut t = inbound(b"hello");
        // A bare ACK or a SYN-ACK for another SYN doesn't complete it.
        t.seg(Seg {
            ack: Some(ISN + 1),
            ..data(GUEST_ISN, &[])
        });
        t.seg(Seg {
            syn: true,
            ack: Some(ISN + 7),
            ..data(GUEST_ISN, &[])
        });
        assert!(!t.conn.has(ev::ESTABLISHED));
        assert!(t.take().is_empty());
        let v = t.seg(Seg {
            syn: true,
            ack: Some(ISN + 1),
            mss: Some(3),
            ws: Some(2),
            wnd: 1000,
            ..data(GUEST_ISN, &[])
        });
        assert_eq!(v, Verdict::Keep);
        assert!(t.conn.has(ev::ESTABLISHED));
        let g = t.take();
        assert_eq!(
            (g[0].flags, g[0].ack),
            (flag::ACK, GUEST_ISN.wrapping_add(1))
        );
        // The waiting data, in segments of the guest's MSS.
        let data_segs: Vec<_> = g[1..].iter().map(|s| s.payload.clone()).collect();
        assert_eq!(data_segs, vec![b"hel".to_vec(), b"lo".to_vec()]);
        assert_eq!(g[1].seq, ISN + 1);
        // Guest data goes to the socket; its ACK consumes what we sent.
        let s = guest_seq(&t);
        t.seg(Seg {
            ack: Some(ISN + 6),
            ..data(s, b"world")
        });
        assert_eq!(t.sock.sent, b"world");
        assert!(t.sock.rx.is_empty());
        assert_eq!(t.take()[0].ack, s.wrapping_add(5));
    }

    #[test]
    fn inbound_without_window_scaling() {
        let mut t = inbound(b"");
        t.seg(Seg {
            syn: true,
            ack: Some(ISN + 1),
            wnd: 300,
            ..data(GUEST_ISN, &[])
        });
        assert!(t.conn.has(ev::ESTABLISHED));
        assert_eq!(t.conn.ws_to_tap, 0);
        assert_eq!(t.conn.wnd_from_tap, 300);
        assert_eq!(t.conn.mss_to_tap, 536);
    }

    #[test]
    fn inbound_guest_refuses_or_never_answers() {
        let mut t = inbound(b"x");
        assert_eq!(
            t.seg(Seg {
                rst: true,
                ack: Some(ISN + 1),
                ..data(0, &[])
            }),
            Verdict::Abort
        );

        let mut t = inbound(b"x");
        let first = t.conn.deadline().unwrap();
        assert_eq!(first, t.now + RTO_INIT);
        let mut v = Verdict::Keep;
        let mut syns = 0;
        for _ in 0..=MAX_RETRANS {
            t.now = t.conn.deadline().unwrap();
            v = t.timer();
            syns += t.take().iter().filter(|g| g.flags == flag::SYN).count();
        }
        assert_eq!(
            syns,
            usize::from(MAX_RETRANS),
            "SYN sent again on each timeout"
        );
        assert_eq!(v, Verdict::Abort, "then the client is reset");
    }
}
