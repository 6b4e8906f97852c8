//! Serial number arithmetic (RFC 1982 with SERIAL_BITS = 32), which CmdSN, StatSN,
//! DataSN and R2TSN follow (RFC 7143 §4.2.2.1).

/// `a < b` in serial arithmetic. Undefined pairs (exactly 2^31 apart) compare as neither.
pub fn lt(a: u32, b: u32) -> bool {
    a != b && (b.wrapping_sub(a) as i32) > 0
}

/// `a > b` in serial arithmetic.
pub fn gt(a: u32, b: u32) -> bool {
    lt(b, a)
}

/// `a <= b` in serial arithmetic.
pub fn le(a: u32, b: u32) -> bool {
    a == b || lt(a, b)
}

/// `a >= b` in serial arithmetic.
pub fn ge(a: u32, b: u32) -> bool {
    a == b || gt(a, b)
}

/// Whether `sn` lies in the window `lo..=hi`.
pub fn in_window(sn: u32, lo: u32, hi: u32) -> bool {
    le(lo, sn) && le(sn, hi)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wraps_around() {
        assert!(lt(1, 2));
        assert!(lt(u32::MAX, 0));
        assert!(gt(0, u32::MAX));
        assert!(le(5, 5));
        assert!(!lt(5, 5));
        assert!(in_window(0, u32::MAX - 1, 3));
        assert!(!in_window(4, u32::MAX - 1, 3));
        // Exactly half the space apart: undefined, neither less nor greater.
        assert!(!lt(0, 1 << 31) || !gt(0, 1 << 31));
    }
}
