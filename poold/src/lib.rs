//! `poold`, the pool coordinator: one member of a Raft group that keeps the pool's state
//! (hosts, storage repositories, volumes, VMs, tasks), schedules VMs, watches host
//! heartbeats and reconciles what should run with what does. Every member serves the
//! `PoolService` of `proto/`; followers forward writes to the leader.
//!
//! # Layout
//! - [`consensus`]: Raft (raft-rs): the durable store, the node thread with its ordered
//!   `on_ready` pass, the gRPC transport between members.
//! - [`state`]: the replicated state machine: commands, deterministic apply, snapshots.
//! - [`scheduler`]: placement filters and scores, pure.
//! - [`coordinator`]: request logic between services and Raft (forwarding, ReadIndex
//!   reads, placement commits).
//! - [`service`]: the gRPC services (PoolService, HostAgentService, CoordinatorPeerService).
//! - [`reconcile`]: desired versus reported state, acted on through hosts.
//! - [`client`]: a multi-member client that finds the leader and retries safely.
//! - [`server`]: starting a member and serving it.
//! - [`config`]: the daemon's TOML configuration.

// raft-rs's rust-protobuf types are built field by field, the way their own docs do it.
#![allow(clippy::field_reassign_with_default)]

pub mod client;
pub mod config;
pub mod consensus;
pub mod coordinator;
pub mod reconcile;
pub mod scheduler;
pub mod server;
pub mod service;
pub mod state;
