//! End-to-end tests of the vhost-user-net device: the `vhost` crate's front-end plays the
//! VMM over a real UNIX socket, guest memory is a memfd mapped by both sides, and a small
//! split-ring driver in this file plays the guest. The device runs in its own thread with a
//! `poll()` loop over `Device::watched_fds()`, like the real event loop, and an engine that
//! records frames from the guest and echoes them back.
//!
//! Synchronisation is by events only: the test waits for the call (or error) eventfd the
//! device writes, with a timeout that only turns a hang into a failure.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

mod common;

use passt::tap::{FrameHandler, ToGuest, MAX_FRAME};
use passt::vhost_user::{Device, DeviceOptions, Outcome, Source, Stats};
use vhost::vhost_user::message::{
    VhostUserHeaderFlag, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};
use vmm_sys_util::eventfd::EventFd;

// ---------------------------------------------------------------------------------------
// Allocation counting, per thread, to check the data path allocates nothing.

struct CountingAlloc;

thread_local! {
    static ALLOCS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

fn bump() {
    let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
}

fn allocs() -> u64 {
    ALLOCS.try_with(|c| c.get()).unwrap_or(0)
}

// SAFETY: forwards to the system allocator; counting touches no allocation.
unsafe impl std::alloc::GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, l: std::alloc::Layout) -> *mut u8 {
        bump();
        // SAFETY: same contract as ours.
        unsafe { std::alloc::System.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: std::alloc::Layout) -> *mut u8 {
        bump();
        // SAFETY: same contract as ours.
        unsafe { std::alloc::System.alloc_zeroed(l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: std::alloc::Layout, n: usize) -> *mut u8 {
        bump();
        // SAFETY: same contract as ours.
        unsafe { std::alloc::System.realloc(p, l, n) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: std::alloc::Layout) {
        // SAFETY: same contract as ours.
        unsafe { std::alloc::System.dealloc(p, l) }
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

const MEM_SIZE: usize = 16 << 20;
const QSIZE: u16 = 256;
const HDR: usize = 12;
const TIMEOUT: Duration = Duration::from_secs(10);

const VERSION_1: u64 = 1 << 32;
const MRG_RXBUF: u64 = 1 << 15;
const EVENT_IDX: u64 = 1 << 29;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

// ---------------------------------------------------------------------------------------
// The device side: a thread with a poll loop.

enum Cmd {
    Send(Vec<u8>),
    Stats(mpsc::Sender<Stats>),
    Stop,
}

/// Records guest frames (unless told not to, for the allocation test); echoes them back if
/// asked.
struct Recorder {
    frames: Arc<Mutex<Vec<Vec<u8>>>>,
    record: bool,
    echo: bool,
}

impl FrameHandler for Recorder {
    fn handle_frame(&mut self, frame: &[u8], to_guest: &mut dyn ToGuest) {
        if self.record {
            self.frames.lock().expect("lock").push(frame.to_vec());
        }
        if self.echo {
            to_guest.send(&[frame]);
        }
    }
}

struct Server {
    path: PathBuf,
    cmds: mpsc::Sender<Cmd>,
    wake: EventFd,
    frames: Arc<Mutex<Vec<Vec<u8>>>>,
    /// Allocations made by the device thread inside kick handling and engine sends.
    hot_allocs: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

static SERVERS: AtomicUsize = AtomicUsize::new(0);

impl Server {
    fn start(echo: bool) -> Server {
        Self::start_with(echo, true)
    }

    fn start_with(echo: bool, record: bool) -> Server {
        let n = SERVERS.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!(
            "passt-rs-vhost-test-{}-{n}.sock",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).expect("bind");
        let (cmds, rx) = mpsc::channel();
        let wake = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let wake2 = wake.try_clone().expect("dup");
        let frames = Arc::new(Mutex::new(Vec::new()));
        let engine = Recorder {
            frames: Arc::clone(&frames),
            record,
            echo,
        };
        let hot_allocs = Arc::new(AtomicU64::new(0));
        let hot = Arc::clone(&hot_allocs);
        let thread = std::thread::spawn(move || serve(listener, rx, wake2, engine, hot));
        Server {
            path,
            cmds,
            wake,
            frames,
            hot_allocs,
            thread: Some(thread),
        }
    }

    fn cmd(&self, c: Cmd) {
        self.cmds.send(c).expect("device thread alive");
        self.wake.write(1).expect("wake");
    }

    /// Sends a frame to the guest from the "engine" side.
    fn send(&self, frame: Vec<u8>) {
        self.cmd(Cmd::Send(frame));
    }

    /// Counters, after everything sent before was processed.
    fn stats(&self) -> Stats {
        let (tx, rx) = mpsc::channel();
        self.cmd(Cmd::Stats(tx));
        rx.recv_timeout(TIMEOUT).expect("stats")
    }

    fn frames(&self) -> Vec<Vec<u8>> {
        self.frames.lock().expect("lock").clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.cmds.send(Cmd::Stop);
        let _ = self.wake.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

#[derive(Clone, Copy)]
enum Tag {
    Wake,
    Accept,
    Dev(Source),
}

fn serve(
    listener: UnixListener,
    cmds: mpsc::Receiver<Cmd>,
    wake: EventFd,
    mut eng: Recorder,
    hot: Arc<AtomicU64>,
) {
    let mut dev = Device::new(DeviceOptions::default());
    loop {
        let mut tags = vec![Tag::Wake];
        let mut pfds = vec![pollfd(wake.as_raw_fd())];
        if !dev.is_connected() {
            tags.push(Tag::Accept);
            pfds.push(pollfd(listener.as_raw_fd()));
        }
        for (fd, s) in dev.watched_fds() {
            tags.push(Tag::Dev(s));
            pfds.push(pollfd(fd));
        }
        // SAFETY: pfds is a valid array of pollfd of the given length.
        let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, -1) };
        assert!(n >= 0, "poll: {}", std::io::Error::last_os_error());
        for (p, tag) in pfds.iter().zip(tags) {
            if p.revents == 0 {
                continue;
            }
            match tag {
                Tag::Wake => {
                    let _ = wake.read();
                    while let Ok(c) = cmds.try_recv() {
                        match c {
                            Cmd::Send(f) => {
                                let a = allocs();
                                dev.to_guest().send(&[&f]);
                                dev.to_guest().flush();
                                hot.fetch_add(allocs() - a, Ordering::Relaxed);
                            }
                            Cmd::Stats(reply) => {
                                let _ = reply.send(dev.stats());
                            }
                            Cmd::Stop => return,
                        }
                    }
                }
                Tag::Accept => {
                    let (conn, _) = listener.accept().expect("accept");
                    dev.attach(conn);
                }
                Tag::Dev(s) => {
                    let a = allocs();
                    let out = dev.handle(s, &mut eng);
                    if matches!(s, Source::Kick(_)) {
                        hot.fetch_add(allocs() - a, Ordering::Relaxed);
                    }
                    if out != Outcome::Continue {
                        // Descriptors changed: don't trust the rest of this poll set.
                        break;
                    }
                }
            }
        }
    }
}

fn pollfd(fd: RawFd) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}

/// Waits until `fd` is readable; false on timeout.
fn wait_readable(fd: RawFd, timeout: Duration) -> bool {
    let mut p = pollfd(fd);
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut p, 1, timeout.as_millis() as libc::c_int) };
    n > 0
}

// ---------------------------------------------------------------------------------------
// The guest side: shared memory and a split-ring driver.

struct Guest {
    mem: GuestMemoryMmap,
    /// The front-end's address of GPA 0 (our own mapping, as for a VMM).
    user_base: u64,
}

impl Guest {
    fn new() -> Guest {
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

    fn region(&self) -> VhostUserMemoryRegionInfo {
        let r = self.mem.find_region(GuestAddress(0)).expect("region");
        assert_eq!(r.start_addr(), GuestAddress(0));
        VhostUserMemoryRegionInfo::from_guest_region(r).expect("region info")
    }
}

/// One split virtqueue, driver side.
struct Ring {
    index: usize,
    desc: u64,
    avail: u64,
    used: u64,
    next_desc: u16,
    avail_idx: u16,
    buf_base: u64,
    buf_next: u64,
    buf_end: u64,
    kick: EventFd,
    call: EventFd,
    err: EventFd,
}

impl Ring {
    fn new(index: usize, base: u64, bufs: u64, buf_len: u64) -> Ring {
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

    fn rx(g: &Guest) -> Ring {
        let r = Ring::new(0, 0x1000, 0x10_0000, 0x70_0000);
        r.clear(g);
        r
    }

    fn tx(g: &Guest) -> Ring {
        let r = Ring::new(1, 0x8000, 0x80_0000, 0x70_0000);
        r.clear(g);
        r
    }

    fn clear(&self, g: &Guest) {
        let zero = vec![0u8; 0x3000];
        g.mem
            .write_slice(&zero, GuestAddress(self.desc))
            .expect("clear");
    }

    fn config(&self, g: &Guest) -> VringConfigData {
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

    fn alloc(&mut self, len: u64) -> u64 {
        let len = len.next_multiple_of(64);
        if self.buf_next + len > self.buf_end {
            self.buf_next = self.buf_base;
        }
        let a = self.buf_next;
        self.buf_next += len;
        a
    }

    /// Writes descriptors (addr, len, flags, next) at consecutive slots; returns the first.
    fn put(&mut self, g: &Guest, descs: &[(u64, u32, u16, u16)]) -> u16 {
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
    fn chain(&mut self, g: &Guest, data: &[u8], pieces: &[usize], write: bool) -> u16 {
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

    fn offer(&mut self, g: &Guest, head: u16) {
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

    fn kick(&self) {
        self.kick.write(1).expect("kick");
    }

    fn used_idx(&self, g: &Guest) -> u16 {
        g.mem
            .load(GuestAddress(self.used + 2), Ordering::Acquire)
            .expect("used idx")
    }

    fn used_elem(&self, g: &Guest, i: u16) -> (u16, u32) {
        let a = self.used + 4 + 8 * u64::from(i % QSIZE);
        let id: u32 = g.mem.read_obj(GuestAddress(a)).expect("id");
        let len: u32 = g.mem.read_obj(GuestAddress(a + 4)).expect("len");
        (id as u16, len)
    }

    /// Waits until the used index reaches `target`, sleeping on the call eventfd.
    fn wait_used(&self, g: &Guest, target: u16) {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let idx = self.used_idx(g);
            if idx.wrapping_sub(target) as i16 >= 0 {
                return;
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
            assert!(
                wait_readable(self.call.as_raw_fd(), left),
                "ring {}: used index stuck at {idx}, waiting for {target}",
                self.index
            );
            let _ = self.call.read();
        }
    }
}

/// A TX frame: zeroed virtio-net header, then the frame, in pieces.
fn send_frame(g: &Guest, tx: &mut Ring, frame: &[u8], pieces: &[usize]) {
    let mut data = vec![0u8; HDR];
    data.extend_from_slice(frame);
    let head = tx.chain(g, &data, pieces, false);
    tx.offer(g, head);
    tx.kick();
}

/// Posts `n` RX buffers of `len` bytes; returns (head, address) of each.
fn post_rx(g: &Guest, rx: &mut Ring, n: usize, len: u32) -> Vec<(u16, u64)> {
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
fn recv_frame(g: &Guest, rx: &Ring, bufs: &[(u16, u64)], at: u16) -> (Vec<u8>, u16) {
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
        let (id, len) = rx.used_elem(g, at + k);
        let mut b = vec![0u8; len as usize];
        g.mem
            .read_slice(&mut b, GuestAddress(addr(id)))
            .expect("read");
        frame.extend_from_slice(&b);
    }
    (frame, n)
}

fn frame(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

// ---------------------------------------------------------------------------------------
// The VMM side: the vhost crate's front-end, plus raw messages it refuses to send.

struct Vmm {
    fe: Frontend,
    raw: UnixStream,
}

impl Vmm {
    fn connect(s: &Server) -> Vmm {
        Vmm::over(UnixStream::connect(&s.path).expect("connect"))
    }

    fn over(sock: UnixStream) -> Vmm {
        let raw = sock.try_clone().expect("dup");
        let fe = Frontend::from_stream(sock, 2);
        fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        Vmm { fe, raw }
    }

    /// Sends a request the front-end API won't (or can't in this order); reads a u64 reply
    /// when one is expected.
    fn raw(&mut self, code: u32, body: &[u8], need_reply: bool, expect_reply: bool) -> Option<u64> {
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

    fn enable_raw(&mut self, index: u32) {
        let mut body = index.to_ne_bytes().to_vec();
        body.extend_from_slice(&1u32.to_ne_bytes());
        // SET_VRING_ENABLE = 18, with NEED_REPLY as QEMU 10 does.
        assert_eq!(self.raw(18, &body, true, true), Some(0));
    }

    fn negotiate_protocol(&mut self) {
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

    fn setup_ring(&mut self, g: &Guest, r: &Ring) {
        let i = r.index;
        self.fe.set_vring_num(i, QSIZE).expect("num");
        self.fe.set_vring_base(i, 0).expect("base");
        self.fe.set_vring_addr(i, &r.config(g)).expect("addr");
        self.fe.set_vring_kick(i, &r.kick).expect("kick");
        self.fe.set_vring_call(i, &r.call).expect("call");
    }

    /// QEMU's order: enables before SET_FEATURES, ADD_MEM_REG, rings last.
    fn start_qemu(&mut self, g: &Guest, rx: &Ring, tx: &Ring, features: u64) {
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
    fn start_ch(&mut self, g: &Guest, rx: &Ring, tx: &Ring, features: u64) {
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

/// One frame each way: guest -> engine (recorded, echoed) -> guest.
fn ping(s: &Server, g: &Guest, rx: &mut Ring, tx: &mut Ring, len: usize, seed: u8) {
    let before = s.frames().len();
    // Exactly one buffer per ping, so the echo can only land in it.
    let bufs = post_rx(g, rx, 1, 2048);
    rx.kick();
    let rx_at = rx.used_idx(g);
    let f = frame(len, seed);
    send_frame(g, tx, &f, &[HDR, 4096]);
    tx.wait_used(g, tx.avail_idx);
    rx.wait_used(g, rx_at.wrapping_add(1));
    let frames = s.frames();
    assert_eq!(frames.len(), before + 1);
    assert_eq!(frames[before], f);
    let (got, n) = recv_frame(g, rx, &bufs, rx_at);
    assert_eq!(n, 1);
    assert_eq!(&got[..len], &f[..]);
}

const ALL: u64 = VERSION_1 | MRG_RXBUF | EVENT_IDX;

// ---------------------------------------------------------------------------------------

#[test]
fn qemu_order_frames_both_ways() {
    let s = Server::start(true);
    let g = Guest::new();
    let (mut rx, mut tx) = (Ring::rx(&g), Ring::tx(&g));
    let mut v = Vmm::connect(&s);
    v.start_qemu(&g, &rx, &tx, ALL);
    ping(&s, &g, &mut rx, &mut tx, 100, 1);
    ping(&s, &g, &mut rx, &mut tx, 1500, 2);
    // Short frames are padded to 60 bytes.
    ping(&s, &g, &mut rx, &mut tx, 42, 3);
    let st = s.stats();
    assert_eq!(st.tx.frames, 3);
    assert_eq!(st.rx.frames, 3);
    assert_eq!(st.ctrl.malformed + st.ctrl.failed + st.ctrl.unsupported, 0);
}

#[test]
fn cloud_hypervisor_order_without_event_idx() {
    let s = Server::start(true);
    let g = Guest::new();
    let (mut rx, mut tx) = (Ring::rx(&g), Ring::tx(&g));
    let mut v = Vmm::connect(&s);
    v.start_ch(&g, &rx, &tx, VERSION_1 | MRG_RXBUF);
    for i in 0..5 {
        ping(&s, &g, &mut rx, &mut tx, 200 + i * 300, i as u8);
    }
}

#[test]
fn twenty_reconnects() {
    let s = Server::start(true);
    for i in 0..20u8 {
        let g = Guest::new();
        let (mut rx, mut tx) = (Ring::rx(&g), Ring::tx(&g));
        let mut v = Vmm::connect(&s);
        if i % 2 == 0 {
            v.start_qemu(&g, &rx, &tx, ALL);
        } else {
            v.start_ch(&g, &rx, &tx, VERSION_1 | MRG_RXBUF);
        }
        ping(&s, &g, &mut rx, &mut tx, 64 + usize::from(i), i);
        // Leave some RX buffers and a pending TX chain behind: the next connection must not
        // care.
        post_rx(&g, &mut rx, 3, 2048);
        drop(v);
    }
    let st = s.stats();
    assert_eq!(st.ctrl.connections, 20);
    assert_eq!(st.tx.frames, 20);
}

#[test]
fn frames_of_64k_both_ways_over_4k_buffers() {
    let s = Server::start(true);
    let g = Guest::new();
    let (mut rx, mut tx) = (Ring::rx(&g), Ring::tx(&g));
    let mut v = Vmm::connect(&s);
    v.start_qemu(&g, &rx, &tx, ALL);
    let bufs = post_rx(&g, &mut rx, 40, 4096);
    rx.kick();
    let big = frame(MAX_FRAME, 7);
    // Header in its own descriptor, frame in 4 KiB pieces: 18 descriptors.
    send_frame(&g, &mut tx, &big, &[HDR, 4096]);
    tx.wait_used(&g, 1);
    assert_eq!(s.frames(), vec![big.clone()]);
    // The echo needs ceil((65549 + 12) / 4096) = 17 buffers, published at once.
    rx.wait_used(&g, 17);
    assert_eq!(rx.used_idx(&g), 17);
    let (got, n) = recv_frame(&g, &rx, &bufs, 0);
    assert_eq!(n, 17);
    assert_eq!(got, big);
    // And one from the engine side.
    let other = frame(60000, 9);
    s.send(other.clone());
    rx.wait_used(&g, 17 + 15);
    let (got, n) = recv_frame(&g, &rx, &bufs, 17);
    assert_eq!(n, 15);
    assert_eq!(got, other);
    let st = s.stats();
    assert_eq!(st.tx.linearized, 1);
    assert_eq!(st.rx.buffers, 32);
}

#[test]
fn pending_frame_goes_out_when_guest_refills() {
    let s = Server::start(false);
    let g = Guest::new();
    let (mut rx, tx) = (Ring::rx(&g), Ring::tx(&g));
    let mut v = Vmm::connect(&s);
    v.start_qemu(&g, &rx, &tx, ALL);
    let f = frame(3000, 5);
    s.send(f.clone());
    let st = s.stats();
    assert_eq!(st.rx.deferred, 1, "no buffers: the frame waits");
    assert_eq!(st.rx.frames, 0);
    assert_eq!(rx.used_idx(&g), 0);
    // One buffer is not enough for 3000 bytes: still nothing visible.
    let mut bufs = post_rx(&g, &mut rx, 1, 1024);
    rx.kick();
    let st = s.stats();
    assert_eq!(st.rx.frames, 0);
    assert_eq!(rx.used_idx(&g), 0);
    // Enough now.
    bufs.extend(post_rx(&g, &mut rx, 3, 1024));
    rx.kick();
    rx.wait_used(&g, 3);
    let (got, n) = recv_frame(&g, &rx, &bufs, 0);
    assert_eq!((got, n), (f, 3));
}

#[test]
fn malicious_guest_device_survives_and_next_connection_works() {
    let s = Server::start(true);
    {
        let g = Guest::new();
        let (mut rx, mut tx) = (Ring::rx(&g), Ring::tx(&g));
        let mut v = Vmm::connect(&s);
        v.start_qemu(&g, &rx, &tx, ALL);
        // A descriptor that points at itself.
        let a = tx.alloc(64);
        let slot = tx.next_desc;
        let h = tx.put(&g, &[(a, 64, F_NEXT, slot)]);
        tx.offer(&g, h);
        // A buffer outside guest memory.
        let h = tx.put(&g, &[(MEM_SIZE as u64 + 0x1000, 100, 0, 0)]);
        tx.offer(&g, h);
        // A buffer straddling the end of memory.
        let h = tx.put(&g, &[(MEM_SIZE as u64 - 10, 100, 0, 0)]);
        tx.offer(&g, h);
        // Overflowing lengths.
        let h = tx.put(
            &g,
            &[
                (0x80_0000, u32::MAX, F_NEXT, 0),
                (0x80_0000, u32::MAX, 0, 0),
            ],
        );
        let h2 = tx.next_desc.wrapping_sub(1) % QSIZE;
        // Fix the chain link to the second descriptor.
        g.mem
            .write_obj(h2, GuestAddress(tx.desc + 16 * u64::from(h) + 14))
            .expect("link");
        tx.offer(&g, h);
        // Zero length, device-writable, too short, head index out of range.
        let h = tx.put(&g, &[(0x80_0000, 0, 0, 0)]);
        tx.offer(&g, h);
        let h = tx.put(&g, &[(0x80_0000, 100, F_WRITE, 0)]);
        tx.offer(&g, h);
        send_frame(&g, &mut tx, &[1, 2, 3], &[64]);
        tx.offer(&g, QSIZE + 7);
        tx.kick();
        tx.wait_used(&g, 8);
        for i in 0..8 {
            assert_eq!(tx.used_elem(&g, i).1, 0);
        }
        // RX: a read-only buffer is returned empty, the frame lands in the next one.
        let a = rx.alloc(2048);
        let h = rx.put(&g, &[(a, 2048, 0, 0)]);
        rx.offer(&g, h);
        let bufs = post_rx(&g, &mut rx, 1, 2048);
        rx.kick();
        // The device is still fine: a good frame goes through and is echoed.
        send_frame(&g, &mut tx, &frame(100, 1), &[4096]);
        tx.wait_used(&g, 9);
        rx.wait_used(&g, 2);
        assert_eq!(rx.used_elem(&g, 0).1, 0);
        let (got, _) = recv_frame(&g, &rx, &bufs, 1);
        assert_eq!(&got[..100], &frame(100, 1)[..]);
        assert_eq!(s.frames(), vec![frame(100, 1)]);
        let st = s.stats();
        let bad = st.tx.bad_chains;
        assert_eq!(bad.truncated + bad.too_many_descriptors, 1, "{bad:?}");
        assert_eq!(bad.address, 2, "{bad:?}");
        assert_eq!(bad.too_long, 1, "{bad:?}");
        assert_eq!(bad.zero_length, 1, "{bad:?}");
        assert_eq!(bad.direction, 1, "{bad:?}");
        assert_eq!(bad.too_short, 1, "{bad:?}");
        assert_eq!(bad.empty, 1, "{bad:?}");
        assert_eq!(st.rx.bad_chains.direction, 1);

        // The avail index jumps by more than the ring size: the ring breaks, the device
        // says so on the error eventfd, and keeps serving the control socket.
        g.mem
            .store(
                tx.avail_idx.wrapping_add(QSIZE + 5),
                GuestAddress(tx.avail + 2),
                Ordering::Release,
            )
            .expect("avail idx");
        tx.kick();
        assert!(wait_readable(tx.err.as_raw_fd(), TIMEOUT), "error eventfd");
        assert_eq!(s.stats().tx.broken, 1);
        // The front-end restarts the ring, on the same connection.
        let base = v.fe.get_vring_base(1).expect("get base");
        assert_eq!(base, 9);
        g.mem
            .store(tx.avail_idx, GuestAddress(tx.avail + 2), Ordering::Release)
            .expect("avail idx");
        v.fe.set_vring_base(1, base as u16).expect("base");
        v.fe.set_vring_kick(1, &tx.kick).expect("kick");
        post_rx(&g, &mut rx, 1, 2048);
        send_frame(&g, &mut tx, &frame(80, 2), &[4096]);
        tx.wait_used(&g, 10);
        assert_eq!(s.frames().last(), Some(&frame(80, 2)));

        // Ring addresses outside memory: the ring doesn't start, the connection lives.
        let mut bad_cfg = rx.config(&g);
        bad_cfg.desc_table_addr = 0x10;
        v.fe.get_vring_base(0).expect("stop rx");
        v.fe.set_vring_addr(0, &bad_cfg).expect("accepted");
        v.fe.set_vring_kick(0, &rx.kick).expect("kick");
        assert!(s.stats().ctrl.ring_start_failed >= 1);
        assert!(v.fe.get_features().is_ok());
        drop(v);
    }
    // The next VMM gets a working device.
    let g = Guest::new();
    let (mut rx, mut tx) = (Ring::rx(&g), Ring::tx(&g));
    let mut v = Vmm::connect(&s);
    v.start_qemu(&g, &rx, &tx, ALL);
    ping(&s, &g, &mut rx, &mut tx, 300, 3);
}

#[test]
fn vmm_vanishing_mid_traffic() {
    let s = Server::start(true);
    {
        let g = Guest::new();
        let (rx, mut tx) = (Ring::rx(&g), Ring::tx(&g));
        let mut v = Vmm::connect(&s);
        v.start_qemu(&g, &rx, &tx, ALL);
        // No RX buffers: echoes pile up in the pending queue.
        for i in 0..10 {
            send_frame(&g, &mut tx, &frame(1000, i), &[4096]);
        }
        tx.wait_used(&g, 10);
        assert!(s.stats().rx.deferred >= 1);
        drop(v);
    }
    let g = Guest::new();
    let (mut rx, mut tx) = (Ring::rx(&g), Ring::tx(&g));
    let mut v = Vmm::connect(&s);
    v.start_ch(&g, &rx, &tx, ALL);
    ping(&s, &g, &mut rx, &mut tx, 500, 4);
    let st = s.stats();
    assert_eq!(
        st.rx.drop_stopped, 10,
        "old frames were not delivered to the new guest"
    );
}

#[test]
fn steady_state_data_path_does_not_allocate() {
    let s = Server::start_with(true, false);
    let g = Guest::new();
    let (mut rx, mut tx) = (Ring::rx(&g), Ring::tx(&g));
    let mut v = Vmm::connect(&s);
    v.start_qemu(&g, &rx, &tx, ALL);
    let mut round = |n: u16, len: usize| {
        let at = rx.used_idx(&g);
        // Exactly the two buffers this round uses, so none is left for the pending check.
        post_rx(&g, &mut rx, 2, 4096);
        rx.kick();
        // Guest -> engine -> echo, split and linearized, plus one from the engine side.
        send_frame(&g, &mut tx, &frame(len, n as u8), &[HDR, 1000]);
        tx.wait_used(&g, tx.avail_idx);
        rx.wait_used(&g, at.wrapping_add(1));
        s.send(frame(len, 1));
        rx.wait_used(&g, at.wrapping_add(2));
    };
    for n in 0..20 {
        round(n, 1500);
    }
    let warm = s.hot_allocs.load(Ordering::Relaxed);
    for n in 0..300 {
        round(n, 60 + usize::from(n) * 13);
    }
    // Also the pending path: no buffers, then a refill.
    s.send(frame(3000, 2));
    let at = rx.used_idx(&g);
    assert_eq!(s.stats().rx.deferred, 1);
    post_rx(&g, &mut rx, 1, 4096);
    rx.kick();
    rx.wait_used(&g, at.wrapping_add(1));
    assert_eq!(
        s.hot_allocs.load(Ordering::Relaxed),
        warm,
        "allocations on the data path"
    );
    assert_eq!(s.stats().tx.frames, 320);
}

/// The real binary in vhost-user mode on a socket it inherits (`--fd`), as a VMM that
/// hands its end of a socketpair over would run it: it serves the front-end, answers the
/// guest's ARP through the rings, and exits when the front-end goes.
#[test]
fn binary_serves_vhost_user_on_an_inherited_socket() {
    use common::frames;
    use common::netns::{Topology, HOST_V4, PEER_V4};
    use common::passt::{Passt, Ready};
    use smoltcp::wire::{ArpPacket, ArpRepr, EthernetFrame, EthernetProtocol};

    let topo = Topology::new();
    let (ours, theirs) = UnixStream::pair().expect("socketpair");
    let fd = ours.as_raw_fd();
    let passt = Passt::start_inheriting(
        &topo,
        "passt",
        std::path::Path::new(env!("CARGO_BIN_EXE_passt")),
        &["--vhost-user", "--fd", &fd.to_string()],
        Ready::Daemon,
        &[fd],
    );
    drop(ours);
    let g = Guest::new();
    let (mut rx, mut tx) = (Ring::rx(&g), Ring::tx(&g));
    let mut v = Vmm::over(theirs);
    v.start_qemu(&g, &rx, &tx, ALL);

    let bufs = post_rx(&g, &mut rx, 4, 2048);
    rx.kick();
    let rx_at = rx.used_idx(&g);
    send_frame(
        &g,
        &mut tx,
        &frames::arp_request(HOST_V4, PEER_V4),
        &[HDR, 4096],
    );
    tx.wait_used(&g, tx.avail_idx);
    rx.wait_used(&g, rx_at.wrapping_add(1));
    let (reply, _) = recv_frame(&g, &rx, &bufs, rx_at);
    let eth = EthernetFrame::new_checked(&reply[..]).expect("ethernet");
    assert_eq!(eth.ethertype(), EthernetProtocol::Arp, "{reply:02x?}");
    assert_eq!(eth.src_addr().0, frames::OUR_MAC);
    let arp = ArpRepr::parse(&ArpPacket::new_checked(eth.payload()).expect("arp")).expect("arp");
    let ArpRepr::EthernetIpv4 {
        source_protocol_addr,
        ..
    } = arp
    else {
        panic!("{arp:?}")
    };
    assert_eq!(source_protocol_addr, PEER_V4);

    drop(v);
    assert!(
        passt.wait_exit(TIMEOUT),
        "passt still running after the front-end left:\n{}",
        passt.log()
    );
}
