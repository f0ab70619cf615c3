//! End-to-end tests of the vhost-user-net device: the `vhost` crate's front-end plays the
//! VMM over a real UNIX socket, guest memory is a memfd mapped by both sides, and a small
//! split-ring driver (tests/common/vring.rs) plays the guest. The device runs in its own thread with a
//! `poll()` loop over `Device::watched_fds()`, like the real event loop, and an engine that
//! records frames from the guest and echoes them back.
//!
//! Synchronisation is by events only: the test waits for the call (or error) eventfd the
//! device writes, with a timeout that only turns a hang into a failure.

use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

mod common;

use common::vring::*;
use passt::tap::{FrameHandler, ToGuest, MAX_FRAME};
use passt::vhost_user::{Device, DeviceOptions, Outcome, Source, Stats};
use vhost::VhostBackend;
use vm_memory::{Bytes, GuestAddress};
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

// ---------------------------------------------------------------------------------------

#[test]
fn qemu_order_frames_both_ways() {
    let s = Server::start(true);
    let g = Guest::new();
    let (mut rx, mut tx) = (Ring::rx(&g), Ring::tx(&g));
    let mut v = Vmm::connect(&s.path);
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
    let mut v = Vmm::connect(&s.path);
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
        let mut v = Vmm::connect(&s.path);
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
    let mut v = Vmm::connect(&s.path);
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
    let mut v = Vmm::connect(&s.path);
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
        let mut v = Vmm::connect(&s.path);
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
    let mut v = Vmm::connect(&s.path);
    v.start_qemu(&g, &rx, &tx, ALL);
    ping(&s, &g, &mut rx, &mut tx, 300, 3);
}

#[test]
fn vmm_vanishing_mid_traffic() {
    let s = Server::start(true);
    {
        let g = Guest::new();
        let (rx, mut tx) = (Ring::rx(&g), Ring::tx(&g));
        let mut v = Vmm::connect(&s.path);
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
    let mut v = Vmm::connect(&s.path);
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
    let mut v = Vmm::connect(&s.path);
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

/// Our binary in `topo`'s host namespace in vhost-user mode (`extra` arguments first) on
/// one end of a socket pair it inherits (`--fd`); returns it and the VMM's end.
fn binary_on_socketpair(
    topo: &common::netns::Topology,
    extra: &[&str],
    ready: common::passt::Ready,
) -> (common::passt::Passt, UnixStream) {
    let (ours, theirs) = UnixStream::pair().expect("socketpair");
    let fd = ours.as_raw_fd();
    let fd_arg = fd.to_string();
    let mut args = extra.to_vec();
    args.extend(["--vhost-user", "--fd", &fd_arg]);
    let passt = common::passt::Passt::start_inheriting(
        topo,
        "passt",
        std::path::Path::new(env!("CARGO_BIN_EXE_passt")),
        &args,
        ready,
        &[fd],
    );
    (passt, theirs)
}

/// The real binary in vhost-user mode on a socket it inherits (`--fd`), as a VMM that
/// hands its end of a socketpair over would run it: it serves the front-end, answers the
/// guest's ARP through the rings, and exits when the front-end goes.
#[test]
fn binary_serves_vhost_user_on_an_inherited_socket() {
    use common::frames;
    use common::netns::{Topology, HOST_V4, PEER_V4};
    use common::passt::Ready;
    use smoltcp::wire::{ArpPacket, ArpRepr, EthernetFrame, EthernetProtocol};

    let topo = Topology::new();
    let (passt, theirs) = binary_on_socketpair(&topo, &[], Ready::Daemon);
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

/// TCP through the real binary's vhost-user device: the guest's TCP, played with hand-built
/// segments through the rings, sends 256 KiB to `cat` behind `socat` in the peer namespace
/// and takes the same 256 KiB back (frames may span mergeable RX buffers), FINs both ways;
/// then the flow is freed.
#[test]
fn binary_carries_tcp_through_the_rings() {
    use common::netns::{Topology, HOST_V4, REMOTE_V4};
    use common::passt::Ready;
    use common::tcp_guest::{self, pattern, socat, wait_child, T};

    let topo = Topology::new();
    // In the foreground with debug output, to wait for what it logs.
    let (passt, theirs) = binary_on_socketpair(&topo, &["-f", "-d"], Ready::Started);
    let (mut server, server_out) = socat(&topo, &["TCP4-LISTEN:5003,reuseaddr", "EXEC:cat"]);
    let g = Guest::new();
    let (rx, tx) = (Ring::rx(&g), Ring::tx(&g));
    let mut v = Vmm::over(theirs);
    v.start_qemu(&g, &rx, &tx, ALL);
    // Smaller than some frames: those take several buffers.
    let mut link = RingLink::new(&g, rx, tx, 1024);

    let data = pattern(256 * 1024, 9);
    let mut c = tcp_guest::Guest::connect(&mut link, HOST_V4.into(), REMOTE_V4.into(), 42000, 5003)
        .unwrap_or_else(|s| panic!("connect: {s:?}\n{}", passt.log()));
    c.send_all(&data);
    c.send_fin();
    // cat sees end of input, echoes the rest and exits: its FIN comes after all the data.
    c.recv_until_fin(true);
    assert!(c.rx == data, "echo differs: {} bytes back", c.rx.len());
    let st = wait_child(&mut server, "socat");
    assert!(st.success(), "socat: {}", server_out.text());
    passt
        .output()
        .wait_for(0, "tcp: flow 0 closed", Instant::now() + T)
        .unwrap_or_else(|e| panic!("flow not freed ({e:?}):\n{}", passt.log()));
    assert!(link.merged > 0, "no frame spanned several buffers");

    drop(v);
    assert!(
        passt.wait_exit(TIMEOUT),
        "passt still running after the front-end left:\n{}",
        passt.log()
    );
}
