//! Descriptor chains turned into validated (guest address, length) segments.
//!
//! `virtio_queue::DescriptorChain` follows `next` links and indirect tables but ends silently
//! on every anomaly (loop exhausted by its TTL, `next` out of range, unreadable descriptor or
//! table, 4 GiB overflow). We tell a clean end from a truncated one by the last descriptor
//! returned: if it still had `VRING_DESC_F_NEXT`, the chain was cut short and is malformed.
//!
//! Each descriptor is checked before it is recorded: direction, non-zero length, and the
//! whole `[addr, addr + len)` range inside guest memory (it may cross from one memory region
//! into an adjacent one, which the spec allows since the guest sees one physical space; it may
//! not run into a hole). Segments go to a list preallocated once, so walking allocates
//! nothing.

use std::ops::Deref;

use virtio_queue::DescriptorChain;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Why a chain was rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChainError {
    /// No descriptor at all: head index out of range, unreadable or bad indirect table.
    Empty,
    /// Cut short while `NEXT` was set: a loop, a `next` out of range, an unreadable
    /// descriptor or a bad nested indirect table.
    Truncated,
    /// A device-writable descriptor where we read, or the other way round.
    Direction,
    /// A zero-length descriptor.
    ZeroLength,
    /// A buffer not entirely inside guest memory.
    Address,
    /// More descriptors than we keep track of.
    TooManyDescriptors,
    /// More bytes than the frame (or the header) allows, or a length overflow.
    TooLong,
    /// Too short to hold what must be there (the virtio-net header, an Ethernet header).
    TooShort,
}

/// Count of rejected chains, by reason.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChainErrors {
    pub empty: u64,
    pub truncated: u64,
    pub direction: u64,
    pub zero_length: u64,
    pub address: u64,
    pub too_many_descriptors: u64,
    pub too_long: u64,
    pub too_short: u64,
}

impl ChainErrors {
    /// Counts one rejection.
    pub fn count(&mut self, e: ChainError) {
        let c = match e {
            ChainError::Empty => &mut self.empty,
            ChainError::Truncated => &mut self.truncated,
            ChainError::Direction => &mut self.direction,
            ChainError::ZeroLength => &mut self.zero_length,
            ChainError::Address => &mut self.address,
            ChainError::TooManyDescriptors => &mut self.too_many_descriptors,
            ChainError::TooLong => &mut self.too_long,
            ChainError::TooShort => &mut self.too_short,
        };
        *c += 1;
    }

    /// All rejections.
    pub fn total(&self) -> u64 {
        self.empty
            + self.truncated
            + self.direction
            + self.zero_length
            + self.address
            + self.too_many_descriptors
            + self.too_long
            + self.too_short
    }
}

/// One buffer of a chain, known to lie inside guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seg {
    pub addr: GuestAddress,
    pub len: u32,
}

/// A bounded list of segments, allocated once.
#[derive(Debug)]
pub struct Segments {
    segs: Vec<Seg>,
    /// Reject chains whose total length exceeds this.
    max_bytes: u32,
}

impl Segments {
    /// Room for `cap` segments, no byte limit beyond 4 GiB.
    pub fn with_capacity(cap: usize) -> Self {
        Segments {
            segs: Vec::with_capacity(cap),
            max_bytes: u32::MAX,
        }
    }

    /// Rejects chains longer than `max` bytes.
    pub fn set_max_bytes(&mut self, max: u32) {
        self.max_bytes = max;
    }

    pub fn clear(&mut self) {
        self.segs.clear();
    }

    pub fn len(&self) -> usize {
        self.segs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.segs.is_empty()
    }

    pub fn as_slice(&self) -> &[Seg] {
        &self.segs
    }

    /// Forgets segments from index `n` on (those of a chain being given back).
    pub fn truncate(&mut self, n: usize) {
        self.segs.truncate(n);
    }

    /// Walks `chain`, appending its buffers. On error the segments appended so far for this
    /// chain are removed again. Returns the chain's total length.
    pub fn walk<M>(
        &mut self,
        chain: DescriptorChain<M>,
        mem: &GuestMemoryMmap,
        write: bool,
    ) -> Result<u32, ChainError>
    where
        M: Deref,
        M::Target: vm_memory::GuestMemory,
    {
        let start = self.segs.len();
        let res = self.walk_inner(chain, mem, write);
        if res.is_err() {
            self.segs.truncate(start);
        }
        res
    }

    fn walk_inner<M>(
        &mut self,
        chain: DescriptorChain<M>,
        mem: &GuestMemoryMmap,
        write: bool,
    ) -> Result<u32, ChainError>
    where
        M: Deref,
        M::Target: vm_memory::GuestMemory,
    {
        let mut total: u32 = 0;
        let mut last_had_next = None;
        for desc in chain {
            last_had_next = Some(desc.has_next());
            if desc.is_write_only() != write {
                return Err(ChainError::Direction);
            }
            let len = desc.len();
            if len == 0 {
                return Err(ChainError::ZeroLength);
            }
            total = total.checked_add(len).ok_or(ChainError::TooLong)?;
            if total > self.max_bytes {
                return Err(ChainError::TooLong);
            }
            if !GuestMemoryBackend::check_range(mem, desc.addr(), len as usize) {
                return Err(ChainError::Address);
            }
            if self.segs.len() == self.segs.capacity() {
                return Err(ChainError::TooManyDescriptors);
            }
            self.segs.push(Seg {
                addr: desc.addr(),
                len,
            });
        }
        match last_had_next {
            None => Err(ChainError::Empty),
            Some(true) => Err(ChainError::Truncated),
            Some(false) => Ok(total),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::super::{Pop, Vring};
    use super::*;
    use virtio_bindings::bindings::virtio_ring::{
        VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use vm_memory::Bytes;

    const N: u16 = VRING_DESC_F_NEXT as u16;
    const W: u16 = VRING_DESC_F_WRITE as u16;
    const I: u16 = VRING_DESC_F_INDIRECT as u16;

    fn pop_one(descs: &[(u64, u32, u16, u16)], write: bool) -> Result<u32, ChainError> {
        let mem = memory();
        let mut d = Driver::new(&mem);
        let head = d.put_descs(descs);
        d.offer(head);
        let mut r = Vring::new(256);
        r.start(mem.clone(), &d.config(), false).expect("start");
        let mut segs = Segments::with_capacity(4);
        segs.set_max_bytes(0x10000);
        match r.pop(&mut segs, write) {
            Pop::Chain { res, .. } => {
                if res.is_err() {
                    assert!(segs.is_empty(), "segments of a bad chain must be dropped");
                }
                res
            }
            other => panic!("expected a chain, got {other:?}"),
        }
    }

    #[test]
    fn good_chains() {
        assert_eq!(pop_one(&[(BUF_BASE, 100, 0, 0)], false), Ok(100));
        assert_eq!(
            pop_one(&[(BUF_BASE, 12, N, 1), (BUF_BASE + 64, 100, 0, 0)], false),
            Ok(112)
        );
        assert_eq!(pop_one(&[(BUF_BASE, 100, W, 0)], true), Ok(100));
    }

    #[test]
    fn loop_is_truncated() {
        assert_eq!(
            pop_one(&[(BUF_BASE, 10, N, 1), (BUF_BASE, 10, N, 0)], false),
            // Two descriptors looping: TTL (queue size) runs out after 16, which exceeds our
            // 4-segment list first.
            Err(ChainError::TooManyDescriptors)
        );
        // With a large segment list the TTL ends it, with NEXT still set.
        let mem = memory();
        let mut d = Driver::new(&mem);
        let head = d.put_descs(&[(BUF_BASE, 10, N, 1), (BUF_BASE, 10, N, 0)]);
        d.offer(head);
        let mut r = Vring::new(256);
        r.start(mem.clone(), &d.config(), false).expect("start");
        let mut segs = Segments::with_capacity(64);
        assert!(matches!(
            r.pop(&mut segs, false),
            Pop::Chain {
                res: Err(ChainError::Truncated),
                ..
            }
        ));
    }

    #[test]
    fn next_out_of_range_is_truncated() {
        assert_eq!(
            pop_one(&[(BUF_BASE, 10, N, QSIZE + 3)], false),
            Err(ChainError::Truncated)
        );
    }

    #[test]
    fn head_out_of_range_is_empty() {
        let mem = memory();
        let mut d = Driver::new(&mem);
        d.offer(QSIZE + 1);
        let mut r = Vring::new(256);
        r.start(mem.clone(), &d.config(), false).expect("start");
        let mut segs = Segments::with_capacity(4);
        assert!(matches!(
            r.pop(&mut segs, false),
            Pop::Chain {
                res: Err(ChainError::Empty),
                ..
            }
        ));
    }

    #[test]
    fn direction_zero_length_address_overflow() {
        assert_eq!(
            pop_one(&[(BUF_BASE, 10, W, 0)], false),
            Err(ChainError::Direction)
        );
        assert_eq!(
            pop_one(&[(BUF_BASE, 10, 0, 0)], true),
            Err(ChainError::Direction)
        );
        assert_eq!(
            pop_one(&[(BUF_BASE, 10, N, 1), (BUF_BASE, 0, 0, 0)], false),
            Err(ChainError::ZeroLength)
        );
        assert_eq!(
            pop_one(&[(MEM_SIZE as u64 - 4, 10, 0, 0)], false),
            Err(ChainError::Address)
        );
        assert_eq!(
            pop_one(&[(u64::MAX - 4, 10, 0, 0)], false),
            Err(ChainError::Address)
        );
        assert_eq!(
            pop_one(&[(BUF_BASE, 0x8000, N, 1), (BUF_BASE, 0x8001, 0, 0)], false),
            Err(ChainError::TooLong)
        );
        assert_eq!(
            pop_one(
                &[(BUF_BASE, u32::MAX, N, 1), (BUF_BASE, u32::MAX, 0, 0)],
                false
            ),
            Err(ChainError::TooLong)
        );
    }

    #[test]
    fn indirect_tables() {
        let mem = memory();
        let mut d = Driver::new(&mem);
        let table = 0x30_0000u64;
        let entries = [
            Descriptor::new(BUF_BASE, 12, N, 1),
            Descriptor::new(BUF_BASE + 64, 50, 0, 0),
        ];
        for (i, e) in entries.iter().enumerate() {
            mem.write_obj(RawDescriptor::from(*e), GuestAddress(table + 16 * i as u64))
                .expect("table");
        }
        let head = d.put_descs(&[(table, 32, I, 0)]);
        d.offer(head);
        // An indirect table outside memory.
        let head = d.put_descs(&[(MEM_SIZE as u64 + 0x1000, 32, I, 0)]);
        d.offer(head);
        let mut r = Vring::new(256);
        r.start(mem.clone(), &d.config(), false).expect("start");
        let mut segs = Segments::with_capacity(8);
        assert!(matches!(
            r.pop(&mut segs, false),
            Pop::Chain { res: Ok(62), .. }
        ));
        assert_eq!(segs.len(), 2);
        assert!(matches!(
            r.pop(&mut segs, false),
            Pop::Chain {
                res: Err(ChainError::Empty),
                ..
            }
        ));
    }

    #[test]
    fn error_counters() {
        let mut c = ChainErrors::default();
        c.count(ChainError::Address);
        c.count(ChainError::Address);
        c.count(ChainError::TooShort);
        assert_eq!(c.address, 2);
        assert_eq!(c.too_short, 1);
        assert_eq!(c.total(), 3);
    }
}
