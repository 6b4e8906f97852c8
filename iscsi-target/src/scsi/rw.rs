//! READ, WRITE, WRITE AND VERIFY, VERIFY (6/10/12/16) and PRE-FETCH (10/16).

use iscsi_pdu::scsi::opcode;
use iscsi_pdu::{be16, be32, be64};

use super::sense::{Failure, Sense, sense_for};
use super::{CmdResult, Ctx, MAX_TRANSFER_BYTES, Reply, check_lba, check_writable};

/// The fields a block command carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockCdb {
    pub lba: u64,
    pub blocks: u64,
    /// RDPROTECT / WRPROTECT / VRPROTECT.
    pub protect: u8,
    pub fua: bool,
    /// BYTCHK for VERIFY and WRITE AND VERIFY.
    pub bytchk: u8,
}

/// Decodes LBA, length and flags of any READ/WRITE/VERIFY/PRE-FETCH variant.
pub fn parse(cdb: &[u8]) -> BlockCdb {
    let flags = cdb[1];
    let (lba, blocks) = match cdb[0] {
        opcode::READ_6 | opcode::WRITE_6 => {
            let lba = u64::from(u32::from_be_bytes([0, cdb[1] & 0x1f, cdb[2], cdb[3]]));
            let n = if cdb[4] == 0 { 256 } else { u64::from(cdb[4]) };
            (lba, n)
        }
        opcode::READ_12 | opcode::WRITE_12 | opcode::VERIFY_12 | opcode::WRITE_VERIFY_12 => {
            (u64::from(be32(cdb, 2)), u64::from(be32(cdb, 6)))
        }
        opcode::READ_16
        | opcode::WRITE_16
        | opcode::ORWRITE_16
        | opcode::VERIFY_16
        | opcode::WRITE_VERIFY_16
        | opcode::PRE_FETCH_16
        | opcode::SYNCHRONIZE_CACHE_16 => (be64(cdb, 2), u64::from(be32(cdb, 10))),
        _ => (u64::from(be32(cdb, 2)), u64::from(be16(cdb, 7))),
    };
    let six = matches!(cdb[0], opcode::READ_6 | opcode::WRITE_6);
    BlockCdb {
        lba,
        blocks,
        protect: if six { 0 } else { flags >> 5 },
        fua: !six && flags & 0x08 != 0,
        bytchk: if six { 0 } else { (flags >> 1) & 3 },
    }
}

fn check_transfer(ctx: &Ctx<'_>, c: &BlockCdb) -> Result<u64, Failure> {
    if c.protect != 0 {
        return Err(Sense::invalid_cdb_field(1, Some(7)).into());
    }
    check_lba(ctx, c.lba, c.blocks)?;
    let bytes = c.blocks * u64::from(ctx.lun.block_size());
    if bytes > MAX_TRANSFER_BYTES {
        return Err(Sense::invalid_cdb_field(7, None).into());
    }
    Ok(bytes)
}

/// READ. Reads no more than the initiator expects: the rest would be cut off anyway and
/// only counts as residual.
pub fn read(ctx: &Ctx<'_>, cdb: &[u8], reply: &mut Reply) -> CmdResult {
    let c = parse(cdb);
    let bytes = check_transfer(ctx, &c)?;
    let bs = u64::from(ctx.lun.block_size());
    reply.data_in_len = Some(bytes);
    let wanted = bytes.min(u64::from(ctx.edtl).div_ceil(bs) * bs);
    let mut buf = vec![0u8; wanted as usize];
    if wanted > 0 {
        ctx.lun
            .device
            .read_at(c.lba * bs, &mut buf)
            .map_err(|e| Failure::from(sense_for(&e, true)))?;
    }
    Ok(buf)
}

/// WRITE and WRITE AND VERIFY. Writes whole blocks of what arrived, at most what the CDB
/// asks for (an initiator that sends less gets the rest as residual, not written).
pub fn write(ctx: &Ctx<'_>, cdb: &[u8], verify: bool, reply: &mut Reply) -> CmdResult {
    let c = parse(cdb);
    if verify && c.bytchk > 1 {
        return Err(Sense::invalid_cdb_field(1, Some(2)).into());
    }
    let bytes = check_transfer(ctx, &c)?;
    reply.data_out_len = bytes as u32;
    check_writable(ctx)?;
    let bs = u64::from(ctx.lun.block_size());
    let n = (bytes.min(ctx.data_out.len() as u64) / bs) * bs;
    if n == 0 {
        return Ok(Vec::new());
    }
    let offset = c.lba * bs;
    {
        let _range = ctx.lun.writes.lock(offset, n);
        ctx.lun
            .device
            .write_at(offset, &ctx.data_out[..n as usize])
            .map_err(|e| Failure::from(sense_for(&e, false)))?;
    }
    if c.fua || verify || super::mode::write_through(ctx)? {
        ctx.lun
            .device
            .flush()
            .map_err(|e| Failure::from(sense_for(&e, false)))?;
    }
    Ok(Vec::new())
}

/// VERIFY: with BYTCHK 0 only checks the range; 1 compares the Data-Out with the medium;
/// 3 compares one block of Data-Out with every block of the range.
pub fn verify(ctx: &Ctx<'_>, cdb: &[u8], reply: &mut Reply) -> CmdResult {
    let c = parse(cdb);
    if c.bytchk == 2 {
        return Err(Sense::invalid_cdb_field(1, Some(2)).into());
    }
    let bytes = check_transfer(ctx, &c)?;
    let bs = u64::from(ctx.lun.block_size());
    if c.bytchk == 0 || bytes == 0 {
        return Ok(Vec::new());
    }
    let expected_out = if c.bytchk == 3 { bs } else { bytes };
    reply.data_out_len = expected_out as u32;
    if (ctx.data_out.len() as u64) < expected_out {
        return Err(Sense::PARAMETER_LIST_LENGTH_ERROR.into());
    }
    let mut medium = vec![0u8; bytes as usize];
    ctx.lun
        .device
        .read_at(c.lba * bs, &mut medium)
        .map_err(|e| Failure::from(sense_for(&e, true)))?;
    let mismatch = if c.bytchk == 3 {
        let pattern = &ctx.data_out[..bs as usize];
        medium.chunks(bs as usize).enumerate().find_map(|(i, blk)| {
            blk.iter()
                .zip(pattern)
                .position(|(a, b)| a != b)
                .map(|p| i * bs as usize + p)
        })
    } else {
        medium.iter().zip(ctx.data_out).position(|(a, b)| a != b)
    };
    match mismatch {
        Some(at) => Err(Sense::MISCOMPARE_DURING_VERIFY
            .with_information(at as u64)
            .into()),
        None => Ok(Vec::new()),
    }
}

/// ORWRITE(16): ORs the Data-Out into the medium, atomically with respect to other
/// writes of the range.
pub fn or_write(ctx: &Ctx<'_>, cdb: &[u8], reply: &mut Reply) -> CmdResult {
    let c = parse(cdb);
    let bytes = check_transfer(ctx, &c)?;
    reply.data_out_len = bytes as u32;
    check_writable(ctx)?;
    if bytes == 0 {
        return Ok(Vec::new());
    }
    if (ctx.data_out.len() as u64) < bytes {
        return Err(Sense::PARAMETER_LIST_LENGTH_ERROR.into());
    }
    let bs = u64::from(ctx.lun.block_size());
    let offset = c.lba * bs;
    let _range = ctx.lun.writes.lock(offset, bytes);
    let mut medium = vec![0u8; bytes as usize];
    ctx.lun
        .device
        .read_at(offset, &mut medium)
        .map_err(|e| Failure::from(sense_for(&e, true)))?;
    for (m, d) in medium.iter_mut().zip(ctx.data_out) {
        *m |= d;
    }
    ctx.lun
        .device
        .write_at(offset, &medium)
        .map_err(|e| Failure::from(sense_for(&e, false)))?;
    if c.fua || super::mode::write_through(ctx)? {
        ctx.lun
            .device
            .flush()
            .map_err(|e| Failure::from(sense_for(&e, false)))?;
    }
    Ok(Vec::new())
}

/// PRE-FETCH: the data is as close to the initiator as it gets already; checks the range.
pub fn pre_fetch(ctx: &Ctx<'_>, cdb: &[u8]) -> CmdResult {
    let c = parse(cdb);
    check_lba(ctx, c.lba, c.blocks)?;
    Ok(Vec::new())
}

#[cfg(test)]
mod tests {
    use super::super::sense::status;
    use super::super::test_utils::TestFabric;
    use super::*;

    #[test]
    fn cdb_variants_decode() {
        let c = parse(&[opcode::READ_6, 0x1f, 0xff, 0xff, 0, 0]);
        assert_eq!((c.lba, c.blocks), (0x1f_ffff, 256));
        let c = parse(&[opcode::WRITE_10, 0x08, 0, 0, 1, 0, 0, 0, 2, 0]);
        assert_eq!((c.lba, c.blocks, c.fua), (256, 2, true));
        let mut c16 = [0u8; 16];
        c16[0] = opcode::READ_16;
        c16[1] = 0x20;
        c16[9] = 7;
        c16[13] = 3;
        let c = parse(&c16);
        assert_eq!((c.lba, c.blocks, c.protect), (7, 3, 1));
    }

    #[test]
    fn write_read_verify_and_range_errors() {
        let f = TestFabric::new(64);
        let data = vec![0x5au8; 1024];
        let w = f.run("a", &[opcode::WRITE_10, 0, 0, 0, 0, 4, 0, 0, 2, 0], &data);
        assert_eq!(w.status, status::GOOD);
        let r = f.run("a", &[opcode::READ_10, 0, 0, 0, 0, 4, 0, 0, 2, 0], &[]);
        assert_eq!(r.data_in, data);
        let v = f.run(
            "a",
            &[opcode::VERIFY_10, 0x02, 0, 0, 0, 4, 0, 0, 2, 0],
            &data,
        );
        assert_eq!(v.status, status::GOOD);
        let mut other = data.clone();
        other[700] = 0;
        let v = f.run(
            "a",
            &[opcode::VERIFY_10, 0x02, 0, 0, 0, 4, 0, 0, 2, 0],
            &other,
        );
        assert_eq!(v.status, status::CHECK_CONDITION);
        assert_eq!((v.sense[2], v.sense[12]), (0x0e, 0x1d));
        assert_eq!(&v.sense[3..7], &700u32.to_be_bytes());
        let oob = f.run("a", &[opcode::READ_10, 0, 0, 0, 0, 63, 0, 0, 2, 0], &[]);
        assert_eq!((oob.sense[2], oob.sense[12]), (0x05, 0x21));
        let prot = f.run("a", &[opcode::READ_10, 0x20, 0, 0, 0, 0, 0, 0, 1, 0], &[]);
        assert_eq!((prot.sense[2], prot.sense[12]), (0x05, 0x24));
    }
}
