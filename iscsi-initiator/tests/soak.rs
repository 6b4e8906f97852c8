//! A long randomized run, off by default (`cargo test -p iscsi-initiator --test soak --
//! --ignored`; `INITIATOR_SOAK_SECS` sets its length, 20 s by default): workers issue
//! random reads, writes, WRITE SAMEs, flushes and (on our target) UNMAPs of random sizes
//! with digests on, each in a region of its own so that a model of the LUN predicts
//! every read, while the target is restarted now and then. Every call must succeed and
//! every read must match the model.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{Peer, PeerOptions, pattern};
use iscsi_initiator::Session;

const WORKERS: u64 = 8;
const REGION: u64 = 4096; // blocks per worker

fn soak(mut p: Peer) {
    let secs: u64 = std::env::var("INITIATOR_SOAK_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut cfg = p.config();
    cfg.header_digest = true;
    cfg.data_digest = true;
    cfg.timeouts.replacement = Duration::from_secs(60);
    let session = rt.block_on(Session::connect(cfg)).unwrap();
    let lun = rt.block_on(session.lun(p.lun())).unwrap();
    let unmap_zeroes = matches!(p, Peer::Ours(_));
    let stop = Arc::new(AtomicBool::new(false));
    let ops = Arc::new(AtomicU64::new(0));
    let mut handles = Vec::new();
    for w in 0..WORKERS {
        let (lun, stop, ops) = (lun.clone(), stop.clone(), ops.clone());
        handles.push(rt.spawn(async move {
            let base = w * REGION;
            let mut model = vec![0u8; (REGION * 512) as usize];
            // Start from a known state.
            lun.write_zeroes(base, REGION as u32, false).await.unwrap();
            let mut rng = 0x1234_5678_9abc_def1u64 ^ (w << 40);
            let mut next = move || {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng
            };
            let mut round = 0u64;
            while !stop.load(Ordering::Relaxed) {
                round += 1;
                let blocks = 1 + next() % 2048;
                let at = next() % (REGION - blocks);
                let (lba, off, len) = (base + at, (at * 512) as usize, (blocks * 512) as usize);
                match next() % 10 {
                    0..=3 => {
                        let d = pattern(lba, round, len);
                        lun.write(lba, Bytes::from(d.clone())).await.unwrap();
                        model[off..off + len].copy_from_slice(&d);
                    }
                    4..=6 => {
                        let got = lun.read(lba, blocks as u32).await.unwrap();
                        assert!(
                            got[..] == model[off..off + len],
                            "worker {w}: {blocks} blocks at {lba} differ from the model"
                        );
                    }
                    7 => {
                        let b = pattern(lba, round, 512);
                        lun.write_same(lba, blocks as u32, Bytes::from(b.clone()), false)
                            .await
                            .unwrap();
                        for c in model[off..off + len].chunks_mut(512) {
                            c.copy_from_slice(&b);
                        }
                    }
                    8 if unmap_zeroes => {
                        lun.unmap(&[(lba, blocks as u32)]).await.unwrap();
                        model[off..off + len].fill(0);
                    }
                    _ => lun.flush().await.unwrap(),
                }
                ops.fetch_add(1, Ordering::Relaxed);
            }
            let got = lun.read(base, REGION as u32).await.unwrap();
            assert!(got[..] == model[..], "worker {w}: final contents differ");
        }));
    }
    let end = Instant::now() + Duration::from_secs(secs);
    let mut restarts = 0;
    while Instant::now() < end {
        std::thread::sleep(Duration::from_secs(4).min(end - Instant::now()));
        if Instant::now() < end {
            p.restart(Duration::from_millis(300));
            restarts += 1;
        }
    }
    stop.store(true, Ordering::Relaxed);
    rt.block_on(async {
        for h in handles {
            h.await.expect("a worker failed");
        }
    });
    eprintln!(
        "{}: {} operations, {restarts} restarts, {:?}",
        p.name(),
        ops.load(Ordering::Relaxed),
        session.stats()
    );
    rt.block_on(session.logout()).unwrap();
}

mod soak_random_io_with_restarts {
    use super::*;

    #[test]
    #[ignore = "long: run with --ignored"]
    fn tgt() {
        if let Some(p) = Peer::tgt(PeerOptions::default()) {
            soak(p);
        }
    }

    #[test]
    #[ignore = "long: run with --ignored"]
    fn ours() {
        soak(Peer::ours(PeerOptions::default()));
    }
}
