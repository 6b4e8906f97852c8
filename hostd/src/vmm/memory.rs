//! Guest memory: the RAM layout every VM gets, its KVM memory slots, and the dirty-page
//! tracking live migration reads.

use kvm_bindings::{KVM_MEM_LOG_DIRTY_PAGES, kvm_userspace_memory_region};
use kvm_ioctls::VmFd;
use vm_memory::mmap::MmapRegion;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::{Vm, VmError, kvm_err, layout};

/// Guest memory, with a bitmap of the pages the VMM itself writes (device DMA), which
/// KVM's dirty log does not see; live migration reads both.
pub type GuestRam = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;

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

/// Guest RAM for `memory_bytes`, laid out as every VM's is (see [`layout::ram_regions`]).
pub fn new_guest_ram(memory_bytes: u64) -> Result<GuestRam, VmError> {
    let regions: Vec<(GuestAddress, usize)> = layout::ram_regions(memory_bytes)
        .into_iter()
        .map(|(start, len)| (GuestAddress(start), len as usize))
        .collect();
    GuestRam::from_ranges(&regions).map_err(|source| VmError::Memory {
        bytes: memory_bytes,
        source,
    })
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
