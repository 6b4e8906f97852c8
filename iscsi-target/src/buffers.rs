//! Recycled buffers for large data transfers.
//!
//! A 1 MiB READ used to get a fresh buffer per command: the allocator zeroed it (a
//! `memset` of the whole megabyte, or page faults that the kernel zeroes when the
//! allocation was mapped fresh), the device filled it, and after the send it went back to
//! the allocator. Profiled at 1 MiB sequential reads, the zeroing alone cost a tenth of the
//! target's CPU. Buffers from here are reused as they are: the device overwrites them, so
//! nothing needs zeroing, and their pages stay mapped.
//!
//! Only sizes from [`MIN_POOLED`] to [`MAX_POOLED`] are pooled, in power-of-two classes;
//! at most [`IDLE_LIMIT`] bytes wait here idle, the rest go back to the allocator.

use std::sync::Mutex;

use bytes::Bytes;

/// Smaller buffers are cheap to allocate and zero.
pub(crate) const MIN_POOLED: usize = 64 * 1024;
/// The largest transfer one command may move.
pub(crate) const MAX_POOLED: usize = crate::scsi::MAX_TRANSFER_BYTES as usize;
/// Bytes kept idle across all classes.
pub(crate) const IDLE_LIMIT: usize = 64 << 20;

const FIRST_CLASS: u32 = MIN_POOLED.trailing_zeros();
const CLASSES: usize = (MAX_POOLED.trailing_zeros() - FIRST_CLASS + 1) as usize;

struct Pool {
    /// Idle buffers by class: class `i` holds capacities of `MIN_POOLED << i`.
    classes: [Vec<Vec<u8>>; CLASSES],
    idle_bytes: usize,
}

static POOL: Mutex<Pool> = Mutex::new(Pool {
    classes: [const { Vec::new() }; CLASSES],
    idle_bytes: 0,
});

fn pool() -> std::sync::MutexGuard<'static, Pool> {
    // The pool holds no invariant a panic could break halfway.
    POOL.lock().unwrap_or_else(|p| p.into_inner())
}

/// The class of a buffer that must hold `len` bytes, `None` when not pooled.
fn class_for_len(len: usize) -> Option<usize> {
    if !(MIN_POOLED..=MAX_POOLED).contains(&len) {
        return None;
    }
    Some((len.next_power_of_two().trailing_zeros() - FIRST_CLASS) as usize)
}

/// The class a buffer of `capacity` goes back to, `None` when it is not one of ours.
fn class_for_capacity(capacity: usize) -> Option<usize> {
    if !capacity.is_power_of_two() || !(MIN_POOLED..=MAX_POOLED).contains(&capacity) {
        return None;
    }
    Some((capacity.trailing_zeros() - FIRST_CLASS) as usize)
}

/// An idle buffer of `class`, or a new empty one with its capacity.
fn pop(class: usize) -> Vec<u8> {
    let reused = {
        let mut p = pool();
        let v = p.classes[class].pop();
        if let Some(v) = &v {
            p.idle_bytes -= v.capacity();
        }
        v
    };
    reused.unwrap_or_else(|| Vec::with_capacity(MIN_POOLED << class))
}

/// A buffer of exactly `len` bytes. Its contents are unspecified (whatever an earlier
/// transfer left, or zeros): callers overwrite all of it.
pub(crate) fn take(len: usize) -> Vec<u8> {
    let Some(class) = class_for_len(len) else {
        return vec![0; len];
    };
    let mut v = pop(class);
    // Shrinking only moves the length; growing zeroes just the new part.
    v.resize(len, 0);
    v
}

/// An empty buffer with room for `capacity` bytes without reallocating (Data-Out is
/// collected into it).
pub(crate) fn take_empty(capacity: usize) -> Vec<u8> {
    match class_for_len(capacity) {
        Some(class) => {
            let mut v = pop(class);
            v.clear();
            v
        }
        None => Vec::with_capacity(capacity),
    }
}

/// Gives a buffer back for reuse (or to the allocator when the pool is full or the buffer
/// is not of a pooled size).
pub(crate) fn give_back(v: Vec<u8>) {
    let Some(class) = class_for_capacity(v.capacity()) else {
        return;
    };
    let mut p = pool();
    if p.idle_bytes + v.capacity() <= IDLE_LIMIT {
        p.idle_bytes += v.capacity();
        p.classes[class].push(v);
    }
}

/// A pooled buffer inside [`Bytes`]: returns to the pool when the last slice is dropped.
struct Recycled(Vec<u8>);

impl AsRef<[u8]> for Recycled {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Recycled {
    fn drop(&mut self) {
        give_back(std::mem::take(&mut self.0));
    }
}

/// Turns `v` into [`Bytes`] without copying; a pooled buffer goes back to the pool once
/// every slice of it is gone (the send is done).
pub(crate) fn into_bytes(v: Vec<u8>) -> Bytes {
    if class_for_capacity(v.capacity()).is_some() {
        Bytes::from_owner(Recycled(v))
    } else {
        Bytes::from(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_cover_the_pooled_range() {
        assert_eq!(class_for_len(MIN_POOLED - 1), None);
        assert_eq!(class_for_len(MIN_POOLED), Some(0));
        assert_eq!(class_for_len(MIN_POOLED + 1), Some(1));
        assert_eq!(class_for_len(1 << 20), Some(4));
        assert_eq!(class_for_len(MAX_POOLED), Some(CLASSES - 1));
        assert_eq!(class_for_len(MAX_POOLED + 1), None);
        assert_eq!(class_for_capacity(3 * MIN_POOLED), None);
        assert_eq!(class_for_capacity(1 << 20), Some(4));
    }

    #[test]
    fn buffers_come_back_with_the_asked_length_and_are_reused() {
        // Other tests may use the pool concurrently: look for our buffer by its address.
        let len = 3 << 20;
        let mut v = take(len);
        assert_eq!(v.len(), len);
        assert_eq!(v.capacity(), 4 << 20);
        v.fill(0xab);
        let ptr = v.as_ptr();
        let b = into_bytes(v);
        let part = b.slice(10..20);
        drop(b);
        // A slice still holds the buffer: it is not back yet.
        assert!(
            pool().classes[class_for_len(len).unwrap()]
                .iter()
                .all(|v| v.as_ptr() != ptr)
        );
        assert_eq!(&part[..], &[0xab; 10]);
        drop(part);
        let mut seen = false;
        let mut held = Vec::new();
        for _ in 0..IDLE_LIMIT / (4 << 20) + 1 {
            let v = take(len - 4096);
            assert_eq!(v.len(), len - 4096);
            if v.as_ptr() == ptr {
                seen = true;
                // Reused as it was: no zeroing of what the caller will overwrite.
                assert!(v.iter().all(|&b| b == 0xab));
            }
            held.push(v);
        }
        assert!(seen, "the buffer was not reused");
        // Growing a reused buffer zeroes only the new part.
        let mut v = held.pop().unwrap();
        v.truncate(16);
        v.fill(1);
        v.resize(32, 0);
        assert_eq!(&v[16..], &[0; 16]);
        for v in held {
            give_back(v);
        }
    }

    #[test]
    fn the_idle_limit_bounds_what_the_pool_keeps() {
        // Reserved, never touched: no memory is used for them.
        let many: Vec<Vec<u8>> = (0..(IDLE_LIMIT / MAX_POOLED) + 3)
            .map(|_| Vec::with_capacity(MAX_POOLED))
            .collect();
        for v in many {
            give_back(v);
        }
        assert!(pool().idle_bytes <= IDLE_LIMIT);
        // Odd sizes are not pooled.
        let odd = Vec::with_capacity(MIN_POOLED * 3);
        let before = pool().idle_bytes;
        give_back(odd);
        assert!(pool().idle_bytes <= before.max(IDLE_LIMIT));
        assert!(take(100).len() == 100);
        assert!(take_empty(MIN_POOLED).capacity() >= MIN_POOLED);
    }
}
