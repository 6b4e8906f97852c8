//! VM backups: a chain of points in a directory, the first full and each later one the
//! chunks changed since the one before, as the thin pool reports them (DESIGN.md, "VM
//! backups"). Both `poolctl vm-backup` and the coordinator's backup schedules write them.
//!
//! # Layout
//! - `format.rs`: the directory's files, the chain, digests, a disk at a point.
//! - `write.rs`: the next point, from a VM snapshot, through a [`write::Pool`].
//! - `prune.rs`: dropping points a retention no longer keeps.

use std::path::Path;

use anyhow::{Context, bail};

pub mod format;
pub mod prune;
pub mod write;

pub use prune::{Pruned, prune, prune_waiting};

/// One writer at a time in a backup directory: two backups would write the same next
/// point, and a prune rewrites manifests a backup reads. The lock goes with the file.
pub fn lock(root: &Path) -> anyhow::Result<std::fs::File> {
    match try_lock(root)? {
        Some(f) => Ok(f),
        None => bail!(
            "another vm-backup or vm-backup-prune is writing into {}",
            root.display()
        ),
    }
}

/// [`lock`], waiting up to `limit` for a writer that holds it to finish (a coordinator
/// member's backup that outlived its leadership, say).
pub fn lock_waiting(root: &Path, limit: std::time::Duration) -> anyhow::Result<std::fs::File> {
    let end = std::time::Instant::now() + limit;
    loop {
        if let Some(f) = try_lock(root)? {
            return Ok(f);
        }
        if std::time::Instant::now() >= end {
            bail!(
                "another backup kept {} locked for {} s",
                root.display(),
                limit.as_secs()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
}

fn try_lock(root: &Path) -> anyhow::Result<Option<std::fs::File>> {
    let path = root.join(format::LOCK_FILE);
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    match f.try_lock() {
        Ok(()) => Ok(Some(f)),
        Err(std::fs::TryLockError::WouldBlock) => Ok(None),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("locking {}", path.display()))
        }
    }
}

/// Writes `data` to `path` and syncs it.
pub fn write_synced(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    let mut f =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.write_all(data)?;
    f.sync_all()?;
    Ok(())
}

/// Syncs a directory, so that what was created, renamed or removed in it stays so.
pub fn sync_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", dir.display()))
}

#[cfg(test)]
mod tests {
    #[test]
    fn one_writer_at_a_time_in_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        let held = super::lock(dir.path()).unwrap();
        let err = super::lock(dir.path()).unwrap_err().to_string();
        assert!(err.contains("another vm-backup"), "{err}");
        drop(held);
        super::lock(dir.path()).unwrap();
    }

    #[test]
    fn a_waiting_writer_gets_the_lock_once_the_holder_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let held = super::lock(dir.path()).unwrap();
        let short = std::time::Duration::from_millis(600);
        let err = super::lock_waiting(dir.path(), short)
            .unwrap_err()
            .to_string();
        assert!(err.contains("kept"), "{err}");
        let t = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(300));
            drop(held);
        });
        super::lock_waiting(dir.path(), std::time::Duration::from_secs(10)).unwrap();
        t.join().unwrap();
    }
}
