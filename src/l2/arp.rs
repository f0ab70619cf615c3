//! ARP responder: the guest resolves every IPv4 neighbour to our MAC.
//!
//! # Theory of operation
//!
//! The guest sees one link with one other station on it: us. Whatever IPv4 address it
//! asks for (the gateway, another host of its subnet, the host's own address under another
//! name), the frame has to reach us, so every request is answered with
//! [`NetConfig::our_mac`]. Two kinds of request must not be answered, because a reply
//! means "this address is taken" to the guest:
//! - requests for the guest's own address ([`Ip4::addr`]): duplicate address detection
//!   probes (RFC 5227) and gratuitous announcements of that address;
//! - gratuitous requests for any other address (sender address equal to the target
//!   address): the guest announcing an address it added itself.
//!
//! ARP replies, unknown operations and requests for `0.0.0.0` are ignored. Without IPv4
//! ([`NetConfig::ip4`] is `None`) every frame is ignored, well-formed or not: there is no
//! IPv4 link to speak of.
//!
//! [`Ip4::addr`]: crate::conf::Ip4::addr

use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr, ETHERNET_HEADER_LEN,
};

use super::Verdict;
use crate::conf::NetConfig;

/// Answers one ARP frame from the guest.
///
/// `frame` is a whole Ethernet frame (ethertype ARP). A reply is written to the start of
/// `out`; it is 42 bytes long (not padded to the Ethernet minimum: virtio and stream
/// transports carry short frames as they are). If `out` is shorter than that, the request
/// is [`Verdict::Ignored`] rather than answered in part.
///
/// [`Verdict::Malformed`]: truncated frame or ARP packet, or hardware/protocol types and
/// lengths other than Ethernet and IPv4.
pub fn handle(cfg: &NetConfig, frame: &[u8], out: &mut [u8]) -> Verdict {
    let Some(ip4) = &cfg.ip4 else {
        return Verdict::Ignored;
    };
    let Ok(eth) = EthernetFrame::new_checked(frame) else {
        return Verdict::Malformed;
    };
    if eth.ethertype() != EthernetProtocol::Arp {
        return Verdict::Ignored;
    }
    // `parse` rejects anything but Ethernet/IPv4 with 6- and 4-byte addresses, after
    // `new_checked` made sure the addresses the lengths announce are all there.
    let Ok(arp) = ArpPacket::new_checked(eth.payload()) else {
        return Verdict::Malformed;
    };
    let Ok(ArpRepr::EthernetIpv4 {
        operation,
        source_hardware_addr,
        source_protocol_addr,
        target_protocol_addr,
        ..
    }) = ArpRepr::parse(&arp)
    else {
        return Verdict::Malformed;
    };

    if operation != ArpOperation::Request
        || target_protocol_addr == ip4.addr
        || target_protocol_addr == source_protocol_addr
        || target_protocol_addr.is_unspecified()
    {
        return Verdict::Ignored;
    }

    let our_mac = EthernetAddress(cfg.our_mac);
    let reply = ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Reply,
        source_hardware_addr: our_mac,
        source_protocol_addr: target_protocol_addr,
        target_hardware_addr: source_hardware_addr,
        target_protocol_addr: source_protocol_addr,
    };
    let eth_repr = EthernetRepr {
        src_addr: our_mac,
        dst_addr: source_hardware_addr,
        ethertype: EthernetProtocol::Arp,
    };
    let len = ETHERNET_HEADER_LEN + reply.buffer_len();
    let Some(buf) = out.get_mut(..len) else {
        return Verdict::Ignored;
    };
    let mut out_eth = EthernetFrame::new_unchecked(buf);
    eth_repr.emit(&mut out_eth);
    reply.emit(&mut ArpPacket::new_unchecked(out_eth.payload_mut()));
    Verdict::Reply(len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conf::Ip4;
    use crate::l2::REPLY_BUF_LEN;
    use std::net::Ipv4Addr;

    const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
    const GUEST: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
    const GW: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);

    fn cfg() -> NetConfig {
        NetConfig {
            our_mac: [0x9a, 0x55, 0x9a, 0x55, 0x9a, 0x55],
            ip4: Some(Ip4 {
                addr: GUEST,
                prefix_len: 24,
                gateway: GW,
                dns: vec![],
            }),
            ..NetConfig::default()
        }
    }

    /// An ARP frame as Linux sends it: broadcast, 42 bytes, built byte by byte.
    fn arp_frame(op: u16, spa: Ipv4Addr, tpa: Ipv4Addr) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&[0xff; 6]);
        f.extend_from_slice(&GUEST_MAC);
        f.extend_from_slice(&[0x08, 0x06]);
        f.extend_from_slice(&[0x00, 0x01, 0x08, 0x00, 6, 4]);
        f.extend_from_slice(&op.to_be_bytes());
        f.extend_from_slice(&GUEST_MAC);
        f.extend_from_slice(&spa.octets());
        f.extend_from_slice(&[0; 6]);
        f.extend_from_slice(&tpa.octets());
        f
    }

    fn run(cfg: &NetConfig, frame: &[u8]) -> (Verdict, Vec<u8>) {
        let mut out = vec![0u8; REPLY_BUF_LEN];
        let v = handle(cfg, frame, &mut out);
        if let Verdict::Reply(n) = v {
            out.truncate(n);
        }
        (v, out)
    }

    fn check_reply(out: &[u8], asked: Ipv4Addr) {
        let eth = EthernetFrame::new_checked(out).unwrap();
        assert_eq!(eth.dst_addr(), EthernetAddress(GUEST_MAC));
        assert_eq!(eth.src_addr(), EthernetAddress(cfg().our_mac));
        assert_eq!(eth.ethertype(), EthernetProtocol::Arp);
        let arp = ArpPacket::new_checked(eth.payload()).unwrap();
        assert_eq!(
            ArpRepr::parse(&arp).unwrap(),
            ArpRepr::EthernetIpv4 {
                operation: ArpOperation::Reply,
                source_hardware_addr: EthernetAddress(cfg().our_mac),
                source_protocol_addr: asked,
                target_hardware_addr: EthernetAddress(GUEST_MAC),
                target_protocol_addr: GUEST,
            }
        );
        assert_eq!(out.len(), 42);
    }

    #[test]
    fn answers_for_gateway_and_any_other_address() {
        for asked in [GW, Ipv4Addr::new(192, 0, 2, 77), Ipv4Addr::new(8, 8, 8, 8)] {
            let (v, out) = run(&cfg(), &arp_frame(1, GUEST, asked));
            assert_eq!(v, Verdict::Reply(42), "{asked}");
            check_reply(&out, asked);
        }
    }

    #[test]
    fn answers_requests_padded_to_ethernet_minimum() {
        let mut f = arp_frame(1, GUEST, GW);
        f.resize(60, 0);
        let (v, out) = run(&cfg(), &f);
        assert_eq!(v, Verdict::Reply(42));
        check_reply(&out, GW);
    }

    #[test]
    fn ignores_own_address_gratuitous_replies_and_no_ipv4() {
        // DAD probe (sender 0.0.0.0) and announcement of the guest's address.
        let probe = arp_frame(1, Ipv4Addr::UNSPECIFIED, GUEST);
        assert_eq!(run(&cfg(), &probe).0, Verdict::Ignored);
        assert_eq!(run(&cfg(), &arp_frame(1, GUEST, GUEST)).0, Verdict::Ignored);
        let other = Ipv4Addr::new(192, 0, 2, 9);
        assert_eq!(run(&cfg(), &arp_frame(1, other, other)).0, Verdict::Ignored);
        assert_eq!(run(&cfg(), &arp_frame(2, GUEST, GW)).0, Verdict::Ignored);
        assert_eq!(run(&cfg(), &arp_frame(3, GUEST, GW)).0, Verdict::Ignored);
        let zero = arp_frame(1, GUEST, Ipv4Addr::UNSPECIFIED);
        assert_eq!(run(&cfg(), &zero).0, Verdict::Ignored);
        let no4 = NetConfig { ip4: None, ..cfg() };
        assert_eq!(run(&no4, &arp_frame(1, GUEST, GW)).0, Verdict::Ignored);
        assert_eq!(run(&no4, &[0u8; 3]).0, Verdict::Ignored);
    }

    #[test]
    fn rejects_malformed() {
        let good = arp_frame(1, GUEST, GW);
        // Truncated Ethernet header, truncated ARP packet.
        assert_eq!(run(&cfg(), &good[..13]).0, Verdict::Malformed);
        assert_eq!(run(&cfg(), &good[..41]).0, Verdict::Malformed);
        assert_eq!(run(&cfg(), &good[..20]).0, Verdict::Malformed);
        for (at, byte) in [
            (15, 6),    // hardware type 6 (IEEE 802)
            (16, 0x86), // protocol type 0x86dd
            (18, 8),    // hardware address length 8
            (19, 16),   // protocol address length 16
        ] {
            let mut f = good.clone();
            f[at] = byte;
            assert_eq!(run(&cfg(), &f).0, Verdict::Malformed, "byte {at}");
        }
    }

    #[test]
    fn small_output_buffer_is_not_a_panic() {
        let mut out = [0u8; 41];
        assert_eq!(
            handle(&cfg(), &arp_frame(1, GUEST, GW), &mut out),
            Verdict::Ignored
        );
    }

    #[test]
    fn every_truncation_and_mutation_is_handled() {
        let good = arp_frame(1, GUEST, GW);
        let mut out = vec![0u8; REPLY_BUF_LEN];
        for n in 0..good.len() {
            assert_eq!(handle(&cfg(), &good[..n], &mut out), Verdict::Malformed);
        }
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..20_000 {
            let mut f = good.clone();
            for _ in 0..=(next() % 4) {
                let at = (next() % f.len() as u64) as usize;
                f[at] = next() as u8;
            }
            if let Verdict::Reply(n) = handle(&cfg(), &f, &mut out) {
                assert_eq!(n, 42);
            }
        }
    }
}
