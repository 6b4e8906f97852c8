//! READ CAPACITY (10) and (16).

use iscsi_pdu::be32;

use super::sense::Sense;
use super::{CmdResult, Ctx, truncate};

pub fn read_capacity_10(ctx: &Ctx<'_>, cdb: &[u8]) -> CmdResult {
    // PMI with a nonzero LBA is obsolete; an LBA without PMI is an error (SBC-3 §5.15).
    if cdb[8] & 1 == 0 && be32(cdb, 2) != 0 {
        return Err(Sense::invalid_cdb_field(2, None).into());
    }
    let last = ctx.lun.blocks().saturating_sub(1);
    let mut d = vec![0u8; 8];
    d[..4].copy_from_slice(&u32::try_from(last).unwrap_or(u32::MAX).to_be_bytes());
    d[4..].copy_from_slice(&ctx.lun.block_size().to_be_bytes());
    Ok(d)
}

pub fn read_capacity_16(ctx: &Ctx<'_>, cdb: &[u8]) -> CmdResult {
    let alloc = be32(cdb, 10) as usize;
    let last = ctx.lun.blocks().saturating_sub(1);
    let prov = ctx.lun.device.provisioning();
    let mut d = vec![0u8; 32];
    d[..8].copy_from_slice(&last.to_be_bytes());
    d[8..12].copy_from_slice(&ctx.lun.block_size().to_be_bytes());
    // Byte 12: no protection information. Byte 13: logical blocks per physical block
    // exponent.
    let per_physical = (ctx.lun.device.physical_block_size() / ctx.lun.block_size()).max(1);
    d[13] = per_physical.trailing_zeros() as u8;
    if prov.thin {
        d[14] |= 0x80; // LBPME
        if prov.reads_zero_after_unmap {
            d[14] |= 0x40; // LBPRZ
        }
    }
    Ok(truncate(d, alloc))
}
