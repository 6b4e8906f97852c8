//! Counters of one VIF, updated by its worker and read by the metrics RPC. They live
//! beside the VIF's tap, so they survive the device being rebuilt on a reboot. "rx" is
//! toward the guest, "tx" from it.

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Debug, Default)]
pub struct NetMetrics {
    rx_packets: AtomicU64,
    rx_bytes: AtomicU64,
    rx_dropped: AtomicU64,
    rx_errors: AtomicU64,
    tx_packets: AtomicU64,
    tx_bytes: AtomicU64,
    tx_dropped: AtomicU64,
    tx_errors: AtomicU64,
    tx_spoofed: AtomicU64,
    tx_throttled: AtomicU64,
    invalid: AtomicU64,
    announces: AtomicU64,
    tx_batched: AtomicU64,
}

/// A copy of the counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NetMetricsSnapshot {
    /// Frames (and their bytes, offload header not counted) given to the guest.
    pub rx_packets: u64,
    pub rx_bytes: u64,
    /// Frames from the network the VIF refused (another VLAN) or had no room for.
    pub rx_dropped: u64,
    /// Failed reads of the tap.
    pub rx_errors: u64,
    /// Frames (and bytes) the guest sent that reached the tap.
    pub tx_packets: u64,
    pub tx_bytes: u64,
    /// Frames from the guest refused by the VIF's policy, spoofed ones included.
    pub tx_dropped: u64,
    /// Failed writes to the tap.
    pub tx_errors: u64,
    /// Frames from the guest with a source MAC other than the VIF's.
    pub tx_spoofed: u64,
    /// Times the rate limit made the guest's frames wait.
    pub tx_throttled: u64,
    /// Descriptor chains or offload headers the guest built wrongly, either queue.
    pub invalid: u64,
    /// Gratuitous RARPs sent for the VIF's MAC.
    pub announces: u64,
    /// Of `tx_packets`, the UDP datagrams written several to a write (one USO frame).
    pub tx_batched: u64,
}

fn add(c: &AtomicU64, v: u64) {
    c.fetch_add(v, Ordering::Relaxed);
}

impl NetMetrics {
    pub fn rx(&self, bytes: u64) {
        add(&self.rx_packets, 1);
        add(&self.rx_bytes, bytes);
    }

    pub fn rx_dropped(&self) {
        add(&self.rx_dropped, 1);
    }

    pub fn rx_error(&self) {
        add(&self.rx_errors, 1);
    }

    pub fn tx(&self, bytes: u64) {
        add(&self.tx_packets, 1);
        add(&self.tx_bytes, bytes);
    }

    /// `n` datagrams of `bytes` in all reached the tap in one USO frame.
    pub fn tx_batch(&self, n: u64, bytes: u64) {
        add(&self.tx_packets, n);
        add(&self.tx_bytes, bytes);
        add(&self.tx_batched, n);
    }

    pub fn tx_dropped(&self) {
        add(&self.tx_dropped, 1);
    }

    pub fn tx_error(&self) {
        add(&self.tx_errors, 1);
    }

    pub fn tx_spoofed(&self) {
        add(&self.tx_spoofed, 1);
        add(&self.tx_dropped, 1);
    }

    pub fn tx_throttled(&self) {
        add(&self.tx_throttled, 1);
    }

    pub fn invalid(&self) {
        add(&self.invalid, 1);
    }

    pub fn announced(&self) {
        add(&self.announces, 1);
    }

    pub fn snapshot(&self) -> NetMetricsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        NetMetricsSnapshot {
            rx_packets: get(&self.rx_packets),
            rx_bytes: get(&self.rx_bytes),
            rx_dropped: get(&self.rx_dropped),
            rx_errors: get(&self.rx_errors),
            tx_packets: get(&self.tx_packets),
            tx_bytes: get(&self.tx_bytes),
            tx_dropped: get(&self.tx_dropped),
            tx_errors: get(&self.tx_errors),
            tx_spoofed: get(&self.tx_spoofed),
            tx_throttled: get(&self.tx_throttled),
            invalid: get(&self.invalid),
            announces: get(&self.announces),
            tx_batched: get(&self.tx_batched),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spoofed_frame_is_also_a_dropped_one() {
        let m = NetMetrics::default();
        m.tx(60);
        m.tx_spoofed();
        m.tx_dropped();
        let s = m.snapshot();
        assert_eq!(
            (s.tx_packets, s.tx_bytes, s.tx_spoofed, s.tx_dropped),
            (1, 60, 1, 2)
        );
    }
}
