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
//! Batches ([`ToGuest::send_batch`], MRG_RXBUF only): one reservation covers several
//! messages (datagrams received with one `recvmmsg`), each given the buffers for a
//! predicted size. Their lengths are only known once received, so the frames are laid out
//! afterwards: a message shorter than predicted keeps its spare buffers as one byte of
//! zero Ethernet padding each (receivers trim a frame to its IP length); a longer one gets
//! more buffers for its tail, copied from the writer's private overflow; what was reserved
//! and not used is rewound (see `RxRing::deliver_batch` for why that is always possible
//! without returning a buffer empty).
//!
//! We send complete checksums and never negotiate GUEST_CSUM, so the header's `flags` and
//! GSO fields are always zero.

use std::collections::VecDeque;

use super::chain::{ChainError, ChainErrors, Seg, Segments};
use super::{LogLimit, NetFeatures, Pop, RingConfig, StartError, Vring, NUM_BUFFERS_OFFSET};
use crate::tap::{
    BatchWriter, FrameWriter, SendBatch, SendWith, ToGuest, ETH_MIN_FRAME, MAX_BATCH, MAX_FRAME,
    MAX_HDR,
};
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
    /// Frames of a batch dropped: longer than their reserved buffers, and none left for
    /// the rest (or the writer could not hold it).
    pub drop_no_tail: u64,
    /// Buffers of a batch reserved for a frame shorter than predicted, carried by a frame
    /// as one byte of trailing Ethernet padding each (see [`ToGuest::send_batch`] on
    /// [`RxQueue`]).
    pub padding_buffers: u64,
    /// Buffers returned empty because a malformed chain after them kept us from giving
    /// them back unused.
    pub returned_empty: u64,
    /// Lost notifications found by the watchdog (see "Lost notifications" in
    /// [`crate::virtio`]): buffers added without a kick, and interrupts sent again.
    pub late_kicks: u64,
    pub late_interrupts: u64,
}

#[derive(Clone, Copy, Debug)]
struct Reserved {
    head: u16,
    cap: u32,
    /// Its first segment in `RxRing::segs`.
    seg_start: usize,
    /// The available index it was popped at (where to rewind to give it back).
    avail: u16,
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
    /// State of one [`ToGuest::send_batch`].
    batch: Box<Batch>,
    stats: RxStats,
    log: LogLimit,
}

/// The buffers reserved for one message of a batch: `chains[first..end]`, with `room` bytes
/// of payload room after the headers.
#[derive(Clone, Copy, Debug, Default)]
struct Span {
    first: usize,
    end: usize,
    room: usize,
}

/// One buffer of a frame built by a batch: chain `chain` (an index in `RxRing::chains`)
/// used for `len` bytes, or one byte of padding (`hole`).
#[derive(Clone, Copy, Debug)]
struct Use {
    chain: usize,
    len: u32,
    hole: bool,
}

/// Per-batch state, allocated once.
#[derive(Debug)]
struct Batch {
    spans: Vec<Span>,
    ends: Vec<usize>,
    lens: [usize; MAX_BATCH],
    kept: [bool; MAX_BATCH],
    hdrs: Box<[[u8; MAX_HDR]]>,
    /// The buffers of the frames built, frame after frame, in used-ring order.
    plan: Vec<Use>,
    /// (message, first and end index in `plan`) of each frame built.
    frames: Vec<(usize, usize, usize)>,
    /// Which of `RxRing::chains` a frame uses.
    used: Vec<bool>,
}

impl Batch {
    /// The buffers of a message that makes no frame: before the first frame, they join
    /// `lead` (padding for the first frame kept, or rewound if none is); after one, they
    /// ride along as its padding, a byte each.
    fn orphan(&mut self, sp: Span, lead: &mut std::ops::Range<usize>) {
        if self.frames.is_empty() {
            *lead = lead.start..sp.end;
            return;
        }
        for c in sp.first..sp.end {
            self.plan.push(Use {
                chain: c,
                len: 1,
                hole: true,
            });
        }
        if let Some(f) = self.frames.last_mut() {
            f.2 = self.plan.len();
        }
    }

    fn new(max_chains: usize) -> Self {
        Batch {
            spans: Vec::with_capacity(MAX_BATCH),
            ends: Vec::with_capacity(MAX_BATCH),
            lens: [0; MAX_BATCH],
            kept: [false; MAX_BATCH],
            hdrs: vec![[0u8; MAX_HDR]; MAX_BATCH].into_boxed_slice(),
            plan: Vec::with_capacity(max_chains),
            frames: Vec::with_capacity(MAX_BATCH),
            used: Vec::with_capacity(max_chains),
        }
    }
}

/// [`RxQueue::snapshot`]: the ring and our waiting-for-room state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RxSnapshot {
    pub ring: super::RingSnapshot,
    pub enabled: bool,
    pub armed: bool,
    pub starved: bool,
    pub room: bool,
    pub pending: usize,
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
    /// The watchdog found buffers added since we armed, no kick yet (at `next_avail`).
    kick_due: super::Twice<u16>,
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
                batch: Box::new(Batch::new(max_chains)),
                stats: RxStats::default(),
                log: LogLimit::default(),
            },
            pending: Pending::new(pending_bytes.max(MAX_FRAME), pending_frames.max(1)),
            enabled: false,
            armed: false,
            starved: false,
            room: false,
            kick_due: super::Twice::default(),
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

    /// Where the queue stands, for a state dump.
    pub fn snapshot(&self) -> RxSnapshot {
        RxSnapshot {
            ring: self.rx.ring.snapshot(),
            enabled: self.enabled,
            armed: self.armed,
            starved: self.starved,
            room: self.room,
            pending: self.pending.frames.len(),
        }
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

    /// Looks for lost notifications (see "Lost notifications" in [`crate::virtio`]): a kick
    /// for buffers we wait for, an interrupt for frames we published. Returns whether the
    /// queue still has something to watch: it waits for buffers, or the driver hasn't
    /// caught up with what we published.
    pub fn watchdog(&mut self) -> bool {
        if !self.rx.ring.is_running() {
            return false;
        }
        let unkicked = self.armed && self.rx.ring.avail_moved_since_armed();
        if self
            .kick_due
            .seen(unkicked.then_some(self.rx.ring.next_avail()))
        {
            self.rx.stats.late_kicks += 1;
            self.handle_kick();
        }
        if self.rx.ring.reinterrupt_if_waiting() {
            self.rx.stats.late_interrupts += 1;
        }
        self.armed || self.kick_due.pending() || self.rx.ring.driver_behind()
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

/// What [`RxQueue::in_place`] needs to know of an in-place outcome.
trait InPlace: Copy {
    const NO_ROOM: Self;
    fn no_room(&self) -> bool;
    fn dropped(&self) -> bool;
}

impl InPlace for SendWith {
    const NO_ROOM: Self = SendWith::NoRoom;
    fn no_room(&self) -> bool {
        *self == SendWith::NoRoom
    }
    fn dropped(&self) -> bool {
        *self == SendWith::Dropped
    }
}

impl InPlace for SendBatch {
    const NO_ROOM: Self = SendBatch::NoRoom;
    fn no_room(&self) -> bool {
        *self == SendBatch::NoRoom
    }
    fn dropped(&self) -> bool {
        *self == SendBatch::Dropped
    }
}

impl RxQueue {
    /// Builds frames in place with `build`, if frames can go now and none wait before
    /// them. Without buffers, asks for a kick on the next ones (and tries once more if they
    /// raced in meanwhile); refusals are counted, and reported by
    /// [`ToGuest::room_returned`] once room is back.
    fn in_place<R: InPlace>(&mut self, mut build: impl FnMut(&mut RxRing) -> R) -> R {
        if self.is_ready() && self.has_pending() {
            self.service_pending();
        }
        // Frames queued before these go first.
        if !self.is_ready() || self.has_pending() {
            self.starved = true;
            self.rx.stats.no_room += 1;
            return R::NO_ROOM;
        }
        loop {
            let r = build(&mut self.rx);
            if r.no_room() {
                if self.starve() {
                    continue;
                }
                self.rx.stats.no_room += 1;
            } else if r.dropped() && self.rx.ring.is_broken() {
                self.rx.stats.broken += 1;
            }
            return r;
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
        self.in_place(|rx| rx.deliver_with(hdr_len, min_payload, max_payload, w))
    }

    /// With MRG_RXBUF: one reservation for the whole batch, each message's buffers sized
    /// for `size` (see `RxRing::deliver_batch`). Without, one frame per call
    /// ([`crate::tap::send_batch_one`]): a message must fit one chain, which can't be known
    /// before it is received.
    fn send_batch(
        &mut self,
        hdr_len: usize,
        size: usize,
        max_payload: usize,
        count: usize,
        w: &mut dyn BatchWriter,
    ) -> SendBatch {
        if !self.rx.feat.mrg_rxbuf {
            return crate::tap::send_batch_one(self, hdr_len, size, max_payload, w);
        }
        let max_payload = max_payload.min(MAX_FRAME.saturating_sub(hdr_len));
        let size = size.min(max_payload);
        if crate::tap::payload_room(hdr_len, size, size).is_none() {
            self.rx.stats.drop_too_big += 1;
            return SendBatch::Dropped;
        }
        let count = count.clamp(1, MAX_BATCH);
        self.in_place(|rx| rx.deliver_batch(hdr_len, size, max_payload, count, w))
    }

    fn batches(&self) -> bool {
        self.rx.feat.mrg_rxbuf
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
            let avail = self.ring.next_avail();
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
                            self.chains.push(Reserved {
                                head,
                                cap,
                                seg_start,
                                avail,
                            });
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

    /// Forgets the chains from index `first` on, and their segments (after a rewind).
    fn drop_chains_from(&mut self, first: usize) {
        let seg_end = self
            .chains
            .get(first)
            .map_or(self.segs.len(), |c| c.seg_start);
        self.chains.truncate(first);
        self.segs.truncate(seg_end);
    }

    /// Reserves buffers for up to `count` messages, `need` bytes each (virtio-net header
    /// included), into `batch.spans`. At least the first message gets its buffers, or
    /// nothing is reserved ([`Reserve::NoRoom`]); later ones until the ring or our segment
    /// list runs short. Returns the available index of the first buffer.
    fn reserve_batch(&mut self, need: usize, count: usize) -> Result<u16, Reserve> {
        let vnet = self.feat.hdr_len;
        self.segs.clear();
        self.chains.clear();
        self.batch.spans.clear();
        let mut start = self.ring.next_avail();
        'msgs: while self.batch.spans.len() < count {
            let first = self.chains.len();
            let msg_avail = self.ring.next_avail();
            let mut have = 0usize;
            while have < need {
                let seg_start = self.segs.len();
                let avail = self.ring.next_avail();
                let later = !self.batch.spans.is_empty();
                match self.ring.pop(&mut self.segs, true) {
                    Pop::Empty if later => {
                        // The batch is what was reserved before this message.
                        self.ring.rewind(msg_avail);
                        self.drop_chains_from(first);
                        break 'msgs;
                    }
                    Pop::Empty => {
                        self.ring.rewind(start);
                        return Err(Reserve::NoRoom);
                    }
                    Pop::Broken => return Err(Reserve::Dropped),
                    Pop::Chain { head, res } => {
                        let cap = match res {
                            Ok(cap) if (cap as usize) < vnet => Err(ChainError::TooShort),
                            other => other,
                        };
                        match cap {
                            Ok(cap) => {
                                self.chains.push(Reserved {
                                    head,
                                    cap,
                                    seg_start,
                                    avail,
                                });
                                have += cap as usize;
                            }
                            Err(_) if later => {
                                // Given back with this message's buffers: met again as the
                                // first of the next batch, and handled as below.
                                self.ring.rewind(msg_avail);
                                self.drop_chains_from(first);
                                break 'msgs;
                            }
                            Err(ChainError::TooManyDescriptors) if !self.chains.is_empty() => {
                                self.ring.rewind(start);
                                self.stats.drop_fragmented += 1;
                                return Err(Reserve::Dropped);
                            }
                            Err(e) => {
                                // As for a single frame: returned empty with the buffers
                                // reserved before it, and the reservation starts over.
                                self.segs.truncate(seg_start);
                                self.bad_chain(head, e);
                                self.segs.clear();
                                have = 0;
                                start = self.ring.next_avail();
                            }
                        }
                    }
                }
            }
            self.batch.spans.push(Span {
                first,
                end: self.chains.len(),
                room: 0,
            });
        }
        Ok(start)
    }

    /// [`ToGuest::send_batch`] on the ring (MRG_RXBUF).
    ///
    /// 1. *Reserve* buffers for `count` messages of `size` bytes (the first message, whose
    ///    size the writer knows, fits exactly).
    /// 2. Lend each message the payload room of its buffers; the writer receives.
    /// 3. *Plan* each frame kept, in order: its own buffers, as many as its bytes fill; if
    ///    it is shorter than predicted, the rest of its buffers stay in it as one byte of
    ///    zero padding each (the frame's IP length tells the guest where the datagram
    ///    ends); if longer, more buffers for the tail: those of messages not received first,
    ///    then new ones from the ring. The buffers of a message dropped (too big, header
    ///    refused) pad the frame before it (or the first one kept). This way every buffer
    ///    taken is either in a frame or, being after all of those, given back by a rewind:
    ///    the available ring only rewinds from its end, the used ring takes buffers in any
    ///    order, and a frame's buffers need only be consecutive in the used ring.
    /// 4. *Write* virtio-net and frame headers, tails, padding; *stage* the buffers, frame
    ///    after frame; *rewind* what is left.
    fn deliver_batch(
        &mut self,
        hdr_len: usize,
        size: usize,
        max_payload: usize,
        count: usize,
        w: &mut dyn BatchWriter,
    ) -> SendBatch {
        let vnet = self.feat.hdr_len;
        let need = vnet + (hdr_len + size).max(ETH_MIN_FRAME);
        let start = match self.reserve_batch(need, count) {
            Ok(start) => start,
            Err(Reserve::NoRoom) => return SendBatch::NoRoom,
            Err(_) => return SendBatch::Dropped,
        };
        let Some(mem) = self.ring.mem() else {
            self.ring.rewind(start);
            return SendBatch::Dropped;
        };
        // Room: everything after the headers, in each message's buffers.
        self.iov.clear();
        self.batch.ends.clear();
        let mut cut = None;
        for i in 0..self.batch.spans.len() {
            let sp = self.batch.spans[i];
            let segs = chain_segs(&self.chains, &self.segs, sp.first, sp.end);
            let cap: usize = self.chains[sp.first..sp.end]
                .iter()
                .map(|c| c.cap as usize)
                .sum();
            let before = self.iov.len();
            if !iovecs(
                mem,
                segs,
                vnet + hdr_len,
                cap - vnet - hdr_len,
                &mut self.iov,
            ) {
                self.lost_all();
                return SendBatch::Dropped;
            }
            let room: usize = self.iov[before..].iter().map(|v| v.iov_len).sum();
            if room < cap - vnet - hdr_len && i > 0 {
                // Out of iovecs: this message and the later ones go back.
                self.iov.truncate(before);
                cut = Some(i);
                break;
            }
            self.batch.spans[i].room = room;
            self.batch.ends.push(self.iov.len());
        }
        if let Some(i) = cut {
            let first = self.batch.spans[i].first;
            self.ring.rewind(self.chains[first].avail);
            self.drop_chains_from(first);
            self.batch.spans.truncate(i);
        }
        let m = self.batch.spans.len();
        let got = w
            .payloads(&self.iov, &self.batch.ends, &mut self.batch.lens[..m])
            .min(m);
        if got == 0 {
            self.ring.rewind(start);
            return SendBatch::Abandoned;
        }
        // Which frames stay, their headers, summed where the payloads are.
        let Some(mem) = self.ring.mem() else {
            self.ring.rewind(start);
            return SendBatch::Dropped;
        };
        for i in 0..got {
            let b = &mut *self.batch;
            b.kept[i] = false;
            let len = b.lens[i];
            if len > max_payload {
                // Too big: the writer knows from the length.
                continue;
            }
            let sp = b.spans[i];
            let in_place = len.min(sp.room);
            let tail = w.overflow(i);
            let segs = chain_segs(&self.chains, &self.segs, sp.first, sp.end);
            let sum = match sum_guest(mem, segs, vnet + hdr_len, in_place) {
                Some(mut sum) if tail.len() == len - in_place => {
                    sum.add(tail);
                    sum
                }
                _ => {
                    self.stats.drop_no_tail += 1;
                    continue;
                }
            };
            if !w.header(i, &mut b.hdrs[i][..hdr_len], len, sum.value()) {
                self.stats.drop_writer += 1;
                continue;
            }
            b.kept[i] = true;
        }
        self.plan_batch(got, hdr_len);
        self.write_batch(hdr_len, w);
        SendBatch::Sent {
            received: got,
            queued: self.batch.frames.len(),
        }
    }

    /// Step 3 of [`Self::deliver_batch`]: the buffers of each frame, into `batch.plan`.
    fn plan_batch(&mut self, got: usize, hdr_len: usize) {
        let vnet = self.feat.hdr_len;
        let m = self.batch.spans.len();
        // Buffers for tails: those of messages not received, then new ones.
        let mut spare = self
            .batch
            .spans
            .get(got)
            .map_or(self.chains.len(), |sp| sp.first);
        let spare_end = self
            .batch
            .spans
            .get(m - 1)
            .map_or(self.chains.len(), |sp| sp.end);
        let mut dry = false;
        // Chains before this index can't be given back by a rewind: a malformed chain
        // after them was returned already.
        let mut floor = 0;
        self.batch.plan.clear();
        self.batch.frames.clear();
        let mut lead_orphans = 0..0;
        for i in 0..got {
            let sp = self.batch.spans[i];
            if !self.batch.kept[i] {
                self.batch.orphan(sp, &mut lead_orphans);
                continue;
            }
            let len = self.batch.lens[i];
            let total = vnet + (hdr_len + len).max(ETH_MIN_FRAME);
            let at = self.batch.plan.len();
            let mut left = total;
            for c in sp.first..sp.end {
                if left > 0 {
                    let n = left.min(self.chains[c].cap as usize);
                    self.batch.plan.push(Use {
                        chain: c,
                        len: n as u32,
                        hole: false,
                    });
                    left -= n;
                } else {
                    self.batch.plan.push(Use {
                        chain: c,
                        len: 1,
                        hole: true,
                    });
                }
            }
            let spare_before = spare;
            while left > 0 {
                let c = if spare < spare_end {
                    spare += 1;
                    Some(spare - 1)
                } else if dry {
                    None
                } else {
                    self.pop_extra(&mut floor)
                };
                let Some(c) = c else {
                    dry = true;
                    break;
                };
                let n = left.min(self.chains[c].cap as usize);
                self.batch.plan.push(Use {
                    chain: c,
                    len: n as u32,
                    hole: false,
                });
                left -= n;
            }
            if left > 0 {
                // No buffers for its tail: dropped, its own buffers pad the frame before.
                self.stats.drop_no_tail += 1;
                self.batch.plan.truncate(at);
                spare = spare_before;
                self.batch.kept[i] = false;
                self.batch.orphan(sp, &mut lead_orphans);
                continue;
            }
            if self.batch.frames.is_empty() {
                for c in lead_orphans.clone() {
                    self.batch.plan.push(Use {
                        chain: c,
                        len: 1,
                        hole: true,
                    });
                }
            }
            self.batch.frames.push((i, at, self.batch.plan.len()));
        }
        // What is left: a rewind gives back what follows the last buffer used (and the
        // last malformed chain returned); anything before goes back empty.
        let b = &mut *self.batch;
        b.used.clear();
        b.used.resize(self.chains.len(), false);
        for u in &b.plan {
            b.used[u.chain] = true;
        }
        let mut k = self.chains.len();
        while k > floor && !b.used[k - 1] {
            k -= 1;
        }
        for c in 0..k {
            if !b.used[c] {
                self.ring.stage_used(self.chains[c].head, 0);
                self.stats.returned_empty += 1;
            }
        }
        if k < self.chains.len() {
            self.ring.rewind(self.chains[k].avail);
        }
    }

    /// Pops one more chain for a tail; `None` when the ring is dry. A malformed chain met
    /// is returned empty and moves `floor` past the chains taken so far.
    fn pop_extra(&mut self, floor: &mut usize) -> Option<usize> {
        let vnet = self.feat.hdr_len;
        loop {
            let seg_start = self.segs.len();
            let avail = self.ring.next_avail();
            match self.ring.pop(&mut self.segs, true) {
                Pop::Empty | Pop::Broken => return None,
                Pop::Chain { head, res } => {
                    let cap = match res {
                        Ok(cap) if (cap as usize) < vnet => Err(ChainError::TooShort),
                        other => other,
                    };
                    match cap {
                        Ok(cap) => {
                            self.chains.push(Reserved {
                                head,
                                cap,
                                seg_start,
                                avail,
                            });
                            return Some(self.chains.len() - 1);
                        }
                        Err(ChainError::TooManyDescriptors) if seg_start > 0 => {
                            // Our segment list is full: the chain may be fine.
                            self.ring.rewind(avail);
                            return None;
                        }
                        Err(e) => {
                            self.segs.truncate(seg_start);
                            self.ring.stage_used(head, 0);
                            self.stats.bad_chains.count(e);
                            *floor = self.chains.len();
                        }
                    }
                }
            }
        }
    }

    /// Step 4 of [`Self::deliver_batch`]: headers, tails, padding; staging.
    fn write_batch(&mut self, hdr_len: usize, w: &dyn BatchWriter) {
        let vnet = self.feat.hdr_len;
        const ZEROES: [u8; ETH_MIN_FRAME] = [0; ETH_MIN_FRAME];
        for f in 0..self.batch.frames.len() {
            let (i, a, z) = self.batch.frames[f];
            let len = self.batch.lens[i];
            let in_place = len.min(self.batch.spans[i].room);
            let frame = hdr_len + len;
            let padded = frame.max(ETH_MIN_FRAME);
            let uses = &self.batch.plan[a..z];
            let net_hdr = self.net_hdr((z - a) as u16);
            let ok = match self.ring.mem() {
                Some(mem) => {
                    let segs_of = |c: usize| chain_segs(&self.chains, &self.segs, c, c + 1);
                    write_frame(mem, uses, &segs_of, 0, &net_hdr[..vnet])
                        && write_frame(mem, uses, &segs_of, vnet, &self.batch.hdrs[i][..hdr_len])
                        && write_frame(
                            mem,
                            uses,
                            &segs_of,
                            vnet + hdr_len + in_place,
                            w.overflow(i),
                        )
                        && write_frame(mem, uses, &segs_of, vnet + frame, &ZEROES[..padded - frame])
                        && uses.iter().filter(|u| u.hole).all(|u| {
                            gather(mem, segs_of(u.chain), 0, std::iter::once(&ZEROES[..1]))
                        })
                }
                None => false,
            };
            let mut n = 0;
            for u in &self.batch.plan[a..z] {
                let len = if ok { u.len } else { 0 };
                self.ring.stage_used(self.chains[u.chain].head, len);
                n += 1;
                if u.hole {
                    self.stats.padding_buffers += u64::from(ok);
                }
            }
            if ok {
                self.stats.frames += 1;
                self.stats.bytes += frame as u64;
                self.stats.buffers += n;
            } else {
                self.stats.bad_chains.count(ChainError::Address);
            }
        }
    }

    /// Memory vanished under a whole reservation: give every buffer back empty.
    fn lost_all(&mut self) {
        for i in 0..self.chains.len() {
            let c = self.chains[i];
            self.ring.stage_used(c.head, 0);
        }
        self.stats.bad_chains.count(ChainError::Address);
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

/// The segments of `chains[first..end]`, consecutive in `segs`.
fn chain_segs<'s>(chains: &[Reserved], segs: &'s Segments, first: usize, end: usize) -> &'s [Seg] {
    let from = chains.get(first).map_or(segs.len(), |c| c.seg_start);
    let to = chains.get(end).map_or(segs.len(), |c| c.seg_start);
    &segs.as_slice()[from..to]
}

/// Writes `data` at byte `at` of a frame made of the buffers `uses` (holes excluded: they
/// come after the frame's bytes), `segs_of` giving each chain's segments.
fn write_frame<'s>(
    mem: &GuestMemoryMmap,
    uses: &[Use],
    segs_of: &dyn Fn(usize) -> &'s [Seg],
    mut at: usize,
    mut data: &[u8],
) -> bool {
    for u in uses.iter().filter(|u| !u.hole) {
        if data.is_empty() {
            break;
        }
        let n = u.len as usize;
        if at >= n {
            at -= n;
            continue;
        }
        let k = (n - at).min(data.len());
        if !gather(mem, segs_of(u.chain), at, std::iter::once(&data[..k])) {
            return false;
        }
        data = &data[k..];
        at = 0;
    }
    data.is_empty()
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

/// The RFC 1071 sum of `len` bytes of `segs` from byte `at` on, read where they lie (the
/// guest may write these bytes while we read them: the sum is then wrong and the guest
/// drops its own corrupted frame, which is all it can expect).
fn sum_guest(mem: &GuestMemoryMmap, segs: &[Seg], at: usize, mut len: usize) -> Option<PartialSum> {
    let (si, mut off) = locate(segs, at)?;
    let mut sum = PartialSum::default();
    for s in &segs[si..] {
        if len == 0 {
            break;
        }
        let n = (s.len as usize - off).min(len);
        for slice in mem.get_slices(s.addr.unchecked_add(off as u64), n) {
            let slice = slice.ok()?;
            // SAFETY: the host mapping of guest memory we hold mapped, `slice.len()` bytes,
            // read through the raw pointer (see `PartialSum::add_raw`).
            unsafe { sum.add_raw(slice.ptr_guard().as_ptr(), slice.len()) };
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
    use crate::tap::SendBatch;
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

    /// Buffers added while a frame waits, and the driver read our `avail_event` too early
    /// to kick: the watchdog delivers at its second look.
    #[test]
    fn buffers_added_without_a_kick_are_found_by_the_watchdog() {
        let mem = memory();
        let mut d = Driver::new(&mem);
        let (mut rx, _call) = started(&mem, &d, mrg(true));
        assert!(!rx.watchdog(), "nothing to watch");
        let f = frame(100, 1);
        assert!(rx.send(&[&f]));
        assert!(rx.has_pending());
        assert!(rx.watchdog(), "waits for buffers");
        let bufs = vec![d.rx_buf(1024)];
        assert!(rx.watchdog(), "first sighting: the kick may be on its way");
        assert!(rx.has_pending());
        rx.watchdog();
        assert!(!rx.has_pending(), "second: delivered as if kicked");
        assert_eq!(rx.stats().late_kicks, 1);
        rx.flush();
        assert_eq!(read_frame(&d, &bufs, 0).0[..100], f[..]);
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

    use crate::tap::testutil::{batch_frame, FakeBatch, XorShift};

    /// The frames in the used ring from element `from` on, and the buffer count of each.
    fn used_frames(d: &Driver, bufs: &[(u16, u64)], from: u16) -> Vec<(Vec<u8>, u16)> {
        let mut out = Vec::new();
        let mut i = from;
        while i != d.used_idx() {
            let (f, n) = read_frame(d, bufs, i);
            out.push((f, n));
            i = i.wrapping_add(n);
        }
        for k in from..d.used_idx() {
            assert_ne!(d.used_elem(k).1, 0, "zero-length used element {k}");
        }
        out
    }

    /// `got` is `want` plus zero padding bytes (one per padding buffer).
    fn padded_eq(got: &[u8], want: &[u8]) -> bool {
        got.len() >= want.len()
            && &got[..want.len()] == want
            && got[want.len()..].iter().all(|&b| b == 0)
    }

    #[test]
    fn batch_of_uniform_messages_one_buffer_each() {
        let mem = memory();
        let mut d = Driver::new(&mem);
        let (mut rx, mut call) = started(&mem, &d, mrg(true));
        let bufs: Vec<_> = (0..8).map(|_| d.rx_buf(2048)).collect();
        let msgs: Vec<Vec<u8>> = (0..5).map(|i| frame(1400, i)).collect();
        let mut w = FakeBatch::new(msgs.clone());
        assert_eq!(
            rx.send_batch(HDR, 1400, 60000, 6, &mut w),
            SendBatch::Sent {
                received: 5,
                queued: 5
            }
        );
        assert_eq!(w.rooms.len(), 6, "six messages offered room");
        assert!(w.rooms.iter().all(|&r| r == 2048 - NET_HDR_LEN - HDR));
        assert!(w.sums_right());
        assert_eq!(rx.rx.ring.next_avail(), 5, "the sixth buffer given back");
        assert_eq!(d.used_idx(), 0, "nothing visible before the flush");
        rx.flush();
        assert_eq!(take(&mut call), 1);
        let frames = used_frames(&d, &bufs, 0);
        assert_eq!(frames.len(), 5);
        for (i, (f, n)) in frames.iter().enumerate() {
            assert!((f, *n) == (&batch_frame(i, HDR, &msgs[i]), 1), "frame {i}");
        }
        assert_eq!(rx.stats().frames, 5);
    }

    /// Buffers of 1024 bytes, predicted size 1500 (two buffers per message): a shorter
    /// message keeps its second buffer as padding, a longer one takes the buffers of the
    /// messages not received, a too-long one is dropped and its buffers pad the frame
    /// before; nothing is returned empty and the rest is rewound.
    #[test]
    fn batch_of_mixed_sizes() {
        let mem = memory();
        let mut d = Driver::new(&mem);
        let (mut rx, _call) = started(&mem, &d, mrg(true));
        let bufs: Vec<_> = (0..16).map(|_| d.rx_buf(1024)).collect();
        let msgs = vec![
            frame(1500, 0),
            frame(100, 1),
            frame(3000, 2),
            frame(0, 3),
            frame(5000, 4),
        ];
        let mut w = FakeBatch::new(msgs.clone());
        assert_eq!(
            rx.send_batch(HDR, 1500, 4000, 7, &mut w),
            SendBatch::Sent {
                received: 5,
                queued: 4
            }
        );
        assert!(w.sums_right());
        rx.flush();
        let frames = used_frames(&d, &bufs, 0);
        assert_eq!(frames.len(), 4);
        assert!(frames[0] == (batch_frame(0, HDR, &msgs[0]), 2));
        assert_eq!(frames[1].1, 2, "the spare buffer pads the short frame");
        assert!(padded_eq(&frames[1].0, &batch_frame(1, HDR, &msgs[1])));
        // 12 + 42 + 3000 bytes: 3 buffers (its two and one of message 5's).
        assert!(frames[2] == (batch_frame(2, HDR, &msgs[2]), 3));
        // Its own two buffers (one of padding), and message 4's two (dropped).
        assert_eq!(frames[3].1, 4);
        assert!(padded_eq(&frames[3].0, &batch_frame(3, HDR, &msgs[3])));
        // 7 messages x 2 buffers reserved, 11 used: message 5's second and message 6's
        // two go back.
        assert_eq!(d.used_idx(), 11);
        assert_eq!(rx.rx.ring.next_avail(), 11);
        assert_eq!(rx.stats().padding_buffers, 4);
        assert_eq!(rx.stats().returned_empty, 0);
    }

    /// A tail needing more buffers than reserved: the spare ones, then new ones.
    #[test]
    fn batch_tail_takes_new_buffers_and_drops_without() {
        let mem = memory();
        let mut d = Driver::new(&mem);
        let (mut rx, _call) = started(&mem, &d, mrg(true));
        let bufs: Vec<_> = (0..6).map(|_| d.rx_buf(1024)).collect();
        // Two messages of one buffer each reserved; the second is 4000 bytes.
        let msgs = vec![frame(500, 0), frame(4000, 1)];
        let mut w = FakeBatch::new(msgs.clone());
        assert_eq!(
            rx.send_batch(HDR, 500, 60000, 2, &mut w),
            SendBatch::Sent {
                received: 2,
                queued: 2
            }
        );
        rx.flush();
        let frames = used_frames(&d, &bufs, 0);
        assert!(frames[0] == (batch_frame(0, HDR, &msgs[0]), 1));
        // 12 + 42 + 4000 bytes: its own buffer and three more.
        assert!(frames[1] == (batch_frame(1, HDR, &msgs[1]), 4));
        assert_eq!(rx.rx.ring.next_avail(), 5);

        // Four buffers: one each for three messages, and one left for a tail needing
        // two: the message is dropped, its own buffer pads the frame before it.
        let more: Vec<_> = (0..3).map(|_| d.rx_buf(1024)).collect();
        let bufs: Vec<_> = bufs.into_iter().chain(more).collect();
        let msgs = vec![frame(500, 5), frame(500, 6), frame(3000, 7)];
        let mut w = FakeBatch::new(msgs.clone());
        assert_eq!(
            rx.send_batch(HDR, 500, 60000, 3, &mut w),
            SendBatch::Sent {
                received: 3,
                queued: 2
            }
        );
        assert_eq!(rx.stats().drop_no_tail, 1);
        rx.flush();
        let frames = used_frames(&d, &bufs, 5);
        assert_eq!(frames.len(), 2);
        assert!(frames[0] == (batch_frame(0, HDR, &msgs[0]), 1));
        assert_eq!(frames[1].1, 2);
        assert!(padded_eq(&frames[1].0, &batch_frame(1, HDR, &msgs[1])));
        assert_eq!(d.used_idx(), 8);
        assert_eq!(rx.rx.ring.next_avail(), 8, "the tail's buffer given back");
    }

    /// The first message dropped (its header refused): its buffers pad the first frame
    /// kept. Fewer messages than reserved: the rest is rewound.
    #[test]
    fn batch_first_dropped_and_short_read() {
        let mem = memory();
        let mut d = Driver::new(&mem);
        let (mut rx, _call) = started(&mem, &d, mrg(true));
        let bufs: Vec<_> = (0..8).map(|_| d.rx_buf(1024)).collect();
        let msgs = vec![frame(200, 0), frame(200, 1)];
        let mut w = FakeBatch::new(msgs.clone());
        w.refuse = vec![0];
        assert_eq!(
            rx.send_batch(HDR, 200, 60000, 8, &mut w),
            SendBatch::Sent {
                received: 2,
                queued: 1
            }
        );
        assert_eq!(rx.stats().drop_writer, 1);
        rx.flush();
        let frames = used_frames(&d, &bufs, 0);
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].1, 2);
        assert!(padded_eq(&frames[0].0, &batch_frame(1, HDR, &msgs[1])));
        assert_eq!(rx.rx.ring.next_avail(), 2);
        // The writer receiving nothing gives everything back.
        let mut w = FakeBatch::new(vec![]);
        assert_eq!(
            rx.send_batch(HDR, 200, 60000, 8, &mut w),
            SendBatch::Abandoned
        );
        assert_eq!(rx.rx.ring.next_avail(), 2);
    }

    #[test]
    fn batch_without_buffers_waits_for_a_kick() {
        let mem = memory();
        let mut d = Driver::new(&mem);
        let (mut rx, _call) = started(&mem, &d, mrg(true));
        // Not enough for the first message.
        let small = d.rx_buf(512);
        let mut w = FakeBatch::new(vec![frame(1000, 0)]);
        assert_eq!(
            rx.send_batch(HDR, 1000, 60000, 4, &mut w),
            SendBatch::NoRoom
        );
        assert!(w.rooms.is_empty(), "writer not called");
        assert_eq!(rx.rx.ring.next_avail(), 0);
        assert_eq!(d.avail_event(), 1);
        let bufs = vec![small, d.rx_buf(1024)];
        rx.handle_kick();
        assert!(rx.room_returned());
        let mut w = FakeBatch::new(vec![frame(1000, 0)]);
        assert_eq!(
            rx.send_batch(HDR, 1000, 60000, 4, &mut w),
            SendBatch::Sent {
                received: 1,
                queued: 1
            }
        );
        rx.flush();
        let frames = used_frames(&d, &bufs, 0);
        assert!(frames[0] == (batch_frame(0, HDR, &frame(1000, 0)), 2));
    }

    /// Random sizes and buffer sizes: every frame kept arrives whole, in order, with no
    /// empty used element, and the buffers not used are back in the ring.
    #[test]
    fn batch_survives_random_sizes() {
        let mut x = XorShift(0x9e37_79b9);
        let mut rnd = |n: u32| x.below(n);
        for round in 0..200 {
            let mem = memory();
            let mut d = Driver::new(&mem);
            let (mut rx, _call) = started(&mem, &d, mrg(true));
            let nbufs = 1 + rnd(16) as usize;
            let bufs: Vec<_> = (0..nbufs).map(|_| d.rx_buf(256 + rnd(2048))).collect();
            let size = rnd(3000) as usize;
            let n = 1 + rnd(8) as usize;
            let msgs: Vec<Vec<u8>> = (0..n)
                .map(|i| {
                    let len = match (i, rnd(3)) {
                        (0, _) | (_, 0) => size,
                        _ => rnd(5000) as usize,
                    };
                    frame(len, (round + i) as u8)
                })
                .collect();
            let mut w = FakeBatch::new(msgs.clone());
            let r = rx.send_batch(HDR, size, 4000, n, &mut w);
            rx.flush();
            let frames = used_frames(&d, &bufs, 0);
            let used: u16 = frames.iter().map(|f| f.1).sum();
            assert_eq!(used, d.used_idx(), "round {round}");
            assert_eq!(
                rx.rx.ring.next_avail(),
                used,
                "round {round}: unused buffers rewound"
            );
            match r {
                SendBatch::NoRoom => assert!(frames.is_empty()),
                SendBatch::Sent { received, queued } => {
                    assert_eq!(frames.len(), queued, "round {round}");
                    let mut k = 0;
                    for (i, m) in msgs.iter().enumerate().take(received) {
                        if k < frames.len() && padded_eq(&frames[k].0, &batch_frame(i, HDR, m)) {
                            k += 1;
                        } else {
                            assert!(
                                m.len() > 4000 || rx.stats().drop_no_tail > 0,
                                "round {round}: message {i} lost"
                            );
                        }
                    }
                    assert_eq!(
                        k,
                        frames.len(),
                        "round {round}: frames out of order or damaged"
                    );
                }
                other => panic!("round {round}: {other:?}"),
            }
            assert!(w.sums_right());
        }
    }
}
