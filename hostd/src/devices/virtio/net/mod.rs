//! virtio-net: one RX/TX queue pair per VIF, served by a worker thread against a tap.
//!
//! Files, one role each (the Firecracker layout, as virtio-blk): [`device`] (config space,
//! features, activation), [`event_handler`] (the worker: tap readable, queue kicks, the
//! rate-limit timer), [`frame`] (guest chains and frames parsed into typed values, the
//! VIF's policy: anti-spoofing and VLAN access port), [`tap`] (the tap backend),
//! [`rate`] (token buckets), [`metrics`] (counters), `test_utils` (a driver-side queue
//! and a tap with a packet socket, for tests).
//!
//! The device keeps no state of its own beyond the transport's (features, queues), so
//! a saved [`crate::devices::virtio::mmio::MmioState`] is all a snapshot needs.

pub mod device;
pub mod event_handler;
pub mod frame;
pub mod metrics;
pub mod rate;
pub mod tap;
#[cfg(test)]
pub mod test_utils;

use std::sync::Arc;

pub use device::Net;
pub use frame::{MacAddr, Vlan};
pub use metrics::{NetMetrics, NetMetricsSnapshot};
pub use rate::RateLimit;
pub use tap::{Tap, TapError};

/// Largest MTU offered to the guest; the smallest is IPv4's.
pub const MAX_MTU: u16 = 9000;
pub const MIN_MTU: u16 = 68;
pub const DEFAULT_MTU: u16 = 1500;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NicError {
    #[error("interface id {id:?} must be 1 to 15 printable ASCII characters")]
    BadId { id: String },
    #[error("MTU {mtu} is outside {MIN_MTU}-{MAX_MTU}")]
    BadMtu { mtu: u32 },
    #[error("MAC address {mac:?} is not a unicast address written aa:bb:cc:dd:ee:ff")]
    BadMac { mac: String },
    #[error("VLAN tag {tag} is outside 1-4094")]
    BadVlan { tag: u32 },
    #[error("a rate limit of zero {unit}/s would stop all traffic; leave it out for no limit")]
    ZeroRate { unit: &'static str },
}

/// A VIF as a VM is given it: its name in the VM, its tap, its MAC, MTU, rate limit and
/// VLAN, and its counters. The same `Nic` is handed to the VM again after a reboot, so
/// the tap and the counters outlive the device.
#[derive(Clone)]
pub struct Nic {
    pub id: String,
    pub tap: Arc<Tap>,
    pub mac: MacAddr,
    pub mtu: u16,
    pub rate: RateLimit,
    pub vlan: Option<Vlan>,
    pub metrics: Arc<NetMetrics>,
}

impl Nic {
    pub fn new(
        id: impl Into<String>,
        tap: Arc<Tap>,
        mac: MacAddr,
        mtu: u16,
        rate: RateLimit,
        vlan: Option<Vlan>,
    ) -> Result<Self, NicError> {
        let id = id.into();
        if id.is_empty() || id.len() > 15 || !id.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(NicError::BadId { id });
        }
        if !(MIN_MTU..=MAX_MTU).contains(&mtu) {
            return Err(NicError::BadMtu {
                mtu: u32::from(mtu),
            });
        }
        Ok(Self {
            id,
            tap,
            mac,
            mtu,
            rate,
            vlan,
            metrics: Arc::new(NetMetrics::default()),
        })
    }

    /// Sends `frame` (an Ethernet frame, with its offload header) to the network the way
    /// the guest's frames go: tagged with the VIF's VLAN. No policy check: the callers
    /// are the worker after its checks, and [`Nic::announce`].
    pub fn transmit(&self, hdr: frame::VnetHdr, frame: &[u8]) -> std::io::Result<()> {
        let out = frame::Egress::new(hdr, frame, self.vlan);
        let (hdr, tag) = (out.hdr.to_bytes(), out.tag);
        let parts: [&[u8]; 4] = [&hdr, out.head, &tag[..out.tag_len], out.tail];
        self.tap.write_parts(&parts).map(|_| ())
    }

    /// Sends one gratuitous RARP for the VIF's MAC, so bridges and switches learn its
    /// port now (after a migration or an HA restart). The caller schedules the rounds.
    pub fn announce(&self) -> std::io::Result<()> {
        let r = self.transmit(frame::VnetHdr::default(), &frame::rarp(self.mac));
        match &r {
            Ok(()) => self.metrics.announced(),
            Err(_) => self.metrics.tx_error(),
        }
        r
    }
}

impl std::fmt::Debug for Nic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nic")
            .field("id", &self.id)
            .field("tap", &self.tap.name())
            .field("mac", &self.mac.to_string())
            .field("mtu", &self.mtu)
            .field("rate", &self.rate)
            .field("vlan", &self.vlan)
            .finish()
    }
}
