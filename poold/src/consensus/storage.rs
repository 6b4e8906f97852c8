//! The Raft log, hard state and snapshot of one member, durable in sled.
//!
//! Three sled trees: `log` (the entries, one record per `Ready`: sled's cost is per key,
//! so a batch of 64 entries costs about what one does), `meta` (hard state, truncation point, identity)
//! and `snap` (the newest state-machine snapshot and its metadata). Keeping the large
//! snapshot away from the small, hot hard-state record matters: sled rewrites whole tree
//! nodes, and a hard-state update must not drag a multi-megabyte value along. The entries
//! of a `Ready` and its hard state are staged in the [`Journal`] and queued for sled, then
//! [`DiskStorage::persist`] hands them to the journal's syncer thread, which makes them
//! durable with one write and fdatasync; the Raft task holds back anything that depends on
//! them (an acknowledgement to the leader, a vote) until [`DiskStorage::durable`] says so.
//! A [`SledWriter`] thread does the queued sled writes in order, off the Raft task. sled
//! itself is made durable only at a checkpoint (its flush, with the fsyncs `sled_sync`
//! adds, covers every tree), after which the journal starts empty: see `journal` for why. At open the journal is played again into sled. sled recovers a
//! prefix of its write log, so a crash keeps writes in the order they were made;
//! [`DiskStorage::open`] repairs the one window that order leaves (a snapshot stored but
//! the log not yet cut behind it).
//!
//! A state-machine snapshot is stored off the Raft task by a [`SnapshotWriter`] (a
//! 15 MB value and its fsync took the thread ~150 ms, on every member at once); the log is
//! cut behind it only once it is durable ([`DiskStorage::snapshot_stored`]). The snapshot
//! tree is written under one lock by the writer and by [`DiskStorage::apply_snapshot`], so
//! an older snapshot never replaces a newer one, and read under it, so its metadata and data
//! always belong together.
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
//! Beside sled's files, `raft-journal` (format version 3 on): the log records and hard
//! states synced since the last checkpoint (see `journal`).
//!
//! The log between the compaction point and its end is also kept in memory (it is bounded
//! by the snapshot interval), so raft-rs's many `term` and `entries` calls never touch disk;
//! sled is written by the writer thread and read only at start (and after a barrier).
//!
//! The conf state raft-rs sees at start is the snapshot's: the node replays every committed
//! entry after the snapshot (conf changes included) into a state machine rebuilt from that
//! snapshot, so the two always describe the same point of the log.

use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, StorageError};
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::journal::{CHECKPOINT_BYTES, Journal, Record};

/// The layout written by this code; a directory of another version is refused.
pub const FORMAT_VERSION: u32 = 3;
/// Versions this code reads (version 2 had no journal; opening one upgrades it).
pub const FORMAT_VERSIONS_ACCEPTED: std::ops::RangeInclusive<u32> = 2..=3;

const K_FORMAT: &[u8] = b"format";
const K_MEMBER: &[u8] = b"member";
const K_HARD: &[u8] = b"hard";
const K_TRUNC: &[u8] = b"trunc";
const K_SNAPMETA: &[u8] = b"meta";
const K_SNAPDATA: &[u8] = b"data";

#[derive(Debug, thiserror::Error)]
pub enum StorageOpenError {
    #[error("cannot open the Raft store in {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: sled::Error,
    },
    #[error("the Raft store in {path} has format version {found}, this poold reads {accepted:?}")]
    Version {
        path: PathBuf,
        found: u32,
        accepted: std::ops::RangeInclusive<u32>,
    },
    #[error("the Raft store in {path} belongs to member {found}, not {expected}")]
    WrongMember {
        path: PathBuf,
        found: u64,
        expected: u64,
    },
    #[error("the Raft store in {path} is damaged: {what}")]
    Corrupt { path: PathBuf, what: String },
    #[error("Raft store I/O failed")]
    Io(#[source] sled::Error),
    #[error("cannot start the Raft store's sled writer thread")]
    Thread(#[source] std::io::Error),
    #[error("cannot read the Raft journal in {path}")]
    Journal {
        path: PathBuf,
        #[source]
        source: super::journal::JournalError,
    },
    #[error("cannot make the Raft store in {path} durable")]
    Sync {
        path: PathBuf,
        #[source]
        source: sled_sync::SyncError,
    },
}

fn log_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

fn be_u64(b: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(b.try_into().ok()?))
}

fn store_err(e: impl std::error::Error + Send + Sync + 'static) -> raft::Error {
    raft::Error::Store(StorageError::Other(Box::new(e)))
}

/// A member's durable Raft state. Reads go to sled (whose page cache keeps the hot tail in
/// memory); the few numbers raft-rs asks for all the time are mirrored in memory.
pub struct DiskStorage {
    db: Arc<sled_sync::SyncedDb>,
    /// What makes each `Ready` durable; sled is made durable only at checkpoints.
    journal: Journal,
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
    /// Opens (or creates) the store of `member_id` in `dir`.
    pub fn open(dir: &Path, member_id: u64) -> Result<Self, StorageOpenError> {
        let path = dir.to_owned();
        let db = sled::Config::new()
            .path(dir)
            // poold syncs explicitly after each Ready; sled's timer would only add writes.
            .flush_every_ms(None)
            .open()
            .map_err(|source| StorageOpenError::Open {
                path: path.clone(),
                source,
            })?;
        let db = sled_sync::SyncedDb::new(db, dir).map_err(|source| StorageOpenError::Sync {
            path: path.clone(),
            source,
        })?;
        let io = StorageOpenError::Io;
        let log = db.db().open_tree("log").map_err(io)?;
        let meta = db.db().open_tree("meta").map_err(io)?;
        let snap_tree = db.db().open_tree("snap").map_err(io)?;
        let corrupt = |what: &str| StorageOpenError::Corrupt {
            path: path.clone(),
            what: what.to_owned(),
        };
        if let Some(v) = meta.get(K_FORMAT).map_err(io)? {
            let found = u32::from_be_bytes(
                v.as_ref()
                    .try_into()
                    .map_err(|_| corrupt("format version"))?,
            );
            if !FORMAT_VERSIONS_ACCEPTED.contains(&found) {
                return Err(StorageOpenError::Version {
                    path,
                    found,
                    accepted: FORMAT_VERSIONS_ACCEPTED,
                });
            }
        }
        // From here on the directory may hold a journal, which an older poold would ignore.
        meta.insert(K_FORMAT, &FORMAT_VERSION.to_be_bytes())
            .map_err(io)?;
        match meta.get(K_MEMBER).map_err(io)? {
            Some(v) => {
                let found = be_u64(&v).ok_or_else(|| corrupt("member id"))?;
                if found != member_id {
                    return Err(StorageOpenError::WrongMember {
                        path,
                        found,
                        expected: member_id,
                    });
                }
            }
            None => {
                meta.insert(K_MEMBER, &member_id.to_be_bytes())
                    .map_err(io)?;
            }
        }
        // What the journal holds since the last checkpoint goes back into sled first, then
        // sled is made durable and the journal emptied: from here on the trees are whole.
        let (mut journal, records) = Journal::open(dir, &format!("raft-{member_id}-journal"))
            .map_err(|source| StorageOpenError::Journal {
                path: path.clone(),
                source,
            })?;
        let replayed = records.len();
        for r in records {
            match r {
                Record::Entries(record) => {
                    let first = decode_group(&record)
                        .ok_or_else(|| corrupt("journal log record"))?
                        .first()
                        .map(|e| e.index);
                    if let Some(first) = first {
                        write_from(&log, first, record).map_err(|e| {
                            corrupt(&format!("log (playing the journal back: {e})"))
                        })?;
                    }
                }
                Record::HardState(hs) => {
                    HardState::parse_from_bytes(&hs).map_err(|_| corrupt("journal hard state"))?;
                    meta.insert(K_HARD, hs).map_err(io)?;
                }
            }
        }
        if replayed > 0 {
            tracing::info!(records = replayed, "replayed the Raft journal");
        }
        db.flush().map_err(|source| StorageOpenError::Sync {
            path: path.clone(),
            source,
        })?;
        journal
            .reset()
            .map_err(|source| StorageOpenError::Journal {
                path: path.clone(),
                source: source.into(),
            })?;
        let mut hard = match meta.get(K_HARD).map_err(io)? {
            Some(v) => HardState::parse_from_bytes(&v).map_err(|_| corrupt("hard state"))?,
            None => HardState::default(),
        };
        let snap_meta = match snap_tree.get(K_SNAPMETA).map_err(io)? {
            Some(v) => {
                SnapshotMetadata::parse_from_bytes(&v).map_err(|_| corrupt("snapshot metadata"))?
            }
            None => SnapshotMetadata::default(),
        };
        let mut trunc = match meta.get(K_TRUNC).map_err(io)? {
            Some(v) if v.len() == 16 => (
                be_u64(&v[..8]).ok_or_else(|| corrupt("truncation"))?,
                be_u64(&v[8..]).ok_or_else(|| corrupt("truncation"))?,
            ),
            Some(_) => return Err(corrupt("truncation record")),
            None => (0, 0),
        };
        // Load the log; records wholly at or below the truncation point are garbage a
        // crash left behind.
        let mut entries: VecDeque<Entry> = VecDeque::new();
        let mut stale = sled::Batch::default();
        for r in log.iter() {
            let (k, v) = r.map_err(io)?;
            let group = decode_group(&v).ok_or_else(|| corrupt("log record"))?;
            if group.last().is_none_or(|e| e.index <= trunc.0) {
                stale.remove(k);
                continue;
            }
            for e in group {
                if e.index > trunc.0 {
                    if entries.back().is_some_and(|l| l.index + 1 != e.index) {
                        return Err(corrupt("gap in the log"));
                    }
                    entries.push_back(e);
                }
            }
        }
        log.apply_batch(stale).map_err(io)?;
        if entries.front().is_some_and(|e| e.index != trunc.0 + 1) {
            return Err(corrupt("log does not start after the truncation point"));
        }
        let mut last_index = entries.back().map_or(trunc.0, |e| e.index);
        // A snapshot from the leader is stored before the log is cut behind it; when a
        // crash fell in between, finish the job: the log does not reach the snapshot, or
        // disagrees with it at its index.
        if snap_meta.index > trunc.0 {
            let agrees = snap_meta.index <= last_index
                && entries[(snap_meta.index - trunc.0 - 1) as usize].term == snap_meta.term;
            if !agrees {
                let mut b = sled::Batch::default();
                for k in log.iter().keys() {
                    b.remove(k.map_err(io)?);
                }
                log.apply_batch(b).map_err(io)?;
                entries.clear();
                trunc = (snap_meta.index, snap_meta.term);
                last_index = snap_meta.index;
                hard.commit = hard.commit.max(snap_meta.index);
                hard.term = hard.term.max(snap_meta.term);
                let mut m = sled::Batch::default();
                m.insert(K_TRUNC, &trunc_bytes(trunc)[..]);
                m.insert(
                    K_HARD,
                    hard.write_to_bytes().map_err(|_| corrupt("hard state"))?,
                );
                meta.apply_batch(m).map_err(io)?;
            }
        }
        // A snapshot holds only committed state, so the commit index is at least its index
        // (the commit index is written lazily, without its own fsync).
        hard.commit = hard.commit.max(snap_meta.index);
        db.flush().map_err(|source| StorageOpenError::Sync {
            path: path.clone(),
            source,
        })?;
        let writer = SledWriter::start(member_id).map_err(StorageOpenError::Thread)?;
        Ok(DiskStorage {
            db: Arc::new(db),
            journal,
            log,
            meta,
            writer,
            snap: Arc::new(SnapTree {
                tree: snap_tree,
                stored: Mutex::new(snap_meta.clone()),
            }),
            path,
            hard,
            snap_meta,
            trunc,
            last_index,
            entries,
            snapshot_wanted: std::cell::Cell::new(false),
        })
    }

    /// True when this directory has never held Raft state.
    pub fn is_empty(&self) -> bool {
        self.last_index == 0 && self.snap_meta.index == 0 && self.hard.term == 0
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bootstraps a new group: the initial configuration and state machine as a snapshot at
    /// index 1, term 1, identical on every founding member. Starting the log after index 1
    /// means a member added later always begins from a snapshot, which carries the member
    /// addresses and pool id it cannot learn from the log alone.
    pub fn bootstrap(&mut self, voters: &[u64], state: Vec<u8>) -> Result<(), raft::Error> {
        let mut snap = Snapshot::default();
        snap.mut_metadata().index = 1;
        snap.mut_metadata().term = 1;
        snap.mut_metadata().set_conf_state(ConfState::from((
            voters.iter().copied(),
            std::iter::empty(),
        )));
        snap.data = state.into();
        self.apply_snapshot(&snap)?;
        self.sync()
    }

    /// Makes room for `entries` log entries in memory at once. Grown by doubling, the
    /// log moved every entry it held on the Raft task (a leader's, from 131,072 to
    /// 262,144 entries: ~16 MB and 20-25 ms while every write waited).
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
        let record = encode_group(entries)?;
        self.journal.stage_entries(&record);
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
                        .map_err(store_err)
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
        let bytes = hs.write_to_bytes().map_err(store_err)?;
        self.journal.stage_hard_state(&bytes);
        self.writer.set_hard_state(&self.meta, bytes);
        self.hard = hs.clone();
        Ok(())
    }

    pub fn hard_state(&self) -> &HardState {
        &self.hard
    }

    /// Hands every write so far to the journal's syncer thread, to be made durable with
    /// one fdatasync, and now and then checkpoints (which waits for it). Returns the number
    /// [`DiskStorage::durable`] reaches once they are durable.
    pub fn persist(&mut self) -> Result<u64, raft::Error> {
        let number = self.journal.submit().map_err(store_err)?;
        self.writer.check()?;
        if self.journal.len() > CHECKPOINT_BYTES {
            self.checkpoint()?;
        }
        Ok(number)
    }

    /// The number of the newest durable [`DiskStorage::persist`]; an error once the
    /// journal failed a write (nothing after it becomes durable).
    pub fn durable(&self) -> Result<u64, raft::Error> {
        self.journal.durable().map_err(store_err)
    }

    /// The number of the last [`DiskStorage::persist`] that handed the journal anything.
    pub fn submitted(&self) -> u64 {
        self.journal.submitted()
    }

    /// Waits until [`DiskStorage::durable`] reaches `number`.
    pub fn wait_durable(&self, number: u64) -> Result<(), raft::Error> {
        self.journal.wait(number).map_err(store_err)
    }

    /// Sets what the journal's syncer thread calls each time writes became durable.
    pub fn set_durable_waker(&self, waker: super::journal::Waker) {
        self.journal.set_waker(waker);
    }

    /// Makes every write so far durable and waits for it.
    pub fn sync(&mut self) -> Result<(), raft::Error> {
        let number = self.persist()?;
        self.wait_durable(number)
    }

    /// Makes sled durable (see `sled_sync` for what sled's flush lacks), then empties the
    /// journal, whose records sled now holds. Also called before and after installing a
    /// snapshot from the leader, which the journal does not record, so that no journal
    /// record (an older hard state, entries the snapshot replaced) is ever played back
    /// over one.
    fn checkpoint(&mut self) -> Result<(), raft::Error> {
        let started = std::time::Instant::now();
        let journal_bytes = self.journal.len();
        // sled must hold every journal record before the journal can be emptied.
        self.writer.barrier()?;
        self.db.flush().map_err(store_err)?;
        self.journal.reset().map_err(store_err)?;
        tracing::debug!(
            journal_bytes,
            ms = started.elapsed().as_secs_f64() * 1e3,
            "checkpoint: sled flushed, journal emptied"
        );
        Ok(())
    }

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
        m.insert(K_HARD, hs.write_to_bytes().map_err(store_err)?);
        self.meta.apply_batch(m).map_err(store_err)?;
        let mut b = sled::Batch::default();
        for k in self.log.iter().keys() {
            b.remove(k.map_err(store_err)?);
        }
        self.log.apply_batch(b).map_err(store_err)?;
        self.entries.clear();
        self.hard = hs;
        self.snap_meta = meta.clone();
        self.trunc = trunc;
        self.last_index = meta.index;
        self.checkpoint()
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
    /// The cut is not journaled and needs no checkpoint: lost in a crash, it leaves a
    /// longer log behind a durable snapshot, which open accepts; kept with journal records
    /// played back over it, records at or below the cut are dropped at open. (A
    /// checkpoint after the cut's batch of deletes cost the Raft task 23-29 ms.)
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
            // log's keys and deleting thousands of them cost the Raft task ~100 ms.
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

    pub fn snapshot_metadata(&self) -> &SnapshotMetadata {
        &self.snap_meta
    }

    /// The stored snapshot's data (the encoded state machine).
    pub fn snapshot_data(&self) -> Result<Vec<u8>, raft::Error> {
        Ok(self.snap.read()?.1)
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

/// The `snap` tree and the metadata of the snapshot in it. Its lock is held while the
/// tree is written or read, so a snapshot is never replaced by an older one and a reader
/// never pairs one snapshot's metadata with another's data.
struct SnapTree {
    tree: sled::Tree,
    stored: Mutex<SnapshotMetadata>,
}

impl SnapTree {
    /// Writes a snapshot (not yet durable); unless `replace_newer`, only when it is newer
    /// than the stored one. Returns whether it was written.
    fn store(
        &self,
        meta: &SnapshotMetadata,
        data: &[u8],
        replace_newer: bool,
    ) -> Result<bool, raft::Error> {
        let mut stored = self.stored.lock().expect("snapshot lock");
        if !replace_newer && meta.index <= stored.index {
            return Ok(false);
        }
        // Metadata and data in one batch of one tree: they never disagree after a crash.
        let mut b = sled::Batch::default();
        b.insert(K_SNAPMETA, meta.write_to_bytes().map_err(store_err)?);
        b.insert(K_SNAPDATA, data);
        self.tree.apply_batch(b).map_err(store_err)?;
        *stored = meta.clone();
        Ok(true)
    }

    fn read(&self) -> Result<(SnapshotMetadata, Vec<u8>), raft::Error> {
        let stored = self.stored.lock().expect("snapshot lock");
        let data = self.tree.get(K_SNAPDATA).map_err(store_err)?;
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
        self.db.flush().map_err(store_err)?;
        Ok(true)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("a log record does not decode")]
struct CorruptRecord;

/// Records the cut of the log behind `trunc` and drops the records that lie wholly at or
/// below it; one that straddles it stays, its early entries ignored from now on.
/// `last_index` is the log's last index when the cut was made.
fn cut_log(
    log: &sled::Tree,
    meta: &sled::Tree,
    trunc: (u64, u64),
    last_index: u64,
) -> Result<(), raft::Error> {
    meta.insert(K_TRUNC, &trunc_bytes(trunc)[..])
        .map_err(store_err)?;
    let keys: Vec<u64> = log
        .iter()
        .keys()
        .map(|k| k.map(|k| be_u64(&k).unwrap_or(0)))
        .collect::<Result<_, _>>()
        .map_err(store_err)?;
    let mut b = sled::Batch::default();
    for (i, start) in keys.iter().enumerate() {
        let end = keys.get(i + 1).map_or(last_index, |next| next - 1);
        if end <= trunc.0 {
            b.remove(&log_key(*start)[..]);
        }
    }
    log.apply_batch(b).map_err(store_err)
}

/// One sled write, run on the writer thread.
type SledOp = Box<dyn FnOnce() -> Result<(), raft::Error> + Send>;

enum SledWork {
    Ops(Vec<SledOp>),
    /// Answered once everything sent before it is done.
    Barrier(std::sync::mpsc::SyncSender<()>),
}

/// Queued writes handed over in batches past this size, so the writer thread is woken a
/// few dozen times a second rather than once per `Ready`.
const HANDOFF_BYTES: usize = 256 << 10;

/// The thread that writes sled for the Raft task. sled is not what makes a `Ready`
/// durable (the journal is), so its writes need not be done before the `Ready`'s
/// messages leave, only before the next checkpoint empties the journal; and a sled insert
/// now and then takes the calling thread 6-100 ms (it writes out a full buffer or cleans
/// segments), which on the Raft task stalled the whole pool. Writes run in the order
/// they were queued; after the first failure none runs, and the Raft task learns of it
/// at its next sync. A crash loses what was queued and not yet written, which the journal
/// still holds and plays back at open.
struct SledWriter {
    pending: Vec<SledOp>,
    pending_bytes: usize,
    /// The newest hard state not yet queued: only the last one matters.
    hard: Option<(sled::Tree, Vec<u8>)>,
    tx: Option<std::sync::mpsc::Sender<SledWork>>,
    thread: Option<std::thread::JoinHandle<()>>,
    failed: Arc<Mutex<Option<String>>>,
}

impl SledWriter {
    fn start(member_id: u64) -> std::io::Result<Self> {
        let (tx, rx) = std::sync::mpsc::channel::<SledWork>();
        let failed = Arc::new(Mutex::new(None));
        let seen = failed.clone();
        let thread = std::thread::Builder::new()
            .name(format!("raft-{member_id}-sled"))
            .spawn(move || {
                for work in rx {
                    match work {
                        SledWork::Ops(ops) => {
                            for op in ops {
                                if seen.lock().expect("writer lock").is_some() {
                                    break;
                                }
                                if let Err(e) = op() {
                                    tracing::error!(error = %e, "sled write failed");
                                    *seen.lock().expect("writer lock") = Some(e.to_string());
                                }
                            }
                        }
                        SledWork::Barrier(done) => {
                            let _ = done.send(());
                        }
                    }
                }
            })?;
        Ok(SledWriter {
            pending: Vec::new(),
            pending_bytes: 0,
            hard: None,
            tx: Some(tx),
            thread: Some(thread),
            failed,
        })
    }

    fn push(&mut self, bytes: usize, op: SledOp) {
        self.pending.push(op);
        self.pending_bytes += bytes;
        if self.pending_bytes >= HANDOFF_BYTES {
            self.hand_off();
        }
    }

    fn set_hard_state(&mut self, meta: &sled::Tree, bytes: Vec<u8>) {
        self.hard = Some((meta.clone(), bytes));
    }

    /// Sends what is queued to the thread.
    fn hand_off(&mut self) {
        if let Some((meta, bytes)) = self.hard.take() {
            self.pending.push(Box::new(move || {
                meta.insert(K_HARD, bytes).map(drop).map_err(store_err)
            }));
        }
        if self.pending.is_empty() {
            return;
        }
        let ops = std::mem::take(&mut self.pending);
        self.pending_bytes = 0;
        if let Some(tx) = &self.tx
            && tx.send(SledWork::Ops(ops)).is_err()
        {
            *self.failed.lock().expect("writer lock") =
                Some("the sled writer thread is gone".into());
        }
    }

    /// The first failure of a write, if any.
    fn check(&self) -> Result<(), raft::Error> {
        match &*self.failed.lock().expect("writer lock") {
            Some(e) => Err(store_err(std::io::Error::other(format!(
                "writing the Raft log to sled failed: {e}"
            )))),
            None => Ok(()),
        }
    }

    /// Returns once every write queued so far is done.
    fn barrier(&mut self) -> Result<(), raft::Error> {
        self.hand_off();
        let (done, wait) = std::sync::mpsc::sync_channel(1);
        if let Some(tx) = &self.tx
            && tx.send(SledWork::Barrier(done)).is_ok()
        {
            let _ = wait.recv();
        }
        self.check()
    }
}

impl Drop for SledWriter {
    /// Writes what is queued and waits for the thread, so that the store can be opened
    /// again as soon as it is dropped.
    fn drop(&mut self) {
        self.hand_off();
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Writes the log record `record`, whose first entry is `from`, in place of whatever the
/// log held from `from` on, in one batch: the record that holds `from` is cut short, every
/// later record dropped, and `record` written. (A new leader overwrites a suffix this
/// member held; a journal replay writes records sled may hold already.)
fn write_from(log: &sled::Tree, from: u64, record: Vec<u8>) -> Result<(), raft::Error> {
    let mut batch = sled::Batch::default();
    if let Some((k, v)) = log
        .range(..=log_key(from))
        .next_back()
        .transpose()
        .map_err(store_err)?
    {
        let start = be_u64(&k).unwrap_or(0);
        if start < from {
            let kept: Vec<Entry> = decode_group(&v)
                .ok_or_else(|| store_err(CorruptRecord))?
                .into_iter()
                .filter(|e| e.index < from)
                .collect();
            batch.insert(k, encode_group(&kept)?);
        }
    }
    for k in log.range(log_key(from)..).keys() {
        batch.remove(k.map_err(store_err)?);
    }
    batch.insert(&log_key(from)[..], record);
    log.apply_batch(batch).map_err(store_err)
}

fn encode_group(entries: &[Entry]) -> Result<Vec<u8>, raft::Error> {
    let mut out = Vec::new();
    for e in entries {
        let b = e.write_to_bytes().map_err(store_err)?;
        out.extend_from_slice(&(b.len() as u32).to_be_bytes());
        out.extend_from_slice(&b);
    }
    Ok(out)
}

/// The entries of one log record; `None` when it is damaged.
fn decode_group(mut v: &[u8]) -> Option<Vec<Entry>> {
    let mut out = Vec::new();
    while !v.is_empty() {
        let len = u32::from_be_bytes(v.get(..4)?.try_into().ok()?) as usize;
        let body = v.get(4..4 + len)?;
        out.push(Entry::parse_from_bytes(body).ok()?);
        v = &v[4 + len..];
    }
    Some(out)
}

fn trunc_bytes((index, term): (u64, u64)) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&index.to_be_bytes());
    b[8..].copy_from_slice(&term.to_be_bytes());
    b
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
    use super::*;
    use raft::Storage;

    /// Opens a store this process had open a moment ago. sled lets go of its lock on the
    /// directory only when its I/O threads drop their last references to the closed
    /// database, which can be just after the drop returns (a restarted poold is a new
    /// process and never waits: the kernel releases the lock at exit).
    fn reopen(dir: &Path, id: u64) -> Result<DiskStorage, StorageOpenError> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match DiskStorage::open(dir, id) {
                Err(StorageOpenError::Open { source, .. })
                    if source.to_string().contains("could not acquire lock")
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                r => return r,
            }
        }
    }

    fn entry(index: u64, term: u64, data: &[u8]) -> Entry {
        let mut e = Entry::default();
        e.index = index;
        e.term = term;
        e.data = data.to_vec().into();
        e
    }

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

    /// What a crash of the process leaves: the directory's files as they are while the store
    /// is open. Between checkpoints sled is not flushed, so what was synced since the last
    /// one is in the journal alone.
    fn files_after_a_crash(dir: &Path) -> tempfile::TempDir {
        fn copy(from: &Path, to: &Path) {
            for e in std::fs::read_dir(from).unwrap() {
                let e = e.unwrap();
                let dst = to.join(e.file_name());
                if e.file_type().unwrap().is_dir() {
                    std::fs::create_dir(&dst).unwrap();
                    copy(&e.path(), &dst);
                } else {
                    std::fs::copy(e.path(), dst).unwrap();
                }
            }
        }
        let out = tempfile::tempdir().unwrap();
        copy(dir, out.path());
        out
    }

    #[test]
    fn what_was_synced_survives_a_crash_through_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = DiskStorage::open(dir.path(), 1).unwrap();
        s.bootstrap(&[1, 2, 3], b"state0".to_vec()).unwrap();
        s.append(&[entry(2, 1, b"a"), entry(3, 1, b"b"), entry(4, 1, b"c")])
            .unwrap();
        s.append(&[entry(5, 1, b"d")]).unwrap();
        s.sync().unwrap();
        // A new leader's entries replace the suffix from 4 on; a vote in its term.
        s.append(&[entry(4, 2, b"x"), entry(5, 2, b"y"), entry(6, 2, b"z")])
            .unwrap();
        let mut hs = s.hard_state().clone();
        hs.term = 2;
        hs.vote = 2;
        s.set_hard_state(&hs).unwrap();
        s.sync().unwrap();
        assert!(!s.journal.is_empty(), "synced writes wait in the journal");
        // Written but never synced: may be lost, must not damage what was synced.
        s.append(&[entry(7, 2, b"unsynced")]).unwrap();
        // sled has not been handed these writes yet: what brings them back is the journal.
        assert!(!s.writer.pending.is_empty() && s.writer.hard.is_some());

        let crashed = files_after_a_crash(dir.path());
        let c = DiskStorage::open(crashed.path(), 1).unwrap();
        assert_eq!(c.hard_state().term, 2);
        assert_eq!(c.hard_state().vote, 2);
        assert_eq!(c.first_index(), 2);
        assert!(c.last_index() >= 6);
        let es = c
            .entries(2, 7, None, GetEntriesContext::empty(false))
            .unwrap();
        let got: Vec<(u64, &[u8])> = es.iter().map(|e| (e.term, &e.data[..])).collect();
        assert_eq!(
            got,
            vec![(1, &b"a"[..]), (1, b"b"), (2, b"x"), (2, b"y"), (2, b"z")]
        );
        assert_eq!(c.snapshot(0, 2).unwrap().data.as_ref(), b"state0");
        // Open played the journal into sled and emptied it.
        assert!(c.journal.is_empty());
        drop(c);
        let again = reopen(crashed.path(), 1).unwrap();
        assert_eq!(again.term(6).unwrap(), 2);
    }

    #[test]
    fn a_failed_sled_write_stops_the_writes_after_it_and_is_reported() {
        let mut w = SledWriter::start(9).unwrap();
        let ran = Arc::new(Mutex::new(Vec::new()));
        for i in 0..3 {
            let ran = ran.clone();
            w.push(
                1,
                Box::new(move || {
                    ran.lock().unwrap().push(i);
                    if i == 1 {
                        return Err(store_err(std::io::Error::other("disk on fire")));
                    }
                    Ok(())
                }),
            );
        }
        assert!(w.check().is_ok(), "nothing handed over yet");
        let err = w.barrier().unwrap_err().to_string();
        assert!(err.contains("disk on fire"), "{err}");
        assert_eq!(*ran.lock().unwrap(), vec![0, 1]);
        assert!(w.check().is_err(), "the failure stays reported");
    }

    #[test]
    fn a_torn_journal_tail_loses_only_the_unsynced_write() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = DiskStorage::open(dir.path(), 1).unwrap();
        s.bootstrap(&[1], vec![]).unwrap();
        s.append(&[entry(2, 1, b"a")]).unwrap();
        s.sync().unwrap();
        let synced = s.journal.len();
        s.append(&[entry(3, 1, b"b")]).unwrap();
        s.sync().unwrap();
        let crashed = files_after_a_crash(dir.path());
        // The second record was being written when the power went: its end is not there.
        use std::os::unix::fs::FileExt;
        let journal = crashed.path().join(super::super::journal::FILE);
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&journal)
            .unwrap();
        f.write_all_at(&[0; 64], super::super::journal::DATA_START + synced + 6)
            .unwrap();
        drop(f);
        let c = DiskStorage::open(crashed.path(), 1).unwrap();
        assert_eq!(c.term(2).unwrap(), 1);
        assert!(c.last_index() >= 2);
    }

    #[test]
    fn a_checkpoint_empties_the_journal_into_sled() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = DiskStorage::open(dir.path(), 1).unwrap();
        s.bootstrap(&[1], vec![]).unwrap();
        let big = vec![7u8; 64 << 10];
        let mut index = 2;
        while s.journal.len() < CHECKPOINT_BYTES - (64 << 10) {
            s.append(&[entry(index, 1, &big)]).unwrap();
            s.sync().unwrap();
            index += 1;
        }
        s.append(&[entry(index, 1, &big)]).unwrap();
        s.sync().unwrap();
        s.append(&[entry(index + 1, 1, &big)]).unwrap();
        s.sync().unwrap();
        assert!(
            s.journal.len() < CHECKPOINT_BYTES / 2,
            "the journal was emptied: {} bytes",
            s.journal.len()
        );
        let crashed = files_after_a_crash(dir.path());
        let c = DiskStorage::open(crashed.path(), 1).unwrap();
        assert_eq!(c.last_index(), index + 1);
        assert_eq!(c.term(2).unwrap(), 1);
    }

    /// Rewrites the stored format version the way another poold would have left it.
    fn set_format(dir: &Path, version: u32) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let db = loop {
            match sled::Config::new().path(dir).open() {
                Ok(db) => break db,
                Err(e) if std::time::Instant::now() < deadline => {
                    assert!(e.to_string().contains("could not acquire lock"), "{e}");
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(e) => panic!("{e}"),
            }
        };
        let meta = db.open_tree("meta").unwrap();
        meta.insert(K_FORMAT, &version.to_be_bytes()).unwrap();
        db.flush().unwrap();
    }

    #[test]
    fn a_version_2_store_opens_and_is_upgraded_and_a_newer_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = DiskStorage::open(dir.path(), 1).unwrap();
            s.bootstrap(&[1], vec![]).unwrap();
            s.append(&[entry(2, 1, b"a")]).unwrap();
            s.sync().unwrap();
        }
        // Version 2 had no journal: what it synced was in sled.
        {
            let s = reopen(dir.path(), 1).unwrap();
            drop(s);
        }
        std::fs::remove_file(dir.path().join(super::super::journal::FILE)).unwrap();
        set_format(dir.path(), 2);
        let s = reopen(dir.path(), 1).unwrap();
        assert_eq!(s.term(2).unwrap(), 1);
        assert_eq!(
            s.meta.get(K_FORMAT).unwrap().unwrap().as_ref(),
            FORMAT_VERSION.to_be_bytes()
        );
        assert!(dir.path().join(super::super::journal::FILE).exists());
        drop(s);
        set_format(dir.path(), FORMAT_VERSION + 1);
        assert!(matches!(
            reopen(dir.path(), 1),
            Err(StorageOpenError::Version { found, .. }) if found == FORMAT_VERSION + 1
        ));
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
    fn compaction_keeps_terms_and_refuses_compacted_reads() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = DiskStorage::open(dir.path(), 1).unwrap();
        s.bootstrap(&[1], vec![]).unwrap();
        let es: Vec<Entry> = (2..=20).map(|i| entry(i, 3, b"e")).collect();
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
    fn a_snapshot_stored_before_the_log_was_cut_is_finished_at_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = DiskStorage::open(dir.path(), 1).unwrap();
            s.bootstrap(&[1, 2], vec![]).unwrap();
            s.append(&[entry(2, 1, b"a"), entry(3, 1, b"b")]).unwrap();
            // The crash window of apply_snapshot: snapshot stored, log and meta untouched.
            let mut meta = SnapshotMetadata::default();
            meta.index = 50;
            meta.term = 4;
            meta.set_conf_state(ConfState::from((vec![1u64, 2], Vec::<u64>::new())));
            s.snap.store(&meta, b"s50", true).unwrap();
            s.sync().unwrap();
        }
        let s = reopen(dir.path(), 1).unwrap();
        assert_eq!(s.first_index(), 51);
        assert_eq!(s.last_index(), 50);
        assert_eq!(s.term(50).unwrap(), 4);
        assert_eq!(s.hard_state().commit, 50);
        assert_eq!(s.snapshot_data().unwrap(), b"s50");
    }

    #[test]
    fn a_snapshot_written_off_thread_is_served_at_once_and_cuts_the_log_when_told() {
        let dir = tempfile::tempdir().unwrap();
        let cs = ConfState::from((vec![1u64, 2], Vec::<u64>::new()));
        {
            let mut s = DiskStorage::open(dir.path(), 1).unwrap();
            s.bootstrap(&[1, 2], b"s1".to_vec()).unwrap();
            let es: Vec<Entry> = (2..=30).map(|i| entry(i, 2, b"e")).collect();
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
        let es: Vec<Entry> = (2..=10).map(|i| entry(i, 1, b"e")).collect();
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
