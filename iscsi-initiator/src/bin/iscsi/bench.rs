//! `iscsi bench`: a fixed load on one LUN: `--qd` commands always in flight, each a read
//! or write of `--bs` bytes at a random or the next sequential offset, for `--seconds`.
//! Prints IOPS, MiB/s and mean latency, and a last line `iops=N mib_s=N lat_us=N` for
//! scripts.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::{Bytes, BytesMut};
use clap::{Args, ValueEnum};
use iscsi_initiator::Lun;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Op {
    Read,
    Write,
}

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    pub url: String,
    #[arg(long, value_enum, default_value_t = Op::Read)]
    pub op: Op,
    /// Random offsets (else sequential, wrapping at the end of the span).
    #[arg(long)]
    pub random: bool,
    /// Bytes per command.
    #[arg(long, default_value_t = 4096)]
    pub bs: usize,
    /// Commands in flight.
    #[arg(long, default_value_t = 32)]
    pub qd: usize,
    /// How long to run.
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    /// Bytes of the LUN to spread the load over (the whole LUN when left out).
    #[arg(long)]
    pub span: Option<u64>,
}

/// xorshift64*: cheap and good enough to spread offsets.
fn next_random(state: &mut u64) -> u64 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    state.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

pub async fn run(lun: &Lun, a: &BenchArgs) -> anyhow::Result<()> {
    let bs = lun.block_size() as usize;
    if a.bs == 0 || !a.bs.is_multiple_of(bs) {
        bail!("--bs must be a positive multiple of the block size {bs}");
    }
    if a.qd == 0 {
        bail!("--qd must be at least 1");
    }
    let span = a.span.unwrap_or(lun.size()).min(lun.size());
    let slots = span / a.bs as u64;
    if slots == 0 {
        bail!("the span is smaller than one command");
    }
    let blocks_per = (a.bs / bs) as u64;
    let ios = Arc::new(AtomicU64::new(0));
    let lat_ns = Arc::new(AtomicU64::new(0));
    let seq = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let data = Bytes::from((0..a.bs).map(|i| (i * 7 + 3) as u8).collect::<Vec<u8>>());
    let mut workers = tokio::task::JoinSet::new();
    let start = Instant::now();
    for w in 0..a.qd {
        let (lun, ios, lat_ns, seq, stop, data) = (
            lun.clone(),
            ios.clone(),
            lat_ns.clone(),
            seq.clone(),
            stop.clone(),
            data.clone(),
        );
        let (op, random, len) = (a.op, a.random, a.bs);
        workers.spawn(async move {
            let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ ((w as u64 + 1) << 32);
            let mut buf = BytesMut::zeroed(len);
            while !stop.load(Ordering::Relaxed) {
                let slot = if random {
                    next_random(&mut rng) % slots
                } else {
                    seq.fetch_add(1, Ordering::Relaxed) % slots
                };
                let lba = slot * blocks_per;
                let t0 = Instant::now();
                match op {
                    Op::Read => buf = lun.read_into(lba, buf).await?,
                    Op::Write => lun.write(lba, data.clone()).await?,
                }
                lat_ns.fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
                ios.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(())
        });
    }
    tokio::time::sleep(Duration::from_secs_f64(a.seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let elapsed = start.elapsed().as_secs_f64();
    while let Some(r) = workers.join_next().await {
        r.context("bench worker")??;
    }
    let n = ios.load(Ordering::Relaxed);
    let iops = n as f64 / elapsed;
    let mib_s = iops * a.bs as f64 / (1024.0 * 1024.0);
    let lat_us = if n > 0 {
        lat_ns.load(Ordering::Relaxed) as f64 / n as f64 / 1000.0
    } else {
        0.0
    };
    let stats = lun.session().stats();
    println!(
        "{:?} {} bs={} qd={} {:.1}s: {:.0} IOPS, {:.1} MiB/s, mean latency {:.0} us \
         (max in flight {}, retries {}, reconnects {})",
        a.op,
        if a.random { "random" } else { "sequential" },
        a.bs,
        a.qd,
        elapsed,
        iops,
        mib_s,
        lat_us,
        stats.max_in_flight,
        stats.retries,
        stats.reconnects
    );
    println!("iops={iops:.0} mib_s={mib_s:.1} lat_us={lat_us:.0}");
    Ok(())
}
