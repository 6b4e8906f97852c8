//! PERSISTENT RESERVE IN and OUT (SPC-4 §6.15, §6.16). The state machine lives in
//! [`crate::pr`]; this file decodes the commands, saves every change through the LUN's
//! [`crate::pr::PrStore`] before answering, and delivers the side effects.

use iscsi_pdu::{be16, be32};

use super::sense::{Failure, Sense};
use super::{CmdResult, Ctx, Reply, truncate};
use crate::lun::push_ua;
use crate::pr::{Effect, ProutParams, kind};

pub fn persistent_reserve_in(ctx: &Ctx<'_>, cdb: &[u8]) -> CmdResult {
    let sa = cdb[1] & 0x1f;
    let alloc = usize::from(be16(cdb, 7));
    let st = ctx.lun.state();
    let pr = &st.pr;
    let mut d = Vec::new();
    match sa {
        0 => {
            // READ KEYS
            d.extend_from_slice(&pr.generation.to_be_bytes());
            d.extend_from_slice(&((pr.registrations.len() * 8) as u32).to_be_bytes());
            for key in pr.registrations.values() {
                d.extend_from_slice(&key.to_be_bytes());
            }
        }
        1 => {
            // READ RESERVATION
            d.extend_from_slice(&pr.generation.to_be_bytes());
            match &pr.reservation {
                None => d.extend_from_slice(&0u32.to_be_bytes()),
                Some(r) => {
                    d.extend_from_slice(&16u32.to_be_bytes());
                    let key = if kind::all_registrants(r.kind) {
                        0
                    } else {
                        pr.registrations.get(&r.holder).copied().unwrap_or(0)
                    };
                    d.extend_from_slice(&key.to_be_bytes());
                    d.extend_from_slice(&[0, 0, 0, 0, 0, r.kind & 0x0f, 0, 0]);
                }
            }
        }
        2 => {
            // REPORT CAPABILITIES: CRH, ATP_C, PTPL_C; TMV with every type; PTPL_A.
            d = vec![
                0,
                8,
                0x10 | 0x04 | 0x01,
                0x80 | 0x01,
                0x80 | 0x40 | 0x20 | 0x08 | 0x02,
                0x01,
                0,
                0,
            ];
        }
        3 => {
            // READ FULL STATUS
            d.extend_from_slice(&pr.generation.to_be_bytes());
            d.extend_from_slice(&[0; 4]);
            for (nexus, key) in &pr.registrations {
                let holder = pr.is_holder(nexus);
                let mut desc = Vec::with_capacity(64);
                desc.extend_from_slice(&key.to_be_bytes());
                desc.extend_from_slice(&[0; 4]);
                desc.push(0x02 | u8::from(holder)); // ALL_TG_PT: one target port
                desc.push(if holder {
                    pr.reservation.as_ref().map_or(0, |r| r.kind & 0x0f)
                } else {
                    0
                });
                desc.extend_from_slice(&[0; 4]);
                desc.extend_from_slice(&ctx.fabric.portal_group().to_be_bytes());
                let tid = transport_id(nexus);
                desc.extend_from_slice(&(tid.len() as u32).to_be_bytes());
                desc.extend_from_slice(&tid);
                d.extend_from_slice(&desc);
            }
            let len = (d.len() - 8) as u32;
            d[4..8].copy_from_slice(&len.to_be_bytes());
        }
        _ => return Err(Sense::invalid_cdb_field(1, Some(4)).into()),
    }
    Ok(truncate(d, alloc))
}

/// The iSCSI TransportID of an initiator port (SPC-4 §7.6.4.6, format 01b).
fn transport_id(nexus: &str) -> Vec<u8> {
    let mut name = nexus.as_bytes().to_vec();
    name.push(0);
    while !name.len().is_multiple_of(4) || name.len() < 20 {
        name.push(0);
    }
    let mut t = vec![0x45, 0];
    t.extend_from_slice(&(name.len() as u16).to_be_bytes());
    t.extend(name);
    t
}

pub fn persistent_reserve_out(ctx: &Ctx<'_>, cdb: &[u8], reply: &mut Reply) -> CmdResult {
    let sa = cdb[1] & 0x1f;
    let scope = cdb[2] >> 4;
    let type_ = cdb[2] & 0x0f;
    let len = be32(cdb, 5) as usize;
    reply.data_out_len = len as u32;
    if sa > 7 {
        return Err(Sense::invalid_cdb_field(1, Some(4)).into());
    }
    if sa == crate::pr::action::REGISTER_AND_MOVE {
        return Err(Sense::invalid_cdb_field(1, Some(4)).into());
    }
    if len != 24 || ctx.data_out.len() < 24 {
        return Err(Sense::PARAMETER_LIST_LENGTH_ERROR.into());
    }
    let params = ProutParams::parse(&ctx.data_out[..24]).map_err(Failure::from)?;
    let mut st = ctx.lun.state();
    if st.reserve6.is_some() {
        // A SPC-2 reservation is in place: persistent reservations conflict (CRH).
        return Err(Failure::ReservationConflict);
    }
    let before = st.pr.clone();
    let effects = st.pr.apply(ctx.nexus, sa, scope, type_, &params)?;
    if st.pr != before
        && let Err(e) = ctx.lun.store().save(&ctx.lun.serial, &st.pr)
    {
        tracing::error!(lun = ctx.lun.id, error = %e, "saving persistent reservations failed");
        st.pr = before;
        return Err(Sense::INTERNAL_TARGET_FAILURE.into());
    }
    let mut aborts = Vec::new();
    for e in effects {
        match e {
            Effect::UnitAttention { nexus, sense } => push_ua(&mut st, &nexus, sense),
            Effect::AbortTasksOf { nexus } => aborts.push(nexus),
        }
    }
    drop(st);
    for n in aborts {
        ctx.fabric.abort_tasks_of(ctx.lun.id, &n);
    }
    Ok(Vec::new())
}

#[cfg(test)]
mod tests {
    use super::super::sense::status;
    use super::super::test_utils::TestFabric;

    fn prout(sa: u8, ty: u8) -> [u8; 10] {
        [0x5f, sa, ty, 0, 0, 0, 0, 0, 24, 0]
    }

    fn params(key: u64, sa_key: u64) -> Vec<u8> {
        let mut p = vec![0u8; 24];
        p[..8].copy_from_slice(&key.to_be_bytes());
        p[8..16].copy_from_slice(&sa_key.to_be_bytes());
        p
    }

    #[test]
    fn register_reserve_and_conflict_through_cdbs() {
        let f = TestFabric::new(16);
        assert_eq!(
            f.run("a", &prout(0, 0), &params(0, 0xa)).status,
            status::GOOD
        );
        assert_eq!(
            f.run("a", &prout(1, 3), &params(0xa, 0)).status,
            status::GOOD
        );
        let keys = f.run("a", &[0x5e, 0, 0, 0, 0, 0, 0, 0, 64, 0], &[]);
        assert_eq!(&keys.data_in[4..8], &8u32.to_be_bytes());
        assert_eq!(&keys.data_in[8..16], &0xau64.to_be_bytes());
        let resv = f.run("a", &[0x5e, 1, 0, 0, 0, 0, 0, 0, 64, 0], &[]);
        assert_eq!(resv.data_in[21], 3);
        let read_b = f.run("b", &[0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0], &[]);
        assert_eq!(read_b.status, status::RESERVATION_CONFLICT);
        let bad_len = f.run(
            "a",
            &[0x5f, 0, 0, 0, 0, 0, 0, 0, 20, 0],
            &params(0xa, 0)[..20],
        );
        assert_eq!((bad_len.sense[2], bad_len.sense[12]), (5, 0x1a));
        let bad_sa = f.run("a", &[0x5e, 9, 0, 0, 0, 0, 0, 0, 64, 0], &[]);
        assert_eq!(bad_sa.status, status::CHECK_CONDITION);
    }
}
