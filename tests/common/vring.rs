//! A VMM and a guest driver for the vhost-user-net device, shared by the integration tests
//! that drive it (tests/vhost_user.rs, tests/alloc_count.rs): guest memory is a memfd mapped
//! by both sides, the `vhost` crate's front-end plays the VMM over a UNIX socket, and a small
//! split-ring driver plays the guest's virtio-net driver.
//!
//! Synchronisation is by events only: waits sleep on the call eventfd the device writes, with
//! a timeout that only turns a hang into a failure.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};
use vmm_sys_util::eventfd::EventFd;

pub const MEM_SIZE: usize = 16 << 20;
pub const QSIZE: u16 = 256;
/// The virtio-net header (with `num_buffers`).
pub const HDR: usize = 12;
pub const TIMEOUT: Duration = Duration::from_secs(10);

pub const VERSION_1: u64 = 1 << 32;
pub const MRG_RXBUF: u64 = 1 << 15;
pub const EVENT_IDX: u64 = 1 << 29;
pub const ALL: u64 = VERSION_1 | MRG_RXBUF | EVENT_IDX;
pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;

pub fn pollfd(fd: RawFd) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}

/// Waits until `fd` is readable; false on timeout.
pub fn wait_readable(fd: RawFd, timeout: Duration) -> bool {
    let mut p = pollfd(fd);
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut p, 1, timeout.as_millis() as libc::c_int) };
    n > 0
}

// ---------------------------------------------------------------------------------------
// The guest side: shared memory and a split-ring driver.

pub struct Guest {
    pub mem: GuestMemoryMmap,
    /// The front-end's address of GPA 0 (our own mapping, as for a VMM).
    pub user_base: u64,
}

impl Guest {
    pub fn new() -> Guest {
        // SAFETY: valid C string; the fd is owned by the File.
        let fd = unsafe { libc::memfd_create(c"passt-rs-guest".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: fresh descriptor.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(MEM_SIZE as u64).expect("set_len");
        let mem = GuestMemoryMmap::from_ranges_with_files(&[(
            GuestAddress(0),
            MEM_SIZE,
            Some(FileOffset::new(file, 0)),
        )])
        .expect("guest memory");
        let user_base = mem.get_host_address(GuestAddress(0)).expect("host address") as u64;
        Guest { mem, user_base }
    }

    pub fn region(&self) -> VhostUserMemoryRegionInfo {
        let r = self.mem.find_region(GuestAddress(0)).expect("region");
        assert_eq!(r.start_addr(), GuestAddress(0));
        VhostUserMemoryRegionInfo::from_guest_region(r).expect("region info")
    }
}

/// One split virtqueue, driver side.
pub struct Ring {
    pub index: usize,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub next_desc: u16,
    pub avail_idx: u16,
    pub buf_base: u64,
    pub buf_next: u64,
    pub buf_end: u64,
    pub kick: EventFd,
    pub call: EventFd,
    pub err: EventFd,
}

impl Ring {
    pub fn new(index: usize, base: u64, bufs: u64, buf_len: u64) -> Ring {
        Ring {
            index,
            desc: base,
            avail: base + 0x1000,
            used: base + 0x2000,
            next_desc: 0,
            avail_idx: 0,
            buf_base: bufs,
            buf_next: bufs,
            buf_end: bufs + buf_len,
            kick: EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
            call: EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
            err: EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
        }
    }

    pub fn rx(g: &Guest) -> Ring {
        let r = Ring::new(0, 0x1000, 0x10_0000, 0x70_0000);
        r.clear(g);
        r
    }

    pub fn tx(g: &Guest) -> Ring {
        let r = Ring::new(1, 0x8000, 0x80_0000, 0x70_0000);
        r.clear(g);
        r
    }

    pub fn clear(&self, g: &Guest) {
        let zero = vec![0u8; 0x3000];
        g.mem
            .write_slice(&zero, GuestAddress(self.desc))
            .expect("clear");
    }

    pub fn config(&self, g: &Guest) -> VringConfigData {
        VringConfigData {
            queue_max_size: QSIZE,
            queue_size: QSIZE,
            flags: 0,
            desc_table_addr: g.user_base + self.desc,
            used_ring_addr: g.user_base + self.used,
            avail_ring_addr: g.user_base + self.avail,
            log_addr: None,
        }
    }

    pub fn alloc(&mut self, len: u64) -> u64 {
        let len = len.next_multiple_of(64);
        if self.buf_next + len > self.buf_end {
            self.buf_next = self.buf_base;
        }
        let a = self.buf_next;
        self.buf_next += len;
        a
    }

    /// Writes descriptors (addr, len, flags, next) at consecutive slots; returns the first.
    pub fn put(&mut self, g: &Guest, descs: &[(u64, u32, u16, u16)]) -> u16 {
        let first = self.next_desc;
        for &(addr, len, flags, next) in descs {
            let slot = u64::from(self.next_desc % QSIZE);
            let a = GuestAddress(self.desc + 16 * slot);
            g.mem.write_obj(addr, a).expect("desc");
            g.mem.write_obj(len, GuestAddress(a.0 + 8)).expect("desc");
            g.mem
                .write_obj(flags, GuestAddress(a.0 + 12))
                .expect("desc");
            g.mem.write_obj(next, GuestAddress(a.0 + 14)).expect("desc");
            self.next_desc = (self.next_desc + 1) % QSIZE;
        }
        first
    }

    /// A chain holding `data` cut into pieces of at most `piece` bytes.
    pub fn chain(&mut self, g: &Guest, data: &[u8], pieces: &[usize], write: bool) -> u16 {
        let mut descs = Vec::new();
        let mut off = 0;
        let mut k = 0;
        while off < data.len() {
            let n = pieces[k.min(pieces.len() - 1)].min(data.len() - off);
            let a = self.alloc(n as u64);
            g.mem
                .write_slice(&data[off..off + n], GuestAddress(a))
                .expect("buf");
            descs.push((a, n as u32, if write { F_WRITE } else { 0 }, 0u16));
            off += n;
            k += 1;
        }
        let first = self.next_desc;
        let last = descs.len() - 1;
        for (i, d) in descs.iter_mut().enumerate() {
            if i < last {
                d.2 |= F_NEXT;
                d.3 = (first + i as u16 + 1) % QSIZE;
            }
        }
        self.put(g, &descs)
    }

    pub fn offer(&mut self, g: &Guest, head: u16) {
        let slot = u64::from(self.avail_idx % QSIZE);
        g.mem
            .write_obj(head, GuestAddress(self.avail + 4 + 2 * slot))
            .expect("avail ring");
        self.avail_idx = self.avail_idx.wrapping_add(1);
        g.mem
            .store(
                self.avail_idx,
                GuestAddress(self.avail + 2),
                Ordering::Release,
            )
            .expect("avail idx");
    }

    pub fn kick(&self) {
        self.kick.write(1).expect("kick");
    }

    pub fn used_idx(&self, g: &Guest) -> u16 {
        g.mem
            .load(GuestAddress(self.used + 2), Ordering::Acquire)
            .expect("used idx")
    }

    pub fn used_elem(&self, g: &Guest, i: u16) -> (u16, u32) {
        let a = self.used + 4 + 8 * u64::from(i % QSIZE);
        let id: u32 = g.mem.read_obj(GuestAddress(a)).expect("id");
        let len: u32 = g.mem.read_obj(GuestAddress(a + 4)).expect("len");
        (id as u16, len)
    }

    /// Waits until the used index reaches `target`, sleeping on the call eventfd.
    pub fn wait_used(&self, g: &Guest, target: u16) {
        let deadline = Instant::now() + TIMEOUT;
        assert!(
            self.wait_used_by(g, target, deadline),
            "ring {}: used index stuck at {}, waiting for {target}",
            self.index,
            self.used_idx(g)
        );
    }

    /// Waits until the used index reaches `target` or `deadline` passes; whether it did.
    pub fn wait_used_by(&self, g: &Guest, target: u16, deadline: Instant) -> bool {
        loop {
            let idx = self.used_idx(g);
            if idx.wrapping_sub(target) as i16 >= 0 {
                return true;
            }
            // EVENT_IDX: interrupt us on the next publication.
            g.mem
                .store(
                    idx,
                    GuestAddress(self.avail + 4 + 2 * u64::from(QSIZE)),
                    Ordering::SeqCst,
                )
                .expect("used_event");
            if self.used_idx(g) != idx {
                continue;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if !wait_readable(self.call.as_raw_fd(), left) {
                return self.used_idx(g).wrapping_sub(target) as i16 >= 0;
            }
            let _ = self.call.read();
        }
    }
}

/// A TX frame: zeroed virtio-net header, then the frame, in pieces.
pub fn send_frame(g: &Guest, tx: &mut Ring, frame: &[u8], pieces: &[usize]) {
    let mut data = vec![0u8; HDR];
    data.extend_from_slice(frame);
    let head = tx.chain(g, &data, pieces, false);
    tx.offer(g, head);
    tx.kick();
}

/// Posts `n` RX buffers of `len` bytes; returns (head, address) of each.
pub fn post_rx(g: &Guest, rx: &mut Ring, n: usize, len: u32) -> Vec<(u16, u64)> {
    (0..n)
        .map(|_| {
            let a = rx.alloc(u64::from(len));
            let h = rx.put(g, &[(a, len, F_WRITE, 0)]);
            rx.offer(g, h);
            (h, a)
        })
        .collect()
}

/// Reads the frame starting at used element `at`; returns it and its buffer count.
pub fn recv_frame(g: &Guest, rx: &Ring, bufs: &[(u16, u64)], at: u16) -> (Vec<u8>, u16) {
    let addr = |id: u16| {
        bufs.iter()
            .find(|(h, _)| *h == id)
            .map(|&(_, a)| a)
            .expect("a buffer we posted")
    };
    let (id, len) = rx.used_elem(g, at);
    let mut b = vec![0u8; len as usize];
    g.mem
        .read_slice(&mut b, GuestAddress(addr(id)))
        .expect("read");
    let n = u16::from_le_bytes([b[10], b[11]]);
    let mut frame = b[HDR..].to_vec();
    for k in 1..n {
        let (id, len) = rx.used_elem(g, at.wrapping_add(k));
        let mut b = vec![0u8; len as usize];
        g.mem
            .read_slice(&mut b, GuestAddress(addr(id)))
            .expect("read");
        frame.extend_from_slice(&b);
    }
    (frame, n)
}

pub fn frame(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

// ---------------------------------------------------------------------------------------
// The VMM side: the vhost crate's front-end, plus raw messages it refuses to send.

pub struct Vmm {
    pub fe: Frontend,
    pub raw: UnixStream,
}

impl Vmm {
    pub fn connect(path: &Path) -> Vmm {
        Vmm::over(UnixStream::connect(path).expect("connect"))
    }

    pub fn over(sock: UnixStream) -> Vmm {
        let raw = sock.try_clone().expect("dup");
        let fe = Frontend::from_stream(sock, 2);
        fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        Vmm { fe, raw }
    }

    /// Sends a request the front-end API won't (or can't in this order); reads a u64 reply
    /// when one is expected.
    pub fn raw(
        &mut self,
        code: u32,
        body: &[u8],
        need_reply: bool,
        expect_reply: bool,
    ) -> Option<u64> {
        let flags: u32 = 0x1 | if need_reply { 0x8 } else { 0 };
        let mut m = Vec::new();
        m.extend_from_slice(&code.to_ne_bytes());
        m.extend_from_slice(&flags.to_ne_bytes());
        m.extend_from_slice(&(body.len() as u32).to_ne_bytes());
        m.extend_from_slice(body);
        self.raw.write_all(&m).expect("raw send");
        if !expect_reply {
            return None;
        }
        let mut h = [0u8; 12];
        self.raw.read_exact(&mut h).expect("reply header");
        assert_eq!(u32::from_ne_bytes(h[0..4].try_into().expect("4")), code);
        assert_eq!(
            u32::from_ne_bytes(h[4..8].try_into().expect("4")) & 0x4,
            0x4
        );
        let mut b = [0u8; 8];
        self.raw.read_exact(&mut b).expect("reply body");
        Some(u64::from_ne_bytes(b))
    }

    pub fn enable_raw(&mut self, index: u32) {
        let mut body = index.to_ne_bytes().to_vec();
        body.extend_from_slice(&1u32.to_ne_bytes());
        // SET_VRING_ENABLE = 18, with NEED_REPLY as QEMU 10 does.
        assert_eq!(self.raw(18, &body, true, true), Some(0));
    }

    pub fn negotiate_protocol(&mut self) {
        let p = self
            .fe
            .get_protocol_features()
            .expect("get protocol features");
        assert!(p.contains(VhostUserProtocolFeatures::REPLY_ACK));
        assert!(p.contains(VhostUserProtocolFeatures::MQ));
        assert!(p.contains(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS));
        self.fe
            .set_protocol_features(p)
            .expect("set protocol features");
    }

    pub fn setup_ring(&mut self, g: &Guest, r: &Ring) {
        let i = r.index;
        self.fe.set_vring_num(i, QSIZE).expect("num");
        self.fe.set_vring_base(i, 0).expect("base");
        self.fe.set_vring_addr(i, &r.config(g)).expect("addr");
        self.fe.set_vring_kick(i, &r.kick).expect("kick");
        self.fe.set_vring_call(i, &r.call).expect("call");
    }

    /// QEMU's order: enables before SET_FEATURES, ADD_MEM_REG, rings last.
    pub fn start_qemu(&mut self, g: &Guest, rx: &Ring, tx: &Ring, features: u64) {
        let offered = self.fe.get_features().expect("get features");
        assert_eq!(offered & features, features);
        self.negotiate_protocol();
        // GET_QUEUE_NUM (17) via raw: the front-end would take "1" as its ring count.
        assert_eq!(self.raw(17, &[], false, true), Some(1));
        assert_eq!(self.fe.get_max_mem_slots().expect("slots"), 32);
        self.fe.set_owner().expect("owner");
        self.fe.get_features().expect("features again");
        for r in [rx, tx] {
            self.fe.set_vring_call(r.index, &r.call).expect("call");
            self.fe.set_vring_err(r.index, &r.err).expect("err");
        }
        // The front-end API refuses this before SET_FEATURES; QEMU does it.
        self.enable_raw(0);
        self.enable_raw(1);
        self.fe
            .set_features(features | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits())
            .expect("set features");
        self.fe.add_mem_region(&g.region()).expect("add mem reg");
        self.setup_ring(g, rx);
        self.setup_ring(g, tx);
    }

    /// cloud-hypervisor's order: features first, SET_MEM_TABLE, enables after the rings.
    pub fn start_ch(&mut self, g: &Guest, rx: &Ring, tx: &Ring, features: u64) {
        self.fe.set_owner().expect("owner");
        let offered = self.fe.get_features().expect("get features");
        assert_eq!(offered & features, features);
        self.fe
            .set_features(features | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits())
            .expect("set features");
        self.negotiate_protocol();
        self.fe.set_mem_table(&[g.region()]).expect("mem table");
        for r in [rx, tx] {
            self.setup_ring(g, r);
            self.fe.set_vring_err(r.index, &r.err).expect("err");
            self.fe.set_vring_enable(r.index, true).expect("enable");
        }
    }
}

// ---------------------------------------------------------------------------------------
// A guest that keeps its RX ring stocked: a frame link for protocol tests.

/// Both rings of a started device, as a frame link: RX buffers are replaced as frames are
/// taken, TX chains are a virtio-net header and the frame in one descriptor each.
pub struct RingLink<'g> {
    pub g: &'g Guest,
    pub rx: Ring,
    pub tx: Ring,
    /// The buffer address last posted at each descriptor slot.
    bufs: Vec<(u16, u64)>,
    buf_len: u32,
    /// The next used RX element to read.
    seen: u16,
    /// Frames that took more than one RX buffer.
    pub merged: u64,
}

/// TX chains the guest keeps in flight at most: two descriptors each, in a ring of
/// [`QSIZE`], so the slots a new chain takes were given back.
const TX_IN_FLIGHT: u16 = QSIZE / 2 - 8;

impl<'g> RingLink<'g> {
    /// Fills the RX ring with buffers of `buf_len` bytes (a frame may take several: they
    /// are mergeable) and kicks.
    pub fn new(g: &'g Guest, mut rx: Ring, tx: Ring, buf_len: u32) -> RingLink<'g> {
        let mut bufs: Vec<(u16, u64)> = (0..QSIZE).map(|h| (h, 0)).collect();
        for (h, a) in post_rx(g, &mut rx, usize::from(QSIZE), buf_len) {
            bufs[usize::from(h)].1 = a;
        }
        rx.kick();
        RingLink {
            g,
            rx,
            tx,
            bufs,
            buf_len,
            seen: 0,
            merged: 0,
        }
    }

    /// Puts `frame` on the TX ring without kicking; waits first if too much is in flight.
    pub fn offer(&mut self, frame: &[u8]) {
        let done = self.tx.avail_idx.wrapping_sub(TX_IN_FLIGHT);
        self.tx.wait_used(self.g, done);
        let mut data = Vec::with_capacity(HDR + frame.len());
        data.resize(HDR, 0);
        data.extend_from_slice(frame);
        let head = self.tx.chain(self.g, &data, &[HDR, data.len()], false);
        self.tx.offer(self.g, head);
    }

    /// The next frame the device published, if any; its buffers go back on the ring
    /// (kicked).
    pub fn take(&mut self) -> Option<Vec<u8>> {
        if self.rx.used_idx(self.g) == self.seen {
            return None;
        }
        let (f, n) = recv_frame(self.g, &self.rx, &self.bufs, self.seen);
        self.seen = self.seen.wrapping_add(n);
        self.merged += u64::from(n > 1);
        for (h, a) in post_rx(self.g, &mut self.rx, usize::from(n), self.buf_len) {
            self.bufs[usize::from(h)].1 = a;
        }
        self.rx.kick();
        Some(f)
    }
}

impl super::tcp_guest::FrameLink for RingLink<'_> {
    fn send(&mut self, frame: &[u8]) {
        self.offer(frame);
        self.tx.kick();
    }

    fn try_recv(&mut self, timeout: Duration) -> Option<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(f) = self.take() {
                return Some(f);
            }
            if !self
                .rx
                .wait_used_by(self.g, self.seen.wrapping_add(1), deadline)
            {
                return None;
            }
        }
    }
}
