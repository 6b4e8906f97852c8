//! virtio devices over the virtio-mmio transport (virtio 1.2, "modern" only).
//!
//! - [`mmio`][]: the transport, a register window per device on the MMIO bus.
//! - [`block`][]: virtio-blk.
//!
//! A device implements [`VirtioDevice`]: what it offers, its config space, and
//! `activate`, which hands it the queues the driver set up. Queue notifications arrive on
//! eventfds (KVM ioeventfds on the QueueNotify register, so a notify costs no exit to user
//! space) and interrupts leave through a [`VirtioInterrupt`] (an irqfd).

pub mod block;
pub mod mmio;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use super::IrqLine;
use crate::vmm::GuestRam;

pub const VIRTIO_F_RING_INDIRECT_DESC: u64 = 1 << 28;
pub const VIRTIO_F_RING_EVENT_IDX: u64 = 1 << 29;
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

pub const DEVICE_STATUS_ACKNOWLEDGE: u32 = 1;
pub const DEVICE_STATUS_DRIVER: u32 = 2;
pub const DEVICE_STATUS_DRIVER_OK: u32 = 4;
pub const DEVICE_STATUS_FEATURES_OK: u32 = 8;
pub const DEVICE_STATUS_NEEDS_RESET: u32 = 0x40;
pub const DEVICE_STATUS_FAILED: u32 = 0x80;

pub const VIRTIO_ID_BLOCK: u32 = 2;

/// InterruptStatus bits.
pub const INT_VRING: u32 = 1;
pub const INT_CONFIG: u32 = 2;

/// The interrupt of one virtio-mmio device: the status register the driver reads and
/// acknowledges, and the line that tells it to look.
pub struct VirtioInterrupt {
    status: AtomicU32,
    line: IrqLine,
}

impl VirtioInterrupt {
    pub fn new(line: IrqLine) -> Self {
        Self {
            status: AtomicU32::new(0),
            line,
        }
    }

    pub fn signal(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
        if let Err(e) = self.line.trigger() {
            tracing::warn!(error = %e, gsi = self.line.gsi(), "virtio interrupt");
        }
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// Sets the status register as saved, without raising the line.
    pub fn restore_status(&self, bits: u32) {
        self.status.store(bits, Ordering::SeqCst);
    }

    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    pub fn line(&self) -> &IrqLine {
        &self.line
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("queue {index} is not set up correctly by the driver")]
    BadQueue { index: usize },
    #[error("cannot start the device worker")]
    Worker(#[source] std::io::Error),
}

/// What a device gets when the driver sets DRIVER_OK.
pub struct ActivateContext {
    pub mem: GuestRam,
    pub queues: Vec<Queue>,
    /// One notification eventfd per queue.
    pub kicks: Vec<EventFd>,
    pub interrupt: Arc<VirtioInterrupt>,
    pub acked_features: u64,
}

pub trait VirtioDevice: Send {
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the number of queues is this slice's length.
    fn queue_max_sizes(&self) -> &[u16];
    fn avail_features(&self) -> u64;
    fn read_config(&self, offset: u64, data: &mut [u8]);
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError>;
    /// Stops processing (the driver reset the device, or the VM is going away).
    fn reset(&mut self);
    /// Stops processing after the requests in hand and gives the queues back, in the
    /// state they reached, so they can be saved and the device activated again with
    /// them. Empty when the device is not active.
    fn quiesce(&mut self) -> Vec<Queue>;
}
