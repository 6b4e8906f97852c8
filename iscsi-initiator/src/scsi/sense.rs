//! SCSI status and sense data (SAM-5 §5.3, SPC-4 §4.5): parsing fixed and descriptor
//! format sense, and the decision each outcome leads to: done, retry, or a typed
//! [`Error`].

use crate::error::Error;

pub use iscsi_pdu::scsi::{key, status};

/// Decoded sense data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sense {
    pub key: u8,
    pub asc: u8,
    pub ascq: u8,
    /// The INFORMATION field when valid: the failing LBA of a medium error, the offset of
    /// a miscompare.
    pub information: Option<u64>,
}

impl Sense {
    /// Parses fixed (0x70/0x71) or descriptor (0x72/0x73) format sense data. `None` when
    /// the bytes are too short or of another format.
    pub fn parse(b: &[u8]) -> Option<Self> {
        match b.first()? & 0x7f {
            0x70 | 0x71 => {
                if b.len() < 14 {
                    // Key only (some targets cut sense short).
                    let key = *b.get(2)? & 0x0f;
                    return Some(Self {
                        key,
                        asc: b.get(12).copied().unwrap_or(0),
                        ascq: b.get(13).copied().unwrap_or(0),
                        information: None,
                    });
                }
                let valid = b[0] & 0x80 != 0;
                let info = u32::from_be_bytes([b[3], b[4], b[5], b[6]]);
                Some(Self {
                    key: b[2] & 0x0f,
                    asc: b[12],
                    ascq: b[13],
                    information: valid.then_some(u64::from(info)),
                })
            }
            0x72 | 0x73 => {
                if b.len() < 4 {
                    return None;
                }
                let mut information = None;
                let add = usize::from(*b.get(7).unwrap_or(&0));
                let mut d = &b[8.min(b.len())..(8 + add).min(b.len())];
                // Descriptor type 0: information, 12 bytes, VALID in byte 2.
                while d.len() >= 2 {
                    let len = 2 + usize::from(d[1]);
                    if d.len() < len {
                        break;
                    }
                    if d[0] == 0 && len >= 12 && d[2] & 0x80 != 0 {
                        let mut v = [0u8; 8];
                        v.copy_from_slice(&d[4..12]);
                        information = Some(u64::from_be_bytes(v));
                    }
                    d = &d[len..];
                }
                Some(Self {
                    key: b[1] & 0x0f,
                    asc: b[2],
                    ascq: b[3],
                    information,
                })
            }
            _ => None,
        }
    }

    fn key_name(&self) -> &'static str {
        match self.key {
            key::NO_SENSE => "NO SENSE",
            key::RECOVERED_ERROR => "RECOVERED ERROR",
            key::NOT_READY => "NOT READY",
            key::MEDIUM_ERROR => "MEDIUM ERROR",
            key::HARDWARE_ERROR => "HARDWARE ERROR",
            key::ILLEGAL_REQUEST => "ILLEGAL REQUEST",
            key::UNIT_ATTENTION => "UNIT ATTENTION",
            key::DATA_PROTECT => "DATA PROTECT",
            key::COPY_ABORTED => "COPY ABORTED",
            key::ABORTED_COMMAND => "ABORTED COMMAND",
            key::MISCOMPARE => "MISCOMPARE",
            _ => "other",
        }
    }
}

impl std::fmt::Display for Sense {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (key {:#x}, ASC/ASCQ {:#04x}/{:#04x})",
            self.key_name(),
            self.key,
            self.asc,
            self.ascq
        )
    }
}

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

    fn fixed(key: u8, asc: u8, ascq: u8, info: Option<u32>) -> Vec<u8> {
        let mut b = vec![0u8; 18];
        b[0] = 0x70 | if info.is_some() { 0x80 } else { 0 };
        b[2] = key;
        b[3..7].copy_from_slice(&info.unwrap_or(0).to_be_bytes());
        b[7] = 10;
        b[12] = asc;
        b[13] = ascq;
        b
    }

    #[test]
    fn fixed_and_descriptor_formats() {
        let s = Sense::parse(&fixed(key::MISCOMPARE, 0x1d, 0, Some(513))).unwrap();
        assert_eq!(
            (s.key, s.asc, s.ascq, s.information),
            (0xe, 0x1d, 0, Some(513))
        );
        let mut d = vec![0x72, key::MEDIUM_ERROR, 0x11, 0x00, 0, 0, 0, 12];
        d.extend_from_slice(&[0, 10, 0x80, 0, 0, 0, 0, 0, 0, 0, 0x10, 0]);
        let s = Sense::parse(&d).unwrap();
        assert_eq!((s.key, s.asc, s.information), (3, 0x11, Some(0x1000)));
        assert!(Sense::parse(&[0x12]).is_none());
        assert!(Sense::parse(&[]).is_none());
    }

    #[test]
    fn outcomes_map_to_typed_errors() {
        let cmd = CommandInfo::range("WRITE(16)", 100, 8);
        let check = |k, a, q| classify(&cmd, status::CHECK_CONDITION, Some(&fixed(k, a, q, None)));
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
