//! Heap allocations on the packet path, counted by a global allocator in this test binary.
//!
//! The engine and the stream back-end are driven in-process: frames go in through one end of
//! a UNIX socket pair (as QEMU would write them), [`StreamTap::handle_readable`] hands them to
//! the [`Engine`], replies come back through the same socket, and ICMP echo replies from the
//! kernel are delivered with [`Engine::icmp_sock_ready`] as the event loop would. Only the
//! calls into passt-rs are counted (a thread-local switch), not the test's own frame building.
//! After a warm-up (first flow, first reply: setup may allocate), the steady state must not
//! allocate: the target is zero allocations per packet.
//!
//! The vhost-user device is measured the same way: the `vhost` crate's front-end sets the
//! device up from a helper thread (tests/common/vring.rs), then this thread plays the guest on
//! the rings, calls the device and the engine as the event loop would, and counts those calls
//! only. A TCP echo through a server on the host's loopback (the gateway address, mapped)
//! carries data both ways.
//!
//! UDP: batches of datagrams to an echo server on the host's loopback (the gateway address,
//! mapped), through the stream socket and through the vhost-user device: guest frames sent
//! with `sendmmsg` at the end of each frame batch, echoes received with `recvmmsg` into
//! frames.
//!
//! ICMP needs ping sockets and a loopback to ping, so the measurement runs in a child process
//! inside `unshare -Urn` (a fresh user and network namespace: nothing leaves it).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

mod common;

use common::frames::{parse_udp, udp_frame};
use common::tcp_guest::{self, FrameLink};
use common::vring::{pollfd, Guest, Ring, RingLink, Vmm, ALL};
use passt::conf::{Ip4, NetConfig};
use passt::engine::Engine;
use passt::event::{EpollRegistrar, Token};
use passt::fwd::Nat;
use passt::tap::stream::StreamTap;
use passt::tcp::TcpConfig;
use passt::udp::UdpConfig;
use passt::vhost_user::{Device, DeviceOptions, Outcome, Source};
use passt::virtio::QueueIdx;
use vmm_sys_util::eventfd::EventFd;

struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
}

fn note(size: usize) {
    if COUNTING.try_with(Cell::get).unwrap_or(false) {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(size as u64, Ordering::Relaxed);
    }
}

// SAFETY: forwards to the system allocator; counting has no effect on the allocation.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        note(l.size());
        // SAFETY: same contract as ours.
        unsafe { System.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        note(l.size());
        // SAFETY: same contract as ours.
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        note(new);
        // SAFETY: same contract as ours.
        unsafe { System.realloc(p, l, new) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(p, l) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Runs `f` with allocations counted; returns (allocations, bytes).
fn counted<R>(f: impl FnOnce() -> R) -> (R, u64, u64) {
    let (a0, b0) = (
        ALLOCS.load(Ordering::Relaxed),
        BYTES.load(Ordering::Relaxed),
    );
    COUNTING.with(|c| c.set(true));
    let r = f();
    COUNTING.with(|c| c.set(false));
    (
        r,
        ALLOCS.load(Ordering::Relaxed) - a0,
        BYTES.load(Ordering::Relaxed) - b0,
    )
}

const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const OUR_MAC: [u8; 6] = [0x9a, 0x55, 0x9a, 0x55, 0x9a, 0x55];

fn csum(data: &[u8]) -> u16 {
    let mut s: u32 = 0;
    for c in data.chunks(2) {
        s += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

fn arp_request() -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0x00, 6, 4, 0, 1]);
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&[192, 0, 2, 2]);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&[192, 0, 2, 1]);
    f
}

fn echo_request(seq: u16, payload: usize) -> Vec<u8> {
    let mut icmp = vec![8, 0, 0, 0, 0x12, 0x34];
    icmp.extend_from_slice(&seq.to_be_bytes());
    icmp.extend((0..payload).map(|i| i as u8));
    let c = csum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let total = (20 + icmp.len()) as u16;
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&[0, 0, 0x40, 0, 64, 1, 0, 0, 192, 0, 2, 2, 127, 0, 0, 1]);
    let c = csum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut f = Vec::new();
    f.extend_from_slice(&OUR_MAC);
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&[0x08, 0x00]);
    f.extend_from_slice(&ip);
    f.extend_from_slice(&icmp);
    f
}

/// Writes frames with the stream protocol's length prefix.
fn put(sock: &mut UnixStream, frames: &[Vec<u8>]) {
    let mut out = Vec::new();
    for f in frames {
        out.extend_from_slice(&(f.len() as u32).to_be_bytes());
        out.extend_from_slice(f);
    }
    sock.write_all(&out).expect("write frames");
}

/// Reads `n` frames; returns their EtherTypes.
fn take(sock: &mut UnixStream, n: usize) -> Vec<u16> {
    let mut types = Vec::new();
    for _ in 0..n {
        let mut len = [0u8; 4];
        sock.read_exact(&mut len).expect("reply length");
        let mut f = vec![0u8; u32::from_be_bytes(len) as usize];
        sock.read_exact(&mut f).expect("reply frame");
        types.push(u16::from_be_bytes([f[12], f[13]]));
    }
    types
}

fn net() -> NetConfig {
    NetConfig {
        ip4: Some(Ip4 {
            addr: "192.0.2.2".parse().expect("addr"),
            prefix_len: 24,
            gateway: "192.0.2.1".parse().expect("addr"),
            dns: vec![],
        }),
        ..NetConfig::default()
    }
}

/// The engine of these tests (ICMP and UDP on) and its epoll set.
fn engine() -> (Engine, i32) {
    // SAFETY: plain syscall.
    let epfd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    assert!(epfd >= 0);
    let udp = UdpConfig {
        idle_timeout: Duration::from_secs(180),
        nat: passt::conf::Nat::default(),
        fwd_nat: Nat::from_net(&net()),
    };
    (
        Engine::new(net(), true, EpollRegistrar { epoll_fd: epfd }).with_udp(udp),
        epfd,
    )
}

struct Rig {
    tap: StreamTap,
    guest: UnixStream,
    engine: Engine,
    epfd: i32,
}

impl Rig {
    fn new() -> Rig {
        let (ours, guest) = UnixStream::pair().expect("socketpair");
        guest
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let (engine, epfd) = engine();
        Rig {
            tap: StreamTap::new(ours).expect("stream tap"),
            guest,
            engine,
            epfd,
        }
    }

    /// Hands what the guest wrote to the engine: one readable event.
    fn guest_frames(&mut self) {
        let _ = self.tap.handle_readable(&mut self.engine);
    }

    /// Delivers ready ping and UDP sockets, as the event loop does; returns how many were
    /// ready.
    fn sockets(&mut self, timeout_ms: i32) -> usize {
        let mut evs = [libc::epoll_event { events: 0, u64: 0 }; 16];
        // SAFETY: valid buffer.
        let n = unsafe { libc::epoll_wait(self.epfd, evs.as_mut_ptr(), 16, timeout_ms) };
        let mut k = 0;
        for ev in &evs[..n.max(0) as usize] {
            match Token::decode(ev.u64) {
                Some(Token::IcmpSock(idx)) => {
                    self.engine.icmp_sock_ready(idx, self.tap.to_guest());
                    k += 1;
                }
                Some(Token::UdpSock(idx)) => {
                    let err = ev.events & libc::EPOLLERR as u32 != 0;
                    self.engine.udp_sock_ready(idx, err, self.tap.to_guest());
                    k += 1;
                }
                _ => {}
            }
        }
        self.tap.to_guest().flush();
        k
    }
}

// ---------------------------------------------------------------------------------------
// The vhost-user device and the engine, driven as the event loop drives them.

const RX_KICK: Source = Source::Kick(QueueIdx(0));
const TX_KICK: Source = Source::Kick(QueueIdx(1));

/// The device and the engine in this thread, and the guest's stocked rings.
struct VuRig<'g> {
    dev: Device,
    engine: Engine,
    epfd: i32,
    link: RingLink<'g>,
    _vmm: Vmm,
    /// Whether calls into passt-rs are counted now, and what they allocated.
    count: bool,
    allocs: u64,
    bytes: u64,
}

impl<'g> VuRig<'g> {
    /// A started device (QEMU's order, all features) with TCP on, RX ring full.
    fn new(g: &'g Guest) -> VuRig<'g> {
        let (mut engine, epfd) = engine();
        engine.enable_tcp(TcpConfig {
            mtu: None,
            outbound4: None,
            outbound6: None,
            outbound_if4: None,
            outbound_if6: None,
            max_flows: 64,
            nat: Nat::from_net(&net()),
        });
        // As the event loop runs it.
        let mut dev = Device::new(DeviceOptions {
            tx_copy: true,
            ..DeviceOptions::default()
        });
        let (ours, theirs) = UnixStream::pair().expect("socketpair");
        dev.attach(ours);
        let (rx, tx) = (Ring::rx(g), Ring::tx(g));
        let done = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let vmm = std::thread::scope(|s| {
            let (rx, tx, done) = (&rx, &tx, &done);
            let fe = s.spawn(move || {
                let mut v = Vmm::over(theirs);
                v.start_qemu(g, rx, tx, ALL);
                done.write(1).expect("done");
                v
            });
            // The front-end waits for each reply: serve its messages until it is done.
            loop {
                let ctrl = dev
                    .watched_fds()
                    .find(|&(_, s)| s == Source::Control)
                    .map(|(fd, _)| fd)
                    .expect("control socket");
                let mut p = [pollfd(done.as_raw_fd()), pollfd(ctrl)];
                // SAFETY: a valid array of two pollfd.
                let n = unsafe { libc::poll(p.as_mut_ptr(), 2, 10_000) };
                assert!(n > 0, "front-end stuck");
                if p[1].revents != 0 {
                    let out = dev.handle(Source::Control, &mut engine);
                    assert_ne!(out, Outcome::Disconnected);
                }
                if p[0].revents != 0 {
                    break;
                }
            }
            fe.join().expect("front-end")
        });
        let link = RingLink::new(g, rx, tx, 2048);
        let mut rig = VuRig {
            dev,
            engine,
            epfd,
            link,
            _vmm: vmm,
            count: false,
            allocs: 0,
            bytes: 0,
        };
        rig.batch(|dev, engine| {
            engine.guest_attached(dev.to_guest());
            let _ = dev.handle(RX_KICK, engine);
        });
        rig
    }

    /// One batch of the event loop: the clock, `events`, the TCP timer when due, the retry
    /// and flush after the batch. Counted if `count` is on.
    fn batch(&mut self, events: impl FnOnce(&mut Device, &mut Engine)) {
        let (dev, engine) = (&mut self.dev, &mut self.engine);
        let run = || {
            let now = Instant::now();
            engine.set_now(now);
            events(dev, engine);
            // As the loop does after every batch: only flows whose deadline is due.
            engine.tcp_timer(now, dev.to_guest());
            let to_guest = dev.to_guest();
            if to_guest.room_returned() {
                engine.room_returned(to_guest);
            }
            to_guest.flush();
            if to_guest.room_returned() {
                engine.room_returned(to_guest);
                to_guest.flush();
            }
        };
        if self.count {
            let ((), a, b) = counted(run);
            self.allocs += a;
            self.bytes += b;
        } else {
            run();
        }
    }

    /// Frames through the device: (from the guest, to the guest).
    fn frames(&self) -> (u64, u64) {
        let st = self.dev.stats();
        (st.tx.frames, st.rx.frames)
    }
}

impl FrameLink for VuRig<'_> {
    fn send(&mut self, frame: &[u8]) {
        self.link.offer(frame);
        self.batch(|dev, engine| {
            let _ = dev.handle(TX_KICK, engine);
        });
    }

    fn try_recv(&mut self, timeout: Duration) -> Option<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(f) = self.link.take() {
                // Its buffers went back on the ring: the kick the loop would see.
                self.batch(|dev, engine| {
                    let _ = dev.handle(RX_KICK, engine);
                });
                return Some(f);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            let wait = left.min(passt::tcp::conn::WND_POLL).as_millis().max(1) as i32;
            let mut evs = [libc::epoll_event { events: 0, u64: 0 }; 16];
            // SAFETY: valid buffer of 16 events.
            let n = unsafe { libc::epoll_wait(self.epfd, evs.as_mut_ptr(), 16, wait) };
            let ready = &evs[..n.max(0) as usize];
            self.batch(|dev, engine| {
                for ev in ready {
                    let (flags, data) = (ev.events, ev.u64);
                    match Token::decode(data) {
                        Some(Token::TcpSock(idx)) => {
                            let flags = epoll::Events::from_bits_truncate(flags);
                            engine.tcp_sock_ready(idx, flags, dev.to_guest());
                        }
                        Some(Token::UdpSock(idx)) => {
                            let err = flags & libc::EPOLLERR as u32 != 0;
                            engine.udp_sock_ready(idx, err, dev.to_guest());
                        }
                        _ => {}
                    }
                }
            });
        }
    }
}

/// An echo server on the host's loopback; its port.
fn echo_server() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        let (mut s, _) = l.accept().expect("accept");
        let mut b = vec![0u8; 1 << 16];
        loop {
            match s.read(&mut b) {
                Ok(0) | Err(_) => break,
                Ok(n) => s.write_all(&b[..n]).expect("echo"),
            }
        }
        let _ = s.shutdown(std::net::Shutdown::Write);
    });
    port
}

/// A TCP echo through the vhost-user device: returns (frames from and to the guest,
/// allocations, bytes) over the steady-state part, after a warm-up on the same connection.
fn vhost_user_tcp_echo() -> ((u64, u64), u64, u64) {
    let port = echo_server();
    let g = Guest::new();
    let mut rig = VuRig::new(&g);
    let data = tcp_guest::pattern(4 << 20, 4);
    let warm = 256 << 10;
    let mut c = tcp_guest::Guest::connect(
        &mut rig,
        "192.0.2.2".parse().expect("addr"),
        "192.0.2.1".parse().expect("addr"),
        40000,
        port,
    )
    .unwrap_or_else(|s| panic!("connect: {s:?}"));
    c.send_all(&data[..warm]);
    let before = c.c.frames();
    c.c.count = true;
    c.send_all(&data[warm..]);
    // And the rest of the echo, before the close (not steady state) starts.
    while c.rx.len() < data.len() {
        let s = c.next(tcp_guest::T).expect("echo stalled");
        if c.handle(&s) {
            c.ack();
        }
    }
    c.c.count = false;
    let after = c.c.frames();
    let frames = (after.0 - before.0, after.1 - before.1);
    c.send_fin();
    c.recv_until_fin(true);
    assert!(c.rx == data, "echo differs: {} bytes back", c.rx.len());
    (frames, rig.allocs, rig.bytes)
}

/// A UDP echo server on the host's loopback; its port.
fn udp_echo_server() -> u16 {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let port = s.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        let mut b = vec![0u8; 1 << 16];
        while let Ok((n, from)) = s.recv_from(&mut b) {
            let _ = s.send_to(&b[..n], from);
        }
    });
    port
}

/// `BATCH` numbered datagrams of `size` bytes from the guest's port 40000 to the
/// gateway's `port`, starting at `first`.
fn udp_batch(port: u16, first: u64, size: usize) -> Vec<Vec<u8>> {
    let g = std::net::SocketAddr::new("192.0.2.2".parse().expect("addr"), 40000);
    let r = std::net::SocketAddr::new("192.0.2.1".parse().expect("addr"), port);
    (first..first + BATCH as u64)
        .map(|i| {
            let mut p = i.to_be_bytes().to_vec();
            p.resize(size, (i % 251) as u8);
            udp_frame(g, r, &p, false)
        })
        .collect()
}

/// How many of `frames` are echoes (UDP from the server's `port`) numbered `first..`.
fn udp_echoes(frames: &[Vec<u8>], port: u16, first: u64) -> usize {
    frames
        .iter()
        .filter_map(|f| parse_udp(f))
        .filter(|d| d.src.port() == port && d.payload.len() >= 8)
        .filter(|d| {
            let i = u64::from_be_bytes(d.payload[..8].try_into().expect("8 bytes"));
            (first..first + BATCH as u64).contains(&i)
        })
        .count()
}

/// UDP echoes through the stream back-end, one frame batch of `BATCH` datagrams a round:
/// (datagrams each way, echoes seen, allocations, bytes) over the counted rounds.
fn stream_udp_echo(rig: &mut Rig, rounds: usize) -> (usize, usize, u64, u64) {
    let port = udp_echo_server();
    let (mut allocs, mut bytes, mut seen) = (0, 0, 0);
    for round in 0..rounds + 2 {
        let count = round >= 2;
        let first = (round * BATCH) as u64;
        put(&mut rig.guest, &udp_batch(port, first, 1000));
        let (mut got, deadline) = (Vec::new(), Instant::now() + Duration::from_secs(5));
        let ((), a, b) = counted(|| rig.guest_frames());
        let (mut a, mut b) = (a, b);
        while udp_echoes(&got, port, first) < BATCH && Instant::now() < deadline {
            let (k, x, y) = counted(|| rig.sockets(200));
            a += x;
            b += y;
            if k > 0 {
                got.extend(read_available(&mut rig.guest));
            }
        }
        if count {
            allocs += a;
            bytes += b;
            seen += udp_echoes(&got, port, first);
        }
    }
    (rounds * BATCH, seen, allocs, bytes)
}

/// Frames the stream back-end wrote so far, without waiting for more.
fn read_available(sock: &mut UnixStream) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    sock.set_nonblocking(true).expect("nonblocking");
    loop {
        let mut len = [0u8; 4];
        if sock.read_exact(&mut len).is_err() {
            break;
        }
        sock.set_nonblocking(false).expect("blocking");
        let mut f = vec![0u8; u32::from_be_bytes(len) as usize];
        sock.read_exact(&mut f).expect("frame");
        out.push(f);
        sock.set_nonblocking(true).expect("nonblocking");
    }
    sock.set_nonblocking(false).expect("blocking");
    out
}

/// UDP echoes through the vhost-user device, `BATCH` datagrams per TX kick: (datagrams
/// each way, echoes seen, allocations, bytes) over the counted rounds.
fn vhost_user_udp_echo(rounds: usize) -> (usize, usize, u64, u64) {
    let port = udp_echo_server();
    let g = Guest::new();
    let mut rig = VuRig::new(&g);
    let mut seen = 0;
    for round in 0..rounds + 2 {
        rig.count = round >= 2;
        let first = (round * BATCH) as u64;
        for f in udp_batch(port, first, 1000) {
            rig.link.offer(&f);
        }
        rig.batch(|dev, engine| {
            let _ = dev.handle(TX_KICK, engine);
        });
        let mut got = Vec::new();
        while udp_echoes(&got, port, first) < BATCH {
            match rig.try_recv(Duration::from_secs(5)) {
                Some(f) => got.push(f),
                None => break,
            }
        }
        if rig.count {
            seen += udp_echoes(&got, port, first);
        }
    }
    rig.count = false;
    (rounds * BATCH, seen, rig.allocs, rig.bytes)
}

const BATCH: usize = 32;
const ROUNDS: usize = 200;

/// The measurement, in a namespace where ping sockets work (see the module comment).
#[test]
#[ignore = "run by allocations_per_packet inside unshare -Urn"]
fn inner_allocations() {
    // The counter itself works (else every zero below would be meaningless).
    let (v, a, _) = counted(|| Vec::<u8>::with_capacity(100));
    assert_eq!((v.capacity() >= 100, a), (true, 1));

    let mut rig = Rig::new();
    let arp = arp_request();

    // ARP: engine-answered frames (parse, build reply, stream write).
    for _ in 0..2 {
        put(&mut rig.guest, &vec![arp.clone(); BATCH]);
        rig.guest_frames();
        assert!(take(&mut rig.guest, BATCH).iter().all(|&t| t == 0x0806));
    }
    let mut arp_allocs = 0;
    let mut arp_bytes = 0;
    for _ in 0..ROUNDS {
        put(&mut rig.guest, &vec![arp.clone(); BATCH]);
        let ((), a, b) = counted(|| rig.guest_frames());
        arp_allocs += a;
        arp_bytes += b;
        assert_eq!(take(&mut rig.guest, BATCH).len(), BATCH);
    }
    let arp_frames = (ROUNDS * BATCH) as f64;

    // ICMP echo: guest -> ping socket -> kernel -> ping socket -> guest, one flow.
    let mut seq = 0u16;
    let mut icmp_round = |rig: &mut Rig, count: bool| -> (u64, u64, usize) {
        let frames: Vec<Vec<u8>> = (0..BATCH)
            .map(|_| {
                seq = seq.wrapping_add(1);
                echo_request(seq, 56)
            })
            .collect();
        put(&mut rig.guest, &frames);
        let (mut a, mut b) = (0, 0);
        let mut replies = 0;
        let deadline = Instant::now() + Duration::from_secs(5);
        if count {
            let ((), x, y) = counted(|| rig.guest_frames());
            a += x;
            b += y;
        } else {
            rig.guest_frames();
        }
        // Replies come back from the kernel through the ping socket.
        let mut got = 0;
        while got < BATCH && Instant::now() < deadline {
            let (k, x, y) = if count {
                counted(|| rig.sockets(200))
            } else {
                (rig.sockets(200), 0, 0)
            };
            a += x;
            b += y;
            if k > 0 {
                // Count what arrived so far without blocking on the rest.
                rig.guest.set_nonblocking(true).expect("nonblocking");
                loop {
                    let mut len = [0u8; 4];
                    match rig.guest.read_exact(&mut len) {
                        Ok(()) => {
                            rig.guest.set_nonblocking(false).expect("blocking");
                            let mut f = vec![0u8; u32::from_be_bytes(len) as usize];
                            rig.guest.read_exact(&mut f).expect("frame");
                            rig.guest.set_nonblocking(true).expect("nonblocking");
                            if f.len() > 34 && f[12..14] == [8, 0] && f[34] == 0 {
                                got += 1;
                            }
                        }
                        Err(_) => break,
                    }
                }
                rig.guest.set_nonblocking(false).expect("blocking");
            }
        }
        replies += got;
        (a, b, replies)
    };
    let (_, _, warm) = icmp_round(&mut rig, false);
    let icmp = if warm == 0 {
        eprintln!("ICMP: no echo replies (ping sockets unavailable?): not measured");
        None
    } else {
        let _ = icmp_round(&mut rig, false);
        let (mut a, mut b, mut r) = (0, 0, 0);
        for _ in 0..ROUNDS / 4 {
            let (x, y, z) = icmp_round(&mut rig, true);
            a += x;
            b += y;
            r += z;
        }
        Some((a, b, r, (ROUNDS / 4 * BATCH) as f64))
    };

    let udp_stream = stream_udp_echo(&mut rig, ROUNDS / 4);
    let udp_vu = vhost_user_udp_echo(ROUNDS / 4);

    let ((vu_up, vu_down), vu_allocs, vu_bytes) = vhost_user_tcp_echo();
    let vu_frames = vu_up + vu_down;

    println!(
        "ALLOC arp: {arp_frames} frames, {arp_allocs} allocations ({arp_bytes} bytes): {:.3} per frame",
        arp_allocs as f64 / arp_frames
    );
    if let Some((a, b, r, sent)) = icmp {
        println!(
            "ALLOC icmp-echo: {sent} requests, {r} replies, {a} allocations ({b} bytes): {:.3} per request+reply",
            a as f64 / sent
        );
        assert!(
            r as f64 >= sent * 0.9,
            "too few echo replies: {r} of {sent}"
        );
        assert_eq!(a, 0, "allocations on the ICMP echo path in steady state");
    }
    for (what, (sent, seen, a, b)) in [("stream", udp_stream), ("vhost-user", udp_vu)] {
        println!(
            "ALLOC {what} udp-echo: {sent} datagrams each way, {seen} echoes, {a} allocations ({b} bytes): {:.3} per datagram",
            a as f64 / sent as f64
        );
        assert!(
            seen as f64 >= sent as f64 * 0.9,
            "{what}: too few UDP echoes: {seen} of {sent}"
        );
        assert_eq!(a, 0, "allocations on the {what} UDP path in steady state");
    }
    println!(
        "ALLOC vhost-user tcp-echo: {vu_up}+{vu_down} frames from+to the guest, {vu_allocs} allocations ({vu_bytes} bytes): {:.3} per frame",
        vu_allocs as f64 / vu_frames as f64
    );
    assert_eq!(
        arp_allocs, 0,
        "allocations on the ARP reply path in steady state"
    );
    assert!(
        vu_up > 0 && vu_down > 100,
        "too few frames: {vu_up}+{vu_down}"
    );
    assert_eq!(
        vu_allocs, 0,
        "allocations on the vhost-user TCP path in steady state"
    );
}

#[test]
fn allocations_per_packet() {
    let exe = std::env::current_exe().expect("test binary");
    let out = Command::new("unshare")
        .args([
            "-Urn",
            "sh",
            "-c",
            "ip link set lo up && echo '0 0' > /proc/sys/net/ipv4/ping_group_range && \
             exec \"$0\" --exact inner_allocations --ignored --nocapture --test-threads=1",
        ])
        .arg(&exe)
        .output()
        .expect("run unshare");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    for l in stdout.lines().chain(stderr.lines()) {
        if let Some(i) = l.find("ALLOC").or_else(|| l.find("ICMP:")) {
            println!("{}", &l[i..]);
        } else if l.contains("panicked") {
            println!("{l}");
        }
    }
    assert!(
        out.status.success() && stdout.contains("ALLOC arp"),
        "inner measurement failed:\n{stdout}\n{stderr}"
    );
}
