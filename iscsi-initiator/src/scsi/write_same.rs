//! WRITE SAME(16) (SBC-3 §5.45): one block repeated over a range; with UNMAP set a thin
//! LUN may free the range instead of writing zeros.

use bytes::Bytes;
use iscsi_pdu::scsi::opcode::WRITE_SAME_16;

use super::rw16;
use super::sense::CommandInfo;
use crate::error::Error;
use crate::lun::Lun;
use crate::task::Command;

const UNMAP_BIT: u8 = 0x08;

/// The CDB of a WRITE SAME(16).
pub fn cdb(lba: u64, blocks: u32, unmap: bool) -> [u8; 16] {
    rw16(
        WRITE_SAME_16,
        if unmap { UNMAP_BIT } else { 0 },
        lba,
        blocks,
    )
}

impl Lun {
    /// Writes `block` (exactly one block) over `blocks` blocks from `lba`. With `unmap`,
    /// the target may deallocate the range instead, when `block` is all zeros.
    pub async fn write_same(
        &self,
        lba: u64,
        blocks: u32,
        block: Bytes,
        unmap: bool,
    ) -> Result<(), Error> {
        if block.len() != self.block_size() as usize {
            return Err(Error::InvalidArgument {
                reason: format!(
                    "WRITE SAME takes one {}-byte block, not {} bytes",
                    self.block_size(),
                    block.len()
                ),
            });
        }
        if blocks == 0 {
            // WRITE SAME with 0 blocks means "to the end of the LUN": never by accident.
            return Err(Error::InvalidArgument {
                reason: "WRITE SAME of 0 blocks".into(),
            });
        }
        let cmd = Command::new(self.field, &cdb(lba, blocks, unmap)).with_data_out(block);
        self.session
            .execute(
                cmd,
                CommandInfo::range("WRITE SAME(16)", lba, blocks.into()),
            )
            .await?;
        Ok(())
    }

    /// Makes the range read as zeros (WRITE SAME of a zero block), letting a thin LUN
    /// unmap it when `unmap` is set.
    pub async fn write_zeroes(&self, lba: u64, blocks: u32, unmap: bool) -> Result<(), Error> {
        let zero = Bytes::from(vec![0u8; self.block_size() as usize]);
        self.write_same(lba, blocks, zero, unmap).await
    }
}
