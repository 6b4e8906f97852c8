//! Where things live in guest physical memory, and which interrupt lines devices use.
//!
//! The low megabyte follows the PC conventions Linux expects (zero page, command line,
//! EBDA with the MP table); RAM is split around a 1 GiB hole below 4 GiB that holds the
//! virtio-mmio windows and the IOAPIC and LAPIC pages.

/// GDT used while entering the guest (PVH: 32-bit flat; Linux: 64-bit flat).
pub const BOOT_GDT: u64 = 0x500;
/// An empty IDT loaded for the Linux 64-bit entry.
pub const BOOT_IDT: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_INFO: u64 = 0x6000;
/// PVH module list (the initrd), right after the start info.
pub const PVH_MODLIST: u64 = 0x6040;
/// PVH memory map.
pub const PVH_MEMMAP: u64 = 0x6080;
/// Linux zero page (`boot_params`).
pub const ZERO_PAGE: u64 = 0x7000;
/// Linux boot stack pointer.
pub const BOOT_STACK: u64 = 0x8ff0;
/// Identity page tables for the Linux 64-bit entry (PML4, PDPT, PD).
pub const PML4: u64 = 0x9000;
pub const PDPT: u64 = 0xa000;
pub const PD: u64 = 0xb000;
/// Kernel command line and its largest size, NUL included.
pub const CMDLINE: u64 = 0x20000;
pub const CMDLINE_MAX: usize = 4096;
/// Extended BIOS data area: the MP table goes here.
pub const EBDA_START: u64 = 0x9fc00;
/// The ACPI root pointer, where Linux's legacy scan of 0xE0000-0xFFFFF finds it too; the
/// other tables follow it up to `ACPI_TABLES_END`, inside the reserved legacy hole.
pub const RSDP_ADDR: u64 = 0xe_0000;
pub const ACPI_TABLES_END: u64 = 0xf_0000;
/// First byte above the legacy hole; kernels load here.
pub const HIMEM_START: u64 = 0x10_0000;
/// RAM below 4 GiB stops here; the rest of the guest's RAM starts at 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// virtio-mmio device windows, one page each, from here up.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
pub const LAPIC_ADDR: u64 = 0xfee0_0000;
/// Three pages the VMX TSS needs (KVM_SET_TSS_ADDR), inside the hole.
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;

/// Legacy ports.
pub const PORT_I8042_DATA: u16 = 0x60;
pub const PORT_I8042_COMMAND: u16 = 0x64;
pub const PORT_SPEAKER: u16 = 0x61;
pub const PORT_SERIAL: u16 = 0x3f8;
pub const PORT_SERIAL_LEN: u16 = 8;
/// Debug-exit port (the same convention as QEMU's isa-debug-exit at iobase 0xf4).
pub const PORT_DEBUG_EXIT: u16 = 0xf4;
pub const PORT_DEBUG_EXIT_LEN: u16 = 4;
/// The idle port (see `devices::idle`): a read parks the vCPU until an interrupt.
pub const PORT_IDLE: u16 = 0x4f0;
/// CMOS RTC: index port, then data port.
pub const PORT_RTC: u16 = 0x70;
pub const PORT_RTC_LEN: u16 = 2;
/// The CMOS register that holds the century (announced in the FADT).
pub const CMOS_CENTURY: u8 = 0x32;
/// ACPI hardware-reduced power registers (FADT sleep control, sleep status and reset
/// registers, one byte each; see `devices::acpi`).
pub const PORT_ACPI_PM: u16 = 0x600;
pub const PORT_ACPI_PM_LEN: u16 = 3;
pub const PORT_ACPI_SLEEP_CONTROL: u16 = PORT_ACPI_PM;
pub const PORT_ACPI_SLEEP_STATUS: u16 = PORT_ACPI_PM + 1;
pub const PORT_ACPI_RESET: u16 = PORT_ACPI_PM + 2;
/// What the guest writes to the FADT reset register to reset the machine.
pub const ACPI_RESET_VALUE: u8 = 0x01;
/// The PCI reset control register (`reboot=pci`): 0x06 or 0x0e resets.
pub const PORT_PCI_RESET: u16 = 0xcf9;

pub const IRQ_KEYBOARD: u32 = 1;
/// The ACPI generic event device (the power button); a line no ISA device of ours uses.
pub const IRQ_GED: u32 = 3;
pub const IRQ_SERIAL: u32 = 4;
/// virtio-mmio devices take interrupt lines from here, one each.
pub const IRQ_VIRTIO_FIRST: u32 = 5;
/// IOAPIC pins (the MP table announces this many).
pub const IOAPIC_PINS: u32 = 24;
/// At most this many virtio-mmio devices (lines 5..=23 of the IOAPIC, skipping none).
pub const MAX_VIRTIO_DEVICES: usize = (IOAPIC_PINS - IRQ_VIRTIO_FIRST) as usize;

/// The guest-physical window of virtio-mmio device `index`.
pub fn virtio_mmio_window(index: usize) -> (u64, u32) {
    (
        VIRTIO_MMIO_BASE + index as u64 * VIRTIO_MMIO_SIZE,
        IRQ_VIRTIO_FIRST + index as u32,
    )
}

/// RAM regions for `memory_bytes` of guest memory: below the hole, then above 4 GiB.
pub fn ram_regions(memory_bytes: u64) -> Vec<(u64, u64)> {
    if memory_bytes <= MMIO_GAP_START {
        vec![(0, memory_bytes)]
    } else {
        vec![
            (0, MMIO_GAP_START),
            (MMIO_GAP_END, memory_bytes - MMIO_GAP_START),
        ]
    }
}

/// E820 type for usable RAM; everything else we report is reserved.
pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

/// The memory map both boot protocols give the guest: RAM below the EBDA, the EBDA and
/// legacy hole reserved, then RAM from 1 MiB (split around the MMIO hole).
pub fn e820_map(memory_bytes: u64) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
    ];
    for (start, len) in ram_regions(memory_bytes) {
        let (start, len) = if start == 0 {
            (HIMEM_START, len - HIMEM_START)
        } else {
            (start, len)
        };
        map.push((start, len, E820_RAM));
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_memory_is_one_region_and_large_memory_skips_the_hole() {
        assert_eq!(ram_regions(128 << 20), vec![(0, 128 << 20)]);
        assert_eq!(
            ram_regions(4 << 30),
            vec![
                (0, MMIO_GAP_START),
                (MMIO_GAP_END, (4 << 30) - MMIO_GAP_START)
            ]
        );
        let total: u64 = ram_regions(5 << 30).iter().map(|r| r.1).sum();
        assert_eq!(total, 5 << 30);
    }

    #[test]
    fn e820_reserves_the_legacy_hole_and_covers_all_ram_above_it() {
        let map = e820_map(256 << 20);
        assert_eq!(map[0], (0, EBDA_START, E820_RAM));
        assert_eq!(map[1].2, E820_RESERVED);
        assert_eq!(map[2], (HIMEM_START, (256 << 20) - HIMEM_START, E820_RAM));
    }

    #[test]
    fn acpi_tables_sit_in_the_reserved_legacy_hole_where_linux_scans() {
        assert_eq!(RSDP_ADDR % 16, 0);
        assert!((0xe_0000..0x10_0000).contains(&RSDP_ADDR));
        const { assert!(ACPI_TABLES_END <= 0x10_0000) };
        let map = e820_map(256 << 20);
        let (start, len, kind) = map[1];
        assert_eq!(kind, E820_RESERVED);
        assert!(start <= RSDP_ADDR && ACPI_TABLES_END <= start + len);
    }

    #[test]
    fn the_ged_line_is_free() {
        assert_ne!(IRQ_GED, IRQ_SERIAL);
        assert_ne!(IRQ_GED, IRQ_KEYBOARD);
        for i in 0..MAX_VIRTIO_DEVICES {
            assert_ne!(virtio_mmio_window(i).1, IRQ_GED);
        }
        const { assert!(IRQ_GED < IOAPIC_PINS) };
    }

    #[test]
    fn virtio_windows_fit_below_the_ioapic() {
        let (last, irq) = virtio_mmio_window(MAX_VIRTIO_DEVICES - 1);
        assert!(last + VIRTIO_MMIO_SIZE <= IOAPIC_ADDR);
        assert!(last >= MMIO_GAP_START);
        assert_eq!(irq, IOAPIC_PINS - 1);
    }
}
