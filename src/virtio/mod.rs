//! The virtio-net data plane: one RX and one TX split virtqueue in guest memory.
//!
//! # Theory of operation
//!
//! The guest driver owns the descriptor table and the available ring; we own the used ring.
//! A descriptor chain belongs to us from the moment we read its head from the available ring
//! (`next_avail` moves past it) until we write it to the used ring *and publish* the used
//! index; after that it is the guest's again. We never keep a chain across calls: TX chains
//! are returned in the same drain that popped them, RX chains are either filled and staged or
//! given back by rewinding `next_avail` before the call returns. So at any point between two
//! calls the only state worth saving is `next_avail`, which is what `GET_VRING_BASE` answers.
//!
//! [`Vring`] wraps [`virtio_queue::Queue`] for ring geometry, chain walking (including
//! indirect tables) and `next_avail`, but writes used elements itself: `Queue::add_used`
//! publishes `used->idx` for every element, and a guest could then see buffer 1 of a
//! 3-buffer mergeable frame before buffers 2 and 3 exist (Linux drops such frames). Here used
//! elements are *staged* (`Vring::stage_used`) and made visible by one `used->idx` store per
//! batch (`Vring::publish`), followed by at most one call-eventfd write, decided by the
//! EVENT_IDX `used_event` test or the `VRING_AVAIL_F_NO_INTERRUPT` flag.
//!
//! Guest-to-device notifications (kicks) follow the usual EVENT_IDX drain: TX disables them,
//! drains, re-enables and re-checks the ring for chains that raced the re-enable. RX only asks
//! for kicks while frames wait in the pending queue for buffers (see [`rx`]).
//!
//! Everything a guest writes is untrusted: a malformed chain (see [`chain::ChainError`]) is
//! returned with length 0, counted, and logged at a limited rate; an available index that
//! jumps by more than the ring size marks the ring broken (the driver broke the ring
//! protocol; we stop using the ring and signal the error eventfd) until the front-end
//! restarts it. Nothing here panics on guest input.
//!
//! Ring 0 is RX (`receiveq1`), ring 1 is TX (`transmitq1`). No control queue, one pair.
//!
//! ## Lost notifications
//!
//! Both notification tests are a store-buffer handshake: each side writes its index, then
//! a full barrier, then reads the other side's event field. If either side's barrier is
//! missing, both can read the old value and each decide the other needs no notification:
//! the guest waits for an interrupt we never send, or we wait for a kick it never sends.
//! QEMU before 8.1 elides a TCG guest's barriers when it has one vCPU (QEMU commit
//! c914d46d0a, "tcg: Do not elide memory barriers for !CF_PARALLEL in system mode"), which
//! is what Debian 12 ships, and the store-load reordering then happens on x86 hosts too,
//! once in a few million notifications. As nothing on our side can restore the guest's
//! barrier, the device's watchdog ([`RxQueue::watchdog`], [`TxQueue::watchdog`], run every
//! 100 ms while there is traffic) looks for the aftermath instead: a driver still asking,
//! across two checks, for an interrupt at an index we already published past, or buffers
//! made available without a kick. Either is acted on as if the notification had arrived,
//! and counted.

pub mod chain;
pub mod rx;
pub mod tx;

use std::fs::File;
use std::io::Write;
use std::num::Wrapping;
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use virtio_bindings::bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

pub use chain::{ChainError, ChainErrors};
pub use rx::{RxQueue, RxSnapshot, RxStats};
pub use tx::{TxQueue, TxStats};

/// Index of a virtqueue of this device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct QueueIdx(pub u16);

impl QueueIdx {
    /// `receiveq1`: frames to the guest.
    pub const RX: QueueIdx = QueueIdx(0);
    /// `transmitq1`: frames from the guest.
    pub const TX: QueueIdx = QueueIdx(1);
    /// Number of virtqueues (one RX/TX pair).
    pub const COUNT: usize = 2;
}

/// `struct virtio_net_hdr_mrg_rxbuf`: the header in front of every frame when VERSION_1 or
/// MRG_RXBUF is negotiated.
pub const NET_HDR_LEN: usize = 12;
/// Legacy `struct virtio_net_hdr`, without `num_buffers`.
pub const NET_HDR_LEN_LEGACY: usize = 10;
/// Offset of `num_buffers` in the header.
const NUM_BUFFERS_OFFSET: usize = 10;

/// The spec's largest split queue.
pub const MAX_QUEUE_SIZE: u16 = 32768;
/// Largest queue size we accept from SET_VRING_NUM by default (QEMU's maximum for net).
pub const DEFAULT_MAX_QUEUE_SIZE: u16 = 1024;

/// What the negotiated features mean for the data plane.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NetFeatures {
    /// VIRTIO_RING_F_EVENT_IDX.
    pub event_idx: bool,
    /// VIRTIO_NET_F_MRG_RXBUF: a frame may span several RX chains.
    pub mrg_rxbuf: bool,
    /// Header length: [`NET_HDR_LEN`] or [`NET_HDR_LEN_LEGACY`].
    pub hdr_len: usize,
}

impl NetFeatures {
    /// Derives the data-plane view from an acked virtio feature set.
    pub fn from_acked(features: u64) -> Self {
        use virtio_bindings::bindings::virtio_config::VIRTIO_F_VERSION_1;
        use virtio_bindings::bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF;
        use virtio_bindings::bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
        let has = |bit: u32| features & (1u64 << bit) != 0;
        let mrg_rxbuf = has(VIRTIO_NET_F_MRG_RXBUF);
        NetFeatures {
            event_idx: has(VIRTIO_RING_F_EVENT_IDX),
            mrg_rxbuf,
            hdr_len: if mrg_rxbuf || has(VIRTIO_F_VERSION_1) {
                NET_HDR_LEN
            } else {
                NET_HDR_LEN_LEGACY
            },
        }
    }
}

/// Where a ring lives, in guest physical addresses, and where to resume.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingConfig {
    /// Number of descriptors (power of two).
    pub size: u16,
    /// Descriptor table.
    pub desc: u64,
    /// Available ring.
    pub avail: u64,
    /// Used ring.
    pub used: u64,
    /// First available-ring entry to process (SET_VRING_BASE).
    pub next_avail: u16,
}

/// Why a ring could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Size not a power of two, zero, or above our maximum.
    #[error("invalid ring size {0}")]
    Size(u16),
    /// Misaligned ring address.
    #[error("misaligned ring address")]
    Align(#[source] virtio_queue::Error),
    /// Ring parts outside guest memory.
    #[error("ring outside guest memory")]
    Memory,
}

/// Outcome of taking one chain off the available ring.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Pop {
    /// Nothing available.
    Empty,
    /// A chain; its segments were appended to the caller's list if `Ok`.
    Chain {
        head: u16,
        res: Result<u32, ChainError>,
    },
    /// The ring is (now) broken: stop using it.
    Broken,
}

/// One split virtqueue as seen by the device, with staged used-ring publication.
#[derive(Debug)]
pub struct Vring {
    queue: Queue,
    max_size: u16,
    /// Guest memory while running; `None` when stopped.
    mem: Option<GuestMemoryMmap>,
    call: Option<File>,
    err: Option<File>,
    /// Next used-ring slot to write (staged, maybe not yet visible).
    next_used: Wrapping<u16>,
    /// Value of `used->idx` the guest can see.
    published: Wrapping<u16>,
    event_idx: bool,
    broken: bool,
    log: LogLimit,
    /// The driver's `used_event` at the last [`Vring::reinterrupt_if_waiting`], if it named
    /// an index we had published past.
    waiting_at: Twice<u16>,
    /// The available index [`Vring::arm_for_new_buffers`] asked to be kicked past.
    armed_at: Option<u16>,
}

const USED_RING_HEADER: u64 = 4;
const USED_ELEM_SIZE: u64 = 8;
const AVAIL_RING_HEADER: u64 = 4;
const AVAIL_ELEM_SIZE: u64 = 2;

impl Vring {
    /// A stopped ring accepting sizes up to `max_size` (a power of two, at most 32768).
    pub fn new(max_size: u16) -> Self {
        let max_size = if max_size.is_power_of_two() && max_size <= MAX_QUEUE_SIZE {
            max_size
        } else {
            DEFAULT_MAX_QUEUE_SIZE
        };
        Vring {
            queue: Queue::new(max_size).expect("power of two within MAX_QUEUE_SIZE"),
            max_size,
            mem: None,
            call: None,
            err: None,
            next_used: Wrapping(0),
            published: Wrapping(0),
            event_idx: false,
            broken: false,
            log: LogLimit::default(),
            waiting_at: Twice::default(),
            armed_at: None,
        }
    }

    /// Largest size this ring accepts.
    pub fn max_size(&self) -> u16 {
        self.max_size
    }

    /// Starts processing: validates the geometry against `mem` and resumes at
    /// `cfg.next_avail`. The used index is taken from the ring itself, as a restarted ring
    /// continues where the guest last saw it.
    pub fn start(
        &mut self,
        mem: GuestMemoryMmap,
        cfg: &RingConfig,
        event_idx: bool,
    ) -> Result<(), StartError> {
        self.stop();
        let mut q = Queue::new(self.max_size).expect("validated in new()");
        q.try_set_size(cfg.size)
            .map_err(|_| StartError::Size(cfg.size))?;
        q.try_set_desc_table_address(GuestAddress(cfg.desc))
            .map_err(StartError::Align)?;
        q.try_set_avail_ring_address(GuestAddress(cfg.avail))
            .map_err(StartError::Align)?;
        q.try_set_used_ring_address(GuestAddress(cfg.used))
            .map_err(StartError::Align)?;
        q.set_event_idx(event_idx);
        q.set_ready(true);
        if !q.is_valid(&mem) {
            return Err(StartError::Memory);
        }
        let used_idx = q
            .used_idx(&mem, Ordering::Acquire)
            .map_err(|_| StartError::Memory)?;
        // We complete chains in order and never hold one across a stop, so anything between
        // the guest-visible used index and the saved base was in flight in another back-end
        // instance and is lost either way; resuming from the used index returns those buffers
        // to the guest as the next ones we process instead of leaking them.
        let next_avail = if used_idx.0 != cfg.next_avail {
            log::info!(
                "vring: base {} differs from used index {}, resuming at the used index",
                cfg.next_avail,
                used_idx
            );
            used_idx.0
        } else {
            cfg.next_avail
        };
        q.set_next_avail(next_avail);
        self.queue = q;
        self.next_used = used_idx;
        self.published = used_idx;
        self.event_idx = event_idx;
        self.broken = false;
        self.waiting_at = Twice::default();
        self.armed_at = None;
        self.mem = Some(mem);
        Ok(())
    }

    /// Stops processing after making every staged element visible. Returns the next
    /// available index (the answer to GET_VRING_BASE).
    pub fn stop(&mut self) -> u16 {
        self.publish();
        self.mem = None;
        self.broken = false;
        self.queue.next_avail()
    }

    /// Whether the ring was started and not stopped since (it may be broken).
    pub fn is_started(&self) -> bool {
        self.mem.is_some()
    }

    /// Whether the ring is started and not broken.
    pub fn is_running(&self) -> bool {
        self.mem.is_some() && !self.broken
    }

    /// Whether the guest broke the ring (avail index jump) since it was started.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// Next available-ring entry we will read.
    pub fn next_avail(&self) -> u16 {
        self.queue.next_avail()
    }

    /// Replaces guest memory (ADD_MEM_REG/REM_MEM_REG while running). If the ring no longer
    /// fits, it stops.
    pub fn set_mem(&mut self, mem: Option<GuestMemoryMmap>) {
        if self.mem.is_none() {
            return;
        }
        match mem {
            Some(m) if self.queue.is_valid(&m) => self.mem = Some(m),
            _ => {
                log::warn!("vring: ring no longer inside guest memory, stopping it");
                self.mem = None;
            }
        }
    }

    /// Sets (or clears) the call eventfd, written when the guest should look at the used ring.
    pub fn set_call(&mut self, call: Option<File>) {
        self.call = call;
    }

    /// Sets (or clears) the error eventfd, written when the ring breaks.
    pub fn set_err(&mut self, err: Option<File>) {
        self.err = err;
    }

    /// Takes the next chain off the available ring and walks it into `segs`.
    pub(crate) fn pop(&mut self, segs: &mut chain::Segments, write: bool) -> Pop {
        if self.broken {
            return Pop::Broken;
        }
        let Some(mem) = self.mem.as_ref() else {
            return Pop::Empty;
        };
        let chain = match self.queue.iter(mem) {
            Ok(mut it) => it.next(),
            Err(e) => {
                if self.log.allow() {
                    log::warn!("vring: {e}, marking ring broken");
                }
                self.broken = true;
                if let Some(err) = self.err.as_mut() {
                    let _ = err.write(&1u64.to_ne_bytes());
                }
                return Pop::Broken;
            }
        };
        let Some(chain) = chain else {
            return Pop::Empty;
        };
        let head = chain.head_index();
        let res = segs.walk(chain, mem, write);
        Pop::Chain { head, res }
    }

    /// Puts back the chains popped since `next_avail` was `to`.
    pub(crate) fn rewind(&mut self, to: u16) {
        self.queue.set_next_avail(to);
    }

    /// Writes one used element without making it visible.
    pub(crate) fn stage_used(&mut self, head: u16, len: u32) {
        let Some(mem) = self.mem.as_ref() else {
            return;
        };
        let slot = u64::from(self.next_used.0 % self.queue.size());
        let addr = GuestAddress(self.queue.used_ring())
            .unchecked_add(USED_RING_HEADER + slot * USED_ELEM_SIZE);
        // struct virtq_used_elem { le32 id; le32 len; } as one little-endian u64.
        let elem = u64::to_le(u64::from(head) | (u64::from(len) << 32));
        if mem.write_obj(elem, addr).is_ok() {
            self.next_used += Wrapping(1);
        }
    }

    /// Whether staged elements wait for [`Vring::publish`].
    pub(crate) fn has_staged(&self) -> bool {
        self.next_used != self.published
    }

    /// Makes staged used elements visible with one index store, then writes the call
    /// eventfd if the guest asked to be interrupted.
    pub(crate) fn publish(&mut self) {
        if !self.has_staged() {
            return;
        }
        let Some(mem) = self.mem.as_ref() else {
            return;
        };
        let old = self.published;
        let new = self.next_used;
        let idx_addr = GuestAddress(self.queue.used_ring()).unchecked_add(2);
        if mem
            .store(u16::to_le(new.0), idx_addr, Ordering::Release)
            .is_err()
        {
            return;
        }
        self.published = new;
        if self.needs_interrupt(mem, old, new) {
            self.interrupt();
        }
    }

    fn interrupt(&mut self) {
        if let Some(call) = self.call.as_mut() {
            let _ = call.write(&1u64.to_ne_bytes());
        }
    }

    /// Interrupts the driver again if it still waits for an interrupt we decided it didn't
    /// need (see "Lost notifications" in the module documentation): its `used_event` names
    /// an index we have published past, as it did at the previous call. A driver caught
    /// between publication and its interrupt handler would have moved on by then; one
    /// polling the ring with interrupts off gets one spare interrupt, which it ignores.
    /// Returns whether it interrupted. Only with EVENT_IDX: without it, nothing tells what
    /// the driver has seen.
    pub(crate) fn reinterrupt_if_waiting(&mut self) -> bool {
        let used_event = match self.mem.as_ref() {
            Some(mem) if self.event_idx && !self.broken => mem
                .load::<u16>(self.used_event_addr(), Ordering::Acquire)
                .ok()
                .map(u16::from_le),
            _ => None,
        };
        let passed = used_event.filter(|&e| {
            let ahead = (self.published - Wrapping(e)).0;
            (1..=self.queue.size()).contains(&ahead)
        });
        let missed = self.waiting_at.seen(passed);
        if missed {
            self.interrupt();
        }
        missed
    }

    /// Whether the driver made buffers available beyond `since` (see "Lost notifications"
    /// in the module documentation: no kick may come for them).
    fn avail_past(&self, since: u16) -> bool {
        match self.mem.as_ref() {
            Some(mem) if !self.broken => self
                .queue
                .avail_idx(mem, Ordering::Acquire)
                .is_ok_and(|i| i.0 != since),
            _ => false,
        }
    }

    /// Whether chains wait that we haven't read (TX: a kick may be lost).
    pub(crate) fn avail_moved(&self) -> bool {
        self.avail_past(self.queue.next_avail())
    }

    /// Whether buffers were added since the last [`Vring::arm_for_new_buffers`] (RX: its
    /// kick may be lost).
    pub(crate) fn avail_moved_since_armed(&self) -> bool {
        self.armed_at.is_some_and(|a| self.avail_past(a))
    }

    /// Whether the last [`Vring::reinterrupt_if_waiting`] found the driver waiting for an
    /// interrupt at an index we passed (the next call decides whether it missed it).
    pub(crate) fn driver_behind(&self) -> bool {
        self.waiting_at.pending()
    }

    /// virtio 1.2, 2.7.10: with EVENT_IDX, interrupt iff `used_event` lies in `[old, new)`;
    /// without, unless the driver set `VRING_AVAIL_F_NO_INTERRUPT`.
    fn needs_interrupt(
        &self,
        mem: &GuestMemoryMmap,
        old: Wrapping<u16>,
        new: Wrapping<u16>,
    ) -> bool {
        // Our used->idx store must be visible before we read the driver's suppression state,
        // or we could miss an interrupt the driver asked for in between.
        fence(Ordering::SeqCst);
        if self.event_idx {
            match mem.load::<u16>(self.used_event_addr(), Ordering::Relaxed) {
                Ok(v) => need_event(Wrapping(u16::from_le(v)), new, old),
                Err(_) => true,
            }
        } else {
            match mem.load::<u16>(GuestAddress(self.queue.avail_ring()), Ordering::Relaxed) {
                Ok(flags) => u16::from_le(flags) & VRING_AVAIL_F_NO_INTERRUPT as u16 == 0,
                Err(_) => true,
            }
        }
    }

    /// Asks the guest not to kick us (no-op with EVENT_IDX: kicks stop by themselves once
    /// `avail_event` is left behind).
    pub(crate) fn disable_notification(&mut self) {
        if let Some(mem) = self.mem.as_ref() {
            let _ = self.queue.disable_notification(mem);
        }
    }

    /// Asks the guest to kick us on the next available buffer. Returns `true` if buffers
    /// arrived meanwhile (the caller must look again: no kick will come for them).
    pub(crate) fn enable_notification(&mut self) -> bool {
        match self.mem.as_ref() {
            Some(mem) if !self.broken => self.queue.enable_notification(mem).unwrap_or(false),
            _ => false,
        }
    }

    /// Asks for a kick as soon as the guest adds *any* buffer, including when buffers it
    /// already added are not enough for us (RX waiting for room). With EVENT_IDX that means
    /// `avail_event` = the current avail index, not `next_avail`: the guest kicks only when its
    /// index crosses `avail_event`, and it is already past `next_avail`. Returns `true` if the
    /// avail index moved while arming (the caller must retry: that kick may never come).
    pub(crate) fn arm_for_new_buffers(&mut self) -> bool {
        let Some(mem) = self.mem.as_ref().filter(|_| !self.broken) else {
            return false;
        };
        let Ok(before) = self.queue.avail_idx(mem, Ordering::Acquire) else {
            return false;
        };
        self.armed_at = Some(before.0);
        let ok = if self.event_idx {
            mem.store(
                u16::to_le(before.0),
                self.avail_event_addr(),
                Ordering::Relaxed,
            )
            .is_ok()
        } else {
            mem.store(
                0u16,
                GuestAddress(self.queue.used_ring()),
                Ordering::Relaxed,
            )
            .is_ok()
        };
        // The guest must see our request before we look at its index again.
        fence(Ordering::SeqCst);
        match self.queue.avail_idx(mem, Ordering::Acquire) {
            Ok(after) => ok && after != before,
            Err(_) => false,
        }
    }

    /// Guest memory, while running.
    pub(crate) fn mem(&self) -> Option<&GuestMemoryMmap> {
        self.mem.as_ref()
    }

    /// Both sides' indices and event fields as they are now, for a state dump.
    pub fn snapshot(&self) -> RingSnapshot {
        let mut snap = RingSnapshot {
            running: self.is_running(),
            next_avail: self.queue.next_avail(),
            next_used: self.next_used.0,
            published: self.published.0,
            ..RingSnapshot::default()
        };
        let Some(mem) = self.mem.as_ref() else {
            return snap;
        };
        let avail = GuestAddress(self.queue.avail_ring());
        let load = |a: GuestAddress| mem.load::<u16>(a, Ordering::Acquire).ok().map(u16::from_le);
        snap.avail_idx = load(avail.unchecked_add(2));
        snap.avail_flags = load(avail);
        snap.used_event = load(self.used_event_addr());
        snap.used_flags = load(GuestAddress(self.queue.used_ring()));
        snap.avail_event = load(self.avail_event_addr());
        snap
    }

    /// `used_event` (EVENT_IDX): the driver's word after its available ring.
    fn used_event_addr(&self) -> GuestAddress {
        GuestAddress(self.queue.avail_ring())
            .unchecked_add(AVAIL_RING_HEADER + AVAIL_ELEM_SIZE * u64::from(self.queue.size()))
    }

    /// `avail_event` (EVENT_IDX): our word after the used ring.
    fn avail_event_addr(&self) -> GuestAddress {
        GuestAddress(self.queue.used_ring())
            .unchecked_add(USED_RING_HEADER + USED_ELEM_SIZE * u64::from(self.queue.size()))
    }
}

/// A ring's state, read without changing it ([`Vring::snapshot`]). Guest-side fields are
/// `None` while the ring is stopped.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RingSnapshot {
    pub running: bool,
    /// Our next read of the available ring.
    pub next_avail: u16,
    /// Our next used slot (staged), and the used index the guest sees.
    pub next_used: u16,
    pub published: u16,
    /// The driver's available index and flags, and `used_event` (EVENT_IDX).
    pub avail_idx: Option<u16>,
    pub avail_flags: Option<u16>,
    pub used_event: Option<u16>,
    /// Our used flags, and `avail_event` (EVENT_IDX).
    pub used_flags: Option<u16>,
    pub avail_event: Option<u16>,
}

/// A suspicion confirmed only when the same value is seen at two checks in a row: the
/// watchdog's way to tell a lost notification from one still on its way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Twice<T>(Option<T>);

impl<T> Default for Twice<T> {
    fn default() -> Self {
        Twice(None)
    }
}

impl<T: PartialEq + Copy> Twice<T> {
    /// Records this check's value (`None`: nothing suspicious); `true` if it repeats the
    /// last one, which then starts over.
    pub(crate) fn seen(&mut self, now: Option<T>) -> bool {
        let again = now.is_some() && now == self.0;
        self.0 = if again { None } else { now };
        again
    }

    /// Whether the last check saw something (the next may confirm it).
    pub(crate) fn pending(&self) -> bool {
        self.0.is_some()
    }
}

/// `vring_need_event()`: whether `event_idx` lies in `[old, new)`, modulo 2^16.
pub fn need_event(event_idx: Wrapping<u16>, new: Wrapping<u16>, old: Wrapping<u16>) -> bool {
    new - event_idx - Wrapping(1) < new - old
}

/// At most [`LogLimit::BURST`] messages per [`LogLimit::WINDOW`], so a guest can't flood logs.
#[derive(Debug, Default)]
pub(crate) struct LogLimit {
    window: Option<Instant>,
    count: u32,
}

impl LogLimit {
    const WINDOW: Duration = Duration::from_secs(1);
    const BURST: u32 = 5;

    pub(crate) fn allow(&mut self) -> bool {
        let now = Instant::now();
        match self.window {
            Some(start) if now.duration_since(start) < Self::WINDOW => {}
            _ => {
                self.window = Some(now);
                self.count = 0;
            }
        }
        self.count += 1;
        self.count <= Self::BURST
    }
}

#[cfg(test)]
pub(crate) mod testutil {
    //! A guest driver for unit tests: `MockSplitQueue` for the descriptor table and avail
    //! ring, with the used ring moved to its own address (the mock's own used ring overlaps
    //! the end of its avail ring).
    use super::*;
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;

    pub const MEM_SIZE: usize = 0x40_0000;
    pub const USED_ADDR: u64 = 0x10_0000;
    pub const BUF_BASE: u64 = 0x20_0000;
    pub const QSIZE: u16 = 16;

    pub fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("test memory")
    }

    /// Test driver state: where the next descriptor and buffer go.
    pub struct Driver<'a> {
        pub vq: MockSplitQueue<'a, GuestMemoryMmap>,
        pub mem: &'a GuestMemoryMmap,
        used: u64,
        next_desc: u16,
        next_buf: u64,
    }

    impl<'a> Driver<'a> {
        pub fn new(mem: &'a GuestMemoryMmap) -> Self {
            // Avoid GPA 0 for the avail ring (virtio-queue treats 0 as "not set").
            Self::at(mem, 0x1000, USED_ADDR, BUF_BASE)
        }

        /// A driver with its rings and buffers elsewhere, to share memory with another.
        pub fn at(mem: &'a GuestMemoryMmap, ring: u64, used: u64, bufs: u64) -> Self {
            let vq = MockSplitQueue::create(mem, GuestAddress(ring), QSIZE);
            Driver {
                vq,
                mem,
                used,
                next_desc: 0,
                next_buf: bufs,
            }
        }

        pub fn config(&self) -> RingConfig {
            RingConfig {
                size: QSIZE,
                desc: self.vq.desc_table_addr().0,
                avail: self.vq.avail_addr().0,
                used: self.used,
                next_avail: 0,
            }
        }

        pub fn alloc_buf(&mut self, len: u32) -> u64 {
            let a = self.next_buf;
            self.next_buf += u64::from(len).next_multiple_of(64);
            a
        }

        /// The table slot the next descriptor goes to.
        pub fn next_slot(&self) -> u16 {
            self.next_desc % QSIZE
        }

        /// Writes raw descriptors at consecutive table slots and returns the first index.
        pub fn put_descs(&mut self, descs: &[(u64, u32, u16, u16)]) -> u16 {
            let first = self.next_desc;
            for &(addr, len, flags, next) in descs {
                let d = RawDescriptor::from(Descriptor::new(addr, len, flags, next));
                self.vq
                    .desc_table()
                    .store(self.next_desc % QSIZE, d)
                    .expect("desc store");
                self.next_desc = self.next_desc.wrapping_add(1);
            }
            first % QSIZE
        }

        /// Builds a chain of buffers (device-readable unless `write`) holding `data`
        /// split at `splits`; returns the head.
        pub fn chain(&mut self, data: &[u8], splits: &[usize], write: bool) -> u16 {
            let mut bounds = vec![0];
            bounds.extend_from_slice(splits);
            bounds.push(data.len());
            let n = bounds.len() - 1;
            let first = self.next_desc % QSIZE;
            let mut descs = Vec::new();
            for i in 0..n {
                let part = &data[bounds[i]..bounds[i + 1]];
                let addr = self.alloc_buf(part.len() as u32);
                self.mem.write_slice(part, GuestAddress(addr)).expect("buf");
                let mut flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
                let next = (first + i as u16 + 1) % QSIZE;
                if i + 1 < n {
                    flags |= VRING_DESC_F_NEXT as u16;
                }
                descs.push((addr, part.len() as u32, flags, next));
            }
            self.put_descs(&descs)
        }

        /// Offers a chain head in the avail ring.
        pub fn offer(&mut self, head: u16) {
            let idx = self.vq.avail().idx().load();
            self.vq
                .avail()
                .ring()
                .ref_at(usize::from(idx % QSIZE))
                .expect("avail slot")
                .store(head);
            self.vq.avail().idx().store(idx.wrapping_add(1));
        }

        /// A TX frame: header (zeroed) + payload, split as asked.
        pub fn tx(&mut self, payload: &[u8], splits: &[usize]) {
            let mut data = vec![0u8; NET_HDR_LEN];
            data.extend_from_slice(payload);
            let h = self.chain(&data, splits, false);
            self.offer(h);
        }

        /// An RX buffer of `len` writable bytes.
        pub fn rx_buf(&mut self, len: u32) -> (u16, u64) {
            let zero = vec![0u8; len as usize];
            let h = self.chain(&zero, &[], true);
            self.offer(h);
            let d = self.vq.desc_table().load(h).expect("desc");
            (h, Descriptor::from(d).addr().0)
        }

        /// Guest address of the used ring.
        pub fn used_addr(&self) -> u64 {
            self.used
        }

        pub fn used_idx(&self) -> u16 {
            self.mem
                .load::<u16>(GuestAddress(self.used + 2), Ordering::Acquire)
                .expect("used idx")
        }

        pub fn used_elem(&self, i: u16) -> (u32, u32) {
            let a = self.used + 4 + 8 * u64::from(i % QSIZE);
            let id: u32 = self.mem.read_obj(GuestAddress(a)).expect("id");
            let len: u32 = self.mem.read_obj(GuestAddress(a + 4)).expect("len");
            (id, len)
        }

        pub fn set_used_event(&self, v: u16) {
            let a = self.vq.avail_addr().0 + 4 + 2 * u64::from(QSIZE);
            self.mem.write_obj(v, GuestAddress(a)).expect("used_event");
        }

        pub fn avail_event(&self) -> u16 {
            let a = self.used + 4 + 8 * u64::from(QSIZE);
            self.mem.read_obj(GuestAddress(a)).expect("avail_event")
        }

        pub fn used_flags(&self) -> u16 {
            self.mem.read_obj(GuestAddress(self.used)).expect("flags")
        }

        pub fn set_avail_flags(&self, v: u16) {
            self.mem
                .write_obj(v, self.vq.avail_addr())
                .expect("avail flags");
        }
    }

    /// An eventfd-like pipe: a `File` we can hand to the ring plus a way to count writes.
    pub fn eventfd() -> (File, File) {
        let fd = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let dup = fd.try_clone().expect("dup");
        use std::os::fd::{FromRawFd, IntoRawFd};
        // SAFETY: both fds are freshly created and owned by nobody else.
        unsafe {
            (
                File::from_raw_fd(fd.into_raw_fd()),
                File::from_raw_fd(dup.into_raw_fd()),
            )
        }
    }

    /// Reads an eventfd counter (0 if not signalled).
    pub fn take(ev: &mut File) -> u64 {
        use std::io::Read;
        let mut b = [0u8; 8];
        match ev.read(&mut b) {
            Ok(8) => u64::from_ne_bytes(b),
            _ => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testutil::*;
    use super::*;

    #[test]
    fn need_event_wraps() {
        let w = Wrapping;
        assert!(need_event(w(0), w(1), w(0)));
        assert!(!need_event(w(1), w(1), w(0)));
        assert!(need_event(w(5), w(10), w(0)));
        assert!(!need_event(w(10), w(10), w(0)));
        assert!(need_event(w(65535), w(2), w(65534)));
        assert!(!need_event(w(3), w(2), w(65534)));
    }

    #[test]
    fn features_to_header_length() {
        let f = NetFeatures::from_acked(1 << 32);
        assert_eq!(f.hdr_len, NET_HDR_LEN);
        assert!(!f.mrg_rxbuf);
        let f = NetFeatures::from_acked(0);
        assert_eq!(f.hdr_len, NET_HDR_LEN_LEGACY);
        let f = NetFeatures::from_acked((1 << 15) | (1 << 29));
        assert_eq!(f.hdr_len, NET_HDR_LEN);
        assert!(f.mrg_rxbuf && f.event_idx);
    }

    #[test]
    fn start_rejects_bad_geometry() {
        let mem = memory();
        let d = Driver::new(&mem);
        let mut r = Vring::new(256);
        let mut cfg = d.config();
        cfg.size = 12;
        assert!(matches!(
            r.start(mem.clone(), &cfg, false),
            Err(StartError::Size(12))
        ));
        cfg.size = 512;
        assert!(matches!(
            r.start(mem.clone(), &cfg, false),
            Err(StartError::Size(512))
        ));
        let mut cfg = d.config();
        cfg.used = MEM_SIZE as u64 - 8;
        assert!(matches!(
            r.start(mem.clone(), &cfg, false),
            Err(StartError::Memory)
        ));
        let mut cfg = d.config();
        cfg.desc += 8;
        assert!(matches!(
            r.start(mem.clone(), &cfg, false),
            Err(StartError::Align(_))
        ));
        assert!(!r.is_running());
        r.start(mem.clone(), &d.config(), false).expect("valid");
        assert!(r.is_running());
    }

    /// A started ring of 256 over `d`'s rings, and the receiving end of its call eventfd.
    fn started(mem: &GuestMemoryMmap, d: &Driver, event_idx: bool) -> (Vring, File) {
        let (call, call_rx) = eventfd();
        let mut r = Vring::new(256);
        r.start(mem.clone(), &d.config(), event_idx).expect("start");
        r.set_call(Some(call));
        (r, call_rx)
    }

    #[test]
    fn staged_elements_are_invisible_until_published() {
        let mem = memory();
        let mut d = Driver::new(&mem);
        let (mut r, mut call_rx) = started(&mem, &d, false);
        for _ in 0..3 {
            d.rx_buf(64);
        }
        let mut segs = chain::Segments::with_capacity(8);
        for _ in 0..3 {
            let Pop::Chain { head, res } = r.pop(&mut segs, true) else {
                panic!("expected chain")
            };
            assert_eq!(res, Ok(64));
            r.stage_used(head, 10);
            assert_eq!(d.used_idx(), 0, "element visible before publication");
        }
        assert_eq!(take(&mut call_rx), 0);
        r.publish();
        assert_eq!(d.used_idx(), 3);
        assert_eq!(take(&mut call_rx), 1, "one interrupt per batch");
        assert_eq!(d.used_elem(2).1, 10);
    }

    #[test]
    fn no_interrupt_flag_is_honoured() {
        let mem = memory();
        let mut d = Driver::new(&mem);
        let (mut r, mut call_rx) = started(&mem, &d, false);
        d.set_avail_flags(VRING_AVAIL_F_NO_INTERRUPT as u16);
        d.rx_buf(64);
        let mut segs = chain::Segments::with_capacity(8);
        let Pop::Chain { head, .. } = r.pop(&mut segs, true) else {
            panic!()
        };
        r.stage_used(head, 0);
        r.publish();
        assert_eq!(d.used_idx(), 1);
        assert_eq!(take(&mut call_rx), 0);
    }

    #[test]
    fn event_idx_interrupts_only_when_crossing_used_event() {
        let mem = memory();
        let mut d = Driver::new(&mem);
        let (mut r, mut call_rx) = started(&mem, &d, true);
        // Driver wants an interrupt once used->idx passes 2 (i.e. after the 3rd element).
        d.set_used_event(2);
        let mut segs = chain::Segments::with_capacity(8);
        for i in 0..4u16 {
            d.rx_buf(64);
            let Pop::Chain { head, .. } = r.pop(&mut segs, true) else {
                panic!()
            };
            r.stage_used(head, 0);
            r.publish();
            let fired = take(&mut call_rx);
            assert_eq!(fired, u64::from(i == 2), "element {i}");
        }
    }

    /// The driver's `used_event` store reaches memory only after our publication read the
    /// old value (a barrier missing on its side): the watchdog interrupts at its second look.
    #[test]
    fn interrupt_the_driver_missed_is_sent_again() {
        let mem = memory();
        let mut d = Driver::new(&mem);
        let (mut r, mut call_rx) = started(&mem, &d, true);
        let mut segs = chain::Segments::with_capacity(8);
        let mut publish = |r: &mut Vring, d: &mut Driver| {
            d.rx_buf(64);
            let Pop::Chain { head, .. } = r.pop(&mut segs, true) else {
                panic!("a chain")
            };
            r.stage_used(head, 0);
            r.publish();
        };
        // Caught up (used_event = used index): nothing to do, however often we look.
        d.set_used_event(0);
        for _ in 0..3 {
            assert!(!r.reinterrupt_if_waiting());
            assert!(!r.driver_behind());
        }
        // Published while the driver's new used_event (0) was still in its store buffer:
        // we saw the old one (100) and sent nothing.
        d.set_used_event(100);
        publish(&mut r, &mut d);
        publish(&mut r, &mut d);
        assert_eq!(take(&mut call_rx), 0);
        d.set_used_event(0);
        assert!(
            !r.reinterrupt_if_waiting(),
            "first sighting: maybe on its way"
        );
        assert!(r.driver_behind());
        assert_eq!(take(&mut call_rx), 0);
        assert!(r.reinterrupt_if_waiting(), "still waiting: missed");
        assert_eq!(take(&mut call_rx), 1);
        // It caught up meanwhile: no more.
        d.set_used_event(2);
        assert!(!r.reinterrupt_if_waiting());
        assert!(!r.reinterrupt_if_waiting());
        assert_eq!(take(&mut call_rx), 0);
        // A driver that moves between looks is on its way, not stuck.
        publish(&mut r, &mut d);
        publish(&mut r, &mut d);
        take(&mut call_rx);
        d.set_used_event(2);
        assert!(!r.reinterrupt_if_waiting());
        d.set_used_event(3);
        assert!(!r.reinterrupt_if_waiting());
        assert_eq!(take(&mut call_rx), 0);
    }

    #[test]
    fn avail_index_jump_breaks_the_ring() {
        let mem = memory();
        let d = Driver::new(&mem);
        let (err, mut err_rx) = eventfd();
        let mut r = Vring::new(256);
        r.start(mem.clone(), &d.config(), false).expect("start");
        r.set_err(Some(err));
        d.vq.avail().idx().store(QSIZE + 1);
        let mut segs = chain::Segments::with_capacity(8);
        assert_eq!(r.pop(&mut segs, true), Pop::Broken);
        assert!(r.is_broken() && !r.is_running());
        assert_eq!(take(&mut err_rx), 1);
        // A restart clears it.
        d.vq.avail().idx().store(0);
        r.start(mem.clone(), &d.config(), false).expect("restart");
        assert!(r.is_running());
    }

    #[test]
    fn restart_resumes_at_used_index() {
        let mem = memory();
        let mut d = Driver::new(&mem);
        let mut r = Vring::new(256);
        r.start(mem.clone(), &d.config(), false).expect("start");
        let mut segs = chain::Segments::with_capacity(8);
        d.rx_buf(64);
        d.rx_buf(64);
        let Pop::Chain { head, .. } = r.pop(&mut segs, true) else {
            panic!()
        };
        r.stage_used(head, 0);
        assert_eq!(r.stop(), 1);
        assert_eq!(d.used_idx(), 1, "stop publishes staged elements");
        let mut cfg = d.config();
        cfg.next_avail = 1;
        r.start(mem.clone(), &cfg, false).expect("restart");
        assert_eq!(r.next_avail(), 1);
        // A base that disagrees with the used ring resumes at the used index.
        r.stop();
        cfg.next_avail = 7;
        r.start(mem.clone(), &cfg, false).expect("restart");
        assert_eq!(r.next_avail(), 1);
    }

    #[test]
    fn log_limit_bounds_bursts() {
        let mut l = LogLimit::default();
        let allowed = (0..100).filter(|_| l.allow()).count();
        assert_eq!(allowed, LogLimit::BURST as usize);
    }
}
