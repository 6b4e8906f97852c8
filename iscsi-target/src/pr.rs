//! SPC-3 persistent reservations: the state of one LUN, the PERSISTENT RESERVE OUT
//! service actions as pure transitions on it, and the [`PrStore`] hook that keeps the
//! state across restarts.
//!
//! A registration belongs to an I_T nexus, named here by the initiator port
//! (`iqn,i,0x<isid>`); the target port is the same for every nexus of a target.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::scsi::sense::{Failure, Sense};

/// Reservation types (SPC-4 §6.15.3.4).
pub mod kind {
    pub const WRITE_EXCLUSIVE: u8 = 1;
    pub const EXCLUSIVE_ACCESS: u8 = 3;
    pub const WRITE_EXCLUSIVE_REGISTRANTS_ONLY: u8 = 5;
    pub const EXCLUSIVE_ACCESS_REGISTRANTS_ONLY: u8 = 6;
    pub const WRITE_EXCLUSIVE_ALL_REGISTRANTS: u8 = 7;
    pub const EXCLUSIVE_ACCESS_ALL_REGISTRANTS: u8 = 8;

    pub fn is_valid(t: u8) -> bool {
        matches!(t, 1 | 3 | 5 | 6 | 7 | 8)
    }

    /// Every registrant is a holder.
    pub fn all_registrants(t: u8) -> bool {
        matches!(t, 7 | 8)
    }

    /// Registrants may access as the holder does.
    pub fn registrants_share(t: u8) -> bool {
        matches!(t, 5..=8)
    }
}

/// PERSISTENT RESERVE OUT service actions.
pub mod action {
    pub const REGISTER: u8 = 0;
    pub const RESERVE: u8 = 1;
    pub const RELEASE: u8 = 2;
    pub const CLEAR: u8 = 3;
    pub const PREEMPT: u8 = 4;
    pub const PREEMPT_AND_ABORT: u8 = 5;
    pub const REGISTER_AND_IGNORE: u8 = 6;
    pub const REGISTER_AND_MOVE: u8 = 7;
}

/// The reservation: who holds it and of which type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    /// The holder's initiator port; for all-registrants types, the nexus that reserved.
    pub holder: String,
    pub kind: u8,
}

/// One LUN's persistent reservation state: what [`PrStore`] saves.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PrState {
    /// PRgeneration: bumped by every PROUT that changes registrations.
    pub generation: u32,
    /// Initiator port → reservation key.
    pub registrations: BTreeMap<String, u64>,
    pub reservation: Option<Reservation>,
    /// Activate persist through power loss, as last set by a REGISTER.
    pub aptpl: bool,
}

/// A side effect of a transition that the target must carry out: unit attentions for
/// other nexuses, and tasks to abort for PREEMPT AND ABORT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    UnitAttention { nexus: String, sense: Sense },
    AbortTasksOf { nexus: String },
}

/// The parameter list of PERSISTENT RESERVE OUT (SPC-4 §6.16.3) that we use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProutParams {
    pub key: u64,
    pub sa_key: u64,
    pub spec_i_pt: bool,
    pub all_tg_pt: bool,
    pub aptpl: bool,
}

impl ProutParams {
    pub fn parse(data: &[u8]) -> Result<Self, Sense> {
        if data.len() < 24 {
            return Err(Sense::PARAMETER_LIST_LENGTH_ERROR);
        }
        Ok(Self {
            key: u64::from_be_bytes(data[0..8].try_into().expect("8 bytes")),
            sa_key: u64::from_be_bytes(data[8..16].try_into().expect("8 bytes")),
            spec_i_pt: data[20] & 0x08 != 0,
            all_tg_pt: data[20] & 0x04 != 0,
            aptpl: data[20] & 0x01 != 0,
        })
    }
}

/// INVALID RELEASE OF PERSISTENT RESERVATION.
const INVALID_RELEASE: Sense = Sense::new(crate::scsi::sense::key::ILLEGAL_REQUEST, 0x26, 0x04);

impl PrState {
    /// Whether `nexus` holds the reservation (every registrant does for all-registrants).
    pub fn is_holder(&self, nexus: &str) -> bool {
        match &self.reservation {
            Some(r) if kind::all_registrants(r.kind) => self.registrations.contains_key(nexus),
            Some(r) => r.holder == nexus,
            None => false,
        }
    }

    /// Whether a command from `nexus` conflicts with the reservation (SPC-4 §5.13.1,
    /// table 69, for the commands we serve): `writes` for commands that change the medium.
    pub fn conflicts(&self, nexus: &str, writes: bool) -> bool {
        let Some(r) = &self.reservation else {
            return false;
        };
        if self.is_holder(nexus) {
            return false;
        }
        let registered = self.registrations.contains_key(nexus);
        match r.kind {
            kind::WRITE_EXCLUSIVE => writes,
            kind::EXCLUSIVE_ACCESS => true,
            kind::WRITE_EXCLUSIVE_REGISTRANTS_ONLY | kind::WRITE_EXCLUSIVE_ALL_REGISTRANTS => {
                writes && !registered
            }
            _ => !registered,
        }
    }

    fn check_key(&self, nexus: &str, key: u64) -> Result<(), Failure> {
        match self.registrations.get(nexus) {
            Some(&k) if k == key => Ok(()),
            _ => Err(Failure::ReservationConflict),
        }
    }

    /// Drops a registration, releasing the reservation when it was the holder's (or the
    /// last registrant's, for all-registrants types). Returns the effects.
    fn unregister(&mut self, nexus: &str, effects: &mut Vec<Effect>) {
        self.registrations.remove(nexus);
        let Some(r) = &self.reservation else { return };
        let release = if kind::all_registrants(r.kind) {
            self.registrations.is_empty()
        } else {
            r.holder == nexus
        };
        if release {
            let kind = r.kind;
            self.reservation = None;
            // SPC-4 §5.13.11.2.2: releasing a registrants-only reservation tells the
            // other registrants.
            if matches!(
                kind,
                kind::WRITE_EXCLUSIVE_REGISTRANTS_ONLY | kind::EXCLUSIVE_ACCESS_REGISTRANTS_ONLY
            ) {
                for n in self.registrations.keys() {
                    effects.push(Effect::UnitAttention {
                        nexus: n.clone(),
                        sense: Sense::RESERVATIONS_RELEASED,
                    });
                }
            }
        }
    }

    /// Applies one PERSISTENT RESERVE OUT service action from `nexus`. On error nothing
    /// changed.
    pub fn apply(
        &mut self,
        nexus: &str,
        sa: u8,
        scope: u8,
        kind_: u8,
        p: &ProutParams,
    ) -> Result<Vec<Effect>, Failure> {
        let mut effects = Vec::new();
        let needs_type = matches!(sa, action::RESERVE | action::RELEASE)
            || (matches!(sa, action::PREEMPT | action::PREEMPT_AND_ABORT)
                && self.reservation.is_some());
        if needs_type && (scope != 0 || !kind::is_valid(kind_)) {
            return Err(Sense::invalid_cdb_field(2, None).into());
        }
        match sa {
            action::REGISTER | action::REGISTER_AND_IGNORE => {
                if p.spec_i_pt {
                    return Err(Sense::invalid_param_field(20, Some(3)).into());
                }
                let current = self.registrations.get(nexus).copied();
                if sa == action::REGISTER {
                    match current {
                        None if p.key != 0 => return Err(Failure::ReservationConflict),
                        Some(k) if k != p.key => return Err(Failure::ReservationConflict),
                        _ => {}
                    }
                }
                if p.sa_key == 0 {
                    if current.is_some() {
                        self.unregister(nexus, &mut effects);
                    }
                } else {
                    self.registrations.insert(nexus.to_owned(), p.sa_key);
                }
                self.aptpl = p.aptpl;
                self.generation = self.generation.wrapping_add(1);
            }
            action::RESERVE => {
                self.check_key(nexus, p.key)?;
                match &self.reservation {
                    None => {
                        self.reservation = Some(Reservation {
                            holder: nexus.to_owned(),
                            kind: kind_,
                        })
                    }
                    Some(r) if self.is_holder(nexus) && r.kind == kind_ => {}
                    Some(_) => return Err(Failure::ReservationConflict),
                }
            }
            action::RELEASE => {
                self.check_key(nexus, p.key)?;
                let Some(r) = &self.reservation else {
                    return Ok(effects);
                };
                if !self.is_holder(nexus) {
                    return Ok(effects);
                }
                if r.kind != kind_ {
                    return Err(INVALID_RELEASE.into());
                }
                let kind = r.kind;
                self.reservation = None;
                if kind::registrants_share(kind) {
                    for n in self.registrations.keys().filter(|n| *n != nexus) {
                        effects.push(Effect::UnitAttention {
                            nexus: n.clone(),
                            sense: Sense::RESERVATIONS_RELEASED,
                        });
                    }
                }
            }
            action::CLEAR => {
                self.check_key(nexus, p.key)?;
                for n in self.registrations.keys().filter(|n| *n != nexus) {
                    effects.push(Effect::UnitAttention {
                        nexus: n.clone(),
                        sense: Sense::RESERVATIONS_PREEMPTED,
                    });
                }
                self.registrations.clear();
                self.reservation = None;
                self.generation = self.generation.wrapping_add(1);
            }
            action::PREEMPT | action::PREEMPT_AND_ABORT => {
                self.check_key(nexus, p.key)?;
                let abort = sa == action::PREEMPT_AND_ABORT;
                let victims: Vec<String>;
                match self.reservation.clone() {
                    Some(r) if kind::all_registrants(r.kind) && p.sa_key == 0 => {
                        victims = self
                            .registrations
                            .keys()
                            .filter(|n| *n != nexus)
                            .cloned()
                            .collect();
                        self.reservation = Some(Reservation {
                            holder: nexus.to_owned(),
                            kind: kind_,
                        });
                    }
                    Some(r)
                        if !kind::all_registrants(r.kind)
                            && self.registrations.get(&r.holder) == Some(&p.sa_key) =>
                    {
                        victims = self
                            .registrations
                            .iter()
                            .filter(|(n, k)| **k == p.sa_key && *n != nexus)
                            .map(|(n, _)| n.clone())
                            .collect();
                        self.reservation = Some(Reservation {
                            holder: nexus.to_owned(),
                            kind: kind_,
                        });
                    }
                    _ => {
                        if p.sa_key == 0 {
                            return Err(Sense::invalid_param_field(8, None).into());
                        }
                        victims = self
                            .registrations
                            .iter()
                            .filter(|(_, k)| **k == p.sa_key)
                            .map(|(n, _)| n.clone())
                            .collect();
                        if victims.is_empty() {
                            return Err(Failure::ReservationConflict);
                        }
                    }
                }
                for v in &victims {
                    self.registrations.remove(v);
                    effects.push(Effect::UnitAttention {
                        nexus: v.clone(),
                        sense: Sense::REGISTRATIONS_PREEMPTED,
                    });
                    if abort {
                        effects.push(Effect::AbortTasksOf { nexus: v.clone() });
                    }
                }
                if let Some(r) = &self.reservation
                    && !kind::all_registrants(r.kind)
                    && !self.registrations.contains_key(&r.holder)
                {
                    self.reservation = None;
                }
                self.generation = self.generation.wrapping_add(1);
            }
            _ => return Err(Sense::invalid_cdb_field(1, Some(4)).into()),
        }
        Ok(effects)
    }
}

/// Where persistent reservation state is kept across restarts. The target calls
/// [`PrStore::save`] after every change, before it answers the command, and
/// [`PrStore::load`] when a LUN is added.
pub trait PrStore: Send + Sync {
    /// The saved state of the LUN with this serial, if any.
    fn load(&self, serial: &str) -> Result<Option<PrState>, PrStoreError>;
    /// Saves the LUN's state durably.
    fn save(&self, serial: &str, state: &PrState) -> Result<(), PrStoreError>;
}

#[derive(Debug, thiserror::Error)]
pub enum PrStoreError {
    #[error("reading or writing {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} line {line}: {reason}")]
    Format {
        path: PathBuf,
        line: usize,
        reason: &'static str,
    },
}

/// A store that forgets everything on restart (tests, labs).
#[derive(Debug, Default)]
pub struct MemoryPrStore {
    states: std::sync::Mutex<BTreeMap<String, PrState>>,
}

impl PrStore for MemoryPrStore {
    fn load(&self, serial: &str) -> Result<Option<PrState>, PrStoreError> {
        Ok(self
            .states
            .lock()
            .expect("store lock poisoned")
            .get(serial)
            .cloned())
    }

    fn save(&self, serial: &str, state: &PrState) -> Result<(), PrStoreError> {
        self.states
            .lock()
            .expect("store lock poisoned")
            .insert(serial.to_owned(), state.clone());
        Ok(())
    }
}

/// One file per LUN in a directory, replaced atomically (write, fsync, rename, fsync dir).
///
/// Format, version 1, one record per line:
/// ```text
/// iscsi-target-pr 1
/// generation 7
/// aptpl 0
/// reg 0x1234abcd iqn.2024-01.org.example:host1,i,0x23d000000001
/// resv 1 iqn.2024-01.org.example:host1,i,0x23d000000001
/// ```
#[derive(Debug)]
pub struct FilePrStore {
    dir: PathBuf,
}

const FILE_MAGIC: &str = "iscsi-target-pr";
const FILE_VERSION: u32 = 1;

impl FilePrStore {
    /// Uses `dir`, creating it if needed.
    pub fn new(dir: impl Into<PathBuf>) -> Result<Self, PrStoreError> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(|source| PrStoreError::Io {
            path: dir.clone(),
            source,
        })?;
        Ok(Self { dir })
    }

    fn path(&self, serial: &str) -> PathBuf {
        // Serials are the caller's stable ids; keep the file name to safe characters.
        let safe: String = serial
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        self.dir.join(format!("{safe}.pr"))
    }

    fn parse(path: &Path, text: &str) -> Result<PrState, PrStoreError> {
        let err = |line, reason| PrStoreError::Format {
            path: path.to_owned(),
            line,
            reason,
        };
        let mut lines = text.lines().enumerate();
        match lines.next() {
            Some((_, l)) if l == format!("{FILE_MAGIC} {FILE_VERSION}") => {}
            _ => return Err(err(1, "not a version 1 reservation file")),
        }
        let mut st = PrState::default();
        for (i, line) in lines {
            let n = i + 1;
            let mut parts = line.splitn(3, ' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some("generation"), Some(g), None) => {
                    st.generation = g.parse().map_err(|_| err(n, "bad generation"))?
                }
                (Some("aptpl"), Some(a), None) => st.aptpl = a == "1",
                (Some("reg"), Some(k), Some(nexus)) => {
                    let k = k
                        .strip_prefix("0x")
                        .and_then(|h| u64::from_str_radix(h, 16).ok())
                        .ok_or(err(n, "bad key"))?;
                    st.registrations.insert(nexus.to_owned(), k);
                }
                (Some("resv"), Some(t), Some(nexus)) => {
                    let kind = t.parse().map_err(|_| err(n, "bad type"))?;
                    if !kind::is_valid(kind) {
                        return Err(err(n, "bad type"));
                    }
                    st.reservation = Some(Reservation {
                        holder: nexus.to_owned(),
                        kind,
                    });
                }
                (Some(""), None, None) => {}
                _ => return Err(err(n, "unknown record")),
            }
        }
        Ok(st)
    }

    fn render(state: &PrState) -> String {
        let mut s = format!(
            "{FILE_MAGIC} {FILE_VERSION}\ngeneration {}\naptpl {}\n",
            state.generation,
            u8::from(state.aptpl)
        );
        for (nexus, key) in &state.registrations {
            s.push_str(&format!("reg {key:#x} {nexus}\n"));
        }
        if let Some(r) = &state.reservation {
            s.push_str(&format!("resv {} {}\n", r.kind, r.holder));
        }
        s
    }
}

impl PrStore for FilePrStore {
    fn load(&self, serial: &str) -> Result<Option<PrState>, PrStoreError> {
        let path = self.path(serial);
        match std::fs::read_to_string(&path) {
            Ok(text) => Self::parse(&path, &text).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(PrStoreError::Io { path, source }),
        }
    }

    fn save(&self, serial: &str, state: &PrState) -> Result<(), PrStoreError> {
        let path = self.path(serial);
        let tmp = path.with_extension("pr.tmp");
        let io = |source| PrStoreError::Io {
            path: path.clone(),
            source,
        };
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(Self::render(state).as_bytes()).map_err(io)?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, &path).map_err(io)?;
        std::fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(key: u64, sa_key: u64) -> ProutParams {
        ProutParams {
            key,
            sa_key,
            spec_i_pt: false,
            all_tg_pt: false,
            aptpl: false,
        }
    }

    #[test]
    fn register_reserve_release_and_conflicts() {
        let mut st = PrState::default();
        assert_eq!(
            st.apply("a", action::REGISTER, 0, 0, &p(5, 1)),
            Err(Failure::ReservationConflict)
        );
        st.apply("a", action::REGISTER, 0, 0, &p(0, 1)).unwrap();
        st.apply("b", action::REGISTER_AND_IGNORE, 0, 0, &p(99, 2))
            .unwrap();
        assert_eq!(st.generation, 2);
        assert_eq!(
            st.apply("a", action::RESERVE, 0, kind::WRITE_EXCLUSIVE, &p(2, 0)),
            Err(Failure::ReservationConflict)
        );
        st.apply("a", action::RESERVE, 0, kind::WRITE_EXCLUSIVE, &p(1, 0))
            .unwrap();
        assert!(st.conflicts("b", true));
        assert!(!st.conflicts("b", false));
        assert!(!st.conflicts("a", true));
        assert_eq!(
            st.apply("b", action::RESERVE, 0, kind::WRITE_EXCLUSIVE, &p(2, 0)),
            Err(Failure::ReservationConflict)
        );
        // Releasing with the wrong type is an error; a non-holder's release is a no-op.
        assert!(matches!(
            st.apply("a", action::RELEASE, 0, kind::EXCLUSIVE_ACCESS, &p(1, 0)),
            Err(Failure::Check(_))
        ));
        st.apply("b", action::RELEASE, 0, kind::WRITE_EXCLUSIVE, &p(2, 0))
            .unwrap();
        assert!(st.reservation.is_some());
        st.apply("a", action::RELEASE, 0, kind::WRITE_EXCLUSIVE, &p(1, 0))
            .unwrap();
        assert!(st.reservation.is_none());
    }

    #[test]
    fn access_table_by_type() {
        // (type, registered other may read, may write, unregistered may read, may write)
        let table = [
            (kind::WRITE_EXCLUSIVE, true, false, true, false),
            (kind::EXCLUSIVE_ACCESS, false, false, false, false),
            (
                kind::WRITE_EXCLUSIVE_REGISTRANTS_ONLY,
                true,
                true,
                true,
                false,
            ),
            (
                kind::EXCLUSIVE_ACCESS_REGISTRANTS_ONLY,
                true,
                true,
                false,
                false,
            ),
            (
                kind::WRITE_EXCLUSIVE_ALL_REGISTRANTS,
                true,
                true,
                true,
                false,
            ),
            (
                kind::EXCLUSIVE_ACCESS_ALL_REGISTRANTS,
                true,
                true,
                false,
                false,
            ),
        ];
        for (t, rr, rw, ur, uw) in table {
            let mut st = PrState::default();
            st.apply("a", action::REGISTER, 0, 0, &p(0, 1)).unwrap();
            st.apply("b", action::REGISTER, 0, 0, &p(0, 2)).unwrap();
            st.apply("a", action::RESERVE, 0, t, &p(1, 0)).unwrap();
            assert_eq!(!st.conflicts("b", false), rr, "type {t} registered read");
            assert_eq!(!st.conflicts("b", true), rw, "type {t} registered write");
            assert_eq!(!st.conflicts("c", false), ur, "type {t} unregistered read");
            assert_eq!(!st.conflicts("c", true), uw, "type {t} unregistered write");
        }
    }

    #[test]
    fn holder_unregistering_releases_unless_all_registrants() {
        for (t, stays) in [
            (kind::EXCLUSIVE_ACCESS, false),
            (kind::WRITE_EXCLUSIVE_REGISTRANTS_ONLY, false),
            (kind::EXCLUSIVE_ACCESS_ALL_REGISTRANTS, true),
        ] {
            let mut st = PrState::default();
            st.apply("a", action::REGISTER, 0, 0, &p(0, 1)).unwrap();
            st.apply("b", action::REGISTER, 0, 0, &p(0, 2)).unwrap();
            st.apply("a", action::RESERVE, 0, t, &p(1, 0)).unwrap();
            st.apply("a", action::REGISTER, 0, 0, &p(1, 0)).unwrap();
            assert_eq!(st.reservation.is_some(), stays, "type {t}");
            if stays {
                st.apply("b", action::RELEASE, 0, t, &p(2, 0)).unwrap();
                assert!(st.reservation.is_none());
            }
        }
    }

    #[test]
    fn preempt_moves_the_reservation_and_removes_the_victim() {
        let mut st = PrState::default();
        st.apply("a", action::REGISTER, 0, 0, &p(0, 1)).unwrap();
        st.apply("b", action::REGISTER, 0, 0, &p(0, 2)).unwrap();
        st.apply("a", action::RESERVE, 0, kind::EXCLUSIVE_ACCESS, &p(1, 0))
            .unwrap();
        let fx = st
            .apply(
                "b",
                action::PREEMPT_AND_ABORT,
                0,
                kind::WRITE_EXCLUSIVE,
                &p(2, 1),
            )
            .unwrap();
        assert_eq!(
            st.reservation,
            Some(Reservation {
                holder: "b".into(),
                kind: kind::WRITE_EXCLUSIVE
            })
        );
        assert!(!st.registrations.contains_key("a"));
        assert!(fx.contains(&Effect::AbortTasksOf { nexus: "a".into() }));
        // Preempting a key nobody holds is a conflict; key 0 without a reservation is invalid.
        assert_eq!(
            st.apply("b", action::PREEMPT, 0, kind::WRITE_EXCLUSIVE, &p(2, 77)),
            Err(Failure::ReservationConflict)
        );
        st.apply("b", action::CLEAR, 0, 0, &p(2, 0)).unwrap();
        assert!(st.registrations.is_empty() && st.reservation.is_none());
    }

    #[test]
    fn file_store_round_trips_and_rejects_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let store = FilePrStore::new(dir.path()).unwrap();
        assert_eq!(store.load("lun/0").unwrap(), None);
        let mut st = PrState::default();
        st.apply("iqn.a,i,0x1", action::REGISTER, 0, 0, &p(0, 0xabc))
            .unwrap();
        st.apply("iqn.a,i,0x1", action::RESERVE, 0, 6, &p(0xabc, 0))
            .unwrap();
        store.save("lun/0", &st).unwrap();
        assert_eq!(
            FilePrStore::new(dir.path()).unwrap().load("lun/0").unwrap(),
            Some(st)
        );
        std::fs::write(dir.path().join("bad.pr"), "iscsi-target-pr 1\nresv 2 x\n").unwrap();
        assert!(matches!(
            store.load("bad"),
            Err(PrStoreError::Format { line: 2, .. })
        ));
    }
}
