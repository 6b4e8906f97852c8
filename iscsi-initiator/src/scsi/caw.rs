//! COMPARE AND WRITE (SBC-3 §5.2): writes blocks only if they hold what the caller
//! expects, atomically at the target. A mismatch is [`Error::Miscompare`].
//!
//! A retry after a reconnect cannot tell "not executed" from "executed, answer lost":
//! the second attempt then sees its own data and reports a miscompare. Callers that
//! use COMPARE AND WRITE as a lock re-read the blocks after such a miscompare.

use bytes::{Bytes, BytesMut};
use iscsi_pdu::scsi::opcode::COMPARE_AND_WRITE;

use super::sense::CommandInfo;
use crate::error::Error;
use crate::lun::Lun;
use crate::task::Command;

/// The CDB for `blocks` (at most 255) blocks at `lba`.
pub fn cdb(lba: u64, blocks: u8) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = COMPARE_AND_WRITE;
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[13] = blocks;
    c
}

impl Lun {
    /// Writes `new` at `lba` if the blocks there equal `expected` (same length, whole
    /// blocks, at most 255 and at most the target's limit).
    pub async fn compare_and_write(
        &self,
        lba: u64,
        expected: &[u8],
        new: &[u8],
    ) -> Result<(), Error> {
        if expected.len() != new.len() {
            return Err(Error::InvalidArgument {
                reason: "COMPARE AND WRITE needs as many bytes to compare as to write".into(),
            });
        }
        let blocks = self.blocks_of("COMPARE AND WRITE", new.len())?;
        let limit = match self.limits.max_compare_and_write_blocks {
            0 => 255,
            n => u64::from(n),
        };
        if blocks > limit {
            return Err(Error::InvalidArgument {
                reason: format!("COMPARE AND WRITE of {blocks} blocks (the limit is {limit})"),
            });
        }
        let mut data = BytesMut::with_capacity(2 * new.len());
        data.extend_from_slice(expected);
        data.extend_from_slice(new);
        let cmd =
            Command::new(self.field, &cdb(lba, blocks as u8)).with_data_out(Bytes::from(data));
        self.session
            .execute(cmd, CommandInfo::range("COMPARE AND WRITE", lba, blocks))
            .await?;
        Ok(())
    }
}
