//! A VIF's rate limit: token buckets for bytes and packets the guest sends. A frame
//! passes while a bucket has any token left, and may take it below zero by its own
//! size: the average rate holds, and a 64 KiB segment needs no 64 KiB burst. With no
//! token left the worker waits (the frame is delayed, not dropped).

use std::num::NonZeroU64;
use std::time::{Duration, Instant};

use super::NicError;

const NANOS: i128 = 1_000_000_000;
/// A full bucket holds this long's worth of tokens: the largest burst at line rate.
const BURST: Duration = Duration::from_millis(100);

/// What a VIF may send; `None`: no limit on that count.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateLimit {
    pub bytes_per_s: Option<NonZeroU64>,
    pub packets_per_s: Option<NonZeroU64>,
}

impl RateLimit {
    /// A limit as configured: absent is no limit, and zero is refused (it would stop
    /// the VIF for good, which is never what was meant).
    pub fn new(bytes_per_s: Option<u64>, packets_per_s: Option<u64>) -> Result<Self, NicError> {
        let nz = |v: Option<u64>, unit| match v {
            None => Ok(None),
            Some(v) => NonZeroU64::new(v)
                .map(Some)
                .ok_or(NicError::ZeroRate { unit }),
        };
        Ok(Self {
            bytes_per_s: nz(bytes_per_s, "bytes")?,
            packets_per_s: nz(packets_per_s, "packets")?,
        })
    }

    pub fn is_unlimited(&self) -> bool {
        self.bytes_per_s.is_none() && self.packets_per_s.is_none()
    }
}

/// One bucket; tokens are kept in billionths so that refills are exact.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: u64,
    capacity: i128,
    tokens: i128,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket of `rate` tokens a second.
    pub fn new(rate: NonZeroU64, now: Instant) -> Self {
        let capacity = (i128::from(rate.get()) * BURST.as_nanos() as i128).max(NANOS);
        Self {
            rate: rate.get(),
            capacity,
            tokens: capacity,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_nanos() as i128;
        self.last = self.last.max(now);
        self.tokens = (self.tokens + elapsed * i128::from(self.rate)).min(self.capacity);
    }

    /// How long until a token is left; zero when one is now.
    pub fn wait(&mut self, now: Instant) -> Duration {
        self.refill(now);
        if self.tokens > 0 {
            return Duration::ZERO;
        }
        // Tokens (in billionths) to reach one billionth above zero, at `rate` a second.
        let need = (-self.tokens + 1) as u128;
        let rate = u128::from(self.rate);
        Duration::from_nanos(need.div_ceil(rate).min(u128::from(u64::MAX)) as u64)
    }

    fn take(&mut self, cost: u64) {
        self.tokens -= i128::from(cost) * NANOS;
    }
}

/// Both buckets of a VIF.
#[derive(Debug, Clone)]
pub struct Limiter {
    bytes: Option<TokenBucket>,
    packets: Option<TokenBucket>,
}

impl Limiter {
    pub fn new(limit: &RateLimit, now: Instant) -> Self {
        Self {
            bytes: limit.bytes_per_s.map(|r| TokenBucket::new(r, now)),
            packets: limit.packets_per_s.map(|r| TokenBucket::new(r, now)),
        }
    }

    /// Lets a frame of `bytes` pass and charges it, or says how long until it may.
    pub fn admit(&mut self, bytes: u64, now: Instant) -> Result<(), Duration> {
        let wait = [&mut self.bytes, &mut self.packets]
            .into_iter()
            .flatten()
            .map(|b| b.wait(now))
            .max()
            .unwrap_or(Duration::ZERO);
        if !wait.is_zero() {
            return Err(wait);
        }
        if let Some(b) = &mut self.bytes {
            b.take(bytes);
        }
        if let Some(p) = &mut self.packets {
            p.take(1);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nz(v: u64) -> Option<NonZeroU64> {
        NonZeroU64::new(v)
    }

    #[test]
    fn zero_is_refused_and_absent_is_unlimited() {
        assert_eq!(
            RateLimit::new(Some(0), None),
            Err(NicError::ZeroRate { unit: "bytes" })
        );
        assert_eq!(
            RateLimit::new(None, Some(0)),
            Err(NicError::ZeroRate { unit: "packets" })
        );
        let none = RateLimit::new(None, None).unwrap();
        assert!(none.is_unlimited());
        let mut l = Limiter::new(&none, Instant::now());
        let now = Instant::now();
        for _ in 0..10_000 {
            assert_eq!(l.admit(65535, now), Ok(()));
        }
    }

    #[test]
    fn a_packet_bucket_passes_its_burst_then_one_packet_per_period() {
        let t0 = Instant::now();
        // 100 packets/s: a 100 ms burst is 10 packets, then one each 10 ms.
        let mut l = Limiter::new(
            &RateLimit {
                bytes_per_s: None,
                packets_per_s: nz(100),
            },
            t0,
        );
        for _ in 0..10 {
            assert_eq!(l.admit(100, t0), Ok(()));
        }
        // Exactly at zero there is no token; a billionth of one later there is, and the
        // frame it lets through leaves the bucket one packet short: 10 ms to wait.
        assert_eq!(l.admit(100, t0), Err(Duration::from_nanos(1)));
        let t1 = t0 + Duration::from_nanos(1);
        assert_eq!(l.admit(100, t1), Ok(()));
        assert_eq!(l.admit(100, t1), Err(Duration::from_millis(10)));
        assert_eq!(l.admit(100, t1 + Duration::from_millis(10)), Ok(()));
        // A long idle period refills only up to the burst.
        let t2 = t1 + Duration::from_secs(60);
        let passed = (0..100).take_while(|_| l.admit(1, t2).is_ok()).count();
        assert_eq!(passed, 10);
    }

    #[test]
    fn a_byte_bucket_lets_a_big_frame_overdraw_and_makes_the_next_wait_for_it() {
        let t0 = Instant::now();
        // 10 kB/s: 1 kB of burst; a 64 KiB segment passes and leaves a 6.5 s debt.
        let mut l = Limiter::new(
            &RateLimit {
                bytes_per_s: nz(10_000),
                packets_per_s: None,
            },
            t0,
        );
        assert_eq!(l.admit(65_536, t0), Ok(()));
        let wait = l.admit(60, t0).unwrap_err();
        // (65536 - 1000) bytes at 10 kB/s, plus a billionth of a token.
        assert_eq!(wait, Duration::from_nanos(6_453_600_001));
        assert_eq!(l.admit(60, t0 + wait), Ok(()));
    }

    #[test]
    fn both_limits_must_allow_a_frame_and_only_then_is_either_charged() {
        let t0 = Instant::now();
        let mut l = Limiter::new(
            &RateLimit {
                bytes_per_s: nz(1_000),
                packets_per_s: nz(1_000_000),
            },
            t0,
        );
        assert_eq!(l.admit(1_000, t0), Ok(()));
        assert!(l.admit(1, t0).is_err());
        let packets = l.packets.as_ref().unwrap().tokens;
        assert!(l.admit(1, t0).is_err());
        assert_eq!(
            l.packets.as_ref().unwrap().tokens,
            packets,
            "a refused frame is not charged"
        );
    }
}
