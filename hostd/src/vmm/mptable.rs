//! The Intel MultiProcessor table (MP spec 1.4) Linux reads when there is no ACPI: one
//! processor entry per vCPU, an ISA bus, the IOAPIC, an interrupt entry per IOAPIC pin,
//! and the local interrupts (ExtINT on LINT0, NMI on LINT1).
//!
//! Built byte by byte in the layout the spec fixes (little-endian, packed), placed at the
//! start of the EBDA where Linux's `find_smp_config` scans for the `_MP_` pointer.

use super::layout::{IOAPIC_ADDR, IOAPIC_PINS, LAPIC_ADDR};

const MPF_SIGNATURE: &[u8; 4] = b"_MP_";
const MPC_SIGNATURE: &[u8; 4] = b"PCMP";
const SPEC_REV: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const BUS_ISA: u8 = 0;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_INTSRC: u8 = 3;
const ENTRY_LINTSRC: u8 = 4;

const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const MP_IRQ_INT: u8 = 0;
const MP_IRQ_NMI: u8 = 1;
const MP_IRQ_EXTINT: u8 = 3;
/// Interrupt polarity and trigger "conform to the bus" (edge, active high on ISA).
const MP_IRQ_DEFAULT_FLAGS: u16 = 0;

/// CPU signature and feature flags of the processor entries (family 6; FPU and APIC).
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = 0x201;

/// Size of the floating pointer structure.
const MPF_LEN: usize = 16;

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |s, b| s.wrapping_add(*b))
        .wrapping_neg()
}

/// The MP floating pointer followed by the configuration table, for a table placed at
/// guest-physical `base`. `vcpus` must be at most 254 (APIC ids, plus the IOAPIC's).
pub fn build(base: u64, vcpus: u8) -> Vec<u8> {
    let ioapic_id = vcpus;
    // Configuration table entries.
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for id in 0..vcpus {
        entries.push(ENTRY_PROCESSOR);
        entries.push(id);
        entries.push(APIC_VERSION);
        entries.push(CPU_ENABLED | if id == 0 { CPU_BOOTPROCESSOR } else { 0 });
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, BUS_ISA]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_ADDR as u32).to_le_bytes());
    count += 1;
    for pin in 0..IOAPIC_PINS as u8 {
        entries.push(ENTRY_INTSRC);
        entries.push(MP_IRQ_INT);
        entries.extend_from_slice(&MP_IRQ_DEFAULT_FLAGS.to_le_bytes());
        entries.extend_from_slice(&[BUS_ISA, pin, ioapic_id, pin]);
        count += 1;
    }
    for (kind, dest, lint) in [(MP_IRQ_EXTINT, 0u8, 0u8), (MP_IRQ_NMI, 0xff, 1)] {
        entries.push(ENTRY_LINTSRC);
        entries.push(kind);
        entries.extend_from_slice(&MP_IRQ_DEFAULT_FLAGS.to_le_bytes());
        entries.extend_from_slice(&[BUS_ISA, 0, dest, lint]);
        count += 1;
    }

    // Configuration table header (44 bytes).
    let table_len = 44 + entries.len();
    let mut table = Vec::with_capacity(table_len);
    table.extend_from_slice(MPC_SIGNATURE);
    table.extend_from_slice(&(table_len as u16).to_le_bytes());
    table.push(SPEC_REV);
    table.push(0); // checksum, below
    table.extend_from_slice(b"POOLVMM ");
    table.extend_from_slice(b"000000000000");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&(LAPIC_ADDR as u32).to_le_bytes());
    table.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    table.push(0); // extended table checksum
    table.push(0); // reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    // Floating pointer (16 bytes), then the table right after it.
    let mut out = Vec::with_capacity(MPF_LEN + table.len());
    out.extend_from_slice(MPF_SIGNATURE);
    out.extend_from_slice(&((base + MPF_LEN as u64) as u32).to_le_bytes());
    out.push(1); // length in 16-byte units
    out.push(SPEC_REV);
    out.push(0); // checksum, below
    out.extend_from_slice(&[0; 5]); // feature bytes: 0 = configuration table present
    out[10] = checksum(&out);
    out.extend_from_slice(&table);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |s, x| s.wrapping_add(*x))
    }

    #[test]
    fn pointer_and_table_checksum_to_zero_and_point_at_each_other() {
        let base = 0x9fc00;
        let t = build(base, 4);
        assert_eq!(&t[..4], b"_MP_");
        assert_eq!(sum(&t[..16]), 0);
        let physptr = u32::from_le_bytes(t[4..8].try_into().unwrap()) as u64;
        assert_eq!(physptr, base + 16);
        let table = &t[16..];
        assert_eq!(&table[..4], b"PCMP");
        let len = u16::from_le_bytes(table[4..6].try_into().unwrap()) as usize;
        assert_eq!(len, table.len());
        assert_eq!(sum(table), 0);
    }

    #[test]
    fn lists_each_cpu_with_the_first_as_boot_processor() {
        let t = build(0x9fc00, 3);
        let table = &t[16..];
        let count = u16::from_le_bytes(table[34..36].try_into().unwrap());
        assert_eq!(count as u32, 3 + 1 + 1 + IOAPIC_PINS + 2);
        let cpus: Vec<&[u8]> = table[44..44 + 3 * 20].chunks(20).collect();
        assert_eq!(cpus[0][..4], [ENTRY_PROCESSOR, 0, APIC_VERSION, 3]);
        assert_eq!(cpus[2][..4], [ENTRY_PROCESSOR, 2, APIC_VERSION, 1]);
        // The IOAPIC takes the id after the last CPU.
        let ioapic = &table[44 + 60 + 8..44 + 60 + 16];
        assert_eq!(ioapic[..3], [ENTRY_IOAPIC, 3, IOAPIC_VERSION]);
    }

    #[test]
    fn fits_below_1mib_for_the_largest_vm() {
        use crate::vmm::layout::{EBDA_START, HIMEM_START};
        assert!(build(EBDA_START, 254).len() as u64 <= HIMEM_START - EBDA_START);
    }
}
