//! The `-t`/`-u` port forwarding specification, spelled as upstream passt spells it, parsed
//! into a [`PortFwd`]: which host ports to listen on (per bind address and interface) and
//! which guest port each one leads to. Pure: no sockets, so every rule is unit-tested.
//!
//! Grammar of one option's argument:
//! - `none`: forward nothing; `all`: every non-ephemeral port (1 to 49151) that can be
//!   bound when we start; `auto` is pasta's (scanning the namespace's listeners), which
//!   passt doesn't have: it is accepted as `none`, with a warning.
//! - otherwise `[ADDR][%IFACE]/` (optional; `ADDR` IPv4 or IPv6, `IFACE` at most 15
//!   bytes) then a comma-separated list of items:
//!   - `P` or `A-B`: forward those host ports to the same guest ports;
//!   - `P:Q` or `A-B:C-D`: forward to other guest ports (ranges of equal length);
//!   - `~P` or `~A-B`: exclude those ports from the ranges of this option; an option made
//!     of excludes only means "every non-ephemeral port but these", like `all`.
//!
//! Several options add up. `none`, `auto` and `all` conflict with any other option of the
//! same protocol; a port given again takes the newer guest port, with a warning. Explicit
//! ports must all be bound when we start; for `all` and excludes-only, a port that can't be
//! bound (in use, privileged) is skipped.

use std::fmt;
use std::net::IpAddr;

/// Number of port numbers.
pub const NUM_PORTS: usize = 1 << 16;
/// First ephemeral port (IANA's dynamic range): `all` stops below it, as upstream passt.
pub const EPHEMERAL_MIN: u16 = 49152;
/// Longest interface name (`IFNAMSIZ` minus its terminating zero).
pub const IFNAME_MAX: usize = 15;

/// A set of port numbers, as a bitmap.
#[derive(Clone, PartialEq, Eq)]
pub struct PortSet(Box<[u64]>);

impl Default for PortSet {
    fn default() -> Self {
        PortSet(vec![0; NUM_PORTS / 64].into_boxed_slice())
    }
}

impl PortSet {
    pub fn insert(&mut self, p: u16) {
        self.0[usize::from(p) / 64] |= 1 << (p % 64);
    }

    pub fn contains(&self, p: u16) -> bool {
        self.0[usize::from(p) / 64] & (1 << (p % 64)) != 0
    }

    pub fn len(&self) -> usize {
        self.0.iter().map(|w| w.count_ones() as usize).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|w| *w == 0)
    }

    /// The ports in the set, ascending.
    pub fn iter(&self) -> impl Iterator<Item = u16> + '_ {
        (0..NUM_PORTS)
            .map(|p| p as u16)
            .filter(move |p| self.contains(*p))
    }
}

impl fmt::Debug for PortSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Ranges, not 49151 numbers.
        let mut first = true;
        let mut iter = self.iter().peekable();
        write!(f, "{{")?;
        while let Some(a) = iter.next() {
            let mut b = a;
            while iter.peek() == Some(&b.wrapping_add(1)) && b != u16::MAX {
                b = iter.next().unwrap_or(b);
            }
            if !first {
                write!(f, ",")?;
            }
            first = false;
            if a == b {
                write!(f, "{a}")?;
            } else {
                write!(f, "{a}-{b}")?;
            }
        }
        write!(f, "}}")
    }
}

/// What one option asks us to listen on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindGroup {
    /// Local address to bind; `None`: any address, of every family the guest has.
    pub addr: Option<IpAddr>,
    /// Interface to bind to (`SO_BINDTODEVICE`).
    pub iface: Option<String>,
    /// Host ports.
    pub ports: PortSet,
    /// `all` or excludes only: a port that can't be bound is skipped, not an error.
    pub best_effort: bool,
    /// The option as given, for messages.
    pub spec: String,
}

/// Forwarding mode of a protocol, as the options set it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FwdMode {
    /// No option given.
    #[default]
    Unset,
    /// `none` (or `auto`, which passt doesn't have).
    None,
    /// Ports, ranges, excludes.
    Spec,
    /// `all`.
    All,
}

/// Port forwarding of one protocol (`-t` or `-u`), from all its options.
#[derive(Clone, PartialEq, Eq)]
pub struct PortFwd {
    pub mode: FwdMode,
    /// Host port to guest port, where [`Self::forwarded`] has the host port.
    map: Box<[u16]>,
    forwarded: PortSet,
    /// What to listen on, one group per option.
    pub groups: Vec<BindGroup>,
}

impl Default for PortFwd {
    fn default() -> Self {
        PortFwd {
            mode: FwdMode::Unset,
            map: vec![0; NUM_PORTS].into_boxed_slice(),
            forwarded: PortSet::default(),
            groups: Vec::new(),
        }
    }
}

impl fmt::Debug for PortFwd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PortFwd")
            .field("mode", &self.mode)
            .field("groups", &self.groups)
            .finish()
    }
}

/// A specification we can't use: the text as given and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid port specifier '{spec}': {problem}")]
pub struct SpecError {
    pub spec: String,
    pub problem: String,
}

/// An inclusive, non-empty range of ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Range {
    first: u16,
    last: u16,
}

impl Range {
    fn len(self) -> u32 {
        u32::from(self.last) - u32::from(self.first) + 1
    }
}

impl PortFwd {
    /// Adds one option's specification. `Ok` carries warnings for the log.
    pub fn add(&mut self, spec: &str) -> Result<Vec<String>, SpecError> {
        let err = |problem: &str| SpecError {
            spec: spec.to_string(),
            problem: problem.to_string(),
        };
        let mut warnings = Vec::new();
        match spec {
            "none" | "auto" | "all" => {
                if self.mode != FwdMode::Unset {
                    return Err(err("conflicts with a previous option for this protocol"));
                }
                if spec == "all" {
                    self.mode = FwdMode::All;
                    let mut ports = PortSet::default();
                    for p in 1..EPHEMERAL_MIN {
                        ports.insert(p);
                        self.set(p, p);
                    }
                    self.groups.push(BindGroup {
                        addr: None,
                        iface: None,
                        ports,
                        best_effort: true,
                        spec: spec.to_string(),
                    });
                } else {
                    if spec == "auto" {
                        warnings.push(format!(
                            "port forwarding mode 'auto' is pasta's: treating '{spec}' as 'none'"
                        ));
                    }
                    self.mode = FwdMode::None;
                }
                return Ok(warnings);
            }
            _ => {}
        }
        if matches!(self.mode, FwdMode::None | FwdMode::All) {
            return Err(err(
                "specific ports can't be combined with none, auto or all",
            ));
        }

        let (addr, iface, list) = match spec.split_once('/') {
            None => (None, None, spec),
            Some((prefix, list)) => {
                let (a, iface) = match prefix.split_once('%') {
                    None => (prefix, None),
                    Some((a, i)) => {
                        if i.is_empty() || i.len() > IFNAME_MAX || i.contains(['/', '%', '\0']) {
                            return Err(err("invalid interface name"));
                        }
                        (a, Some(i.to_string()))
                    }
                };
                let addr = if a.is_empty() && iface.is_some() {
                    None
                } else {
                    match a.parse::<IpAddr>() {
                        Ok(ip) if !ip.is_multicast() => Some(ip),
                        _ => return Err(err("invalid bind address")),
                    }
                };
                (addr, iface, list)
            }
        };

        // Excludes first: they apply to ranges given before them too.
        let mut exclude = PortSet::default();
        let mut exclude_only = true;
        for item in list.split(',') {
            let Some(x) = item.strip_prefix('~') else {
                exclude_only = false;
                continue;
            };
            let r = parse_range(x).map_err(|p| err(&p))?;
            for p in r.first..=r.last {
                if exclude.contains(p) {
                    return Err(err("overlapping excluded ranges"));
                }
                exclude.insert(p);
            }
        }

        let mut ports = PortSet::default();
        if exclude_only {
            for p in (1..EPHEMERAL_MIN).filter(|p| !exclude.contains(*p)) {
                ports.insert(p);
                self.set(p, p);
            }
        } else {
            for item in list.split(',').filter(|i| !i.starts_with('~')) {
                let (host, guest) = match item.split_once(':') {
                    None => {
                        let r = parse_range(item).map_err(|p| err(&p))?;
                        (r, r)
                    }
                    Some((h, g)) => {
                        let h = parse_range(h).map_err(|p| err(&p))?;
                        let g = parse_range(g).map_err(|p| err(&p))?;
                        if h.len() != g.len() {
                            return Err(err(&format!(
                                "ranges {}-{} and {}-{} differ in length",
                                h.first, h.last, g.first, g.last
                            )));
                        }
                        (h, g)
                    }
                };
                for (i, p) in (host.first..=host.last).enumerate() {
                    if exclude.contains(p) {
                        continue;
                    }
                    if self.forwarded.contains(p) || ports.contains(p) {
                        warnings.push(format!(
                            "'{spec}': port {p} was already forwarded: now to guest port {}",
                            guest.first + i as u16
                        ));
                    }
                    ports.insert(p);
                    self.set(p, guest.first + i as u16);
                }
            }
        }
        if ports.is_empty() {
            return Err(err("no port left to forward"));
        }
        self.mode = FwdMode::Spec;
        self.groups.push(BindGroup {
            addr,
            iface,
            ports,
            best_effort: exclude_only,
            spec: spec.to_string(),
        });
        Ok(warnings)
    }

    fn set(&mut self, host: u16, guest: u16) {
        self.forwarded.insert(host);
        self.map[usize::from(host)] = guest;
    }

    /// The guest port a connection to host port `host` goes to, if forwarded.
    pub fn guest_port(&self, host: u16) -> Option<u16> {
        self.forwarded
            .contains(host)
            .then(|| self.map[usize::from(host)])
    }

    /// Whether any port is forwarded.
    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    /// Parses every option of one protocol, in order.
    pub fn parse_all<S: AsRef<str>>(specs: &[S]) -> Result<(PortFwd, Vec<String>), SpecError> {
        let mut fwd = PortFwd::default();
        let mut warnings = Vec::new();
        for s in specs {
            warnings.extend(fwd.add(s.as_ref())?);
        }
        Ok((fwd, warnings))
    }
}

/// `P` or `A-B`, decimal, 1 to 65535, `A <= B`.
fn parse_range(s: &str) -> Result<Range, String> {
    let port = |t: &str| -> Result<u16, String> {
        if t.is_empty() || !t.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!("'{t}' is not a port number"));
        }
        match t.parse::<u32>() {
            Ok(0) => Err("port 0 can't be forwarded".into()),
            Ok(p) if p < NUM_PORTS as u32 => Ok(p as u16),
            _ => Err(format!("port {t} is out of range")),
        }
    };
    let (first, last) = match s.split_once('-') {
        None => {
            let p = port(s)?;
            (p, p)
        }
        Some((a, b)) => (port(a)?, port(b)?),
    };
    if last < first {
        return Err(format!("range {first}-{last} is reversed"));
    }
    Ok(Range { first, last })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(specs: &[&str]) -> PortFwd {
        PortFwd::parse_all(specs)
            .unwrap_or_else(|e| panic!("{specs:?}: {e}"))
            .0
    }

    fn err(specs: &[&str]) -> String {
        match PortFwd::parse_all(specs) {
            Ok(f) => panic!("{specs:?} accepted: {f:?}"),
            Err(e) => e.to_string(),
        }
    }

    fn ports(g: &BindGroup) -> Vec<u16> {
        g.ports.iter().collect()
    }

    #[test]
    fn single_ports_ranges_and_lists() {
        let f = parse(&["22,25", "8000-8002"]);
        assert_eq!(f.mode, FwdMode::Spec);
        assert_eq!(f.groups.len(), 2);
        assert_eq!(ports(&f.groups[0]), vec![22, 25]);
        assert_eq!(ports(&f.groups[1]), vec![8000, 8001, 8002]);
        assert_eq!(f.guest_port(22), Some(22));
        assert_eq!(f.guest_port(8001), Some(8001));
        assert_eq!(f.guest_port(23), None);
        assert_eq!(f.guest_port(7999), None);
        assert!(!f.groups[0].best_effort);
        assert_eq!(f.groups[0].addr, None);
    }

    #[test]
    fn remapping() {
        let f = parse(&["22:2222,8000-8010:9000-9010", "65535:1"]);
        assert_eq!(f.guest_port(22), Some(2222));
        assert_eq!(f.guest_port(8000), Some(9000));
        assert_eq!(f.guest_port(8010), Some(9010));
        assert_eq!(f.guest_port(8011), None);
        assert_eq!(f.guest_port(65535), Some(1));
        assert_eq!(ports(&f.groups[0]).len(), 12);
        assert!(err(&["8000-8010:9000-9009"]).contains("differ in length"));
    }

    #[test]
    fn excludes_within_ranges_and_alone() {
        let f = parse(&["2000-2010,~2003-2005"]);
        assert_eq!(
            ports(&f.groups[0]),
            vec![2000, 2001, 2002, 2006, 2007, 2008, 2009, 2010]
        );
        assert_eq!(f.guest_port(2004), None);
        // An exclude before the range it cuts.
        let f = parse(&["192.0.2.1/~25,20-30:40-50"]);
        assert_eq!(f.guest_port(24), Some(44));
        assert_eq!(f.guest_port(25), None);
        assert_eq!(f.guest_port(26), Some(46));
        // Excludes only: everything non-ephemeral but those.
        let f = parse(&["~20000-20010,~22"]);
        let g = &f.groups[0];
        assert!(g.best_effort);
        assert_eq!(g.ports.len(), usize::from(EPHEMERAL_MIN) - 1 - 11 - 1);
        assert!(g.ports.contains(1) && g.ports.contains(19999) && g.ports.contains(49151));
        assert!(!g.ports.contains(22) && !g.ports.contains(20005));
        assert!(!g.ports.contains(0) && !g.ports.contains(EPHEMERAL_MIN));
        assert!(err(&["~10-20,~15"]).contains("overlapping excluded"));
        assert!(err(&["10-20,~10-20"]).contains("no port left"));
    }

    #[test]
    fn bind_address_and_interface() {
        let f = parse(&[
            "127.0.0.1/22",
            "::1/8080",
            "%lo/23",
            "192.0.2.1%eth0/24",
            "fe80::1%veth-h/25",
        ]);
        let g = |i: usize| (f.groups[i].addr, f.groups[i].iface.as_deref());
        assert_eq!(g(0), (Some("127.0.0.1".parse().unwrap()), None));
        assert_eq!(g(1), (Some("::1".parse().unwrap()), None));
        assert_eq!(g(2), (None, Some("lo")));
        assert_eq!(g(3), (Some("192.0.2.1".parse().unwrap()), Some("eth0")));
        assert_eq!(g(4), (Some("fe80::1".parse().unwrap()), Some("veth-h")));
        assert_eq!(ports(&f.groups[1]), vec![8080]);
        assert_eq!(f.groups[3].spec, "192.0.2.1%eth0/24");
        for bad in [
            "/22",
            "localhost/22",
            "1.2.3/22",
            "224.0.0.1/22",
            "%/22",
            "127.0.0.1%/22",
            "%0123456789abcdef/22",
        ] {
            err(&[bad]);
        }
    }

    #[test]
    fn all_none_auto_and_conflicts() {
        let f = parse(&["all"]);
        assert_eq!(f.mode, FwdMode::All);
        assert!(f.groups[0].best_effort);
        assert_eq!(f.groups[0].ports.len(), usize::from(EPHEMERAL_MIN) - 1);
        assert_eq!(f.guest_port(80), Some(80));
        assert_eq!(f.guest_port(EPHEMERAL_MIN), None);
        let f = parse(&["none"]);
        assert_eq!(f.mode, FwdMode::None);
        assert!(f.is_empty());
        let (f, w) = PortFwd::parse_all(&["auto"]).unwrap();
        assert_eq!(f.mode, FwdMode::None);
        assert!(w[0].contains("auto"), "{w:?}");
        assert!(PortFwd::default().is_empty());
        for specs in [
            &["none", "22"][..],
            &["22", "none"],
            &["all", "22"],
            &["22", "all"],
            &["none", "none"],
            &["all", "auto"],
        ] {
            let e = err(specs);
            assert!(e.contains("conflicts") || e.contains("combined"), "{e}");
        }
    }

    #[test]
    fn a_port_given_again_is_remapped_with_a_warning() {
        let (f, w) = PortFwd::parse_all(&["22", "22:23"]).unwrap();
        assert_eq!(f.guest_port(22), Some(23));
        assert_eq!(w.len(), 1);
        assert!(w[0].contains("port 22"));
        assert!(PortFwd::parse_all(&["22", "23"]).unwrap().1.is_empty());
    }

    #[test]
    fn malformed_items_name_the_spec() {
        for (spec, what) in [
            ("", "not a port"),
            ("22,", "not a port"),
            (",22", "not a port"),
            ("22,,23", "not a port"),
            ("x", "not a port"),
            ("22x", "not a port"),
            ("+22", "not a port"),
            (" 22", "not a port"),
            ("0", "port 0"),
            ("65536", "out of range"),
            ("99999999999999999999", "out of range"),
            ("30-20", "reversed"),
            ("20-", "not a port"),
            ("-20", "not a port"),
            ("22:", "not a port"),
            (":22", "not a port"),
            ("22:23:24", "not a port"),
            ("~", "not a port"),
            ("~22:23", "not a port"),
            ("1-2-3", "not a port"),
        ] {
            let e = err(&[spec]);
            assert!(e.contains(what), "{spec:?}: {e}");
            assert!(e.contains(&format!("'{spec}'")), "{e}");
        }
    }

    #[test]
    fn port_set_debug_shows_ranges() {
        let f = parse(&["1-3,5,7-8"]);
        assert_eq!(format!("{:?}", f.groups[0].ports), "{1-3,5,7-8}");
        let f = parse(&["65534-65535"]);
        assert_eq!(format!("{:?}", f.groups[0].ports), "{65534-65535}");
    }
}
