//! Login and Text PDUs (RFC 7143 §11.10-11.13): the headers that carry `key=value`
//! negotiation, with the login stages and status codes.

use super::{BHS_LEN, flag};
use crate::be::{be16, be32, be64, put16, put32, put64};

/// Login stages (CSG/NSG).
pub mod stage {
    pub const SECURITY: u8 = 0;
    pub const OPERATIONAL: u8 = 1;
    pub const FULL_FEATURE: u8 = 3;
}

/// Login Request (0x03), RFC 7143 §11.12.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LoginRequest {
    pub transit: bool,
    pub continue_: bool,
    pub csg: u8,
    pub nsg: u8,
    pub version_max: u8,
    pub version_min: u8,
    pub isid: [u8; 6],
    pub tsih: u16,
    pub itt: u32,
    pub cid: u16,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
}

/// Login Response (0x23), RFC 7143 §11.13.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LoginResponse {
    pub transit: bool,
    pub continue_: bool,
    pub csg: u8,
    pub nsg: u8,
    pub version_max: u8,
    pub version_active: u8,
    pub isid: [u8; 6],
    pub tsih: u16,
    pub itt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub status_class: u8,
    pub status_detail: u8,
}

/// Login status class/detail pairs (§11.13.5).
pub mod login_status {
    pub const SUCCESS: (u8, u8) = (0, 0);
    pub const TARGET_MOVED_TEMPORARILY: (u8, u8) = (1, 1);
    pub const INITIATOR_ERROR: (u8, u8) = (2, 0);
    pub const AUTHENTICATION_FAILURE: (u8, u8) = (2, 1);
    pub const AUTHORIZATION_FAILURE: (u8, u8) = (2, 2);
    pub const NOT_FOUND: (u8, u8) = (2, 3);
    pub const TARGET_REMOVED: (u8, u8) = (2, 4);
    pub const UNSUPPORTED_VERSION: (u8, u8) = (2, 5);
    pub const TOO_MANY_CONNECTIONS: (u8, u8) = (2, 6);
    pub const MISSING_PARAMETER: (u8, u8) = (2, 7);
    pub const CANT_INCLUDE_IN_SESSION: (u8, u8) = (2, 8);
    pub const SESSION_TYPE_NOT_SUPPORTED: (u8, u8) = (2, 9);
    pub const SESSION_DOES_NOT_EXIST: (u8, u8) = (2, 10);
    pub const INVALID_DURING_LOGIN: (u8, u8) = (2, 11);
    pub const TARGET_ERROR: (u8, u8) = (3, 0);
    pub const SERVICE_UNAVAILABLE: (u8, u8) = (3, 1);
    pub const OUT_OF_RESOURCES: (u8, u8) = (3, 2);
}

/// Text Request (0x04), RFC 7143 §11.10.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TextRequest {
    pub immediate: bool,
    pub final_: bool,
    pub continue_: bool,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
}

/// Text Response (0x24), RFC 7143 §11.11.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TextResponse {
    pub final_: bool,
    pub continue_: bool,
    pub lun: u64,
    pub itt: u32,
    pub ttt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
}

/// Byte 1 of both login PDUs: T, C, CSG and NSG.
fn stage_byte(transit: bool, continue_: bool, csg: u8, nsg: u8) -> u8 {
    flag(transit, 0x80) | flag(continue_, 0x40) | ((csg & 3) << 2) | (nsg & 3)
}

fn isid_of(b: &[u8; BHS_LEN]) -> [u8; 6] {
    let mut isid = [0u8; 6];
    isid.copy_from_slice(&b[8..14]);
    isid
}

impl LoginRequest {
    pub(super) fn parse(b: &[u8; BHS_LEN]) -> Self {
        Self {
            transit: b[1] & 0x80 != 0,
            continue_: b[1] & 0x40 != 0,
            csg: (b[1] >> 2) & 3,
            nsg: b[1] & 3,
            version_max: b[2],
            version_min: b[3],
            isid: isid_of(b),
            tsih: be16(b, 14),
            itt: be32(b, 16),
            cid: be16(b, 20),
            cmd_sn: be32(b, 24),
            exp_stat_sn: be32(b, 28),
        }
    }

    pub(super) fn write(&self, b: &mut [u8; BHS_LEN]) {
        // A login request is always immediate (§11.12.1).
        b[0] |= 0x40;
        b[1] = stage_byte(self.transit, self.continue_, self.csg, self.nsg);
        b[2] = self.version_max;
        b[3] = self.version_min;
        b[8..14].copy_from_slice(&self.isid);
        put16(b, 14, self.tsih);
        put32(b, 16, self.itt);
        put16(b, 20, self.cid);
        put32(b, 24, self.cmd_sn);
        put32(b, 28, self.exp_stat_sn);
    }
}

impl LoginResponse {
    pub(super) fn parse(b: &[u8; BHS_LEN]) -> Self {
        Self {
            transit: b[1] & 0x80 != 0,
            continue_: b[1] & 0x40 != 0,
            csg: (b[1] >> 2) & 3,
            nsg: b[1] & 3,
            version_max: b[2],
            version_active: b[3],
            isid: isid_of(b),
            tsih: be16(b, 14),
            itt: be32(b, 16),
            stat_sn: be32(b, 24),
            exp_cmd_sn: be32(b, 28),
            max_cmd_sn: be32(b, 32),
            status_class: b[36],
            status_detail: b[37],
        }
    }

    pub(super) fn write(&self, b: &mut [u8; BHS_LEN]) {
        b[1] = stage_byte(self.transit, self.continue_, self.csg, self.nsg);
        b[2] = self.version_max;
        b[3] = self.version_active;
        b[8..14].copy_from_slice(&self.isid);
        put16(b, 14, self.tsih);
        put32(b, 16, self.itt);
        put32(b, 24, self.stat_sn);
        put32(b, 28, self.exp_cmd_sn);
        put32(b, 32, self.max_cmd_sn);
        b[36] = self.status_class;
        b[37] = self.status_detail;
    }
}

impl TextRequest {
    pub(super) fn parse(b: &[u8; BHS_LEN]) -> Self {
        Self {
            immediate: b[0] & 0x40 != 0,
            final_: b[1] & 0x80 != 0,
            continue_: b[1] & 0x40 != 0,
            lun: be64(b, 8),
            itt: be32(b, 16),
            ttt: be32(b, 20),
            cmd_sn: be32(b, 24),
            exp_stat_sn: be32(b, 28),
        }
    }

    pub(super) fn write(&self, b: &mut [u8; BHS_LEN]) {
        b[0] |= flag(self.immediate, 0x40);
        b[1] = flag(self.final_, 0x80) | flag(self.continue_, 0x40);
        put64(b, 8, self.lun);
        put32(b, 16, self.itt);
        put32(b, 20, self.ttt);
        put32(b, 24, self.cmd_sn);
        put32(b, 28, self.exp_stat_sn);
    }
}

impl TextResponse {
    pub(super) fn parse(b: &[u8; BHS_LEN]) -> Self {
        Self {
            final_: b[1] & 0x80 != 0,
            continue_: b[1] & 0x40 != 0,
            lun: be64(b, 8),
            itt: be32(b, 16),
            ttt: be32(b, 20),
            stat_sn: be32(b, 24),
            exp_cmd_sn: be32(b, 28),
            max_cmd_sn: be32(b, 32),
        }
    }

    pub(super) fn write(&self, b: &mut [u8; BHS_LEN]) {
        b[1] = flag(self.final_, 0x80) | flag(self.continue_, 0x40);
        put64(b, 8, self.lun);
        put32(b, 16, self.itt);
        put32(b, 20, self.ttt);
        put32(b, 24, self.stat_sn);
        put32(b, 28, self.exp_cmd_sn);
        put32(b, 32, self.max_cmd_sn);
    }
}
