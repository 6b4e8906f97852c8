//! Checkpoints (VM snapshots with memory) through the pool, with real processes: three
//! `poold` members, two `hostd` and one `storaged`, and the test guest counting
//! heartbeats. A checkpoint pauses the guest briefly and it runs on; reverting to one
//! starts the guest from that instant, running, on the host asked for (its count goes on
//! from there, it is not booted), with its disk as it was; checkpoints form a tree with
//! branches, and deleting a node keeps its children.

use std::time::{Duration, Instant};

use e2e_tests::pool::{Pool, console_until, field, guest_elf, guest_vm, heartbeat_seqs};

/// Waits for the guest's console to show heartbeat `at_least` or later; the highest seen.
fn heartbeat_at_least(pool: &Pool, vm: &str, at_least: u64) -> u64 {
    console_until(&pool.p, None, vm, Duration::from_secs(60), |seen| {
        let max = heartbeat_seqs(seen).into_iter().max()?;
        (max >= at_least).then(|| max.to_string())
    })
    .and_then(|n| n.parse().ok())
    .unwrap_or_else(|| panic!("{vm} counts to {at_least}\n{}", pool.logs()))
}

/// Everything the console shows in `d` (its history, then what comes).
fn console_for(pool: &Pool, vm: &str, d: Duration) -> String {
    let start = Instant::now();
    console_until(&pool.p, None, vm, d + Duration::from_secs(30), |seen| {
        (start.elapsed() >= d).then(|| seen.to_owned())
    })
    .unwrap_or_else(|| panic!("{vm}'s console\n{}", pool.logs()))
}

/// Takes checkpoint `name` of `vm` once it counted to `from`: bounds of its count at the
/// checkpoint (one seen before the call, the highest of its whole history after).
fn checkpoint(pool: &Pool, vm: &str, name: &str, from: u64) -> (u64, u64) {
    let lo = heartbeat_at_least(pool, vm, from);
    let out = pool.ctl(&["vm-checkpoint", vm, name]);
    println!("checkpoint {name}: {}", out.trim());
    let seen = console_for(pool, vm, Duration::from_secs(1));
    let hi = heartbeat_seqs(&seen).into_iter().max().unwrap_or(0);
    assert!(hi >= lo, "{vm} counts on after the checkpoint: {seen}");
    (lo, hi)
}

/// The first heartbeat the guest prints after `revert` (which must not boot it), and
/// the console it was read from.
fn first_heartbeat_after(pool: &Pool, vm: &str) -> (u64, String) {
    let console = console_until(&pool.p, None, vm, Duration::from_secs(30), |seen| {
        (heartbeat_seqs(seen).len() >= 2).then(|| seen.to_owned())
    })
    .unwrap_or_else(|| panic!("{vm} counts after the revert\n{}", pool.logs()));
    assert!(
        !console.contains("GUEST start"),
        "not booted: {console}\n{}",
        pool.logs()
    );
    (heartbeat_seqs(&console)[0], console)
}

/// Stops `vm` at once (a power cut), as a revert needs.
fn pull_the_plug(pool: &Pool, vm: &str) {
    pool.ctl(&["vm-shutdown", vm, "--force"]);
    pool.wait_vm(vm, "\"power\": \"stopped\"", Duration::from_secs(60));
}

/// Boots `vm` afresh with `cmdline` and returns its `BLK done` line.
fn boot_and_check_disk(pool: &Pool, vm: &str, cmdline: &str) -> String {
    pool.ctl(&["vm-set", vm, "--cmdline", cmdline]);
    pool.ctl(&["vm-start", vm]);
    pool.wait_vm(vm, "\"power\": \"running\"", Duration::from_secs(60));
    console_until(&pool.p, None, vm, Duration::from_secs(60), |seen| {
        seen.lines()
            .find(|l| l.starts_with("BLK done") && seen.contains(&format!("{l}\n")))
            .map(str::to_owned)
    })
    .unwrap_or_else(|| panic!("{vm}'s disk line\n{}", pool.logs()))
}

/// Snapshot rows of `vm-snapshot-list --json`: name → (id, parent id, memory).
fn tree(pool: &Pool, vm: &str) -> Vec<(String, String, String, String)> {
    pool.ctl(&["vm-snapshot-list", vm, "--json"])
        .lines()
        .filter(|l| l.contains("\"id\""))
        .map(|l| {
            (
                field(l, "name"),
                field(l, "id"),
                field(l, "parent"),
                l.split("\"memory\": ")
                    .nth(1)
                    .map(|r| r.split([',', '}']).next().unwrap_or("").trim().to_owned())
                    .unwrap_or_default(),
            )
        })
        .collect()
}

fn id_of(rows: &[(String, String, String, String)], name: &str) -> String {
    rows.iter()
        .find(|r| r.0 == name)
        .map(|r| r.1.clone())
        .unwrap_or_else(|| panic!("{name} in {rows:?}"))
}

fn parent_of(rows: &[(String, String, String, String)], name: &str) -> String {
    rows.iter()
        .find(|r| r.0 == name)
        .map(|r| r.2.clone())
        .unwrap_or_else(|| panic!("{name} in {rows:?}"))
}

#[test]
fn a_vm_reverted_to_a_checkpoint_runs_on_from_it_and_the_tree_branches() {
    let dir = tempfile::tempdir().unwrap();
    let pool = Pool::start(dir.path(), 2);
    pool.wait_hosts_enabled();
    pool.create_sr(dir.path(), "sr1", "1G");
    pool.ctl(&["vdi-create", "cp-disk", "--sr", "sr1", "--size", "16M"]);
    pool.ctl(&["vdi-create", "idle-disk", "--sr", "sr1", "--size", "16M"]);
    let elf = guest_elf(dir.path());
    let seed7 = "seed=7 blk=rw mode=heartbeat hb_ms=200";
    pool.ctl(&guest_vm("cp", "cp-disk", &elf, seed7, &["--start"]));
    pool.wait_vm("cp", "\"power\": \"running\"", Duration::from_secs(60));
    console_until(&pool.p, None, "cp", Duration::from_secs(60), |seen| {
        seen.contains("BLK done devices=1 result=ok")
            .then(String::new)
    })
    .unwrap_or_else(|| panic!("the guest wrote its disk\n{}", pool.logs()));

    // A stopped VM has no memory to save: refused, nothing made.
    pool.ctl(&guest_vm("idle", "idle-disk", &elf, "seed=3", &[]));
    let volumes = || pool.ctl(&["vdi-list", "--json"]).matches("\"id\"").count();
    let before_volumes = volumes();
    pool.refused(&["vm-checkpoint", "idle", "nothing"], "running or paused");
    assert_eq!(volumes(), before_volumes, "no volume made");

    // c1: the guest pauses briefly and runs on; the checkpoint holds memory and disks.
    let (c1_lo, c1_hi) = checkpoint(&pool, "cp", "c1", 3);
    let rows = tree(&pool, "cp");
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].3, "true", "c1 holds memory: {rows:?}");
    let line = pool.vm("cp").unwrap();
    assert!(line.contains("\"power\": \"running\""), "{line}");
    let first = field(&line, "host");

    // Write more: a new boot writes another pattern over the disk; c2 is taken there.
    pull_the_plug(&pool, "cp");
    let seed9 = "seed=9 blk=rw mode=heartbeat hb_ms=200";
    assert_eq!(
        boot_and_check_disk(&pool, "cp", seed9),
        "BLK done devices=1 result=ok"
    );
    // Each checkpoint's count lies well past the one before: a revert shows which it is.
    let (c2_lo, c2_hi) = checkpoint(&pool, "cp", "c2", c1_hi + 5);
    let late = heartbeat_at_least(&pool, "cp", c2_hi + 5);

    // A revert needs the VM stopped, and a disk snapshot takes no host.
    pool.refused(&["vm-revert", "cp", "c1"], "shut it down");
    pull_the_plug(&pool, "cp");
    pool.ctl(&["vm-snapshot", "cp", "disks-only"]);
    pool.refused(
        &["vm-revert", "cp", "disks-only", "--host", &first],
        "holds the disks alone",
    );

    // Back to c1 on the other host: running there from c1's instant, not booted.
    let hosts = pool.ctl(&["host-list", "--json"]);
    let other = hosts
        .lines()
        .find(|l| l.contains("\"id\": \"") && !l.contains(&format!("\"id\": \"{first}\"")))
        .map(|l| field(l, "id"))
        .unwrap_or_else(|| panic!("a second host: {hosts}"));
    pool.ctl(&["vm-revert", "cp", "c1", "--host", &other]);
    let line = pool.wait_vm("cp", "\"power\": \"running\"", Duration::from_secs(30));
    assert_eq!(field(&line, "host"), other, "{line}");
    let (at, console) = first_heartbeat_after(&pool, "cp");
    println!("c1 taken between heartbeats {c1_lo} and {c1_hi}; after the revert: {at}");
    assert!(
        at > c1_lo && at <= c1_hi + 1,
        "the count goes on from c1 ({c1_lo}..{c1_hi}), not from 1 or {late}: {at}\n{console}"
    );

    // A branch: c3, taken after going back to c1 (and counting past c2), is c1's child
    // beside c2.
    let (c3_lo, c3_hi) = checkpoint(&pool, "cp", "c3", late + 5);
    let rows = tree(&pool, "cp");
    let c1 = id_of(&rows, "c1");
    assert_eq!(parent_of(&rows, "c2"), c1, "{rows:?}");
    assert_eq!(parent_of(&rows, "c3"), c1, "{rows:?}");

    // Back to c2 (the other branch), on the first host: its count and its disk.
    pull_the_plug(&pool, "cp");
    pool.ctl(&["vm-revert", "cp", "c2", "--host", &first]);
    let line = pool.wait_vm("cp", "\"power\": \"running\"", Duration::from_secs(30));
    assert_eq!(field(&line, "host"), first, "{line}");
    let (at, console) = first_heartbeat_after(&pool, "cp");
    assert!(
        at > c2_lo && at <= c2_hi + 1,
        "the count goes on from c2 ({c2_lo}..{c2_hi}): {at}\n{console}"
    );
    pull_the_plug(&pool, "cp");
    assert_eq!(
        boot_and_check_disk(&pool, "cp", "seed=9 blk=verify mode=heartbeat"),
        "BLK done devices=1 result=ok",
        "c2's disk holds the second pattern"
    );

    // Deleting c1 keeps its children (now roots) and takes its saved state along.
    let c1_state = pool
        .ctl(&["vdi-list", "--json"])
        .lines()
        .filter(|l| l.contains(".state."))
        .count();
    assert_eq!(c1_state, 3, "one state volume per checkpoint");
    pool.ctl(&["vm-snapshot-delete", &c1]);
    let rows = tree(&pool, "cp");
    assert_eq!(parent_of(&rows, "c2"), "", "{rows:?}");
    assert_eq!(parent_of(&rows, "c3"), "", "{rows:?}");
    let states = pool
        .ctl(&["vdi-list", "--json"])
        .lines()
        .filter(|l| l.contains(".state."))
        .count();
    assert_eq!(states, 2, "c1's saved state is gone");

    // c3 still reverts: from its own instant, with c1's disk (the first pattern).
    pull_the_plug(&pool, "cp");
    pool.ctl(&["vm-revert", "cp", "c3"]);
    pool.wait_vm("cp", "\"power\": \"running\"", Duration::from_secs(30));
    let (at, console) = first_heartbeat_after(&pool, "cp");
    assert!(
        at > c3_lo && at <= c3_hi + 1,
        "the count goes on from c3 ({c3_lo}..{c3_hi}): {at}\n{console}"
    );
    pull_the_plug(&pool, "cp");
    assert_eq!(
        boot_and_check_disk(&pool, "cp", "seed=7 blk=verify mode=heartbeat"),
        "BLK done devices=1 result=ok",
        "c3's disk holds the first pattern"
    );
}

/// The figure after `prefix` in poolctl's output (`paused 12 ms`, `downtime 0.9 ms`).
fn figure(out: &str, prefix: &str) -> f64 {
    out.lines()
        .find_map(|l| l.strip_prefix(prefix))
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("{prefix:?} in {out}"))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// `bench/run.sh backup`: the pause of a checkpoint of a 512 MiB guest rewriting 32 MiB
/// at 50 MiB/s (as bench/migration.sh's dirty guest), next to a live migration's downtime
/// of the same guest in the same pool, three rounds of each, medians. Release build.
#[test]
#[ignore = "a benchmark: bench/run.sh backup"]
fn checkpoint_pause_next_to_migration_downtime() {
    let dir = tempfile::tempdir().unwrap();
    let pool = Pool::start(dir.path(), 2);
    pool.wait_hosts_enabled();
    pool.create_sr(dir.path(), "sr1", "4G");
    pool.ctl(&["vdi-create", "bench-disk", "--sr", "sr1", "--size", "16M"]);
    let elf = guest_elf(dir.path());
    pool.ctl(&[
        "vm-create",
        "big",
        "--disk",
        "bench-disk",
        "--kernel",
        &elf,
        "--cmdline",
        "seed=4 mode=heartbeat hb_ms=50 dirty_mib_s=50 dirty_mib=32",
        "--memory",
        "512M",
        "--start",
    ]);
    pool.wait_vm("big", "\"power\": \"running\"", Duration::from_secs(60));
    heartbeat_at_least(&pool, "big", 5);
    let hosts = pool.ctl(&["host-list", "--json"]);
    let ids: Vec<String> = hosts
        .lines()
        .filter(|l| l.contains("\"id\": \""))
        .map(|l| field(l, "id"))
        .collect();
    assert_eq!(ids.len(), 2, "{hosts}");
    let (mut pauses, mut downtimes) = (Vec::new(), Vec::new());
    for round in 0..3 {
        let name = format!("bench-{round}");
        let out = pool.ctl(&["vm-checkpoint", "big", &name]);
        pauses.push(figure(&out, "paused "));
        // The pool learns from the host's next report that the pause is over.
        let line = pool.wait_vm("big", "\"power\": \"running\"", Duration::from_secs(10));
        let on = field(&line, "host");
        let to = ids.iter().find(|h| **h != on).unwrap();
        let out = pool.ctl(&["vm-migrate", "big", "--host", to]);
        downtimes.push(figure(&out, "downtime "));
        // The guest runs on: each round checks it still counts.
        let at = heartbeat_at_least(&pool, "big", 1);
        heartbeat_at_least(&pool, "big", at + 2);
        pool.ctl(&["vm-snapshot-delete", &name]);
    }
    let (pause, downtime) = (median(pauses.clone()), median(downtimes.clone()));
    println!(
        "checkpoint of a 512 MiB VM (rewriting 32 MiB at 50 MiB/s): pause {pause} ms (of {pauses:?}); live migration of it: downtime {downtime} ms (of {downtimes:?}); medians of 3"
    );
    println!("BENCH checkpoint_pause_ms {pause} ms");
}
