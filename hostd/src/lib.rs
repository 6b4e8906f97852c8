//! `hostd`, the host agent: a small KVM VMM on the rust-vmm crates that boots and runs
//! guests whose disks are iSCSI volumes, moves them between hosts, and serves the
//! `HostService` of `proto/`.
//!
//! # Layout
//! - [`config`]: the daemon's TOML configuration.
//!
//! The VMM, devices, migration and the gRPC service belong to the hostd issue and are not
//! built yet; the daemon says so and exits non-zero rather than pretend to serve.

pub mod config;
