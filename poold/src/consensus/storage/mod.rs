//! The Raft log, hard state and snapshot of one member, durable in sled.
//!
//! Three sled trees: `log` (the entries, one record per `Ready`: sled's cost is per key,
//! so a record of many entries costs about what one entry does), `meta` (hard state,
//! truncation point, identity) and `snap` (the newest state-machine snapshot and its
//! metadata). Keeping the large snapshot away from the small, hot hard-state record
//! matters: sled rewrites whole tree nodes, and a hard-state update must not drag a
//! multi-megabyte value along. The entries of a `Ready` and its hard state are staged in
//! the [`Wal`] and queued for sled, then [`DiskStorage::persist`] hands them to the WAL's
//! syncer thread, which makes them durable with one write and fdatasync; the Raft task
//! holds back anything that depends on them (an acknowledgement to the leader, a vote)
//! until [`DiskStorage::durable`] says so. A sled writer thread does the queued sled
//! writes in order, off the Raft task. sled itself is made durable only at a checkpoint
//! (its flush, with the fsyncs `sled_sync` adds, covers every tree), after which the WAL
//! starts empty: see `wal` for why. At open the WAL is played again into sled. sled
//! recovers a prefix of its write log, so a crash keeps writes in the order they were
//! made; [`DiskStorage::open`] repairs the one window that order leaves (a snapshot stored
//! but the log not yet cut behind it).
//!
//! The log between the compaction point and its end is also kept in memory (it is bounded
//! by the snapshot interval), so raft-rs's many `term` and `entries` calls never touch
//! disk; sled is written by the writer thread and read only at start (and after a
//! barrier).
//!
//! The conf state raft-rs sees at start is the snapshot's: the node replays every committed
//! entry after the snapshot (conf changes included) into a state machine rebuilt from that
//! snapshot, so the two always describe the same point of the log.
//!
//! # Layout
//! - `open`: opening or creating a member's directory, the format version and its
//!   upgrade, playing the WAL back, repairing what a crash left;
//! - `snapshot`: the `snap` tree, storing snapshots off the Raft task, installing one from
//!   the leader, cutting the log behind one;
//! - `sled_writer`: the thread that does the hot path's sled writes;
//! - `codec`: keys and record encodings;
//! - here: the hot path (append, hard state, persist, checkpoint) and raft-rs's
//!   [`raft::Storage`].
//!
//! # On-disk layout (format version 3)
//! | tree | key | value |
//! |---|---|---|
//! | meta | `format` | u32 BE, [`FORMAT_VERSION`] |
//! | meta | `member` | u64 BE, the member id the directory belongs to |
//! | meta | `hard` | `eraftpb.HardState` |
//! | meta | `trunc` | u64 BE index ‖ u64 BE term of the last entry removed from the log |
//! | snap | `meta` | `eraftpb.SnapshotMetadata` of the newest state-machine snapshot |
//! | snap | `data` | that snapshot's data (the encoded pool state) |
//! | log | first index BE | the entries of one `Ready`: (u32 BE length ‖ `eraftpb.Entry`)… |
//!
//! Beside sled's files, the WAL in `raft-journal` (format version 3 on): the log records
//! and hard states synced since the last checkpoint (see `wal`).

mod codec;
mod open;
mod sled_writer;
mod snapshot;
#[cfg(test)]
mod test_utils;

pub use open::{FORMAT_VERSION, FORMAT_VERSIONS_ACCEPTED, StorageOpenError};
pub use snapshot::SnapshotWriter;

use protobuf::Message as _;
use raft::eraftpb::{Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, StorageError};
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::wal::{CHECKPOINT_BYTES, Wal};
use codec::{be_u64, decode_group, encode_group, log_key};
use sled_writer::SledWriter;
use snapshot::SnapTree;

/// What failed in the store once open. raft-rs takes it as `StorageError::Other`; the
/// node stops the member on any of them.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("sled failed on the Raft store's {tree} tree")]
    Sled {
        tree: &'static str,
        #[source]
        source: sled::Error,
    },
    #[error("the Raft log record that starts at index {start} does not decode")]
    CorruptRecord { start: u64 },
    #[error("cannot encode a Raft record")]
    Encode(#[source] protobuf::ProtobufError),
    #[error("the Raft WAL failed")]
    Wal(#[source] super::wal::WalError),
    #[error("cannot make the Raft store durable")]
    Sync(#[source] sled_sync::SyncError),
    #[error("the Raft store's sled writer thread is gone")]
    WriterGone,
    /// Reported by every check after the first failure of the sled writer thread.
    #[error("writing the Raft log to sled failed; nothing queued after it was written")]
    SledWriter(#[source] Arc<StoreError>),
}

impl From<StoreError> for raft::Error {
    fn from(e: StoreError) -> Self {
        raft::Error::Store(StorageError::Other(Box::new(e)))
    }
}

fn sled_err(tree: &'static str) -> impl Fn(sled::Error) -> StoreError {
    move |source| StoreError::Sled { tree, source }
}

fn encode(m: &impl protobuf::Message) -> Result<Vec<u8>, StoreError> {
    m.write_to_bytes().map_err(StoreError::Encode)
}

/// A member's durable Raft state. Reads go to sled (whose page cache keeps the hot tail in
/// memory); the few numbers raft-rs asks for all the time are mirrored in memory.
pub struct DiskStorage {
    db: Arc<sled_sync::SyncedDb>,
    /// What makes each `Ready` durable; sled is made durable only at checkpoints.
    wal: Wal,
    log: sled::Tree,
    meta: sled::Tree,
    /// Does the hot path's sled writes (log records, hard states, log cuts) in order, on
    /// a thread of its own.
    writer: SledWriter,
    snap: Arc<SnapTree>,
    path: PathBuf,
    hard: HardState,
    /// The metadata of the snapshot the log is cut behind (the stored one can be newer
    /// while the log is not cut yet); its conf state is the one handed to raft-rs at start.
    snap_meta: SnapshotMetadata,
    /// Index and term of the last entry removed from the log.
    trunc: (u64, u64),
    last_index: u64,
    /// Entries `trunc.0 + 1 ..= last_index`, as on disk.
    entries: VecDeque<Entry>,
    /// Set when raft-rs asked for a snapshot the stored one cannot serve (it predates the
    /// member it is for); the node task takes a fresh one and raft-rs asks again.
    snapshot_wanted: std::cell::Cell<bool>,
}

impl DiskStorage {
    /// True when this directory has never held Raft state.
    pub fn is_empty(&self) -> bool {
        self.last_index == 0 && self.snap_meta.index == 0 && self.hard.term == 0
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Makes room for `entries` log entries in memory at once: grown by doubling, the log
    /// would move every entry it holds on the Raft task, while every write waits.
    pub fn reserve_log(&mut self, entries: usize) {
        self.entries
            .reserve(entries.saturating_sub(self.entries.len()));
    }

    /// Appends entries from a `Ready`, replacing any conflicting suffix; not yet durable.
    pub fn append(&mut self, entries: &[Entry]) -> Result<(), raft::Error> {
        let Some(first) = entries.first() else {
            return Ok(());
        };
        if first.index <= self.trunc.0 {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if first.index > self.last_index + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let record = encode_group(entries).map_err(StoreError::Encode)?;
        self.wal.stage_entries(&record);
        let log = self.log.clone();
        let from = first.index;
        let bytes = record.len();
        if from > self.last_index {
            // The common case: one new record. A single insert is atomic on its own, and a
            // sled batch is not free: it writes out the buffered log and a batch marker
            // (two more writes, each waited for) before its own records.
            self.writer.push(
                bytes,
                Box::new(move || {
                    log.insert(&log_key(from)[..], record)
                        .map(drop)
                        .map_err(sled_err("log"))
                }),
            );
        } else {
            self.writer
                .push(bytes, Box::new(move || write_from(&log, from, record)));
            self.entries
                .truncate((first.index - self.trunc.0 - 1) as usize);
        }
        self.entries.extend(entries.iter().cloned());
        self.last_index = entries[entries.len() - 1].index;
        Ok(())
    }

    pub fn set_hard_state(&mut self, hs: &HardState) -> Result<(), raft::Error> {
        let bytes = encode(hs)?;
        self.wal.stage_hard_state(&bytes);
        self.writer.set_hard_state(&self.meta, bytes);
        self.hard = hs.clone();
        Ok(())
    }

    pub fn hard_state(&self) -> &HardState {
        &self.hard
    }

    /// Hands every write so far to the WAL's syncer thread, to be made durable with one
    /// fdatasync, and now and then checkpoints (which waits for it). Returns the number
    /// [`DiskStorage::durable`] reaches once they are durable.
    pub fn persist(&mut self) -> Result<u64, raft::Error> {
        let number = self.wal.submit().map_err(StoreError::Wal)?;
        self.writer.check()?;
        if self.wal.len() > CHECKPOINT_BYTES {
            self.checkpoint()?;
        }
        Ok(number)
    }

    /// The number of the newest durable [`DiskStorage::persist`]; an error once the WAL
    /// failed a write (nothing after it becomes durable).
    pub fn durable(&self) -> Result<u64, raft::Error> {
        Ok(self.wal.durable().map_err(StoreError::Wal)?)
    }

    /// The number of the last [`DiskStorage::persist`] that handed the WAL anything.
    pub fn submitted(&self) -> u64 {
        self.wal.submitted()
    }

    /// Waits until [`DiskStorage::durable`] reaches `number`.
    pub fn wait_durable(&self, number: u64) -> Result<(), raft::Error> {
        Ok(self.wal.wait(number).map_err(StoreError::Wal)?)
    }

    /// Sets what the WAL's syncer thread calls each time writes became durable.
    pub fn set_durable_waker(&self, waker: super::wal::Waker) {
        self.wal.set_waker(waker);
    }

    /// Makes every write so far durable and waits for it.
    pub fn sync(&mut self) -> Result<(), raft::Error> {
        let number = self.persist()?;
        self.wait_durable(number)
    }

    /// Makes sled durable (see `sled_sync` for what sled's flush lacks), then empties the
    /// WAL, whose records sled now holds. Also called before and after installing a
    /// snapshot from the leader, which the WAL does not record, so that no WAL record (an
    /// older hard state, entries the snapshot replaced) is ever played back over one.
    fn checkpoint(&mut self) -> Result<(), StoreError> {
        let started = std::time::Instant::now();
        let wal_bytes = self.wal.len();
        // sled must hold every WAL record before the WAL can be emptied.
        self.writer.barrier()?;
        self.db.flush().map_err(StoreError::Sync)?;
        self.wal.reset().map_err(StoreError::Wal)?;
        tracing::debug!(
            wal_bytes,
            ms = started.elapsed().as_secs_f64() * 1e3,
            "checkpoint: sled flushed, WAL emptied"
        );
        Ok(())
    }

    pub fn first_index(&self) -> u64 {
        self.trunc.0 + 1
    }

    pub fn last_index(&self) -> u64 {
        self.last_index
    }

    fn entry(&self, index: u64) -> Result<&Entry, raft::Error> {
        if index <= self.trunc.0 || index > self.last_index {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        Ok(&self.entries[(index - self.trunc.0 - 1) as usize])
    }
}

/// Writes the log record `record`, whose first entry is `from`, in place of whatever the
/// log held from `from` on, in one batch: the record that holds `from` is cut short, every
/// later record dropped, and `record` written. (A new leader overwrites a suffix this
/// member held; a WAL replay writes records sled may hold already.)
fn write_from(log: &sled::Tree, from: u64, record: Vec<u8>) -> Result<(), StoreError> {
    let mut batch = sled::Batch::default();
    if let Some((k, v)) = log
        .range(..=log_key(from))
        .next_back()
        .transpose()
        .map_err(sled_err("log"))?
    {
        let start = be_u64(&k).unwrap_or(0);
        if start < from {
            let kept: Vec<Entry> = decode_group(&v)
                .ok_or(StoreError::CorruptRecord { start })?
                .into_iter()
                .filter(|e| e.index < from)
                .collect();
            batch.insert(k, encode_group(&kept).map_err(StoreError::Encode)?);
        }
    }
    for k in log.range(log_key(from)..).keys() {
        batch.remove(k.map_err(sled_err("log"))?);
    }
    batch.insert(&log_key(from)[..], record);
    log.apply_batch(batch).map_err(sled_err("log"))
}

impl raft::Storage for DiskStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(
            self.hard.clone(),
            self.snap_meta.get_conf_state().clone(),
        ))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        if low <= self.trunc.0 {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.last_index + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let max = max_size.into().unwrap_or(u64::MAX);
        let from = (low - self.trunc.0 - 1) as usize;
        let to = (high - self.trunc.0 - 1) as usize;
        let mut out = Vec::with_capacity(to - from);
        let mut size = 0u64;
        for e in self.entries.range(from..to) {
            size += u64::from(e.compute_size());
            // The first entry is always returned, whatever its size.
            if !out.is_empty() && size > max {
                break;
            }
            out.push(e.clone());
        }
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        if idx == self.trunc.0 {
            return Ok(self.trunc.1);
        }
        if idx == self.snap_meta.index && idx != 0 {
            return Ok(self.snap_meta.term);
        }
        if idx < self.trunc.0 {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if idx > self.last_index {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        Ok(self.entry(idx)?.term)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.trunc.0 + 1)
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last_index)
    }

    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        // The stored snapshot is always at least as new as the compacted prefix, which is
        // what a follower that needs one lacks (it may be newer than `snap_meta`: stored,
        // the log not cut yet; it holds committed state all the same). But raft-rs refuses
        // to install a snapshot whose configuration does not name the receiver, so a
        // member added after it was taken needs a fresh one.
        let (meta, data) = self.snap.read()?;
        let cs = meta.get_conf_state();
        let names = cs.voters.contains(&to)
            || cs.learners.contains(&to)
            || cs.voters_outgoing.contains(&to)
            || cs.learners_next.contains(&to);
        if !names || meta.index < request_index {
            self.snapshot_wanted.set(true);
            return Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        let mut snap = Snapshot::default();
        snap.set_metadata(meta);
        snap.data = data.into();
        Ok(snap)
    }
}

#[cfg(test)]
mod tests {
    use super::test_utils::{entry, files_after_a_crash, reopen};
    use super::*;
    use raft::Storage;

    #[test]
    fn log_hard_state_and_snapshot_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = DiskStorage::open(dir.path(), 7).unwrap();
            assert!(s.is_empty());
            s.bootstrap(&[7, 8, 9], b"state0".to_vec()).unwrap();
            s.append(&[entry(2, 1, b"a"), entry(3, 2, b"b"), entry(4, 2, b"c")])
                .unwrap();
            let mut hs = s.hard_state().clone();
            hs.vote = 8;
            hs.term = 2;
            hs.commit = 3;
            s.set_hard_state(&hs).unwrap();
            s.sync().unwrap();
        }
        let s = reopen(dir.path(), 7).unwrap();
        assert!(!s.is_empty());
        let st = s.initial_state().unwrap();
        assert_eq!(st.hard_state.vote, 8);
        assert_eq!(st.hard_state.commit, 3);
        assert_eq!(st.conf_state.voters, vec![7, 8, 9]);
        assert_eq!(s.first_index(), 2);
        assert_eq!(s.last_index(), 4);
        assert_eq!(s.term(1).unwrap(), 1);
        assert_eq!(s.term(4).unwrap(), 2);
        let es = s
            .entries(2, 5, None, GetEntriesContext::empty(false))
            .unwrap();
        assert_eq!(es.len(), 3);
        assert_eq!(&es[2].data[..], b"c");
        assert_eq!(s.snapshot(0, 8).unwrap().data.as_ref(), b"state0");
        drop(s);
        assert!(matches!(
            reopen(dir.path(), 9),
            Err(StorageOpenError::WrongMember { found: 7, .. })
        ));
    }

    #[test]
    fn a_checkpoint_empties_the_wal_into_sled() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = DiskStorage::open(dir.path(), 1).unwrap();
        s.bootstrap(&[1], vec![]).unwrap();
        let big = vec![7u8; 64 << 10];
        let mut index = 2;
        while s.wal.len() < CHECKPOINT_BYTES - (64 << 10) {
            s.append(&[entry(index, 1, &big)]).unwrap();
            s.sync().unwrap();
            index += 1;
        }
        s.append(&[entry(index, 1, &big)]).unwrap();
        s.sync().unwrap();
        s.append(&[entry(index + 1, 1, &big)]).unwrap();
        s.sync().unwrap();
        assert!(
            s.wal.len() < CHECKPOINT_BYTES / 2,
            "the WAL was emptied: {} bytes",
            s.wal.len()
        );
        let crashed = files_after_a_crash(dir.path());
        let c = DiskStorage::open(crashed.path(), 1).unwrap();
        assert_eq!(c.last_index(), index + 1);
        assert_eq!(c.term(2).unwrap(), 1);
    }

    #[test]
    fn conflicting_suffix_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = DiskStorage::open(dir.path(), 1).unwrap();
        s.bootstrap(&[1], vec![]).unwrap();
        s.append(&[entry(2, 1, b"a"), entry(3, 1, b"b"), entry(4, 1, b"c")])
            .unwrap();
        s.append(&[entry(5, 1, b"d")]).unwrap();
        // A new leader's entry at 3 cuts the first record short and drops the second.
        s.append(&[entry(3, 2, b"x")]).unwrap();
        assert_eq!(s.last_index(), 3);
        assert_eq!(s.term(3).unwrap(), 2);
        assert!(s.term(4).is_err());
        s.sync().unwrap();
        drop(s);
        let s = reopen(dir.path(), 1).unwrap();
        assert_eq!(s.last_index(), 3);
        let es = s
            .entries(2, 4, None, GetEntriesContext::empty(false))
            .unwrap();
        assert_eq!(&es[0].data[..], b"a");
        assert_eq!(&es[1].data[..], b"x");
    }

    #[test]
    fn size_limit_returns_at_least_one_entry() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = DiskStorage::open(dir.path(), 1).unwrap();
        s.bootstrap(&[1], vec![]).unwrap();
        s.append(&[entry(2, 1, &[0; 100]), entry(3, 1, &[0; 100])])
            .unwrap();
        let es = s
            .entries(2, 4, Some(1), GetEntriesContext::empty(false))
            .unwrap();
        assert_eq!(es.len(), 1);
    }
}
