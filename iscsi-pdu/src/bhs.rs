//! The 48-byte Basic Header Segment of every PDU (RFC 7143 §11), one typed struct per
//! opcode.
//!
//! [`Header::parse`] turns the 48 raw bytes into a [`Header`]; [`Header::write_to`] does the
//! reverse. TotalAHSLength and DataSegmentLength are framing fields: the frame layer
//! ([`crate::frame`]) fills them in from the AHS and data it sends, so they are not part of
//! the typed headers.

use crate::PduError;

/// Length of the Basic Header Segment.
pub const BHS_LEN: usize = 48;

/// The opcodes of RFC 7143 §11.2.1.2. Initiator opcodes are below 0x20, target opcodes
/// from 0x20 up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Opcode {
    NopOut = 0x00,
    ScsiCommand = 0x01,
    TaskMgmtRequest = 0x02,
    LoginRequest = 0x03,
    TextRequest = 0x04,
    DataOut = 0x05,
    LogoutRequest = 0x06,
    SnackRequest = 0x10,
    NopIn = 0x20,
    ScsiResponse = 0x21,
    TaskMgmtResponse = 0x22,
    LoginResponse = 0x23,
    TextResponse = 0x24,
    DataIn = 0x25,
    LogoutResponse = 0x26,
    R2t = 0x31,
    AsyncMessage = 0x32,
    Reject = 0x3f,
}

impl Opcode {
    /// The opcode in the low six bits of byte 0.
    pub fn from_byte(b: u8) -> Result<Self, PduError> {
        Ok(match b & 0x3f {
            0x00 => Self::NopOut,
            0x01 => Self::ScsiCommand,
            0x02 => Self::TaskMgmtRequest,
            0x03 => Self::LoginRequest,
            0x04 => Self::TextRequest,
            0x05 => Self::DataOut,
            0x06 => Self::LogoutRequest,
            0x10 => Self::SnackRequest,
            0x20 => Self::NopIn,
            0x21 => Self::ScsiResponse,
            0x22 => Self::TaskMgmtResponse,
            0x23 => Self::LoginResponse,
            0x24 => Self::TextResponse,
            0x25 => Self::DataIn,
            0x26 => Self::LogoutResponse,
            0x31 => Self::R2t,
            0x32 => Self::AsyncMessage,
            0x3f => Self::Reject,
            other => return Err(PduError::UnknownOpcode { opcode: other }),
        })
    }

    /// Whether an initiator sends this opcode.
    pub fn is_initiator(self) -> bool {
        (self as u8) < 0x20
    }
}

/// The reserved "no tag" value of ITT and TTT.
pub const RESERVED_TAG: u32 = 0xffff_ffff;

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

/// The framing fields every BHS carries in the same place.
pub fn total_ahs_len(bhs: &[u8; BHS_LEN]) -> usize {
    usize::from(bhs[4]) * 4
}

/// DataSegmentLength (bytes 5..8), without padding.
pub fn data_segment_len(bhs: &[u8; BHS_LEN]) -> usize {
    (usize::from(bhs[5]) << 16) | (usize::from(bhs[6]) << 8) | usize::from(bhs[7])
}

/// Sets TotalAHSLength (in bytes, a multiple of 4 below 1024) and DataSegmentLength.
pub fn set_lengths(bhs: &mut [u8; BHS_LEN], ahs_len: usize, data_len: usize) {
    debug_assert!(ahs_len.is_multiple_of(4) && ahs_len / 4 <= 255);
    debug_assert!(data_len < 1 << 24);
    bhs[4] = (ahs_len / 4) as u8;
    bhs[5] = (data_len >> 16) as u8;
    bhs[6] = (data_len >> 8) as u8;
    bhs[7] = data_len as u8;
}

/// The Initiator Task Tag (bytes 16..20) of any PDU, for Reject and logging.
pub fn itt_of(bhs: &[u8; BHS_LEN]) -> u32 {
    be32(bhs, 16)
}

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

/// A parsed BHS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    NopOut(NopOut),
    ScsiCommand(ScsiCommand),
    TaskMgmtRequest(TaskMgmtRequest),
    LoginRequest(LoginRequest),
    TextRequest(TextRequest),
    DataOut(DataOut),
    LogoutRequest(LogoutRequest),
    SnackRequest(SnackRequest),
    NopIn(NopIn),
    ScsiResponse(ScsiResponse),
    TaskMgmtResponse(TaskMgmtResponse),
    LoginResponse(LoginResponse),
    TextResponse(TextResponse),
    DataIn(DataIn),
    LogoutResponse(LogoutResponse),
    R2t(R2t),
    AsyncMessage(AsyncMessage),
    Reject(Reject),
}

impl Header {
    pub fn opcode(&self) -> Opcode {
        match self {
            Self::NopOut(_) => Opcode::NopOut,
            Self::ScsiCommand(_) => Opcode::ScsiCommand,
            Self::TaskMgmtRequest(_) => Opcode::TaskMgmtRequest,
            Self::LoginRequest(_) => Opcode::LoginRequest,
            Self::TextRequest(_) => Opcode::TextRequest,
            Self::DataOut(_) => Opcode::DataOut,
            Self::LogoutRequest(_) => Opcode::LogoutRequest,
            Self::SnackRequest(_) => Opcode::SnackRequest,
            Self::NopIn(_) => Opcode::NopIn,
            Self::ScsiResponse(_) => Opcode::ScsiResponse,
            Self::TaskMgmtResponse(_) => Opcode::TaskMgmtResponse,
            Self::LoginResponse(_) => Opcode::LoginResponse,
            Self::TextResponse(_) => Opcode::TextResponse,
            Self::DataIn(_) => Opcode::DataIn,
            Self::LogoutResponse(_) => Opcode::LogoutResponse,
            Self::R2t(_) => Opcode::R2t,
            Self::AsyncMessage(_) => Opcode::AsyncMessage,
            Self::Reject(_) => Opcode::Reject,
        }
    }

    /// Parses a BHS. Reserved fields are ignored (RFC 7143 §11.2.1: receivers must not
    /// check them); fields whose values are impossible are errors.
    pub fn parse(b: &[u8; BHS_LEN]) -> Result<Self, PduError> {
        let op = Opcode::from_byte(b[0])?;
        let imm = b[0] & 0x40 != 0;
        let f = b[1] & 0x80 != 0;
        Ok(match op {
            Opcode::NopOut => Self::NopOut(NopOut {
                immediate: imm,
                lun: be64(b, 8),
                itt: be32(b, 16),
                ttt: be32(b, 20),
                cmd_sn: be32(b, 24),
                exp_stat_sn: be32(b, 28),
            }),
            Opcode::ScsiCommand => {
                let mut cdb = [0u8; 16];
                cdb.copy_from_slice(&b[32..48]);
                Self::ScsiCommand(ScsiCommand {
                    immediate: imm,
                    final_: f,
                    read: b[1] & 0x40 != 0,
                    write: b[1] & 0x20 != 0,
                    attr: b[1] & 0x07,
                    lun: be64(b, 8),
                    itt: be32(b, 16),
                    expected_data_len: be32(b, 20),
                    cmd_sn: be32(b, 24),
                    exp_stat_sn: be32(b, 28),
                    cdb,
                })
            }
            Opcode::TaskMgmtRequest => Self::TaskMgmtRequest(TaskMgmtRequest {
                immediate: imm,
                function: b[1] & 0x7f,
                lun: be64(b, 8),
                itt: be32(b, 16),
                referenced_task_tag: be32(b, 20),
                cmd_sn: be32(b, 24),
                exp_stat_sn: be32(b, 28),
                ref_cmd_sn: be32(b, 32),
                exp_data_sn: be32(b, 36),
            }),
            Opcode::LoginRequest => {
                let mut isid = [0u8; 6];
                isid.copy_from_slice(&b[8..14]);
                Self::LoginRequest(LoginRequest {
                    transit: f,
                    continue_: b[1] & 0x40 != 0,
                    csg: (b[1] >> 2) & 3,
                    nsg: b[1] & 3,
                    version_max: b[2],
                    version_min: b[3],
                    isid,
                    tsih: be16(b, 14),
                    itt: be32(b, 16),
                    cid: be16(b, 20),
                    cmd_sn: be32(b, 24),
                    exp_stat_sn: be32(b, 28),
                })
            }
            Opcode::TextRequest => Self::TextRequest(TextRequest {
                immediate: imm,
                final_: f,
                continue_: b[1] & 0x40 != 0,
                lun: be64(b, 8),
                itt: be32(b, 16),
                ttt: be32(b, 20),
                cmd_sn: be32(b, 24),
                exp_stat_sn: be32(b, 28),
            }),
            Opcode::DataOut => Self::DataOut(DataOut {
                final_: f,
                lun: be64(b, 8),
                itt: be32(b, 16),
                ttt: be32(b, 20),
                exp_stat_sn: be32(b, 28),
                data_sn: be32(b, 36),
                buffer_offset: be32(b, 40),
            }),
            Opcode::LogoutRequest => Self::LogoutRequest(LogoutRequest {
                immediate: imm,
                reason: b[1] & 0x7f,
                itt: be32(b, 16),
                cid: be16(b, 20),
                cmd_sn: be32(b, 24),
                exp_stat_sn: be32(b, 28),
            }),
            Opcode::SnackRequest => Self::SnackRequest(SnackRequest {
                kind: b[1] & 0x0f,
                lun: be64(b, 8),
                itt: be32(b, 16),
                ttt: be32(b, 20),
                exp_stat_sn: be32(b, 28),
                beg_run: be32(b, 40),
                run_length: be32(b, 44),
            }),
            Opcode::NopIn => Self::NopIn(NopIn {
                lun: be64(b, 8),
                itt: be32(b, 16),
                ttt: be32(b, 20),
                stat_sn: be32(b, 24),
                exp_cmd_sn: be32(b, 28),
                max_cmd_sn: be32(b, 32),
            }),
            Opcode::ScsiResponse => Self::ScsiResponse(ScsiResponse {
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
            }),
            Opcode::TaskMgmtResponse => Self::TaskMgmtResponse(TaskMgmtResponse {
                response: b[2],
                itt: be32(b, 16),
                stat_sn: be32(b, 24),
                exp_cmd_sn: be32(b, 28),
                max_cmd_sn: be32(b, 32),
            }),
            Opcode::LoginResponse => {
                let mut isid = [0u8; 6];
                isid.copy_from_slice(&b[8..14]);
                Self::LoginResponse(LoginResponse {
                    transit: f,
                    continue_: b[1] & 0x40 != 0,
                    csg: (b[1] >> 2) & 3,
                    nsg: b[1] & 3,
                    version_max: b[2],
                    version_active: b[3],
                    isid,
                    tsih: be16(b, 14),
                    itt: be32(b, 16),
                    stat_sn: be32(b, 24),
                    exp_cmd_sn: be32(b, 28),
                    max_cmd_sn: be32(b, 32),
                    status_class: b[36],
                    status_detail: b[37],
                })
            }
            Opcode::TextResponse => Self::TextResponse(TextResponse {
                final_: f,
                continue_: b[1] & 0x40 != 0,
                lun: be64(b, 8),
                itt: be32(b, 16),
                ttt: be32(b, 20),
                stat_sn: be32(b, 24),
                exp_cmd_sn: be32(b, 28),
                max_cmd_sn: be32(b, 32),
            }),
            Opcode::DataIn => Self::DataIn(DataIn {
                final_: f,
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
            }),
            Opcode::LogoutResponse => Self::LogoutResponse(LogoutResponse {
                response: b[2],
                itt: be32(b, 16),
                stat_sn: be32(b, 24),
                exp_cmd_sn: be32(b, 28),
                max_cmd_sn: be32(b, 32),
                time2wait: be16(b, 40),
                time2retain: be16(b, 42),
            }),
            Opcode::R2t => Self::R2t(R2t {
                lun: be64(b, 8),
                itt: be32(b, 16),
                ttt: be32(b, 20),
                stat_sn: be32(b, 24),
                exp_cmd_sn: be32(b, 28),
                max_cmd_sn: be32(b, 32),
                r2t_sn: be32(b, 36),
                buffer_offset: be32(b, 40),
                desired_len: be32(b, 44),
            }),
            Opcode::AsyncMessage => Self::AsyncMessage(AsyncMessage {
                lun: be64(b, 8),
                stat_sn: be32(b, 24),
                exp_cmd_sn: be32(b, 28),
                max_cmd_sn: be32(b, 32),
                event: b[36],
                vcode: b[37],
                parameter1: be16(b, 38),
                parameter2: be16(b, 40),
                parameter3: be16(b, 42),
            }),
            Opcode::Reject => Self::Reject(Reject {
                reason: b[2],
                stat_sn: be32(b, 24),
                exp_cmd_sn: be32(b, 28),
                max_cmd_sn: be32(b, 32),
                data_sn: be32(b, 36),
            }),
        })
    }

    /// Writes the header into `b`, leaving TotalAHSLength and DataSegmentLength zero
    /// (see [`set_lengths`]).
    pub fn write_to(&self, b: &mut [u8; BHS_LEN]) {
        *b = [0u8; BHS_LEN];
        let op = self.opcode() as u8;
        b[0] = op;
        match self {
            Self::NopOut(h) => {
                if h.immediate {
                    b[0] |= 0x40;
                }
                b[1] = 0x80;
                put64(b, 8, h.lun);
                put32(b, 16, h.itt);
                put32(b, 20, h.ttt);
                put32(b, 24, h.cmd_sn);
                put32(b, 28, h.exp_stat_sn);
            }
            Self::ScsiCommand(h) => {
                if h.immediate {
                    b[0] |= 0x40;
                }
                b[1] = flag(h.final_, 0x80)
                    | flag(h.read, 0x40)
                    | flag(h.write, 0x20)
                    | (h.attr & 0x07);
                put64(b, 8, h.lun);
                put32(b, 16, h.itt);
                put32(b, 20, h.expected_data_len);
                put32(b, 24, h.cmd_sn);
                put32(b, 28, h.exp_stat_sn);
                b[32..48].copy_from_slice(&h.cdb);
            }
            Self::TaskMgmtRequest(h) => {
                if h.immediate {
                    b[0] |= 0x40;
                }
                b[1] = 0x80 | (h.function & 0x7f);
                put64(b, 8, h.lun);
                put32(b, 16, h.itt);
                put32(b, 20, h.referenced_task_tag);
                put32(b, 24, h.cmd_sn);
                put32(b, 28, h.exp_stat_sn);
                put32(b, 32, h.ref_cmd_sn);
                put32(b, 36, h.exp_data_sn);
            }
            Self::LoginRequest(h) => {
                b[0] |= 0x40;
                b[1] = flag(h.transit, 0x80)
                    | flag(h.continue_, 0x40)
                    | ((h.csg & 3) << 2)
                    | (h.nsg & 3);
                b[2] = h.version_max;
                b[3] = h.version_min;
                b[8..14].copy_from_slice(&h.isid);
                put16(b, 14, h.tsih);
                put32(b, 16, h.itt);
                put16(b, 20, h.cid);
                put32(b, 24, h.cmd_sn);
                put32(b, 28, h.exp_stat_sn);
            }
            Self::TextRequest(h) => {
                if h.immediate {
                    b[0] |= 0x40;
                }
                b[1] = flag(h.final_, 0x80) | flag(h.continue_, 0x40);
                put64(b, 8, h.lun);
                put32(b, 16, h.itt);
                put32(b, 20, h.ttt);
                put32(b, 24, h.cmd_sn);
                put32(b, 28, h.exp_stat_sn);
            }
            Self::DataOut(h) => {
                b[1] = flag(h.final_, 0x80);
                put64(b, 8, h.lun);
                put32(b, 16, h.itt);
                put32(b, 20, h.ttt);
                put32(b, 28, h.exp_stat_sn);
                put32(b, 36, h.data_sn);
                put32(b, 40, h.buffer_offset);
            }
            Self::LogoutRequest(h) => {
                if h.immediate {
                    b[0] |= 0x40;
                }
                b[1] = 0x80 | (h.reason & 0x7f);
                put32(b, 16, h.itt);
                put16(b, 20, h.cid);
                put32(b, 24, h.cmd_sn);
                put32(b, 28, h.exp_stat_sn);
            }
            Self::SnackRequest(h) => {
                b[1] = 0x80 | (h.kind & 0x0f);
                put64(b, 8, h.lun);
                put32(b, 16, h.itt);
                put32(b, 20, h.ttt);
                put32(b, 28, h.exp_stat_sn);
                put32(b, 40, h.beg_run);
                put32(b, 44, h.run_length);
            }
            Self::NopIn(h) => {
                b[1] = 0x80;
                put64(b, 8, h.lun);
                put32(b, 16, h.itt);
                put32(b, 20, h.ttt);
                put32(b, 24, h.stat_sn);
                put32(b, 28, h.exp_cmd_sn);
                put32(b, 32, h.max_cmd_sn);
            }
            Self::ScsiResponse(h) => {
                b[1] = 0x80
                    | flag(h.bidi_overflow, 0x10)
                    | flag(h.bidi_underflow, 0x08)
                    | flag(h.overflow, 0x04)
                    | flag(h.underflow, 0x02);
                b[2] = h.response;
                b[3] = h.status;
                put32(b, 16, h.itt);
                put32(b, 20, h.snack_tag);
                put32(b, 24, h.stat_sn);
                put32(b, 28, h.exp_cmd_sn);
                put32(b, 32, h.max_cmd_sn);
                put32(b, 36, h.exp_data_sn);
                put32(b, 40, h.bidi_residual);
                put32(b, 44, h.residual);
            }
            Self::TaskMgmtResponse(h) => {
                b[1] = 0x80;
                b[2] = h.response;
                put32(b, 16, h.itt);
                put32(b, 24, h.stat_sn);
                put32(b, 28, h.exp_cmd_sn);
                put32(b, 32, h.max_cmd_sn);
            }
            Self::LoginResponse(h) => {
                b[1] = flag(h.transit, 0x80)
                    | flag(h.continue_, 0x40)
                    | ((h.csg & 3) << 2)
                    | (h.nsg & 3);
                b[2] = h.version_max;
                b[3] = h.version_active;
                b[8..14].copy_from_slice(&h.isid);
                put16(b, 14, h.tsih);
                put32(b, 16, h.itt);
                put32(b, 24, h.stat_sn);
                put32(b, 28, h.exp_cmd_sn);
                put32(b, 32, h.max_cmd_sn);
                b[36] = h.status_class;
                b[37] = h.status_detail;
            }
            Self::TextResponse(h) => {
                b[1] = flag(h.final_, 0x80) | flag(h.continue_, 0x40);
                put64(b, 8, h.lun);
                put32(b, 16, h.itt);
                put32(b, 20, h.ttt);
                put32(b, 24, h.stat_sn);
                put32(b, 28, h.exp_cmd_sn);
                put32(b, 32, h.max_cmd_sn);
            }
            Self::DataIn(h) => {
                b[1] = flag(h.final_, 0x80)
                    | flag(h.acknowledge, 0x40)
                    | flag(h.overflow, 0x04)
                    | flag(h.underflow, 0x02)
                    | flag(h.has_status, 0x01);
                b[3] = h.status;
                put64(b, 8, h.lun);
                put32(b, 16, h.itt);
                put32(b, 20, h.ttt);
                put32(b, 24, h.stat_sn);
                put32(b, 28, h.exp_cmd_sn);
                put32(b, 32, h.max_cmd_sn);
                put32(b, 36, h.data_sn);
                put32(b, 40, h.buffer_offset);
                put32(b, 44, h.residual);
            }
            Self::LogoutResponse(h) => {
                b[1] = 0x80;
                b[2] = h.response;
                put32(b, 16, h.itt);
                put32(b, 24, h.stat_sn);
                put32(b, 28, h.exp_cmd_sn);
                put32(b, 32, h.max_cmd_sn);
                put16(b, 40, h.time2wait);
                put16(b, 42, h.time2retain);
            }
            Self::R2t(h) => {
                b[1] = 0x80;
                put64(b, 8, h.lun);
                put32(b, 16, h.itt);
                put32(b, 20, h.ttt);
                put32(b, 24, h.stat_sn);
                put32(b, 28, h.exp_cmd_sn);
                put32(b, 32, h.max_cmd_sn);
                put32(b, 36, h.r2t_sn);
                put32(b, 40, h.buffer_offset);
                put32(b, 44, h.desired_len);
            }
            Self::AsyncMessage(h) => {
                b[1] = 0x80;
                put64(b, 8, h.lun);
                put32(b, 16, RESERVED_TAG);
                put32(b, 24, h.stat_sn);
                put32(b, 28, h.exp_cmd_sn);
                put32(b, 32, h.max_cmd_sn);
                b[36] = h.event;
                b[37] = h.vcode;
                put16(b, 38, h.parameter1);
                put16(b, 40, h.parameter2);
                put16(b, 42, h.parameter3);
            }
            Self::Reject(h) => {
                b[1] = 0x80;
                b[2] = h.reason;
                put32(b, 16, RESERVED_TAG);
                put32(b, 24, h.stat_sn);
                put32(b, 28, h.exp_cmd_sn);
                put32(b, 32, h.max_cmd_sn);
                put32(b, 36, h.data_sn);
            }
        }
    }

    /// The header as 48 bytes with both length fields zero.
    pub fn to_bytes(&self) -> [u8; BHS_LEN] {
        let mut b = [0u8; BHS_LEN];
        self.write_to(&mut b);
        b
    }
}

fn flag(on: bool, bit: u8) -> u8 {
    if on { bit } else { 0 }
}

/// LUN field encoding (SAM-5 §4.7): single-level peripheral (LUN < 256) or flat space
/// (LUN < 16384) addressing in the first two bytes.
pub fn encode_lun(lun: u16) -> u64 {
    if lun < 256 {
        u64::from(lun) << 48
    } else {
        (u64::from(0x4000 | (lun & 0x3fff))) << 48
    }
}

/// Decodes the LUN field's first level; `None` for address methods we do not serve.
pub fn decode_lun(field: u64) -> Option<u16> {
    let top = (field >> 48) as u16;
    match top >> 14 {
        0 => {
            // Peripheral device addressing: bus 0 only.
            if top & 0x3f00 == 0 {
                Some(top & 0xff)
            } else {
                None
            }
        }
        1 => Some(top & 0x3fff),
        _ => None,
    }
}
