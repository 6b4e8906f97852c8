//! Port 0x61, "system control port B": PIT channel 2's gate and output and the speaker
//! enable bit. Guests read it to time PIT channel 2 (the test guest calibrates its TSC
//! this way). KVM runs the PIT in the kernel; when it leaves port 0x61 to user space, as
//! it does on some hosts, the output bit is computed here from the in-kernel PIT's state
//! (KVM_GET_PIT2), the way QEMU's speaker device does.

use std::sync::Arc;

use kvm_bindings::kvm_pit_channel_state;
use kvm_ioctls::VmFd;

use super::bus::BusDevice;

const PIT_HZ: u128 = 1_193_182;

pub struct PcSpeaker {
    vm: Arc<VmFd>,
    gate: bool,
    data_on: bool,
    refresh: bool,
}

impl PcSpeaker {
    pub fn new(vm: Arc<VmFd>) -> Self {
        Self {
            vm,
            gate: false,
            data_on: false,
            refresh: false,
        }
    }
}

fn monotonic_ns() -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for the kernel to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec * 1_000_000_000 + ts.tv_nsec
}

/// The OUT pin of a PIT channel `elapsed_ns` after its count was loaded (8254 modes).
pub fn pit_out(ch: &kvm_pit_channel_state, elapsed_ns: i64) -> bool {
    let count = if ch.count == 0 {
        0x10000
    } else {
        u128::from(ch.count)
    };
    let d = (elapsed_ns.max(0) as u128) * PIT_HZ / 1_000_000_000;
    match ch.mode {
        1 => d < count,
        2 => d.is_multiple_of(count) && d != 0,
        3 => d % count < count.div_ceil(2),
        4 | 5 => d == count,
        _ => d >= count,
    }
}

impl BusDevice for PcSpeaker {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        let out = match self.vm.get_pit2() {
            Ok(state) => {
                let ch = &state.channels[2];
                pit_out(ch, monotonic_ns() - ch.count_load_time)
            }
            Err(_) => false,
        };
        self.refresh = !self.refresh;
        let v = u8::from(self.gate)
            | u8::from(self.data_on) << 1
            | u8::from(self.refresh) << 4
            | u8::from(out) << 5;
        data.fill(0);
        if let Some(d) = data.first_mut() {
            *d = v;
        }
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if let Some(&v) = data.first() {
            self.gate = v & 1 != 0;
            self.data_on = v & 2 != 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn channel(mode: u8, count: u32) -> kvm_pit_channel_state {
        kvm_pit_channel_state {
            mode,
            count,
            ..Default::default()
        }
    }

    #[test]
    fn mode_0_output_rises_at_terminal_count() {
        let ch = channel(0, 11932); // 10 ms
        assert!(!pit_out(&ch, 9_900_000));
        assert!(pit_out(&ch, 10_001_000));
    }

    #[test]
    fn mode_3_is_a_square_wave() {
        let ch = channel(3, 1000);
        let period_ns = 1000 * 1_000_000_000 / PIT_HZ as i64;
        assert!(pit_out(&ch, period_ns / 4));
        assert!(!pit_out(&ch, period_ns * 3 / 4));
    }
}
