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
use crate::tap::{ToGuest, ETH_MIN_FRAME, MAX_FRAME};
use vm_memory::{Address, Bytes, GuestMemoryMmap};

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
                stats: RxStats::default(),
                log: LogLimit::default(),
            },
            pending: Pending::new(pending_bytes.max(MAX_FRAME), pending_frames.max(1)),
            enabled: false,
            armed: false,
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

    /// The guest added RX buffers: send what waits, and publish.
    pub fn handle_kick(&mut self) {
        self.service_pending();
        self.flush();
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
                if self.armed {
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
}

impl RxRing {
    /// Reserves, writes and stages one frame.
    fn deliver(&mut self, parts: &[&[u8]], len: usize) -> Deliver {
        let hdr_len = self.feat.hdr_len;
        let padded = len.max(ETH_MIN_FRAME);
        let need = hdr_len + padded;
        self.segs.clear();
        self.chains.clear();
        let mut start = self.ring.next_avail();
        let mut have = 0usize;
        while have < need {
            let seg_start = self.segs.len();
            match self.ring.pop(&mut self.segs, true) {
                Pop::Empty => {
                    self.ring.rewind(start);
                    return Deliver::NoRoom;
                }
                Pop::Broken => return Deliver::Dropped,
                Pop::Chain {
                    head,
                    res: Err(ChainError::TooManyDescriptors),
                } if !self.chains.is_empty() => {
                    // The chain may be fine; the frame just spans too many segments.
                    let _ = head;
                    self.ring.rewind(start);
                    self.stats.drop_fragmented += 1;
                    return Deliver::Dropped;
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
                        Ok(cap) if !self.feat.mrg_rxbuf && (cap as usize) < need => {
                            self.ring.rewind(start);
                            self.stats.drop_too_big += 1;
                            return Deliver::Dropped;
                        }
                        Ok(cap) => {
                            self.chains.push(Reserved { head, cap });
                            have += cap as usize;
                        }
                    }
                }
            }
        }

        let mut hdr = [0u8; super::NET_HDR_LEN];
        if hdr_len == super::NET_HDR_LEN {
            let n = self.chains.len() as u16;
            hdr[NUM_BUFFERS_OFFSET..NUM_BUFFERS_OFFSET + 2].copy_from_slice(&n.to_le_bytes());
        }
        const ZEROES: [u8; ETH_MIN_FRAME] = [0; ETH_MIN_FRAME];
        let pieces = std::iter::once(&hdr[..hdr_len])
            .chain(parts.iter().copied())
            .chain(std::iter::once(&ZEROES[..padded - len]));
        let written = match self.ring.mem() {
            Some(mem) => gather(mem, self.segs.as_slice(), pieces),
            None => false,
        };
        if !written {
            // Memory vanished under a validated chain: give the buffers back empty.
            for i in 0..self.chains.len() {
                let c = self.chains[i];
                self.ring.stage_used(c.head, 0);
            }
            self.stats.bad_chains.count(ChainError::Address);
            return Deliver::Dropped;
        }
        let mut left = need;
        for i in 0..self.chains.len() {
            let c = self.chains[i];
            let n = left.min(c.cap as usize);
            self.ring.stage_used(c.head, n as u32);
            left -= n;
        }
        self.stats.frames += 1;
        self.stats.bytes += len as u64;
        self.stats.buffers += self.chains.len() as u64;
        Deliver::Done
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

/// Copies `pieces` back to back into `segs`. `false` if memory access failed or the
/// segments were too short (neither happens for validated, reserved chains).
fn gather<'p>(mem: &GuestMemoryMmap, segs: &[Seg], pieces: impl Iterator<Item = &'p [u8]>) -> bool {
    let mut si = 0;
    let mut off = 0usize;
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
