//! GET LBA STATUS: which ranges hold data, so backup and export tools can skip the rest.

use iscsi_pdu::{be32, be64};

use super::sense::{Failure, Sense, sense_for};
use super::{CmdResult, Ctx, truncate};

/// Most descriptors one answer carries.
const MAX_DESCRIPTORS: usize = 512;

pub fn get_lba_status(ctx: &Ctx<'_>, cdb: &[u8]) -> CmdResult {
    let lba = be64(cdb, 2);
    let alloc = be32(cdb, 10) as usize;
    let blocks = ctx.lun.blocks();
    if lba >= blocks {
        return Err(Sense::LBA_OUT_OF_RANGE.into());
    }
    if alloc < 24 && alloc != 0 {
        // Room for the header and one descriptor is what SBC-3 promises to fill; a
        // shorter allocation just gets the truncated answer.
    }
    let bs = u64::from(ctx.lun.block_size());
    // Ask about a bounded window so a huge sparse device answers quickly.
    let window = (blocks - lba).min(1 << 30 >> 9.min(bs.trailing_zeros()));
    let extents = ctx
        .lun
        .device
        .extents(lba * bs, window * bs)
        .map_err(|e| Failure::from(sense_for(&e, true)))?;
    let mut descs: Vec<(u64, u64, bool)> = Vec::new();
    for e in extents {
        let (start, n) = (e.offset / bs, e.len / bs);
        if n == 0 {
            continue;
        }
        match descs.last_mut() {
            Some(last) if last.2 == e.mapped && last.0 + last.1 == start => last.1 += n,
            _ => descs.push((start, n, e.mapped)),
        }
    }
    let mut d = vec![0u8; 8];
    for (start, n, mapped) in descs.into_iter().take(MAX_DESCRIPTORS) {
        let mut desc = [0u8; 16];
        desc[..8].copy_from_slice(&start.to_be_bytes());
        desc[8..12].copy_from_slice(&u32::try_from(n).unwrap_or(u32::MAX).to_be_bytes());
        desc[12] = if mapped { 0 } else { 1 };
        d.extend_from_slice(&desc);
    }
    let len = (d.len() - 4) as u32;
    d[..4].copy_from_slice(&len.to_be_bytes());
    Ok(truncate(d, alloc))
}
