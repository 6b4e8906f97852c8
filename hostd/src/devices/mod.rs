//! The devices a VM has: legacy ports (16550 serial, i8042, CMOS RTC, debug exit, port
//! 0x61, the idle port), the ACPI power registers and button, and virtio-blk over virtio-mmio, with the
//! bus that dispatches guest accesses to them.
//!
//! Every device follows one shape: it is a [`bus::BusDevice`] the vCPU threads call on
//! port or MMIO exits, it raises interrupts through an [`IrqLine`] (an eventfd that KVM
//! turns into an interrupt with irqfd), and it asks the VM to stop through an
//! [`crate::vmm::ExitHandle`].

pub mod acpi;
pub mod bus;
pub mod debug_exit;
pub mod i8042;
pub mod idle;
pub mod rtc;
pub mod serial;
pub mod speaker;
pub mod virtio;

use std::io;
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

/// An interrupt line: writing the eventfd injects the interrupt KVM was told (irqfd).
#[derive(Debug)]
pub struct IrqLine {
    evt: EventFd,
    gsi: u32,
    /// vCPUs idling on the idle port wake when the line fires.
    wake: Option<Arc<idle::IdleWake>>,
}

impl IrqLine {
    pub fn new(gsi: u32) -> io::Result<Self> {
        Ok(Self {
            evt: EventFd::new(libc::EFD_NONBLOCK)?,
            gsi,
            wake: None,
        })
    }

    /// The same line, also waking the VM's idle vCPUs when it fires.
    pub fn waking(mut self, wake: Arc<idle::IdleWake>) -> Self {
        self.wake = Some(wake);
        self
    }

    pub fn gsi(&self) -> u32 {
        self.gsi
    }

    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }

    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self {
            evt: self.evt.try_clone()?,
            gsi: self.gsi,
            wake: self.wake.clone(),
        })
    }

    /// Wakes the VM's idle vCPUs without raising the line.
    pub fn wake_idle(&self) {
        if let Some(w) = &self.wake {
            w.wake();
        }
    }

    pub fn trigger(&self) -> io::Result<()> {
        let r = self.evt.write(1);
        if let Some(w) = &self.wake {
            w.wake();
        }
        r
    }
}

impl vm_superio::Trigger for IrqLine {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        IrqLine::trigger(self)
    }
}
