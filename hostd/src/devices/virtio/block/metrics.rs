//! Counters of one disk, updated by its queue worker and read by the metrics RPC. They
//! live beside the disk's backend, so they survive the device being rebuilt on a reboot.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

#[derive(Debug, Default)]
pub struct BlockMetrics {
    read_ops: AtomicU64,
    write_ops: AtomicU64,
    flush_ops: AtomicU64,
    discard_ops: AtomicU64,
    write_zeroes_ops: AtomicU64,
    read_bytes: AtomicU64,
    write_bytes: AtomicU64,
    read_latency_us: AtomicU64,
    write_latency_us: AtomicU64,
    /// Requests that failed in the backend.
    errors: AtomicU64,
    /// Requests the guest built wrongly (refused before reaching the backend).
    invalid: AtomicU64,
}

/// A copy of the counters at one moment, with mean latencies.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlockMetricsSnapshot {
    pub read_ops: u64,
    pub write_ops: u64,
    pub flush_ops: u64,
    pub discard_ops: u64,
    pub write_zeroes_ops: u64,
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub mean_read_latency_us: u64,
    pub mean_write_latency_us: u64,
    /// Time spent on all reads and on all writes (the means' numerators).
    pub read_time_us: u64,
    pub write_time_us: u64,
    pub errors: u64,
    pub invalid: u64,
}

fn add(c: &AtomicU64, v: u64) {
    c.fetch_add(v, Ordering::Relaxed);
}

impl BlockMetrics {
    pub fn read(&self, bytes: u64, took: Duration) {
        add(&self.read_ops, 1);
        add(&self.read_bytes, bytes);
        add(&self.read_latency_us, took.as_micros() as u64);
    }

    pub fn write(&self, bytes: u64, took: Duration) {
        add(&self.write_ops, 1);
        add(&self.write_bytes, bytes);
        add(&self.write_latency_us, took.as_micros() as u64);
    }

    pub fn flush(&self) {
        add(&self.flush_ops, 1);
    }

    pub fn discard(&self) {
        add(&self.discard_ops, 1);
    }

    pub fn write_zeroes(&self) {
        add(&self.write_zeroes_ops, 1);
    }

    pub fn error(&self) {
        add(&self.errors, 1);
    }

    pub fn invalid(&self) {
        add(&self.invalid, 1);
    }

    pub fn snapshot(&self) -> BlockMetricsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mean = |total: u64, ops: u64| total.checked_div(ops).unwrap_or(0);
        let (reads, writes) = (get(&self.read_ops), get(&self.write_ops));
        BlockMetricsSnapshot {
            read_ops: reads,
            write_ops: writes,
            flush_ops: get(&self.flush_ops),
            discard_ops: get(&self.discard_ops),
            write_zeroes_ops: get(&self.write_zeroes_ops),
            read_bytes: get(&self.read_bytes),
            write_bytes: get(&self.write_bytes),
            mean_read_latency_us: mean(get(&self.read_latency_us), reads),
            mean_write_latency_us: mean(get(&self.write_latency_us), writes),
            read_time_us: get(&self.read_latency_us),
            write_time_us: get(&self.write_latency_us),
            errors: get(&self.errors),
            invalid: get(&self.invalid),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn means_are_per_operation_and_zero_without_operations() {
        let m = BlockMetrics::default();
        assert_eq!(m.snapshot().mean_read_latency_us, 0);
        m.read(4096, Duration::from_micros(100));
        m.read(4096, Duration::from_micros(300));
        m.write(512, Duration::from_micros(50));
        let s = m.snapshot();
        assert_eq!(
            (s.read_ops, s.read_bytes, s.mean_read_latency_us),
            (2, 8192, 200)
        );
        assert_eq!(
            (s.write_ops, s.write_bytes, s.mean_write_latency_us),
            (1, 512, 50)
        );
    }
}
