//! Port-I/O and MMIO dispatch: an address range per device, looked up on every exit.
//!
//! The bus is built before the vCPUs start and never changes while they run, so lookups
//! take no lock on the bus itself; each device has its own mutex, held only for the one
//! access.

use std::sync::{Arc, Mutex};

/// A device on a bus. Offsets are relative to the start of the device's range.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("bus range {base:#x}+{len:#x} is empty or wraps around")]
    BadRange { base: u64, len: u64 },
    #[error("bus range {base:#x}+{len:#x} overlaps the device at {other:#x}")]
    Overlap { base: u64, len: u64, other: u64 },
}

struct Entry {
    base: u64,
    len: u64,
    /// Added to the offset within the range: a device can own two separate ranges
    /// (the i8042 at 0x60 and 0x64) and still see its own register offsets.
    device_offset: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

#[derive(Default)]
pub struct Bus {
    entries: Vec<Entry>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(
        &mut self,
        base: u64,
        len: u64,
        device: Arc<Mutex<dyn BusDevice>>,
    ) -> Result<(), BusError> {
        self.insert_at_offset(base, len, device, 0)
    }

    /// Like [`Bus::insert`], with the device seeing offsets from `device_offset` on.
    pub fn insert_at_offset(
        &mut self,
        base: u64,
        len: u64,
        device: Arc<Mutex<dyn BusDevice>>,
        device_offset: u64,
    ) -> Result<(), BusError> {
        if len == 0 || base.checked_add(len).is_none() {
            return Err(BusError::BadRange { base, len });
        }
        if let Some(other) = self
            .entries
            .iter()
            .find(|e| base < e.base + e.len && e.base < base + len)
        {
            return Err(BusError::Overlap {
                base,
                len,
                other: other.base,
            });
        }
        let at = self.entries.partition_point(|e| e.base < base);
        self.entries.insert(
            at,
            Entry {
                base,
                len,
                device_offset,
                device,
            },
        );
        Ok(())
    }

    fn find(&self, addr: u64, size: usize) -> Option<(&Entry, u64)> {
        let at = self.entries.partition_point(|e| e.base <= addr);
        let entry = self.entries.get(at.checked_sub(1)?)?;
        let offset = addr - entry.base;
        (offset + size as u64 <= entry.len).then_some((entry, offset + entry.device_offset))
    }

    /// Reads from the device at `addr`; false when no device covers the access.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((entry, offset)) => {
                lock(&entry.device).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Writes to the device at `addr`; false when no device covers the access.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((entry, offset)) => {
                lock(&entry.device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device. A device whose lock was poisoned panicked mid-access on another vCPU
/// thread; its state is still memory-safe, and the VM is being torn down by then, so the
/// access goes on rather than cascading the panic.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_by_range_with_relative_offsets() {
        let a = Arc::new(Mutex::new(Recorder::default()));
        let b = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = Bus::new();
        bus.insert(0x3f8, 8, a.clone()).unwrap();
        bus.insert(0x60, 5, b.clone()).unwrap();
        assert!(bus.write(0x3f9, &[7]));
        assert!(bus.write(0x64, &[0xfe]));
        let mut d = [0u8; 1];
        assert!(bus.read(0x3fd, &mut d));
        assert_eq!(d, [5]);
        assert_eq!(a.lock().unwrap().writes, vec![(1, vec![7])]);
        assert_eq!(b.lock().unwrap().writes, vec![(4, vec![0xfe])]);
    }

    #[test]
    fn one_device_can_own_two_ranges() {
        let d = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = Bus::new();
        bus.insert(0x60, 1, d.clone()).unwrap();
        bus.insert_at_offset(0x64, 1, d.clone(), 4).unwrap();
        bus.insert(0x61, 1, Arc::new(Mutex::new(Recorder::default())))
            .unwrap();
        assert!(bus.write(0x64, &[0xfe]));
        assert!(bus.write(0x60, &[1]));
        assert_eq!(
            d.lock().unwrap().writes,
            vec![(4, vec![0xfe]), (0, vec![1])]
        );
    }

    #[test]
    fn misses_and_straddling_accesses_are_not_dispatched() {
        let mut bus = Bus::new();
        bus.insert(0x1000, 0x100, Arc::new(Mutex::new(Recorder::default())))
            .unwrap();
        let mut d = [0u8; 4];
        assert!(!bus.read(0xfff, &mut d[..1]));
        assert!(!bus.read(0x10fe, &mut d));
        assert!(!bus.write(0x1100, &[1]));
        assert!(bus.read(0x10fc, &mut d));
    }

    #[test]
    fn overlapping_and_empty_ranges_are_refused() {
        let mut bus = Bus::new();
        let dev = || Arc::new(Mutex::new(Recorder::default()));
        bus.insert(0x100, 0x10, dev()).unwrap();
        assert_eq!(
            bus.insert(0x108, 0x10, dev()),
            Err(BusError::Overlap {
                base: 0x108,
                len: 0x10,
                other: 0x100
            })
        );
        assert!(matches!(
            bus.insert(0x200, 0, dev()),
            Err(BusError::BadRange { .. })
        ));
        assert!(matches!(
            bus.insert(u64::MAX, 2, dev()),
            Err(BusError::BadRange { .. })
        ));
        bus.insert(0x110, 0x10, dev()).unwrap();
    }
}
