//! The POSIX ustar archive an OVA is: 512-byte headers, each file's data padded to 512
//! bytes, two zero blocks at the end. Sizes of 8 GiB and more use the base-256 size field
//! (GNU's, which VMware's and VirtualBox's readers take). Only regular files.

use std::io::{Read, Seek, SeekFrom, Write};

use thiserror::Error;

pub const BLOCK: u64 = 512;
/// The largest size the octal field holds (11 digits).
const OCTAL_MAX: u64 = 0o77777777777;

#[derive(Debug, Error)]
pub enum TarError {
    #[error("reading the archive")]
    Io(#[from] std::io::Error),
    #[error("the header at byte {at} is damaged (checksum {stored}, computed {computed})")]
    Checksum { at: u64, stored: u64, computed: u64 },
    #[error("the header at byte {at} has a size field that does not parse")]
    Size { at: u64 },
    #[error("entry {name:?} at byte {at} is not a plain file name")]
    Name { at: u64, name: String },
    #[error("entry {name:?} runs past the end of the archive")]
    Truncated { name: String },
    #[error("the name {0:?} is longer than 100 bytes")]
    LongName(String),
}

/// A regular file in an archive: where its data lies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub offset: u64,
    pub size: u64,
}

fn octal(field: &mut [u8], v: u64) {
    let w = field.len() - 1;
    let s = format!("{v:0w$o}");
    field[..w].copy_from_slice(s.as_bytes());
    field[w] = 0;
}

/// One header for a regular file `name` of `size` bytes.
pub fn header(name: &str, size: u64, mtime: u64) -> Result<[u8; 512], TarError> {
    if name.len() > 100 {
        return Err(TarError::LongName(name.to_owned()));
    }
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    octal(&mut h[100..108], 0o644);
    octal(&mut h[108..116], 0);
    octal(&mut h[116..124], 0);
    if size <= OCTAL_MAX {
        octal(&mut h[124..136], size);
    } else {
        h[124] = 0x80;
        h[128..136].copy_from_slice(&size.to_be_bytes());
    }
    octal(&mut h[136..148], mtime);
    h[156] = b'0';
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].fill(b' ');
    let sum: u64 = h.iter().map(|&b| u64::from(b)).sum();
    let s = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(s.as_bytes());
    Ok(h)
}

/// Zeros after `size` bytes of data, up to the next block.
pub fn padding(size: u64) -> usize {
    ((BLOCK - size % BLOCK) % BLOCK) as usize
}

/// The end of an archive.
pub fn finish(w: &mut impl Write) -> std::io::Result<()> {
    w.write_all(&[0u8; 1024])
}

fn parse_octal(field: &[u8]) -> Option<u64> {
    let s = std::str::from_utf8(field).ok()?;
    let s = s.trim_matches(|c| c == '\0' || c == ' ');
    if s.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(s, 8).ok()
}

fn parse_size(field: &[u8]) -> Option<u64> {
    if field[0] & 0x80 != 0 {
        if field[..4].iter().skip(1).any(|&b| b != 0) || field[0] != 0x80 {
            return None;
        }
        return Some(u64::from_be_bytes(field[4..12].try_into().ok()?));
    }
    parse_octal(field)
}

/// The regular files of the archive `r` (`len` bytes), in order; other entries (pax
/// headers, directories) are skipped.
pub fn list(r: &mut (impl Read + Seek), len: u64) -> Result<Vec<Entry>, TarError> {
    let mut out = Vec::new();
    let mut at = 0u64;
    let mut h = [0u8; 512];
    while at + BLOCK <= len {
        r.seek(SeekFrom::Start(at))?;
        r.read_exact(&mut h)?;
        if h.iter().all(|&b| b == 0) {
            break;
        }
        let stored = parse_octal(&h[148..156]).ok_or(TarError::Checksum {
            at,
            stored: 0,
            computed: 0,
        })?;
        let computed: u64 = h[..148]
            .iter()
            .chain(&[b' '; 8])
            .chain(&h[156..])
            .map(|&b| u64::from(b))
            .sum();
        if stored != computed {
            return Err(TarError::Checksum {
                at,
                stored,
                computed,
            });
        }
        let size = parse_size(&h[124..136]).ok_or(TarError::Size { at })?;
        let cstr = |f: &[u8]| {
            let end = f.iter().position(|&b| b == 0).unwrap_or(f.len());
            String::from_utf8_lossy(&f[..end]).into_owned()
        };
        let mut name = cstr(&h[..100]);
        let prefix = cstr(&h[345..500]);
        if &h[257..262] == b"ustar" && !prefix.is_empty() {
            name = format!("{prefix}/{name}");
        }
        let data = at + BLOCK;
        let next = data
            .checked_add(size)
            .and_then(|end| end.checked_add(padding(size) as u64));
        if next.is_none_or(|end| end > len) {
            return Err(TarError::Truncated { name });
        }
        if matches!(h[156], b'0' | 0) {
            let plain = name.strip_prefix("./").unwrap_or(&name).to_owned();
            if plain.is_empty() || plain.contains('/') || plain == ".." || plain == "." {
                return Err(TarError::Name { at, name });
            }
            out.push(Entry {
                name: plain,
                offset: data,
                size,
            });
        }
        at = next.expect("checked above");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_archive_written_lists_its_files_where_their_data_is() {
        let mut buf = Vec::new();
        let files: [(&str, Vec<u8>); 3] = [
            ("a.ovf", b"<Envelope/>".to_vec()),
            ("b.vmdk", vec![7u8; 1500]),
            ("a.mf", Vec::new()),
        ];
        for (name, data) in &files {
            buf.extend_from_slice(&header(name, data.len() as u64, 1).unwrap());
            buf.extend_from_slice(data);
            buf.extend(std::iter::repeat_n(0, padding(data.len() as u64)));
        }
        finish(&mut buf).unwrap();
        let len = buf.len() as u64;
        let entries = list(&mut std::io::Cursor::new(&buf), len).unwrap();
        assert_eq!(entries.len(), 3);
        for (e, (name, data)) in entries.iter().zip(&files) {
            assert_eq!(e.name, *name);
            let at = e.offset as usize;
            assert_eq!(&buf[at..at + e.size as usize], data.as_slice());
        }
        // A flipped bit in a header is caught; a cut archive too.
        let mut bad = buf.clone();
        let bad_at = 1024; // b.vmdk's header
        bad[bad_at + 2] ^= 1;
        assert!(matches!(
            list(&mut std::io::Cursor::new(&bad), len),
            Err(TarError::Checksum { at, .. }) if at == bad_at as u64
        ));
        assert!(matches!(
            list(&mut std::io::Cursor::new(&buf[..1000]), 1000),
            Err(TarError::Truncated { .. })
        ));
    }

    #[test]
    fn sizes_past_8_gib_use_the_base_256_field() {
        let big = 20u64 << 30;
        let h = header("d.vmdk", big, 0).unwrap();
        assert_eq!(parse_size(&h[124..136]), Some(big));
        let h = header("d.vmdk", 12345, 0).unwrap();
        assert_eq!(parse_size(&h[124..136]), Some(12345));
    }
}
