//! SCSI Command and SCSI Response PDUs (RFC 7143 §11.3-11.4): a CDB going out, its
//! status and residuals coming back.

use super::{BHS_LEN, flag};
use crate::be::{be32, be64, put32, put64};

/// SCSI Command (0x01), RFC 7143 §11.3.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScsiCommand {
    pub immediate: bool,
    /// F: no unsolicited Data-Out follows.
    pub final_: bool,
    pub read: bool,
    pub write: bool,
    /// Task attribute (0 untagged, 1 simple, 2 ordered, 3 head of queue, 4 ACA).
    pub attr: u8,
    pub lun: u64,
    pub itt: u32,
    pub expected_data_len: u32,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
    pub cdb: [u8; 16],
}

/// SCSI Response (0x21), RFC 7143 §11.4.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ScsiResponse {
    pub bidi_overflow: bool,
    pub bidi_underflow: bool,
    pub overflow: bool,
    pub underflow: bool,
    /// 0 = command completed at target; 1 = target failure.
    pub response: u8,
    pub status: u8,
    pub itt: u32,
    pub snack_tag: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub exp_data_sn: u32,
    pub bidi_residual: u32,
    pub residual: u32,
}

impl ScsiCommand {
    pub(super) fn parse(b: &[u8; BHS_LEN]) -> Self {
        let mut cdb = [0u8; 16];
        cdb.copy_from_slice(&b[32..48]);
        Self {
            immediate: b[0] & 0x40 != 0,
            final_: b[1] & 0x80 != 0,
            read: b[1] & 0x40 != 0,
            write: b[1] & 0x20 != 0,
            attr: b[1] & 0x07,
            lun: be64(b, 8),
            itt: be32(b, 16),
            expected_data_len: be32(b, 20),
            cmd_sn: be32(b, 24),
            exp_stat_sn: be32(b, 28),
            cdb,
        }
    }

    pub(super) fn write(&self, b: &mut [u8; BHS_LEN]) {
        b[0] |= flag(self.immediate, 0x40);
        b[1] = flag(self.final_, 0x80)
            | flag(self.read, 0x40)
            | flag(self.write, 0x20)
            | (self.attr & 0x07);
        put64(b, 8, self.lun);
        put32(b, 16, self.itt);
        put32(b, 20, self.expected_data_len);
        put32(b, 24, self.cmd_sn);
        put32(b, 28, self.exp_stat_sn);
        b[32..48].copy_from_slice(&self.cdb);
    }
}

impl ScsiResponse {
    pub(super) fn parse(b: &[u8; BHS_LEN]) -> Self {
        Self {
            bidi_overflow: b[1] & 0x10 != 0,
            bidi_underflow: b[1] & 0x08 != 0,
            overflow: b[1] & 0x04 != 0,
            underflow: b[1] & 0x02 != 0,
            response: b[2],
            status: b[3],
            itt: be32(b, 16),
            snack_tag: be32(b, 20),
            stat_sn: be32(b, 24),
            exp_cmd_sn: be32(b, 28),
            max_cmd_sn: be32(b, 32),
            exp_data_sn: be32(b, 36),
            bidi_residual: be32(b, 40),
            residual: be32(b, 44),
        }
    }

    pub(super) fn write(&self, b: &mut [u8; BHS_LEN]) {
        b[1] = 0x80
            | flag(self.bidi_overflow, 0x10)
            | flag(self.bidi_underflow, 0x08)
            | flag(self.overflow, 0x04)
            | flag(self.underflow, 0x02);
        b[2] = self.response;
        b[3] = self.status;
        put32(b, 16, self.itt);
        put32(b, 20, self.snack_tag);
        put32(b, 24, self.stat_sn);
        put32(b, 28, self.exp_cmd_sn);
        put32(b, 32, self.max_cmd_sn);
        put32(b, 36, self.exp_data_sn);
        put32(b, 40, self.bidi_residual);
        put32(b, 44, self.residual);
    }
}
