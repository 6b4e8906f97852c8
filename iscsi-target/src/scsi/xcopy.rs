//! EXTENDED COPY (LID1) and RECEIVE COPY RESULTS: copies between LUNs of this target
//! without the data crossing the network. Each block-to-block segment first asks the
//! destination device to share the source's data ([`BlockDevice::clone_range_from`]: a
//! thin pool clones chunks, a file system reflinks or copies in the kernel); only when
//! the pair cannot share does the copy manager move the data itself.

use std::sync::Arc;

use iscsi_pdu::{be16, be32, be64};

use super::sense::{Failure, Sense, sense_for};
use super::{CmdResult, Ctx, Reply, truncate};
use crate::block::BlockDevice;
use crate::lun::{CopyResult, Lun};

/// Limits reported by RECEIVE COPY RESULTS (OPERATING PARAMETERS) and enforced.
const MAX_CSCD_DESCRIPTORS: u16 = 8;
const MAX_SEGMENT_DESCRIPTORS: u16 = 8;
const MAX_DESCRIPTOR_LIST_LENGTH: u32 = 1024;
/// Most bytes one segment may copy.
const MAX_SEGMENT_BYTES: u32 = 256 << 20;
/// Chunk the copy manager moves at a time when it copies the data itself.
const COPY_CHUNK: u64 = 1 << 20;

const CSCD_IDENTIFICATION: u8 = 0xe4;
const SEGMENT_BLOCK_TO_BLOCK: u8 = 0x02;
const HEADER_LEN: usize = 16;
const CSCD_LEN: usize = 32;

/// COPY ABORTED, COPY TARGET DEVICE NOT REACHABLE.
fn unreachable() -> Failure {
    Sense::COPY_TARGET_DEVICE_NOT_REACHABLE.into()
}

/// Resolves an identification CSCD descriptor to one of the target's LUNs by its NAA or
/// T10 vendor designator.
fn resolve(ctx: &Ctx<'_>, desc: &[u8]) -> Option<Arc<Lun>> {
    let designator_type = desc[5] & 0x0f;
    let len = usize::from(desc[7]);
    if 8 + len > 28 {
        return None;
    }
    let value = &desc[8..8 + len];
    ctx.fabric
        .luns()
        .into_iter()
        .find(|l| match designator_type {
            3 => value == l.naa,
            1 => {
                let mut t10 = super::inquiry::VENDOR.to_vec();
                t10.extend_from_slice(l.serial.as_bytes());
                value == t10.as_slice()
            }
            _ => false,
        })
}

pub fn extended_copy(ctx: &Ctx<'_>, cdb: &[u8], reply: &mut Reply) -> CmdResult {
    if cdb[1] & 0x1f != 0 {
        // Only LID1 (service action 0).
        return Err(Sense::invalid_cdb_field(1, Some(4)).into());
    }
    let len = be32(cdb, 10) as usize;
    reply.data_out_len = len as u32;
    if len == 0 {
        return Ok(Vec::new());
    }
    let data = ctx.data_out;
    if len < HEADER_LEN || data.len() < len {
        return Err(Sense::PARAMETER_LIST_LENGTH_ERROR.into());
    }
    let data = &data[..len];
    let list_id = data[0];
    let list_id_usage = (data[1] >> 3) & 3;
    let cscd_len = usize::from(be16(data, 2));
    let seg_len = be32(data, 8) as usize;
    let inline_len = be32(data, 12) as usize;
    if cscd_len + seg_len > MAX_DESCRIPTOR_LIST_LENGTH as usize
        || HEADER_LEN + cscd_len + seg_len + inline_len > len
        || inline_len != 0
    {
        return Err(Sense::PARAMETER_LIST_LENGTH_ERROR.into());
    }
    if cscd_len % CSCD_LEN != 0 {
        return Err(Sense::PARAMETER_LIST_LENGTH_ERROR.into());
    }
    let cscds = &data[HEADER_LEN..HEADER_LEN + cscd_len];
    let segs = &data[HEADER_LEN + cscd_len..HEADER_LEN + cscd_len + seg_len];
    if cscds.len() / CSCD_LEN > usize::from(MAX_CSCD_DESCRIPTORS) {
        return Err(Sense::TOO_MANY_TARGET_DESCRIPTORS.into());
    }
    // Walk the segment list once to count and type-check it.
    let mut segments = Vec::new();
    let mut at = 0;
    while at < segs.len() {
        if segs.len() - at < 4 {
            return Err(Sense::PARAMETER_LIST_LENGTH_ERROR.into());
        }
        let d_len = 4 + usize::from(be16(segs, at + 2));
        if at + d_len > segs.len() {
            return Err(Sense::PARAMETER_LIST_LENGTH_ERROR.into());
        }
        segments.push(&segs[at..at + d_len]);
        at += d_len;
    }
    if segments.len() > usize::from(MAX_SEGMENT_DESCRIPTORS) {
        return Err(Sense::TOO_MANY_SEGMENT_DESCRIPTORS.into());
    }
    let mut luns = Vec::new();
    for d in cscds.chunks(CSCD_LEN) {
        if d[0] != CSCD_IDENTIFICATION {
            return Err(Sense::UNSUPPORTED_TARGET_DESCRIPTOR_TYPE.into());
        }
        // Peripheral device type must be block (0); the LU ID type is ignored (SPC-4).
        if d[1] & 0x1f != 0 {
            return Err(Sense::invalid_param_field(0, None).into());
        }
        luns.push(resolve(ctx, d));
    }
    for s in &segments {
        if s[0] != SEGMENT_BLOCK_TO_BLOCK {
            return Err(Sense::UNSUPPORTED_SEGMENT_DESCRIPTOR_TYPE.into());
        }
        if s.len() < 28 {
            return Err(Sense::PARAMETER_LIST_LENGTH_ERROR.into());
        }
    }
    let mut result = CopyResult {
        status: 0,
        segments_processed: 0,
        transfer_count_blocks: 0,
    };
    let outcome = run_segments(&luns, &segments, &mut result);
    // COPY MANAGER STATUS: 01h completed without errors, 02h completed with errors.
    result.status = if outcome.is_ok() { 1 } else { 2 };
    // LIST ID USAGE 11b: the initiator will not ask for the results.
    if list_id_usage != 3 {
        let mut st = ctx.lun.state();
        if st.copy_results.len() >= 64 {
            // Keep the table bounded: drop the oldest entry.
            if let Some(k) = st.copy_results.keys().next().cloned() {
                st.copy_results.remove(&k);
            }
        }
        st.copy_results
            .insert((ctx.nexus.to_owned(), list_id), result);
    }
    outcome.map(|()| Vec::new())
}

fn run_segments(
    luns: &[Option<Arc<Lun>>],
    segments: &[&[u8]],
    result: &mut CopyResult,
) -> Result<(), Failure> {
    for s in segments {
        let dc = s[1] & 0x02 != 0;
        let src_i = usize::from(be16(s, 4));
        let dst_i = usize::from(be16(s, 6));
        let blocks = u64::from(be16(s, 10));
        let src_lba = be64(s, 12);
        let dst_lba = be64(s, 20);
        let (Some(Some(src)), Some(Some(dst))) = (luns.get(src_i), luns.get(dst_i)) else {
            return Err(unreachable());
        };
        if dst.device.read_only() || dst.state().mode.swp {
            return Err(Sense::WRITE_PROTECTED.into());
        }
        let (sbs, dbs) = (u64::from(src.block_size()), u64::from(dst.block_size()));
        // With DC set the count is in destination blocks, else in source blocks.
        let bytes = if dc { blocks * dbs } else { blocks * sbs };
        if bytes % sbs != 0 || bytes % dbs != 0 || bytes > u64::from(MAX_SEGMENT_BYTES) {
            return Err(Sense::invalid_param_field(10, None).into());
        }
        if src_lba
            .checked_add(bytes / sbs)
            .is_none_or(|e| e > src.blocks())
            || dst_lba
                .checked_add(bytes / dbs)
                .is_none_or(|e| e > dst.blocks())
        {
            // The segment reaches past a copy target: the copy is aborted (SPC-4 §6.4.3.2).
            return Err(Sense::new(super::sense::key::COPY_ABORTED, 0, 0).into());
        }
        // Only now: the LBAs are the initiator's, and on the medium the offsets fit.
        let (so, doff) = (src_lba * sbs, dst_lba * dbs);
        if bytes > 0 {
            copy(&*src.device, dst, so, doff, bytes)?;
        }
        result.segments_processed += 1;
        result.transfer_count_blocks += bytes / dbs;
    }
    Ok(())
}

fn copy(src: &dyn BlockDevice, dst: &Lun, so: u64, doff: u64, bytes: u64) -> Result<(), Failure> {
    let _range = dst.writes.lock(doff, bytes);
    let io = |e| Failure::from(sense_for(&e, false));
    if dst
        .device
        .clone_range_from(src, so, doff, bytes)
        .map_err(io)?
    {
        return Ok(());
    }
    let mut buf = vec![0u8; bytes.min(COPY_CHUNK) as usize];
    let mut done = 0;
    while done < bytes {
        let n = (bytes - done).min(COPY_CHUNK) as usize;
        src.read_at(so + done, &mut buf[..n])
            .map_err(|e| Failure::from(sense_for(&e, true)))?;
        dst.device.write_at(doff + done, &buf[..n]).map_err(io)?;
        done += n as u64;
    }
    Ok(())
}

pub fn receive_copy_results(ctx: &Ctx<'_>, cdb: &[u8]) -> CmdResult {
    let sa = cdb[1] & 0x1f;
    let list_id = cdb[2];
    let alloc = be32(cdb, 10) as usize;
    match sa {
        0 => {
            // COPY STATUS
            let Some(r) = ctx
                .lun
                .state()
                .copy_results
                .get(&(ctx.nexus.to_owned(), list_id))
                .copied()
            else {
                return Err(Sense::invalid_cdb_field(2, None).into());
            };
            let mut d = vec![0u8; 12];
            d[..4].copy_from_slice(&8u32.to_be_bytes());
            d[4] = r.status & 0x7f;
            d[5..7].copy_from_slice(&r.segments_processed.to_be_bytes());
            // TRANSFER COUNT in bytes (units 00h) when it fits, else in KiB (F1h).
            let bytes = r.transfer_count_blocks * u64::from(ctx.lun.block_size());
            if let Ok(b) = u32::try_from(bytes) {
                d[7] = 0x00;
                d[8..12].copy_from_slice(&b.to_be_bytes());
            } else {
                d[7] = 0xf1;
                let kib = u32::try_from(bytes >> 10).unwrap_or(u32::MAX);
                d[8..12].copy_from_slice(&kib.to_be_bytes());
            }
            Ok(truncate(d, alloc))
        }
        3 => {
            // OPERATING PARAMETERS
            let mut d = vec![0u8; 46];
            let avail = (d.len() - 4) as u32;
            d[..4].copy_from_slice(&avail.to_be_bytes());
            d[4] = 0x01; // SNLID: copies without a list id are supported
            d[8..10].copy_from_slice(&MAX_CSCD_DESCRIPTORS.to_be_bytes());
            d[10..12].copy_from_slice(&MAX_SEGMENT_DESCRIPTORS.to_be_bytes());
            d[12..16].copy_from_slice(&MAX_DESCRIPTOR_LIST_LENGTH.to_be_bytes());
            d[16..20].copy_from_slice(&MAX_SEGMENT_BYTES.to_be_bytes());
            // Inline data, held data and stream devices: not supported (zeros).
            d[34..36].copy_from_slice(&1u16.to_be_bytes()); // total concurrent copies
            d[36] = 1; // maximum concurrent copies
            d[37] = ctx.lun.block_size().trailing_zeros() as u8; // data segment granularity
            d[43] = 2;
            d[44] = SEGMENT_BLOCK_TO_BLOCK;
            d[45] = CSCD_IDENTIFICATION;
            Ok(truncate(d, alloc))
        }
        _ => Err(Sense::invalid_cdb_field(1, Some(4)).into()),
    }
}

/// Whether sense data is a COPY ABORTED (for tests).
#[cfg(test)]
fn is_copy_aborted(sense: &[u8]) -> bool {
    sense
        .get(2)
        .is_some_and(|k| k & 0x0f == super::sense::key::COPY_ABORTED)
}

#[cfg(test)]
mod tests {
    use super::super::sense::status;
    use super::super::test_utils::TestFabric;
    use super::*;

    fn xcopy_params(naa: &[u8; 16], src_index: u16, blocks: u16, src: u64, dst: u64) -> Vec<u8> {
        let mut p = vec![0u8; HEADER_LEN];
        p[0] = 7;
        p[2..4].copy_from_slice(&(CSCD_LEN as u16).to_be_bytes());
        p[8..12].copy_from_slice(&28u32.to_be_bytes());
        let mut cscd = vec![0u8; CSCD_LEN];
        cscd[0] = CSCD_IDENTIFICATION;
        cscd[4] = 0x01;
        cscd[5] = 0x03;
        cscd[7] = 16;
        cscd[8..24].copy_from_slice(naa);
        cscd[30] = 0x02; // block size 512
        p.extend(cscd);
        let mut seg = vec![0u8; 28];
        seg[0] = SEGMENT_BLOCK_TO_BLOCK;
        seg[3] = 24;
        seg[4..6].copy_from_slice(&src_index.to_be_bytes());
        seg[10..12].copy_from_slice(&blocks.to_be_bytes());
        seg[12..20].copy_from_slice(&src.to_be_bytes());
        seg[20..28].copy_from_slice(&dst.to_be_bytes());
        p.extend(seg);
        p
    }

    fn cdb(len: usize) -> [u8; 16] {
        let mut c = [0u8; 16];
        c[0] = 0x83;
        c[10..14].copy_from_slice(&(len as u32).to_be_bytes());
        c
    }

    #[test]
    fn copies_within_a_lun_and_reports_status() {
        let f = TestFabric::new(64);
        let naa = f.luns[0].naa;
        f.run("a", &[0x2a, 0, 0, 0, 0, 0, 0, 0, 4, 0], &[0xabu8; 2048]);
        let p = xcopy_params(&naa, 0, 4, 0, 32);
        let r = f.run("a", &cdb(p.len()), &p);
        assert_eq!(r.status, status::GOOD, "{:?}", r.sense);
        let back = f.run("a", &[0x28, 0, 0, 0, 0, 32, 0, 0, 4, 0], &[]);
        assert_eq!(back.data_in, vec![0xabu8; 2048]);
        let mut rcr = [0u8; 16];
        rcr[0] = 0x84;
        rcr[2] = 7;
        rcr[13] = 64;
        let st = f.run("a", &rcr, &[]);
        assert_eq!(st.status, status::GOOD);
        assert_eq!(st.data_in[4], 1);
        assert_eq!(&st.data_in[5..7], &1u16.to_be_bytes());
        // Another nexus has no result under that list id.
        assert_eq!(f.run("b", &rcr, &[]).status, status::CHECK_CONDITION);
    }

    #[test]
    fn unknown_copy_targets_and_bad_indexes_abort_the_copy() {
        let f = TestFabric::new(64);
        let p = xcopy_params(&[0x60; 16], 0, 4, 0, 32);
        let r = f.run("a", &cdb(p.len()), &p);
        assert!(is_copy_aborted(&r.sense));
        let p = xcopy_params(&f.luns[0].naa, 3, 4, 0, 32);
        let r = f.run("a", &cdb(p.len()), &p);
        assert!(is_copy_aborted(&r.sense));
        let r = f.run("a", &cdb(8), &[0u8; 8]);
        assert_eq!((r.sense[2], r.sense[12]), (5, 0x1a));
    }

    /// Found by the `scsi` fuzz target: a segment's LBA times the block size overflowed
    /// before the range check (a panic where overflow checks are on).
    #[test]
    fn an_lba_whose_byte_offset_overflows_aborts_the_copy_and_writes_nothing() {
        let f = TestFabric::new(64);
        let naa = f.luns[0].naa;
        f.run("a", &[0x2a, 0, 0, 0, 0, 0, 0, 0, 4, 0], &[0xabu8; 2048]);
        for (src, dst) in [
            (u64::MAX, 0),
            (0, u64::MAX),
            (1 << 55, 8),
            (8, u64::MAX / 512 + 1),
        ] {
            let p = xcopy_params(&naa, 0, 4, src, dst);
            let r = f.run("a", &cdb(p.len()), &p);
            assert_eq!(r.status, status::CHECK_CONDITION, "{src:#x} -> {dst:#x}");
            assert!(
                is_copy_aborted(&r.sense),
                "{src:#x} -> {dst:#x}: {:?}",
                r.sense
            );
        }
        let back = f.run("a", &[0x28, 0, 0, 0, 0, 8, 0, 0, 4, 0], &[]);
        assert_eq!(back.data_in, vec![0u8; 2048]);
    }
}
