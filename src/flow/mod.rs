//! The flow table: every translated layer-4 conversation between the guest and a host
//! socket, under one index, whatever its protocol. TCP, UDP and ICMP each keep a table of
//! their own flows of this type (one per protocol: each has its own bound and state).
//!
//! # Invariants
//! - **Fixed capacity.** The table never holds more than `capacity` flows; inserting into a
//!   full table fails and hands the value back, so the caller refuses the new conversation
//!   (a SYN flood fills the table to its bound and no further).
//! - **Lazy storage.** Slots are allocated as the table grows, never shrunk: a mostly idle
//!   process with a large capacity costs little, and a busy one stops allocating once its
//!   high-water mark is reached (no allocation per packet, only per new high-water flow).
//! - **One index.** A flow's [`FlowIdx`] is its slot; the slot is the only owner of the
//!   flow's state and the key map is the only index, updated in the same call as the slot,
//!   so the two can't drift. Indices are reused (most recently freed first) once a flow is
//!   removed. Closing the flow's socket takes it out of the epoll set, but events already
//!   returned in the same batch still name the slot: each slot therefore has a
//!   **generation**, bumped when its flow is removed, which tokens carry ([`FlowRef`]) and
//!   [`FlowTable::get_ref_mut`] checks, so such an event can't reach the slot's next flow.
//! - **O(1) lookup** by [`FlowKey`] (protocol, guest address and port, remote address and
//!   port), through a hash map with the standard library's keyed SipHash, so a guest can't
//!   pick colliding tuples.

pub mod timer;

use std::cell::Cell;
use std::collections::HashMap;
use std::net::IpAddr;

/// Why [`FlowTable::insert_watched`] failed; the flow comes back, for its socket to be
/// closed as the caller sees fit.
#[derive(Debug)]
pub enum InsertError<T> {
    /// Table full, or the key taken.
    Refused(T),
    /// Its socket couldn't be watched.
    Unwatched(T, std::io::Error),
}

/// A flow's slot in its table, carried in epoll tokens so a socket event names its flow
/// without a lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowIdx(pub u32);

/// Largest index a token can carry (the token keeps the top byte for its kind).
pub const MAX_CAPACITY: usize = 1 << 24;

/// Bits of a slot's generation in a [`FlowRef`] (what a token has room for beside the kind
/// byte and a 32-bit index); generations wrap at `1 << GEN_BITS`.
pub const GEN_BITS: u32 = 24;
const GEN_MASK: u32 = (1 << GEN_BITS) - 1;

/// One flow, not just its slot: the index and the slot's generation when the reference was
/// taken. Epoll tokens carry it; it goes stale when the flow is removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowRef {
    pub idx: FlowIdx,
    pub gen: u32,
}

/// Default capacity of a protocol's table (issue 4: 128k flows).
pub const DEFAULT_CAPACITY: usize = 128 * 1024;

/// What identifies a flow, as the guest sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// IP protocol number (6 for TCP, 17 for UDP...).
    pub proto: u8,
    pub guest_addr: IpAddr,
    pub guest_port: u16,
    pub remote_addr: IpAddr,
    pub remote_port: u16,
}

struct Entry<T> {
    key: FlowKey,
    value: T,
}

/// A bounded table of flows of one kind, `T` being the per-flow state.
pub struct FlowTable<T> {
    slots: Vec<Option<Entry<T>>>,
    /// Generation of each slot, bumped as its flow is removed.
    gens: Vec<u32>,
    free: Vec<u32>,
    index: HashMap<FlowKey, FlowIdx>,
    capacity: usize,
    /// The slot [`FlowTable::lookup`] found last. A bulk transfer looks its flow up for
    /// every segment, and comparing one key costs less than hashing it (SipHash, kept for
    /// keys that guests and remote hosts choose, took 8 % of passt's user-space samples in
    /// a TCP upload). Checked against the slot's own key, so a removed or reused slot
    /// needs no invalidation.
    last: Cell<u32>,
}

impl<T> FlowTable<T> {
    /// An empty table for at most `capacity` flows (clamped to [`MAX_CAPACITY`]).
    pub fn new(capacity: usize) -> Self {
        FlowTable {
            slots: Vec::new(),
            gens: Vec::new(),
            free: Vec::new(),
            index: HashMap::new(),
            capacity: capacity.min(MAX_CAPACITY),
            last: Cell::new(u32::MAX),
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    pub fn is_full(&self) -> bool {
        self.len() >= self.capacity
    }

    pub fn lookup(&self, key: &FlowKey) -> Option<FlowIdx> {
        let last = self.last.get();
        if let Some(Some(e)) = self.slots.get(last as usize) {
            if e.key == *key {
                return Some(FlowIdx(last));
            }
        }
        let idx = self.index.get(key).copied()?;
        self.last.set(idx.0);
        Some(idx)
    }

    /// Adds a flow; `Err(value)` if the table is full or the key is already there.
    pub fn insert(&mut self, key: FlowKey, value: T) -> Result<FlowIdx, T> {
        if self.is_full() || self.index.contains_key(&key) {
            return Err(value);
        }
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.slots.push(None);
                self.gens.push(0);
                (self.slots.len() - 1) as u32
            }
        };
        self.slots[slot as usize] = Some(Entry { key, value });
        let idx = FlowIdx(slot);
        self.index.insert(key, idx);
        Ok(idx)
    }

    /// Inserts a flow and has `watch` register its socket under a token naming it
    /// ([`FlowRef`]); if registering fails, the flow is taken out again: a flow in the
    /// table always has its socket watched.
    pub fn insert_watched(
        &mut self,
        key: FlowKey,
        value: T,
        watch: impl FnOnce(FlowRef) -> std::io::Result<()>,
    ) -> Result<FlowIdx, InsertError<T>> {
        let idx = self.insert(key, value).map_err(InsertError::Refused)?;
        match watch(self.flow_ref(idx)) {
            Ok(()) => Ok(idx),
            Err(e) => match self.remove(idx) {
                Some(v) => Err(InsertError::Unwatched(v, e)),
                None => unreachable!("inserted just above"),
            },
        }
    }

    pub fn get(&self, idx: FlowIdx) -> Option<&T> {
        self.slots.get(idx.0 as usize)?.as_ref().map(|e| &e.value)
    }

    pub fn get_mut(&mut self, idx: FlowIdx) -> Option<&mut T> {
        self.slots
            .get_mut(idx.0 as usize)?
            .as_mut()
            .map(|e| &mut e.value)
    }

    /// A reference to the flow now in slot `idx` (in use or not), for its epoll token.
    pub fn flow_ref(&self, idx: FlowIdx) -> FlowRef {
        FlowRef {
            idx,
            gen: self.gens.get(idx.0 as usize).copied().unwrap_or(0),
        }
    }

    /// The flow `r` refers to, if it is still there (not removed, slot not reused since).
    pub fn get_ref_mut(&mut self, r: FlowRef) -> Option<&mut T> {
        if self.gens.get(r.idx.0 as usize) != Some(&r.gen) {
            return None;
        }
        self.get_mut(r.idx)
    }

    pub fn key(&self, idx: FlowIdx) -> Option<&FlowKey> {
        self.slots.get(idx.0 as usize)?.as_ref().map(|e| &e.key)
    }

    /// Removes a flow, returning its state; its index may be handed out again.
    pub fn remove(&mut self, idx: FlowIdx) -> Option<T> {
        let e = self.slots.get_mut(idx.0 as usize)?.take()?;
        self.index.remove(&e.key);
        let g = &mut self.gens[idx.0 as usize];
        *g = g.wrapping_add(1) & GEN_MASK;
        self.free.push(idx.0);
        Some(e.value)
    }

    /// Indices of the flows in use, for scans (timers, expiry). Allocation-free; the
    /// caller collects nothing and looks each index up again.
    pub fn indices(&self) -> impl Iterator<Item = FlowIdx> + '_ {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.is_some())
            .map(|(i, _)| FlowIdx(i as u32))
    }

    /// Upper bound (exclusive) of indices in use: scans can walk `0..high_water()` and
    /// mutate as they go, where [`Self::indices`] would hold a borrow.
    pub fn high_water(&self) -> u32 {
        self.slots.len() as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(port: u16) -> FlowKey {
        FlowKey {
            proto: 6,
            guest_addr: "192.0.2.2".parse().unwrap(),
            guest_port: port,
            remote_addr: "198.51.100.1".parse().unwrap(),
            remote_port: 80,
        }
    }

    #[test]
    fn a_flow_whose_socket_cant_be_watched_is_taken_out_again() {
        let mut t = FlowTable::new(2);
        let mut seen = None;
        let a = t
            .insert_watched(key(1), 'a', |r| {
                seen = Some(r);
                Ok(())
            })
            .unwrap();
        assert_eq!(seen, Some(t.flow_ref(a)), "watched under its own token");
        let e = t.insert_watched(key(2), 'b', |_| Err(std::io::Error::other("no")));
        assert!(matches!(e, Err(InsertError::Unwatched('b', _))));
        assert_eq!((t.len(), t.lookup(&key(2))), (1, None));
        assert!(matches!(
            t.insert_watched(key(1), 'c', |_| Ok(())),
            Err(InsertError::Refused('c'))
        ));
    }

    #[test]
    fn bounded_and_reuses_slots() {
        let mut t = FlowTable::new(3);
        let a = t.insert(key(1), 'a').unwrap();
        let b = t.insert(key(2), 'b').unwrap();
        assert_eq!(t.insert(key(2), 'x'), Err('x'), "duplicate key");
        let c = t.insert(key(3), 'c').unwrap();
        assert!(t.is_full());
        assert_eq!(t.insert(key(4), 'd'), Err('d'));
        assert_eq!(t.lookup(&key(2)), Some(b));
        assert_eq!(t.remove(b), Some('b'));
        assert_eq!(t.remove(b), None);
        assert_eq!(t.lookup(&key(2)), None);
        let d = t.insert(key(4), 'd').unwrap();
        assert_eq!(d, b, "freed slot reused");
        // The last lookup's slot now holds another flow: neither key is mistaken.
        assert_eq!(t.lookup(&key(2)), None);
        assert_eq!(t.lookup(&key(4)), Some(d));
        assert_eq!(t.lookup(&key(1)), Some(a));
        assert_eq!(t.lookup(&key(4)), Some(d));
        assert_eq!(t.get(d), Some(&'d'));
        assert_eq!(t.key(d), Some(&key(4)));
        assert_eq!(t.indices().collect::<Vec<_>>(), vec![a, b, c]);
        assert_eq!(t.high_water(), 3);
        assert_eq!(t.len(), 3);
    }

    #[test]
    fn references_go_stale_when_the_slot_is_reused() {
        let mut t = FlowTable::new(2);
        let a = t.insert(key(1), 'a').unwrap();
        let ra = t.flow_ref(a);
        assert_eq!(t.get_ref_mut(ra), Some(&mut 'a'));
        t.remove(a);
        assert_eq!(t.get_ref_mut(ra), None, "removed");
        let b = t.insert(key(2), 'b').unwrap();
        assert_eq!(b, a, "same slot");
        assert_eq!(t.get_ref_mut(ra), None, "reused: the old reference misses");
        let rb = t.flow_ref(b);
        assert_ne!(rb, ra);
        assert_eq!(t.get_ref_mut(rb), Some(&mut 'b'));
        // Generations wrap within what a token carries.
        t.gens[b.0 as usize] = GEN_MASK;
        t.remove(b);
        assert_eq!(t.flow_ref(b).gen, 0);
    }

    #[test]
    fn capacity_is_clamped_to_what_tokens_carry() {
        let t: FlowTable<()> = FlowTable::new(usize::MAX);
        assert_eq!(t.capacity(), MAX_CAPACITY);
        assert!(t.get(FlowIdx(u32::MAX)).is_none());
    }
}
