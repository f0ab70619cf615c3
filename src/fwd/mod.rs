//! Forwarding between the guest's view of addresses and ports and the host's: the `-t`/`-u`
//! specification ([`spec`]), the listening sockets it asks for ([`open_listeners`]), and the
//! address translation every layer-4 module applies ([`Nat`]).
//!
//! # Address translation
//! The guest has the host's own address and talks to the rest of the world through a
//! gateway address that is no real host of ours. Two rules make the host itself reachable
//! both ways without a second address:
//! - **Guest to host.** Traffic from the guest to the host-loopback address
//!   (`--map-host-loopback`, by default the gateway the guest was given) goes to the host's
//!   127.0.0.1 or ::1, same port ([`Nat::guest_to_host_dst`]).
//! - **Host to guest.** A connection accepted on a forwarded port comes from a real client
//!   address, which the guest sees as is, except when that client is the host itself
//!   (a loopback address, or the host's address, which the guest has too): the guest could
//!   not answer that, so it sees the host-loopback address instead, or the gateway if there
//!   is none ([`Nat::host_to_guest_src`]).

pub mod spec;

use crate::sys::{cvt, setsockopt_int};
use std::io;
use std::mem::size_of;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use crate::conf::NetConfig;
use spec::PortFwd;

/// The addresses translation needs, from the configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Nat {
    /// The guest's addresses as configured (the host's, by default). `None`: the family
    /// is off.
    pub guest4: Option<Ipv4Addr>,
    pub guest6: Option<Ipv6Addr>,
    /// The addresses the guest actually uses, once seen ([`Self::guest_addr_seen`]): a
    /// SLAAC guest makes its own IPv6 address. Inbound connections go there.
    pub seen4: Option<Ipv4Addr>,
    pub seen6: Option<Ipv6Addr>,
    /// The guest's link-local address, once seen: where traffic from a link-local source
    /// (the mapped host loopback, by default) goes, so the guest answers from the same
    /// scope. A server on a wildcard socket picks its source address by the route to the
    /// client, which for a link-local client is its link-local address.
    pub seen_ll6: Option<Ipv6Addr>,
    /// The gateway as the guest knows it (IPv6: our link-local router address).
    pub gw4: Option<Ipv4Addr>,
    pub gw6: Option<Ipv6Addr>,
    /// Guest-visible addresses standing for the host's loopback (`--map-host-loopback`).
    pub map_host_loopback4: Option<Ipv4Addr>,
    pub map_host_loopback6: Option<Ipv6Addr>,
    /// Guest-visible addresses standing for the guest's own address on the host
    /// (`--map-guest-addr`).
    pub map_guest_addr4: Option<Ipv4Addr>,
    pub map_guest_addr6: Option<Ipv6Addr>,
}

impl Nat {
    /// Translation for a configuration: the guest's addresses from `cfg.net`, the
    /// host-loopback mapping from `--map-host-loopback` / `--no-map-gw` (`cfg.nat`).
    pub fn from_config(cfg: &crate::conf::Config) -> Nat {
        Nat {
            map_host_loopback4: cfg.nat.map_host_loopback4,
            map_host_loopback6: cfg.nat.map_host_loopback6,
            map_guest_addr4: cfg.nat.map_guest_addr4,
            map_guest_addr6: cfg.nat.map_guest_addr6,
            ..Nat::from_net(&cfg.net)
        }
    }

    /// Translation for `net`, host-loopback mapping on the gateway addresses (the default
    /// of `--map-host-loopback`).
    pub fn from_net(net: &NetConfig) -> Nat {
        let gw4 = net.ip4.as_ref().map(|i| i.gateway);
        let gw6 = net.ip6.as_ref().map(|i| i.our_ll);
        Nat {
            guest4: net.ip4.as_ref().map(|i| i.addr),
            guest6: net.ip6.as_ref().map(|i| i.addr),
            gw4,
            gw6,
            map_host_loopback4: gw4,
            map_host_loopback6: gw6,
            map_guest_addr4: None,
            map_guest_addr6: None,
            seen4: None,
            seen6: None,
            seen_ll6: None,
        }
    }

    /// Where a guest's traffic to `dst` goes on the host.
    pub fn guest_to_host_dst(&self, dst: SocketAddr) -> SocketAddr {
        match dst.ip() {
            IpAddr::V4(a) if Some(a) == self.map_host_loopback4 => {
                SocketAddr::new(Ipv4Addr::LOCALHOST.into(), dst.port())
            }
            IpAddr::V6(a) if Some(a) == self.map_host_loopback6 => {
                SocketAddr::new(Ipv6Addr::LOCALHOST.into(), dst.port())
            }
            IpAddr::V4(a) if Some(a) == self.map_guest_addr4 => match self.guest4 {
                Some(g) => SocketAddr::new(g.into(), dst.port()),
                None => dst,
            },
            IpAddr::V6(a) if Some(a) == self.map_guest_addr6 => match self.guest6 {
                Some(g) => SocketAddr::new(g.into(), dst.port()),
                None => dst,
            },
            _ => dst,
        }
    }

    /// Whether `dst` (from the guest) means the host's loopback.
    pub fn is_host_loopback(&self, dst: IpAddr) -> bool {
        match dst {
            IpAddr::V4(a) => Some(a) == self.map_host_loopback4,
            IpAddr::V6(a) => Some(a) == self.map_host_loopback6,
        }
    }

    /// How a host peer at `src` appears to the guest (IPv4-mapped IPv6 addresses as IPv4);
    /// `None` if the guest has no address of that family.
    pub fn host_to_guest_src(&self, src: IpAddr) -> Option<IpAddr> {
        match unmap(src) {
            IpAddr::V4(a) => {
                let guest = self.guest4?;
                if a.is_loopback() || a == guest || Some(a) == self.seen4 || a.is_unspecified() {
                    Some(self.map_host_loopback4.or(self.gw4)?.into())
                } else {
                    Some(a.into())
                }
            }
            IpAddr::V6(a) => {
                let guest = self.guest6?;
                if a.is_loopback() || a == guest || Some(a) == self.seen6 || a.is_unspecified() {
                    Some(self.map_host_loopback6.or(self.gw6)?.into())
                } else {
                    Some(a.into())
                }
            }
        }
    }

    /// The guest's address of `src`'s family (after [`Self::host_to_guest_src`]): the one
    /// it was seen using, else the configured one.
    pub fn guest_addr(&self, src: IpAddr) -> Option<IpAddr> {
        match src {
            IpAddr::V4(_) => self.guest4.map(|g| IpAddr::V4(self.seen4.unwrap_or(g))),
            IpAddr::V6(s) if crate::conf::is_link_local6(s) && self.seen_ll6.is_some() => {
                self.guest6.and(self.seen_ll6).map(IpAddr::V6)
            }
            IpAddr::V6(_) => self.guest6.map(|g| IpAddr::V6(self.seen6.unwrap_or(g))),
        }
    }

    /// The guest sent from `a` (or claimed it, in Duplicate Address Detection): its
    /// address, unless link-local or not unicast. Returns whether that is news.
    pub fn guest_addr_seen(&mut self, a: IpAddr) -> bool {
        if !crate::wire::is_unicast(a) || a.is_loopback() {
            return false;
        }
        match a {
            IpAddr::V4(v4) if self.guest4.is_some() => {
                let old = self.seen4.replace(v4);
                old != Some(v4)
            }
            IpAddr::V6(v6) if self.guest6.is_some() && crate::conf::is_link_local6(v6) => {
                self.seen_ll6.replace(v6);
                false
            }
            IpAddr::V6(v6) if self.guest6.is_some() => {
                let old = self.seen6.replace(v6);
                old != Some(v6)
            }
            _ => false,
        }
    }
}

/// An IPv4-mapped IPv6 address (from a dual-stack socket) as the IPv4 address it is.
pub fn unmap(a: IpAddr) -> IpAddr {
    match a {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => a,
        },
        a => a,
    }
}

/// A listening socket for a forwarded port.
#[derive(Debug)]
pub struct Listener {
    pub fd: OwnedFd,
    pub host_port: u16,
    /// Where its connections go in the guest.
    pub guest_port: u16,
}

/// A forwarded port we couldn't set up.
#[derive(Debug, thiserror::Error)]
#[error("{option} {spec}: can't {what} port {port}: {source}")]
pub struct FwdError {
    pub option: &'static str,
    pub spec: String,
    pub what: &'static str,
    pub port: u16,
    pub source: io::Error,
}

/// File descriptors kept free for flows and everything else when `all` binds ports.
const FD_RESERVE: u64 = 4096;
const LISTEN_BACKLOG: libc::c_int = 128;

/// `SocketAddr` to a `sockaddr_storage` and its length.
pub fn to_sockaddr(a: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain data; all zeroes is a valid value.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match a {
        SocketAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(v4.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { std::ptr::write((&mut ss as *mut libc::sockaddr_storage).cast(), sin) };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(v6) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: v6.ip().octets(),
                },
                sin6_scope_id: v6.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe { std::ptr::write((&mut ss as *mut libc::sockaddr_storage).cast(), sin6) };
            size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

/// A `sockaddr_storage` the kernel filled in, as a `SocketAddr`.
pub fn from_sockaddr(ss: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match libc::c_int::from(ss.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let sin =
                unsafe { &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::new(
                Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes()).into(),
                u16::from_be(sin.sin_port),
            ))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let sin6 =
                unsafe { &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            Some(SocketAddr::new(
                Ipv6Addr::from(sin6.sin6_addr.s6_addr).into(),
                u16::from_be(sin6.sin6_port),
            ))
        }
        _ => None,
    }
}

/// A non-blocking socket of type `ty` bound to `addr` (and `iface`), address reuse on.
/// `dual_stack`: an IPv6 socket takes IPv4 too; otherwise IPv6 sockets are IPv6 only.
pub fn bind_socket(
    ty: libc::c_int,
    addr: SocketAddr,
    iface: Option<&str>,
    dual_stack: bool,
) -> io::Result<OwnedFd> {
    let family = if addr.is_ipv6() {
        libc::AF_INET6
    } else {
        libc::AF_INET
    };
    // SAFETY: plain socket(2) call.
    let fd =
        cvt(unsafe { libc::socket(family, ty | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: socket(2) just returned this fd; nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let raw = fd.as_raw_fd();
    setsockopt_int(raw, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    if addr.is_ipv6() {
        setsockopt_int(
            raw,
            libc::IPPROTO_IPV6,
            libc::IPV6_V6ONLY,
            i32::from(!dual_stack),
        )?;
    }
    if let Some(name) = iface {
        crate::sys::bind_to_device(raw, name)?;
    }
    let (ss, len) = to_sockaddr(addr);
    // SAFETY: ss holds a sockaddr of length len.
    cvt(unsafe { libc::bind(raw, (&ss as *const libc::sockaddr_storage).cast(), len) })?;
    Ok(fd)
}

/// Raises the soft open-files limit to the hard one; returns the soft limit now in force.
fn raise_nofile() -> u64 {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: rl is a live rlimit struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) } < 0 {
        return 1024;
    }
    if rl.rlim_cur < rl.rlim_max {
        let want = libc::rlimit {
            rlim_cur: rl.rlim_max,
            rlim_max: rl.rlim_max,
        };
        // SAFETY: want is a live rlimit struct.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &want) } == 0 {
            return want.rlim_cur;
        }
    }
    rl.rlim_cur
}

/// Opens the sockets `fwd` asks for (`ty`: `SOCK_STREAM` listening, or `SOCK_DGRAM`), for
/// the families the guest has (`v4`, `v6`). `option` names the option in errors. Returns
/// the sockets and notes for the log. A port of an explicit specification that can't be
/// bound is an error; for `all` and excludes-only, it is skipped. At most `budget` sockets
/// are opened (what they take is deducted), so every protocol's forwards share one
/// descriptor allowance.
pub fn open_listeners(
    option: &'static str,
    ty: libc::c_int,
    fwd: &PortFwd,
    v4: bool,
    v6: bool,
    budget: &mut usize,
) -> Result<(Vec<Listener>, Vec<String>), FwdError> {
    let mut out = Vec::new();
    let mut notes = Vec::new();
    if fwd.is_empty() {
        return Ok((out, notes));
    }
    for g in &fwd.groups {
        let mut bound = 0usize;
        let mut skipped = 0usize;
        let fail = |port: u16, what: &'static str, source: io::Error| FwdError {
            option,
            spec: g.spec.clone(),
            what,
            port,
            source,
        };
        for port in g.ports.iter() {
            let Some(guest_port) = fwd.guest_port(port) else {
                continue;
            };
            if *budget == 0 {
                notes.push(format!(
                    "{option} {}: file descriptor limit reached: ports from {port} on not forwarded",
                    g.spec
                ));
                break;
            }
            let (addr, dual) = match g.addr {
                Some(a) => {
                    if !(if a.is_ipv4() { v4 } else { v6 }) {
                        return Err(fail(
                            port,
                            "forward",
                            io::Error::new(
                                io::ErrorKind::Unsupported,
                                "the guest has no address of that family",
                            ),
                        ));
                    }
                    (SocketAddr::new(a, port), false)
                }
                // One dual-stack socket per port where both families are on: half the fds.
                None if v6 => (SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port), v4),
                None => (SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port), false),
            };
            let r = bind_socket(ty, addr, g.iface.as_deref(), dual)
                .or_else(|e| {
                    // No IPv6 in this kernel: IPv4 alone.
                    if dual && e.raw_os_error() == Some(libc::EAFNOSUPPORT) {
                        bind_socket(
                            ty,
                            SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port),
                            g.iface.as_deref(),
                            false,
                        )
                    } else {
                        Err(e)
                    }
                })
                .and_then(|fd| {
                    if ty == libc::SOCK_STREAM {
                        // SAFETY: plain listen(2) on our socket.
                        cvt(unsafe { libc::listen(fd.as_raw_fd(), LISTEN_BACKLOG) })?;
                    } else {
                        crate::sys::max_rcvbuf(fd.as_raw_fd());
                    }
                    Ok(fd)
                });
            match r {
                Ok(fd) => {
                    bound += 1;
                    *budget -= 1;
                    out.push(Listener {
                        fd,
                        host_port: port,
                        guest_port,
                    });
                }
                Err(e)
                    if g.best_effort
                        && !matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) =>
                {
                    skipped += 1
                }
                Err(e) => return Err(fail(port, "bind", e)),
            }
        }
        // Out of descriptors before the first port is no binding failure: the note says it.
        if bound == 0 && *budget > 0 {
            return Err(fail(
                0,
                "forward",
                io::Error::new(io::ErrorKind::AddrInUse, "no port could be bound"),
            ));
        }
        if g.best_effort {
            notes.push(format!(
                "{option} {}: forwarding {bound} ports, {skipped} in use or not permitted",
                g.spec
            ));
        }
    }
    Ok((out, notes))
}

/// The listening sockets of every forwarded port, opened before the event loop starts (and
/// before we go to the background, so a port that can't be bound is reported and fatal).
#[derive(Debug, Default)]
pub struct Bound {
    pub tcp: Vec<Listener>,
    /// Bound datagram sockets of forwarded UDP ports.
    pub udp: Vec<Listener>,
}

impl Bound {
    /// Opens what `cfg` forwards; notes for the log.
    pub fn open(cfg: &crate::conf::Config) -> Result<(Bound, Vec<String>), FwdError> {
        let (v4, v6) = (cfg.net.ip4.is_some(), cfg.net.ip6.is_some());
        let mut bound = Bound::default();
        let mut notes = Vec::new();
        let mut budget = if cfg.tcp_fwd.is_empty() && cfg.udp_fwd.is_empty() {
            0
        } else {
            raise_nofile().saturating_sub(FD_RESERVE) as usize
        };
        if cfg.tcp {
            let (tcp, n) =
                open_listeners("-t", libc::SOCK_STREAM, &cfg.tcp_fwd, v4, v6, &mut budget)?;
            bound.tcp = tcp;
            notes.extend(n);
        }
        if cfg.udp {
            let (udp, n) =
                open_listeners("-u", libc::SOCK_DGRAM, &cfg.udp_fwd, v4, v6, &mut budget)?;
            bound.udp = udp;
            notes.extend(n);
        }
        Ok((bound, notes))
    }
}

/// Accepts one connection on a listening socket: the connected socket (non-blocking) and
/// the client's address. `Ok(None)`: nothing pending.
pub fn accept(listener: RawFd) -> io::Result<Option<(OwnedFd, SocketAddr)>> {
    // SAFETY: sockaddr_storage is plain data; all zeroes is a valid value.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: ss and len are live, len is ss's size.
    let r = unsafe {
        libc::accept4(
            listener,
            (&mut ss as *mut libc::sockaddr_storage).cast(),
            &mut len,
            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
        )
    };
    if r < 0 {
        let e = io::Error::last_os_error();
        return match e.kind() {
            io::ErrorKind::WouldBlock => Ok(None),
            _ => Err(e),
        };
    }
    // SAFETY: accept4 just returned this fd; nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(r) };
    match from_sockaddr(&ss) {
        Some(peer) => Ok(Some((fd, peer))),
        None => Err(io::ErrorKind::InvalidData.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conf::{Ip4, Ip6};

    fn nat() -> Nat {
        Nat::from_net(&NetConfig {
            ip4: Some(Ip4 {
                addr: "192.0.2.2".parse().unwrap(),
                prefix_len: 24,
                gateway: "192.0.2.1".parse().unwrap(),
                dns: vec![],
            }),
            ip6: Some(Ip6 {
                addr: "2001:db8::2".parse().unwrap(),
                prefix_len: 64,
                gateway: "2001:db8::1".parse().unwrap(),
                our_ll: "fe80::1".parse().unwrap(),
                dns: vec![],
            }),
            ..NetConfig::default()
        })
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn gateway_means_host_loopback() {
        let n = nat();
        assert_eq!(n.guest_to_host_dst(sa("192.0.2.1:80")), sa("127.0.0.1:80"));
        assert_eq!(n.guest_to_host_dst(sa("[fe80::1]:80")), sa("[::1]:80"));
        // The host's gateway (not the guest's view of it) and others pass.
        assert_eq!(
            n.guest_to_host_dst(sa("[2001:db8::1]:80")),
            sa("[2001:db8::1]:80")
        );
        assert_eq!(
            n.guest_to_host_dst(sa("198.51.100.1:80")),
            sa("198.51.100.1:80")
        );
        assert!(n.is_host_loopback(ip("192.0.2.1")) && !n.is_host_loopback(ip("192.0.2.3")));
        let mut none = n.clone();
        none.map_host_loopback4 = None;
        none.map_host_loopback6 = None;
        assert_eq!(
            none.guest_to_host_dst(sa("192.0.2.1:80")),
            sa("192.0.2.1:80")
        );
        let mut other = n;
        other.map_host_loopback4 = Some("192.0.2.99".parse().unwrap());
        assert_eq!(
            other.guest_to_host_dst(sa("192.0.2.99:8")),
            sa("127.0.0.1:8")
        );
        assert_eq!(
            other.guest_to_host_dst(sa("192.0.2.1:8")),
            sa("192.0.2.1:8")
        );
    }

    #[test]
    fn the_host_itself_appears_as_the_host_loopback_address() {
        let n = nat();
        for (from, seen) in [
            ("127.0.0.1", "192.0.2.1"),
            ("127.1.2.3", "192.0.2.1"),
            ("192.0.2.2", "192.0.2.1"),
            ("::ffff:127.0.0.1", "192.0.2.1"),
            ("::ffff:198.51.100.7", "198.51.100.7"),
            ("198.51.100.7", "198.51.100.7"),
            ("::1", "fe80::1"),
            ("2001:db8::2", "fe80::1"),
            ("2001:db8:ffff::1", "2001:db8:ffff::1"),
        ] {
            assert_eq!(n.host_to_guest_src(ip(from)), Some(ip(seen)), "{from}");
        }
        assert_eq!(n.guest_addr(ip("198.51.100.7")), Some(ip("192.0.2.2")));
        assert_eq!(n.guest_addr(ip("fe80::1")), Some(ip("2001:db8::2")));
        let mut slaac = n.clone();
        assert!(slaac.guest_addr_seen(ip("2001:db8::5054:ff:fe12:3456")));
        assert!(
            !slaac.guest_addr_seen(ip("2001:db8::5054:ff:fe12:3456")),
            "no news"
        );
        assert!(
            !slaac.guest_addr_seen(ip("fe80::5054:ff:fe12:3456")),
            "link-local"
        );
        assert!(!slaac.guest_addr_seen(ip("::")));
        // Link-local sources reach the guest's link-local address, once known (the
        // configured global address before: see `n` above).
        assert_eq!(
            slaac.guest_addr(ip("fe80::1")),
            Some(ip("fe80::5054:ff:fe12:3456"))
        );
        assert_eq!(
            slaac.guest_addr(ip("2001:db8:ffff::1")),
            Some(ip("2001:db8::5054:ff:fe12:3456"))
        );
        assert_eq!(
            slaac.guest_addr(ip("::1")),
            Some(ip("2001:db8::5054:ff:fe12:3456"))
        );
        // The host's own address (the configured one) still stands for the host.
        assert_eq!(
            slaac.host_to_guest_src(ip("2001:db8::2")),
            Some(ip("fe80::1"))
        );
        assert_eq!(
            slaac.host_to_guest_src(ip("2001:db8::5054:ff:fe12:3456")),
            Some(ip("fe80::1"))
        );
        let mut v6only = n.clone();
        v6only.guest4 = None;
        assert_eq!(v6only.host_to_guest_src(ip("198.51.100.7")), None);
        // Without a host-loopback address, the gateway still stands for the host.
        let mut none = n;
        none.map_host_loopback4 = None;
        assert_eq!(
            none.host_to_guest_src(ip("127.0.0.1")),
            Some(ip("192.0.2.1"))
        );
    }

    #[test]
    fn sockaddr_round_trip() {
        for a in [sa("192.0.2.1:80"), sa("[2001:db8::1]:65535")] {
            let (ss, _) = to_sockaddr(a);
            assert_eq!(from_sockaddr(&ss), Some(a));
        }
    }

    #[test]
    fn listeners_on_loopback_accept() {
        // A port the kernel just found free on 127.0.0.1.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        let spec = format!("127.0.0.1/{port}");
        let (fwd, _) = PortFwd::parse_all(&[spec.as_str()]).unwrap();
        let (ls, _) =
            open_listeners("-t", libc::SOCK_STREAM, &fwd, true, false, &mut 1000).expect("bind");
        assert_eq!(
            (ls.len(), ls[0].host_port, ls[0].guest_port),
            (1, port, port)
        );
        let e = open_listeners("-t", libc::SOCK_STREAM, &fwd, true, false, &mut 1000).unwrap_err();
        assert_eq!(e.source.raw_os_error(), Some(libc::EADDRINUSE));
        assert!(e.to_string().contains(&format!("-t {spec}")), "{e}");
        assert!(accept(ls[0].fd.as_raw_fd()).unwrap().is_none());
        let c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (_s, peer) = accept(ls[0].fd.as_raw_fd()).unwrap().expect("pending");
        assert_eq!(peer, c.local_addr().unwrap());
        // The guest has no IPv6: an IPv6 bind address is refused.
        let (fwd6, _) = PortFwd::parse_all(&["::1/61235"]).unwrap();
        // (refused before any bind is tried)
        assert!(open_listeners("-t", libc::SOCK_STREAM, &fwd6, true, false, &mut 1000).is_err());
    }
}
