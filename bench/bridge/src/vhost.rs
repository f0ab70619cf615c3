//! The VMM and the guest driver, in one: connects to a vhost-user-net back-end, gives it a
//! memfd as guest memory, and drives two split virtqueues between that memory and the tap.
//!
//! # Theory of operation
//!
//! Guest memory is one memfd region at guest physical address 0, mapped once here and once
//! by the back-end. It holds, per ring, the descriptor table, available and used rings, and
//! one fixed buffer per descriptor: descriptor `i` of a ring always points to buffer `i`, so
//! the free list is a list of indices and nothing is ever allocated on the data path.
//!
//! TX (tap → back-end): a frame is `read()` from the tap straight into a free TX buffer,
//! 12-byte virtio-net header included (the tap writes it), and offered as a one-descriptor
//! chain. The available index is published once per batch and the back-end is kicked only
//! if its `avail_event` asks for it (EVENT_IDX). Used TX buffers go back to the free list
//! whenever we look; we ask for a TX interrupt (`used_event`) only when the free list is
//! empty and the tap still has frames, and stop watching the tap meanwhile.
//!
//! RX (back-end → tap): every RX descriptor is posted at start. A used frame starts with the
//! header whose `num_buffers` says how many used elements (MRG_RXBUF) it spans; those
//! buffers go to the tap with one `writev()` straight from guest memory, and are posted
//! again. `used_event` always asks for the next RX interrupt; after setting it we look at
//! the used index again, so a frame published in between is not left waiting.
//!
//! The only copies are the kernel's: tap → guest memory, guest memory → tap.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::Path;
use std::sync::atomic::{fence, AtomicU16, Ordering};

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

use crate::tap::{Tap, VNET_HDR};
use crate::{Counters, Epoll};

const VERSION_1: u64 = 1 << 32;
const MRG_RXBUF: u64 = 1 << 15;
const EVENT_IDX: u64 = 1 << 29;
const PROTOCOL_FEATURES: u64 = 1 << 30;
const F_WRITE: u16 = 2;
const AVAIL_F_NO_INTERRUPT: u16 = 1;
const USED_F_NO_NOTIFY: u16 = 1;

/// Largest frame from the tap: 65520 MTU + Ethernet header + virtio-net header, rounded.
pub const TX_BUF: usize = 65_600;

/// Layout and driver state of one split ring in our mapping of guest memory.
struct Ring {
    index: usize,
    size: u16,
    /// Guest physical addresses.
    desc: u64,
    avail: u64,
    used: u64,
    bufs: u64,
    buf_len: u32,
    /// Next available index to publish (private until [`Ring::publish`]).
    avail_idx: u16,
    /// Available index the back-end last saw from us.
    published: u16,
    /// Next used element to consume.
    last_used: u16,
    kick: EventFd,
    call: EventFd,
}

/// Bytes a ring's descriptor table, avail and used rings take, page-aligned each.
fn ring_bytes(size: u16) -> (u64, u64, u64) {
    let n = u64::from(size);
    let page = |x: u64| x.next_multiple_of(4096);
    (page(16 * n), page(6 + 2 * n), page(6 + 8 * n))
}

struct Mem {
    base: *mut u8,
    len: usize,
    file: File,
}

impl Mem {
    fn new(len: usize) -> io::Result<Mem> {
        // SAFETY: valid C string.
        let fd = unsafe { libc::memfd_create(c"passt-bridge-guest".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fresh descriptor we own.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(len as u64)?;
        // SAFETY: mapping a file we own, shared, of its size.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mem {
            base: base.cast(),
            len,
            file,
        })
    }

    fn ptr(&self, gpa: u64, len: usize) -> *mut u8 {
        assert!(gpa as usize + len <= self.len, "guest address out of range");
        // SAFETY: in bounds of our mapping (checked above).
        unsafe { self.base.add(gpa as usize) }
    }

    fn u16(&self, gpa: u64) -> &AtomicU16 {
        // SAFETY: in bounds, 2-aligned (ring layout), shared memory accessed atomically.
        unsafe { &*(self.ptr(gpa, 2) as *const AtomicU16) }
    }

    fn write_u16(&self, gpa: u64, v: u16) {
        self.u16(gpa).store(v, Ordering::Relaxed);
    }

    fn read_u16(&self, gpa: u64) -> u16 {
        self.u16(gpa).load(Ordering::Relaxed)
    }

    fn read_u32(&self, gpa: u64) -> u32 {
        // SAFETY: in bounds and 4-aligned (used ring elements).
        unsafe { std::ptr::read_volatile(self.ptr(gpa, 4) as *const u32) }
    }

    fn write_desc(&self, gpa: u64, addr: u64, len: u32, flags: u16, next: u16) {
        let p = self.ptr(gpa, 16);
        // SAFETY: 16 bytes in bounds, descriptor table is 16-aligned.
        unsafe {
            std::ptr::write_volatile(p as *mut u64, addr.to_le());
            std::ptr::write_volatile(p.add(8) as *mut u32, len.to_le());
            std::ptr::write_volatile(p.add(12) as *mut u16, flags.to_le());
            std::ptr::write_volatile(p.add(14) as *mut u16, next.to_le());
        }
    }
}

impl Drop for Mem {
    fn drop(&mut self) {
        // SAFETY: our own mapping.
        unsafe { libc::munmap(self.base.cast(), self.len) };
    }
}

impl Ring {
    fn new(index: usize, size: u16, at: u64, buf_len: u32) -> io::Result<(Ring, u64)> {
        let (d, a, u) = ring_bytes(size);
        let bufs = at + d + a + u;
        let end = bufs + u64::from(size) * u64::from(buf_len);
        let ring = Ring {
            index,
            size,
            desc: at,
            avail: at + d,
            used: at + d + a,
            bufs,
            buf_len,
            avail_idx: 0,
            published: 0,
            last_used: 0,
            kick: EventFd::new(libc::EFD_NONBLOCK)?,
            call: EventFd::new(libc::EFD_NONBLOCK)?,
        };
        Ok((ring, end.next_multiple_of(4096)))
    }

    fn buf(&self, id: u16) -> u64 {
        self.bufs + u64::from(id) * u64::from(self.buf_len)
    }

    fn config(&self, user_base: u64) -> VringConfigData {
        VringConfigData {
            queue_max_size: self.size,
            queue_size: self.size,
            flags: 0,
            desc_table_addr: user_base + self.desc,
            used_ring_addr: user_base + self.used,
            avail_ring_addr: user_base + self.avail,
            log_addr: None,
        }
    }

    /// Queues head `id` (published later).
    fn offer(&mut self, m: &Mem, id: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        m.write_u16(self.avail + 4 + 2 * slot, id);
        self.avail_idx = self.avail_idx.wrapping_add(1);
    }

    /// Publishes queued heads; kicks the back-end if it wants it. Returns whether it kicked.
    fn publish(&mut self, m: &Mem, event_idx: bool) -> bool {
        if self.avail_idx == self.published {
            return false;
        }
        let old = self.published;
        m.u16(self.avail + 2)
            .store(self.avail_idx, Ordering::Release);
        self.published = self.avail_idx;
        // Pairs with the device's barrier between reading avail idx and writing avail_event.
        fence(Ordering::SeqCst);
        let kick = if event_idx {
            let ev = m.read_u16(self.used + 4 + 8 * u64::from(self.size));
            need_event(ev, self.avail_idx, old)
        } else {
            m.read_u16(self.used) & USED_F_NO_NOTIFY == 0
        };
        if kick {
            let _ = self.kick.write(1);
        }
        kick
    }

    fn used_idx(&self, m: &Mem) -> u16 {
        m.u16(self.used + 2).load(Ordering::Acquire)
    }

    /// Pending used elements.
    fn pending(&self, m: &Mem) -> u16 {
        self.used_idx(m).wrapping_sub(self.last_used)
    }

    fn used_elem(&self, m: &Mem, i: u16) -> (u32, u32) {
        let a = self.used + 4 + 8 * u64::from(i % self.size);
        (m.read_u32(a), m.read_u32(a + 4))
    }

    /// Asks for an interrupt at the next used element (`want`), or for none.
    fn want_interrupt(&self, m: &Mem, event_idx: bool, want: bool) {
        if event_idx {
            // Far enough ahead that the used index (at most `size` beyond `last_used`)
            // never crosses it.
            let ev = if want {
                self.last_used
            } else {
                self.last_used.wrapping_add(self.size.wrapping_mul(2))
            };
            m.write_u16(self.avail + 4 + 2 * u64::from(self.size), ev);
        } else {
            m.write_u16(self.avail, if want { 0 } else { AVAIL_F_NO_INTERRUPT });
        }
        fence(Ordering::SeqCst);
    }
}

/// The split ring's `vring_need_event`.
fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// Settings of the vhost-user mode.
pub struct Options {
    pub queue_size: u16,
    pub rx_buf: u32,
    pub event_idx: bool,
}

pub struct Bridge {
    _fe: Frontend,
    mem: Mem,
    rx: Ring,
    tx: Ring,
    tx_free: Vec<u16>,
    event_idx: bool,
    mrg: bool,
    iov: Vec<libc::iovec>,
}

impl Bridge {
    pub fn connect(path: &Path, o: &Options) -> io::Result<Bridge> {
        let err = |what: &str, e: vhost::Error| io::Error::other(format!("{what}: {e}"));
        let size = o.queue_size;
        if !size.is_power_of_two() {
            return Err(io::Error::other("queue size must be a power of two"));
        }
        let (rx, at) = Ring::new(0, size, 0, o.rx_buf)?;
        let (tx, end) = Ring::new(1, size, at, TX_BUF as u32)?;
        let mem = Mem::new(end as usize)?;
        let user_base = mem.base as u64;

        let mut fe = Frontend::connect(path, 2).map_err(|e| err("connect", e))?;
        fe.set_owner().map_err(|e| err("SET_OWNER", e))?;
        let offered = fe.get_features().map_err(|e| err("GET_FEATURES", e))?;
        if offered & VERSION_1 == 0 {
            return Err(io::Error::other("back-end does not offer VERSION_1"));
        }
        let mut want = VERSION_1 | MRG_RXBUF;
        if o.event_idx {
            want |= EVENT_IDX;
        }
        let features = (offered & want) | (offered & PROTOCOL_FEATURES);
        fe.set_features(features)
            .map_err(|e| err("SET_FEATURES", e))?;
        if features & PROTOCOL_FEATURES != 0 {
            let p = fe
                .get_protocol_features()
                .map_err(|e| err("GET_PROTOCOL_FEATURES", e))?;
            let keep = p & (VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::REPLY_ACK);
            fe.set_protocol_features(keep)
                .map_err(|e| err("SET_PROTOCOL_FEATURES", e))?;
        }
        let region = VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: mem.len as u64,
            userspace_addr: user_base,
            mmap_offset: 0,
            mmap_handle: mem.file.as_raw_fd(),
        };
        fe.set_mem_table(&[region])
            .map_err(|e| err("SET_MEM_TABLE", e))?;

        let event_idx = features & EVENT_IDX != 0;
        let mut b = Bridge {
            _fe: fe,
            mem,
            rx,
            tx,
            tx_free: (0..size).rev().collect(),
            event_idx,
            mrg: features & MRG_RXBUF != 0,
            iov: Vec::with_capacity(usize::from(size)),
        };
        // All RX buffers are posted before the ring starts: the back-end sees them at once.
        for id in 0..size {
            let addr = b.rx.buf(id);
            b.mem
                .write_desc(b.rx.desc + 16 * u64::from(id), addr, o.rx_buf, F_WRITE, 0);
            b.rx.offer(&b.mem, id);
        }
        b.mem
            .u16(b.rx.avail + 2)
            .store(b.rx.avail_idx, Ordering::Release);
        b.rx.published = b.rx.avail_idx;
        b.rx.want_interrupt(&b.mem, event_idx, true);
        b.tx.want_interrupt(&b.mem, event_idx, false);
        for r in [&b.rx, &b.tx] {
            let fe = &mut b._fe;
            fe.set_vring_num(r.index, size)
                .map_err(|e| err("SET_VRING_NUM", e))?;
            fe.set_vring_base(r.index, 0)
                .map_err(|e| err("SET_VRING_BASE", e))?;
            fe.set_vring_addr(r.index, &r.config(user_base))
                .map_err(|e| err("SET_VRING_ADDR", e))?;
            fe.set_vring_call(r.index, &r.call)
                .map_err(|e| err("SET_VRING_CALL", e))?;
            fe.set_vring_kick(r.index, &r.kick)
                .map_err(|e| err("SET_VRING_KICK", e))?;
            if features & PROTOCOL_FEATURES != 0 {
                fe.set_vring_enable(r.index, true)
                    .map_err(|e| err("SET_VRING_ENABLE", e))?;
            }
        }
        // In case the back-end only looks at the ring when kicked.
        let _ = b.rx.kick.write(1);
        eprintln!(
            "passt-bridge: vhost-user features {features:#x} (EVENT_IDX {}, MRG_RXBUF {}), \
             queue size {size}, RX buffers {} B, guest memory {} MiB",
            b.event_idx,
            b.mrg,
            o.rx_buf,
            b.mem.len >> 20
        );
        Ok(b)
    }

    /// Returns TX buffers the back-end is done with to the free list.
    fn reclaim_tx(&mut self, c: &mut Counters) {
        let n = self.tx.pending(&self.mem);
        for _ in 0..n {
            let (id, _) = self.tx.used_elem(&self.mem, self.tx.last_used);
            self.tx.last_used = self.tx.last_used.wrapping_add(1);
            if id < u32::from(self.tx.size) {
                self.tx_free.push(id as u16);
            } else {
                c.errors += 1;
            }
        }
    }

    /// Moves frames from the tap to the TX ring until the tap is empty or the ring full.
    /// Returns false if the ring filled up first (the tap may have more).
    fn tap_to_ring(&mut self, tap: &Tap, c: &mut Counters) -> io::Result<bool> {
        const BATCH: u32 = 64;
        let mut batch = 0;
        loop {
            let Some(id) = self.tx_free.pop() else {
                self.tx.publish(&self.mem, self.event_idx);
                return Ok(false);
            };
            let addr = self.tx.buf(id);
            let p = self.mem.ptr(addr, TX_BUF);
            // SAFETY: buffer `id` is ours (on the free list) and TX_BUF long.
            let buf = unsafe { std::slice::from_raw_parts_mut(p, TX_BUF) };
            match tap.read(buf)? {
                None => {
                    self.tx_free.push(id);
                    self.tx.publish(&self.mem, self.event_idx);
                    return Ok(true);
                }
                Some(n) if n <= VNET_HDR => {
                    self.tx_free.push(id);
                    c.errors += 1;
                }
                Some(n) => {
                    self.mem
                        .write_desc(self.tx.desc + 16 * u64::from(id), addr, n as u32, 0, 0);
                    self.tx.offer(&self.mem, id);
                    c.tx_frames += 1;
                    c.tx_bytes += (n - VNET_HDR) as u64;
                    batch += 1;
                    if batch == BATCH {
                        // Let the back-end start on this batch while we read the next.
                        if self.tx.publish(&self.mem, self.event_idx) {
                            c.kicks += 1;
                        }
                        batch = 0;
                        self.reclaim_tx(c);
                    }
                }
            }
        }
    }

    /// Writes every complete used RX frame to the tap and posts its buffers again.
    fn ring_to_tap(&mut self, tap: &Tap, c: &mut Counters) {
        loop {
            let mut avail = self.rx.pending(&self.mem);
            while avail > 0 {
                let at = self.rx.last_used;
                let (id, len) = self.rx.used_elem(&self.mem, at);
                if id >= u32::from(self.rx.size) || len as usize > self.rx.buf_len as usize {
                    c.errors += 1;
                    self.rx.last_used = at.wrapping_add(1);
                    avail -= 1;
                    continue;
                }
                let hdr = self.rx.buf(id as u16);
                let nbuf = if self.mrg {
                    self.mem.read_u16(hdr + 10).max(1)
                } else {
                    1
                };
                if nbuf > avail {
                    // The back-end publishes whole frames; wait for the rest anyway.
                    c.errors += 1;
                    break;
                }
                self.iov.clear();
                let mut bytes = 0usize;
                for k in 0..nbuf {
                    let (id, len) = self.rx.used_elem(&self.mem, at.wrapping_add(k));
                    let id = (id as u16) & (self.rx.size - 1);
                    let len = (len as usize).min(self.rx.buf_len as usize);
                    let a = self.rx.buf(id);
                    self.iov.push(libc::iovec {
                        iov_base: self.mem.ptr(a, len).cast(),
                        iov_len: len,
                    });
                    bytes += len;
                }
                if bytes > VNET_HDR {
                    match tap.writev(&self.iov) {
                        Ok(_) => {
                            c.rx_frames += 1;
                            c.rx_bytes += (bytes - VNET_HDR) as u64;
                        }
                        Err(_) => c.rx_dropped += 1,
                    }
                } else {
                    c.errors += 1;
                }
                for k in 0..nbuf {
                    let (id, _) = self.rx.used_elem(&self.mem, at.wrapping_add(k));
                    let id = (id as u16) & (self.rx.size - 1);
                    self.rx.offer(&self.mem, id);
                }
                self.rx.last_used = at.wrapping_add(nbuf);
                avail -= nbuf;
            }
            if self.rx.publish(&self.mem, self.event_idx) {
                c.kicks += 1;
            }
            self.rx.want_interrupt(&self.mem, self.event_idx, true);
            if self.rx.pending(&self.mem) == 0 {
                return;
            }
        }
    }

    /// The event loop; returns only on error.
    pub fn run(mut self, tap: &Tap, c: &mut Counters) -> io::Result<()> {
        const TAP: u64 = 0;
        const RX_CALL: u64 = 1;
        const TX_CALL: u64 = 2;
        let ep = Epoll::new()?;
        ep.add(tap.fd(), libc::EPOLLIN as u32, TAP)?;
        ep.add(self.rx.call.as_raw_fd(), libc::EPOLLIN as u32, RX_CALL)?;
        ep.add(self.tx.call.as_raw_fd(), libc::EPOLLIN as u32, TX_CALL)?;
        let mut watching_tap = true;
        let mut tap_more = false;
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 8];
        loop {
            self.reclaim_tx(c);
            if tap_more && !self.tx_free.is_empty() {
                tap_more = !self.tap_to_ring(tap, c)?;
            }
            // The tap is watched only while there is a TX buffer to read into; otherwise
            // the TX interrupt wakes us when the back-end returns some.
            let want_tap = !tap_more;
            if want_tap != watching_tap {
                ep.modify(
                    tap.fd(),
                    if want_tap { libc::EPOLLIN as u32 } else { 0 },
                    TAP,
                )?;
                watching_tap = want_tap;
            }
            if self.rx.pending(&self.mem) > 0 {
                self.ring_to_tap(tap, c);
            }
            self.tx.want_interrupt(&self.mem, self.event_idx, tap_more);
            if tap_more && self.tx.pending(&self.mem) > 0 {
                continue;
            }
            let n = ep.wait(&mut events, -1)?;
            for ev in &events[..n] {
                match ev.u64 {
                    TAP => tap_more = !self.tap_to_ring(tap, c)?,
                    RX_CALL => {
                        let _ = self.rx.call.read();
                        c.calls += 1;
                        self.ring_to_tap(tap, c);
                    }
                    _ => {
                        let _ = self.tx.call.read();
                        c.calls += 1;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::need_event;

    #[test]
    fn need_event_matches_the_spec() {
        // Event index 5 is crossed when the index moves from 5 to 6 or beyond.
        assert!(need_event(5, 6, 5));
        assert!(need_event(5, 10, 3));
        assert!(!need_event(5, 5, 3));
        assert!(!need_event(5, 12, 6));
        // Across the wrap.
        assert!(need_event(0xffff, 1, 0xfffe));
    }
}
