//! PERSISTENT RESERVE IN and OUT (SPC-4 §6.15, §6.16): registrations and reservations,
//! which the pool uses to fence a host at the storage. Reservations belong to the I_T
//! nexus (initiator name and ISID), which is why a reinstated session keeps its ISID.
//!
//! A retry after a reconnect may repeat an action that was carried out: REGISTER with an
//! old key then answers RESERVATION CONFLICT. [`PrOut::RegisterAndIgnore`] is the
//! idempotent way to (re)register.

use bytes::{Bytes, BytesMut};
use iscsi_pdu::scsi::opcode::{PERSISTENT_RESERVE_IN, PERSISTENT_RESERVE_OUT};
use iscsi_pdu::{be32, be64};

use super::sense::CommandInfo;
use crate::error::Error;
use crate::lun::Lun;
use crate::task::Command;

/// Reservation types (SPC-4 §6.15.3.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum PrType {
    WriteExclusive = 1,
    ExclusiveAccess = 3,
    WriteExclusiveRegistrantsOnly = 5,
    ExclusiveAccessRegistrantsOnly = 6,
    WriteExclusiveAllRegistrants = 7,
    ExclusiveAccessAllRegistrants = 8,
}

impl PrType {
    pub fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            1 => Self::WriteExclusive,
            3 => Self::ExclusiveAccess,
            5 => Self::WriteExclusiveRegistrantsOnly,
            6 => Self::ExclusiveAccessRegistrantsOnly,
            7 => Self::WriteExclusiveAllRegistrants,
            8 => Self::ExclusiveAccessAllRegistrants,
            _ => return None,
        })
    }
}

/// A PERSISTENT RESERVE OUT service action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrOut {
    /// Registers `new` (0: unregisters) when `current` is our registered key (0 when
    /// none). `aptpl`: the target keeps it across power loss.
    Register {
        current: u64,
        new: u64,
        aptpl: bool,
    },
    /// Registers `new` whatever key we had.
    RegisterAndIgnore {
        new: u64,
        aptpl: bool,
    },
    Reserve {
        key: u64,
        kind: PrType,
    },
    Release {
        key: u64,
        kind: PrType,
    },
    /// Removes every registration and the reservation.
    Clear {
        key: u64,
    },
    /// Removes the registrations of `victim` (and takes over its reservation).
    Preempt {
        key: u64,
        victim: u64,
        kind: PrType,
    },
    /// As `Preempt`, and aborts the victim's tasks.
    PreemptAndAbort {
        key: u64,
        victim: u64,
        kind: PrType,
    },
}

impl PrOut {
    fn service_action(&self) -> u8 {
        match self {
            Self::Register { .. } => 0,
            Self::Reserve { .. } => 1,
            Self::Release { .. } => 2,
            Self::Clear { .. } => 3,
            Self::Preempt { .. } => 4,
            Self::PreemptAndAbort { .. } => 5,
            Self::RegisterAndIgnore { .. } => 6,
        }
    }

    /// The CDB and the 24-byte parameter list.
    pub fn encode(&self) -> ([u8; 10], [u8; 24]) {
        let (key, sa_key, kind, aptpl) = match *self {
            Self::Register {
                current,
                new,
                aptpl,
            } => (current, new, None, aptpl),
            Self::RegisterAndIgnore { new, aptpl } => (0, new, None, aptpl),
            Self::Reserve { key, kind } | Self::Release { key, kind } => {
                (key, 0, Some(kind), false)
            }
            Self::Clear { key } => (key, 0, None, false),
            Self::Preempt { key, victim, kind } | Self::PreemptAndAbort { key, victim, kind } => {
                (key, victim, Some(kind), false)
            }
        };
        let mut c = [0u8; 10];
        c[0] = PERSISTENT_RESERVE_OUT;
        c[1] = self.service_action();
        // Scope 0 (LU_SCOPE) in the high nibble, the type in the low one.
        c[2] = kind.map_or(0, |k| k as u8);
        c[5..9].copy_from_slice(&24u32.to_be_bytes());
        let mut p = [0u8; 24];
        p[..8].copy_from_slice(&key.to_be_bytes());
        p[8..16].copy_from_slice(&sa_key.to_be_bytes());
        p[20] = u8::from(aptpl);
        (c, p)
    }
}

/// A PERSISTENT RESERVE IN service action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrIn {
    ReadKeys,
    ReadReservation,
}

/// The registered keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    pub generation: u32,
    pub keys: Vec<u64>,
}

/// The reservation, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reservation {
    pub generation: u32,
    /// The holder's key and the reservation type.
    pub holder: Option<(u64, PrType)>,
}

/// What PERSISTENT RESERVE IN returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrInData {
    Keys(Keys),
    Reservation(Reservation),
}

fn bad(reason: &str) -> Error {
    Error::BadResponse {
        command: "PERSISTENT RESERVE IN",
        reason: reason.to_owned(),
    }
}

/// Parses READ KEYS data.
pub fn parse_keys(d: &[u8]) -> Result<Keys, Error> {
    if d.len() < 8 {
        return Err(bad("READ KEYS data shorter than its header"));
    }
    let len = (be32(d, 4) as usize).min(d.len() - 8);
    let keys = d[8..8 + len - len % 8]
        .chunks_exact(8)
        .map(|k| be64(k, 0))
        .collect();
    Ok(Keys {
        generation: be32(d, 0),
        keys,
    })
}

/// Parses READ RESERVATION data.
pub fn parse_reservation(d: &[u8]) -> Result<Reservation, Error> {
    if d.len() < 8 {
        return Err(bad("READ RESERVATION data shorter than its header"));
    }
    let generation = be32(d, 0);
    let len = be32(d, 4);
    if len == 0 {
        return Ok(Reservation {
            generation,
            holder: None,
        });
    }
    if d.len() < 24 {
        return Err(bad("READ RESERVATION descriptor cut short"));
    }
    let kind = PrType::from_code(d[21] & 0x0f).ok_or_else(|| bad("unknown reservation type"))?;
    Ok(Reservation {
        generation,
        holder: Some((be64(d, 8), kind)),
    })
}

impl Lun {
    /// Runs a PERSISTENT RESERVE OUT action.
    pub async fn persistent_reserve_out(&self, action: PrOut) -> Result<(), Error> {
        let (cdb, params) = action.encode();
        let cmd = Command::new(self.field, &cdb).with_data_out(Bytes::copy_from_slice(&params));
        self.session
            .execute(cmd, CommandInfo::named("PERSISTENT RESERVE OUT"))
            .await?;
        Ok(())
    }

    /// Runs a PERSISTENT RESERVE IN action.
    pub async fn persistent_reserve_in(&self, action: PrIn) -> Result<PrInData, Error> {
        let sa = match action {
            PrIn::ReadKeys => 0,
            PrIn::ReadReservation => 1,
        };
        let alloc: u16 = 8192;
        let mut cdb = [0u8; 10];
        cdb[0] = PERSISTENT_RESERVE_IN;
        cdb[1] = sa;
        cdb[7..9].copy_from_slice(&alloc.to_be_bytes());
        let cmd = Command::new(self.field, &cdb).with_data_in(BytesMut::new(), alloc.into());
        let out = self
            .session
            .execute(cmd, CommandInfo::named("PERSISTENT RESERVE IN"))
            .await?;
        let d = &out.command.data_in[..out.received];
        Ok(match action {
            PrIn::ReadKeys => PrInData::Keys(parse_keys(d)?),
            PrIn::ReadReservation => PrInData::Reservation(parse_reservation(d)?),
        })
    }

    /// The registered keys.
    pub async fn read_keys(&self) -> Result<Keys, Error> {
        match self.persistent_reserve_in(PrIn::ReadKeys).await? {
            PrInData::Keys(k) => Ok(k),
            PrInData::Reservation(_) => Err(bad("reservation data for READ KEYS")),
        }
    }

    /// The reservation, if any.
    pub async fn read_reservation(&self) -> Result<Reservation, Error> {
        match self.persistent_reserve_in(PrIn::ReadReservation).await? {
            PrInData::Reservation(r) => Ok(r),
            PrInData::Keys(_) => Err(bad("key data for READ RESERVATION")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_encoding_places_keys_type_and_aptpl() {
        let (c, p) = PrOut::Register {
            current: 0,
            new: 0xabcd,
            aptpl: true,
        }
        .encode();
        assert_eq!((c[0], c[1], c[8]), (0x5f, 0, 24));
        assert_eq!(&p[8..16], &0xabcdu64.to_be_bytes());
        assert_eq!(p[20], 1);
        let (c, p) = PrOut::Preempt {
            key: 1,
            victim: 2,
            kind: PrType::WriteExclusiveRegistrantsOnly,
        }
        .encode();
        assert_eq!((c[1], c[2]), (4, 5));
        assert_eq!(be64(&p, 0), 1);
        assert_eq!(be64(&p, 8), 2);
    }

    #[test]
    fn in_parsing() {
        let mut d = vec![0, 0, 0, 7, 0, 0, 0, 16];
        d.extend_from_slice(&5u64.to_be_bytes());
        d.extend_from_slice(&6u64.to_be_bytes());
        assert_eq!(
            parse_keys(&d).unwrap(),
            Keys {
                generation: 7,
                keys: vec![5, 6]
            }
        );
        let mut r = vec![0, 0, 0, 3, 0, 0, 0, 16];
        r.extend_from_slice(&9u64.to_be_bytes());
        r.extend_from_slice(&[0, 0, 0, 0, 0, 0x01, 0, 0]);
        let res = parse_reservation(&r).unwrap();
        assert_eq!(res.holder, Some((9, PrType::WriteExclusive)));
        assert_eq!(
            parse_reservation(&[0, 0, 0, 1, 0, 0, 0, 0]).unwrap().holder,
            None
        );
        assert!(parse_keys(&[0; 4]).is_err());
    }
}
