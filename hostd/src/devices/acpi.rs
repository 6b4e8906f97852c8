//! The power controls of hostd's hardware-reduced ACPI platform (described in the FADT and
//! DSDT, `vmm::acpi`):
//! - [`AcpiPm`]: the sleep control, sleep status and reset registers, one I/O byte each.
//!   Sleep type 5 with SLP_EN powers the VM off, the reset value resets it.
//! - [`PciReset`]: port 0xCF9, the chipset reset Linux's `reboot=pci` uses.
//! - [`PowerButton`]: the generic event device's interrupt; the guest's `_EVT` turns it
//!   into a power-button press. [`guest_listens`] says whether the guest has a driver on it.

use std::io;
use std::mem::offset_of;

use kvm_bindings::{kvm_ioapic_state, kvm_irqchip};
use zerocopy::IntoBytes;

use super::IrqLine;
use super::bus::BusDevice;
use crate::vmm::acpi::SLP_TYP_S5;
use crate::vmm::layout::{
    ACPI_RESET_VALUE, PORT_ACPI_PM, PORT_ACPI_RESET, PORT_ACPI_SLEEP_CONTROL,
};
use crate::vmm::{ExitHandle, VmExit};

/// Sleep control register: SLP_TYP in bits 2..=4, SLP_EN in bit 5 (ACPI 6, 4.8.3.7).
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0x7;
const SLP_EN: u8 = 1 << 5;

/// What a write to the sleep control register asks for, if anything.
fn sleep_request(value: u8) -> Option<VmExit> {
    let typ = (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK;
    // Only S5 is announced; a guest asking for another state gets nothing.
    (value & SLP_EN != 0 && typ == SLP_TYP_S5).then_some(VmExit::Poweroff { status: None })
}

/// The sleep and reset registers, placed at [`PORT_ACPI_PM`].
pub struct AcpiPm {
    exit: ExitHandle,
}

impl AcpiPm {
    pub fn new(exit: ExitHandle) -> Self {
        Self { exit }
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Sleep status reads 0: no wake event ever happened (the VM is gone by then).
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        let port = u64::from(PORT_ACPI_PM) + offset;
        let exit = if port == u64::from(PORT_ACPI_SLEEP_CONTROL) {
            sleep_request(value)
        } else if port == u64::from(PORT_ACPI_RESET) {
            (value == ACPI_RESET_VALUE).then_some(VmExit::Reset)
        } else {
            // The sleep status register: write-1-to-clear bits we never set.
            None
        };
        if let Some(exit) = exit {
            self.exit.request(exit);
        }
    }
}

/// Reset control register bits (port 0xCF9): RST_CPU starts the reset.
const CF9_RST_CPU: u8 = 1 << 2;
const CF9_KEEP: u8 = 0x0a;

/// Port 0xCF9: a write with RST_CPU resets the VM; the other bits read back.
pub struct PciReset {
    exit: ExitHandle,
    value: u8,
}

impl PciReset {
    pub fn new(exit: ExitHandle) -> Self {
        Self { exit, value: 0 }
    }
}

impl BusDevice for PciReset {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = self.value;
        }
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        self.value = value & CF9_KEEP;
        if value & CF9_RST_CPU != 0 {
            self.exit.request(VmExit::Reset);
        }
    }
}

/// The power button: a pulse on the GED's interrupt line.
pub struct PowerButton {
    irq: IrqLine,
}

impl PowerButton {
    pub fn new(irq: IrqLine) -> Self {
        Self { irq }
    }

    pub fn gsi(&self) -> u32 {
        self.irq.gsi()
    }

    pub fn press(&self) -> io::Result<()> {
        self.irq.trigger()
    }
}

/// IOAPIC redirection entry: interrupt mask.
const REDIR_MASKED: u64 = 1 << 16;

/// Whether the guest has unmasked IOAPIC pin `gsi`, given the IOAPIC as KVM_GET_IRQCHIP
/// returns it. KVM resets every pin masked; Linux unmasks the GED's pin once its driver
/// requested the interrupt, so an unmasked pin means a press will be handled.
pub fn guest_listens(ioapic: &kvm_irqchip, gsi: u32) -> bool {
    if gsi >= 24 {
        return false;
    }
    // Read as bytes: the redirection table sits in a union KVM fills for the IOAPIC chip.
    let at = offset_of!(kvm_irqchip, chip)
        + offset_of!(kvm_ioapic_state, redirtbl)
        + gsi as usize * std::mem::size_of::<u64>();
    let entry = u64::from_le_bytes(ioapic.as_bytes()[at..at + 8].try_into().expect("8 bytes"));
    entry & REDIR_MASKED == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::RunControl;
    use crate::vmm::layout::{IRQ_GED, PORT_ACPI_SLEEP_STATUS};
    use kvm_bindings::KVM_IRQCHIP_IOAPIC;
    use zerocopy::FromBytes;

    fn off(port: u16) -> u64 {
        u64::from(port - PORT_ACPI_PM)
    }

    #[test]
    fn linux_s5_sequence_powers_off_once() {
        let ctl = RunControl::new();
        let mut pm = AcpiPm::new(ctl.exit_handle());
        // acpi_hw_extended_sleep: clear WAK_STS, then SLP_TYP 5 | SLP_EN.
        pm.write(off(PORT_ACPI_SLEEP_STATUS), &[0x80]);
        assert_eq!(ctl.exit_reason(), None);
        pm.write(off(PORT_ACPI_SLEEP_CONTROL), &[0x34]);
        assert_eq!(ctl.exit_reason(), Some(VmExit::Poweroff { status: None }));
    }

    #[test]
    fn other_sleep_values_do_nothing() {
        let ctl = RunControl::new();
        let mut pm = AcpiPm::new(ctl.exit_handle());
        // S5 type without SLP_EN, SLP_EN with S1/S3, garbage.
        for v in [5 << 2, SLP_EN | (1 << 2), SLP_EN | (3 << 2), !SLP_EN, 0] {
            pm.write(off(PORT_ACPI_SLEEP_CONTROL), &[v]);
        }
        pm.write(off(PORT_ACPI_SLEEP_CONTROL), &[]);
        assert_eq!(ctl.exit_reason(), None);
        let mut b = [0xaa];
        pm.read(off(PORT_ACPI_SLEEP_STATUS), &mut b);
        assert_eq!(b, [0]);
    }

    #[test]
    fn reset_register_resets_only_on_its_value() {
        let ctl = RunControl::new();
        let mut pm = AcpiPm::new(ctl.exit_handle());
        pm.write(off(PORT_ACPI_RESET), &[ACPI_RESET_VALUE.wrapping_add(1)]);
        pm.write(off(PORT_ACPI_SLEEP_STATUS), &[ACPI_RESET_VALUE]);
        assert_eq!(ctl.exit_reason(), None);
        pm.write(off(PORT_ACPI_RESET), &[ACPI_RESET_VALUE]);
        assert_eq!(ctl.exit_reason(), Some(VmExit::Reset));
    }

    #[test]
    fn port_cf9_resets_on_rst_cpu_as_linux_writes_it() {
        let ctl = RunControl::new();
        let mut cf9 = PciReset::new(ctl.exit_handle());
        let mut b = [0];
        cf9.read(0, &mut b);
        // reboot=pci: read, write SYS_RST, then SYS_RST | RST_CPU (| FULL_RST when cold).
        cf9.write(0, &[b[0] | 0x02]);
        cf9.read(0, &mut b);
        assert_eq!(b, [0x02]);
        assert_eq!(ctl.exit_reason(), None);
        cf9.write(0, &[b[0] | 0x0e]);
        assert_eq!(ctl.exit_reason(), Some(VmExit::Reset));
    }

    #[test]
    fn power_button_pulses_its_line() {
        let irq = IrqLine::new(IRQ_GED).unwrap();
        let probe = irq.try_clone().unwrap();
        let button = PowerButton::new(irq);
        assert_eq!(button.gsi(), IRQ_GED);
        button.press().unwrap();
        assert_eq!(probe.eventfd().read().unwrap(), 1);
    }

    fn ioapic_with(pin: usize, entry: u64) -> kvm_irqchip {
        let mut chip = kvm_irqchip {
            chip_id: KVM_IRQCHIP_IOAPIC,
            ..Default::default()
        };
        let mut bytes = chip.as_bytes().to_vec();
        // As KVM resets it: every pin masked.
        let table = offset_of!(kvm_irqchip, chip) + offset_of!(kvm_ioapic_state, redirtbl);
        for p in 0..24 {
            let v = if p == pin { entry } else { REDIR_MASKED };
            bytes[table + p * 8..table + p * 8 + 8].copy_from_slice(&v.to_le_bytes());
        }
        chip = kvm_irqchip::read_from_bytes(&bytes).unwrap();
        chip
    }

    #[test]
    fn the_guest_listens_once_it_unmasks_the_ged_pin() {
        let gsi = IRQ_GED;
        // Fresh VM, or a guest with no GED driver: masked.
        assert!(!guest_listens(
            &ioapic_with(gsi as usize, REDIR_MASKED),
            gsi
        ));
        // Linux's evged requested it: edge, vector 0x22, unmasked.
        assert!(guest_listens(&ioapic_with(gsi as usize, 0x22), gsi));
        // Another pin unmasked says nothing about this one.
        assert!(!guest_listens(&ioapic_with(4, 0x23), gsi));
        assert!(!guest_listens(&ioapic_with(gsi as usize, 0x22), 24));
    }
}
