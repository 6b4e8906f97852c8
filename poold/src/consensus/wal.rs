//! The Raft write-ahead log (WAL) in front of the sled store: what makes each `Ready`
//! durable.
//!
//! Making sled's own log durable costs a flush, and a sled 0.34 flush hands the write to
//! its I/O pool, whose `notify_all` wakes every idle pool thread: several context switches
//! per flush. So each `Ready`'s log record and hard state go to this file, and sled, which
//! still holds the log, is written (by a thread of its own) without a flush and made
//! durable only at a checkpoint (every [`CHECKPOINT_BYTES`], and around a snapshot
//! installed from the leader, which the WAL does not record), after which the WAL starts
//! empty. At open, the records since the last checkpoint are played again on top of
//! whatever sled kept: each one sets a value (the log from an index on, the hard state), so
//! replaying them in order over any prefix of them ends in the state they were written
//! from.
//!
//! The WAL's own thread (the syncer) does the writing: the Raft task submits each
//! `Ready`'s records and goes on, and the syncer writes whatever was submitted, with one
//! `pwrite` a submission and one `fdatasync` for all that queued meanwhile, then reports
//! the newest write number that is durable (and wakes the Raft task, which sends what
//! waited on it). A failed write or fdatasync stops the syncer: nothing after it becomes
//! durable, and every later call reports the failure.
//!
//! The file is written in place and never changes size in normal work (it is filled with
//! zeros when created), so an fdatasync has only data to flush, not the file's size too
//! (on ext4 that would be one more write to wait for). Which records are current is told
//! by an epoch: the header at offset 0 holds it, each record's CRC covers it, and emptying
//! the WAL is writing a header with the next epoch. A record is
//! `u32 LE length ‖ u32 LE CRC-32 of (epoch ‖ body) ‖ body`, the body a kind byte and
//! its bytes, from [`DATA_START`] on. A crash can leave the last record torn (it was never
//! synced, so never acknowledged); reading stops at the first record that does not check
//! out: torn, zeros, or one from an earlier epoch.
//!
//! The file keeps the name it was first created with, [`FILE`] (`raft-journal`): existing
//! data directories hold it under that name.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

/// The WAL's file in the member's data directory. Part of the on-disk format: renaming it
/// would make every existing member start with an empty WAL and lose what it holds.
pub const FILE: &str = "raft-journal";
/// WAL size past which the next sync checkpoints sled and empties the WAL.
pub const CHECKPOINT_BYTES: u64 = 8 << 20;
/// Where records start; the header has this first block to itself.
pub const DATA_START: u64 = 4096;
/// The size the file is made at creation: a checkpoint's worth and room for the last sync.
const PREALLOCATED: u64 = DATA_START + CHECKPOINT_BYTES + (1 << 20);
const MAGIC: &[u8; 4] = b"PRJ1";
const FILE_HEADER: usize = 16;

/// What a WAL record holds.
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
const RECORD_HEADER: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum WalError {
    #[error("Raft WAL I/O failed")]
    Io(#[from] io::Error),
    #[error("the Raft WAL's syncer thread is gone")]
    SyncerGone,
    /// Reported by every call after the syncer's first failure.
    #[error("a Raft WAL write or fdatasync failed; nothing after it is durable")]
    Failed(#[source] Arc<io::Error>),
    #[error("the Raft WAL's header is damaged")]
    BadHeader,
}

/// Called by the syncer thread after each fdatasync (or failure): the Raft task's wake-up.
pub type Waker = Box<dyn Fn() + Send>;

/// The WAL of one member: records are staged by the Raft task, written and fdatasynced by
/// the syncer thread.
pub struct Wal {
    file: Arc<File>,
    path: PathBuf,
    epoch: u64,
    /// Records staged since the last submit.
    staged: Vec<u8>,
    /// Bytes of records handed to the syncer (from `DATA_START`), durable or on their way.
    len: u64,
    /// The number of the last submitted write; the syncer reports them durable in order.
    submitted: u64,
    syncer: Syncer,
}

/// The thread that writes submitted records and fdatasyncs them, so that the Raft task
/// goes on (takes messages, commits, answers clients) while the disk works. Whatever
/// queued during one fdatasync goes into the next: one flush covers many writes.
struct Syncer {
    queue: Option<mpsc::Sender<Write>>,
    progress: Arc<Progress>,
    thread: Option<JoinHandle<()>>,
}

struct Write {
    number: u64,
    at: u64,
    bytes: Vec<u8>,
}

#[derive(Default)]
struct Progress {
    state: Mutex<Durable>,
    changed: Condvar,
    waker: Mutex<Option<Waker>>,
}

#[derive(Default)]
struct Durable {
    /// Every write numbered up to this one is durable.
    number: u64,
    /// The write or fdatasync that failed; nothing after it is written.
    failed: Option<Arc<io::Error>>,
}

impl Wal {
    /// Opens the WAL in `dir` (creating it, durably, when missing) and reads the
    /// records of its current epoch.
    ///
    /// `thread` names the syncer thread the WAL starts.
    pub fn open(dir: &Path, thread: &str) -> Result<(Wal, Vec<Record>), WalError> {
        let path = dir.join(FILE);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        let size = file.metadata()?.len();
        let mut header = [0u8; FILE_HEADER];
        if size >= FILE_HEADER as u64 {
            file.read_exact_at(&mut header, 0)?;
        }
        let file = Arc::new(file);
        let mut wal = Wal {
            syncer: Syncer::start(thread, file.clone())?,
            file,
            path,
            epoch: 0,
            staged: Vec::new(),
            len: 0,
            submitted: 0,
        };
        if header == [0u8; FILE_HEADER] {
            // New, or its creation never finished: no record can have been synced to it.
            wal.create(dir)?;
            return Ok((wal, Vec::new()));
        }
        wal.epoch = parse_header(&header).ok_or(WalError::BadHeader)?;
        let mut bytes = vec![0u8; size.saturating_sub(DATA_START) as usize];
        wal.file.read_exact_at(&mut bytes, DATA_START)?;
        let (records, good) = parse(&bytes, wal.epoch);
        wal.len = good as u64;
        Ok((wal, records))
    }

    fn create(&mut self, dir: &Path) -> io::Result<()> {
        self.epoch = 1;
        let zeros = vec![0u8; 1 << 20];
        let mut at = DATA_START;
        while at < PREALLOCATED {
            let n = zeros.len().min((PREALLOCATED - at) as usize);
            self.file.write_all_at(&zeros[..n], at)?;
            at += n as u64;
        }
        self.file.write_all_at(&header(self.epoch), 0)?;
        self.file.sync_all()?;
        File::open(dir)?.sync_all()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Adds a log record (as sled's `log` tree holds it) to the next [`Wal::sync`].
    pub fn stage_entries(&mut self, record: &[u8]) {
        self.stage(KIND_ENTRIES, record);
    }

    /// Adds an encoded hard state to the next [`Wal::sync`].
    pub fn stage_hard_state(&mut self, hard_state: &[u8]) {
        self.stage(KIND_HARD_STATE, hard_state);
    }

    fn stage(&mut self, kind: u8, data: &[u8]) {
        let mut crc = crc32fast::Hasher::new();
        crc.update(&self.epoch.to_le_bytes());
        crc.update(&[kind]);
        crc.update(data);
        self.staged
            .extend_from_slice(&(data.len() as u32 + 1).to_le_bytes());
        self.staged.extend_from_slice(&crc.finalize().to_le_bytes());
        self.staged.push(kind);
        self.staged.extend_from_slice(data);
    }

    /// Hands the staged records to the syncer thread and returns the number that
    /// [`Wal::durable`] reaches once they are durable (with nothing staged, the number
    /// of the last submitted write: what is staged now is durable once that is).
    pub fn submit(&mut self) -> Result<u64, WalError> {
        if self.staged.is_empty() {
            return Ok(self.submitted);
        }
        let bytes = std::mem::take(&mut self.staged);
        let write = Write {
            number: self.submitted + 1,
            at: DATA_START + self.len,
            bytes,
        };
        let len = write.bytes.len() as u64;
        let sent = self
            .syncer
            .queue
            .as_ref()
            .is_some_and(|q| q.send(write).is_ok());
        if !sent {
            self.durable()?;
            return Err(WalError::SyncerGone);
        }
        self.submitted += 1;
        self.len += len;
        Ok(self.submitted)
    }

    /// The number of the newest durable write; an error once a write or fdatasync failed.
    pub fn durable(&self) -> Result<u64, WalError> {
        let d = self.syncer.progress.state.lock().expect("WAL progress");
        match &d.failed {
            Some(e) => Err(WalError::Failed(e.clone())),
            None => Ok(d.number),
        }
    }

    /// Waits until the write numbered `number` (and so every one before it) is durable.
    pub fn wait(&self, number: u64) -> Result<(), WalError> {
        let p = &self.syncer.progress;
        let mut d = p.state.lock().expect("WAL progress");
        while d.number < number && d.failed.is_none() {
            d = p.changed.wait(d).expect("WAL progress");
        }
        drop(d);
        self.durable().map(drop)
    }

    /// Writes the staged records and waits until they are durable.
    pub fn sync(&mut self) -> Result<(), WalError> {
        let n = self.submit()?;
        self.wait(n)
    }

    /// The number of the last write submitted.
    pub fn submitted(&self) -> u64 {
        self.submitted
    }

    /// Sets what the syncer calls after each write it made durable.
    pub fn set_waker(&self, waker: Waker) {
        *self.syncer.progress.waker.lock().expect("WAL waker") = Some(waker);
    }

    /// Bytes of records submitted to the file.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0 && self.staged.is_empty()
    }

    /// Empties the WAL, staged records included: call only once everything it held
    /// is durable in sled. The next epoch's header makes every record written so far stale.
    /// Waits for the writes in flight first, so none lands after the new header.
    pub fn reset(&mut self) -> Result<(), WalError> {
        self.staged.clear();
        self.wait(self.submitted)?;
        if self.len > 0 {
            self.file.write_all_at(&header(self.epoch + 1), 0)?;
            self.file.sync_data()?;
            self.epoch += 1;
            self.len = 0;
        }
        Ok(())
    }
}

impl Syncer {
    fn start(name: &str, file: Arc<File>) -> io::Result<Syncer> {
        let (tx, rx) = mpsc::channel::<Write>();
        let progress = Arc::new(Progress::default());
        let p = progress.clone();
        let thread = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut last = first.number;
                    let mut outcome = file.write_all_at(&first.bytes, first.at);
                    while let Ok(w) = rx.try_recv() {
                        last = w.number;
                        if outcome.is_ok() {
                            outcome = file.write_all_at(&w.bytes, w.at);
                        }
                    }
                    let outcome = outcome.and_then(|_| file.sync_data());
                    let failed = outcome.is_err();
                    {
                        let mut d = p.state.lock().expect("WAL progress");
                        match outcome {
                            Ok(()) => d.number = last,
                            Err(e) => d.failed = Some(Arc::new(e)),
                        }
                    }
                    p.changed.notify_all();
                    if let Some(wake) = p.waker.lock().expect("WAL waker").as_ref() {
                        wake();
                    }
                    if failed {
                        // Nothing after a failed write may become durable before it.
                        break;
                    }
                }
            })?;
        Ok(Syncer {
            queue: Some(tx),
            progress,
            thread: Some(thread),
        })
    }
}

impl Drop for Syncer {
    fn drop(&mut self) {
        // Closing the queue ends the thread once it has written what was submitted.
        self.queue.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn header(epoch: u64) -> [u8; FILE_HEADER] {
    let mut h = [0u8; FILE_HEADER];
    h[..4].copy_from_slice(MAGIC);
    h[4..12].copy_from_slice(&epoch.to_le_bytes());
    let crc = crc32fast::hash(&h[..12]);
    h[12..].copy_from_slice(&crc.to_le_bytes());
    h
}

fn parse_header(h: &[u8; FILE_HEADER]) -> Option<u64> {
    let crc = u32::from_le_bytes(h[12..].try_into().expect("4 bytes"));
    (&h[..4] == MAGIC && crc32fast::hash(&h[..12]) == crc)
        .then(|| u64::from_le_bytes(h[4..12].try_into().expect("8 bytes")))
}

/// The records of `epoch` at the start of `bytes`, up to the first that does not check
/// out, and how many bytes they take.
fn parse(mut bytes: &[u8], epoch: u64) -> (Vec<Record>, usize) {
    let mut records = Vec::new();
    let mut good = 0;
    while bytes.len() >= RECORD_HEADER {
        let len = u32::from_le_bytes(bytes[..4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(bytes[4..8].try_into().expect("4 bytes"));
        let Some(body) = bytes.get(RECORD_HEADER..RECORD_HEADER + len) else {
            break;
        };
        let mut h = crc32fast::Hasher::new();
        h.update(&epoch.to_le_bytes());
        h.update(body);
        if len == 0 || h.finalize() != crc {
            break;
        }
        let data = body[1..].to_vec();
        records.push(match body[0] {
            KIND_ENTRIES => Record::Entries(data),
            KIND_HARD_STATE => Record::HardState(data),
            _ => break,
        });
        good += RECORD_HEADER + len;
        bytes = &bytes[RECORD_HEADER + len..];
    }
    (records, good)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_at(path: &Path, at: u64, bytes: &[u8]) {
        let f = OpenOptions::new().write(true).open(path).unwrap();
        f.write_all_at(bytes, at).unwrap();
    }

    #[test]
    fn synced_records_are_read_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, records) = Wal::open(dir.path(), "test-wal").unwrap();
        assert!(records.is_empty());
        let size = std::fs::metadata(j.path()).unwrap().len();
        j.stage_entries(b"one");
        j.stage_hard_state(b"hs");
        j.sync().unwrap();
        j.stage_entries(b"");
        j.sync().unwrap();
        // Staged but never synced: not in the file.
        j.stage_entries(b"lost");
        drop(j);
        let (j, records) = Wal::open(dir.path(), "test-wal").unwrap();
        assert_eq!(
            records,
            vec![
                Record::Entries(b"one".to_vec()),
                Record::HardState(b"hs".to_vec()),
                Record::Entries(vec![]),
            ]
        );
        assert_eq!(
            std::fs::metadata(j.path()).unwrap().len(),
            size,
            "written in place"
        );
    }

    #[test]
    fn submitted_writes_become_durable_in_order_and_wake_the_caller() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, _) = Wal::open(dir.path(), "test-wal").unwrap();
        let (wake_tx, wake_rx) = mpsc::channel();
        j.set_waker(Box::new(move || {
            let _ = wake_tx.send(());
        }));
        assert_eq!(
            j.submit().unwrap(),
            0,
            "nothing staged: nothing to wait for"
        );
        j.stage_entries(b"a");
        let first = j.submit().unwrap();
        j.stage_entries(b"b");
        j.stage_hard_state(b"hs");
        let second = j.submit().unwrap();
        assert_eq!((first, second), (1, 2));
        j.stage_entries(b"c");
        assert_eq!(j.submit().unwrap(), 3);
        assert_eq!(j.submitted(), 3);
        j.wait(3).unwrap();
        assert_eq!(j.durable().unwrap(), 3);
        wake_rx
            .recv_timeout(std::time::Duration::from_secs(5))
            .expect("the syncer wakes its caller");
        drop(j);
        let (_, records) = Wal::open(dir.path(), "test-wal").unwrap();
        assert_eq!(
            records,
            vec![
                Record::Entries(b"a".to_vec()),
                Record::Entries(b"b".to_vec()),
                Record::HardState(b"hs".to_vec()),
                Record::Entries(b"c".to_vec()),
            ]
        );
    }

    #[test]
    fn reading_stops_at_a_torn_or_damaged_record() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, _) = Wal::open(dir.path(), "test-wal").unwrap();
        j.stage_entries(b"kept");
        j.sync().unwrap();
        let second = DATA_START + j.len();
        j.stage_entries(b"damaged");
        j.stage_entries(b"after");
        j.sync().unwrap();
        let path = j.path().to_owned();
        drop(j);
        let full = std::fs::read(&path).unwrap();

        // Torn: the second record's last bytes never reached the disk.
        write_at(&path, second + 12, &[0; 4]);
        let (_, records) = Wal::open(dir.path(), "test-wal").unwrap();
        assert_eq!(records, vec![Record::Entries(b"kept".to_vec())]);

        // A flipped bit in the second record's body: it and all after it are ignored.
        std::fs::write(&path, &full).unwrap();
        write_at(&path, second + 10, &[full[second as usize + 10] ^ 0x10]);
        let (_, records) = Wal::open(dir.path(), "test-wal").unwrap();
        assert_eq!(records, vec![Record::Entries(b"kept".to_vec())]);

        // A damaged header is refused rather than guessed at.
        std::fs::write(&path, &full).unwrap();
        write_at(&path, 5, &[0xff]);
        assert!(matches!(
            Wal::open(dir.path(), "test-wal"),
            Err(WalError::BadHeader)
        ));
    }

    #[test]
    fn reset_makes_every_earlier_record_stale() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, _) = Wal::open(dir.path(), "test-wal").unwrap();
        j.stage_hard_state(b"a");
        j.stage_hard_state(b"b");
        j.stage_hard_state(b"c");
        j.sync().unwrap();
        assert!(!j.is_empty());
        j.stage_hard_state(b"staged");
        j.reset().unwrap();
        assert!(j.is_empty());
        // The new record overwrites only the first old one; the others stay in the file,
        // of the old epoch.
        j.stage_hard_state(b"d");
        j.sync().unwrap();
        drop(j);
        let (_, records) = Wal::open(dir.path(), "test-wal").unwrap();
        assert_eq!(records, vec![Record::HardState(b"d".to_vec())]);
    }

    #[test]
    fn the_file_keeps_its_on_disk_name() {
        // Existing data directories hold the WAL under this name.
        assert_eq!(FILE, "raft-journal");
    }

    #[test]
    fn a_creation_cut_short_starts_over() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE), [0u8; 100]).unwrap();
        let (mut j, records) = Wal::open(dir.path(), "test-wal").unwrap();
        assert!(records.is_empty());
        j.stage_entries(b"x");
        j.sync().unwrap();
        drop(j);
        let (_, records) = Wal::open(dir.path(), "test-wal").unwrap();
        assert_eq!(records, vec![Record::Entries(b"x".to_vec())]);
    }
}
