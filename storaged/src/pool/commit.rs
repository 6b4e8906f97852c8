//! Commits: the metadata changes collected, the data synced, then the changes written to
//! sled in one atomic batch; chunks freed by the commit become reusable after it.

use std::sync::atomic::Ordering;

use crate::backing::BackingKind;
use crate::meta::{self, VolumeRecord, encode_json, encode_node};
use crate::tree::ChunkId;

use super::{PoolError, ThinPool};

impl ThinPool {
    /// Makes every write acknowledged before this call durable, and commits metadata.
    pub fn flush(&self) -> Result<(), PoolError> {
        self.check_failed()?;
        let _serial = self
            .inner
            .commit_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        self.check_failed()?;
        // 1. Collect the metadata changes. Data they point to was written before they were
        //    made, so the data sync below covers it.
        let (batch, freed) = {
            let mut st = self.write_state();
            let forest_changes = st.forest.take_changes();
            let space_changes = st.space.take_changes();
            let any = st.has_changes()
                || !forest_changes.dirty.is_empty()
                || !forest_changes.freed.is_empty()
                || !space_changes.pages.is_empty()
                || !space_changes.freed.is_empty();
            if any {
                let mut batch = sled::Batch::default();
                for id in &forest_changes.dirty {
                    let node = st.forest.node(*id).expect("dirty nodes exist");
                    batch.insert(&meta::node_key(*id), encode_node(node));
                }
                for id in &forest_changes.freed {
                    batch.remove(&meta::node_key(*id));
                }
                for (page, refs) in &space_changes.pages {
                    let bytes: Vec<u8> = refs.iter().flat_map(|r| r.to_le_bytes()).collect();
                    batch.insert(&meta::page_key(*page), bytes);
                }
                for id in std::mem::take(&mut st.dirty_volumes) {
                    if let Some(rec) = st.volumes.get(&id) {
                        batch.insert(meta::volume_key(&id), encode_json(&VolumeRecord::from(rec)));
                    }
                }
                for id in std::mem::take(&mut st.deleted_volumes) {
                    batch.remove(meta::volume_key(&id));
                }
                for (key, value) in std::mem::take(&mut st.records) {
                    match value {
                        Some(v) => batch.insert(key, v),
                        None => batch.remove(key),
                    }
                }
                st.meta.next_node_id = st.forest.next_id();
                st.meta.commit_seq += 1;
                st.meta_dirty = false;
                batch.insert("meta", encode_json(&st.meta));
                (Some(batch), space_changes.freed)
            } else {
                (None, space_changes.freed)
            }
        };
        // 2. The data the new metadata maps must be on disk before the metadata is.
        let data_dirty = self.inner.data_dirty.swap(false, Ordering::AcqRel);
        if (data_dirty || batch.is_some())
            && let Err(e) = self.inner.backing.sync_data()
        {
            self.fail("data sync", &e);
            return Err(e.into());
        }
        // 3. The metadata, atomically and durably.
        if let Some(batch) = batch
            && let Err(e) = self.inner.meta.commit(batch)
        {
            self.fail("metadata commit", &e);
            return Err(e.into());
        }
        // 4. Chunks freed by this commit may now be reused; punch them so they read zeros.
        let zeroed = self.punch_chunks(&freed);
        self.write_state().space.commit_done(&freed, zeroed);
        Ok(())
    }

    fn punch_chunks(&self, chunks: &[ChunkId]) -> bool {
        if chunks.is_empty() || self.inner.backing.kind() != BackingKind::File {
            return false;
        }
        let mut sorted = chunks.to_vec();
        sorted.sort_unstable();
        let cs = self.inner.chunk_size;
        let mut all = true;
        let mut i = 0;
        while i < sorted.len() {
            let mut j = i + 1;
            while j < sorted.len() && sorted[j] == sorted[j - 1] + 1 {
                j += 1;
            }
            let ok = self
                .inner
                .backing
                .punch(self.data_pos(sorted[i]), (j - i) as u64 * cs)
                .unwrap_or_else(|e| {
                    tracing::warn!(
                        error = &e as &dyn std::error::Error,
                        "cannot punch freed chunks"
                    );
                    false
                });
            all &= ok;
            i = j;
        }
        all
    }

    /// Adds a record to the next commit (`None` deletes it); used by the service layer for
    /// export records, so they change atomically with the pool.
    pub fn stage_record(&self, key: Vec<u8>, value: Option<Vec<u8>>) {
        self.write_state().records.push((key, value));
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_utils::{CHUNK, TestPool};
    use crate::meta::export_key;

    #[test]
    fn flush_makes_writes_and_staged_records_durable() {
        let t = TestPool::new(16);
        let vol = t.volume("v", 2);
        t.pool.write(vol, CHUNK, &[4; 4096]).unwrap();
        let key = export_key(&vol);
        t.pool.stage_record(key.clone(), Some(b"{}".to_vec()));
        t.pool.flush().unwrap();
        // Nothing left to commit: a second flush is a no-op that succeeds.
        t.pool.flush().unwrap();
        let t = t.reopen();
        assert_eq!(t.read(vol, CHUNK, 4096), vec![4; 4096]);
        assert_eq!(
            t.pool.imported_records(),
            [(key[1..].to_vec(), b"{}".to_vec())]
        );

        t.pool.stage_record(key, None);
        t.pool.flush().unwrap();
        let t = t.reopen();
        assert!(t.pool.imported_records().is_empty());
    }

    #[test]
    fn freed_chunks_become_reusable_at_the_commit() {
        let t = TestPool::new(16);
        let a = t.volume("a", 16);
        t.pool.write(a, 0, &vec![1; 16 * CHUNK as usize]).unwrap();
        t.pool.flush().unwrap();
        t.pool.discard(a, 0, 4 * CHUNK).unwrap();
        let u = t.pool.usage();
        assert_eq!((u.used_chunks, u.pending_free_chunks), (12, 4));
        t.pool.flush().unwrap();
        let u = t.pool.usage();
        assert_eq!((u.used_chunks, u.pending_free_chunks), (12, 0));
        // Reused chunks read as zeros where nothing is written.
        t.pool.write(a, 0, &[2; 512]).unwrap();
        assert_eq!(t.read(a, 512, 512), vec![0; 512]);
    }
}
