//! READ CAPACITY(16) (SBC-3 §5.16), with READ CAPACITY(10) for targets without it: the
//! LUN's size, block size and whether it is thin.

use bytes::BytesMut;
use iscsi_pdu::scsi::opcode::{READ_CAPACITY_10, SAI_READ_CAPACITY_16, SERVICE_ACTION_IN_16};
use iscsi_pdu::{be32, be64};

use super::sense::CommandInfo;
use crate::error::Error;
use crate::lun::Lun;
use crate::task::Command;

/// What READ CAPACITY reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Capacity {
    /// Number of logical blocks (last LBA + 1).
    pub blocks: u64,
    pub block_size: u32,
    /// Logical blocks per physical block, as a power of two.
    pub physical_exponent: u8,
    /// Logical block provisioning management enabled: the LUN is thin.
    pub thin: bool,
    /// Unmapped blocks read as zeros.
    pub reads_zero_after_unmap: bool,
}

impl Capacity {
    /// Parses READ CAPACITY(16) data.
    pub fn parse16(d: &[u8]) -> Result<Self, Error> {
        if d.len() < 15 {
            return Err(Error::BadResponse {
                command: "READ CAPACITY(16)",
                reason: format!("{} bytes, at least 15 needed", d.len()),
            });
        }
        Ok(Self {
            blocks: be64(d, 0).wrapping_add(1),
            block_size: be32(d, 8),
            physical_exponent: d[13] & 0x0f,
            thin: d[14] & 0x80 != 0,
            reads_zero_after_unmap: d[14] & 0x40 != 0,
        })
    }

    /// Parses READ CAPACITY(10) data.
    pub fn parse10(d: &[u8]) -> Result<Self, Error> {
        if d.len() < 8 {
            return Err(Error::BadResponse {
                command: "READ CAPACITY(10)",
                reason: format!("{} bytes, 8 needed", d.len()),
            });
        }
        Ok(Self {
            blocks: u64::from(be32(d, 0)) + 1,
            block_size: be32(d, 4),
            ..Self::default()
        })
    }
}

impl Lun {
    /// READ CAPACITY(16), or (10) when the target does not know the former.
    pub async fn read_capacity(&self) -> Result<Capacity, Error> {
        let mut cdb = [0u8; 16];
        cdb[0] = SERVICE_ACTION_IN_16;
        cdb[1] = SAI_READ_CAPACITY_16;
        cdb[10..14].copy_from_slice(&32u32.to_be_bytes());
        let cmd = Command::new(self.field, &cdb).with_data_in(BytesMut::new(), 32);
        match self
            .session
            .execute(cmd, CommandInfo::named("READ CAPACITY(16)"))
            .await
        {
            Ok(out) => Capacity::parse16(&out.command.data_in[..out.received]),
            Err(Error::Unsupported { .. }) => {
                let mut cdb = [0u8; 10];
                cdb[0] = READ_CAPACITY_10;
                let cmd = Command::new(self.field, &cdb).with_data_in(BytesMut::new(), 8);
                let out = self
                    .session
                    .execute(cmd, CommandInfo::named("READ CAPACITY(10)"))
                    .await?;
                Capacity::parse10(&out.command.data_in[..out.received])
            }
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_forms() {
        let mut d = [0u8; 32];
        d[..8].copy_from_slice(&2047u64.to_be_bytes());
        d[8..12].copy_from_slice(&512u32.to_be_bytes());
        d[13] = 3;
        d[14] = 0xc0;
        let c = Capacity::parse16(&d).unwrap();
        assert_eq!(
            (c.blocks, c.block_size, c.physical_exponent),
            (2048, 512, 3)
        );
        assert!(c.thin && c.reads_zero_after_unmap);
        let c = Capacity::parse10(&[0, 0, 0x0f, 0xff, 0, 0, 0x10, 0]).unwrap();
        assert_eq!((c.blocks, c.block_size), (4096, 4096));
        assert!(Capacity::parse16(&d[..8]).is_err());
    }
}
