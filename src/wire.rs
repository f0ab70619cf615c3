//! Building headers of frames to the guest, over `smoltcp::wire`'s packet views: one place
//! that writes Ethernet, IPv4 and IPv6 headers and the transport checksums, so every L4
//! module emits the same, complete headers.
//!
//! Layout of a frame we build: `[Ethernet 14][IPv4 20 | IPv6 40][L4 header + payload]`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use smoltcp::wire::{
    checksum, EthernetAddress, EthernetFrame, EthernetProtocol, IpProtocol, Ipv4Packet, Ipv6Packet,
};

pub const ETH_HLEN: usize = 14;
pub const IPV4_HLEN: usize = 20;
pub const IPV6_HLEN: usize = 40;
/// Time to live / hop limit of packets we originate towards the guest.
pub const DEFAULT_TTL: u8 = 64;

/// Length of Ethernet + IP headers for this address family.
pub const fn l3_header_len(v6: bool) -> usize {
    ETH_HLEN + if v6 { IPV6_HLEN } else { IPV4_HLEN }
}

/// Writes an Ethernet header at the start of `out` (at least [`ETH_HLEN`] bytes).
pub fn emit_eth(out: &mut [u8], dst: [u8; 6], src: [u8; 6], ethertype: EthernetProtocol) {
    let mut f = EthernetFrame::new_unchecked(&mut out[..ETH_HLEN]);
    f.set_dst_addr(EthernetAddress(dst));
    f.set_src_addr(EthernetAddress(src));
    f.set_ethertype(ethertype);
}

/// Writes Ethernet and IP headers for a packet from `src` to `dst` carrying `payload_len`
/// bytes of `proto`, and returns the header length. `out` must hold
/// [`l3_header_len`] bytes; `src` and `dst` must be of one family (else `None`).
pub fn emit_l3(
    out: &mut [u8],
    eth_dst: [u8; 6],
    eth_src: [u8; 6],
    src: IpAddr,
    dst: IpAddr,
    proto: IpProtocol,
    payload_len: usize,
) -> Option<usize> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let total = u16::try_from(IPV4_HLEN + payload_len).ok()?;
            emit_eth(out, eth_dst, eth_src, EthernetProtocol::Ipv4);
            let mut ip = Ipv4Packet::new_unchecked(&mut out[ETH_HLEN..ETH_HLEN + IPV4_HLEN]);
            ip.set_version(4);
            ip.set_header_len(IPV4_HLEN as u8);
            ip.set_dscp(0);
            ip.set_ecn(0);
            ip.set_total_len(total);
            ip.set_ident(0);
            ip.clear_flags();
            ip.set_dont_frag(true);
            ip.set_frag_offset(0);
            ip.set_hop_limit(DEFAULT_TTL);
            ip.set_next_header(proto);
            ip.set_src_addr(s);
            ip.set_dst_addr(d);
            ip.fill_checksum();
            Some(ETH_HLEN + IPV4_HLEN)
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let plen = u16::try_from(payload_len).ok()?;
            emit_eth(out, eth_dst, eth_src, EthernetProtocol::Ipv6);
            let mut ip = Ipv6Packet::new_unchecked(&mut out[ETH_HLEN..ETH_HLEN + IPV6_HLEN]);
            ip.set_version(6);
            ip.set_traffic_class(0);
            ip.set_flow_label(0);
            ip.set_payload_len(plen);
            ip.set_next_header(proto);
            ip.set_hop_limit(DEFAULT_TTL);
            ip.set_src_addr(s);
            ip.set_dst_addr(d);
            Some(ETH_HLEN + IPV6_HLEN)
        }
        _ => None,
    }
}

/// Transport checksum (complemented, ready to store) over the pseudo-header and the given
/// parts of the L4 header and payload, whose checksum field must be zero.
pub fn l4_checksum(src: IpAddr, dst: IpAddr, proto: IpProtocol, parts: &[&[u8]]) -> u16 {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let pseudo = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => checksum::pseudo_header_v4(&s, &d, proto, len as u32),
        (IpAddr::V6(s), IpAddr::V6(d)) => checksum::pseudo_header_v6(&s, &d, proto, len as u32),
        _ => 0,
    };
    !combine_parts(pseudo, parts)
}

/// Transport checksum (complemented, ready to store) over the pseudo-header, the L4
/// header `hdr` (checksum field zero) and a payload of `payload_len` bytes whose sum is
/// `payload_sum` ([`PartialSum`] of the payload alone).
pub fn l4_checksum_with(
    src: IpAddr,
    dst: IpAddr,
    proto: IpProtocol,
    hdr: &[u8],
    payload_len: usize,
    payload_sum: u16,
) -> u16 {
    let len = (hdr.len() + payload_len) as u32;
    let pseudo = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => checksum::pseudo_header_v4(&s, &d, proto, len),
        (IpAddr::V6(s), IpAddr::V6(d)) => checksum::pseudo_header_v6(&s, &d, proto, len),
        _ => 0,
    };
    let mut acc = PartialSum {
        sum: pseudo,
        odd: false,
    };
    acc.add(hdr);
    acc.add_sum(payload_sum, payload_len);
    !acc.sum
}

/// An RFC 1071 sum built piece by piece, pieces of any length, as if they were one
/// contiguous buffer (a piece starting at an odd offset contributes its bytes swapped).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PartialSum {
    sum: u16,
    odd: bool,
}

impl PartialSum {
    pub fn of(data: &[u8]) -> Self {
        let mut s = PartialSum::default();
        s.add(data);
        s
    }

    pub fn add(&mut self, data: &[u8]) {
        // SAFETY: a slice is readable for its length.
        unsafe { self.add_raw(data.as_ptr(), data.len()) }
    }

    /// Adds `len` bytes at `ptr`: memory the guest may write while we read it, which must
    /// not become a Rust reference.
    ///
    /// # Safety
    /// `ptr .. ptr + len` must be mapped and readable. Concurrent writes make the sum
    /// wrong, nothing worse: each byte is read once.
    pub unsafe fn add_raw(&mut self, ptr: *const u8, len: usize) {
        self.add_sum(raw_data_sum(ptr, len), len);
    }

    /// Adds the sum of `len` bytes computed separately (from an even offset).
    pub fn add_sum(&mut self, sum: u16, len: usize) {
        self.sum = checksum::combine(&[self.sum, if self.odd { sum.swap_bytes() } else { sum }]);
        self.odd ^= len % 2 == 1;
    }

    /// The sum, not complemented.
    pub fn value(&self) -> u16 {
        self.sum
    }
}

/// RFC 1071 sum (folded, not complemented) of `len` bytes at `ptr`, as smoltcp's
/// `checksum::data` computes it for a slice.
///
/// Our own rather than smoltcp's for two reasons. It reads through a raw pointer, because
/// the bytes are often guest memory the guest may write concurrently (TX payloads left in
/// place, RX payloads the kernel wrote), which must not become a slice. And smoltcp's adds
/// two bytes at a time in network order: it took a fifth of passt-rs's CPU in a TCP upload
/// at MTU 1500. Here 4-byte native-endian words go into a 64-bit accumulator, a loop the
/// compiler vectorizes, and the folded sum is byte-swapped once at the end: a ones'
/// complement sum of byte-swapped words is the byte-swapped sum (RFC 1071, 2.B).
///
/// # Safety
/// As for [`PartialSum::add_raw`].
unsafe fn raw_data_sum(ptr: *const u8, len: usize) -> u16 {
    let words = len / 4;
    let mut acc = 0u64;
    // No overflow: at most 2^32 - 1 per word, and frames are far below 2^32 words.
    for k in 0..words {
        acc += u64::from(ptr.add(4 * k).cast::<u32>().read_unaligned());
    }
    let mut at = 4 * words;
    if len - at >= 2 {
        acc += u64::from(ptr.add(at).cast::<u16>().read_unaligned());
        at += 2;
    }
    if at < len {
        // The odd last byte is the first of a word padded with zero.
        acc += u64::from(u16::from_ne_bytes([ptr.add(at).read(), 0]));
    }
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    u16::from_be(acc as u16)
}

/// ICMPv4 has no pseudo-header: checksum over the message alone, complemented.
pub fn icmp4_checksum(parts: &[&[u8]]) -> u16 {
    !combine_parts(0, parts)
}

/// Sums parts that may have odd lengths, as if they were one contiguous buffer.
fn combine_parts(initial: u16, parts: &[&[u8]]) -> u16 {
    let mut acc = PartialSum {
        sum: initial,
        odd: false,
    };
    for p in parts {
        acc.add(p);
    }
    acc.sum
}

/// Whether `a` is a unicast address a guest may use as a source or destination.
pub fn is_unicast(a: IpAddr) -> bool {
    match a {
        IpAddr::V4(v4) => !(v4.is_multicast() || v4.is_broadcast() || v4.is_unspecified()),
        IpAddr::V6(v6) => !(v6.is_multicast() || v6.is_unspecified()),
    }
}

/// The unspecified address of the family of `a`.
pub fn unspecified_like(a: IpAddr) -> IpAddr {
    match a {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_sum_equals_smoltcps_at_every_length_and_alignment() {
        // xorshift: varied bytes, 0xff runs included, so carries and the 0xffff fold occur.
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let buf: Vec<u8> = (0..1100)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                if i % 97 < 40 {
                    0xff
                } else {
                    x as u8
                }
            })
            .collect();
        for start in 0..8 {
            for len in (0..70).chain([255, 256, 257, 1024, 1025, 1092]) {
                let data = &buf[start..start + len];
                assert_eq!(
                    PartialSum::of(data).value(),
                    checksum::data(data),
                    "start {start} len {len}"
                );
            }
        }
        assert_eq!(
            PartialSum::of(&[0xff; 64]).value(),
            checksum::data(&[0xff; 64])
        );
    }

    #[test]
    fn split_checksum_equals_contiguous() {
        let data: Vec<u8> = (0..101u8).map(|b| b.wrapping_mul(37)).collect();
        let whole = icmp4_checksum(&[&data]);
        for cut in [0, 1, 2, 3, 50, 51, 100, 101] {
            for cut2 in [cut, (cut + 3).min(101)] {
                assert_eq!(
                    icmp4_checksum(&[&data[..cut], &data[cut..cut2], &data[cut2..]]),
                    whole,
                    "cuts {cut} {cut2}"
                );
            }
        }
    }

    #[test]
    fn emitted_headers_verify() {
        let mut buf = [0u8; 64];
        let n = emit_l3(
            &mut buf,
            [1; 6],
            [2; 6],
            "192.0.2.1".parse().unwrap(),
            "192.0.2.2".parse().unwrap(),
            IpProtocol::Icmp,
            8,
        )
        .unwrap();
        assert_eq!(n, 34);
        let ip = Ipv4Packet::new_checked(&buf[14..42]).unwrap();
        assert!(ip.verify_checksum());
        assert_eq!(ip.total_len(), 28);
        let v4: IpAddr = "192.0.2.1".parse().unwrap();
        let v6: IpAddr = "::1".parse().unwrap();
        assert!(emit_l3(&mut buf, [1; 6], [2; 6], v4, v6, IpProtocol::Icmp, 8).is_none());
        assert!(emit_l3(&mut buf, [1; 6], [2; 6], v4, v4, IpProtocol::Icmp, 70000).is_none());
    }
}
