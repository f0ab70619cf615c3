//! The guest side ("tap", as in passt): how Ethernet frames move between the guest and the
//! translation engine, whatever carries them. Two back-ends implement it: the vhost-user
//! virtqueues (frames in guest memory) and the stream socket (4-byte length + frame).
//!
//! Frames cross this boundary without the virtio-net header; back-ends add and strip it.

/// Frames towards the guest.
///
/// A frame is given as a list of parts (for example our headers, then payload read from a
/// host socket), so a back-end can gather them straight into guest buffers with one copy.
/// Data from host sockets can do better with [`ToGuest::send_with`]: the kernel writes the
/// payload straight into the back-end's room for the frame (guest memory, in vhost-user
/// mode), and the headers follow once its length is known; [`ToGuest::send_batch`] does
/// the same for several messages received with one system call.
pub trait ToGuest {
    /// Queues one Ethernet frame for the guest. Back-ends pad frames shorter than 60 bytes.
    /// Returns `false` if the frame was dropped (no room even after queueing); the back-end
    /// counts such drops itself.
    fn send(&mut self, parts: &[&[u8]]) -> bool;

    /// Makes everything queued so far visible to the guest: one used-ring publication and
    /// at most one interrupt, or one socket write.
    fn flush(&mut self);

    /// Builds one frame in place: `hdr_len` bytes of headers (Ethernet to L4, at most
    /// [`MAX_HDR`]) followed by up to `max_payload` bytes of payload.
    ///
    /// The back-end reserves room for the frame, at least `min_payload` bytes of payload and
    /// as much as it has up to `max_payload`, then calls [`FrameWriter::payload`] with that
    /// room, then [`FrameWriter::header`] with the payload's length and checksum, and queues
    /// the frame (padded to 60 bytes) for the next [`ToGuest::flush`]. Room not used is
    /// given back. If there is no room, nothing is called and [`SendWith::NoRoom`] tells the
    /// caller to keep its data (in the socket) until [`ToGuest::room_returned`] says so.
    ///
    /// The default goes through a stack buffer and [`ToGuest::send`] (one copy more), for
    /// back-ends without room of their own to lend.
    fn send_with(
        &mut self,
        hdr_len: usize,
        min_payload: usize,
        max_payload: usize,
        w: &mut dyn FrameWriter,
    ) -> SendWith {
        let mut buf = [0u8; MAX_FRAME];
        let Some(room) = payload_room(hdr_len, min_payload, max_payload) else {
            return SendWith::Dropped;
        };
        let (hdr, payload) = buf.split_at_mut(hdr_len);
        let payload = &mut payload[..room];
        let iov = [libc::iovec {
            iov_base: payload.as_mut_ptr().cast(),
            iov_len: payload.len(),
        }];
        let Some(len) = w.payload(&iov) else {
            return SendWith::Abandoned;
        };
        let len = len.min(room);
        let sum = crate::wire::PartialSum::of(&payload[..len]);
        if !w.header(hdr, len, sum.value()) {
            return SendWith::Dropped;
        }
        if self.send(&[hdr, &payload[..len]]) {
            SendWith::Sent(len)
        } else {
            SendWith::Dropped
        }
    }

    /// Builds up to `count` frames in place, their payloads written by one call of the
    /// writer: [`ToGuest::send_with`] for several messages at once (`recvmmsg`).
    ///
    /// Each frame has `hdr_len` bytes of headers (at most [`MAX_HDR`]) and a payload of up
    /// to `max_payload` bytes. The back-end reserves room for `count` frames with about
    /// `size` bytes of payload each (the first at least `size`; fewer frames if it runs short
    /// of room, at least one), and calls [`BatchWriter::payloads`] with all the rooms. A
    /// payload may turn out longer than its room, up to the writer's private overflow: the
    /// back-end then copies the rest ([`BatchWriter::overflow`]) into more room of its own,
    /// or drops the frame if it has none. Payloads longer than `max_payload` are dropped
    /// (the writer knows which, from their lengths). Then the back-end calls
    /// [`BatchWriter::header`] for each frame it keeps, and queues the frames, in message
    /// order, for the next [`ToGuest::flush`]. Room not used is given back.
    ///
    /// With no room for even one frame nothing is called and [`SendBatch::NoRoom`] is
    /// returned, as for [`ToGuest::send_with`].
    ///
    /// The default builds one frame per call with [`ToGuest::send_with`], with exactly
    /// `size` bytes of room: the per-message path, for back-ends with no batch of their own.
    fn send_batch(
        &mut self,
        hdr_len: usize,
        size: usize,
        max_payload: usize,
        count: usize,
        w: &mut dyn BatchWriter,
    ) -> SendBatch {
        let _ = count;
        send_batch_one(self, hdr_len, size, max_payload, w)
    }

    /// Whether [`ToGuest::send_batch`] builds several frames per call here rather than
    /// one through [`ToGuest::send_with`] (the default): only then is a stream socket's
    /// data worth receiving for several frames with one system call.
    fn batches(&self) -> bool {
        false
    }

    /// Whether room came back since a [`ToGuest::send_with`] was refused with
    /// [`SendWith::NoRoom`] (the guest added RX buffers, the socket drained). Clears the
    /// condition: callers retry what they held back, once.
    fn room_returned(&mut self) -> bool {
        false
    }
}

/// Fills one frame reserved by [`ToGuest::send_with`].
pub trait FrameWriter {
    /// Writes the payload into `room` (raw iovecs, as the kernel takes them: in vhost-user
    /// mode they point into guest memory the guest may write concurrently, so they must
    /// not be turned into Rust references). Returns its length, or `None` to give the
    /// room back untouched (nothing to send after all: no data yet, end of stream, error).
    fn payload(&mut self, room: &[libc::iovec]) -> Option<usize>;

    /// Writes the headers into `hdr` (exactly `hdr_len` bytes) for `len` bytes of
    /// payload whose RFC 1071 sum (not complemented, as if at an even offset) is
    /// `payload_sum`. `false` drops the frame.
    fn header(&mut self, hdr: &mut [u8], len: usize, payload_sum: u16) -> bool;
}

/// Fills the frames reserved by [`ToGuest::send_batch`]: one message (datagram) each.
pub trait BatchWriter {
    /// Writes up to `ends.len()` messages with one system call. Message `i`'s room is
    /// `room[ends[i - 1]..ends[i]]` (`ends[-1]` being 0), raw iovecs as for
    /// [`FrameWriter::payload`]; the writer adds private room of its own after it, for
    /// messages longer than their room. Sets `lens[i]` to message `i`'s full length, which
    /// may exceed its room (the rest is at [`Self::overflow`]) and even what the writer
    /// could hold (the message was truncated: the back-end drops it, as it is longer than
    /// any `max_payload`). Returns how many messages were written; 0 gives all the room
    /// back untouched.
    fn payloads(&mut self, room: &[libc::iovec], ends: &[usize], lens: &mut [usize]) -> usize;

    /// The bytes of message `i` beyond its room, from the writer's private room: at most
    /// `lens[i]` minus the room's length.
    fn overflow(&self, i: usize) -> &[u8];

    /// As [`FrameWriter::header`], for message `i`: headers for `len` bytes of payload
    /// summing to `payload_sum`. `false` drops the frame.
    fn header(&mut self, i: usize, hdr: &mut [u8], len: usize, payload_sum: u16) -> bool;
}

/// Outcome of [`ToGuest::send_batch`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub enum SendBatch {
    /// The writer wrote `received` messages, `queued` of them went out as frames. The
    /// others were longer than `max_payload` (the writer tells which from their lengths)
    /// or lost in the back-end (which counts them).
    Sent { received: usize, queued: usize },
    /// No room for a frame: nothing was called.
    NoRoom,
    /// The writer wrote nothing ([`BatchWriter::payloads`] returned 0).
    Abandoned,
    /// Nothing could be reserved (bad arguments, a broken ring); nothing was called.
    /// Counted by the back-end.
    Dropped,
}

/// [`ToGuest::send_batch`] for one message, through [`ToGuest::send_with`]: the default,
/// and the fallback of back-ends whose batch path doesn't apply.
pub fn send_batch_one<T: ToGuest + ?Sized>(
    to: &mut T,
    hdr_len: usize,
    size: usize,
    max_payload: usize,
    w: &mut dyn BatchWriter,
) -> SendBatch {
    /// One message of a batch writer as a frame writer.
    struct One<'a> {
        w: &'a mut dyn BatchWriter,
        received: bool,
    }
    impl FrameWriter for One<'_> {
        fn payload(&mut self, room: &[libc::iovec]) -> Option<usize> {
            let mut len = [0usize];
            if self.w.payloads(room, &[room.len()], &mut len) == 0 {
                return None;
            }
            self.received = true;
            let cap: usize = room.iter().map(|v| v.iov_len).sum();
            // A longer message than the room reserved (by its size) can't be placed here.
            (len[0] <= cap).then_some(len[0])
        }
        fn header(&mut self, hdr: &mut [u8], len: usize, payload_sum: u16) -> bool {
            self.w.header(0, hdr, len, payload_sum)
        }
    }
    let room = size.min(max_payload);
    let mut one = One { w, received: false };
    match to.send_with(hdr_len, room, room, &mut one) {
        SendWith::Sent(_) => SendBatch::Sent {
            received: 1,
            queued: 1,
        },
        SendWith::NoRoom => SendBatch::NoRoom,
        SendWith::Abandoned | SendWith::Dropped if one.received => SendBatch::Sent {
            received: 1,
            queued: 0,
        },
        SendWith::Abandoned => SendBatch::Abandoned,
        SendWith::Dropped => SendBatch::Dropped,
    }
}

/// Outcome of [`ToGuest::send_with`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub enum SendWith {
    /// Queued, with this much payload.
    Sent(usize),
    /// No room for the frame now: nothing was called, nothing consumed. Try again once
    /// [`ToGuest::room_returned`] holds.
    NoRoom,
    /// The writer gave its room back ([`FrameWriter::payload`] returned `None`).
    Abandoned,
    /// The frame was lost (bad arguments, bad guest buffers, the writer's header refused);
    /// the payload, if any, was consumed. Counted by the back-end.
    Dropped,
}

/// Largest header [`ToGuest::send_with`] takes: Ethernet, IPv6, TCP with options.
pub const MAX_HDR: usize = 128;
/// Most frames one [`ToGuest::send_batch`] builds.
pub const MAX_BATCH: usize = 32;

/// Payload room for a frame: `max_payload`, cut to what fits [`MAX_FRAME`]; `None` if that
/// is below `min_payload` or the header is too long.
pub fn payload_room(hdr_len: usize, min_payload: usize, max_payload: usize) -> Option<usize> {
    if hdr_len > MAX_HDR || hdr_len == 0 {
        return None;
    }
    let room = max_payload.min(MAX_FRAME - hdr_len);
    (room >= min_payload).then_some(room)
}

/// Whatever consumes frames from the guest: the L2 dispatcher.
pub trait FrameHandler {
    /// Handles one Ethernet frame from the guest (virtio header already stripped). Replies
    /// go to `to_guest`; the caller flushes after the batch.
    fn handle_frame(&mut self, frame: &[u8], to_guest: &mut dyn ToGuest);

    /// Ends a batch of frames. The bytes of every frame handed to [`Self::handle_frame`]
    /// since the last call stay where they are (mapped, not reused by the back-end, not
    /// given back to the guest) until this returns. A handler may therefore defer work on
    /// them, keeping raw pointers (never references: in vhost-user mode the bytes may be
    /// guest memory) to gather several frames' payloads into one system call, and must
    /// finish that work here.
    fn end_batch(&mut self, _to_guest: &mut dyn ToGuest) {}

    /// Handles one frame whose first bytes, `head`, were copied out of guest memory and
    /// whose remaining bytes, `tail`, were left there, so that a payload can reach the
    /// kernel straight from guest memory. `tail` stays valid until [`Self::end_batch`]
    /// returns, like a frame's bytes.
    ///
    /// The default copies the frame together and calls [`Self::handle_frame`] (it
    /// allocates: for handlers off the data path).
    fn handle_split_frame(&mut self, head: &[u8], tail: Tail<'_>, to_guest: &mut dyn ToGuest) {
        let mut frame = vec![0u8; head.len() + tail.len];
        frame[..head.len()].copy_from_slice(head);
        tail.copy_to(&mut frame[head.len()..]);
        self.handle_frame(&frame, to_guest);
    }
}

/// Most pieces a [`Tail`] has (a TX chain's descriptors).
pub const MAX_TAIL_IOV: usize = 64;

/// The part of a frame left in guest memory ([`FrameHandler::handle_split_frame`]): the
/// first `len` bytes described by `iov`.
///
/// The iovecs are raw because the bytes are shared with the guest, which may (only if it
/// misbehaves) write them while we read: they are read once, for a checksum or by the
/// kernel, and never parsed, so such a guest can only corrupt its own data.
#[derive(Clone, Copy, Debug, Default)]
pub struct Tail<'a> {
    pub iov: &'a [libc::iovec],
    pub len: usize,
}

impl<'a> Tail<'a> {
    /// The pieces, cut to `len` bytes.
    pub fn pieces(&self) -> impl Iterator<Item = libc::iovec> + 'a {
        let mut left = self.len;
        self.iov.iter().map_while(move |v| {
            let n = v.iov_len.min(left);
            left -= n;
            (n > 0).then_some(libc::iovec {
                iov_base: v.iov_base,
                iov_len: n,
            })
        })
    }

    /// RFC 1071 sum of the bytes, as if they started at an even offset.
    pub fn sum(&self) -> crate::wire::PartialSum {
        let mut s = crate::wire::PartialSum::default();
        for v in self.pieces() {
            // SAFETY: the back-end guarantees the iovecs map readable memory until the
            // batch ends; see the type's documentation for concurrent writes.
            unsafe { s.add_raw(v.iov_base as *const u8, v.iov_len) };
        }
        s
    }

    /// Copies the bytes to the start of `out`; returns how many fit.
    pub fn copy_to(&self, out: &mut [u8]) -> usize {
        let mut at = 0;
        for v in self.pieces() {
            let n = v.iov_len.min(out.len() - at);
            // SAFETY: as in `sum`; `out` is ours and has room for `n` more bytes.
            unsafe {
                std::ptr::copy_nonoverlapping(v.iov_base as *const u8, out[at..].as_mut_ptr(), n)
            };
            at += n;
        }
        at
    }
}

/// Frames shorter than this (without FCS) are padded with zeroes on the way to the guest.
pub const ETH_MIN_FRAME: usize = 60;
/// Largest frame we carry: 64 KiB IP packet plus Ethernet header.
pub const MAX_FRAME: usize = 65535 + 14;

pub mod stream;

/// Frames with nowhere to go (no guest connected): dropped.
pub struct Discard;

impl ToGuest for Discard {
    fn send(&mut self, _parts: &[&[u8]]) -> bool {
        false
    }

    fn flush(&mut self) {}

    /// No room: data stays in the sockets until a guest attaches.
    fn send_with(&mut self, _: usize, _: usize, _: usize, _: &mut dyn FrameWriter) -> SendWith {
        SendWith::NoRoom
    }
}

/// Test helpers shared by the back-ends' tests.
#[cfg(test)]
pub mod testutil {
    use super::BatchWriter;
    use crate::wire::PartialSum;

    /// What a frame built with [`FakeBatch`] for message `i` looks like: its index (4
    /// bytes) and `0xee`s as `hdr_len` bytes of headers, the payload, zero padding to the
    /// Ethernet minimum.
    pub fn batch_frame(i: usize, hdr_len: usize, payload: &[u8]) -> Vec<u8> {
        let mut f = (i as u32).to_be_bytes().to_vec();
        f.resize(hdr_len, 0xee);
        f.extend_from_slice(payload);
        if f.len() < super::ETH_MIN_FRAME {
            f.resize(super::ETH_MIN_FRAME, 0);
        }
        f
    }

    /// A xorshift generator for randomised tests: reproducible, no dependency.
    pub struct XorShift(pub u32);

    impl XorShift {
        /// A number below `n`.
        pub fn below(&mut self, n: u32) -> u32 {
            let x = &mut self.0;
            *x ^= *x << 13;
            *x ^= *x >> 17;
            *x ^= *x << 5;
            *x % n
        }
    }

    /// "Receives" the given messages into the back-end's room as `recvmmsg` would (room
    /// first, the rest into an overflow of `ovf_cap` bytes, full lengths reported), and
    /// writes as headers the message's index (as 4 bytes) then `0xee`s. Records what it
    /// was offered and the lengths and sums the back-end reported.
    pub struct FakeBatch {
        pub msgs: Vec<Vec<u8>>,
        pub ovf_cap: usize,
        /// Room offered per message (received or not).
        pub rooms: Vec<usize>,
        pub ovf: Vec<Vec<u8>>,
        /// (index, len, sum) of each header call.
        pub headers: Vec<(usize, usize, u16)>,
        /// Header calls refused, by message index.
        pub refuse: Vec<usize>,
    }

    impl FakeBatch {
        pub fn new(msgs: Vec<Vec<u8>>) -> Self {
            FakeBatch {
                msgs,
                ovf_cap: 70000,
                rooms: Vec::new(),
                ovf: Vec::new(),
                headers: Vec::new(),
                refuse: Vec::new(),
            }
        }

        /// Whether every header call had the right length and payload sum.
        pub fn sums_right(&self) -> bool {
            self.headers.iter().all(|&(i, len, sum)| {
                len == self.msgs[i].len() && sum == PartialSum::of(&self.msgs[i]).value()
            })
        }
    }

    impl BatchWriter for FakeBatch {
        fn payloads(&mut self, room: &[libc::iovec], ends: &[usize], lens: &mut [usize]) -> usize {
            let n = ends.len().min(self.msgs.len()).min(lens.len());
            self.rooms.clear();
            self.ovf.clear();
            let mut prev = 0;
            for &end in ends {
                self.rooms
                    .push(room[prev..end].iter().map(|v| v.iov_len).sum());
                prev = end;
            }
            let mut prev = 0;
            for i in 0..n {
                let m = &self.msgs[i];
                let mut done = 0;
                for v in &room[prev..ends[i]] {
                    let k = v.iov_len.min(m.len() - done);
                    // SAFETY: test memory, lent for writing, `k` within the iovec.
                    unsafe {
                        std::ptr::copy_nonoverlapping(m[done..].as_ptr(), v.iov_base.cast(), k)
                    };
                    done += k;
                }
                let rest = &m[done..];
                self.ovf.push(rest[..rest.len().min(self.ovf_cap)].to_vec());
                lens[i] = m.len();
                prev = ends[i];
            }
            n
        }

        fn overflow(&self, i: usize) -> &[u8] {
            self.ovf.get(i).map_or(&[], |v| &v[..])
        }

        fn header(&mut self, i: usize, hdr: &mut [u8], len: usize, payload_sum: u16) -> bool {
            self.headers.push((i, len, payload_sum));
            hdr.fill(0xee);
            hdr[..4].copy_from_slice(&(i as u32).to_be_bytes());
            !self.refuse.contains(&i)
        }
    }
}
