//! Opening a member's store: creating it, checking the format version and the member it
//! belongs to, upgrading an older version, playing the WAL back into sled and repairing
//! what a crash left; and bootstrapping a new group.

use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::codec::{
    K_FORMAT, K_HARD, K_MEMBER, K_SNAPMETA, K_TRUNC, be_u64, decode_group, parse_trunc, trunc_bytes,
};
use super::sled_writer::SledWriter;
use super::snapshot::SnapTree;
use super::{DiskStorage, StoreError, write_from};
use crate::consensus::wal::{Record, Wal, WalError};

/// The layout written by this code; a directory of another version is refused.
pub const FORMAT_VERSION: u32 = 3;
/// Versions this code reads (version 2 had no WAL; opening one upgrades it).
pub const FORMAT_VERSIONS_ACCEPTED: std::ops::RangeInclusive<u32> = 2..=3;

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
    Corrupt { path: PathBuf, what: &'static str },
    #[error("Raft store I/O failed")]
    Io(#[source] sled::Error),
    #[error("cannot start the Raft store's sled writer thread")]
    Thread(#[source] std::io::Error),
    #[error("cannot read the Raft WAL in {path}")]
    Wal {
        path: PathBuf,
        #[source]
        source: WalError,
    },
    #[error("cannot play the Raft WAL in {path} back into the log")]
    Replay {
        path: PathBuf,
        #[source]
        source: StoreError,
    },
    #[error("cannot make the Raft store in {path} durable")]
    Sync {
        path: PathBuf,
        #[source]
        source: sled_sync::SyncError,
    },
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
        let sync_err = |source| StorageOpenError::Sync {
            path: path.clone(),
            source,
        };
        let db = sled_sync::SyncedDb::new(db, dir).map_err(sync_err)?;
        let io = StorageOpenError::Io;
        let log = db.db().open_tree("log").map_err(io)?;
        let meta = db.db().open_tree("meta").map_err(io)?;
        let snap_tree = db.db().open_tree("snap").map_err(io)?;
        let corrupt = |what: &'static str| StorageOpenError::Corrupt {
            path: path.clone(),
            what,
        };
        check_identity(&meta, &path, member_id)?;
        // What the WAL holds since the last checkpoint goes back into sled first, then
        // sled is made durable and the WAL emptied: from here on the trees are whole.
        let wal = play_back_wal(dir, member_id, &log, &meta)?;
        db.flush().map_err(sync_err)?;
        let mut wal = wal;
        wal.reset().map_err(|source| StorageOpenError::Wal {
            path: path.clone(),
            source,
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
            Some(v) => parse_trunc(&v).ok_or_else(|| corrupt("truncation record"))?,
            None => (0, 0),
        };
        let mut entries = load_log(&log, trunc, &path)?;
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
        db.flush().map_err(sync_err)?;
        let writer = SledWriter::start(member_id).map_err(StorageOpenError::Thread)?;
        Ok(DiskStorage {
            db: Arc::new(db),
            wal,
            log,
            meta,
            writer,
            snap: Arc::new(SnapTree::new(snap_tree, snap_meta.clone())),
            path,
            hard,
            snap_meta,
            trunc,
            last_index,
            entries,
            snapshot_wanted: std::cell::Cell::new(false),
        })
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
}

/// Refuses a directory of a format version this code does not read, or of another member;
/// marks it with this member and the current version (which upgrades an older one: from
/// here on the directory may hold a WAL, which an older poold would ignore).
fn check_identity(meta: &sled::Tree, path: &Path, member_id: u64) -> Result<(), StorageOpenError> {
    let io = StorageOpenError::Io;
    let corrupt = |what| StorageOpenError::Corrupt {
        path: path.to_owned(),
        what,
    };
    if let Some(v) = meta.get(K_FORMAT).map_err(io)? {
        let found = u32::from_be_bytes(
            v.as_ref()
                .try_into()
                .map_err(|_| corrupt("format version"))?,
        );
        if !FORMAT_VERSIONS_ACCEPTED.contains(&found) {
            return Err(StorageOpenError::Version {
                path: path.to_owned(),
                found,
                accepted: FORMAT_VERSIONS_ACCEPTED,
            });
        }
    }
    meta.insert(K_FORMAT, &FORMAT_VERSION.to_be_bytes())
        .map_err(io)?;
    match meta.get(K_MEMBER).map_err(io)? {
        Some(v) => {
            let found = be_u64(&v).ok_or_else(|| corrupt("member id"))?;
            if found != member_id {
                return Err(StorageOpenError::WrongMember {
                    path: path.to_owned(),
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
    Ok(())
}

/// Opens the WAL (starting its syncer thread, `raft-<member_id>-wal`) and writes the
/// records it holds since the last checkpoint into sled, in order. Not yet durable.
fn play_back_wal(
    dir: &Path,
    member_id: u64,
    log: &sled::Tree,
    meta: &sled::Tree,
) -> Result<Wal, StorageOpenError> {
    let path = dir.to_owned();
    let corrupt = |what| StorageOpenError::Corrupt {
        path: path.clone(),
        what,
    };
    let (wal, records) = Wal::open(dir, &format!("raft-{member_id}-wal")).map_err(|source| {
        StorageOpenError::Wal {
            path: path.clone(),
            source,
        }
    })?;
    let replayed = records.len();
    for r in records {
        match r {
            Record::Entries(record) => {
                let first = decode_group(&record)
                    .ok_or_else(|| corrupt("WAL log record"))?
                    .first()
                    .map(|e| e.index);
                if let Some(first) = first {
                    write_from(log, first, record).map_err(|source| StorageOpenError::Replay {
                        path: path.clone(),
                        source,
                    })?;
                }
            }
            Record::HardState(hs) => {
                HardState::parse_from_bytes(&hs).map_err(|_| corrupt("WAL hard state"))?;
                meta.insert(K_HARD, hs).map_err(StorageOpenError::Io)?;
            }
        }
    }
    if replayed > 0 {
        tracing::info!(records = replayed, "replayed the Raft WAL");
    }
    Ok(wal)
}

/// The log after the truncation point `trunc`. Records wholly at or below it are garbage
/// a crash left behind (the cut is not in the WAL): they are removed.
fn load_log(
    log: &sled::Tree,
    trunc: (u64, u64),
    path: &Path,
) -> Result<VecDeque<Entry>, StorageOpenError> {
    let io = StorageOpenError::Io;
    let corrupt = |what| StorageOpenError::Corrupt {
        path: path.to_owned(),
        what,
    };
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
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::super::test_utils::{entry, files_after_a_crash, reopen};
    use super::*;
    use crate::consensus::wal;
    use raft::{GetEntriesContext, Storage as _};

    #[test]
    fn what_was_synced_survives_a_crash_through_the_wal() {
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
        assert!(!s.wal.is_empty(), "synced writes wait in the WAL");
        // Written but never synced: may be lost, must not damage what was synced.
        s.append(&[entry(7, 2, b"unsynced")]).unwrap();
        // sled has not been handed these writes yet: what brings them back is the WAL.
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
        // Open played the WAL into sled and emptied it.
        assert!(c.wal.is_empty());
        drop(c);
        let again = reopen(crashed.path(), 1).unwrap();
        assert_eq!(again.term(6).unwrap(), 2);
    }

    #[test]
    fn a_torn_wal_tail_loses_only_the_unsynced_write() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = DiskStorage::open(dir.path(), 1).unwrap();
        s.bootstrap(&[1], vec![]).unwrap();
        s.append(&[entry(2, 1, b"a")]).unwrap();
        s.sync().unwrap();
        let synced = s.wal.len();
        s.append(&[entry(3, 1, b"b")]).unwrap();
        s.sync().unwrap();
        let crashed = files_after_a_crash(dir.path());
        // The second record was being written when the power went: its end is not there.
        use std::os::unix::fs::FileExt;
        let wal_file = crashed.path().join(wal::FILE);
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&wal_file)
            .unwrap();
        f.write_all_at(&[0; 64], wal::DATA_START + synced + 6)
            .unwrap();
        drop(f);
        let c = DiskStorage::open(crashed.path(), 1).unwrap();
        assert_eq!(c.term(2).unwrap(), 1);
        assert!(c.last_index() >= 2);
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
        // Version 2 had no WAL: what it synced was in sled.
        {
            let s = reopen(dir.path(), 1).unwrap();
            drop(s);
        }
        std::fs::remove_file(dir.path().join(wal::FILE)).unwrap();
        set_format(dir.path(), 2);
        let s = reopen(dir.path(), 1).unwrap();
        assert_eq!(s.term(2).unwrap(), 1);
        assert_eq!(
            s.meta.get(K_FORMAT).unwrap().unwrap().as_ref(),
            FORMAT_VERSION.to_be_bytes()
        );
        assert!(dir.path().join(wal::FILE).exists());
        drop(s);
        set_format(dir.path(), FORMAT_VERSION + 1);
        assert!(matches!(
            reopen(dir.path(), 1),
            Err(StorageOpenError::Version { found, .. }) if found == FORMAT_VERSION + 1
        ));
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
}
