//! RESERVE(6) and RELEASE(6): SPC-2 reservations, which some clusters still use.

use super::sense::Failure;
use super::{CmdResult, Ctx};

pub fn reserve_6(ctx: &Ctx<'_>, _cdb: &[u8]) -> CmdResult {
    let mut st = ctx.lun.state();
    if st.pr.reservation.is_some() {
        return Err(Failure::ReservationConflict);
    }
    match &st.reserve6 {
        Some(holder) if holder != ctx.nexus => Err(Failure::ReservationConflict),
        _ => {
            st.reserve6 = Some(ctx.nexus.to_owned());
            Ok(Vec::new())
        }
    }
}

/// Releasing a reservation held by someone else, or none, is not an error (SPC-2 §7.21).
pub fn release_6(ctx: &Ctx<'_>, _cdb: &[u8]) -> CmdResult {
    let mut st = ctx.lun.state();
    if st.reserve6.as_deref() == Some(ctx.nexus) {
        st.reserve6 = None;
    }
    Ok(Vec::new())
}
