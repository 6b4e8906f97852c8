//! Thin volumes next to a raw file on the same file system, in one run: 4 KiB random
//! reads and writes at queue depth 1 and 32 (allocating writes apart from overwrites),
//! 1 MiB sequential reads and writes, snapshot time at 10k and 1M mapped chunks, and
//! random-read throughput after 1 and after 100 snapshots. Queue depth N is N threads
//! each with one request in flight. Prints a table, then `BENCH` lines.
//!
//! Run with `bench/run.sh thin` (or `cargo bench -p storaged --bench thin`). The directory
//! is `THIN_BENCH_DIR` (default `target/bench-thin`); `THIN_BENCH_QUICK=1` shrinks the
//! sizes for a smoke run (its figures are not the ones to quote).

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use storaged::exercise::Rng;
use storaged::{BackingKind, CreateOptions, ThinPool};
use uuid::Uuid;

const CHUNK: u64 = 64 << 10;
const K4: usize = 4096;
const M1: usize = 1 << 20;

/// Something the patterns run against: a thin volume or the raw file.
trait Target: Send + Sync {
    fn read(&self, offset: u64, buf: &mut [u8]);
    fn write(&self, offset: u64, data: &[u8]);
    /// Makes writes durable (fdatasync; for the pool, a commit too).
    fn sync(&self);
}

struct Raw(File);

impl Target for Raw {
    fn read(&self, offset: u64, buf: &mut [u8]) {
        self.0.read_exact_at(buf, offset).unwrap();
    }
    fn write(&self, offset: u64, data: &[u8]) {
        self.0.write_all_at(data, offset).unwrap();
    }
    fn sync(&self) {
        self.0.sync_data().unwrap();
    }
}

struct Thin(ThinPool, Uuid);

impl Target for Thin {
    fn read(&self, offset: u64, buf: &mut [u8]) {
        self.0.read(self.1, offset, buf).unwrap();
    }
    fn write(&self, offset: u64, data: &[u8]) {
        self.0.write(self.1, offset, data).unwrap();
    }
    fn sync(&self) {
        self.0.flush().unwrap();
    }
}

/// Runs `threads` workers, each issuing ops from its own list of offsets until the list
/// ends or `limit` passes. Returns ops per second.
fn run(
    target: &Arc<dyn Target>,
    threads: usize,
    offsets: Vec<Vec<u64>>,
    size: usize,
    write: bool,
    limit: Duration,
) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    std::thread::scope(|s| {
        for list in offsets.into_iter().take(threads) {
            let target = target.clone();
            let done = done.clone();
            s.spawn(move || {
                let mut buf = vec![0x5au8; size];
                for (i, off) in list.into_iter().enumerate() {
                    if write {
                        buf[0] = i as u8;
                        target.write(off, &buf);
                    } else {
                        target.read(off, &mut buf);
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                    if i % 64 == 0 && start.elapsed() > limit {
                        break;
                    }
                }
            });
        }
    });
    let rate = done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64();
    // Outside the timing: leave no dirty pages behind to slow the next measurement.
    if write {
        target.sync();
    }
    rate
}

/// Runs the same pattern on the thin volume and on the raw file, alternating, `reps`
/// times each; returns the median rate of each.
#[allow(clippy::too_many_arguments)]
fn side_by_side(
    thin: &Arc<dyn Target>,
    raw: &Arc<dyn Target>,
    reps: usize,
    threads: usize,
    offsets: &[Vec<u64>],
    size: usize,
    write: bool,
    limit: Duration,
) -> (f64, f64) {
    let (mut t, mut r) = (Vec::new(), Vec::new());
    for _ in 0..reps {
        t.push(run(thin, threads, offsets.to_vec(), size, write, limit));
        r.push(run(raw, threads, offsets.to_vec(), size, write, limit));
    }
    (median(t), median(r))
}

fn random_offsets(
    rng: &mut Rng,
    threads: usize,
    per_thread: usize,
    span: u64,
    align: u64,
) -> Vec<Vec<u64>> {
    (0..threads)
        .map(|_| {
            (0..per_thread)
                .map(|_| rng.below(span / align) * align)
                .collect()
        })
        .collect()
}

/// One 4 KiB write into each chunk, chunks in random order: every write allocates.
fn allocating_offsets(rng: &mut Rng, threads: usize, chunks: u64) -> Vec<Vec<u64>> {
    let mut order: Vec<u64> = (0..chunks).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let mut lists = vec![Vec::new(); threads];
    for (i, c) in order.into_iter().enumerate() {
        let within = rng.below(CHUNK / K4 as u64) * K4 as u64;
        lists[i % threads].push(c * CHUNK + within);
    }
    lists
}

fn sequential(span: u64) -> Vec<Vec<u64>> {
    vec![(0..span / M1 as u64).map(|i| i * M1 as u64).collect()]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn new_pool(dir: &Path, name: &str, data_bytes: u64) -> ThinPool {
    let path = dir.join(format!("{name}.img"));
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_dir_all(dir.join(format!("{name}.img.meta")));
    ThinPool::create(&CreateOptions {
        name: name.into(),
        kind: BackingKind::File,
        path,
        size: Some((1 << 20) + data_bytes),
        chunk_size: CHUNK,
        meta_dir: None,
        warning_threshold_percent: 0,
    })
    .unwrap()
}

fn new_raw(dir: &Path, name: &str, size: u64) -> Arc<dyn Target> {
    let path = dir.join(format!("{name}.raw"));
    let _ = std::fs::remove_file(&path);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    f.set_len(size).unwrap();
    Arc::new(Raw(f))
}

struct Row {
    name: &'static str,
    thin: f64,
    raw: f64,
    unit: &'static str,
}

fn main() {
    let quick = std::env::var("THIN_BENCH_QUICK").is_ok_and(|v| v == "1");
    let dir = PathBuf::from(
        std::env::var("THIN_BENCH_DIR").unwrap_or_else(|_| "target/bench-thin".into()),
    );
    std::fs::create_dir_all(&dir).unwrap();
    let span: u64 = if quick { 128 << 20 } else { 1 << 30 };
    let limit = Duration::from_secs(if quick { 1 } else { 3 });
    let per_thread = if quick { 20_000 } else { 200_000 };
    let mut rng = Rng::new(42);
    let mut rows = Vec::new();

    // Allocating writes: every write lands in a chunk never written before.
    let pool = new_pool(&dir, "alloc", span);
    let vol = pool
        .create_volume("v", span, 512, BTreeMap::new())
        .unwrap()
        .id;
    let thin: Arc<dyn Target> = Arc::new(Thin(pool.clone(), vol));
    let raw = new_raw(&dir, "alloc", span);
    let lists = allocating_offsets(&mut rng, 32, span / CHUNK);
    let t = run(&thin, 32, lists.clone(), K4, true, Duration::from_secs(600));
    let r = run(&raw, 32, lists, K4, true, Duration::from_secs(600));
    rows.push(Row {
        name: "4K random allocating write QD32",
        thin: t,
        raw: r,
        unit: "IOPS",
    });
    pool.flush().unwrap();
    drop((thin, raw, pool));

    // A fully written volume and a fully written raw file for the rest.
    // Three times the volume: the clones of the snapshot-depth test copy most of it.
    let pool = new_pool(&dir, "main", span * 3);
    let vol = pool
        .create_volume("v", span, 512, BTreeMap::new())
        .unwrap()
        .id;
    let thin: Arc<dyn Target> = Arc::new(Thin(pool.clone(), vol));
    let raw = new_raw(&dir, "main", span);
    let t = run(
        &thin,
        1,
        sequential(span),
        M1,
        true,
        Duration::from_secs(600),
    );
    let r = run(
        &raw,
        1,
        sequential(span),
        M1,
        true,
        Duration::from_secs(600),
    );
    rows.push(Row {
        name: "1M sequential write (first pass)",
        thin: t,
        raw: r,
        unit: "MiB/s",
    });
    for (name, qd, write) in [
        ("4K random overwrite QD1", 1, true),
        ("4K random overwrite QD32", 32, true),
        ("4K random read QD1", 1, false),
        ("4K random read QD32", 32, false),
    ] {
        let lists = random_offsets(&mut rng, qd, per_thread, span, K4 as u64);
        let (t, r) = side_by_side(&thin, &raw, 5, qd, &lists, K4, write, limit);
        rows.push(Row {
            name,
            thin: t,
            raw: r,
            unit: "IOPS",
        });
    }
    for (name, write) in [
        ("1M sequential overwrite", true),
        ("1M sequential read", false),
    ] {
        let (t, r) = side_by_side(
            &thin,
            &raw,
            5,
            1,
            &sequential(span),
            M1,
            write,
            Duration::from_secs(600),
        );
        rows.push(Row {
            name,
            thin: t,
            raw: r,
            unit: "MiB/s",
        });
    }

    // Random reads of a clone with 1 snapshot next to a clone with 100. Both clones of the
    // volume get the same 100 rounds of 4 KiB writes; `deep` is snapshotted after every
    // round, `one` after the first only. So both hold chunks copied by copy-on-write the
    // same way (the page cache keeps a file's pages in folios as large as the writes that
    // made them, and a file written by 64 KiB writes reads measurably slower than one
    // written by 1 MiB writes: see the raw-file row), and what differs is the number of
    // snapshots. The two are read alternately, so machine noise hits both alike.
    let one = pool.clone_volume(vol, "one", BTreeMap::new()).unwrap().id;
    let deep = pool.clone_volume(vol, "deep", BTreeMap::new()).unwrap().id;
    let one_target: Arc<dyn Target> = Arc::new(Thin(pool.clone(), one));
    let deep_target: Arc<dyn Target> = Arc::new(Thin(pool.clone(), deep));
    for i in 0..100 {
        let writes = random_offsets(&mut rng, 1, (span / CHUNK / 100) as usize, span, K4 as u64);
        for t in [&one_target, &deep_target] {
            run(t, 1, writes.clone(), K4, true, Duration::from_secs(600));
        }
        if i == 0 {
            pool.snapshot(one, "o0", BTreeMap::new()).unwrap();
        }
        pool.snapshot(deep, &format!("d{i}"), BTreeMap::new())
            .unwrap();
    }
    let lists = random_offsets(&mut rng, 32, per_thread, span, K4 as u64);
    let (after100, after1) =
        side_by_side(&deep_target, &one_target, 5, 32, &lists, K4, false, limit);
    // For reference: the original volume (written by 1 MiB writes) against the 100-snapshot
    // clone, and the same page-cache effect on plain files: the raw file (1 MiB writes)
    // against a copy of it written chunk by chunk, 64 KiB writes in random order.
    let (deep_vs_vol, vol_rate) =
        side_by_side(&deep_target, &thin, 3, 32, &lists, K4, false, limit);
    let copied = new_raw(&dir, "copied", span);
    let chunk_order = allocating_offsets(&mut rng, 1, span / CHUNK)
        .into_iter()
        .flatten()
        .map(|o| o / CHUNK * CHUNK)
        .collect();
    run(
        &copied,
        1,
        vec![chunk_order],
        CHUNK as usize,
        true,
        Duration::from_secs(600),
    );
    let (copied_rate, raw_rate) = side_by_side(&copied, &raw, 3, 32, &lists, K4, false, limit);
    drop(copied);
    let _ = std::fs::remove_file(dir.join("copied.raw"));
    drop((thin, raw, one_target, deep_target, pool));

    // Snapshot time with 10k and with 1M mapped chunks (one 4 KiB write maps a chunk).
    let mut snap_ms = Vec::new();
    for chunks in [10_000u64, if quick { 100_000 } else { 1_000_000 }] {
        let pool = new_pool(&dir, "snap", chunks * CHUNK);
        let vol = pool
            .create_volume("v", chunks * CHUNK, 512, BTreeMap::new())
            .unwrap()
            .id;
        let data = vec![7u8; K4];
        for c in 0..chunks {
            pool.write(vol, c * CHUNK, &data).unwrap();
        }
        pool.flush().unwrap();
        assert_eq!(
            pool.volume_info(vol).unwrap().allocated_bytes,
            chunks * CHUNK
        );
        let times: Vec<f64> = (0..9)
            .map(|i| {
                let t = Instant::now();
                let s = pool
                    .snapshot(vol, &format!("s{i}"), BTreeMap::new())
                    .unwrap();
                let ms = t.elapsed().as_secs_f64() * 1000.0;
                pool.delete_volume(s.id).unwrap();
                ms
            })
            .collect();
        snap_ms.push((chunks, median(times)));
        drop(pool);
        let _ = std::fs::remove_file(dir.join("snap.img"));
    }

    println!(
        "{:<36} {:>14} {:>14} {:>8}  unit",
        "pattern", "thin", "raw file", "ratio"
    );
    for r in &rows {
        println!(
            "{:<36} {:>14.0} {:>14.0} {:>8.2}  {}",
            r.name,
            r.thin,
            r.raw,
            r.thin / r.raw,
            r.unit
        );
    }
    println!(
        "{:<36} {:>14} {:>14} {:>8}  unit",
        "4K random read QD32", "first", "second", "ratio"
    );
    for (name, a, b) in [
        ("clone: 100 / 1 snapshots", after100, after1),
        ("100-snapshot clone / original", deep_vs_vol, vol_rate),
        ("raw file: 64K-written / 1M-written", copied_rate, raw_rate),
    ] {
        println!("{name:<36} {a:>14.0} {b:>14.0} {:>8.2}  IOPS", a / b);
    }
    for (chunks, ms) in &snap_ms {
        println!(
            "{:<36} {:>14.2} ms",
            format!("snapshot with {chunks} mapped chunks"),
            ms
        );
    }
    let ratio = |name: &str| {
        rows.iter()
            .find(|r| r.name == name)
            .map(|r| r.thin / r.raw)
            .unwrap()
    };
    let overwrite = median(vec![
        ratio("4K random overwrite QD1"),
        ratio("4K random overwrite QD32"),
        ratio("1M sequential overwrite"),
    ]);
    println!("BENCH thin_overwrite_ratio {:.3} x", overwrite);
    println!(
        "BENCH thin_alloc_write_ratio {:.3} x",
        ratio("4K random allocating write QD32")
    );
    println!(
        "BENCH thin_seq_read_ratio {:.3} x",
        ratio("1M sequential read")
    );
    println!(
        "BENCH thin_snapshot_scaling {:.3} x",
        snap_ms[1].1 / snap_ms[0].1
    );
    println!("BENCH thin_depth100_read_ratio {:.3} x", after100 / after1);
    let _ = std::fs::remove_dir_all(&dir);
}
