//! `poold`, the pool coordinator: one member of a Raft group that keeps the pool's state
//! (hosts, storage repositories, volumes, VMs, users, tasks), schedules VMs, fences dead
//! hosts and reconciles what should run with what does. Serves the `PoolService` of
//! `proto/` on every member.
//!
//! # Layout
//! - [`config`]: the daemon's TOML configuration.
//!
//! Raft, the state machine, the scheduler and the gRPC service belong to the poold issue
//! and are not built yet; the daemon says so and exits non-zero rather than pretend.

pub mod config;
