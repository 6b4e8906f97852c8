//! The data phase (RFC 7143 §11.7-11.8, §11.16): Data-Out and Data-In segments, the R2T
//! that solicits Data-Out, and the SNACK that asks for a retransmission.

use super::{BHS_LEN, flag};
use crate::be::{be32, be64, put32, put64};

/// SCSI Data-Out (0x05), RFC 7143 §11.7.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DataOut {
    pub final_: bool,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub exp_stat_sn: u32,
    pub data_sn: u32,
    pub buffer_offset: u32,
}

/// SCSI Data-In (0x25), RFC 7143 §11.7.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DataIn {
    pub final_: bool,
    /// A: the target asks for a DataACK SNACK (ERL > 0 only).
    pub acknowledge: bool,
    pub overflow: bool,
    pub underflow: bool,
    /// S: this PDU carries the command's status (phase collapse).
    pub has_status: bool,
    pub status: u8,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub data_sn: u32,
    pub buffer_offset: u32,
    pub residual: u32,
}

/// Ready To Transfer (0x31), RFC 7143 §11.8.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct R2t {
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub r2t_sn: u32,
    pub buffer_offset: u32,
    pub desired_len: u32,
}

/// SNACK Request (0x10), RFC 7143 §11.16.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SnackRequest {
    pub kind: u8,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub exp_stat_sn: u32,
    pub beg_run: u32,
    pub run_length: u32,
}

impl DataOut {
    pub(super) fn parse(b: &[u8; BHS_LEN]) -> Self {
        Self {
            final_: b[1] & 0x80 != 0,
            lun: be64(b, 8),
            itt: be32(b, 16),
            ttt: be32(b, 20),
            exp_stat_sn: be32(b, 28),
            data_sn: be32(b, 36),
            buffer_offset: be32(b, 40),
        }
    }

    pub(super) fn write(&self, b: &mut [u8; BHS_LEN]) {
        b[1] = flag(self.final_, 0x80);
        put64(b, 8, self.lun);
        put32(b, 16, self.itt);
        put32(b, 20, self.ttt);
        put32(b, 28, self.exp_stat_sn);
        put32(b, 36, self.data_sn);
        put32(b, 40, self.buffer_offset);
    }
}

impl DataIn {
    pub(super) fn parse(b: &[u8; BHS_LEN]) -> Self {
        Self {
            final_: b[1] & 0x80 != 0,
            acknowledge: b[1] & 0x40 != 0,
            overflow: b[1] & 0x04 != 0,
            underflow: b[1] & 0x02 != 0,
            has_status: b[1] & 0x01 != 0,
            status: b[3],
            lun: be64(b, 8),
            itt: be32(b, 16),
            ttt: be32(b, 20),
            stat_sn: be32(b, 24),
            exp_cmd_sn: be32(b, 28),
            max_cmd_sn: be32(b, 32),
            data_sn: be32(b, 36),
            buffer_offset: be32(b, 40),
            residual: be32(b, 44),
        }
    }

    pub(super) fn write(&self, b: &mut [u8; BHS_LEN]) {
        b[1] = flag(self.final_, 0x80)
            | flag(self.acknowledge, 0x40)
            | flag(self.overflow, 0x04)
            | flag(self.underflow, 0x02)
            | flag(self.has_status, 0x01);
        b[3] = self.status;
        put64(b, 8, self.lun);
        put32(b, 16, self.itt);
        put32(b, 20, self.ttt);
        put32(b, 24, self.stat_sn);
        put32(b, 28, self.exp_cmd_sn);
        put32(b, 32, self.max_cmd_sn);
        put32(b, 36, self.data_sn);
        put32(b, 40, self.buffer_offset);
        put32(b, 44, self.residual);
    }
}

impl R2t {
    pub(super) fn parse(b: &[u8; BHS_LEN]) -> Self {
        Self {
            lun: be64(b, 8),
            itt: be32(b, 16),
            ttt: be32(b, 20),
            stat_sn: be32(b, 24),
            exp_cmd_sn: be32(b, 28),
            max_cmd_sn: be32(b, 32),
            r2t_sn: be32(b, 36),
            buffer_offset: be32(b, 40),
            desired_len: be32(b, 44),
        }
    }

    pub(super) fn write(&self, b: &mut [u8; BHS_LEN]) {
        b[1] = 0x80;
        put64(b, 8, self.lun);
        put32(b, 16, self.itt);
        put32(b, 20, self.ttt);
        put32(b, 24, self.stat_sn);
        put32(b, 28, self.exp_cmd_sn);
        put32(b, 32, self.max_cmd_sn);
        put32(b, 36, self.r2t_sn);
        put32(b, 40, self.buffer_offset);
        put32(b, 44, self.desired_len);
    }
}

impl SnackRequest {
    pub(super) fn parse(b: &[u8; BHS_LEN]) -> Self {
        Self {
            kind: b[1] & 0x0f,
            lun: be64(b, 8),
            itt: be32(b, 16),
            ttt: be32(b, 20),
            exp_stat_sn: be32(b, 28),
            beg_run: be32(b, 40),
            run_length: be32(b, 44),
        }
    }

    pub(super) fn write(&self, b: &mut [u8; BHS_LEN]) {
        b[1] = 0x80 | (self.kind & 0x0f);
        put64(b, 8, self.lun);
        put32(b, 16, self.itt);
        put32(b, 20, self.ttt);
        put32(b, 28, self.exp_stat_sn);
        put32(b, 40, self.beg_run);
        put32(b, 44, self.run_length);
    }
}
