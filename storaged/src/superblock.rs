//! The superblock at the start of a pool's device: what pool this is, its chunk size,
//! where its data area starts and where its metadata lives. Two copies (at 0 and 4 KiB),
//! each with a CRC32, so a torn write of one never loses the pool, and a device that is
//! not ours is never taken for a pool.
//!
//! Layout (little-endian), 4096 bytes per copy:
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `POOLTHIN` |
//! | 8 | 4 | format version |
//! | 12 | 4 | flags (0) |
//! | 16 | 16 | pool id (UUID) |
//! | 32 | 4 | chunk size in bytes |
//! | 36 | 4 | reserved (0) |
//! | 40 | 8 | data area offset in bytes |
//! | 48 | 8 | created at (Unix seconds) |
//! | 56 | 8 | generation (bumped on every write) |
//! | 64 | 2 + 126 | pool name (length, UTF-8 bytes) |
//! | 192 | 2 + 2048 | metadata directory (length, UTF-8 path) |
//! | 4092 | 4 | CRC32 of bytes 0..4092 |

use std::path::PathBuf;

use uuid::Uuid;

pub const MAGIC: [u8; 8] = *b"POOLTHIN";
pub const VERSION: u32 = 1;
/// Versions this code reads.
pub const VERSIONS_ACCEPTED: std::ops::RangeInclusive<u32> = 1..=1;
pub const SIZE: usize = 4096;
/// Byte offsets of the two copies.
pub const COPIES: [u64; 2] = [0, 4096];
/// Where the data area starts: 1 MiB, aligned for every chunk size.
pub const DATA_OFFSET: u64 = 1 << 20;
const NAME_MAX: usize = 126;
const PATH_MAX: usize = 2048;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    pub pool_id: Uuid,
    pub chunk_size: u32,
    pub data_offset: u64,
    pub created_at: u64,
    pub generation: u64,
    pub name: String,
    pub meta_dir: PathBuf,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SuperblockError {
    #[error("no pool superblock (magic not found)")]
    NoMagic,
    #[error("superblock checksum mismatch")]
    BadChecksum,
    #[error("superblock format version {0} is not supported (this build reads {min}..={max})", min = VERSIONS_ACCEPTED.start(), max = VERSIONS_ACCEPTED.end())]
    UnsupportedVersion(u32),
    #[error("superblock field {field} is invalid")]
    BadField { field: &'static str },
    #[error("pool name longer than {NAME_MAX} bytes")]
    NameTooLong,
    #[error("metadata path longer than {PATH_MAX} bytes")]
    PathTooLong,
}

impl Superblock {
    pub fn write_to(&self) -> Result<[u8; SIZE], SuperblockError> {
        let mut b = [0u8; SIZE];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        b[16..32].copy_from_slice(self.pool_id.as_bytes());
        b[32..36].copy_from_slice(&self.chunk_size.to_le_bytes());
        b[40..48].copy_from_slice(&self.data_offset.to_le_bytes());
        b[48..56].copy_from_slice(&self.created_at.to_le_bytes());
        b[56..64].copy_from_slice(&self.generation.to_le_bytes());
        put_str(&mut b[64..64 + 2 + NAME_MAX], &self.name).ok_or(SuperblockError::NameTooLong)?;
        let path = self
            .meta_dir
            .to_str()
            .ok_or(SuperblockError::BadField { field: "meta_dir" })?;
        put_str(&mut b[192..192 + 2 + PATH_MAX], path).ok_or(SuperblockError::PathTooLong)?;
        let crc = crc32fast::hash(&b[..SIZE - 4]);
        b[SIZE - 4..].copy_from_slice(&crc.to_le_bytes());
        Ok(b)
    }

    pub fn read_from(b: &[u8; SIZE]) -> Result<Self, SuperblockError> {
        if b[0..8] != MAGIC {
            return Err(SuperblockError::NoMagic);
        }
        let crc = u32::from_le_bytes(b[SIZE - 4..].try_into().expect("4 bytes"));
        if crc32fast::hash(&b[..SIZE - 4]) != crc {
            return Err(SuperblockError::BadChecksum);
        }
        let version = u32_at(b, 8);
        if !VERSIONS_ACCEPTED.contains(&version) {
            return Err(SuperblockError::UnsupportedVersion(version));
        }
        let chunk_size = u32_at(b, 32);
        if !crate::valid_chunk_size(u64::from(chunk_size)) {
            return Err(SuperblockError::BadField {
                field: "chunk_size",
            });
        }
        let data_offset = u64_at(b, 40);
        if data_offset < (COPIES[1] + SIZE as u64)
            || !data_offset.is_multiple_of(u64::from(chunk_size))
        {
            return Err(SuperblockError::BadField {
                field: "data_offset",
            });
        }
        let name = get_str(&b[64..64 + 2 + NAME_MAX])
            .ok_or(SuperblockError::BadField { field: "name" })?;
        let meta_dir = get_str(&b[192..192 + 2 + PATH_MAX])
            .ok_or(SuperblockError::BadField { field: "meta_dir" })?;
        Ok(Superblock {
            pool_id: Uuid::from_bytes(b[16..32].try_into().expect("16 bytes")),
            chunk_size,
            data_offset,
            created_at: u64_at(b, 48),
            generation: u64_at(b, 56),
            name,
            meta_dir: PathBuf::from(meta_dir),
        })
    }

    /// Picks the newest valid copy. Errors with the primary copy's problem if none is valid.
    pub fn pick(copies: &[[u8; SIZE]; 2]) -> Result<Self, SuperblockError> {
        let a = Self::read_from(&copies[0]);
        let b = Self::read_from(&copies[1]);
        match (a, b) {
            (Ok(a), Ok(b)) => Ok(if b.generation > a.generation { b } else { a }),
            (Ok(a), Err(_)) => Ok(a),
            (Err(_), Ok(b)) => Ok(b),
            (Err(e), Err(_)) => Err(e),
        }
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn put_str(field: &mut [u8], s: &str) -> Option<()> {
    let bytes = s.as_bytes();
    if bytes.len() > field.len() - 2 {
        return None;
    }
    field[..2].copy_from_slice(&(bytes.len() as u16).to_le_bytes());
    field[2..2 + bytes.len()].copy_from_slice(bytes);
    Some(())
}

fn get_str(field: &[u8]) -> Option<String> {
    let len = usize::from(u16::from_le_bytes([field[0], field[1]]));
    let bytes = field.get(2..2 + len)?;
    String::from_utf8(bytes.to_vec()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Superblock {
        Superblock {
            pool_id: Uuid::from_u128(0x1234_5678_9abc_def0_1234_5678_9abc_def0),
            chunk_size: 64 << 10,
            data_offset: DATA_OFFSET,
            created_at: 1_763_000_000,
            generation: 3,
            name: "sr0".into(),
            meta_dir: PathBuf::from("/var/lib/storaged/sr0.meta"),
        }
    }

    #[test]
    fn round_trip() {
        let sb = sample();
        let bytes = sb.write_to().unwrap();
        assert_eq!(Superblock::read_from(&bytes).unwrap(), sb);
    }

    #[test]
    fn rejects_foreign_and_damaged_blocks() {
        assert_eq!(
            Superblock::read_from(&[0u8; SIZE]),
            Err(SuperblockError::NoMagic)
        );
        let mut bytes = sample().write_to().unwrap();
        bytes[40] ^= 1;
        assert_eq!(
            Superblock::read_from(&bytes),
            Err(SuperblockError::BadChecksum)
        );
    }

    #[test]
    fn newest_valid_copy_wins() {
        let old = sample();
        let mut new = sample();
        new.generation = 4;
        new.name = "renamed".into();
        let a = old.write_to().unwrap();
        let b = new.write_to().unwrap();
        assert_eq!(Superblock::pick(&[a, b]).unwrap().name, "renamed");
        let mut torn = b;
        torn[100] ^= 0xff;
        assert_eq!(Superblock::pick(&[a, torn]).unwrap().name, "sr0");
        assert_eq!(
            Superblock::pick(&[[0; SIZE], [0; SIZE]]),
            Err(SuperblockError::NoMagic)
        );
    }

    #[test]
    fn rejects_too_long_name() {
        let mut sb = sample();
        sb.name = "x".repeat(NAME_MAX + 1);
        assert_eq!(sb.write_to(), Err(SuperblockError::NameTooLong));
    }
}
