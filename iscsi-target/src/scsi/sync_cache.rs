//! SYNCHRONIZE CACHE (10) and (16): makes every acknowledged write durable. On a thin
//! volume this commits the pool's metadata.

use super::rw::parse;
use super::sense::{Failure, sense_for};
use super::{CmdResult, Ctx, check_lba};

pub fn synchronize_cache(ctx: &Ctx<'_>, cdb: &[u8]) -> CmdResult {
    let c = parse(cdb);
    check_lba(ctx, c.lba, c.blocks)?;
    ctx.lun
        .device
        .flush()
        .map_err(|e| Failure::from(sense_for(&e, false)))?;
    Ok(Vec::new())
}
