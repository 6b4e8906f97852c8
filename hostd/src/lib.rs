//! `hostd`, the host agent: a small KVM VMM on the rust-vmm crates that boots and runs
//! guests whose disks are iSCSI volumes or raw files, and serves the `HostService` of
//! `proto/`.
//!
//! # Layout
//! - [`vmm`]: one KVM virtual machine in this process — memory, vCPU threads, boot
//!   (PVH, Linux 64-bit), CPUID, run control (pause, resume, stop and why). The `Vm`'s
//!   methods are spread by concern: `build`, `lifecycle`, `memory`, `persist`.
//! - [`devices`]: the bus, 16550 serial, i8042, debug-exit port, virtio-mmio and
//!   virtio-blk with its backend trait.
//! - [`console`]: a VM's console history (bounded ring), log file and live subscribers.
//! - [`testguest`]: the test guest built from `guest/`, and the host side of its
//!   patterns and checksums.
//! - [`supervisor`]: one process per VM — the daemon's VM table and lifecycle
//!   (`supervisor/manager/`), the VM process (`supervisor/child/`), and the control
//!   channel between them.
//! - [`service`]: `HostService` over gRPC.
//! - [`host`]: host CPU, memory and KVM facts, process resource use.
//! - [`metrics`]: the host's and its VMs' metrics for Prometheus (`GET /metrics`).
//! - [`config`]: the daemon's TOML configuration.
//! - [`agent`]: registering with the pool and heartbeating.
//! - [`migration`]: live migration between hosts.

pub mod agent;
pub mod config;
pub mod console;
pub mod devices;
pub mod host;
pub mod metrics;
pub mod migration;
pub mod network;
pub mod service;
pub mod supervisor;
pub mod testguest;
pub mod vmm;
