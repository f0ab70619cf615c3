//! Outbound TCP end to end: a real guest kernel (TCG) on passt-rs, in both modes, downloads
//! from and uploads to servers in the peer namespace, over IPv4 and IPv6, and the contents
//! are compared by SHA-256.

mod common;

use std::time::{Duration, Instant};

use common::checks::{guest_sha256, sha256};
use common::guest::CMD_TIMEOUT;
use common::netns::*;
use common::tcp_guest::{pattern, socat};
use common::Mode;

/// Issue 4 asks for 64 MiB each way; a TCG guest moves that in well under a minute per
/// mode (see the timing this test prints).
const SIZE: usize = 64 << 20;

#[test]
fn stream_guest_downloads_and_uploads_over_tcp() {
    downloads_and_uploads(Mode::Stream);
}

#[test]
fn vhost_user_guest_downloads_and_uploads_over_tcp() {
    downloads_and_uploads(Mode::VhostUser);
}

fn downloads_and_uploads(mode: Mode) {
    let _serial = common::serial();
    let topo = Topology::new();
    let www = topo.dir().join("www");
    std::fs::create_dir_all(&www).unwrap();
    let file = www.join("blob");
    let data = pattern(SIZE, 0);
    std::fs::write(&file, &data).unwrap();
    let want = sha256(&file);
    eprintln!("{mode:?}: download sha256 {want}");

    // Debug logging, to a file (the daemon has no stderr), for the counters passt logs
    // when the guest goes.
    let log_file = topo.dir().join("passt-debug.log");
    let log_arg = log_file.to_str().expect("utf-8 path");
    let (passt, mut guest) =
        common::passt_and_guest(&topo, mode, &["--one-off", "-d", "-l", log_arg]);
    let started = Instant::now();
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

    // Download: busybox httpd in inetd mode behind socat, one connection each.
    for (fam, url_host) in [
        ("TCP4", REMOTE_V4.to_string()),
        ("TCP6", format!("[{REMOTE_V6}]")),
    ] {
        let (_httpd, log) = socat(
            &topo,
            &[
                &format!("{fam}-LISTEN:8080,reuseaddr"),
                &format!("EXEC:busybox httpd -i -h {}", www.display()),
            ],
        );
        let (status, out) = guest.run(
            &format!("wget -q -O /tmp/down http://{url_host}:8080/blob 2>&1"),
            CMD_TIMEOUT,
        );
        assert_eq!(
            status,
            0,
            "wget ({fam}): {out}\n{}\n{}",
            log.text(),
            passt.log()
        );
        assert_eq!(
            guest_sha256(&mut guest, "/tmp/down"),
            want,
            "download {fam}"
        );
        guest.run_ok("rm /tmp/down");
    }

    // Upload: the guest sends a file; the peer keeps exactly its size and closes.
    guest.run_ok(&format!(
        "dd if=/dev/urandom of=/tmp/up bs=65536 count={} 2>/dev/null",
        SIZE / 65536
    ));
    let up_sum = guest_sha256(&mut guest, "/tmp/up");
    for (i, (fam, host)) in [
        ("TCP4", REMOTE_V4.to_string()),
        ("TCP6", REMOTE_V6.to_string()),
    ]
    .into_iter()
    .enumerate()
    {
        let dest = topo.dir().join(format!("up{i}"));
        let (mut sink, log) = socat(
            &topo,
            &[
                "-u",
                &format!("{fam}-LISTEN:8081,reuseaddr"),
                &format!("SYSTEM:head -c {SIZE} > {}", dest.display()),
            ],
        );
        let (status, out) = guest.run(&format!("nc {host} 8081 < /tmp/up 2>&1"), CMD_TIMEOUT);
        assert_eq!(status, 0, "nc ({fam}): {out}\n{}", log.text());
        let pidfd = common::process::Pidfd::open(sink.id()).unwrap();
        assert!(pidfd.wait_exit(CMD_TIMEOUT), "socat sink still running");
        let _ = sink.wait();
        assert_eq!(sha256(&dest), up_sum, "upload {fam}");
        eprintln!("{mode:?}: upload {fam} sha256 {up_sum}");
    }

    eprintln!(
        "{mode:?}: {} MiB down and up over IPv4 and IPv6 in {:?}",
        SIZE >> 20,
        started.elapsed()
    );
    assert!(passt.running(), "passt exited:\n{}", passt.log());
    assert!(guest.poweroff(Duration::from_secs(30)));
    assert!(
        passt.wait_exit(CMD_TIMEOUT),
        "--one-off passt still running"
    );
    let log = std::fs::read_to_string(&log_file).unwrap_or_default();
    let counters = |what: &str| {
        log.lines()
            .find(|l| l.contains(&format!("{what} counters")))
            .unwrap_or_else(|| panic!("no {what} counters in the log:\n{log}"))
            .to_string()
    };
    eprintln!("{mode:?}: {}", counters("tcp"));
    if mode == Mode::VhostUser {
        // The upload's payload went to the sockets straight from guest memory.
        let tx = counters("vhost-user");
        eprintln!("{mode:?}: {tx}");
        let split: u64 = tx
            .split("split: ")
            .nth(1)
            .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no split count in {tx}"));
        assert!(
            split as usize >= SIZE / 65536,
            "only {split} split frames: {tx}"
        );
    }
}
