//! A VM's console output: a bounded ring buffer of the latest bytes, an optional log file
//! with everything, and live subscribers.
//!
//! Taking a snapshot of the history and subscribing to what follows happen under one
//! lock, so a reader sees every byte exactly once: the history, then the live stream.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::broadcast;

/// Default size of the history kept in memory.
pub const DEFAULT_BUFFER_BYTES: usize = 64 * 1024;
/// Live chunks a slow subscriber may fall behind before it starts losing them.
const SUBSCRIBER_BACKLOG: usize = 4096;

/// Where a serial port's output goes.
pub trait ConsoleOut: Send + Sync {
    fn write(&self, data: &[u8]);
}

#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("cannot open console log {path}")]
    OpenLog {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What a new reader gets: the history, how many older bytes were already dropped from
/// it, and a receiver for what comes next.
pub struct Subscription {
    pub history: Vec<u8>,
    pub dropped_bytes: u64,
    pub live: broadcast::Receiver<Arc<[u8]>>,
}

struct Inner {
    ring: VecDeque<u8>,
    capacity: usize,
    /// Bytes ever written, and bytes pushed out of the ring by newer ones.
    total: u64,
    dropped: u64,
    log: Option<BufWriter<File>>,
    log_failed: bool,
}

pub struct Console {
    inner: Mutex<Inner>,
    live: broadcast::Sender<Arc<[u8]>>,
}

impl Console {
    /// A console keeping the last `capacity` bytes (at least 1) and, with `log`, appending
    /// everything to that file.
    pub fn new(capacity: usize, log: Option<&Path>) -> Result<Arc<Self>, ConsoleError> {
        let log = match log {
            Some(path) => Some(BufWriter::new(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|source| ConsoleError::OpenLog {
                        path: path.to_owned(),
                        source,
                    })?,
            )),
            None => None,
        };
        let capacity = capacity.max(1);
        Ok(Arc::new(Self {
            inner: Mutex::new(Inner {
                ring: VecDeque::with_capacity(capacity.min(DEFAULT_BUFFER_BYTES)),
                capacity,
                total: 0,
                dropped: 0,
                log,
                log_failed: false,
            }),
            live: broadcast::channel(SUBSCRIBER_BACKLOG).0,
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The history now in the ring buffer.
    pub fn contents(&self) -> Vec<u8> {
        let inner = self.lock();
        inner.ring.iter().copied().collect()
    }

    /// The history as text (lossy), for tests and people.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.contents()).into_owned()
    }

    /// Bytes written since the console was made.
    pub fn total_bytes(&self) -> u64 {
        self.lock().total
    }

    pub fn subscribe(&self) -> Subscription {
        let inner = self.lock();
        Subscription {
            history: inner.ring.iter().copied().collect(),
            dropped_bytes: inner.dropped,
            live: self.live.subscribe(),
        }
    }

    /// Waits until the history contains `needle`, polling; true if it appeared in time.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.text().contains(needle) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Flushes the log file.
    pub fn flush(&self) {
        if let Some(log) = self.lock().log.as_mut() {
            let _ = log.flush();
        }
    }
}

impl ConsoleOut for Console {
    fn write(&self, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        let mut inner = self.lock();
        inner.total += data.len() as u64;
        let keep = data.len().min(inner.capacity);
        let overflow = (inner.ring.len() + keep).saturating_sub(inner.capacity);
        inner.ring.drain(..overflow);
        inner.dropped += (overflow + data.len() - keep) as u64;
        inner.ring.extend(&data[data.len() - keep..]);
        if let Some(log) = inner.log.as_mut() {
            // Buffered, flushed at each line end so the file is readable as it grows.
            let res = log.write_all(data).and_then(|()| {
                if data.contains(&b'\n') {
                    log.flush()
                } else {
                    Ok(())
                }
            });
            if let Err(e) = res
                && !inner.log_failed
            {
                inner.log_failed = true;
                tracing::warn!(error = %e, "console log write failed; keeping output in memory only");
            }
        }
        // No subscriber is not an error.
        let _ = self.live.send(Arc::from(data));
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        self.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_only_the_latest_bytes_and_counts_what_it_dropped() {
        let c = Console::new(8, None).unwrap();
        c.write(b"hello ");
        c.write(b"world");
        assert_eq!(c.contents(), b"lo world");
        let sub = c.subscribe();
        assert_eq!(sub.dropped_bytes, 3);
        c.write(b"0123456789");
        assert_eq!(c.contents(), b"23456789");
        assert_eq!(c.total_bytes(), 21);
        assert_eq!(c.subscribe().dropped_bytes, 13);
    }

    #[test]
    fn subscribers_get_history_then_every_later_byte() {
        let c = Console::new(64, None).unwrap();
        c.write(b"before\n");
        let mut sub = c.subscribe();
        c.write(b"after");
        assert_eq!(sub.history, b"before\n");
        assert_eq!(&*sub.live.try_recv().unwrap(), b"after");
        assert!(sub.live.try_recv().is_err());
    }

    #[test]
    fn log_file_gets_everything_even_what_the_ring_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let c = Console::new(4, Some(&path)).unwrap();
        c.write(b"first line\n");
        c.write(b"second");
        c.flush();
        assert_eq!(std::fs::read(&path).unwrap(), b"first line\nsecond");
        assert_eq!(c.contents(), b"cond");
        drop(c);
        // Appends across consoles (a VM's reboots share one log).
        let c = Console::new(4, Some(&path)).unwrap();
        c.write(b"\nthird\n");
        drop(c);
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "first line\nsecond\nthird\n"
        );
    }

    #[test]
    fn unwritable_log_is_a_clear_error() {
        let err = Console::new(4, Some(Path::new("/nonexistent/dir/console.log")))
            .err()
            .unwrap();
        assert!(err.to_string().contains("/nonexistent/dir/console.log"));
    }
}
