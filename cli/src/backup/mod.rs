//! VM backups: a chain of points in a directory, the first full and each later one the
//! chunks changed since the one before, as the thin pool reports them.
//!
//! # Layout
//! - `format.rs`: the directory's files, the chain, digests, a disk at a point.
//! - `take.rs`: `vm-backup`.
//! - `restore.rs`: `vm-restore`.

pub mod format;
mod restore;
mod take;

pub use restore::{RestoreArgs, restore};
pub use take::backup;
