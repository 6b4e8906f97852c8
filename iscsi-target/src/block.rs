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
        let zeros = vec![0u8; len.min(1 << 20) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeros.len() as u64);
            self.write_at(offset + done, &zeros[..n as usize])?;
            done += n;
        }
        Ok(())
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

/// A LUN backed by a plain file (tests and quick labs); thick, no discard.
#[derive(Debug)]
pub struct FileBlockDevice {
    file: File,
    size: u64,
    block_size: u32,
    read_only: bool,
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
        Ok(Self {
            file,
            size,
            block_size,
            read_only,
        })
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
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
