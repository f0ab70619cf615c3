//! The host's resolver configuration, read from `resolv.conf` (see resolv.conf(5)): the
//! name servers and the search list we may hand to the guest. Only `nameserver`, `search`
//! and `domain` matter; everything else, and anything malformed, is ignored as the C
//! resolver ignores it. Deciding what the guest can actually use (loopback resolvers, limits)
//! is [`super::Config::from_args`]'s business, not ours.

use std::net::IpAddr;
use std::path::Path;

use super::host::Resolv;

/// Parses the text of a `resolv.conf`.
///
/// - `nameserver ADDR`: IPv4 or IPv6, every valid one kept in order (the C resolver uses
///   only the first three; trimming is left to whoever advertises them). An address with a
///   zone (`fe80::1%eth0`) is skipped: the zone names a host interface, which means nothing
///   to the guest, so that server is unreachable for it (passt skips these too).
/// - `search D...` and `domain D`: they set the same list, and the last such line wins.
///   `domain` contributes its first word only. A lone `.` (the root) is dropped.
/// - Lines starting with `#` or `;` are comments, and so is anything from a word starting
///   with `#` or `;`.
pub fn parse(text: &str) -> Resolv {
    let mut resolv = Resolv::default();
    for line in text.lines() {
        let mut words = line
            .split([' ', '\t'])
            .filter(|w| !w.is_empty())
            .take_while(|w| !w.starts_with(['#', ';']));
        match words.next() {
            Some("nameserver") => {
                if let Some(addr) = words.next().and_then(|w| w.parse::<IpAddr>().ok()) {
                    resolv.nameservers.push(addr);
                }
            }
            Some("search") => resolv.search = domains(words),
            Some("domain") => resolv.search = domains(words.take(1)),
            _ => {}
        }
    }
    resolv
}

fn domains<'a>(words: impl Iterator<Item = &'a str>) -> Vec<String> {
    words.filter(|w| *w != ".").map(str::to_owned).collect()
}

/// Reads and parses `path`. A missing or unreadable file is an empty configuration: the
/// guest then gets no resolver from us, which is worth a warning but not worth failing for.
pub fn read(path: &Path) -> Resolv {
    match std::fs::read(path) {
        Ok(bytes) => parse(&String::from_utf8_lossy(&bytes)),
        Err(e) => {
            log::warn!(
                "can't read {}: {e}; no DNS servers or search domains from the host",
                path.display()
            );
            Resolv::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn nameservers_both_families_in_order() {
        let r = parse(
            "nameserver 192.0.2.53\n\
             nameserver\t2001:db8::53  \n\
             nameserver 198.51.100.1 # trailing comment\n",
        );
        assert_eq!(
            r.nameservers,
            ips(&["192.0.2.53", "2001:db8::53", "198.51.100.1"])
        );
        assert!(r.search.is_empty());
    }

    #[test]
    fn scoped_nameserver_skipped() {
        let r = parse("nameserver fe80::1%eth0\nnameserver fe80::2\n");
        assert_eq!(r.nameservers, ips(&["fe80::2"]));
    }

    #[test]
    fn junk_and_comments_ignored() {
        let r = parse(
            "# nameserver 192.0.2.1\n\
             ; nameserver 192.0.2.2\n\
             nameserver\n\
             nameserver 300.1.1.1\n\
             nameserver example.com\n\
             nameserverx 192.0.2.3\n\
             NAMESERVER 192.0.2.4\n\
             options ndots:2 edns0\n\
             sortlist 130.155.160.0/255.255.240.0\n\
             \n\
             \u{0}\u{ff}garbage\n\
             nameserver 192.0.2.5",
        );
        assert_eq!(r.nameservers, ips(&["192.0.2.5"]));
        assert!(r.search.is_empty());
    }

    #[test]
    fn last_of_search_and_domain_wins() {
        let r = parse("domain a.test\nsearch b.test c.test\n");
        assert_eq!(r.search, vec!["b.test", "c.test"]);
        let r = parse("search b.test c.test\ndomain a.test extra.test\n");
        assert_eq!(r.search, vec!["a.test"]);
        let r = parse("search b.test\nsearch\tc.test ; d.test\n");
        assert_eq!(r.search, vec!["c.test"]);
        // An empty or root-only search line clears the list, as it replaces the earlier one.
        let r = parse("search b.test\nsearch .\n");
        assert!(r.search.is_empty());
    }

    #[test]
    fn missing_file_is_empty() {
        let r = read(Path::new("/nonexistent/passt-rs/resolv.conf"));
        assert_eq!(r, Resolv::default());
    }

    #[test]
    fn read_parses_file() {
        let path = std::env::temp_dir().join(format!("passt-rs-resolv-{}", std::process::id()));
        std::fs::write(&path, b"nameserver 192.0.2.9\nsearch x.test\n\xff\xfe\n").unwrap();
        let r = read(&path);
        std::fs::remove_file(&path).unwrap();
        assert_eq!(r.nameservers, ips(&["192.0.2.9"]));
        assert_eq!(r.search, vec!["x.test"]);
    }
}
