//! May a guest that runs here go on running there? The guest has read its CPUID already
//! and may use any feature it saw, so the destination must offer every feature bit the
//! source's guest table has, in the leaves that announce instruction-set features, and
//! the same vendor. Checked before a single page moves.

use crate::vmm::CpuidRegs;

/// (leaf, subleaf, register, bits that may differ) for every feature word compared.
/// Leaf 1 ECX: OSXSAVE (27) follows the guest's CR4 and HYPERVISOR (31) is ours;
/// leaf 1 EDX: HTT (28) follows the vCPU count.
const FEATURE_WORDS: &[(u32, u32, Reg, u32)] = &[
    (1, 0, Reg::Ecx, (1 << 27) | (1 << 31)),
    (1, 0, Reg::Edx, 1 << 28),
    (7, 0, Reg::Ebx, 0),
    (7, 0, Reg::Ecx, 1 << 22), // OSPKE follows CR4 too
    (7, 0, Reg::Edx, 0),
    (7, 1, Reg::Eax, 0),
    (0xd, 1, Reg::Eax, 0),
    (0x8000_0001, 0, Reg::Ecx, 0),
    (0x8000_0001, 0, Reg::Edx, 0),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reg {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

impl Reg {
    fn of(self, e: &CpuidRegs) -> u32 {
        match self {
            Reg::Eax => e.eax,
            Reg::Ebx => e.ebx,
            Reg::Ecx => e.ecx,
            Reg::Edx => e.edx,
        }
    }
}

fn leaf(table: &[CpuidRegs], function: u32, index: u32) -> CpuidRegs {
    table
        .iter()
        .find(|e| e.function == function && e.index == index)
        .copied()
        .unwrap_or(CpuidRegs {
            function,
            index,
            ..Default::default()
        })
}

fn vendor(table: &[CpuidRegs]) -> String {
    let l = leaf(table, 0, 0);
    let mut b = Vec::with_capacity(12);
    for r in [l.ebx, l.edx, l.ecx] {
        b.extend_from_slice(&r.to_le_bytes());
    }
    String::from_utf8_lossy(&b).into_owned()
}

/// What `local` lacks of `source`, for people ("leaf 0x7.0 ebx bits 0x20"); empty when
/// the guest may move.
pub fn missing(source: &[CpuidRegs], local: &[CpuidRegs]) -> Vec<String> {
    let mut out = Vec::new();
    let (sv, lv) = (vendor(source), vendor(local));
    if sv != lv {
        out.push(format!("CPU vendor {sv:?} here is {lv:?}"));
    }
    for &(f, i, reg, ignore) in FEATURE_WORDS {
        let want = reg.of(&leaf(source, f, i)) & !ignore;
        let have = reg.of(&leaf(local, f, i));
        let lacking = want & !have;
        if lacking != 0 {
            out.push(format!(
                "leaf {f:#x}.{i} {} bits {lacking:#x}",
                format!("{reg:?}").to_lowercase()
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(vendor: &[u8; 12], l1_ecx: u32, l7_ebx: u32) -> Vec<CpuidRegs> {
        let w = |i: usize| u32::from_le_bytes(vendor[i..i + 4].try_into().unwrap());
        vec![
            CpuidRegs {
                function: 0,
                index: 0,
                eax: 0xd,
                ebx: w(0),
                edx: w(4),
                ecx: w(8),
            },
            CpuidRegs {
                function: 1,
                ecx: l1_ecx,
                ..Default::default()
            },
            CpuidRegs {
                function: 7,
                ebx: l7_ebx,
                ..Default::default()
            },
        ]
    }

    #[test]
    fn feature_checks() {
        let intel = b"GenuineIntel";
        // (source, destination, what must be reported)
        let cases: &[(Vec<CpuidRegs>, Vec<CpuidRegs>, &[&str])] = &[
            (table(intel, 0x5, 0x20), table(intel, 0x5, 0x20), &[]),
            // More on the destination is fine.
            (table(intel, 0x1, 0x20), table(intel, 0x7, 0x2f), &[]),
            // AVX2 (leaf 7 ebx bit 5) missing.
            (
                table(intel, 0x5, 0x20),
                table(intel, 0x5, 0),
                &["leaf 0x7.0 ebx bits 0x20"],
            ),
            // OSXSAVE and the hypervisor bit are not features to require.
            (
                table(intel, (1 << 27) | (1 << 31), 0),
                table(intel, 0, 0),
                &[],
            ),
            (
                table(intel, 0, 0),
                table(b"AuthenticAMD", 0, 0),
                &["CPU vendor \"GenuineIntel\" here is \"AuthenticAMD\""],
            ),
        ];
        for (src, dst, want) in cases {
            assert_eq!(missing(src, dst), *want, "{src:?} -> {dst:?}");
        }
    }
}
