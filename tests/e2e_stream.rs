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
