//! UDP end to end: a real guest kernel (TCG) on passt-rs, in both modes, resolves a name
//! through `--dns-forward` (a DNS server in the peer namespace answers), exchanges 10 000
//! numbered datagrams with an echo server in the peer namespace over IPv4 and IPv6 (and
//! 500 of 20 000 bytes, more than a guest receive buffer holds, over IPv4), and
//! serves 10 000 more to clients on the host and in the peer through a forwarded port
//! (`-u`), paced by the echoes; losses are counted and must be zero.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::guest::{Guest, CMD_TIMEOUT};
use common::netns::*;
use common::output::Collector;
use common::passt::Passt;
use common::Mode;

/// The address the guest is told to use as its DNS server, mapped by passt-rs to the
/// host's resolver (198.51.100.53, served in the peer namespace).
const DNS_FORWARD: &str = "192.0.2.53";
const DATAGRAMS: u32 = 10_000;
const BIG_DATAGRAMS: u32 = 500;

/// What the guest knows when datagrams stop reaching it.
const GUEST_STATE: &str = "grep -i virtio /proc/interrupts; ip -s link show eth0; \
    grep -E '^Udp6?' /proc/net/snmp /proc/net/snmp6; dmesg | tail -20";

fn gtool() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/gtool/release/gtool")
}

/// `gtool args` in the peer namespace, once it says it listens.
fn peer_gtool(topo: &Topology, args: &[&str]) -> std::process::Child {
    let mut cmd = Command::new(gtool());
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child = topo.spawn_peer(cmd);
    let out = Collector::new(None);
    out.attach(child.stdout.take().expect("piped stdout"));
    out.wait_for(0, "listening on", Instant::now() + Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("gtool {args:?} didn't listen ({e:?}): {}", out.text()));
    child
}

fn wait_ipv6(guest: &mut Guest) {
    let (status, seen) = guest.run(
        "i=0; while [ $i -lt 300 ]; do \
           ip -6 addr show dev eth0 scope global | grep 'inet6 2001:db8::' | grep -qv tentative && break; \
           i=$((i+1)); sleep 0.1; done; \
         ip -6 addr show dev eth0 scope global | grep 'inet6 2001:db8::' | grep -qv tentative",
        CMD_TIMEOUT,
    );
    assert_eq!(status, 0, "no SLAAC address:\n{seen}");
}

/// The sum of the `late_kicks` and `late_interrupts` counters in a state dump.
fn late_notifications(state: &str) -> u64 {
    ["late_kicks: ", "late_interrupts: "]
        .iter()
        .flat_map(|key| state.match_indices(key).map(move |(at, _)| at + key.len()))
        .filter_map(|at| {
            let digits: String = state[at..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            digits.parse::<u64>().ok()
        })
        .sum()
}

/// Runs `cmd` in the guest; if it hangs, fails with passt's state (its `-l` log is `log`).
fn guest_exchange(guest: &mut Guest, passt: &Passt, log: &Collector, cmd: &str) -> String {
    match guest.try_run(cmd, CMD_TIMEOUT) {
        Ok((0, out)) => out,
        Ok((status, out)) => guest.fail(&format!("{cmd} exited {status}: {out}")),
        Err(why) => guest.fail(&format!("{why}\n{}", passt.state(log))),
    }
}

fn dns_and_datagrams(mode: Mode) {
    let _serial = common::serial();
    let topo = Topology::new();
    // The host's resolver lives in the peer namespace, as a real one would be out there.
    topo.peer_ok(&format!("ip addr add {DNS_V4}/32 dev lo"));
    let dns = peer_gtool(
        &topo,
        &[
            "dns-server",
            &format!("{DNS_V4}:53"),
            "passt.test",
            "203.0.113.7",
        ],
    );
    let echo4 = peer_gtool(&topo, &["udp-echo", &format!("{REMOTE_V4}:7777")]);
    let echo6 = peer_gtool(&topo, &["udp-echo", &format!("[{REMOTE_V6}]:7777")]);

    // Info level is enough: on a failure, the state dump (SIGUSR1) says where it stalled.
    let (log_arg, log) = common::passt::log_fifo(&topo, "passt-info");
    let (passt, mut guest) = common::passt_and_guest(
        &topo,
        mode,
        &[
            "--dns-forward",
            DNS_FORWARD,
            "-u",
            "5353:53",
            "-l",
            &log_arg,
        ],
    );
    let out = guest.run_ok("udhcpc -i eth0 -n -q -f 2>&1");
    assert!(out.contains(&format!("ip={HOST_V4}")), "udhcpc: {out}");
    let resolv = guest.run_ok("cat /etc/resolv.conf");
    assert!(
        resolv.contains(&format!("nameserver {DNS_FORWARD}")),
        "DHCP didn't advertise the forwarder: {resolv}"
    );
    let answer = guest.run_ok("nslookup passt.test 2>&1");
    assert!(
        answer.contains("203.0.113.7"),
        "{mode:?}: name lookup through --dns-forward: {answer}"
    );

    wait_ipv6(&mut guest);
    for dst in [format!("{REMOTE_V4}:7777"), format!("[{REMOTE_V6}]:7777")] {
        let started = Instant::now();
        let cmd = format!("gtool udp-exchange {dst} {DATAGRAMS} 200 64");
        let out = guest_exchange(&mut guest, &passt, &log, &cmd);
        eprintln!("{mode:?} {dst}: {} in {:?}", out.trim(), started.elapsed());
        assert!(
            out.contains(&format!("sent={DATAGRAMS} received={DATAGRAMS} lost=0")),
            "{mode:?} {dst}: {out}\n{}",
            passt.state(&log)
        );
    }

    // The other way: clients on the host and in the peer reach an echo server in the guest
    // through the forwarded port (-u 5353:53), numbered datagrams counted the same way.
    guest.run_ok("gtool udp-echo 53 >/tmp/echo.log 2>&1 &");
    guest.run_ok("i=0; while [ $i -lt 100 ] && ! grep -q listening /tmp/echo.log; do i=$((i+1)); sleep 0.1; done; cat /tmp/echo.log");
    let exchange = format!("{} udp-exchange", gtool().display());
    for (side, dst) in [
        ("host", "127.0.0.1:5353".to_string()),
        ("host", "[::1]:5353".to_string()),
        ("peer", format!("{HOST_V4}:5353")),
    ] {
        let cmd = format!("{exchange} {dst} {DATAGRAMS} 200 64");
        let out = if side == "host" {
            topo.host_ok(&cmd)
        } else {
            topo.peer_ok(&cmd)
        };
        eprintln!("{mode:?} {side} -> guest via {dst}: {}", out.trim());
        if !out.contains(&format!("sent={DATAGRAMS} received={DATAGRAMS} lost=0")) {
            // Both sides' view of the stall: passt's queues, the guest's interrupts and
            // counters (its shell is idle, waiting on us).
            let state = passt.state(&log);
            let (_, seen) = guest.run(GUEST_STATE, CMD_TIMEOUT);
            panic!("{mode:?} {side} -> {dst}: {out}\n{state}\nguest:\n{seen}");
        }
    }
    // Datagrams larger than the guest's receive buffers (Linux posts 1.5 to 4 KiB each):
    // each echo spreads over several buffers, in batches. Last: Linux then sizes its
    // buffers for them (4 KiB), which for small datagrams makes its socket buffers hold
    // fewer than the exchanges above keep in flight. A few at a time, for the same reason.
    let dst = format!("{REMOTE_V4}:7777");
    let cmd = format!("gtool udp-exchange {dst} {BIG_DATAGRAMS} 20000 4");
    let out = guest_exchange(&mut guest, &passt, &log, &cmd);
    eprintln!("{mode:?} {dst}, 20000 bytes: {}", out.trim());
    assert!(
        out.contains(&format!(
            "sent={BIG_DATAGRAMS} received={BIG_DATAGRAMS} lost=0"
        )),
        "{mode:?} {dst}, 20000 bytes: {out}\n{}",
        passt.state(&log)
    );

    assert!(passt.running(), "passt exited:\n{}", passt.log());
    // Its counters, for the record (--nocapture): drops, lost notifications made up for.
    let state = passt.state(&log);
    eprintln!("{mode:?}: {state}");
    // The watchdog hides a lost wakeup of our own as a 100-200 ms stall: a guest without
    // barriers (QEMU 7.2 TCG) loses one notification in millions, so more than a few here
    // means ours are wrong.
    let late = late_notifications(&state);
    assert!(
        late <= 4,
        "{mode:?}: {late} lost notifications made up for:\n{state}"
    );
    assert!(guest.poweroff(Duration::from_secs(30)));
    for mut server in [dns, echo4, echo6] {
        common::process::kill_child(&mut server);
    }
}

#[test]
fn stream_guest_resolves_and_exchanges_datagrams() {
    dns_and_datagrams(Mode::Stream);
}

#[test]
fn vhost_user_guest_resolves_and_exchanges_datagrams() {
    dns_and_datagrams(Mode::VhostUser);
}

#[test]
fn late_notifications_are_read_from_a_state_dump() {
    let dump = "rx: RxStats { no_room: 3, late_kicks: 2, late_interrupts: 0 }, \
                tx: TxStats { late_kicks: 0, late_interrupts: 5 }";
    assert_eq!(late_notifications(dump), 7);
    assert_eq!(late_notifications("stream counters: StreamStats { }"), 0);
}
