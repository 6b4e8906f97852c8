//! Changed chunks between two points of a volume's lineage: what an incremental backup
//! reads. The answer comes from comparing the two mapping trees (see [`Forest::diff`]),
//! so nothing has to be tracked while the volume is written and nothing is lost by a
//! crash or a restart.
//!
//! [`Forest::diff`]: crate::tree::Forest::diff

use std::ops::ControlFlow;

use uuid::Uuid;

use super::{PoolError, State, ThinPool};
use crate::tree::NO_NODE;

/// Consecutive changed chunks that read alike: all mapped, or all unmapped (zeros).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkRange {
    pub first: u64,
    pub count: u64,
    /// False when the target maps none of these chunks: they read as zeros.
    pub mapped: bool,
}

/// One page of the chunks `target` holds differently from `base`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangedChunks {
    pub chunk_size: u64,
    /// The target's size: chunks past it are never reported.
    pub target_size: u64,
    pub ranges: Vec<ChunkRange>,
    /// The chunk to ask from for the next page; None on the last one.
    pub next: Option<u64>,
    /// Mapping-tree nodes read to answer (the cost, which follows the change).
    pub nodes_visited: u64,
}

impl State {
    /// Whether `id` is `volume` or was derived from it, following origin links.
    pub(super) fn descends_from(&self, id: Uuid, volume: Uuid) -> bool {
        let mut at = Some(id);
        // Bounded by the number of volumes: a cycle cannot be, but must not hang.
        for _ in 0..=self.volumes.len() {
            match at {
                Some(v) if v == volume => return true,
                Some(v) => at = self.volumes.get(&v).and_then(|r| r.origin),
                None => return false,
            }
        }
        false
    }
}

impl ThinPool {
    /// The chunks of `target` (a snapshot or clone of `volume`, or `volume` itself) that
    /// differ from `base` (another of them; None: an empty volume, so every mapped chunk),
    /// in order from chunk `from`, at most `max_ranges` ranges.
    pub fn changed_chunks(
        &self,
        volume: Uuid,
        base: Option<Uuid>,
        target: Uuid,
        from: u64,
        max_ranges: usize,
    ) -> Result<ChangedChunks, PoolError> {
        self.check_failed()?;
        let cs = self.inner.chunk_size;
        let st = self.read_state();
        st.volume(volume)?;
        for id in base.iter().chain([&target]) {
            st.volume(*id)?;
            if !st.descends_from(*id, volume) {
                return Err(PoolError::NotSameLineage { id: *id, volume });
            }
        }
        let t = st.volume(target)?;
        let b = match base {
            Some(b) => {
                let b = st.volume(b)?;
                (b.root, b.height)
            }
            None => (NO_NODE, t.height),
        };
        let end = t.size.div_ceil(cs);
        let mut ranges: Vec<ChunkRange> = Vec::new();
        let mut next = None;
        let nodes_visited = st.forest.diff(b, (t.root, t.height), from, |v, mapped| {
            if v >= end {
                return ControlFlow::Break(());
            }
            let full = ranges.len() == max_ranges;
            match ranges.last_mut() {
                Some(r) if r.first + r.count == v && r.mapped == mapped => r.count += 1,
                _ if full => {
                    next = Some(v);
                    return ControlFlow::Break(());
                }
                _ => ranges.push(ChunkRange {
                    first: v,
                    count: 1,
                    mapped,
                }),
            }
            ControlFlow::Continue(())
        });
        Ok(ChangedChunks {
            chunk_size: cs,
            target_size: t.size,
            ranges,
            next,
            nodes_visited,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::super::test_utils::{CHUNK, TestPool, assert_err, pattern};
    use super::*;

    /// Every changed chunk as (chunk, mapped), over all pages of `page` ranges.
    fn changed(t: &TestPool, vol: Uuid, base: Option<Uuid>, target: Uuid) -> Vec<(u64, bool)> {
        let mut out = Vec::new();
        let mut from = 0;
        loop {
            let page = t.pool.changed_chunks(vol, base, target, from, 2).unwrap();
            assert_eq!(page.chunk_size, CHUNK);
            for r in &page.ranges {
                out.extend((r.first..r.first + r.count).map(|c| (c, r.mapped)));
            }
            match page.next {
                Some(n) => from = n,
                None => return out,
            }
        }
    }

    fn snap(t: &TestPool, vol: Uuid, name: &str) -> Uuid {
        t.pool.snapshot(vol, name, BTreeMap::new()).unwrap().id
    }

    #[test]
    fn changed_chunks_are_exactly_what_was_written_discarded_or_grown() {
        let t = TestPool::new(64);
        let vol = t.volume("v", 16);
        let c = CHUNK as usize;
        t.pool.write(vol, 0, &pattern(1, 6 * c)).unwrap();
        t.pool.write(vol, 10 * CHUNK, &pattern(2, c)).unwrap();
        let s1 = snap(&t, vol, "s1");
        let all: Vec<(u64, bool)> = [0, 1, 2, 3, 4, 5, 10].map(|c| (c, true)).to_vec();
        assert_eq!(changed(&t, vol, None, s1), all);
        assert_eq!(changed(&t, vol, Some(s1), vol), vec![]);

        // Overwrite part of a shared chunk, write a new one, discard one.
        t.pool.write(vol, 2 * CHUNK + 512, &[9; 512]).unwrap();
        t.pool.write(vol, 12 * CHUNK, &[8; 4096]).unwrap();
        t.pool.discard(vol, 4 * CHUNK, CHUNK).unwrap();
        let s2 = snap(&t, vol, "s2");
        let delta = vec![(2, true), (4, false), (12, true)];
        assert_eq!(changed(&t, vol, Some(s1), s2), delta);
        assert_eq!(changed(&t, vol, Some(s1), vol), delta);
        // The other way round, what s1 holds that s2 does not.
        assert_eq!(
            changed(&t, vol, Some(s2), s1),
            vec![(2, true), (4, true), (12, false)]
        );

        // Grown: nothing new until written past the old end; shrunk: the tail is gone.
        t.pool.resize(vol, 40 * CHUNK, false).unwrap();
        let s3 = snap(&t, vol, "s3");
        assert_eq!(changed(&t, vol, Some(s2), s3), vec![]);
        t.pool.write(vol, 39 * CHUNK, &[7; 512]).unwrap();
        t.pool.resize(vol, 11 * CHUNK, true).unwrap();
        let s4 = snap(&t, vol, "s4");
        assert_eq!(changed(&t, vol, Some(s3), s4), vec![]);
        let page = t.pool.changed_chunks(vol, Some(s2), s4, 0, 10).unwrap();
        assert_eq!(page.target_size, 11 * CHUNK);
        assert_eq!(changed(&t, vol, Some(s1), s4), vec![(2, true), (4, false)]);
    }

    #[test]
    fn unknown_ids_and_other_lineages_are_refused() {
        let t = TestPool::new(16);
        let a = t.volume("a", 2);
        let b = t.volume("b", 2);
        let sa = snap(&t, a, "a1");
        let sb = snap(&t, b, "b1");
        // A snapshot of a snapshot and a clone of one are of the lineage too.
        let sa2 = snap(&t, sa, "a2");
        let ca = t.pool.clone_volume(sa, "a3", BTreeMap::new()).unwrap().id;
        for id in [sa2, ca] {
            t.pool.changed_chunks(a, Some(sa), id, 0, 10).unwrap();
        }
        assert_err(
            t.pool.changed_chunks(a, Some(sb), sa, 0, 10),
            |e| matches!(e, PoolError::NotSameLineage { id, volume } if *id == sb && *volume == a),
        );
        assert_err(t.pool.changed_chunks(a, None, b, 0, 10), |e| {
            matches!(e, PoolError::NotSameLineage { .. })
        });
        let nobody = Uuid::new_v4();
        for (vol, base, target) in [(nobody, None, a), (a, Some(nobody), a), (a, None, nobody)] {
            assert_err(
                t.pool.changed_chunks(vol, base, target, 0, 10),
                |e| matches!(e, PoolError::NoVolume(id) if *id == nobody),
            );
        }
    }

    /// The walk reads nodes in proportion to what changed: the same 1% of chunks
    /// rewritten in a small and in an 8-times larger volume (same tree height) costs the
    /// same nodes.
    #[test]
    fn nodes_visited_follow_the_change_not_the_size() {
        let t = TestPool::new(600);
        let mut visited = Vec::new();
        for (name, chunks) in [("small", 512 * 64), ("large", 512 * 64 * 8)] {
            let vol = t.volume(name, chunks);
            // One chunk in every leaf's span: every leaf is mapped.
            for leaf in 0..chunks / 512 {
                t.pool.write(vol, leaf * 512 * CHUNK, &[1; 512]).unwrap();
            }
            let before = snap(&t, vol, &format!("{name}@1"));
            for leaf in 0..5 {
                t.pool.write(vol, leaf * 512 * CHUNK, &[2; 512]).unwrap();
            }
            let after = snap(&t, vol, &format!("{name}@2"));
            let page = t
                .pool
                .changed_chunks(vol, Some(before), after, 0, 100)
                .unwrap();
            assert_eq!(page.ranges.len(), 5);
            let full = t.pool.changed_chunks(vol, None, after, 0, 100_000).unwrap();
            assert_eq!(full.ranges.len() as u64, chunks / 512);
            assert!(full.nodes_visited > chunks / 512);
            visited.push(page.nodes_visited);
            t.pool.delete_volume(vol).unwrap();
        }
        // The root and the five leaves, on each side.
        assert_eq!(visited, [12, 12]);
    }
}
