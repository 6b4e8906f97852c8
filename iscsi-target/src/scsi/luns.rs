//! REPORT LUNS.

use iscsi_pdu::be32;
use iscsi_pdu::bhs::encode_lun;

use super::sense::Sense;
use super::{CmdResult, Ctx, truncate};

pub fn report_luns(ctx: &Ctx<'_>, cdb: &[u8]) -> CmdResult {
    let select = cdb[2];
    let alloc = be32(cdb, 6) as usize;
    if alloc < 16 {
        return Err(Sense::invalid_cdb_field(6, None).into());
    }
    let luns: Vec<u16> = match select {
        0 | 2 => ctx.fabric.luns().iter().map(|l| l.id).collect(),
        // Only well-known LUNs: we have none.
        1 => Vec::new(),
        // 0x10-0x12 ask about administrative LUNs, which we do not have either.
        0x10..=0x12 => Vec::new(),
        _ => return Err(Sense::invalid_cdb_field(2, None).into()),
    };
    let mut d = vec![0u8; 8];
    d[..4].copy_from_slice(&((luns.len() * 8) as u32).to_be_bytes());
    for l in luns {
        d.extend_from_slice(&encode_lun(l).to_be_bytes());
    }
    Ok(truncate(d, alloc))
}
