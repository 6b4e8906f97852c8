//! `poold`, the pool coordinator: one member of a Raft group that keeps the pool's state
//! (hosts, storage repositories, volumes, VMs, tasks), schedules VMs, watches host
//! heartbeats and reconciles what should run with what does. Every member serves the
//! `PoolService` of `proto/`; followers forward writes to the leader. There is no master
//! to lose: leadership moves by itself when a member dies.
//!
//! # Layout
//! - [`consensus`]: Raft (raft-rs 0.7, pre-vote and check-quorum on): the durable store
//!   (sled, fsync before acknowledging), the node task with its ordered `on_ready` pass,
//!   the gRPC transport between members, the test-only fault injector.
//! - [`state`]: the replicated state machine: commands, deterministic apply (no clock, no
//!   randomness: the proposer stamps both into the command), idempotency keys, the
//!   versioned snapshot format.
//! - [`scheduler`]: placement filters and scores, pure; the state machine re-runs the
//!   filters when a placement commits, so racing placements never overcommit a host.
//! - [`coordinator`]: request logic between services and Raft: forwarding to the leader,
//!   linearizable reads through ReadIndex, schedule-then-commit.
//! - [`history`]: metrics history in round-robin tiers, per member, in memory and saved
//!   to its data directory, fed as host reports are applied; `QueryMetrics` reads it.
//! - [`service`]: the gRPC services (PoolService, HostAgentService, CoordinatorPeerService).
//! - [`web`]: the web console's HTTPS port: PoolService as gRPC-Web and the console's files.
//! - [`reconcile`]: desired versus reported state, acted on through a narrow
//!   [`reconcile::HostActions`] interface (gRPC to hostd).
//! - [`jobs`]: long operations (volume and VM snapshots, clones, migration, fencing) that
//!   the leader carries out step by step through [`backend`] (storaged and hostd).
//! - [`auth`]: users, roles and tokens: who may call what.
//! - [`server`]: starting (or bootstrapping, or joining) a member and serving it.
//! - [`config`]: the daemon's TOML configuration.
//!
//! # What a write goes through
//! client → any member's PoolService → (follower: `CoordinatorPeerService.Propose` to the
//! leader) → the leader's node task proposes → entries fsynced on a quorum → applied in
//! log order on every member → the result (a Task, or a clear error) goes back. A retry
//! with the same `request_id` returns the first result (kept for an hour).
//!
//! Calls that need storaged or hostd to act (volume snapshots and clones, templates,
//! migration, fencing) commit a job that the leader carries out step by step ([`jobs`]);
//! scheduled snapshots are jobs the leader starts itself ([`schedules`]).

// raft-rs's rust-protobuf types are built field by field, the way their own docs do it.
#![allow(clippy::field_reassign_with_default)]

pub mod auth;
pub mod backend;
pub mod chap;
pub mod config;
pub mod consensus;
pub mod coordinator;
pub mod history;
pub mod jobs;
pub mod reconcile;
pub mod scheduler;
pub mod schedules;
pub mod server;
pub mod service;
pub mod state;
pub mod tls;
pub mod web;
