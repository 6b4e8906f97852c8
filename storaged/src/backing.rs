//! The file or block device a pool lives on: positional I/O, size, durable sync, and
//! giving space back (hole punching on files). Held with an exclusive `flock` for as long
//! as the pool is open, so two processes never open the same pool.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackingKind {
    File,
    BlockDevice,
}

#[derive(Debug, thiserror::Error)]
pub enum BackingError {
    #[error("cannot open {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is in use by another process (it holds the pool's lock)")]
    InUse { path: PathBuf },
    #[error("{path} is not a {expected}")]
    WrongKind {
        path: PathBuf,
        expected: &'static str,
    },
    #[error("{op} on {path} failed")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug)]
pub struct Backing {
    file: File,
    kind: BackingKind,
    path: PathBuf,
}

impl Backing {
    /// Opens (for a file with `create`, creates) the backing and takes its lock.
    pub fn open(path: &Path, kind: BackingKind, create: bool) -> Result<Self, BackingError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(create && kind == BackingKind::File)
            .truncate(false)
            .open(path)
            .map_err(|source| BackingError::Open {
                path: path.to_owned(),
                source,
            })?;
        let file_type = file
            .metadata()
            .map_err(|source| BackingError::Open {
                path: path.to_owned(),
                source,
            })?
            .file_type();
        let ok = match kind {
            BackingKind::File => file_type.is_file(),
            BackingKind::BlockDevice => file_type.is_block_device(),
        };
        if !ok {
            return Err(BackingError::WrongKind {
                path: path.to_owned(),
                expected: match kind {
                    BackingKind::File => "regular file",
                    BackingKind::BlockDevice => "block device",
                },
            });
        }
        // SAFETY: flock on a file descriptor this function owns; no memory is involved.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            return Err(if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                BackingError::InUse {
                    path: path.to_owned(),
                }
            } else {
                BackingError::Io {
                    op: "flock",
                    path: path.to_owned(),
                    source: err,
                }
            });
        }
        Ok(Backing {
            file,
            kind,
            path: path.to_owned(),
        })
    }

    pub fn kind(&self) -> BackingKind {
        self.kind
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io_err(&self, op: &'static str, source: std::io::Error) -> BackingError {
        BackingError::Io {
            op,
            path: self.path.clone(),
            source,
        }
    }

    /// Size in bytes (a file's length or a block device's capacity).
    pub fn size(&self) -> Result<u64, BackingError> {
        match self.kind {
            BackingKind::File => self
                .file
                .metadata()
                .map(|m| m.len())
                .map_err(|e| self.io_err("stat", e)),
            BackingKind::BlockDevice => {
                // BLKGETSIZE64 = _IOR(0x12, 114, u64)
                const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
                let mut size: u64 = 0;
                // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points to a
                // live, aligned u64 on this stack frame.
                let rc = unsafe { libc::ioctl(self.file.as_raw_fd(), BLKGETSIZE64, &mut size) };
                if rc != 0 {
                    return Err(self.io_err("BLKGETSIZE64", std::io::Error::last_os_error()));
                }
                Ok(size)
            }
        }
    }

    /// Grows a file backing to `size` bytes (new bytes read as zeros).
    pub fn grow_file(&self, size: u64) -> Result<(), BackingError> {
        self.file
            .set_len(size)
            .map_err(|e| self.io_err("set_len", e))?;
        self.sync_all()
    }

    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BackingError> {
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| self.io_err("read", e))
    }

    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), BackingError> {
        self.file
            .write_all_at(data, offset)
            .map_err(|e| self.io_err("write", e))
    }

    /// Makes written data durable.
    pub fn sync_data(&self) -> Result<(), BackingError> {
        self.file
            .sync_data()
            .map_err(|e| self.io_err("fdatasync", e))
    }

    pub fn sync_all(&self) -> Result<(), BackingError> {
        self.file.sync_all().map_err(|e| self.io_err("fsync", e))
    }

    /// Deallocates a range so that it reads as zeros. Returns false when the backing
    /// cannot guarantee zeros (block devices: their discard does not promise it).
    pub fn punch(&self, offset: u64, len: u64) -> Result<bool, BackingError> {
        if self.kind != BackingKind::File || len == 0 {
            return Ok(false);
        }
        match iscsi_target::block::punch_hole(&self.file, offset, len) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(false),
            Err(e) => Err(self.io_err("punch hole", e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_is_exclusive_and_punch_zeroes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pool.img");
        let a = Backing::open(&path, BackingKind::File, true).unwrap();
        assert!(matches!(
            Backing::open(&path, BackingKind::File, false),
            Err(BackingError::InUse { .. })
        ));
        a.grow_file(1 << 20).unwrap();
        assert_eq!(a.size().unwrap(), 1 << 20);
        a.write_at(4096, &[0xab; 8192]).unwrap();
        assert!(a.punch(4096, 4096).unwrap());
        let mut buf = [0xffu8; 8192];
        a.read_at(4096, &mut buf).unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 0));
        assert!(buf[4096..].iter().all(|&b| b == 0xab));
        drop(a);
        Backing::open(&path, BackingKind::File, false).unwrap();
        assert!(matches!(
            Backing::open(&path, BackingKind::BlockDevice, false),
            Err(BackingError::WrongKind { .. }) | Err(BackingError::InUse { .. })
        ));
    }
}
