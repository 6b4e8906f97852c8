//! The 16550 UART at 0x3f8 (COM1): vm-superio's register model, wired to the VM's console
//! sink for output and to an irqfd for its interrupt.

use std::io::{self, Write};
use std::sync::Arc;

use vm_superio::Serial;
use vm_superio::serial::{NoEvents, SerialState};

use super::IrqLine;
use super::bus::BusDevice;
use crate::console::ConsoleOut;

/// Adapts a console sink to the `io::Write` vm-superio writes guest output to.
pub struct ConsoleWriter(pub Arc<dyn ConsoleOut>);

impl Write for ConsoleWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

pub struct SerialDevice {
    uart: Serial<IrqLine, NoEvents, ConsoleWriter>,
}

impl SerialDevice {
    pub fn new(irq: IrqLine, out: Arc<dyn ConsoleOut>) -> Self {
        Self {
            uart: Serial::new(irq, ConsoleWriter(out)),
        }
    }

    /// A UART in a saved state (registers and unread input).
    pub fn from_state(
        state: &SerialState,
        irq: IrqLine,
        out: Arc<dyn ConsoleOut>,
    ) -> io::Result<Self> {
        Serial::from_state(state, irq, NoEvents, ConsoleWriter(out))
            .map(|uart| Self { uart })
            .map_err(|e| io::Error::other(format!("serial state: {e:?}")))
    }

    pub fn state(&self) -> SerialState {
        self.uart.state()
    }

    /// Queues console input for the guest; returns how many bytes fit in the FIFO.
    pub fn enqueue_input(&mut self, data: &[u8]) -> usize {
        let room = self.uart.fifo_capacity();
        let n = data.len().min(room);
        match self.uart.enqueue_raw_bytes(&data[..n]) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = ?e, "serial input dropped");
                0
            }
        }
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() == 1 && offset < 8 {
            data[0] = self.uart.read(offset as u8);
        } else {
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() == 1
            && offset < 8
            && let Err(e) = self.uart.write(offset as u8, data[0])
        {
            tracing::debug!(error = ?e, "serial write");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::console::Console;

    #[test]
    fn guest_bytes_reach_the_console_and_raise_the_interrupt_when_enabled() {
        let console = Console::new(1024, None).unwrap();
        let irq = IrqLine::new(4).unwrap();
        let probe = irq.try_clone().unwrap();
        let mut serial = SerialDevice::new(irq, console.clone());
        for b in b"hi\n" {
            serial.write(0, &[*b]);
        }
        assert_eq!(console.contents(), b"hi\n");
        // Enabling the transmitter-empty interrupt raises it at once (THR is always empty).
        serial.write(1, &[0x02]);
        assert!(probe.eventfd().read().unwrap() >= 1);
        // The line status register says the transmitter is empty.
        let mut lsr = [0u8];
        serial.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0);
    }

    #[test]
    fn state_round_trips_with_unread_input() {
        let console = Console::new(1024, None).unwrap();
        let mut a = SerialDevice::new(IrqLine::new(4).unwrap(), console.clone());
        a.write(3, &[0x03]); // line control: 8 bits
        a.enqueue_input(b"xy");
        let mut b =
            SerialDevice::from_state(&a.state(), IrqLine::new(4).unwrap(), console).unwrap();
        assert_eq!(b.state(), a.state());
        let mut d = [0u8];
        b.read(0, &mut d);
        assert_eq!(d[0], b'x');
    }

    #[test]
    fn input_is_readable_by_the_guest() {
        let console = Console::new(1024, None).unwrap();
        let mut serial = SerialDevice::new(IrqLine::new(4).unwrap(), console);
        assert_eq!(serial.enqueue_input(b"ok"), 2);
        let mut b = [0u8];
        serial.read(5, &mut b);
        assert_ne!(b[0] & 0x01, 0, "data ready");
        serial.read(0, &mut b);
        assert_eq!(b[0], b'o');
        serial.read(0, &mut b);
        assert_eq!(b[0], b'k');
        serial.read(5, &mut b);
        assert_eq!(b[0] & 0x01, 0);
    }
}
