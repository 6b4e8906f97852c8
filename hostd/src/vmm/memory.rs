//! Guest memory: the RAM layout every VM gets, its KVM memory slots, and the dirty-page
//! tracking live migration reads.

use std::sync::Arc;

use kvm_bindings::{KVM_MEM_LOG_DIRTY_PAGES, kvm_userspace_memory_region};
use kvm_ioctls::VmFd;
use vm_memory::bitmap::{AtomicBitmap, Bitmap, NewBitmap, WithBitmapSlice};
use vm_memory::mmap::{FromRangesError, MmapRegion, MmapRegionBuilder, MmapRegionError};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap};

use super::{Vm, VmError, kvm_err, layout};

/// Guest memory, with a bitmap of the pages the VMM itself writes (device DMA), which
/// KVM's dirty log does not see; live migration reads both.
pub type GuestRam = vm_memory::GuestMemoryMmap<RamBitmap>;

/// Pages of one RAM region written since the last look: bit `i` of `bits` (word
/// `i / 64`, bit `i % 64`) is the page at `start + i * 4096`.
#[derive(Debug, Clone)]
pub struct DirtyRegion {
    pub start: u64,
    pub len: u64,
    pub bits: Vec<u64>,
}

impl DirtyRegion {
    pub fn count(&self) -> u64 {
        self.bits.iter().map(|w| u64::from(w.count_ones())).sum()
    }
}

/// Guest RAM mappings start on a 2 MiB boundary and are advised for transparent huge
/// pages, as QEMU's are: the host can then back the guest with 2 MiB pages and KVM map
/// them with 2 MiB entries, one fault where 512 were. A booting Linux guest touches tens
/// of megabytes, and under nested KVM each fault is a long trip.
const RAM_ALIGN: usize = 2 << 20;

/// How guest RAM is mapped: private, anonymous, not reserved up front.
const RAM_PROT: libc::c_int = libc::PROT_READ | libc::PROT_WRITE;
const RAM_FLAGS: libc::c_int = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;

/// One RAM region's anonymous mapping, unmapped with the last clone of its region.
#[derive(Debug)]
struct Mapping {
    addr: usize,
    len: usize,
}

impl Mapping {
    /// `len` bytes of private anonymous memory at a 2 MiB-aligned address.
    fn aligned(len: usize) -> std::io::Result<Mapping> {
        let span = len + RAM_ALIGN;
        // SAFETY: a new anonymous mapping at an address of the kernel's choosing.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), span, RAM_PROT, RAM_FLAGS, -1, 0) };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let start = p as usize;
        let addr = start.next_multiple_of(RAM_ALIGN);
        // SAFETY: both ranges are the ends of the mapping just made, outside [addr, addr + len).
        unsafe {
            if addr > start {
                libc::munmap(p, addr - start);
            }
            let end = addr + len;
            if start + span > end {
                libc::munmap(end as *mut libc::c_void, start + span - end);
            }
            // Advice only: a host without transparent huge pages maps 4 KiB pages.
            libc::madvise(addr as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
        }
        Ok(Mapping { addr, len })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping is this value's own, and no region refers to it any more.
        unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len) };
    }
}

/// A RAM region's dirty bits (pages the VMM wrote), and the mapping the region lies in
/// when hostd made it: vm-memory drops a region's bitmap after the region, so the
/// mapping goes when the last clone of the region does.
#[derive(Debug, Default)]
pub struct RamBitmap {
    dirty: AtomicBitmap,
    _mapping: Option<Arc<Mapping>>,
}

impl std::ops::Deref for RamBitmap {
    type Target = AtomicBitmap;

    fn deref(&self) -> &AtomicBitmap {
        &self.dirty
    }
}

impl<'a> WithBitmapSlice<'a> for RamBitmap {
    type S = <AtomicBitmap as WithBitmapSlice<'a>>::S;
}

impl Bitmap for RamBitmap {
    fn mark_dirty(&self, offset: usize, len: usize) {
        self.dirty.mark_dirty(offset, len)
    }

    fn dirty_at(&self, offset: usize) -> bool {
        self.dirty.dirty_at(offset)
    }

    fn slice_at(&self, offset: usize) -> <Self as WithBitmapSlice<'_>>::S {
        self.dirty.slice_at(offset)
    }
}

/// For regions vm-memory maps itself (`GuestRam::from_ranges`, in tests).
impl NewBitmap for RamBitmap {
    fn with_len(len: usize) -> Self {
        RamBitmap {
            dirty: AtomicBitmap::with_len(len),
            _mapping: None,
        }
    }
}

/// Guest RAM for `memory_bytes`, laid out as every VM's is (see [`layout::ram_regions`]).
pub fn new_guest_ram(memory_bytes: u64) -> Result<GuestRam, VmError> {
    let failed = |source| VmError::Memory {
        bytes: memory_bytes,
        source,
    };
    let mut regions = Vec::new();
    for (start, len) in layout::ram_regions(memory_bytes) {
        let len = len as usize;
        let mapping = Mapping::aligned(len).map_err(|e| failed(MmapRegionError::Mmap(e).into()))?;
        let addr = mapping.addr as *mut u8;
        let bitmap = RamBitmap {
            dirty: AtomicBitmap::with_len(len),
            _mapping: Some(Arc::new(mapping)),
        };
        // SAFETY: `addr` is the start of a mapping of `len` bytes that the region's
        // bitmap owns, so it lives as long as the region.
        let region = unsafe {
            MmapRegionBuilder::new_with_bitmap(len, bitmap)
                // Recorded only (the mapping is made): what the region says it is.
                .with_mmap_prot(RAM_PROT)
                .with_mmap_flags(RAM_FLAGS)
                .with_raw_mmap_pointer(addr)
        }
        .build()
        .map_err(|e| failed(e.into()))?;
        let region = GuestRegionMmap::new(region, GuestAddress(start))
            .ok_or_else(|| failed(FromRangesError::InvalidGuestRegion))?;
        regions.push(region);
    }
    GuestRam::from_regions(regions).map_err(|e| failed(e.into()))
}

/// (Re)registers each RAM region of `memory` as KVM memory slot `index` with `flags`.
pub(super) fn set_memory_slots(vm_fd: &VmFd, memory: &GuestRam, flags: u32) -> Result<(), VmError> {
    for (slot, region) in memory.iter().enumerate() {
        let host = memory
            .get_host_address(region.start_addr())
            .expect("a region's start is inside it");
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the mapping described by `r` belongs to `memory`, which the Vm owns
        // and keeps alive until after the VM fd (and so the memory slot) is closed.
        unsafe { vm_fd.set_user_memory_region(r) }
            .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
    }
    Ok(())
}

impl Vm {
    /// Turns KVM's dirty-page logging of guest RAM on or off, and clears the bitmap of
    /// pages the VMM wrote.
    pub fn set_dirty_logging(&self, on: bool) -> Result<(), VmError> {
        let flags = if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 };
        set_memory_slots(&self.vm_fd, &self.memory, flags)?;
        for region in self.memory.iter() {
            MmapRegion::bitmap(&**region).reset();
        }
        Ok(())
    }

    /// The pages written since the last call (or since logging was turned on), region
    /// by region: KVM's dirty log (the guest's writes) ORed with the VMM's own bitmap
    /// (device writes, which KVM does not see). Both are cleared.
    pub fn take_dirty_pages(&self) -> Result<Vec<DirtyRegion>, VmError> {
        let mut out = Vec::new();
        for (slot, region) in self.memory.iter().enumerate() {
            let mut bits = self
                .vm_fd
                .get_dirty_log(slot as u32, region.len() as usize)
                .map_err(kvm_err("KVM_GET_DIRTY_LOG"))?;
            let vmm = MmapRegion::bitmap(&**region).get_and_reset();
            for (k, v) in bits.iter_mut().zip(vmm) {
                *k |= v;
            }
            out.push(DirtyRegion {
                start: region.start_addr().0,
                len: region.len(),
                bits,
            });
        }
        Ok(out)
    }

    pub fn memory(&self) -> &GuestRam {
        &self.memory
    }

    pub fn memory_bytes(&self) -> u64 {
        self.memory_bytes
    }

    /// Guest RAM the host has backed so far (resident pages of the guest's mappings).
    pub fn guest_resident_bytes(&self) -> u64 {
        const CHUNK: usize = 1 << 30;
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
        let mut vec = vec![0u8; CHUNK / page];
        let mut resident = 0u64;
        for region in self.memory.iter() {
            let Ok(host) = self.memory.get_host_address(region.start_addr()) else {
                continue;
            };
            let len = region.len() as usize;
            let mut off = 0;
            while off < len {
                let n = CHUNK.min(len - off);
                // SAFETY: [host + off, host + off + n) lies inside this region's mapping,
                // which `self.memory` keeps mapped; `vec` has a byte for each of its pages.
                let r = unsafe { libc::mincore(host.add(off).cast(), n, vec.as_mut_ptr()) };
                if r == 0 {
                    let pages = n.div_ceil(page);
                    resident +=
                        vec[..pages].iter().filter(|b| *b & 1 == 1).count() as u64 * page as u64;
                }
                off += n;
            }
        }
        resident
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    /// The `/proc/self/smaps` entry of the mapping that starts at `addr`, if one does.
    fn smaps_entry(addr: usize) -> Option<String> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let head = format!("{addr:x}-");
        let at = smaps.lines().position(|l| l.starts_with(&head))?;
        let entry = smaps.lines().skip(at + 1).take_while(|l| {
            let first = l.split_whitespace().next().unwrap_or("");
            first.ends_with(':')
        });
        Some(entry.collect::<Vec<_>>().join("\n"))
    }

    #[test]
    fn ram_is_2_mib_aligned_advised_for_huge_pages_and_unmapped_with_its_last_clone() {
        // An odd size, so no other test's mapping lands where this one was.
        let ram = new_guest_ram(70 << 20).unwrap();
        let host = ram.get_host_address(GuestAddress(0)).unwrap() as usize;
        assert_eq!(host % RAM_ALIGN, 0, "{host:#x}");
        let entry = smaps_entry(host).expect("the RAM's mapping");
        let flags = entry.lines().find(|l| l.starts_with("VmFlags:")).unwrap();
        assert!(flags.split_whitespace().any(|f| f == "hg"), "{flags}");

        let clone = ram.clone();
        drop(ram);
        clone.write_obj(0x5a5a_u16, GuestAddress(0x1000)).unwrap();
        assert_eq!(clone.read_obj::<u16>(GuestAddress(0x1000)).unwrap(), 0x5a5a);
        drop(clone);
        assert!(smaps_entry(host).is_none(), "unmapped with the last clone");
    }
}
