//! The data path: reads, writes (in place, into new chunks, or copying a shared chunk
//! first), discards, range clones and extents.

use std::collections::HashSet;
use std::sync::atomic::Ordering;

use uuid::Uuid;

use super::{Inner, PoolError, State, ThinPool};
use crate::tree::ChunkRefs;

/// Where a piece of a write goes.
#[derive(Debug, Clone, Copy)]
struct Placed {
    pos: u64,
    /// A chunk allocated for this piece that reads zeros: until the data lands, readers of
    /// it see what the unmapped range held, so the data may be written without the lock.
    fresh: bool,
}

/// Widens the window between placing a fresh chunk and writing its data, for tests that
/// race other operations against it: debug builds read `STORAGED_TEST_UNLOCKED_WRITE_DELAY_US`.
fn unlocked_write_delay() {
    #[cfg(debug_assertions)]
    {
        static DELAY: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
        let us = *DELAY.get_or_init(|| {
            std::env::var("STORAGED_TEST_UNLOCKED_WRITE_DELAY_US")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        });
        if us > 0 {
            std::thread::sleep(std::time::Duration::from_micros(us));
        }
    }
}

/// Counts writes in flight into fresh chunks, from their placement until their data is
/// written (or failed); [`ThinPool::write_state`] waits for the count to reach zero.
struct UnlockedWrites<'a> {
    inner: &'a Inner,
    n: usize,
}

impl<'a> UnlockedWrites<'a> {
    /// Called with the state lock held, before it is released.
    fn start(inner: &'a Inner, n: usize) -> Self {
        if n > 0 {
            *inner
                .unlocked_writes
                .lock()
                .unwrap_or_else(|p| p.into_inner()) += n;
        }
        UnlockedWrites { inner, n }
    }
}

impl Drop for UnlockedWrites<'_> {
    fn drop(&mut self) {
        if self.n == 0 {
            return;
        }
        let mut n = self
            .inner
            .unlocked_writes
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        *n -= self.n;
        if *n == 0 {
            self.inner.unlocked_done.notify_all();
        }
    }
}

/// The part of a write or read that falls in one chunk.
#[derive(Debug, Clone, Copy)]
pub(super) struct Piece {
    pub(super) vchunk: u64,
    /// Offset inside the chunk.
    pub(super) within: u64,
    /// Offset inside the caller's buffer.
    pub(super) at: usize,
    pub(super) len: usize,
}

fn pieces(offset: u64, len: usize, chunk_size: u64) -> impl Iterator<Item = Piece> {
    let mut at = 0usize;
    std::iter::from_fn(move || {
        if at >= len {
            return None;
        }
        let pos = offset + at as u64;
        let within = pos % chunk_size;
        let n = ((chunk_size - within) as usize).min(len - at);
        let piece = Piece {
            vchunk: pos / chunk_size,
            within,
            at,
            len: n,
        };
        at += n;
        Some(piece)
    })
}

/// Ranges of the data area `(position, offset in the caller's buffer, length)`, merged
/// when both are contiguous, so neighbouring chunks cost one system call.
#[derive(Debug, Default)]
struct Segments(Vec<(u64, usize, usize)>);

impl Segments {
    fn push(&mut self, pos: u64, at: usize, len: usize) {
        if let Some(last) = self.0.last_mut()
            && last.0 + last.2 as u64 == pos
            && last.1 + last.2 == at
        {
            last.2 += len;
            return;
        }
        self.0.push((pos, at, len));
    }
}

impl ThinPool {
    /// Reads `buf.len()` bytes at `offset`; unmapped ranges read as zeros.
    pub fn read(&self, volume: Uuid, offset: u64, buf: &mut [u8]) -> Result<(), PoolError> {
        self.check_failed()?;
        let st = self.read_state();
        let rec = st.volume(volume)?;
        Self::check_io(rec, offset, buf.len() as u64)?;
        let mut segs = Segments::default();
        for p in pieces(offset, buf.len(), self.inner.chunk_size) {
            match st.forest.lookup(rec.root, rec.height, p.vchunk).chunk {
                Some(c) => segs.push(self.data_pos(c) + p.within, p.at, p.len),
                None => buf[p.at..p.at + p.len].fill(0),
            }
        }
        for &(pos, at, len) in &segs.0 {
            self.inner.backing.read_at(pos, &mut buf[at..at + len])?;
        }
        Ok(())
    }

    /// Writes `data` at `offset`. Durable at the next [`ThinPool::flush`].
    pub fn write(&self, volume: Uuid, offset: u64, data: &[u8]) -> Result<(), PoolError> {
        self.check_failed()?;
        let mut slow = Vec::new();
        {
            let st = self.read_state();
            let rec = st.volume(volume)?;
            if rec.read_only() {
                return Err(PoolError::ReadOnly { id: volume });
            }
            Self::check_io(rec, offset, data.len() as u64)?;
            let mut segs = Segments::default();
            for p in pieces(offset, data.len(), self.inner.chunk_size) {
                let l = st.forest.lookup(rec.root, rec.height, p.vchunk);
                match l.chunk {
                    Some(c) if l.exclusive_path && st.space.writable_in_place(c) => {
                        segs.push(self.data_pos(c) + p.within, p.at, p.len);
                    }
                    _ => slow.push(p),
                }
            }
            // Under the shared lock: no chunk written here can be freed meanwhile.
            self.write_segments(&segs, data)?;
        }
        if !slow.is_empty() {
            // Pieces landing in fresh, zeroed chunks are written after the lock is
            // released, so allocating writers do not queue behind each other's I/O: until
            // the data lands a reader of the new mapping sees zeros, which is what the
            // range held. Every other piece is written under the lock, so nobody reads a
            // new mapping before its data is there.
            let mut fresh = Segments::default();
            let unlocked = {
                let mut st = self.write_state_for_allocation();
                let mut segs = Segments::default();
                let mut placed = Ok(());
                for p in slow {
                    match self.place_piece_locked(&mut st, volume, p, &data[p.at..p.at + p.len]) {
                        Ok(Some(Placed { pos, fresh: true })) => fresh.push(pos, p.at, p.len),
                        Ok(Some(Placed { pos, fresh: false })) => segs.push(pos, p.at, p.len),
                        Ok(None) => {}
                        Err(e) => {
                            placed = Err(e);
                            break;
                        }
                    }
                }
                // Pieces placed before an error are mapped: their data goes out either way.
                let under_lock = self.write_segments(&segs, data);
                let guard = UnlockedWrites::start(&self.inner, fresh.0.len());
                (placed, under_lock, guard)
            };
            let (placed, under_lock, guard) = unlocked;
            unlocked_write_delay();
            let result = self.write_segments(&fresh, data);
            drop(guard);
            placed?;
            under_lock?;
            result?;
        }
        // After the data is written: a flush that starts after this write returns will
        // see the flag and sync it.
        self.inner.data_dirty.store(true, Ordering::Release);
        Ok(())
    }

    fn write_segments(&self, segs: &Segments, data: &[u8]) -> Result<(), PoolError> {
        for &(pos, at, len) in &segs.0 {
            self.inner.backing.write_at(pos, &data[at..at + len])?;
        }
        Ok(())
    }

    /// Writes one piece with the metadata lock held.
    pub(super) fn write_piece_locked(
        &self,
        st: &mut State,
        volume: Uuid,
        p: Piece,
        data: &[u8],
    ) -> Result<(), PoolError> {
        if let Some(Placed { pos, .. }) = self.place_piece_locked(st, volume, p, data)? {
            self.inner.backing.write_at(pos, data)?;
        }
        Ok(())
    }

    /// Writes one piece, or returns where its data must go, with the metadata lock held:
    /// in place, into a new chunk, or by copying a shared chunk first (done here, before
    /// the new mapping exists).
    fn place_piece_locked(
        &self,
        st: &mut State,
        volume: Uuid,
        p: Piece,
        data: &[u8],
    ) -> Result<Option<Placed>, PoolError> {
        let State {
            forest,
            space,
            volumes,
            dirty_volumes,
            meta,
            warned,
            ..
        } = st;
        let rec = volumes
            .get_mut(&volume)
            .ok_or(PoolError::NoVolume(volume))?;
        // The volume may have shrunk between the locks.
        Self::check_io(
            rec,
            p.vchunk * self.inner.chunk_size + p.within,
            data.len() as u64,
        )?;
        let l = forest.lookup(rec.root, rec.height, p.vchunk);
        if let Some(c) = l.chunk
            && l.exclusive_path
            && space.writable_in_place(c)
        {
            return Ok(Some(Placed {
                pos: self.data_pos(c) + p.within,
                fresh: false,
            }));
        }
        if space.available() == 0 {
            return Err(PoolError::NoSpace);
        }
        let mut root = rec.root;
        let leaf = forest.leaf_for_write(&mut root, rec.height, p.vchunk, space);
        if root != rec.root {
            rec.root = root;
            dirty_volumes.insert(volume);
        }
        let old = forest.leaf_get(leaf, p.vchunk);
        if let Some(c) = old
            && space.writable_in_place(c)
        {
            return Ok(Some(Placed {
                pos: self.data_pos(c) + p.within,
                fresh: false,
            }));
        }
        let (new, zeroed) = space.allocate().ok_or(PoolError::NoSpace)?;
        let cs = self.inner.chunk_size as usize;
        let whole = p.within == 0 && data.len() == cs;
        let deferred = whole || (old.is_none() && zeroed);
        if !deferred {
            // The rest of the chunk must hold the old data (copy on write) or zeros.
            let mut buf = vec![0u8; cs];
            let result = match old {
                Some(c) => self.inner.backing.read_at(self.data_pos(c), &mut buf),
                None => Ok(()),
            }
            .and_then(|()| {
                buf[p.within as usize..p.within as usize + data.len()].copy_from_slice(data);
                self.inner.backing.write_at(self.data_pos(new), &buf)
            });
            if let Err(e) = result {
                space.decref(new);
                return Err(e.into());
            }
        }
        forest.leaf_set(leaf, p.vchunk, new);
        match old {
            Some(c) => space.decref(c),
            None => {
                rec.mapped += 1;
                dirty_volumes.insert(volume);
            }
        }
        let used_pct = space.used() * 100 / space.total().max(1);
        if used_pct >= u64::from(meta.warning_threshold_percent) {
            if !*warned {
                tracing::warn!(pool = %meta.pool_id, used_pct, threshold = meta.warning_threshold_percent, "thin pool above its space warning threshold");
                *warned = true;
            }
        } else {
            *warned = false;
        }
        Ok(deferred.then(|| Placed {
            pos: self.data_pos(new) + p.within,
            fresh: old.is_none() && zeroed,
        }))
    }

    /// Frees whole chunks of the range (reference-aware) and zeroes partial ones; the
    /// range reads as zeros afterwards.
    pub fn discard(&self, volume: Uuid, offset: u64, len: u64) -> Result<(), PoolError> {
        self.check_failed()?;
        let cs = self.inner.chunk_size;
        let mut st = self.write_state();
        let rec = st.volume(volume)?;
        if rec.read_only() {
            return Err(PoolError::ReadOnly { id: volume });
        }
        Self::check_io(rec, offset, len)?;
        let end = offset + len;
        let first_full = offset.div_ceil(cs);
        let end_full = end / cs;
        // Partial chunks at either end: zero the range where something is mapped.
        let mut partial = Vec::new();
        if first_full > end_full {
            partial.push((offset, len));
        } else {
            if offset < first_full * cs {
                partial.push((offset, first_full * cs - offset));
            }
            if end > end_full * cs && end_full * cs >= offset {
                partial.push((end_full * cs, end - end_full * cs));
            }
        }
        for (at, n) in partial {
            let rec = st.volume(volume)?;
            if st
                .forest
                .lookup(rec.root, rec.height, at / cs)
                .chunk
                .is_some()
            {
                let mut buf = Vec::new();
                let zeros = iscsi_target::block::page_aligned_zeros(&mut buf, n as usize);
                self.write_piece_locked(
                    &mut st,
                    volume,
                    Piece {
                        vchunk: at / cs,
                        within: at % cs,
                        at: 0,
                        len: n as usize,
                    },
                    zeros,
                )?;
            }
        }
        if first_full < end_full {
            let State {
                forest,
                space,
                volumes,
                dirty_volumes,
                ..
            } = &mut *st;
            let rec = volumes.get_mut(&volume).expect("checked above");
            let mut root = rec.root;
            for (v, _) in forest.mapped_range(root, rec.height, first_full, end_full) {
                forest.unmap(&mut root, rec.height, v, space);
                rec.mapped -= 1;
                dirty_volumes.insert(volume);
            }
            rec.root = root;
        }
        self.inner.data_dirty.store(true, Ordering::Release);
        Ok(())
    }

    /// Makes `len` bytes of `dst` at `dst_offset` hold what `src` holds at `src_offset`
    /// by sharing chunks instead of copying them: whole chunks are mapped into `dst` with
    /// one more reference (copy on write keeps the two apart afterwards); a partial chunk
    /// at the end is copied. Returns `false`, changing nothing, when the offsets are not
    /// chunk-aligned (the caller copies instead).
    pub fn clone_range(
        &self,
        src: Uuid,
        src_offset: u64,
        dst: Uuid,
        dst_offset: u64,
        len: u64,
    ) -> Result<bool, PoolError> {
        self.check_failed()?;
        let cs = self.inner.chunk_size;
        if !src_offset.is_multiple_of(cs) || !dst_offset.is_multiple_of(cs) {
            return Ok(false);
        }
        let whole = len / cs;
        let tail = len % cs;
        {
            let mut st = self.write_state();
            let s = st.volume(src)?.clone();
            let d = st.volume(dst)?;
            if d.read_only() {
                return Err(PoolError::ReadOnly { id: dst });
            }
            Self::check_io(&s, src_offset, len)?;
            Self::check_io(d, dst_offset, len)?;
            let State {
                forest,
                space,
                volumes,
                dirty_volumes,
                ..
            } = &mut *st;
            for i in 0..whole {
                let from = forest.lookup(s.root, s.height, src_offset / cs + i).chunk;
                let to_v = dst_offset / cs + i;
                let d = volumes.get_mut(&dst).expect("checked");
                let mut root = d.root;
                match from {
                    Some(c) => {
                        let leaf = forest.leaf_for_write(&mut root, d.height, to_v, space);
                        let old = forest.leaf_get(leaf, to_v);
                        if old != Some(c) {
                            space.incref(c);
                            forest.leaf_set(leaf, to_v, c);
                            match old {
                                Some(o) => space.decref(o),
                                None => d.mapped += 1,
                            }
                        }
                    }
                    None => {
                        if forest.unmap(&mut root, d.height, to_v, space).is_some() {
                            d.mapped -= 1;
                        }
                    }
                }
                d.root = root;
                dirty_volumes.insert(dst);
            }
        }
        if tail > 0 {
            let mut buf = vec![0u8; tail as usize];
            self.read(src, src_offset + whole * cs, &mut buf)?;
            self.write(dst, dst_offset + whole * cs, &buf)?;
        }
        self.inner.data_dirty.store(true, Ordering::Release);
        Ok(true)
    }

    /// Which chunks of the range are mapped: `(offset, len, mapped)` runs.
    pub fn extents(
        &self,
        volume: Uuid,
        offset: u64,
        len: u64,
    ) -> Result<Vec<(u64, u64, bool)>, PoolError> {
        self.check_failed()?;
        let cs = self.inner.chunk_size;
        let st = self.read_state();
        let rec = st.volume(volume)?;
        Self::check_io(rec, offset, len)?;
        let mut out: Vec<(u64, u64, bool)> = Vec::new();
        let end = offset + len;
        let mapped: HashSet<u64> = st
            .forest
            .mapped_range(rec.root, rec.height, offset / cs, end.div_ceil(cs))
            .into_iter()
            .map(|(v, _)| v)
            .collect();
        let mut pos = offset;
        while pos < end {
            let v = pos / cs;
            let next = ((v + 1) * cs).min(end);
            let m = mapped.contains(&v);
            match out.last_mut() {
                Some(last) if last.2 == m => last.1 += next - pos,
                _ => out.push((pos, next - pos, m)),
            }
            pos = next;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::super::test_utils::{CHUNK, TestPool, assert_err, pattern};
    use super::*;

    #[test]
    fn pieces_cover_the_range_chunk_by_chunk() {
        let got: Vec<(u64, u64, usize, usize)> = pieces(CHUNK - 512, 2 * CHUNK as usize, CHUNK)
            .map(|p| (p.vchunk, p.within, p.at, p.len))
            .collect();
        let cs = CHUNK as usize;
        assert_eq!(
            got,
            [
                (0, CHUNK - 512, 0, 512),
                (1, 0, 512, cs),
                (2, 0, 512 + cs, cs - 512)
            ]
        );
        assert_eq!(pieces(0, 0, CHUNK).count(), 0);
    }

    #[test]
    fn writes_read_back_whole_partial_and_across_chunks() {
        let t = TestPool::new(32);
        let vol = t.volume("v", 8);
        // Block-aligned but not chunk-aligned: a partial first chunk, two whole ones and
        // a partial last one.
        let at = CHUNK - 1024;
        let data = pattern(5, 2 * CHUNK as usize + 1536);
        t.pool.write(vol, at, &data).unwrap();
        assert_eq!(t.read(vol, at, data.len()), data);
        // The rest of the touched chunks reads zeros, as does an untouched chunk.
        assert_eq!(
            t.read(vol, 0, (CHUNK - 1024) as usize),
            vec![0; (CHUNK - 1024) as usize]
        );
        let end = at + data.len() as u64;
        assert_eq!(t.read(vol, end, 512), vec![0; 512]);
        assert_eq!(t.read(vol, 6 * CHUNK, 4096), vec![0; 4096]);

        // A small overwrite in the middle of a chunk keeps its neighbours.
        t.pool.write(vol, CHUNK + 512, &[0xee; 512]).unwrap();
        let mut expect = data.clone();
        let off = (CHUNK + 512 - at) as usize;
        expect[off..off + 512].fill(0xee);
        assert_eq!(t.read(vol, at, expect.len()), expect);

        t.pool.flush().unwrap();
        let t = t.reopen();
        assert_eq!(t.read(vol, at, expect.len()), expect);
        // Chunks 0 to 3, the first and last partly written.
        assert_eq!(t.pool.volume_info(vol).unwrap().allocated_bytes, 4 * CHUNK);
    }

    #[test]
    fn bad_ranges_and_unknown_volumes_are_typed_errors_that_change_nothing() {
        let t = TestPool::new(32);
        let vol = t.volume("v", 2);
        let size = 2 * CHUNK;
        t.pool.write(vol, 0, &[1; 4096]).unwrap();
        t.pool.flush().unwrap();
        let usage = t.pool.usage();
        let mut buf = vec![0u8; 1024];

        let out_of_range =
            |e: &PoolError| matches!(e, PoolError::OutOfRange { size: s, .. } if *s == size);
        assert_err(t.pool.write(vol, size, &[2; 512]), out_of_range);
        assert_err(t.pool.write(vol, size - 512, &[2; 1024]), out_of_range);
        assert_err(t.pool.write(vol, u64::MAX - 511, &[2; 512]), out_of_range);
        assert_err(t.pool.read(vol, size, &mut buf), out_of_range);
        assert_err(t.pool.discard(vol, size - 512, 1024), out_of_range);
        assert_err(t.pool.extents(vol, 0, size + 512), out_of_range);

        let misaligned = |e: &PoolError| {
            matches!(
                e,
                PoolError::Misaligned {
                    block_size: 512,
                    ..
                }
            )
        };
        assert_err(t.pool.write(vol, 100, &[2; 512]), misaligned);
        assert_err(t.pool.write(vol, 0, &[2; 100]), misaligned);
        assert_err(t.pool.read(vol, 0, &mut buf[..100]), misaligned);

        let other = Uuid::new_v4();
        let unknown = |e: &PoolError| matches!(e, PoolError::NoVolume(id) if *id == other);
        assert_err(t.pool.write(other, 0, &[2; 512]), unknown);
        assert_err(t.pool.read(other, 0, &mut buf), unknown);
        assert_err(t.pool.discard(other, 0, 512), unknown);

        assert_eq!(t.read(vol, 0, 4096), vec![1; 4096]);
        assert_eq!(t.read(vol, 4096, 4096), vec![0; 4096]);
        t.pool.flush().unwrap();
        assert_eq!(t.pool.usage(), usage);
        assert!(t.pool.check(false).unwrap().clean());
    }

    #[test]
    fn a_full_pool_refuses_only_writes_that_need_a_chunk() {
        let t = TestPool::new(16);
        // Overcommitted: twice the pool's chunks.
        let vol = t.volume("big", 32);
        for c in 0..16u64 {
            t.pool.write(vol, c * CHUNK, &[c as u8 + 1; 512]).unwrap();
        }
        t.pool.flush().unwrap();
        let usage = t.pool.usage();
        assert_eq!((usage.used_chunks, usage.free_chunks), (16, 0));

        assert_err(t.pool.write(vol, 20 * CHUNK, &[9; 512]), |e| {
            matches!(e, PoolError::NoSpace)
        });
        assert_eq!(t.read(vol, 20 * CHUNK, 512), vec![0; 512]);
        // An allocated chunk still takes writes.
        t.pool.write(vol, 3 * CHUNK + 512, &[0xaa; 512]).unwrap();
        assert_eq!(
            t.read(vol, 3 * CHUNK, 1024),
            [[4; 512], [0xaa; 512]].concat()
        );
        t.pool.flush().unwrap();
        assert_eq!(t.pool.usage(), usage);
        assert!(t.pool.check(false).unwrap().clean());
    }

    #[test]
    fn discard_frees_whole_chunks_and_zeroes_partial_ones() {
        let t = TestPool::new(32);
        let vol = t.volume("v", 4);
        let data = pattern(9, 4 * CHUNK as usize);
        t.pool.write(vol, 0, &data).unwrap();
        t.pool.flush().unwrap();
        assert_eq!(t.pool.usage().used_chunks, 4);

        // From the middle of chunk 0 to the middle of chunk 3: chunks 1 and 2 are freed.
        t.pool.discard(vol, CHUNK / 2, 3 * CHUNK).unwrap();
        t.pool.flush().unwrap();
        let mut expect = data;
        expect[CHUNK as usize / 2..(CHUNK / 2 + 3 * CHUNK) as usize].fill(0);
        assert_eq!(t.read(vol, 0, expect.len()), expect);
        assert_eq!(t.pool.usage().used_chunks, 2);
        assert_eq!(
            t.pool.extents(vol, 0, 4 * CHUNK).unwrap(),
            [
                (0, CHUNK, true),
                (CHUNK, 2 * CHUNK, false),
                (3 * CHUNK, CHUNK, true)
            ]
        );
    }

    #[test]
    fn clone_range_shares_whole_chunks_and_copies_the_tail() {
        let t = TestPool::new(32);
        let src = t.volume("src", 4);
        let dst = t.volume("dst", 4);
        let data = pattern(3, 2 * CHUNK as usize + 4096);
        t.pool.write(src, 0, &data).unwrap();
        assert!(
            !t.pool.clone_range(src, 512, dst, 0, CHUNK).unwrap(),
            "unaligned"
        );
        assert!(
            t.pool
                .clone_range(src, 0, dst, CHUNK, data.len() as u64)
                .unwrap()
        );
        assert_eq!(t.read(dst, CHUNK, data.len()), data);
        t.pool.flush().unwrap();
        // The source's three chunks, two of them now shared, and the copied tail.
        assert_eq!(t.pool.usage().used_chunks, 4);
        // Copy on write keeps them apart afterwards.
        t.pool.write(dst, CHUNK, &[0; 512]).unwrap();
        assert_eq!(t.read(src, 0, data.len()), data);
        let snap = t.pool.snapshot(src, "s", BTreeMap::new()).unwrap().id;
        assert_err(
            t.pool.clone_range(src, 0, snap, 0, CHUNK),
            |e| matches!(e, PoolError::ReadOnly { id } if *id == snap),
        );
    }
}
