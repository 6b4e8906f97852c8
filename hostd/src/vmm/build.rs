//! Building a [`Vm`]: the KVM VM with its irqchip, PIT, memory slots and vCPUs (a
//! [`Shell`]), then the devices, and either the boot images or a snapshot's state on top.
//! Everything that can fail happens here, before any guest code runs.

use std::sync::{Arc, Mutex};

use kvm_bindings::kvm_pit_config;
use kvm_ioctls::{IoEventAddress, Kvm, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::memory::set_memory_slots;
use super::persist::{self, PersistError, VmSnapshot};
use super::vcpu::Vcpu;
use super::{
    CpuidRegs, GuestRam, MAX_VCPUS, RunControl, Shell, Vm, VmError, VmSpec, boot, cpuid, kvm_err,
    layout, new_guest_ram,
};
use crate::console::ConsoleOut;
use crate::devices::IrqLine;
use crate::devices::acpi::{AcpiPm, PciReset, PowerButton};
use crate::devices::bus::{Bus, BusDevice};
use crate::devices::debug_exit::DebugExit;
use crate::devices::i8042::I8042;
use crate::devices::rtc::Rtc;
use crate::devices::serial::SerialDevice;
use crate::devices::speaker::PcSpeaker;
use crate::devices::virtio::block::Block;
use crate::devices::virtio::mmio::{MmioTransport, REG_QUEUE_NOTIFY};
use crate::devices::virtio::net::Net;
use crate::devices::virtio::{VirtioDevice, VirtioInterrupt};

fn dev_err(device: &str) -> impl FnOnce(std::io::Error) -> VmError + '_ {
    move |source| VmError::Device {
        device: device.to_owned(),
        source,
    }
}

/// An interrupt line wired into the in-kernel irqchip.
fn irq_line(vm: &VmFd, ctl: &RunControl, gsi: u32, device: &str) -> Result<IrqLine, VmError> {
    let line = IrqLine::new(gsi)
        .map_err(dev_err(device))?
        .waking(ctl.idle.clone());
    vm.register_irqfd(line.eventfd(), gsi)
        .map_err(kvm_err("KVM_IRQFD"))?;
    Ok(line)
}

fn place(
    bus: &mut Bus,
    base: u64,
    len: u64,
    dev: Arc<Mutex<dyn BusDevice>>,
    name: &str,
) -> Result<(), VmError> {
    bus.insert(base, len, dev).map_err(|source| VmError::Bus {
        device: name.to_owned(),
        source,
    })
}

impl Shell {
    fn new(spec: &VmSpec, memory: GuestRam) -> Result<Self, VmError> {
        spec.validate()?;
        let kvm = Kvm::new().map_err(VmError::KvmUnavailable)?;
        let max = (kvm.get_max_vcpus() as u32).min(MAX_VCPUS);
        if spec.vcpus > max {
            return Err(VmError::VcpuCount {
                requested: spec.vcpus,
                max,
            });
        }
        let vm_fd = Arc::new(kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?);
        vm_fd
            .set_tss_address(layout::KVM_TSS_ADDR as usize)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        // The irqchip must exist before any vCPU, so every vCPU gets an in-kernel LAPIC.
        vm_fd
            .create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        vm_fd
            .create_pit2(kvm_pit_config::default())
            .map_err(kvm_err("KVM_CREATE_PIT2"))?;
        set_memory_slots(&vm_fd, &memory, 0)?;

        let msr_indices = Arc::new(
            kvm.get_msr_index_list()
                .map(|l| l.as_slice().to_vec())
                .unwrap_or_default(),
        );
        let supported = cpuid::supported(&kvm)?;
        let mut guest_cpuid = Vec::new();
        let mut vcpus = Vec::with_capacity(spec.vcpus as usize);
        for index in 0..spec.vcpus {
            let fd = vm_fd
                .create_vcpu(u64::from(index))
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            let tsc_khz = fd.get_tsc_khz().ok();
            let table = cpuid::for_vcpu(&supported, index, spec.vcpus, tsc_khz, &spec.cpuid_mask)?;
            if index == 0 {
                guest_cpuid = table.as_slice().iter().map(CpuidRegs::from).collect();
            }
            let vcpu = Vcpu {
                fd,
                index,
                msr_indices: msr_indices.clone(),
            };
            vcpu.configure(&table)?;
            vcpus.push(vcpu);
        }
        Ok(Self {
            vcpus,
            guest_cpuid,
            vm_fd,
            kvm,
            memory,
        })
    }

    /// The guest memory the shell's slots map.
    pub fn memory(&self) -> &GuestRam {
        &self.memory
    }
}

impl Vm {
    /// Builds the VM, stopped: nothing runs until [`Vm::start`].
    pub fn new(spec: &VmSpec, console: Arc<dyn ConsoleOut>) -> Result<Self, VmError> {
        Self::build(spec, console, None)
    }

    /// Builds a VM from a snapshot taken by [`Vm::save`] of a VM with the same spec: the
    /// same memory, devices and vCPU state, ready to go on where the other one paused.
    pub fn restore(
        spec: &VmSpec,
        console: Arc<dyn ConsoleOut>,
        snapshot: &VmSnapshot,
    ) -> Result<Self, VmError> {
        if snapshot.vcpus.len() != spec.vcpus as usize {
            return Err(PersistError::VcpuCount {
                have: snapshot.vcpus.len(),
                want: spec.vcpus as usize,
            }
            .into());
        }
        if snapshot.devices.virtio.len() != spec.disks.len() + spec.nets.len() {
            return Err(PersistError::DeviceCount {
                have: snapshot.devices.virtio.len(),
                want: spec.disks.len() + spec.nets.len(),
            }
            .into());
        }
        let have: u64 = snapshot.memory.iter().map(|(_, m)| m.len() as u64).sum();
        if have != spec.memory_bytes {
            return Err(PersistError::MemorySize {
                have,
                want: spec.memory_bytes,
            }
            .into());
        }
        Self::build(spec, console, Some(snapshot))
    }

    /// The part of building a VM that needs no state: the KVM VM with its irqchip, PIT,
    /// memory slots over `memory` and configured vCPUs. An incoming migration makes it
    /// before the pages arrive, so the switchover only applies state
    /// ([`Vm::restore_into`]); registering the memory slots alone takes milliseconds.
    pub fn prepare(spec: &VmSpec, memory: GuestRam) -> Result<Shell, VmError> {
        let have: u64 = memory.iter().map(|r| r.len()).sum();
        if have != spec.memory_bytes {
            return Err(PersistError::MemorySize {
                have,
                want: spec.memory_bytes,
            }
            .into());
        }
        Shell::new(spec, memory)
    }

    /// Builds a VM in `shell` (made by [`Vm::prepare`] for the same spec) from a snapshot
    /// whose memory is already in the shell's memory (an incoming migration writes the
    /// pages there as they arrive; `snapshot.memory` is ignored).
    pub fn restore_into(
        spec: &VmSpec,
        console: Arc<dyn ConsoleOut>,
        snapshot: &VmSnapshot,
        shell: Shell,
    ) -> Result<Self, VmError> {
        if snapshot.vcpus.len() != spec.vcpus as usize || shell.vcpus.len() != spec.vcpus as usize {
            return Err(PersistError::VcpuCount {
                have: snapshot.vcpus.len(),
                want: spec.vcpus as usize,
            }
            .into());
        }
        if snapshot.devices.virtio.len() != spec.disks.len() + spec.nets.len() {
            return Err(PersistError::DeviceCount {
                have: snapshot.devices.virtio.len(),
                want: spec.disks.len() + spec.nets.len(),
            }
            .into());
        }
        Self::assemble(shell, spec, console, Some(snapshot), true)
    }

    fn build(
        spec: &VmSpec,
        console: Arc<dyn ConsoleOut>,
        snapshot: Option<&VmSnapshot>,
    ) -> Result<Self, VmError> {
        let shell = Shell::new(spec, new_guest_ram(spec.memory_bytes)?)?;
        Self::assemble(shell, spec, console, snapshot, false)
    }

    /// Devices, boot or saved state and vCPU registers on top of a shell. `from_stream`:
    /// the snapshot's memory is already in the shell's (a migration), not in the snapshot.
    fn assemble(
        shell: Shell,
        spec: &VmSpec,
        console: Arc<dyn ConsoleOut>,
        snapshot: Option<&VmSnapshot>,
        from_stream: bool,
    ) -> Result<Self, VmError> {
        let Shell {
            kvm,
            vm_fd,
            memory,
            vcpus,
            guest_cpuid,
        } = shell;

        let ctl = RunControl::new();
        let mut pio = Bus::new();
        let mut mmio = Bus::new();
        let serial_irq = irq_line(&vm_fd, &ctl, layout::IRQ_SERIAL, "serial port")?;
        let serial = Arc::new(Mutex::new(match snapshot {
            Some(s) => SerialDevice::from_state(&s.devices.serial, serial_irq, console)
                .map_err(dev_err("serial port"))?,
            None => SerialDevice::new(serial_irq, console),
        }));
        place(
            &mut pio,
            u64::from(layout::PORT_SERIAL),
            u64::from(layout::PORT_SERIAL_LEN),
            serial.clone(),
            "serial port",
        )?;
        let kbd_irq = irq_line(&vm_fd, &ctl, layout::IRQ_KEYBOARD, "i8042")?;
        let i8042 = Arc::new(Mutex::new(match snapshot {
            Some(s) => I8042::from_state(&s.devices.i8042, kbd_irq, ctl.exit_handle()),
            None => I8042::new(kbd_irq, ctl.exit_handle()),
        }));
        place(
            &mut pio,
            u64::from(layout::PORT_I8042_DATA),
            1,
            i8042.clone(),
            "i8042",
        )?;
        pio.insert_at_offset(u64::from(layout::PORT_I8042_COMMAND), 1, i8042.clone(), 4)
            .map_err(|source| VmError::Bus {
                device: "i8042".into(),
                source,
            })?;
        place(
            &mut pio,
            u64::from(layout::PORT_SPEAKER),
            1,
            Arc::new(Mutex::new(PcSpeaker::new(vm_fd.clone()))),
            "port 0x61",
        )?;
        place(
            &mut pio,
            u64::from(layout::PORT_DEBUG_EXIT),
            u64::from(layout::PORT_DEBUG_EXIT_LEN),
            Arc::new(Mutex::new(DebugExit::new(ctl.exit_handle()))),
            "debug-exit port",
        )?;
        let rtc = Arc::new(Mutex::new(match snapshot {
            Some(s) => Rtc::from_state(s.devices.rtc.clone()),
            None => Rtc::new(),
        }));
        place(
            &mut pio,
            u64::from(layout::PORT_RTC),
            u64::from(layout::PORT_RTC_LEN),
            rtc.clone(),
            "CMOS RTC",
        )?;
        place(
            &mut pio,
            u64::from(layout::PORT_ACPI_PM),
            u64::from(layout::PORT_ACPI_PM_LEN),
            Arc::new(Mutex::new(AcpiPm::new(ctl.exit_handle()))),
            "ACPI power registers",
        )?;
        place(
            &mut pio,
            u64::from(layout::PORT_PCI_RESET),
            1,
            Arc::new(Mutex::new(PciReset::new(ctl.exit_handle()))),
            "port 0xcf9",
        )?;
        let power_button = PowerButton::new(irq_line(
            &vm_fd,
            &ctl,
            layout::IRQ_GED,
            "ACPI power button",
        )?);

        let mut virtio = Vec::new();
        let mut extra_cmdline = Vec::new();
        let mut windows = Vec::new();
        // Disks first, then network interfaces, one virtio-mmio window each, in the
        // spec's order (a snapshot's device states are in the same order).
        let devices = spec
            .disks
            .iter()
            .map(|d| {
                let dev: Box<dyn VirtioDevice> = Box::new(Block::new(d.clone()));
                (format!("virtio-blk {}", d.id), dev)
            })
            .chain(spec.nets.iter().map(|n| {
                let dev: Box<dyn VirtioDevice> = Box::new(Net::new(n.clone()));
                (format!("virtio-net {}", n.id), dev)
            }));
        for (i, (name, device)) in devices.enumerate() {
            let (base, gsi) = layout::virtio_mmio_window(i);
            let interrupt = Arc::new(VirtioInterrupt::new(irq_line(&vm_fd, &ctl, gsi, &name)?));
            let transport = match snapshot {
                Some(s) => {
                    MmioTransport::restore(device, memory.clone(), interrupt, &s.devices.virtio[i])
                        .map_err(|source| VmError::Restore {
                            device: name.clone(),
                            source,
                        })?
                }
                None => {
                    MmioTransport::new(device, memory.clone(), interrupt).map_err(dev_err(&name))?
                }
            };
            for (q, kick) in transport.kicks().iter().enumerate() {
                vm_fd
                    .register_ioevent(
                        kick,
                        &IoEventAddress::Mmio(base + REG_QUEUE_NOTIFY),
                        q as u32,
                    )
                    .map_err(kvm_err("KVM_IOEVENTFD"))?;
            }
            let transport = Arc::new(Mutex::new(transport));
            place(
                &mut mmio,
                base,
                layout::VIRTIO_MMIO_SIZE,
                transport.clone(),
                &name,
            )?;
            virtio.push(transport);
            // Kernels built for it (and the test guest) read the command line; stock ones
            // the DSDT.
            extra_cmdline.push(format!("virtio_mmio.device=4K@{base:#x}:{gsi}"));
            windows.push((base, gsi));
        }

        let entry = match snapshot {
            None => Some(boot::load(
                &memory,
                &spec.boot,
                spec.memory_bytes,
                spec.vcpus as u8,
                &extra_cmdline,
                &windows,
            )?),
            Some(_) if from_stream => None,
            Some(s) => {
                for (start, bytes) in &s.memory {
                    memory
                        .write_slice(bytes, GuestAddress(*start))
                        .map_err(PersistError::Memory)?;
                }
                None
            }
        };
        for vcpu in &vcpus {
            match (snapshot, entry) {
                (Some(s), _) => {
                    persist::restore_vcpu(&vcpu.fd, vcpu.index, &s.vcpus[vcpu.index as usize])?
                }
                (None, Some(entry)) if vcpu.index == 0 => vcpu.set_boot_registers(entry)?,
                _ => {}
            }
        }
        if let Some(s) = snapshot {
            persist::restore_kvm_vm(&vm_fd, &s.kvm)?;
        }

        Ok(Self {
            ctl,
            vcpus,
            threads: Vec::new(),
            pio: Arc::new(pio),
            mmio: Arc::new(mmio),
            serial,
            i8042,
            rtc,
            power_button,
            virtio,
            disks: spec.disks.clone(),
            nets: spec.nets.clone(),
            memory,
            memory_bytes: spec.memory_bytes,
            entry,
            guest_cpuid,
            vcpu_count: spec.vcpus,
            vm_fd,
            _kvm: kvm,
        })
    }
}
