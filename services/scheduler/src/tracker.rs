//! Which records of a partition are durably recorded, by position `(offset, index)`: one broker
//! message carries a batch of events that share its offset, so progress is tracked per event and
//! the checkpoint never passes an event that was read but not yet recorded — nor one not yet read.

use std::collections::BTreeMap;

use saga::Position;

#[derive(Debug, Default)]
pub struct Tracker {
    /// Read and not yet durably recorded (a count, in case a position is begun twice).
    pending: BTreeMap<Position, u32>,
    /// The position after the last one read.
    next_after_seen: Option<Position>,
}

impl Tracker {
    /// `at` was read and needs nothing recorded (skipped, ignored).
    pub fn seen(&mut self, at: Position) {
        let next = Position {
            offset: at.offset,
            index: at.index.saturating_add(1),
        };
        self.next_after_seen = Some(self.next_after_seen.map_or(next, |n| n.max(next)));
    }

    /// `at` was read and must be recorded before the checkpoint passes it.
    pub fn begin(&mut self, at: Position) {
        self.seen(at);
        *self.pending.entry(at).or_default() += 1;
    }

    /// `at` is durably recorded.
    pub fn end(&mut self, at: Position) {
        if let Some(n) = self.pending.get_mut(&at) {
            *n -= 1;
            if *n == 0 {
                self.pending.remove(&at);
            }
        }
    }

    /// Where reading would resume: the first unrecorded position, else right after the last one
    /// read (the next event of the same message, which a restart reads by re-reading the message
    /// and skipping what is below the checkpoint).
    pub fn checkpoint(&self, start: Position) -> Position {
        self.pending
            .keys()
            .next()
            .copied()
            .or(self.next_after_seen)
            .unwrap_or(start)
            .max(start)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(offset: u64, index: u32) -> Position {
        Position { offset, index }
    }

    #[test]
    fn the_checkpoint_stops_at_the_first_unrecorded_event() {
        let mut t = Tracker::default();
        assert_eq!(t.checkpoint(p(7, 0)), p(7, 0), "nothing read: stay");
        t.begin(p(7, 0));
        t.begin(p(7, 1));
        t.begin(p(8, 0));
        t.seen(p(9, 0));
        assert_eq!(t.checkpoint(p(7, 0)), p(7, 0));
        t.end(p(7, 0));
        assert_eq!(t.checkpoint(p(7, 0)), p(7, 1), "(7,1) is still pending");
        t.end(p(8, 0));
        t.end(p(7, 1));
        assert_eq!(
            t.checkpoint(p(7, 0)),
            p(9, 1),
            "all recorded: after the last read"
        );
    }

    /// Defect 1 of issue 13: record (10,0) recorded while (10,1) has not reached the worker must
    /// not move the checkpoint to offset 11.
    #[test]
    fn an_event_of_the_same_message_not_yet_read_is_not_passed() {
        let mut t = Tracker::default();
        t.begin(p(10, 0));
        t.end(p(10, 0));
        let cp = t.checkpoint(p(10, 0));
        assert_eq!(cp, p(10, 1));
        assert!(cp < p(10, 1) || cp == p(10, 1), "a restart re-reads (10,1)");
        assert!(cp.offset == 10, "the checkpoint does not pass offset 10");
    }
}
