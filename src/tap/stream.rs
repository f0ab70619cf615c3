//! The stream back-end: QEMU's `-netdev stream` / `-net socket` protocol over a UNIX stream
//! socket. Each frame is a 4-byte big-endian length, then the Ethernet frame, no virtio
//! header.
//!
//! Reading: bytes accumulate in one buffer; every complete frame in it goes to the engine
//! in place, and a partial frame at the end moves to the front to wait for the rest. A
//! length below 14 (no Ethernet header) or above 65535 means we lost framing: the
//! connection is closed, since nothing after that point can be trusted to be a frame
//! boundary.
//!
//! Writing: frames to the guest are appended to an output buffer, flushed with one write per
//! batch. If the socket is full, what remains waits for `EPOLLOUT` ([`StreamTap::wants_write`]);
//! a frame that doesn't fit in the output buffer is dropped and counted, as a full NIC
//! queue would drop it: protocols above recover, and we never block the loop.

use std::io::{self, ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

use super::{
    BatchWriter, FrameHandler, FrameWriter, SendBatch, SendWith, ToGuest, ETH_MIN_FRAME, MAX_BATCH,
    MAX_HDR,
};
use crate::wire::PartialSum;

/// Ethernet header length: the shortest frame we accept from the guest.
const MIN_GUEST_FRAME: usize = 14;
/// Largest frame length the protocol's length field may carry for us.
const MAX_GUEST_FRAME: usize = 65535;
const LEN_BYTES: usize = 4;
/// Read buffer: several maximum-size frames per read.
const READ_BUF: usize = 4 * (MAX_GUEST_FRAME + LEN_BYTES);
/// Output buffer: what may wait for the socket to drain before frames are dropped.
const WRITE_BUF: usize = 8 << 20;

/// Counters of the stream back-end.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct StreamStats {
    pub frames_from_guest: u64,
    pub bytes_from_guest: u64,
    pub frames_to_guest: u64,
    pub bytes_to_guest: u64,
    pub dropped_to_guest: u64,
    pub bad_lengths: u64,
}

/// What happened to the connection while handling an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamEvent {
    /// Still connected.
    Open,
    /// The guest side closed or failed; the reason was logged.
    Closed,
}

/// The guest-bound half: the output buffer and the socket to flush it to.
struct Writer {
    sock: UnixStream,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    stats: StreamStats,
    broken: bool,
    /// An in-place frame was refused for lack of room: report room once it is back.
    starved: bool,
    /// A batch being built ([`ToGuest::send_batch`]).
    batch: Box<Batch>,
}

/// Per-frame state of one [`ToGuest::send_batch`], allocated once.
struct Batch {
    iov: Vec<libc::iovec>,
    ends: Vec<usize>,
    lens: [usize; MAX_BATCH],
    /// Where each frame kept goes (its length field), `None` for frames dropped.
    offs: [Option<usize>; MAX_BATCH],
    hdrs: Box<[[u8; MAX_HDR]]>,
}

impl Batch {
    fn new() -> Self {
        Batch {
            iov: Vec::with_capacity(MAX_BATCH),
            ends: Vec::with_capacity(MAX_BATCH),
            lens: [0; MAX_BATCH],
            offs: [None; MAX_BATCH],
            hdrs: vec![[0u8; MAX_HDR]; MAX_BATCH].into_boxed_slice(),
        }
    }
}

impl Writer {
    fn pending(&self) -> usize {
        self.end - self.start
    }

    fn room(&self) -> usize {
        self.buf.len() - self.pending()
    }

    /// Makes `need` contiguous bytes free at the end of the buffer, writing out and
    /// compacting as needed.
    fn make_room(&mut self, need: usize) -> bool {
        if self.buf.len() - self.end >= need {
            return true;
        }
        self.drain();
        if self.room() < need {
            return false;
        }
        self.buf.copy_within(self.start..self.end, 0);
        self.end -= self.start;
        self.start = 0;
        true
    }

    /// Writes out as much as the socket takes.
    fn drain(&mut self) {
        while self.pending() > 0 && !self.broken {
            match self.sock.write(&self.buf[self.start..self.end]) {
                Ok(0) => self.broken = true,
                Ok(n) => self.start += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    log::debug!("stream: write to guest failed: {e}");
                    self.broken = true;
                }
            }
        }
        if self.pending() == 0 {
            self.start = 0;
            self.end = 0;
        }
    }
}

impl ToGuest for Writer {
    fn send(&mut self, parts: &[&[u8]]) -> bool {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let padded = len.max(ETH_MIN_FRAME);
        if padded > MAX_GUEST_FRAME {
            self.stats.dropped_to_guest += 1;
            return false;
        }
        let need = LEN_BYTES + padded;
        if !self.make_room(need) {
            self.stats.dropped_to_guest += 1;
            return false;
        }
        let mut at = self.end;
        self.buf[at..at + LEN_BYTES].copy_from_slice(&(padded as u32).to_be_bytes());
        at += LEN_BYTES;
        for p in parts {
            self.buf[at..at + p.len()].copy_from_slice(p);
            at += p.len();
        }
        self.buf[at..self.end + need].fill(0);
        self.end += need;
        self.stats.frames_to_guest += 1;
        self.stats.bytes_to_guest += len as u64;
        true
    }

    fn flush(&mut self) {
        self.drain();
    }

    /// Room in the output buffer, after the length field: the payload is written where the
    /// frame will be sent from, so the kernel copies it once into this buffer.
    fn send_with(
        &mut self,
        hdr_len: usize,
        min_payload: usize,
        max_payload: usize,
        w: &mut dyn FrameWriter,
    ) -> SendWith {
        let Some(room) = super::payload_room(hdr_len, min_payload, max_payload) else {
            self.stats.dropped_to_guest += 1;
            return SendWith::Dropped;
        };
        let room = room.min(MAX_GUEST_FRAME - hdr_len);
        let need = LEN_BYTES + (hdr_len + room).max(ETH_MIN_FRAME);
        if !self.make_room(need) {
            self.starved = true;
            return SendWith::NoRoom;
        }
        let at = self.end + LEN_BYTES;
        let payload = &mut self.buf[at + hdr_len..at + hdr_len + room];
        let iov = [libc::iovec {
            iov_base: payload.as_mut_ptr().cast(),
            iov_len: payload.len(),
        }];
        let Some(len) = w.payload(&iov) else {
            return SendWith::Abandoned;
        };
        let len = len.min(room);
        let sum = PartialSum::of(&self.buf[at + hdr_len..at + hdr_len + len]);
        let mut hdr = [0u8; MAX_HDR];
        if !w.header(&mut hdr[..hdr_len], len, sum.value()) {
            self.stats.dropped_to_guest += 1;
            return SendWith::Dropped;
        }
        self.buf[at..at + hdr_len].copy_from_slice(&hdr[..hdr_len]);
        let frame = hdr_len + len;
        let padded = frame.max(ETH_MIN_FRAME);
        self.buf[at + frame..at + padded].fill(0);
        self.buf[self.end..at].copy_from_slice(&(padded as u32).to_be_bytes());
        self.end = at + padded;
        self.stats.frames_to_guest += 1;
        self.stats.bytes_to_guest += frame as u64;
        SendWith::Sent(len)
    }

    /// Slots in the output buffer, one per message, each sized for `size` bytes of payload:
    /// uniform datagrams land exactly where they are sent from. A datagram of another size
    /// shifts the frames after it (one move each, see [`place`]); the part of a longer one
    /// beyond its slot is copied from the writer's overflow.
    fn send_batch(
        &mut self,
        hdr_len: usize,
        size: usize,
        max_payload: usize,
        count: usize,
        w: &mut dyn BatchWriter,
    ) -> SendBatch {
        // What the protocol's length field can carry.
        let max_payload = max_payload.min(MAX_GUEST_FRAME.saturating_sub(hdr_len));
        let size = size.min(max_payload);
        if super::payload_room(hdr_len, size, size).is_none() {
            self.stats.dropped_to_guest += 1;
            return SendBatch::Dropped;
        }
        // A slot: length field, headers, payload room (at least the padding of a short
        // frame).
        let room = size.max(ETH_MIN_FRAME.saturating_sub(hdr_len));
        let slot = LEN_BYTES + hdr_len + room;
        if !self.make_room(slot) {
            self.starved = true;
            return SendBatch::NoRoom;
        }
        let n = count
            .clamp(1, MAX_BATCH)
            .min((self.buf.len() - self.end) / slot);
        let b = &mut self.batch;
        b.iov.clear();
        b.ends.clear();
        for i in 0..n {
            let at = self.end + i * slot + LEN_BYTES + hdr_len;
            b.iov.push(libc::iovec {
                iov_base: self.buf[at..].as_mut_ptr().cast(),
                iov_len: room,
            });
            b.ends.push(i + 1);
        }
        let got = w.payloads(&b.iov, &b.ends, &mut b.lens[..n]).min(n);
        if got == 0 {
            return SendBatch::Abandoned;
        }
        // Which frames stay, and their headers, summed where the payloads are now.
        let payload_at = |i: usize| self.end + i * slot + LEN_BYTES + hdr_len;
        let mut end = self.end;
        for i in 0..got {
            b.offs[i] = None;
            let len = b.lens[i];
            if len > max_payload {
                // Too big: the writer knows from the length.
                continue;
            }
            let in_place = len.min(room);
            let tail = w.overflow(i);
            let at = payload_at(i);
            let mut sum = PartialSum::of(&self.buf[at..at + in_place]);
            sum.add(tail);
            let frame = LEN_BYTES + (hdr_len + len).max(ETH_MIN_FRAME);
            if tail.len() != len - in_place
                || end + frame > self.buf.len()
                || !w.header(i, &mut b.hdrs[i][..hdr_len], len, sum.value())
            {
                self.stats.dropped_to_guest += 1;
                continue;
            }
            b.offs[i] = Some(end);
            end += frame;
        }
        let moves = (0..got).map(|i| {
            let dst = b.offs[i].map(|o| o + LEN_BYTES + hdr_len);
            (payload_at(i), dst, b.lens[i].min(room))
        });
        place(&mut self.buf, moves);
        let mut queued = 0;
        for i in 0..got {
            let Some(at) = b.offs[i] else {
                continue;
            };
            let len = b.lens[i];
            let frame = hdr_len + len;
            let padded = frame.max(ETH_MIN_FRAME);
            let f = &mut self.buf[at..at + LEN_BYTES + padded];
            f[..LEN_BYTES].copy_from_slice(&(padded as u32).to_be_bytes());
            f[LEN_BYTES..LEN_BYTES + hdr_len].copy_from_slice(&b.hdrs[i][..hdr_len]);
            let tail_at = LEN_BYTES + hdr_len + len.min(room);
            f[tail_at..LEN_BYTES + frame].copy_from_slice(w.overflow(i));
            f[LEN_BYTES + frame..].fill(0);
            self.stats.frames_to_guest += 1;
            self.stats.bytes_to_guest += frame as u64;
            queued += 1;
        }
        self.end = end;
        SendBatch::Sent {
            received: got,
            queued,
        }
    }

    fn batches(&self) -> bool {
        true
    }

    /// Room is back once a maximum frame fits again.
    fn room_returned(&mut self) -> bool {
        if self.starved && !self.broken && self.room() >= LEN_BYTES + MAX_GUEST_FRAME {
            self.starved = false;
            return true;
        }
        false
    }
}

/// Moves payloads within `buf`: `(from, to, len)` in the order of their slots, `to`
/// increasing too (frames keep their order), `None` for payloads dropped. As in `memmove`,
/// nothing may be overwritten before it has moved: payloads moving towards the end go
/// first, last one first (each lands beyond the slots of those before it, and before the
/// destinations, hence the sources, of those after it that move back), then those moving
/// towards the start, first one first.
fn place(
    buf: &mut [u8],
    moves: impl DoubleEndedIterator<Item = (usize, Option<usize>, usize)> + Clone,
) {
    for (from, to, len) in moves.clone().rev() {
        if let Some(to) = to.filter(|&to| to > from) {
            buf.copy_within(from..from + len, to);
        }
    }
    for (from, to, len) in moves {
        if let Some(to) = to.filter(|&to| to < from) {
            buf.copy_within(from..from + len, to);
        }
    }
}

/// One connected stream client (QEMU).
pub struct StreamTap {
    rbuf: Box<[u8]>,
    rlen: usize,
    writer: Writer,
}

impl StreamTap {
    /// Takes a connected socket; makes it non-blocking.
    pub fn new(sock: UnixStream) -> io::Result<Self> {
        sock.set_nonblocking(true)?;
        Ok(StreamTap {
            rbuf: vec![0; READ_BUF].into_boxed_slice(),
            rlen: 0,
            writer: Writer {
                sock,
                buf: vec![0; WRITE_BUF].into_boxed_slice(),
                start: 0,
                end: 0,
                stats: StreamStats::default(),
                broken: false,
                starved: false,
                batch: Box::new(Batch::new()),
            },
        })
    }

    pub fn socket(&self) -> &UnixStream {
        &self.writer.sock
    }

    pub fn stats(&self) -> StreamStats {
        self.writer.stats
    }

    /// Whether output waits for the socket: watch `EPOLLOUT` while this holds.
    pub fn wants_write(&self) -> bool {
        self.writer.pending() > 0
    }

    /// Whether the client has hung up, even if that event wasn't processed yet: a new
    /// client may arrive in the same batch as the old one's hang-up.
    pub fn hung_up(&self) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.writer.sock.as_raw_fd(),
            events: libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: one valid pollfd, zero timeout; nix's PollFlags lacks POLLRDHUP.
        let n = unsafe { libc::poll(&mut pfd, 1, 0) };
        n == 1 && pfd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
    }

    /// The guest-bound side, for frames the engine originates.
    pub fn to_guest(&mut self) -> &mut dyn ToGuest {
        &mut self.writer
    }

    /// The socket is writable: continue flushing.
    pub fn handle_writable(&mut self) -> StreamEvent {
        self.writer.drain();
        self.state()
    }

    fn state(&self) -> StreamEvent {
        if self.writer.broken {
            StreamEvent::Closed
        } else {
            StreamEvent::Open
        }
    }

    /// The socket is readable: read what is there and hand every complete frame to
    /// `engine`. Reads until the socket would block, so edge- and level-triggered epoll both
    /// work; replies are flushed once at the end.
    pub fn handle_readable(&mut self, engine: &mut dyn FrameHandler) -> StreamEvent {
        loop {
            match self.writer.sock.read(&mut self.rbuf[self.rlen..]) {
                Ok(0) => {
                    log::info!("stream: client disconnected");
                    return StreamEvent::Closed;
                }
                Ok(n) => {
                    self.rlen += n;
                    if !self.deliver(engine) {
                        self.writer.flush();
                        return StreamEvent::Closed;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    log::info!("stream: client connection failed: {e}");
                    return StreamEvent::Closed;
                }
            }
        }
        self.writer.flush();
        self.state()
    }

    /// Hands complete frames to the engine; keeps a trailing partial frame. Returns false if
    /// framing was lost.
    fn deliver(&mut self, engine: &mut dyn FrameHandler) -> bool {
        let mut at = 0;
        while self.rlen - at >= LEN_BYTES {
            let mut len_bytes = [0u8; LEN_BYTES];
            len_bytes.copy_from_slice(&self.rbuf[at..at + LEN_BYTES]);
            let len = u32::from_be_bytes(len_bytes) as usize;
            if !(MIN_GUEST_FRAME..=MAX_GUEST_FRAME).contains(&len) {
                self.writer.stats.bad_lengths += 1;
                log::warn!("stream: bad frame length {len} from the guest, closing the connection");
                return false;
            }
            if self.rlen - at < LEN_BYTES + len {
                break;
            }
            let frame = &self.rbuf[at + LEN_BYTES..at + LEN_BYTES + len];
            self.writer.stats.frames_from_guest += 1;
            self.writer.stats.bytes_from_guest += len as u64;
            engine.handle_frame(frame, &mut self.writer);
            at += LEN_BYTES + len;
        }
        // Before the compaction below moves the frames' bytes.
        engine.end_batch(&mut self.writer);
        self.rbuf.copy_within(at..self.rlen, 0);
        self.rlen -= at;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records frames and answers each with a copy of itself; keeps raw pointers to the
    /// frames of a batch, as a handler gathering payloads would, and checks them at its end.
    #[derive(Default)]
    struct Echo {
        seen: Vec<Vec<u8>>,
        held: Vec<(*const u8, usize)>,
        /// Frames seen when each batch ended.
        batches: Vec<usize>,
    }

    impl FrameHandler for Echo {
        fn handle_frame(&mut self, frame: &[u8], to_guest: &mut dyn ToGuest) {
            self.seen.push(frame.to_vec());
            self.held.push((frame.as_ptr(), frame.len()));
            assert!(to_guest.send(&[&frame[..7], &frame[7..]]));
        }

        fn end_batch(&mut self, _: &mut dyn ToGuest) {
            let first = self.seen.len() - self.held.len();
            for (k, (ptr, len)) in self.held.drain(..).enumerate() {
                // SAFETY: frames stay in place until their batch ends.
                let now = unsafe { std::slice::from_raw_parts(ptr, len) };
                assert!(
                    now == self.seen[first + k],
                    "a frame moved before its batch ended"
                );
            }
            self.batches.push(self.seen.len());
        }
    }

    fn framed(frame: &[u8]) -> Vec<u8> {
        let mut v = (frame.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(frame);
        v
    }

    fn read_framed(sock: &mut UnixStream) -> Vec<u8> {
        let mut len = [0u8; 4];
        sock.read_exact(&mut len).unwrap();
        let mut frame = vec![0u8; u32::from_be_bytes(len) as usize];
        sock.read_exact(&mut frame).unwrap();
        frame
    }

    #[test]
    fn reassembles_split_frames_and_pads_replies() {
        let (ours, mut qemu) = UnixStream::pair().unwrap();
        let mut tap = StreamTap::new(ours).unwrap();
        let mut echo = Echo::default();
        let a: Vec<u8> = (0..20u8).collect();
        let b: Vec<u8> = (0..100u8).collect();
        let mut bytes = framed(&a);
        bytes.extend(framed(&b));
        // The first frame whole plus 3 bytes of the second's length, then the rest.
        qemu.write_all(&bytes[..4 + 20 + 3]).unwrap();
        assert_eq!(tap.handle_readable(&mut echo), StreamEvent::Open);
        assert_eq!(echo.seen, vec![a.clone()]);
        qemu.write_all(&bytes[4 + 20 + 3..]).unwrap();
        assert_eq!(tap.handle_readable(&mut echo), StreamEvent::Open);
        assert_eq!(echo.seen, vec![a.clone(), b.clone()]);
        assert_eq!(echo.batches, vec![1, 2], "one batch per read");

        let reply = read_framed(&mut qemu);
        assert_eq!(reply.len(), ETH_MIN_FRAME);
        assert_eq!(&reply[..20], &a[..]);
        assert!(reply[20..].iter().all(|&x| x == 0));
        assert_eq!(read_framed(&mut qemu), b);
        let s = tap.stats();
        assert_eq!(
            (s.frames_from_guest, s.frames_to_guest, s.bytes_from_guest),
            (2, 2, 120)
        );
    }

    #[test]
    fn bad_lengths_close_the_connection() {
        for len in [0u32, 13, 65536, u32::MAX] {
            let (ours, mut qemu) = UnixStream::pair().unwrap();
            let mut tap = StreamTap::new(ours).unwrap();
            let mut echo = Echo::default();
            let mut bytes = framed(&[1u8; 14]);
            bytes.extend(len.to_be_bytes());
            bytes.extend([0u8; 32]);
            qemu.write_all(&bytes).unwrap();
            assert_eq!(
                tap.handle_readable(&mut echo),
                StreamEvent::Closed,
                "length {len}"
            );
            assert_eq!(echo.seen.len(), 1, "the good frame before it still counts");
            assert_eq!(tap.stats().bad_lengths, 1);
        }
    }

    #[test]
    fn peer_close_is_reported() {
        let (ours, qemu) = UnixStream::pair().unwrap();
        let mut tap = StreamTap::new(ours).unwrap();
        drop(qemu);
        assert_eq!(
            tap.handle_readable(&mut Echo::default()),
            StreamEvent::Closed
        );
    }

    #[test]
    fn full_socket_keeps_output_then_drops_beyond_the_buffer() {
        let (ours, mut qemu) = UnixStream::pair().unwrap();
        let mut tap = StreamTap::new(ours).unwrap();
        let frame = vec![7u8; 65535];
        let mut sent = 0usize;
        while tap.to_guest().send(&[&frame]) {
            sent += 1;
            assert!(sent < 1000, "the output buffer must fill up");
        }
        assert!(tap.wants_write());
        assert_eq!(tap.stats().dropped_to_guest, 1);
        // Drain everything on the other side; all frames that were accepted arrive intact.
        qemu.set_nonblocking(false).unwrap();
        let reader = std::thread::spawn(move || {
            let mut n = 0;
            for _ in 0..sent {
                assert_eq!(read_framed(&mut qemu), vec![7u8; 65535]);
                n += 1;
            }
            n
        });
        while tap.wants_write() {
            assert_eq!(tap.handle_writable(), StreamEvent::Open);
            std::thread::yield_now();
        }
        assert_eq!(reader.join().unwrap(), sent);
    }

    use super::super::testutil::{batch_frame, FakeBatch, XorShift};

    const HDR: usize = 42;

    fn payload(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed))
            .collect()
    }

    /// Sends `msgs` as one batch with slots for `size` bytes; returns the outcome and the
    /// frames as the guest reads them.
    fn batch(
        msgs: &[Vec<u8>],
        size: usize,
        max: usize,
        w: &mut FakeBatch,
    ) -> (SendBatch, Vec<Vec<u8>>) {
        let (ours, mut qemu) = UnixStream::pair().unwrap();
        let mut tap = StreamTap::new(ours).unwrap();
        w.msgs = msgs.to_vec();
        let r = tap.to_guest().send_batch(HDR, size, max, msgs.len(), w);
        tap.to_guest().flush();
        assert!(!tap.wants_write());
        drop(tap);
        let mut frames = Vec::new();
        let mut all = Vec::new();
        qemu.read_to_end(&mut all).unwrap();
        let mut s = &all[..];
        while !s.is_empty() {
            let len = u32::from_be_bytes(s[..4].try_into().unwrap()) as usize;
            frames.push(s[4..4 + len].to_vec());
            s = &s[4 + len..];
        }
        (r, frames)
    }

    #[test]
    fn batch_of_uniform_datagrams() {
        let msgs: Vec<Vec<u8>> = (0..5).map(|i| payload(100, i)).collect();
        let mut w = FakeBatch::new(vec![]);
        let (r, frames) = batch(&msgs, 100, 1000, &mut w);
        assert_eq!(
            r,
            SendBatch::Sent {
                received: 5,
                queued: 5
            }
        );
        assert_eq!(w.rooms, vec![100; 5], "one slot of the predicted size each");
        assert!(w.ovf.iter().all(|o| o.is_empty()));
        let want: Vec<_> = msgs
            .iter()
            .enumerate()
            .map(|(i, m)| batch_frame(i, HDR, m))
            .collect();
        assert_eq!(frames, want);
        assert!(w.sums_right());
    }

    /// Shorter, longer, empty, too big and refused datagrams in one batch: the frames kept
    /// arrive whole and in order.
    #[test]
    fn batch_of_mixed_sizes_keeps_order_and_contents() {
        let sizes = [100, 30, 300, 0, 100, 5000, 10, 4000, 7];
        let msgs: Vec<Vec<u8>> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| payload(n, i as u8))
            .collect();
        let mut w = FakeBatch::new(vec![]);
        w.refuse = vec![6];
        let (r, frames) = batch(&msgs, 100, 4000, &mut w);
        assert_eq!(
            r,
            SendBatch::Sent {
                received: 9,
                queued: 7
            }
        );
        let want: Vec<_> = msgs
            .iter()
            .enumerate()
            .filter(|&(i, _)| i != 5 && i != 6)
            .map(|(i, m)| batch_frame(i, HDR, m))
            .collect();
        assert_eq!(frames, want);
        assert!(w.sums_right());
    }

    /// Random sizes around the slot size: whatever moves where, every frame arrives intact.
    #[test]
    fn batch_layout_survives_random_sizes() {
        let mut x = XorShift(0x2545_f491);
        let mut rnd = |n: u32| x.below(n);
        for round in 0..300 {
            let size = rnd(3000) as usize;
            let n = 1 + rnd(MAX_BATCH as u32) as usize;
            let msgs: Vec<Vec<u8>> = (0..n)
                .map(|i| {
                    let len = match rnd(4) {
                        0 => size,
                        1 => rnd(size as u32 + 1) as usize,
                        _ => rnd(6000) as usize,
                    };
                    payload(len, (round + i) as u8)
                })
                .collect();
            let mut w = FakeBatch::new(vec![]);
            let (r, frames) = batch(&msgs, size, 5000, &mut w);
            let want: Vec<_> = msgs
                .iter()
                .enumerate()
                .filter(|(_, m)| m.len() <= 5000)
                .map(|(i, m)| batch_frame(i, HDR, m))
                .collect();
            assert_eq!(
                r,
                SendBatch::Sent {
                    received: n,
                    queued: want.len()
                },
                "round {round}"
            );
            assert!(
                frames == want,
                "round {round}: sizes {:?}",
                msgs.iter().map(Vec::len).collect::<Vec<_>>()
            );
            assert!(w.sums_right());
        }
    }

    #[test]
    fn batch_without_room_starves_then_room_returns() {
        let (ours, mut qemu) = UnixStream::pair().unwrap();
        let mut tap = StreamTap::new(ours).unwrap();
        let frame = vec![7u8; 65535];
        while tap.to_guest().send(&[&frame]) {}
        let mut w = FakeBatch::new(vec![payload(60000, 1)]);
        assert_eq!(
            tap.to_guest().send_batch(HDR, 60000, 65000, 4, &mut w),
            SendBatch::NoRoom
        );
        assert!(w.rooms.is_empty(), "writer not called");
        assert!(!tap.to_guest().room_returned());
        qemu.set_nonblocking(true).unwrap();
        let mut sink = vec![0u8; 1 << 20];
        while tap.wants_write() {
            while qemu.read(&mut sink).is_ok() {}
            tap.handle_writable();
        }
        assert!(tap.to_guest().room_returned());
    }
}
