//! WRITE(16) (SBC-3 §5.40): blocks from a buffer to the LUN, split into commands of at
//! most the LUN's maximum transfer. The data is shared, never copied: the engine keeps
//! a reference until the target acknowledges it, so that it can send it again after a
//! reconnect.

use bytes::Bytes;
use iscsi_pdu::scsi::opcode::WRITE_16;

use super::rw16;
use super::sense::CommandInfo;
use crate::error::Error;
use crate::lun::Lun;
use crate::task::Command;

/// FUA: the target writes through its cache before it answers.
const FUA: u8 = 0x08;

/// The CDB of a WRITE(16).
pub fn cdb(lba: u64, blocks: u32, fua: bool) -> [u8; 16] {
    rw16(WRITE_16, if fua { FUA } else { 0 }, lba, blocks)
}

impl Lun {
    /// Writes `data` (whole blocks) at `lba`. Durable after [`Lun::flush`].
    pub async fn write(&self, lba: u64, data: Bytes) -> Result<(), Error> {
        self.write_with(lba, data, false).await
    }

    /// Writes `data` at `lba` with FUA: durable when this returns.
    pub async fn write_fua(&self, lba: u64, data: Bytes) -> Result<(), Error> {
        self.write_with(lba, data, true).await
    }

    async fn write_with(&self, lba: u64, data: Bytes, fua: bool) -> Result<(), Error> {
        self.blocks_of("a write", data.len())?;
        let bs = self.block_size() as usize;
        let max = self.max_transfer();
        let mut at = 0;
        while at < data.len() {
            let n = max.min(data.len() - at);
            let part = data.slice(at..at + n);
            let first = lba + (at / bs) as u64;
            let blocks = (n / bs) as u32;
            let cmd = Command::new(self.field, &cdb(first, blocks, fua)).with_data_out(part);
            let info = CommandInfo::range("WRITE(16)", first, blocks.into());
            self.session.execute(cmd, info).await?;
            at += n;
        }
        Ok(())
    }
}
