//! Outbound TCP through the real binary in stream mode: the test plays the guest's TCP with
//! hand-built segments, `socat` in the peer namespace plays the remote server.

mod common;

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use common::frames::{self, tcp_flag as F, StreamClient, TcpSeg};
use common::netns::{self, Topology};
use common::output::Collector;
use common::passt::{Passt, Ready};
use common::tcp_guest::{pattern, socat, wait_child, Guest, T};

const MIB: usize = 1 << 20;

fn ours() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_passt"))
}

fn start(topo: &Topology) -> (Passt, StreamClient) {
    start_with(topo, &[])
}

fn start_with(topo: &Topology, extra: &[&str]) -> (Passt, StreamClient) {
    let sock = topo.dir().join("passt.socket");
    let mut args = vec!["-f", "-d", "-s", sock.to_str().unwrap(), "--one-off"];
    args.extend_from_slice(extra);
    // In the foreground with debug output, so tests can wait for what it logs.
    let passt = Passt::start(
        topo,
        &ours(),
        &args,
        Ready::Line("UNIX domain socket bound at".into()),
    );
    let c = StreamClient::connect(&sock);
    (passt, c)
}

fn pairs() -> [(IpAddr, IpAddr, &'static str); 2] {
    [
        (netns::HOST_V4.into(), netns::REMOTE_V4.into(), "TCP4"),
        (netns::HOST_V6.into(), netns::REMOTE_V6.into(), "TCP6"),
    ]
}

#[test]
fn one_mib_guest_to_peer_guest_fin_first() {
    let topo = Topology::new();
    let (passt, mut c) = start(&topo);
    let data = pattern(MIB, 1);
    let mut closed_at = 0;
    for (i, (src, dst, fam)) in pairs().into_iter().enumerate() {
        let file = topo.dir().join(format!("recv{i}.bin"));
        let (mut child, out) = socat(
            &topo,
            &[
                "-u",
                &format!("{fam}-LISTEN:5001,reuseaddr"),
                &format!("CREATE:{}", file.display()),
            ],
        );
        let mut g = Guest::connect(&mut c, src, dst, 40000 + i as u16, 5001)
            .unwrap_or_else(|s| panic!("connect: {s:?}\n{}", passt.log()));
        g.send_all(&data);
        g.send_fin();
        // The server closes its end once it has everything: FIN from the socket second.
        g.recv_until_fin(true);
        assert!(g.rx.is_empty());
        let st = wait_child(&mut child, "socat");
        assert!(st.success(), "socat: {}", out.text());
        let got = std::fs::read(&file).unwrap();
        assert_eq!(got.len(), data.len());
        assert!(got == data, "content differs ({fam})");
        // Both FINs exchanged and acknowledged: the flow is freed (slot 0 again each time).
        closed_at = passt
            .output()
            .wait_for(closed_at, "tcp: flow 0 closed", Instant::now() + T)
            .unwrap_or_else(|e| panic!("flow not freed ({e:?}):\n{}", passt.log()));
    }
}

#[test]
fn one_mib_peer_to_guest_socket_fin_first() {
    let topo = Topology::new();
    let (passt, mut c) = start(&topo);
    let data = pattern(MIB, 2);
    let file = topo.dir().join("send.bin");
    std::fs::write(&file, &data).unwrap();
    for (i, (src, dst, fam)) in pairs().into_iter().enumerate() {
        let (mut child, out) = socat(
            &topo,
            &[
                "-u",
                &format!("OPEN:{}", file.display()),
                &format!("{fam}-LISTEN:5002,reuseaddr"),
            ],
        );
        // socat -u with the listener second: it accepts, then writes the file and closes.
        let mut g = Guest::connect(&mut c, src, dst, 41000 + i as u16, 5002)
            .unwrap_or_else(|s| panic!("connect: {s:?}\n{}", passt.log()));
        g.recv_until_fin(false);
        assert_eq!(g.rx.len(), data.len());
        assert!(g.rx == data, "content differs ({fam})");
        g.send_fin();
        g.recv_until_fin(true);
        let st = wait_child(&mut child, "socat");
        assert!(st.success(), "socat: {}", out.text());
    }
}

#[test]
fn echo_both_ways_with_half_close() {
    let topo = Topology::new();
    let (passt, mut c) = start(&topo);
    let (mut child, out) = socat(&topo, &["TCP6-LISTEN:5003,reuseaddr", "EXEC:cat"]);
    let data = pattern(256 * 1024, 3);
    let mut g = Guest::connect(
        &mut c,
        netns::HOST_V6.into(),
        netns::REMOTE_V6.into(),
        42000,
        5003,
    )
    .unwrap_or_else(|s| panic!("connect: {s:?}\n{}", passt.log()));
    g.send_all(&data);
    g.send_fin();
    // cat sees end of input, echoes the rest and exits: its FIN comes after all the data.
    g.recv_until_fin(true);
    assert!(g.rx == data, "echo differs: {} bytes back", g.rx.len());
    let st = wait_child(&mut child, "socat");
    assert!(st.success(), "socat: {}", out.text());
}

#[test]
fn closed_port_gets_rst() {
    let topo = Topology::new();
    let (_passt, mut c) = start(&topo);
    for (i, (src, dst, _)) in pairs().into_iter().enumerate() {
        let r = Guest::connect(&mut c, src, dst, 43000 + i as u16, 9);
        let s = r.err().expect("connected to a closed port");
        assert_eq!(s.flags & F::RST, F::RST, "{s:?}");
    }
}

#[test]
fn guest_rst_resets_the_peer() {
    let topo = Topology::new();
    let (passt, mut c) = start(&topo);
    let (mut child, out) = socat(
        &topo,
        &["-u", "TCP4-LISTEN:5004,reuseaddr", "OPEN:/dev/null"],
    );
    let mut g = Guest::connect(
        &mut c,
        netns::HOST_V4.into(),
        netns::REMOTE_V4.into(),
        44000,
        5004,
    )
    .unwrap_or_else(|s| panic!("connect: {s:?}\n{}", passt.log()));
    g.send_all(b"some data first");
    let rst = g.seg(F::RST | F::ACK, g.snd_nxt, &[]);
    g.send(&rst);
    // socat reports the reset and exits (with status 0 all the same); its stderr may be
    // read after it exits, so wait on the text itself.
    out.wait_for(0, "Connection reset by peer", Instant::now() + T)
        .unwrap_or_else(|e| panic!("socat saw no reset ({e:?}): {}", out.text()));
    wait_child(&mut child, "socat");
    passt
        .output()
        .wait_for(0, "tcp: flow 0 reset", Instant::now() + T)
        .unwrap_or_else(|e| panic!("flow not reset ({e:?}):\n{}", passt.log()));
    // The flow is gone: anything more on it gets a RST back.
    let again = g.seg(F::ACK | F::PSH, g.snd_nxt, b"late");
    g.send(&again);
    let s = g.next(T).expect("no RST for a segment of a closed flow");
    assert_eq!(s.flags & F::RST, F::RST);
}

#[test]
fn peer_reset_reaches_the_guest_and_unknown_flows_get_rst() {
    let topo = Topology::new();
    let (passt, mut c) = start(&topo);
    // A segment for a connection that never existed.
    {
        let g = Guest {
            c: &mut c,
            src: netns::HOST_V4.into(),
            dst: netns::REMOTE_V4.into(),
            sport: 45001,
            dport: 5005,
            snd_una: 1,
            snd_nxt: 1,
            rcv_nxt: 1,
            peer_wnd: 0,
            peer_ws: 0,
            peer_mss: 536,
            fin_rcvd: false,
            rst_rcvd: false,
            rx: vec![],
        };
        let mut g = g;
        let s = g.seg(F::ACK, 1234, b"x");
        g.send(&s);
        let r = g.next(T).expect("no RST for an unknown flow");
        assert_eq!((r.flags, r.seq), (F::RST, 1), "{r:?}");
    }
    // socat sends an empty file and closes with SO_LINGER 0: its close is a RST.
    let (_child, _out) = socat(
        &topo,
        &[
            "-u",
            "OPEN:/dev/null",
            "TCP4-LISTEN:5005,reuseaddr,linger=0",
        ],
    );
    // The reset may come before or after the SYN-ACK, as the kernel reports it.
    match Guest::connect(
        &mut c,
        netns::HOST_V4.into(),
        netns::REMOTE_V4.into(),
        45000,
        5005,
    ) {
        Err(s) => assert_eq!(s.flags & F::RST, F::RST, "{s:?}\n{}", passt.log()),
        Ok(mut g) => {
            let deadline = Instant::now() + T;
            while !g.rst_rcvd {
                assert!(Instant::now() < deadline, "no RST after the peer reset");
                if let Some(s) = g.next(T) {
                    g.handle(&s);
                }
            }
        }
    }
}

/// The next SYN passt sends the guest for `dport`, skipping anything else.
fn wait_syn(c: &mut StreamClient, dport: u16) -> TcpSeg {
    let deadline = Instant::now() + T;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let f = c.try_recv(left).expect("no SYN for the guest");
        if let Some(s) = frames::parse_tcp(&f) {
            if s.flags & F::SYN != 0 && s.dport == dport {
                return s;
            }
        }
    }
}

/// A `socat` client in the host (`host`) or peer namespace: sends `data`, half-closes,
/// prints what comes back.
fn socat_client(topo: &Topology, host: bool, target: &str, data: &[u8]) -> Child {
    use std::io::Write;
    let mut cmd = Command::new("socat");
    cmd.args(["-t", "30", "STDIO", target])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut child = if host {
        topo.spawn_host(cmd)
    } else {
        topo.spawn_peer(cmd)
    };
    let mut stdin = child.stdin.take().expect("piped stdin");
    stdin.write_all(data).unwrap();
    drop(stdin);
    child
}

/// Inbound connections on `-t 8080:80`: clients in the host namespace (loopback and the
/// host's address) and in the peer namespace reach the guest's port 80 from the address
/// the guest should see; data both ways, half-closes both ways, flows freed.
#[test]
fn inbound_forwarded_port_reaches_the_guest_from_the_right_source() {
    use std::io::Read;
    let topo = Topology::new();
    let (passt, mut c) = start_with(&topo, &["-t", "8080:80"]);
    let gw4: IpAddr = netns::PEER_V4.into();
    let gw6: IpAddr = netns::PEER_LL.into();
    let cases: [(bool, String, IpAddr, IpAddr); 6] = [
        (
            true,
            "TCP4:127.0.0.1:8080".into(),
            gw4,
            netns::HOST_V4.into(),
        ),
        (
            true,
            format!("TCP4:{}:8080", netns::HOST_V4),
            gw4,
            netns::HOST_V4.into(),
        ),
        (true, "TCP6:[::1]:8080".into(), gw6, netns::HOST_V6.into()),
        (
            false,
            format!("TCP4:{}:8080,bind={}", netns::HOST_V4, netns::REMOTE_V4),
            netns::REMOTE_V4.into(),
            netns::HOST_V4.into(),
        ),
        (
            false,
            format!("TCP6:[{}]:8080,bind=[{}]", netns::HOST_V6, netns::REMOTE_V6),
            netns::REMOTE_V6.into(),
            netns::HOST_V6.into(),
        ),
        (
            true,
            "TCP4:127.0.0.1:8080".into(),
            gw4,
            netns::HOST_V4.into(),
        ),
    ];
    let mut closed_at = 0;
    for (i, (host, target, want_src, want_dst)) in cases.into_iter().enumerate() {
        let up = pattern(100_000 + i, 10 + i as u8);
        let down = pattern(200_000 + i, 20 + i as u8);
        let mut client = socat_client(&topo, host, &target, &up);
        // Drained as it comes, or the pipe fills and stalls the download.
        let mut stdout = client.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            stdout.read_to_end(&mut got).map(|_| got)
        });
        let syn = wait_syn(&mut c, 80);
        assert_eq!((syn.src, syn.dst), (want_src, want_dst), "{target}");
        let mut g = Guest::accept(&mut c, &syn);
        // The client's data, then its FIN (stdin closed).
        g.recv_until_fin(false);
        assert!(
            g.rx == up,
            "{target}: {} of {} bytes up",
            g.rx.len(),
            up.len()
        );
        g.send_all(&down);
        g.send_fin();
        g.recv_until_fin(true);
        let got = reader.join().unwrap().unwrap();
        assert!(
            got == down,
            "{target}: {} of {} bytes down",
            got.len(),
            down.len()
        );
        let st = wait_child(&mut client, "socat client");
        assert!(st.success(), "{target}");
        closed_at = passt
            .output()
            .wait_for(closed_at, "closed", Instant::now() + T)
            .unwrap_or_else(|e| panic!("flow not freed ({e:?}):\n{}", passt.log()));
    }
}

/// The guest refuses (RST) an inbound connection: the client sees a reset.
#[test]
fn inbound_refused_by_the_guest_resets_the_client() {
    let topo = Topology::new();
    let (passt, mut c) = start_with(&topo, &["-t", "127.0.0.1/8081"]);
    let (mut child, out) = {
        let mut cmd = Command::new("socat");
        cmd.args(["-d", "-d", "-u", "TCP4:127.0.0.1:8081", "OPEN:/dev/null"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = topo.spawn_host(cmd);
        let out = Collector::new(None);
        out.attach(child.stderr.take().unwrap());
        (child, out)
    };
    let syn = wait_syn(&mut c, 8081);
    let mut rst = syn.clone();
    std::mem::swap(&mut rst.src, &mut rst.dst);
    std::mem::swap(&mut rst.sport, &mut rst.dport);
    rst.flags = F::RST | F::ACK;
    rst.ack = syn.seq.wrapping_add(1);
    rst.seq = 0;
    rst.mss = None;
    rst.ws = None;
    c.send(&frames::tcp_frame(&rst));
    out.wait_for(0, "Connection reset by peer", Instant::now() + T)
        .unwrap_or_else(|e| panic!("client saw no reset ({e:?}): {}", out.text()));
    wait_child(&mut child, "socat");
    passt
        .output()
        .wait_for(0, "tcp: flow 0 reset", Instant::now() + T)
        .unwrap_or_else(|e| panic!("flow not reset ({e:?}):\n{}", passt.log()));
}

/// A port that can't be bound makes passt exit 1 with the option in its message.
#[test]
fn unbindable_forwarded_port_is_fatal() {
    let topo = Topology::new();
    let sock = topo.dir().join("passt.socket");
    let _busy = socat_listener_host(&topo, "TCP4-LISTEN:8082,bind=127.0.0.1");
    let out = topo.host_cmd(&format!(
        "{} -f -s {} -t 127.0.0.1/8082; echo exit=$?",
        ours().display(),
        sock.display()
    ));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("exit=1"), "{text}");
    assert!(
        text.contains("-t 127.0.0.1/8082") && text.contains("8082"),
        "{text}"
    );
    let out = topo.host_cmd(&format!(
        "{} -f -s {} -t 80-70; echo exit=$?",
        ours().display(),
        sock.display()
    ));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("exit=1") && text.contains("80-70"), "{text}");
}

/// `socat` listening in the host namespace, once it listens.
fn socat_listener_host(topo: &Topology, listen: &str) -> (Child, Collector) {
    let mut cmd = Command::new("socat");
    cmd.args(["-d", "-d", listen, "EXEC:cat"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = topo.spawn_host(cmd);
    let out = Collector::new(None);
    out.attach(child.stderr.take().expect("piped stderr"));
    out.wait_for(0, "listening on", Instant::now() + T)
        .unwrap_or_else(|e| panic!("socat didn't listen ({e:?}): {}", out.text()));
    (child, out)
}

/// The guest connects to the gateway address: that is the host's loopback, where an echo
/// server listens (IPv4 127.0.0.1, IPv6 ::1 through the router's link-local address).
#[test]
fn gateway_address_reaches_host_loopback() {
    let topo = Topology::new();
    let (passt, mut c) = start(&topo);
    let _s4 = socat_listener_host(&topo, "TCP4-LISTEN:5010,bind=127.0.0.1,reuseaddr,fork");
    let _s6 = socat_listener_host(&topo, "TCP6-LISTEN:5011,bind=[::1],reuseaddr,fork");
    let data = pattern(64 * 1024, 7);
    for (i, (src, dst, port)) in [
        (
            IpAddr::from(netns::HOST_V4),
            IpAddr::from(netns::PEER_V4),
            5010,
        ),
        (
            IpAddr::from(netns::HOST_V6),
            IpAddr::from(netns::PEER_LL),
            5011,
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let mut g = Guest::connect(&mut c, src, dst, 46000 + i as u16, port)
            .unwrap_or_else(|s| panic!("connect to {dst}: {s:?}\n{}", passt.log()));
        g.send_all(&data);
        g.send_fin();
        g.recv_until_fin(true);
        assert!(g.rx == data, "echo through {dst}: {} bytes", g.rx.len());
    }
}

/// `--map-guest-addr`: the given address stands for the host's address the guest was
/// given (its own, which shadows the host's), so the guest reaches a server bound there.
#[test]
fn mapped_guest_address_reaches_the_hosts_own_address() {
    let topo = Topology::new();
    let mapped = std::net::Ipv4Addr::new(192, 0, 2, 99);
    let (passt, mut c) = start_with(&topo, &["--map-guest-addr", &mapped.to_string()]);
    let _s = socat_listener_host(
        &topo,
        &format!("TCP4-LISTEN:5030,bind={},reuseaddr,fork", netns::HOST_V4),
    );
    let data = pattern(16 * 1024, 3);
    let mut g = Guest::connect(&mut c, netns::HOST_V4.into(), mapped.into(), 46100, 5030)
        .unwrap_or_else(|s| panic!("connect to {mapped}: {s:?}\n{}", passt.log()));
    g.send_all(&data);
    g.send_fin();
    g.recv_until_fin(true);
    assert!(g.rx == data, "echo through {mapped}: {} bytes", g.rx.len());
}

/// `-t all`: ports nobody uses are forwarded, a port already in use is skipped.
#[test]
fn all_forwards_free_ports_and_skips_used_ones() {
    let topo = Topology::new();
    let (_busy, _) = socat_listener_host(&topo, "TCP4-LISTEN:5020,bind=127.0.0.1");
    let (passt, mut c) = start_with(&topo, &["-t", "all"]);
    passt
        .output()
        .wait_for(0, "-t all: forwarding", Instant::now() + T)
        .unwrap_or_else(|e| panic!("no forwarding note ({e:?}):\n{}", passt.log()));
    // The port in use still answers from socat's echo, not through passt.
    let mut client = socat_client(&topo, true, "TCP4:127.0.0.1:5020", b"echo");
    let st = wait_child(&mut client, "socat client");
    assert!(st.success());
    // A free port reaches the guest.
    let mut client = socat_client(&topo, true, "TCP4:127.0.0.1:1234", b"x");
    let syn = wait_syn(&mut c, 1234);
    let _ = client.kill();
    let _ = client.wait();
    assert_eq!(syn.src, IpAddr::from(netns::PEER_V4));
    assert!(
        !passt.log().contains(":5020 "),
        "port in use reached passt:\n{}",
        passt.log()
    );
}
