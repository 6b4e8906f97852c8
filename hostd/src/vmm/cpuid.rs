//! The CPUID a guest sees: what KVM supports on this host (plus the TSC-deadline timer,
//! which KVM emulates but older kernels leave out of the table), with the per-vCPU topology
//! filled in, the performance-monitoring and power leaves removed, the TSC frequency
//! published in the hypervisor timing leaf, and an optional pool-wide mask applied so a
//! VM sees the same features on every host it may move to.

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES, kvm_cpuid_entry2};
use kvm_ioctls::{Cap, Kvm};

/// One CPUID leaf's registers, as the pool stores masks and reports host CPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CpuidRegs {
    pub function: u32,
    pub index: u32,
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

impl From<&kvm_cpuid_entry2> for CpuidRegs {
    fn from(e: &kvm_cpuid_entry2) -> Self {
        Self {
            function: e.function,
            index: e.index,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CpuidError {
    #[error("cannot read the CPUID KVM supports")]
    Supported(#[source] kvm_ioctls::Error),
    #[error("CPUID table has too many entries")]
    TooMany,
}

const LEAF_FEATURES: u32 = 1;
const LEAF_THERMAL: u32 = 6;
const LEAF_PMU: u32 = 0xa;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_HYPERVISOR: u32 = 0x4000_0000;
const LEAF_HYPERVISOR_TIMING: u32 = 0x4000_0010;
const LEAF_AMD_EXT_APIC: u32 = 0x8000_001e;

/// Leaf 1 ECX bit 24: the LAPIC timer has TSC-deadline mode.
const ECX_TSC_DEADLINE: u32 = 1 << 24;
/// Leaf 1 ECX bit 31: running under a hypervisor.
const ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 EDX bit 28: more than one logical processor per package.
const EDX_HTT: u32 = 1 << 28;
/// Leaf 6 EAX bit 2: the APIC timer keeps running in deep C-states.
const EAX_ARAT: u32 = 1 << 2;
/// Frequency of KVM's emulated APIC bus, in kHz, for the timing leaf.
const APIC_BUS_KHZ: u32 = 1_000_000;

/// What KVM on this host can give guests, unfiltered.
pub fn supported(kvm: &Kvm) -> Result<Vec<kvm_cpuid_entry2>, CpuidError> {
    let mut entries = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(CpuidError::Supported)?
        .as_slice()
        .to_vec();
    add_tsc_deadline(&mut entries, kvm.check_extension(Cap::TscDeadlineTimer));
    Ok(entries)
}

/// KVM emulates the TSC-deadline timer wherever it has the capability, but only kernels
/// from the end of 2024 on list it in KVM_GET_SUPPORTED_CPUID. Without it Linux
/// calibrates its LAPIC timer against other clocks, slowly and sensitive to timing.
fn add_tsc_deadline(entries: &mut [kvm_cpuid_entry2], available: bool) {
    if !available {
        return;
    }
    for e in entries.iter_mut().filter(|e| e.function == LEAF_FEATURES) {
        e.ecx |= ECX_TSC_DEADLINE;
    }
}

/// The table for vCPU `index` of `count`. `tsc_khz` goes in the timing leaf when known.
pub fn for_vcpu(
    supported: &[kvm_cpuid_entry2],
    index: u32,
    count: u32,
    tsc_khz: Option<u32>,
    mask: &[CpuidRegs],
) -> Result<CpuId, CpuidError> {
    let mut entries: Vec<kvm_cpuid_entry2> = supported.to_vec();
    let mut has_hypervisor_leaf = false;
    for e in entries.iter_mut() {
        match e.function {
            LEAF_FEATURES => {
                e.ebx = (e.ebx & 0x0000_ffff) | (index << 24) | (count.min(255) << 16);
                e.ecx |= ECX_HYPERVISOR;
                if count > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            LEAF_THERMAL => {
                e.eax &= EAX_ARAT;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            LEAF_PMU => {
                // No guest performance counters: they differ between hosts and do not
                // migrate.
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => e.edx = index,
            LEAF_AMD_EXT_APIC => e.eax = index,
            LEAF_HYPERVISOR => {
                has_hypervisor_leaf = true;
                if tsc_khz.is_some() {
                    e.eax = e.eax.max(LEAF_HYPERVISOR_TIMING);
                }
            }
            _ => {}
        }
    }
    if let (true, Some(khz)) = (has_hypervisor_leaf, tsc_khz)
        && !entries.iter().any(|e| e.function == LEAF_HYPERVISOR_TIMING)
    {
        entries.push(kvm_cpuid_entry2 {
            function: LEAF_HYPERVISOR_TIMING,
            eax: khz,
            ebx: APIC_BUS_KHZ,
            ..Default::default()
        });
    }
    apply_mask(&mut entries, mask);
    CpuId::from_entries(&entries).map_err(|_| CpuidError::TooMany)
}

/// ANDs each leaf named in `mask` with the mask's registers: a feature stays only if both
/// the host and the pool's mask have it. Leaves the mask does not name are left alone.
pub fn apply_mask(entries: &mut [kvm_cpuid_entry2], mask: &[CpuidRegs]) {
    for m in mask {
        for e in entries
            .iter_mut()
            .filter(|e| e.function == m.function && e.index == m.index)
        {
            e.eax &= m.eax;
            e.ebx &= m.ebx;
            e.ecx &= m.ecx;
            e.edx &= m.edx;
        }
    }
}

/// The mask a pool would use for a set of hosts: per leaf, the features all of them have.
pub fn intersect(hosts: &[Vec<CpuidRegs>]) -> Vec<CpuidRegs> {
    let Some((first, rest)) = hosts.split_first() else {
        return Vec::new();
    };
    first
        .iter()
        .filter_map(|leaf| {
            let mut out = *leaf;
            for other in rest {
                let o = other
                    .iter()
                    .find(|o| o.function == leaf.function && o.index == leaf.index)?;
                out.eax &= o.eax;
                out.ebx &= o.ebx;
                out.ecx &= o.ecx;
                out.edx &= o.edx;
            }
            Some(out)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, eax: u32, ebx: u32, ecx: u32, edx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    fn find(c: &CpuId, function: u32) -> kvm_cpuid_entry2 {
        *c.as_slice()
            .iter()
            .find(|e| e.function == function)
            .unwrap()
    }

    #[test]
    fn tsc_deadline_is_added_only_when_kvm_has_the_capability() {
        let host = [leaf(1, 0xa10f11, 0, 0x0000_2001, 0), leaf(7, 0, 0, 0, 0)];
        let mut with = host;
        add_tsc_deadline(&mut with, true);
        assert_eq!(with[0].ecx, 0x0000_2001 | ECX_TSC_DEADLINE);
        assert_eq!(with[1].ecx, 0, "only leaf 1");
        let mut without = host;
        add_tsc_deadline(&mut without, false);
        assert_eq!(without[0].ecx, 0x0000_2001);
        // It reaches every vCPU's table.
        let c = for_vcpu(&with, 1, 2, None, &[]).unwrap();
        assert_ne!(find(&c, 1).ecx & ECX_TSC_DEADLINE, 0);
    }

    #[test]
    fn topology_and_hypervisor_bits_are_per_vcpu() {
        let host = [
            leaf(1, 0xa10f11, 0xffff_0800, 0x0000_2000, EDX_HTT),
            leaf(0xb, 0, 0, 0, 7),
        ];
        let c = for_vcpu(&host, 3, 4, None, &[]).unwrap();
        let l1 = find(&c, 1);
        assert_eq!(l1.ebx >> 24, 3, "APIC id");
        assert_eq!((l1.ebx >> 16) & 0xff, 4, "logical processors");
        assert_eq!(l1.ebx & 0xffff, 0x0800, "clflush size kept");
        assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
        assert_eq!(find(&c, 0xb).edx, 3);
        let single = for_vcpu(&host, 0, 1, None, &[]).unwrap();
        assert_eq!(find(&single, 1).edx & EDX_HTT, 0);
    }

    #[test]
    fn pmu_is_hidden_and_tsc_frequency_is_published() {
        let host = [
            leaf(0xa, 0x0803_0802, 1, 2, 3),
            leaf(LEAF_HYPERVISOR, 0x4000_0001, 0x4b4d564b, 0x564b4d56, 0x4d),
        ];
        let c = for_vcpu(&host, 0, 1, Some(2_450_000), &[]).unwrap();
        assert_eq!(find(&c, 0xa), leaf(0xa, 0, 0, 0, 0));
        assert_eq!(find(&c, LEAF_HYPERVISOR).eax, LEAF_HYPERVISOR_TIMING);
        let t = find(&c, LEAF_HYPERVISOR_TIMING);
        assert_eq!((t.eax, t.ebx), (2_450_000, APIC_BUS_KHZ));
        // No timing leaf without a known frequency.
        let c = for_vcpu(&host, 0, 1, None, &[]).unwrap();
        assert!(
            !c.as_slice()
                .iter()
                .any(|e| e.function == LEAF_HYPERVISOR_TIMING)
        );
    }

    #[test]
    fn mask_removes_features_only_from_the_leaves_it_names() {
        let mut entries = vec![leaf(7, 1, 0b1111, 0b1010, 0), leaf(0x8000_0001, 5, 6, 7, 8)];
        apply_mask(
            &mut entries,
            &[CpuidRegs {
                function: 7,
                index: 0,
                eax: u32::MAX,
                ebx: 0b0101,
                ecx: u32::MAX,
                edx: u32::MAX,
            }],
        );
        assert_eq!(entries[0].ebx, 0b0101);
        assert_eq!(entries[0].ecx, 0b1010);
        assert_eq!(entries[1], leaf(0x8000_0001, 5, 6, 7, 8));
    }

    #[test]
    fn intersection_keeps_common_features_and_common_leaves() {
        let r = |function, ebx| CpuidRegs {
            function,
            ebx,
            ..Default::default()
        };
        let a = vec![r(7, 0b1110), r(0xd, 1)];
        let b = vec![r(7, 0b0111)];
        assert_eq!(intersect(&[a, b]), vec![r(7, 0b0110)]);
        assert!(intersect(&[]).is_empty());
    }
}
