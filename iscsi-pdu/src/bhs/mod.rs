//! The 48-byte Basic Header Segment of every PDU (RFC 7143 §11), one typed struct per
//! opcode.
//!
//! [`Header::parse`] turns the 48 raw bytes into a [`Header`]; [`Header::write_to`] does the
//! reverse. TotalAHSLength and DataSegmentLength are framing fields: the frame layer
//! ([`crate::frame`]) fills them in from the AHS and data it sends, so they are not part of
//! the typed headers.
//!
//! This file holds what every opcode shares (the opcode byte, the framing fields, the
//! [`Header`] enum, the sequence numbers a target fills in, LUN encoding); each PDU family
//! has its own file with its structs, their codes, and their byte layout.

mod command;
mod data;
mod login;
mod session;
mod task;

pub use command::{ScsiCommand, ScsiResponse};
pub use data::{DataIn, DataOut, R2t, SnackRequest};
pub use login::{LoginRequest, LoginResponse, TextRequest, TextResponse, login_status, stage};
pub use session::{
    AsyncMessage, LogoutRequest, LogoutResponse, NopIn, NopOut, Reject, async_event, reject_reason,
};
pub use task::{TaskMgmtRequest, TaskMgmtResponse, tmf};

use crate::PduError;
use crate::be::be32;

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
        Ok(match Opcode::from_byte(b[0])? {
            Opcode::NopOut => Self::NopOut(NopOut::parse(b)),
            Opcode::ScsiCommand => Self::ScsiCommand(ScsiCommand::parse(b)),
            Opcode::TaskMgmtRequest => Self::TaskMgmtRequest(TaskMgmtRequest::parse(b)),
            Opcode::LoginRequest => Self::LoginRequest(LoginRequest::parse(b)),
            Opcode::TextRequest => Self::TextRequest(TextRequest::parse(b)),
            Opcode::DataOut => Self::DataOut(DataOut::parse(b)),
            Opcode::LogoutRequest => Self::LogoutRequest(LogoutRequest::parse(b)),
            Opcode::SnackRequest => Self::SnackRequest(SnackRequest::parse(b)),
            Opcode::NopIn => Self::NopIn(NopIn::parse(b)),
            Opcode::ScsiResponse => Self::ScsiResponse(ScsiResponse::parse(b)),
            Opcode::TaskMgmtResponse => Self::TaskMgmtResponse(TaskMgmtResponse::parse(b)),
            Opcode::LoginResponse => Self::LoginResponse(LoginResponse::parse(b)),
            Opcode::TextResponse => Self::TextResponse(TextResponse::parse(b)),
            Opcode::DataIn => Self::DataIn(DataIn::parse(b)),
            Opcode::LogoutResponse => Self::LogoutResponse(LogoutResponse::parse(b)),
            Opcode::R2t => Self::R2t(R2t::parse(b)),
            Opcode::AsyncMessage => Self::AsyncMessage(AsyncMessage::parse(b)),
            Opcode::Reject => Self::Reject(Reject::parse(b)),
        })
    }

    /// Writes the header into `b`, leaving TotalAHSLength and DataSegmentLength zero
    /// (see [`set_lengths`]).
    pub fn write_to(&self, b: &mut [u8; BHS_LEN]) {
        *b = [0u8; BHS_LEN];
        b[0] = self.opcode() as u8;
        match self {
            Self::NopOut(h) => h.write(b),
            Self::ScsiCommand(h) => h.write(b),
            Self::TaskMgmtRequest(h) => h.write(b),
            Self::LoginRequest(h) => h.write(b),
            Self::TextRequest(h) => h.write(b),
            Self::DataOut(h) => h.write(b),
            Self::LogoutRequest(h) => h.write(b),
            Self::SnackRequest(h) => h.write(b),
            Self::NopIn(h) => h.write(b),
            Self::ScsiResponse(h) => h.write(b),
            Self::TaskMgmtResponse(h) => h.write(b),
            Self::LoginResponse(h) => h.write(b),
            Self::TextResponse(h) => h.write(b),
            Self::DataIn(h) => h.write(b),
            Self::LogoutResponse(h) => h.write(b),
            Self::R2t(h) => h.write(b),
            Self::AsyncMessage(h) => h.write(b),
            Self::Reject(h) => h.write(b),
        }
    }

    /// The header as 48 bytes with both length fields zero.
    pub fn to_bytes(&self) -> [u8; BHS_LEN] {
        let mut b = [0u8; BHS_LEN];
        self.write_to(&mut b);
        b
    }

    /// Fills in the StatSN, ExpCmdSN and MaxCmdSN a target PDU carries, taking StatSN from
    /// `next_stat_sn` and advancing it when the PDU consumes one (RFC 7143 §4.2.2.2): every
    /// status-bearing response does; an R2T repeats the next StatSN without taking it; a
    /// Data-In without status carries none; a NOP-In takes one only when it answers a
    /// NOP-Out (a ping of our own has the reserved ITT). Initiator PDUs are left alone.
    pub fn set_sequence_numbers(
        &mut self,
        next_stat_sn: &mut u32,
        exp_cmd_sn: u32,
        max_cmd_sn: u32,
    ) {
        // The three fields, in every target PDU that has them.
        macro_rules! fields {
            ($h:expr) => {
                [&mut $h.stat_sn, &mut $h.exp_cmd_sn, &mut $h.max_cmd_sn]
            };
        }
        let (uses, [stat_sn, exp, max]) = match self {
            Self::ScsiResponse(h) => (StatSn::Take, fields!(h)),
            Self::DataIn(h) => (StatSn::take_if(h.has_status, StatSn::Zero), fields!(h)),
            Self::R2t(h) => (StatSn::Repeat, fields!(h)),
            Self::NopIn(h) => (
                StatSn::take_if(h.itt != RESERVED_TAG, StatSn::Repeat),
                fields!(h),
            ),
            Self::TaskMgmtResponse(h) => (StatSn::Take, fields!(h)),
            Self::TextResponse(h) => (StatSn::Take, fields!(h)),
            Self::LogoutResponse(h) => (StatSn::Take, fields!(h)),
            Self::Reject(h) => (StatSn::Take, fields!(h)),
            Self::AsyncMessage(h) => (StatSn::Take, fields!(h)),
            _ => return,
        };
        *stat_sn = match uses {
            StatSn::Take => {
                let sn = *next_stat_sn;
                *next_stat_sn = sn.wrapping_add(1);
                sn
            }
            StatSn::Repeat => *next_stat_sn,
            StatSn::Zero => 0,
        };
        *exp = exp_cmd_sn;
        *max = max_cmd_sn;
    }
}

/// What a target PDU's StatSN field holds.
enum StatSn {
    /// The next StatSN, which it consumes.
    Take,
    /// The next StatSN, left for the PDU that consumes it.
    Repeat,
    /// Nothing: the field is reserved in this PDU.
    Zero,
}

impl StatSn {
    fn take_if(consumes: bool, otherwise: Self) -> Self {
        if consumes { Self::Take } else { otherwise }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn numbers(h: &Header) -> (u32, u32, u32) {
        match h {
            Header::ScsiResponse(h) => (h.stat_sn, h.exp_cmd_sn, h.max_cmd_sn),
            Header::DataIn(h) => (h.stat_sn, h.exp_cmd_sn, h.max_cmd_sn),
            Header::R2t(h) => (h.stat_sn, h.exp_cmd_sn, h.max_cmd_sn),
            Header::NopIn(h) => (h.stat_sn, h.exp_cmd_sn, h.max_cmd_sn),
            Header::TaskMgmtResponse(h) => (h.stat_sn, h.exp_cmd_sn, h.max_cmd_sn),
            Header::TextResponse(h) => (h.stat_sn, h.exp_cmd_sn, h.max_cmd_sn),
            Header::LogoutResponse(h) => (h.stat_sn, h.exp_cmd_sn, h.max_cmd_sn),
            Header::Reject(h) => (h.stat_sn, h.exp_cmd_sn, h.max_cmd_sn),
            Header::AsyncMessage(h) => (h.stat_sn, h.exp_cmd_sn, h.max_cmd_sn),
            _ => panic!("not a target PDU"),
        }
    }

    #[test]
    fn sequence_numbers_advance_stat_sn_only_where_the_pdu_consumes_one() {
        let answer = NopIn {
            itt: 3,
            ..Default::default()
        };
        let ping = NopIn {
            itt: RESERVED_TAG,
            ..Default::default()
        };
        let status_in = DataIn {
            has_status: true,
            ..Default::default()
        };
        // (PDU, StatSN it carries, StatSN after it) starting from 10 each time.
        let cases = [
            (Header::ScsiResponse(Default::default()), 10, 11),
            (Header::DataIn(status_in), 10, 11),
            (Header::DataIn(Default::default()), 0, 10),
            (Header::R2t(Default::default()), 10, 10),
            (Header::NopIn(answer), 10, 11),
            (Header::NopIn(ping), 10, 10),
            (Header::TaskMgmtResponse(Default::default()), 10, 11),
            (Header::TextResponse(Default::default()), 10, 11),
            (Header::LogoutResponse(Default::default()), 10, 11),
            (Header::Reject(Default::default()), 10, 11),
            (Header::AsyncMessage(Default::default()), 10, 11),
        ];
        for (mut h, carried, after) in cases {
            let mut next = 10;
            h.set_sequence_numbers(&mut next, 5, 36);
            assert_eq!(numbers(&h), (carried, 5, 36), "{h:?}");
            assert_eq!(next, after, "{h:?}");
        }
        let mut next = u32::MAX;
        let mut h = Header::ScsiResponse(Default::default());
        h.set_sequence_numbers(&mut next, 0, 0);
        assert_eq!((numbers(&h).0, next), (u32::MAX, 0));
    }

    #[test]
    fn initiator_pdus_are_left_alone() {
        let before = Header::NopOut(NopOut {
            itt: 1,
            cmd_sn: 4,
            ..Default::default()
        });
        let mut h = before;
        let mut next = 10;
        h.set_sequence_numbers(&mut next, 5, 36);
        assert_eq!((h, next), (before, 10));
    }
}
