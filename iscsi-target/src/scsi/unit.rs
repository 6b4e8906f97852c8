//! Unit-level commands: TEST UNIT READY, REQUEST SENSE, START STOP UNIT,
//! PREVENT ALLOW MEDIUM REMOVAL, READ DEFECT DATA.

use iscsi_pdu::scsi::opcode;
use iscsi_pdu::{be16, be32};

use super::sense::{Sense, key};
use super::{CmdResult, Ctx, truncate};

pub fn test_unit_ready(ctx: &Ctx<'_>, _cdb: &[u8]) -> CmdResult {
    if ctx.lun.state().stopped {
        return Err(Sense::new(key::NOT_READY, 0x04, 0x02).into());
    }
    Ok(Vec::new())
}

/// REQUEST SENSE: reports a pending unit attention, or NO SENSE.
pub fn request_sense(ctx: &Ctx<'_>, cdb: &[u8]) -> CmdResult {
    let desc = cdb[1] & 1 != 0;
    let alloc = usize::from(cdb[4]);
    let sense = ctx
        .lun
        .state()
        .unit_attentions
        .get_mut(ctx.nexus)
        .and_then(|q| q.pop_front())
        .unwrap_or(Sense::new(key::NO_SENSE, 0, 0));
    let d = if desc {
        sense.to_descriptor()
    } else {
        sense.to_fixed().to_vec()
    };
    Ok(truncate(d, alloc))
}

/// START STOP UNIT. Our medium is not removable and always spinning: LOEJ has nothing to
/// eject, and a stop leaves the unit ready (as SBC-3 allows for units that cannot stop).
pub fn start_stop_unit(ctx: &Ctx<'_>, cdb: &[u8]) -> CmdResult {
    let power_condition = cdb[4] >> 4;
    let loej = cdb[4] & 0x02 != 0;
    let start = cdb[4] & 0x01 != 0;
    if power_condition != 0 {
        // Power conditions other than START_VALID change nothing we model.
        return Ok(Vec::new());
    }
    let st = ctx.lun.state();
    if loej && !start && !st.prevent_removal.is_empty() {
        // MEDIUM REMOVAL PREVENTED.
        return Err(Sense::new(key::ILLEGAL_REQUEST, 0x53, 0x02).into());
    }
    Ok(Vec::new())
}

pub fn prevent_allow(ctx: &Ctx<'_>, cdb: &[u8]) -> CmdResult {
    let prevent = cdb[4] & 0x03;
    let mut st = ctx.lun.state();
    match prevent {
        0 => {
            st.prevent_removal.remove(ctx.nexus);
        }
        1 => {
            st.prevent_removal.insert(ctx.nexus.to_owned());
        }
        _ => return Err(Sense::invalid_cdb_field(4, Some(1)).into()),
    }
    Ok(Vec::new())
}

/// READ DEFECT DATA: we know of no defects; the list is empty.
pub fn read_defect_data(_ctx: &Ctx<'_>, cdb: &[u8]) -> CmdResult {
    let format = cdb[2] & 0x07;
    if cdb[0] == opcode::READ_DEFECT_DATA_10 {
        let alloc = usize::from(be16(cdb, 7));
        let d = vec![0, cdb[2] & 0x18 | format, 0, 0];
        Ok(truncate(d, alloc))
    } else {
        let alloc = be32(cdb, 6) as usize;
        let d = vec![0, cdb[1] & 0x18 | format, 0, 0, 0, 0, 0, 0];
        Ok(truncate(d, alloc))
    }
}
