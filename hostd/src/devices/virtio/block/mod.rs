//! virtio-blk: one request queue per disk, served against a [`backend::BlockBackend`] by
//! a worker thread, or by a task on the backend's runtime when it has one (iSCSI).
//!
//! Files, one role each (the Firecracker layout): [`device`] (config space, features,
//! activation and the queue worker), [`request`] (parse and execute one request),
//! [`backend`] (the storage trait and the raw-file backend), [`iscsi`] (the iSCSI
//! backend), [`metrics`] (counters).

pub mod backend;
pub mod device;
pub mod iscsi;
pub mod metrics;
pub mod request;

use std::sync::Arc;

pub use backend::{BlockBackend, FileBackend};
pub use device::Block;
pub use metrics::{BlockMetrics, BlockMetricsSnapshot};

/// A disk as a VM is given it: its name in the VM, its storage, and its counters. The
/// same `Disk` is handed to the VM again after a reboot, so the backend (an iSCSI session,
/// an open file) and the counters outlive the device.
#[derive(Clone)]
pub struct Disk {
    pub id: String,
    pub backend: Arc<dyn BlockBackend>,
    pub read_only: bool,
    pub metrics: Arc<BlockMetrics>,
}

impl Disk {
    pub fn new(id: impl Into<String>, backend: Arc<dyn BlockBackend>, read_only: bool) -> Self {
        Self {
            id: id.into(),
            backend,
            read_only,
            metrics: Arc::new(BlockMetrics::default()),
        }
    }
}

impl std::fmt::Debug for Disk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Disk")
            .field("id", &self.id)
            .field("backend", &self.backend.describe())
            .field("read_only", &self.read_only)
            .finish()
    }
}
