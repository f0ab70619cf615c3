//! RX: frames from the engine to the guest, with mergeable buffers.
//!
//! Sending a frame of `n` bytes needs `hdr_len + max(n, 60)` bytes of guest buffers (frames
//! are padded to the Ethernet minimum). With MRG_RXBUF the frame may spread over several
//! chains; `num_buffers` in the header of the first one says how many. Steps:
//!
//! 1. *Reserve*: pop chains until their capacity covers the frame, recording each chain's
//!    head and segments. If the ring runs dry first, *rewind* `next_avail` to where we started
//!    (the guest never noticed) and keep the frame in the pending queue. Without MRG_RXBUF
//!    one chain must hold the whole frame; a frame bigger than the chain is dropped and the
//!    chain rewound for the next frame.
//! 2. *Write*: header (with `num_buffers`), frame parts, zero padding, gathered straight
//!    into the segments: the only copy.
//! 3. *Stage* one used element per chain. Nothing is visible to the guest until
//!    [`ToGuest::flush`] publishes the used index once for the whole batch, so it never sees
//!    a partial mergeable frame.
//!
//! A malformed chain met while reserving is returned with length 0 along with the chains
//! already reserved for that frame (we can't rewind past a chain we must return), and the
//! reservation starts over with the next chain.
//!
//! The pending queue is one byte buffer and one index ring, both allocated at start-up and
//! bounded (frames beyond it are dropped and counted). It is FIFO: while anything is pending,
//! new frames queue behind it, so the guest sees frames in order. While frames wait, we ask
//! the guest for a kick on its next buffer (with EVENT_IDX, `avail_event` = its current avail
//! index); the caller forwards that kick to [`RxQueue::handle_kick`], which sends what fits.
//! With nothing pending, RX kicks are switched off again.
//!
//! We send complete checksums and never negotiate GUEST_CSUM, so the header's `flags` and
//! GSO fields are always zero.

use std::collections::VecDeque;

use super::chain::{ChainError, ChainErrors, Seg, Segments};
use super::{LogLimit, NetFeatures, Pop, RingConfig, StartError, Vring, NUM_BUFFERS_OFFSET};
use crate::tap::{FrameWriter, SendWith, ToGuest, ETH_MIN_FRAME, MAX_FRAME, MAX_HDR};
use crate::wire::PartialSum;
use vm_memory::{Address, Bytes, GuestMemoryBackend, GuestMemoryMmap};

/// Most segments one frame may use (a 64 KiB frame over 1500-byte buffers takes 44).
const MAX_RX_SEGS: usize = 1024;
/// Default pending queue: bytes and frames.
pub const DEFAULT_PENDING_BYTES: usize = 256 * 1024;
pub const DEFAULT_PENDING_FRAMES: usize = 128;

/// RX counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RxStats {
    /// Frames written to guest buffers.
    pub frames: u64,
    /// Their bytes (without header and padding).
    pub bytes: u64,
    /// Chains used for them (more than `frames` with mergeable buffers).
    pub buffers: u64,
    /// Frames that waited in the pending queue for buffers.
    pub deferred: u64,
    /// Frames dropped: ring not started or not enabled.
    pub drop_not_ready: u64,
    /// Frames dropped: pending queue full.
    pub drop_pending_full: u64,
    /// Frames dropped: empty, larger than [`MAX_FRAME`], or larger than a non-mergeable buffer.
    pub drop_too_big: u64,
    /// Frames dropped: would need more than 1024 buffer segments.
    pub drop_fragmented: u64,
    /// Frames dropped when the ring stopped or broke with them pending.
    pub drop_stopped: u64,
    /// Chains rejected, by reason (returned with length 0).
    pub bad_chains: ChainErrors,
    /// Times the ring was found broken (avail index jump).
    pub broken: u64,
    /// Frames built in place whose writer refused the header (payload given back).
    pub drop_writer: u64,
    /// In-place frames refused for lack of buffers (the data stayed in its socket).
    pub no_room: u64,
}

#[derive(Clone, Copy, Debug)]
struct Reserved {
    head: u16,
    cap: u32,
}

enum Deliver {
    Done,
    NoRoom,
    Dropped,
}

/// The ring side of RX: reservation, writing, staging.
#[derive(Debug)]
struct RxRing {
    ring: Vring,
    feat: NetFeatures,
    segs: Segments,
    chains: Vec<Reserved>,
    /// Payload room lent to a [`FrameWriter`], rebuilt for each frame.
    iov: Vec<libc::iovec>,
    stats: RxStats,
    log: LogLimit,
}

/// Frames waiting for guest buffers: FIFO, fixed storage.
#[derive(Debug)]
struct Pending {
    buf: Box<[u8]>,
    /// (offset, length) of each frame in `buf`, oldest first.
    frames: VecDeque<(usize, usize)>,
    max_frames: usize,
}

/// The RX virtqueue, and the [`ToGuest`] implementation of the vhost-user back-end.
#[derive(Debug)]
pub struct RxQueue {
    rx: RxRing,
    pending: Pending,
    enabled: bool,
    /// Whether we asked the guest to kick us on new buffers.
    armed: bool,
    /// A [`ToGuest::send_with`] was refused for lack of buffers: kicks stay armed, and the
    /// next kick (or start) reports room through [`ToGuest::room_returned`].
    starved: bool,
    /// Room came back since `starved` was set.
    room: bool,
}

impl RxQueue {
    /// A stopped RX queue accepting ring sizes up to `max_size`, with a pending queue of
    /// `pending_bytes` (at least one [`MAX_FRAME`]) and `pending_frames` entries.
    pub fn new(max_size: u16, pending_bytes: usize, pending_frames: usize) -> Self {
        let ring = Vring::new(max_size);
        let max_chains = usize::from(ring.max_size());
        RxQueue {
            rx: RxRing {
                ring,
                feat: NetFeatures::from_acked(0),
                segs: Segments::with_capacity(MAX_RX_SEGS),
                chains: Vec::with_capacity(max_chains),
                iov: Vec::with_capacity(2 * MAX_RX_SEGS),
                stats: RxStats::default(),
                log: LogLimit::default(),
            },
            pending: Pending::new(pending_bytes.max(MAX_FRAME), pending_frames.max(1)),
            enabled: false,
            armed: false,
            starved: false,
            room: false,
        }
    }

    /// The ring, for the control plane (call/err eventfds, memory updates).
    pub fn ring(&mut self) -> &mut Vring {
        &mut self.rx.ring
    }

    /// Starts the ring with the negotiated features. Kicks stay off until frames wait.
    pub fn start(
        &mut self,
        mem: GuestMemoryMmap,
        cfg: &RingConfig,
        feat: NetFeatures,
    ) -> Result<(), StartError> {
        self.drop_pending();
        self.rx.feat = feat;
        self.rx.ring.start(mem, cfg, feat.event_idx)?;
        self.rx.ring.disable_notification();
        self.armed = false;
        // Whoever held data back for lack of buffers may try the new ring.
        self.room |= std::mem::take(&mut self.starved);
        Ok(())
    }

    /// Stops the ring (GET_VRING_BASE), publishing what was staged; pending frames are
    /// dropped, as they were meant for a driver instance that is going away. Returns the
    /// next available index.
    pub fn stop(&mut self) -> u16 {
        self.drop_pending();
        self.rx.ring.stop()
    }

    /// SET_VRING_ENABLE: a disabled ring gets no new frames.
    pub fn set_enabled(&mut self, enabled: bool) {
        self.enabled = enabled;
        if enabled {
            self.room |= std::mem::take(&mut self.starved);
        }
    }

    /// Whether frames can be sent now.
    pub fn is_ready(&self) -> bool {
        self.enabled && self.rx.ring.is_running()
    }

    /// Whether frames wait for guest buffers. A caller may stop reading sockets meanwhile.
    pub fn has_pending(&self) -> bool {
        !self.pending.frames.is_empty()
    }

    pub fn stats(&self) -> &RxStats {
        &self.rx.stats
    }

    /// The guest added RX buffers: send what waits, and publish. If in-place frames were
    /// refused meanwhile and nothing waits any more, [`ToGuest::room_returned`] now holds.
    pub fn handle_kick(&mut self) {
        self.service_pending();
        if self.starved && !self.has_pending() {
            self.starved = false;
            self.room = true;
            if self.armed {
                self.rx.ring.disable_notification();
                self.armed = false;
            }
        }
        self.flush();
    }

    /// Notes a refused in-place frame and asks for a kick on the next buffer. `true` if
    /// buffers raced in while arming: the caller should try again at once.
    fn starve(&mut self) -> bool {
        self.starved = true;
        self.armed = true;
        self.rx.ring.arm_for_new_buffers()
    }

    fn drop_pending(&mut self) {
        self.rx.stats.drop_stopped += self.pending.frames.len() as u64;
        self.pending.clear();
        self.armed = false;
    }

    /// Sends pending frames while buffers last; arms the RX kick if some remain.
    fn service_pending(&mut self) {
        loop {
            while let Some(frame) = self.pending.front() {
                match self.rx.deliver(&[frame], frame.len()) {
                    Deliver::Done | Deliver::Dropped => self.pending.pop_front(),
                    Deliver::NoRoom => break,
                }
                if self.rx.ring.is_broken() {
                    self.rx.stats.broken += 1;
                    self.drop_pending();
                    return;
                }
            }
            if self.pending.frames.is_empty() {
                if self.armed && !self.starved {
                    self.rx.ring.disable_notification();
                    self.armed = false;
                }
                return;
            }
            self.armed = true;
            if !self.rx.ring.arm_for_new_buffers() {
                return;
            }
        }
    }
}

impl ToGuest for RxQueue {
    fn send(&mut self, parts: &[&[u8]]) -> bool {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        if len == 0 || len > MAX_FRAME {
            self.rx.stats.drop_too_big += 1;
            return false;
        }
        if !self.is_ready() {
            self.rx.stats.drop_not_ready += 1;
            return false;
        }
        if self.has_pending() {
            self.service_pending();
        }
        if !self.has_pending() {
            match self.rx.deliver(parts, len) {
                Deliver::Done => return true,
                Deliver::Dropped => {
                    if self.rx.ring.is_broken() {
                        self.rx.stats.broken += 1;
                    }
                    return false;
                }
                Deliver::NoRoom => {}
            }
        }
        if !self.pending.push(parts, len) {
            self.rx.stats.drop_pending_full += 1;
            return false;
        }
        self.rx.stats.deferred += 1;
        if !self.armed {
            // Arms the kick, and retries at once if buffers raced in.
            self.service_pending();
        }
        true
    }

    fn flush(&mut self) {
        self.rx.ring.publish();
    }

    fn send_with(
        &mut self,
        hdr_len: usize,
        min_payload: usize,
        max_payload: usize,
        w: &mut dyn FrameWriter,
    ) -> SendWith {
        let Some(max_payload) = crate::tap::payload_room(hdr_len, min_payload, max_payload) else {
            self.rx.stats.drop_too_big += 1;
            return SendWith::Dropped;
        };
        if !self.is_ready() {
            self.starved = true;
            self.rx.stats.no_room += 1;
            return SendWith::NoRoom;
        }
        if self.has_pending() {
            self.service_pending();
        }
        // Frames queued before this one go first.
        if self.has_pending() {
            self.starved = true;
            self.rx.stats.no_room += 1;
            return SendWith::NoRoom;
        }
        loop {
            match self.rx.deliver_with(hdr_len, min_payload, max_payload, w) {
                SendWith::NoRoom => {
                    if self.starve() {
                        continue;
                    }
                    self.rx.stats.no_room += 1;
                    return SendWith::NoRoom;
                }
                SendWith::Dropped => {
                    if self.rx.ring.is_broken() {
                        self.rx.stats.broken += 1;
                    }
                    return SendWith::Dropped;
                }
                other => return other,
            }
        }
    }

    fn room_returned(&mut self) -> bool {
        std::mem::take(&mut self.room)
    }
}

/// Chains reserved for one frame: consecutive in the available ring from `start`.
struct Reservation {
    start: u16,
    have: usize,
}

enum Reserve {
    Ok(Reservation),
    NoRoom,
    Dropped,
}

impl RxRing {
    /// Pops chains until they hold `need` bytes (header included). Without MRG_RXBUF one
    /// chain is taken, and it may hold as little as `min_need`; with it, chains are taken
    /// until `need` or the ring runs dry, which is enough if `min_need` is reached.
    fn reserve(&mut self, need: usize, min_need: usize) -> Reserve {
        let hdr_len = self.feat.hdr_len;
        self.segs.clear();
        self.chains.clear();
        let mut start = self.ring.next_avail();
        let mut have = 0usize;
        while have < need {
            let seg_start = self.segs.len();
            match self.ring.pop(&mut self.segs, true) {
                Pop::Empty if have >= min_need && have > 0 => break,
                Pop::Empty => {
                    self.ring.rewind(start);
                    return Reserve::NoRoom;
                }
                Pop::Broken => return Reserve::Dropped,
                Pop::Chain {
                    head,
                    res: Err(ChainError::TooManyDescriptors),
                } if !self.chains.is_empty() => {
                    let _ = head;
                    if have >= min_need {
                        // The chain may be fine: leave it for the next frame.
                        let n = self.chains.len() as u16;
                        self.ring.rewind(start.wrapping_add(n));
                        break;
                    }
                    self.ring.rewind(start);
                    self.stats.drop_fragmented += 1;
                    return Reserve::Dropped;
                }
                Pop::Chain { head, res } => {
                    let cap = match res {
                        Ok(cap) if (cap as usize) < hdr_len => Err(ChainError::TooShort),
                        other => other,
                    };
                    match cap {
                        Err(e) => {
                            self.segs.truncate(seg_start);
                            self.bad_chain(head, e);
                            self.segs.clear();
                            have = 0;
                            start = self.ring.next_avail();
                        }
                        Ok(cap) if !self.feat.mrg_rxbuf && (cap as usize) < min_need => {
                            self.ring.rewind(start);
                            self.stats.drop_too_big += 1;
                            return Reserve::Dropped;
                        }
                        Ok(cap) => {
                            self.chains.push(Reserved { head, cap });
                            have += cap as usize;
                            if !self.feat.mrg_rxbuf {
                                break;
                            }
                        }
                    }
                }
            }
        }
        Reserve::Ok(Reservation { start, have })
    }

    /// Stages the chains holding the first `total` bytes (header included) of a written
    /// frame, and gives the rest back.
    fn commit(&mut self, r: &Reservation, total: usize, len: usize) {
        let mut left = total;
        let mut used = 0u16;
        for i in 0..self.chains.len() {
            if left == 0 {
                break;
            }
            let c = self.chains[i];
            let n = left.min(c.cap as usize);
            self.ring.stage_used(c.head, n as u32);
            left -= n;
            used += 1;
        }
        if usize::from(used) < self.chains.len() {
            self.ring.rewind(r.start.wrapping_add(used));
        }
        self.stats.frames += 1;
        self.stats.bytes += len as u64;
        self.stats.buffers += u64::from(used);
    }

    /// Chains needed for `total` bytes of the reservation.
    fn chains_for(&self, total: usize) -> u16 {
        let mut left = total;
        let mut n = 0u16;
        for c in &self.chains {
            if left == 0 {
                break;
            }
            left = left.saturating_sub(c.cap as usize);
            n += 1;
        }
        n
    }

    /// The virtio-net header for a frame over `n` buffers.
    fn net_hdr(&self, n: u16) -> [u8; super::NET_HDR_LEN] {
        let mut hdr = [0u8; super::NET_HDR_LEN];
        if self.feat.hdr_len == super::NET_HDR_LEN {
            hdr[NUM_BUFFERS_OFFSET..NUM_BUFFERS_OFFSET + 2].copy_from_slice(&n.to_le_bytes());
        }
        hdr
    }

    /// A validated chain's memory vanished under us: give the buffers back empty.
    fn lost(&mut self) {
        for i in 0..self.chains.len() {
            let c = self.chains[i];
            self.ring.stage_used(c.head, 0);
        }
        self.stats.bad_chains.count(ChainError::Address);
    }

    /// Reserves, writes and stages one frame.
    fn deliver(&mut self, parts: &[&[u8]], len: usize) -> Deliver {
        let hdr_len = self.feat.hdr_len;
        let padded = len.max(ETH_MIN_FRAME);
        let need = hdr_len + padded;
        let r = match self.reserve(need, need) {
            Reserve::Ok(r) => r,
            Reserve::NoRoom => return Deliver::NoRoom,
            Reserve::Dropped => return Deliver::Dropped,
        };
        let hdr = self.net_hdr(self.chains_for(need));
        const ZEROES: [u8; ETH_MIN_FRAME] = [0; ETH_MIN_FRAME];
        let pieces = std::iter::once(&hdr[..hdr_len])
            .chain(parts.iter().copied())
            .chain(std::iter::once(&ZEROES[..padded - len]));
        let written = match self.ring.mem() {
            Some(mem) => gather(mem, self.segs.as_slice(), 0, pieces),
            None => false,
        };
        if !written {
            self.lost();
            return Deliver::Dropped;
        }
        self.commit(&r, need, len);
        Deliver::Done
    }

    /// [`ToGuest::send_with`] on the ring: reserve, lend the payload room to the writer,
    /// header, stage.
    fn deliver_with(
        &mut self,
        hdr_len: usize,
        min_payload: usize,
        max_payload: usize,
        w: &mut dyn FrameWriter,
    ) -> SendWith {
        let vnet = self.feat.hdr_len;
        let need = vnet + (hdr_len + max_payload).max(ETH_MIN_FRAME);
        let min_need = vnet + (hdr_len + min_payload.max(1)).max(ETH_MIN_FRAME);
        let r = match self.reserve(need, min_need) {
            Reserve::Ok(r) => r,
            Reserve::NoRoom => return SendWith::NoRoom,
            Reserve::Dropped => return SendWith::Dropped,
        };
        let Some(mem) = self.ring.mem() else {
            self.ring.rewind(r.start);
            return SendWith::Dropped;
        };
        let room = (r.have.min(need) - vnet - hdr_len).min(max_payload);
        self.iov.clear();
        if !iovecs(
            mem,
            self.segs.as_slice(),
            vnet + hdr_len,
            room,
            &mut self.iov,
        ) {
            self.lost();
            return SendWith::Dropped;
        }
        // The iovecs may cover less than `room` if they ran out of slots.
        let room: usize = self.iov.iter().map(|v| v.iov_len).sum();
        let Some(len) = w.payload(&self.iov) else {
            self.ring.rewind(r.start);
            return SendWith::Abandoned;
        };
        let len = len.min(room);
        let Some(sum) = sum_guest(mem, self.segs.as_slice(), vnet + hdr_len, len) else {
            self.lost();
            return SendWith::Dropped;
        };
        let mut hdr = [0u8; MAX_HDR];
        if !w.header(&mut hdr[..hdr_len], len, sum.value()) {
            self.ring.rewind(r.start);
            self.stats.drop_writer += 1;
            return SendWith::Dropped;
        }
        let frame = hdr_len + len;
        let padded = frame.max(ETH_MIN_FRAME);
        let total = vnet + padded;
        let net_hdr = self.net_hdr(self.chains_for(total));
        const ZEROES: [u8; ETH_MIN_FRAME] = [0; ETH_MIN_FRAME];
        let segs = self.segs.as_slice();
        let ok = gather(
            mem,
            segs,
            0,
            [&net_hdr[..vnet], &hdr[..hdr_len]].into_iter(),
        ) && gather(
            mem,
            segs,
            vnet + frame,
            std::iter::once(&ZEROES[..padded - frame]),
        );
        if !ok {
            self.lost();
            return SendWith::Dropped;
        }
        self.commit(&r, total, frame);
        SendWith::Sent(len)
    }

    /// Returns a bad chain, and those reserved before it, with length 0.
    fn bad_chain(&mut self, head: u16, e: ChainError) {
        for i in 0..self.chains.len() {
            let c = self.chains[i];
            self.ring.stage_used(c.head, 0);
        }
        self.chains.clear();
        self.ring.stage_used(head, 0);
        self.stats.bad_chains.count(e);
        if self.log.allow() {
            log::warn!("vhost-user RX: returning malformed descriptor chain: {e:?}");
        }
    }
}

/// Copies `pieces` back to back into `segs`, from byte `at` of the segments on. `false` if
/// memory access failed or the segments were too short (neither happens for validated,
/// reserved chains).
fn gather<'p>(
    mem: &GuestMemoryMmap,
    segs: &[Seg],
    at: usize,
    pieces: impl Iterator<Item = &'p [u8]>,
) -> bool {
    let Some((mut si, mut off)) = locate(segs, at) else {
        return false;
    };
    for piece in pieces {
        let mut p = piece;
        while !p.is_empty() {
            let Some(s) = segs.get(si) else {
                return false;
            };
            let n = (s.len as usize - off).min(p.len());
            if mem
                .write_slice(&p[..n], s.addr.unchecked_add(off as u64))
                .is_err()
            {
                return false;
            }
            p = &p[n..];
            off += n;
            if off == s.len as usize {
                si += 1;
                off = 0;
            }
        }
    }
    true
}

/// Segment index and offset in it of byte `at` of `segs` (`at` may be their end).
fn locate(segs: &[Seg], mut at: usize) -> Option<(usize, usize)> {
    for (i, s) in segs.iter().enumerate() {
        if at < s.len as usize {
            return Some((i, at));
        }
        at -= s.len as usize;
    }
    (at == 0).then_some((segs.len(), 0))
}

/// Raw iovecs for `len` bytes of `segs` from byte `at` on, split where guest memory regions
/// end. Stops early (still `true`) when `out` is full; `false` if memory is missing.
fn iovecs(
    mem: &GuestMemoryMmap,
    segs: &[Seg],
    at: usize,
    mut len: usize,
    out: &mut Vec<libc::iovec>,
) -> bool {
    let Some((si, mut off)) = locate(segs, at) else {
        return false;
    };
    for s in &segs[si..] {
        if len == 0 {
            break;
        }
        let n = (s.len as usize - off).min(len);
        for slice in mem.get_slices(s.addr.unchecked_add(off as u64), n) {
            let Ok(slice) = slice else {
                return false;
            };
            if out.len() == out.capacity() {
                return true;
            }
            // SAFETY of what is built here: the pointer is the host mapping of guest memory
            // we hold mapped (the `GuestMemoryMmap` in the ring) for as long as the iovecs
            // live (they are cleared before the next reservation, and memory can only change
            // between calls). It is handed to the kernel as a raw iovec, never turned into a
            // Rust reference: the guest may write the same bytes concurrently.
            out.push(libc::iovec {
                iov_base: slice.ptr_guard_mut().as_ptr().cast(),
                iov_len: slice.len(),
            });
        }
        len -= n;
        off = 0;
    }
    true
}

/// The RFC 1071 sum of `len` bytes of `segs` from byte `at` on, read with volatile copies
/// (the guest may write these bytes while we read them: the sum is then wrong and the guest
/// drops its own corrupted frame, which is all it can expect).
fn sum_guest(mem: &GuestMemoryMmap, segs: &[Seg], at: usize, mut len: usize) -> Option<PartialSum> {
    let (si, mut off) = locate(segs, at)?;
    let mut sum = PartialSum::default();
    let mut chunk = [0u8; 1024];
    for s in &segs[si..] {
        if len == 0 {
            break;
        }
        let n = (s.len as usize - off).min(len);
        let mut done = 0;
        while done < n {
            let k = (n - done).min(chunk.len());
            mem.read_slice(&mut chunk[..k], s.addr.unchecked_add((off + done) as u64))
                .ok()?;
            sum.add(&chunk[..k]);
            done += k;
        }
        len -= n;
        off = 0;
    }
    (len == 0).then_some(sum)
}

impl Pending {
    fn new(bytes: usize, frames: usize) -> Self {
        Pending {
            buf: vec![0u8; bytes].into_boxed_slice(),
            frames: VecDeque::with_capacity(frames),
            max_frames: frames,
        }
    }

    /// Where a frame of `len` bytes fits, keeping frames contiguous in the circular buffer.
    fn place(&self, len: usize) -> Option<usize> {
        let cap = self.buf.len();
        let (Some(&(head, _)), Some(&(b_off, b_len))) = (self.frames.front(), self.frames.back())
        else {
            return (len <= cap).then_some(0);
        };
        let tail = b_off + b_len;
        if b_off >= head {
            // Used: [head, tail).
            if tail + len <= cap {
                Some(tail)
            } else if len <= head {
                Some(0)
            } else {
                None
            }
        } else {
            // Wrapped, used: [head, cap) and [0, tail).
            (tail + len <= head).then_some(tail)
        }
    }

    fn push(&mut self, parts: &[&[u8]], len: usize) -> bool {
        if self.frames.len() == self.max_frames {
            return false;
        }
        let Some(off) = self.place(len) else {
            return false;
        };
        let mut pos = off;
        for p in parts {
            self.buf[pos..pos + p.len()].copy_from_slice(p);
            pos += p.len();
        }
        self.frames.push_back((off, len));
        true
    }

    fn front(&self) -> Option<&[u8]> {
        self.frames
            .front()
            .map(|&(off, len)| &self.buf[off..off + len])
    }

    fn pop_front(&mut self) {
        self.frames.pop_front();
    }

    fn clear(&mut self) {
        self.frames.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::super::NET_HDR_LEN;
    use super::*;
    use std::fs::File;
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_NEXT;
    use vm_memory::GuestAddress;

    fn frame(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(13).wrapping_add(seed))
            .collect()
    }

    fn started(mem: &GuestMemoryMmap, d: &Driver, feat: NetFeatures) -> (RxQueue, File) {
        let mut rx = RxQueue::new(256, DEFAULT_PENDING_BYTES, 4);
        rx.start(mem.clone(), &d.config(), feat).expect("start");
        rx.set_enabled(true);
        let (call, call_rx) = eventfd();
        rx.ring().set_call(Some(call));
        (rx, call_rx)
    }

    fn mrg(event_idx: bool) -> NetFeatures {
        NetFeatures {
            event_idx,
            mrg_rxbuf: true,
            hdr_len: NET_HDR_LEN,
        }
    }

    /// Reads the frame the device put into used element `i` (and the following
    /// `num_buffers - 1`), given the buffer address of each head.
    fn read_frame(d: &Driver, addrs: &[(u16, u64)], i: u16) -> (Vec<u8>, u16) {
        let addr_of = |id: u32| {
            addrs
                .iter()
                .find(|(h, _)| u32::from(*h) == id)
                .map(|&(_, a)| a)
                .expect("known head")
        };
        let (id, len) = d.used_elem(i);
        let mut buf = vec![0u8; len as usize];
        d.mem
            .read_slice(&mut buf, GuestAddress(addr_of(id)))
            .expect("read");
        let n = u16::from_le_bytes([buf[10], buf[11]]);
        let mut out = buf[NET_HDR_LEN..].to_vec();
        for k in 1..n {
            let (id, len) = d.used_elem(i + k);
            let mut b = vec![0u8; len as usize];
            d.mem
                .read_slice(&mut b, GuestAddress(addr_of(id)))
                .expect("read");
            out.extend_from_slice(&b);
        }
        (out, n)
    }

    #[test]
    fn single_buffer_frame_with_padding() {
        let mem = memory();
        let mut d = Driver::new(&mem);
        let (mut rx, mut call) = started(&mem, &d, mrg(false));
        let bufs = [d.rx_buf(2048)];
        let f = frame(42, 1);
        assert!(rx.send(&[&f[..14], &f[14..]]));
        assert_eq!(d.used_idx(), 0, "not visible before flush");
        rx.flush();
        assert_eq!(d.used_idx(), 1);
        assert_eq!(take(&mut call), 1);
        let (got, n) = read_frame(&d, &bufs, 0);
        assert_eq!(n, 1);
        assert_eq!(got.len(), ETH_MIN_FRAME);
        assert_eq!(&got[..42], &f[..]);
        assert!(got[42..].iter().all(|&b| b == 0));
        assert_eq!(d.used_elem(0).1 as usize, NET_HDR_LEN + ETH_MIN_FRAME);
    }

    #[test]
    fn mergeable_frame_spans_buffers_and_publishes_once() {
        let mem = memory();
        let mut d = Driver::new(&mem);
        let (mut rx, mut call) = started(&mem, &d, mrg(true));
        let bufs: Vec<_> = (0..4).map(|_| d.rx_buf(1024)).collect();
        let f = frame(3000, 2);
        assert!(rx.send(&[&f]));
        rx.flush();
        assert_eq!(d.used_idx(), 3);
        let (got, n) = read_frame(&d, &bufs, 0);
        assert_eq!(n, 3);
        assert_eq!(got, f);
        assert_eq!(d.used_elem(2).1 as usize, 3000 + NET_HDR_LEN - 2048);
        assert_eq!(take(&mut call), 1);
        assert_eq!(rx.stats().buffers, 3);
    }

    #[test]
    fn batch_of_frames_one_publication() {
        let mem = memory();
        let mut d = Driver::new(&mem);
        let (mut rx, mut call) = started(&mem, &d, mrg(false));
        let bufs: Vec<_> = (0..8).map(|_| d.rx_buf(2048)).collect();
        for i in 0..5 {
            assert!(rx.send(&[&frame(100 + i, i as u8)]));
        }
        assert_eq!(d.used_idx(), 0);
        rx.flush();
        assert_eq!(d.used_idx(), 5);
        assert_eq!(take(&mut call), 1);
        for i in 0..5u16 {
            assert_eq!(
                read_frame(&d, &bufs, i).0,
                frame(100 + usize::from(i), i as u8)
            );
        }
    }

    #[test]
    fn dry_ring_rewinds_and_pending_goes_out_on_kick() {
        let mem = memory();
        let mut d = Driver::new(&mem);
        let (mut rx, _call) = started(&mem, &d, mrg(true));
        let mut bufs = vec![d.rx_buf(1024)];
        let f = frame(3000, 3);
        assert!(rx.send(&[&f]), "queued, not dropped");
        rx.flush();
        assert_eq!(d.used_idx(), 0, "no partial frame");
        assert_eq!(rx.rx.ring.next_avail(), 0, "reservation rewound");
        assert!(rx.has_pending());
        // Kick requested at the current avail index (1), not at next_avail (0).
        assert_eq!(d.avail_event(), 1);
        // A second frame queues behind the first, to keep order.
        let g = frame(100, 4);
        assert!(rx.send(&[&g]));
        bufs.push(d.rx_buf(1024));
        bufs.push(d.rx_buf(1024));
        bufs.push(d.rx_buf(1024));
        rx.handle_kick();
        assert!(!rx.has_pending());
        assert_eq!(d.used_idx(), 4);
        assert_eq!(read_frame(&d, &bufs, 0), (f, 3));
        assert_eq!(read_frame(&d, &bufs, 3).0[..100], g[..]);
        assert_eq!(rx.stats().deferred, 2);
    }

    #[test]
    fn no_event_idx_kick_toggles_no_notify() {
        let mem = memory();
        let mut d = Driver::new(&mem);
        let (mut rx, _call) = started(&mem, &d, mrg(false));
        assert_eq!(d.used_flags(), 1, "no RX kicks while nothing waits");
        assert!(rx.send(&[&frame(100, 0)]));
        assert_eq!(d.used_flags(), 0, "kicks wanted while a frame waits");
        d.rx_buf(2048);
        rx.handle_kick();
        assert_eq!(d.used_idx(), 1);
        assert_eq!(d.used_flags(), 1);
    }

    #[test]
    fn buffers_racing_the_arm_are_used_at_once() {
        // Buffers present but too small: arming must not spin, and must ask for a kick at
        // the current avail index.
        let mem = memory();
        let mut d = Driver::new(&mem);
        let (mut rx, _call) = started(&mem, &d, mrg(true));
        d.rx_buf(1024);
        d.rx_buf(1024);
        assert!(rx.send(&[&frame(5000, 1)]));
        assert!(rx.has_pending());
        assert_eq!(d.avail_event(), 2);
    }

    #[test]
    fn pending_queue_is_bounded() {
        let mem = memory();
        let d = Driver::new(&mem);
        let (mut rx, _call) = started(&mem, &d, mrg(true));
        for i in 0..4 {
            assert!(rx.send(&[&frame(1000, i)]));
        }
        assert!(!rx.send(&[&frame(1000, 9)]));
        assert_eq!(rx.stats().drop_pending_full, 1);
        // Stopping the ring drops what waits.
        rx.stop();
        assert_eq!(rx.stats().drop_stopped, 4);
        assert!(!rx.has_pending());
    }

    #[test]
    fn non_mergeable_needs_one_big_chain() {
        let mem = memory();
        let mut d = Driver::new(&mem);
        let feat = NetFeatures {
            event_idx: false,
            mrg_rxbuf: false,
            hdr_len: NET_HDR_LEN,
        };
        let (mut rx, _call) = started(&mem, &d, feat);
        let bufs = vec![d.rx_buf(1600)];
        assert!(!rx.send(&[&frame(3000, 1)]), "too big for the buffer");
        assert_eq!(rx.stats().drop_too_big, 1);
        assert!(
            rx.send(&[&frame(1500, 1)]),
            "buffer was kept for the next frame"
        );
        rx.flush();
        assert_eq!(read_frame(&d, &bufs, 0), (frame(1500, 1), 1));
    }

    #[test]
    fn multi_descriptor_rx_chain() {
        let mem = memory();
        let mut d = Driver::new(&mem);
        let (mut rx, _call) = started(&mem, &d, mrg(false));
        let zero = vec![0u8; 300];
        let h = d.chain(&zero, &[12, 100], true);
        d.offer(h);
        let f = frame(200, 5);
        assert!(rx.send(&[&f]));
        rx.flush();
        assert_eq!(d.used_elem(0), (u32::from(h), (NET_HDR_LEN + 200) as u32));
    }

    #[test]
    fn malformed_rx_chains_are_returned_empty() {
        let mem = memory();
        let mut d = Driver::new(&mem);
        let (mut rx, _call) = started(&mem, &d, mrg(false));
        let good1 = d.rx_buf(1024);
        // Read-only buffer in the RX ring.
        let a = d.alloc_buf(1024);
        let h = d.put_descs(&[(a, 1024, 0, 0)]);
        d.offer(h);
        // Too short for the header.
        let a = d.alloc_buf(8);
        let h2 = d.put_descs(&[(a, 8, VRING_DESC_F_WRITE_U16, 0)]);
        d.offer(h2);
        // Loop.
        let a = d.alloc_buf(64);
        let slot = d.next_slot();
        let h3 = d.put_descs(&[(
            a,
            64,
            VRING_DESC_F_WRITE_U16 | VRING_DESC_F_NEXT as u16,
            slot,
        )]);
        d.offer(h3);
        let good2 = d.rx_buf(2048);
        // 1500 bytes need the first good buffer and then some: it is given back with the
        // bad chain, and the frame lands in the last buffer.
        let f = frame(1500, 6);
        assert!(rx.send(&[&f]));
        rx.flush();
        assert_eq!(d.used_idx(), 5);
        let bad = rx.stats().bad_chains;
        assert_eq!(bad.direction, 1);
        assert_eq!(bad.too_short, 1);
        assert_eq!(bad.truncated + bad.too_many_descriptors, 1);
        for i in 0..4 {
            assert_eq!(d.used_elem(i).1, 0, "element {i}");
        }
        assert_eq!(read_frame(&d, &[good1, good2], 4), (f, 1));
    }
    const VRING_DESC_F_WRITE_U16: u16 =
        virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE as u16;

    #[test]
    fn not_ready_and_oversized_frames_are_dropped() {
        let mem = memory();
        let d = Driver::new(&mem);
        let mut rx = RxQueue::new(256, DEFAULT_PENDING_BYTES, 4);
        assert!(!rx.send(&[&frame(100, 0)]));
        assert_eq!(rx.stats().drop_not_ready, 1);
        rx.start(mem.clone(), &d.config(), mrg(false))
            .expect("start");
        assert!(!rx.send(&[&frame(100, 0)]), "started but not enabled");
        assert_eq!(rx.stats().drop_not_ready, 2);
        rx.set_enabled(true);
        let big = vec![0u8; MAX_FRAME + 1];
        assert!(!rx.send(&[&big]));
        assert!(!rx.send(&[]));
        assert_eq!(rx.stats().drop_too_big, 2);
    }

    /// Writes `data` (cut to the room) as payload and `hdr_len` bytes of 0xee as header;
    /// records what the back-end offered.
    struct TestWriter {
        data: Vec<u8>,
        give_up: bool,
        room: usize,
        got: Option<(usize, u16)>,
    }

    impl TestWriter {
        fn new(data: Vec<u8>) -> Self {
            TestWriter {
                data,
                give_up: false,
                room: 0,
                got: None,
            }
        }
    }

    impl FrameWriter for TestWriter {
        fn payload(&mut self, room: &[libc::iovec]) -> Option<usize> {
            self.room = room.iter().map(|v| v.iov_len).sum();
            if self.give_up {
                return None;
            }
            let mut n = 0;
            for v in room {
                let k = v.iov_len.min(self.data.len() - n);
                // SAFETY: test memory, no guest running; the iovec is lent for writing.
                unsafe {
                    std::ptr::copy_nonoverlapping(self.data[n..].as_ptr(), v.iov_base.cast(), k)
                };
                n += k;
            }
            Some(n)
        }
        fn header(&mut self, hdr: &mut [u8], len: usize, sum: u16) -> bool {
            hdr.fill(0xee);
            self.got = Some((len, sum));
            true
        }
    }

    const HDR: usize = 42;

    #[test]
    fn in_place_partial_fill_gives_back_the_rest() {
        let mem = memory();
        let mut d = Driver::new(&mem);
        let (mut rx, mut call) = started(&mem, &d, mrg(false));
        let bufs: Vec<_> = (0..4).map(|_| d.rx_buf(1024)).collect();
        let data = frame(100, 7);
        let mut w = TestWriter::new(data.clone());
        assert_eq!(rx.send_with(HDR, 1, 3000, &mut w), SendWith::Sent(100));
        assert_eq!(w.room, 3000, "room for the whole maximum, over 4 buffers");
        assert_eq!(w.got, Some((100, PartialSum::of(&data).value())));
        assert_eq!(rx.rx.ring.next_avail(), 1, "unused buffers rewound");
        assert_eq!(d.used_idx(), 0);
        rx.flush();
        assert_eq!(d.used_idx(), 1);
        assert_eq!(take(&mut call), 1);
        let (got, n) = read_frame(&d, &bufs, 0);
        assert_eq!(n, 1);
        assert!(got[..HDR].iter().all(|&b| b == 0xee));
        assert_eq!(&got[HDR..], &data[..]);
        // The next frame takes the next buffer.
        let mut w = TestWriter::new(frame(10, 1));
        assert_eq!(rx.send_with(HDR, 1, 10, &mut w), SendWith::Sent(10));
        rx.flush();
        let (got, _) = read_frame(&d, &bufs, 1);
        assert_eq!(got.len(), ETH_MIN_FRAME, "padded");
        assert_eq!(&got[HDR..HDR + 10], &frame(10, 1)[..]);
        assert!(got[HDR + 10..].iter().all(|&b| b == 0));
        assert_eq!(d.used_elem(1).0, u32::from(bufs[1].0));
    }

    #[test]
    fn in_place_mergeable_spread_sets_num_buffers() {
        let mem = memory();
        let mut d = Driver::new(&mem);
        let (mut rx, _call) = started(&mem, &d, mrg(true));
        let bufs: Vec<_> = (0..5).map(|_| d.rx_buf(1024)).collect();
        let data = frame(2500, 3);
        let mut w = TestWriter::new(data.clone());
        assert_eq!(rx.send_with(HDR, 1, 4000, &mut w), SendWith::Sent(2500));
        assert_eq!(rx.rx.ring.next_avail(), 3, "2554 bytes over 3 buffers");
        rx.flush();
        assert_eq!(d.used_idx(), 3);
        let (got, n) = read_frame(&d, &bufs, 0);
        assert_eq!(n, 3);
        assert_eq!(&got[HDR..], &data[..]);
        assert_eq!(w.got, Some((2500, PartialSum::of(&data).value())));
        assert_eq!(rx.stats().buffers, 3);
    }

    #[test]
    fn in_place_abandoned_frame_leaves_the_ring_as_it_was() {
        let mem = memory();
        let mut d = Driver::new(&mem);
        let (mut rx, _call) = started(&mem, &d, mrg(true));
        d.rx_buf(1024);
        d.rx_buf(1024);
        let mut w = TestWriter::new(vec![]);
        w.give_up = true;
        assert_eq!(rx.send_with(HDR, 1, 1500, &mut w), SendWith::Abandoned);
        assert_eq!(rx.rx.ring.next_avail(), 0);
        rx.flush();
        assert_eq!(d.used_idx(), 0);
        assert_eq!(rx.stats().frames, 0);
    }

    #[test]
    fn in_place_takes_less_than_the_maximum_when_the_ring_is_short() {
        let mem = memory();
        let mut d = Driver::new(&mem);
        let (mut rx, _call) = started(&mem, &d, mrg(true));
        d.rx_buf(1024);
        d.rx_buf(1024);
        let mut w = TestWriter::new(frame(60000, 1));
        assert_eq!(
            rx.send_with(HDR, 500, 60000, &mut w),
            SendWith::Sent(2048 - NET_HDR_LEN - HDR)
        );
        assert_eq!(rx.rx.ring.next_avail(), 2);
        // Too little left for the minimum: no room, and a kick is asked for.
        let mut w = TestWriter::new(frame(100, 1));
        assert_eq!(rx.send_with(HDR, 500, 600, &mut w), SendWith::NoRoom);
        assert_eq!(w.room, 0, "writer not called");
        assert_eq!(d.avail_event(), 2);
    }

    #[test]
    fn in_place_ring_running_dry_mid_batch_then_room_returns_on_kick() {
        let mem = memory();
        let mut d = Driver::new(&mem);
        let (mut rx, _call) = started(&mem, &d, mrg(true));
        let mut bufs: Vec<_> = (0..2).map(|_| d.rx_buf(1024)).collect();
        let mut sent = 0;
        for i in 0..4u8 {
            let mut w = TestWriter::new(frame(900, i));
            match rx.send_with(HDR, 900, 900, &mut w) {
                SendWith::Sent(900) => sent += 1,
                SendWith::NoRoom => break,
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(sent, 2);
        assert_eq!(rx.rx.ring.next_avail(), 2);
        assert!(!rx.room_returned(), "no buffers came yet");
        rx.flush();
        assert_eq!(d.used_idx(), 2);
        bufs.push(d.rx_buf(1024));
        rx.handle_kick();
        assert!(rx.room_returned());
        assert!(!rx.room_returned(), "reported once");
        let mut w = TestWriter::new(frame(900, 2));
        assert_eq!(rx.send_with(HDR, 900, 900, &mut w), SendWith::Sent(900));
        rx.flush();
        assert_eq!(read_frame(&d, &bufs, 2).0[HDR..], frame(900, 2)[..]);
    }

    #[test]
    fn in_place_waits_behind_pending_frames() {
        let mem = memory();
        let mut d = Driver::new(&mem);
        let (mut rx, _call) = started(&mem, &d, mrg(true));
        assert!(rx.send(&[&frame(100, 0)]), "queued: no buffers");
        let mut w = TestWriter::new(frame(100, 1));
        assert_eq!(rx.send_with(HDR, 1, 100, &mut w), SendWith::NoRoom);
        let bufs = vec![d.rx_buf(1024), d.rx_buf(1024)];
        rx.handle_kick();
        assert!(rx.room_returned());
        assert_eq!(rx.send_with(HDR, 1, 100, &mut w), SendWith::Sent(100));
        rx.flush();
        assert_eq!(read_frame(&d, &bufs, 0).0, frame(100, 0), "in order");
        assert_eq!(read_frame(&d, &bufs, 1).0[HDR..], frame(100, 1)[..]);
    }

    #[test]
    fn in_place_non_mergeable_offers_one_chain() {
        let mem = memory();
        let mut d = Driver::new(&mem);
        let feat = NetFeatures {
            event_idx: false,
            mrg_rxbuf: false,
            hdr_len: NET_HDR_LEN,
        };
        let (mut rx, _call) = started(&mem, &d, feat);
        let bufs = vec![d.rx_buf(1600), d.rx_buf(1600)];
        let mut w = TestWriter::new(frame(3000, 1));
        assert_eq!(
            rx.send_with(HDR, 1, 3000, &mut w),
            SendWith::Sent(1600 - NET_HDR_LEN - HDR)
        );
        assert_eq!(rx.rx.ring.next_avail(), 1);
        rx.flush();
        assert_eq!(read_frame(&d, &bufs, 0).1, 1);
    }

    #[test]
    fn pending_buffer_wraps_and_keeps_order() {
        let mut p = Pending::new(100, 8);
        let a = [1u8; 40];
        let b = [2u8; 40];
        let c = [3u8; 30];
        assert!(p.push(&[&a], 40));
        assert!(p.push(&[&b], 40));
        assert!(!p.push(&[&c], 30), "no room at the end nor the start");
        p.pop_front();
        assert!(p.push(&[&c[..10], &c[10..]], 30), "wraps to the start");
        assert_eq!(p.frames.back(), Some(&(0, 30)));
        assert!(!p.push(&[&a[..20]], 20), "would overwrite the head");
        assert!(p.push(&[&a[..10]], 10));
        assert_eq!(p.front(), Some(&b[..]));
        p.pop_front();
        assert_eq!(p.front(), Some(&c[..]));
        p.pop_front();
        assert_eq!(p.front(), Some(&a[..10]));
        p.pop_front();
        assert_eq!(p.front(), None);
        assert!(p.push(&[&[9u8; 100]], 100));
    }
}
