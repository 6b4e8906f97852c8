//! What a migration source sends after Accept, taken into guest memory: the input is a
//! stream of frames (`wire::decode`) that `migration::receive::Apply` applies, as the
//! destination does, to a small fresh guest memory with a hole between its two regions,
//! until a frame is refused or the saved state arrives.
//!
//! Besides "no panic" (integer overflow included: `-a` turns on debug assertions):
//! a Pages or Zero frame is taken exactly when its whole range lies in one region of RAM,
//! by 128-bit arithmetic here that cannot wrap, and a refused one changes no page; a
//! taken frame writes no page outside its range (the memory's dirty bitmap tells), and
//! afterwards its range holds the pages it carried, or zeros. A Delta frame is taken
//! exactly when all its pages lie in RAM, writes only those, and leaves each byte it
//! names as its last run says; a refused one changes nothing.
#![no_main]

use hostd::migration::MigrationError;
use hostd::migration::receive::{Applied, Apply};
use hostd::migration::wire::{self, Frame};
use hostd::vmm::GuestRam;
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MmapRegion};

const KIB: u64 = 1 << 10;
const PAGE: u64 = wire::PAGE as u64;
/// Two regions of RAM with a hole between them, as below and above the 32-bit PCI hole
/// of a real guest, at a size that keeps each run fast.
const RAM: [(u64, u64); 2] = [(0, 512 * KIB), (1024 * KIB, 512 * KIB)];

/// Whether `pages` pages from `gpa` lie all in one region (never wraps: 128 bits).
fn in_ram(gpa: u64, pages: u64) -> bool {
    let (start, len) = (u128::from(gpa), u128::from(pages) * u128::from(PAGE));
    len == 0
        || RAM
            .iter()
            .any(|&(s, l)| start >= u128::from(s) && start + len <= u128::from(s) + u128::from(l))
}

/// The guest-physical pages the VMM's dirty bitmap says were written, then clears it.
fn dirty_pages(memory: &GuestRam) -> Vec<u64> {
    let mut out = Vec::new();
    for region in memory.iter() {
        let bitmap = MmapRegion::bitmap(&**region);
        let start = region.start_addr().0;
        for off in (0..region.len()).step_by(PAGE as usize) {
            if bitmap.is_addr_set(off as usize) {
                out.push((start + off) / PAGE);
            }
        }
        bitmap.reset();
    }
    out
}

fn assert_holds(memory: &GuestRam, gpa: u64, want: &[u8]) {
    let mut got = vec![0u8; want.len()];
    memory
        .read_slice(&mut got, GuestAddress(gpa))
        .expect("a range that was taken reads back");
    assert!(
        got == want,
        "{} bytes at {gpa:#x} differ from what was taken",
        want.len()
    );
}

fuzz_target!(|data: &[u8]| {
    let ranges: Vec<_> = RAM
        .iter()
        .map(|&(s, l)| (GuestAddress(s), l as usize))
        .collect();
    let memory = GuestRam::from_ranges(&ranges).expect("guest memory");
    let mut apply = Apply::new(&memory, wire::VERSION);
    let mut rest = data;
    while let Ok(Some((frame, n))) = wire::decode(rest) {
        rest = &rest[n..];
        // The range a memory frame claims, and what it must hold once taken.
        let claim = match &frame {
            Frame::Pages { gpa, data } => {
                Some((*gpa, (data.len() / wire::PAGE) as u64, Some(data.clone())))
            }
            Frame::Zero { gpa, pages } => Some((*gpa, u64::from(*pages), None)),
            _ => None,
        };
        if let Frame::Delta { data } = &frame {
            let runs: Vec<_> = wire::delta_runs(data).map(|r| r.expect("decoded")).collect();
            let result = apply.frame(frame.clone());
            let dirty = dirty_pages(&memory);
            if runs.iter().all(|r| in_ram(r.gpa, 1)) {
                assert!(matches!(result, Ok(Applied::Memory)), "{result:?}");
                assert!(
                    dirty.iter().all(|p| runs.iter().any(|r| r.gpa / PAGE == *p)),
                    "a delta wrote pages {dirty:?} outside its entries"
                );
                // The last run over each byte is what it holds.
                let mut want = std::collections::HashMap::new();
                for r in &runs {
                    for (i, b) in r.bytes.iter().enumerate() {
                        want.insert(r.gpa + (r.offset + i) as u64, *b);
                    }
                }
                for (at, b) in want {
                    assert_holds(&memory, at, &[b]);
                }
                continue;
            }
            assert!(
                matches!(result, Err(MigrationError::OutsideMemory { .. })),
                "{result:?}"
            );
            assert!(dirty.is_empty(), "a refused delta wrote {dirty:?}");
            return;
        }
        let result = apply.frame(frame);
        let dirty = dirty_pages(&memory);
        let Some((gpa, pages, carried)) = claim else {
            assert!(dirty.is_empty(), "a frame without pages wrote {dirty:?}");
            match result {
                Ok(Applied::Sync) => continue,
                Ok(Applied::State(_)) | Err(_) => return,
                Ok(Applied::Memory) => panic!("a frame without pages applied as memory"),
            }
        };
        match result {
            Ok(Applied::Memory) => {
                assert!(
                    in_ram(gpa, pages),
                    "took {pages} pages at {gpa:#x}: not all RAM"
                );
                let first = gpa / PAGE;
                assert!(
                    dirty.iter().all(|p| (first..first + pages).contains(p)),
                    "{pages} pages at {gpa:#x} wrote pages {dirty:?}"
                );
                match carried {
                    Some(d) => {
                        assert_eq!(dirty.len() as u64, pages, "Pages frame not all written");
                        assert_holds(&memory, gpa, &d);
                    }
                    None => assert_holds(&memory, gpa, &vec![0; (pages * PAGE) as usize]),
                }
            }
            Err(MigrationError::OutsideMemory {
                gpa: g, pages: p, ..
            }) => {
                assert_eq!((g, p), (gpa, pages));
                assert!(
                    !in_ram(gpa, pages),
                    "refused {pages} pages at {gpa:#x}, all RAM"
                );
                assert!(dirty.is_empty(), "a refused frame wrote {dirty:?}");
                return;
            }
            other => panic!("{pages} pages at {gpa:#x}: {other:?}"),
        }
    }
});
