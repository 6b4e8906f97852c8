//! Fixtures shared by the store's unit tests.

use raft::eraftpb::Entry;
use std::path::Path;

use super::{DiskStorage, StorageOpenError};

/// Opens a store this process had open a moment ago. sled lets go of its lock on the
/// directory only when its I/O threads drop their last references to the closed
/// database, which can be just after the drop returns (a restarted poold is a new
/// process and never waits: the kernel releases the lock at exit).
pub(super) fn reopen(dir: &Path, id: u64) -> Result<DiskStorage, StorageOpenError> {
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

pub(super) fn entry(index: u64, term: u64, data: &[u8]) -> Entry {
    let mut e = Entry::default();
    e.index = index;
    e.term = term;
    e.data = data.to_vec().into();
    e
}

/// What a crash of the process leaves: the directory's files as they are while the store
/// is open. Between checkpoints sled is not flushed, so what was synced since the last
/// one is in the WAL alone.
pub(super) fn files_after_a_crash(dir: &Path) -> tempfile::TempDir {
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
