//! A minimal i8042 keyboard controller at 0x60/0x64: enough for a guest to reset the
//! machine (command 0xfe), for Linux's probe to find a controller, and for the VMM to send
//! Ctrl-Alt-Del as the polite request to shut down.

use std::collections::VecDeque;

use super::IrqLine;
use super::bus::BusDevice;
use crate::vmm::{ExitHandle, VmExit};

const OFFSET_DATA: u64 = 0;
const OFFSET_COMMAND: u64 = 4;

const STATUS_OUTPUT_FULL: u8 = 0x01;
const STATUS_SYSTEM: u8 = 0x04;
const STATUS_COMMAND: u8 = 0x08;
/// Keyboard not inhibited.
const STATUS_UNLOCKED: u8 = 0x10;

const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_KBD_DISABLE: u8 = 0xad;
const CMD_KBD_ENABLE: u8 = 0xae;
const CMD_READ_OUTP: u8 = 0xd0;
const CMD_WRITE_OUTP: u8 = 0xd1;
const CMD_RESET_CPU: u8 = 0xfe;

/// Controller configuration byte bit: keyboard interrupt enabled.
const CTR_KBD_INT: u8 = 0x01;

/// Set-1 scancodes for Ctrl down, Alt down, Del down, Del up, Alt up, Ctrl up.
const CTRL_ALT_DEL: [u8; 6] = [0x1d, 0x38, 0x53, 0xd3, 0xb8, 0x9d];
const BUFFER_MAX: usize = 16;

/// The controller's saved state.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct I8042State {
    pub status: u8,
    pub ctr: u8,
    pub outp: u8,
    pub pending: Option<u8>,
    pub buffer: Vec<u8>,
}

pub struct I8042 {
    status: u8,
    ctr: u8,
    outp: u8,
    /// The command whose data byte the next write to the data port is.
    pending: Option<u8>,
    buffer: VecDeque<u8>,
    irq: IrqLine,
    exit: ExitHandle,
}

impl I8042 {
    pub fn new(irq: IrqLine, exit: ExitHandle) -> Self {
        Self {
            status: STATUS_SYSTEM | STATUS_UNLOCKED,
            ctr: CTR_KBD_INT,
            outp: 0,
            pending: None,
            buffer: VecDeque::new(),
            irq,
            exit,
        }
    }

    pub fn state(&self) -> I8042State {
        I8042State {
            status: self.status,
            ctr: self.ctr,
            outp: self.outp,
            pending: self.pending,
            buffer: self.buffer.iter().copied().collect(),
        }
    }

    pub fn from_state(state: &I8042State, irq: IrqLine, exit: ExitHandle) -> Self {
        let mut d = Self::new(irq, exit);
        d.status = state.status;
        d.ctr = state.ctr;
        d.outp = state.outp;
        d.pending = state.pending;
        d.buffer = state.buffer.iter().copied().take(BUFFER_MAX).collect();
        d
    }

    fn push(&mut self, byte: u8) {
        if self.buffer.len() < BUFFER_MAX {
            self.buffer.push_back(byte);
        }
        self.status |= STATUS_OUTPUT_FULL;
    }

    /// Queues the Ctrl-Alt-Del key sequence and interrupts the guest.
    pub fn send_ctrl_alt_del(&mut self) {
        for b in CTRL_ALT_DEL {
            self.push(b);
        }
        if self.ctr & CTR_KBD_INT != 0
            && let Err(e) = self.irq.trigger()
        {
            tracing::warn!(error = %e, "i8042 interrupt");
        }
    }

    fn command(&mut self, cmd: u8) {
        self.status |= STATUS_COMMAND;
        match cmd {
            CMD_READ_CTR => self.push(self.ctr),
            CMD_WRITE_CTR | CMD_WRITE_OUTP => self.pending = Some(cmd),
            CMD_SELF_TEST => self.push(0x55),
            CMD_KBD_TEST => self.push(0x00),
            CMD_READ_OUTP => self.push(self.outp),
            CMD_KBD_DISABLE | CMD_KBD_ENABLE => {}
            CMD_RESET_CPU => self.exit.request(VmExit::Reset),
            _ => {}
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            OFFSET_COMMAND => self.status,
            OFFSET_DATA => {
                let b = self.buffer.pop_front().unwrap_or(0);
                if self.buffer.is_empty() {
                    self.status &= !STATUS_OUTPUT_FULL;
                }
                b
            }
            _ => 0xff,
        };
        data.fill(0);
        if let Some(d) = data.first_mut() {
            *d = value;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset {
            OFFSET_COMMAND => self.command(value),
            OFFSET_DATA => {
                self.status &= !STATUS_COMMAND;
                match self.pending.take() {
                    Some(CMD_WRITE_CTR) => self.ctr = value,
                    Some(CMD_WRITE_OUTP) => self.outp = value,
                    // A byte for the keyboard itself: acknowledge it like a real one.
                    _ => self.push(0xfa),
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmm::RunControl;

    fn device() -> (I8042, std::sync::Arc<RunControl>, IrqLine) {
        let ctl = RunControl::new();
        let irq = IrqLine::new(1).unwrap();
        let probe = irq.try_clone().unwrap();
        (I8042::new(irq, ctl.exit_handle()), ctl, probe)
    }

    fn read(d: &mut I8042, offset: u64) -> u8 {
        let mut b = [0u8];
        d.read(offset, &mut b);
        b[0]
    }

    #[test]
    fn reset_command_asks_the_vm_to_reset() {
        let (mut d, ctl, _) = device();
        d.write(OFFSET_COMMAND, &[CMD_RESET_CPU]);
        assert_eq!(ctl.exit_reason(), Some(VmExit::Reset));
    }

    #[test]
    fn linux_probe_sequence_gets_answers() {
        let (mut d, ctl, _) = device();
        d.write(OFFSET_COMMAND, &[CMD_SELF_TEST]);
        assert_ne!(read(&mut d, OFFSET_COMMAND) & STATUS_OUTPUT_FULL, 0);
        assert_eq!(read(&mut d, OFFSET_DATA), 0x55);
        d.write(OFFSET_COMMAND, &[CMD_WRITE_CTR]);
        d.write(OFFSET_DATA, &[0x47]);
        d.write(OFFSET_COMMAND, &[CMD_READ_CTR]);
        assert_eq!(read(&mut d, OFFSET_DATA), 0x47);
        assert_eq!(read(&mut d, OFFSET_COMMAND) & STATUS_OUTPUT_FULL, 0);
        assert_eq!(ctl.exit_reason(), None);
    }

    #[test]
    fn state_round_trips() {
        let (mut d, ctl, _) = device();
        d.write(OFFSET_COMMAND, &[CMD_WRITE_CTR]);
        d.send_ctrl_alt_del();
        let s = d.state();
        let mut e = I8042::from_state(&s, IrqLine::new(1).unwrap(), ctl.exit_handle());
        assert_eq!(e.state(), s);
        assert_eq!(read(&mut e, OFFSET_DATA), CTRL_ALT_DEL[0]);
    }

    #[test]
    fn ctrl_alt_del_queues_the_keys_and_interrupts() {
        let (mut d, _ctl, probe) = device();
        d.send_ctrl_alt_del();
        assert_eq!(probe.eventfd().read().unwrap(), 1);
        let keys: Vec<u8> = (0..6).map(|_| read(&mut d, OFFSET_DATA)).collect();
        assert_eq!(keys, CTRL_ALT_DEL);
        assert_eq!(read(&mut d, OFFSET_COMMAND) & STATUS_OUTPUT_FULL, 0);
    }
}
