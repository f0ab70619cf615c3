//! Inbound TCP (`-t`) and the host-loopback mapping end to end, with a real guest kernel
//! (TCG) in both modes: the host namespace fetches from a server in the guest through a
//! forwarded port and sends it data; the guest reaches a server on the host's loopback
//! through the gateway address; 200 short connections leave no flow and no descriptor
//! behind; guest-peer throughput is measured and printed.

mod common;

use std::time::{Duration, Instant};

use common::checks::{guest_sha256, sha256};
use common::guest::CMD_TIMEOUT;
use common::netns::*;
use common::tcp_guest::{pattern, socat_in};
use common::Mode;

/// Size of the files moved through forwarded ports.
const SIZE: usize = 4 << 20;
/// Size of the guest-peer transfer whose throughput is reported.
const THROUGHPUT_SIZE: usize = 32 << 20;
const SHORT_CONNECTIONS: usize = 200;
const T: Duration = Duration::from_secs(30);

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Flows opened and flows freed, from passt's debug log.
fn flow_balance(log: &str) -> (usize, usize) {
    let mut opened = 0;
    let mut freed = 0;
    for l in log.lines().filter(|l| l.contains("tcp: flow ")) {
        if l.contains(" -> ") {
            opened += 1;
        } else if l.ends_with(" closed") || l.ends_with(" reset") {
            freed += 1;
        }
    }
    (opened, freed)
}

#[test]
fn stream_inbound_forwarding_and_host_loopback() {
    forwarding(Mode::Stream);
}

#[test]
fn vhost_user_inbound_forwarding_and_host_loopback() {
    forwarding(Mode::VhostUser);
}

fn forwarding(mode: Mode) {
    let _serial = common::serial();
    let topo = Topology::new();
    let www = topo.dir().join("www");
    std::fs::create_dir_all(&www).unwrap();
    let blob = www.join("blob");
    std::fs::write(&blob, pattern(SIZE, 1)).unwrap();
    let blob_sum = sha256(&blob);
    let big = www.join("big");
    std::fs::write(&big, pattern(THROUGHPUT_SIZE, 2)).unwrap();
    let big_sum = sha256(&big);
    let (debug_log_arg, debug_log) = common::passt::log_fifo(&topo, "passt-debug");

    let (passt, mut guest) = common::passt_and_guest(
        &topo,
        mode,
        &[
            "--one-off",
            "-d",
            "-l",
            &debug_log_arg,
            "-t",
            "8080:80",
            "-t",
            "8081:81",
        ],
    );
    let out = guest.run_ok("udhcpc -i eth0 -n -q -f 2>&1");
    assert!(out.contains(&format!("ip={HOST_V4}")), "udhcpc: {out}");
    let (status, seen) = guest.run(
        "i=0; while [ $i -lt 300 ]; do \
           ip -6 addr show dev eth0 scope global | grep 'inet6 2001:db8::' | grep -qv tentative && break; \
           i=$((i+1)); sleep 0.1; done; \
         ip -6 addr show dev eth0 scope global | grep 'inet6 2001:db8::' | grep -qv tentative",
        CMD_TIMEOUT,
    );
    assert_eq!(status, 0, "no SLAAC address:\n{seen}");

    // Host to guest, guest to host: httpd in the guest on port 80 (host 8080) serves a
    // file the guest made; the host fetches it from loopback, its own IPv4 and IPv6
    // addresses.
    guest.run_ok(&format!(
        "mkdir -p /tmp/www && dd if=/dev/urandom of=/tmp/www/g bs=65536 count={} 2>/dev/null",
        SIZE / 65536
    ));
    let g_sum = guest_sha256(&mut guest, "/tmp/www/g");
    guest.run_ok("busybox httpd -p 80 -h /tmp/www");
    for url in [
        "http://127.0.0.1:8080/g".to_string(),
        format!("http://{HOST_V4}:8080/g"),
        format!("http://[{HOST_V6}]:8080/g"),
        "http://[::1]:8080/g".to_string(),
    ] {
        let dest = topo.dir().join("fetched");
        let _ = std::fs::remove_file(&dest);
        let started = Instant::now();
        let out = topo.host_cmd(&format!("busybox wget -q -O {} {url} 2>&1", dest.display()));
        assert!(
            out.status.success(),
            "wget {url}: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            passt.log()
        );
        assert_eq!(sha256(&dest), g_sum, "fetched through {url}");
        eprintln!(
            "{mode:?}: {} MiB guest -> host through {url} in {:?}",
            SIZE >> 20,
            started.elapsed()
        );
    }
    // Host to guest: nc in the guest (port 81, host 8081) keeps what the host sends.
    // (A connection before nc listens would be accepted by passt, then reset by the guest.)
    guest.run_ok(
        "(nc -l -p 81 > /tmp/recv; echo done > /tmp/recv.done) >/dev/null 2>&1 & \
         while ! netstat -ltn | grep -q ':81 '; do sleep 0.05; done",
    );
    let sent = topo.host_cmd(&format!(
        "socat -u OPEN:{} TCP4:127.0.0.1:8081",
        blob.display()
    ));
    assert!(
        sent.status.success(),
        "upload to the guest: {}",
        String::from_utf8_lossy(&sent.stderr)
    );
    let (status, out) = guest.run(
        "i=0; while [ ! -e /tmp/recv.done ] && [ $i -lt 300 ]; do i=$((i+1)); sleep 0.1; done; \
         [ -e /tmp/recv.done ]",
        CMD_TIMEOUT,
    );
    assert_eq!(status, 0, "guest nc didn't finish: {out}");
    assert_eq!(
        guest_sha256(&mut guest, "/tmp/recv"),
        blob_sum,
        "host -> guest"
    );

    // Guest to the host's loopback through the gateway address.
    let (_lo_httpd, lo_log) = socat_in(
        &topo,
        true,
        &[
            "TCP4-LISTEN:9090,bind=127.0.0.1,reuseaddr,fork",
            &format!("EXEC:busybox httpd -i -h {}", www.display()),
        ],
    );
    let (status, out) = guest.run(
        &format!("wget -q -O /tmp/lo http://{PEER_V4}:9090/blob 2>&1"),
        CMD_TIMEOUT,
    );
    assert_eq!(status, 0, "wget via the gateway: {out}\n{}", lo_log.text());
    assert_eq!(
        guest_sha256(&mut guest, "/tmp/lo"),
        blob_sum,
        "host loopback"
    );
    guest.run_ok("rm /tmp/lo /tmp/recv");

    // Throughput, guest <- peer and guest -> peer.
    let (_peer_httpd, _) = socat_in(
        &topo,
        false,
        &[
            "TCP4-LISTEN:8090,reuseaddr,fork",
            &format!("EXEC:busybox httpd -i -h {}", www.display()),
        ],
    );
    let started = Instant::now();
    let (status, out) = guest.run(
        &format!("wget -q -O /tmp/big http://{REMOTE_V4}:8090/big 2>&1"),
        Duration::from_secs(600),
    );
    let down = started.elapsed();
    assert_eq!(status, 0, "wget big: {out}");
    assert_eq!(
        guest_sha256(&mut guest, "/tmp/big"),
        big_sum,
        "big download"
    );
    let dest = topo.dir().join("big-up");
    let (mut sink, _) = socat_in(
        &topo,
        false,
        &[
            "-u",
            "TCP4-LISTEN:8091,reuseaddr",
            &format!("SYSTEM:head -c {THROUGHPUT_SIZE} > {}", dest.display()),
        ],
    );
    let started = Instant::now();
    let (status, out) = guest.run(
        &format!("nc {REMOTE_V4} 8091 < /tmp/big 2>&1"),
        Duration::from_secs(600),
    );
    assert_eq!(status, 0, "nc big: {out}");
    let pidfd = common::process::Pidfd::open(sink.id()).unwrap();
    assert!(pidfd.wait_exit(CMD_TIMEOUT), "socat sink still running");
    let up = started.elapsed();
    let _ = sink.wait();
    assert_eq!(sha256(&dest), big_sum, "big upload");
    guest.run_ok("rm /tmp/big");
    let mib = (THROUGHPUT_SIZE >> 20) as f64;
    eprintln!(
        "{mode:?}: guest <- peer {} MiB in {down:?} ({:.1} MiB/s), guest -> peer in {up:?} ({:.1} MiB/s)",
        THROUGHPUT_SIZE >> 20,
        mib / down.as_secs_f64(),
        mib / up.as_secs_f64()
    );

    // Short connections: none of them may leave a flow or a descriptor behind.
    let (_echo, _) = socat_in(
        &topo,
        false,
        // Reads the request first: closing with it unread would be a reset.
        &["TCP4-LISTEN:7000,reuseaddr,fork", "SYSTEM:read l; echo hi"],
    );
    let pid = passt.pid();
    // passt logs a flow's end after closing its socket: balanced, the fds are back too.
    let balanced = |log: &str| {
        let (o, f) = flow_balance(log);
        (o == f).then_some(())
    };
    assert!(
        debug_log
            .wait_until(0, Instant::now() + T, balanced)
            .is_ok(),
        "flows left open before the loop: {:?}",
        flow_balance(&debug_log.text())
    );
    let fds_before = fd_count(pid);
    let (opened_before, _) = flow_balance(&debug_log.text());
    let started = Instant::now();
    let (status, out) = guest.run(
        &format!(
            "i=0; while [ $i -lt {SHORT_CONNECTIONS} ]; do \
               r=$(echo x | nc {REMOTE_V4} 7000) && [ \"$r\" = hi ] || {{ echo \"failed at $i: $r\"; exit 1; }}; \
               i=$((i+1)); done"
        ),
        Duration::from_secs(600),
    );
    assert_eq!(status, 0, "short connections: {out}");
    eprintln!(
        "{mode:?}: {SHORT_CONNECTIONS} short connections in {:?}",
        started.elapsed()
    );
    let (opened_after, _) = flow_balance(&debug_log.text());
    assert_eq!(
        opened_after - opened_before,
        SHORT_CONNECTIONS,
        "one flow per connection"
    );
    assert!(
        debug_log
            .wait_until(0, Instant::now() + T, balanced)
            .is_ok(),
        "flows left open: (opened, freed) {:?}",
        flow_balance(&debug_log.text())
    );
    assert_eq!(fd_count(pid), fds_before, "descriptors left behind");

    assert!(passt.running(), "passt exited:\n{}", passt.log());
    assert!(guest.poweroff(Duration::from_secs(30)));
}
