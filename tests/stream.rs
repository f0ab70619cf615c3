//! The real binary in stream mode, in the test namespaces, driven with hand-built frames:
//! the start-up contract, the services' answers, echo to the peer, bad input.

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::frames::{self, StreamClient, OUR_MAC};
use common::netns::{self, Topology};
use common::passt::{Passt, Ready};
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, DhcpMessageType, DhcpPacket, DhcpRepr, EthernetFrame,
    EthernetProtocol, Icmpv6Packet, IpProtocol, Ipv4Packet, Ipv6Packet, NdiscRepr, UdpPacket,
};

const T: Duration = Duration::from_secs(20);

fn ours() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_passt"))
}

fn start(topo: &Topology, extra: &[&str]) -> (Passt, PathBuf) {
    let sock = topo.dir().join("passt.socket");
    let mut args = vec!["-s", sock.to_str().unwrap()];
    args.extend_from_slice(extra);
    (Passt::start(topo, &ours(), &args, Ready::Daemon), sock)
}

fn is_arp(frame: &[u8]) -> Option<()> {
    (EthernetFrame::new_checked(frame).ok()?.ethertype() == EthernetProtocol::Arp).then_some(())
}

fn ipv4_of(frame: &[u8]) -> Option<Ipv4Packet<&[u8]>> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    if eth.ethertype() != EthernetProtocol::Ipv4 {
        return None;
    }
    let ip = Ipv4Packet::new_checked(&frame[14..]).ok()?;
    assert!(ip.verify_checksum(), "IPv4 header checksum of {frame:02x?}");
    Some(ip)
}

fn ipv6_of(frame: &[u8]) -> Option<Ipv6Packet<&[u8]>> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    if eth.ethertype() != EthernetProtocol::Ipv6 {
        return None;
    }
    Ipv6Packet::new_checked(&frame[14..]).ok()
}

#[test]
fn startup_contract_one_off() {
    let topo = Topology::new();
    let (passt, sock) = start(&topo, &["--one-off"]);
    let pid_file = topo.dir().join("passt.pid");
    // The parent has exited 0 (Ready::Daemon checks it): socket and pid file are in place.
    assert!(sock.exists(), "socket missing after the parent exited");
    assert_eq!(
        std::fs::read_to_string(&pid_file).unwrap().trim(),
        passt.pid().to_string()
    );
    assert!(passt.running());
    let client = StreamClient::connect(&sock);
    drop(client);
    assert!(
        passt.wait_exit(T),
        "--one-off: still running after the client left\n{}",
        passt.log()
    );
    assert!(!sock.exists(), "socket left behind");
    assert!(!pid_file.exists(), "pid file left behind");
}

#[test]
fn sigterm_removes_socket_and_pid_file() {
    let topo = Topology::new();
    let (passt, sock) = start(&topo, &[]);
    // A client coming and going doesn't end it without --one-off.
    drop(StreamClient::connect(&sock));
    let mut again = StreamClient::connect(&sock);
    again.send(&frames::arp_request(netns::HOST_V4, netns::PEER_V4));
    again.expect(T, "ARP reply", is_arp);
    passt.signal(libc::SIGTERM);
    assert!(
        passt.wait_exit(T),
        "still running after SIGTERM\n{}",
        passt.log()
    );
    assert!(!sock.exists());
    assert!(!topo.dir().join("passt.pid").exists());
}

#[test]
fn errors_exit_1_naming_the_option() {
    for (args, needle) in [
        (&["--mtu", "99999"][..], "--mtu"),
        (&["--mac-addr", "nope"], "--mac-addr"),
        (&["--no-such-option"], "--no-such-option"),
        (
            &[
                "--pid",
                "/nonexistent/dir/p.pid",
                "-s",
                "/tmp/passt-rs-unused.sock",
            ],
            "--pid",
        ),
    ] {
        let out = Command::new(ours()).args(args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    let help = Command::new(ours()).arg("--help").output().unwrap();
    assert_eq!(help.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&help.stdout).contains("--vhost-user"));
    let caps = Command::new(ours())
        .arg("--print-capabilities")
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&caps.stdout).trim(),
        r#"{"type": "net"}"#
    );
}

#[test]
fn arp_and_dhcp_answer_with_the_hosts_configuration() {
    let topo = Topology::new();
    let (_passt, sock) = start(&topo, &["--one-off"]);
    let mut c = StreamClient::connect(&sock);

    c.send(&frames::arp_request(netns::HOST_V4, netns::PEER_V4));
    let sender = c.expect(T, "ARP reply", |f| {
        let eth = EthernetFrame::new_checked(f).ok()?;
        if eth.ethertype() != EthernetProtocol::Arp {
            return None;
        }
        assert!(f.len() >= 60, "frame not padded: {} bytes", f.len());
        match ArpRepr::parse(&ArpPacket::new_checked(eth.payload()).ok()?).ok()? {
            ArpRepr::EthernetIpv4 {
                operation: ArpOperation::Reply,
                source_hardware_addr,
                source_protocol_addr,
                ..
            } => Some((source_hardware_addr.0, source_protocol_addr)),
            _ => None,
        }
    });
    assert_eq!(sender, (OUR_MAC, netns::PEER_V4));

    c.send(&frames::dhcp_discover(0x1234_5678));
    let offer = c.expect(T, "DHCPOFFER", |f| {
        let ip = ipv4_of(f)?;
        if ip.next_header() != IpProtocol::Udp {
            return None;
        }
        let udp = UdpPacket::new_checked(ip.payload()).ok()?;
        assert!(udp.verify_checksum(&ip.src_addr().into(), &ip.dst_addr().into()));
        let dhcp = DhcpPacket::new_checked(udp.payload()).ok()?;
        let repr = DhcpRepr::parse(&dhcp).ok()?;
        (repr.message_type == DhcpMessageType::Offer).then(|| {
            (
                repr.transaction_id,
                repr.your_ip,
                repr.subnet_mask,
                repr.router,
                repr.dns_servers.map(|d| d.to_vec()),
            )
        })
    });
    assert_eq!(offer.0, 0x1234_5678);
    assert_eq!(offer.1, netns::HOST_V4);
    assert_eq!(offer.2, Some(Ipv4Addr::new(255, 255, 255, 0)));
    assert_eq!(offer.3, Some(netns::PEER_V4));
    assert_eq!(offer.4, Some(vec![netns::DNS_V4]));
}

#[test]
fn router_advertisement_and_dhcpv6() {
    let topo = Topology::new();
    let (_passt, sock) = start(&topo, &["--one-off"]);
    let mut c = StreamClient::connect(&sock);

    c.send(&frames::router_solicit());
    let prefix = c.expect(T, "router advertisement", |f| {
        let ip = ipv6_of(f)?;
        let icmp = Icmpv6Packet::new_checked(ip.payload()).ok()?;
        let repr = NdiscRepr::parse(&icmp).ok()?;
        match repr {
            NdiscRepr::RouterAdvert {
                prefix_info: Some(p),
                ..
            } => Some((p.prefix, p.prefix_len)),
            _ => None,
        }
    });
    assert_eq!(prefix, ("2001:db8::".parse().unwrap(), 64));

    c.send(&frames::dhcpv6_solicit([1, 2, 3]));
    let addr = c.expect(T, "DHCPv6 reply", |f| {
        let ip = ipv6_of(f)?;
        if ip.next_header() != IpProtocol::Udp {
            return None;
        }
        let udp = UdpPacket::new_checked(ip.payload()).ok()?;
        if udp.src_port() != 547 {
            return None;
        }
        assert!(udp.verify_checksum(&ip.src_addr().into(), &ip.dst_addr().into()));
        let m = udp.payload();
        assert_eq!(m[0], 7, "REPLY to a rapid-commit SOLICIT");
        assert_eq!(&m[1..4], &[1, 2, 3]);
        find_ia_addr(&m[4..])
    });
    assert_eq!(addr, netns::HOST_V6);
}

/// The address in the first IA_NA's IA Address option.
fn find_ia_addr(mut opts: &[u8]) -> Option<std::net::Ipv6Addr> {
    while opts.len() >= 4 {
        let code = u16::from_be_bytes([opts[0], opts[1]]);
        let len = u16::from_be_bytes([opts[2], opts[3]]) as usize;
        let body = opts.get(4..4 + len)?;
        if code == 3 && body.len() >= 12 {
            return find_ia_addr(&body[12..]);
        }
        if code == 5 && body.len() >= 16 {
            let mut a = [0u8; 16];
            a.copy_from_slice(&body[..16]);
            return Some(a.into());
        }
        opts = &opts[4 + len..];
    }
    None
}

#[test]
fn echo_to_the_peer_is_answered_with_the_guests_id() {
    let topo = Topology::new();
    let (_passt, sock) = start(&topo, &["--one-off"]);
    let mut c = StreamClient::connect(&sock);
    for (src, dst) in [
        (IpAddr::V4(netns::HOST_V4), IpAddr::V4(netns::REMOTE_V4)),
        (IpAddr::V6(netns::HOST_V6), IpAddr::V6(netns::REMOTE_V6)),
    ] {
        c.send(&frames::echo_request(
            src,
            dst,
            0x4242,
            7,
            b"passt-rs echo payload",
        ));
        let (id, seq, payload) = c.expect(T, &format!("echo reply from {dst}"), |f| {
            let (from, to, msg) = match dst {
                IpAddr::V4(_) => {
                    let ip = ipv4_of(f)?;
                    (ip.next_header() == IpProtocol::Icmp).then_some(())?;
                    (
                        IpAddr::V4(ip.src_addr()),
                        IpAddr::V4(ip.dst_addr()),
                        ip.payload().to_vec(),
                    )
                }
                IpAddr::V6(_) => {
                    let ip = ipv6_of(f)?;
                    (ip.next_header() == IpProtocol::Icmpv6 && ip.payload().first() == Some(&129))
                        .then_some(())?;
                    (
                        IpAddr::V6(ip.src_addr()),
                        IpAddr::V6(ip.dst_addr()),
                        ip.payload().to_vec(),
                    )
                }
            };
            assert_eq!((from, to), (dst, src));
            if msg[0] != 0 && msg[0] != 129 {
                return None;
            }
            Some((
                u16::from_be_bytes([msg[4], msg[5]]),
                u16::from_be_bytes([msg[6], msg[7]]),
                msg[8..].to_vec(),
            ))
        });
        assert_eq!((id, seq), (0x4242, 7));
        assert_eq!(payload, b"passt-rs echo payload");
    }
}

#[test]
fn bad_length_closes_only_that_connection() {
    let topo = Topology::new();
    let (passt, sock) = start(&topo, &[]);
    let mut c = StreamClient::connect(&sock);
    // One write: passt may close on the length alone, before a second write.
    c.send_raw(&[&5u32.to_be_bytes()[..], &[0u8; 5]].concat());
    assert!(
        c.closed_within(T),
        "connection not closed after a 5-byte frame length"
    );
    assert!(passt.running());
    // A second client while one is connected is turned away; the first keeps working.
    let mut good = StreamClient::connect(&sock);
    good.send(&frames::arp_request(netns::HOST_V4, netns::PEER_V4));
    good.expect(T, "ARP reply", is_arp);
    let mut second = StreamClient::connect(&sock);
    assert!(second.closed_within(T), "second client not rejected");
    good.send(&frames::arp_request(netns::HOST_V4, netns::PEER_V4));
    good.expect(T, "ARP reply", is_arp);
    // Partial frame across writes, then garbage frames: still alive, still answering.
    let frame = frames::arp_request(netns::HOST_V4, netns::PEER_V4);
    let mut bytes = (frame.len() as u32).to_be_bytes().to_vec();
    bytes.extend(&frame);
    good.send_raw(&bytes[..10]);
    good.send_raw(&bytes[10..]);
    good.expect(T, "ARP reply", is_arp);
    for len in [14usize, 20, 60, 1500] {
        good.send(&vec![0xa5; len]);
    }
    good.send(&frames::arp_request(netns::HOST_V4, netns::PEER_V4));
    good.expect(T, "ARP reply", is_arp);
    assert!(passt.running());
}
