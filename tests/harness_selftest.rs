//! Tests of the end-to-end harness itself, run against Debian's passt so that they don't
//! depend on our binary: if these fail, the harness (or the machine) is broken, not passt-rs.

mod common;

use std::fs;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::guest::{Guest, CMD_TIMEOUT};
use common::netns::*;
use common::output::{Collector, WaitError};
use common::passt::{debian_passt, Passt, Ready, DEBIAN_READY_LINE};

#[test]
fn collector_waits_across_reads_and_reports_close() {
    let (reader, mut writer) = std::io::pipe().expect("pipe");
    let out = Collector::new(None);
    out.attach(reader);
    let feeder = std::thread::spawn(move || {
        writer.write_all(b"hello\r\nwor").expect("write");
        writer.write_all(b"ld\r\n").expect("write");
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    let end = out.wait_for(0, "world\n", deadline).expect("match");
    assert_eq!(&out.text()[..end], "hello\nworld\n");
    feeder.join().expect("feeder");
    assert_eq!(out.wait_for(end, "never", deadline), Err(WaitError::Closed));
}

#[test]
fn topology_routes_resolv_conf_and_cleanup() {
    let real_resolv = fs::read("/etc/resolv.conf").ok();
    let t0 = Instant::now();
    let topo = Topology::new();
    eprintln!("topology set up in {:?}", t0.elapsed());
    let host_pid = topo.host_pid();
    let peer_pid = topo.peer_pid();

    // Host to the peer's "internet" addresses, through both default routes.
    topo.host_ok(&format!("busybox ping -c1 -W5 {REMOTE_V4}"));
    topo.host_ok(&format!("busybox ping -c1 -W5 {REMOTE_V6}"));
    // And the peer reaches back to the host's addresses.
    topo.peer_ok(&format!("busybox ping -c1 -W5 {HOST_V4}"));
    topo.peer_ok(&format!("busybox ping -c1 -W5 {HOST_V6}"));

    let resolv = topo.host_ok("cat /etc/resolv.conf");
    assert_eq!(
        resolv,
        format!("nameserver {DNS_V4}\nnameserver {DNS_V6}\nsearch {SEARCH}\n")
    );
    assert_eq!(
        fs::read("/etc/resolv.conf").ok(),
        real_resolv,
        "real resolv.conf changed"
    );

    // Unprivileged ICMP echo sockets are allowed in the host namespace.
    let range = topo.host_ok("cat /proc/sys/net/ipv4/ping_group_range");
    let bounds: Vec<u32> = range
        .split_whitespace()
        .filter_map(|f| f.parse().ok())
        .collect();
    assert!(
        bounds.len() == 2 && bounds[0] <= bounds[1] && bounds[0] == 0,
        "ping_group_range {range:?}"
    );

    // The host namespace is not ours: different network namespace, no veth here.
    let ours = fs::read_link("/proc/self/ns/net").expect("own netns");
    let theirs = fs::read_link(format!("/proc/{host_pid}/ns/net")).expect("host netns");
    assert_ne!(ours, theirs);

    // Spawned processes run in the namespace and die with the topology.
    let mut cmd = Command::new("sh");
    cmd.args(["-c", "readlink /proc/self/ns/net; exec sleep infinity"])
        .stdout(Stdio::piped());
    let mut child = topo.spawn_host(cmd);
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().expect("stdout")),
        &mut line,
    )
    .expect("read");
    assert_eq!(line.trim(), theirs.to_string_lossy());
    let dir = topo.dir().to_path_buf();
    assert!(dir.is_dir());

    drop(topo);
    let status = child.wait().expect("wait spawned");
    assert!(!status.success(), "spawned child should have been killed");
    for pid in [host_pid, peer_pid] {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "holder {pid} still exists"
        );
    }
    assert!(!dir.exists(), "scratch dir not removed");
}

#[test]
fn guest_dhcp_slaac_ping_via_debian_passt() {
    let Some(passt_bin) = debian_passt() else {
        eprintln!("SKIP: /usr/bin/passt not installed (apt-get install passt)");
        return;
    };
    let _serial = common::serial();
    let t0 = Instant::now();
    let topo = Topology::new();
    let sock = topo.dir().join("passt.sock");
    let sock_arg = sock.to_str().expect("utf-8 path");
    let passt = Passt::start(
        &topo,
        &passt_bin,
        &["-f", "-e", "-s", sock_arg],
        Ready::Line(DEBIAN_READY_LINE.into()),
    );
    let t_passt = t0.elapsed();

    let mut guest = Guest::boot(&["-netdev", &common::stream_netdev(&sock)]);
    eprintln!("guest booted in {:?}", guest.boot_time());

    // The console driver: exit status, interleaved stdout/stderr, nothing else.
    assert_eq!(guest.run("false", CMD_TIMEOUT), (1, String::new()));
    assert_eq!(
        guest.run("echo one; echo two >&2; (exit 7)", CMD_TIMEOUT),
        (7, "one\ntwo\n".to_string())
    );
    guest.send("echo waited-\"for\"\n");
    assert_eq!(guest.wait_for("waited-for\n", CMD_TIMEOUT), "waited-for\n");

    let out = guest.run_ok("udhcpc -i eth0 -n -q -f 2>&1");
    assert!(out.contains(&format!("ip={HOST_V4}")), "udhcpc: {out}");
    let addr = guest.run_ok("ip -4 addr show dev eth0");
    assert!(
        addr.contains(&format!("inet {HOST_V4}/{PREFIX_V4}")),
        "{addr}"
    );
    let route = guest.run_ok("ip -4 route show default");
    assert!(route.contains(&format!("default via {PEER_V4}")), "{route}");
    let resolv = guest.run_ok("cat /etc/resolv.conf");
    assert!(resolv.contains(&format!("nameserver {DNS_V4}")), "{resolv}");
    assert!(resolv.contains(&format!("search {SEARCH}")), "{resolv}");
    guest.run_ok(&format!("ping -c1 -W5 {REMOTE_V4}"));

    // SLAAC: wait (bounded) for a global address from the router advertisement, past
    // duplicate address detection (a tentative address can't be a ping source).
    let (status, seen) = guest.run(
        "slaac() { ip -6 addr show dev eth0 scope global | grep 'inet6 2001:db8::' | grep -qv tentative; }; \
         i=0; while [ $i -lt 200 ] && ! slaac; do i=$((i+1)); sleep 0.1; done; \
         ip -6 addr show dev eth0; ip -6 route; slaac",
        CMD_TIMEOUT,
    );
    assert_eq!(status, 0, "no SLAAC address in 2001:db8::/64:\n{seen}");
    guest.run_ok(&format!("ping6 -c1 -W5 {REMOTE_V6}"));

    let t_total = t0.elapsed();
    eprintln!(
        "passt ready after {t_passt:?}, guest boot {:?}, whole test {t_total:?}",
        guest.boot_time()
    );
    assert!(passt.running(), "passt exited:\n{}", passt.log());
    assert!(
        guest.poweroff(Duration::from_secs(30)),
        "guest did not power off"
    );
}

#[test]
fn debian_passt_daemon_readiness_and_kill() {
    let Some(passt_bin) = debian_passt() else {
        eprintln!("SKIP: /usr/bin/passt not installed (apt-get install passt)");
        return;
    };
    let topo = Topology::new();
    let sock = topo.dir().join("passt.sock");
    let mut passt = Passt::start(
        &topo,
        &passt_bin,
        &["-s", sock.to_str().expect("utf-8 path")],
        Ready::Daemon,
    );
    // The parent has exited: the daemon is a different process, and it listens already.
    assert!(passt.running());
    std::os::unix::net::UnixStream::connect(&sock).expect("socket listens once ready");
    let pid = passt.pid();
    let netns = fs::read_link(format!("/proc/{pid}/ns/net")).expect("daemon netns");
    let host_netns = fs::read_link(format!("/proc/{}/ns/net", topo.host_pid())).expect("host");
    assert_eq!(netns, host_netns, "passt must run in the host namespace");
    passt.stop();
    assert!(!passt.running());
}

#[test]
fn passt_start_failure_reports_why_and_output() {
    let topo = Topology::new();
    let start = |args: &[&str], ready: Ready| {
        let err = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            Passt::start(&topo, std::path::Path::new("/bin/sh"), args, ready)
        }))
        .err()
        .expect("start should have panicked");
        err.downcast_ref::<String>().cloned().unwrap_or_default()
    };
    let msg = start(
        &["-c", "echo boom >&2; exit 3"],
        Ready::Line("listening".into()),
    );
    assert!(msg.contains("exited") && msg.contains("boom"), "{msg}");
    // For a daemon, a parent exiting non-zero (here 4, after the --pid the helper appends
    // landed in $1) is a failed start.
    let msg = start(&["-c", "echo bang; exit 4", "sh"], Ready::Daemon);
    assert!(
        msg.contains("parent exit status") && msg.contains("bang"),
        "{msg}"
    );
}
