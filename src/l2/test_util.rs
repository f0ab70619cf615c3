//! Test-only helpers shared by the service tests: a checksum written independently of the
//! code under test (and of smoltcp), so a shared bug can't hide in both.

use std::net::Ipv6Addr;

/// RFC 1071 over the concatenation of `chunks` (each chunk even-aligned but the last),
/// complemented.
pub fn csum(chunks: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    for c in chunks {
        let mut it = c.chunks_exact(2);
        for w in &mut it {
            sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
        }
        if let [b] = it.remainder() {
            sum += u32::from(*b) << 8;
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Checksum of an IPv6 upper-layer message with its pseudo-header.
pub fn csum6(src: Ipv6Addr, dst: Ipv6Addr, next_header: u8, msg: &[u8]) -> u16 {
    let len = (msg.len() as u32).to_be_bytes();
    csum(&[
        &src.octets(),
        &dst.octets(),
        &len,
        &[0, 0, 0, next_header],
        msg,
    ])
}
