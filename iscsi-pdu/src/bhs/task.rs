//! Task Management Function Request and Response (RFC 7143 §11.5-11.6): aborts and
//! resets, with the function and response codes.

use super::{BHS_LEN, flag};
use crate::be::{be32, be64, put32, put64};

/// Task Management Function Request (0x02), RFC 7143 §11.5.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskMgmtRequest {
    pub immediate: bool,
    pub function: u8,
    pub lun: u64,
    pub itt: u32,
    pub referenced_task_tag: u32,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
    pub ref_cmd_sn: u32,
    pub exp_data_sn: u32,
}

/// Task management functions (RFC 7143 §11.5.1).
pub mod tmf {
    pub const ABORT_TASK: u8 = 1;
    pub const ABORT_TASK_SET: u8 = 2;
    pub const CLEAR_ACA: u8 = 3;
    pub const CLEAR_TASK_SET: u8 = 4;
    pub const LOGICAL_UNIT_RESET: u8 = 5;
    pub const TARGET_WARM_RESET: u8 = 6;
    pub const TARGET_COLD_RESET: u8 = 7;
    pub const TASK_REASSIGN: u8 = 8;

    /// Responses (§11.6.1).
    pub const FUNCTION_COMPLETE: u8 = 0;
    pub const TASK_DOES_NOT_EXIST: u8 = 1;
    pub const LUN_DOES_NOT_EXIST: u8 = 2;
    pub const TASK_STILL_ALLEGIANT: u8 = 3;
    pub const REASSIGNMENT_NOT_SUPPORTED: u8 = 4;
    pub const FUNCTION_NOT_SUPPORTED: u8 = 5;
    pub const AUTHORIZATION_FAILED: u8 = 6;
    pub const FUNCTION_REJECTED: u8 = 255;
}

/// Task Management Function Response (0x22), RFC 7143 §11.6.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TaskMgmtResponse {
    pub response: u8,
    pub itt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
}

impl TaskMgmtRequest {
    pub(super) fn parse(b: &[u8; BHS_LEN]) -> Self {
        Self {
            immediate: b[0] & 0x40 != 0,
            function: b[1] & 0x7f,
            lun: be64(b, 8),
            itt: be32(b, 16),
            referenced_task_tag: be32(b, 20),
            cmd_sn: be32(b, 24),
            exp_stat_sn: be32(b, 28),
            ref_cmd_sn: be32(b, 32),
            exp_data_sn: be32(b, 36),
        }
    }

    pub(super) fn write(&self, b: &mut [u8; BHS_LEN]) {
        b[0] |= flag(self.immediate, 0x40);
        b[1] = 0x80 | (self.function & 0x7f);
        put64(b, 8, self.lun);
        put32(b, 16, self.itt);
        put32(b, 20, self.referenced_task_tag);
        put32(b, 24, self.cmd_sn);
        put32(b, 28, self.exp_stat_sn);
        put32(b, 32, self.ref_cmd_sn);
        put32(b, 36, self.exp_data_sn);
    }
}

impl TaskMgmtResponse {
    pub(super) fn parse(b: &[u8; BHS_LEN]) -> Self {
        Self {
            response: b[2],
            itt: be32(b, 16),
            stat_sn: be32(b, 24),
            exp_cmd_sn: be32(b, 28),
            max_cmd_sn: be32(b, 32),
        }
    }

    pub(super) fn write(&self, b: &mut [u8; BHS_LEN]) {
        b[1] = 0x80;
        b[2] = self.response;
        put32(b, 16, self.itt);
        put32(b, 24, self.stat_sn);
        put32(b, 28, self.exp_cmd_sn);
        put32(b, 32, self.max_cmd_sn);
    }
}
