//! Host discovery against a real kernel, inside throw-away network namespaces.
//!
//! A test process has threads, so it can't `unshare(CLONE_NEWNET)` itself. Each outer test
//! therefore re-runs this test binary under `unshare -Urn` (new user and network namespace,
//! we're root in it) with only its `#[ignore]`d inner twin selected. The inner test sets the
//! namespace up with `ip` (veth pairs: the dummy driver isn't always loadable), runs
//! `discover` and asserts. Nothing it creates is visible outside, and the namespace goes away
//! with the process.
//!
//! The inner tests refuse to touch anything unless they are in the namespace the outer test
//! made: the environment variable is set and `lo` is the only interface.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::process::Command;

use passt::conf::netlink::{discover, DiscoverError};
use passt::conf::{Host4, Host6};

const INSIDE: &str = "PASST_RS_TEST_IN_NETNS";

/// Runs the inner test `name` in fresh namespaces; fails with its output unless it passed.
fn in_netns(name: &str) {
    let exe = std::env::current_exe().expect("test binary path");
    let out = Command::new("unshare")
        .args(["-Urn", "--"])
        .arg(exe)
        .args([
            "--exact",
            name,
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(INSIDE, "1")
        .output()
        .expect("running unshare (util-linux)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // "1 passed" also catches a name that selects nothing, which libtest counts as success.
    assert!(
        out.status.success() && stdout.contains("test result: ok. 1 passed"),
        "inner test {name} failed ({}); if unshare itself failed, user namespaces are \
         unavailable here\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        out.status
    );
}

/// Guards an inner test, then applies `setup`: one `ip` command line per entry.
fn set_up(setup: &[&str]) {
    assert_eq!(
        std::env::var(INSIDE).as_deref(),
        Ok("1"),
        "inner tests only run in the namespace their outer test makes"
    );
    let ifaces: Vec<String> = nix::net::if_::if_nameindex()
        .expect("if_nameindex")
        .iter()
        .map(|i| i.name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(ifaces, ["lo"], "not a fresh network namespace: refusing");
    run_ip("link set lo up");
    for cmd in setup {
        run_ip(cmd);
    }
    for what in ["addr", "route", "-6 route"] {
        let out = ip(what).output().expect("ip");
        println!("ip {what}:\n{}", String::from_utf8_lossy(&out.stdout));
    }
}

fn ip(args: &str) -> Command {
    // Non-root PATHs often lack /sbin.
    let bin = ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .unwrap_or("ip");
    let mut c = Command::new(bin);
    c.args(args.split_whitespace());
    c
}

fn run_ip(args: &str) {
    let out = ip(args).output().expect("running ip");
    assert!(
        out.status.success(),
        "ip {args}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn index(name: &str) -> u32 {
    nix::net::if_::if_nametoindex(name).expect("interface index")
}

fn v4(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn v6(s: &str) -> Ipv6Addr {
    s.parse().unwrap()
}

/// A veth pair `a`/`b`, both up, with no automatic link-local address (so none is ever
/// tentative: we add the ones we want with nodad).
fn veth(a: &str, b: &str) -> Vec<String> {
    vec![
        format!("link add {a} type veth peer name {b}"),
        format!("link set {a} addrgenmode none"),
        format!("link set {b} addrgenmode none"),
        format!("link set {a} up"),
        format!("link set {b} up"),
    ]
}

fn set_up_with(pairs: &[(&str, &str)], rest: &[&str]) {
    let mut cmds: Vec<String> = pairs.iter().flat_map(|(a, b)| veth(a, b)).collect();
    cmds.extend(rest.iter().map(|s| s.to_string()));
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    set_up(&cmds);
}

const BASIC: &[&str] = &[
    "addr add 192.0.2.2/24 dev v0",
    "-6 addr add fe80::2/64 dev v0 nodad",
    "-6 addr add 2001:db8::2/64 dev v0 nodad",
    // Added last so that it is dumped first: must be passed over for being deprecated.
    "-6 addr add 2001:db8::99/64 dev v0 nodad preferred_lft 0",
    "route add default via 192.0.2.1",
    "-6 route add default via fe80::1 dev v0",
];

#[test]
fn basic() {
    in_netns("inner_basic");
}

#[test]
#[ignore = "run by `basic` inside a network namespace"]
fn inner_basic() {
    set_up_with(&[("v0", "v1")], BASIC);
    let v0 = index("v0");
    let (h4, h6) = discover(None).unwrap();
    assert_eq!(
        h4,
        Some(Host4 {
            ifname: "v0".into(),
            ifindex: v0,
            addr: v4("192.0.2.2"),
            prefix_len: 24,
            gateway: v4("192.0.2.1"),
        })
    );
    assert_eq!(
        h6,
        Some(Host6 {
            ifname: "v0".into(),
            ifindex: v0,
            addr: v6("2001:db8::2"),
            prefix_len: 64,
            gateway: v6("fe80::1"),
            link_local: Some(v6("fe80::2")),
        })
    );
    // Same through the interface, by name.
    assert_eq!(discover(Some("v0")).unwrap(), (h4, h6));
    // The peer has no default route and no address: nothing through it.
    assert_eq!(discover(Some("v1")).unwrap(), (None, None));
    assert!(matches!(
        discover(Some("nope0")),
        Err(DiscoverError::NoSuchInterface(..))
    ));
}

#[test]
fn no_ipv6_route() {
    in_netns("inner_no_ipv6_route");
}

#[test]
#[ignore = "run by `no_ipv6_route` inside a network namespace"]
fn inner_no_ipv6_route() {
    set_up_with(
        &[("v0", "v1")],
        &[
            "addr add 192.0.2.2/24 dev v0",
            "-6 addr add 2001:db8::2/64 dev v0 nodad",
            "route add default via 192.0.2.1",
        ],
    );
    let (h4, h6) = discover(None).unwrap();
    assert_eq!(h4.map(|h| h.gateway), Some(v4("192.0.2.1")));
    assert_eq!(h6, None);
}

#[test]
fn lowest_metric_and_interface() {
    in_netns("inner_lowest_metric_and_interface");
}

#[test]
#[ignore = "run by `lowest_metric_and_interface` inside a network namespace"]
fn inner_lowest_metric_and_interface() {
    set_up_with(
        &[("v0", "v1"), ("w0", "w1")],
        &[
            "addr add 192.0.2.2/24 dev v0",
            "addr add 198.51.100.2/24 dev w0",
            "-6 addr add 2001:db8::2/64 dev v0 nodad",
            "-6 addr add 2001:db8:1::2/64 dev w0 nodad",
            // The higher metric is added first, so dump order alone can't pass the test.
            "route add default via 192.0.2.1 metric 200",
            "route add default via 198.51.100.1 metric 100",
            "-6 route add default via 2001:db8::1 metric 200",
            "-6 route add default via 2001:db8:1::1 metric 100",
        ],
    );
    let (h4, h6) = discover(None).unwrap();
    let (h4, h6) = (h4.unwrap(), h6.unwrap());
    assert_eq!(
        (h4.ifname.as_str(), h4.ifindex, h4.addr, h4.gateway),
        ("w0", index("w0"), v4("198.51.100.2"), v4("198.51.100.1"))
    );
    assert_eq!(
        (h6.ifname.as_str(), h6.addr, h6.gateway, h6.link_local),
        ("w0", v6("2001:db8:1::2"), v6("2001:db8:1::1"), None)
    );

    let (h4, h6) = discover(Some("v0")).unwrap();
    let (h4, h6) = (h4.unwrap(), h6.unwrap());
    assert_eq!(
        (h4.ifname.as_str(), h4.ifindex, h4.addr, h4.gateway),
        ("v0", index("v0"), v4("192.0.2.2"), v4("192.0.2.1"))
    );
    assert_eq!(
        (h6.ifname.as_str(), h6.addr, h6.gateway),
        ("v0", v6("2001:db8::2"), v6("2001:db8::1"))
    );
}

#[test]
fn multipath() {
    in_netns("inner_multipath");
}

#[test]
#[ignore = "run by `multipath` inside a network namespace"]
fn inner_multipath() {
    set_up_with(
        &[("v0", "v1"), ("w0", "w1")],
        &[
            "addr add 192.0.2.2/24 dev v0",
            "addr add 198.51.100.2/24 dev w0",
            "-6 addr add 2001:db8::2/64 dev v0 nodad",
            "-6 addr add 2001:db8:1::2/64 dev w0 nodad",
            "route add default nexthop via 198.51.100.1 dev w0 nexthop via 192.0.2.1 dev v0",
            "-6 route add default nexthop via 2001:db8:1::1 dev w0 nexthop via 2001:db8::1 dev v0",
        ],
    );
    let (h4, h6) = discover(None).unwrap();
    let (h4, h6) = (h4.unwrap(), h6.unwrap());
    assert_eq!((h4.ifname.as_str(), h4.gateway), ("w0", v4("198.51.100.1")));
    assert_eq!(
        (h6.ifname.as_str(), h6.gateway),
        ("w0", v6("2001:db8:1::1"))
    );
    let (h4, h6) = discover(Some("v0")).unwrap();
    let (h4, h6) = (h4.unwrap(), h6.unwrap());
    assert_eq!((h4.addr, h4.gateway), (v4("192.0.2.2"), v4("192.0.2.1")));
    assert_eq!(
        (h6.addr, h6.gateway),
        (v6("2001:db8::2"), v6("2001:db8::1"))
    );
}
