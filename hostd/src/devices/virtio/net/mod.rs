//! virtio-net: one RX/TX queue pair per VIF, served by a worker thread against a tap.
//!
//! Files, one role each (the Firecracker layout, as virtio-blk): [`device`] (config space,
//! features, activation), [`event_handler`] (the worker: tap readable, queue kicks, the
//! rate-limit timer), [`busy_poll`] (how long the worker watches after traffic),
//! [`frame`] (guest chains and frames parsed into typed values, the VIF's policy:
//! anti-spoofing, the address lock and VLAN access port), [`tap`] (the tap backend),
//! [`rate`] (token buckets), [`metrics`] (counters), `test_utils` (a driver-side queue
//! and a tap with a packet socket, for tests).
//!
//! The device keeps no state of its own beyond the transport's (features, queues), so
//! a saved [`crate::devices::virtio::mmio::MmioState`] is all a snapshot needs.

pub mod busy_poll;
pub mod coalesce;
pub mod device;
pub mod event_handler;
pub mod frame;
pub mod metrics;
pub mod rate;
pub mod tap;
#[cfg(test)]
pub mod test_utils;

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use proto::MAX_VIF_ADDRESSES;

pub use busy_poll::{DEFAULT_BUSY_POLL, MAX_BUSY_POLL};
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
    #[error("busy poll of {us} µs is above the most allowed, {} µs", MAX_BUSY_POLL.as_micros())]
    BadBusyPoll { us: u64 },
    #[error("{addr:?} is not a unicast IPv4 address a VIF can be locked to")]
    BadAddress { addr: String },
    #[error("a VIF can be locked to at most {MAX_VIF_ADDRESSES} addresses, not {count}")]
    TooManyAddresses { count: usize },
}

/// A VIF as a VM is given it: its name in the VM, its tap, its MAC, MTU, rate limit,
/// VLAN, busy-poll ceiling and address lock, and its counters. The same `Nic` is handed
/// to the VM again after a reboot, so the tap and the counters outlive the device.
#[derive(Clone)]
pub struct Nic {
    pub id: String,
    pub tap: Arc<Tap>,
    pub mac: MacAddr,
    pub mtu: u16,
    pub rate: RateLimit,
    pub vlan: Option<Vlan>,
    /// The ceiling of the worker's [`busy_poll::BusyPoll`] window; zero: never watch.
    pub busy_poll: Duration,
    /// Locked to these IPv4 addresses: the guest sends only ARP and IPv4 from them
    /// ([`frame::check_egress`]); `None`: any protocol and address from its MAC.
    pub ipv4_lock: Option<Arc<[Ipv4Addr]>>,
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
        Self::check(&id, mtu)?;
        Ok(Self {
            id,
            tap,
            mac,
            mtu,
            rate,
            vlan,
            busy_poll: DEFAULT_BUSY_POLL,
            ipv4_lock: None,
            metrics: Arc::new(NetMetrics::default()),
        })
    }

    /// The VIF with a busy-poll ceiling of `us` µs (0: never watch), if allowed.
    pub fn with_busy_poll_us(mut self, us: u64) -> Result<Self, NicError> {
        self.busy_poll = busy_poll_from_us(us)?;
        Ok(self)
    }

    /// Checks an interface's id and MTU (what [`Nic::new`] checks besides the types).
    pub fn check(id: &str, mtu: u16) -> Result<(), NicError> {
        if id.is_empty() || id.len() > 15 || !id.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(NicError::BadId { id: id.into() });
        }
        if !(MIN_MTU..=MAX_MTU).contains(&mtu) {
            return Err(NicError::BadMtu {
                mtu: u32::from(mtu),
            });
        }
        Ok(())
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

    /// Drops every frame waiting in the tap, counted as received and dropped; how many.
    /// A migration's destination does this when the source has paused: what its tap
    /// queued before then reached the source too (bridges flood to a port plugged for the
    /// switchover), and handing it to the guest again would deliver it twice, late.
    pub fn discard_queued(&self) -> u64 {
        let mut buf = vec![0u8; 65_562];
        let mut n = 0;
        while let Ok(len) = self.tap.read(&mut buf) {
            if len == 0 {
                break;
            }
            self.metrics.rx_dropped();
            n += 1;
        }
        n
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

/// A VIF's address lock as configured: addresses a VIF may hold ([`proto::vif_ipv4`]),
/// at most [`MAX_VIF_ADDRESSES`], duplicates dropped.
pub fn ipv4_lock(addrs: &[String]) -> Result<Arc<[Ipv4Addr]>, NicError> {
    if addrs.len() > MAX_VIF_ADDRESSES {
        return Err(NicError::TooManyAddresses { count: addrs.len() });
    }
    let mut out: Vec<Ipv4Addr> = Vec::with_capacity(addrs.len());
    for a in addrs {
        let ip = proto::vif_ipv4(a).ok_or_else(|| NicError::BadAddress { addr: a.clone() })?;
        if !out.contains(&ip) {
            out.push(ip);
        }
    }
    Ok(out.into())
}

/// A busy-poll ceiling as configured, in µs: at most [`MAX_BUSY_POLL`].
pub fn busy_poll_from_us(us: u64) -> Result<Duration, NicError> {
    let d = Duration::from_micros(us);
    if d > MAX_BUSY_POLL {
        return Err(NicError::BadBusyPoll { us });
    }
    Ok(d)
}

/// How announcements are spaced (QEMU's schedule): the first round as the VM runs (until
/// it, frames for the VM still go to its old port), the next 50 ms later, each gap after
/// that 100 ms longer than the one before; five rounds in all.
pub fn announce_delays() -> impl Iterator<Item = Duration> {
    (0..5u64).map(|round| {
        Duration::from_millis(if round == 0 {
            0
        } else {
            50 + 100 * (round - 1)
        })
    })
}

/// Announces every one of `nics` on [`announce_delays`]'s schedule, from a thread of its
/// own (after a migration's switchover, or a VM's start, which may be an HA restart).
pub fn announce_in_background(nics: Vec<Nic>) -> std::io::Result<()> {
    if nics.is_empty() {
        return Ok(());
    }
    std::thread::Builder::new()
        .name("net-announce".into())
        .spawn(move || {
            for delay in announce_delays() {
                std::thread::sleep(delay);
                for nic in &nics {
                    if let Err(e) = nic.announce() {
                        tracing::warn!(nic = %nic.id, error = %e, "announcing the MAC failed");
                    }
                }
            }
        })
        .map(|_| ())
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
            .field("busy_poll", &self.busy_poll)
            .field("ipv4_lock", &self.ipv4_lock)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discarding_empties_the_taps_queue_and_counts_each_frame() {
        let t = test_utils::TestTap::new();
        let mac: MacAddr = "02:00:00:00:00:07".parse().unwrap();
        let nic = Nic::new("eth0", t.tap.clone(), mac, 1500, RateLimit::default(), None).unwrap();
        let mut frame = vec![0xffu8; 6];
        frame.extend_from_slice(&[2, 0, 0, 0, 0, 9, 0x08, 0x00]);
        frame.resize(60, 0);
        for _ in 0..3 {
            t.send([0; 10], &frame);
        }
        assert_eq!(nic.discard_queued(), 3);
        assert_eq!(nic.discard_queued(), 0, "nothing left");
        let m = nic.metrics.snapshot();
        assert_eq!((m.rx_packets, m.rx_dropped), (0, 3));
    }

    #[test]
    fn announcements_follow_qemus_schedule() {
        let d: Vec<u64> = announce_delays().map(|d| d.as_millis() as u64).collect();
        assert_eq!(d, [0, 50, 150, 250, 350]);
    }

    #[test]
    fn an_interface_needs_a_short_printable_id_and_an_mtu_in_range() {
        assert_eq!(Nic::check("eth0", 1500), Ok(()));
        assert_eq!(Nic::check("eth0", MAX_MTU), Ok(()));
        for id in ["", "has space", "sixteen-chars-xx"] {
            assert_eq!(Nic::check(id, 1500), Err(NicError::BadId { id: id.into() }));
        }
        assert_eq!(Nic::check("eth0", 67), Err(NicError::BadMtu { mtu: 67 }));
        assert_eq!(
            Nic::check("eth0", MAX_MTU + 1),
            Err(NicError::BadMtu { mtu: 9001 })
        );
    }

    #[test]
    fn a_lock_takes_unicast_ipv4_addresses_only() {
        let s = |v: &[&str]| v.iter().map(|a| a.to_string()).collect::<Vec<_>>();
        let lock = ipv4_lock(&s(&["10.0.0.2", "10.0.0.3", "10.0.0.2"])).unwrap();
        assert_eq!(
            &lock[..],
            &[Ipv4Addr::new(10, 0, 0, 2), Ipv4Addr::new(10, 0, 0, 3)]
        );
        assert!(ipv4_lock(&[]).unwrap().is_empty());
        for bad in [
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "fe80::1",
            "10.0.0",
            "",
        ] {
            assert_eq!(
                ipv4_lock(&s(&[bad])).unwrap_err(),
                NicError::BadAddress { addr: bad.into() }
            );
        }
        let many: Vec<String> = (0..=MAX_VIF_ADDRESSES)
            .map(|i| format!("10.0.1.{i}"))
            .collect();
        assert_eq!(
            ipv4_lock(&many).unwrap_err(),
            NicError::TooManyAddresses {
                count: MAX_VIF_ADDRESSES + 1
            }
        );
    }

    #[test]
    fn a_busy_poll_ceiling_above_a_millisecond_is_refused() {
        assert_eq!(busy_poll_from_us(0), Ok(Duration::ZERO));
        assert_eq!(busy_poll_from_us(1000), Ok(MAX_BUSY_POLL));
        assert_eq!(
            busy_poll_from_us(1001),
            Err(NicError::BadBusyPoll { us: 1001 })
        );
    }
}
