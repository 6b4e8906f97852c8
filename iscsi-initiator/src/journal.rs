//! The journal of acknowledged writes not yet covered by a flush.
//!
//! A target with a volatile write cache (a thin volume whose chunk map is committed on
//! SYNCHRONIZE CACHE, a file in the page cache of a host that loses power) may lose
//! writes it acknowledged when it restarts before a flush. The caller was told those
//! writes are done; if the session simply reconnected, its next flush would succeed and
//! the data would be silently gone.
//!
//! So the session keeps every acknowledged data-changing command (WRITE, WRITE SAME,
//! UNMAP, the write half of COMPARE AND WRITE) until a SYNCHRONIZE CACHE sent after its
//! acknowledgment succeeds, and replays them, in acknowledgment order, on every new
//! connection before any other command. Replaying is idempotent, so it is done whether
//! or not the target lost anything. The journal is bounded: past its limit the session
//! flushes by itself, and new writes wait for that flush when the journal reaches one and
//! a half times the limit; if it still grows past twice the limit (our flushes failing),
//! the oldest entries are dropped and the next caller flush after a reconnect reports
//! [`crate::Error::WritesLost`] instead of pretending. A replay the target refuses ends
//! the same way.

use std::collections::VecDeque;

use bytes::Bytes;
use iscsi_pdu::scsi::opcode;
use iscsi_pdu::{be16, be32, be64};

use crate::task::{Command, attr};

/// One acknowledged command whose effect may not be durable yet.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub seq: u64,
    pub lun: u64,
    pub cdb: [u8; 16],
    pub data: Bytes,
    /// Blocks touched, for ordering replays (`None`: treat as overlapping everything).
    pub range: Option<(u64, u64)>,
}

impl Entry {
    pub fn command(&self) -> Command {
        let mut c = Command::new(self.lun, &self.cdb).with_data_out(self.data.clone());
        c.attr = attr::SIMPLE;
        c
    }

    /// Whether two entries may touch the same blocks (and so must not be in flight at
    /// once, or the older could land last).
    pub fn overlaps(&self, other: &Entry) -> bool {
        if self.lun != other.lun {
            return false;
        }
        match (self.range, other.range) {
            (Some((a, an)), Some((b, bn))) => a < b + bn && b < a + an,
            _ => true,
        }
    }
}

/// What a completed command means for the journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// Changes data and is not durable on acknowledgment.
    Volatile,
    /// SYNCHRONIZE CACHE.
    Flush,
    /// Anything else (reads, FUA writes, inquiries...).
    Other,
}

/// Classifies a CDB.
pub(crate) fn kind(cdb: &[u8; 16]) -> Kind {
    const FUA: u8 = 0x08;
    match cdb[0] {
        opcode::SYNCHRONIZE_CACHE_10 | opcode::SYNCHRONIZE_CACHE_16 => Kind::Flush,
        opcode::WRITE_16 | opcode::WRITE_10 | opcode::WRITE_12 | opcode::COMPARE_AND_WRITE => {
            if cdb[1] & FUA != 0 {
                Kind::Other
            } else {
                Kind::Volatile
            }
        }
        opcode::WRITE_SAME_16 | opcode::WRITE_SAME_10 | opcode::UNMAP => Kind::Volatile,
        _ => Kind::Other,
    }
}

/// The entry that replays an acknowledged command: the command itself, except that
/// COMPARE AND WRITE becomes a WRITE(16) of its second half (replaying the compare would
/// fail against its own result).
fn replay_of(cmd: &Command) -> (Option<(u64, u64)>, [u8; 16], Bytes) {
    let c = &cmd.cdb;
    match c[0] {
        opcode::WRITE_16 | opcode::WRITE_SAME_16 => (
            Some((be64(c, 2), u64::from(be32(c, 10)))),
            *c,
            cmd.data_out.clone(),
        ),
        opcode::WRITE_10 | opcode::WRITE_SAME_10 => (
            Some((u64::from(be32(c, 2)), u64::from(be16(c, 7)))),
            *c,
            cmd.data_out.clone(),
        ),
        opcode::WRITE_12 => (
            Some((u64::from(be32(c, 2)), u64::from(be32(c, 6)))),
            *c,
            cmd.data_out.clone(),
        ),
        opcode::COMPARE_AND_WRITE => {
            let lba = be64(c, 2);
            let blocks = c[13];
            let half = cmd.data_out.len() / 2;
            let w = crate::scsi::write::cdb(lba, blocks.into(), false);
            (Some((lba, blocks.into())), w, cmd.data_out.slice(half..))
        }
        _ => (None, *c, cmd.data_out.clone()),
    }
}

/// Acknowledged, not yet flushed commands, oldest first.
#[derive(Debug)]
pub(crate) struct Journal {
    entries: VecDeque<Entry>,
    bytes: usize,
    next_seq: u64,
    /// Flush by ourselves above this many bytes; 0 disables the journal.
    limit: usize,
    /// Entries were dropped (over twice the limit): a replay would be incomplete.
    pub overflowed: bool,
    /// Acknowledged writes may have been lost: the next caller flush reports it.
    pub lost: bool,
}

impl Journal {
    pub fn new(limit: usize) -> Self {
        Self {
            entries: VecDeque::new(),
            bytes: 0,
            next_seq: 1,
            limit,
            overflowed: false,
            lost: false,
        }
    }

    pub fn enabled(&self) -> bool {
        self.limit > 0
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The mark a flush sent now carries: it covers every entry recorded so far.
    pub fn mark(&self) -> u64 {
        self.next_seq - 1
    }

    /// Whether new writes should wait for our flush to make room: at one and a half
    /// times the limit (the flush starts at the limit; entries are dropped only at
    /// twice it, when writes already in flight overshoot or flushes keep failing).
    pub fn full(&self) -> bool {
        self.enabled() && self.bytes >= self.limit + self.limit / 2
    }

    /// Whether the session should flush by itself.
    pub fn wants_flush(&self) -> bool {
        self.enabled() && self.bytes > self.limit
    }

    /// Records an acknowledged command (GOOD status) of kind [`Kind::Volatile`].
    pub fn record(&mut self, cmd: &Command) {
        if !self.enabled() {
            return;
        }
        let (range, cdb, data) = replay_of(cmd);
        self.bytes += data.len() + 64;
        self.entries.push_back(Entry {
            seq: self.next_seq,
            lun: cmd.lun,
            cdb,
            data,
            range,
        });
        self.next_seq += 1;
        while self.bytes > self.limit.saturating_mul(2) {
            let Some(e) = self.entries.pop_front() else {
                break;
            };
            self.bytes -= e.data.len() + 64;
            if !self.overflowed {
                tracing::warn!(
                    limit = self.limit,
                    "more unflushed writes than the journal holds; a target restart now \
                     could lose some, and the next flush after one would report it"
                );
            }
            self.overflowed = true;
        }
    }

    /// A flush of `lun` carrying `mark` succeeded: its entries up to the mark are
    /// durable.
    pub fn flushed(&mut self, lun: u64, mark: u64) {
        let before = self.entries.len();
        self.entries.retain(|e| e.lun != lun || e.seq > mark);
        if self.entries.len() != before {
            self.bytes = self.entries.iter().map(|e| e.data.len() + 64).sum();
        }
        if self.entries.is_empty() {
            self.overflowed = false;
        }
    }

    /// The entries to replay on a new connection, oldest first.
    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.entries.iter()
    }

    /// A new connection: replays are about to be sent. An overflowed journal cannot
    /// restore everything: say so at the next flush.
    pub fn reconnected(&mut self) {
        if self.overflowed {
            self.lost = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(lba: u64, blocks: u32, fua: bool) -> Command {
        Command::new(7, &crate::scsi::write::cdb(lba, blocks, fua))
            .with_data_out(Bytes::from(vec![1u8; blocks as usize * 512]))
    }

    #[test]
    fn classifies_commands() {
        assert_eq!(kind(&write(0, 1, false).cdb), Kind::Volatile);
        assert_eq!(kind(&write(0, 1, true).cdb), Kind::Other);
        assert_eq!(kind(&crate::scsi::read::cdb(0, 1)), Kind::Other);
        let mut s = [0u8; 16];
        s[0] = opcode::SYNCHRONIZE_CACHE_10;
        assert_eq!(kind(&s), Kind::Flush);
        s[0] = opcode::UNMAP;
        assert_eq!(kind(&s), Kind::Volatile);
    }

    #[test]
    fn flush_prunes_what_it_covers_only() {
        let mut j = Journal::new(1 << 20);
        j.record(&write(0, 8, false));
        j.record(&write(8, 8, false));
        let mark = j.mark();
        j.record(&write(16, 8, false));
        // A flush of another LUN covers nothing here.
        j.flushed(8, mark);
        assert_eq!(j.entries().count(), 3);
        j.flushed(7, mark);
        let left: Vec<u64> = j.entries().map(|e| e.range.unwrap().0).collect();
        assert_eq!(left, vec![16]);
        assert_eq!(j.bytes(), 4096 + 64);
    }

    #[test]
    fn bounded_and_reports_overflow() {
        let mut j = Journal::new(8192);
        assert!(!j.wants_flush());
        for i in 0..3 {
            j.record(&write(i * 8, 8, false));
        }
        assert!(j.wants_flush());
        for i in 3..10 {
            j.record(&write(i * 8, 8, false));
        }
        assert!(j.bytes() <= 2 * 8192);
        assert!(j.overflowed && !j.lost);
        j.reconnected();
        assert!(j.lost);
        let mark = j.mark();
        j.flushed(7, mark);
        assert!(j.is_empty() && !j.overflowed);
    }

    #[test]
    fn compare_and_write_replays_as_a_write_of_its_new_data() {
        let mut data = vec![0u8; 512];
        data.extend_from_slice(&[9u8; 512]);
        let cmd = Command::new(0, &crate::scsi::caw::cdb(40, 1)).with_data_out(Bytes::from(data));
        let mut j = Journal::new(1 << 20);
        j.record(&cmd);
        let e = j.entries().next().unwrap();
        assert_eq!(e.cdb[0], opcode::WRITE_16);
        assert_eq!(e.range, Some((40, 1)));
        assert!(e.data.iter().all(|&b| b == 9));
        let other = Entry {
            seq: 0,
            lun: 0,
            cdb: [0; 16],
            data: Bytes::new(),
            range: Some((41, 4)),
        };
        assert!(!e.overlaps(&other));
        assert!(e.overlaps(&Entry {
            range: None,
            ..other.clone()
        }));
    }

    #[test]
    fn disabled_journal_keeps_nothing() {
        let mut j = Journal::new(0);
        j.record(&write(0, 8, false));
        assert!(j.is_empty() && !j.wants_flush());
    }
}
