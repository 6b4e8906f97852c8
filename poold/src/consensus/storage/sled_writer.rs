//! The thread that does the store's hot-path sled writes (log records, hard states, log
//! cuts) in order, off the Raft task.
//!
//! sled is not what makes a `Ready` durable (the WAL is), so its writes need not be done
//! before the `Ready`'s messages leave, only before the next checkpoint empties the WAL;
//! and a sled insert now and then blocks the calling thread for a long while (it writes
//! out a full buffer or cleans segments), which on the Raft task would stall the whole
//! pool. Writes run in the order they were queued; after the first failure none runs, and
//! the Raft task learns of it at its next sync. A crash loses what was queued and not yet
//! written, which the WAL still holds and plays back at open.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use super::StoreError;
use super::codec::K_HARD;

/// One sled write, run on the writer thread.
pub(super) type SledOp = Box<dyn FnOnce() -> Result<(), StoreError> + Send>;

enum SledWork {
    Ops(Vec<SledOp>),
    /// Answered once everything sent before it is done.
    Barrier(mpsc::SyncSender<()>),
}

/// Queued writes handed over in batches past this size, so the writer thread is woken a
/// few dozen times a second rather than once per `Ready`.
const HANDOFF_BYTES: usize = 256 << 10;

pub(super) struct SledWriter {
    pub(super) pending: Vec<SledOp>,
    pending_bytes: usize,
    /// The newest hard state not yet queued: only the last one matters.
    pub(super) hard: Option<(sled::Tree, Vec<u8>)>,
    tx: Option<mpsc::Sender<SledWork>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// The first failure; shared, since every later check reports it again.
    failed: Arc<Mutex<Option<Arc<StoreError>>>>,
}

impl SledWriter {
    /// Starts the thread, named `raft-<member_id>-sled`.
    pub(super) fn start(member_id: u64) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<SledWork>();
        let failed: Arc<Mutex<Option<Arc<StoreError>>>> = Arc::new(Mutex::new(None));
        let seen = failed.clone();
        let thread = std::thread::Builder::new()
            .name(format!("raft-{member_id}-sled"))
            .spawn(move || {
                for work in rx {
                    match work {
                        SledWork::Ops(ops) => {
                            for op in ops {
                                if seen.lock().expect("writer lock").is_some() {
                                    break;
                                }
                                if let Err(e) = op() {
                                    tracing::error!(
                                        error = &e as &dyn std::error::Error,
                                        "sled write failed"
                                    );
                                    *seen.lock().expect("writer lock") = Some(Arc::new(e));
                                }
                            }
                        }
                        SledWork::Barrier(done) => {
                            let _ = done.send(());
                        }
                    }
                }
            })?;
        Ok(SledWriter {
            pending: Vec::new(),
            pending_bytes: 0,
            hard: None,
            tx: Some(tx),
            thread: Some(thread),
            failed,
        })
    }

    /// Queues a write of about `bytes` bytes; hands the queue over once it is large.
    pub(super) fn push(&mut self, bytes: usize, op: SledOp) {
        self.pending.push(op);
        self.pending_bytes += bytes;
        if self.pending_bytes >= HANDOFF_BYTES {
            self.hand_off();
        }
    }

    /// Sets the hard state to write with the next hand-off (replacing any not yet queued).
    pub(super) fn set_hard_state(&mut self, meta: &sled::Tree, bytes: Vec<u8>) {
        self.hard = Some((meta.clone(), bytes));
    }

    /// Sends what is queued to the thread.
    pub(super) fn hand_off(&mut self) {
        if let Some((meta, bytes)) = self.hard.take() {
            self.pending.push(Box::new(move || {
                meta.insert(K_HARD, bytes)
                    .map(drop)
                    .map_err(|source| StoreError::Sled {
                        tree: "meta",
                        source,
                    })
            }));
        }
        if self.pending.is_empty() {
            return;
        }
        let ops = std::mem::take(&mut self.pending);
        self.pending_bytes = 0;
        if let Some(tx) = &self.tx
            && tx.send(SledWork::Ops(ops)).is_err()
        {
            *self.failed.lock().expect("writer lock") = Some(Arc::new(StoreError::WriterGone));
        }
    }

    /// The first failure of a write, if any.
    pub(super) fn check(&self) -> Result<(), StoreError> {
        match &*self.failed.lock().expect("writer lock") {
            Some(e) => Err(StoreError::SledWriter(e.clone())),
            None => Ok(()),
        }
    }

    /// Returns once every write queued so far is done.
    pub(super) fn barrier(&mut self) -> Result<(), StoreError> {
        self.hand_off();
        let (done, wait) = mpsc::sync_channel(1);
        if let Some(tx) = &self.tx
            && tx.send(SledWork::Barrier(done)).is_ok()
        {
            let _ = wait.recv();
        }
        self.check()
    }
}

impl Drop for SledWriter {
    /// Writes what is queued and waits for the thread, so that the store can be opened
    /// again as soon as it is dropped.
    fn drop(&mut self) {
        self.hand_off();
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_sled_write_stops_the_writes_after_it_and_is_reported() {
        let mut w = SledWriter::start(9).unwrap();
        let ran = Arc::new(Mutex::new(Vec::new()));
        for i in 0..3 {
            let ran = ran.clone();
            w.push(
                1,
                Box::new(move || {
                    ran.lock().unwrap().push(i);
                    if i == 1 {
                        return Err(StoreError::Sled {
                            tree: "log",
                            source: sled::Error::Io(std::io::Error::other("disk on fire")),
                        });
                    }
                    Ok(())
                }),
            );
        }
        assert!(w.check().is_ok(), "nothing handed over yet");
        let err = proto::error_chain(&w.barrier().unwrap_err());
        assert!(err.contains("disk on fire"), "{err}");
        assert_eq!(*ran.lock().unwrap(), vec![0, 1]);
        assert!(w.check().is_err(), "the failure stays reported");
    }
}
