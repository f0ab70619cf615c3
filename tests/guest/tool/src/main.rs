//! `gtool`: network test commands run inside the test guest.
//!
//! - `gtool dhcpv6 IFACE`: one SOLICIT with Rapid Commit to ff02::1:2; prints `address=`,
//!   `dns=`, `domain=` lines from the REPLY (or ADVERTISE) and exits 0 if an address came.
//! - `gtool udp-echo PORT|ADDR:PORT`: echoes every datagram, forever.
//! - `gtool udp-exchange ADDR:PORT COUNT SIZE WINDOW`: sends COUNT numbered datagrams of
//!   SIZE bytes to an echo server, at most WINDOW unanswered at a time (paced by the echoes,
//!   not by a clock), and prints `sent= received= lost=`.
//! - `gtool udp-ask ADDR:PORT TEXT [SRC]`: sends TEXT (from address SRC), prints the first
//!   reply as text.
//! - `gtool udp-sink PORT COUNT`: receives numbered datagrams on PORT, answering each with
//!   its number, until COUNT distinct ones came or 10 s pass without any; prints
//!   `received= missing=`.
//! - `gtool dns-server ADDR:PORT NAME IPV4`: answers A queries for NAME with IPV4, other
//!   types for NAME with no data, other names with NXDOMAIN, forever. Runs on the test host too (static binary).

use std::collections::BTreeSet;
use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6, UdpSocket};
use std::process::ExitCode;
use std::time::Duration;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let r = match a.as_slice() {
        ["dhcpv6", iface] => dhcpv6(iface),
        ["udp-echo", port] => udp_echo(port),
        ["udp-exchange", dst, count, size, window] => udp_exchange(dst, count, size, window),
        ["udp-ask", dst, text] => udp_ask(dst, text, None),
        ["udp-ask", dst, text, from] => udp_ask(dst, text, Some(from)),
        ["udp-sink", port, count] => udp_sink(port, count),
        ["dns-server", bind, name, ip] => dns_server(bind, name, ip),
        _ => Err("usage: gtool dhcpv6 IFACE | udp-echo PORT|ADDR:PORT | udp-exchange ADDR:PORT COUNT SIZE WINDOW | udp-ask ADDR:PORT TEXT [SRC] | udp-sink PORT COUNT".into()),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gtool: {e}");
            ExitCode::FAILURE
        }
    }
}

type R = Result<(), String>;

fn num<T: std::str::FromStr>(s: &str, what: &str) -> Result<T, String> {
    s.parse().map_err(|_| format!("bad {what}: {s}"))
}

fn dhcpv6(iface: &str) -> R {
    let ifindex: u32 = std::fs::read_to_string(format!("/sys/class/net/{iface}/ifindex"))
        .map_err(|e| format!("{iface}: {e}"))?
        .trim()
        .parse()
        .map_err(|_| "ifindex".to_string())?;
    let mac = std::fs::read_to_string(format!("/sys/class/net/{iface}/address"))
        .map_err(|e| e.to_string())?;
    let mac: Vec<u8> = mac
        .trim()
        .split(':')
        .filter_map(|h| u8::from_str_radix(h, 16).ok())
        .collect();
    let sock = UdpSocket::bind(SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, 546, 0, 0))
        .map_err(|e| e.to_string())?;
    sock.set_read_timeout(Some(Duration::from_secs(3)))
        .map_err(|e| e.to_string())?;
    let xid = [0x47, 0x54, 0x4c];
    let mut m = vec![1, xid[0], xid[1], xid[2]];
    m.extend([0, 1, 0, 10, 0, 3, 0, 1]);
    m.extend(&mac);
    m.extend([0, 3, 0, 12, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0, 0]);
    m.extend([0, 14, 0, 0]);
    m.extend([0, 6, 0, 4, 0, 23, 0, 24]);
    let dst = SocketAddrV6::new("ff02::1:2".parse().expect("literal"), 547, 0, ifindex);
    let mut buf = [0u8; 1500];
    // The link-local address may still be tentative right after link-up: retry a few times.
    for _ in 0..10 {
        if let Err(e) = sock.send_to(&m, dst) {
            eprintln!("gtool: send: {e}");
            std::thread::sleep(Duration::from_millis(500));
            continue;
        }
        let Ok((n, _)) = sock.recv_from(&mut buf) else {
            continue;
        };
        let reply = &buf[..n];
        if n < 4 || reply[1..4] != xid || !(reply[0] == 7 || reply[0] == 2) {
            continue;
        }
        let mut got = false;
        walk(&reply[4..], &mut |code, body| match code {
            3 if body.len() >= 12 => walk(&body[12..], &mut |c, b| {
                if c == 5 && b.len() >= 16 {
                    let a: [u8; 16] = b[..16].try_into().expect("16 bytes");
                    println!("address={}", Ipv6Addr::from(a));
                    got = true;
                }
            }),
            23 => body.chunks_exact(16).for_each(|c| {
                let a: [u8; 16] = c.try_into().expect("16 bytes");
                println!("dns={}", Ipv6Addr::from(a));
            }),
            24 => println!("domain={}", dns_names(body).join(" ")),
            _ => {}
        });
        return if got {
            Ok(())
        } else {
            Err("reply without an address".into())
        };
    }
    Err("no DHCPv6 reply".into())
}

fn walk(mut opts: &[u8], f: &mut dyn FnMut(u16, &[u8])) {
    while opts.len() >= 4 {
        let code = u16::from_be_bytes([opts[0], opts[1]]);
        let len = u16::from_be_bytes([opts[2], opts[3]]) as usize;
        let Some(body) = opts.get(4..4 + len) else {
            return;
        };
        f(code, body);
        opts = &opts[4 + len..];
    }
}

fn dns_names(mut b: &[u8]) -> Vec<String> {
    let mut names = Vec::new();
    let mut cur: Vec<String> = Vec::new();
    while let Some((&l, rest)) = b.split_first() {
        if l == 0 {
            names.push(cur.join("."));
            cur.clear();
            b = rest;
            continue;
        }
        let Some(label) = rest.get(..l as usize) else {
            break;
        };
        cur.push(String::from_utf8_lossy(label).into_owned());
        b = &rest[l as usize..];
    }
    names
}

/// `PORT` (all addresses) or `ADDR:PORT`. A server with several addresses should bind one:
/// a wildcard socket answers from whatever address the route back picks, which a client's
/// connected socket (and passt-rs's flow socket) rightly ignores.
fn bind_addr(spec: &str) -> Result<SocketAddr, String> {
    match spec.parse::<u16>() {
        Ok(port) => Ok(SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, port, 0, 0).into()),
        Err(_) => num(spec, "address"),
    }
}

fn udp_echo(bind: &str) -> R {
    let bind = bind_addr(bind)?;
    let sock = UdpSocket::bind(bind).map_err(|e| e.to_string())?;
    println!("listening on {bind}");
    let mut buf = vec![0u8; 65536];
    loop {
        let (n, from) = sock.recv_from(&mut buf).map_err(|e| e.to_string())?;
        let _ = sock.send_to(&buf[..n], from);
    }
}

fn udp_exchange(dst: &str, count: &str, size: &str, window: &str) -> R {
    let dst: SocketAddr = num(dst, "address")?;
    let count: u64 = num(count, "count")?;
    let size: usize = num::<usize>(size, "size")?.max(8);
    let window: u64 = num::<u64>(window, "window")?.max(1);
    let bind: SocketAddr = if dst.is_ipv6() {
        "[::]:0".parse()
    } else {
        "0.0.0.0:0".parse()
    }
    .expect("literal");
    let sock = UdpSocket::bind(bind).map_err(|e| e.to_string())?;
    sock.connect(dst).map_err(|e| e.to_string())?;
    sock.set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    let mut out = vec![0u8; size];
    let mut buf = vec![0u8; 65536];
    let mut in_flight = BTreeSet::new();
    let (mut next, mut received, mut lost, mut silent) = (0u64, 0u64, 0u64, 0u32);
    loop {
        while next < count && (in_flight.len() as u64) < window {
            out[..8].copy_from_slice(&next.to_be_bytes());
            sock.send(&out).map_err(|e| format!("send: {e}"))?;
            in_flight.insert(next);
            next += 1;
        }
        if in_flight.is_empty() {
            break;
        }
        match sock.recv(&mut buf) {
            Ok(n) if n == size => {
                silent = 0;
                let k = u64::from_be_bytes(buf[..8].try_into().expect("8 bytes"));
                if in_flight.remove(&k) {
                    received += 1;
                }
            }
            Ok(n) => return Err(format!("echo of {n} bytes, sent {size}")),
            Err(_) => {
                // Whatever is still unanswered after 2 s of silence is lost.
                lost += in_flight.len() as u64;
                in_flight.clear();
                silent += 1;
                if silent > 5 {
                    lost += count - next;
                    break;
                }
            }
        }
    }
    println!("sent={next} received={received} lost={lost}");
    Ok(())
}

fn udp_ask(dst: &str, text: &str, from: Option<&str>) -> R {
    let dst: SocketAddr = num(dst, "address")?;
    let bind: SocketAddr = match from {
        Some(f) => SocketAddr::new(num(f, "source address")?, 0),
        None if dst.is_ipv6() => "[::]:0".parse().expect("literal"),
        None => "0.0.0.0:0".parse().expect("literal"),
    };
    let sock = UdpSocket::bind(bind).map_err(|e| e.to_string())?;
    sock.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    sock.send_to(text.as_bytes(), dst)
        .map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 65536];
    let (n, from) = sock
        .recv_from(&mut buf)
        .map_err(|e| format!("no reply: {e}"))?;
    println!("from={from} reply={}", String::from_utf8_lossy(&buf[..n]));
    Ok(())
}

fn udp_sink(port: &str, count: &str) -> R {
    let port: u16 = num(port, "port")?;
    let count: usize = num(count, "count")?;
    let sock = UdpSocket::bind(SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, port, 0, 0))
        .map_err(|e| e.to_string())?;
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    println!("listening on {port}");
    let mut buf = vec![0u8; 65536];
    let mut seen = BTreeSet::new();
    while seen.len() < count {
        let Ok((n, from)) = sock.recv_from(&mut buf) else {
            break;
        };
        if n >= 8 {
            seen.insert(u64::from_be_bytes(buf[..8].try_into().expect("8 bytes")));
            let _ = sock.send_to(&buf[..8], from);
        }
    }
    println!(
        "received={} missing={}",
        seen.len(),
        count.saturating_sub(seen.len())
    );
    Ok(())
}

fn dns_server(bind: &str, name: &str, ip: &str) -> R {
    let bind: SocketAddr = num(bind, "address")?;
    let ip: std::net::Ipv4Addr = num(ip, "IPv4 address")?;
    let sock = UdpSocket::bind(bind).map_err(|e| e.to_string())?;
    println!("listening on {bind}");
    let mut q = vec![0u8; 512];
    loop {
        let (n, from) = sock.recv_from(&mut q).map_err(|e| e.to_string())?;
        if n < 12 {
            continue;
        }
        // Question: QNAME labels, QTYPE, QCLASS right after the 12-byte header.
        let mut at = 12;
        let mut labels = Vec::new();
        while at < n && q[at] != 0 {
            let l = q[at] as usize;
            let Some(label) = q.get(at + 1..at + 1 + l) else {
                break;
            };
            labels.push(String::from_utf8_lossy(label).into_owned());
            at += 1 + l;
        }
        let qend = at + 5;
        if qend > n {
            continue;
        }
        let qtype = u16::from_be_bytes([q[at + 1], q[at + 2]]);
        let known = labels
            .join(".")
            .eq_ignore_ascii_case(name.trim_end_matches('.'));
        let hit = known && qtype == 1;
        let mut r = q[..qend].to_vec();
        r[2] = 0x84 | (q[2] & 0x01); // response, authoritative, RD copied
        r[3] = if known { 0x00 } else { 0x03 }; // NOERROR (maybe without data) or NXDOMAIN
        r[4..12].copy_from_slice(&[0, 1, 0, u8::from(hit), 0, 0, 0, 0]);
        if hit {
            r.extend([0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
            r.extend(ip.octets());
        }
        let _ = sock.send_to(&r, from);
    }
}
