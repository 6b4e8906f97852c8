//! COMPARE AND WRITE: the atomic test-and-set clusters lock with. The range lock makes
//! read, compare and write one step with respect to every other write to the range.

use iscsi_pdu::be64;

use super::inquiry::MAX_COMPARE_AND_WRITE_BLOCKS;
use super::sense::{Failure, Sense, sense_for};
use super::{CmdResult, Ctx, MAX_TRANSFER_BYTES, Reply, check_lba, check_writable};
use crate::block::BlockError;

pub fn compare_and_write(ctx: &Ctx<'_>, cdb: &[u8], reply: &mut Reply) -> CmdResult {
    let wrprotect = cdb[1] >> 5;
    let fua = cdb[1] & 0x08 != 0;
    let lba = be64(cdb, 2);
    let blocks = u64::from(cdb[13]);
    let bs = u64::from(ctx.lun.block_size());
    if wrprotect != 0 {
        return Err(Sense::invalid_cdb_field(1, Some(7)).into());
    }
    if blocks == 0 {
        // Nothing to compare; Data-Out with it means the CDB cannot describe the transfer.
        if ctx.edtl != 0 {
            return Err(Sense::invalid_cdb_field(13, None).into());
        }
        return Ok(Vec::new());
    }
    if blocks > u64::from(MAX_COMPARE_AND_WRITE_BLOCKS) || 2 * blocks * bs > MAX_TRANSFER_BYTES {
        return Err(Sense::invalid_cdb_field(13, None).into());
    }
    check_lba(ctx, lba, blocks)?;
    let len = (blocks * bs) as usize;
    reply.data_out_len = (2 * len) as u32;
    if ctx.edtl as usize != 2 * len || ctx.data_out.len() != 2 * len {
        return Err(Sense::invalid_cdb_field(13, None).into());
    }
    check_writable(ctx)?;
    let (expected, new) = ctx.data_out.split_at(len);
    let offset = lba * bs;
    let _range = ctx.lun.writes.lock(offset, len as u64);
    match ctx.lun.device.compare_and_write(offset, expected, new) {
        Ok(()) => {}
        Err(BlockError::Miscompare { offset: at }) => {
            // INFORMATION is the offset of the first differing byte in the compare data.
            return Err(Sense::MISCOMPARE_DURING_VERIFY
                .with_information((at - offset) as u64)
                .into());
        }
        Err(e) => return Err(Failure::from(sense_for(&e, false))),
    }
    if fua {
        ctx.lun
            .device
            .flush()
            .map_err(|e| Failure::from(sense_for(&e, false)))?;
    }
    Ok(Vec::new())
}

#[cfg(test)]
mod tests {
    use super::super::sense::status;
    use super::super::test_utils::TestFabric;
    use iscsi_pdu::scsi::opcode;

    fn caw(lba: u8, blocks: u8) -> [u8; 16] {
        let mut c = [0u8; 16];
        c[0] = opcode::COMPARE_AND_WRITE;
        c[9] = lba;
        c[13] = blocks;
        c
    }

    #[test]
    fn compares_then_writes_or_reports_the_first_difference() {
        let f = TestFabric::new(16);
        let mut data = vec![0u8; 512];
        data.extend_from_slice(&[7u8; 512]);
        assert_eq!(f.run("a", &caw(3, 1), &data).status, status::GOOD);
        // Now the block holds 7s: comparing with zeros fails at byte 0.
        let r = f.run("a", &caw(3, 1), &data);
        assert_eq!(r.status, status::CHECK_CONDITION);
        assert_eq!((r.sense[2], r.sense[12]), (0x0e, 0x1d));
        let mut data2 = vec![7u8; 512];
        data2[100] = 1;
        data2.extend_from_slice(&[9u8; 512]);
        let r = f.run("a", &caw(3, 1), &data2);
        assert_eq!(&r.sense[3..7], &100u32.to_be_bytes());
        // Wrong Data-Out size is refused.
        let r = f.run("a", &caw(3, 1), &data[..512]);
        assert_eq!(r.status, status::CHECK_CONDITION);
    }
}
