//! Where a virtio-blk disk's bytes live: a narrow trait the device calls, and the local
//! raw-file backend. The iSCSI backend (one `iscsi-initiator` session per disk) plugs in
//! behind the same trait.
//!
//! # Why blocking, and `Sync`
//!
//! The device's queue worker is a plain thread woken by an eventfd, not an async task, and
//! the data moves through a bounce buffer it owns (guest memory is never handed out as a
//! `&mut [u8]`: the guest may change it under us). A blocking `read_at`/`write_at` on
//! `&self` keeps the file backend a `pread`/`pwrite`, keeps tests simple, and lets
//! concurrency come from the caller: several worker threads may call one backend at once,
//! which is how an iSCSI session pipelines commands (it tags each command and matches
//! responses, so `&self` calls from many threads are its natural interface). An async
//! initiator can be adapted with a runtime handle's `block_on` per call.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use vmm_sys_util::fallocate::FallocateMode;

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("{op} at byte {offset} ({len} bytes) failed")]
    Io {
        op: &'static str,
        offset: u64,
        len: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("{op} is not supported by this backend")]
    Unsupported { op: &'static str },
}

/// Called once with the outcome of an operation started through [`AsyncBlockIo`], from
/// whatever thread finished it.
pub type Done<T> = Box<dyn FnOnce(Result<T, BackendError>) + Send>;

/// Optional non-blocking face of a backend whose I/O completes elsewhere (an iSCSI
/// session's own runtime): the device starts each read, write or flush and goes on with
/// the next request; the completion runs on the backend's thread. Many operations may be
/// in flight at once, and they complete in any order.
pub trait AsyncBlockIo: Send + Sync {
    fn read(&self, offset: u64, len: usize, done: Done<Vec<u8>>);
    fn write(&self, offset: u64, data: Vec<u8>, done: Done<()>);
    fn flush(&self, done: Done<()>);

    /// The runtime the I/O completes on, when the device should serve its queue there
    /// too: a kick is then taken by the thread that starts the I/O and later completes
    /// it, with no hand-over between threads in the way of each request.
    fn runtime(&self) -> Option<tokio::runtime::Handle> {
        None
    }
}

/// A disk's storage. Offsets and lengths are in bytes; the device has already checked
/// that every access lies within `size()`.
pub trait BlockBackend: Send + Sync {
    /// Size in bytes (a multiple of the block size).
    fn size(&self) -> u64;

    /// The smallest unit the storage reads and writes (512 or 4096); the device refuses
    /// requests not aligned to it.
    fn block_size(&self) -> u32 {
        512
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BackendError>;
    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<(), BackendError>;
    /// Makes every completed write durable.
    fn flush(&self) -> Result<(), BackendError>;

    /// Whether `discard` does anything; the device offers the feature only then.
    fn supports_discard(&self) -> bool {
        false
    }

    /// Tells the storage the range is no longer needed; its contents become undefined.
    fn discard(&self, _offset: u64, _len: u64) -> Result<(), BackendError> {
        Err(BackendError::Unsupported { op: "discard" })
    }

    /// Makes the range read back as zeros. By default, by writing zeros.
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        zero_fill(self, offset, len)
    }

    /// For logs and errors: what this backend is ("file /var/lib/x.img", "iscsi ...").
    fn describe(&self) -> String;

    /// The non-blocking face, for backends that have one.
    fn async_io(&self) -> Option<&dyn AsyncBlockIo> {
        None
    }
}

/// Writes zeros over a range, a megabyte at a time.
pub fn zero_fill<B: BlockBackend + ?Sized>(
    b: &B,
    offset: u64,
    len: u64,
) -> Result<(), BackendError> {
    const CHUNK: u64 = 1 << 20;
    let zeros = vec![0u8; CHUNK.min(len) as usize];
    let mut at = offset;
    while at < offset + len {
        let n = CHUNK.min(offset + len - at);
        b.write_at(at, &zeros[..n as usize])?;
        at += n;
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot open disk image {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("disk image {path} is {size} bytes, not a whole number of 512-byte sectors")]
    NotSectorAligned { path: PathBuf, size: u64 },
    #[error("disk image {path} is empty")]
    Empty { path: PathBuf },
}

/// A raw image file (or block device) on the host.
pub struct FileBackend {
    file: File,
    path: PathBuf,
    size: u64,
    read_only: bool,
}

impl FileBackend {
    pub fn open(path: &Path, read_only: bool) -> Result<Self, OpenError> {
        let open_err = |source| OpenError::Open {
            path: path.to_owned(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(open_err)?;
        // A block device reports size 0 in its metadata; seeking to the end works for both.
        let size = {
            use std::io::{Seek, SeekFrom};
            (&file).seek(SeekFrom::End(0)).map_err(open_err)?
        };
        if size == 0 {
            return Err(OpenError::Empty {
                path: path.to_owned(),
            });
        }
        if !size.is_multiple_of(512) {
            return Err(OpenError::NotSectorAligned {
                path: path.to_owned(),
                size,
            });
        }
        Ok(Self {
            file,
            path: path.to_owned(),
            size,
            read_only,
        })
    }

    /// `fallocate` keeping the file's size; a range past `off64_t` is EINVAL.
    fn fallocate(&self, mode: FallocateMode, offset: u64, len: u64) -> std::io::Result<()> {
        vmm_sys_util::fallocate::fallocate(&self.file, mode, true, offset, len)
            .map_err(std::io::Error::from)
    }
}

impl BlockBackend for FileBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        self.file
            .read_exact_at(buf, offset)
            .map_err(|source| BackendError::Io {
                op: "read",
                offset,
                len: buf.len() as u64,
                source,
            })
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<(), BackendError> {
        self.file
            .write_all_at(buf, offset)
            .map_err(|source| BackendError::Io {
                op: "write",
                offset,
                len: buf.len() as u64,
                source,
            })
    }

    fn flush(&self) -> Result<(), BackendError> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync_data().map_err(|source| BackendError::Io {
            op: "flush",
            offset: 0,
            len: 0,
            source,
        })
    }

    fn supports_discard(&self) -> bool {
        !self.read_only
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        self.fallocate(FallocateMode::PunchHole, offset, len)
            .map_err(|source| BackendError::Io {
                op: "discard",
                offset,
                len,
                source,
            })
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        match self.fallocate(FallocateMode::ZeroRange, offset, len) {
            Ok(()) => Ok(()),
            // Filesystems and devices without ZERO_RANGE: write the zeros.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EOPNOTSUPP | libc::ENODEV | libc::EINVAL)
                ) =>
            {
                zero_fill(self, offset, len)
            }
            Err(source) => Err(BackendError::Io {
                op: "write-zeroes",
                offset,
                len,
                source,
            }),
        }
    }

    fn describe(&self) -> String {
        format!("file {}", self.path.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(len: u64) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(len).unwrap();
        f
    }

    #[test]
    fn reads_what_it_wrote_and_zeroes_and_discards_ranges() {
        let img = image(1 << 20);
        let b = FileBackend::open(img.path(), false).unwrap();
        assert_eq!(b.size(), 1 << 20);
        b.write_at(4096, &[0xab; 8192]).unwrap();
        b.flush().unwrap();
        let mut buf = [0u8; 8192];
        b.read_at(4096, &mut buf).unwrap();
        assert!(buf.iter().all(|&x| x == 0xab));
        b.write_zeroes(4096, 4096).unwrap();
        b.read_at(4096, &mut buf).unwrap();
        assert!(buf[..4096].iter().all(|&x| x == 0));
        assert!(buf[4096..].iter().all(|&x| x == 0xab));
        assert!(b.supports_discard());
        b.discard(8192, 4096).unwrap();
        b.read_at(8192, &mut buf[..4096]).unwrap();
        assert!(
            buf[..4096].iter().all(|&x| x == 0),
            "punched hole reads zeros"
        );
        assert_eq!(std::fs::metadata(img.path()).unwrap().len(), 1 << 20);
    }

    #[test]
    fn read_only_backend_cannot_write() {
        let img = image(4096);
        let b = FileBackend::open(img.path(), true).unwrap();
        assert!(b.write_at(0, &[1; 512]).is_err());
        assert!(!b.supports_discard());
        b.flush().unwrap();
    }

    #[test]
    fn bad_images_are_refused_with_the_path() {
        let missing = FileBackend::open(Path::new("/nonexistent/disk.img"), false);
        assert!(matches!(missing, Err(OpenError::Open { .. })));
        assert!(
            missing
                .err()
                .unwrap()
                .to_string()
                .contains("/nonexistent/disk.img")
        );
        let odd = image(1000);
        assert!(matches!(
            FileBackend::open(odd.path(), false),
            Err(OpenError::NotSectorAligned { size: 1000, .. })
        ));
        let empty = image(0);
        assert!(matches!(
            FileBackend::open(empty.path(), false),
            Err(OpenError::Empty { .. })
        ));
    }
}
