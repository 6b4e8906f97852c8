//! One vCPU: its initial state (CPUID, MSRs, FPU, LAPIC, and for the boot vCPU the entry
//! registers of the boot protocol) and the thread that runs it, turning KVM exits into
//! device accesses or a reason for the VM to stop.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_bindings::{CpuId, Msrs, kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::{VcpuExit, VcpuFd};

use super::boot::{Entry, boot_gdt};
use super::layout::{self, BOOT_GDT, BOOT_IDT, BOOT_STACK, PML4, PVH_INFO, ZERO_PAGE};
use super::persist::{self, VcpuRequest};
use super::run::{Gate, RunControl, VmExit};
use crate::devices::bus::Bus;
use crate::devices::idle::MAX_IDLE;

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("vCPU {index}: {op} failed")]
    Kvm {
        index: u32,
        op: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
}

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MISC_ENABLE_FAST_STRING: u64 = 1;

/// LAPIC local vector table registers and delivery modes.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// Exits the VMM does not handle are logged this often at most, per vCPU.
const UNHANDLED_LOG_EVERY: Duration = Duration::from_secs(5);

/// KVM system event types (KVM_EXIT_SYSTEM_EVENT).
const KVM_SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const KVM_SYSTEM_EVENT_RESET: u32 = 2;

pub struct Vcpu {
    pub(crate) fd: VcpuFd,
    pub(crate) index: u32,
    /// The MSRs a state save reads (what KVM says it can save and restore).
    pub(crate) msr_indices: Arc<Vec<u32>>,
}

fn kvm_err(index: u32, op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
    move |source| VcpuError::Kvm { index, op, source }
}

/// The hidden part of a segment register, from its GDT descriptor.
fn segment(descriptor: u64, table_index: u16) -> kvm_segment {
    let limit = ((descriptor & 0xffff) | ((descriptor >> 32) & 0xf_0000)) as u32;
    let g = ((descriptor >> 55) & 1) as u8;
    kvm_segment {
        base: ((descriptor >> 16) & 0xff_ffff) | ((descriptor >> 32) & 0xff00_0000),
        limit: if g == 1 { (limit << 12) | 0xfff } else { limit },
        selector: table_index * 8,
        type_: ((descriptor >> 40) & 0xf) as u8,
        present: ((descriptor >> 47) & 1) as u8,
        dpl: ((descriptor >> 45) & 3) as u8,
        db: ((descriptor >> 54) & 1) as u8,
        s: ((descriptor >> 44) & 1) as u8,
        l: ((descriptor >> 53) & 1) as u8,
        g,
        avl: ((descriptor >> 52) & 1) as u8,
        padding: 0,
        unusable: u8::from((descriptor >> 47) & 1 == 0),
    }
}

impl Vcpu {
    /// State every vCPU gets: CPUID, MSRs, FPU, LAPIC.
    pub fn configure(&self, cpuid: &CpuId) -> Result<(), VcpuError> {
        let i = self.index;
        self.fd
            .set_cpuid2(cpuid)
            .map_err(kvm_err(i, "KVM_SET_CPUID2"))?;
        let msrs = [
            (MSR_IA32_SYSENTER_CS, 0),
            (MSR_IA32_SYSENTER_ESP, 0),
            (MSR_IA32_SYSENTER_EIP, 0),
            (MSR_STAR, 0),
            (MSR_CSTAR, 0),
            (MSR_KERNEL_GS_BASE, 0),
            (MSR_SYSCALL_MASK, 0),
            (MSR_LSTAR, 0),
            (MSR_IA32_TSC, 0),
            (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        ]
        .map(|(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        });
        let msrs = Msrs::from_entries(&msrs).expect("a fixed, small MSR list");
        let written = self
            .fd
            .set_msrs(&msrs)
            .map_err(kvm_err(i, "KVM_SET_MSRS"))?;
        if written != msrs.as_slice().len() {
            // Some hosts (PVM among them) refuse a boot MSR; guests cope with the default.
            tracing::debug!(vcpu = i, written, "not every boot MSR was accepted");
        }
        let fpu = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        self.fd.set_fpu(&fpu).map_err(kvm_err(i, "KVM_SET_FPU"))?;
        let mut lapic = self.fd.get_lapic().map_err(kvm_err(i, "KVM_GET_LAPIC"))?;
        set_lvt_mode(&mut lapic.regs, APIC_LVT0, APIC_MODE_EXTINT);
        set_lvt_mode(&mut lapic.regs, APIC_LVT1, APIC_MODE_NMI);
        self.fd
            .set_lapic(&lapic)
            .map_err(kvm_err(i, "KVM_SET_LAPIC"))?;
        Ok(())
    }

    /// Registers of the boot vCPU at the kernel's entry.
    pub fn set_boot_registers(&self, entry: Entry) -> Result<(), VcpuError> {
        let i = self.index;
        let gdt = boot_gdt(entry);
        let mut sregs: kvm_sregs = self.fd.get_sregs().map_err(kvm_err(i, "KVM_GET_SREGS"))?;
        let code = segment(gdt[1], 1);
        let data = segment(gdt[2], 2);
        let tss = segment(gdt[3], 3);
        sregs.gdt.base = BOOT_GDT;
        sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
        sregs.cs = code;
        sregs.ds = data;
        sregs.es = data;
        sregs.fs = data;
        sregs.gs = data;
        sregs.ss = data;
        sregs.tr = tss;
        let mut regs = kvm_regs {
            rflags: 0x2,
            ..Default::default()
        };
        match entry {
            Entry::Pvh { entry } => {
                sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
                sregs.cr4 = 0;
                sregs.efer = 0;
                regs.rip = entry;
                regs.rbx = PVH_INFO;
            }
            Entry::Linux64 { entry } => {
                sregs.idt.base = BOOT_IDT;
                sregs.idt.limit = 7;
                sregs.cr0 |= X86_CR0_PE | X86_CR0_PG | X86_CR0_ET;
                sregs.cr3 = PML4;
                sregs.cr4 |= X86_CR4_PAE;
                sregs.efer |= EFER_LME | EFER_LMA;
                regs.rip = entry;
                regs.rsp = BOOT_STACK;
                regs.rbp = BOOT_STACK;
                regs.rsi = ZERO_PAGE;
            }
        }
        self.fd
            .set_sregs(&sregs)
            .map_err(kvm_err(i, "KVM_SET_SREGS"))?;
        self.fd.set_regs(&regs).map_err(kvm_err(i, "KVM_SET_REGS"))
    }

    /// The vCPU thread's body: runs until the VM stops.
    pub fn run(mut self, ctl: Arc<RunControl>, pio: Arc<Bus>, mmio: Arc<Bus>) {
        let index = self.index as usize;
        let run_ptr: *mut kvm_bindings::kvm_run = self.fd.get_kvm_run();
        ctl.vcpu_enter(index, run_ptr);
        let mut last_unhandled_log: Option<Instant> = None;
        let mut unhandled: u64 = 0;
        let mut idle_seen = 0u64;
        let mut io_pending = false;
        loop {
            // A port or MMIO access is finished by KVM only at the next KVM_RUN (the data
            // of a read lands in the register then, and RIP moves on). State saved before
            // that would replay the access, so a vCPU about to park finishes it first,
            // entering with immediate_exit set (KVM completes the access and returns at
            // once). Checked inside the gate: a pause asked for between a check here and
            // the gate would park the vCPU with the access unfinished.
            let gate = ctl.vcpu_gate(index, |work| match work {
                Gate::Parking if std::mem::take(&mut io_pending) => {
                    self.fd.set_kvm_immediate_exit(1);
                    let _ = self.fd.run();
                    self.fd.set_kvm_immediate_exit(0);
                }
                Gate::Parking => {}
                Gate::Request(VcpuRequest::Save(reply)) => {
                    let _ = reply.send(persist::save_vcpu(&self.fd, self.index, &self.msr_indices));
                }
            });
            if !gate {
                break;
            }
            let ran = self.fd.run();
            io_pending = matches!(
                ran,
                Ok(VcpuExit::IoIn(..)
                    | VcpuExit::IoOut(..)
                    | VcpuExit::MmioRead(..)
                    | VcpuExit::MmioWrite(..))
            );
            let exit = match ran {
                Ok(VcpuExit::IoOut(port, data)) => {
                    if !pio.write(u64::from(port), data) {
                        unhandled += 1;
                    }
                    None
                }
                Ok(VcpuExit::IoIn(layout::PORT_IDLE, data)) => {
                    // Parks outside the bus (and its device locks), like HLT would.
                    let woke = ctl.idle.wait(&mut idle_seen, MAX_IDLE);
                    data.fill(u8::from(woke));
                    None
                }
                Ok(VcpuExit::IoIn(port, data)) => {
                    if !pio.read(u64::from(port), data) {
                        data.fill(0xff);
                        unhandled += 1;
                    }
                    None
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    if !mmio.write(addr, data) {
                        unhandled += 1;
                        log_unhandled(
                            &mut last_unhandled_log,
                            self.index,
                            "MMIO write",
                            addr,
                            unhandled,
                        );
                    }
                    None
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    if !mmio.read(addr, data) {
                        data.fill(0xff);
                        unhandled += 1;
                        log_unhandled(
                            &mut last_unhandled_log,
                            self.index,
                            "MMIO read",
                            addr,
                            unhandled,
                        );
                    }
                    None
                }
                Ok(VcpuExit::Intr) => None,
                Ok(VcpuExit::Hlt) => {
                    // The in-kernel LAPIC handles HLT; this only happens without one.
                    std::thread::sleep(Duration::from_millis(1));
                    None
                }
                Ok(VcpuExit::Shutdown) => Some(VmExit::TripleFault { vcpu: self.index }),
                Ok(VcpuExit::SystemEvent(kind, _)) => Some(match kind {
                    KVM_SYSTEM_EVENT_SHUTDOWN => VmExit::Poweroff { status: None },
                    KVM_SYSTEM_EVENT_RESET => VmExit::Reset,
                    other => VmExit::Crash {
                        vcpu: self.index,
                        detail: format!("KVM system event {other}"),
                    },
                }),
                Ok(VcpuExit::FailEntry(reason, cpu)) => Some(VmExit::Crash {
                    vcpu: self.index,
                    detail: format!(
                        "VM entry failed (hardware reason {reason:#x}) on host CPU {cpu}"
                    ),
                }),
                Ok(VcpuExit::InternalError) => Some(VmExit::Crash {
                    vcpu: self.index,
                    detail: self.internal_error_detail(),
                }),
                Ok(other) => Some(VmExit::Crash {
                    vcpu: self.index,
                    detail: format!("unhandled KVM exit {other:?}"),
                }),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.fd.set_kvm_immediate_exit(0);

                    None
                }
                Err(e) => Some(VmExit::Crash {
                    vcpu: self.index,
                    detail: format!("KVM_RUN failed: {e}"),
                }),
            };
            if let Some(exit) = exit {
                ctl.request_exit(exit);
            }
        }
        ctl.vcpu_leave(index);
    }

    /// Says what KVM could not do, with where the guest was.
    fn internal_error_detail(&mut self) -> String {
        // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the union
        // member the kernel filled in.
        let internal = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal };
        let what = match internal.suberror {
            1 => "emulation failure",
            2 => "simultaneous exceptions",
            3 => "delivery event failure",
            4 => "unexpected exit reason",
            _ => "internal error",
        };
        let n = (internal.ndata as usize).min(internal.data.len());
        let rip = self.fd.get_regs().map(|r| r.rip).unwrap_or(0);
        format!(
            "KVM {what} (suberror {}) at rip {rip:#x}, data {:x?}",
            internal.suberror,
            &internal.data[..n]
        )
    }
}

fn set_lvt_mode(regs: &mut [std::os::raw::c_char; 1024], offset: usize, mode: u32) {
    let mut b = [0u8; 4];
    for (i, x) in b.iter_mut().enumerate() {
        *x = regs[offset + i] as u8;
    }
    let v = (u32::from_le_bytes(b) & !0x700) | (mode << 8);
    for (i, x) in v.to_le_bytes().iter().enumerate() {
        regs[offset + i] = *x as std::os::raw::c_char;
    }
}

fn log_unhandled(last: &mut Option<Instant>, vcpu: u32, what: &str, addr: u64, total: u64) {
    if last.is_none_or(|t| t.elapsed() >= UNHANDLED_LOG_EVERY) {
        *last = Some(Instant::now());
        tracing::warn!(
            vcpu,
            addr = format_args!("{addr:#x}"),
            total,
            "{what} outside every device"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_decode_from_descriptors() {
        let code64 = segment(0x00af_9b00_0000_ffff, 1);
        assert_eq!(
            (code64.selector, code64.l, code64.db, code64.g, code64.type_),
            (8, 1, 0, 1, 0xb)
        );
        assert_eq!(code64.limit, 0xffff_ffff);
        assert_eq!((code64.present, code64.s, code64.unusable), (1, 1, 0));
        let data = segment(0x00cf_9300_0000_ffff, 2);
        assert_eq!((data.selector, data.db, data.type_), (0x10, 1, 3));
        let tss = segment(0x0000_8b00_0000_0067, 3);
        assert_eq!((tss.limit, tss.s, tss.g, tss.type_), (0x67, 0, 0, 0xb));
    }

    #[test]
    fn lvt_mode_changes_only_the_delivery_mode_bits() {
        let mut regs = [0 as std::os::raw::c_char; 1024];
        regs[APIC_LVT0] = 0x31;
        regs[APIC_LVT0 + 2] = 0x01; // mask bit 16
        set_lvt_mode(&mut regs, APIC_LVT0, APIC_MODE_EXTINT);
        assert_eq!(regs[APIC_LVT0] as u8, 0x31);
        assert_eq!(regs[APIC_LVT0 + 1] as u8, 0x07);
        assert_eq!(regs[APIC_LVT0 + 2] as u8, 0x01);
    }
}
