//! The journal in front of the sled store: what makes each `Ready` durable.
//!
//! Making sled's own log durable costs a flush, and a sled 0.34 flush hands the write to
//! its I/O pool, whose `notify_all` wakes every idle pool thread (about nine context
//! switches a flush; on a paravirtualised host one costs tens of microseconds). So the
//! Raft thread appends each `Ready`'s log record and hard state to this file, with one
//! `write` and one `fdatasync` of its own, and sled, which still holds the log, is
//! written without a flush and made durable only at a checkpoint (every
//! [`CHECKPOINT_BYTES`], and around anything the journal does not record), after which
//! the journal starts empty. At open, the records since the last checkpoint are played
//! again on top of whatever sled kept: each one sets a value (the log from an index on,
//! the hard state), so replaying them in order over any prefix of them ends in the state
//! they were written from.
//!
//! A record is `u32 LE length ‖ u32 LE CRC-32 of the body ‖ body`, the body a kind byte
//! and its bytes. A crash can leave the last record torn (it was never synced, so never
//! acknowledged); reading stops at the first record that does not check out.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

/// The journal's file in the member's data directory.
pub const FILE: &str = "raft-journal";
/// Journal size past which the next sync checkpoints sled and empties the journal.
pub const CHECKPOINT_BYTES: u64 = 8 << 20;

/// What a journal record holds.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    /// A log record as sled's `log` tree holds it: entries from their first index on,
    /// replacing whatever the log held from there.
    Entries(Vec<u8>),
    /// An encoded `eraftpb.HardState`.
    HardState(Vec<u8>),
}

const KIND_ENTRIES: u8 = 1;
const KIND_HARD_STATE: u8 = 2;
const HEADER: usize = 8;

pub struct Journal {
    file: File,
    path: PathBuf,
    /// Records staged since the last sync.
    staged: Vec<u8>,
    /// Bytes in the file.
    len: u64,
}

impl Journal {
    /// Opens the journal in `dir` (creating it, durably, when missing) and reads its
    /// records; also returns how many bytes of a torn or damaged tail were ignored.
    pub fn open(dir: &Path) -> io::Result<(Journal, Vec<Record>, u64)> {
        let path = dir.join(FILE);
        let existed = path.exists();
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)?;
        if !existed {
            File::open(dir)?.sync_all()?;
        }
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        let (records, good) = parse(&bytes);
        let journal = Journal {
            file,
            path,
            staged: Vec::new(),
            len: bytes.len() as u64,
        };
        Ok((journal, records, bytes.len() as u64 - good as u64))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Adds a log record (as sled's `log` tree holds it) to the next [`Journal::sync`].
    pub fn stage_entries(&mut self, record: &[u8]) {
        self.stage(KIND_ENTRIES, record);
    }

    /// Adds an encoded hard state to the next [`Journal::sync`].
    pub fn stage_hard_state(&mut self, hard_state: &[u8]) {
        self.stage(KIND_HARD_STATE, hard_state);
    }

    fn stage(&mut self, kind: u8, data: &[u8]) {
        let mut crc = crc32fast::Hasher::new();
        crc.update(&[kind]);
        crc.update(data);
        self.staged
            .extend_from_slice(&(data.len() as u32 + 1).to_le_bytes());
        self.staged.extend_from_slice(&crc.finalize().to_le_bytes());
        self.staged.push(kind);
        self.staged.extend_from_slice(data);
    }

    /// Writes the staged records and makes them durable.
    pub fn sync(&mut self) -> io::Result<()> {
        if self.staged.is_empty() {
            return Ok(());
        }
        self.file.write_all(&self.staged)?;
        self.file.sync_data()?;
        self.len += self.staged.len() as u64;
        self.staged.clear();
        Ok(())
    }

    /// Bytes in the file.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0 && self.staged.is_empty()
    }

    /// Empties the journal, staged records included: call only once everything it held
    /// is durable in sled.
    pub fn reset(&mut self) -> io::Result<()> {
        self.staged.clear();
        if self.len > 0 {
            self.file.set_len(0)?;
            self.file.sync_all()?;
            self.len = 0;
        }
        Ok(())
    }
}

/// The records of a journal's bytes, up to the first that does not check out, and how
/// many bytes those records take.
fn parse(mut bytes: &[u8]) -> (Vec<Record>, usize) {
    let mut records = Vec::new();
    let mut good = 0;
    while bytes.len() >= HEADER {
        let len = u32::from_le_bytes(bytes[..4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(bytes[4..8].try_into().expect("4 bytes"));
        let Some(body) = bytes.get(HEADER..HEADER + len) else {
            break;
        };
        if len == 0 || crc32fast::hash(body) != crc {
            break;
        }
        let data = body[1..].to_vec();
        records.push(match body[0] {
            KIND_ENTRIES => Record::Entries(data),
            KIND_HARD_STATE => Record::HardState(data),
            _ => break,
        });
        good += HEADER + len;
        bytes = &bytes[HEADER + len..];
    }
    (records, good)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synced_records_are_read_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, records, torn) = Journal::open(dir.path()).unwrap();
        assert!(records.is_empty());
        assert_eq!(torn, 0);
        j.stage_entries(b"one");
        j.stage_hard_state(b"hs");
        j.sync().unwrap();
        j.stage_entries(b"");
        j.sync().unwrap();
        // Staged but never synced: not in the file.
        j.stage_entries(b"lost");
        drop(j);
        let (_, records, torn) = Journal::open(dir.path()).unwrap();
        assert_eq!(
            records,
            vec![
                Record::Entries(b"one".to_vec()),
                Record::HardState(b"hs".to_vec()),
                Record::Entries(vec![]),
            ]
        );
        assert_eq!(torn, 0);
    }

    #[test]
    fn reading_stops_at_a_torn_or_damaged_record() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, _, _) = Journal::open(dir.path()).unwrap();
        j.stage_entries(b"kept");
        j.stage_entries(b"damaged");
        j.stage_entries(b"after");
        j.sync().unwrap();
        let full = std::fs::read(j.path()).unwrap();
        let first = HEADER + 1 + 4;
        drop(j);

        // Torn in the middle of the second record.
        std::fs::write(dir.path().join(FILE), &full[..first + 5]).unwrap();
        let (_, records, torn) = Journal::open(dir.path()).unwrap();
        assert_eq!(records, vec![Record::Entries(b"kept".to_vec())]);
        assert_eq!(torn, 5);

        // A flipped bit in the second record's body: it and all after it are ignored.
        let mut bad = full.clone();
        bad[first + HEADER + 2] ^= 0x10;
        std::fs::write(dir.path().join(FILE), &bad).unwrap();
        let (_, records, torn) = Journal::open(dir.path()).unwrap();
        assert_eq!(records, vec![Record::Entries(b"kept".to_vec())]);
        assert_eq!(torn as usize, full.len() - first);
    }

    #[test]
    fn reset_empties_the_file_and_drops_staged_records() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, _, _) = Journal::open(dir.path()).unwrap();
        j.stage_hard_state(b"a");
        j.sync().unwrap();
        assert!(!j.is_empty());
        j.stage_hard_state(b"b");
        j.reset().unwrap();
        assert!(j.is_empty());
        j.stage_hard_state(b"c");
        j.sync().unwrap();
        drop(j);
        let (_, records, _) = Journal::open(dir.path()).unwrap();
        assert_eq!(records, vec![Record::HardState(b"c".to_vec())]);
    }
}
