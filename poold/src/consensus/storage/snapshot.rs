//! State-machine snapshots in the store: the `snap` tree, the writer that stores a
//! snapshot off the Raft task, installing one from the leader, and cutting the log behind
//! a stored one.
//!
//! A snapshot of the whole pool state is large; storing it and fsyncing it on the Raft
//! task would stall it, and every member reaches the same index at about the same time.
//! So a [`SnapshotWriter`] stores it from another thread, and the log is cut behind it
//! only once it is durable ([`DiskStorage::snapshot_stored`]). The snapshot tree is
//! written under one lock by the writer and by [`DiskStorage::apply_snapshot`], so an
//! older snapshot never replaces a newer one, and read under it, so its metadata and data
//! always belong together.

use raft::StorageError;
use raft::eraftpb::{ConfState, Snapshot, SnapshotMetadata};
use std::sync::{Arc, Mutex};

use super::codec::{K_HARD, K_SNAPDATA, K_SNAPMETA, K_TRUNC, be_u64, log_key, trunc_bytes};
use super::{DiskStorage, StoreError, encode, sled_err};

/// The `snap` tree and the metadata of the snapshot in it. Its lock is held while the
/// tree is written or read, so a snapshot is never replaced by an older one and a reader
/// never pairs one snapshot's metadata with another's data.
pub(super) struct SnapTree {
    tree: sled::Tree,
    stored: Mutex<SnapshotMetadata>,
}

impl SnapTree {
    /// `stored` is the metadata of the snapshot `tree` holds.
    pub(super) fn new(tree: sled::Tree, stored: SnapshotMetadata) -> Self {
        SnapTree {
            tree,
            stored: Mutex::new(stored),
        }
    }

    /// Writes a snapshot (not yet durable); unless `replace_newer`, only when it is newer
    /// than the stored one. Returns whether it was written.
    pub(super) fn store(
        &self,
        meta: &SnapshotMetadata,
        data: &[u8],
        replace_newer: bool,
    ) -> Result<bool, StoreError> {
        let mut stored = self.stored.lock().expect("snapshot lock");
        if !replace_newer && meta.index <= stored.index {
            return Ok(false);
        }
        // Metadata and data in one batch of one tree: they never disagree after a crash.
        let mut b = sled::Batch::default();
        b.insert(K_SNAPMETA, encode(meta)?);
        b.insert(K_SNAPDATA, data);
        self.tree.apply_batch(b).map_err(sled_err("snap"))?;
        *stored = meta.clone();
        Ok(true)
    }

    pub(super) fn read(&self) -> Result<(SnapshotMetadata, Vec<u8>), StoreError> {
        let stored = self.stored.lock().expect("snapshot lock");
        let data = self.tree.get(K_SNAPDATA).map_err(sled_err("snap"))?;
        Ok((stored.clone(), data.map(|v| v.to_vec()).unwrap_or_default()))
    }
}

/// Stores state-machine snapshots from a thread other than the Raft task.
pub struct SnapshotWriter {
    db: Arc<sled_sync::SyncedDb>,
    snap: Arc<SnapTree>,
}

impl SnapshotWriter {
    /// Stores the snapshot and makes it durable, unless the stored one is as new already
    /// (then returns false). The log is untouched: the Raft task cuts it afterwards.
    pub fn store(&self, meta: &SnapshotMetadata, data: &[u8]) -> Result<bool, raft::Error> {
        if !self.snap.store(meta, data, false)? {
            return Ok(false);
        }
        self.db.flush().map_err(StoreError::Sync)?;
        Ok(true)
    }
}

impl DiskStorage {
    /// Replaces the log by a snapshot received from the leader (or the bootstrap one).
    pub fn apply_snapshot(&mut self, snap: &Snapshot) -> Result<(), raft::Error> {
        let meta = snap.get_metadata();
        if meta.index < self.trunc.0 {
            return Err(raft::Error::Store(StorageError::SnapshotOutOfDate));
        }
        self.checkpoint()?;
        // Replaces even a newer snapshot of our own: the log is about to be cut behind
        // this one, and the stored snapshot must be the one the log continues from.
        self.snap.store(meta, &snap.data, true)?;
        let trunc = (meta.index, meta.term);
        let mut hs = self.hard.clone();
        hs.term = hs.term.max(meta.term);
        hs.commit = meta.index;
        let mut m = sled::Batch::default();
        m.insert(K_TRUNC, &trunc_bytes(trunc)[..]);
        m.insert(K_HARD, encode(&hs)?);
        self.meta.apply_batch(m).map_err(sled_err("meta"))?;
        let mut b = sled::Batch::default();
        for k in self.log.iter().keys() {
            b.remove(k.map_err(sled_err("log"))?);
        }
        self.log.apply_batch(b).map_err(sled_err("log"))?;
        self.entries.clear();
        self.hard = hs;
        self.snap_meta = meta.clone();
        self.trunc = trunc;
        self.last_index = meta.index;
        Ok(self.checkpoint()?)
    }

    /// The metadata of a snapshot of the state machine at `index` (applied here, so still
    /// in the log or at its truncation point).
    pub fn snapshot_metadata_at(
        &self,
        index: u64,
        conf_state: &ConfState,
    ) -> Result<SnapshotMetadata, raft::Error> {
        let mut meta = SnapshotMetadata::default();
        meta.index = index;
        meta.term = raft::Storage::term(self, index)?;
        meta.set_conf_state(conf_state.clone());
        Ok(meta)
    }

    /// A handle that stores snapshots from another thread.
    pub fn snapshot_writer(&self) -> SnapshotWriter {
        SnapshotWriter {
            db: self.db.clone(),
            snap: self.snap.clone(),
        }
    }

    /// Takes note of a snapshot a [`SnapshotWriter`] made durable: it becomes the one the
    /// log is cut behind, and entries up to `compact_to` (at most its index) are dropped,
    /// keeping the tail a slightly slow follower still needs. A snapshot older than the
    /// known one (one from the leader came in between) changes nothing.
    ///
    /// The cut is not in the WAL and needs no checkpoint (so the Raft task never waits for
    /// a sled flush here): lost in a crash, it leaves a longer log behind a durable
    /// snapshot, which open accepts; kept with WAL records played back over it, records at
    /// or below the cut are dropped at open.
    pub fn snapshot_stored(
        &mut self,
        meta: SnapshotMetadata,
        compact_to: u64,
    ) -> Result<(), raft::Error> {
        if meta.index < self.snap_meta.index {
            return Ok(());
        }
        let compact_to = compact_to.min(meta.index);
        self.snap_meta = meta;
        if compact_to > self.trunc.0 {
            let new_trunc = (compact_to, raft::Storage::term(self, compact_to)?);
            // Done by the writer thread, after the records queued before it: listing the
            // log's keys and deleting thousands of them is too slow for the Raft task.
            let (log, meta, last_index) = (self.log.clone(), self.meta.clone(), self.last_index);
            self.writer.push(
                0,
                Box::new(move || cut_log(&log, &meta, new_trunc, last_index)),
            );
            self.writer.hand_off();
            let drop = (compact_to - self.trunc.0) as usize;
            self.entries.drain(..drop.min(self.entries.len()));
            self.trunc = new_trunc;
        }
        Ok(())
    }

    /// Whether raft-rs asked for a snapshot newer than the stored one (and clears it).
    pub fn take_snapshot_wanted(&self) -> bool {
        self.snapshot_wanted.replace(false)
    }

    /// The metadata of the snapshot the log is cut behind.
    pub fn snapshot_metadata(&self) -> &SnapshotMetadata {
        &self.snap_meta
    }

    /// The stored snapshot's data (the encoded state machine).
    pub fn snapshot_data(&self) -> Result<Vec<u8>, raft::Error> {
        Ok(self.snap.read()?.1)
    }
}

/// Records the cut of the log behind `trunc` and drops the records that lie wholly at or
/// below it; one that straddles it stays, its early entries ignored from now on.
/// `last_index` is the log's last index when the cut was made.
fn cut_log(
    log: &sled::Tree,
    meta: &sled::Tree,
    trunc: (u64, u64),
    last_index: u64,
) -> Result<(), StoreError> {
    meta.insert(K_TRUNC, &trunc_bytes(trunc)[..])
        .map_err(sled_err("meta"))?;
    let keys: Vec<u64> = log
        .iter()
        .keys()
        .map(|k| k.map(|k| be_u64(&k).unwrap_or(0)))
        .collect::<Result<_, _>>()
        .map_err(sled_err("log"))?;
    let mut b = sled::Batch::default();
    for (i, start) in keys.iter().enumerate() {
        let end = keys.get(i + 1).map_or(last_index, |next| next - 1);
        if end <= trunc.0 {
            b.remove(&log_key(*start)[..]);
        }
    }
    log.apply_batch(b).map_err(sled_err("log"))
}

#[cfg(test)]
mod tests {
    use super::super::test_utils::{entry, files_after_a_crash, reopen};
    use super::*;
    use raft::{GetEntriesContext, Storage as _};

    #[test]
    fn compaction_keeps_terms_and_refuses_compacted_reads() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = DiskStorage::open(dir.path(), 1).unwrap();
        s.bootstrap(&[1], vec![]).unwrap();
        let es: Vec<_> = (2..=20).map(|i| entry(i, 3, b"e")).collect();
        s.append(&es).unwrap();
        let cs = ConfState::from((vec![1u64], Vec::<u64>::new()));
        let meta = s.snapshot_metadata_at(15, &cs).unwrap();
        assert!(s.snapshot_writer().store(&meta, b"snap15").unwrap());
        s.snapshot_stored(meta, 10).unwrap();
        assert_eq!(s.first_index(), 11);
        assert_eq!(s.term(10).unwrap(), 3);
        assert_eq!(s.term(15).unwrap(), 3);
        assert!(matches!(
            s.entries(5, 12, None, GetEntriesContext::empty(false)),
            Err(raft::Error::Store(StorageError::Compacted))
        ));
        assert_eq!(
            s.entries(11, 21, None, GetEntriesContext::empty(false))
                .unwrap()
                .len(),
            10
        );
        // A member the snapshot's configuration does not name gets a fresh one later.
        assert!(matches!(
            s.snapshot(0, 2),
            Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable
            ))
        ));
        assert!(s.take_snapshot_wanted());
        assert!(!s.take_snapshot_wanted());
        let snap = s.snapshot(0, 1).unwrap();
        assert_eq!(snap.get_metadata().index, 15);
        assert_eq!(snap.data.as_ref(), b"snap15");
        drop(s);
        let s = reopen(dir.path(), 1).unwrap();
        assert_eq!(s.first_index(), 11);
        assert_eq!(s.last_index(), 20);
    }

    #[test]
    fn a_snapshot_written_off_thread_is_served_at_once_and_cuts_the_log_when_told() {
        let dir = tempfile::tempdir().unwrap();
        let cs = ConfState::from((vec![1u64, 2], Vec::<u64>::new()));
        {
            let mut s = DiskStorage::open(dir.path(), 1).unwrap();
            s.bootstrap(&[1, 2], b"s1".to_vec()).unwrap();
            let es: Vec<_> = (2..=30).map(|i| entry(i, 2, b"e")).collect();
            s.append(&es).unwrap();
            s.sync().unwrap();
            let meta = s.snapshot_metadata_at(20, &cs).unwrap();
            let writer = s.snapshot_writer();
            let written = std::thread::spawn(move || writer.store(&meta, b"s20").unwrap())
                .join()
                .unwrap();
            assert!(written);
            // Stored and durable, the log not cut yet: a follower is sent the new one.
            assert_eq!(s.first_index(), 2);
            assert_eq!(s.snapshot_metadata().index, 1);
            let snap = s.snapshot(5, 2).unwrap();
            assert_eq!(snap.get_metadata().index, 20);
            assert_eq!(snap.get_metadata().term, 2);
            assert_eq!(snap.data.as_ref(), b"s20");
            // An older one than the stored one is not written over it.
            let older = s.snapshot_metadata_at(10, &cs).unwrap();
            assert!(!s.snapshot_writer().store(&older, b"s10").unwrap());
            assert_eq!(s.snapshot_data().unwrap(), b"s20");
        }
        // A crash before the log was cut: the stored snapshot and the whole log are there.
        let mut s = reopen(dir.path(), 1).unwrap();
        assert_eq!(s.snapshot_metadata().index, 20);
        assert_eq!((s.first_index(), s.last_index()), (2, 30));
        assert_eq!(s.hard_state().commit, 20);
        let meta = s.snapshot_metadata_at(20, &cs).unwrap();
        s.snapshot_stored(meta, 15).unwrap();
        assert_eq!(s.first_index(), 16);
        assert_eq!(s.term(15).unwrap(), 2);
        drop(s);
        let s = reopen(dir.path(), 1).unwrap();
        assert_eq!((s.first_index(), s.last_index()), (16, 30));
    }

    #[test]
    fn a_log_cut_lost_or_kept_in_a_crash_leaves_a_whole_log() {
        let dir = tempfile::tempdir().unwrap();
        let cs = ConfState::from((vec![1u64], Vec::<u64>::new()));
        let mut s = DiskStorage::open(dir.path(), 1).unwrap();
        s.bootstrap(&[1], b"s1".to_vec()).unwrap();
        for i in 2..=30 {
            s.append(&[entry(i, 2, b"e")]).unwrap();
            s.sync().unwrap();
        }
        let meta = s.snapshot_metadata_at(20, &cs).unwrap();
        assert!(s.snapshot_writer().store(&meta, b"s20").unwrap());
        s.snapshot_stored(meta, 15).unwrap();
        for i in 31..=40 {
            s.append(&[entry(i, 3, b"f")]).unwrap();
            s.sync().unwrap();
        }
        let crashed = files_after_a_crash(dir.path());
        let c = DiskStorage::open(crashed.path(), 1).unwrap();
        assert_eq!(c.snapshot_metadata().index, 20);
        assert!(c.first_index() <= 16, "first index {}", c.first_index());
        assert_eq!(c.last_index(), 40);
        let es = c
            .entries(16, 41, None, GetEntriesContext::empty(false))
            .unwrap();
        let indexes: Vec<u64> = es.iter().map(|e| e.index).collect();
        assert_eq!(indexes, (16..=40).collect::<Vec<_>>());
        assert_eq!(c.term(30).unwrap(), 2);
        assert_eq!(c.term(31).unwrap(), 3);
    }

    #[test]
    fn a_snapshot_from_the_leader_wins_over_an_older_one_being_written() {
        let dir = tempfile::tempdir().unwrap();
        let cs = ConfState::from((vec![1u64, 2], Vec::<u64>::new()));
        let mut s = DiskStorage::open(dir.path(), 1).unwrap();
        s.bootstrap(&[1, 2], vec![]).unwrap();
        let es: Vec<_> = (2..=10).map(|i| entry(i, 1, b"e")).collect();
        s.append(&es).unwrap();
        let ours = s.snapshot_metadata_at(8, &cs).unwrap();
        let writer = s.snapshot_writer();
        // The leader's snapshot is installed while ours is still being encoded.
        let mut theirs = Snapshot::default();
        theirs.mut_metadata().index = 40;
        theirs.mut_metadata().term = 3;
        theirs.mut_metadata().set_conf_state(cs.clone());
        theirs.data = b"s40".to_vec().into();
        s.apply_snapshot(&theirs).unwrap();
        s.sync().unwrap();
        assert!(!writer.store(&ours, b"s8").unwrap());
        drop(writer);
        s.snapshot_stored(ours, 5).unwrap();
        assert_eq!(s.snapshot_metadata().index, 40);
        assert_eq!(s.first_index(), 41);
        assert_eq!(s.snapshot_data().unwrap(), b"s40");
        drop(s);
        let s = reopen(dir.path(), 1).unwrap();
        assert_eq!(s.snapshot_metadata().index, 40);
        assert_eq!(s.snapshot_data().unwrap(), b"s40");
    }
}
