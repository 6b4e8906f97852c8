//! Reference counts derived from the mapping trees (at import and by fsck), and the
//! consistency check that compares them with what the metadata stores.

use std::collections::HashMap;

use uuid::Uuid;

use super::volumes::Volume;
use super::{PoolError, ThinPool};
use crate::meta;
use crate::tree::{ChunkId, Entries, MAX_HEIGHT, NO_CHUNK, NO_NODE, Node, NodeId};

/// What a consistency check found (and, with repair, fixed).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    pub chunks_checked: u64,
    /// Chunks counted as used that no mapping references.
    pub leaked_chunks: u64,
    /// Chunks whose stored count differs from the mappings (other than leaks).
    pub refcount_mismatches: u64,
    /// Chunks mapped but counted as free: the dangerous kind.
    pub double_allocations: u64,
    /// Tree nodes no volume reaches.
    pub orphan_nodes: u64,
    pub reclaimed_chunks: u64,
    pub problems: Vec<String>,
}

impl CheckReport {
    pub fn clean(&self) -> bool {
        self.leaked_chunks == 0
            && self.refcount_mismatches == 0
            && self.double_allocations == 0
            && self.orphan_nodes == 0
            && self.problems.is_empty()
    }
}

/// Node reference counts and chunk reference counts as the mappings imply them, with the
/// problems that make the trees unusable (dangling pointers, wrong levels, bad chunks).
pub(super) struct Derived {
    pub(super) node_refs: HashMap<NodeId, u32>,
    pub(super) chunk_refs: Vec<u32>,
    pub(super) fatal: Vec<String>,
}

pub(super) fn derive<'a>(
    nodes: impl Fn(NodeId) -> Option<&'a Node>,
    volumes: &HashMap<Uuid, Volume>,
    chunk_count: usize,
) -> Derived {
    let mut node_refs: HashMap<NodeId, u32> = HashMap::new();
    let mut chunk_refs = vec![0u32; chunk_count];
    let mut fatal = Vec::new();
    // Level at which each node was first reached; a node is expanded only once however
    // many parents share it, so each of its entries is counted once.
    let mut level_of: HashMap<NodeId, u8> = HashMap::new();
    let mut stack: Vec<(NodeId, u8, String)> = Vec::new();
    for v in volumes.values() {
        if v.height == 0 || v.height > MAX_HEIGHT {
            fatal.push(format!("volume {} has height {}", v.id, v.height));
            continue;
        }
        if v.root != NO_NODE {
            stack.push((v.root, v.height - 1, format!("volume {}", v.id)));
        }
    }
    while let Some((id, level, parent)) = stack.pop() {
        *node_refs.entry(id).or_default() += 1;
        if let Some(&seen) = level_of.get(&id) {
            if seen != level {
                fatal.push(format!("node {id} is reached at levels {seen} and {level}"));
            }
            continue;
        }
        level_of.insert(id, level);
        let Some(node) = nodes(id) else {
            fatal.push(format!("{parent} references missing node {id}"));
            continue;
        };
        match (&node.entries, level) {
            (Entries::Leaf(entries), 0) => {
                for &c in entries.iter().filter(|&&c| c != NO_CHUNK) {
                    match chunk_refs.get_mut(c as usize) {
                        Some(r) => *r += 1,
                        None => fatal.push(format!(
                            "node {id} maps chunk {c} beyond the pool's {chunk_count} chunks"
                        )),
                    }
                }
            }
            (Entries::Interior(children), l) if l > 0 => {
                for &c in children.iter().filter(|&&c| c != NO_NODE) {
                    stack.push((c, l - 1, format!("node {id}")));
                }
            }
            _ => fatal.push(format!(
                "node {id} is a {} at level {level}",
                if node.is_leaf() {
                    "leaf"
                } else {
                    "interior node"
                }
            )),
        }
    }
    Derived {
        node_refs,
        chunk_refs,
        fatal,
    }
}

impl ThinPool {
    /// Checks every mapping against the reference counts and the free map; with `repair`,
    /// sets counts to what the mappings imply (reclaiming leaked chunks) and removes
    /// unreachable nodes.
    pub fn check(&self, repair: bool) -> Result<CheckReport, PoolError> {
        self.check_failed()?;
        let mut report = CheckReport::default();
        {
            let mut st = self.write_state();
            let derived = derive(
                |id| st.forest.node(id),
                &st.volumes,
                st.space.total() as usize,
            );
            let mut mapped_fixes = Vec::new();
            for v in st.volumes.values() {
                let mut walked = 0u64;
                st.forest
                    .walk(v.root, v.height, |_| 0, |_, _, _| walked += 1);
                if walked != v.mapped {
                    report.problems.push(format!(
                        "volume {} records {} mapped chunks, its tree maps {walked}",
                        v.id, v.mapped
                    ));
                    mapped_fixes.push((v.id, walked));
                }
            }
            if repair {
                for (id, walked) in mapped_fixes {
                    st.volumes.get_mut(&id).expect("listed above").mapped = walked;
                    st.dirty_volumes.insert(id);
                }
            }
            report.problems.extend(derived.fatal.iter().cloned());
            report.problems.extend(st.import_problems.iter().cloned());
            report.double_allocations = st.import_problems.len() as u64;
            report.chunks_checked = st.space.total();
            for (id, node) in st.forest.nodes() {
                let expected = derived.node_refs.get(id).copied().unwrap_or(0);
                if node.refs != expected {
                    report.problems.push(format!(
                        "node {id} has {} references, the trees give {expected}",
                        node.refs
                    ));
                }
            }
            report.orphan_nodes = st.orphans.len() as u64;
            let mut fixes = Vec::new();
            for (c, (&stored, &mapped)) in st
                .space
                .all_refs()
                .iter()
                .zip(derived.chunk_refs.iter())
                .enumerate()
            {
                if stored == mapped {
                    continue;
                }
                if mapped == 0 {
                    report.leaked_chunks += 1;
                } else if stored == 0 {
                    report.double_allocations += 1;
                    report
                        .problems
                        .push(format!("chunk {c} is mapped but free"));
                } else {
                    report.refcount_mismatches += 1;
                    report.problems.push(format!(
                        "chunk {c} is counted {stored} but mapped {mapped} times"
                    ));
                }
                fixes.push((c as ChunkId, mapped));
            }
            if repair {
                for &(c, r) in &fixes {
                    if r == 0 {
                        report.reclaimed_chunks += 1;
                    }
                    st.space.set_refs(c, r);
                }
                let orphans = std::mem::take(&mut st.orphans);
                for id in orphans {
                    st.records.push((meta::node_key(id).to_vec(), None));
                }
                st.import_problems.clear();
                st.meta_dirty = true;
            }
        }
        if repair {
            self.flush()?;
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::super::test_utils::{CHUNK, TestPool, pattern};
    use super::*;

    #[test]
    fn a_healthy_pool_checks_clean_before_and_after_import() {
        let t = TestPool::new(64);
        let empty = t.pool.check(false).unwrap();
        assert!(empty.clean(), "{empty:?}");
        assert_eq!(empty.chunks_checked, 64);

        let vol = t.volume("v", 16);
        t.pool
            .write(vol, 0, &pattern(1, 6 * CHUNK as usize))
            .unwrap();
        let snap = t.pool.snapshot(vol, "v@1", BTreeMap::new()).unwrap().id;
        let clone = t.pool.clone_volume(snap, "c", BTreeMap::new()).unwrap().id;
        t.pool.write(vol, CHUNK, &[1; 4096]).unwrap();
        t.pool.write(clone, 3 * CHUNK, &[2; 4096]).unwrap();
        t.pool.discard(vol, 4 * CHUNK, CHUNK).unwrap();
        t.pool.resize(clone, 2 * CHUNK, true).unwrap();
        let report = t.pool.check(false).unwrap();
        assert!(report.clean(), "{report:?}");

        // A repairing check of a clean pool finds nothing to do.
        let repaired = t.pool.check(true).unwrap();
        assert_eq!(repaired.reclaimed_chunks, 0);
        assert!(repaired.clean(), "{repaired:?}");
        t.pool.delete_volume(vol).unwrap();
        let t = t.reopen();
        let report = t.pool.check(false).unwrap();
        assert!(report.clean(), "{report:?}");
    }

    #[test]
    fn derive_counts_shared_nodes_once_and_reports_what_breaks_a_tree() {
        let t = TestPool::new(32);
        let vol = t.volume("v", 4);
        t.pool.write(vol, 0, &[1; 512]).unwrap();
        t.pool.snapshot(vol, "s", BTreeMap::new()).unwrap();
        let st = t.pool.read_state();
        let derived = derive(|id| st.forest.node(id), &st.volumes, 32);
        assert!(derived.fatal.is_empty(), "{:?}", derived.fatal);
        assert_eq!(derived.chunk_refs.iter().sum::<u32>(), 1);
        assert!(
            derived.node_refs.values().all(|&r| r == 2),
            "{:?}",
            derived.node_refs
        );

        // The same volumes over a forest that lacks their nodes.
        let derived = derive(|_| None, &st.volumes, 32);
        assert_eq!(derived.fatal.len(), 1, "{:?}", derived.fatal);
        assert!(derived.fatal[0].contains("missing node"));
        // A pool too small for the chunks they map.
        let derived = derive(|id| st.forest.node(id), &st.volumes, 0);
        assert!(derived.fatal.iter().all(|p| p.contains("beyond the pool")));
        assert!(!derived.fatal.is_empty());
    }
}
