//! NDP (RFC 4861) for the guest: we are its only router, and the neighbour behind every
//! address it asks about, so all its IPv6 traffic reaches us.
//!
//! # Theory of operation
//!
//! - Router Solicitation: answered with a Router Advertisement (unless RAs are off), sent to
//!   the soliciting address and MAC, or to all nodes when the solicitation came from `::`.
//! - Neighbour Solicitation: answered with a Neighbour Advertisement giving our MAC for any
//!   target except the guest's own address, with the Router, Solicited and Override flags.
//!   Duplicate Address Detection (source `::`) is never answered, whatever the target: an
//!   answer would tell the guest its tentative address is taken.
//! - [`unsolicited_ra`] builds the advertisement the caller sends at start and then
//!   periodically (RFC 4861 §6.2.4) to all nodes; timing is the caller's business.
//! - Everything else (echo, the guest's own advertisements, MLD) is [`Verdict::Ignored`],
//!   after the ICMPv6 checksum is checked: a bad one is [`Verdict::Malformed`] whatever the
//!   type. Solicitations that RFC 4861 §6.1.1 and §7.1.1 say to discard silently (hop limit
//!   not 255, non-zero code) are ignored; ones with broken options are malformed.
//!
//! The advertisement, as upstream passt's: from our link-local address and MAC, current hop
//! limit 255, router lifetime 65535 s (RFC 8319), Managed and Other flags when DHCPv6 is on
//! (so the guest also asks DHCPv6 for its address and configuration), our link-layer address,
//! the MTU if we advertise one, and the guest's /64 as an on-link, autonomous prefix with
//! infinite lifetimes. The prefix is always a /64, as upstream: SLAAC only works with 64-bit
//! interface identifiers, and since we answer every neighbour solicitation, what the guest
//! believes is on-link doesn't change where its packets go. DNS servers and search domains
//! follow (RDNSS and DNSSL, RFC 8106), infinite lifetimes as well.
//!
//! smoltcp writes the headers and the options it knows; RDNSS and DNSSL it doesn't, so they
//! are written by hand right after the smoltcp part, before the checksum is computed over the
//! whole message. Every advertisement fits the IPv6 minimum MTU: DNS servers and domains that
//! don't fit are left out.

use std::net::Ipv6Addr;

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::time::Duration;
use smoltcp::wire::{
    EthernetAddress, EthernetFrame, EthernetProtocol, EthernetRepr, Icmpv6Message, Icmpv6Packet,
    Icmpv6Repr, IpProtocol, Ipv6Packet, Ipv6Repr, NdiscNeighborFlags, NdiscPrefixInfoFlags,
    NdiscPrefixInformation, NdiscRepr, NdiscRouterFlags, ETHERNET_HEADER_LEN, IPV6_HEADER_LEN,
};

use super::dhcpv6::encode_dns_name;
use super::Verdict;
use crate::conf::{Ip6, NetConfig};

/// All NDP messages have this hop limit, which proves they weren't routed (RFC 4861 §3.1).
const HOP_LIMIT: u8 = 255;
pub const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
/// The Ethernet address of `ff02::1` (RFC 2464 §7).
pub const ALL_NODES_MAC: [u8; 6] = [0x33, 0x33, 0, 0, 0, 1];
/// The longest router lifetime there is (RFC 8319).
const ROUTER_LIFETIME_S: u64 = 65535;
/// "Infinity" for prefix, RDNSS and DNSSL lifetimes.
const INFINITE_S: u32 = u32::MAX;
/// SLAAC on Ethernet needs a 64-bit interface identifier (RFC 4862 §5.5.3, RFC 2464 §4).
const SLAAC_PREFIX_LEN: u8 = 64;
/// Largest IPv6 packet we send: the minimum MTU, so no guest link is too small.
const MAX_IP_LEN: usize = 1280;
/// Option types smoltcp doesn't know (RFC 8106).
const OPT_RDNSS: u8 = 25;
const OPT_DNSSL: u8 = 31;
/// RDNSS and DNSSL: type, length, reserved (2), lifetime (4), then the data.
const DNS_OPT_HEADER_LEN: usize = 8;
/// Option lengths count 8-byte units in a byte.
const MAX_OPT_LEN: usize = 255 * 8;

/// Answers an NDP solicitation from the guest: `frame` is a whole Ethernet frame, IPv6,
/// next header ICMPv6. The reply, if any, is a whole frame written at the start of `out`.
pub fn handle(cfg: &NetConfig, frame: &[u8], out: &mut [u8]) -> Verdict {
    let Ok(eth) = EthernetFrame::new_checked(frame) else {
        return Verdict::Malformed;
    };
    if eth.ethertype() != EthernetProtocol::Ipv6 {
        return Verdict::Ignored;
    }
    let Ok(ip) = Ipv6Packet::new_checked(eth.payload()) else {
        return Verdict::Malformed;
    };
    if ip.version() != 6 {
        return Verdict::Malformed;
    }
    // Extension headers (MLD's hop-by-hop, say) mean it's nothing we answer.
    if ip.next_header() != IpProtocol::Icmpv6 {
        return Verdict::Ignored;
    }
    let (src, dst) = (ip.src_addr(), ip.dst_addr());
    let bytes = ip.payload();
    // Type, code, checksum: enough to checksum any type, smoltcp's view rejects unknown ones.
    if bytes.len() < 4 {
        return Verdict::Malformed;
    }
    let icmp = Icmpv6Packet::new_unchecked(bytes);
    if !icmp.verify_checksum(&src, &dst) {
        return Verdict::Malformed;
    }
    if !matches!(
        icmp.msg_type(),
        Icmpv6Message::RouterSolicit | Icmpv6Message::NeighborSolicit
    ) {
        return Verdict::Ignored;
    }
    if icmp.check_len().is_err() {
        return Verdict::Malformed;
    }
    if ip.hop_limit() != HOP_LIMIT || icmp.msg_code() != 0 {
        return Verdict::Ignored;
    }
    // Zero-length and truncated options are errors here.
    let Ok(ndisc) = NdiscRepr::parse(&icmp) else {
        return Verdict::Malformed;
    };
    let ip6 = match &cfg.ip6 {
        Some(ip6) if cfg.ndp => ip6,
        _ => return Verdict::Ignored,
    };
    let reply = match ndisc {
        NdiscRepr::RouterSolicit { lladdr } => {
            if !cfg.ra {
                return Verdict::Ignored;
            }
            if src.is_unspecified() {
                // RFC 4861 §6.1.1: no link-layer address without a source address.
                if lladdr.is_some() {
                    return Verdict::Ignored;
                }
                build_ra(cfg, ip6, EthernetAddress(ALL_NODES_MAC), ALL_NODES, out)
            } else {
                build_ra(cfg, ip6, eth.src_addr(), src, out)
            }
        }
        NdiscRepr::NeighborSolicit { target_addr, .. } => {
            if src.is_unspecified()
                || target_addr == ip6.addr
                || target_addr.is_multicast()
                || target_addr.is_unspecified()
            {
                return Verdict::Ignored;
            }
            let na = NdiscRepr::NeighborAdvert {
                flags: NdiscNeighborFlags::ROUTER
                    | NdiscNeighborFlags::SOLICITED
                    | NdiscNeighborFlags::OVERRIDE,
                target_addr,
                lladdr: Some(EthernetAddress(cfg.our_mac).into()),
            };
            emit(cfg, ip6.our_ll, eth.src_addr(), src, na, 0, out)
        }
        _ => return Verdict::Ignored,
    };
    reply.map_or(Verdict::Ignored, Verdict::Reply)
}

/// The Router Advertisement for all nodes, sent at start and periodically; `None` if RAs are
/// off, there's no IPv6, or `out` is too small. Returns the frame's length.
pub fn unsolicited_ra(cfg: &NetConfig, out: &mut [u8]) -> Option<usize> {
    let ip6 = cfg.ip6.as_ref()?;
    if !cfg.ra || !cfg.ndp {
        return None;
    }
    build_ra(cfg, ip6, EthernetAddress(ALL_NODES_MAC), ALL_NODES, out)
}

fn slaac_prefix(addr: Ipv6Addr) -> Ipv6Addr {
    Ipv6Addr::from(u128::from(addr) & (u128::MAX << (128 - u32::from(SLAAC_PREFIX_LEN))))
}

fn build_ra(
    cfg: &NetConfig,
    ip6: &Ip6,
    dst_mac: EthernetAddress,
    dst: Ipv6Addr,
    out: &mut [u8],
) -> Option<usize> {
    let flags = if cfg.dhcpv6 {
        NdiscRouterFlags::MANAGED | NdiscRouterFlags::OTHER
    } else {
        NdiscRouterFlags::empty()
    };
    let ra = NdiscRepr::RouterAdvert {
        hop_limit: HOP_LIMIT,
        flags,
        router_lifetime: Duration::from_secs(ROUTER_LIFETIME_S),
        // Unspecified: the guest keeps its defaults.
        reachable_time: Duration::ZERO,
        retrans_time: Duration::ZERO,
        lladdr: Some(EthernetAddress(cfg.our_mac).into()),
        mtu: cfg.mtu.map(u32::from),
        prefix_info: Some(NdiscPrefixInformation {
            prefix_len: SLAAC_PREFIX_LEN,
            flags: NdiscPrefixInfoFlags::ON_LINK | NdiscPrefixInfoFlags::ADDRCONF,
            valid_lifetime: Duration::from_secs(INFINITE_S.into()),
            preferred_lifetime: Duration::from_secs(INFINITE_S.into()),
            prefix: slaac_prefix(ip6.addr),
        }),
    };
    // RDNSS and DNSSL go right after what smoltcp writes, in what room is left.
    let extra_at = ETHERNET_HEADER_LEN + IPV6_HEADER_LEN + ra.buffer_len();
    let cap = out.len().min(ETHERNET_HEADER_LEN + MAX_IP_LEN);
    let extra = out.get_mut(extra_at..cap)?;
    let mut extra_len = write_rdnss(&ip6.dns, extra);
    extra_len += extra
        .get_mut(extra_len..)
        .map_or(0, |rest| write_dnssl(&cfg.dns_search, rest));
    emit(cfg, ip6.our_ll, dst_mac, dst, ra, extra_len, out)
}

/// The RDNSS option with as many of `servers` as fit; returns its length (0: none).
fn write_rdnss(servers: &[Ipv6Addr], buf: &mut [u8]) -> usize {
    let room = buf.len().min(MAX_OPT_LEN);
    let n = servers
        .len()
        .min(room.saturating_sub(DNS_OPT_HEADER_LEN) / 16);
    if n == 0 {
        return 0;
    }
    let len = DNS_OPT_HEADER_LEN + 16 * n;
    let Some(opt) = buf.get_mut(..len) else {
        return 0;
    };
    let (header, addrs) = opt.split_at_mut(DNS_OPT_HEADER_LEN);
    header[0] = OPT_RDNSS;
    header[1] = (len / 8) as u8;
    header[2..4].fill(0);
    header[4..8].copy_from_slice(&INFINITE_S.to_be_bytes());
    for (slot, addr) in addrs.chunks_exact_mut(16).zip(servers) {
        slot.copy_from_slice(&addr.octets());
    }
    len
}

/// The DNSSL option with as many of `domains` as fit, zero-padded to 8 bytes; returns its
/// length (0: none). Names that can't be encoded are left out.
fn write_dnssl(domains: &[String], buf: &mut [u8]) -> usize {
    // A multiple of 8, so padding never needs more room than there is.
    let room = buf.len().min(MAX_OPT_LEN) & !7;
    let Some(opt) = buf.get_mut(..room) else {
        return 0;
    };
    let mut len = DNS_OPT_HEADER_LEN;
    for name in domains {
        if let Some(n) = opt.get_mut(len..).and_then(|b| encode_dns_name(name, b)) {
            len += n;
        }
    }
    if len == DNS_OPT_HEADER_LEN {
        return 0;
    }
    let padded = len.div_ceil(8) * 8;
    opt[len..padded].fill(0);
    opt[0] = OPT_DNSSL;
    opt[1] = (padded / 8) as u8;
    opt[2..4].fill(0);
    opt[4..8].copy_from_slice(&INFINITE_S.to_be_bytes());
    padded
}

/// Writes Ethernet, IPv6 and the ICMPv6 message `repr` into `out`, followed by `extra` bytes
/// of options already in place after it, and checksums the lot. Returns the frame's length.
fn emit(
    cfg: &NetConfig,
    src: Ipv6Addr,
    dst_mac: EthernetAddress,
    dst: Ipv6Addr,
    repr: NdiscRepr<'_>,
    extra: usize,
    out: &mut [u8],
) -> Option<usize> {
    let icmp_len = repr.buffer_len() + extra;
    let total = ETHERNET_HEADER_LEN + IPV6_HEADER_LEN + icmp_len;
    let frame = out.get_mut(..total)?;
    // smoltcp leaves some reserved bytes alone (the MTU option's, for one).
    frame[..total - extra].fill(0);
    let mut eth = EthernetFrame::new_unchecked(frame);
    EthernetRepr {
        src_addr: EthernetAddress(cfg.our_mac),
        dst_addr: dst_mac,
        ethertype: EthernetProtocol::Ipv6,
    }
    .emit(&mut eth);
    let mut ip = Ipv6Packet::new_unchecked(eth.payload_mut());
    Ipv6Repr {
        src_addr: src,
        dst_addr: dst,
        next_header: IpProtocol::Icmpv6,
        payload_len: icmp_len,
        hop_limit: HOP_LIMIT,
    }
    .emit(&mut ip);
    let mut icmp = Icmpv6Packet::new_unchecked(ip.payload_mut());
    Icmpv6Repr::Ndisc(repr).emit(&src, &dst, &mut icmp, &ChecksumCapabilities::default());
    Some(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::l2::test_util::csum6;
    use smoltcp::wire::{NdiscOption, RawHardwareAddress};

    const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
    const OUR_MAC: [u8; 6] = [0x9a, 0x55, 0x9a, 0x55, 0x9a, 0x55];

    fn ip(s: &str) -> Ipv6Addr {
        s.parse().unwrap()
    }

    fn guest_ll() -> Ipv6Addr {
        ip("fe80::5054:ff:fe12:3456")
    }

    fn our_ll() -> Ipv6Addr {
        ip("fe80::1:1")
    }

    fn cfg() -> NetConfig {
        NetConfig {
            our_mac: OUR_MAC,
            mtu: Some(65520),
            ip6: Some(Ip6 {
                addr: ip("2001:db8:0:1::2"),
                prefix_len: 48,
                gateway: our_ll(),
                our_ll: our_ll(),
                dns: vec![ip("2001:db8:ffff::53"), ip("2001:db8:ffff::54")],
            }),
            dns_search: vec!["example.test".into(), "b.test".into()],
            ..NetConfig::default()
        }
    }

    fn icmp_csum(src: Ipv6Addr, dst: Ipv6Addr, icmp: &[u8]) -> u16 {
        csum6(src, dst, 58, icmp)
    }

    /// Re-does the ICMPv6 checksum of a frame built by [`frame`].
    fn fix_csum(f: &mut [u8]) {
        if f.len() < 58 {
            return;
        }
        let src: [u8; 16] = f[22..38].try_into().unwrap();
        let dst: [u8; 16] = f[38..54].try_into().unwrap();
        f[56..58].copy_from_slice(&[0, 0]);
        let c = icmp_csum(src.into(), dst.into(), &f[54..]);
        f[56..58].copy_from_slice(&c.to_be_bytes());
    }

    /// A frame from the guest: `icmp` with its checksum field zero, filled in here.
    fn frame(dst_mac: [u8; 6], src: Ipv6Addr, dst: Ipv6Addr, icmp: &[u8]) -> Vec<u8> {
        let mut f = dst_mac.to_vec();
        f.extend(GUEST_MAC);
        f.extend([0x86, 0xdd, 0x60, 0, 0, 0]);
        f.extend((icmp.len() as u16).to_be_bytes());
        f.extend([58, 255]);
        f.extend(src.octets());
        f.extend(dst.octets());
        f.extend(icmp);
        fix_csum(&mut f);
        f
    }

    /// A Router Solicitation as Linux sends it: to all routers, with our source MAC.
    fn linux_rs() -> Vec<u8> {
        let mut icmp = vec![133, 0, 0, 0, 0, 0, 0, 0, 1, 1];
        icmp.extend(GUEST_MAC);
        frame([0x33, 0x33, 0, 0, 0, 2], guest_ll(), ip("ff02::2"), &icmp)
    }

    fn rs_from_unspecified() -> Vec<u8> {
        let icmp = [133, 0, 0, 0, 0, 0, 0, 0];
        frame(
            [0x33, 0x33, 0, 0, 0, 2],
            Ipv6Addr::UNSPECIFIED,
            ip("ff02::2"),
            &icmp,
        )
    }

    fn solicited_node(target: Ipv6Addr) -> (Ipv6Addr, [u8; 6]) {
        let t = target.octets();
        let mut a = ip("ff02::1:ff00:0").octets();
        a[13..].copy_from_slice(&t[13..]);
        (a.into(), [0x33, 0x33, 0xff, t[13], t[14], t[15]])
    }

    fn ns(src: Ipv6Addr, target: Ipv6Addr) -> Vec<u8> {
        let mut icmp = vec![135, 0, 0, 0, 0, 0, 0, 0];
        icmp.extend(target.octets());
        if !src.is_unspecified() {
            icmp.extend([1, 1]);
            icmp.extend(GUEST_MAC);
        }
        let (dst, mac) = solicited_node(target);
        frame(mac, src, dst, &icmp)
    }

    fn echo_request() -> Vec<u8> {
        let icmp = [128, 0, 0, 0, 0x12, 0x34, 0, 1, b'h', b'i'];
        frame(OUR_MAC, guest_ll(), ip("2001:db8:5::1"), &icmp)
    }

    fn run(c: &NetConfig, f: &[u8]) -> (Verdict, Vec<u8>) {
        // Junk in the buffer: the reply must set every byte it covers.
        let mut out = vec![0xa5u8; 2048];
        let v = handle(c, f, &mut out);
        if let Verdict::Reply(n) = v {
            out.truncate(n);
        }
        (v, out)
    }

    /// Parses a reply with smoltcp, checksum included, and checks the headers.
    fn parse_reply(
        reply: &[u8],
        dst_mac: [u8; 6],
        dst: Ipv6Addr,
    ) -> (NdiscRepr<'_>, Icmpv6Packet<&[u8]>) {
        let eth = EthernetFrame::new_checked(reply).unwrap();
        let er = EthernetRepr::parse(&eth).unwrap();
        assert_eq!(er.src_addr, EthernetAddress(OUR_MAC));
        assert_eq!(er.dst_addr, EthernetAddress(dst_mac));
        assert_eq!(er.ethertype, EthernetProtocol::Ipv6);
        let ipp = Ipv6Packet::new_checked(eth.payload()).unwrap();
        let ir = Ipv6Repr::parse(&ipp).unwrap();
        assert_eq!(ir.src_addr, our_ll());
        assert_eq!(ir.dst_addr, dst);
        assert_eq!(ir.next_header, IpProtocol::Icmpv6);
        assert_eq!(ir.hop_limit, 255);
        assert_eq!(ir.payload_len + 54, reply.len(), "no trailing bytes");
        assert!(reply.len() - 14 <= MAX_IP_LEN);
        assert_eq!(
            &reply[14..18],
            &[0x60, 0, 0, 0],
            "traffic class, flow label"
        );
        let payload = ipp.payload();
        assert_eq!(icmp_csum(our_ll(), dst, payload), 0, "ICMPv6 checksum");
        let icmp = Icmpv6Packet::new_checked(payload).unwrap();
        let repr =
            Icmpv6Repr::parse(&our_ll(), &dst, &icmp, &ChecksumCapabilities::default()).unwrap();
        match repr {
            Icmpv6Repr::Ndisc(n) => (n, icmp),
            other => panic!("not NDP: {other:?}"),
        }
    }

    /// Options of an NDP message, raw: (type, bytes including the header).
    fn raw_options<'a>(icmp: &Icmpv6Packet<&'a [u8]>) -> Vec<(u8, &'a [u8])> {
        let mut rest = icmp.payload();
        let mut v = Vec::new();
        while !rest.is_empty() {
            let o = NdiscOption::new_checked(rest).unwrap();
            let len = usize::from(o.data_len()) * 8;
            v.push((rest[0], &rest[..len]));
            rest = &rest[len..];
        }
        v
    }

    fn check_ra(reply: &[u8], dst_mac: [u8; 6], dst: Ipv6Addr, c: &NetConfig) {
        let (repr, icmp) = parse_reply(reply, dst_mac, dst);
        let NdiscRepr::RouterAdvert {
            hop_limit,
            flags,
            router_lifetime,
            reachable_time,
            retrans_time,
            lladdr,
            mtu,
            prefix_info,
        } = repr
        else {
            panic!("not an RA: {repr:?}");
        };
        assert_eq!(hop_limit, 255);
        let mo = NdiscRouterFlags::MANAGED | NdiscRouterFlags::OTHER;
        assert_eq!(
            flags,
            if c.dhcpv6 {
                mo
            } else {
                NdiscRouterFlags::empty()
            }
        );
        assert_eq!(icmp.msg_code(), 0);
        assert_eq!(router_lifetime, Duration::from_secs(65535));
        assert_eq!(reachable_time, Duration::ZERO);
        assert_eq!(retrans_time, Duration::ZERO);
        assert_eq!(lladdr, Some(RawHardwareAddress::from_bytes(&OUR_MAC)));
        assert_eq!(mtu, c.mtu.map(u32::from));
        let p = prefix_info.unwrap();
        assert_eq!(p.prefix, ip("2001:db8:0:1::"));
        assert_eq!(p.prefix_len, 64);
        assert_eq!(
            p.flags,
            NdiscPrefixInfoFlags::ON_LINK | NdiscPrefixInfoFlags::ADDRCONF
        );
        assert_eq!(p.valid_lifetime, Duration::from_secs(0xffff_ffff));
        assert_eq!(p.preferred_lifetime, Duration::from_secs(0xffff_ffff));

        let opts = raw_options(&icmp);
        let find = |t: u8| opts.iter().find(|(ty, _)| *ty == t).map(|(_, b)| *b);
        for (t, _) in &opts {
            assert_eq!(opts.iter().filter(|(u, _)| u == t).count(), 1, "type {t}");
        }
        if let Some(m) = find(5) {
            assert_eq!(&m[2..4], &[0, 0], "MTU option reserved bytes");
        }
        assert_eq!(&find(3).unwrap()[12..16], &[0; 4], "prefix reserved bytes");
        let dns = &c.ip6.as_ref().unwrap().dns;
        match find(OPT_RDNSS) {
            None => assert!(dns.is_empty()),
            Some(r) => {
                assert_eq!(usize::from(r[1]), 1 + 2 * dns.len());
                assert_eq!(&r[2..8], &[0, 0, 0xff, 0xff, 0xff, 0xff]);
                let got: Vec<Ipv6Addr> = r[8..]
                    .chunks(16)
                    .map(|a| <[u8; 16]>::try_from(a).unwrap().into())
                    .collect();
                assert_eq!(&got, dns);
            }
        }
        match find(OPT_DNSSL) {
            None => assert!(c.dns_search.is_empty()),
            Some(d) => {
                assert_eq!(&d[2..8], &[0, 0, 0xff, 0xff, 0xff, 0xff]);
                let mut expect = Vec::new();
                for n in &c.dns_search {
                    for l in n.trim_end_matches('.').split('.') {
                        expect.push(l.len() as u8);
                        expect.extend(l.as_bytes());
                    }
                    expect.push(0);
                }
                expect.resize(expect.len().div_ceil(8) * 8, 0);
                assert_eq!(&d[8..], &expect[..]);
            }
        }
    }

    #[test]
    fn linux_rs_gets_ra_to_the_solicitor() {
        let (v, out) = run(&cfg(), &linux_rs());
        assert!(matches!(v, Verdict::Reply(_)), "{v:?}");
        check_ra(&out, GUEST_MAC, guest_ll(), &cfg());
        // SLLA, MTU, prefix, RDNSS with two servers, DNSSL with 24 bytes of names.
        assert_eq!(out.len(), 54 + 16 + 8 + 8 + 32 + 40 + 8 + 24);
    }

    #[test]
    fn rs_from_unspecified_gets_ra_to_all_nodes() {
        let (v, out) = run(&cfg(), &rs_from_unspecified());
        assert!(matches!(v, Verdict::Reply(_)), "{v:?}");
        check_ra(&out, ALL_NODES_MAC, ALL_NODES, &cfg());
        // But not if it carries a link-layer address (RFC 4861 §6.1.1).
        let mut icmp = vec![133, 0, 0, 0, 0, 0, 0, 0, 1, 1];
        icmp.extend(GUEST_MAC);
        let f = frame(
            [0x33, 0x33, 0, 0, 0, 2],
            Ipv6Addr::UNSPECIFIED,
            ip("ff02::2"),
            &icmp,
        );
        assert_eq!(run(&cfg(), &f).0, Verdict::Ignored);
    }

    #[test]
    fn ra_follows_the_configuration() {
        let mut c = cfg();
        c.dhcpv6 = false;
        c.mtu = None;
        c.dns_search.clear();
        c.ip6.as_mut().unwrap().dns.clear();
        let (v, out) = run(&c, &linux_rs());
        assert!(matches!(v, Verdict::Reply(_)), "{v:?}");
        check_ra(&out, GUEST_MAC, guest_ll(), &c);
        assert_eq!(out.len(), 54 + 16 + 8 + 32);
        // Search domains without DNS servers still go out, and unencodable ones don't.
        c.dns_search = vec!["a..b".into(), "c.test.".into()];
        let (_, out) = run(&c, &linux_rs());
        let (_, icmp) = parse_reply(&out, GUEST_MAC, guest_ll());
        let opts = raw_options(&icmp);
        let dnssl = opts.iter().find(|(t, _)| *t == OPT_DNSSL).unwrap().1;
        assert_eq!(&dnssl[8..], b"\x01c\x04test\x00");
    }

    #[test]
    fn unsolicited_ra_goes_to_all_nodes() {
        let mut out = [0xa5u8; 2048];
        let n = unsolicited_ra(&cfg(), &mut out).unwrap();
        check_ra(&out[..n], ALL_NODES_MAC, ALL_NODES, &cfg());
        let mut c = cfg();
        c.ra = false;
        assert_eq!(unsolicited_ra(&c, &mut out), None);
        c = cfg();
        c.ndp = false;
        assert_eq!(unsolicited_ra(&c, &mut out), None);
        c = cfg();
        c.ip6 = None;
        assert_eq!(unsolicited_ra(&c, &mut out), None);
        assert_eq!(unsolicited_ra(&cfg(), &mut out[..100]), None);
    }

    #[test]
    fn ra_is_cut_to_the_minimum_mtu() {
        let mut c = cfg();
        c.ip6.as_mut().unwrap().dns = (0..200u16)
            .map(|i| Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, i))
            .collect();
        c.dns_search = (0..100).map(|i| format!("{i}.example.test")).collect();
        let mut out = [0u8; 4096];
        let n = unsolicited_ra(&c, &mut out).unwrap();
        assert!(n - 14 <= MAX_IP_LEN);
        let (repr, icmp) = parse_reply(&out[..n], ALL_NODES_MAC, ALL_NODES);
        assert!(matches!(repr, NdiscRepr::RouterAdvert { .. }));
        let opts = raw_options(&icmp);
        let rdnss = opts.iter().find(|(t, _)| *t == OPT_RDNSS).unwrap().1;
        assert!(rdnss.len() > 8 && (rdnss.len() - 8) % 16 == 0);
        // With every server there is, the domains can't have room left.
        assert!(opts.iter().all(|(t, _)| *t != OPT_DNSSL));
        // Domains alone fill what's left, and stay well-formed.
        c.ip6.as_mut().unwrap().dns.clear();
        let n = unsolicited_ra(&c, &mut out).unwrap();
        assert!(n - 14 <= MAX_IP_LEN);
        let (_, icmp) = parse_reply(&out[..n], ALL_NODES_MAC, ALL_NODES);
        let opts = raw_options(&icmp);
        let dnssl = opts.iter().find(|(t, _)| *t == OPT_DNSSL).unwrap().1;
        assert!(dnssl.len() > 1000);
        assert_eq!(&dnssl[8..24], b"\x010\x07example\x04test\x00");
    }

    fn check_na(reply: &[u8], target: Ipv6Addr) {
        let (repr, icmp) = parse_reply(reply, GUEST_MAC, guest_ll());
        assert_eq!(
            repr,
            NdiscRepr::NeighborAdvert {
                flags: NdiscNeighborFlags::ROUTER
                    | NdiscNeighborFlags::SOLICITED
                    | NdiscNeighborFlags::OVERRIDE,
                target_addr: target,
                lladdr: Some(RawHardwareAddress::from_bytes(&OUR_MAC)),
            }
        );
        // Raw: flags byte, reserved, target, then exactly one Target Link-Layer option.
        let raw = icmp.into_inner();
        assert_eq!(raw.len(), 32);
        assert_eq!(&raw[0..2], &[136, 0]);
        assert_eq!(&raw[4..8], &[0xe0, 0, 0, 0]);
        assert_eq!(&raw[8..24], &target.octets());
        assert_eq!(&raw[24..26], &[2, 1]);
        assert_eq!(&raw[26..32], &OUR_MAC);
    }

    #[test]
    fn ns_for_the_gateway_gets_na() {
        let (v, out) = run(&cfg(), &ns(guest_ll(), our_ll()));
        assert!(matches!(v, Verdict::Reply(_)), "{v:?}");
        check_na(&out, our_ll());
    }

    #[test]
    fn ns_for_any_address_gets_na() {
        for t in ["2001:db8:0:1::99", "2001:db8:7::1", "fe80::1234"] {
            let (v, out) = run(&cfg(), &ns(guest_ll(), ip(t)));
            assert!(matches!(v, Verdict::Reply(_)), "{t}: {v:?}");
            check_na(&out, ip(t));
        }
        // From the guest's global address too.
        let mut icmp = vec![135, 0, 0, 0, 0, 0, 0, 0];
        icmp.extend(our_ll().octets());
        let f = frame(OUR_MAC, ip("2001:db8:0:1::2"), our_ll(), &icmp);
        let (v, out) = run(&cfg(), &f);
        assert!(matches!(v, Verdict::Reply(_)), "{v:?}");
        let (repr, _) = parse_reply(&out, GUEST_MAC, ip("2001:db8:0:1::2"));
        assert!(
            matches!(repr, NdiscRepr::NeighborAdvert { target_addr, .. } if target_addr == our_ll())
        );
    }

    #[test]
    fn dad_and_own_address_are_ignored() {
        let own = ip("2001:db8:0:1::2");
        assert_eq!(
            run(&cfg(), &ns(Ipv6Addr::UNSPECIFIED, own)).0,
            Verdict::Ignored
        );
        // DAD for the guest's link-local or SLAAC address: never claim it.
        for t in [guest_ll(), ip("2001:db8:0:1:5054:ff:fe12:3456")] {
            assert_eq!(
                run(&cfg(), &ns(Ipv6Addr::UNSPECIFIED, t)).0,
                Verdict::Ignored
            );
        }
        // The guest asking for its own address.
        assert_eq!(run(&cfg(), &ns(guest_ll(), own)).0, Verdict::Ignored);
        // Multicast target.
        assert_eq!(
            run(&cfg(), &ns(guest_ll(), ip("ff02::1"))).0,
            Verdict::Ignored
        );
    }

    #[test]
    fn other_icmpv6_is_ignored() {
        assert_eq!(run(&cfg(), &echo_request()).0, Verdict::Ignored);
        // An unsolicited Neighbour Advertisement from the guest, an unknown type.
        let mut na = vec![136, 0, 0, 0, 0x20, 0, 0, 0];
        na.extend(guest_ll().octets());
        let f = frame([0x33, 0x33, 0, 0, 0, 1], guest_ll(), ALL_NODES, &na);
        assert_eq!(run(&cfg(), &f).0, Verdict::Ignored);
        let f = frame(OUR_MAC, guest_ll(), our_ll(), &[200, 0, 0, 0]);
        assert_eq!(run(&cfg(), &f).0, Verdict::Ignored);
        // MLD report behind a hop-by-hop header.
        let mut f = linux_rs();
        f[20] = 0;
        assert_eq!(run(&cfg(), &f).0, Verdict::Ignored);
        // IPv4.
        let mut f = linux_rs();
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        assert_eq!(run(&cfg(), &f).0, Verdict::Ignored);
        // But a broken echo request is broken.
        let mut f = echo_request();
        f[60] ^= 1;
        assert_eq!(run(&cfg(), &f).0, Verdict::Malformed);
    }

    #[test]
    fn disabled() {
        let mut c = cfg();
        c.ra = false;
        assert_eq!(run(&c, &linux_rs()).0, Verdict::Ignored);
        assert!(matches!(
            run(&c, &ns(guest_ll(), our_ll())).0,
            Verdict::Reply(_)
        ));
        let mut c = cfg();
        c.ndp = false;
        assert_eq!(run(&c, &linux_rs()).0, Verdict::Ignored);
        assert_eq!(run(&c, &ns(guest_ll(), our_ll())).0, Verdict::Ignored);
        let mut c = cfg();
        c.ip6 = None;
        assert_eq!(run(&c, &linux_rs()).0, Verdict::Ignored);
        assert_eq!(run(&c, &ns(guest_ll(), our_ll())).0, Verdict::Ignored);
    }

    #[test]
    fn small_output_buffer_is_ignored() {
        let mut out = [0u8; 60];
        assert_eq!(handle(&cfg(), &linux_rs(), &mut out), Verdict::Ignored);
        assert_eq!(
            handle(&cfg(), &ns(guest_ll(), our_ll()), &mut out),
            Verdict::Ignored
        );
        let mut out = [0u8; 86];
        assert_eq!(
            handle(&cfg(), &ns(guest_ll(), our_ll()), &mut out),
            Verdict::Reply(86)
        );
    }

    #[test]
    fn ethernet_padding_is_accepted() {
        let mut f = rs_from_unspecified();
        assert_eq!(f.len(), 62);
        f.resize(70, 0);
        assert!(matches!(run(&cfg(), &f).0, Verdict::Reply(_)));
    }

    #[test]
    fn reject_truncated_ethernet() {
        assert_eq!(run(&cfg(), &linux_rs()[..13]).0, Verdict::Malformed);
    }

    #[test]
    fn reject_truncated_ipv6_header() {
        assert_eq!(run(&cfg(), &linux_rs()[..14 + 39]).0, Verdict::Malformed);
    }

    #[test]
    fn reject_payload_length_past_end() {
        let mut f = linux_rs();
        f[19] += 1;
        assert_eq!(run(&cfg(), &f).0, Verdict::Malformed);
    }

    #[test]
    fn reject_truncated_icmpv6_header() {
        let f = frame(OUR_MAC, guest_ll(), our_ll(), &[]);
        assert_eq!(run(&cfg(), &f).0, Verdict::Malformed);
        let f = frame(OUR_MAC, guest_ll(), our_ll(), &[128, 0, 0]);
        assert_eq!(run(&cfg(), &f).0, Verdict::Malformed);
    }

    #[test]
    fn reject_truncated_solicitations() {
        // Checksums right, so only the length is wrong.
        let f = frame(
            [0x33, 0x33, 0, 0, 0, 2],
            guest_ll(),
            ip("ff02::2"),
            &[133, 0, 0, 0, 0],
        );
        assert_eq!(run(&cfg(), &f).0, Verdict::Malformed);
        let mut icmp = vec![135, 0, 0, 0, 0, 0, 0, 0];
        icmp.extend(&our_ll().octets()[..15]);
        let f = frame([0x33, 0x33, 0xff, 0, 0, 1], guest_ll(), our_ll(), &icmp);
        assert_eq!(run(&cfg(), &f).0, Verdict::Malformed);
    }

    #[test]
    fn reject_bad_checksum() {
        for mut f in [linux_rs(), ns(guest_ll(), our_ll())] {
            f[57] ^= 0x10;
            assert_eq!(run(&cfg(), &f).0, Verdict::Malformed);
        }
    }

    #[test]
    fn reject_zero_length_option() {
        let mut icmp = vec![133, 0, 0, 0, 0, 0, 0, 0, 1, 0];
        icmp.extend(GUEST_MAC);
        let f = frame([0x33, 0x33, 0, 0, 0, 2], guest_ll(), ip("ff02::2"), &icmp);
        assert_eq!(run(&cfg(), &f).0, Verdict::Malformed);
    }

    #[test]
    fn reject_option_length_past_end() {
        let mut icmp = vec![133, 0, 0, 0, 0, 0, 0, 0, 1, 2];
        icmp.extend(GUEST_MAC);
        let f = frame([0x33, 0x33, 0, 0, 0, 2], guest_ll(), ip("ff02::2"), &icmp);
        assert_eq!(run(&cfg(), &f).0, Verdict::Malformed);
        // An option header cut short.
        let mut icmp = vec![135, 0, 0, 0, 0, 0, 0, 0];
        icmp.extend(our_ll().octets());
        icmp.extend([1, 1, 0x52, 0x54]);
        let f = frame([0x33, 0x33, 0xff, 0, 0, 1], guest_ll(), our_ll(), &icmp);
        assert_eq!(run(&cfg(), &f).0, Verdict::Malformed);
    }

    #[test]
    fn bad_hop_limit_or_code_is_ignored() {
        for mut f in [linux_rs(), ns(guest_ll(), our_ll())] {
            f[21] = 254;
            assert_eq!(run(&cfg(), &f).0, Verdict::Ignored, "hop limit");
        }
        let mut f = linux_rs();
        f[55] = 1;
        fix_csum(&mut f);
        assert_eq!(run(&cfg(), &f).0, Verdict::Ignored, "code");
    }

    fn valid_frames() -> Vec<Vec<u8>> {
        vec![
            linux_rs(),
            rs_from_unspecified(),
            ns(guest_ll(), our_ll()),
            ns(guest_ll(), ip("2001:db8:7::1")),
        ]
    }

    #[test]
    fn every_truncation_is_malformed() {
        for f in valid_frames() {
            assert!(matches!(run(&cfg(), &f).0, Verdict::Reply(_)));
            for len in 0..f.len() {
                assert_eq!(run(&cfg(), &f[..len]).0, Verdict::Malformed, "at {len}");
            }
        }
        let f = echo_request();
        for len in 0..f.len() {
            assert_eq!(run(&cfg(), &f[..len]).0, Verdict::Malformed, "at {len}");
        }
    }

    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    #[test]
    fn random_mutations_never_panic() {
        let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
        let c = cfg();
        let mut replies = 0;
        for f in valid_frames().into_iter().chain([echo_request()]) {
            for _ in 0..5000 {
                let mut m = f.clone();
                // Sometimes longer, with random options after the message.
                if rng.next() % 4 == 0 {
                    let extra = (rng.next() % 24) as usize;
                    m.extend((0..extra).map(|_| rng.next() as u8));
                    let plen = (m.len() - 54) as u16;
                    m[18..20].copy_from_slice(&plen.to_be_bytes());
                }
                for _ in 0..1 + rng.next() % 4 {
                    let i = (rng.next() as usize) % m.len();
                    m[i] = rng.next() as u8;
                }
                // Mostly keep the checksum right, so mutations reach the NDP parser.
                if rng.next() % 4 != 0 && m.len() >= 58 {
                    fix_csum(&mut m);
                }
                let mut out = vec![0u8; 2048];
                if let Verdict::Reply(n) = handle(&c, &m, &mut out) {
                    replies += 1;
                    let reply = &out[..n];
                    let dst: [u8; 16] = reply[38..54].try_into().unwrap();
                    parse_reply(reply, reply[0..6].try_into().unwrap(), dst.into());
                }
            }
        }
        assert!(replies > 0, "some mutations must still be answered");
    }
}
