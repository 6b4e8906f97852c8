//! A paused VM's state and saving it ([`Vm::save`]): what KVM holds for each vCPU
//! (registers, FPU/XSAVE, LAPIC, MSRs, MP state, pending events) and for the VM
//! (PIC, IOAPIC, PIT, clock), what each device holds, and the guest memory. Building a
//! VM from a snapshot is [`Vm::restore`].
//!
//! This is the ground live migration stands on: the same snapshot, taken after the last
//! dirty round, is what the source sends and the destination restores. Saved types are
//! plain data kept apart from the runtime ones (Firecracker's persist.rs pattern); their
//! wire encoding belongs to the migration stream.

use std::sync::mpsc::Sender;
use std::time::Duration;

use kvm_bindings::{
    KVM_CLOCK_REALTIME, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_VCPUEVENT_VALID_NMI_PENDING, KVM_VCPUEVENT_VALID_SIPI_VECTOR, Msrs, kvm_clock_data,
    kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_pit_state2,
    kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::{VcpuFd, VmFd};
use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

use super::{Vm, VmError};

use crate::devices::i8042::I8042State;
use crate::devices::rtc::RtcState;
use crate::devices::virtio::mmio::MmioState;

#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("vCPU {index}: {op} failed")]
    Vcpu {
        index: u32,
        op: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("{op} failed")]
    Vm {
        op: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {index} did not answer a state request within {secs} s")]
    VcpuTimeout { index: u32, secs: u64 },
    #[error("the snapshot has {have} vCPUs, the VM {want}")]
    VcpuCount { have: usize, want: usize },
    #[error("the snapshot's memory is {have} bytes, the VM's {want}")]
    MemorySize { have: u64, want: u64 },
    #[error("the snapshot has {have} virtio devices, the VM {want}")]
    DeviceCount { have: usize, want: usize },
    #[error("cannot copy guest memory")]
    Memory(#[source] vm_memory::GuestMemoryError),
    #[error("the VM must be paused to save its state")]
    NotPaused,
}

/// One vCPU, as KVM holds it.
pub struct VcpuState {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: Box<kvm_xsave>,
    pub xcrs: kvm_xcrs,
    pub debug_regs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<kvm_msr_entry>,
    pub mp_state: kvm_mp_state,
    pub events: kvm_vcpu_events,
}

/// The VM-wide in-kernel devices and clock.
#[derive(Clone)]
pub struct KvmVmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

/// The user-space devices.
#[derive(Clone)]
pub struct DeviceStates {
    pub serial: vm_superio::serial::SerialState,
    pub i8042: I8042State,
    pub rtc: RtcState,
    pub virtio: Vec<MmioState>,
}

/// Everything needed to build the same VM again, paused at the same instruction.
pub struct VmSnapshot {
    pub vcpus: Vec<VcpuState>,
    pub kvm: KvmVmState,
    pub devices: DeviceStates,
    /// Guest RAM, region by region (guest-physical start, bytes).
    pub memory: Vec<(u64, Vec<u8>)>,
}

/// Work a parked vCPU thread does for the VM's owner (vCPU ioctls belong to the thread
/// that runs the vCPU).
pub enum VcpuRequest {
    Save(Sender<Result<VcpuState, PersistError>>),
}

fn vcpu_err(index: u32, op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> PersistError {
    move |source| PersistError::Vcpu { index, op, source }
}

fn vm_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> PersistError {
    move |source| PersistError::Vm { op, source }
}

/// Reads the MSRs in `indices` that this host lets us read; ones KVM lists but refuses
/// (it happens, on PVM among others) are left out rather than failing the save.
fn read_msrs(fd: &VcpuFd, index: u32, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, PersistError> {
    let mut wanted: Vec<u32> = indices.to_vec();
    loop {
        let entries: Vec<kvm_msr_entry> = wanted
            .iter()
            .map(|&i| kvm_msr_entry {
                index: i,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| PersistError::Vcpu {
            index,
            op: "KVM_GET_MSRS (too many MSRs)",
            source: kvm_ioctls::Error::new(libc::E2BIG),
        })?;
        let read = fd
            .get_msrs(&mut msrs)
            .map_err(vcpu_err(index, "KVM_GET_MSRS"))?;
        if read == wanted.len() {
            return Ok(msrs.as_slice().to_vec());
        }
        // KVM stops at the first MSR it cannot read: drop that one and go again.
        wanted.remove(read);
    }
}

pub fn save_vcpu(fd: &VcpuFd, index: u32, msr_indices: &[u32]) -> Result<VcpuState, PersistError> {
    let i = index;
    Ok(VcpuState {
        mp_state: fd.get_mp_state().map_err(vcpu_err(i, "KVM_GET_MP_STATE"))?,
        regs: fd.get_regs().map_err(vcpu_err(i, "KVM_GET_REGS"))?,
        sregs: fd.get_sregs().map_err(vcpu_err(i, "KVM_GET_SREGS"))?,
        xsave: Box::new(fd.get_xsave().map_err(vcpu_err(i, "KVM_GET_XSAVE"))?),
        xcrs: fd.get_xcrs().map_err(vcpu_err(i, "KVM_GET_XCRS"))?,
        debug_regs: fd
            .get_debug_regs()
            .map_err(vcpu_err(i, "KVM_GET_DEBUGREGS"))?,
        lapic: fd.get_lapic().map_err(vcpu_err(i, "KVM_GET_LAPIC"))?,
        msrs: read_msrs(fd, i, msr_indices)?,
        events: fd
            .get_vcpu_events()
            .map_err(vcpu_err(i, "KVM_GET_VCPU_EVENTS"))?,
    })
}

/// Sets a vCPU that has not run yet to a saved state, in the order Firecracker uses: the
/// LAPIC before the MSRs, because KVM_SET_LAPIC cancels the LAPIC timer, and a guest in
/// TSC-deadline mode (Linux with CPUID.1:ECX[24]) only gets its timer back from the
/// IA32_TSC_DEADLINE write that KVM_SET_MSRS makes afterwards (restored the other way, its
/// vCPUs halted for good after a migration); the events last.
pub fn restore_vcpu(fd: &VcpuFd, index: u32, s: &VcpuState) -> Result<(), PersistError> {
    let i = index;
    fd.set_regs(&s.regs).map_err(vcpu_err(i, "KVM_SET_REGS"))?;
    fd.set_sregs(&s.sregs)
        .map_err(vcpu_err(i, "KVM_SET_SREGS"))?;
    // SAFETY: this process never enables dynamically-enabled XSTATE features
    // (arch_prctl ARCH_REQ_XCOMP_GUEST_PERM), so the kernel's XSAVE area for this vCPU
    // fits the 4096-byte kvm_xsave it reads from.
    unsafe { fd.set_xsave(&s.xsave) }.map_err(vcpu_err(i, "KVM_SET_XSAVE"))?;
    // A host without XSAVE saves no XCRs (nr_xcrs 0) and refuses KVM_SET_XCRS outright
    // (an emulated qemu64 CPU is one): there is nothing to restore.
    if s.xcrs.nr_xcrs > 0 {
        fd.set_xcrs(&s.xcrs).map_err(vcpu_err(i, "KVM_SET_XCRS"))?;
    }
    fd.set_debug_regs(&s.debug_regs)
        .map_err(vcpu_err(i, "KVM_SET_DEBUGREGS"))?;
    fd.set_lapic(&s.lapic)
        .map_err(vcpu_err(i, "KVM_SET_LAPIC"))?;
    let msrs = Msrs::from_entries(&s.msrs).map_err(|_| PersistError::Vcpu {
        index,
        op: "KVM_SET_MSRS (too many MSRs)",
        source: kvm_ioctls::Error::new(libc::E2BIG),
    })?;
    let written = fd.set_msrs(&msrs).map_err(vcpu_err(i, "KVM_SET_MSRS"))?;
    if written != s.msrs.len() {
        tracing::warn!(
            vcpu = i,
            written,
            saved = s.msrs.len(),
            "not every saved MSR was restored"
        );
    }
    fd.set_mp_state(s.mp_state)
        .map_err(vcpu_err(i, "KVM_SET_MP_STATE"))?;
    // KVM_GET_VCPU_EVENTS fills in a pending NMI and the SIPI vector but does not flag
    // them valid, and KVM_SET_VCPU_EVENTS ignores what is not flagged: an NMI pending at
    // the save would be lost.
    let mut events = s.events;
    events.flags |= KVM_VCPUEVENT_VALID_NMI_PENDING | KVM_VCPUEVENT_VALID_SIPI_VECTOR;
    fd.set_vcpu_events(&events)
        .map_err(vcpu_err(i, "KVM_SET_VCPU_EVENTS"))?;
    Ok(())
}

pub(super) fn irqchip(vm: &VmFd, chip_id: u32) -> Result<kvm_irqchip, PersistError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip)
        .map_err(vm_err("KVM_GET_IRQCHIP"))?;
    Ok(chip)
}

pub fn save_kvm_vm(vm: &VmFd) -> Result<KvmVmState, PersistError> {
    Ok(KvmVmState {
        pic_master: irqchip(vm, KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: irqchip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: irqchip(vm, KVM_IRQCHIP_IOAPIC)?,
        pit: vm.get_pit2().map_err(vm_err("KVM_GET_PIT2"))?,
        clock: vm.get_clock().map_err(vm_err("KVM_GET_CLOCK"))?,
    })
}

pub fn restore_kvm_vm(vm: &VmFd, s: &KvmVmState) -> Result<(), PersistError> {
    for chip in [&s.pic_master, &s.pic_slave, &s.ioapic] {
        vm.set_irqchip(chip).map_err(vm_err("KVM_SET_IRQCHIP"))?;
    }
    vm.set_pit2(&s.pit).map_err(vm_err("KVM_SET_PIT2"))?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let clock = clock_to_restore(&s.clock, now);
    match vm.set_clock(&clock) {
        // A kernel older than 5.16 (the source's was newer) knows no KVM_CLOCK_REALTIME.
        Err(e) if e.errno() == libc::EINVAL && clock.flags != 0 => vm.set_clock(&kvm_clock_data {
            clock: clock.clock,
            ..Default::default()
        }),
        other => other,
    }
    .map_err(vm_err("KVM_SET_CLOCK"))
}

/// The most a guest's clock moves on across a restore: the VM was paused between hosts
/// for its downtime; a larger gap means the two hosts' wall clocks disagree.
const MAX_CLOCK_ADVANCE_NS: u64 = 10_000_000_000;

/// What to give KVM_SET_CLOCK for a saved clock, at wall time `now_ns`. When the source
/// said when it read the clock (`KVM_CLOCK_REALTIME`), KVM advances the guest's clock by
/// the time since, so the guest does not fall behind by the downtime; capped, and never
/// backwards (KVM ignores a saved time in the future). The other flags KVM_GET_CLOCK
/// reports are not settable.
fn clock_to_restore(saved: &kvm_clock_data, now_ns: u64) -> kvm_clock_data {
    let mut clock = kvm_clock_data {
        clock: saved.clock,
        ..Default::default()
    };
    if saved.flags & KVM_CLOCK_REALTIME != 0 && saved.realtime != 0 {
        clock.flags = KVM_CLOCK_REALTIME;
        clock.realtime = saved
            .realtime
            .max(now_ns.saturating_sub(MAX_CLOCK_ADVANCE_NS));
    }
    clock
}

impl Vm {
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
                .map(|v| save_vcpu(&v.fd, v.index, &v.msr_indices))
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
        let kvm = save_kvm_vm(&self.vm_fd)?;
        let devices = DeviceStates {
            serial: crate::devices::bus::lock(&self.serial).state(),
            i8042: crate::devices::bus::lock(&self.i8042).state(),
            rtc: crate::devices::bus::lock(&self.rtc).state(),
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn saved(flags: u32, realtime: u64) -> kvm_clock_data {
        kvm_clock_data {
            clock: 5_000,
            flags,
            realtime,
            host_tsc: 77,
            ..Default::default()
        }
    }

    #[test]
    fn a_restored_clock_moves_on_by_the_wall_time_since_it_was_read() {
        let now = 100_000_000_000;
        let c = clock_to_restore(&saved(KVM_CLOCK_REALTIME | 2, now - 300_000_000), now);
        assert_eq!(
            (c.clock, c.flags, c.realtime),
            (5_000, KVM_CLOCK_REALTIME, now - 300_000_000)
        );
        assert_eq!(c.host_tsc, 0, "only the settable fields");
    }

    #[test]
    fn a_restored_clock_moves_on_by_at_most_the_cap() {
        let now = 100_000_000_000;
        let c = clock_to_restore(&saved(KVM_CLOCK_REALTIME, 1), now);
        assert_eq!(c.realtime, now - MAX_CLOCK_ADVANCE_NS);
        // A source whose wall clock is ahead: KVM does not move the clock back.
        let ahead = clock_to_restore(&saved(KVM_CLOCK_REALTIME, now + 1_000), now);
        assert_eq!(ahead.realtime, now + 1_000);
    }

    #[test]
    fn a_clock_saved_without_its_wall_time_is_restored_as_it_was() {
        let c = clock_to_restore(&saved(2, 0), 100);
        assert_eq!((c.clock, c.flags, c.realtime), (5_000, 0, 0));
        let c = clock_to_restore(&saved(KVM_CLOCK_REALTIME, 0), 100);
        assert_eq!((c.clock, c.flags), (5_000, 0));
    }
}
