//! UNMAP (SBC-3 §5.28): tells a thin LUN that ranges no longer hold data, so their
//! space returns to the pool.

use bytes::Bytes;
use iscsi_pdu::scsi::opcode::UNMAP;

use super::sense::CommandInfo;
use crate::error::Error;
use crate::lun::Lun;
use crate::task::Command;

/// Block descriptors per command when the target states no limit.
const DEFAULT_DESCRIPTORS: usize = 256;

/// The parameter list: an 8-byte header and a 16-byte descriptor per range.
pub fn parameters(ranges: &[(u64, u32)]) -> Vec<u8> {
    let descriptors = ranges.len() * 16;
    let mut p = Vec::with_capacity(8 + descriptors);
    p.extend_from_slice(&((6 + descriptors) as u16).to_be_bytes());
    p.extend_from_slice(&(descriptors as u16).to_be_bytes());
    p.extend_from_slice(&[0; 4]);
    for &(lba, blocks) in ranges {
        p.extend_from_slice(&lba.to_be_bytes());
        p.extend_from_slice(&blocks.to_be_bytes());
        p.extend_from_slice(&[0; 4]);
    }
    p
}

/// The CDB for a parameter list of `len` bytes.
pub fn cdb(len: u16) -> [u8; 10] {
    let mut c = [0u8; 10];
    c[0] = UNMAP;
    c[7..9].copy_from_slice(&len.to_be_bytes());
    c
}

impl Lun {
    /// Unmaps `(lba, blocks)` ranges. A target that does not implement UNMAP answers
    /// [`Error::Unsupported`].
    pub async fn unmap(&self, ranges: &[(u64, u32)]) -> Result<(), Error> {
        let per = match self.limits.max_unmap_descriptors {
            0 => DEFAULT_DESCRIPTORS,
            n => (n as usize).min(4095),
        };
        for chunk in ranges.chunks(per) {
            let p = parameters(chunk);
            let first = chunk.first().map_or(0, |r| r.0);
            let blocks = chunk.iter().map(|r| u64::from(r.1)).sum();
            let cmd = Command::new(self.field, &cdb(p.len() as u16)).with_data_out(Bytes::from(p));
            self.session
                .execute(cmd, CommandInfo::range("UNMAP", first, blocks))
                .await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameter_list_layout() {
        let p = parameters(&[(0x10, 8), (0x1_0000_0000, 1)]);
        assert_eq!(p.len(), 8 + 32);
        assert_eq!(&p[..4], &[0, 38, 0, 32]);
        assert_eq!(&p[8..16], &0x10u64.to_be_bytes());
        assert_eq!(&p[16..20], &8u32.to_be_bytes());
        assert_eq!(&p[24..32], &0x1_0000_0000u64.to_be_bytes());
        assert_eq!(cdb(40)[7..9], [0, 40]);
    }
}
