//! WRITE SAME (10) and (16), with UNMAP: fills a range with one block, or frees it.

use iscsi_pdu::scsi::opcode;
use iscsi_pdu::{be16, be32, be64};

use super::inquiry::MAX_WRITE_SAME_BLOCKS;
use super::sense::{Failure, Sense, sense_for};
use super::{CmdResult, Ctx, Reply, check_lba, check_writable};

/// Bytes written per device call when filling a range.
const FILL_CHUNK: usize = 1 << 20;

pub fn write_same(ctx: &Ctx<'_>, cdb: &[u8], reply: &mut Reply) -> CmdResult {
    let sixteen = cdb[0] == opcode::WRITE_SAME_16;
    let flags = cdb[1];
    let (lba, mut blocks) = if sixteen {
        (be64(cdb, 2), u64::from(be32(cdb, 10)))
    } else {
        (u64::from(be32(cdb, 2)), u64::from(be16(cdb, 7)))
    };
    let wrprotect = flags >> 5;
    let anchor = flags & 0x10 != 0;
    let unmap = flags & 0x08 != 0;
    let ndob = sixteen && flags & 0x01 != 0;
    if wrprotect != 0 {
        return Err(Sense::invalid_cdb_field(1, Some(7)).into());
    }
    if anchor {
        return Err(Sense::invalid_cdb_field(1, Some(4)).into());
    }
    if !sixteen && flags & 0x06 != 0 {
        // PBDATA / LBDATA: obsolete in SBC-3, not supported.
        return Err(Sense::invalid_cdb_field(1, Some(2)).into());
    }
    if unmap && !ctx.lun.device.provisioning().thin {
        // Only a thin LUN can unmap; LBPWS says so in VPD 0xB2.
        return Err(Sense::invalid_cdb_field(1, Some(3)).into());
    }
    let bs = u64::from(ctx.lun.block_size());
    let capacity = ctx.lun.blocks();
    if blocks == 0 {
        // WSNZ is 0: zero means to the end of the medium.
        if lba > capacity {
            return Err(Sense::LBA_OUT_OF_RANGE.into());
        }
        blocks = capacity - lba;
    }
    check_lba(ctx, lba, blocks)?;
    if blocks > MAX_WRITE_SAME_BLOCKS && !unmap {
        return Err(Sense::invalid_cdb_field(if sixteen { 10 } else { 7 }, None).into());
    }
    let pattern: Vec<u8> = if ndob {
        reply.data_out_len = 0;
        vec![0u8; bs as usize]
    } else {
        reply.data_out_len = bs as u32;
        if u64::from(ctx.edtl) != bs || ctx.data_out.len() as u64 != bs {
            return Err(Sense::invalid_cdb_field(if sixteen { 10 } else { 7 }, None).into());
        }
        ctx.data_out.to_vec()
    };
    check_writable(ctx)?;
    let offset = lba * bs;
    let len = blocks * bs;
    let _range = ctx.lun.writes.lock(offset, len);
    let map = |e| Failure::from(sense_for(&e, false));
    if unmap {
        // The initiator asked for the range to be deallocated (the LUN is thin, checked
        // above); it then reads as zeros when LBPRZ says so, whatever the pattern.
        return ctx
            .lun
            .device
            .write_zeroes(offset, len, true)
            .map(|()| Vec::new())
            .map_err(map);
    }
    if pattern.iter().all(|&b| b == 0) {
        return ctx
            .lun
            .device
            .write_zeroes(offset, len, false)
            .map(|()| Vec::new())
            .map_err(map);
    }
    let per = (FILL_CHUNK as u64 / bs).max(1);
    let mut chunk = Vec::with_capacity((per.min(blocks) * bs) as usize);
    for _ in 0..per.min(blocks) {
        chunk.extend_from_slice(&pattern);
    }
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(chunk.len() as u64);
        ctx.lun
            .device
            .write_at(offset + done, &chunk[..n as usize])
            .map_err(map)?;
        done += n;
    }
    Ok(Vec::new())
}
