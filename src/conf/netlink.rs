//! Host discovery over rtnetlink: for each family, the interface holding the default route,
//! its gateway and addresses, which the guest then mirrors. Also [`host_info`], everything
//! [`super::Config::from_args`] needs to know about the host in one call.
//!
//! How a family is found, once at start-up:
//! 1. Dump the family's routes; keep default routes (destination and source prefix length
//!    0, unicast) of the main table, only those leaving through the interface given with
//!    `--interface` if there is one. The lowest metric wins, as it does for the kernel; on
//!    a tie, the first one dumped. A multipath route counts with its first next hop (the
//!    first one through the given interface, with one).
//! 2. Dump the family's addresses and take the output interface's: the route's preferred
//!    source if the interface has it, else the first usable one (not tentative, deprecated
//!    or failed DAD; failing that, the first not failed), for IPv6 the first of global scope
//!    plus the link-local one.
//! 3. A family without such a route, gateway or address is `None`: the guest doesn't get it.
//!
//! Selection works on parsed messages, apart from the socket, so it is unit-tested here;
//! the socket side is tested in `tests/discover.rs` inside throw-away network namespaces.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

use netlink_packet_core::{
    DecodeError, NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP,
    NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressMessage, AddressScope};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

use super::host::{Host4, Host6, HostInfo};
use super::is_link_local6;
use super::resolv;

/// A failed step of host discovery.
#[derive(Debug, thiserror::Error)]
pub enum DiscoverError {
    #[error("opening the rtnetlink socket")]
    Socket(#[source] io::Error),
    #[error("binding the rtnetlink socket")]
    Bind(#[source] io::Error),
    #[error("connecting the rtnetlink socket to the kernel")]
    Connect(#[source] io::Error),
    #[error("sending the {0} dump request")]
    Send(&'static str, #[source] io::Error),
    #[error("receiving the {0} dump")]
    Recv(&'static str, #[source] io::Error),
    #[error("malformed netlink message in the {0} dump")]
    Decode(&'static str, #[source] DecodeError),
    #[error("the kernel refused the {0} dump")]
    Kernel(&'static str, #[source] io::Error),
    #[error("looking up interface '{0}'")]
    NoSuchInterface(String, #[source] io::Error),
    #[error("listing interface names")]
    InterfaceNames(#[source] io::Error),
    #[error("interface {0} has no name: did it just go away?")]
    NoInterfaceName(u32),
}

/// Everything about the host at start-up: routes and addresses through `ifname` (or the
/// default route's interfaces), `/etc/resolv.conf`, the host name.
pub fn host_info(ifname: Option<&str>) -> Result<HostInfo, DiscoverError> {
    let (v4, v6) = discover(ifname)?;
    let hostname = match nix::unistd::gethostname() {
        Ok(name) => name.into_string().ok().filter(|n| !n.is_empty()),
        Err(e) => {
            log::warn!("can't get the host name: {e}");
            None
        }
    };
    Ok(HostInfo {
        v4,
        v6,
        resolv: resolv::read(Path::new("/etc/resolv.conf")),
        hostname,
    })
}

/// Finds the default route per family, and its interface's addresses. With `ifname`, only
/// routes through that interface count; a family without one is `None`.
pub fn discover(ifname: Option<&str>) -> Result<(Option<Host4>, Option<Host6>), DiscoverError> {
    let only_if = match ifname {
        None => None,
        Some(name) => Some(
            nix::net::if_::if_nametoindex(name)
                .map_err(|e| DiscoverError::NoSuchInterface(name.to_owned(), e.into()))?,
        ),
    };
    let mut nl = Rtnl::open()?;

    let v4 = match pick4(
        &nl.routes(AddressFamily::Inet, "IPv4 route")?,
        only_if,
        &nl.addresses(AddressFamily::Inet, "IPv4 address")?,
    ) {
        Ok(p) => Some(Host4 {
            ifname: name_of(p.ifindex, ifname, only_if)?,
            ifindex: p.ifindex,
            addr: p.addr,
            prefix_len: p.prefix_len,
            gateway: p.gateway,
        }),
        Err(why) => {
            log::info!("IPv4: {why}");
            None
        }
    };

    // A kernel without IPv6 refuses the dump: that's no IPv6, not a failure.
    let routes6 = match nl.routes(AddressFamily::Inet6, "IPv6 route") {
        Err(DiscoverError::Kernel(_, e)) if e.raw_os_error() == Some(libc::EAFNOSUPPORT) => {
            Vec::new()
        }
        r => r?,
    };
    let v6 = match pick6(&routes6, only_if, || {
        nl.addresses(AddressFamily::Inet6, "IPv6 address")
    })? {
        Ok(p) => Some(Host6 {
            ifname: name_of(p.ifindex, ifname, only_if)?,
            ifindex: p.ifindex,
            addr: p.addr,
            prefix_len: p.prefix_len,
            gateway: p.gateway,
            link_local: p.link_local,
        }),
        Err(why) => {
            log::info!("IPv6: {why}");
            None
        }
    };
    Ok((v4, v6))
}

fn name_of(
    index: u32,
    given: Option<&str>,
    given_index: Option<u32>,
) -> Result<String, DiscoverError> {
    if let (Some(name), Some(i)) = (given, given_index) {
        if i == index {
            return Ok(name.to_owned());
        }
    }
    nix::net::if_::if_nameindex()
        .map_err(|e| DiscoverError::InterfaceNames(e.into()))?
        .iter()
        .find(|i| i.index() == index)
        .map(|i| i.name().to_string_lossy().into_owned())
        .ok_or(DiscoverError::NoInterfaceName(index))
}

/// What [`pick4`] found.
#[derive(Debug, PartialEq, Eq)]
struct Pick4 {
    ifindex: u32,
    addr: Ipv4Addr,
    prefix_len: u8,
    gateway: Ipv4Addr,
}

/// What [`pick6`] found.
#[derive(Debug, PartialEq, Eq)]
struct Pick6 {
    ifindex: u32,
    addr: Ipv6Addr,
    prefix_len: u8,
    gateway: Ipv6Addr,
    link_local: Option<Ipv6Addr>,
}

/// Why a family is left out, for the log.
type Skip = &'static str;

fn pick4(
    routes: &[RouteMessage],
    only_if: Option<u32>,
    addrs: &[AddressMessage],
) -> Result<Pick4, Skip> {
    let route = default_route(routes, AddressFamily::Inet, only_if).ok_or(NO_ROUTE)?;
    let Some(IpAddr::V4(gateway)) = route.gateway else {
        return Err(NO_GATEWAY);
    };
    let (addr, prefix_len) = pick_addr(addrs, route.ifindex, route.pref_src, |a| a.is_ipv4())
        .ok_or("the default route's interface has no IPv4 address")?;
    let IpAddr::V4(addr) = addr else {
        return Err("the default route's interface has no IPv4 address");
    };
    Ok(Pick4 {
        ifindex: route.ifindex,
        addr,
        prefix_len,
        gateway,
    })
}

/// Like [`pick4`], but the addresses are only dumped once a route was found: the outer
/// `Result` is the dump's.
fn pick6(
    routes: &[RouteMessage],
    only_if: Option<u32>,
    addrs: impl FnOnce() -> Result<Vec<AddressMessage>, DiscoverError>,
) -> Result<Result<Pick6, Skip>, DiscoverError> {
    let Some(route) = default_route(routes, AddressFamily::Inet6, only_if) else {
        return Ok(Err(NO_ROUTE));
    };
    let Some(IpAddr::V6(gateway)) = route.gateway else {
        return Ok(Err(NO_GATEWAY));
    };
    let addrs = addrs()?;
    let global = pick_addr(
        &addrs,
        route.ifindex,
        route.pref_src,
        |a| matches!(a, IpAddr::V6(a) if !is_link_local6(a)),
    );
    let Some((IpAddr::V6(addr), prefix_len)) = global else {
        return Ok(Err(
            "the default route's interface has no global IPv6 address",
        ));
    };
    let link_local = pick_addr(
        &addrs,
        route.ifindex,
        None,
        |a| matches!(a, IpAddr::V6(a) if is_link_local6(a)),
    )
    .and_then(|(a, _)| match a {
        IpAddr::V6(a) => Some(a),
        IpAddr::V4(_) => None,
    });
    Ok(Ok(Pick6 {
        ifindex: route.ifindex,
        addr,
        prefix_len,
        gateway,
        link_local,
    }))
}

const NO_ROUTE: Skip = "no default route (through the given interface)";
const NO_GATEWAY: Skip = "the default route has no gateway of its family";

/// The default route, reduced to what we use of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DefaultRoute {
    ifindex: u32,
    gateway: Option<IpAddr>,
    pref_src: Option<IpAddr>,
    metric: u32,
}

/// The lowest-metric default route of the main table, through `only_if` if given.
fn default_route(
    routes: &[RouteMessage],
    family: AddressFamily,
    only_if: Option<u32>,
) -> Option<DefaultRoute> {
    let mut best: Option<DefaultRoute> = None;
    for r in routes {
        let h = &r.header;
        // Routes in tables above 255 say so in an attribute; the header then holds a
        // placeholder, never the main table's number.
        let table = r
            .attributes
            .iter()
            .find_map(|a| match a {
                RouteAttribute::Table(t) => Some(*t),
                _ => None,
            })
            .unwrap_or(u32::from(h.table));
        if h.address_family != family
            || h.destination_prefix_length != 0
            || h.source_prefix_length != 0
            || h.kind != RouteType::Unicast
            || table != u32::from(RouteHeader::RT_TABLE_MAIN)
        {
            continue;
        }
        let Some(candidate) = first_hop(r, only_if) else {
            continue;
        };
        if best.is_none_or(|b| candidate.metric < b.metric) {
            best = Some(candidate);
        }
    }
    best
}

/// The route's output interface and gateway: its own, or its first next hop's if it is a
/// multipath route (the first through `only_if`, if given).
fn first_hop(route: &RouteMessage, only_if: Option<u32>) -> Option<DefaultRoute> {
    let mut oif = None;
    let mut gateway = None;
    let mut pref_src = None;
    let mut metric = 0;
    let mut hops = None;
    for a in &route.attributes {
        match a {
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Gateway(g) => gateway = ip(g),
            RouteAttribute::PrefSource(s) => pref_src = ip(s),
            RouteAttribute::Priority(m) => metric = *m,
            RouteAttribute::MultiPath(h) => hops = Some(h),
            _ => {}
        }
    }
    if let Some(hops) = hops {
        let hop = hops
            .iter()
            .find(|h| only_if.is_none_or(|i| i == h.interface_index))?;
        oif = Some(hop.interface_index);
        gateway = hop.attributes.iter().find_map(|a| match a {
            RouteAttribute::Gateway(g) => ip(g),
            _ => None,
        });
    }
    let ifindex = oif.filter(|&o| only_if.is_none_or(|i| i == o))?;
    Some(DefaultRoute {
        ifindex,
        gateway,
        pref_src,
        metric,
    })
}

fn ip(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(a) => Some(IpAddr::V4(*a)),
        RouteAddress::Inet6(a) => Some(IpAddr::V6(*a)),
        _ => None,
    }
}

/// The address of `ifindex` that `want` accepts: `pref_src` if present, else the first
/// usable one, else the first that at least didn't fail DAD.
fn pick_addr(
    addrs: &[AddressMessage],
    ifindex: u32,
    pref_src: Option<IpAddr>,
    want: impl Fn(IpAddr) -> bool,
) -> Option<(IpAddr, u8)> {
    let candidates = || {
        addrs
            .iter()
            .filter(|m| m.header.index == ifindex)
            .filter_map(|m| {
                let addr = local_addr(m).filter(|&a| want(a))?;
                // Host-scoped addresses can't be reached from outside: not the guest's to copy.
                (m.header.scope != AddressScope::Host).then_some((
                    addr,
                    m.header.prefix_len,
                    flags(m),
                ))
            })
    };
    let unusable = AddressFlags::Tentative | AddressFlags::Deprecated | AddressFlags::Dadfailed;
    candidates()
        .find(|&(a, _, f)| Some(a) == pref_src && !f.contains(AddressFlags::Dadfailed))
        .or_else(|| candidates().find(|(_, _, f)| !f.intersects(unusable)))
        .or_else(|| candidates().find(|(_, _, f)| !f.contains(AddressFlags::Dadfailed)))
        .map(|(a, p, _)| (a, p))
}

/// The interface's own address. On point-to-point links `IFA_ADDRESS` is the peer's and
/// `IFA_LOCAL` ours; elsewhere they're equal, or IPv6 sends only `IFA_ADDRESS`.
fn local_addr(m: &AddressMessage) -> Option<IpAddr> {
    let mut address = None;
    for a in &m.attributes {
        match a {
            AddressAttribute::Local(l) => return Some(*l),
            AddressAttribute::Address(a) => address = Some(*a),
            _ => {}
        }
    }
    address
}

/// The full 32-bit flags if the kernel sent them, else the header's 8 bits.
fn flags(m: &AddressMessage) -> AddressFlags {
    m.attributes
        .iter()
        .find_map(|a| match a {
            AddressAttribute::Flags(f) => Some(*f),
            _ => None,
        })
        .unwrap_or(AddressFlags::from_bits_retain(u32::from(
            m.header.flags.bits(),
        )))
}

/// A synchronous rtnetlink socket doing one dump at a time.
struct Rtnl {
    sock: Socket,
    seq: u32,
}

impl Rtnl {
    fn open() -> Result<Self, DiscoverError> {
        let mut sock = Socket::new(NETLINK_ROUTE).map_err(DiscoverError::Socket)?;
        sock.bind_auto().map_err(DiscoverError::Bind)?;
        sock.connect(&SocketAddr::new(0, 0))
            .map_err(DiscoverError::Connect)?;
        Ok(Rtnl { sock, seq: 0 })
    }

    fn routes(
        &mut self,
        family: AddressFamily,
        what: &'static str,
    ) -> Result<Vec<RouteMessage>, DiscoverError> {
        let mut req = RouteMessage::default();
        req.header.address_family = family;
        let replies = self.dump(RouteNetlinkMessage::GetRoute(req), what)?;
        Ok(replies
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewRoute(r) => Some(r),
                _ => None,
            })
            .collect())
    }

    fn addresses(
        &mut self,
        family: AddressFamily,
        what: &'static str,
    ) -> Result<Vec<AddressMessage>, DiscoverError> {
        let mut req = AddressMessage::default();
        req.header.family = family;
        let replies = self.dump(RouteNetlinkMessage::GetAddress(req), what)?;
        Ok(replies
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewAddress(a) => Some(a),
                _ => None,
            })
            .collect())
    }

    /// Sends a dump request and collects the replies up to `NLMSG_DONE`. A reply this crate
    /// can't decode is skipped with a warning: an exotic route elsewhere shouldn't stop us.
    fn dump(
        &mut self,
        req: RouteNetlinkMessage,
        what: &'static str,
    ) -> Result<Vec<RouteNetlinkMessage>, DiscoverError> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        header.sequence_number = self.seq;
        let mut msg = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(req));
        msg.finalize();
        let mut buf = vec![0; msg.buffer_len()];
        msg.serialize(&mut buf);
        self.sock
            .send(&buf, 0)
            .map_err(|e| DiscoverError::Send(what, e))?;

        let mut out = Vec::new();
        loop {
            let (buf, _) = self
                .sock
                .recv_from_full()
                .map_err(|e| DiscoverError::Recv(what, e))?;
            let mut off = 0;
            while off < buf.len() {
                let frame = NetlinkBuffer::new_checked(&buf[off..])
                    .map_err(|e| DiscoverError::Decode(what, e))?;
                // Checked above: 16 <= len <= what's left.
                let len = frame.length() as usize;
                let parsed =
                    NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf[off..off + len]);
                off += len.next_multiple_of(4);
                let msg = match parsed {
                    Ok(m) => m,
                    Err(e) => {
                        log::warn!("skipping an undecodable message in the {what} dump: {e}");
                        continue;
                    }
                };
                if msg.header.sequence_number != self.seq {
                    continue;
                }
                match msg.payload {
                    NetlinkPayload::Done(_) => return Ok(out),
                    NetlinkPayload::Error(e) if e.code.is_some() => {
                        return Err(DiscoverError::Kernel(what, e.to_io()))
                    }
                    NetlinkPayload::InnerMessage(m) => out.push(m),
                    _ => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_route::address::AddressHeaderFlags;
    use netlink_packet_route::route::RouteNextHop;

    fn route(family: AddressFamily, attrs: Vec<RouteAttribute>) -> RouteMessage {
        let mut r = RouteMessage::default();
        r.header.address_family = family;
        r.header.table = RouteHeader::RT_TABLE_MAIN;
        r.header.kind = RouteType::Unicast;
        r.attributes = attrs;
        r
    }

    fn gw(s: &str) -> RouteAttribute {
        RouteAttribute::Gateway(s.parse::<IpAddr>().unwrap().into())
    }

    fn default4(oif: u32, gateway: &str, metric: u32) -> RouteMessage {
        route(
            AddressFamily::Inet,
            vec![
                RouteAttribute::Oif(oif),
                gw(gateway),
                RouteAttribute::Priority(metric),
            ],
        )
    }

    fn addr(index: u32, a: &str, prefix_len: u8, flags: AddressFlags) -> AddressMessage {
        let a: IpAddr = a.parse().unwrap();
        let mut m = AddressMessage::default();
        m.header.family = match a {
            IpAddr::V4(_) => AddressFamily::Inet,
            IpAddr::V6(_) => AddressFamily::Inet6,
        };
        m.header.index = index;
        m.header.prefix_len = prefix_len;
        m.attributes = vec![AddressAttribute::Address(a), AddressAttribute::Flags(flags)];
        m
    }

    fn v4(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn v6(s: &str) -> Ipv6Addr {
        s.parse().unwrap()
    }

    #[test]
    fn lowest_metric_default_wins() {
        let mut not_default = default4(5, "192.0.2.99", 0);
        not_default.header.destination_prefix_length = 24;
        let mut other_table = default4(6, "192.0.2.98", 0);
        other_table.header.table = 100;
        let mut big_table = default4(6, "192.0.2.98", 0);
        big_table.header.table = 252;
        big_table.attributes.push(RouteAttribute::Table(1000));
        let mut unreachable = default4(7, "192.0.2.97", 0);
        unreachable.header.kind = RouteType::Unreachable;
        let routes = [
            not_default,
            other_table,
            big_table,
            unreachable,
            default4(2, "192.0.2.1", 200),
            default4(3, "198.51.100.1", 100),
            default4(4, "203.0.113.1", 100),
        ];
        let r = default_route(&routes, AddressFamily::Inet, None).unwrap();
        assert_eq!((r.ifindex, r.metric), (3, 100));
        assert_eq!(r.gateway, Some("198.51.100.1".parse().unwrap()));
        let r = default_route(&routes, AddressFamily::Inet, Some(2)).unwrap();
        assert_eq!(r.gateway, Some("192.0.2.1".parse().unwrap()));
        assert_eq!(default_route(&routes, AddressFamily::Inet, Some(5)), None);
        assert_eq!(default_route(&routes, AddressFamily::Inet6, None), None);
    }

    #[test]
    fn multipath_takes_first_hop() {
        let hop = |index, g: &str| {
            let mut h = RouteNextHop::default();
            h.interface_index = index;
            h.attributes = vec![gw(g)];
            h
        };
        let routes = [route(
            AddressFamily::Inet6,
            vec![RouteAttribute::MultiPath(vec![
                hop(7, "fe80::7"),
                hop(8, "fe80::8"),
            ])],
        )];
        let r = default_route(&routes, AddressFamily::Inet6, None).unwrap();
        assert_eq!(
            (r.ifindex, r.gateway),
            (7, Some("fe80::7".parse().unwrap()))
        );
        let r = default_route(&routes, AddressFamily::Inet6, Some(8)).unwrap();
        assert_eq!(
            (r.ifindex, r.gateway),
            (8, Some("fe80::8".parse().unwrap()))
        );
        assert_eq!(default_route(&routes, AddressFamily::Inet6, Some(9)), None);
    }

    #[test]
    fn ipv4_address_and_gateway() {
        let none = AddressFlags::empty();
        let addrs = [
            addr(1, "127.0.0.1", 8, none),
            addr(2, "2001:db8::2", 64, none),
            addr(2, "192.0.2.2", 24, AddressFlags::Tentative),
            addr(2, "192.0.2.3", 24, none),
            addr(2, "192.0.2.4", 24, none),
        ];
        let routes = [default4(2, "192.0.2.1", 0)];
        assert_eq!(
            pick4(&routes, None, &addrs),
            Ok(Pick4 {
                ifindex: 2,
                addr: v4("192.0.2.3"),
                prefix_len: 24,
                gateway: v4("192.0.2.1"),
            })
        );
        let mut with_src = default4(2, "192.0.2.1", 0);
        with_src
            .attributes
            .push(RouteAttribute::PrefSource(RouteAddress::Inet(v4(
                "192.0.2.4",
            ))));
        assert_eq!(
            pick4(&[with_src], None, &addrs).unwrap().addr,
            v4("192.0.2.4")
        );
        // Nothing usable: the tentative one beats none at all.
        assert_eq!(
            pick4(&routes, None, &addrs[2..3]).unwrap().addr,
            v4("192.0.2.2")
        );
        assert!(pick4(&routes, None, &addrs[..2]).is_err());
        let no_gw = route(AddressFamily::Inet, vec![RouteAttribute::Oif(2)]);
        assert_eq!(pick4(&[no_gw], None, &addrs), Err(NO_GATEWAY));
        assert_eq!(pick4(&[], None, &addrs), Err(NO_ROUTE));
    }

    #[test]
    fn point_to_point_uses_local() {
        let mut m = addr(2, "203.0.113.1", 32, AddressFlags::empty());
        m.attributes
            .insert(0, AddressAttribute::Local("203.0.113.2".parse().unwrap()));
        let routes = [default4(2, "203.0.113.1", 0)];
        assert_eq!(pick4(&routes, None, &[m]).unwrap().addr, v4("203.0.113.2"));
    }

    #[test]
    fn header_flags_when_no_attribute() {
        let mut m = addr(2, "2001:db8::5", 64, AddressFlags::empty());
        m.attributes.truncate(1);
        m.header.flags = AddressHeaderFlags::Deprecated;
        assert!(flags(&m).contains(AddressFlags::Deprecated));
    }

    #[test]
    fn ipv6_global_and_link_local() {
        let none = AddressFlags::empty();
        let addrs = vec![
            addr(2, "fe80::2", 64, AddressFlags::Tentative),
            addr(2, "2001:db8::9", 64, AddressFlags::Deprecated),
            addr(3, "2001:db8:3::3", 64, none),
            addr(2, "2001:db8::2", 64, AddressFlags::Nodad),
            addr(2, "192.0.2.2", 24, none),
        ];
        let routes = [route(
            AddressFamily::Inet6,
            vec![RouteAttribute::Oif(2), gw("fe80::1")],
        )];
        let p = pick6(&routes, None, || Ok(addrs.clone())).unwrap();
        assert_eq!(
            p,
            Ok(Pick6 {
                ifindex: 2,
                addr: v6("2001:db8::2"),
                prefix_len: 64,
                gateway: v6("fe80::1"),
                link_local: Some(v6("fe80::2")),
            })
        );
        let only_ll = || Ok(addrs[..1].to_vec());
        assert!(pick6(&routes, None, only_ll).unwrap().is_err());
        let v4_gw = [route(
            AddressFamily::Inet6,
            vec![RouteAttribute::Oif(2), gw("192.0.2.1")],
        )];
        assert_eq!(
            pick6(&v4_gw, None, || Ok(addrs.clone())).unwrap(),
            Err(NO_GATEWAY)
        );
        // No route: the address dump isn't even asked for.
        let r = pick6(&[], None, || Err(DiscoverError::NoInterfaceName(0)));
        assert_eq!(r.unwrap(), Err(NO_ROUTE));
    }
}
