//! Sense data (SPC-4 §4.5): what a CHECK CONDITION tells the initiator. The target encodes
//! it in fixed or descriptor format (the control mode page's D_SENSE chooses); the
//! initiator decodes either.

use super::key;

/// A check condition: sense key, additional sense code and qualifier, and the optional
/// information and sense-key-specific field pointer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sense {
    pub key: u8,
    pub asc: u8,
    pub ascq: u8,
    /// The INFORMATION field when valid: the failing LBA of a medium error, the offset of
    /// a miscompare. Descriptor format carries 64 bits; fixed format only 32, so a larger
    /// value goes out there as "not valid".
    pub information: Option<u64>,
    /// Where in the CDB (or parameter list) an ILLEGAL REQUEST found the bad field.
    pub field: Option<FieldPointer>,
}

/// The sense-key-specific field pointer of an ILLEGAL REQUEST (SPC-4 §4.5.2.4.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FieldPointer {
    /// C/D: the field is in the CDB, not in the parameter list.
    pub in_cdb: bool,
    pub byte: u16,
    pub bit: Option<u8>,
}

impl FieldPointer {
    /// The three sense-key-specific bytes, SKSV set.
    fn to_bytes(self) -> [u8; 3] {
        let mut b = 0x80 | if self.in_cdb { 0x40 } else { 0 };
        if let Some(bit) = self.bit {
            b |= 0x08 | (bit & 7);
        }
        let [hi, lo] = self.byte.to_be_bytes();
        [b, hi, lo]
    }

    /// Reads the three sense-key-specific bytes; `None` when SKSV is clear.
    fn from_bytes(s: [u8; 3]) -> Option<Self> {
        (s[0] & 0x80 != 0).then(|| Self {
            in_cdb: s[0] & 0x40 != 0,
            byte: u16::from_be_bytes([s[1], s[2]]),
            bit: (s[0] & 0x08 != 0).then_some(s[0] & 7),
        })
    }
}

impl Sense {
    pub const fn new(key: u8, asc: u8, ascq: u8) -> Self {
        Self {
            key,
            asc,
            ascq,
            information: None,
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

    pub fn with_information(mut self, information: u64) -> Self {
        self.information = Some(information);
        self
    }

    /// Fixed-format sense data (SPC-4 §4.5.3), 18 bytes.
    pub fn to_fixed(&self) -> [u8; 18] {
        let mut s = [0u8; 18];
        s[0] = 0x70;
        if let Some(info) = self.information.and_then(|i| u32::try_from(i).ok()) {
            s[0] |= 0x80;
            s[3..7].copy_from_slice(&info.to_be_bytes());
        }
        s[2] = self.key & 0x0f;
        s[7] = 10;
        s[12] = self.asc;
        s[13] = self.ascq;
        if let Some(f) = self.field {
            s[15..18].copy_from_slice(&f.to_bytes());
        }
        s
    }

    /// Descriptor-format sense data (SPC-4 §4.5.2): an information descriptor (type 0)
    /// and a sense-key-specific descriptor (type 2) when there is something to put in them.
    pub fn to_descriptor(&self) -> Vec<u8> {
        let mut s = vec![0x72, self.key & 0x0f, self.asc, self.ascq, 0, 0, 0, 0];
        if let Some(info) = self.information {
            s.extend_from_slice(&[0x00, 0x0a, 0x80, 0]);
            s.extend_from_slice(&info.to_be_bytes());
        }
        if let Some(f) = self.field {
            let [b, hi, lo] = f.to_bytes();
            s.extend_from_slice(&[0x02, 0x06, 0, 0, b, hi, lo, 0]);
        }
        s[7] = (s.len() - 8) as u8;
        s
    }

    /// Parses fixed (0x70/0x71) or descriptor (0x72/0x73) format sense data. `None` when
    /// the bytes are too short or of another format. A field pointer is read only for
    /// ILLEGAL REQUEST, the one key whose sense-key-specific bytes hold one.
    pub fn parse(b: &[u8]) -> Option<Self> {
        match b.first()? & 0x7f {
            0x70 | 0x71 => {
                if b.len() < 14 {
                    // Key only (some targets cut sense short).
                    let key = *b.get(2)? & 0x0f;
                    return Some(Self::new(
                        key,
                        b.get(12).copied().unwrap_or(0),
                        b.get(13).copied().unwrap_or(0),
                    ));
                }
                let valid = b[0] & 0x80 != 0;
                let info = u32::from_be_bytes([b[3], b[4], b[5], b[6]]);
                let key = b[2] & 0x0f;
                let field = match b.get(15..18) {
                    Some(&[x, y, z]) if key == key::ILLEGAL_REQUEST => {
                        FieldPointer::from_bytes([x, y, z])
                    }
                    _ => None,
                };
                Some(Self {
                    key,
                    asc: b[12],
                    ascq: b[13],
                    information: valid.then_some(u64::from(info)),
                    field,
                })
            }
            0x72 | 0x73 => {
                if b.len() < 4 {
                    return None;
                }
                let mut s = Self::new(b[1] & 0x0f, b[2], b[3]);
                let add = usize::from(*b.get(7).unwrap_or(&0));
                let mut d = &b[8.min(b.len())..(8 + add).min(b.len())];
                while d.len() >= 2 {
                    let len = 2 + usize::from(d[1]);
                    if d.len() < len {
                        break;
                    }
                    match d[0] {
                        // Information: 12 bytes, VALID in byte 2.
                        0x00 if len >= 12 && d[2] & 0x80 != 0 => {
                            s.information = Some(crate::be64(d, 4));
                        }
                        // Sense key specific: 8 bytes, SKSV in byte 4.
                        0x02 if len >= 8 && s.key == key::ILLEGAL_REQUEST => {
                            s.field = FieldPointer::from_bytes([d[4], d[5], d[6]]);
                        }
                        _ => {}
                    }
                    d = &d[len..];
                }
                Some(s)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Hand-built fixed-format sense, as another target would send it.
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
    fn fixed_sense_layout() {
        let s = Sense::invalid_cdb_field(2, Some(3)).to_fixed();
        assert_eq!(s[0], 0x70);
        assert_eq!(s[2], key::ILLEGAL_REQUEST);
        assert_eq!(s[7], 10);
        assert_eq!((s[12], s[13]), (0x24, 0));
        assert_eq!(s[15], 0x80 | 0x40 | 0x08 | 3);
        assert_eq!(&s[16..18], &[0, 2]);
        let m = Sense::MISCOMPARE_DURING_VERIFY
            .with_information(7)
            .to_fixed();
        assert_eq!(m[0], 0xf0);
        assert_eq!(&m[3..7], &[0, 0, 0, 7]);
    }

    #[test]
    fn descriptor_sense_layout() {
        let s = Sense::SPACE_ALLOCATION_FAILED.to_descriptor();
        assert_eq!(&s[..4], &[0x72, key::DATA_PROTECT, 0x27, 0x07]);
        assert_eq!(s[7] as usize, s.len() - 8);
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
    fn short_fixed_sense_keeps_what_it_has() {
        let s = Sense::parse(&[0x70, 0, key::NOT_READY, 0, 0, 0, 0, 0]).unwrap();
        assert_eq!(s, Sense::new(key::NOT_READY, 0, 0));
    }

    #[test]
    fn what_the_target_encodes_the_initiator_decodes() {
        let cases = [
            Sense::INVALID_OPCODE,
            Sense::invalid_cdb_field(2, Some(3)),
            Sense::invalid_cdb_field(1, None),
            Sense::invalid_param_field(20, Some(0)),
            Sense::invalid_param_field(300, None),
            Sense::MISCOMPARE_DURING_VERIFY.with_information(513),
            Sense::READ_ERROR.with_information(u64::from(u32::MAX)),
            Sense::POWER_ON_RESET,
            Sense::SPACE_ALLOCATION_FAILED,
        ];
        for s in cases {
            assert_eq!(Sense::parse(&s.to_fixed()), Some(s), "fixed {s:?}");
            assert_eq!(
                Sense::parse(&s.to_descriptor()),
                Some(s),
                "descriptor {s:?}"
            );
        }
    }

    #[test]
    fn only_descriptor_format_carries_a_64_bit_information_field() {
        let s = Sense::READ_ERROR.with_information(1 << 40);
        assert_eq!(Sense::parse(&s.to_descriptor()), Some(s));
        let fixed = Sense::parse(&s.to_fixed()).unwrap();
        assert_eq!(fixed.information, None);
        assert_eq!((fixed.key, fixed.asc), (s.key, s.asc));
    }
}
