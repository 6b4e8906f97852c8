//! A thin volume as an iSCSI LUN: the [`BlockDevice`] the target serves.

use iscsi_target::{BlockDevice, BlockError, Extent, Provisioning};
use uuid::Uuid;

use crate::pool::{PoolError, ThinPool};

/// A handle on one volume of a pool. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ThinVolume {
    pool: ThinPool,
    id: Uuid,
    block_size: u32,
    read_only: bool,
}

impl ThinVolume {
    pub fn open(pool: &ThinPool, id: Uuid) -> Result<Self, PoolError> {
        Self::open_with(pool, id, false)
    }

    /// Opens a volume; with `read_only`, writes through this handle are refused even
    /// when the volume is writable (a read-only export).
    pub fn open_with(pool: &ThinPool, id: Uuid, read_only: bool) -> Result<Self, PoolError> {
        let info = pool.volume_info(id)?;
        Ok(ThinVolume {
            pool: pool.clone(),
            id,
            block_size: info.block_size,
            read_only: read_only || info.read_only(),
        })
    }

    pub fn id(&self) -> Uuid {
        self.id
    }

    pub fn pool(&self) -> &ThinPool {
        &self.pool
    }
}

impl From<PoolError> for BlockError {
    fn from(e: PoolError) -> Self {
        match e {
            PoolError::OutOfRange { offset, len, size } => {
                BlockError::OutOfRange { offset, len, size }
            }
            PoolError::Misaligned {
                offset,
                len,
                block_size,
            } => BlockError::Misaligned {
                offset,
                len,
                block_size,
            },
            PoolError::NoSpace => BlockError::NoSpace,
            PoolError::ReadOnly { .. } => BlockError::ReadOnly,
            other => BlockError::Io(std::io::Error::other(other)),
        }
    }
}

impl BlockDevice for ThinVolume {
    fn block_size(&self) -> u32 {
        self.block_size
    }

    fn size(&self) -> u64 {
        // A deleted volume has no size: every I/O to it then fails as out of range.
        self.pool
            .volume_size(self.id)
            .map(|(size, _)| size)
            .unwrap_or(0)
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        Ok(self.pool.read(self.id, offset, buf)?)
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), BlockError> {
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        Ok(self.pool.write(self.id, offset, data)?)
    }

    fn flush(&self) -> Result<(), BlockError> {
        Ok(self.pool.flush()?)
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn provisioning(&self) -> Provisioning {
        Provisioning {
            thin: true,
            reads_zero_after_unmap: true,
            unmap_granularity: self.pool.chunk_size(),
        }
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        Ok(self.pool.discard(self.id, offset, len)?)
    }

    fn write_zeroes(&self, offset: u64, len: u64, _unmap: bool) -> Result<(), BlockError> {
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        // Unmapped space reads as zeros, so freeing whole chunks is always a valid way
        // to zero them; partial chunks are written with zeros.
        Ok(self.pool.discard(self.id, offset, len)?)
    }

    fn clone_range_from(
        &self,
        src: &dyn BlockDevice,
        src_offset: u64,
        dst_offset: u64,
        len: u64,
    ) -> Result<bool, BlockError> {
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        let Some(src) = src.as_any().and_then(|a| a.downcast_ref::<ThinVolume>()) else {
            return Ok(false);
        };
        if src.pool.id() != self.pool.id() {
            return Ok(false);
        }
        Ok(self
            .pool
            .clone_range(src.id, src_offset, self.id, dst_offset, len)?)
    }

    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }

    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>, BlockError> {
        Ok(self
            .pool
            .extents(self.id, offset, len)?
            .into_iter()
            .map(|(offset, len, mapped)| Extent {
                offset,
                len,
                mapped,
            })
            .collect())
    }
}
