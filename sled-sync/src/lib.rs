//! A durable flush for sled 0.34.
//!
//! `sled::Db::flush` alone does not make writes durable (spacejam/sled#1452): it writes
//! sled's log file with `sync_file_range`, which neither flushes the drive's volatile write
//! cache nor persists the file's size, and it writes a page too large for its log (above
//! a quarter of its 512 KiB segment: a big value, or a tree node holding some) to a file
//! of its own under `blobs/` that it never syncs. [`SyncedDb::flush`] adds an fsync of each
//! blob file not synced yet and of their directory, and an fdatasync of the log file after
//! sled's flush, as etcd does for its WAL. poold (the Raft log) and storaged (pool
//! metadata) acknowledge a write only after it returns.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The file in a sled 0.34 directory that holds its log (every tree's pages).
pub const LOG_FILE: &str = "db";
/// The directory in which sled 0.34 keeps pages too large for its log.
pub const BLOB_DIR: &str = "blobs";

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("sled flush failed")]
    Flush(#[source] sled::Error),
    #[error("cannot {what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A sled database opened on `dir`, with what it takes to make its flush durable.
pub struct SyncedDb {
    db: sled::Db,
    dir: PathBuf,
    log_path: PathBuf,
    blob_dir: PathBuf,
    log_file: File,
    /// Blob files already fsynced; sled deletes them once it no longer needs them.
    blobs_synced: Mutex<HashSet<OsString>>,
}

impl std::fmt::Debug for SyncedDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncedDb").field("dir", &self.dir).finish()
    }
}

/// The error for an I/O call on `path`; the path is copied only when there is one.
fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> SyncError + 'a {
    move |source| SyncError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

impl SyncedDb {
    /// Takes `db`, which sled opened on `dir`.
    pub fn new(db: sled::Db, dir: &Path) -> Result<Self, SyncError> {
        let log_path = dir.join(LOG_FILE);
        let log_file = File::open(&log_path).map_err(io_err("open sled's log file", &log_path))?;
        // The directory entries sled created at its first open.
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err("fsync", dir))?;
        Ok(SyncedDb {
            db,
            dir: dir.to_owned(),
            log_path,
            blob_dir: dir.join(BLOB_DIR),
            log_file,
            blobs_synced: Mutex::new(HashSet::new()),
        })
    }

    pub fn db(&self) -> &sled::Db {
        &self.db
    }

    /// Makes every write so far durable.
    pub fn flush(&self) -> Result<(), SyncError> {
        // sled writes a blob file before the log record that points at it, and our flush
        // is what usually writes that record out: syncing the blobs first keeps a power
        // cut from leaving a durable pointer to a blob still in the page cache. The second
        // pass takes blobs sled wrote while flushing.
        self.sync_new_blobs()?;
        self.db.flush().map_err(SyncError::Flush)?;
        self.sync_new_blobs()?;
        self.log_file
            .sync_data()
            .map_err(io_err("fdatasync", &self.log_path))
    }

    /// Fsyncs the blob files not synced before, then their directory. Listing the
    /// directory on every flush is cheap (it holds a file or two) and also catches the
    /// blobs sled writes on its own when it rewrites a page.
    fn sync_new_blobs(&self) -> Result<(), SyncError> {
        let dir = &self.blob_dir;
        // Held across the listing too: with flushes from two threads (poold's Raft thread
        // and its snapshot writer), an older listing must not replace a newer one's set.
        let mut synced = self.blobs_synced.lock().unwrap_or_else(|p| p.into_inner());
        let listing = match std::fs::read_dir(dir) {
            Ok(l) => l,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_err("list", dir)(e)),
        };
        let mut present = HashSet::new();
        let mut new = false;
        for e in listing {
            let name = e.map_err(io_err("list", dir))?.file_name();
            if !synced.contains(&name) {
                let path = dir.join(&name);
                match File::open(&path) {
                    Ok(f) => f.sync_all().map_err(io_err("fsync", &path))?,
                    // sled dropped a blob it no longer needs while we listed them.
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(io_err("open", &path)(e)),
                }
                new = true;
            }
            present.insert(name);
        }
        *synced = present;
        if new {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io_err("fsync", dir))?;
        }
        Ok(())
    }

    /// The blob files synced and still present, for tests.
    pub fn blobs_synced(&self) -> HashSet<OsString> {
        self.blobs_synced
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The log file this flush fdatasyncs, for tests.
    pub fn log_file(&self) -> &File {
        &self.log_file
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn open(dir: &Path) -> SyncedDb {
        let db = sled::Config::new()
            .path(dir)
            .flush_every_ms(None)
            .open()
            .unwrap();
        SyncedDb::new(db, dir).unwrap()
    }

    /// The flush must reach what sled actually wrote: the log file it appends to (the same
    /// inode, growing with small records) and every blob file (a large value is one).
    #[test]
    fn flush_covers_sleds_log_file_and_blob_files() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        let held = s.log_file().metadata().unwrap();
        let on_disk = std::fs::metadata(dir.path().join(LOG_FILE)).unwrap();
        assert_eq!((held.dev(), held.ino()), (on_disk.dev(), on_disk.ino()));
        for i in 0u32..2048 {
            s.db().insert(i.to_be_bytes(), vec![7u8; 1024]).unwrap();
            if i % 64 == 63 {
                s.flush().unwrap();
            }
        }
        let grown = s.log_file().metadata().unwrap().len();
        assert!(
            grown >= held.len() + 2 * 1024 * 1024,
            "the held log file did not take the 2 MiB written: {} -> {grown}",
            held.len()
        );
        assert!(s.blobs_synced().is_empty());
        s.db().insert("big", vec![9u8; 1 << 20]).unwrap();
        s.flush().unwrap();
        let blobs: HashSet<_> = std::fs::read_dir(dir.path().join(BLOB_DIR))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(!blobs.is_empty(), "a 1 MiB value should be a blob file");
        assert_eq!(s.blobs_synced(), blobs);
    }

    #[test]
    fn a_directory_without_sleds_log_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(other.path()).open().unwrap();
        let e = SyncedDb::new(db, dir.path()).unwrap_err();
        assert!(e.to_string().contains("sled's log file"), "{e}");
    }
}
