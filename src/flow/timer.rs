//! Per-flow deadlines: which flows the timer pass must visit, and when the loop should wake
//! up for the next one.
//!
//! # Theory of operation
//! A binary heap of `(deadline, slot)` entries, invalidated lazily: `scheduled[slot]` holds
//! the deadline of the slot's one live entry, and a popped entry that doesn't match it is
//! stale and dropped. Rescheduling to a *later* time (the common case: every ACK pushes
//! the retransmission timeout back, every segment the idle timeout) changes nothing: the
//! earlier entry stays, fires, the flow finds nothing due and asks for its real deadline.
//! So a busy flow costs one visit per timeout interval, not one heap operation per packet.
//! Rescheduling *earlier* pushes a new entry, leaving a stale one behind; when stale
//! entries outnumber live ones, the heap is compacted in place (amortised O(1) per push).
//!
//! No allocation per event: the heap's and the slot array's storage grow to their
//! high-water marks and stay there. A visit the flow didn't need (early, or for a slot
//! freed and reused since) is harmless: the flow's own timer handler checks what is due.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Instant;

use super::FlowIdx;

/// Stale entries tolerated before compacting, beyond twice the live ones.
const SLACK: usize = 64;

/// Deadlines of the flows of one table, by slot.
#[derive(Debug, Default)]
pub struct Timers {
    heap: BinaryHeap<Reverse<(Instant, u32)>>,
    /// The live entry's deadline, per slot.
    scheduled: Vec<Option<Instant>>,
    live: usize,
}

impl Timers {
    pub fn new() -> Self {
        Self::default()
    }

    /// Wants `idx` visited at `at` or earlier (`None`: never).
    pub fn schedule(&mut self, idx: FlowIdx, at: Option<Instant>) {
        let i = idx.0 as usize;
        if self.scheduled.len() <= i {
            self.scheduled.resize(i + 1, None);
        }
        let cur = self.scheduled[i];
        match (cur, at) {
            (Some(_), None) => {
                self.scheduled[i] = None;
                self.live -= 1;
            }
            (None, None) => {}
            // An entry fires first anyway: the visit reschedules.
            (Some(c), Some(a)) if c <= a => {}
            (_, Some(a)) => {
                if cur.is_none() {
                    self.live += 1;
                }
                self.scheduled[i] = Some(a);
                self.heap.push(Reverse((a, idx.0)));
                if self.heap.len() > 2 * self.live + SLACK {
                    let scheduled = &self.scheduled;
                    self.heap
                        .retain(|Reverse((t, s))| scheduled[*s as usize] == Some(*t));
                }
            }
        }
    }

    /// Forgets `idx` (its flow is gone).
    pub fn cancel(&mut self, idx: FlowIdx) {
        self.schedule(idx, None);
    }

    /// Next flow due at `now`, unscheduled as it is returned: the caller visits it and
    /// schedules it again.
    pub fn pop_due(&mut self, now: Instant) -> Option<FlowIdx> {
        while let Some(&Reverse((t, s))) = self.heap.peek() {
            if t > now {
                return None;
            }
            self.heap.pop();
            if self.scheduled[s as usize] == Some(t) {
                self.scheduled[s as usize] = None;
                self.live -= 1;
                return Some(FlowIdx(s));
            }
        }
        None
    }

    /// The earliest deadline, to arm the loop's timer with.
    pub fn earliest(&mut self) -> Option<Instant> {
        while let Some(&Reverse((t, s))) = self.heap.peek() {
            if self.scheduled[s as usize] == Some(t) {
                return Some(t);
            }
            self.heap.pop();
        }
        None
    }

    /// Flows with a deadline.
    pub fn len(&self) -> usize {
        self.live
    }

    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// Heap entries, live and stale (for tests of the bound).
    #[cfg(test)]
    fn entries(&self) -> usize {
        self.heap.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn pops_only_what_is_due_in_order() {
        let t0 = Instant::now();
        let mut t = Timers::new();
        t.schedule(FlowIdx(3), Some(t0 + ms(30)));
        t.schedule(FlowIdx(1), Some(t0 + ms(10)));
        t.schedule(FlowIdx(2), Some(t0 + ms(20)));
        assert_eq!(t.earliest(), Some(t0 + ms(10)));
        assert_eq!(t.pop_due(t0 + ms(5)), None);
        assert_eq!(t.pop_due(t0 + ms(20)), Some(FlowIdx(1)));
        assert_eq!(t.pop_due(t0 + ms(20)), Some(FlowIdx(2)));
        assert_eq!(t.pop_due(t0 + ms(20)), None);
        assert_eq!(t.earliest(), Some(t0 + ms(30)));
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn later_keeps_the_earlier_entry_earlier_replaces_it() {
        let t0 = Instant::now();
        let mut t = Timers::new();
        t.schedule(FlowIdx(0), Some(t0 + ms(100)));
        // Later: the 100 ms entry stays and fires (the visit reschedules).
        t.schedule(FlowIdx(0), Some(t0 + ms(500)));
        assert_eq!(t.earliest(), Some(t0 + ms(100)));
        // Earlier: the 100 ms entry is stale now.
        t.schedule(FlowIdx(0), Some(t0 + ms(10)));
        assert_eq!(t.pop_due(t0 + ms(10)), Some(FlowIdx(0)));
        assert_eq!(t.pop_due(t0 + ms(1000)), None, "stale entry dropped");
        assert_eq!(t.earliest(), None);
    }

    #[test]
    fn cancelled_and_reused_slots() {
        let t0 = Instant::now();
        let mut t = Timers::new();
        t.schedule(FlowIdx(7), Some(t0 + ms(10)));
        t.cancel(FlowIdx(7));
        assert!(t.is_empty());
        assert_eq!(t.earliest(), None);
        // The slot's next flow: only its own deadline counts.
        t.schedule(FlowIdx(7), Some(t0 + ms(50)));
        assert_eq!(t.pop_due(t0 + ms(20)), None);
        assert_eq!(t.pop_due(t0 + ms(50)), Some(FlowIdx(7)));
    }

    #[test]
    fn stale_entries_stay_bounded() {
        let t0 = Instant::now();
        let mut t = Timers::new();
        for i in 0..100 {
            t.schedule(FlowIdx(i), Some(t0 + Duration::from_secs(7200)));
        }
        // Each flow keeps moving its deadline earlier: stale entries pile up, compaction
        // bounds them.
        for round in 1..1000u64 {
            for i in 0..100 {
                t.schedule(FlowIdx(i), Some(t0 + Duration::from_secs(7200) - ms(round)));
            }
        }
        assert!(t.entries() <= 2 * 100 + SLACK + 1, "{}", t.entries());
        assert_eq!(t.len(), 100);
    }

    #[test]
    fn many_flows_cost_only_their_due_visits() {
        // 100k flows, idle timeouts spread over an hour; 10 ms ticks for ten seconds visit
        // only those due in that time, with no scan of the rest.
        const N: u32 = 100_000;
        let t0 = Instant::now();
        let mut t = Timers::new();
        for i in 0..N {
            t.schedule(FlowIdx(i), Some(t0 + ms(u64::from(i) * 36)));
        }
        let mut visits = 0u32;
        let mut now = t0;
        for _ in 0..1000 {
            now += ms(10);
            while let Some(idx) = t.pop_due(now) {
                assert!(t0 + ms(u64::from(idx.0) * 36) <= now);
                visits += 1;
            }
        }
        // Deadlines 0..=10 s, 36 ms apart.
        assert_eq!(visits, 10_000 / 36 + 1);
        assert_eq!(t.len(), (N - visits) as usize);
    }
}
