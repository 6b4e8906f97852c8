//! Loading a guest: the kernel image (PVH ELF, Linux vmlinux ELF, or bzImage), the
//! initrd, the command line, and the boot structures of the chosen protocol.
//!
//! - PVH: `hvm_start_info` with the memory map and the initrd as module 0; the vCPU starts
//!   in 32-bit protected mode at the note's entry with `%ebx` pointing at the start info.
//! - Linux 64-bit: the zero page (`boot_params`: setup header, e820), identity page tables
//!   for the first GiB and a 64-bit GDT; the vCPU starts in long mode at `startup_64`
//!   with `%rsi` pointing at the zero page — the way Firecracker boots Linux.
//!
//! Both get ACPI tables (`acpi`; both protocols also pass the RSDP's address) and an MP
//! table, for kernels booted with `acpi=off` or built without ACPI.

use std::fs::File;
use std::io::Read;
use std::path::PathBuf;

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{Cmdline, KernelLoader, load_cmdline};
use vm_memory::{Bytes, GuestAddress};

use super::GuestRam;
use super::acpi::{self, AcpiError};
use super::layout::*;
use super::mptable;

/// How to enter the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BootProtocol {
    /// PVH when the ELF has the note, else Linux 64-bit.
    #[default]
    Auto,
    Linux64,
    Pvh,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootSpec {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub protocol: BootProtocol,
}

/// Where and how the boot vCPU starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// 32-bit protected mode, paging off, `%ebx` = start info.
    Pvh { entry: u64 },
    /// Long mode with identity paging, `%rsi` = zero page.
    Linux64 { entry: u64 },
}

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot open kernel {path}")]
    KernelOpen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open initrd {path}")]
    InitrdOpen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read initrd {path} into guest memory")]
    InitrdRead {
        path: PathBuf,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("kernel {path} is not a loadable ELF or bzImage: {detail}")]
    KernelLoad { path: PathBuf, detail: String },
    #[error("kernel {path} has no PVH note (XEN_ELFNOTE_PHYS32_ENTRY) but PVH boot was asked")]
    NoPvhNote { path: PathBuf },
    #[error("kernel {path} is a bzImage; PVH boot needs an ELF with a PVH note")]
    PvhNeedsElf { path: PathBuf },
    #[error("bzImage {path} has no 64-bit entry point (XLF_KERNEL_64)")]
    Not64Bit { path: PathBuf },
    #[error(
        "initrd of {size} bytes does not fit between the kernel end {kernel_end:#x} and {limit:#x}"
    )]
    InitrdTooLarge {
        size: u64,
        kernel_end: u64,
        limit: u64,
    },
    #[error("kernel command line is invalid: {detail}")]
    Cmdline { detail: String },
    #[error(transparent)]
    Acpi(#[from] AcpiError),
    #[error("cannot write boot structures to guest memory")]
    GuestMemory(#[source] vm_memory::GuestMemoryError),
}

const ELF_MAGIC: [u8; 4] = [0x7f, b'E', b'L', b'F'];
const HVM_START_MAGIC: u32 = 0x336e_c578;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
/// `xloadflags`: the kernel has a 64-bit entry point at +0x200.
const XLF_KERNEL_64: u16 = 1;
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// `loadflags`: the kernel may use the heap after the setup code.
const CAN_USE_HEAP: u8 = 0x80;
/// Highest initrd address for kernels that do not say (boot protocol < 2.03).
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;

/// A GDT descriptor, from the usual (flags, base, limit) triple.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The boot GDT of each protocol: null, code, data, TSS (selectors 0x08, 0x10, 0x18).
pub fn boot_gdt(entry: Entry) -> [u64; 4] {
    let code = match entry {
        Entry::Pvh { .. } => gdt_entry(0xc09b, 0, 0xfffff),
        Entry::Linux64 { .. } => gdt_entry(0xa09b, 0, 0xfffff),
    };
    [
        0,
        code,
        gdt_entry(0xc093, 0, 0xfffff),
        gdt_entry(0x008b, 0, 0x67),
    ]
}

/// Where a real-mode CPU starts after a reset, F000:FFF0: Linux jumps there to restart
/// "through the BIOS", its last resort and its first choice on hardware-reduced ACPI
/// without EFI (it takes `reboot=efi`, which falls through to the BIOS). There is no BIOS,
/// so the stub there asks the keyboard controller for a reset, which restarts the VM.
const RESET_VECTOR: u64 = 0xf_fff0;
/// `mov al, 0xfe; out 0x64, al; hlt; jmp $-1` (back to the hlt).
const RESET_STUB: [u8; 7] = [0xb0, 0xfe, 0xe6, 0x64, 0xf4, 0xeb, 0xfd];

fn mem_err(e: vm_memory::GuestMemoryError) -> BootError {
    BootError::GuestMemory(e)
}

/// Loads everything the guest needs into `mem` and says where the boot vCPU starts.
/// `extra_cmdline` words (the virtio-mmio devices) are appended to the command line;
/// `virtio` (window base, GSI) go in the ACPI DSDT.
pub fn load(
    mem: &GuestRam,
    spec: &BootSpec,
    memory_bytes: u64,
    vcpus: u8,
    extra_cmdline: &[String],
    virtio: &[(u64, u32)],
) -> Result<Entry, BootError> {
    let path = &spec.kernel;
    let mut kernel = File::open(path).map_err(|source| BootError::KernelOpen {
        path: path.clone(),
        source,
    })?;
    let mut magic = [0u8; 4];
    let is_elf = kernel.read_exact(&mut magic).is_ok() && magic == ELF_MAGIC;
    let himem = Some(GuestAddress(HIMEM_START));
    let load_err = |e: linux_loader::loader::Error| BootError::KernelLoad {
        path: path.clone(),
        detail: e.to_string(),
    };
    let (entry, setup_header, kernel_end) = if is_elf {
        let res = Elf::load(mem, None, &mut kernel, himem).map_err(load_err)?;
        let entry = match (spec.protocol, res.pvh_boot_cap) {
            (BootProtocol::Auto | BootProtocol::Pvh, PvhBootCapability::PvhEntryPresent(a)) => {
                Entry::Pvh { entry: a.0 }
            }
            (BootProtocol::Pvh, _) => return Err(BootError::NoPvhNote { path: path.clone() }),
            _ => Entry::Linux64 {
                entry: res.kernel_load.0,
            },
        };
        (entry, None, res.kernel_end)
    } else {
        if spec.protocol == BootProtocol::Pvh {
            return Err(BootError::PvhNeedsElf { path: path.clone() });
        }
        let res = BzImage::load(mem, None, &mut kernel, himem).map_err(load_err)?;
        let hdr = res.setup_header.ok_or_else(|| BootError::KernelLoad {
            path: path.clone(),
            detail: "no setup header".into(),
        })?;
        if hdr.xloadflags & XLF_KERNEL_64 == 0 {
            return Err(BootError::Not64Bit { path: path.clone() });
        }
        // The kernel decompresses in place up to init_size; keep the initrd above that.
        let end = res
            .kernel_load
            .0
            .saturating_add(u64::from(hdr.init_size))
            .max(res.kernel_end);
        (
            Entry::Linux64 {
                entry: res.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET,
            },
            Some(hdr),
            end,
        )
    };

    let mut cmdline = Cmdline::new(CMDLINE_MAX).map_err(|e| BootError::Cmdline {
        detail: e.to_string(),
    })?;
    for word in std::iter::once(spec.cmdline.trim()).chain(extra_cmdline.iter().map(|s| s.as_str()))
    {
        if !word.is_empty() {
            cmdline.insert_str(word).map_err(|e| BootError::Cmdline {
                detail: e.to_string(),
            })?;
        }
    }
    load_cmdline(mem, GuestAddress(CMDLINE), &cmdline).map_err(|e| BootError::Cmdline {
        detail: e.to_string(),
    })?;
    let cmdline_len = cmdline
        .as_cstring()
        .map(|c| c.as_bytes().len())
        .unwrap_or(0);

    let lowmem_end = memory_bytes.min(MMIO_GAP_START);
    let initrd = match &spec.initrd {
        Some(p) => {
            let limit = setup_header
                .map(|h| u64::from(h.initrd_addr_max))
                .filter(|&m| m != 0)
                .unwrap_or(DEFAULT_INITRD_ADDR_MAX)
                .saturating_add(1)
                .min(lowmem_end);
            Some(load_initrd(mem, p, kernel_end, limit)?)
        }
        None => None,
    };

    mem.write_slice(&mptable::build(EBDA_START, vcpus), GuestAddress(EBDA_START))
        .map_err(mem_err)?;
    mem.write_slice(&RESET_STUB, GuestAddress(RESET_VECTOR))
        .map_err(mem_err)?;
    for (addr, bytes) in acpi::build(vcpus, virtio)? {
        mem.write_slice(&bytes, GuestAddress(addr))
            .map_err(mem_err)?;
    }
    let gdt = boot_gdt(entry);
    for (i, d) in gdt.iter().enumerate() {
        mem.write_obj(*d, GuestAddress(BOOT_GDT + i as u64 * 8))
            .map_err(mem_err)?;
    }
    match entry {
        Entry::Pvh { .. } => write_pvh(mem, memory_bytes, initrd)?,
        Entry::Linux64 { .. } => {
            mem.write_obj(0u64, GuestAddress(BOOT_IDT))
                .map_err(mem_err)?;
            write_page_tables(mem)?;
            write_zero_page(mem, memory_bytes, setup_header, cmdline_len, initrd)?;
        }
    }
    Ok(entry)
}

/// Puts the initrd as high as it can go below `limit`, page aligned, above the kernel.
fn load_initrd(
    mem: &GuestRam,
    path: &PathBuf,
    kernel_end: u64,
    limit: u64,
) -> Result<(u64, u64), BootError> {
    let mut file = File::open(path).map_err(|source| BootError::InitrdOpen {
        path: path.clone(),
        source,
    })?;
    let size = file
        .metadata()
        .map_err(|source| BootError::InitrdOpen {
            path: path.clone(),
            source,
        })?
        .len();
    let addr = limit.checked_sub(size).map(|a| a & !0xfff);
    let addr = match addr {
        Some(a) if a >= kernel_end && size > 0 => a,
        _ => {
            return Err(BootError::InitrdTooLarge {
                size,
                kernel_end,
                limit,
            });
        }
    };
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|source| BootError::InitrdRead {
            path: path.clone(),
            source,
        })?;
    Ok((addr, size))
}

fn write_pvh(
    mem: &GuestRam,
    memory_bytes: u64,
    initrd: Option<(u64, u64)>,
) -> Result<(), BootError> {
    let map = e820_map(memory_bytes);
    for (i, (addr, size, kind)) in map.iter().enumerate() {
        let e = hvm_memmap_table_entry {
            addr: *addr,
            size: *size,
            type_: *kind,
            reserved: 0,
        };
        mem.write_obj(e, GuestAddress(PVH_MEMMAP + i as u64 * 24))
            .map_err(mem_err)?;
    }
    let mut info = hvm_start_info {
        magic: HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE,
        memmap_paddr: PVH_MEMMAP,
        memmap_entries: map.len() as u32,
        rsdp_paddr: RSDP_ADDR,
        ..Default::default()
    };
    if let Some((paddr, size)) = initrd {
        let module = hvm_modlist_entry {
            paddr,
            size,
            ..Default::default()
        };
        mem.write_obj(module, GuestAddress(PVH_MODLIST))
            .map_err(mem_err)?;
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST;
    }
    mem.write_obj(info, GuestAddress(PVH_INFO)).map_err(mem_err)
}

/// Identity-maps the first GiB with 2 MiB pages: enough for Linux's early 64-bit code.
fn write_page_tables(mem: &GuestRam) -> Result<(), BootError> {
    mem.write_obj(PDPT | 0x03, GuestAddress(PML4))
        .map_err(mem_err)?;
    mem.write_obj(PD | 0x03, GuestAddress(PDPT))
        .map_err(mem_err)?;
    for i in 0..512u64 {
        mem.write_obj((i << 21) | 0x83, GuestAddress(PD + i * 8))
            .map_err(mem_err)?;
    }
    Ok(())
}

fn write_zero_page(
    mem: &GuestRam,
    memory_bytes: u64,
    setup_header: Option<linux_loader::loader::bootparam::setup_header>,
    cmdline_len: usize,
    initrd: Option<(u64, u64)>,
) -> Result<(), BootError> {
    let mut params = boot_params::default();
    if let Some(hdr) = setup_header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if params.hdr.kernel_alignment == 0 {
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    }
    params.hdr.loadflags |= CAN_USE_HEAP;
    params.hdr.heap_end_ptr = 0xfe00;
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    let map = e820_map(memory_bytes);
    for (i, (addr, size, kind)) in map.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: *kind,
        };
    }
    params.e820_entries = map.len() as u8;
    params.acpi_rsdp_addr = RSDP_ADDR;
    mem.write_obj(params, GuestAddress(ZERO_PAGE))
        .map_err(mem_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_match_the_well_known_encodings() {
        assert_eq!(gdt_entry(0xa09b, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(0xc093, 0, 0xfffff), 0x00cf_9300_0000_ffff);
        assert_eq!(gdt_entry(0xc09b, 0, 0xfffff), 0x00cf_9b00_0000_ffff);
        assert_eq!(gdt_entry(0x808b, 0x1234_5678, 0x67), 0x1280_8b34_5678_0067);
    }
}
