//! `hostd`, the host agent: a small KVM VMM on the rust-vmm crates that boots and runs
//! guests whose disks are iSCSI volumes or raw files, and serves the `HostService` of
//! `proto/`.
//!
//! # Layout
//! - [`vmm`]: one KVM virtual machine in this process — memory, vCPU threads, boot
//!   (PVH, Linux 64-bit), CPUID, run control (pause, resume, stop and why).
//! - [`devices`]: the bus, 16550 serial, i8042, debug-exit port, virtio-mmio and
//!   virtio-blk with its backend trait.
//! - [`console`]: a VM's console history (bounded ring), log file and live subscribers.
//! - [`testguest`]: the test guest built from `guest/`, and the host side of its
//!   patterns and checksums.
//! - [`config`]: the daemon's TOML configuration.

pub mod config;
pub mod console;
pub mod devices;
pub mod testguest;
pub mod vmm;
