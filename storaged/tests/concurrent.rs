//! Many writers allocating chunks at once, next to snapshots, reads and flushes: every
//! acknowledged write is in the volume, and in every snapshot taken after it was
//! acknowledged; nothing is lost across an import, and the pool checks clean.
//!
//! Writes into fresh chunks are done without the pool's state lock (ThinPool::write), so
//! this is the test that an operation which shares or frees chunks (a snapshot here)
//! waits for them.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use storaged::{BackingKind, CreateOptions, ImportOptions, ThinPool};
use uuid::Uuid;

const CHUNK: u64 = 64 << 10;
const BLOCK: u64 = 4096;
const WRITERS: u64 = 8;
const PER_WRITER: u64 = 600;

/// Writer `t`'s `k`-th block: blocks interleave, so writers share chunks.
fn offset(t: u64, k: u64) -> u64 {
    (k * WRITERS + t) * BLOCK
}

fn pattern(t: u64, k: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK as usize];
    for (i, x) in b.iter_mut().enumerate() {
        *x = (t * 31 + k * 7 + i as u64 / 512) as u8 | 1;
    }
    b
}

fn read(pool: &ThinPool, vol: Uuid, off: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK as usize];
    pool.read(vol, off, &mut b).unwrap();
    b
}

#[test]
fn acknowledged_writes_are_in_the_volume_and_in_every_later_snapshot() {
    // SAFETY: set before any thread of this test starts; this file has one test.
    unsafe { std::env::set_var("STORAGED_TEST_UNLOCKED_WRITE_DELAY_US", "300") };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.img");
    let blocks = WRITERS * PER_WRITER;
    let size = blocks * BLOCK;
    let pool = ThinPool::create(&CreateOptions {
        name: "concurrent".into(),
        kind: BackingKind::File,
        path: path.clone(),
        // Room for the volume and a copy of every chunk (snapshots force copies).
        size: Some((1 << 20) + 3 * size),
        chunk_size: CHUNK,
        meta_dir: None,
        warning_threshold_percent: 0,
    })
    .unwrap();
    let vol = pool
        .create_volume("v", size, 512, BTreeMap::new())
        .unwrap()
        .id;
    let done: Arc<Vec<AtomicU64>> = Arc::new((0..WRITERS).map(|_| AtomicU64::new(0)).collect());
    let stop = Arc::new(AtomicBool::new(false));

    let writers: Vec<_> = (0..WRITERS)
        .map(|t| {
            let pool = pool.clone();
            let done = done.clone();
            std::thread::spawn(move || {
                for k in 0..PER_WRITER {
                    pool.write(vol, offset(t, k), &pattern(t, k)).unwrap();
                    done[t as usize].store(k + 1, Ordering::Release);
                    // Paced, so the snapshots fall between writes rather than after them.
                    if k % 10 == 9 {
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                }
            })
        })
        .collect();

    // Snapshots while the writers run; each must hold every write acknowledged before it.
    let snapper = {
        let pool = pool.clone();
        let done = done.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut snaps = Vec::new();
            let mut i = 0;
            while !stop.load(Ordering::Acquire) && i < 40 {
                let acked: Vec<u64> = done.iter().map(|d| d.load(Ordering::Acquire)).collect();
                let s = pool
                    .snapshot(vol, &format!("s{i}"), BTreeMap::new())
                    .unwrap()
                    .id;
                if i % 5 == 0 {
                    pool.flush().unwrap();
                }
                snaps.push((s, acked));
                i += 1;
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            snaps
        })
    };

    for w in writers {
        w.join().unwrap();
    }
    stop.store(true, Ordering::Release);
    let snaps = snapper.join().unwrap();
    assert!(snaps.len() >= 2, "snapshots were taken while writing");

    for (s, acked) in &snaps {
        for t in 0..WRITERS {
            for k in 0..acked[t as usize] {
                assert!(
                    read(&pool, *s, offset(t, k)) == pattern(t, k),
                    "snapshot taken after writer {t} had {} writes acknowledged lacks write {k}",
                    acked[t as usize]
                );
            }
        }
    }
    for t in 0..WRITERS {
        for k in 0..PER_WRITER {
            assert_eq!(
                read(&pool, vol, offset(t, k)),
                pattern(t, k),
                "write {t}/{k}"
            );
        }
    }
    pool.flush().unwrap();
    let report = pool.check(false).unwrap();
    assert!(report.clean(), "{report:?}");
    drop(pool);

    let pool = ThinPool::import(&ImportOptions {
        kind: BackingKind::File,
        path,
        meta_dir: None,
        expected_id: None,
    })
    .unwrap();
    for t in 0..WRITERS {
        for k in 0..PER_WRITER {
            assert_eq!(
                read(&pool, vol, offset(t, k)),
                pattern(t, k),
                "after import {t}/{k}"
            );
        }
    }
    let report = pool.check(false).unwrap();
    assert!(report.clean(), "{report:?}");
}
