//! What the host looks like: the outbound interface per family, its address and default
//! gateway, and the resolver configuration. Filled by [`super::netlink`] and
//! [`super::resolv`]; [`super::Config::from_args`] turns it plus the command line into the
//! guest's view.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The host's IPv4 side: the interface holding the default route, its first address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host4 {
    pub ifname: String,
    pub ifindex: u32,
    pub addr: Ipv4Addr,
    pub prefix_len: u8,
    pub gateway: Ipv4Addr,
}

/// The host's IPv6 side: the interface holding the default route, its first global address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host6 {
    pub ifname: String,
    pub ifindex: u32,
    pub addr: Ipv6Addr,
    pub prefix_len: u8,
    pub gateway: Ipv6Addr,
    /// The interface's own link-local address, if it has one.
    pub link_local: Option<Ipv6Addr>,
}

/// Resolver configuration, as read from `/etc/resolv.conf`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resolv {
    pub nameservers: Vec<IpAddr>,
    pub search: Vec<String>,
}

/// Everything discovered about the host at start-up.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostInfo {
    pub v4: Option<Host4>,
    pub v6: Option<Host6>,
    pub resolv: Resolv,
    pub hostname: Option<String>,
}
