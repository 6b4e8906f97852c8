//! INQUIRY (SPC-4 §6.6): the standard data (who made the LUN, what kind it is) and the
//! vital product data pages: unit serial number (0x80), device identification (0x83),
//! block limits (0xB0) and logical block provisioning (0xB2).

use bytes::{Bytes, BytesMut};
use iscsi_pdu::scsi::opcode::INQUIRY;
use iscsi_pdu::{be16, be32, be64};

use super::sense::CommandInfo;
use crate::error::Error;
use crate::lun::Lun;
use crate::task::Command;

/// The CDB: standard data when `page` is `None`, else that VPD page.
pub fn cdb(page: Option<u8>, alloc: u16) -> [u8; 6] {
    let mut c = [0u8; 6];
    c[0] = INQUIRY;
    if let Some(p) = page {
        c[1] = 1;
        c[2] = p;
    }
    c[3..5].copy_from_slice(&alloc.to_be_bytes());
    c
}

/// Standard INQUIRY data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inquiry {
    /// 0: a LUN is connected here; 1: could be, is not; 3: no LUN at all.
    pub qualifier: u8,
    /// Peripheral device type: 0 disk, 0x0c storage array controller, ...
    pub device_type: u8,
    pub removable: bool,
    /// SPC version (5 = SPC-3, 6 = SPC-4).
    pub version: u8,
    /// Target port group support (ALUA).
    pub tpgs: u8,
    /// Third-party copy (EXTENDED COPY) support.
    pub third_party_copy: bool,
    pub command_queueing: bool,
    pub vendor: String,
    pub product: String,
    pub revision: String,
}

fn ascii(b: &[u8]) -> String {
    String::from_utf8_lossy(b)
        .trim_end_matches([' ', '\0'])
        .to_owned()
}

impl Inquiry {
    pub fn parse(d: &[u8]) -> Result<Self, Error> {
        if d.len() < 36 {
            return Err(Error::BadResponse {
                command: "INQUIRY",
                reason: format!("{} bytes of standard data, at least 36 needed", d.len()),
            });
        }
        Ok(Self {
            qualifier: d[0] >> 5,
            device_type: d[0] & 0x1f,
            removable: d[1] & 0x80 != 0,
            version: d[2],
            tpgs: (d[5] >> 4) & 3,
            third_party_copy: d[5] & 0x08 != 0,
            command_queueing: d[7] & 0x02 != 0,
            vendor: ascii(&d[8..16]),
            product: ascii(&d[16..32]),
            revision: ascii(&d[32..36]),
        })
    }
}

/// One designator of the device identification page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Designator {
    /// 1 T10 vendor id, 2 EUI-64, 3 NAA, 8 SCSI name string...
    pub kind: u8,
    /// 0: of the LUN; 1: of the target port; 2: of the target device.
    pub association: u8,
    pub value: Bytes,
}

/// Parses VPD page 0x83.
pub fn parse_designators(d: &[u8]) -> Vec<Designator> {
    let mut out = Vec::new();
    if d.len() < 4 {
        return out;
    }
    let end = (4 + usize::from(be16(d, 2))).min(d.len());
    let mut at = 4;
    while at + 4 <= end {
        let len = usize::from(d[at + 3]);
        if at + 4 + len > end {
            break;
        }
        out.push(Designator {
            kind: d[at + 1] & 0x0f,
            association: (d[at + 1] >> 4) & 3,
            value: Bytes::copy_from_slice(&d[at + 4..at + 4 + len]),
        });
        at += 4 + len;
    }
    out
}

/// The block limits page (0xB0). Zero means "no limit stated".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BlockLimits {
    pub max_compare_and_write_blocks: u8,
    pub optimal_granularity_blocks: u16,
    pub max_transfer_blocks: u32,
    pub optimal_transfer_blocks: u32,
    pub max_unmap_blocks: u32,
    pub max_unmap_descriptors: u32,
    pub unmap_granularity_blocks: u32,
    pub max_write_same_blocks: u64,
}

impl BlockLimits {
    pub fn parse(d: &[u8]) -> Result<Self, Error> {
        if d.len() < 16 || d[1] != 0xb0 {
            return Err(Error::BadResponse {
                command: "INQUIRY",
                reason: "block limits page cut short".into(),
            });
        }
        let get32 = |at: usize| if d.len() >= at + 4 { be32(d, at) } else { 0 };
        Ok(Self {
            max_compare_and_write_blocks: d[5],
            optimal_granularity_blocks: be16(d, 6),
            max_transfer_blocks: be32(d, 8),
            optimal_transfer_blocks: be32(d, 12),
            max_unmap_blocks: get32(20),
            max_unmap_descriptors: get32(24),
            unmap_granularity_blocks: get32(28),
            max_write_same_blocks: if d.len() >= 44 { be64(d, 36) } else { 0 },
        })
    }
}

impl Lun {
    async fn inquiry_raw(&self, page: Option<u8>, alloc: u16) -> Result<Bytes, Error> {
        let cmd =
            Command::new(self.field, &cdb(page, alloc)).with_data_in(BytesMut::new(), alloc.into());
        let out = self
            .session
            .execute(cmd, CommandInfo::named("INQUIRY"))
            .await?;
        let mut d = out.command.data_in;
        d.truncate(out.received);
        Ok(d.freeze())
    }

    /// Standard INQUIRY data.
    pub async fn inquiry(&self) -> Result<Inquiry, Error> {
        Inquiry::parse(&self.inquiry_raw(None, 255).await?)
    }

    /// A VPD page, raw (header included).
    pub async fn vpd(&self, page: u8) -> Result<Bytes, Error> {
        let d = self.inquiry_raw(Some(page), 4096).await?;
        if d.len() < 4 || d[1] != page {
            return Err(Error::BadResponse {
                command: "INQUIRY",
                reason: format!("VPD page {page:#04x} missing or mislabelled"),
            });
        }
        Ok(d)
    }

    /// The unit serial number (VPD 0x80).
    pub async fn serial(&self) -> Result<String, Error> {
        let d = self.vpd(0x80).await?;
        let len = usize::from(be16(&d, 2)).min(d.len() - 4);
        Ok(ascii(&d[4..4 + len]).trim().to_owned())
    }

    /// The designators of the device identification page (VPD 0x83).
    pub async fn device_ids(&self) -> Result<Vec<Designator>, Error> {
        Ok(parse_designators(&self.vpd(0x83).await?))
    }

    /// The block limits page (VPD 0xB0).
    pub async fn block_limits(&self) -> Result<BlockLimits, Error> {
        BlockLimits::parse(&self.vpd(0xb0).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_data() {
        let mut d = vec![0u8; 36];
        d[0] = 0x00;
        d[2] = 6;
        d[7] = 0x02;
        d[8..16].copy_from_slice(b"POOL    ");
        d[16..32].copy_from_slice(b"THIN-VOLUME     ");
        d[32..36].copy_from_slice(b"0001");
        let i = Inquiry::parse(&d).unwrap();
        assert_eq!(
            (i.vendor.as_str(), i.product.as_str()),
            ("POOL", "THIN-VOLUME")
        );
        assert!(i.command_queueing);
        assert!(Inquiry::parse(&d[..20]).is_err());
    }

    #[test]
    fn designators_and_limits() {
        let d = [0, 0x83, 0, 12, 0x01, 0x03, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8];
        let ids = parse_designators(&d);
        assert_eq!(ids.len(), 1);
        assert_eq!(ids[0].kind, 3);
        assert_eq!(&ids[0].value[..], &[1, 2, 3, 4, 5, 6, 7, 8]);
        let mut b = vec![0u8; 64];
        b[1] = 0xb0;
        b[5] = 1;
        b[8..12].copy_from_slice(&2048u32.to_be_bytes());
        b[24..28].copy_from_slice(&16u32.to_be_bytes());
        let l = BlockLimits::parse(&b).unwrap();
        assert_eq!(
            (
                l.max_compare_and_write_blocks,
                l.max_transfer_blocks,
                l.max_unmap_descriptors
            ),
            (1, 2048, 16)
        );
    }
}
