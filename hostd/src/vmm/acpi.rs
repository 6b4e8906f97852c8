//! The ACPI tables a stock distribution kernel needs to find its vCPUs, interrupt
//! controllers, virtio-mmio devices and power controls: RSDP, XSDT, FADT, MADT and DSDT,
//! hardware-reduced (no SCI, no PM1 blocks, no FACS), the way microVMs describe themselves.
//!
//! - FADT: sleep control/status and reset registers as one-byte I/O ports (`devices::acpi`),
//!   an i8042 present, the CMOS century register.
//! - MADT: a local APIC per vCPU and the IOAPIC (id = vCPU count, as in the MP table); no
//!   interrupt source overrides, since hostd keeps KVM's identity GSI routing.
//! - DSDT: a `LNRO0005` device per virtio-mmio window (what Linux's `virtio_mmio` matches),
//!   COM1, the i8042, the RTC (ports only: its usual IRQ 8 may be a virtio line), a power
//!   button and the generic event device (GED) whose interrupt presses it, and `_S5_`.
//!
//! Everything goes between [`RSDP_ADDR`] and [`ACPI_TABLES_END`], in the e820-reserved hole.

use acpi_tables::Aml;
use acpi_tables::aml::{
    Device, EISAName, IO, Interrupt, Memory32Fixed, Method, Name, Notify, Package, Path,
    ResourceTemplate, Scope,
};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, MADT, ProcessorLocalApic,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;

use super::layout::*;

const OEM_ID: [u8; 6] = *b"HOSTD ";
const OEM_REVISION: u32 = 1;
/// Tables start on this boundary (the RSDP needs 16; 64 keeps them apart in dumps).
const TABLE_ALIGN: u64 = 64;

/// FADT IAPC_BOOT_ARCH: an 8042 (else Linux marks it firmware-absent in reduced mode), no
/// VGA, no MSI, no PCIe ASPM control. The CMOS RTC is present (bit 5 clear).
const IAPC_BOOT_ARCH: u16 = (1 << 1) | (1 << 2) | (1 << 3) | (1 << 4);
/// The sleep type `_S5_` announces; the guest writes it, shifted, with SLP_EN.
pub const SLP_TYP_S5: u8 = 5;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AcpiError {
    #[error("the ACPI tables need {need:#x} bytes, but only {have:#x} are set aside for them")]
    TooLarge { need: u64, have: u64 },
}

fn table_id(name: &[u8; 4]) -> [u8; 8] {
    let mut id = *b"HOSTD   ";
    id[4..].copy_from_slice(name);
    id
}

fn bytes_of(aml: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    aml.to_aml_bytes(&mut v);
    v
}

fn io_byte_register(port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(port),
    )
}

fn fadt(dsdt: u64) -> Vec<u8> {
    let mut f = FADTBuilder::new(OEM_ID, table_id(b"FACP"), OEM_REVISION)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        // Set: the buttons are control-method devices (PNP0C0C), not fixed hardware.
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .dsdt_64(dsdt);
    f.reset_reg = io_byte_register(PORT_ACPI_RESET);
    f.reset_value = ACPI_RESET_VALUE;
    f.sleep_control_reg = io_byte_register(PORT_ACPI_SLEEP_CONTROL);
    f.sleep_status_reg = io_byte_register(PORT_ACPI_SLEEP_STATUS);
    f.iapc_boot_arch = IAPC_BOOT_ARCH.into();
    f.century = CMOS_CENTURY;
    f.hypervisor_vendor_identity = u64::from_le_bytes(*b"HOSTD\0\0\0").into();
    bytes_of(&f.finalize())
}

fn madt(vcpus: u8) -> Vec<u8> {
    let mut m = MADT::new(
        OEM_ID,
        table_id(b"APIC"),
        OEM_REVISION,
        LocalInterruptController::Address(LAPIC_ADDR as u32),
    );
    for i in 0..vcpus {
        m.add_structure(ProcessorLocalApic::new(i, i, EnabledStatus::Enabled));
    }
    m.add_structure(IoApic::new(vcpus, IOAPIC_ADDR as u32, 0));
    bytes_of(&m)
}

/// An edge-triggered, active-high, exclusive interrupt: what an irqfd pulse is.
fn edge_irq(gsi: u32) -> Interrupt {
    Interrupt::new(true, true, false, false, gsi)
}

/// The DSDT's AML: `\_SB` with the devices, then `_S5_`.
fn dsdt_aml(virtio: &[(u64, u32)]) -> Vec<u8> {
    let mut devices: Vec<Vec<u8>> = Vec::new();
    for (i, &(base, gsi)) in virtio.iter().enumerate() {
        let mem = Memory32Fixed::new(true, base as u32, VIRTIO_MMIO_SIZE as u32);
        let irq = edge_irq(gsi);
        let crs = ResourceTemplate::new(vec![&mem, &irq]);
        let hid = Name::new("_HID".into(), &"LNRO0005");
        let uid = Name::new("_UID".into(), &(i as u32));
        let crs = Name::new("_CRS".into(), &crs);
        let name = format!("VR{i:02X}");
        devices.push(bytes_of(&Device::new(
            name.as_str().into(),
            vec![&hid, &uid, &crs],
        )));
    }

    let legacy = |name: &str, hid: &str, ports: &[(u16, u8)], irq: Option<u32>| {
        let ios: Vec<IO> = ports.iter().map(|&(p, n)| IO::new(p, p, 1, n)).collect();
        let irq = irq.map(edge_irq);
        let mut res: Vec<&dyn Aml> = ios.iter().map(|io| io as &dyn Aml).collect();
        if let Some(irq) = &irq {
            res.push(irq);
        }
        let crs = ResourceTemplate::new(res);
        let hid = Name::new("_HID".into(), &EISAName::new(hid));
        let uid = Name::new("_UID".into(), &0u8);
        let crs = Name::new("_CRS".into(), &crs);
        bytes_of(&Device::new(name.into(), vec![&hid, &uid, &crs]))
    };
    devices.push(legacy(
        "COM1",
        "PNP0501",
        &[(PORT_SERIAL, PORT_SERIAL_LEN as u8)],
        Some(IRQ_SERIAL),
    ));
    devices.push(legacy(
        "PS2_",
        "PNP0303",
        &[(PORT_I8042_DATA, 1), (PORT_I8042_COMMAND, 1)],
        Some(IRQ_KEYBOARD),
    ));
    devices.push(legacy(
        "RTC_",
        "PNP0B00",
        &[(PORT_RTC, PORT_RTC_LEN as u8)],
        None,
    ));

    let hid = Name::new("_HID".into(), &EISAName::new("PNP0C0C"));
    let uid = Name::new("_UID".into(), &0u8);
    devices.push(bytes_of(&Device::new("PWRB".into(), vec![&hid, &uid])));

    // A single-purpose GED: any event it signals is the power button.
    let hid = Name::new("_HID".into(), &"ACPI0013");
    let uid = Name::new("_UID".into(), &0u8);
    let irq = edge_irq(IRQ_GED);
    let crs = ResourceTemplate::new(vec![&irq]);
    let crs = Name::new("_CRS".into(), &crs);
    let button = Path::new("\\_SB_.PWRB");
    let notify = Notify::new(&button, &0x80u8);
    let evt = Method::new("_EVT".into(), 1, false, vec![&notify]);
    devices.push(bytes_of(&Device::new(
        "GED_".into(),
        vec![&hid, &uid, &crs, &evt],
    )));

    let raw: Vec<RawAml> = devices.into_iter().map(RawAml).collect();
    let children: Vec<&dyn Aml> = raw.iter().map(|r| r as &dyn Aml).collect();
    let mut aml = bytes_of(&Scope::new("\\_SB_".into(), children));
    let (typ, zero) = (SLP_TYP_S5, 0u8);
    let s5 = Package::new(vec![&typ, &typ, &zero, &zero]);
    aml.extend(bytes_of(&Name::new("_S5_".into(), &s5)));
    aml
}

/// AML already turned into bytes.
struct RawAml(Vec<u8>);

impl Aml for RawAml {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(&self.0);
    }
}

fn dsdt(virtio: &[(u64, u32)]) -> Vec<u8> {
    let mut t = Sdt::new(*b"DSDT", 36, 6, OEM_ID, table_id(b"DSDT"), OEM_REVISION);
    t.append_slice(&dsdt_aml(virtio));
    t.as_slice().to_vec()
}

fn align(a: u64) -> u64 {
    a.next_multiple_of(TABLE_ALIGN)
}

/// The tables for `vcpus` vCPUs and the virtio-mmio windows `(base, gsi)`, each with the
/// guest-physical address it goes to; the RSDP first, at [`RSDP_ADDR`].
pub fn build(vcpus: u8, virtio: &[(u64, u32)]) -> Result<Vec<(u64, Vec<u8>)>, AcpiError> {
    let xsdt_at = align(RSDP_ADDR + Rsdp::len() as u64);
    // XSDT: header and two entries.
    let fadt_at = align(xsdt_at + 36 + 2 * 8);
    let madt_at = align(fadt_at + acpi_tables::fadt::FADT::len() as u64);
    let madt = madt(vcpus);
    let dsdt_at = align(madt_at + madt.len() as u64);
    let dsdt = dsdt(virtio);
    let end = dsdt_at + dsdt.len() as u64;
    if end > ACPI_TABLES_END {
        return Err(AcpiError::TooLarge {
            need: end - RSDP_ADDR,
            have: ACPI_TABLES_END - RSDP_ADDR,
        });
    }
    let mut xsdt = XSDT::new(OEM_ID, table_id(b"XSDT"), OEM_REVISION);
    xsdt.add_entry(fadt_at);
    xsdt.add_entry(madt_at);
    Ok(vec![
        (RSDP_ADDR, bytes_of(&Rsdp::new(OEM_ID, xsdt_at))),
        (xsdt_at, bytes_of(&xsdt)),
        (fadt_at, fadt(dsdt_at)),
        (madt_at, madt),
        (dsdt_at, dsdt),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
    }

    fn count(hay: &[u8], needle: &[u8]) -> usize {
        hay.windows(needle.len()).filter(|w| *w == needle).count()
    }

    fn windows(n: usize) -> Vec<(u64, u32)> {
        (0..n).map(virtio_mmio_window).collect()
    }

    /// Follows the pointers from the RSDP, as a guest does: (signature, address, bytes).
    fn walk(tables: &[(u64, Vec<u8>)]) -> Vec<([u8; 4], u64, Vec<u8>)> {
        let at = |addr: u64| {
            tables
                .iter()
                .find(|(a, _)| *a == addr)
                .unwrap_or_else(|| panic!("nothing at {addr:#x}"))
                .1
                .clone()
        };
        let rsdp = at(RSDP_ADDR);
        let xsdt_at = u64_at(&rsdp, 24);
        let xsdt = at(xsdt_at);
        let mut out = vec![(*b"XSDT", xsdt_at, xsdt.clone())];
        for e in 0..(xsdt.len() - 36) / 8 {
            let a = u64_at(&xsdt, 36 + e * 8);
            let t = at(a);
            out.push((t[..4].try_into().unwrap(), a, t));
        }
        let fadt = out.iter().find(|t| &t.0 == b"FACP").unwrap().2.clone();
        let dsdt_at = u64_at(&fadt, 140);
        out.push((*b"DSDT", dsdt_at, at(dsdt_at)));
        out
    }

    #[test]
    fn rsdp_is_revision_2_with_both_checksums() {
        let tables = build(2, &windows(1)).unwrap();
        let (addr, rsdp) = &tables[0];
        assert_eq!(*addr, RSDP_ADDR);
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(rsdp.len(), 36);
        assert_eq!(rsdp[15], 2);
        assert_eq!(u32_at(rsdp, 20), 36);
        assert_eq!(sum(&rsdp[..20]), 0);
        assert_eq!(sum(rsdp), 0);
    }

    #[test]
    fn every_table_sums_to_zero_and_its_length_is_its_size() {
        let tables = build(4, &windows(3)).unwrap();
        let found = walk(&tables);
        let sigs: Vec<_> = found.iter().map(|t| t.0).collect();
        assert_eq!(sigs, [*b"XSDT", *b"FACP", *b"APIC", *b"DSDT"]);
        for (sig, addr, t) in &found {
            let name = String::from_utf8_lossy(sig);
            assert_eq!(u32_at(t, 4) as usize, t.len(), "{name} length");
            assert_eq!(sum(t), 0, "{name} checksum");
            assert_eq!(addr % 16, 0, "{name} alignment");
        }
        // No two tables overlap.
        let mut spans: Vec<_> = tables
            .iter()
            .map(|(a, b)| (*a, *a + b.len() as u64))
            .collect();
        spans.sort();
        for w in spans.windows(2) {
            assert!(w[0].1 <= w[1].0);
        }
    }

    #[test]
    fn fadt_is_hardware_reduced_with_io_power_registers() {
        let found = walk(&build(1, &[]).unwrap());
        let fadt = &found.iter().find(|t| &t.0 == b"FACP").unwrap().2;
        assert_eq!(fadt.len(), 276);
        assert_eq!(fadt[8], 6, "revision");
        let flags = u32_at(fadt, 112);
        for bit in [20, 10, 4, 5] {
            assert_ne!(flags & (1 << bit), 0, "flag bit {bit}");
        }
        let gas = |at: usize, port: u16| {
            assert_eq!(fadt[at], 1, "SystemIO");
            assert_eq!(fadt[at + 1], 8, "8 bits wide");
            assert_eq!(fadt[at + 3], 1, "byte access");
            assert_eq!(u64_at(fadt, at + 4), u64::from(port));
        };
        gas(116, PORT_ACPI_RESET);
        assert_eq!(fadt[128], ACPI_RESET_VALUE);
        gas(244, PORT_ACPI_SLEEP_CONTROL);
        gas(256, PORT_ACPI_SLEEP_STATUS);
        assert_eq!(u16::from_le_bytes([fadt[109], fadt[110]]) & 2, 2, "8042");
        assert_eq!(fadt[108], CMOS_CENTURY);
        assert_eq!(u32_at(fadt, 40), 0, "no 32-bit DSDT pointer");
    }

    #[test]
    fn madt_lists_each_vcpu_and_the_ioapic_after_them() {
        let found = walk(&build(3, &[]).unwrap());
        let madt = &found.iter().find(|t| &t.0 == b"APIC").unwrap().2;
        assert_eq!(u32_at(madt, 36), LAPIC_ADDR as u32);
        let mut at = 44;
        let mut lapics = Vec::new();
        let mut ioapics = Vec::new();
        while at < madt.len() {
            let (kind, len) = (madt[at], madt[at + 1] as usize);
            match kind {
                0 => {
                    assert_eq!(madt[at + 2], madt[at + 3], "uid = APIC id");
                    assert_eq!(u32_at(madt, at + 4), 1, "enabled");
                    lapics.push(madt[at + 3]);
                }
                1 => {
                    assert_eq!(u32_at(madt, at + 4), IOAPIC_ADDR as u32);
                    assert_eq!(u32_at(madt, at + 8), 0, "GSI base");
                    ioapics.push(madt[at + 2]);
                }
                other => panic!("unexpected MADT entry type {other}"),
            }
            at += len;
        }
        assert_eq!(at, madt.len());
        assert_eq!(lapics, [0, 1, 2]);
        assert_eq!(ioapics, [3]);
    }

    #[test]
    fn dsdt_describes_each_virtio_window_and_the_platform_devices() {
        let w = windows(3);
        let found = walk(&build(2, &w).unwrap());
        let dsdt = &found.iter().find(|t| &t.0 == b"DSDT").unwrap().2;
        assert_eq!(count(dsdt, b"LNRO0005\0"), 3);
        for &(base, gsi) in &w {
            let mut mem = vec![0x86, 0x09, 0x00, 0x01];
            mem.extend((base as u32).to_le_bytes());
            mem.extend(0x1000u32.to_le_bytes());
            assert_eq!(count(dsdt, &mem), 1, "Memory32Fixed for {base:#x}");
            let mut irq = vec![0x89, 0x06, 0x00, 0x03, 0x01];
            irq.extend(gsi.to_le_bytes());
            assert_eq!(count(dsdt, &irq), 1, "Interrupt {gsi}");
        }
        // EISA ids as Linux reads them: PNP0501, PNP0303, PNP0B00, PNP0C0C.
        for id in [0x0105_d041u32, 0x0303_d041, 0x000b_d041, 0x0c0c_d041] {
            let mut enc = vec![0x0c];
            enc.extend(id.to_le_bytes());
            assert_eq!(count(dsdt, &enc), 1, "EISA id {id:#x}");
        }
        assert_eq!(count(dsdt, b"ACPI0013\0"), 1);
        let mut ged_irq = vec![0x89, 0x06, 0x00, 0x03, 0x01];
        ged_irq.extend(IRQ_GED.to_le_bytes());
        assert_eq!(count(dsdt, &ged_irq), 1);
        // Notify(\_SB_.PWRB, 0x80) inside _EVT.
        assert_eq!(count(dsdt, b"\x86\\\x2e_SB_PWRB\x0a\x80"), 1);
        // Name(_S5_, Package(4) {5, 5, 0, 0}).
        assert_eq!(
            count(dsdt, b"\x08_S5_\x12\x08\x04\x0a\x05\x0a\x05\x00\x00"),
            1
        );
        // The RTC's resources are its two ports and nothing else: no IRQ 8 taken.
        assert_eq!(count(dsdt, b"\x47\x01\x70\x00\x70\x00\x01\x02\x79\x00"), 1);
    }

    #[test]
    fn tables_fit_at_the_most_vcpus_and_devices() {
        let most = crate::vmm::MAX_VCPUS as u8;
        let tables = build(most, &windows(MAX_VIRTIO_DEVICES)).unwrap();
        let end = tables
            .iter()
            .map(|(a, b)| a + b.len() as u64)
            .max()
            .unwrap();
        assert!(end <= ACPI_TABLES_END, "tables end at {end:#x}");
        let found = walk(&tables);
        let dsdt = &found.iter().find(|t| &t.0 == b"DSDT").unwrap().2;
        assert_eq!(count(dsdt, b"LNRO0005\0"), MAX_VIRTIO_DEVICES);
    }
}
