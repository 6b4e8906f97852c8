//! The mapping tree: virtual chunk → physical chunk, for every volume of a pool.
//!
//! A radix tree with reference-counted nodes shared between a volume and its snapshots
//! and clones, the dm-thin way: a snapshot takes a reference on the volume's root (O(1),
//! whatever was written), and a later write *shadows* the path to its leaf: a node that
//! more than one parent references is copied, the copy takes a reference on each of its
//! children (nodes, or data chunks for a leaf), and the original loses one. A lookup walks
//! at most `height` nodes whatever the number of snapshots: there is no chain to follow and
//! nothing ever needs coalescing.
//!
//! Node references are counted here; data-chunk references go through [`ChunkRefs`] (the
//! pool's space map). This module does no I/O: it records which nodes changed or died so
//! the metadata store can persist them at the next commit.

use std::collections::{HashMap, HashSet};
use std::ops::ControlFlow;

/// log2 of the number of entries in a node.
pub const FANOUT_SHIFT: u32 = 9;
/// Entries per node: a leaf maps 512 chunks (32 MiB at 64 KiB chunks).
pub const FANOUT: usize = 1 << FANOUT_SHIFT;
/// Tallest tree: 512^7 chunks is more than any u64 byte size can address at 64 KiB.
pub const MAX_HEIGHT: u8 = 7;

pub type NodeId = u64;
pub type ChunkId = u32;

/// "No node": an empty subtree (node ids start at 1).
pub const NO_NODE: NodeId = 0;
/// "No chunk": an unmapped virtual chunk.
pub const NO_CHUNK: ChunkId = u32::MAX;

/// Reference counting of data chunks, implemented by the pool's space map.
pub trait ChunkRefs {
    fn incref(&mut self, chunk: ChunkId);
    fn decref(&mut self, chunk: ChunkId);
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entries {
    Leaf(Box<[ChunkId; FANOUT]>),
    Interior(Box<[NodeId; FANOUT]>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// Parents (interior nodes or volume roots) that point to this node.
    pub refs: u32,
    /// Non-empty entries.
    pub used: u16,
    pub entries: Entries,
}

impl Node {
    fn empty(leaf: bool) -> Self {
        let entries = if leaf {
            Entries::Leaf(Box::new([NO_CHUNK; FANOUT]))
        } else {
            Entries::Interior(Box::new([NO_NODE; FANOUT]))
        };
        Node {
            refs: 1,
            used: 0,
            entries,
        }
    }

    pub fn is_leaf(&self) -> bool {
        matches!(self.entries, Entries::Leaf(_))
    }
}

/// The smallest height whose tree addresses `chunks` virtual chunks.
pub fn height_for(chunks: u64) -> u8 {
    let mut height = 1u8;
    let mut span = FANOUT as u128;
    while span < u128::from(chunks) && height < MAX_HEIGHT {
        height += 1;
        span <<= FANOUT_SHIFT;
    }
    height
}

fn index_at(vchunk: u64, level: u8) -> usize {
    ((vchunk >> (u32::from(level) * FANOUT_SHIFT)) as usize) & (FANOUT - 1)
}

/// Every node of every volume of one pool.
#[derive(Debug, Default)]
pub struct Forest {
    nodes: HashMap<NodeId, Node>,
    next_id: NodeId,
    /// Created or changed since the last [`Forest::take_changes`].
    dirty: HashSet<NodeId>,
    /// Freed since the last [`Forest::take_changes`].
    freed: HashSet<NodeId>,
}

/// Node changes to persist at a commit.
#[derive(Debug, Default)]
pub struct ForestChanges {
    pub dirty: Vec<NodeId>,
    pub freed: Vec<NodeId>,
}

/// One step of a lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lookup {
    pub chunk: Option<ChunkId>,
    /// Every node on the path has a single parent: a write can change the leaf in place.
    pub exclusive_path: bool,
}

impl Forest {
    pub fn new() -> Self {
        Forest {
            next_id: 1,
            ..Default::default()
        }
    }

    /// Rebuilds a forest from persisted nodes; `refs` of each node must already be set.
    pub fn from_nodes(nodes: HashMap<NodeId, Node>, next_id: NodeId) -> Self {
        Forest {
            nodes,
            next_id,
            dirty: HashSet::new(),
            freed: HashSet::new(),
        }
    }

    pub fn node(&self, id: NodeId) -> Option<&Node> {
        self.nodes.get(&id)
    }

    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    pub fn next_id(&self) -> NodeId {
        self.next_id
    }

    pub fn nodes(&self) -> impl Iterator<Item = (&NodeId, &Node)> {
        self.nodes.iter()
    }

    /// Changes since the last call, for the metadata store to persist.
    pub fn take_changes(&mut self) -> ForestChanges {
        let mut dirty: Vec<NodeId> = self.dirty.drain().collect();
        dirty.sort_unstable();
        let mut freed: Vec<NodeId> = self.freed.drain().collect();
        freed.sort_unstable();
        ForestChanges { dirty, freed }
    }

    fn alloc(&mut self, leaf: bool) -> NodeId {
        let id = self.next_id;
        self.next_id += 1;
        self.nodes.insert(id, Node::empty(leaf));
        self.dirty.insert(id);
        id
    }

    fn get(&self, id: NodeId) -> &Node {
        self.nodes
            .get(&id)
            .unwrap_or_else(|| panic!("mapping tree references missing node {id}"))
    }

    fn get_mut(&mut self, id: NodeId) -> &mut Node {
        self.dirty.insert(id);
        self.nodes
            .get_mut(&id)
            .unwrap_or_else(|| panic!("mapping tree references missing node {id}"))
    }

    /// Where `vchunk` is mapped in the tree of `root`.
    pub fn lookup(&self, root: NodeId, height: u8, vchunk: u64) -> Lookup {
        let mut id = root;
        let mut exclusive = true;
        let mut level = height;
        while id != NO_NODE {
            level -= 1;
            let node = self.get(id);
            exclusive &= node.refs == 1;
            let i = index_at(vchunk, level);
            match &node.entries {
                Entries::Leaf(chunks) => {
                    let chunk = chunks[i];
                    return Lookup {
                        chunk: (chunk != NO_CHUNK).then_some(chunk),
                        exclusive_path: exclusive,
                    };
                }
                Entries::Interior(children) => id = children[i],
            }
        }
        Lookup {
            chunk: None,
            exclusive_path: exclusive,
        }
    }

    pub fn incref(&mut self, id: NodeId) {
        if id != NO_NODE {
            // Reference counts are not persisted (they are derived at load), so this does
            // not make the node dirty.
            self.nodes
                .get_mut(&id)
                .expect("incref of a missing node")
                .refs += 1;
        }
    }

    /// Drops one reference; a node that loses its last one is freed with its subtree.
    pub fn decref(&mut self, id: NodeId, chunks: &mut impl ChunkRefs) {
        let mut stack = vec![id];
        while let Some(id) = stack.pop() {
            if id == NO_NODE {
                continue;
            }
            let node = self.nodes.get_mut(&id).expect("decref of a missing node");
            node.refs -= 1;
            if node.refs > 0 {
                continue;
            }
            let node = self.nodes.remove(&id).expect("present");
            self.dirty.remove(&id);
            self.freed.insert(id);
            match node.entries {
                Entries::Leaf(entries) => {
                    for &c in entries.iter().filter(|&&c| c != NO_CHUNK) {
                        chunks.decref(c);
                    }
                }
                Entries::Interior(children) => {
                    stack.extend(children.iter().copied().filter(|&c| c != NO_NODE));
                }
            }
        }
    }

    /// Makes `id` exclusive to the parent that calls: a node with other parents is copied,
    /// the copy taking a reference on every child. Returns the node to use.
    fn shadow(&mut self, id: NodeId, chunks: &mut impl ChunkRefs) -> NodeId {
        let node = self.get(id);
        if node.refs == 1 {
            return id;
        }
        let mut copy = node.clone();
        copy.refs = 1;
        match &copy.entries {
            Entries::Leaf(entries) => {
                for &c in entries.iter().filter(|&&c| c != NO_CHUNK) {
                    chunks.incref(c);
                }
            }
            Entries::Interior(children) => {
                for &c in children.iter().filter(|&&c| c != NO_NODE) {
                    self.nodes.get_mut(&c).expect("child present").refs += 1;
                }
            }
        }
        // Only the count changes, which is not persisted: the old node stays clean.
        self.nodes.get_mut(&id).expect("present").refs -= 1;
        let new_id = self.next_id;
        self.next_id += 1;
        self.nodes.insert(new_id, copy);
        self.dirty.insert(new_id);
        new_id
    }

    /// Returns the leaf that maps `vchunk` in a path exclusive to this volume, shadowing
    /// shared nodes and creating missing ones. `root` is updated when the root changes.
    pub fn leaf_for_write(
        &mut self,
        root: &mut NodeId,
        height: u8,
        vchunk: u64,
        chunks: &mut impl ChunkRefs,
    ) -> NodeId {
        if *root == NO_NODE {
            *root = self.alloc(height == 1);
        } else {
            *root = self.shadow(*root, chunks);
        }
        let mut id = *root;
        for level in (1..height).rev() {
            let i = index_at(vchunk, level);
            let child = match &self.get(id).entries {
                Entries::Interior(children) => children[i],
                Entries::Leaf(_) => panic!("leaf above level 0 in node {id}"),
            };
            let next = if child == NO_NODE {
                self.alloc(level == 1)
            } else {
                self.shadow(child, chunks)
            };
            if next != child {
                let node = self.get_mut(id);
                if child == NO_NODE {
                    node.used += 1;
                }
                if let Entries::Interior(children) = &mut node.entries {
                    children[i] = next;
                }
            }
            id = next;
        }
        id
    }

    /// The chunk a leaf maps for `vchunk`.
    pub fn leaf_get(&self, leaf: NodeId, vchunk: u64) -> Option<ChunkId> {
        match &self.get(leaf).entries {
            Entries::Leaf(entries) => {
                let c = entries[index_at(vchunk, 0)];
                (c != NO_CHUNK).then_some(c)
            }
            Entries::Interior(_) => panic!("node {leaf} is not a leaf"),
        }
    }

    /// Sets a leaf's entry for `vchunk`; the caller keeps chunk reference counts right.
    pub fn leaf_set(&mut self, leaf: NodeId, vchunk: u64, chunk: ChunkId) {
        let node = self.get_mut(leaf);
        let Entries::Leaf(entries) = &mut node.entries else {
            panic!("node {leaf} is not a leaf");
        };
        let slot = &mut entries[index_at(vchunk, 0)];
        match (*slot == NO_CHUNK, chunk == NO_CHUNK) {
            (true, false) => node.used += 1,
            (false, true) => node.used -= 1,
            _ => {}
        }
        *slot = chunk;
    }

    /// Unmaps `vchunk`, dropping the chunk's reference and pruning nodes left empty.
    /// Returns the chunk that was mapped.
    pub fn unmap(
        &mut self,
        root: &mut NodeId,
        height: u8,
        vchunk: u64,
        chunks: &mut impl ChunkRefs,
    ) -> Option<ChunkId> {
        let old = self.lookup(*root, height, vchunk).chunk?;
        let leaf = self.leaf_for_write(root, height, vchunk, chunks);
        self.leaf_set(leaf, vchunk, NO_CHUNK);
        chunks.decref(old);
        // Walk the (now exclusive) path again and prune empty nodes bottom-up.
        let mut path = Vec::with_capacity(usize::from(height));
        let mut id = *root;
        for level in (0..height).rev() {
            path.push((id, index_at(vchunk, level)));
            if let Entries::Interior(children) = &self.get(id).entries {
                id = children[index_at(vchunk, level)];
            }
        }
        while let Some((id, _)) = path.pop() {
            if self.get(id).used > 0 {
                break;
            }
            // Exclusive path: the only reference is the parent's, so this frees it.
            self.decref(id, chunks);
            match path.last() {
                Some(&(parent, i)) => {
                    let node = self.get_mut(parent);
                    if let Entries::Interior(children) = &mut node.entries {
                        children[i] = NO_NODE;
                    }
                    node.used -= 1;
                }
                None => *root = NO_NODE,
            }
        }
        Some(old)
    }

    /// Adds levels above the root so the tree addresses more chunks.
    pub fn grow(&mut self, root: &mut NodeId, from: u8, to: u8) {
        if *root == NO_NODE {
            return;
        }
        for _ in from..to {
            let new_root = self.alloc(false);
            let node = self.get_mut(new_root);
            if let Entries::Interior(children) = &mut node.entries {
                children[0] = *root;
            }
            node.used = 1;
            // The old root's reference moves from the volume to the new root.
            *root = new_root;
        }
    }

    /// Calls `f(vchunk, chunk, shared)` for every mapped chunk of the tree in order;
    /// `shared` tells whether another volume also reaches that chunk.
    pub fn walk(
        &self,
        root: NodeId,
        height: u8,
        chunk_refs: impl Fn(ChunkId) -> u32,
        mut f: impl FnMut(u64, ChunkId, bool),
    ) {
        if root == NO_NODE {
            return;
        }
        // (node, level, first vchunk it covers, shared above)
        let mut stack = vec![(root, height - 1, 0u64, false)];
        while let Some((id, level, base, shared_above)) = stack.pop() {
            let node = self.get(id);
            let shared = shared_above || node.refs > 1;
            match &node.entries {
                Entries::Leaf(entries) => {
                    for (i, &c) in entries.iter().enumerate() {
                        if c != NO_CHUNK {
                            f(base + i as u64, c, shared || chunk_refs(c) > 1);
                        }
                    }
                }
                Entries::Interior(children) => {
                    let span = 1u64 << (u32::from(level) * FANOUT_SHIFT);
                    for (i, &c) in children.iter().enumerate().rev() {
                        if c != NO_NODE {
                            stack.push((c, level - 1, base + i as u64 * span, shared));
                        }
                    }
                }
            }
        }
    }

    /// The mapped chunks of `root` with virtual index in `from..to`, in order.
    pub fn mapped_range(
        &self,
        root: NodeId,
        height: u8,
        from: u64,
        to: u64,
    ) -> Vec<(u64, ChunkId)> {
        let mut out = Vec::new();
        if root == NO_NODE || from >= to {
            return out;
        }
        let mut stack = vec![(root, height - 1, 0u64)];
        while let Some((id, level, base)) = stack.pop() {
            let span = 1u64 << (u32::from(level) * FANOUT_SHIFT);
            match &self.get(id).entries {
                Entries::Leaf(entries) => {
                    for (i, &c) in entries.iter().enumerate() {
                        let v = base + i as u64;
                        if c != NO_CHUNK && v >= from && v < to {
                            out.push((v, c));
                        }
                    }
                }
                Entries::Interior(children) => {
                    for (i, &c) in children.iter().enumerate().rev() {
                        let start = base + i as u64 * span;
                        let end = start.saturating_add(span);
                        if c != NO_NODE && end > from && start < to {
                            stack.push((c, level - 1, start));
                        }
                    }
                }
            }
        }
        out
    }
}

/// One side of a [`Forest::diff`]: a node seen `lift` levels above its own (a tree grown
/// by a resize keeps its old root as child 0 of the new ones, so a snapshot taken before
/// the resize lines up with the volume after it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Side {
    node: NodeId,
    lift: u8,
}

const EMPTY_SIDE: Side = Side {
    node: NO_NODE,
    lift: 0,
};

/// Entries a diff compares at once: a block both trees hold alike (most, when little
/// changed) is passed over with one slice comparison rather than entry by entry.
const DIFF_BLOCK: usize = 64;

/// A diff in progress: the chunks not yet reported start at `from`.
struct DiffWalk<'a, F> {
    forest: &'a Forest,
    from: u64,
    visited: u64,
    report: F,
}

impl<F: FnMut(u64, bool) -> ControlFlow<()>> DiffWalk<'_, F> {
    fn child(&self, side: Side, i: usize) -> Side {
        if side.node == NO_NODE {
            return EMPTY_SIDE;
        }
        if side.lift > 0 {
            return if i == 0 {
                Side {
                    node: side.node,
                    lift: side.lift - 1,
                }
            } else {
                EMPTY_SIDE
            };
        }
        match &self.forest.get(side.node).entries {
            Entries::Interior(children) => Side {
                node: children[i],
                lift: 0,
            },
            Entries::Leaf(_) => panic!("leaf above level 0 in node {}", side.node),
        }
    }

    /// The children of an interior node seen at its own height.
    fn children(forest: &Forest, side: Side) -> Option<&[NodeId; FANOUT]> {
        if side.node == NO_NODE || side.lift > 0 {
            return None;
        }
        match &forest.get(side.node).entries {
            Entries::Interior(children) => Some(children),
            Entries::Leaf(_) => panic!("leaf above level 0 in node {}", side.node),
        }
    }

    fn leaf(forest: &Forest, side: Side) -> Option<&[ChunkId; FANOUT]> {
        if side.node == NO_NODE {
            return None;
        }
        match &forest.get(side.node).entries {
            Entries::Leaf(chunks) => Some(chunks),
            Entries::Interior(_) => panic!("node {} at level 0 is not a leaf", side.node),
        }
    }

    /// Compares the subtrees `a` and `b` at `level`, which cover the chunks from `base`.
    fn walk(&mut self, a: Side, b: Side, level: u8, base: u64) -> ControlFlow<()> {
        // The same node at the same height maps the same chunks: nothing below differs.
        if a == b {
            return ControlFlow::Continue(());
        }
        let span = 1u64 << (u32::from(level) * FANOUT_SHIFT);
        if base.saturating_add(span.saturating_mul(FANOUT as u64)) <= self.from {
            return ControlFlow::Continue(());
        }
        self.visited += [a, b]
            .iter()
            .filter(|s| s.node != NO_NODE && s.lift == 0)
            .count() as u64;
        let forest = self.forest;
        if level == 0 {
            let (la, lb) = (Self::leaf(forest, a), Self::leaf(forest, b));
            for start in (0..FANOUT).step_by(DIFF_BLOCK) {
                let r = start..start + DIFF_BLOCK;
                if base + r.end as u64 <= self.from
                    || la.map(|l| &l[r.clone()]) == lb.map(|l| &l[r.clone()])
                {
                    continue;
                }
                for i in r {
                    let ca = la.map_or(NO_CHUNK, |l| l[i]);
                    let cb = lb.map_or(NO_CHUNK, |l| l[i]);
                    let v = base + i as u64;
                    if ca != cb && v >= self.from {
                        (self.report)(v, cb != NO_CHUNK)?;
                    }
                }
            }
            return ControlFlow::Continue(());
        }
        // Two interior nodes as they are: their children compared a block at a time.
        if let (Some(ca), Some(cb)) = (Self::children(forest, a), Self::children(forest, b)) {
            for start in (0..FANOUT).step_by(DIFF_BLOCK) {
                if ca[start..start + DIFF_BLOCK] == cb[start..start + DIFF_BLOCK] {
                    continue;
                }
                for i in start..start + DIFF_BLOCK {
                    let side = |node| Side { node, lift: 0 };
                    self.walk(side(ca[i]), side(cb[i]), level - 1, base + i as u64 * span)?;
                }
            }
            return ControlFlow::Continue(());
        }
        for i in 0..FANOUT {
            let (ca, cb) = (self.child(a, i), self.child(b, i));
            self.walk(ca, cb, level - 1, base + i as u64 * span)?;
        }
        ControlFlow::Continue(())
    }
}

impl Forest {
    /// Reports, in order from virtual chunk `from`, every chunk that `target` (root,
    /// height) maps differently from `base`: `report(vchunk, mapped)`, where `mapped` is
    /// false for a chunk `target` no longer maps (it reads zeros). Subtrees both share are
    /// skipped whole, so the cost follows the change, not the size. `report` may stop the
    /// walk. Returns the number of nodes read.
    pub fn diff(
        &self,
        base: (NodeId, u8),
        target: (NodeId, u8),
        from: u64,
        report: impl FnMut(u64, bool) -> ControlFlow<()>,
    ) -> u64 {
        let height = base.1.max(target.1);
        let side = |(node, h): (NodeId, u8)| Side {
            node,
            lift: height - h,
        };
        let mut walk = DiffWalk {
            forest: self,
            from,
            visited: 0,
            report,
        };
        let _ = walk.walk(side(base), side(target), height - 1, 0);
        walk.visited
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// Chunk reference counts kept in a map, for tests of the tree alone.
    #[derive(Default, Debug)]
    struct Refs(BTreeMap<ChunkId, u32>);

    impl ChunkRefs for Refs {
        fn incref(&mut self, c: ChunkId) {
            *self.0.entry(c).or_default() += 1;
        }
        fn decref(&mut self, c: ChunkId) {
            let r = self.0.get_mut(&c).expect("decref of unreferenced chunk");
            *r -= 1;
            if *r == 0 {
                self.0.remove(&c);
            }
        }
    }

    fn map(f: &mut Forest, refs: &mut Refs, root: &mut NodeId, h: u8, v: u64, c: ChunkId) {
        let leaf = f.leaf_for_write(root, h, v, refs);
        if let Some(old) = f.leaf_get(leaf, v) {
            refs.decref(old);
        }
        refs.incref(c);
        f.leaf_set(leaf, v, c);
    }

    #[test]
    fn heights() {
        assert_eq!(height_for(0), 1);
        assert_eq!(height_for(512), 1);
        assert_eq!(height_for(513), 2);
        assert_eq!(height_for(512 * 512), 2);
        assert_eq!(height_for(512 * 512 + 1), 3);
        assert_eq!(height_for(u64::MAX), MAX_HEIGHT);
    }

    #[test]
    fn snapshot_shares_then_write_shadows_only_the_path() {
        let mut f = Forest::new();
        let mut refs = Refs::default();
        let mut vol = NO_NODE;
        let h = 3;
        for v in 0..2000u64 {
            map(&mut f, &mut refs, &mut vol, h, v * 7, v as ChunkId);
        }
        let nodes_before = f.node_count();
        // Snapshot: one more reference on the root, nothing copied.
        let snap = vol;
        f.incref(snap);
        assert_eq!(f.node_count(), nodes_before);
        assert!(!f.lookup(vol, h, 7).exclusive_path);

        map(&mut f, &mut refs, &mut vol, h, 7, 90_000);
        // Root, one interior node and one leaf copied.
        assert_eq!(f.node_count(), nodes_before + 3);
        assert_eq!(f.lookup(vol, h, 7).chunk, Some(90_000));
        assert!(f.lookup(vol, h, 7).exclusive_path);
        assert_eq!(f.lookup(snap, h, 7).chunk, Some(1));
        // Chunks of the copied leaf are now referenced twice; chunk 1 once (by the snapshot).
        assert_eq!(refs.0[&0], 2);
        assert_eq!(refs.0[&1], 1);

        f.decref(snap, &mut refs);
        assert_eq!(f.lookup(vol, h, 0).chunk, Some(0));
        assert_eq!(refs.0[&0], 1);
        assert!(
            !refs.0.contains_key(&1),
            "chunk only the snapshot had is free"
        );
        f.decref(vol, &mut refs);
        assert_eq!(f.node_count(), 0);
        assert!(refs.0.is_empty());
    }

    #[test]
    fn unmap_prunes_empty_nodes() {
        let mut f = Forest::new();
        let mut refs = Refs::default();
        let mut root = NO_NODE;
        map(&mut f, &mut refs, &mut root, 2, 5, 1);
        map(&mut f, &mut refs, &mut root, 2, 600, 2);
        assert_eq!(f.node_count(), 3);
        assert_eq!(f.unmap(&mut root, 2, 600, &mut refs), Some(2));
        assert_eq!(f.node_count(), 2);
        assert_eq!(f.unmap(&mut root, 2, 600, &mut refs), None);
        assert_eq!(f.unmap(&mut root, 2, 5, &mut refs), Some(1));
        assert_eq!(root, NO_NODE);
        assert_eq!(f.node_count(), 0);
        assert!(refs.0.is_empty());
    }

    #[test]
    fn grow_keeps_mappings() {
        let mut f = Forest::new();
        let mut refs = Refs::default();
        let mut root = NO_NODE;
        map(&mut f, &mut refs, &mut root, 1, 3, 9);
        f.grow(&mut root, 1, 3);
        assert_eq!(f.lookup(root, 3, 3).chunk, Some(9));
        map(&mut f, &mut refs, &mut root, 3, 512 * 512 + 1, 10);
        let mut seen = vec![];
        f.walk(
            root,
            3,
            |c| refs.0[&c],
            |v, c, shared| seen.push((v, c, shared)),
        );
        assert_eq!(seen, vec![(3, 9, false), (512 * 512 + 1, 10, false)]);
        assert_eq!(
            f.mapped_range(root, 3, 4, u64::MAX),
            vec![(512 * 512 + 1, 10)]
        );
    }

    /// Every change `diff` reports from chunk 0, and the nodes it read.
    fn changes(f: &Forest, base: (NodeId, u8), target: (NodeId, u8)) -> (Vec<(u64, bool)>, u64) {
        let mut out = Vec::new();
        let visited = f.diff(base, target, 0, |v, mapped| {
            out.push((v, mapped));
            ControlFlow::Continue(())
        });
        (out, visited)
    }

    #[test]
    fn diff_reports_writes_unmaps_and_skips_shared_subtrees() {
        let mut f = Forest::new();
        let mut refs = Refs::default();
        let mut vol = NO_NODE;
        let h = 3;
        for v in 0..5000u64 {
            map(&mut f, &mut refs, &mut vol, h, v * 50, v as ChunkId);
        }
        let snap = vol;
        f.incref(snap);
        assert_eq!(changes(&f, (snap, h), (vol, h)), (vec![], 0));

        map(&mut f, &mut refs, &mut vol, h, 100, 90_000);
        map(&mut f, &mut refs, &mut vol, h, 7, 90_001);
        f.unmap(&mut vol, h, 200_000, &mut refs);
        let (seen, visited) = changes(&f, (snap, h), (vol, h));
        assert_eq!(seen, vec![(7, true), (100, true), (200_000, false)]);
        // Two roots, and per side one interior node and one leaf for each of the two
        // changed leaves (both under the first interior node): 2 + 2 + 4.
        assert_eq!(visited, 8);
        // Nothing as a base: every mapped chunk.
        let (all, _) = changes(&f, (NO_NODE, h), (vol, h));
        // 5,000 mapped, chunk 7 added, chunk 200,000 gone.
        assert_eq!(all.len(), 5000);
        assert!(all.iter().all(|&(_, mapped)| mapped));

        // Resuming skips what was reported, and stopping stops.
        let mut after = vec![];
        f.diff((snap, h), (vol, h), 8, |v, _| {
            after.push(v);
            ControlFlow::Break(())
        });
        assert_eq!(after, vec![100]);
    }

    #[test]
    fn diff_matches_a_lookup_of_every_chunk_after_scattered_changes() {
        // xorshift: the same scattered writes and unmaps on every run.
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move |n: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % n
        };
        let (h, span) = (2, 512 * 512_u64);
        let mut f = Forest::new();
        let mut refs = Refs::default();
        let mut vol = NO_NODE;
        for c in 0..3000 {
            map(&mut f, &mut refs, &mut vol, h, next(span), c);
        }
        let snap = vol;
        f.incref(snap);
        for c in 0..300 {
            match next(4) {
                0 => {
                    f.unmap(&mut vol, h, next(span), &mut refs);
                }
                // Runs of neighbours too, so some blocks of a leaf change whole.
                1 => {
                    let at = next(span - 100);
                    for v in at..at + 100 {
                        map(
                            &mut f,
                            &mut refs,
                            &mut vol,
                            h,
                            v,
                            200_000 + c * 100 + v as u32 % 100,
                        );
                    }
                }
                _ => map(&mut f, &mut refs, &mut vol, h, next(span), 100_000 + c),
            }
        }
        let want: Vec<(u64, bool)> = (0..span)
            .filter_map(|v| {
                let (a, b) = (f.lookup(snap, h, v).chunk, f.lookup(vol, h, v).chunk);
                (a != b).then_some((v, b.is_some()))
            })
            .collect();
        assert!(want.len() > 300, "{}", want.len());
        assert_eq!(changes(&f, (snap, h), (vol, h)).0, want);
        for _ in 0..20 {
            let from = next(span);
            let mut got = vec![];
            f.diff((snap, h), (vol, h), from, |v, mapped| {
                got.push((v, mapped));
                ControlFlow::Continue(())
            });
            let rest: Vec<_> = want.iter().filter(|(v, _)| *v >= from).copied().collect();
            assert_eq!(got, rest, "from {from}");
        }
    }

    #[test]
    fn diff_lines_up_trees_of_different_heights() {
        let mut f = Forest::new();
        let mut refs = Refs::default();
        let mut vol = NO_NODE;
        map(&mut f, &mut refs, &mut vol, 1, 3, 1);
        let snap = vol;
        f.incref(snap);
        f.grow(&mut vol, 1, 3);
        assert_eq!(changes(&f, (snap, 1), (vol, 3)).0, vec![]);
        map(&mut f, &mut refs, &mut vol, 3, 512 * 512 + 9, 2);
        map(&mut f, &mut refs, &mut vol, 3, 4, 3);
        assert_eq!(
            changes(&f, (snap, 1), (vol, 3)).0,
            vec![(4, true), (512 * 512 + 9, true)]
        );
        assert_eq!(
            changes(&f, (vol, 3), (snap, 1)).0,
            vec![(4, false), (512 * 512 + 9, false)]
        );
    }
}
