//! SCSI status codes and sense data (SPC-4 §4.5): what a failed command tells the
//! initiator.

use crate::block::BlockError;

pub use iscsi_pdu::scsi::{key, status};

/// A check condition: sense key, additional sense code and qualifier, and the optional
/// information and sense-key-specific fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sense {
    pub key: u8,
    pub asc: u8,
    pub ascq: u8,
    /// INFORMATION field (e.g. the offset of a miscompare), with VALID set.
    pub info: Option<u32>,
    /// Field pointer into the CDB (or parameter list when `in_cdb` is false) and bit.
    pub field: Option<FieldPointer>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FieldPointer {
    pub in_cdb: bool,
    pub byte: u16,
    pub bit: Option<u8>,
}

impl Sense {
    pub const fn new(key: u8, asc: u8, ascq: u8) -> Self {
        Self {
            key,
            asc,
            ascq,
            info: None,
            field: None,
        }
    }

    pub const INVALID_OPCODE: Self = Self::new(key::ILLEGAL_REQUEST, 0x20, 0x00);
    pub const LBA_OUT_OF_RANGE: Self = Self::new(key::ILLEGAL_REQUEST, 0x21, 0x00);
    pub const INVALID_FIELD_IN_CDB: Self = Self::new(key::ILLEGAL_REQUEST, 0x24, 0x00);
    pub const LUN_NOT_SUPPORTED: Self = Self::new(key::ILLEGAL_REQUEST, 0x25, 0x00);
    pub const INVALID_FIELD_IN_PARAMETER_LIST: Self = Self::new(key::ILLEGAL_REQUEST, 0x26, 0x00);
    pub const PARAMETER_LIST_LENGTH_ERROR: Self = Self::new(key::ILLEGAL_REQUEST, 0x1a, 0x00);
    pub const SAVING_PARAMETERS_NOT_SUPPORTED: Self = Self::new(key::ILLEGAL_REQUEST, 0x39, 0x00);
    pub const INSUFFICIENT_REGISTRATION_RESOURCES: Self =
        Self::new(key::ILLEGAL_REQUEST, 0x55, 0x04);
    pub const WRITE_PROTECTED: Self = Self::new(key::DATA_PROTECT, 0x27, 0x00);
    pub const SPACE_ALLOCATION_FAILED: Self = Self::new(key::DATA_PROTECT, 0x27, 0x07);
    pub const MISCOMPARE_DURING_VERIFY: Self = Self::new(key::MISCOMPARE, 0x1d, 0x00);
    pub const READ_ERROR: Self = Self::new(key::MEDIUM_ERROR, 0x11, 0x00);
    pub const WRITE_ERROR: Self = Self::new(key::MEDIUM_ERROR, 0x0c, 0x00);
    pub const INTERNAL_TARGET_FAILURE: Self = Self::new(key::HARDWARE_ERROR, 0x44, 0x00);
    pub const POWER_ON_RESET: Self = Self::new(key::UNIT_ATTENTION, 0x29, 0x00);
    pub const BUS_DEVICE_RESET: Self = Self::new(key::UNIT_ATTENTION, 0x29, 0x03);
    pub const I_T_NEXUS_LOSS: Self = Self::new(key::UNIT_ATTENTION, 0x29, 0x07);
    pub const MODE_PARAMETERS_CHANGED: Self = Self::new(key::UNIT_ATTENTION, 0x2a, 0x01);
    pub const RESERVATIONS_PREEMPTED: Self = Self::new(key::UNIT_ATTENTION, 0x2a, 0x03);
    pub const RESERVATIONS_RELEASED: Self = Self::new(key::UNIT_ATTENTION, 0x2a, 0x04);
    pub const REGISTRATIONS_PREEMPTED: Self = Self::new(key::UNIT_ATTENTION, 0x2a, 0x05);
    pub const CAPACITY_DATA_CHANGED: Self = Self::new(key::UNIT_ATTENTION, 0x2a, 0x09);
    pub const REPORTED_LUNS_DATA_CHANGED: Self = Self::new(key::UNIT_ATTENTION, 0x3f, 0x0e);
    pub const COMMANDS_CLEARED_BY_ANOTHER_INITIATOR: Self =
        Self::new(key::UNIT_ATTENTION, 0x2f, 0x00);
    pub const MEDIUM_NOT_PRESENT: Self = Self::new(key::NOT_READY, 0x3a, 0x00);
    pub const COPY_TARGET_DEVICE_NOT_REACHABLE: Self = Self::new(key::COPY_ABORTED, 0x0d, 0x02);
    pub const UNREACHABLE_COPY_TARGET: Self = Self::new(key::COPY_ABORTED, 0x08, 0x04);
    pub const TOO_MANY_TARGET_DESCRIPTORS: Self = Self::new(key::ILLEGAL_REQUEST, 0x26, 0x06);
    pub const UNSUPPORTED_TARGET_DESCRIPTOR_TYPE: Self =
        Self::new(key::ILLEGAL_REQUEST, 0x26, 0x07);
    pub const TOO_MANY_SEGMENT_DESCRIPTORS: Self = Self::new(key::ILLEGAL_REQUEST, 0x26, 0x08);
    pub const UNSUPPORTED_SEGMENT_DESCRIPTOR_TYPE: Self =
        Self::new(key::ILLEGAL_REQUEST, 0x26, 0x09);
    pub const OPERATION_IN_PROGRESS: Self = Self::new(key::ILLEGAL_REQUEST, 0x0d, 0x05);

    /// INVALID FIELD IN CDB pointing at `byte` (and optionally `bit`).
    pub fn invalid_cdb_field(byte: u16, bit: Option<u8>) -> Self {
        Self {
            field: Some(FieldPointer {
                in_cdb: true,
                byte,
                bit,
            }),
            ..Self::INVALID_FIELD_IN_CDB
        }
    }

    /// INVALID FIELD IN PARAMETER LIST pointing at `byte`.
    pub fn invalid_param_field(byte: u16, bit: Option<u8>) -> Self {
        Self {
            field: Some(FieldPointer {
                in_cdb: false,
                byte,
                bit,
            }),
            ..Self::INVALID_FIELD_IN_PARAMETER_LIST
        }
    }

    pub fn with_info(mut self, info: u32) -> Self {
        self.info = Some(info);
        self
    }

    /// Fixed-format sense data (SPC-4 §4.5.3), 18 bytes.
    pub fn to_fixed(&self) -> [u8; 18] {
        let mut s = [0u8; 18];
        s[0] = 0x70;
        if let Some(info) = self.info {
            s[0] |= 0x80;
            s[3..7].copy_from_slice(&info.to_be_bytes());
        }
        s[2] = self.key & 0x0f;
        s[7] = 10;
        s[12] = self.asc;
        s[13] = self.ascq;
        if let Some(f) = self.field {
            s[15] = 0x80 | if f.in_cdb { 0x40 } else { 0 };
            if let Some(bit) = f.bit {
                s[15] |= 0x08 | (bit & 7);
            }
            s[16..18].copy_from_slice(&f.byte.to_be_bytes());
        }
        s
    }

    /// Descriptor-format sense data (SPC-4 §4.5.2), used when D_SENSE is set in the
    /// control mode page.
    pub fn to_descriptor(&self) -> Vec<u8> {
        let mut s = vec![0x72, self.key & 0x0f, self.asc, self.ascq, 0, 0, 0, 0];
        if let Some(info) = self.info {
            s.extend_from_slice(&[0x00, 0x0a, 0x80, 0]);
            s.extend_from_slice(&u64::from(info).to_be_bytes());
        }
        if let Some(f) = self.field {
            let mut b = 0x80 | if f.in_cdb { 0x40 } else { 0 };
            if let Some(bit) = f.bit {
                b |= 0x08 | (bit & 7);
            }
            let fb = f.byte.to_be_bytes();
            s.extend_from_slice(&[0x02, 0x06, 0, 0, b, fb[0], fb[1], 0]);
        }
        s[7] = (s.len() - 8) as u8;
        s
    }
}

/// The outcome of a command that did not complete with GOOD status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    Check(Sense),
    ReservationConflict,
    Busy,
    TaskSetFull,
}

impl From<Sense> for Failure {
    fn from(s: Sense) -> Self {
        Self::Check(s)
    }
}

/// How each device error is reported, for reads (`reading`) and writes.
pub fn sense_for(err: &BlockError, reading: bool) -> Sense {
    match err {
        BlockError::OutOfRange { .. } => Sense::LBA_OUT_OF_RANGE,
        BlockError::Misaligned { .. } => Sense::INVALID_FIELD_IN_CDB,
        BlockError::NoSpace => Sense::SPACE_ALLOCATION_FAILED,
        BlockError::ReadOnly => Sense::WRITE_PROTECTED,
        BlockError::Miscompare { offset } => {
            Sense::MISCOMPARE_DURING_VERIFY.with_info(u32::try_from(*offset).unwrap_or(u32::MAX))
        }
        BlockError::Io(_) if reading => Sense::READ_ERROR,
        BlockError::Io(_) => Sense::WRITE_ERROR,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_sense_layout() {
        let s = Sense::invalid_cdb_field(2, Some(3)).to_fixed();
        assert_eq!(s[0], 0x70);
        assert_eq!(s[2], key::ILLEGAL_REQUEST);
        assert_eq!(s[7], 10);
        assert_eq!((s[12], s[13]), (0x24, 0));
        assert_eq!(s[15], 0x80 | 0x40 | 0x08 | 3);
        assert_eq!(&s[16..18], &[0, 2]);
        let m = Sense::MISCOMPARE_DURING_VERIFY.with_info(7).to_fixed();
        assert_eq!(m[0], 0xf0);
        assert_eq!(&m[3..7], &[0, 0, 0, 7]);
    }

    #[test]
    fn descriptor_sense_layout() {
        let s = Sense::SPACE_ALLOCATION_FAILED.to_descriptor();
        assert_eq!(&s[..4], &[0x72, key::DATA_PROTECT, 0x27, 0x07]);
        assert_eq!(s[7] as usize, s.len() - 8);
    }
}
