//! The VMM core: one [`Vm`] is one KVM virtual machine in this process — its memory,
//! in-kernel irqchip and PIT, devices, and one thread per vCPU.
//!
//! Building a VM does everything that can fail before any guest code runs (memory, boot
//! images, devices, vCPU state), so a bad request leaves nothing behind: the `Vm` value
//! is simply dropped. [`Vm::start`] then spawns the vCPU threads; the VM runs until the
//! guest powers off or resets, a vCPU crashes, or the owner stops it, and
//! [`Vm::wait_exit`] says which.
//!
//! A reboot is a new `Vm` built from the same [`VmSpec`]: fresh memory and vCPUs, the
//! same disks (their backends and counters live in [`Disk`]).

pub mod boot;
pub mod cpuid;
pub mod layout;
pub mod mptable;
pub mod persist;
pub mod run;
pub mod vcpu;

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{KVM_MEM_LOG_DIRTY_PAGES, kvm_pit_config, kvm_userspace_memory_region};
use kvm_ioctls::{IoEventAddress, Kvm, VmFd};
use vm_memory::mmap::MmapRegion;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

pub use boot::{BootError, BootProtocol, BootSpec, Entry};
pub use cpuid::{CpuidError, CpuidRegs};
pub use persist::{PersistError, VmSnapshot};
pub use run::{ExitHandle, RunControl, RunError, VmExit};

use persist::{DeviceStates, VcpuRequest};

use crate::console::ConsoleOut;
use crate::devices::IrqLine;
use crate::devices::bus::{Bus, BusDevice, BusError};
use crate::devices::debug_exit::DebugExit;
use crate::devices::i8042::I8042;
use crate::devices::serial::SerialDevice;
use crate::devices::speaker::PcSpeaker;
use crate::devices::virtio::VirtioInterrupt;
use crate::devices::virtio::block::{Block, BlockMetricsSnapshot, Disk};
use crate::devices::virtio::mmio::{MmioTransport, REG_QUEUE_NOTIFY};
use vcpu::{Vcpu, VcpuError};

/// Guest memory, with a bitmap of the pages the VMM itself writes (device DMA), which
/// KVM's dirty log does not see; live migration reads both.
pub type GuestRam = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;

/// The smallest guest we build.
pub const MIN_MEMORY_BYTES: u64 = 8 << 20;
/// APIC ids are 8 bits and the IOAPIC takes the id after the last vCPU.
pub const MAX_VCPUS: u32 = 254;

/// What a VM is made of.
#[derive(Debug, Clone)]
pub struct VmSpec {
    pub vcpus: u32,
    pub memory_bytes: u64,
    pub boot: BootSpec,
    pub disks: Vec<Disk>,
    /// Pool-wide CPUID mask (see [`cpuid::apply_mask`]); empty for the host's features.
    pub cpuid_mask: Vec<CpuidRegs>,
}

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("/dev/kvm is not usable (is the kvm module loaded, and may this user open it?)")]
    KvmUnavailable(#[source] kvm_ioctls::Error),
    #[error("{op} failed")]
    Kvm {
        op: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("a VM has 1 to {max} vCPUs, not {requested}")]
    VcpuCount { requested: u32, max: u32 },
    #[error(
        "guest memory must be a multiple of 4 KiB between {min} and {max} bytes; {requested} bytes was asked"
    )]
    MemorySize { requested: u64, min: u64, max: u64 },
    #[error("a VM has at most {max} disks, not {count}")]
    TooManyDisks { count: usize, max: usize },
    #[error("disk id {id:?} is used twice")]
    DuplicateDisk { id: String },
    #[error("disk id {id:?} is not 1 to 20 printable ASCII characters")]
    BadDiskId { id: String },
    #[error("cannot allocate {bytes} bytes of guest memory")]
    Memory {
        bytes: u64,
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    Cpuid(#[from] CpuidError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error("cannot set up {device}")]
    Device {
        device: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot place {device} on the bus")]
    Bus {
        device: String,
        #[source]
        source: BusError,
    },
    #[error("cannot start the thread of vCPU {index}")]
    Thread {
        index: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("the VM was already started")]
    AlreadyStarted,
    #[error(transparent)]
    Run(#[from] RunError),
    #[error(transparent)]
    Persist(#[from] PersistError),
    #[error("cannot restore {device}")]
    Restore {
        device: String,
        #[source]
        source: crate::devices::virtio::mmio::RestoreError,
    },
}

/// Pages of one RAM region written since the last look: bit `i` of `bits` (word
/// `i / 64`, bit `i % 64`) is the page at `start + i * 4096`.
#[derive(Debug, Clone)]
pub struct DirtyRegion {
    pub start: u64,
    pub len: u64,
    pub bits: Vec<u64>,
}

impl DirtyRegion {
    pub fn count(&self) -> u64 {
        self.bits.iter().map(|w| u64::from(w.count_ones())).sum()
    }
}

/// Guest RAM for `memory_bytes`, laid out as every VM's is (see [`layout::ram_regions`]).
pub fn new_guest_ram(memory_bytes: u64) -> Result<GuestRam, VmError> {
    let regions: Vec<(GuestAddress, usize)> = layout::ram_regions(memory_bytes)
        .into_iter()
        .map(|(start, len)| (GuestAddress(start), len as usize))
        .collect();
    GuestRam::from_ranges(&regions).map_err(|source| VmError::Memory {
        bytes: memory_bytes,
        source,
    })
}

/// (Re)registers each RAM region of `memory` as KVM memory slot `index` with `flags`.
fn set_memory_slots(vm_fd: &VmFd, memory: &GuestRam, flags: u32) -> Result<(), VmError> {
    for (slot, region) in memory.iter().enumerate() {
        let host = memory
            .get_host_address(region.start_addr())
            .expect("a region's start is inside it");
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the mapping described by `r` belongs to `memory`, which the Vm owns
        // and keeps alive until after the VM fd (and so the memory slot) is closed.
        unsafe { vm_fd.set_user_memory_region(r) }
            .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(())
}

/// Total RAM of this host, the hard ceiling for one guest.
pub fn host_memory_bytes() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let pages = unsafe { libc::sysconf(libc::_SC_PHYS_PAGES) };
    // SAFETY: as above.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    (pages.max(0) as u64).saturating_mul(page.max(0) as u64)
}

impl VmSpec {
    /// Checks what can be checked without KVM.
    pub fn validate(&self) -> Result<(), VmError> {
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(VmError::VcpuCount {
                requested: self.vcpus,
                max: MAX_VCPUS,
            });
        }
        let max = host_memory_bytes();
        if self.memory_bytes < MIN_MEMORY_BYTES
            || self.memory_bytes > max
            || !self.memory_bytes.is_multiple_of(4096)
        {
            return Err(VmError::MemorySize {
                requested: self.memory_bytes,
                min: MIN_MEMORY_BYTES,
                max,
            });
        }
        if self.disks.len() > layout::MAX_VIRTIO_DEVICES {
            return Err(VmError::TooManyDisks {
                count: self.disks.len(),
                max: layout::MAX_VIRTIO_DEVICES,
            });
        }
        for (i, d) in self.disks.iter().enumerate() {
            if d.id.is_empty() || d.id.len() > 20 || !d.id.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(VmError::BadDiskId { id: d.id.clone() });
            }
            if self.disks[..i].iter().any(|o| o.id == d.id) {
                return Err(VmError::DuplicateDisk { id: d.id.clone() });
            }
        }
        Ok(())
    }
}

fn kvm_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { op, source }
}

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

/// A KVM VM with its irqchip, PIT, memory slots and configured vCPUs, and nothing in it
/// yet: no devices, no vCPU state, nothing running.
pub struct Shell {
    vcpus: Vec<Vcpu>,
    guest_cpuid: Vec<CpuidRegs>,
    vm_fd: Arc<VmFd>,
    kvm: Kvm,
    // After the VM fd: KVM's memory slots point into this mapping.
    memory: GuestRam,
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

pub struct Vm {
    // Field order is drop order: threads are joined in Drop before any of these go.
    ctl: Arc<RunControl>,
    vcpus: Vec<Vcpu>,
    threads: Vec<JoinHandle<()>>,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    serial: Arc<Mutex<SerialDevice>>,
    i8042: Arc<Mutex<I8042>>,
    virtio: Vec<Arc<Mutex<MmioTransport>>>,
    disks: Vec<Disk>,
    memory_bytes: u64,
    entry: Option<Entry>,
    /// The CPUID table vCPU 0 was given (what a migration destination must offer).
    guest_cpuid: Vec<CpuidRegs>,
    vcpu_count: u32,
    vm_fd: Arc<VmFd>,
    _kvm: Kvm,
    // After the VM fd: KVM's memory slots point into this mapping.
    memory: GuestRam,
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
        if snapshot.devices.virtio.len() != spec.disks.len() {
            return Err(PersistError::DeviceCount {
                have: snapshot.devices.virtio.len(),
                want: spec.disks.len(),
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
        if snapshot.devices.virtio.len() != spec.disks.len() {
            return Err(PersistError::DeviceCount {
                have: snapshot.devices.virtio.len(),
                want: spec.disks.len(),
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

        let mut virtio = Vec::new();
        let mut extra_cmdline = Vec::new();
        for (i, disk) in spec.disks.iter().enumerate() {
            let name = format!("virtio-blk {}", disk.id);
            let (base, gsi) = layout::virtio_mmio_window(i);
            let interrupt = Arc::new(VirtioInterrupt::new(irq_line(&vm_fd, &ctl, gsi, &name)?));
            let device = Box::new(Block::new(disk.clone()));
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
            extra_cmdline.push(format!("virtio_mmio.device=4K@{base:#x}:{gsi}"));
        }

        let entry = match snapshot {
            None => Some(boot::load(
                &memory,
                &spec.boot,
                spec.memory_bytes,
                spec.vcpus as u8,
                &extra_cmdline,
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
            virtio,
            disks: spec.disks.clone(),
            memory,
            memory_bytes: spec.memory_bytes,
            entry,
            guest_cpuid,
            vcpu_count: spec.vcpus,
            vm_fd,
            _kvm: kvm,
        })
    }

    /// Starts the vCPU threads.
    pub fn start(&mut self) -> Result<(), VmError> {
        if self.vcpus.is_empty() {
            return Err(VmError::AlreadyStarted);
        }
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

    pub fn resume(&self) -> Result<(), VmError> {
        Ok(self.ctl.resume()?)
    }

    pub fn is_paused(&self) -> bool {
        self.ctl.is_paused()
    }

    /// Asks the guest to shut down: Ctrl-Alt-Del on the i8042.
    pub fn request_shutdown(&self) {
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

    /// Saves the state of a paused (or not yet started) VM: vCPUs, in-kernel devices,
    /// user-space devices and a copy of guest memory. The VM stays paused and can be
    /// resumed afterwards.
    pub fn save(&self) -> Result<VmSnapshot, VmError> {
        let mut snapshot = self.save_state()?;
        for region in self.memory.iter() {
            let mut bytes = vec![0u8; region.len() as usize];
            self.memory
                .read_slice(&mut bytes, region.start_addr())
                .map_err(PersistError::Memory)?;
            snapshot.memory.push((region.start_addr().0, bytes));
        }
        Ok(snapshot)
    }

    /// Saves everything but guest memory (`memory` is left empty): what live migration
    /// sends at switchover, after the last dirty pages. In-flight disk requests are
    /// completed first (the devices quiesce), so their writes to guest memory are in
    /// the dirty bitmap the caller reads next.
    pub fn save_state(&self) -> Result<VmSnapshot, VmError> {
        const VCPU_TIMEOUT: Duration = Duration::from_secs(10);
        let vcpus = if !self.vcpus.is_empty() {
            self.vcpus
                .iter()
                .map(|v| persist::save_vcpu(&v.fd, v.index, &v.msr_indices))
                .collect::<Result<Vec<_>, _>>()?
        } else {
            if !self.ctl.is_paused() {
                return Err(PersistError::NotPaused.into());
            }
            // Every vCPU thread saves its own state at once (they are parked): the
            // switchover of a migration waits for the slowest, not for the sum.
            let mut replies = Vec::with_capacity(self.threads.len());
            for index in 0..self.threads.len() {
                let (tx, rx) = std::sync::mpsc::channel();
                self.ctl.send_request(index, VcpuRequest::Save(tx))?;
                replies.push(rx);
            }
            let mut out = Vec::with_capacity(self.threads.len());
            for (index, rx) in replies.into_iter().enumerate() {
                let state =
                    rx.recv_timeout(VCPU_TIMEOUT)
                        .map_err(|_| PersistError::VcpuTimeout {
                            index: index as u32,
                            secs: VCPU_TIMEOUT.as_secs(),
                        })??;
                out.push(state);
            }
            out
        };
        let kvm = persist::save_kvm_vm(&self.vm_fd)?;
        let devices = DeviceStates {
            serial: crate::devices::bus::lock(&self.serial).state(),
            i8042: crate::devices::bus::lock(&self.i8042).state(),
            virtio: self
                .virtio
                .iter()
                .map(|t| crate::devices::bus::lock(t).save())
                .collect(),
        };
        Ok(VmSnapshot {
            vcpus,
            kvm,
            devices,
            memory: Vec::new(),
        })
    }

    pub fn vcpu_count(&self) -> u32 {
        self.vcpu_count
    }

    /// The CPUID table the guest's vCPU 0 sees.
    pub fn guest_cpuid(&self) -> &[CpuidRegs] {
        &self.guest_cpuid
    }

    /// Turns KVM's dirty-page logging of guest RAM on or off, and clears the bitmap of
    /// pages the VMM wrote.
    pub fn set_dirty_logging(&self, on: bool) -> Result<(), VmError> {
        let flags = if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 };
        set_memory_slots(&self.vm_fd, &self.memory, flags)?;
        for region in self.memory.iter() {
            MmapRegion::bitmap(&**region).reset();
        }
        Ok(())
    }

    /// The pages written since the last call (or since logging was turned on), region
    /// by region: KVM's dirty log (the guest's writes) ORed with the VMM's own bitmap
    /// (device writes, which KVM does not see). Both are cleared.
    pub fn take_dirty_pages(&self) -> Result<Vec<DirtyRegion>, VmError> {
        let mut out = Vec::new();
        for (slot, region) in self.memory.iter().enumerate() {
            let mut bits = self
                .vm_fd
                .get_dirty_log(slot as u32, region.len() as usize)
                .map_err(kvm_err("KVM_GET_DIRTY_LOG"))?;
            let vmm = MmapRegion::bitmap(&**region).get_and_reset();
            for (k, v) in bits.iter_mut().zip(vmm) {
                *k |= v;
            }
            out.push(DirtyRegion {
                start: region.start_addr().0,
                len: region.len(),
                bits,
            });
        }
        Ok(out)
    }

    pub fn memory(&self) -> &GuestRam {
        &self.memory
    }

    pub fn memory_bytes(&self) -> u64 {
        self.memory_bytes
    }

    /// Guest RAM the host has backed so far (resident pages of the guest's mappings).
    pub fn guest_resident_bytes(&self) -> u64 {
        const CHUNK: usize = 1 << 30;
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
        let mut vec = vec![0u8; CHUNK / page];
        let mut resident = 0u64;
        for region in self.memory.iter() {
            let Ok(host) = self.memory.get_host_address(region.start_addr()) else {
                continue;
            };
            let len = region.len() as usize;
            let mut off = 0;
            while off < len {
                let n = CHUNK.min(len - off);
                // SAFETY: [host + off, host + off + n) lies inside this region's mapping,
                // which `self.memory` keeps mapped; `vec` has a byte for each of its pages.
                let r = unsafe { libc::mincore(host.add(off).cast(), n, vec.as_mut_ptr()) };
                if r == 0 {
                    let pages = n.div_ceil(page);
                    resident +=
                        vec[..pages].iter().filter(|b| *b & 1 == 1).count() as u64 * page as u64;
                }
                off += n;
            }
        }
        resident
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

    /// The KVM VM, for what lives outside this module (dirty logging, state save).
    pub fn vm_fd(&self) -> &Arc<VmFd> {
        &self.vm_fd
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.ctl.request_exit(VmExit::Stopped);
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                tracing::error!("a vCPU thread panicked");
            }
        }
        // Device workers stop as the transports drop, before the memory goes.
        self.virtio.clear();
    }
}
