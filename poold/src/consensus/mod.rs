//! Raft: one member of the coordinator group.
//!
//! - [`storage`]: log, hard state and snapshots on disk (sled);
//! - [`wal`]: the write-ahead log that makes each `Ready` durable before any
//!   acknowledgement, and is played back into sled at open;
//! - [`node`]: the task that owns the `RawNode` and runs the ordered `on_ready` pass;
//! - [`transport`]: messages to the other members over gRPC, with the test-only fault
//!   injector;
//! - [`log`]: raft-rs's slog records handed to tracing.

pub mod log;
pub mod node;
pub mod storage;
pub mod transport;
pub mod wal;

pub use node::{NodeConfig, NodeError, NodeHandle, NodeStatus};
