//! The saved VM state (a [`VmSnapshot`] without its memory) as the bytes of a State
//! frame. KVM's structures go as their exact bytes (their layout is the kernel ABI, the
//! same on both hosts; zerocopy checks they have no padding); everything else field by
//! field, little-endian. The blob starts with its own version.
//!
//! Version 2 added the CMOS RTC, at the end. A version 1 blob (from a hostd without an
//! RTC) still decodes, with a fresh RTC rather than an error: that guest never had an RTC
//! (its ports read 0xff), so a fresh one is what it would find booting on this build, and
//! running VMs can move from an older hostd to a newer one during an upgrade.

use kvm_bindings::kvm_msr_entry;
use virtio_queue::QueueState;
use zerocopy::{FromBytes, Immutable, IntoBytes};

use crate::devices::i8042::I8042State;
use crate::devices::rtc::RtcState;
use crate::devices::virtio::mmio::MmioState;
use crate::vmm::VmSnapshot;
use crate::vmm::persist::{DeviceStates, KvmVmState, VcpuState};

pub const STATE_VERSION: u16 = 2;
/// The oldest version this build decodes.
pub const STATE_VERSION_MIN: u16 = 1;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StateError {
    #[error(
        "saved state version {0} is not one this build reads ({STATE_VERSION_MIN}-{STATE_VERSION})"
    )]
    Version(u16),
    #[error("saved state ends early reading {what}")]
    Short { what: &'static str },
    #[error("saved state has {0} bytes after its end")]
    Trailing(usize),
    #[error("saved state has an implausible {what} count {count}")]
    Count { what: &'static str, count: u32 },
}

struct W(Vec<u8>);

impl W {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bool(&mut self, v: bool) {
        self.u8(u8::from(v));
    }
    fn bytes(&mut self, b: &[u8]) {
        self.u32(b.len() as u32);
        self.0.extend_from_slice(b);
    }
    fn raw<T: IntoBytes + Immutable>(&mut self, v: &T) {
        self.0.extend_from_slice(v.as_bytes());
    }
}

struct R<'a>(&'a [u8]);

impl<'a> R<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], StateError> {
        if self.0.len() < n {
            return Err(StateError::Short { what });
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self, what: &'static str) -> Result<u8, StateError> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &'static str) -> Result<u16, StateError> {
        Ok(u16::from_le_bytes(
            self.take(2, what)?.try_into().expect("2"),
        ))
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, StateError> {
        Ok(u32::from_le_bytes(
            self.take(4, what)?.try_into().expect("4"),
        ))
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, StateError> {
        Ok(u64::from_le_bytes(
            self.take(8, what)?.try_into().expect("8"),
        ))
    }
    fn bool(&mut self, what: &'static str) -> Result<bool, StateError> {
        Ok(self.u8(what)? != 0)
    }
    fn count(&mut self, what: &'static str, max: u32) -> Result<usize, StateError> {
        let n = self.u32(what)?;
        if n > max {
            return Err(StateError::Count { what, count: n });
        }
        Ok(n as usize)
    }
    fn bytes(&mut self, what: &'static str) -> Result<Vec<u8>, StateError> {
        let n = self.count(what, 1 << 20)?;
        Ok(self.take(n, what)?.to_vec())
    }
    fn raw<T: FromBytes>(&mut self, what: &'static str) -> Result<T, StateError> {
        let b = self.take(std::mem::size_of::<T>(), what)?;
        T::read_from_bytes(b).map_err(|_| StateError::Short { what })
    }
}

fn put_vcpu(w: &mut W, v: &VcpuState) {
    w.raw(&v.regs);
    w.raw(&v.sregs);
    w.raw(&*v.xsave);
    w.raw(&v.xcrs);
    w.raw(&v.debug_regs);
    w.raw(&v.lapic);
    w.u32(v.msrs.len() as u32);
    for m in &v.msrs {
        w.raw(m);
    }
    w.raw(&v.mp_state);
    w.raw(&v.events);
}

fn get_vcpu(r: &mut R) -> Result<VcpuState, StateError> {
    Ok(VcpuState {
        regs: r.raw("regs")?,
        sregs: r.raw("sregs")?,
        xsave: Box::new(r.raw("xsave")?),
        xcrs: r.raw("xcrs")?,
        debug_regs: r.raw("debug registers")?,
        lapic: r.raw("LAPIC")?,
        msrs: {
            let n = r.count("MSR", 4096)?;
            (0..n)
                .map(|_| r.raw::<kvm_msr_entry>("MSR"))
                .collect::<Result<_, _>>()?
        },
        mp_state: r.raw("MP state")?,
        events: r.raw("vCPU events")?,
    })
}

fn put_queue(w: &mut W, q: &QueueState) {
    w.u16(q.max_size);
    w.u16(q.next_avail);
    w.u16(q.next_used);
    w.bool(q.event_idx_enabled);
    w.u16(q.size);
    w.bool(q.ready);
    w.u64(q.desc_table);
    w.u64(q.avail_ring);
    w.u64(q.used_ring);
}

fn get_queue(r: &mut R) -> Result<QueueState, StateError> {
    Ok(QueueState {
        max_size: r.u16("queue")?,
        next_avail: r.u16("queue")?,
        next_used: r.u16("queue")?,
        event_idx_enabled: r.bool("queue")?,
        size: r.u16("queue")?,
        ready: r.bool("queue")?,
        desc_table: r.u64("queue")?,
        avail_ring: r.u64("queue")?,
        used_ring: r.u64("queue")?,
    })
}

/// The state's bytes (memory, if any, is left out: it travels as pages).
pub fn encode(s: &VmSnapshot) -> Vec<u8> {
    let mut w = W(Vec::with_capacity(16 << 10));
    w.u16(STATE_VERSION);
    w.u32(s.vcpus.len() as u32);
    for v in &s.vcpus {
        put_vcpu(&mut w, v);
    }
    let k = &s.kvm;
    w.raw(&k.pic_master);
    w.raw(&k.pic_slave);
    w.raw(&k.ioapic);
    w.raw(&k.pit);
    w.raw(&k.clock);
    let ser = &s.devices.serial;
    for b in [
        ser.baud_divisor_low,
        ser.baud_divisor_high,
        ser.interrupt_enable,
        ser.interrupt_identification,
        ser.line_control,
        ser.line_status,
        ser.modem_control,
        ser.modem_status,
        ser.scratch,
    ] {
        w.u8(b);
    }
    w.bytes(&ser.in_buffer);
    let k = &s.devices.i8042;
    w.u8(k.status);
    w.u8(k.ctr);
    w.u8(k.outp);
    w.bool(k.pending.is_some());
    w.u8(k.pending.unwrap_or(0));
    w.bytes(&k.buffer);
    w.u32(s.devices.virtio.len() as u32);
    for m in &s.devices.virtio {
        w.u32(m.queue_select);
        w.u32(m.device_features_select);
        w.u32(m.driver_features_select);
        w.u64(m.acked_features);
        w.u32(m.status);
        w.u32(m.config_generation);
        w.u32(m.interrupt_status);
        w.bool(m.active);
        w.u32(m.queues.len() as u32);
        for q in &m.queues {
            put_queue(&mut w, q);
        }
    }
    let rtc = &s.devices.rtc;
    w.u8(rtc.index);
    w.u64(rtc.offset_s as u64);
    w.0.extend_from_slice(&rtc.nvram);
    w.0
}

pub fn decode(bytes: &[u8]) -> Result<VmSnapshot, StateError> {
    let mut r = R(bytes);
    let version = r.u16("version")?;
    if !(STATE_VERSION_MIN..=STATE_VERSION).contains(&version) {
        return Err(StateError::Version(version));
    }
    let n = r.count("vCPU", crate::vmm::MAX_VCPUS)?;
    let vcpus = (0..n)
        .map(|_| get_vcpu(&mut r))
        .collect::<Result<Vec<_>, _>>()?;
    let kvm = KvmVmState {
        pic_master: r.raw("PIC")?,
        pic_slave: r.raw("PIC")?,
        ioapic: r.raw("IOAPIC")?,
        pit: r.raw("PIT")?,
        clock: r.raw("clock")?,
    };
    let serial = vm_superio::serial::SerialState {
        baud_divisor_low: r.u8("serial")?,
        baud_divisor_high: r.u8("serial")?,
        interrupt_enable: r.u8("serial")?,
        interrupt_identification: r.u8("serial")?,
        line_control: r.u8("serial")?,
        line_status: r.u8("serial")?,
        modem_control: r.u8("serial")?,
        modem_status: r.u8("serial")?,
        scratch: r.u8("serial")?,
        in_buffer: r.bytes("serial input")?,
    };
    let i8042 = I8042State {
        status: r.u8("i8042")?,
        ctr: r.u8("i8042")?,
        outp: r.u8("i8042")?,
        pending: {
            let some = r.bool("i8042")?;
            let v = r.u8("i8042")?;
            some.then_some(v)
        },
        buffer: r.bytes("i8042 buffer")?,
    };
    let n = r.count(
        "virtio device",
        crate::vmm::layout::MAX_VIRTIO_DEVICES as u32,
    )?;
    let mut virtio = Vec::with_capacity(n);
    for _ in 0..n {
        let mut m = MmioState {
            queue_select: r.u32("virtio")?,
            device_features_select: r.u32("virtio")?,
            driver_features_select: r.u32("virtio")?,
            acked_features: r.u64("virtio")?,
            status: r.u32("virtio")?,
            config_generation: r.u32("virtio")?,
            interrupt_status: r.u32("virtio")?,
            active: r.bool("virtio")?,
            queues: Vec::new(),
        };
        let q = r.count("virtio queue", 64)?;
        for _ in 0..q {
            m.queues.push(get_queue(&mut r)?);
        }
        virtio.push(m);
    }
    let rtc = if version >= 2 {
        RtcState {
            index: r.u8("RTC")?,
            offset_s: r.u64("RTC")? as i64,
            nvram: r.raw("RTC NVRAM")?,
        }
    } else {
        RtcState::default()
    };
    if !r.0.is_empty() {
        return Err(StateError::Trailing(r.0.len()));
    }
    Ok(VmSnapshot {
        vcpus,
        kvm,
        devices: DeviceStates {
            serial,
            i8042,
            rtc,
            virtio,
        },
        memory: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::{kvm_msr_entry, kvm_xsave};

    fn sample() -> VmSnapshot {
        let mut regs = kvm_bindings::kvm_regs {
            rip: 0x1234,
            rsp: 0x8000,
            ..Default::default()
        };
        regs.rflags = 0x202;
        let xsave = || {
            let mut x = kvm_xsave::default();
            x.region[7] = 0xdead_beef;
            Box::new(x)
        };
        let vcpu = |i: u64| VcpuState {
            regs: kvm_bindings::kvm_regs { rax: i, ..regs },
            sregs: Default::default(),
            xsave: xsave(),
            xcrs: Default::default(),
            debug_regs: Default::default(),
            lapic: Default::default(),
            msrs: vec![kvm_msr_entry {
                index: 0x10,
                data: 99 + i,
                ..Default::default()
            }],
            mp_state: Default::default(),
            events: Default::default(),
        };
        VmSnapshot {
            vcpus: vec![vcpu(0), vcpu(1)],
            kvm: KvmVmState {
                pic_master: Default::default(),
                pic_slave: Default::default(),
                ioapic: Default::default(),
                pit: Default::default(),
                clock: kvm_bindings::kvm_clock_data {
                    clock: 123_456,
                    ..Default::default()
                },
            },
            devices: DeviceStates {
                serial: vm_superio::serial::SerialState {
                    in_buffer: b"typed".to_vec(),
                    ..Default::default()
                },
                i8042: I8042State {
                    status: 1,
                    ctr: 2,
                    outp: 3,
                    pending: Some(4),
                    buffer: vec![5, 6],
                },
                rtc: {
                    let mut rtc = RtcState {
                        index: 0x0b,
                        offset_s: -3600,
                        ..Default::default()
                    };
                    rtc.nvram[0x40] = 0x77;
                    rtc
                },
                virtio: vec![MmioState {
                    queue_select: 0,
                    device_features_select: 1,
                    driver_features_select: 0,
                    acked_features: 1 << 32,
                    status: 15,
                    config_generation: 0,
                    interrupt_status: 1,
                    active: true,
                    queues: vec![QueueState {
                        max_size: 256,
                        next_avail: 7,
                        next_used: 7,
                        event_idx_enabled: true,
                        size: 128,
                        ready: true,
                        desc_table: 0x10_0000,
                        avail_ring: 0x10_1000,
                        used_ring: 0x10_2000,
                    }],
                }],
            },
            memory: Vec::new(),
        }
    }

    #[test]
    fn state_round_trips_field_for_field() {
        let bytes = encode(&sample());
        let back = decode(&bytes).unwrap();
        assert_eq!(encode(&back), bytes);
        assert_eq!(back.vcpus[1].regs.rax, 1);
        assert_eq!(back.vcpus[0].regs.rip, 0x1234);
        assert_eq!(back.vcpus[1].msrs[0].data, 100);
        assert_eq!(back.vcpus[0].xsave.region[7], 0xdead_beef);
        assert_eq!(back.kvm.clock.clock, 123_456);
        assert_eq!(back.devices.serial.in_buffer, b"typed");
        assert_eq!(back.devices.i8042.pending, Some(4));
        assert_eq!(back.devices.virtio[0].queues[0].used_ring, 0x10_2000);
        assert_eq!(back.devices.rtc, sample().devices.rtc);
    }

    #[test]
    fn a_version_1_state_decodes_with_a_fresh_rtc() {
        let v2 = encode(&sample());
        // Version 1 is version 2 without the RTC at the end.
        let mut v1 = v2[..v2.len() - (1 + 8 + 128)].to_vec();
        v1[..2].copy_from_slice(&1u16.to_le_bytes());
        let back = decode(&v1).unwrap();
        assert_eq!(back.devices.rtc, RtcState::default());
        assert_eq!(back.devices.i8042.pending, Some(4));
        // A version 2 blob cut before its RTC is damaged, not version 1.
        let mut cut = v2[..v1.len()].to_vec();
        cut[..2].copy_from_slice(&STATE_VERSION.to_le_bytes());
        assert!(matches!(decode(&cut), Err(StateError::Short { .. })));
    }

    #[test]
    fn damaged_state_is_an_error_not_a_panic() {
        let bytes = encode(&sample());
        for cut in [0, 1, 2, 100, bytes.len() / 2, bytes.len() - 1] {
            assert!(decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert_eq!(decode(&longer).err(), Some(StateError::Trailing(1)));
        let mut other = bytes;
        for v in [0, STATE_VERSION + 1, 9] {
            other[..2].copy_from_slice(&v.to_le_bytes());
            assert_eq!(decode(&other).err(), Some(StateError::Version(v)));
        }
    }
}
