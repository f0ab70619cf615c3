//! Link- and network-layer services the guest needs to configure itself: ARP, DHCP, NDP
//! (router and neighbour advertisements), DHCPv6. Each service is a pure function from one
//! guest frame and the [`NetConfig`] to at most one reply frame, written into a buffer the
//! caller owns: no I/O, no clock, no allocation, so each is unit-tested frame in, frame out.
//!
//! [`crate::engine`] decides which service (if any) a guest frame is for; everything else is
//! layer-4 traffic for the translation modules.

pub mod arp;
pub mod dhcp;
pub mod dhcpv6;
pub mod ndp;
#[cfg(test)]
mod test_util;

pub use crate::conf::NetConfig;

/// Smallest reply buffer a service may be given.
pub const REPLY_BUF_LEN: usize = 2048;

/// What a service made of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// A reply frame (Ethernet header included) of this many bytes is in the output buffer.
    Reply(usize),
    /// Well-formed, but there is nothing to answer (not for us, or not a question).
    Ignored,
    /// Truncated, inconsistent or with a bad checksum: drop it and count it.
    Malformed,
}
