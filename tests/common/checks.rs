//! Checks shared by end-to-end tests of every mode.

use super::guest::{Guest, CMD_TIMEOUT};
use super::netns::*;

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

/// SHA-256 of a file on the test host, as `sha256sum` prints it.
pub fn sha256(path: &std::path::Path) -> String {
    let out = std::process::Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// SHA-256 of a file in the guest.
pub fn guest_sha256(guest: &mut Guest, path: &str) -> String {
    let out = guest.run_ok(&format!("sha256sum {path}"));
    out.split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}
