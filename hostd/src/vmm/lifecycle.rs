//! Running a built [`Vm`]: starting its vCPU threads, pausing, resuming, stopping, and
//! what it reports while it runs.

use std::sync::Arc;
use std::time::Duration;

use kvm_bindings::KVM_IRQCHIP_IOAPIC;
use kvm_ioctls::VmFd;

use super::{CpuidRegs, Entry, RunControl, Vm, VmError, VmExit, persist};
use crate::devices::acpi;
use crate::devices::virtio::block::BlockMetricsSnapshot;

impl Vm {
    /// Starts the vCPU threads.
    pub fn start(&mut self) -> Result<(), VmError> {
        if self.vcpus.is_empty() {
            return Err(VmError::AlreadyStarted);
        }
        self.wake_devices();
        let count = self.vcpus.len();
        self.ctl.vcpus_starting(count);
        for (n, vcpu) in self.vcpus.drain(..).enumerate() {
            let index = vcpu.index;
            let (ctl, pio, mmio) = (self.ctl.clone(), self.pio.clone(), self.mmio.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn(move || vcpu.run(ctl, pio, mmio));
            match spawned {
                Ok(t) => self.threads.push(t),
                Err(source) => {
                    self.ctl.vcpus_not_started(count - n);
                    self.ctl.request_exit(VmExit::Crash {
                        vcpu: index,
                        detail: format!("cannot start its thread: {source}"),
                    });
                    return Err(VmError::Thread { index, source });
                }
            }
        }
        Ok(())
    }

    /// Pauses every vCPU; returns once none is running guest code.
    pub fn pause(&self, timeout: Duration) -> Result<(), VmError> {
        Ok(self.ctl.pause(timeout)?)
    }

    /// Resumes every vCPU, and first the devices a save stopped (see
    /// `MmioTransport::save`).
    pub fn resume(&self) -> Result<(), VmError> {
        self.wake_devices();
        Ok(self.ctl.resume()?)
    }

    fn wake_devices(&self) {
        for t in &self.virtio {
            crate::devices::bus::lock(t).wake();
        }
    }

    pub fn is_paused(&self) -> bool {
        self.ctl.is_paused()
    }

    /// Asks the guest to shut down: the ACPI power button when the guest has a driver on
    /// it, else Ctrl-Alt-Del on the i8042 (the test guest, `acpi=off` kernels).
    pub fn request_shutdown(&self) {
        let gsi = self.power_button.gsi();
        let listens = match persist::irqchip(&self.vm_fd, KVM_IRQCHIP_IOAPIC) {
            Ok(ioapic) => acpi::guest_listens(&ioapic, gsi),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the IOAPIC; using Ctrl-Alt-Del");
                false
            }
        };
        if listens {
            tracing::info!("pressing the ACPI power button");
            match self.power_button.press() {
                Ok(()) => return,
                Err(e) => tracing::warn!(error = %e, "ACPI power button; using Ctrl-Alt-Del"),
            }
        }
        tracing::info!("sending Ctrl-Alt-Del");
        crate::devices::bus::lock(&self.i8042).send_ctrl_alt_del();
    }

    /// Stops the vCPUs at once (the first stop reason recorded wins).
    pub fn stop(&self) {
        self.ctl.request_exit(VmExit::Stopped);
    }

    /// Waits until the VM stops; `None` on timeout.
    pub fn wait_exit(&self, timeout: Option<Duration>) -> Option<VmExit> {
        self.ctl.wait_exit(timeout)
    }

    /// The run control, for a thread that waits for the VM to stop.
    pub fn run_control(&self) -> Arc<RunControl> {
        self.ctl.clone()
    }

    pub fn exit_reason(&self) -> Option<VmExit> {
        self.ctl.exit_reason()
    }

    /// Console input for the guest's serial port; returns the bytes accepted.
    pub fn console_input(&self, data: &[u8]) -> usize {
        crate::devices::bus::lock(&self.serial).enqueue_input(data)
    }

    /// Where the boot vCPU started (None for a VM restored from a snapshot).
    pub fn entry(&self) -> Option<Entry> {
        self.entry
    }

    pub fn vcpu_count(&self) -> u32 {
        self.vcpu_count
    }

    /// The CPUID table the guest's vCPU 0 sees.
    pub fn guest_cpuid(&self) -> &[CpuidRegs] {
        &self.guest_cpuid
    }

    pub fn vcpu_cpu_ns(&self) -> u64 {
        self.ctl.vcpu_cpu_ns()
    }

    pub fn disk_metrics(&self) -> Vec<(String, BlockMetricsSnapshot)> {
        self.disks
            .iter()
            .map(|d| (d.id.clone(), d.metrics.snapshot()))
            .collect()
    }

    /// The KVM VM, for a caller outside [`crate::vmm`] that needs a VM ioctl of its own.
    pub fn vm_fd(&self) -> &Arc<VmFd> {
        &self.vm_fd
    }
}
