//! The idle port: a paravirtual HLT for guests that run at CPL 3.
//!
//! A guest with nothing to do until a device interrupts would execute HLT, and the vCPU
//! thread would sleep in KVM until the interrupt. At CPL 3 HLT faults, and on PVM hosts
//! the test guest does its work at CPL 3, so without this it can only spin, and a
//! spinning vCPU takes a host core from the very I/O threads it waits for.
//!
//! A read of the port parks the vCPU thread (outside `KVM_RUN`) until an interrupt line
//! of the VM fires, or [`MAX_IDLE`] passes, and reads 1 if an interrupt came, 0 if the
//! wait timed out. Each vCPU thread remembers the last wake-up it saw, so an interrupt
//! that fires between the guest's last look at its rings and its read of the port is not
//! lost: the read returns at once. A VMM without the port (QEMU) reads 0xff, which tells
//! the guest to go back to spinning.

use std::sync::{Condvar, Mutex};
use std::time::Duration;

/// The longest one read parks: also the most it delays a pause, a stop or a migration
/// handover when nothing interrupts (those kick the waiters anyway).
pub const MAX_IDLE: Duration = Duration::from_millis(2);

/// Wake-ups counted by the interrupt lines, waited on by idle vCPUs.
#[derive(Debug, Default)]
pub struct IdleWake {
    generation: Mutex<u64>,
    cv: Condvar,
}

impl IdleWake {
    /// An interrupt was raised (or the VM wants its vCPUs back): wake every idle vCPU.
    pub fn wake(&self) {
        let mut g = self.generation.lock().unwrap_or_else(|p| p.into_inner());
        *g = g.wrapping_add(1);
        self.cv.notify_all();
    }

    /// Parks until a wake-up newer than `*seen`, or `max`; records the wake-up seen.
    /// True when woken, false on time-out.
    pub fn wait(&self, seen: &mut u64, max: Duration) -> bool {
        let g = self.generation.lock().unwrap_or_else(|p| p.into_inner());
        let (g, _) = self
            .cv
            .wait_timeout_while(g, max, |g| *g == *seen)
            .unwrap_or_else(|p| p.into_inner());
        let woke = *g != *seen;
        *seen = *g;
        woke
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Instant;

    #[test]
    fn a_wake_before_the_wait_is_not_lost() {
        let w = IdleWake::default();
        let mut seen = 0;
        w.wake();
        let t = Instant::now();
        assert!(w.wait(&mut seen, Duration::from_secs(5)));
        assert!(t.elapsed() < Duration::from_secs(1));
        // Seen now: the next wait times out.
        assert!(!w.wait(&mut seen, Duration::from_millis(20)));
    }

    #[test]
    fn a_wake_from_another_thread_ends_the_wait() {
        let w = Arc::new(IdleWake::default());
        let mut seen = 0;
        let w2 = w.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            w2.wake();
        });
        let start = Instant::now();
        assert!(w.wait(&mut seen, Duration::from_secs(10)));
        assert!(start.elapsed() < Duration::from_secs(5));
        assert_eq!(seen, 1);
        t.join().unwrap();
    }
}
