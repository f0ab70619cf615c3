//! UDP translation, end to end: the real binary in stream mode in the test namespaces,
//! hand-built datagrams from the "guest", UDP servers in the peer namespace (the internet)
//! and on the host namespace's loopback.
//!
//! The servers are this test binary itself, re-run with only [`udp_server_helper`] selected
//! and its job in the environment: it answers each datagram (see [`serve`]) and prints
//! a marker line (`udp-server-ready`) once its sockets are bound, which the tests wait for.

mod common;

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::frames::{self, parse_icmp_error, parse_udp, udp_frame, SeenUdp, StreamClient};
use common::netns::{self, Topology};
use common::passt::{Passt, Ready};
use smoltcp::wire::{DhcpMessageType, DhcpPacket, DhcpRepr, IpProtocol, Ipv4Packet, UdpPacket};

const T: Duration = Duration::from_secs(20);
const SERVER_ENV: &str = "PASST_RS_UDP_SERVER";
const TAG_ENV: &str = "PASST_RS_UDP_TAG";

fn ours() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_passt"))
}

fn start(topo: &Topology, extra: &[&str]) -> (Passt, StreamClient) {
    let sock = topo.dir().join("passt.socket");
    let mut args = vec!["--one-off", "-s", sock.to_str().unwrap()];
    args.extend_from_slice(extra);
    let passt = Passt::start(topo, &ours(), &args, Ready::Daemon);
    let c = StreamClient::connect(&sock);
    (passt, c)
}

fn sa(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

const GUEST4: Ipv4Addr = netns::HOST_V4;
const GUEST6: Ipv6Addr = netns::HOST_V6;
const REMOTE4: Ipv4Addr = netns::REMOTE_V4;
const REMOTE6: Ipv6Addr = netns::REMOTE_V6;
/// A second "internet" address of the peer, for one guest port talking to two servers.
const REMOTE4_B: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
/// The guest's IPv6 router: the host's link-local default gateway.
const GW6: Ipv6Addr = netns::PEER_LL;

/// What a server answers:
/// - `WHO`: "<tag><source address of the datagram>"
/// - `BIG <n>`: n bytes, byte i being i % 251
/// - `BURST <n> <first>`: n datagrams, each the 8-byte big-endian sequence number
/// - `MIXED <n>`: n datagrams back to back, of the sizes [`mixed`] gives
/// - anything else: "<tag>" + the datagram.
fn serve(sock: UdpSocket, tag: &str) {
    let mut buf = vec![0u8; 65536];
    loop {
        let Ok((n, from)) = sock.recv_from(&mut buf) else {
            continue;
        };
        let msg = &buf[..n];
        let text = std::str::from_utf8(msg).unwrap_or("");
        let mut words = text.split(' ');
        match words.next() {
            Some("WHO") => {
                let _ = sock.send_to(format!("{tag}{from}").as_bytes(), from);
            }
            Some("BIG") => {
                let len: usize = words.next().and_then(|w| w.parse().ok()).unwrap_or(0);
                let big: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
                let _ = sock.send_to(&big, from);
            }
            Some("MIXED") => {
                let n: u64 = words.next().and_then(|w| w.parse().ok()).unwrap_or(0);
                for k in 0..n {
                    let _ = sock.send_to(&mixed(k), from);
                }
            }
            Some("BURST") => {
                let n: u64 = words.next().and_then(|w| w.parse().ok()).unwrap_or(0);
                let first: u64 = words.next().and_then(|w| w.parse().ok()).unwrap_or(0);
                for i in first..first + n {
                    let _ = sock.send_to(&i.to_be_bytes(), from);
                }
            }
            _ => {
                let mut reply = tag.as_bytes().to_vec();
                reply.extend_from_slice(msg);
                let _ = sock.send_to(&reply, from);
            }
        }
    }
}

/// Datagram `k` of a `MIXED` burst: its number (8 bytes) then a pattern, in sizes that
/// keep changing, up and down, across whatever size a batch of datagrams was sized for.
fn mixed(k: u64) -> Vec<u8> {
    const SIZES: [usize; 12] = [8, 1400, 100, 3000, 8, 1400, 1400, 700, 9000, 50, 1401, 200];
    let len = SIZES[(k % SIZES.len() as u64) as usize];
    let mut d = k.to_be_bytes().to_vec();
    d.extend((8..len).map(|i| (i as u64 + k) as u8));
    d
}

/// Not a test: the UDP server, when run by [`server`] (does nothing otherwise).
#[test]
fn udp_server_helper() {
    let Ok(addrs) = std::env::var(SERVER_ENV) else {
        return;
    };
    let tag = std::env::var(TAG_ENV).unwrap_or_default();
    let socks: Vec<UdpSocket> = addrs
        .split(',')
        .map(|a| UdpSocket::bind(a).unwrap_or_else(|e| panic!("bind {a}: {e}")))
        .collect();
    println!("\nudp-server-ready");
    let threads: Vec<_> = socks
        .into_iter()
        .map(|s| {
            let tag = tag.clone();
            std::thread::spawn(move || serve(s, &tag))
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
}

enum Side {
    Host,
    Peer,
}

/// Starts a UDP server on `addrs` in a namespace; returns once its sockets are bound. It is
/// killed with the topology.
fn server(topo: &Topology, side: Side, addrs: &[SocketAddr], tag: &str) {
    let list: Vec<String> = addrs.iter().map(ToString::to_string).collect();
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "udp_server_helper",
        "--exact",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(SERVER_ENV, list.join(","))
    .env(TAG_ENV, tag)
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit());
    let mut child = match side {
        Side::Host => topo.spawn_host(cmd),
        Side::Peer => topo.spawn_peer(cmd),
    };
    let out = child.stdout.take().unwrap();
    for line in BufReader::new(out).lines() {
        match line {
            Ok(l) if l.trim_end().ends_with("udp-server-ready") => return,
            Ok(_) => {}
            Err(e) => panic!("server on {list:?}: {e}"),
        }
    }
    panic!("server on {list:?} exited before it was ready");
}

/// The next UDP datagram to the guest (other frames, like router advertisements, skipped).
fn expect_udp(c: &mut StreamClient, what: &str) -> SeenUdp {
    c.expect(T, what, parse_udp)
}

/// Sends `payload` from `from` to `to` and returns the answer, checking its addresses.
fn exchange(c: &mut StreamClient, from: SocketAddr, to: SocketAddr, payload: &[u8]) -> Vec<u8> {
    c.send(&udp_frame(from, to, payload, false));
    let r = expect_udp(c, &format!("answer from {to}"));
    assert_eq!((r.src, r.dst), (to, from), "reply addresses");
    r.payload
}

fn peer_echo(topo: &Topology, port: u16) {
    server(
        topo,
        Side::Peer,
        &[sa(REMOTE4, port), sa(REMOTE6, port)],
        "",
    );
}

#[test]
fn exchanges_over_ipv4_and_ipv6_keep_the_source_port() {
    let topo = Topology::new();
    peer_echo(&topo, 7000);
    let (_passt, mut c) = start(&topo, &[]);
    for (guest, remote) in [
        (sa(GUEST4, 40000), sa(REMOTE4, 7000)),
        (sa(GUEST6, 40001), sa(REMOTE6, 7000)),
    ] {
        assert_eq!(exchange(&mut c, guest, remote, b"hello"), b"hello");
        // The server saw the guest's own port, from the host's address.
        let who = exchange(&mut c, guest, remote, b"WHO");
        assert_eq!(String::from_utf8(who).unwrap(), guest.to_string());
    }
}

#[test]
fn zero_length_checksum_zero_and_bad_checksum() {
    let topo = Topology::new();
    peer_echo(&topo, 7000);
    let (_passt, mut c) = start(&topo, &[]);
    let (g4, r4) = (sa(GUEST4, 40010), sa(REMOTE4, 7000));
    let (g6, r6) = (sa(GUEST6, 40010), sa(REMOTE6, 7000));
    assert_eq!(exchange(&mut c, g4, r4, b""), b"");
    assert_eq!(exchange(&mut c, g6, r6, b""), b"");
    // No checksum (zero) is fine over IPv4.
    c.send(&udp_frame(g4, r4, b"no checksum", true));
    assert_eq!(expect_udp(&mut c, "echo").payload, b"no checksum");
    c.send(&udp_frame(g4, r4, b"", true));
    assert_eq!(expect_udp(&mut c, "empty echo").payload, b"");
    // Bad checksums are dropped: the next answer is the good datagram's.
    let mut bad = udp_frame(g4, r4, b"corrupt", false);
    let last = bad.len() - 1;
    bad[last] ^= 0x55;
    c.send(&bad);
    let mut bad6 = udp_frame(g6, r6, b"corrupt", false);
    let last = bad6.len() - 1;
    bad6[last] ^= 0x55;
    c.send(&bad6);
    // Over IPv6 zero is a bad checksum, not "none".
    c.send(&udp_frame(g6, r6, b"zero6", true));
    assert_eq!(exchange(&mut c, g4, r4, b"good"), b"good");
    assert_eq!(exchange(&mut c, g6, r6, b"good6"), b"good6");
}

/// The largest datagrams a stream-mode frame (65535 bytes) carries, both ways; a larger
/// answer is dropped without harming the flow.
#[test]
fn largest_datagrams_both_ways() {
    let topo = Topology::new();
    peer_echo(&topo, 7000);
    let (_passt, mut c) = start(&topo, &[]);
    for (guest, remote, max) in [
        (sa(GUEST4, 40020), sa(REMOTE4, 7000), 65535 - 14 - 20 - 8),
        (sa(GUEST6, 40020), sa(REMOTE6, 7000), 65535 - 14 - 40 - 8),
    ] {
        let big: Vec<u8> = (0..max).map(|i| (i % 251) as u8).collect();
        assert_eq!(exchange(&mut c, guest, remote, &big[7..]), big[7..]);
        let asked = exchange(&mut c, guest, remote, format!("BIG {max}").as_bytes());
        assert_eq!(asked.len(), max);
        assert_eq!(asked, big);
        // 65507 bytes: valid UDP over IPv4, too long for a stream frame.
        c.send(&udp_frame(guest, remote, b"BIG 65507", false));
        assert_eq!(exchange(&mut c, guest, remote, b"after"), b"after");
    }
}

#[test]
fn one_guest_port_talks_to_two_peers() {
    let topo = Topology::new();
    topo.peer_ok(&format!("ip addr add {REMOTE4_B}/32 dev lo"));
    server(&topo, Side::Peer, &[sa(REMOTE4, 7000)], "A:");
    server(&topo, Side::Peer, &[sa(REMOTE4_B, 7000)], "B:");
    let (_passt, mut c) = start(&topo, &[]);
    let g = sa(GUEST4, 40030);
    for _ in 0..3 {
        assert_eq!(exchange(&mut c, g, sa(REMOTE4, 7000), b"x"), b"A:x");
        assert_eq!(exchange(&mut c, g, sa(REMOTE4_B, 7000), b"x"), b"B:x");
    }
    let who_a = exchange(&mut c, g, sa(REMOTE4, 7000), b"WHO");
    let who_b = exchange(&mut c, g, sa(REMOTE4_B, 7000), b"WHO");
    assert_eq!(String::from_utf8(who_a).unwrap(), format!("A:{g}"));
    assert_eq!(String::from_utf8(who_b).unwrap(), format!("B:{g}"));
}

/// To the gateway address: the host's loopback by default, the real gateway with
/// `--no-map-gw`.
#[test]
fn gateway_address_reaches_host_loopback() {
    let topo = Topology::new();
    server(
        &topo,
        Side::Host,
        &[sa(Ipv4Addr::LOCALHOST, 7100), sa(Ipv6Addr::LOCALHOST, 7100)],
        "host:",
    );
    server(&topo, Side::Peer, &[sa(netns::PEER_V4, 7100)], "gw:");
    {
        let (_passt, mut c) = start(&topo, &[]);
        let gw4 = sa(netns::PEER_V4, 7100);
        assert_eq!(exchange(&mut c, sa(GUEST4, 40040), gw4, b"hi"), b"host:hi");
        let gw6 = sa(GW6, 7100);
        assert_eq!(exchange(&mut c, sa(GUEST6, 40040), gw6, b"hi"), b"host:hi");
        // The guest's link-local address works as a source too.
        assert_eq!(
            exchange(&mut c, sa(frames::GUEST_LL, 40041), gw6, b"ll"),
            b"host:ll"
        );
    }
    let (_passt, mut c) = start(&topo, &["--no-map-gw"]);
    let gw4 = sa(netns::PEER_V4, 7100);
    assert_eq!(exchange(&mut c, sa(GUEST4, 40042), gw4, b"hi"), b"gw:hi");
}

fn dhcp_dns(c: &mut StreamClient) -> Vec<Ipv4Addr> {
    c.send(&frames::dhcp_discover(0x0bad_cafe));
    c.expect(T, "DHCPOFFER", |f| {
        let ip = Ipv4Packet::new_checked(f.get(14..)?).ok()?;
        if ip.next_header() != IpProtocol::Udp {
            return None;
        }
        let udp = UdpPacket::new_checked(ip.payload()).ok()?;
        if udp.src_port() != 67 {
            return None;
        }
        let dhcp = DhcpPacket::new_checked(udp.payload()).ok()?;
        let repr = DhcpRepr::parse(&dhcp).ok()?;
        (repr.message_type == DhcpMessageType::Offer)
            .then(|| repr.dns_servers.map(|d| d.to_vec()).unwrap_or_default())
    })
}

/// `--dns-forward`: queries to the given address go to resolv.conf's first resolver
/// (198.51.100.53, in the peer), answers come back from the address; DHCP advertises it.
#[test]
fn dns_forward_to_the_first_resolver() {
    let topo = Topology::new();
    topo.peer_ok(&format!("ip addr add {}/32 dev lo", netns::DNS_V4));
    server(&topo, Side::Peer, &[sa(netns::DNS_V4, 53)], "resolver:");
    let fwd = Ipv4Addr::new(192, 0, 2, 53);
    let (_passt, mut c) = start(&topo, &["--dns-forward", &fwd.to_string()]);
    assert_eq!(dhcp_dns(&mut c), vec![fwd]);
    assert_eq!(
        exchange(&mut c, sa(GUEST4, 40050), sa(fwd, 53), b"query"),
        b"resolver:query"
    );
}

/// The same over IPv6: the resolver is resolv.conf's first IPv6 one, and the DHCPv6 reply
/// advertises the forwarding address.
#[test]
fn dns_forward_over_ipv6() {
    let topo = Topology::new();
    // nodad: never tentative, so the server can bind it at once.
    topo.peer_ok(&format!("ip addr add {}/128 dev lo nodad", netns::DNS_V6));
    server(&topo, Side::Peer, &[sa(netns::DNS_V6, 53)], "resolver6:");
    let fwd: Ipv6Addr = "2001:db8::53".parse().unwrap();
    let (_passt, mut c) = start(&topo, &["--dns-forward", &fwd.to_string()]);
    c.send(&frames::dhcpv6_solicit([4, 5, 6]));
    let dns = c.expect(T, "DHCPv6 reply", |f| {
        let d = parse_udp(f)?;
        (d.src.port() == 547).then(|| dhcpv6_dns(&d.payload[4..]))
    });
    assert_eq!(dns, vec![fwd]);
    assert_eq!(
        exchange(&mut c, sa(GUEST6, 40051), sa(fwd, 53), b"query6"),
        b"resolver6:query6"
    );
}

/// Addresses in the DNS Recursive Name Server option (23) of DHCPv6 options.
fn dhcpv6_dns(mut opts: &[u8]) -> Vec<Ipv6Addr> {
    while opts.len() >= 4 {
        let code = u16::from_be_bytes([opts[0], opts[1]]);
        let len = usize::from(u16::from_be_bytes([opts[2], opts[3]]));
        let Some(body) = opts.get(4..4 + len) else {
            break;
        };
        if code == 23 {
            return body
                .chunks_exact(16)
                .map(|a| Ipv6Addr::from(<[u8; 16]>::try_from(a).unwrap()))
                .collect();
        }
        opts = &opts[4 + len..];
    }
    Vec::new()
}

/// A loopback resolver in resolv.conf (as systemd-resolved's 127.0.0.53) is advertised as
/// the gateway address, and queries to that address's port 53 reach it.
#[test]
fn loopback_resolver_is_reached_through_the_gateway() {
    let topo = Topology::new();
    // The topology's resolv.conf is bind-mounted over /etc/resolv.conf: rewrite it.
    std::fs::write(
        topo.dir().join("resolv.conf"),
        "nameserver 127.0.0.53\nsearch example.test\n",
    )
    .unwrap();
    server(
        &topo,
        Side::Host,
        &[sa(Ipv4Addr::new(127, 0, 0, 53), 53)],
        "stub:",
    );
    let (_passt, mut c) = start(&topo, &[]);
    assert_eq!(dhcp_dns(&mut c), vec![netns::PEER_V4]);
    assert_eq!(
        exchange(&mut c, sa(GUEST4, 40060), sa(netns::PEER_V4, 53), b"query"),
        b"stub:query"
    );
}

#[test]
fn port_unreachable_becomes_an_icmp_error() {
    let topo = Topology::new();
    let (_passt, mut c) = start(&topo, &[]);
    for (guest, remote, want) in [
        (sa(GUEST4, 40070), sa(REMOTE4, 7999), (3, 3)),
        (sa(GUEST6, 40070), sa(REMOTE6, 7999), (1, 4)),
    ] {
        c.send(&udp_frame(guest, remote, b"anyone?", false));
        let e = c.expect(T, "ICMP port unreachable", parse_icmp_error);
        assert_eq!((e.icmp_type, e.code), want);
        assert_eq!(e.from, remote.ip());
        assert_eq!((e.quoted_src, e.quoted_dst), (guest, remote));
    }
}

const COUNT: u64 = 10_000;
const WINDOW: u64 = 100;

/// Collects the sequence numbers of `n` datagrams; the ones not seen in time are lost.
fn collect_window(c: &mut StreamClient, first: u64, n: u64) -> u64 {
    let mut seen = vec![false; n as usize];
    let mut got = 0;
    let deadline = Instant::now() + Duration::from_secs(5);
    while got < n {
        let Some(f) = c.recv_by(deadline) else {
            break;
        };
        let Some(d) = parse_udp(&f) else { continue };
        let Ok(b) = <[u8; 8]>::try_from(&d.payload[..]) else {
            continue;
        };
        let i = u64::from_be_bytes(b);
        if (first..first + n).contains(&i) && !seen[(i - first) as usize] {
            seen[(i - first) as usize] = true;
            got += 1;
        }
    }
    n - got
}

/// 10 000 numbered datagrams each way, paced by windows: the next window goes out once
/// the previous one is answered (or given up on, counting the loss).
#[test]
fn ten_thousand_datagrams_each_way_without_loss() {
    let topo = Topology::new();
    peer_echo(&topo, 7000);
    let (_passt, mut c) = start(&topo, &[]);
    let (g, r) = (sa(GUEST4, 40080), sa(REMOTE4, 7000));
    let mut lost_up = 0;
    for first in (0..COUNT).step_by(WINDOW as usize) {
        for i in first..first + WINDOW {
            c.send(&udp_frame(g, r, &i.to_be_bytes(), false));
        }
        lost_up += collect_window(&mut c, first, WINDOW);
    }
    let (g6, r6) = (sa(GUEST6, 40080), sa(REMOTE6, 7000));
    let mut lost_down = 0;
    for first in (0..COUNT).step_by(WINDOW as usize) {
        let ask = format!("BURST {WINDOW} {first}");
        c.send(&udp_frame(g6, r6, ask.as_bytes(), false));
        lost_down += collect_window(&mut c, first, WINDOW);
    }
    assert_eq!(
        (lost_up, lost_down),
        (0, 0),
        "datagrams lost (guest to peer, peer to guest)"
    );
}

/// `-u 5353:53`: datagrams to the forwarded host port reach the guest's port 53 from the
/// client as the guest sees it (host loopback and the host's own address appear as the
/// gateway, other clients as themselves), and the guest's answers reach the client from
/// the forwarded port.
#[test]
fn forwarded_port_reaches_the_guest_and_answers_return() {
    let topo = Topology::new();
    let (_passt, mut c) = start(&topo, &["-u", "5353:53"]);
    // Datagrams that arrive while no guest is attached have nowhere to go: wait for the
    // router advertisement passt sends when it takes the guest's connection.
    c.expect(T, "router advertisement", |f| {
        (f.len() > 54 && f[12..14] == [0x86, 0xdd] && f[20] == 58 && f[54] == 134).then_some(())
    });
    let gtool = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/gtool/release/gtool");
    for (side, dst, from, seen_from) in [
        (
            Side::Host,
            sa(Ipv4Addr::LOCALHOST, 5353),
            None,
            IpAddr::V4(netns::PEER_V4),
        ),
        (
            Side::Host,
            sa(Ipv6Addr::LOCALHOST, 5353),
            None,
            IpAddr::V6(GW6),
        ),
        (
            Side::Host,
            sa(GUEST4, 5353),
            None,
            IpAddr::V4(netns::PEER_V4),
        ),
        (
            Side::Peer,
            sa(GUEST4, 5353),
            Some(IpAddr::V4(REMOTE4)),
            IpAddr::V4(REMOTE4),
        ),
        (
            Side::Peer,
            sa(GUEST6, 5353),
            Some(IpAddr::V6(REMOTE6)),
            IpAddr::V6(REMOTE6),
        ),
    ] {
        let mut cmd = Command::new(&gtool);
        cmd.args(["udp-ask", &dst.to_string(), "question"]);
        if let Some(f) = from {
            cmd.arg(f.to_string());
        }
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let client = match side {
            Side::Host => topo.spawn_host(cmd),
            Side::Peer => topo.spawn_peer(cmd),
        };
        let q = expect_udp(&mut c, &format!("datagram forwarded from {dst}"));
        assert_eq!(q.payload, b"question");
        assert_eq!(q.src.ip(), seen_from, "source as the guest sees it ({dst})");
        let guest = if dst.is_ipv6() {
            IpAddr::V6(GUEST6)
        } else {
            IpAddr::V4(GUEST4)
        };
        assert_eq!(q.dst, sa(guest, 53));
        c.send(&udp_frame(q.dst, q.src, b"answer", false));
        let out = client.wait_with_output().expect("client");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains(&format!("from={dst} reply=answer")),
            "{dst}: {text} {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Bursts of datagrams of changing sizes towards the guest, queued in the flow's socket
/// before passt reads them (so they arrive in batches of several): every one arrives
/// whole, in order, over IPv4 and IPv6.
#[test]
fn bursts_of_mixed_sizes_arrive_whole_and_in_order() {
    let topo = Topology::new();
    peer_echo(&topo, 7000);
    let (_passt, mut c) = start(&topo, &[]);
    const N: u64 = 48;
    for (guest, remote) in [
        (sa(GUEST4, 40090), sa(REMOTE4, 7000)),
        (sa(GUEST6, 40090), sa(REMOTE6, 7000)),
    ] {
        for round in 0..5 {
            c.send(&udp_frame(
                guest,
                remote,
                format!("MIXED {N}").as_bytes(),
                false,
            ));
            for k in 0..N {
                let d = expect_udp(&mut c, &format!("datagram {k} of round {round}"));
                assert_eq!((d.src, d.dst), (remote, guest));
                assert!(
                    d.payload == mixed(k),
                    "round {round}, datagram {k}: {} bytes, number {:?}, want {} bytes",
                    d.payload.len(),
                    d.payload.get(..8),
                    mixed(k).len()
                );
            }
        }
    }
}

/// Datagrams of two flows interleaved in one write from the guest (one frame batch, sent
/// with one `sendmmsg` per flow): each flow's reach the server in order, as the echoes
/// show.
#[test]
fn interleaved_flows_in_one_batch_keep_their_order() {
    let topo = Topology::new();
    peer_echo(&topo, 7000);
    let (_passt, mut c) = start(&topo, &[]);
    let r = sa(REMOTE4, 7000);
    let flows = [sa(GUEST4, 40100), sa(GUEST4, 40101)];
    const N: u64 = 40;
    for round in 0..5u64 {
        let mut bytes = Vec::new();
        for i in 0..2 * N {
            let g = flows[(i % 2) as usize];
            let mut payload = (round * 1000 + i / 2).to_be_bytes().to_vec();
            payload.resize(8 + (i as usize * 37) % 1500, 0xab);
            let f = udp_frame(g, r, &payload, false);
            bytes.extend_from_slice(&(f.len() as u32).to_be_bytes());
            bytes.extend_from_slice(&f);
        }
        c.send_raw(&bytes);
        let mut next = [round * 1000; 2];
        for _ in 0..2 * N {
            let d = expect_udp(&mut c, "echo");
            let Some(f) = flows.iter().position(|&g| g == d.dst) else {
                panic!("echo to {}", d.dst);
            };
            let seq = u64::from_be_bytes(d.payload[..8].try_into().unwrap());
            assert_eq!(seq, next[f], "flow {f}: echoes out of order");
            next[f] += 1;
        }
    }
}
