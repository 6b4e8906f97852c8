//! How a command fails: the [`Failure`] a command returns, and the sense data each
//! block-device error becomes. Sense data itself ([`Sense`]) is the wire type both ends
//! share, in `iscsi_pdu::scsi`.

use crate::block::BlockError;

pub use iscsi_pdu::scsi::{Sense, key, status};

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
            // Clamped to what fixed-format sense carries, so both formats report the same.
            Sense::MISCOMPARE_DURING_VERIFY
                .with_information(u64::from(u32::try_from(*offset).unwrap_or(u32::MAX)))
        }
        BlockError::Io(_) if reading => Sense::READ_ERROR,
        BlockError::Io(_) => Sense::WRITE_ERROR,
    }
}
