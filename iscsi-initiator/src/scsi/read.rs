//! READ(16) (SBC-3 §5.16): blocks from the LUN into a buffer, split into commands of
//! at most the LUN's maximum transfer.

use bytes::{Bytes, BytesMut};
use iscsi_pdu::scsi::opcode::READ_16;

use super::rw16;
use super::sense::CommandInfo;
use crate::error::Error;
use crate::lun::Lun;
use crate::task::Command;

/// The CDB of a READ(16).
pub fn cdb(lba: u64, blocks: u32) -> [u8; 16] {
    rw16(READ_16, 0, lba, blocks)
}

impl Lun {
    /// Reads `blocks` blocks from `lba`.
    pub async fn read(&self, lba: u64, blocks: u32) -> Result<Bytes, Error> {
        let len = blocks as usize * self.block_size() as usize;
        Ok(self.read_into(lba, BytesMut::zeroed(len)).await?.freeze())
    }

    /// Reads `buf.len()` bytes (whole blocks) from `lba` into `buf` and gives it back:
    /// a caller that reuses its buffers reads without allocating. Long reads are split
    /// into commands of [`Lun::max_transfer`] bytes, sent one after the other.
    pub async fn read_into(&self, lba: u64, mut buf: BytesMut) -> Result<BytesMut, Error> {
        let blocks = self.blocks_of("a read", buf.len())?;
        let max = self.max_transfer();
        if buf.len() <= max {
            return self.read_one(lba, blocks as u32, buf).await;
        }
        let bs = self.block_size() as u64;
        let mut done = BytesMut::new();
        let mut at = lba;
        while !buf.is_empty() {
            let rest = buf.split_off(max.min(buf.len()));
            let n = buf.len() as u64 / bs;
            let part = self.read_one(at, n as u32, buf).await?;
            // The parts come from one allocation and stay in order: unsplit is O(1).
            done.unsplit(part);
            at += n;
            buf = rest;
        }
        Ok(done)
    }

    async fn read_one(&self, lba: u64, blocks: u32, buf: BytesMut) -> Result<BytesMut, Error> {
        let len = buf.len();
        let cmd = Command::new(self.field, &cdb(lba, blocks)).with_data_in(buf, len);
        let info = CommandInfo::range("READ(16)", lba, blocks.into());
        let out = self.session.execute(cmd, info).await?;
        if out.received < len {
            return Err(Error::ShortData {
                command: info.name,
                expected: len,
                got: out.received,
            });
        }
        Ok(out.command.data_in)
    }
}
