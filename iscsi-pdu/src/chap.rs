//! CHAP with MD5 (RFC 1994, as iSCSI uses it in RFC 7143 §12.1.3): the response to a
//! challenge, and the binary value encodings of §6.1 (`0x` hex, `0b` base64).

use md5::{Digest, Md5};

use crate::PduError;

/// CHAP_A value for MD5.
pub const ALGORITHM_MD5: u8 = 5;

/// Shortest challenge we send or accept; RFC 7143 §12.1.3 asks for at least 16 bytes
/// (and says a target must refuse a challenge equal to one it sent).
pub const MIN_CHALLENGE_LEN: usize = 16;
/// Longest binary value we decode (1024 bytes, the largest challenge §12.1.3 allows).
pub const MAX_BINARY_LEN: usize = 1024;

/// MD5(identifier ‖ secret ‖ challenge).
pub fn response(id: u8, secret: &[u8], challenge: &[u8]) -> [u8; 16] {
    let mut h = Md5::new();
    h.update([id]);
    h.update(secret);
    h.update(challenge);
    h.finalize().into()
}

/// Checks a response in constant time.
pub fn verify(id: u8, secret: &[u8], challenge: &[u8], got: &[u8]) -> bool {
    let want = response(id, secret, challenge);
    if got.len() != want.len() {
        return false;
    }
    want.iter().zip(got).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

/// Encodes binary as `0x` followed by lowercase hex.
pub fn encode_hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(2 + bytes.len() * 2);
    s.push_str("0x");
    for b in bytes {
        s.push(HEX[usize::from(b >> 4)] as char);
        s.push(HEX[usize::from(b & 15)] as char);
    }
    s
}

/// Decodes a binary value: `0x`/`0X` hex (an odd digit count has an implied leading
/// zero) or `0b`/`0B` base64.
pub fn decode_binary(v: &str) -> Result<Vec<u8>, PduError> {
    let bad = |reason: &'static str| PduError::BadBinary { reason };
    let out = if let Some(hex) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        if hex.is_empty() {
            return Err(bad("empty hex value"));
        }
        let digit = |c: u8| -> Result<u8, PduError> {
            (c as char)
                .to_digit(16)
                .map(|d| d as u8)
                .ok_or(bad("a character that is not a hex digit"))
        };
        let bytes = hex.as_bytes();
        let mut out = Vec::with_capacity(bytes.len().div_ceil(2));
        let mut rest = bytes;
        if bytes.len() % 2 == 1 {
            out.push(digit(bytes[0])?);
            rest = &bytes[1..];
        }
        for pair in rest.chunks_exact(2) {
            out.push(digit(pair[0])? << 4 | digit(pair[1])?);
        }
        out
    } else if let Some(b64) = v.strip_prefix("0b").or_else(|| v.strip_prefix("0B")) {
        decode_base64(b64).ok_or(bad("invalid base64"))?
    } else {
        return Err(bad("no 0x or 0b prefix"));
    };
    if out.len() > MAX_BINARY_LEN {
        return Err(bad("longer than 1024 bytes"));
    }
    Ok(out)
}

fn decode_base64(s: &str) -> Option<Vec<u8>> {
    fn val(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    }
    let s = s.as_bytes();
    if s.is_empty() || !s.len().is_multiple_of(4) {
        return None;
    }
    let mut out = Vec::with_capacity(s.len() / 4 * 3);
    for (i, quad) in s.chunks_exact(4).enumerate() {
        let last = i == s.len() / 4 - 1;
        let pads = quad.iter().rev().take_while(|&&c| c == b'=').count();
        if pads > 2 || (pads > 0 && !last) {
            return None;
        }
        let mut n = 0u32;
        for &c in &quad[..4 - pads] {
            n = n << 6 | val(c)?;
        }
        n <<= 6 * pads as u32;
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&bytes[..3 - pads]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn md5_response_matches_rfc1994_construction() {
        // MD5 of 0x01 ‖ "secret" ‖ 0x0102 computed independently.
        let r = response(1, b"secret", &[1, 2]);
        let mut h = Md5::new();
        h.update([1u8, b's', b'e', b'c', b'r', b'e', b't', 1, 2]);
        assert_eq!(r, <[u8; 16]>::from(h.finalize()));
        assert!(verify(1, b"secret", &[1, 2], &r));
        assert!(!verify(2, b"secret", &[1, 2], &r));
        assert!(!verify(1, b"secret", &[1, 2], &r[..15]));
    }

    #[test]
    fn binary_encodings() {
        assert_eq!(decode_binary("0x0a0B").unwrap(), vec![10, 11]);
        assert_eq!(decode_binary("0xabc").unwrap(), vec![0x0a, 0xbc]);
        assert_eq!(decode_binary("0bAQID").unwrap(), vec![1, 2, 3]);
        assert_eq!(decode_binary("0bAQI=").unwrap(), vec![1, 2]);
        assert_eq!(decode_binary("0bAQ==").unwrap(), vec![1]);
        assert!(decode_binary("0b=AQI").is_err());
        assert!(decode_binary("0xzz").is_err());
        assert!(decode_binary("1234").is_err());
        assert_eq!(encode_hex(&[0, 255]), "0x00ff");
        assert_eq!(decode_binary(&encode_hex(&[9; 40])).unwrap(), vec![9; 40]);
    }
}
