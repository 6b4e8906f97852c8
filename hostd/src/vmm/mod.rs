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
//! same disks and network interfaces (their backends and counters live in [`Disk`] and
//! [`Nic`]).
//!
//! # Layout
//! This file holds what a VM is made of ([`VmSpec`]), its error, and the [`Vm`] and
//! [`Shell`] types; their methods live by concern:
//! - `build`: building a VM, fresh or from a snapshot, in one go or on a [`Shell`].
//! - `lifecycle`: start, pause, resume, stop, and what a running VM reports.
//! - `memory`: guest RAM ([`GuestRam`]), KVM memory slots and dirty-page tracking.
//! - [`persist`]: saved state types, and saving a paused VM's state.
//! - [`run`]: the run control shared by the owner, vCPU threads and devices.
//! - [`vcpu`]: one vCPU: registers at boot and its run loop.
//! - [`boot`], [`layout`], [`mptable`], [`acpi`], [`cpuid`]: boot images, the
//!   guest-physical map, the MP table, the ACPI tables, and the CPUID each vCPU is given.

pub mod acpi;
pub mod boot;
mod build;
pub mod cpuid;
pub mod layout;
mod lifecycle;
mod memory;
pub mod mptable;
pub mod persist;
pub mod run;
pub mod vcpu;

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use kvm_ioctls::{Kvm, VmFd};

pub use boot::{BootError, BootProtocol, BootSpec, Entry};
pub use cpuid::{CpuidError, CpuidRegs};
pub use memory::{DirtyRegion, GuestRam, new_guest_ram};
pub use persist::{PersistError, VmSnapshot};
pub use run::{ExitHandle, RunControl, RunError, VmExit};

use crate::devices::acpi::PowerButton;
use crate::devices::bus::{Bus, BusError};
use crate::devices::i8042::I8042;
use crate::devices::rtc::Rtc;
use crate::devices::serial::SerialDevice;
use crate::devices::virtio::block::Disk;
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::net::{NetMetricsSnapshot, Nic};
use vcpu::{Vcpu, VcpuError};

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
    /// Network interfaces, each a virtio-mmio device after the disks'.
    pub nets: Vec<Nic>,
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
    #[error("a VM has at most {max} disks and network interfaces, not {count}")]
    TooManyDisks { count: usize, max: usize },
    #[error("network interface id {id:?} is used twice")]
    DuplicateNic { id: String },
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
        let devices = self.disks.len() + self.nets.len();
        if devices > layout::MAX_VIRTIO_DEVICES {
            return Err(VmError::TooManyDisks {
                count: devices,
                max: layout::MAX_VIRTIO_DEVICES,
            });
        }
        for (i, n) in self.nets.iter().enumerate() {
            if self.nets[..i].iter().any(|o| o.id == n.id) {
                return Err(VmError::DuplicateNic { id: n.id.clone() });
            }
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

pub struct Vm {
    // Field order is drop order: threads are joined in Drop before any of these go.
    ctl: Arc<RunControl>,
    vcpus: Vec<Vcpu>,
    threads: Vec<JoinHandle<()>>,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    serial: Arc<Mutex<SerialDevice>>,
    i8042: Arc<Mutex<I8042>>,
    rtc: Arc<Mutex<Rtc>>,
    power_button: PowerButton,
    virtio: Vec<Arc<Mutex<MmioTransport>>>,
    disks: Vec<Disk>,
    nets: Vec<Nic>,
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
    /// The VM's network interfaces, e.g. to [`Nic::announce`] them after a migration.
    pub fn nets(&self) -> &[Nic] {
        &self.nets
    }

    pub fn net_metrics(&self) -> Vec<(String, NetMetricsSnapshot)> {
        self.nets
            .iter()
            .map(|n| (n.id.clone(), n.metrics.snapshot()))
            .collect()
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
