//! A deterministic workload for crash tests: `storaged exercise` runs it against a volume
//! until it is killed, announcing every acknowledged flush and snapshot on stdout; the
//! test replays the same sequence to know what each block may hold after the crash.
//!
//! Every 512-byte block written carries who wrote it (`seed`, op index, block index) and a
//! CRC32, so a torn, misplaced or stale block is recognised for what it is.

pub const BLOCK: usize = 512;
const MAGIC: u32 = 0x7e57_b10c;
/// The process announces progress (`P <op>`) before every op whose index is a multiple of
/// this, so a verifier knows no op past the last announcement + this ran.
pub const PROGRESS_EVERY: u64 = 256;

/// splitmix64: small, fast and the same on every machine.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Write { block: u64, blocks: u64 },
    Discard { block: u64, blocks: u64 },
    Flush,
    Snapshot,
}

/// The sequence of steps for one seed on a volume of `blocks` 512-byte blocks.
#[derive(Debug, Clone)]
pub struct Workload {
    rng: Rng,
    blocks: u64,
    next_op: u64,
}

impl Workload {
    pub fn new(seed: u64, blocks: u64) -> Self {
        Workload {
            rng: Rng::new(seed),
            blocks,
            next_op: 0,
        }
    }

    /// The next op's index and step.
    pub fn next_step(&mut self) -> (u64, Step) {
        let op = self.next_op;
        self.next_op += 1;
        let r = &mut self.rng;
        let chunk_blocks = 128; // a 64 KiB chunk
        let step = match r.below(100) {
            0..=54 => {
                let blocks = 1 + r.below(64);
                let block = r.below(self.blocks - blocks + 1);
                Step::Write { block, blocks }
            }
            55..=69 => {
                // A whole, aligned chunk: the path that needs no copy.
                let block = r.below(self.blocks / chunk_blocks) * chunk_blocks;
                Step::Write {
                    block,
                    blocks: chunk_blocks,
                }
            }
            70..=93 => {
                let blocks = 1 + r.below(300);
                let block = r.below(self.blocks - blocks + 1);
                Step::Discard { block, blocks }
            }
            // Rare enough that many changes pile up between commits.
            94..=98 => Step::Flush,
            _ => Step::Snapshot,
        };
        (op, step)
    }
}

/// The content op `op` of workload `seed` writes into volume block `block`.
pub fn fill_block(seed: u64, op: u64, block: u64, out: &mut [u8]) {
    debug_assert_eq!(out.len(), BLOCK);
    out[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    out[4..12].copy_from_slice(&seed.to_le_bytes());
    out[12..20].copy_from_slice(&op.to_le_bytes());
    out[20..28].copy_from_slice(&block.to_le_bytes());
    let mut rng = Rng::new(seed ^ op.rotate_left(17) ^ block.rotate_left(41));
    for c in out[28..BLOCK - 4].chunks_mut(8) {
        let v = rng.next_u64().to_le_bytes();
        c.copy_from_slice(&v[..c.len()]);
    }
    let crc = crc32fast::hash(&out[..BLOCK - 4]);
    out[BLOCK - 4..].copy_from_slice(&crc.to_le_bytes());
}

/// Who wrote a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Writer {
    /// Never written, or discarded.
    Zero,
    Op {
        seed: u64,
        op: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("block {block} holds neither zeros nor a workload block")]
    Garbage { block: u64 },
    #[error("block {block} holds the content of block {found}")]
    Misplaced { block: u64, found: u64 },
    #[error("block {block} fails its checksum (torn or corrupted)")]
    Checksum { block: u64 },
}

/// Identifies the writer of the content of volume block `block`.
pub fn decode_block(block: u64, b: &[u8]) -> Result<Writer, DecodeError> {
    if b.iter().all(|&x| x == 0) {
        return Ok(Writer::Zero);
    }
    if b[0..4] != MAGIC.to_le_bytes() {
        return Err(DecodeError::Garbage { block });
    }
    let crc = u32::from_le_bytes(b[BLOCK - 4..].try_into().expect("4 bytes"));
    if crc32fast::hash(&b[..BLOCK - 4]) != crc {
        return Err(DecodeError::Checksum { block });
    }
    let field = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"));
    let found = field(20);
    if found != block {
        return Err(DecodeError::Misplaced { block, found });
    }
    let writer = Writer::Op {
        seed: field(4),
        op: field(12),
    };
    let mut expect = [0u8; BLOCK];
    if let Writer::Op { seed, op } = writer {
        fill_block(seed, op, block, &mut expect);
    }
    if expect != b {
        return Err(DecodeError::Checksum { block });
    }
    Ok(writer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_identify_their_writer() {
        let mut b = [0u8; BLOCK];
        assert_eq!(decode_block(3, &b), Ok(Writer::Zero));
        fill_block(9, 77, 3, &mut b);
        assert_eq!(decode_block(3, &b), Ok(Writer::Op { seed: 9, op: 77 }));
        assert_eq!(
            decode_block(4, &b),
            Err(DecodeError::Misplaced { block: 4, found: 3 })
        );
        b[100] ^= 1;
        assert_eq!(decode_block(3, &b), Err(DecodeError::Checksum { block: 3 }));
        assert_eq!(
            decode_block(3, &[1u8; BLOCK]),
            Err(DecodeError::Garbage { block: 3 })
        );
    }

    #[test]
    fn workload_is_deterministic_and_in_bounds() {
        let mut a = Workload::new(5, 8192);
        let mut b = Workload::new(5, 8192);
        for _ in 0..10_000 {
            let (i, s) = a.next_step();
            assert_eq!((i, s), b.next_step());
            if let Step::Write { block, blocks } | Step::Discard { block, blocks } = s {
                assert!(blocks > 0 && block + blocks <= 8192);
            }
        }
    }
}
