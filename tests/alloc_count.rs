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
//! ICMP needs ping sockets and a loopback to ping, so the measurement runs in a child process
//! inside `unshare -Urn` (a fresh user and network namespace: nothing leaves it).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use passt::conf::{Ip4, NetConfig};
use passt::engine::Engine;
use passt::event::{EpollRegistrar, Token};
use passt::tap::stream::StreamTap;

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
        // SAFETY: plain syscall.
        let epfd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        assert!(epfd >= 0);
        let net = NetConfig {
            ip4: Some(Ip4 {
                addr: "192.0.2.2".parse().expect("addr"),
                prefix_len: 24,
                gateway: "192.0.2.1".parse().expect("addr"),
                dns: vec![],
            }),
            ..NetConfig::default()
        };
        Rig {
            tap: StreamTap::new(ours).expect("stream tap"),
            guest,
            engine: Engine::new(net, true, EpollRegistrar { epoll_fd: epfd }),
            epfd,
        }
    }

    /// Hands what the guest wrote to the engine: one readable event.
    fn guest_frames(&mut self) {
        let _ = self.tap.handle_readable(&mut self.engine);
    }

    /// Delivers ready ping sockets, as the event loop does; returns how many were ready.
    fn sockets(&mut self, timeout_ms: i32) -> usize {
        let mut evs = [libc::epoll_event { events: 0, u64: 0 }; 16];
        // SAFETY: valid buffer.
        let n = unsafe { libc::epoll_wait(self.epfd, evs.as_mut_ptr(), 16, timeout_ms) };
        let mut k = 0;
        for ev in &evs[..n.max(0) as usize] {
            if let Some(Token::IcmpSock(idx)) = Token::decode(ev.u64) {
                self.engine.icmp_sock_ready(idx, self.tap.to_guest());
                k += 1;
            }
        }
        self.tap.to_guest().flush();
        k
    }
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
    assert_eq!(
        arp_allocs, 0,
        "allocations on the ARP reply path in steady state"
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
