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

/// Smallest and largest logical block size accepted (powers of two in between).
pub const MIN_BLOCK_SIZE: u32 = 512;
pub const MAX_BLOCK_SIZE: u32 = 64 << 10;
/// Largest LUN accepted, in bytes: every byte offset must fit a file offset (`i64`).
pub const MAX_LUN_BYTES: u64 = i64::MAX as u64;

/// A READ CAPACITY answer no block arithmetic can be done with. The numbers are the
/// target's, so they are checked before anything multiplies or divides by them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CapacityError {
    #[error(
        "block size {block_size} is not a power of two from {MIN_BLOCK_SIZE} to {MAX_BLOCK_SIZE}"
    )]
    BlockSize { block_size: u32 },
    /// The last LBA is the largest there is: the block count does not fit 64 bits.
    #[error("last LBA {last_lba:#x} leaves no block count that fits 64 bits")]
    LastLba { last_lba: u64 },
    #[error("{blocks} blocks of {block_size} bytes is over the {MAX_LUN_BYTES}-byte limit")]
    TooLarge { blocks: u64, block_size: u32 },
}

impl Capacity {
    /// Parses READ CAPACITY(16) data.
    pub fn parse16(d: &[u8]) -> Result<Self, Error> {
        const COMMAND: &str = "READ CAPACITY(16)";
        if d.len() < 15 {
            return Err(Error::BadResponse {
                command: COMMAND,
                reason: format!("{} bytes, at least 15 needed", d.len()),
            });
        }
        let last_lba = be64(d, 0);
        let blocks = last_lba
            .checked_add(1)
            .ok_or(CapacityError::LastLba { last_lba })
            .map_err(|e| bad(COMMAND, &e))?;
        let c = Self {
            blocks,
            block_size: be32(d, 8),
            physical_exponent: d[13] & 0x0f,
            thin: d[14] & 0x80 != 0,
            reads_zero_after_unmap: d[14] & 0x40 != 0,
        };
        c.check().map_err(|e| bad(COMMAND, &e))?;
        Ok(c)
    }

    /// Parses READ CAPACITY(10) data.
    pub fn parse10(d: &[u8]) -> Result<Self, Error> {
        const COMMAND: &str = "READ CAPACITY(10)";
        if d.len() < 8 {
            return Err(Error::BadResponse {
                command: COMMAND,
                reason: format!("{} bytes, 8 needed", d.len()),
            });
        }
        let c = Self {
            blocks: u64::from(be32(d, 0)) + 1,
            block_size: be32(d, 4),
            ..Self::default()
        };
        c.check().map_err(|e| bad(COMMAND, &e))?;
        Ok(c)
    }

    /// Whether block size and count are ones the block arithmetic can use: a sane block
    /// size, and a byte size that fits a file offset.
    pub fn check(&self) -> Result<(), CapacityError> {
        let bs = self.block_size;
        if !bs.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&bs) {
            return Err(CapacityError::BlockSize { block_size: bs });
        }
        self.bytes()
            .filter(|&b| b <= MAX_LUN_BYTES)
            .map(|_| ())
            .ok_or(CapacityError::TooLarge {
                blocks: self.blocks,
                block_size: bs,
            })
    }

    /// Size in bytes, if it fits 64 bits.
    pub fn bytes(&self) -> Option<u64> {
        self.blocks.checked_mul(u64::from(self.block_size))
    }
}

fn bad(command: &'static str, e: &CapacityError) -> Error {
    Error::BadResponse {
        command,
        reason: e.to_string(),
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

    fn rc16(last_lba: u64, block_size: u32) -> [u8; 32] {
        let mut d = [0u8; 32];
        d[..8].copy_from_slice(&last_lba.to_be_bytes());
        d[8..12].copy_from_slice(&block_size.to_be_bytes());
        d
    }

    fn reason(e: Error) -> String {
        match e {
            Error::BadResponse { reason, .. } => reason,
            other => panic!("expected a bad response, got {other:?}"),
        }
    }

    #[test]
    fn hostile_capacities_are_refused_with_the_reason() {
        // The largest last LBA: its block count wraps to 0.
        let e = Capacity::parse16(&rc16(u64::MAX, 512)).unwrap_err();
        assert_eq!(
            reason(e),
            CapacityError::LastLba { last_lba: u64::MAX }.to_string()
        );
        // Blocks × block size overflows 64 bits, or passes a file offset.
        let e = Capacity::parse16(&rc16(1 << 60, 4096)).unwrap_err();
        assert_eq!(
            reason(e),
            CapacityError::TooLarge {
                blocks: (1 << 60) + 1,
                block_size: 4096
            }
            .to_string()
        );
        let e = Capacity::parse16(&rc16(1 << 54, 512)).unwrap_err();
        assert!(reason(e).contains("over the"));
        // Zero, odd and absurd block sizes; the same from READ CAPACITY(10).
        for bs in [0, 1, 511, 520, 1536, 128 << 10, u32::MAX] {
            let e = Capacity::parse16(&rc16(2047, bs)).unwrap_err();
            assert_eq!(
                reason(e),
                CapacityError::BlockSize { block_size: bs }.to_string()
            );
            let mut d10 = [0u8; 8];
            d10[4..].copy_from_slice(&bs.to_be_bytes());
            assert!(matches!(
                Capacity::parse10(&d10),
                Err(Error::BadResponse {
                    command: "READ CAPACITY(10)",
                    ..
                })
            ));
        }
        // The limits themselves are fine.
        let c = Capacity::parse16(&rc16(MAX_LUN_BYTES / 512 - 1, 512)).unwrap();
        assert_eq!(c.bytes(), Some(MAX_LUN_BYTES / 512 * 512));
        assert!(Capacity::parse16(&rc16(0, MAX_BLOCK_SIZE)).is_ok());
        assert_eq!(
            Capacity {
                blocks: u64::MAX,
                block_size: 512,
                ..Capacity::default()
            }
            .bytes(),
            None
        );
    }
}
