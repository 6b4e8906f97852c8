//! EXTENDED COPY (LID1) and RECEIVE COPY RESULTS.

use super::sense::Sense;
use super::{CmdResult, Ctx, Reply};

pub fn extended_copy(_ctx: &Ctx<'_>, _cdb: &[u8], _reply: &mut Reply) -> CmdResult {
    Err(Sense::INVALID_OPCODE.into())
}

pub fn receive_copy_results(_ctx: &Ctx<'_>, _cdb: &[u8]) -> CmdResult {
    Err(Sense::INVALID_OPCODE.into())
}
