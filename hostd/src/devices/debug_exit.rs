//! The debug-exit port (0xf4): a write of `v` powers the VM off with status `v`.
//!
//! It is the same convention as QEMU's `isa-debug-exit,iobase=0xf4`, so the test guest
//! reports its result the same way under both (HLT is not an option at CPL 3).

use super::bus::BusDevice;
use crate::vmm::{ExitHandle, VmExit};

pub struct DebugExit {
    exit: ExitHandle,
}

impl DebugExit {
    pub fn new(exit: ExitHandle) -> Self {
        Self { exit }
    }
}

impl BusDevice for DebugExit {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        let status = data.first().copied().unwrap_or(0);
        self.exit.request(VmExit::Poweroff {
            status: Some(status),
        });
    }
}
