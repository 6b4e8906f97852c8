//! The PDUs that keep a session alive or end it (RFC 7143 §11.9, §11.14-11.15,
//! §11.17-11.19): NOP ping and answer, Asynchronous Message, Logout, and Reject.

use super::{BHS_LEN, RESERVED_TAG, flag};
use crate::be::{be16, be32, be64, put16, put32, put64};

/// NOP-Out (0x00), RFC 7143 §11.18.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NopOut {
    pub immediate: bool,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
}

/// NOP-In (0x20), RFC 7143 §11.19.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NopIn {
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
}

/// Asynchronous Message (0x32), RFC 7143 §11.9.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AsyncMessage {
    pub lun: u64,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub event: u8,
    pub vcode: u8,
    pub parameter1: u16,
    pub parameter2: u16,
    pub parameter3: u16,
}

/// Async events (§11.9.1).
pub mod async_event {
    pub const SCSI_ASYNC_EVENT: u8 = 0;
    pub const LOGOUT_REQUEST: u8 = 1;
    pub const DROPPING_CONNECTION: u8 = 2;
    pub const DROPPING_ALL_CONNECTIONS: u8 = 3;
    pub const RENEGOTIATE: u8 = 4;
}

/// Logout Request (0x06), RFC 7143 §11.14.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LogoutRequest {
    pub immediate: bool,
    /// 0 close session, 1 close connection, 2 remove connection for recovery.
    pub reason: u8,
    pub itt: u32,
    pub cid: u16,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
}

/// Logout Response (0x26), RFC 7143 §11.15.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LogoutResponse {
    /// 0 closed successfully, 1 CID not found, 2 recovery not supported, 3 cleanup failed.
    pub response: u8,
    pub itt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub time2wait: u16,
    pub time2retain: u16,
}

/// Reject (0x3f), RFC 7143 §11.17. The data segment carries the rejected header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Reject {
    pub reason: u8,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub data_sn: u32,
}

/// Reject reasons (§11.17.1).
pub mod reject_reason {
    pub const DATA_DIGEST_ERROR: u8 = 0x02;
    pub const SNACK_REJECT: u8 = 0x03;
    pub const PROTOCOL_ERROR: u8 = 0x04;
    pub const COMMAND_NOT_SUPPORTED: u8 = 0x05;
    pub const IMMEDIATE_COMMAND_REJECT: u8 = 0x06;
    pub const TASK_IN_PROGRESS: u8 = 0x07;
    pub const INVALID_DATA_ACK: u8 = 0x08;
    pub const INVALID_PDU_FIELD: u8 = 0x09;
    pub const LONG_OPERATION_REJECT: u8 = 0x0a;
    pub const NEGOTIATION_RESET: u8 = 0x0b;
    pub const WAITING_FOR_LOGOUT: u8 = 0x0c;
}

impl NopOut {
    pub(super) fn parse(b: &[u8; BHS_LEN]) -> Self {
        Self {
            immediate: b[0] & 0x40 != 0,
            lun: be64(b, 8),
            itt: be32(b, 16),
            ttt: be32(b, 20),
            cmd_sn: be32(b, 24),
            exp_stat_sn: be32(b, 28),
        }
    }

    pub(super) fn write(&self, b: &mut [u8; BHS_LEN]) {
        b[0] |= flag(self.immediate, 0x40);
        b[1] = 0x80;
        put64(b, 8, self.lun);
        put32(b, 16, self.itt);
        put32(b, 20, self.ttt);
        put32(b, 24, self.cmd_sn);
        put32(b, 28, self.exp_stat_sn);
    }
}

impl NopIn {
    pub(super) fn parse(b: &[u8; BHS_LEN]) -> Self {
        Self {
            lun: be64(b, 8),
            itt: be32(b, 16),
            ttt: be32(b, 20),
            stat_sn: be32(b, 24),
            exp_cmd_sn: be32(b, 28),
            max_cmd_sn: be32(b, 32),
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
    }
}

impl AsyncMessage {
    pub(super) fn parse(b: &[u8; BHS_LEN]) -> Self {
        Self {
            lun: be64(b, 8),
            stat_sn: be32(b, 24),
            exp_cmd_sn: be32(b, 28),
            max_cmd_sn: be32(b, 32),
            event: b[36],
            vcode: b[37],
            parameter1: be16(b, 38),
            parameter2: be16(b, 40),
            parameter3: be16(b, 42),
        }
    }

    pub(super) fn write(&self, b: &mut [u8; BHS_LEN]) {
        b[1] = 0x80;
        put64(b, 8, self.lun);
        put32(b, 16, RESERVED_TAG);
        put32(b, 24, self.stat_sn);
        put32(b, 28, self.exp_cmd_sn);
        put32(b, 32, self.max_cmd_sn);
        b[36] = self.event;
        b[37] = self.vcode;
        put16(b, 38, self.parameter1);
        put16(b, 40, self.parameter2);
        put16(b, 42, self.parameter3);
    }
}

impl LogoutRequest {
    pub(super) fn parse(b: &[u8; BHS_LEN]) -> Self {
        Self {
            immediate: b[0] & 0x40 != 0,
            reason: b[1] & 0x7f,
            itt: be32(b, 16),
            cid: be16(b, 20),
            cmd_sn: be32(b, 24),
            exp_stat_sn: be32(b, 28),
        }
    }

    pub(super) fn write(&self, b: &mut [u8; BHS_LEN]) {
        b[0] |= flag(self.immediate, 0x40);
        b[1] = 0x80 | (self.reason & 0x7f);
        put32(b, 16, self.itt);
        put16(b, 20, self.cid);
        put32(b, 24, self.cmd_sn);
        put32(b, 28, self.exp_stat_sn);
    }
}

impl LogoutResponse {
    pub(super) fn parse(b: &[u8; BHS_LEN]) -> Self {
        Self {
            response: b[2],
            itt: be32(b, 16),
            stat_sn: be32(b, 24),
            exp_cmd_sn: be32(b, 28),
            max_cmd_sn: be32(b, 32),
            time2wait: be16(b, 40),
            time2retain: be16(b, 42),
        }
    }

    pub(super) fn write(&self, b: &mut [u8; BHS_LEN]) {
        b[1] = 0x80;
        b[2] = self.response;
        put32(b, 16, self.itt);
        put32(b, 24, self.stat_sn);
        put32(b, 28, self.exp_cmd_sn);
        put32(b, 32, self.max_cmd_sn);
        put16(b, 40, self.time2wait);
        put16(b, 42, self.time2retain);
    }
}

impl Reject {
    pub(super) fn parse(b: &[u8; BHS_LEN]) -> Self {
        Self {
            reason: b[2],
            stat_sn: be32(b, 24),
            exp_cmd_sn: be32(b, 28),
            max_cmd_sn: be32(b, 32),
            data_sn: be32(b, 36),
        }
    }

    pub(super) fn write(&self, b: &mut [u8; BHS_LEN]) {
        b[1] = 0x80;
        b[2] = self.reason;
        put32(b, 16, RESERVED_TAG);
        put32(b, 24, self.stat_sn);
        put32(b, 28, self.exp_cmd_sn);
        put32(b, 32, self.max_cmd_sn);
        put32(b, 36, self.data_sn);
    }
}
