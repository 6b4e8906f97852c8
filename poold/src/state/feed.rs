//! The change feed a member keeps: the events of the entries it applied lately, by
//! position (log index), for `WatchEvents` streams to catch up from.
//!
//! Every member applies every entry, so every member can serve the feed, and a position
//! means the same change on all of them. A member keeps the events of the entries after
//! its `floor`: on start that is its snapshot's index (the entries it replays from its
//! log make their events again), after a snapshot from the leader it is that snapshot's
//! index, and it rises as the oldest events are dropped to keep [`FEED_KEPT`]. A client
//! whose position is below the floor must load every object again.

use std::collections::VecDeque;

use proto::coordinator as pb;

/// Events kept at most (each holds a copy of its object).
pub const FEED_KEPT: usize = 20_000;

/// Why a position cannot be caught up from.
#[derive(Debug, PartialEq)]
pub struct Compacted {
    pub floor: u64,
}

#[derive(Debug)]
pub struct Feed {
    floor: u64,
    kept: usize,
    events: VecDeque<pb::PoolEvent>,
}

impl Feed {
    /// A feed holding everything after `floor`, which is nothing yet.
    pub fn new(floor: u64) -> Feed {
        Feed::with_room(floor, FEED_KEPT)
    }

    pub fn with_room(floor: u64, kept: usize) -> Feed {
        Feed {
            floor,
            kept: kept.max(1),
            events: VecDeque::new(),
        }
    }

    /// The position below which events are gone.
    pub fn floor(&self) -> u64 {
        self.floor
    }

    /// Adds the events of one entry (all at one position, above every kept one), then
    /// drops the oldest positions whole while more than the room is kept.
    pub fn push(&mut self, events: Vec<pb::PoolEvent>) {
        self.events.extend(events);
        while self.events.len() > self.kept {
            let Some(oldest) = self.events.front().map(|e| e.position) else {
                break;
            };
            while self.events.front().is_some_and(|e| e.position == oldest) {
                self.events.pop_front();
            }
            self.floor = self.floor.max(oldest);
        }
    }

    /// Everything before `floor` is gone (a snapshot replaced the state).
    pub fn reset(&mut self, floor: u64) {
        self.events.clear();
        self.floor = floor;
    }

    /// The events after `position`, whole positions only, about `max` of them (more when
    /// one position has more); none when there are none yet.
    pub fn after(&self, position: u64, max: usize) -> Result<Vec<pb::PoolEvent>, Compacted> {
        if position < self.floor {
            return Err(Compacted { floor: self.floor });
        }
        let start = self.events.partition_point(|e| e.position <= position);
        let mut out: Vec<pb::PoolEvent> = Vec::new();
        for e in self.events.range(start..) {
            if out.len() >= max && out.last().is_some_and(|l| l.position != e.position) {
                break;
            }
            out.push(e.clone());
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(position: u64, id: &str) -> pb::PoolEvent {
        pb::PoolEvent {
            position,
            kind: "vm".into(),
            id: id.into(),
            ..Default::default()
        }
    }

    fn ids(v: &[pb::PoolEvent]) -> Vec<(u64, &str)> {
        v.iter().map(|e| (e.position, e.id.as_str())).collect()
    }

    #[test]
    fn catches_up_from_any_kept_position_in_whole_positions() {
        let mut f = Feed::new(10);
        f.push(vec![ev(11, "a"), ev(11, "b")]);
        f.push(vec![ev(13, "c")]);
        f.push(vec![ev(14, "d"), ev(14, "e"), ev(14, "f")]);
        assert_eq!(ids(&f.after(10, 100).unwrap()).len(), 6);
        assert_eq!(
            ids(&f.after(11, 100).unwrap()),
            [(13, "c"), (14, "d"), (14, "e"), (14, "f")]
        );
        // An entry that changed nothing (12) is a position like any other.
        assert_eq!(f.after(12, 100).unwrap(), f.after(11, 100).unwrap());
        assert!(f.after(14, 100).unwrap().is_empty());
        // A batch does not split a position: resuming after its last one misses nothing.
        assert_eq!(ids(&f.after(10, 1).unwrap()), [(11, "a"), (11, "b")]);
        assert_eq!(
            ids(&f.after(11, 2).unwrap()),
            [(13, "c"), (14, "d"), (14, "e"), (14, "f")]
        );
        // Below the floor the events are gone.
        assert_eq!(f.after(9, 100), Err(Compacted { floor: 10 }));
    }

    #[test]
    fn dropping_old_events_raises_the_floor_by_whole_positions() {
        let mut f = Feed::with_room(0, 3);
        f.push(vec![ev(1, "a"), ev(1, "b")]);
        f.push(vec![ev(2, "c")]);
        assert_eq!(f.floor(), 0);
        f.push(vec![ev(3, "d")]);
        // Position 1 went whole: a client at 0 missed it, one at 1 did not.
        assert_eq!(f.floor(), 1);
        assert_eq!(f.after(0, 10), Err(Compacted { floor: 1 }));
        assert_eq!(ids(&f.after(1, 10).unwrap()), [(2, "c"), (3, "d")]);
        f.reset(7);
        assert_eq!(f.after(3, 10), Err(Compacted { floor: 7 }));
        assert!(f.after(7, 10).unwrap().is_empty());
    }
}
