//! virtio devices over the virtio-mmio transport (virtio 1.2, "modern" only).
//!
//! - [`mmio`][]: the transport, a register window per device on the MMIO bus.
//! - [`block`][]: virtio-blk.
//! - [`net`][]: virtio-net.
//!
//! A device implements [`VirtioDevice`]: what it offers, its config space, and
//! `activate`, which hands it the queues the driver set up. Queue notifications arrive on
//! eventfds (KVM ioeventfds on the QueueNotify register, so a notify costs no exit to user
//! space) and interrupts leave through a [`VirtioInterrupt`] (an irqfd).

pub mod block;
pub mod mmio;
pub mod net;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

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

pub const VIRTIO_ID_NET: u32 = 1;
pub const VIRTIO_ID_BLOCK: u32 = 2;

/// InterruptStatus bits.
pub const INT_VRING: u32 = 1;
pub const INT_CONFIG: u32 = 2;

/// The interrupt of one virtio-mmio device: the status register the driver reads and
/// acknowledges, and the line that tells it to look.
pub struct VirtioInterrupt {
    status: AtomicU32,
    line: IrqLine,
    /// When the line was last raised, in nanoseconds since `epoch`.
    raised_at: AtomicU64,
    epoch: Instant,
    reraise_after: Duration,
}

/// While status bits stay pending, the line is raised again no sooner than this.
pub const RERAISE_AFTER: Duration = Duration::from_millis(1);

impl VirtioInterrupt {
    pub fn new(line: IrqLine) -> Self {
        Self {
            status: AtomicU32::new(0),
            line,
            raised_at: AtomicU64::new(0),
            epoch: Instant::now(),
            reraise_after: RERAISE_AFTER,
        }
    }

    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// Sets `bits` in the status register and tells the driver. The status acts as a
    /// level: while every one of `bits` is still pending (not acknowledged) and the line
    /// was raised less than [`RERAISE_AFTER`] ago, it is not raised again, only idle vCPUs
    /// are woken. A driver's handler acknowledges the status and then reads its rings, so
    /// whatever made a signal that found the bits pending is seen by the handler already
    /// due; the re-raise after a while covers an edge the guest lost (a masked line).
    /// Raising is not free: KVM injects an IOAPIC interrupt from an irqfd on a kernel
    /// worker thread, a wake-up and context switch per raise, which at queue depth 8 was
    /// one per request.
    pub fn signal(&self, bits: u32) {
        let pending = self.status.fetch_or(bits, Ordering::SeqCst);
        if pending & bits == bits
            && self.now_ns() - self.raised_at.load(Ordering::Relaxed)
                < self.reraise_after.as_nanos() as u64
        {
            self.line.wake_idle();
            return;
        }
        self.raise();
    }

    fn raise(&self) {
        self.raised_at.store(self.now_ns(), Ordering::Relaxed);
        if let Err(e) = self.line.trigger() {
            tracing::warn!(error = %e, gsi = self.line.gsi(), "virtio interrupt");
        }
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// Sets the status register as saved. With bits pending the line is raised once: the
    /// raise that set them may not have reached the guest before the state was saved,
    /// and [`VirtioInterrupt::signal`] does not raise again while they stay pending (a
    /// driver takes an extra interrupt with nothing new as a spurious one).
    pub fn restore_status(&self, bits: u32) {
        self.status.store(bits, Ordering::SeqCst);
        if bits != 0 {
            self.raise();
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::idle::IdleWake;

    fn raised(i: &VirtioInterrupt) -> u64 {
        // The eventfd is non-blocking: nothing written reads as WouldBlock.
        i.line().eventfd().read().unwrap_or(0)
    }

    #[test]
    fn the_line_is_raised_again_only_once_the_driver_acknowledged() {
        let wake = Arc::new(IdleWake::default());
        let mut i = VirtioInterrupt::new(IrqLine::new(5).unwrap().waking(wake.clone()));
        i.reraise_after = Duration::from_millis(200);
        let mut seen = 0;
        i.signal(INT_VRING);
        assert_eq!(raised(&i), 1);
        assert!(wake.wait(&mut seen, Duration::ZERO));
        // Still pending: no second raise, but an idle vCPU is still woken.
        i.signal(INT_VRING);
        assert_eq!(raised(&i), 0);
        assert!(wake.wait(&mut seen, Duration::ZERO));
        // Pending for longer than the re-raise delay: raised again, once.
        std::thread::sleep(i.reraise_after * 2);
        i.signal(INT_VRING);
        i.signal(INT_VRING);
        assert_eq!(raised(&i), 1);
        // Another cause is a new interrupt.
        i.signal(INT_CONFIG);
        assert_eq!(raised(&i), 1);
        assert_eq!(i.status(), INT_VRING | INT_CONFIG);
        i.ack(INT_VRING);
        i.signal(INT_VRING);
        assert_eq!(raised(&i), 1);
    }

    #[test]
    fn a_restored_pending_status_is_raised_once() {
        let mut i = VirtioInterrupt::new(IrqLine::new(5).unwrap());
        i.reraise_after = Duration::from_secs(60);
        i.restore_status(0);
        assert_eq!(raised(&i), 0);
        i.restore_status(INT_VRING);
        assert_eq!(raised(&i), 1);
        i.signal(INT_VRING);
        assert_eq!(raised(&i), 0);
    }
}
