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

use super::{FrameHandler, FrameWriter, SendWith, ToGuest, ETH_MIN_FRAME, MAX_HDR};
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

    /// Room is back once a maximum frame fits again.
    fn room_returned(&mut self) -> bool {
        if self.starved && !self.broken && self.room() >= LEN_BYTES + MAX_GUEST_FRAME {
            self.starved = false;
            return true;
        }
        false
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
}
