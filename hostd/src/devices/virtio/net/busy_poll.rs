//! How long a VIF's worker keeps watching its tap and TX ring after traffic before it
//! sleeps. A sleeping worker costs each frame a wake-up, and each frame the guest sends a
//! kick (an exit); watching costs host CPU. The window adapts the way KVM's halt polling
//! does: it grows (doubling from [`GROW_START`]) while the next frame keeps coming after
//! the window but within the ceiling, and halves (to nothing below [`GROW_START`]) when
//! the worker then sleeps longer than the ceiling. An idle VIF watches for nothing; a
//! request-response flow answers without a wake-up. Ceiling zero: never watch.

use std::time::Duration;

/// The ceiling unless one is configured: a guest's reply to a frame, and a peer's next
/// request, come within it on a busy VIF.
pub const DEFAULT_BUSY_POLL: Duration = Duration::from_micros(50);
/// The largest ceiling accepted: beyond it a worker would spin for nothing more than a
/// wake-up saves.
pub const MAX_BUSY_POLL: Duration = Duration::from_millis(1);
/// The first window after none.
pub const GROW_START: Duration = Duration::from_micros(10);

#[derive(Debug, Clone)]
pub struct BusyPoll {
    ceiling: Duration,
    window: Duration,
}

impl BusyPoll {
    /// Starts without a window: a VIF earns one by its traffic.
    pub fn new(ceiling: Duration) -> Self {
        Self {
            ceiling: ceiling.min(MAX_BUSY_POLL),
            window: Duration::ZERO,
        }
    }

    /// How long to watch after the last frame now.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// The next event came `idle` after the last frame, having found the worker asleep
    /// (its window spent): a window that would have caught it grows, a long silence
    /// shrinks it.
    pub fn woke_after(&mut self, idle: Duration) {
        if idle <= self.window {
            return;
        }
        if idle > self.ceiling {
            self.window /= 2;
            if self.window < GROW_START {
                self.window = Duration::ZERO;
            }
        } else {
            self.window = (self.window * 2).max(GROW_START).min(self.ceiling);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: Duration = Duration::from_micros(1);

    #[test]
    fn a_quick_peer_grows_the_window_to_catch_it_and_no_further() {
        let mut p = BusyPoll::new(50 * US);
        assert_eq!(p.window(), Duration::ZERO);
        p.woke_after(30 * US);
        assert_eq!(p.window(), 10 * US);
        p.woke_after(30 * US);
        assert_eq!(p.window(), 20 * US);
        p.woke_after(30 * US);
        assert_eq!(p.window(), 40 * US);
        // Caught within the window: it stays.
        p.woke_after(30 * US);
        assert_eq!(p.window(), 40 * US);
        p.woke_after(45 * US);
        assert_eq!(p.window(), 50 * US, "capped by the ceiling");
    }

    #[test]
    fn silence_longer_than_the_ceiling_shrinks_the_window_to_nothing() {
        let mut p = BusyPoll::new(50 * US);
        for _ in 0..5 {
            p.woke_after(45 * US);
        }
        assert_eq!(p.window(), 50 * US);
        p.woke_after(Duration::from_millis(10));
        assert_eq!(p.window(), 25 * US);
        p.woke_after(Duration::from_millis(10));
        assert_eq!(p.window(), 12500 * US / 1000);
        p.woke_after(Duration::from_millis(10));
        assert_eq!(p.window(), Duration::ZERO);
        p.woke_after(Duration::from_secs(1));
        assert_eq!(p.window(), Duration::ZERO);
    }

    #[test]
    fn a_zero_ceiling_never_watches_and_a_huge_one_is_capped() {
        let mut p = BusyPoll::new(Duration::ZERO);
        for idle in [US, 5 * US, Duration::from_millis(1)] {
            p.woke_after(idle);
            assert_eq!(p.window(), Duration::ZERO);
        }
        let mut p = BusyPoll::new(Duration::from_secs(1));
        for _ in 0..20 {
            p.woke_after(MAX_BUSY_POLL);
        }
        assert_eq!(p.window(), MAX_BUSY_POLL);
    }
}
