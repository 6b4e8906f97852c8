//! What a command's outcome means to the caller: done, retry, or a typed [`Error`],
//! decided from the SCSI status (SAM-5 §5.3) and the sense data ([`Sense`], decoded by
//! `iscsi_pdu`, in fixed or descriptor format).

use crate::error::Error;

pub use iscsi_pdu::scsi::{Sense, key, status};

/// The command an outcome belongs to, for the error a caller sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommandInfo {
    pub name: &'static str,
    /// The block range the command touches (0, 0 when none).
    pub lba: u64,
    pub blocks: u64,
}

impl CommandInfo {
    pub const fn named(name: &'static str) -> Self {
        Self {
            name,
            lba: 0,
            blocks: 0,
        }
    }

    pub const fn range(name: &'static str, lba: u64, blocks: u64) -> Self {
        Self { name, lba, blocks }
    }
}

/// What to do with a command's outcome.
#[derive(Debug)]
pub enum Verdict {
    Done,
    /// Send it again: a unit attention, a busy target, an aborted command.
    Retry {
        delay_ms: u64,
        why: &'static str,
    },
    Fail(Error),
}

/// Decides on a SCSI status with its sense data.
pub fn classify(cmd: &CommandInfo, status_byte: u8, sense: Option<&[u8]>) -> Verdict {
    match status_byte {
        status::GOOD | status::CONDITION_MET => Verdict::Done,
        status::RESERVATION_CONFLICT => {
            Verdict::Fail(Error::ReservationConflict { command: cmd.name })
        }
        status::BUSY | status::TASK_SET_FULL => Verdict::Retry {
            delay_ms: 20,
            why: "target busy",
        },
        status::TASK_ABORTED => Verdict::Retry {
            delay_ms: 0,
            why: "task aborted",
        },
        status::CHECK_CONDITION => match sense.and_then(Sense::parse) {
            Some(s) => classify_sense(cmd, s),
            None => Verdict::Fail(Error::Status {
                command: cmd.name,
                status: status_byte,
            }),
        },
        other => Verdict::Fail(Error::Status {
            command: cmd.name,
            status: other,
        }),
    }
}

fn classify_sense(cmd: &CommandInfo, s: Sense) -> Verdict {
    let name = cmd.name;
    let fail = Verdict::Fail;
    match (s.key, s.asc, s.ascq) {
        (key::NO_SENSE | key::RECOVERED_ERROR, _, _) => Verdict::Done,
        (key::UNIT_ATTENTION, _, _) => Verdict::Retry {
            delay_ms: 0,
            why: "unit attention",
        },
        // "Becoming ready" and friends: wait and try again.
        (key::NOT_READY, 0x04, 0x01 | 0x07 | 0x0a) => Verdict::Retry {
            delay_ms: 100,
            why: "becoming ready",
        },
        (key::NOT_READY, asc, ascq) => fail(Error::NotReady {
            command: name,
            asc,
            ascq,
        }),
        (key::ABORTED_COMMAND, _, _) => Verdict::Retry {
            delay_ms: 10,
            why: "aborted command",
        },
        (key::ILLEGAL_REQUEST, 0x21, 0x00) => fail(Error::OutOfRange {
            command: name,
            lba: cmd.lba,
            blocks: cmd.blocks,
        }),
        (key::ILLEGAL_REQUEST, asc @ (0x20 | 0x24 | 0x26), ascq) => fail(Error::Unsupported {
            command: name,
            asc,
            ascq,
        }),
        (key::DATA_PROTECT, 0x27, 0x07) => fail(Error::SpaceExhausted {
            command: name,
            lba: cmd.lba,
            blocks: cmd.blocks,
        }),
        (key::DATA_PROTECT, 0x27, _) => fail(Error::WriteProtected { command: name }),
        (key::MEDIUM_ERROR, asc, ascq) => fail(Error::MediumError {
            command: name,
            lba: s.information,
            asc,
            ascq,
        }),
        (key::HARDWARE_ERROR, asc, ascq) => fail(Error::HardwareError {
            command: name,
            asc,
            ascq,
        }),
        (key::MISCOMPARE, _, _) => fail(Error::Miscompare {
            command: name,
            offset: s.information,
        }),
        _ => fail(Error::CheckCondition {
            command: name,
            sense: s,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_map_to_typed_errors() {
        let cmd = CommandInfo::range("WRITE(16)", 100, 8);
        let check = |k, a, q| {
            classify(
                &cmd,
                status::CHECK_CONDITION,
                Some(&Sense::new(k, a, q).to_fixed()[..]),
            )
        };
        assert!(matches!(
            check(key::DATA_PROTECT, 0x27, 0x07),
            Verdict::Fail(Error::SpaceExhausted {
                lba: 100,
                blocks: 8,
                ..
            })
        ));
        assert!(matches!(
            check(key::ILLEGAL_REQUEST, 0x21, 0),
            Verdict::Fail(Error::OutOfRange { lba: 100, .. })
        ));
        assert!(matches!(
            check(key::DATA_PROTECT, 0x27, 0),
            Verdict::Fail(Error::WriteProtected { .. })
        ));
        assert!(matches!(
            check(key::NOT_READY, 0x3a, 0),
            Verdict::Fail(Error::NotReady { asc: 0x3a, .. })
        ));
        assert!(matches!(
            check(key::UNIT_ATTENTION, 0x29, 0),
            Verdict::Retry { .. }
        ));
        assert!(matches!(
            check(key::ABORTED_COMMAND, 0x47, 0),
            Verdict::Retry { .. }
        ));
        assert!(matches!(
            check(key::MEDIUM_ERROR, 0x11, 0),
            Verdict::Fail(Error::MediumError { .. })
        ));
        assert!(matches!(
            classify(&cmd, status::RESERVATION_CONFLICT, None),
            Verdict::Fail(Error::ReservationConflict { .. })
        ));
        assert!(matches!(
            classify(&cmd, status::BUSY, None),
            Verdict::Retry { .. }
        ));
        assert!(matches!(classify(&cmd, status::GOOD, None), Verdict::Done));
        assert!(matches!(
            classify(&cmd, status::CHECK_CONDITION, None),
            Verdict::Fail(Error::Status { .. })
        ));
    }
}
