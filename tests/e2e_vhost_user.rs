//! End to end in vhost-user mode: QEMU (TCG) maps its guest RAM into passt-rs, which reads
//! and writes frames in the guest's virtqueues. Same checks as in stream mode, plus an echo
//! whose reply spans many receive buffers, and a second QEMU on the same socket.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::checks::check_guest_network;
use common::guest::{Guest, NETDEV_ID};
use common::netns::*;
use common::passt::{Passt, Ready};

fn ours() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_passt"))
}

fn boot_vhost_user(sock: &Path) -> Guest {
    let chardev = format!("socket,id=c,path={}", sock.display());
    let netdev = format!("vhost-user,id={NETDEV_ID},chardev=c");
    Guest::builder()
        .netdev(&["-chardev", &chardev, "-netdev", &netdev])
        .device_opt("host_mtu=65520")
        .boot()
}

#[test]
fn guest_configures_itself_pings_and_reconnects() {
    let _serial = common::serial();
    let topo = Topology::new();
    let sock = topo.dir().join("passt.vu");
    let passt = Passt::start(
        &topo,
        &ours(),
        &["--vhost-user", "-s", sock.to_str().unwrap()],
        Ready::Daemon,
    );

    let mut guest = boot_vhost_user(&sock);
    eprintln!("guest booted in {:?}", guest.boot_time());
    check_guest_network(&mut guest);
    // One echo reply of ~30 kB: a single frame spread over several receive buffers.
    guest.run_ok(&format!("ping -c2 -W5 -s 30000 {REMOTE_V4}"));
    guest.run_ok(&format!("ping6 -c2 -W5 -s 30000 {REMOTE_V6}"));
    assert!(
        guest.poweroff(Duration::from_secs(30)),
        "guest did not power off"
    );
    drop(guest);

    // QEMU is gone; a second one connects to the same socket and works the same.
    assert!(
        passt.running(),
        "passt exited with the first QEMU:\n{}",
        passt.log()
    );
    let mut guest = boot_vhost_user(&sock);
    check_guest_network(&mut guest);
    assert!(
        guest.poweroff(Duration::from_secs(30)),
        "guest did not power off"
    );
    assert!(passt.running(), "passt exited:\n{}", passt.log());
}
