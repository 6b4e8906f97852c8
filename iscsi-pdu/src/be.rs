//! Big-endian fields at byte offsets: how every iSCSI header and SCSI CDB stores its
//! numbers. Offsets past the end of the slice panic; callers check lengths first.

/// The big-endian `u16` at `b[at..at + 2]`.
pub fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// The big-endian 24-bit number at `b[at..at + 3]` (CDB transfer lengths, SPC lengths).
pub fn be24(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([0, b[at], b[at + 1], b[at + 2]])
}

/// The big-endian `u32` at `b[at..at + 4]`.
pub fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// The big-endian `u64` at `b[at..at + 8]`.
pub fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// Writes `v` big-endian at `b[at..at + 2]`.
pub fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

/// Writes `v` big-endian at `b[at..at + 4]`.
pub fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

/// Writes `v` big-endian at `b[at..at + 8]`.
pub fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_it_writes_at_an_offset() {
        let mut b = [0u8; 20];
        put16(&mut b, 1, 0x0102);
        put32(&mut b, 3, 0x0304_0506);
        put64(&mut b, 7, 0x0708_090a_0b0c_0d0e);
        assert_eq!(be16(&b, 1), 0x0102);
        assert_eq!(be32(&b, 3), 0x0304_0506);
        assert_eq!(be24(&b, 4), 0x04_0506);
        assert_eq!(be64(&b, 7), 0x0708_090a_0b0c_0d0e);
        assert_eq!(&b[..4], &[0, 1, 2, 3]);
    }
}
