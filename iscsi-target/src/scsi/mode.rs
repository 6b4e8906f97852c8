//! MODE SENSE and MODE SELECT (6) and (10), with the caching, control and informational
//! exceptions pages.

use iscsi_pdu::be16;
use iscsi_pdu::scsi::opcode;

use super::sense::{Failure, Sense};
use super::{CmdResult, Ctx, Reply, truncate};
use crate::lun::{ModeState, push_ua};

const CACHING: u8 = 0x08;
const CONTROL: u8 = 0x0a;
const INFO_EXCEPTIONS: u8 = 0x1c;
const ALL: u8 = 0x3f;

/// Page control values.
const PC_CURRENT: u8 = 0;
const PC_CHANGEABLE: u8 = 1;
const PC_DEFAULT: u8 = 2;
const PC_SAVED: u8 = 3;

fn caching(m: &ModeState) -> Vec<u8> {
    let mut p = vec![0u8; 20];
    p[0] = CACHING;
    p[1] = 18;
    if m.wce {
        p[2] |= 0x04;
    }
    p
}

fn control(m: &ModeState) -> Vec<u8> {
    let mut p = vec![0u8; 12];
    p[0] = CONTROL;
    p[1] = 10;
    if m.d_sense {
        p[2] |= 0x04;
    }
    p[3] = 0x10; // queue algorithm modifier: unrestricted reordering allowed
    if m.swp {
        p[4] |= 0x08;
    }
    p[8..10].copy_from_slice(&0xffffu16.to_be_bytes()); // busy timeout: unlimited
    p
}

fn info_exceptions(_m: &ModeState) -> Vec<u8> {
    let mut p = vec![0u8; 12];
    p[0] = INFO_EXCEPTIONS;
    p[1] = 10;
    p
}

/// The page as reported for page control `pc`.
fn page(code: u8, pc: u8, current: &ModeState) -> Vec<u8> {
    let state = match pc {
        PC_CHANGEABLE => ModeState {
            wce: true,
            d_sense: true,
            swp: true,
        },
        PC_DEFAULT => ModeState {
            wce: true,
            d_sense: false,
            swp: false,
        },
        _ => *current,
    };
    let mut p = match code {
        CACHING => caching(&state),
        CONTROL => control(&state),
        _ => info_exceptions(&state),
    };
    if pc == PC_CHANGEABLE {
        // Only the bits set above may change: clear everything else.
        let mask = match code {
            CACHING => caching(&state),
            CONTROL => {
                let mut c = control(&state);
                c[3] = 0;
                c[8] = 0;
                c[9] = 0;
                c
            }
            _ => info_exceptions(&state),
        };
        for (b, m) in p.iter_mut().zip(mask).skip(2) {
            *b &= m;
        }
    }
    p
}

pub fn mode_sense(ctx: &Ctx<'_>, cdb: &[u8]) -> CmdResult {
    let ten = cdb[0] == opcode::MODE_SENSE_10;
    let dbd = cdb[1] & 0x08 != 0;
    let llbaa = ten && cdb[1] & 0x10 != 0;
    let pc = cdb[2] >> 6;
    let code = cdb[2] & 0x3f;
    let subpage = cdb[3];
    let alloc = if ten {
        usize::from(be16(cdb, 7))
    } else {
        usize::from(cdb[4])
    };
    if pc == PC_SAVED {
        return Err(Sense::SAVING_PARAMETERS_NOT_SUPPORTED.into());
    }
    let codes: &[u8] = match (code, subpage) {
        (ALL, 0 | 0xff) => &[CACHING, CONTROL, INFO_EXCEPTIONS],
        (CACHING, 0) => &[CACHING],
        (CONTROL, 0) => &[CONTROL],
        (INFO_EXCEPTIONS, 0) => &[INFO_EXCEPTIONS],
        (_, 0) => return Err(Sense::invalid_cdb_field(2, Some(5)).into()),
        _ => return Err(Sense::invalid_cdb_field(3, None).into()),
    };
    let current = ctx.lun.state().mode;
    let mut pages = Vec::new();
    for &c in codes {
        pages.extend(page(c, pc, &current));
    }
    let blocks = ctx.lun.blocks();
    let bs = ctx.lun.block_size();
    let mut desc = Vec::new();
    if !dbd {
        if llbaa {
            desc.extend_from_slice(&blocks.to_be_bytes());
            desc.extend_from_slice(&[0; 4]);
            desc.extend_from_slice(&bs.to_be_bytes());
        } else {
            desc.extend_from_slice(&u32::try_from(blocks).unwrap_or(u32::MAX).to_be_bytes());
            desc.push(0);
            desc.extend_from_slice(&bs.to_be_bytes()[1..]);
        }
    }
    let mut dev_specific = 0x10; // DPOFUA
    if ctx.lun.device.read_only() || current.swp {
        dev_specific |= 0x80; // WP
    }
    let mut d = if ten {
        let mut h = vec![0u8; 8];
        h[3] = dev_specific;
        if llbaa && !dbd {
            h[4] = 1;
        }
        h[6..8].copy_from_slice(&(desc.len() as u16).to_be_bytes());
        h
    } else {
        vec![0, 0, dev_specific, desc.len() as u8]
    };
    d.extend(desc);
    d.extend(pages);
    if ten {
        let len = (d.len() - 2) as u16;
        d[0..2].copy_from_slice(&len.to_be_bytes());
    } else {
        d[0] = (d.len() - 1) as u8;
    }
    Ok(truncate(d, alloc))
}

pub fn mode_select(ctx: &Ctx<'_>, cdb: &[u8], reply: &mut Reply) -> CmdResult {
    let ten = cdb[0] == opcode::MODE_SELECT_10;
    let pf = cdb[1] & 0x10 != 0;
    let sp = cdb[1] & 0x01 != 0;
    let len = if ten {
        usize::from(be16(cdb, 7))
    } else {
        usize::from(cdb[4])
    };
    reply.data_out_len = len as u32;
    if !pf {
        return Err(Sense::invalid_cdb_field(1, Some(4)).into());
    }
    if sp {
        return Err(Sense::invalid_cdb_field(1, Some(0)).into());
    }
    if len == 0 {
        return Ok(Vec::new());
    }
    let data = ctx.data_out;
    if data.len() < len {
        return Err(Sense::PARAMETER_LIST_LENGTH_ERROR.into());
    }
    let data = &data[..len];
    let (hdr, bd_len) = if ten {
        if len < 8 {
            return Err(Sense::PARAMETER_LIST_LENGTH_ERROR.into());
        }
        (8, usize::from(be16(data, 6)))
    } else {
        if len < 4 {
            return Err(Sense::PARAMETER_LIST_LENGTH_ERROR.into());
        }
        (4, usize::from(data[3]))
    };
    if hdr + bd_len > len {
        return Err(Sense::PARAMETER_LIST_LENGTH_ERROR.into());
    }
    let mut st = ctx.lun.state();
    let mut next = st.mode;
    let mut at = hdr + bd_len;
    while at < len {
        let rest = &data[at..];
        if rest.len() < 2 {
            return Err(Sense::PARAMETER_LIST_LENGTH_ERROR.into());
        }
        if rest[0] & 0x40 != 0 {
            // Sub-page format: we have no sub-pages.
            return Err(Sense::invalid_param_field(at as u16, None).into());
        }
        let code = rest[0] & 0x3f;
        let plen = usize::from(rest[1]) + 2;
        if rest.len() < plen {
            return Err(Sense::PARAMETER_LIST_LENGTH_ERROR.into());
        }
        let got = &rest[..plen];
        let cur = match code {
            CACHING | CONTROL | INFO_EXCEPTIONS => page(code, PC_CURRENT, &next),
            _ => return Err(Sense::invalid_param_field(at as u16, Some(5)).into()),
        };
        if got.len() != cur.len() {
            return Err(Sense::invalid_param_field(at as u16 + 1, None).into());
        }
        let mask = page(code, PC_CHANGEABLE, &next);
        for i in 2..cur.len() {
            if (got[i] ^ cur[i]) & !mask[i] != 0 {
                return Err(Sense::invalid_param_field((at + i) as u16, None).into());
            }
        }
        match code {
            CACHING => next.wce = got[2] & 0x04 != 0,
            CONTROL => {
                next.d_sense = got[2] & 0x04 != 0;
                next.swp = got[4] & 0x08 != 0;
            }
            _ => {}
        }
        at += plen;
    }
    if next != st.mode {
        st.mode = next;
        for n in ctx.fabric.nexuses() {
            if n != ctx.nexus {
                push_ua(&mut st, &n, Sense::MODE_PARAMETERS_CHANGED);
            }
        }
    }
    Ok(Vec::new())
}

/// Whether writes must be made durable before they are acknowledged (write cache off).
pub fn write_through(ctx: &Ctx<'_>) -> Result<bool, Failure> {
    Ok(!ctx.lun.state().mode.wce)
}

#[cfg(test)]
mod tests {
    use super::super::sense::status;
    use super::super::test_utils::TestFabric;

    #[test]
    fn sense_all_pages_and_select_swp() {
        let f = TestFabric::new(16);
        let r = f.run("a", &[0x1a, 0, 0x3f, 0, 255, 0], &[]);
        assert_eq!(r.status, status::GOOD);
        assert_eq!(r.data_in[0] as usize + 1, r.data_in.len());
        assert_eq!(r.data_in[3], 8);
        // Turn on SWP through the control page.
        let mut sel = vec![0u8, 0, 0, 0];
        let ctl = f.run("a", &[0x1a, 0x08, 0x0a, 0, 255, 0], &[]).data_in;
        let mut page = ctl[4..].to_vec();
        page[4] |= 0x08;
        sel.extend(page);
        let r = f.run("a", &[0x15, 0x10, 0, 0, sel.len() as u8, 0], &sel);
        assert_eq!(r.status, status::GOOD, "{:?}", r.sense);
        let w = f.run("a", &[0x2a, 0, 0, 0, 0, 0, 0, 0, 1, 0], &[0u8; 512]);
        assert_eq!((w.sense[2], w.sense[12]), (0x07, 0x27));
        // Another nexus learns that mode parameters changed.
        let t = f.run("b", &[0, 0, 0, 0, 0, 0], &[]);
        assert_eq!((t.sense[2], t.sense[12], t.sense[13]), (6, 0x2a, 0x01));
    }
}
