//! `poolctl`'s side of VM backups (the format, writing and pruning are
//! `pool_image::backup`'s, shared with the coordinator's backup schedules).
//!
//! # Layout
//! - `take.rs`: `vm-backup`: a VM snapshot through PoolService, written as the next point.
//! - `restore.rs`: `vm-restore`.

mod restore;
mod take;

pub use pool_image::backup::{format, prune};
pub use restore::{RestoreArgs, restore};
pub use take::backup;
