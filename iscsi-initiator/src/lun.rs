//! A logical unit reached through a [`Session`]: the block API `hostd` uses. The
//! commands themselves live in [`crate::scsi`], one file each, as `impl Lun` blocks.

use iscsi_pdu::bhs::encode_lun;

use crate::error::Error;
use crate::scsi::capacity::Capacity;
use crate::scsi::inquiry::BlockLimits;
use crate::session::Session;

/// Largest transfer one command carries when the target states no limit.
pub const DEFAULT_MAX_TRANSFER: u32 = 8 << 20;

/// A LUN of a session. Cheap to clone; clones share the session.
#[derive(Clone, Debug)]
pub struct Lun {
    pub(crate) session: Session,
    pub(crate) id: u16,
    pub(crate) field: u64,
    pub(crate) capacity: Capacity,
    pub(crate) limits: BlockLimits,
}

impl Lun {
    /// Reads the capacity (and the block limits, when the target has that page).
    pub(crate) async fn open(session: Session, id: u16) -> Result<Self, Error> {
        let mut lun = Self {
            session,
            id,
            field: encode_lun(id),
            capacity: Capacity::default(),
            limits: BlockLimits::default(),
        };
        // Checked as it is parsed (`Capacity::check`): a block size and count that the
        // block arithmetic below and in `scsi/` can use without dividing by zero or
        // overflowing.
        lun.capacity = lun.read_capacity().await?;
        // Optional page: a target without it imposes no limits we need to know.
        if let Ok(l) = lun.block_limits().await {
            lun.limits = l;
        }
        Ok(lun)
    }

    pub fn id(&self) -> u16 {
        self.id
    }

    pub fn session(&self) -> &Session {
        &self.session
    }

    /// Bytes per logical block.
    pub fn block_size(&self) -> u32 {
        self.capacity.block_size
    }

    /// Logical blocks, as of the last [`Lun::refresh`] (or opening).
    pub fn blocks(&self) -> u64 {
        self.capacity.blocks
    }

    /// Size in bytes. READ CAPACITY answers whose size does not fit are refused when
    /// parsed, so this never saturates for a LUN that opened.
    pub fn size(&self) -> u64 {
        self.capacity.bytes().unwrap_or(u64::MAX)
    }

    pub fn capacity(&self) -> Capacity {
        self.capacity
    }

    pub fn limits(&self) -> BlockLimits {
        self.limits
    }

    /// Reads the capacity again (after the volume was grown, say).
    pub async fn refresh(&mut self) -> Result<Capacity, Error> {
        self.capacity = self.read_capacity().await?;
        Ok(self.capacity)
    }

    /// The most bytes one READ or WRITE carries: the target's maximum transfer length,
    /// else [`DEFAULT_MAX_TRANSFER`], and never more than a burst can be a multiple of.
    pub fn max_transfer(&self) -> usize {
        let bs = u64::from(self.block_size());
        let by_target = u64::from(self.limits.max_transfer_blocks) * bs;
        let cap = if by_target > 0 {
            by_target.min(u64::from(DEFAULT_MAX_TRANSFER) * 4)
        } else {
            u64::from(DEFAULT_MAX_TRANSFER)
        };
        (cap - cap % bs).max(bs) as usize
    }

    /// Checks that `len` bytes are a whole, non-zero number of blocks; returns the count.
    pub(crate) fn blocks_of(&self, what: &str, len: usize) -> Result<u64, Error> {
        let bs = self.block_size() as usize;
        if len == 0 || !len.is_multiple_of(bs) {
            return Err(Error::InvalidArgument {
                reason: format!("{what} of {len} bytes is not a whole number of {bs}-byte blocks"),
            });
        }
        Ok((len / bs) as u64)
    }
}
