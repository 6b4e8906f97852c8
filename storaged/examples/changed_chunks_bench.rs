//! The changed-chunk query (`ThinPool::changed_chunks`, behind `ListChangedChunks`) on a
//! 4 GiB and a 64 GiB thin volume with every chunk allocated, between a snapshot and a
//! later one after 1% of the 4 GiB volume (655 chunks of 64 KiB) was rewritten in each:
//! once as one contiguous region (a guest rewriting a file), once scattered at random (the
//! worst case: every rewritten chunk in a leaf of its own where the volume is large
//! enough). Also 1% of the 64 GiB volume, contiguous, for scale. Prints the median of
//! RUNS queries and the tree nodes each read.
//!
//! `cargo run -p storaged --example changed_chunks_bench [DIR]` (default
//! `target/bench-cbt`; needs about 5 GB of disk: the pool file is sparse, and only one
//! block of each chunk is written). Ends with `BENCH backup_cbt_scaling`: the 64 GiB
//! volume's query time over the 4 GiB one's for the same 1% change, the worse of the
//! contiguous and the scattered rewrite (`bench/run.sh backup`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use storaged::exercise::Rng;
use storaged::{BackingKind, CreateOptions, ThinPool};
use uuid::Uuid;

const CHUNK: u64 = 64 << 10;
const GIB: u64 = 1 << 30;
const RUNS: usize = 21;

/// 1% of the chunks of a 4 GiB volume.
const SMALL_CHANGE: u64 = 4 * GIB / CHUNK / 100;

fn fill(pool: &ThinPool, vol: Uuid, chunks: u64) {
    let block = [0x5au8; 4096];
    for c in 0..chunks {
        pool.write(vol, c * CHUNK, &block).unwrap();
    }
    pool.flush().unwrap();
}

/// The median time of a full query (every page) and the nodes it read.
fn query(pool: &ThinPool, vol: Uuid, base: Uuid, target: Uuid, want: u64) -> (Duration, u64) {
    let mut times = Vec::with_capacity(RUNS);
    let mut nodes = 0;
    for _ in 0..RUNS {
        let start = Instant::now();
        let (mut from, mut changed) = (0, 0);
        nodes = 0;
        loop {
            let page = pool
                .changed_chunks(vol, Some(base), target, from, 10_000)
                .unwrap();
            changed += page.ranges.iter().map(|r| r.count).sum::<u64>();
            nodes += page.nodes_visited;
            match page.next {
                Some(n) => from = n,
                None => break,
            }
        }
        times.push(start.elapsed());
        assert_eq!(changed, want, "the query found every rewritten chunk");
    }
    times.sort_unstable();
    (times[RUNS / 2], nodes)
}

fn main() {
    let dir = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/bench-cbt"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let pool = ThinPool::create(&CreateOptions {
        name: "cbt".into(),
        kind: BackingKind::File,
        path: dir.join("pool.img"),
        size: Some(72 * GIB),
        chunk_size: CHUNK,
        meta_dir: None,
        warning_threshold_percent: 0,
    })
    .unwrap();
    let mut rng = Rng::new(27);
    // The query times of the cases both volumes run, by case, 4 GiB first.
    let mut both: BTreeMap<&str, Vec<Duration>> = BTreeMap::new();
    println!(
        "{:<8} {:<26} {:>8} {:>10} {:>8}",
        "volume", "rewritten", "chunks", "query", "nodes"
    );
    for gib in [4, 64] {
        let chunks = gib * GIB / CHUNK;
        let t = Instant::now();
        let vol = pool
            .create_volume(&format!("v{gib}"), gib * GIB, 512, BTreeMap::new())
            .unwrap()
            .id;
        fill(&pool, vol, chunks);
        eprintln!("{gib} GiB volume filled in {:?}", t.elapsed());
        let mut cases = vec![
            (
                "1% of 4 GiB, contiguous",
                (0..SMALL_CHANGE).collect::<Vec<u64>>(),
            ),
            ("1% of 4 GiB, scattered", {
                let mut picked = std::collections::BTreeSet::new();
                while (picked.len() as u64) < SMALL_CHANGE {
                    picked.insert(rng.below(chunks));
                }
                picked.into_iter().collect()
            }),
        ];
        if gib == 64 {
            cases.push(("1% of 64 GiB, contiguous", (0..chunks / 100).collect()));
        }
        for (i, (what, rewrite)) in cases.into_iter().enumerate() {
            let base = pool
                .snapshot(vol, &format!("v{gib}@{i}a"), BTreeMap::new())
                .unwrap()
                .id;
            for &c in &rewrite {
                pool.write(vol, c * CHUNK, &[i as u8 + 1; 4096]).unwrap();
            }
            let target = pool
                .snapshot(vol, &format!("v{gib}@{i}b"), BTreeMap::new())
                .unwrap()
                .id;
            let (time, nodes) = query(&pool, vol, base, target, rewrite.len() as u64);
            if what.contains("of 4 GiB") {
                both.entry(what).or_default().push(time);
            }
            println!(
                "{:<8} {what:<26} {:>8} {:>8.2}ms {nodes:>8}",
                format!("{gib} GiB"),
                rewrite.len(),
                time.as_secs_f64() * 1e3
            );
            pool.delete_volume(base).unwrap();
            pool.delete_volume(target).unwrap();
        }
        pool.delete_volume(vol).unwrap();
    }
    drop(pool);
    let _ = std::fs::remove_dir_all(&dir);
    let worst = both
        .values()
        .map(|t| t[1].as_secs_f64() / t[0].as_secs_f64())
        .fold(0.0, f64::max);
    println!("BENCH backup_cbt_scaling {worst:.2} x");
}
