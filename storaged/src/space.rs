//! The space map: a reference count for every data chunk of the pool (0 = free), which
//! chunks may be handed out now, and which free chunks are known to read as zeros.
//!
//! Two rules keep flushed data safe across a crash, whatever the committed metadata says:
//! - a chunk freed since the last commit is not handed out again until a commit has
//!   recorded it free (otherwise new data could land in a chunk that the committed
//!   metadata still maps to an older, flushed volume state);
//! - a chunk that was shared at any time since the last commit is not overwritten in
//!   place even if it now has one reference (the committed metadata may still share it).

use std::collections::{BTreeSet, HashSet};

use crate::tree::{ChunkId, ChunkRefs};

/// Reference counts per metadata page.
pub const REFS_PER_PAGE: usize = 1024;

/// A fixed-size bit set.
#[derive(Debug, Clone, Default)]
pub struct Bits {
    words: Vec<u64>,
    len: usize,
}

impl Bits {
    pub fn new(len: usize) -> Self {
        Bits {
            words: vec![0; len.div_ceil(64)],
            len,
        }
    }

    pub fn resize(&mut self, len: usize) {
        self.words.resize(len.div_ceil(64), 0);
        self.len = len;
    }

    pub fn get(&self, i: usize) -> bool {
        self.words[i / 64] & (1 << (i % 64)) != 0
    }

    pub fn set(&mut self, i: usize, v: bool) {
        if v {
            self.words[i / 64] |= 1 << (i % 64);
        } else {
            self.words[i / 64] &= !(1 << (i % 64));
        }
    }

    /// The first set bit at or after `from`.
    pub fn next_set(&self, from: usize) -> Option<usize> {
        if from >= self.len {
            return None;
        }
        let mut w = from / 64;
        let mut word = self.words[w] & (!0u64 << (from % 64));
        loop {
            if word != 0 {
                let i = w * 64 + word.trailing_zeros() as usize;
                return (i < self.len).then_some(i);
            }
            w += 1;
            if w >= self.words.len() {
                return None;
            }
            word = self.words[w];
        }
    }
}

/// Space-map changes to persist at a commit.
#[derive(Debug, Default)]
pub struct SpaceChanges {
    /// Changed pages and their content.
    pub pages: Vec<(u64, Vec<u32>)>,
    /// Chunks whose count reached zero: allocatable once the commit is durable.
    pub freed: Vec<ChunkId>,
}

#[derive(Debug)]
pub struct SpaceMap {
    refs: Vec<u32>,
    available: Bits,
    zeroed: Bits,
    available_count: u64,
    used_count: u64,
    cursor: usize,
    dirty_pages: BTreeSet<u64>,
    freed: Vec<ChunkId>,
    freed_inflight: usize,
    shared: HashSet<ChunkId>,
    shared_inflight: HashSet<ChunkId>,
}

impl SpaceMap {
    /// A map of `chunks` free chunks; `zeroed` tells whether they read as zeros.
    pub fn new(chunks: usize, zeroed: bool) -> Self {
        Self::from_refs(vec![0; chunks], zeroed)
    }

    /// Rebuilds the map from persisted counts. Free chunks are zeroed when `zeroed`.
    pub fn from_refs(refs: Vec<u32>, zeroed: bool) -> Self {
        let n = refs.len();
        let mut available = Bits::new(n);
        let mut zero_bits = Bits::new(n);
        let mut available_count = 0;
        for (i, &r) in refs.iter().enumerate() {
            if r == 0 {
                available.set(i, true);
                zero_bits.set(i, zeroed);
                available_count += 1;
            }
        }
        SpaceMap {
            used_count: n as u64 - available_count,
            refs,
            available,
            zeroed: zero_bits,
            available_count,
            cursor: 0,
            dirty_pages: BTreeSet::new(),
            freed: Vec::new(),
            freed_inflight: 0,
            shared: HashSet::new(),
            shared_inflight: HashSet::new(),
        }
    }

    pub fn total(&self) -> u64 {
        self.refs.len() as u64
    }

    /// Chunks with at least one reference.
    pub fn used(&self) -> u64 {
        self.used_count
    }

    /// Chunks that can be handed out now.
    pub fn available(&self) -> u64 {
        self.available_count
    }

    /// Free chunks waiting for a commit before they can be handed out.
    pub fn pending_free(&self) -> u64 {
        (self.freed.len() + self.freed_inflight) as u64
    }

    pub fn refs(&self, chunk: ChunkId) -> u32 {
        self.refs[chunk as usize]
    }

    pub fn all_refs(&self) -> &[u32] {
        &self.refs
    }

    /// Whether a write may change this chunk's data in place (see the module's rules).
    pub fn writable_in_place(&self, chunk: ChunkId) -> bool {
        self.refs[chunk as usize] == 1
            && !self.shared.contains(&chunk)
            && !self.shared_inflight.contains(&chunk)
    }

    /// Hands out a free chunk with one reference. Returns it and whether it reads as zeros.
    pub fn allocate(&mut self) -> Option<(ChunkId, bool)> {
        let i = match self.available.next_set(self.cursor) {
            Some(i) => i,
            None => self.available.next_set(0)?,
        };
        self.available.set(i, false);
        self.available_count -= 1;
        let zeroed = self.zeroed.get(i);
        self.zeroed.set(i, false);
        self.refs[i] = 1;
        self.used_count += 1;
        self.cursor = i + 1;
        self.touch(i);
        Some((i as ChunkId, zeroed))
    }

    fn touch(&mut self, i: usize) {
        self.dirty_pages.insert((i / REFS_PER_PAGE) as u64);
    }

    /// Adds chunks at the end (the pool grew). New chunks read as zeros when `zeroed`.
    pub fn extend(&mut self, chunks: usize, zeroed: bool) {
        let old = self.refs.len();
        assert!(chunks >= old, "space map cannot shrink");
        self.refs.resize(chunks, 0);
        self.available.resize(chunks);
        self.zeroed.resize(chunks);
        for i in old..chunks {
            self.available.set(i, true);
            self.zeroed.set(i, zeroed);
            self.touch(i);
        }
        self.available_count += (chunks - old) as u64;
    }

    /// Marks the free chunks in `runs` as reading zeros (after the pool punched them).
    pub fn mark_zeroed(&mut self, chunk: ChunkId) {
        if self.available.get(chunk as usize) {
            self.zeroed.set(chunk as usize, true);
        }
    }

    /// Runs `(first, count)` of chunks free now, for punching or checking.
    pub fn free_runs(&self) -> Vec<(ChunkId, u32)> {
        let mut runs = Vec::new();
        let mut i = 0;
        while let Some(start) = self.available.next_set(i) {
            let mut end = start + 1;
            while end < self.refs.len() && self.available.get(end) {
                end += 1;
            }
            runs.push((start as ChunkId, (end - start) as u32));
            i = end;
        }
        runs
    }

    /// Sets a chunk's count outright (a repairing check). A chunk set to zero becomes
    /// reusable after the next commit, like any freed chunk.
    pub fn set_refs(&mut self, chunk: ChunkId, refs: u32) {
        let i = chunk as usize;
        let old = self.refs[i];
        if old == refs {
            return;
        }
        match (old, refs) {
            (0, _) => {
                if self.available.get(i) {
                    self.available.set(i, false);
                    self.zeroed.set(i, false);
                    self.available_count -= 1;
                }
                self.used_count += 1;
            }
            (_, 0) => {
                self.used_count -= 1;
                self.freed.push(chunk);
            }
            _ => {}
        }
        self.refs[i] = refs;
        self.shared.insert(chunk);
        self.touch(i);
    }

    /// Changes since the last call; frees and shared marks move to "in flight" until
    /// [`SpaceMap::commit_done`]. A failed commit fails the whole pool, so there is no undo.
    pub fn take_changes(&mut self) -> SpaceChanges {
        let pages = std::mem::take(&mut self.dirty_pages)
            .into_iter()
            .map(|p| {
                let start = p as usize * REFS_PER_PAGE;
                let end = (start + REFS_PER_PAGE).min(self.refs.len());
                (p, self.refs[start..end].to_vec())
            })
            .collect();
        let freed = std::mem::take(&mut self.freed);
        self.freed_inflight = freed.len();
        self.shared_inflight = std::mem::take(&mut self.shared);
        SpaceChanges { pages, freed }
    }

    /// The commit of `freed` is durable: those chunks may be handed out again, and read as
    /// zeros when `zeroed` (the pool punched or zeroed them).
    pub fn commit_done(&mut self, freed: &[ChunkId], zeroed: bool) {
        for &c in freed {
            // Still free: nothing can reference a chunk that was not available.
            debug_assert_eq!(self.refs[c as usize], 0);
            self.available.set(c as usize, true);
            self.zeroed.set(c as usize, zeroed);
        }
        self.available_count += freed.len() as u64;
        self.freed_inflight = 0;
        self.shared_inflight.clear();
    }
}

impl ChunkRefs for SpaceMap {
    fn incref(&mut self, chunk: ChunkId) {
        let i = chunk as usize;
        assert!(self.refs[i] > 0, "incref of free chunk {chunk}");
        self.refs[i] += 1;
        if self.refs[i] == 2 {
            self.shared.insert(chunk);
        }
        self.touch(i);
    }

    fn decref(&mut self, chunk: ChunkId) {
        let i = chunk as usize;
        assert!(self.refs[i] > 0, "decref of free chunk {chunk}");
        if self.refs[i] >= 2 {
            self.shared.insert(chunk);
        }
        self.refs[i] -= 1;
        if self.refs[i] == 0 {
            self.used_count -= 1;
            self.freed.push(chunk);
        }
        self.touch(i);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_find_next() {
        let mut b = Bits::new(200);
        assert_eq!(b.next_set(0), None);
        b.set(3, true);
        b.set(130, true);
        assert_eq!(b.next_set(0), Some(3));
        assert_eq!(b.next_set(4), Some(130));
        assert_eq!(b.next_set(131), None);
        b.resize(300);
        b.set(299, true);
        assert_eq!(b.next_set(131), Some(299));
    }

    #[test]
    fn freed_chunks_wait_for_commit() {
        let mut s = SpaceMap::new(2, true);
        let (a, zero) = s.allocate().unwrap();
        assert!(zero);
        let (b, _) = s.allocate().unwrap();
        assert_ne!(a, b);
        assert_eq!(s.allocate(), None);
        s.decref(a);
        assert_eq!(s.allocate(), None, "freed but not yet committed");
        let changes = s.take_changes();
        assert_eq!(changes.freed, vec![a]);
        assert_eq!(changes.pages.len(), 1);
        s.commit_done(&changes.freed, true);
        assert_eq!(s.allocate(), Some((a, true)));
    }

    #[test]
    fn once_shared_not_in_place_until_commit() {
        let mut s = SpaceMap::new(4, true);
        let (a, _) = s.allocate().unwrap();
        assert!(s.writable_in_place(a));
        s.incref(a);
        assert!(!s.writable_in_place(a));
        s.decref(a);
        assert!(
            !s.writable_in_place(a),
            "the committed state may still share it"
        );
        let changes = s.take_changes();
        assert!(!s.writable_in_place(a), "commit in flight");
        s.commit_done(&changes.freed, true);
        assert!(s.writable_in_place(a));
    }
}
