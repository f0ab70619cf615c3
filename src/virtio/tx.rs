//! TX: frames from the guest to the engine.
//!
//! On a kick the queue is drained with the EVENT_IDX pattern: notifications off, pop chains
//! until the ring is empty, notifications on, and look once more for chains that were added
//! in between (no kick comes for those). Each chain is walked into segments, the virtio-net
//! header (10 or 12 bytes, possibly in its own descriptor, possibly split) is skipped, and the
//! frame is handed to the [`FrameHandler`] together with the RX side as [`ToGuest`], so
//! replies (ARP, DHCP...) are queued in the same batch. The chain is then staged as used with
//! length 0 (we write nothing into TX buffers); the used index is published and the guest
//! interrupted at most once per drain.
//!
//! A frame in one descriptor is lent to the engine as a slice of guest memory: no copy. This
//! is the common case (Linux pushes the header into the skb headroom when it can, and without
//! scatter-gather offloads the skb is linear). A frame in several descriptors, or one crossing
//! two memory regions, is copied into an arena allocated once, because the engine parses
//! contiguous frames and building an owned one per frame would allocate.
//!
//! The slice aliases memory the guest can write at any time. A well-behaved guest doesn't
//! touch a buffer it has made available, so this only matters against a malicious guest,
//! which could make a field change between two reads of it. [`TxQueue::new`]'s `copy_always`
//! (what the daemon uses) never lends a slice: frames up to `SPLIT_MIN` (512) bytes are copied
//! whole, longer ones are split ([`FrameHandler::handle_split_frame`]): their first
//! `SPLIT_HEAD` (256) bytes, all the headers, are copied, and the rest stays in guest memory as
//! raw iovecs, which the engine hands to `sendmsg` (TCP data) without reading them as Rust
//! slices, or copies together (anything else). The payload is then copied once, by the
//! kernel, straight out of guest memory.
//!
//! Frames of one drain are a batch ([`FrameHandler::end_batch`]): copies go back to back in
//! the arena and lent chains stay unpublished until the engine has ended the batch, so it
//! can gather the payloads of several segments into one `sendmsg`. A batch that fills the
//! arena ends early.
//!
//! A chain is processed at most once and always returned, whatever its contents: a bad chain
//! is counted and returned with length 0. Each drain handles at most `budget` chains; if more
//! are waiting, [`TxQueue::drain`] says so and the caller re-arms the kick, so a guest
//! flooding TX can't starve the rest of the event loop.

use super::chain::{ChainError, ChainErrors, Seg, Segments};
use super::{LogLimit, NetFeatures, Pop, RingConfig, StartError, Vring};
use crate::tap::{FrameHandler, Tail, ToGuest, MAX_FRAME};
use vm_memory::{Address, Bytes, GuestMemoryBackend, GuestMemoryMmap};

/// Shortest frame we pass on: an Ethernet header.
const ETH_HLEN: usize = 14;
/// Most descriptors we accept in one TX chain. Linux uses at most MAX_SKB_FRAGS + 2.
const MAX_TX_SEGS: usize = crate::tap::MAX_TAIL_IOV;
/// With `copy_always`, frames longer than this are split: [`SPLIT_HEAD`] bytes copied, the
/// rest left in guest memory for [`FrameHandler::handle_split_frame`]. Shorter ones are
/// copied whole: the services (DHCP, NDP...) parse them entirely.
const SPLIT_MIN: usize = 512;
/// Bytes of a split frame copied: Ethernet, IP and TCP headers with every option fit.
const SPLIT_HEAD: usize = 256;
/// Room for the copies of one batch of frames (see [`FrameHandler::end_batch`]): a full
/// drain of MTU-sized frames, or eight of the largest.
const TX_ARENA: usize = 8 * MAX_FRAME;

/// TX counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TxStats {
    /// Frames handed to the engine.
    pub frames: u64,
    /// Their bytes (without virtio-net header).
    pub bytes: u64,
    /// Frames that had to be copied into the arena.
    pub linearized: u64,
    /// Frames handed over split: headers copied, the rest left in guest memory.
    pub split: u64,
    /// Chains discarded because the ring was disabled (spec: process and discard).
    pub discarded: u64,
    /// Chains rejected, by reason.
    pub bad_chains: ChainErrors,
    /// Times the ring was found broken (avail index jump).
    pub broken: u64,
    /// Drains that hit the budget and asked to be called again.
    pub budget_exhausted: u64,
    /// Lost notifications found by the watchdog (see "Lost notifications" in
    /// [`crate::virtio`]): chains added without a kick, and interrupts sent again.
    pub late_kicks: u64,
    pub late_interrupts: u64,
}

/// The TX virtqueue.
#[derive(Debug)]
pub struct TxQueue {
    ring: Vring,
    hdr_len: usize,
    enabled: bool,
    copy_always: bool,
    segs: Segments,
    /// Copied frames of the current batch, back to back; `arena_used` bytes are taken.
    arena: Box<[u8]>,
    arena_used: usize,
    /// Where the tail of a split frame lies in guest memory.
    tail: Vec<libc::iovec>,
    stats: TxStats,
    log: LogLimit,
    /// The watchdog found chains unread (at `next_avail`), no kick yet.
    kick_due: super::Twice<u16>,
}

impl TxQueue {
    /// A stopped TX queue accepting ring sizes up to `max_size`. With `copy_always`, frames
    /// are never lent to the engine in place (see the module documentation).
    pub fn new(max_size: u16, copy_always: bool) -> Self {
        TxQueue {
            ring: Vring::new(max_size),
            hdr_len: super::NET_HDR_LEN,
            enabled: false,
            copy_always,
            segs: Segments::with_capacity(MAX_TX_SEGS),
            arena: vec![0u8; TX_ARENA].into_boxed_slice(),
            arena_used: 0,
            tail: Vec::with_capacity(MAX_TX_SEGS),
            stats: TxStats::default(),
            log: LogLimit::default(),
            kick_due: super::Twice::default(),
        }
    }

    /// The ring, for the control plane (call/err eventfds, stop, memory updates).
    pub fn ring(&mut self) -> &mut Vring {
        &mut self.ring
    }

    /// Whether the ring is started (and not broken).
    pub fn is_running(&self) -> bool {
        self.ring.is_running()
    }

    /// Starts the ring with the negotiated features.
    pub fn start(
        &mut self,
        mem: GuestMemoryMmap,
        cfg: &RingConfig,
        feat: NetFeatures,
    ) -> Result<(), StartError> {
        self.hdr_len = feat.hdr_len;
        self.segs.set_max_bytes((feat.hdr_len + MAX_FRAME) as u32);
        self.ring.start(mem, cfg, feat.event_idx)?;
        // Kicks stay on while idle: that's how we learn about frames.
        self.ring.enable_notification();
        Ok(())
    }

    /// Stops the ring (GET_VRING_BASE); returns the next available index.
    pub fn stop(&mut self) -> u16 {
        self.ring.stop()
    }

    /// SET_VRING_ENABLE: a started but disabled ring is drained and its frames discarded.
    pub fn set_enabled(&mut self, enabled: bool) {
        self.enabled = enabled;
    }

    pub fn stats(&self) -> &TxStats {
        &self.stats
    }

    /// Looks for lost notifications (see "Lost notifications" in [`crate::virtio`]).
    /// Returns whether chains wait unread (the caller drains as for a kick); the interrupt
    /// for what we published is sent again here if the driver missed it.
    pub fn watchdog(&mut self) -> bool {
        if !self.ring.is_running() {
            return false;
        }
        if self.ring.reinterrupt_if_waiting() {
            self.stats.late_interrupts += 1;
        }
        // Unread chains, and no drain since the last check (a kick would have made one).
        let unread = self.ring.avail_moved().then_some(self.ring.next_avail());
        let late = self.kick_due.seen(unread);
        if late {
            self.stats.late_kicks += 1;
        }
        late
    }

    /// Whether the last [`TxQueue::watchdog`] found something its next call must look at
    /// again: unread chains, or a driver not caught up with the chains we returned.
    pub fn watching(&self) -> bool {
        self.kick_due.pending() || self.ring.driver_behind()
    }

    /// Where the ring stands, for a state dump.
    pub fn snapshot(&self) -> super::RingSnapshot {
        self.ring.snapshot()
    }

    /// Processes up to `budget` chains. Returns `true` if chains are left (call again).
    pub fn drain(
        &mut self,
        to_guest: &mut dyn ToGuest,
        engine: &mut dyn FrameHandler,
        budget: usize,
    ) -> bool {
        let mut done = 0;
        let more = 'drain: loop {
            self.ring.disable_notification();
            loop {
                if done == budget {
                    self.stats.budget_exhausted += 1;
                    break 'drain true;
                }
                self.segs.clear();
                match self.ring.pop(&mut self.segs, false) {
                    Pop::Empty => break,
                    Pop::Broken => {
                        self.stats.broken += 1;
                        break 'drain false;
                    }
                    Pop::Chain { head, res } => {
                        done += 1;
                        match res {
                            Ok(total) if self.enabled => self.frame(total, to_guest, engine),
                            Ok(_) => self.stats.discarded += 1,
                            Err(e) => self.bad_chain(e),
                        }
                        self.ring.stage_used(head, 0);
                    }
                }
            }
            if !self.ring.enable_notification() {
                break false;
            }
        };
        // The engine finishes deferred work on this batch's frames before their chains go
        // back to the guest.
        self.end_batch(to_guest, engine);
        self.ring.publish();
        more
    }

    fn bad_chain(&mut self, e: ChainError) {
        self.stats.bad_chains.count(e);
        if self.log.allow() {
            log::warn!("vhost-user TX: dropping malformed descriptor chain: {e:?}");
        }
    }

    fn end_batch(&mut self, to_guest: &mut dyn ToGuest, engine: &mut dyn FrameHandler) {
        engine.end_batch(to_guest);
        self.arena_used = 0;
    }

    fn frame(&mut self, total: u32, to_guest: &mut dyn ToGuest, engine: &mut dyn FrameHandler) {
        if self.arena.len() - self.arena_used < (total as usize).min(MAX_FRAME) {
            // The arena is full: the batch ends early, its chains still ours until publish.
            self.end_batch(to_guest, engine);
        }
        let Some(mem) = self.ring.mem() else {
            return;
        };
        if self.copy_always && total as usize >= self.hdr_len + SPLIT_MIN {
            let head = &mut self.arena[self.arena_used..self.arena_used + SPLIT_HEAD];
            if let Some(tail_len) = split(
                mem,
                self.segs.as_slice(),
                self.hdr_len,
                head,
                &mut self.tail,
            ) {
                self.stats.frames += 1;
                self.stats.bytes += (SPLIT_HEAD + tail_len) as u64;
                self.stats.split += 1;
                self.arena_used += SPLIT_HEAD;
                let tail = Tail {
                    iov: &self.tail,
                    len: tail_len,
                };
                engine.handle_split_frame(
                    &self.arena[self.arena_used - SPLIT_HEAD..self.arena_used],
                    tail,
                    to_guest,
                );
                return;
            }
            // Some piece crosses into an adjacent memory region: copy it all.
        }
        let (res, copied) = extract(
            mem,
            self.segs.as_slice(),
            total as usize,
            self.hdr_len,
            &mut self.arena[self.arena_used..],
            self.copy_always,
        );
        match res {
            Ok(frame) => {
                self.stats.frames += 1;
                self.stats.bytes += frame.len() as u64;
                self.stats.linearized += u64::from(copied);
                if copied {
                    // Kept word-aligned, so the next frame's headers are too.
                    self.arena_used += frame.len().next_multiple_of(8);
                }
                engine.handle_frame(frame, to_guest);
            }
            Err(e) => {
                self.stats.bad_chains.count(e);
                if self.log.allow() {
                    log::warn!("vhost-user TX: dropping frame: {e:?}");
                }
            }
        }
    }
}

/// Finds the frame behind the header in `segs`: a slice of guest memory if it is contiguous
/// there (and `copy_always` is off), else a copy at the start of `scratch`. The flag says
/// which.
fn extract<'a>(
    mem: &'a GuestMemoryMmap,
    segs: &[Seg],
    total: usize,
    hdr_len: usize,
    scratch: &'a mut [u8],
    copy_always: bool,
) -> (Result<&'a [u8], ChainError>, bool) {
    if total < hdr_len + ETH_HLEN {
        return (Err(ChainError::TooShort), false);
    }
    let frame_len = total - hdr_len;
    if frame_len > MAX_FRAME || frame_len > scratch.len() {
        return (Err(ChainError::TooLong), false);
    }
    // Skip the header, which may span descriptors.
    let mut skip = hdr_len;
    let mut first = 0;
    while let Some(s) = segs.get(first) {
        if skip < s.len as usize {
            break;
        }
        skip -= s.len as usize;
        first += 1;
    }
    let Some(s) = segs.get(first) else {
        return (Err(ChainError::TooShort), false);
    };
    if !copy_always && s.len as usize - skip == frame_len {
        if let Ok(vs) =
            GuestMemoryBackend::get_slice(mem, s.addr.unchecked_add(skip as u64), frame_len)
        {
            // SAFETY: `vs` covers `frame_len` mapped bytes of a region owned by `mem`, which
            // the returned slice borrows, so the mapping outlives it. The bytes are shared
            // with the guest, which may (only if it misbehaves) write them concurrently; see
            // the module documentation and `copy_always`.
            let frame = unsafe { std::slice::from_raw_parts(vs.ptr_guard().as_ptr(), frame_len) };
            return (Ok(frame), false);
        }
        // Crosses into an adjacent memory region: copy.
    }
    let mut pos = 0;
    for (k, s) in segs[first..].iter().enumerate() {
        let off = if k == 0 { skip } else { 0 };
        let n = s.len as usize - off;
        let Some(dst) = scratch.get_mut(pos..pos + n) else {
            return (Err(ChainError::TooLong), true);
        };
        if mem
            .read_slice(dst, s.addr.unchecked_add(off as u64))
            .is_err()
        {
            return (Err(ChainError::Address), true);
        }
        pos += n;
    }
    (Ok(&scratch[..frame_len]), true)
}

/// Copies the first `head.len()` bytes of the frame behind the header into `head` and
/// describes the rest, in guest memory, in `tail`. Returns the rest's length, or `None` if a
/// piece of it isn't contiguous in one memory region (the caller copies instead). The chain
/// was validated by the pop: its segments lie in guest memory and total at most the limit.
fn split(
    mem: &GuestMemoryMmap,
    segs: &[Seg],
    hdr_len: usize,
    head: &mut [u8],
    tail: &mut Vec<libc::iovec>,
) -> Option<usize> {
    tail.clear();
    let (mut skip, mut filled, mut tail_len) = (hdr_len, 0, 0);
    for s in segs {
        let len = s.len as usize;
        if skip >= len {
            skip -= len;
            continue;
        }
        let mut off = skip;
        skip = 0;
        if filled < head.len() {
            let n = (len - off).min(head.len() - filled);
            mem.read_slice(
                &mut head[filled..filled + n],
                s.addr.unchecked_add(off as u64),
            )
            .ok()?;
            filled += n;
            off += n;
        }
        if off < len {
            let vs =
                GuestMemoryBackend::get_slice(mem, s.addr.unchecked_add(off as u64), len - off)
                    .ok()?;
            tail.push(libc::iovec {
                iov_base: vs.ptr_guard().as_ptr().cast_mut().cast(),
                iov_len: len - off,
            });
            tail_len += len - off;
        }
    }
    (filled == head.len()).then_some(tail_len)
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::super::NET_HDR_LEN;
    use super::*;
    use std::sync::atomic::Ordering;
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_NEXT;
    use vm_memory::{Bytes, GuestAddress};

    /// Records frames; replies to each with its reverse to exercise the RX hand-over.
    #[derive(Default)]
    struct Recorder {
        frames: Vec<Vec<u8>>,
        reply: bool,
    }

    impl FrameHandler for Recorder {
        fn handle_frame(&mut self, frame: &[u8], to_guest: &mut dyn ToGuest) {
            self.frames.push(frame.to_vec());
            if self.reply {
                to_guest.send(&[frame]);
            }
        }
    }

    #[derive(Default)]
    struct Sink {
        sent: Vec<Vec<u8>>,
        flushes: usize,
    }

    impl ToGuest for Sink {
        fn send(&mut self, parts: &[&[u8]]) -> bool {
            self.sent.push(parts.concat());
            true
        }
        fn flush(&mut self) {
            self.flushes += 1;
        }
    }

    fn frame(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed))
            .collect()
    }

    fn started(mem: &GuestMemoryMmap, d: &Driver, event_idx: bool) -> (TxQueue, File) {
        let mut tx = TxQueue::new(256, false);
        let feat = NetFeatures {
            event_idx,
            mrg_rxbuf: true,
            hdr_len: NET_HDR_LEN,
        };
        tx.start(mem.clone(), &d.config(), feat).expect("start");
        tx.set_enabled(true);
        let (call, call_rx) = eventfd();
        tx.ring().set_call(Some(call));
        (tx, call_rx)
    }
    use std::fs::File;

    /// A started TX queue with `copy_always` (frames never lent, long ones split).
    fn copying(mem: &GuestMemoryMmap, d: &Driver) -> TxQueue {
        let mut tx = TxQueue::new(256, true);
        tx.start(mem.clone(), &d.config(), NetFeatures::from_acked(1 << 32))
            .expect("start");
        tx.set_enabled(true);
        tx
    }

    #[test]
    fn frames_in_any_layout_reach_the_engine() {
        let mem = memory();
        let mut d = Driver::new(&mem);
        let (mut tx, mut call) = started(&mem, &d, false);
        let f1 = frame(60, 1);
        let f2 = frame(1500, 2);
        let f3 = frame(3000, 3);
        d.tx(&f1, &[]); // header and frame in one descriptor
        d.tx(&f2, &[NET_HDR_LEN]); // header in its own descriptor
        d.tx(&f3, &[5, NET_HDR_LEN + 100, 2000]); // header split, frame in three pieces
        let mut eng = Recorder::default();
        let mut sink = Sink::default();
        assert!(!tx.drain(&mut sink, &mut eng, 64));
        assert_eq!(eng.frames, vec![f1, f2, f3]);
        assert_eq!(tx.stats().frames, 3);
        assert_eq!(tx.stats().linearized, 1);
        assert_eq!(d.used_idx(), 3);
        assert_eq!(take(&mut call), 1, "one interrupt for the batch");
        for i in 0..3 {
            assert_eq!(d.used_elem(i).1, 0);
        }
    }

    /// A chain made available without a kick (the driver read `avail_event` too early) is
    /// found by the watchdog at its second look; one drained meanwhile is not counted.
    #[test]
    fn chains_added_without_a_kick_are_found_by_the_watchdog() {
        let mem = memory();
        let mut d = Driver::new(&mem);
        let (mut tx, _call) = started(&mem, &d, true);
        let mut eng = Recorder::default();
        assert!(!tx.watchdog());
        assert!(!tx.watching());
        d.tx(&frame(60, 1), &[]);
        assert!(!tx.watchdog(), "first sighting: the kick may be on its way");
        assert!(tx.watching());
        tx.drain(&mut Sink::default(), &mut eng, 64);
        assert!(!tx.watchdog(), "drained: it came");
        d.tx(&frame(60, 2), &[]);
        assert!(!tx.watchdog());
        assert!(tx.watchdog(), "still unread: late");
        tx.drain(&mut Sink::default(), &mut eng, 64);
        assert_eq!(eng.frames.len(), 2);
        assert_eq!(tx.stats().late_kicks, 1);
    }

    #[test]
    fn copy_always_snapshots_every_frame() {
        let mem = memory();
        let mut d = Driver::new(&mem);
        let mut tx = copying(&mem, &d);
        let f = frame(100, 9);
        d.tx(&f, &[]);
        let mut eng = Recorder::default();
        tx.drain(&mut Sink::default(), &mut eng, 64);
        assert_eq!(eng.frames, vec![f]);
        assert_eq!(tx.stats().linearized, 1);
    }

    /// Keeps raw pointers to the frames of a batch, as a handler gathering payloads would,
    /// and checks them at the end of the batch.
    struct Batcher {
        /// Per frame: its pieces (whole frame, or head then tail).
        held: Vec<Vec<(*const u8, usize)>>,
        expect: Vec<Vec<u8>>,
        batches: usize,
        used_at_end: Vec<u16>,
        used_idx: Box<dyn Fn() -> u16>,
    }

    impl Batcher {
        fn new(expect: Vec<Vec<u8>>, mem: &GuestMemoryMmap, d: &Driver) -> Self {
            let (m, used) = (mem.clone(), d.used_addr());
            Batcher {
                held: Vec::new(),
                expect,
                batches: 0,
                used_at_end: Vec::new(),
                used_idx: Box::new(move || {
                    m.load::<u16>(GuestAddress(used + 2), Ordering::Acquire)
                        .expect("used idx")
                }),
            }
        }
    }

    impl FrameHandler for Batcher {
        fn handle_frame(&mut self, frame: &[u8], _: &mut dyn ToGuest) {
            self.held.push(vec![(frame.as_ptr(), frame.len())]);
        }
        fn handle_split_frame(&mut self, head: &[u8], tail: Tail<'_>, _: &mut dyn ToGuest) {
            let mut pieces = vec![(head.as_ptr(), head.len())];
            pieces.extend(tail.pieces().map(|v| (v.iov_base as *const u8, v.iov_len)));
            self.held.push(pieces);
        }
        fn end_batch(&mut self, _: &mut dyn ToGuest) {
            for pieces in self.held.drain(..) {
                let mut now = Vec::new();
                for (ptr, len) in pieces {
                    // SAFETY: the back-end keeps a batch's frames in place until this returns.
                    now.extend_from_slice(unsafe { std::slice::from_raw_parts(ptr, len) });
                }
                assert!(
                    now == self.expect.remove(0),
                    "a frame moved before its batch ended"
                );
            }
            self.batches += 1;
            self.used_at_end.push((self.used_idx)());
        }
    }

    #[test]
    fn a_batch_stays_in_place_until_it_ends_before_the_chains_go_back() {
        let mem = memory();
        let mut d = Driver::new(&mem);
        let (mut tx, _call) = started(&mem, &d, false);
        // Eight copies of the largest frame (in two pieces, so they are copied): the arena
        // takes seven, so the batch ends early once.
        let frames: Vec<Vec<u8>> = (0..8).map(|i| frame(MAX_FRAME, i)).collect();
        for f in &frames {
            d.tx(f, &[NET_HDR_LEN + 30_000]);
        }
        let mut eng = Batcher::new(frames, &mem, &d);
        assert!(!tx.drain(&mut Sink::default(), &mut eng, 64));
        assert!(
            eng.expect.is_empty(),
            "{} frames never checked",
            eng.expect.len()
        );
        assert_eq!(tx.stats().linearized, 8);
        assert_eq!(eng.batches, 2, "an early end, then the drain's own");
        assert_eq!(
            eng.used_at_end,
            vec![0, 0],
            "chains went back before the batch ended"
        );
        assert_eq!(d.used_idx(), 8);
    }

    #[test]
    fn long_frames_are_split_short_ones_copied_whole() {
        let mem = memory();
        let mut d = Driver::new(&mem);
        let mut tx = copying(&mem, &d);
        let frames = vec![
            frame(SPLIT_MIN - 1, 1),
            frame(SPLIT_MIN, 2),
            frame(3000, 3),
            frame(3000, 4),
        ];
        d.tx(&frames[0], &[]);
        d.tx(&frames[1], &[]);
        d.tx(&frames[2], &[5, NET_HDR_LEN + 100, 2000]); // the head spans three pieces
        d.tx(&frames[3], &[NET_HDR_LEN]);
        let mut eng = Batcher::new(frames, &mem, &d);
        assert!(!tx.drain(&mut Sink::default(), &mut eng, 64));
        assert!(eng.expect.is_empty());
        assert_eq!((tx.stats().split, tx.stats().linearized), (3, 1));
        assert_eq!(eng.used_at_end, vec![0]);
    }

    #[test]
    fn legacy_header_is_ten_bytes() {
        let mem = memory();
        let mut d = Driver::new(&mem);
        let mut tx = TxQueue::new(256, false);
        tx.start(mem.clone(), &d.config(), NetFeatures::from_acked(0))
            .expect("start");
        tx.set_enabled(true);
        let f = frame(64, 4);
        let mut data = vec![0u8; 10];
        data.extend_from_slice(&f);
        let h = d.chain(&data, &[], false);
        d.offer(h);
        let mut eng = Recorder::default();
        tx.drain(&mut Sink::default(), &mut eng, 64);
        assert_eq!(eng.frames, vec![f]);
    }

    #[test]
    fn replies_go_to_the_rx_side() {
        let mem = memory();
        let mut d = Driver::new(&mem);
        let (mut tx, _call) = started(&mem, &d, false);
        d.tx(&frame(80, 5), &[]);
        let mut eng = Recorder {
            reply: true,
            ..Default::default()
        };
        let mut sink = Sink::default();
        tx.drain(&mut sink, &mut eng, 64);
        assert_eq!(sink.sent, vec![frame(80, 5)]);
    }

    #[test]
    fn malformed_chains_are_returned_and_counted() {
        let mem = memory();
        let mut d = Driver::new(&mem);
        let (mut tx, _call) = started(&mem, &d, false);
        // Too short: header + 13 bytes.
        d.tx(&frame(13, 0), &[]);
        // Out of memory.
        let h = d.put_descs(&[(MEM_SIZE as u64 + 0x100, 100, 0, 0)]);
        d.offer(h);
        // Loop.
        let n = VRING_DESC_F_NEXT as u16;
        let a = d.alloc_buf(64);
        let slot = d.next_slot();
        let h = d.put_descs(&[(a, 64, n, slot)]); // points at itself
        d.offer(h);
        // Too long.
        let a = d.alloc_buf(70000);
        let h = d.put_descs(&[(a, (NET_HDR_LEN + MAX_FRAME + 1) as u32, 0, 0)]);
        d.offer(h);
        // And a good one after all that.
        d.tx(&frame(100, 1), &[]);
        let mut eng = Recorder::default();
        tx.drain(&mut Sink::default(), &mut eng, 64);
        assert_eq!(eng.frames, vec![frame(100, 1)]);
        let bad = tx.stats().bad_chains;
        assert_eq!(bad.too_short, 1);
        assert_eq!(bad.address, 1);
        assert_eq!(bad.too_long, 1);
        assert_eq!(bad.truncated + bad.too_many_descriptors, 1);
        assert_eq!(d.used_idx(), 5, "every chain is returned");
    }

    #[test]
    fn disabled_ring_discards() {
        let mem = memory();
        let mut d = Driver::new(&mem);
        let (mut tx, _call) = started(&mem, &d, false);
        tx.set_enabled(false);
        d.tx(&frame(100, 1), &[]);
        let mut eng = Recorder::default();
        tx.drain(&mut Sink::default(), &mut eng, 64);
        assert!(eng.frames.is_empty());
        assert_eq!(tx.stats().discarded, 1);
        assert_eq!(d.used_idx(), 1);
    }

    #[test]
    fn budget_limits_a_drain() {
        let mem = memory();
        let mut d = Driver::new(&mem);
        let (mut tx, _call) = started(&mem, &d, true);
        for i in 0..5 {
            d.tx(&frame(60, i), &[]);
        }
        let mut eng = Recorder::default();
        assert!(tx.drain(&mut Sink::default(), &mut eng, 3));
        assert_eq!(eng.frames.len(), 3);
        assert_eq!(d.used_idx(), 3, "partial batch is published");
        assert!(!tx.drain(&mut Sink::default(), &mut eng, 3));
        assert_eq!(eng.frames.len(), 5);
    }

    #[test]
    fn event_idx_rearms_kicks_at_next_avail() {
        let mem = memory();
        let mut d = Driver::new(&mem);
        let (mut tx, _call) = started(&mem, &d, true);
        for i in 0..3 {
            d.tx(&frame(60, i), &[]);
        }
        tx.drain(&mut Sink::default(), &mut Recorder::default(), 64);
        assert_eq!(d.avail_event(), 3);
    }

    #[test]
    fn no_event_idx_toggles_no_notify() {
        let mem = memory();
        let mut d = Driver::new(&mem);
        let (mut tx, _call) = started(&mem, &d, false);
        assert_eq!(d.used_flags(), 0, "kicks enabled while idle");
        d.tx(&frame(60, 0), &[]);

        // An engine that looks at the used flags while handling a frame.
        struct Peek<'a>(&'a GuestMemoryMmap, u16);
        impl FrameHandler for Peek<'_> {
            fn handle_frame(&mut self, _: &[u8], _: &mut dyn ToGuest) {
                self.1 = self
                    .0
                    .load::<u16>(GuestAddress(USED_ADDR), Ordering::Relaxed)
                    .expect("flags");
            }
        }
        let mut peek = Peek(&mem, 0);
        tx.drain(&mut Sink::default(), &mut peek, 64);
        assert_eq!(peek.1, 1, "VRING_USED_F_NO_NOTIFY while draining");
        assert_eq!(d.used_flags(), 0);
    }

    #[test]
    fn buffers_across_adjacent_regions_are_copied_into_holes_rejected() {
        // Two adjacent regions, then a hole, then a third region.
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x10_0000),
            (GuestAddress(0x10_0000), 0x10_0000),
            (GuestAddress(0x30_0000), 0x10_0000),
        ])
        .expect("memory");
        let mut d = Driver::at(&mem, 0x1000, 0x8000, 0x30_0000);
        let mut tx = TxQueue::new(256, false);
        tx.start(mem.clone(), &d.config(), NetFeatures::from_acked(1 << 32))
            .expect("start");
        tx.set_enabled(true);
        let f = frame(0x200, 3);
        let mut data = vec![0u8; NET_HDR_LEN];
        data.extend_from_slice(&f);
        // Crosses 0x10_0000, where the first two regions meet: fine, copied.
        let a = 0x10_0000 - 0x100;
        mem.write_slice(&data, GuestAddress(a)).expect("write");
        let h = d.put_descs(&[(a, data.len() as u32, 0, 0)]);
        d.offer(h);
        // Runs from the second region into the hole: malformed.
        let h = d.put_descs(&[(0x20_0000 - 0x100, 0x200, 0, 0)]);
        d.offer(h);
        let mut eng = Recorder::default();
        tx.drain(&mut Sink::default(), &mut eng, 64);
        assert_eq!(eng.frames, vec![f]);
        assert_eq!(tx.stats().linearized, 1);
        assert_eq!(tx.stats().bad_chains.address, 1);
        assert_eq!(d.used_idx(), 2);
    }

    #[test]
    fn extract_handles_header_splits() {
        let mem = memory();
        let f = frame(100, 3);
        let mut data = vec![0u8; NET_HDR_LEN];
        data.extend_from_slice(&f);
        mem.write_slice(&data, GuestAddress(BUF_BASE))
            .expect("write");
        let base = GuestAddress(BUF_BASE);
        let seg = |off: u64, len: u32| Seg {
            addr: base.unchecked_add(off),
            len,
        };
        let mut scratch = vec![0u8; MAX_FRAME];
        // Header ends exactly at a descriptor boundary, frame in one piece: no copy.
        let segs = [seg(0, 12), seg(12, 100)];
        let (r, copied) = extract(&mem, &segs, 112, NET_HDR_LEN, &mut scratch, false);
        assert_eq!(r.expect("frame"), &f[..]);
        assert!(!copied);
        // Header split 4 + 8, then the frame: still no copy.
        let segs = [seg(0, 4), seg(4, 8), seg(12, 100)];
        let (r, copied) = extract(&mem, &segs, 112, NET_HDR_LEN, &mut scratch, false);
        assert_eq!(r.expect("frame"), &f[..]);
        assert!(!copied);
        // Header and first frame bytes share a descriptor.
        let segs = [seg(0, 20), seg(20, 92)];
        let (r, copied) = extract(&mem, &segs, 112, NET_HDR_LEN, &mut scratch, false);
        assert_eq!(r.expect("frame"), &f[..]);
        assert!(copied);
    }
}
