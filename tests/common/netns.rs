//! The test network: two namespaces joined by a veth pair, created without privileges on the
//! real network and torn down by killing the processes that hold them.
//!
//! ```text
//!   "host" namespace (user + net + mount)         "peer" namespace (net, same user ns)
//!   passt runs here                                plays the router and the internet
//!   veth0 192.0.2.2/24  2001:db8::2/64  <------>  veth1 192.0.2.1/24  2001:db8::1/64
//!   default via 192.0.2.1, via fe80::1                    fe80::1 (fixed link-local)
//!   lo up                                          lo 198.51.100.1/32  2001:db8:ffff::1/128
//!   /etc/resolv.conf -> ours (bind mount)
//! ```
//!
//! Each namespace is held by a `sleep infinity` process: the host one started by
//! `unshare -Urnm`, the peer one by `unshare -n` run from inside the host namespaces. Dropping
//! the [`Topology`] kills both holders and everything started through it, and the kernel
//! frees the namespaces with their last process. The mount namespace is private (unshare's
//! default propagation), so the resolv.conf bind mount is never visible outside it.
//!
//! Commands enter the namespaces with `setns(2)` between fork and exec, so a spawned child is
//! the program itself (its PID is what we kill) and keeps its `Command` configuration.

use std::ffi::CString;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use super::process::{die_with_parent, kill_child, Pidfd};

/// Host side of the veth pair.
pub const HOST_IF: &str = "veth0";
/// Peer side of the veth pair.
pub const PEER_IF: &str = "veth1";

/// Host address on [`HOST_IF`]: what passt hands to the guest.
pub const HOST_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
/// Peer address on [`PEER_IF`]: the host's IPv4 default gateway.
pub const PEER_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
/// Prefix length of the veth IPv4 subnet.
pub const PREFIX_V4: u8 = 24;
/// Host global address on [`HOST_IF`].
pub const HOST_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2);
/// Peer global address on [`PEER_IF`].
pub const PEER_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
/// Prefix length of the veth IPv6 subnet.
pub const PREFIX_V6: u8 = 64;
/// Fixed link-local address of [`PEER_IF`]: the host's IPv6 default gateway.
pub const PEER_LL: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
/// "Internet" address of the peer (on its lo), reached through the default route.
pub const REMOTE_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
/// "Internet" IPv6 address of the peer (on its lo).
pub const REMOTE_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 1);
/// First nameserver in the host namespace's resolv.conf (nothing listens there).
pub const DNS_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 53);
/// Second nameserver in the host namespace's resolv.conf.
pub const DNS_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xffff, 0, 0, 0, 0, 0x53);
/// Search domain in the host namespace's resolv.conf.
pub const SEARCH: &str = "example.test";

/// Which namespaces a command enters.
#[derive(Clone, Copy)]
enum Side {
    Host,
    Peer,
}

/// The two namespaces, the veth pair between them, a scratch directory, and every process
/// started in them.
pub struct Topology {
    host: Child,
    peer: Child,
    user_ns: OwnedFd,
    mnt_ns: OwnedFd,
    host_net: OwnedFd,
    peer_net: OwnedFd,
    dir: PathBuf,
    /// Processes handed out by `spawn_*`: killed on drop.
    spawned: Mutex<Vec<Pidfd>>,
}

static NEXT_DIR: AtomicU32 = AtomicU32::new(0);

fn ns_fd(pid: u32, ns: &str) -> OwnedFd {
    let path = format!("/proc/{pid}/ns/{ns}");
    File::open(&path)
        .unwrap_or_else(|e| panic!("open {path}: {e}"))
        .into()
}

/// Starts `cmd` (already set to enter its namespaces) as a holder: it prints `ready` and then
/// sleeps until killed. Panics if it doesn't get there, after killing `others`.
fn start_holder(mut cmd: Command, what: &str, others: &mut [&mut Child]) -> Child {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    die_with_parent(&mut cmd);
    let fail = |others: &mut [&mut Child], why: String| -> ! {
        for other in others.iter_mut() {
            kill_child(other);
        }
        panic!("{what} namespace holder: {why}")
    };
    let mut child = match cmd.spawn() {
        Ok(child) => child,
        Err(e) => fail(
            others,
            format!("spawn: {e} (is util-linux unshare installed?)"),
        ),
    };
    let stdout = child.stdout.take().expect("piped stdout");
    let mut line = String::new();
    // Blocks until the holder is inside its namespaces (or died: EOF).
    let _ = BufReader::new(stdout).read_line(&mut line);
    if line.trim() != "ready" {
        let status = child.wait();
        fail(
            others,
            format!(
                "failed before ready ({status:?}); unprivileged user namespaces must be \
                 allowed (sysctl kernel.unprivileged_userns_clone, user.max_user_namespaces)"
            ),
        );
    }
    child
}

const HOLDER: &str = "echo ready; exec sleep infinity";

impl Topology {
    /// Creates the namespaces, links and addresses. Panics with the failing command's output
    /// if any setup step fails.
    pub fn new() -> Topology {
        let dir = std::env::temp_dir().join(format!(
            "passt-rs-test-{}-{}",
            std::process::id(),
            NEXT_DIR.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        let resolv = dir.join("resolv.conf");
        fs::write(
            &resolv,
            format!("nameserver {DNS_V4}\nnameserver {DNS_V6}\nsearch {SEARCH}\n"),
        )
        .expect("write resolv.conf");

        let mut cmd = Command::new("unshare");
        cmd.args(["-Urnm", "sh", "-c", HOLDER]);
        let mut host = start_holder(cmd, "host", &mut []);
        let host_pid = host.id();
        let user_ns = ns_fd(host_pid, "user");
        let host_net = ns_fd(host_pid, "net");
        let mnt_ns = ns_fd(host_pid, "mnt");

        // The peer namespace is created from inside the host user namespace, so the host
        // namespace's root owns both and can move the veth end across.
        let mut cmd = Command::new("unshare");
        cmd.args(["-n", "sh", "-c", HOLDER]);
        enter(
            &mut cmd,
            user_ns.as_raw_fd(),
            host_net.as_raw_fd(),
            mnt_ns.as_raw_fd(),
        );
        let peer = start_holder(cmd, "peer", &mut [&mut host]);
        let peer_net = ns_fd(peer.id(), "net");

        let topo = Topology {
            host,
            peer,
            user_ns,
            mnt_ns,
            host_net,
            peer_net,
            dir,
            spawned: Mutex::new(Vec::new()),
        };

        // DAD off before any interface exists, so link-local and global addresses are usable
        // at once: no waiting on tentative addresses, in either namespace.
        let no_dad = "sysctl -qw net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.default.accept_dad=0";
        topo.host_ok(no_dad);
        topo.peer_ok(no_dad);
        topo.host_ok(&format!(
            "ip link add {HOST_IF} type veth peer name {PEER_IF} netns /proc/{}/ns/net",
            topo.peer.id()
        ));
        topo.peer_ok(&format!(
            "set -e
             ip link set lo up
             ip addr add {REMOTE_V4}/32 dev lo
             ip addr add {REMOTE_V6}/128 dev lo
             ip link set {PEER_IF} up
             ip addr add {PEER_V4}/{PREFIX_V4} dev {PEER_IF}
             ip addr add {PEER_V6}/{PREFIX_V6} dev {PEER_IF} nodad
             ip addr add {PEER_LL}/64 dev {PEER_IF} nodad"
        ));
        // Only the GIDs mapped into the user namespace can go in ping_group_range (the kernel
        // rejects the whole range otherwise): take them from our gid_map, which `unshare -r`
        // sets to "0 <our gid> 1".
        let (gid_lo, gid_hi) = mapped_gids(host_pid);
        topo.host_ok(&format!(
            "set -e
             ip link set lo up
             ip link set {HOST_IF} up
             ip addr add {HOST_V4}/{PREFIX_V4} dev {HOST_IF}
             ip addr add {HOST_V6}/{PREFIX_V6} dev {HOST_IF} nodad
             ip route add default via {PEER_V4} dev {HOST_IF}
             ip -6 route add default via {PEER_LL} dev {HOST_IF}
             echo '{gid_lo} {gid_hi}' > /proc/sys/net/ipv4/ping_group_range
             mount --bind '{}' /etc/resolv.conf",
            resolv.display()
        ));
        topo
    }

    /// Scratch directory for sockets, logs and PID files; removed on drop unless the test
    /// panicked (then its path is printed so the logs can be read).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// PID of the process holding the host namespaces (for `nsenter -t`).
    pub fn host_pid(&self) -> u32 {
        self.host.id()
    }

    /// PID of the process holding the peer network namespace.
    pub fn peer_pid(&self) -> u32 {
        self.peer.id()
    }

    fn prepare(&self, cmd: &mut Command, side: Side) {
        let net = match side {
            Side::Host => self.host_net.as_raw_fd(),
            Side::Peer => self.peer_net.as_raw_fd(),
        };
        enter(cmd, self.user_ns.as_raw_fd(), net, self.mnt_ns.as_raw_fd());
    }

    fn sh(&self, side: Side, script: &str) -> Output {
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(script).stdin(Stdio::null());
        self.prepare(&mut cmd, side);
        cmd.output()
            .unwrap_or_else(|e| panic!("run `{script}`: {e}"))
    }

    /// Runs `script` with `sh -c` in the host namespaces; returns its output whatever the
    /// exit status.
    pub fn host_cmd(&self, script: &str) -> Output {
        self.sh(Side::Host, script)
    }

    /// Runs `script` with `sh -c` in the peer network namespace (host user and mount
    /// namespaces).
    pub fn peer_cmd(&self, script: &str) -> Output {
        self.sh(Side::Peer, script)
    }

    /// [`Self::host_cmd`], panicking with the output unless it exits 0; returns stdout.
    pub fn host_ok(&self, script: &str) -> String {
        checked("host", script, self.host_cmd(script))
    }

    /// [`Self::peer_cmd`], panicking with the output unless it exits 0; returns stdout.
    pub fn peer_ok(&self, script: &str) -> String {
        checked("peer", script, self.peer_cmd(script))
    }

    fn spawn(&self, mut cmd: Command, side: Side) -> Child {
        self.prepare(&mut cmd, side);
        die_with_parent(&mut cmd);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {:?}: {e}", cmd.get_program()));
        // Not reaped yet (we hold the Child), so the PID still names this process.
        let pidfd = Pidfd::open(child.id()).expect("pidfd_open");
        self.spawned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(pidfd);
        child
    }

    /// Spawns `cmd` in the host namespaces. The child is killed when the topology is
    /// dropped, if it still runs; waiting for it earlier through the `Child` is fine.
    pub fn spawn_host(&self, cmd: Command) -> Child {
        self.spawn(cmd, Side::Host)
    }

    /// Spawns `cmd` in the peer network namespace; killed on drop like [`Self::spawn_host`].
    pub fn spawn_peer(&self, cmd: Command) -> Child {
        self.spawn(cmd, Side::Peer)
    }

    /// Registers a process started some other way (a daemon's PID) for kill on drop.
    pub fn track(&self, pidfd: Pidfd) {
        self.spawned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(pidfd);
    }
}

impl Default for Topology {
    fn default() -> Self {
        Topology::new()
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        let spawned = std::mem::take(&mut *self.spawned.lock().unwrap_or_else(|e| e.into_inner()));
        for p in &spawned {
            let _ = p.kill();
        }
        for p in &spawned {
            if !p.kill_and_wait() {
                eprintln!("harness: process {} did not exit after SIGKILL", p.pid());
            }
        }
        kill_child(&mut self.peer);
        kill_child(&mut self.host);
        if std::thread::panicking() {
            eprintln!("harness: test files kept in {}", self.dir.display());
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

fn checked(side: &str, script: &str, out: Output) -> String {
    if !out.status.success() {
        panic!(
            "{side} command failed ({}):\n{script}\n--- stdout:\n{}--- stderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// First GID range of `pid`'s gid_map, as inclusive bounds inside the namespace.
fn mapped_gids(pid: u32) -> (u32, u32) {
    let map = fs::read_to_string(format!("/proc/{pid}/gid_map")).expect("read gid_map");
    let mut fields = map.split_whitespace().map(|f| f.parse::<u32>());
    match (fields.next(), fields.next(), fields.next()) {
        (Some(Ok(inside)), Some(Ok(_)), Some(Ok(count))) if count > 0 => {
            (inside, inside + (count - 1))
        }
        _ => panic!("unexpected gid_map of {pid}: {map:?}"),
    }
}

/// Makes `cmd` enter the user namespace, then the network and mount namespaces, between fork
/// and exec. The user namespace comes first: it grants the capabilities the other two need.
/// Entering a mount namespace resets the working directory to its root, so the directory the
/// command would have run in is entered again (the mount namespace is a copy of ours).
fn enter(cmd: &mut Command, user: i32, net: i32, mnt: i32) {
    let cwd = cmd
        .get_current_dir()
        .map(Path::to_path_buf)
        .or_else(|| std::env::current_dir().ok())
        .and_then(|d| CString::new(d.as_os_str().as_bytes()).ok());
    // SAFETY: the closure only calls async-signal-safe syscalls on values prepared before
    // the fork, and allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            for (fd, kind) in [
                (user, libc::CLONE_NEWUSER),
                (net, libc::CLONE_NEWNET),
                (mnt, libc::CLONE_NEWNS),
            ] {
                if libc::setns(fd, kind) != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            if let Some(dir) = &cwd {
                // A directory missing in the namespace isn't fatal: stay at its root.
                libc::chdir(dir.as_ptr());
            }
            Ok(())
        });
    }
}
