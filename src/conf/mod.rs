//! Configuration: the command line ([`args`]), what the host looks like ([`host`], found by
//! [`netlink`] and [`resolv`]), and [`Config`], the one validated result the rest of the
//! program reads. [`Config::from_args`] is the only place that validates options: it does no
//! I/O, so every rule is unit-tested with a made-up host.

pub mod args;
pub mod host;
pub mod netlink;
pub mod resolv;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::time::Duration;

use log::LevelFilter;

pub use args::Args;
pub use host::{Host4, Host6, HostInfo, Resolv};

/// Default MTU advertised to the guest: the largest that fits a 64 KiB frame with headers.
pub const DEFAULT_MTU: u16 = 65520;
/// Smallest MTU we accept: IPv4's minimum (IPv6 is turned off below 1280).
pub const MIN_MTU: u32 = 68;
/// IPv6's minimum link MTU.
pub const MIN_MTU_IPV6: u16 = 1280;
/// The MAC address we answer with, as upstream passt.
pub const DEFAULT_OUR_MAC: [u8; 6] = [0x9a, 0x55, 0x9a, 0x55, 0x9a, 0x55];

/// A configuration problem, named after the option at fault.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{option}: {problem}")]
pub struct ConfError {
    pub option: &'static str,
    pub problem: String,
}

fn bad(option: &'static str, problem: impl Into<String>) -> ConfError {
    ConfError {
        option,
        problem: problem.into(),
    }
}

/// How the guest's frames reach us.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// QEMU's `-netdev stream`: 4-byte big-endian length, then the frame.
    Stream,
    /// A vhost-user-net back-end: frames in guest memory, virtqueues.
    VhostUser,
}

/// The guest's IPv4 configuration, as handed out by DHCP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ip4 {
    pub addr: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Ipv4Addr,
    /// DNS servers to advertise; empty with `--no-dhcp-dns`.
    pub dns: Vec<Ipv4Addr>,
}

impl Ip4 {
    pub fn netmask(&self) -> Ipv4Addr {
        prefix_to_mask(self.prefix_len)
    }

    /// Whether `addr` is on the guest's subnet.
    pub fn on_link(&self, addr: Ipv4Addr) -> bool {
        let mask = u32::from(self.netmask());
        u32::from(addr) & mask == u32::from(self.addr) & mask
    }
}

/// The guest's IPv6 configuration, as handed out by NDP and DHCPv6.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ip6 {
    pub addr: Ipv6Addr,
    pub prefix_len: u8,
    /// The host's gateway (may be link-local).
    pub gateway: Ipv6Addr,
    /// Link-local address we speak from in NDP and DHCPv6: the guest's default router.
    pub our_ll: Ipv6Addr,
    /// DNS servers to advertise; empty with `--no-dhcp-dns`.
    pub dns: Vec<Ipv6Addr>,
}

impl Ip6 {
    /// The guest's prefix, host bits cleared.
    pub fn prefix(&self) -> Ipv6Addr {
        let bits = u128::from(self.addr);
        let mask = if self.prefix_len == 0 {
            0
        } else {
            u128::MAX << (128 - u32::from(self.prefix_len.min(128)))
        };
        Ipv6Addr::from(bits & mask)
    }
}

/// What the L2/L3 services (ARP, DHCP, NDP, DHCPv6) tell the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// Our MAC: the source of every frame we send to the guest.
    pub our_mac: [u8; 6],
    /// MTU to advertise; `None`: advertise none.
    pub mtu: Option<u16>,
    pub ip4: Option<Ip4>,
    pub ip6: Option<Ip6>,
    /// Search domains to advertise; empty with `--no-dhcp-search`.
    pub dns_search: Vec<String>,
    pub hostname: Option<String>,
    pub fqdn: Option<String>,
    pub dhcp: bool,
    pub ndp: bool,
    pub dhcpv6: bool,
    pub ra: bool,
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            our_mac: DEFAULT_OUR_MAC,
            mtu: Some(DEFAULT_MTU),
            ip4: None,
            ip6: None,
            dns_search: Vec::new(),
            hostname: None,
            fqdn: None,
            dhcp: true,
            ndp: true,
            dhcpv6: true,
            ra: true,
        }
    }
}

/// The validated configuration of one passt-rs process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub mode: Mode,
    pub socket_path: Option<PathBuf>,
    pub fd: Option<RawFd>,
    pub one_off: bool,
    pub foreground: bool,
    pub log_level: LevelFilter,
    pub log_file: Option<PathBuf>,
    pub pid_file: Option<PathBuf>,
    pub net: NetConfig,
    pub tcp: bool,
    pub udp: bool,
    pub icmp: bool,
    pub outbound4: Option<Ipv4Addr>,
    pub outbound6: Option<Ipv6Addr>,
    pub outbound_if4: Option<String>,
    pub outbound_if6: Option<String>,
    /// `-t` specs, parsed by the port forwarding module.
    pub tcp_ports: Vec<String>,
    // --- passt-rs TCP forwarding slice (tcp2) ---
    /// The `-t` specs, parsed.
    pub tcp_fwd: crate::fwd::spec::PortFwd,
    /// Parsed `-u` specs (the `-t` ones when no `-u` is given).
    pub udp_fwd: crate::fwd::spec::PortFwd,
    // --- end TCP forwarding ---
    /// `-u` specs, parsed by the port forwarding module.
    pub udp_ports: Vec<String>,
    /// Address translations for guest traffic to the host and to DNS.
    pub nat: Nat,
    /// Idle time after which a UDP flow is closed (`--udp-timeout`).
    pub udp_timeout: Duration,
    /// Capacity of each protocol's flow table (`--max-flows`).
    pub max_flows: usize,
    /// Notes for the log about choices made (families turned off, resolvers skipped).
    pub notes: Vec<String>,
}

/// Default of `--udp-timeout`, as upstream passt's fixed UDP flow timeout.
pub const DEFAULT_UDP_TIMEOUT: Duration = Duration::from_secs(180);

/// Addresses the guest uses that mean something else on the host.
///
/// - `map_host_loopback*`: traffic from the guest to this address goes to the host's
///   loopback (127.0.0.1, ::1) and replies come from it (`--map-host-loopback`, default:
///   the gateway the guest was given; `--no-map-gw` or `none` turns it off).
/// - `dns_match*` / `dns_host*`: UDP from the guest to `dns_match` port 53 goes to
///   `dns_host` port 53 (`--dns-forward`, `--dns-host`). Without `--dns-forward`, a
///   loopback resolver in resolv.conf sets `dns_match` to the host-loopback address and
///   `dns_host` to itself, so it is advertised as that address, never as 127.0.0.x.
/// - `map_guest_addr*`: traffic from the guest to this address goes to the host's address
///   the guest was given (`--map-guest-addr`, default none).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Nat {
    pub map_host_loopback4: Option<Ipv4Addr>,
    pub map_host_loopback6: Option<Ipv6Addr>,
    pub map_guest_addr4: Option<Ipv4Addr>,
    pub map_guest_addr6: Option<Ipv6Addr>,
    pub dns_match4: Option<Ipv4Addr>,
    pub dns_host4: Option<Ipv4Addr>,
    pub dns_match6: Option<Ipv6Addr>,
    pub dns_host6: Option<Ipv6Addr>,
}

impl Config {
    /// Validates `args` against what was discovered about `host`.
    pub fn from_args(args: &Args, host: &HostInfo) -> Result<Config, ConfError> {
        let mut notes = Vec::new();
        let log_level = args.log_level();
        if let Some(fd) = args.fd {
            if fd < 0 {
                return Err(bad("--fd", format!("invalid file descriptor {fd}")));
            }
            if args.socket.is_some() {
                return Err(bad("--fd", "can't be combined with --socket"));
            }
        }

        let mtu = match args.mtu {
            None => Some(DEFAULT_MTU),
            Some(0) => None,
            Some(m) if (MIN_MTU..=u32::from(DEFAULT_MTU)).contains(&m) => Some(m as u16),
            Some(m) => {
                return Err(bad(
                    "--mtu",
                    format!("{m} is out of range: 0 or {MIN_MTU} to {DEFAULT_MTU}"),
                ))
            }
        };
        let our_mac = match &args.mac_addr {
            None => DEFAULT_OUR_MAC,
            Some(s) => parse_mac(s)
                .ok_or_else(|| bad("--mac-addr", format!("invalid MAC address '{s}'")))?,
        };

        let mut addr4: Option<(Ipv4Addr, Option<u8>)> = None;
        let mut addr6: Option<(Ipv6Addr, Option<u8>)> = None;
        for a in &args.address {
            match parse_addr_prefix(a)
                .ok_or_else(|| bad("--address", format!("invalid address '{a}'")))?
            {
                (IpAddr::V4(v4), p) if p.is_none_or(|p| p <= 32) => addr4 = Some((v4, p)),
                (IpAddr::V6(v6), p) if p.is_none_or(|p| p <= 128) => addr6 = Some((v6, p)),
                _ => return Err(bad("--address", format!("invalid prefix length in '{a}'"))),
            }
        }
        let netmask = match &args.netmask {
            None => None,
            Some(s) => Some(
                parse_netmask(s)
                    .ok_or_else(|| bad("--netmask", format!("invalid netmask '{s}'")))?,
            ),
        };
        let mut gw4 = None;
        let mut gw6 = None;
        for g in &args.gateway {
            match g.parse::<IpAddr>() {
                Ok(IpAddr::V4(v4)) => gw4 = Some(v4),
                Ok(IpAddr::V6(v6)) => gw6 = Some(v6),
                Err(_) => return Err(bad("--gateway", format!("invalid address '{g}'"))),
            }
        }
        let mut outbound4 = None;
        let mut outbound6 = None;
        for o in &args.outbound {
            match o.parse::<IpAddr>() {
                Ok(IpAddr::V4(v4)) => outbound4 = Some(v4),
                Ok(IpAddr::V6(v6)) => outbound6 = Some(v6),
                Err(_) => return Err(bad("--outbound", format!("invalid address '{o}'"))),
            }
        }

        // DNS: explicit servers replace the resolver's; "none" empties the list.
        let mut dns: Vec<IpAddr> = Vec::new();
        let mut dns_given = false;
        for d in &args.dns {
            dns_given = true;
            if d == "none" {
                dns.clear();
                continue;
            }
            dns.push(
                d.parse()
                    .map_err(|_| bad("--dns", format!("invalid address '{d}'")))?,
            );
        }
        let mut search: Vec<String> = Vec::new();
        if args.search.is_empty() {
            search.clone_from(&host.resolv.search);
        }
        for s in &args.search {
            if s == "none" {
                search.clear();
                continue;
            }
            for domain in s.split([' ', ',']).filter(|d| !d.is_empty()) {
                if !valid_domain(domain) {
                    return Err(bad("--search", format!("invalid domain '{domain}'")));
                }
                search.push(domain.to_string());
            }
        }
        if args.no_dhcp_search {
            search.clear();
        }
        if let Some(h) = &args.hostname {
            if !valid_domain(h) {
                return Err(bad("--hostname", format!("invalid hostname '{h}'")));
            }
        }
        if let Some(f) = &args.fqdn {
            if !valid_domain(f) {
                return Err(bad("--fqdn", format!("invalid name '{f}'")));
            }
        }

        let mut ip4 = if args.ipv6_only {
            None
        } else {
            match (addr4, &host.v4) {
                (Some((addr, plen)), h) => {
                    let prefix_len = netmask
                        .or(plen)
                        .or(h.as_ref().map(|h| h.prefix_len))
                        .unwrap_or(24);
                    let gateway = gw4.or(h.as_ref().map(|h| h.gateway));
                    match gateway {
                        Some(gateway) => Some(Ip4 {
                            addr,
                            prefix_len,
                            gateway,
                            dns: Vec::new(),
                        }),
                        None => {
                            return Err(bad(
                                "--address",
                                "no IPv4 gateway: give one with --gateway",
                            ))
                        }
                    }
                }
                (None, Some(h)) => Some(Ip4 {
                    addr: h.addr,
                    prefix_len: netmask.unwrap_or(h.prefix_len),
                    gateway: gw4.unwrap_or(h.gateway),
                    dns: Vec::new(),
                }),
                (None, None) => {
                    notes.push("no IPv4 default route on the host: IPv4 disabled".into());
                    None
                }
            }
        };
        let ip6 = if args.ipv4_only {
            None
        } else {
            match (addr6, &host.v6) {
                (Some((addr, plen)), h) => {
                    let prefix_len = plen.or(h.as_ref().map(|h| h.prefix_len)).unwrap_or(64);
                    let gateway = gw6.or(h.as_ref().map(|h| h.gateway));
                    match gateway {
                        Some(gateway) => Some(Ip6 {
                            addr,
                            prefix_len,
                            gateway,
                            our_ll: router_link_local(
                                gateway,
                                h.as_ref().and_then(|h| h.link_local),
                            ),
                            dns: Vec::new(),
                        }),
                        None => {
                            return Err(bad(
                                "--address",
                                "no IPv6 gateway: give one with --gateway",
                            ))
                        }
                    }
                }
                (None, Some(h)) => {
                    let gateway = gw6.unwrap_or(h.gateway);
                    Some(Ip6 {
                        addr: h.addr,
                        prefix_len: h.prefix_len,
                        gateway,
                        our_ll: router_link_local(gateway, h.link_local),
                        dns: Vec::new(),
                    })
                }
                (None, None) => {
                    notes.push("no IPv6 default route on the host: IPv6 disabled".into());
                    None
                }
            }
        };
        if ip4.is_none() && ip6.is_none() {
            return Err(bad(
                "--interface",
                "no usable IPv4 or IPv6 configuration: the host has no default route; give --address and --gateway",
            ));
        }
        let mut ip6 = match (ip6, mtu) {
            (Some(_), Some(m)) if m < MIN_MTU_IPV6 => {
                notes.push(format!(
                    "MTU {m} is below IPv6's minimum of {MIN_MTU_IPV6}: IPv6 disabled"
                ));
                None
            }
            (ip6, _) => ip6,
        };
        let nat = nat_and_dns(
            args,
            host,
            dns_given.then_some(&dns[..]),
            ip4.as_mut(),
            ip6.as_mut(),
            &mut notes,
        )?;
        let max_flows = args.max_flows.unwrap_or(crate::flow::DEFAULT_CAPACITY);
        if !(1..=crate::flow::MAX_CAPACITY).contains(&max_flows) {
            return Err(bad(
                "--max-flows",
                format!(
                    "{max_flows} is out of range: 1 to {}",
                    crate::flow::MAX_CAPACITY
                ),
            ));
        }
        let udp_timeout = match args.udp_timeout {
            None => DEFAULT_UDP_TIMEOUT,
            Some(0) => return Err(bad("--udp-timeout", "must be at least 1 second")),
            Some(s) => Duration::from_secs(s),
        };

        let (tcp_fwd, fwd_notes) = crate::fwd::spec::PortFwd::parse_all(&args.tcp_ports)
            .map_err(|e| bad("--tcp-ports", e.to_string()))?;
        notes.extend(fwd_notes);
        // As upstream passt: without -u, UDP forwards the ports -t forwards.
        let udp_specs = if args.udp_ports.is_empty() {
            &args.tcp_ports
        } else {
            &args.udp_ports
        };
        let (udp_fwd, fwd_notes) = crate::fwd::spec::PortFwd::parse_all(udp_specs)
            .map_err(|e| bad("--udp-ports", e.to_string()))?;
        notes.extend(fwd_notes);

        let mode = if args.vhost_user {
            Mode::VhostUser
        } else {
            Mode::Stream
        };
        Ok(Config {
            mode,
            socket_path: args.socket.clone(),
            fd: args.fd,
            one_off: args.one_off,
            foreground: args.foreground,
            log_level,
            log_file: args.log_file.clone(),
            pid_file: args.pid.clone(),
            net: NetConfig {
                our_mac,
                mtu,
                ip4,
                ip6,
                dns_search: search,
                hostname: args.hostname.clone().or_else(|| host.hostname.clone()),
                fqdn: args.fqdn.clone(),
                dhcp: !args.no_dhcp,
                ndp: !args.no_ndp,
                dhcpv6: !args.no_dhcpv6,
                ra: !args.no_ra && !args.no_ndp,
            },
            tcp: !args.no_tcp,
            udp: !args.no_udp,
            icmp: !args.no_icmp,
            outbound4,
            outbound6,
            outbound_if4: args.outbound_if4.clone(),
            outbound_if6: args.outbound_if6.clone(),
            tcp_ports: args.tcp_ports.clone(),
            tcp_fwd,
            udp_fwd,
            udp_ports: args.udp_ports.clone(),
            nat,
            udp_timeout,
            max_flows,
            notes,
        })
    }
}

/// Works out [`Nat`] and fills in the DNS servers the guest's families advertise.
///
/// Advertised servers: `-D` as given if present; else, per family, the `--dns-forward`
/// address if given; else resolv.conf's servers in order, a loopback one replaced by the
/// host-loopback address (and dropped with a note if there is none).
fn nat_and_dns(
    args: &Args,
    host: &HostInfo,
    explicit_dns: Option<&[IpAddr]>,
    ip4: Option<&mut Ip4>,
    ip6: Option<&mut Ip6>,
    notes: &mut Vec<String>,
) -> Result<Nat, ConfError> {
    let mut nat = Nat {
        map_host_loopback4: ip4.as_ref().map(|i| i.gateway),
        map_host_loopback6: ip6.as_ref().map(|i| i.our_ll),
        ..Nat::default()
    };
    if args.no_map_gw {
        nat.map_host_loopback4 = None;
        nat.map_host_loopback6 = None;
    }
    for m in &args.map_host_loopback {
        match m.as_str() {
            "none" => {
                nat.map_host_loopback4 = None;
                nat.map_host_loopback6 = None;
            }
            _ => match m.parse::<IpAddr>() {
                Ok(IpAddr::V4(a)) if wire_unicast4(a) => nat.map_host_loopback4 = Some(a),
                Ok(IpAddr::V6(a)) if !a.is_multicast() && !a.is_unspecified() => {
                    nat.map_host_loopback6 = Some(a)
                }
                _ => return Err(bad("--map-host-loopback", format!("invalid address '{m}'"))),
            },
        }
    }
    for m in &args.map_guest_addr {
        match m.as_str() {
            "none" => {
                nat.map_guest_addr4 = None;
                nat.map_guest_addr6 = None;
            }
            _ => match m.parse::<IpAddr>() {
                Ok(IpAddr::V4(a)) if wire_unicast4(a) && !a.is_loopback() => {
                    nat.map_guest_addr4 = Some(a)
                }
                Ok(IpAddr::V6(a))
                    if !a.is_multicast() && !a.is_unspecified() && !a.is_loopback() =>
                {
                    nat.map_guest_addr6 = Some(a)
                }
                _ => return Err(bad("--map-guest-addr", format!("invalid address '{m}'"))),
            },
        }
    }
    for d in &args.dns_forward {
        match d.parse::<IpAddr>() {
            Ok(IpAddr::V4(a)) if wire_unicast4(a) && !a.is_loopback() => nat.dns_match4 = Some(a),
            Ok(IpAddr::V6(a)) if !a.is_multicast() && !a.is_unspecified() && !a.is_loopback() => {
                nat.dns_match6 = Some(a)
            }
            _ => return Err(bad("--dns-forward", format!("invalid address '{d}'"))),
        }
    }
    let (mut host4_given, mut host6_given) = (false, false);
    for d in &args.dns_host {
        match d.parse::<IpAddr>() {
            Ok(IpAddr::V4(a)) if !a.is_unspecified() => {
                nat.dns_host4 = Some(a);
                host4_given = true;
            }
            Ok(IpAddr::V6(a)) if !a.is_unspecified() => {
                nat.dns_host6 = Some(a);
                host6_given = true;
            }
            _ => return Err(bad("--dns-host", format!("invalid address '{d}'"))),
        }
    }
    let resolvers = &host.resolv.nameservers;
    if !host4_given {
        nat.dns_host4 = resolvers.iter().find_map(|a| match a {
            IpAddr::V4(v4) if !v4.is_unspecified() => Some(*v4),
            _ => None,
        });
    }
    if !host6_given {
        nat.dns_host6 = resolvers.iter().find_map(|a| match a {
            IpAddr::V6(v6) if !v6.is_unspecified() => Some(*v6),
            _ => None,
        });
    }

    let mut dns4: Vec<Ipv4Addr> = Vec::new();
    let mut dns6: Vec<Ipv6Addr> = Vec::new();
    if let Some(list) = explicit_dns {
        for a in list {
            match a {
                IpAddr::V4(v4) => dns4.push(*v4),
                IpAddr::V6(v6) => dns6.push(*v6),
            }
        }
    } else {
        let (forward4, forward6) = (nat.dns_match4, nat.dns_match6);
        if let Some(m) = forward4 {
            dns4.push(m);
        }
        if let Some(m) = forward6 {
            dns6.push(m);
        }
        for ns in resolvers {
            match *ns {
                IpAddr::V4(a) if forward4.is_none() && !a.is_unspecified() => {
                    if !a.is_loopback() {
                        push_new(&mut dns4, a);
                    } else if let Some(m) = nat.map_host_loopback4 {
                        push_new(&mut dns4, m);
                        if nat.dns_match4.is_none() {
                            nat.dns_match4 = Some(m);
                            if !host4_given {
                                nat.dns_host4 = Some(a);
                            }
                        }
                    } else {
                        notes.push(format!(
                            "not advertising loopback resolver {a} from /etc/resolv.conf: no --map-host-loopback address to reach it by"
                        ));
                    }
                }
                IpAddr::V6(a) if forward6.is_none() && !a.is_unspecified() => {
                    if !a.is_loopback() {
                        push_new(&mut dns6, a);
                    } else if let Some(m) = nat.map_host_loopback6 {
                        push_new(&mut dns6, m);
                        if nat.dns_match6.is_none() {
                            nat.dns_match6 = Some(m);
                            if !host6_given {
                                nat.dns_host6 = Some(a);
                            }
                        }
                    } else {
                        notes.push(format!(
                            "not advertising loopback resolver {a} from /etc/resolv.conf: no --map-host-loopback address to reach it by"
                        ));
                    }
                }
                _ => {}
            }
        }
    }
    if nat.dns_match4.is_some() && nat.dns_host4.is_none() {
        notes.push("--dns-forward: no IPv4 resolver to forward IPv4 queries to".into());
    }
    if nat.dns_match6.is_some() && nat.dns_host6.is_none() {
        notes.push("--dns-forward: no IPv6 resolver to forward IPv6 queries to".into());
    }
    if args.no_dhcp_dns {
        dns4.clear();
        dns6.clear();
    }
    match ip4 {
        Some(i) => i.dns = dns4,
        None => {
            nat.map_host_loopback4 = None;
            nat.dns_match4 = None;
        }
    }
    match ip6 {
        Some(i) => i.dns = dns6,
        None => {
            nat.map_host_loopback6 = None;
            nat.dns_match6 = None;
        }
    }
    Ok(nat)
}

fn push_new<T: PartialEq>(list: &mut Vec<T>, item: T) {
    if !list.contains(&item) {
        list.push(item);
    }
}

fn wire_unicast4(a: Ipv4Addr) -> bool {
    !(a.is_multicast() || a.is_broadcast() || a.is_unspecified())
}

/// The link-local address we present as the guest's router: the host's gateway if that is
/// link-local (so neighbour entries match what the host sees), else the host interface's
/// own link-local address, else `fe80::1`.
fn router_link_local(gateway: Ipv6Addr, host_ll: Option<Ipv6Addr>) -> Ipv6Addr {
    if is_link_local6(gateway) {
        gateway
    } else {
        host_ll.unwrap_or(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1))
    }
}

pub fn is_link_local6(a: Ipv6Addr) -> bool {
    a.segments()[0] & 0xffc0 == 0xfe80
}

pub fn prefix_to_mask(prefix_len: u8) -> Ipv4Addr {
    match prefix_len {
        0 => Ipv4Addr::UNSPECIFIED,
        p => Ipv4Addr::from(u32::MAX << (32 - u32::from(p.min(32)))),
    }
}

/// `aa:bb:cc:dd:ee:ff`, hex digits, either case.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for byte in &mut mac {
        let p = parts.next()?;
        if p.is_empty() || p.len() > 2 {
            return None;
        }
        *byte = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// `ADDR` or `ADDR/PREFIX`.
fn parse_addr_prefix(s: &str) -> Option<(IpAddr, Option<u8>)> {
    match s.split_once('/') {
        None => Some((s.parse().ok()?, None)),
        Some((a, p)) => Some((a.parse().ok()?, Some(p.parse().ok()?))),
    }
}

/// A dotted netmask with contiguous ones, or a prefix length.
fn parse_netmask(s: &str) -> Option<u8> {
    if let Ok(p) = s.parse::<u8>() {
        return (p <= 32).then_some(p);
    }
    let m = u32::from(s.parse::<Ipv4Addr>().ok()?);
    let ones = m.leading_ones();
    (m.checked_shl(ones).unwrap_or(0) == 0).then_some(ones as u8)
}

/// Letters, digits, hyphens and dots, labels of 1 to 63 characters, 253 at most in all.
fn valid_domain(s: &str) -> bool {
    let s = s.strip_suffix('.').unwrap_or(s);
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn host() -> HostInfo {
        HostInfo {
            v4: Some(Host4 {
                ifname: "eth0".into(),
                ifindex: 2,
                addr: "192.0.2.2".parse().unwrap(),
                prefix_len: 24,
                gateway: "192.0.2.1".parse().unwrap(),
            }),
            v6: Some(Host6 {
                ifname: "eth0".into(),
                ifindex: 2,
                addr: "2001:db8::2".parse().unwrap(),
                prefix_len: 64,
                gateway: "fe80::1:1".parse().unwrap(),
                link_local: Some("fe80::2".parse().unwrap()),
            }),
            resolv: Resolv {
                nameservers: vec![
                    "198.51.100.53".parse().unwrap(),
                    "127.0.0.53".parse().unwrap(),
                    "2001:db8:ffff::53".parse().unwrap(),
                ],
                search: vec!["example.test".into()],
            },
            hostname: Some("hosty".into()),
        }
    }

    fn conf(cmdline: &[&str]) -> Result<Config, ConfError> {
        let args =
            Args::try_parse_from(std::iter::once("passt").chain(cmdline.iter().copied())).unwrap();
        Config::from_args(&args, &host())
    }

    #[test]
    fn defaults_mirror_the_host() {
        let c = conf(&[]).unwrap();
        let ip4 = c.net.ip4.unwrap();
        assert_eq!(ip4.addr, "192.0.2.2".parse::<Ipv4Addr>().unwrap());
        assert_eq!(ip4.netmask(), "255.255.255.0".parse::<Ipv4Addr>().unwrap());
        assert_eq!(ip4.gateway, "192.0.2.1".parse::<Ipv4Addr>().unwrap());
        // The loopback resolver (127.0.0.53) is reached through the gateway address.
        assert_eq!(
            ip4.dns,
            vec![
                "198.51.100.53".parse::<Ipv4Addr>().unwrap(),
                "192.0.2.1".parse().unwrap()
            ]
        );
        let ip6 = c.net.ip6.unwrap();
        assert_eq!(ip6.our_ll, "fe80::1:1".parse::<Ipv6Addr>().unwrap());
        assert_eq!(ip6.prefix(), "2001:db8::".parse::<Ipv6Addr>().unwrap());
        assert_eq!(
            ip6.dns,
            vec!["2001:db8:ffff::53".parse::<Ipv6Addr>().unwrap()]
        );
        assert_eq!(c.net.dns_search, vec!["example.test".to_string()]);
        assert_eq!(c.net.mtu, Some(65520));
        assert_eq!(c.net.our_mac, DEFAULT_OUR_MAC);
        assert_eq!(c.net.hostname.as_deref(), Some("hosty"));
        assert_eq!(c.mode, Mode::Stream);
        assert_eq!(c.udp_timeout, Duration::from_secs(180));
    }

    fn v4(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn v6(s: &str) -> Ipv6Addr {
        s.parse().unwrap()
    }

    #[test]
    fn host_loopback_maps_the_gateway_by_default() {
        let c = conf(&[]).unwrap();
        assert_eq!(c.nat.map_host_loopback4, Some(v4("192.0.2.1")));
        assert_eq!(c.nat.map_host_loopback6, Some(v6("fe80::1:1")));
        for off in [&["--no-map-gw"][..], &["--map-host-loopback", "none"]] {
            let c = conf(off).unwrap();
            assert_eq!(
                (c.nat.map_host_loopback4, c.nat.map_host_loopback6),
                (None, None)
            );
        }
        let c = conf(&[
            "--map-host-loopback",
            "192.0.2.99",
            "--map-host-loopback",
            "fe80::99",
        ])
        .unwrap();
        assert_eq!(c.nat.map_host_loopback4, Some(v4("192.0.2.99")));
        assert_eq!(c.nat.map_host_loopback6, Some(v6("fe80::99")));
        // The loopback resolver follows the mapping.
        assert_eq!(c.nat.dns_match4, Some(v4("192.0.2.99")));
        assert!(c.net.ip4.unwrap().dns.contains(&v4("192.0.2.99")));
        // A disabled family maps nothing.
        let c = conf(&["-4"]).unwrap();
        assert_eq!(c.nat.map_host_loopback6, None);
    }

    #[test]
    fn loopback_resolvers_are_never_advertised_as_loopback() {
        let mut h = host();
        h.resolv.nameservers = vec![
            "127.0.0.53".parse().unwrap(),
            "::1".parse().unwrap(),
            "198.51.100.53".parse().unwrap(),
        ];
        let args = Args::default();
        let c = Config::from_args(&args, &h).unwrap();
        let ip4 = c.net.ip4.as_ref().unwrap();
        let ip6 = c.net.ip6.as_ref().unwrap();
        // Order kept: the mapped loopback resolver first.
        assert_eq!(ip4.dns, vec![v4("192.0.2.1"), v4("198.51.100.53")]);
        assert_eq!(ip6.dns, vec![v6("fe80::1:1")]);
        // Queries to the gateway's port 53 go to that loopback resolver itself.
        assert_eq!(c.nat.dns_match4, Some(v4("192.0.2.1")));
        assert_eq!(c.nat.dns_host4, Some(v4("127.0.0.53")));
        assert_eq!(c.nat.dns_match6, Some(v6("fe80::1:1")));
        assert_eq!(c.nat.dns_host6, Some(v6("::1")));

        // Without a mapping, they are left out, with a note.
        let args = Args::try_parse_from(["passt", "--no-map-gw"]).unwrap();
        let c = Config::from_args(&args, &h).unwrap();
        assert_eq!(c.net.ip4.as_ref().unwrap().dns, vec![v4("198.51.100.53")]);
        assert!(c.net.ip6.as_ref().unwrap().dns.is_empty());
        assert_eq!((c.nat.dns_match4, c.nat.dns_match6), (None, None));
        assert!(c.notes.iter().any(|n| n.contains("127.0.0.53")));
        assert!(c.notes.iter().any(|n| n.contains("::1")));
    }

    #[test]
    fn dns_forward_is_advertised_and_goes_to_the_first_resolver() {
        let c = conf(&[
            "--dns-forward",
            "192.0.2.53",
            "--dns-forward",
            "2001:db8::53",
        ])
        .unwrap();
        assert_eq!(c.net.ip4.as_ref().unwrap().dns, vec![v4("192.0.2.53")]);
        assert_eq!(c.net.ip6.as_ref().unwrap().dns, vec![v6("2001:db8::53")]);
        assert_eq!(c.nat.dns_match4, Some(v4("192.0.2.53")));
        // First resolver of the family, loopback or not.
        assert_eq!(c.nat.dns_host4, Some(v4("198.51.100.53")));
        assert_eq!(c.nat.dns_host6, Some(v6("2001:db8:ffff::53")));
        let c = conf(&["--dns-forward", "192.0.2.53", "--dns-host", "127.0.0.1"]).unwrap();
        assert_eq!(c.nat.dns_host4, Some(v4("127.0.0.1")));
        // -D still decides what is advertised; --no-dhcp-dns advertises nothing.
        let c = conf(&["--dns-forward", "192.0.2.53", "-D", "9.9.9.9"]).unwrap();
        assert_eq!(c.net.ip4.as_ref().unwrap().dns, vec![v4("9.9.9.9")]);
        assert_eq!(c.nat.dns_match4, Some(v4("192.0.2.53")));
        let c = conf(&["--dns-forward", "192.0.2.53", "--no-dhcp-dns"]).unwrap();
        assert!(c.net.ip4.as_ref().unwrap().dns.is_empty());
        // No resolver of the family: noted.
        let mut h = host();
        h.resolv.nameservers.clear();
        let args = Args::try_parse_from(["passt", "--dns-forward", "192.0.2.53"]).unwrap();
        let c = Config::from_args(&args, &h).unwrap();
        assert_eq!(c.nat.dns_host4, None);
        assert!(c.notes.iter().any(|n| n.contains("--dns-forward")));
    }

    #[test]
    fn nat_option_errors() {
        for (cmd, opt) in [
            (&["--dns-forward", "x"][..], "--dns-forward"),
            (&["--dns-forward", "127.0.0.1"], "--dns-forward"),
            (&["--dns-forward", "224.0.0.1"], "--dns-forward"),
            (&["--dns-host", "::"], "--dns-host"),
            (&["--map-host-loopback", "0.0.0.0"], "--map-host-loopback"),
            (&["--map-host-loopback", "nope"], "--map-host-loopback"),
            (&["--udp-timeout", "0"], "--udp-timeout"),
        ] {
            assert_eq!(conf(cmd).unwrap_err().option, opt, "{cmd:?}");
        }
        assert_eq!(
            conf(&["--udp-timeout", "5"]).unwrap().udp_timeout,
            Duration::from_secs(5)
        );
    }

    #[test]
    fn explicit_options_override() {
        let c = conf(&[
            "-a",
            "10.0.0.5/16",
            "-g",
            "10.0.0.1",
            "-a",
            "2001:db8:5::5",
            "-M",
            "02:00:00:00:00:AA",
            "-m",
            "1500",
            "-D",
            "9.9.9.9",
            "-S",
            "a.test b.test",
            "-H",
            "guest",
            "--fqdn",
            "guest.a.test",
            "--vhost-user",
        ])
        .unwrap();
        let ip4 = c.net.ip4.as_ref().unwrap();
        assert_eq!(
            (ip4.addr, ip4.prefix_len),
            ("10.0.0.5".parse().unwrap(), 16)
        );
        assert_eq!(ip4.dns, vec!["9.9.9.9".parse::<Ipv4Addr>().unwrap()]);
        assert!(c.net.ip6.as_ref().unwrap().dns.is_empty());
        assert_eq!(c.net.our_mac, [2, 0, 0, 0, 0, 0xaa]);
        assert_eq!(c.net.mtu, Some(1500));
        assert_eq!(
            c.net.dns_search,
            vec!["a.test".to_string(), "b.test".to_string()]
        );
        assert_eq!(c.mode, Mode::VhostUser);
    }

    #[test]
    fn none_and_no_flags_empty_lists() {
        let c = conf(&["-D", "none", "-S", "none"]).unwrap();
        assert!(c.net.ip4.unwrap().dns.is_empty());
        assert!(c.net.dns_search.is_empty());
        let c = conf(&["--no-dhcp-dns", "--no-dhcp-search", "--no-ra", "-m", "0"]).unwrap();
        assert!(c.net.ip6.as_ref().unwrap().dns.is_empty());
        assert!(c.net.dns_search.is_empty());
        assert!(!c.net.ra && c.net.ndp);
        assert_eq!(c.net.mtu, None);
    }

    #[test]
    fn family_selection() {
        assert!(conf(&["-4"]).unwrap().net.ip6.is_none());
        assert!(conf(&["-6"]).unwrap().net.ip4.is_none());
        assert!(conf(&["-m", "1000"]).unwrap().net.ip6.is_none());
        let mut h = host();
        h.v4 = None;
        let c = Config::from_args(&Args::default(), &h).unwrap();
        assert!(c.net.ip4.is_none() && c.notes.iter().any(|n| n.contains("IPv4 disabled")));
        h.v6 = None;
        assert_eq!(
            Config::from_args(&Args::default(), &h).unwrap_err().option,
            "--interface"
        );
    }

    #[test]
    fn errors_name_the_option() {
        for (cmd, opt) in [
            (&["-m", "70000"][..], "--mtu"),
            (&["-m", "20"], "--mtu"),
            (&["-M", "zz:00:00:00:00:00"], "--mac-addr"),
            (&["-M", "00:00:00:00:00"], "--mac-addr"),
            (&["-a", "300.1.1.1"], "--address"),
            (&["-a", "10.0.0.1/33"], "--address"),
            (&["-n", "255.0.255.0"], "--netmask"),
            (&["-g", "gw"], "--gateway"),
            (&["-D", "x"], "--dns"),
            (&["-S", "bad..name"], "--search"),
            (&["--fd=-3"], "--fd"),
            (&["-o", "nope"], "--outbound"),
            (&["--max-flows", "0"], "--max-flows"),
            (&["--map-guest-addr", "127.0.0.1"], "--map-guest-addr"),
            (&["-t", "22-21"], "--tcp-ports"),
            (&["-t", "none", "-t", "22"], "--tcp-ports"),
            (&["-t", "1.2.3.4.5/22"], "--tcp-ports"),
        ] {
            assert_eq!(conf(cmd).unwrap_err().option, opt, "{cmd:?}");
        }
    }

    #[test]
    fn tcp_forwarding_specs_add_up() {
        let c = conf(&[
            "-t",
            "8080:80",
            "-t",
            "127.0.0.1/2222:22,~2223",
            "-t",
            "2222",
        ])
        .unwrap();
        assert_eq!(c.tcp_fwd.guest_port(8080), Some(80));
        assert_eq!(c.tcp_fwd.guest_port(2222), Some(2222));
        assert_eq!(c.tcp_fwd.groups.len(), 3);
        assert!(
            c.notes.iter().any(|n| n.contains("port 2222")),
            "{:?}",
            c.notes
        );
        let e = conf(&["-t", "80:81-82"]).unwrap_err();
        assert!(e.to_string().contains("'80:81-82'"), "{e}");
        assert!(conf(&[]).unwrap().tcp_fwd.is_empty());
    }

    #[test]
    fn netmask_forms() {
        assert_eq!(parse_netmask("255.255.240.0"), Some(20));
        assert_eq!(parse_netmask("0.0.0.0"), Some(0));
        assert_eq!(parse_netmask("255.255.255.255"), Some(32));
        assert_eq!(parse_netmask("17"), Some(17));
        assert_eq!(parse_netmask("33"), None);
        assert_eq!(
            conf(&["-n", "255.255.0.0"])
                .unwrap()
                .net
                .ip4
                .unwrap()
                .prefix_len,
            16
        );
    }
}
