//! The narrow trait between the target and whatever stores the LUN's blocks.
//!
//! Methods block (thin volumes and files do blocking I/O); the target calls them from
//! blocking threads, never from the async reactor. Offsets and lengths are in bytes and
//! are multiples of [`BlockDevice::block_size`]; the target checks ranges before calling,
//! and implementations check them again and answer [`BlockError::OutOfRange`].

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// What went wrong on the device; the target turns each into SCSI sense data.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// → ILLEGAL REQUEST, LOGICAL BLOCK ADDRESS OUT OF RANGE.
    #[error("range out of bounds: offset {offset}, length {len}, device size {size}")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    /// → ILLEGAL REQUEST, INVALID FIELD IN CDB.
    #[error("offset {offset} or length {len} is not a multiple of the block size {block_size}")]
    Misaligned {
        offset: u64,
        len: u64,
        block_size: u32,
    },
    /// A thin pool is out of chunks → DATA PROTECT, SPACE ALLOCATION FAILED WRITE PROTECT.
    #[error("no free space in the thin pool")]
    NoSpace,
    /// → DATA PROTECT, WRITE PROTECTED.
    #[error("the device is read-only")]
    ReadOnly,
    /// COMPARE AND WRITE found other data → MISCOMPARE, with the first differing byte.
    #[error("compare failed at byte {offset}")]
    Miscompare { offset: u64 },
    /// → MEDIUM ERROR (reads) or HARDWARE ERROR.
    #[error("I/O error")]
    Io(#[source] std::io::Error),
}

/// How the LUN's space is provisioned, for READ CAPACITY(16) and VPD page 0xB2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Provisioning {
    /// Logical block provisioning management: UNMAP frees space.
    pub thin: bool,
    /// Unmapped blocks read back as zeros.
    pub reads_zero_after_unmap: bool,
    /// Granularity of unmap in bytes (the thin pool's chunk size); 0 when not thin.
    pub unmap_granularity: u64,
}

/// A range of the device and whether it holds data of its own, for GET LBA STATUS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
    pub mapped: bool,
}

/// A LUN's storage. Required: size, block size, read, write, flush. The rest have provided
/// implementations that are correct for any device and that thin volumes override.
pub trait BlockDevice: Send + Sync {
    /// Bytes per logical block (512 or 4096).
    fn block_size(&self) -> u32;
    /// Size of the device in bytes, a multiple of the block size.
    fn size(&self) -> u64;
    /// Fills `buf` from `offset`.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError>;
    /// Writes `data` at `offset`. Durable only after [`BlockDevice::flush`].
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), BlockError>;
    /// Makes every write acknowledged before this call durable.
    fn flush(&self) -> Result<(), BlockError>;

    fn read_only(&self) -> bool {
        false
    }

    /// Bytes per physical block: the unit below which writes cost a read-modify-write.
    /// Reported in READ CAPACITY(16) so initiators align to it.
    fn physical_block_size(&self) -> u32 {
        self.block_size()
    }

    fn provisioning(&self) -> Provisioning {
        Provisioning {
            thin: false,
            reads_zero_after_unmap: false,
            unmap_granularity: 0,
        }
    }

    /// Tells the device the range's data is no longer needed. A thick device may ignore it;
    /// a thin device frees whole chunks. Afterwards the range reads as zeros only when
    /// `provisioning().reads_zero_after_unmap`.
    fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        check_range(self, offset, len)
    }

    /// Makes the range read as zeros; with `unmap`, the device may free the space instead.
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<(), BlockError> {
        let _ = unmap;
        check_range(self, offset, len)?;
        write_zeros(self, offset, len)
    }

    /// Writes `new` at `offset` if the device holds `expected` there. Atomic with respect to
    /// other writes only when the caller serialises writes to the range, as the target does.
    fn compare_and_write(
        &self,
        offset: u64,
        expected: &[u8],
        new: &[u8],
    ) -> Result<(), BlockError> {
        if expected.len() != new.len() {
            return Err(BlockError::Misaligned {
                offset,
                len: new.len() as u64,
                block_size: self.block_size(),
            });
        }
        let mut current = vec![0u8; expected.len()];
        self.read_at(offset, &mut current)?;
        if let Some(i) = current.iter().zip(expected).position(|(a, b)| a != b) {
            return Err(BlockError::Miscompare {
                offset: offset + i as u64,
            });
        }
        self.write_at(offset, new)
    }

    /// Which parts of the range hold data. Thick devices: all of it.
    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>, BlockError> {
        check_range(self, offset, len)?;
        Ok(vec![Extent {
            offset,
            len,
            mapped: true,
        }])
    }

    /// Makes `len` bytes at `dst_offset` of this device hold what `src` holds at
    /// `src_offset`, without moving the data through the caller when the two devices can
    /// share it (chunks of one thin pool, extents of one file system). `Ok(false)` means
    /// "not supported for this pair": the caller copies the data itself (EXTENDED COPY
    /// does). Ranges are checked by the caller and block-aligned.
    fn clone_range_from(
        &self,
        src: &dyn BlockDevice,
        src_offset: u64,
        dst_offset: u64,
        len: u64,
    ) -> Result<bool, BlockError> {
        let _ = (src, src_offset, dst_offset, len);
        Ok(false)
    }

    /// The concrete device, so [`BlockDevice::clone_range_from`] can recognise a source of
    /// its own kind. Implementations that share data override this to return `Some(self)`.
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        None
    }
}

/// `n` zero bytes starting on a page boundary, held in `buf`. A `pwrite` the kernel cuts
/// short stops where copying from the source had to fault a page in (a SIGKILL landing
/// then ends the call there): from a page-aligned source that is a block boundary on the
/// device, so an interrupted zeroing leaves no block half old, half zero, as it could from
/// a heap buffer (16-byte aligned, its fresh pages unmapped until the copy faults on them).
pub fn page_aligned_zeros(buf: &mut Vec<u8>, n: usize) -> &[u8] {
    const PAGE: usize = 4096;
    *buf = vec![0u8; n + PAGE];
    let start = buf.as_ptr().align_offset(PAGE);
    &buf[start..start + n]
}

/// Writes zeros over the range, from [`page_aligned_zeros`].
fn write_zeros<D: BlockDevice + ?Sized>(dev: &D, offset: u64, len: u64) -> Result<(), BlockError> {
    let mut buf = Vec::new();
    let zeros = page_aligned_zeros(&mut buf, len.min(1 << 20) as usize);
    let mut done = 0;
    while done < len {
        let n = (len - done).min(zeros.len() as u64);
        dev.write_at(offset + done, &zeros[..n as usize])?;
        done += n;
    }
    Ok(())
}

/// Checks that `offset..offset+len` is block-aligned and inside the device.
pub fn check_range<D: BlockDevice + ?Sized>(
    dev: &D,
    offset: u64,
    len: u64,
) -> Result<(), BlockError> {
    let block_size = dev.block_size();
    let bs = u64::from(block_size);
    if !offset.is_multiple_of(bs) || !len.is_multiple_of(bs) {
        return Err(BlockError::Misaligned {
            offset,
            len,
            block_size,
        });
    }
    let size = dev.size();
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(BlockError::OutOfRange { offset, len, size }),
    }
}

/// A LUN backed by a plain file (tests and quick labs). Thin when the file system can
/// punch holes: discard deallocates, and GET LBA STATUS reports holes as unmapped.
#[derive(Debug)]
pub struct FileBlockDevice {
    file: File,
    size: u64,
    block_size: u32,
    read_only: bool,
    /// Punching holes works here (checked once at open).
    thin: bool,
}

impl FileBlockDevice {
    /// Opens `path`, creating or growing it to `size` bytes when `size` is given.
    pub fn open(
        path: &Path,
        size: Option<u64>,
        block_size: u32,
        read_only: bool,
    ) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .create(size.is_some() && !read_only)
            .truncate(false)
            .open(path)?;
        if let Some(size) = size
            && file.metadata()?.len() < size
        {
            file.set_len(size)?;
        }
        let len = file.metadata()?.len();
        let size = len - len % u64::from(block_size);
        // Punching a hole past the end (the size is kept) changes nothing and tells
        // whether the file system supports it.
        let thin = !read_only && punch_hole(&file, len, 1).is_ok();
        Ok(Self {
            file,
            size,
            block_size,
            read_only,
            thin,
        })
    }
}

/// Deallocates a byte range of a file, keeping its size, so that it reads as zeros. A
/// range past `off_t` is `InvalidInput`; a file system without hole punching answers
/// `EOPNOTSUPP`. The one fallocate call of the thin pool and of file-backed LUNs.
pub fn punch_hole(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let (Ok(off), Ok(n)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(std::io::ErrorKind::InvalidInput.into());
    };
    // SAFETY: fallocate only reads its integer arguments; the descriptor is owned by
    // `file`, which outlives the call.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            n,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// `lseek` with SEEK_DATA or SEEK_HOLE; `None` past the last data (ENXIO).
fn seek(file: &File, offset: u64, whence: libc::c_int) -> std::io::Result<Option<u64>> {
    use std::os::fd::AsRawFd;
    let Ok(off) = libc::off_t::try_from(offset) else {
        return Err(std::io::ErrorKind::InvalidInput.into());
    };
    // SAFETY: lseek only reads its integer arguments; the descriptor is owned by `file`.
    let rc = unsafe { libc::lseek(file.as_raw_fd(), off, whence) };
    if rc >= 0 {
        return Ok(Some(rc as u64));
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ENXIO) {
        Ok(None)
    } else {
        Err(e)
    }
}

impl BlockDevice for FileBlockDevice {
    fn block_size(&self) -> u32 {
        self.block_size
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        check_range(self, offset, buf.len() as u64)?;
        self.file.read_exact_at(buf, offset).map_err(BlockError::Io)
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), BlockError> {
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        check_range(self, offset, data.len() as u64)?;
        self.file.write_all_at(data, offset).map_err(BlockError::Io)
    }

    fn flush(&self) -> Result<(), BlockError> {
        self.file.sync_data().map_err(BlockError::Io)
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn physical_block_size(&self) -> u32 {
        // File systems allocate (and punch holes) in 4 KiB blocks.
        self.block_size.max(4096)
    }

    fn provisioning(&self) -> Provisioning {
        Provisioning {
            thin: self.thin,
            reads_zero_after_unmap: self.thin,
            unmap_granularity: if self.thin { 4096 } else { 0 },
        }
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        check_range(self, offset, len)?;
        if !self.thin || len == 0 {
            return Ok(());
        }
        punch_hole(&self.file, offset, len).map_err(BlockError::Io)
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<(), BlockError> {
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        check_range(self, offset, len)?;
        if unmap && self.thin {
            // A punched hole reads back as zeros.
            return punch_hole(&self.file, offset, len).map_err(BlockError::Io);
        }
        write_zeros(self, offset, len)
    }

    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>, BlockError> {
        check_range(self, offset, len)?;
        if !self.thin {
            return Ok(vec![Extent {
                offset,
                len,
                mapped: true,
            }]);
        }
        let bs = u64::from(self.block_size);
        let end = offset + len;
        let mut out = Vec::new();
        let mut at = offset;
        while at < end {
            let data = seek(&self.file, at, libc::SEEK_DATA)
                .map_err(BlockError::Io)?
                .unwrap_or(end)
                .min(end);
            // A hole from `at` to the next data; round to whole blocks (a partly written
            // block counts as mapped).
            let hole_end = (data / bs * bs).max(at);
            if hole_end > at {
                out.push(Extent {
                    offset: at,
                    len: hole_end - at,
                    mapped: false,
                });
                at = hole_end;
            }
            if at >= end {
                break;
            }
            let hole = seek(&self.file, at, libc::SEEK_HOLE)
                .map_err(BlockError::Io)?
                .unwrap_or(end)
                .min(end);
            let data_end = hole.div_ceil(bs) * bs;
            let data_end = data_end.clamp(at + bs, end);
            out.push(Extent {
                offset: at,
                len: data_end - at,
                mapped: true,
            });
            at = data_end;
        }
        Ok(out)
    }

    fn clone_range_from(
        &self,
        src: &dyn BlockDevice,
        src_offset: u64,
        dst_offset: u64,
        len: u64,
    ) -> Result<bool, BlockError> {
        let Some(src) = src
            .as_any()
            .and_then(|a| a.downcast_ref::<FileBlockDevice>())
        else {
            return Ok(false);
        };
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        check_range(src, src_offset, len)?;
        check_range(self, dst_offset, len)?;
        // The kernel copies (or, on file systems that share extents, reflinks) without
        // the data passing through us.
        use std::os::fd::AsRawFd;
        let (mut from, mut to) = (src_offset as libc::loff_t, dst_offset as libc::loff_t);
        let mut left = len;
        while left > 0 {
            // SAFETY: both descriptors are owned by live `File`s; the offsets point at
            // local variables that outlive the call.
            let n = unsafe {
                libc::copy_file_range(
                    src.file.as_raw_fd(),
                    &mut from,
                    self.file.as_raw_fd(),
                    &mut to,
                    left.min(1 << 30) as usize,
                    0,
                )
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if left == len
                    && matches!(
                        e.raw_os_error(),
                        Some(libc::EXDEV | libc::EINVAL | libc::EOPNOTSUPP | libc::ENOSYS)
                    )
                {
                    return Ok(false);
                }
                return Err(BlockError::Io(e));
            }
            if n == 0 {
                return Err(BlockError::Io(std::io::ErrorKind::UnexpectedEof.into()));
            }
            left -= n as u64;
        }
        Ok(true)
    }

    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeros_for_in_place_writes_start_on_a_page() {
        for n in [1, 512, 4096, 65_000, 1 << 20] {
            let mut buf = Vec::new();
            let z = page_aligned_zeros(&mut buf, n);
            assert_eq!(z.len(), n);
            assert_eq!(z.as_ptr() as usize % 4096, 0);
            assert!(z.iter().all(|&b| b == 0));
        }
    }

    #[test]
    fn file_device_checks_ranges_and_compares() {
        let dir = std::env::temp_dir().join(format!("blk-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let dev = FileBlockDevice::open(&dir.join("lun"), Some(8192), 512, false).unwrap();
        assert_eq!(dev.size(), 8192);
        dev.write_at(512, &[7u8; 512]).unwrap();
        let mut buf = [0u8; 512];
        dev.read_at(512, &mut buf).unwrap();
        assert_eq!(buf, [7u8; 512]);
        assert!(matches!(
            dev.read_at(8192, &mut buf),
            Err(BlockError::OutOfRange { .. })
        ));
        assert!(matches!(
            dev.write_at(100, &[0; 512]),
            Err(BlockError::Misaligned { .. })
        ));
        let err = dev
            .compare_and_write(512, &[8u8; 512], &[9u8; 512])
            .unwrap_err();
        assert!(matches!(err, BlockError::Miscompare { offset: 512 }));
        dev.compare_and_write(512, &[7u8; 512], &[9u8; 512])
            .unwrap();
        dev.read_at(512, &mut buf).unwrap();
        assert_eq!(buf, [9u8; 512]);
        dev.write_zeroes(0, 1024, false).unwrap();
        dev.read_at(512, &mut buf).unwrap();
        assert_eq!(buf, [0u8; 512]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn file_device_punches_holes_and_reports_extents() {
        let dir = tempfile::tempdir().unwrap();
        let dev =
            FileBlockDevice::open(&dir.path().join("lun"), Some(1 << 20), 512, false).unwrap();
        if !dev.provisioning().thin {
            eprintln!("skipping: this file system cannot punch holes");
            return;
        }
        dev.write_at(64 * 1024, &[1u8; 8192]).unwrap();
        let ext = dev.extents(0, 1 << 20).unwrap();
        assert!(ext.iter().any(|e| e.mapped && e.offset <= 64 * 1024));
        assert!(ext.iter().any(|e| !e.mapped && e.offset == 0));
        assert_eq!(ext.iter().map(|e| e.len).sum::<u64>(), 1 << 20);
        dev.discard(64 * 1024, 8192).unwrap();
        let mut buf = [9u8; 8192];
        dev.read_at(64 * 1024, &mut buf).unwrap();
        assert_eq!(buf, [0u8; 8192]);
        assert!(dev.extents(0, 1 << 20).unwrap().iter().all(|e| !e.mapped));
        // Copy between two files without reading through us.
        let other =
            FileBlockDevice::open(&dir.path().join("b"), Some(1 << 20), 512, false).unwrap();
        other.write_at(0, &[5u8; 4096]).unwrap();
        assert!(dev.clone_range_from(&other, 0, 8192, 4096).unwrap());
        dev.read_at(8192, &mut buf[..4096]).unwrap();
        assert_eq!(&buf[..4096], &[5u8; 4096]);
    }
}
