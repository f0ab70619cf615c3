//! End to end in stream mode: a real guest kernel under QEMU (TCG) on passt-rs, in the test
//! namespaces. The guest configures itself from our DHCP and router advertisements and
//! reaches the peer namespace's "internet" addresses.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::checks::check_guest_network;
use common::guest::Guest;
use common::netns::Topology;
use common::passt::{Passt, Ready};

fn ours() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_passt"))
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

#[test]
fn guest_gets_the_hosts_ipv6_address_by_dhcpv6() {
    let _serial = common::serial();
    let topo = Topology::new();
    let (_passt, mut guest) = common::passt_and_guest(&topo, common::Mode::Stream, &["--one-off"]);
    // The link-local address must be usable before the client can send.
    let (status, seen) = guest.run(
        "i=0; while [ $i -lt 300 ]; do \
           ip -6 addr show dev eth0 scope link | grep -q 'inet6 fe80' && \
           ! ip -6 addr show dev eth0 | grep -q tentative && break; \
           i=$((i+1)); sleep 0.1; done; ip -6 addr show dev eth0",
        common::guest::CMD_TIMEOUT,
    );
    assert_eq!(status, 0, "{seen}");
    let out = guest.run_ok("gtool dhcpv6 eth0");
    eprintln!("guest DHCPv6: {out}");
    assert!(
        out.contains(&format!("address={}", common::netns::HOST_V6)),
        "{out}"
    );
    assert!(
        out.contains(&format!("dns={}", common::netns::DNS_V6)),
        "{out}"
    );
    assert!(
        out.contains(&format!("domain={}", common::netns::SEARCH)),
        "{out}"
    );
}
