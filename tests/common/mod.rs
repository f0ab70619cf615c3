//! End-to-end test harness, shared by the integration tests through `mod common;`.
//!
//! - [`netns`]: the host and peer network namespaces, veth, addresses, resolv.conf.
//! - [`guest`]: the TCG guest image and a QEMU driven through its serial console.
//! - [`passt`]: a passt binary (ours or Debian's) started in the host namespace.
//! - [`output`]: collected process output with event-driven waits.
//! - [`process`]: pidfd-based kill and wait, parent-death signal.
//! - [`tcp_guest`]: the guest's end of TCP connections over any frame link, `socat` peers.
//! - [`vring`]: a VMM and split-ring guest driver for the vhost-user-net device.
//!
//! A typical test:
//! ```ignore
//! let topo = Topology::new();
//! let sock = topo.dir().join("passt.sock");
//! let _passt = Passt::start(&topo, bin, &["-f", "-s", sock.to_str().unwrap()], ready);
//! let mut guest = Guest::boot(&["-netdev", &stream_netdev(&sock)]);
//! guest.run_ok("udhcpc -i eth0 -n -q -f");
//! ```
#![allow(dead_code)] // each test binary uses a different part of the harness

pub mod checks;
pub mod frames;
pub mod guest;
pub mod netns;
pub mod output;
pub mod passt;
pub mod process;
pub mod tcp_guest;
pub mod vring;

use std::cell::Cell;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

static GUEST_LOCK: Mutex<()> = Mutex::new(());

thread_local! {
    /// How many [`Serial`] guards this thread holds (the lock is taken by the first).
    static HELD: Cell<u32> = const { Cell::new(0) };
}

/// Guard serialising guest tests within one test binary (cargo runs a binary's tests in
/// parallel threads). [`guest::Guest`] takes one itself; a test may take one first to cover
/// its whole setup. Re-entrant within a thread.
pub struct Serial {
    _guard: Option<MutexGuard<'static, ()>>,
}

/// Takes the guest lock, or nests inside the one this thread already holds.
pub fn serial() -> Serial {
    if HELD.with(|h| h.get()) > 0 {
        HELD.with(|h| h.set(h.get() + 1));
        return Serial { _guard: None };
    }
    // A test that panicked while holding the lock says nothing about the next one.
    let guard = GUEST_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    HELD.with(|h| h.set(1));
    Serial {
        _guard: Some(guard),
    }
}

impl Drop for Serial {
    fn drop(&mut self) {
        HELD.with(|h| h.set(h.get() - 1));
    }
}

/// QEMU arguments for a netdev connecting to a stream-mode socket at `path` (QEMU >= 7.2).
pub fn stream_netdev(path: &Path) -> String {
    format!(
        "stream,id={},server=off,addr.type=unix,addr.path={}",
        guest::NETDEV_ID,
        path.display()
    )
}

/// How the guest reaches passt-rs in an end-to-end test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Stream,
    VhostUser,
}

/// Starts our passt in `topo`'s host namespace in `mode` (daemonised, `extra` arguments
/// appended) and boots a guest on it.
pub fn passt_and_guest(
    topo: &netns::Topology,
    mode: Mode,
    extra: &[&str],
) -> (passt::Passt, guest::Guest) {
    let bin = std::path::PathBuf::from(env!("CARGO_BIN_EXE_passt"));
    let sock = topo.dir().join("passt.socket");
    let sock_arg = sock.to_str().expect("utf-8 path").to_string();
    let mut args = vec!["-s", &sock_arg];
    if mode == Mode::VhostUser {
        args.push("--vhost-user");
    }
    args.extend_from_slice(extra);
    let passt = passt::Passt::start(topo, &bin, &args, passt::Ready::Daemon);
    let guest = match mode {
        Mode::Stream => guest::Guest::boot(&["-netdev", &stream_netdev(&sock)]),
        Mode::VhostUser => {
            let chardev = format!("socket,id=c,path={}", sock.display());
            let netdev = format!("vhost-user,id={},chardev=c", guest::NETDEV_ID);
            guest::Guest::builder()
                .netdev(&["-chardev", &chardev, "-netdev", &netdev])
                .device_opt("host_mtu=65520")
                .boot()
        }
    };
    (passt, guest)
}
