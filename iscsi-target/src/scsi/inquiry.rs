//! INQUIRY: standard data and the vital product data pages 0x00, 0x80, 0x83, 0xB0,
//! 0xB1 and 0xB2.

use iscsi_pdu::be16;

use super::sense::Sense;
use super::{CmdResult, Ctx, MAX_TRANSFER_BYTES, truncate};

pub const VENDOR: &[u8; 8] = b"POOL    ";
pub const PRODUCT: &[u8; 16] = b"THIN VOLUME     ";
pub const REVISION: &[u8; 4] = b"0001";

/// Most UNMAP descriptors and blocks per command, and most blocks per WRITE SAME
/// (reported in VPD 0xB0 and enforced).
pub const MAX_UNMAP_DESCRIPTORS: u32 = 256;
pub const MAX_UNMAP_BLOCKS: u32 = 1 << 20;
pub const MAX_WRITE_SAME_BLOCKS: u64 = 1 << 20;
/// Most blocks one COMPARE AND WRITE compares.
pub const MAX_COMPARE_AND_WRITE_BLOCKS: u8 = 255;

const PAGES: [u8; 6] = [0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2];

pub fn inquiry(ctx: &Ctx<'_>, cdb: &[u8]) -> CmdResult {
    let evpd = cdb[1] & 1 != 0;
    let page = cdb[2];
    let alloc = usize::from(be16(cdb, 3));
    if cdb[1] & 0x02 != 0 {
        // CMDDT is obsolete.
        return Err(Sense::invalid_cdb_field(1, Some(1)).into());
    }
    if !evpd {
        if page != 0 {
            return Err(Sense::invalid_cdb_field(2, None).into());
        }
        return Ok(truncate(standard(), alloc));
    }
    let body = match page {
        0x00 => PAGES.to_vec(),
        0x80 => {
            let mut s = ctx.lun.serial.as_bytes().to_vec();
            s.truncate(252);
            s
        }
        0x83 => device_identification(ctx),
        0xb0 => block_limits(ctx),
        0xb1 => {
            let mut b = vec![0u8; 60];
            b[1] = 1; // medium rotation rate: non-rotating
            b
        }
        0xb2 => provisioning(ctx),
        _ => return Err(Sense::invalid_cdb_field(2, None).into()),
    };
    let mut d = vec![0x00, page, 0, 0];
    d[2..4].copy_from_slice(&(body.len() as u16).to_be_bytes());
    d.extend_from_slice(&body);
    Ok(truncate(d, alloc))
}

fn standard() -> Vec<u8> {
    let mut d = vec![0u8; 96];
    d[0] = 0x00; // connected, direct access block device
    d[2] = 0x06; // SPC-4
    d[3] = 0x12; // HISUP, response data format 2
    d[4] = (d.len() - 5) as u8;
    d[5] = 0x08; // 3PC: EXTENDED COPY
    d[7] = 0x02; // CMDQUE
    d[8..16].copy_from_slice(VENDOR);
    d[16..32].copy_from_slice(PRODUCT);
    d[32..36].copy_from_slice(REVISION);
    // Version descriptors: SAM-5, iSCSI, SPC-4, SBC-3.
    for (i, v) in [0x00a0u16, 0x0960, 0x0460, 0x04c0].iter().enumerate() {
        d[58 + 2 * i..60 + 2 * i].copy_from_slice(&v.to_be_bytes());
    }
    d
}

fn designator(out: &mut Vec<u8>, proto_codeset: u8, piv_assoc_type: u8, value: &[u8]) {
    out.extend_from_slice(&[proto_codeset, piv_assoc_type, 0, value.len() as u8]);
    out.extend_from_slice(value);
}

fn device_identification(ctx: &Ctx<'_>) -> Vec<u8> {
    let mut d = Vec::new();
    // NAA, logical unit, binary.
    designator(&mut d, 0x01, 0x03, &ctx.lun.naa);
    // T10 vendor id: vendor ‖ serial, logical unit, ASCII.
    let mut t10 = VENDOR.to_vec();
    t10.extend_from_slice(ctx.lun.serial.as_bytes());
    t10.truncate(252);
    designator(&mut d, 0x02, 0x01, &t10);
    let tpg = ctx.fabric.portal_group();
    // Relative target port (iSCSI, PIV, target port association).
    designator(&mut d, 0x51, 0x94, &[0, 0, (tpg >> 8) as u8, tpg as u8]);
    // Target port group.
    designator(&mut d, 0x51, 0x95, &[0, 0, (tpg >> 8) as u8, tpg as u8]);
    // SCSI name string of the target device: the iSCSI name, NUL-padded to 4 bytes.
    let mut name = ctx.fabric.target_name().into_bytes();
    name.truncate(220);
    name.push(0);
    while !name.len().is_multiple_of(4) {
        name.push(0);
    }
    designator(&mut d, 0x53, 0xa8, &name);
    d
}

fn block_limits(ctx: &Ctx<'_>) -> Vec<u8> {
    let bs = u64::from(ctx.lun.block_size());
    let prov = ctx.lun.device.provisioning();
    let mut b = vec![0u8; 60];
    // Byte 0: WSNZ = 0 (WRITE SAME with zero blocks means to the end of the medium).
    b[1] = super::inquiry::MAX_COMPARE_AND_WRITE_BLOCKS;
    // Optimal transfer length granularity: one block.
    b[2..4].copy_from_slice(&1u16.to_be_bytes());
    let max_blocks = (MAX_TRANSFER_BYTES / bs) as u32;
    b[4..8].copy_from_slice(&max_blocks.to_be_bytes());
    b[8..12].copy_from_slice(&max_blocks.to_be_bytes());
    if prov.thin {
        b[16..20].copy_from_slice(&MAX_UNMAP_BLOCKS.to_be_bytes());
        b[20..24].copy_from_slice(&MAX_UNMAP_DESCRIPTORS.to_be_bytes());
        let granularity = (prov.unmap_granularity / bs).max(1) as u32;
        b[24..28].copy_from_slice(&granularity.to_be_bytes());
    }
    b[32..40].copy_from_slice(&MAX_WRITE_SAME_BLOCKS.to_be_bytes());
    b
}

fn provisioning(ctx: &Ctx<'_>) -> Vec<u8> {
    let prov = ctx.lun.device.provisioning();
    let mut b = vec![0u8; 4];
    if prov.thin {
        // LBPU, LBPWS, LBPWS10; LBPRZ when unmapped blocks read zero.
        b[1] = 0x80 | 0x40 | 0x20 | if prov.reads_zero_after_unmap { 0x04 } else { 0 };
        b[2] = 0x02; // provisioning type: thin
    }
    b
}

#[cfg(test)]
mod tests {
    use super::super::test_utils::TestFabric;
    use super::*;

    #[test]
    fn standard_and_vpd_pages() {
        let f = TestFabric::new(16);
        let r = f.run("a", &[0x12, 0, 0, 0, 96, 0], &[]);
        assert_eq!(r.data_in.len(), 96);
        assert_eq!(r.data_in[2], 6);
        assert_eq!(usize::from(r.data_in[4]) + 5, 96);
        let r = f.run("a", &[0x12, 1, 0x00, 0, 255, 0], &[]);
        assert_eq!(&r.data_in[4..], &PAGES);
        let r = f.run("a", &[0x12, 1, 0x80, 0, 255, 0], &[]);
        assert_eq!(&r.data_in[4..], b"test-serial");
        let r = f.run("a", &[0x12, 1, 0x83, 1, 0, 0], &[]);
        assert_eq!(&r.data_in[8..24], &f.luns[0].naa);
        let r = f.run("a", &[0x12, 1, 0xb0, 0, 255, 0], &[]);
        assert_eq!(r.data_in.len(), 64);
        let bad = f.run("a", &[0x12, 1, 0x42, 0, 255, 0], &[]);
        assert_eq!((bad.sense[2], bad.sense[12]), (5, 0x24));
        let short = f.run("a", &[0x12, 0, 0, 0, 5, 0], &[]);
        assert_eq!(short.data_in.len(), 5);
    }
}
