//! UNMAP: frees ranges of a thin LUN.

use iscsi_pdu::{be16, be32, be64};

use super::inquiry::{MAX_UNMAP_BLOCKS, MAX_UNMAP_DESCRIPTORS};
use super::sense::{Failure, Sense, sense_for};
use super::{CmdResult, Ctx, Reply, check_writable};

pub fn unmap(ctx: &Ctx<'_>, cdb: &[u8], reply: &mut Reply) -> CmdResult {
    if cdb[1] & 0x01 != 0 {
        // ANCHOR: we do not anchor.
        return Err(Sense::invalid_cdb_field(1, Some(0)).into());
    }
    let list_len = usize::from(be16(cdb, 7));
    reply.data_out_len = list_len as u32;
    if list_len == 0 {
        return Ok(Vec::new());
    }
    check_writable(ctx)?;
    if !ctx.lun.device.provisioning().thin {
        return Err(Sense::INVALID_OPCODE.into());
    }
    let data = &ctx.data_out[..list_len.min(ctx.data_out.len())];
    if data.len() < 8 {
        return Err(Sense::PARAMETER_LIST_LENGTH_ERROR.into());
    }
    let desc_len = usize::from(be16(data, 2));
    if desc_len % 16 != 0 || 8 + desc_len > data.len() {
        return Err(Sense::PARAMETER_LIST_LENGTH_ERROR.into());
    }
    let count = desc_len / 16;
    if count as u32 > MAX_UNMAP_DESCRIPTORS {
        return Err(Sense::invalid_param_field(2, None).into());
    }
    let capacity = ctx.lun.blocks();
    let mut ranges = Vec::with_capacity(count);
    for i in 0..count {
        let d = &data[8 + 16 * i..8 + 16 * (i + 1)];
        let lba = be64(d, 0);
        let n = u64::from(be32(d, 8));
        if lba.checked_add(n).is_none_or(|end| end > capacity) {
            return Err(Sense::LBA_OUT_OF_RANGE.into());
        }
        if n > u64::from(MAX_UNMAP_BLOCKS) {
            return Err(Sense::invalid_param_field((8 + 16 * i + 8) as u16, None).into());
        }
        if n > 0 {
            ranges.push((lba, n));
        }
    }
    let bs = u64::from(ctx.lun.block_size());
    for (lba, n) in ranges {
        let _range = ctx.lun.writes.lock(lba * bs, n * bs);
        ctx.lun
            .device
            .discard(lba * bs, n * bs)
            .map_err(|e| Failure::from(sense_for(&e, false)))?;
    }
    Ok(Vec::new())
}
