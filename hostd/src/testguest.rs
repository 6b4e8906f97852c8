//! The test guest (`guest/` at the repository root), built by this crate's build script,
//! and the host side of its conventions: the disk pattern and the heartbeat checksum.
//!
//! The guest's own README lists its command-line words and output lines.

use std::path::Path;

/// The guest ELF this build produced.
pub const ELF_PATH: &str = env!("HOSTD_GUEST_ELF");

/// The guest ELF, embedded, for `hostd guest-elf` on machines without the build tree.
pub static ELF: &[u8] = include_bytes!(env!("HOSTD_GUEST_ELF"));

pub fn elf_path() -> &'static Path {
    Path::new(ELF_PATH)
}

/// The guest's PRNG finaliser (splitmix64's mixing step).
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The 8-byte word at byte offset `8 * index` of disk number `disk` (its place among the
/// VM's disks) after the guest wrote its pattern with `seed`.
pub fn pattern_word(seed: u64, disk: u64, index: u64) -> u64 {
    mix64(seed.wrapping_add(disk) ^ index.wrapping_mul(0xd1b5_4a32_d192_ed03))
}

/// Checks `bytes`, read from byte offset `offset` of disk `disk`, against the pattern;
/// returns the byte offset of the first difference.
pub fn check_pattern(seed: u64, disk: u64, offset: u64, bytes: &[u8]) -> Result<(), u64> {
    assert!(
        offset.is_multiple_of(8) && bytes.len().is_multiple_of(8),
        "pattern words are 8-byte aligned"
    );
    for (i, w) in bytes.chunks_exact(8).enumerate() {
        let at = offset + i as u64 * 8;
        if u64::from_le_bytes(w.try_into().unwrap()) != pattern_word(seed, disk, at / 8) {
            return Err(at);
        }
    }
    Ok(())
}

/// The checksum a healthy guest prints with heartbeat `seq`.
pub fn heartbeat_sum(seed: u64, seq: u64) -> u64 {
    (1..=seq).fold(seed, |sum, n| {
        mix64(sum ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15))
    })
}

/// One "HB ..." line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heartbeat {
    pub seq: u64,
    pub ms: u64,
    pub sum: u64,
    pub writes: u64,
    pub bad: u64,
}

/// Every complete heartbeat line in `console`, in order (a line still being printed is
/// left out).
pub fn heartbeats(console: &str) -> Vec<Heartbeat> {
    console
        .split_inclusive('\n')
        .filter_map(|l| l.strip_suffix('\n'))
        .filter_map(|l| l.strip_prefix("HB "))
        .filter_map(|rest| {
            let field = |k: &str, hex: bool| {
                rest.split_whitespace()
                    .find_map(|w| w.strip_prefix(k)?.strip_prefix('='))
                    .and_then(|v| {
                        if hex {
                            u64::from_str_radix(v, 16).ok()
                        } else {
                            v.parse().ok()
                        }
                    })
            };
            Some(Heartbeat {
                seq: field("seq", false)?,
                ms: field("ms", false)?,
                sum: field("sum", true)?,
                writes: field("writes", false)?,
                bad: field("bad", false)?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guest_elf_was_built_with_a_pvh_note() {
        assert!(ELF.starts_with(b"\x7fELF"));
        let xen = ELF.windows(4).any(|w| w == b"Xen\0");
        assert!(xen, "PVH note name present");
    }

    #[test]
    fn mix_matches_the_reference_splitmix_outputs() {
        // splitmix64 with state 0: first output is mix64(0x9e3779b97f4a7c15).
        assert_eq!(mix64(0x9e37_79b9_7f4a_7c15), 0xe220_a839_7b1d_cdaf);
    }

    #[test]
    fn heartbeat_lines_parse_and_sums_chain() {
        let s1 = heartbeat_sum(7, 1);
        let text = format!(
            "noise\nHB seq=1 ms=100 sum={s1:016x} writes=5 bad=0\nHB seq=x\nHB seq=2 ms=200 sum=12 writes=1 bad=0"
        );
        let hb = heartbeats(&text);
        assert_eq!(
            hb.len(),
            1,
            "the unfinished last line is not a heartbeat yet"
        );
        assert_eq!(hb[0].sum, s1);
        assert_eq!(
            heartbeat_sum(7, 2),
            mix64(s1 ^ 2u64.wrapping_mul(0x9e37_79b9_7f4a_7c15))
        );
        assert_eq!(heartbeat_sum(7, 0), 7);
    }

    #[test]
    fn pattern_check_reports_the_first_bad_offset() {
        let mut bytes: Vec<u8> = (0..4)
            .flat_map(|i| pattern_word(3, 1, 10 + i).to_le_bytes())
            .collect();
        assert_eq!(check_pattern(3, 1, 80, &bytes), Ok(()));
        bytes[17] ^= 1;
        assert_eq!(check_pattern(3, 1, 80, &bytes), Err(96));
    }
}
