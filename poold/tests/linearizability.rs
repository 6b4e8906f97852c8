//! Concurrent clients write and read a register (the pool's name) while members are killed
//! and partitioned; the history is checked against a sequential register with the
//! Wing–Gong search (with memoisation, as in Lowe's and porcupine's checkers).
//!
//! A write whose outcome is unknown (every retry failed) may take effect at any time after
//! it was invoked, or never. Failed reads are dropped: they observed nothing.
//! `POOLD_LONG_TESTS=1` runs longer, with five members.

mod common;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use proto::coordinator as pb;

#[derive(Debug, Clone)]
enum Kind {
    Write(String),
    Read(String),
}

#[derive(Debug, Clone)]
struct Op {
    kind: Kind,
    invoke: u64,
    /// None: outcome unknown (a write that may or may not have happened).
    complete: Option<u64>,
}

/// True when some order of the operations, consistent with real time, is a legal
/// history of a register that starts at `init`.
fn linearizable(ops: &[Op], init: &str) -> bool {
    let n = ops.len();
    let words = n.div_ceil(64).max(1);
    let mut values: Vec<String> = vec![init.to_owned()];
    let intern = |v: &str, values: &mut Vec<String>| -> usize {
        match values.iter().position(|x| x == v) {
            Some(i) => i,
            None => {
                values.push(v.to_owned());
                values.len() - 1
            }
        }
    };
    let vals: Vec<(bool, usize)> = ops
        .iter()
        .map(|o| match &o.kind {
            Kind::Write(v) => (true, intern(v, &mut values)),
            Kind::Read(v) => (false, intern(v, &mut values)),
        })
        .collect();
    let must: usize = ops.iter().filter(|o| o.complete.is_some()).count();
    let mut seen: HashSet<(Vec<u64>, usize)> = HashSet::new();
    // Iterative depth-first search: (linearized set, state, how many determinate done).
    let mut stack: Vec<(Vec<u64>, usize, usize)> = vec![(vec![0; words], 0, 0)];
    while let Some((done, state, count)) = stack.pop() {
        if count == must {
            return true;
        }
        if !seen.insert((done.clone(), state)) {
            continue;
        }
        let is_done = |i: usize| done[i / 64] >> (i % 64) & 1 == 1;
        // An operation can go next only if it was invoked before every pending
        // operation's completion.
        let horizon = (0..n)
            .filter(|&i| !is_done(i))
            .filter_map(|i| ops[i].complete)
            .min()
            .unwrap_or(u64::MAX);
        for i in 0..n {
            if is_done(i) || ops[i].invoke > horizon {
                continue;
            }
            let (write, v) = vals[i];
            let next = if write {
                v
            } else if v == state {
                state
            } else {
                continue;
            };
            let mut d = done.clone();
            d[i / 64] |= 1 << (i % 64);
            stack.push((d, next, count + usize::from(ops[i].complete.is_some())));
        }
    }
    false
}

#[test]
fn checker_accepts_and_rejects_known_histories() {
    let w = |v: &str, a, b| Op {
        kind: Kind::Write(v.into()),
        invoke: a,
        complete: Some(b),
    };
    let r = |v: &str, a, b| Op {
        kind: Kind::Read(v.into()),
        invoke: a,
        complete: Some(b),
    };
    // Sequential and legal.
    assert!(linearizable(&[w("a", 0, 1), r("a", 2, 3)], "0"));
    // A read after a completed write that returns the old value: stale, illegal.
    assert!(!linearizable(&[w("a", 0, 1), r("0", 2, 3)], "0"));
    // Concurrent write and read: either value is fine.
    assert!(linearizable(&[w("a", 0, 5), r("0", 1, 2)], "0"));
    assert!(linearizable(&[w("a", 0, 5), r("a", 1, 2)], "0"));
    // Once a read saw the new value, a later read must not see the old one.
    assert!(!linearizable(
        &[w("a", 0, 10), r("a", 1, 2), r("0", 3, 4)],
        "0"
    ));
    // An unknown-outcome write may have happened late, or never.
    let lost = Op {
        kind: Kind::Write("x".into()),
        invoke: 0,
        complete: None,
    };
    assert!(linearizable(
        &[lost.clone(), r("0", 5, 6), r("x", 7, 8)],
        "0"
    ));
    assert!(linearizable(&[lost.clone(), r("0", 5, 6)], "0"));
    assert!(!linearizable(&[lost, r("x", 5, 6), r("0", 7, 8)], "0"));
}

fn settings(name: &str) -> pb::PoolSettings {
    pb::PoolSettings {
        name: name.to_owned(),
        placement: pb::PlacementStrategy::Spread as i32,
        cpu_overcommit_percent: 400,
        memory_overcommit_percent: 100,
        host_heartbeat_timeout_seconds: 30,
        migration_downtime_budget_ms: 300,
        schedules: Vec::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_history_is_linearizable_under_kills_and_partitions() {
    let _serial = SERIAL.lock().await;
    let long = std::env::var("POOLD_LONG_TESTS").is_ok_and(|v| v == "1");
    let (members, run_for, clients) = if long {
        (5u64, Duration::from_secs(90), 6)
    } else {
        (3u64, Duration::from_secs(15), 4)
    };
    let mut cl = Cluster::start(members, &[]);
    cl.leader(Duration::from_secs(15)).await;
    let t0 = Instant::now();
    let ns = move || t0.elapsed().as_nanos() as u64;
    let history: Arc<Mutex<Vec<Op>>> = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..clients {
        let mut c = cl.client().await;
        c.deadline = Duration::from_secs(6);
        c.attempt_timeout = Duration::from_secs(2);
        let history = history.clone();
        let stop = stop.clone();
        workers.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                i += 1;
                let invoke = ns();
                if (i + w).is_multiple_of(2) {
                    let v = format!("c{w}-{i}");
                    let req = pb::UpdatePoolSettingsRequest {
                        request_id: pool_client::new_request_id(),
                        settings: Some(settings(&v)),
                    };
                    let r = c
                        .call(|mut p| {
                            let req = req.clone();
                            async move { p.update_pool_settings(req).await }
                        })
                        .await;
                    history.lock().unwrap().push(Op {
                        kind: Kind::Write(v),
                        invoke,
                        complete: r.is_ok().then(ns),
                    });
                } else {
                    let r = c
                        .call(|mut p| async move { p.get_pool(pb::GetPoolRequest {}).await })
                        .await;
                    if let Ok(p) = r {
                        history.lock().unwrap().push(Op {
                            kind: Kind::Read(p.settings.unwrap_or_default().name),
                            invoke,
                            complete: Some(ns()),
                        });
                    }
                }
            }
        }));
    }
    // The nemesis: kill and restart a member, or cut one off and heal, in turn.
    let mut round = 0u64;
    while t0.elapsed() < run_for {
        round += 1;
        let victim = 1 + (round * 7 + 3) % members;
        if round.is_multiple_of(2) {
            cl.kill(victim);
            tokio::time::sleep(Duration::from_millis(1500)).await;
            cl.spawn(victim);
        } else {
            cl.isolate(victim).await;
            tokio::time::sleep(Duration::from_millis(1500)).await;
            cl.heal().await;
        }
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    let ops = history.lock().unwrap().clone();
    let writes = ops
        .iter()
        .filter(|o| matches!(o.kind, Kind::Write(_)))
        .count();
    let reads = ops.len() - writes;
    let unknown = ops.iter().filter(|o| o.complete.is_none()).count();
    eprintln!(
        "history: {writes} writes ({unknown} of unknown outcome), {reads} reads, {round} nemesis rounds"
    );
    assert!(
        writes > 20 && reads > 20,
        "the history is too short to mean anything"
    );
    let ok = std::thread::Builder::new()
        .stack_size(64 << 20)
        .spawn(move || linearizable(&ops, "pool"))
        .unwrap()
        .join()
        .unwrap();
    assert!(ok, "the history is not linearizable");
}
