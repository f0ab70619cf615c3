//! End to end in stream mode: a real guest kernel under QEMU (TCG) on passt-rs, in the test
//! namespaces. The guest configures itself from our DHCP and router advertisements and
//! reaches the peer namespace's "internet" addresses.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::guest::{Guest, CMD_TIMEOUT};
use common::netns::*;
use common::passt::{Passt, Ready};

fn ours() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_passt"))
}

/// What the guest must see on a link served by passt-rs in the test topology: the host
/// namespace's address, gateway, DNS and search list over DHCP; the host's IPv6 prefix by
/// SLAAC with us as default router; echo to the peer's addresses.
pub fn check_guest_network(guest: &mut Guest) {
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
    let mtu = guest.run_ok("cat /sys/class/net/eth0/mtu");
    eprintln!("guest: {addr}\n{route}\n{resolv}\nmtu {mtu}");
    guest.run_ok(&format!("ping -c2 -W5 {REMOTE_V4}"));

    // SLAAC: wait (bounded, in the guest) for a global address from the advertisement.
    let (status, seen) = guest.run(
        "i=0; while [ $i -lt 300 ]; do \
           ip -6 addr show dev eth0 scope global | grep 'inet6 2001:db8::' | grep -qv tentative && break; \
           i=$((i+1)); sleep 0.1; done; \
         ip -6 addr show dev eth0; ip -6 route; \
         ip -6 addr show dev eth0 scope global | grep 'inet6 2001:db8::' | grep -qv tentative",
        CMD_TIMEOUT,
    );
    assert_eq!(status, 0, "no SLAAC address in 2001:db8::/64:\n{seen}");
    eprintln!("guest IPv6: {seen}");
    let route6 = guest.run_ok("ip -6 route show default");
    assert!(
        route6.contains("via fe80::1"),
        "default IPv6 route not via our link-local address: {route6}"
    );
    guest.run_ok(&format!("ping6 -c2 -W5 {REMOTE_V6}"));
}

#[test]
fn guest_configures_itself_and_pings_over_a_socket_path() {
    let _serial = common::serial();
    let topo = Topology::new();
    let sock = topo.dir().join("passt.socket");
    let passt = Passt::start(
        &topo,
        &ours(),
        &["--one-off", "-s", sock.to_str().unwrap()],
        Ready::Daemon,
    );
    let mut guest = Guest::boot(&["-netdev", &common::stream_netdev(&sock)]);
    eprintln!("guest booted in {:?}", guest.boot_time());
    check_guest_network(&mut guest);
    assert!(passt.running(), "passt exited:\n{}", passt.log());
    assert!(
        guest.poweroff(Duration::from_secs(30)),
        "guest did not power off"
    );
    // --one-off: QEMU leaving ends passt, which cleans up after itself.
    assert!(
        passt.wait_exit(Duration::from_secs(30)),
        "passt still running after QEMU left:\n{}",
        passt.log()
    );
    assert!(!sock.exists(), "socket left behind");
}

#[test]
fn guest_configures_itself_and_pings_over_an_inherited_socket() {
    use std::os::fd::AsRawFd;
    let _serial = common::serial();
    let topo = Topology::new();
    // QEMU and passt each get one end of a connected pair, as libvirt can arrange.
    let (ours_end, qemu_end) = std::os::unix::net::UnixStream::pair().unwrap();
    let fd = ours_end.as_raw_fd().to_string();
    let passt = Passt::start_inheriting(
        &topo,
        "passt",
        &ours(),
        &["--fd", &fd],
        Ready::Daemon,
        &[ours_end.as_raw_fd()],
    );
    drop(ours_end);
    let qfd = qemu_end.as_raw_fd();
    let netdev = format!(
        "stream,id={},addr.type=fd,addr.str={qfd}",
        common::guest::NETDEV_ID
    );
    let mut guest = Guest::builder()
        .netdev(&["-netdev", &netdev])
        .inherit_fd(qfd)
        .boot();
    drop(qemu_end);
    check_guest_network(&mut guest);
    assert!(
        guest.poweroff(Duration::from_secs(30)),
        "guest did not power off"
    );
    // With --fd there is no next client: QEMU leaving ends passt.
    assert!(
        passt.wait_exit(Duration::from_secs(30)),
        "passt still running after QEMU left:\n{}",
        passt.log()
    );
}
