//! `storaged`: thin pools and thin volumes (LVM-thin-like) on a file or block device,
//! exported as iSCSI LUNs and managed through the `StorageService` of `proto/`.
//!
//! # Layout
//! - [`superblock`]: the checksummed header that makes a device a pool.
//! - [`backing`]: the file or block device: positional I/O, sync, hole punching, locking.
//! - [`tree`]: the mapping tree with shared, reference-counted nodes (snapshots in O(1)).
//! - [`space`]: per-chunk reference counts and the rules for reusing freed chunks.
//! - [`meta`]: the sled store and the on-disk encoding of every record.
//! - [`pool`]: [`ThinPool`], tying them together: data path, commits, volumes, fsck.
//! - [`volume`]: [`ThinVolume`], a volume as an `iscsi_target::BlockDevice`.
//! - [`export`]: volumes served as iSCSI LUNs, grants and revokes (fencing).
//! - [`metrics`]: the pools', sessions' and LUNs' metrics for Prometheus (`GET /metrics`).
//! - [`service`]: `StorageService` (gRPC) over the daemon's pools; [`daemon`]: the process.
//! - [`exercise`]: the deterministic workload of the crash-consistency test.

pub mod backing;
pub mod daemon;
pub mod exercise;
pub mod export;
pub mod meta;
pub mod metrics;
pub mod pool;
pub mod service;
pub mod space;
pub mod superblock;
pub mod tree;
pub mod volume;

pub use backing::BackingKind;
pub use meta::VolumeKind;
pub use pool::{
    CheckReport, CreateOptions, ImportOptions, PoolError, ThinPool, Usage, VolumeInfo,
    valid_chunk_size,
};
pub use volume::ThinVolume;
