//! Suspend and resume through the pool, with real processes: three `poold` members, two
//! `hostd` and one `storaged`. A test guest that counts heartbeats is saved into a state
//! volume on its repository, shows SUSPENDED with no VM process left, and is resumed on
//! the other host, where its count goes on from where it was and the disk it wrote
//! before the suspend reads back intact; a quick migration moves it back the same way. Bad input is refused with a clear error and
//! changes nothing.

use std::time::Duration;

use e2e_tests::pool::{
    Pool, console_until, field, guest_elf, guest_vm, heartbeat_seqs, processes_with,
};
use e2e_tests::wait_for;

/// VM processes (`hostd-vmm` or `hostd vmm`) of this test's hosts.
fn vm_processes(dir: &std::path::Path) -> usize {
    processes_with(&format!("{}/", dir.display()))
        .into_iter()
        .filter(|p| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains("vmm"))
        })
        .count()
}

#[test]
fn a_suspended_vm_resumes_on_another_host_where_it_left_off() {
    let dir = tempfile::tempdir().unwrap();
    let pool = Pool::start(dir.path(), 2);
    pool.wait_hosts_enabled();
    pool.create_sr(dir.path(), "sr1", "1G");
    pool.ctl(&["vdi-create", "qs-disk", "--sr", "sr1", "--size", "16M"]);
    pool.ctl(&["vdi-create", "idle-disk", "--sr", "sr1", "--size", "16M"]);
    let elf = guest_elf(dir.path());
    pool.ctl(&guest_vm(
        "qs",
        "qs-disk",
        &elf,
        "seed=7 blk=rw mode=heartbeat hb_ms=200",
        &["--start"],
    ));
    let line = pool.wait_vm("qs", "\"power\": \"running\"", Duration::from_secs(60));
    let first = field(&line, "host");

    // The guest wrote and checked its disk, then counts heartbeats.
    let before = console_until(&pool.p, None, "qs", Duration::from_secs(60), |seen| {
        (seen.contains("BLK done devices=1 result=ok"))
            .then(|| heartbeat_seqs(seen).into_iter().max().filter(|n| *n >= 5))
            .flatten()
            .map(|n| n.to_string())
    })
    .and_then(|n| n.parse::<u64>().ok())
    .unwrap_or_else(|| panic!("the guest wrote its disk and counts\n{}", pool.logs()));

    // Bad input, each refused with a clear error and nothing changed: a running VM has
    // nothing to resume, a stopped one nothing to save.
    pool.refused(
        &["vm-resume", "qs"],
        "only a paused or suspended VM is resumed",
    );
    pool.ctl(&guest_vm(
        "idle",
        "idle-disk",
        &elf,
        "seed=3 mode=heartbeat",
        &[],
    ));
    let volumes = || pool.ctl(&["vdi-list", "--json"]).matches("\"id\"").count();
    let before_volumes = volumes();
    pool.refused(
        &["vm-suspend", "idle"],
        "only a running or paused VM is suspended",
    );
    assert_eq!(volumes(), before_volumes, "no volume made");
    assert!(pool.vm("idle").unwrap().contains("\"power\": \"stopped\""));
    let line = pool.vm("qs").unwrap();
    assert!(line.contains("\"power\": \"running\""), "{line}");
    assert_eq!(field(&line, "host"), first);

    // Suspend: SUSPENDED on no host, its state in a volume of its repository, and no VM
    // process left on any host.
    let out = pool.ctl(&["vm-suspend", "qs"]);
    let state_volume = pool.shown("qs", "state_volume");
    assert!(out.contains(&state_volume), "{out}");
    let line = pool.vm("qs").unwrap();
    assert!(line.contains("\"power\": \"suspended\""), "{line}");
    assert!(line.contains("\"wanted\": \"suspended\""), "{line}");
    assert_eq!(field(&line, "host"), "", "on no host: {line}");
    assert_eq!(pool.shown("qs", "power"), "suspended");
    let vdis = pool.ctl(&["vdi-list", "--json"]);
    assert!(vdis.contains(&state_volume), "{vdis}");
    wait_for(Duration::from_secs(15), || {
        (vm_processes(dir.path()) == 0).then_some(())
    })
    .unwrap_or_else(|| panic!("no VM process runs it\n{}", pool.logs()));

    // Suspended, it is not started afresh, live-migrated or suspended again.
    pool.refused(&["vm-start", "qs"], "cannot be started: resume it");
    pool.refused(
        &["vm-migrate", "qs", "--host", "h1"],
        "cannot be live-migrated",
    );
    pool.refused(&["vm-suspend", "qs"], "already suspended");
    let line = pool.vm("qs").unwrap();
    assert!(line.contains("\"power\": \"suspended\""), "{line}");
    assert_eq!(pool.shown("qs", "state_volume"), state_volume);

    // Resume on the other host: the guest runs on, not booted again.
    let hosts = pool.ctl(&["host-list", "--json"]);
    let other = hosts
        .lines()
        .find(|l| l.contains("\"id\": \"") && !l.contains(&format!("\"id\": \"{first}\"")))
        .map(|l| field(l, "id"))
        .unwrap_or_else(|| panic!("a second host: {hosts}"));
    pool.ctl(&["vm-resume", "qs", "--host", &other]);
    let line = pool.wait_vm("qs", "\"power\": \"running\"", Duration::from_secs(30));
    assert_eq!(field(&line, "host"), other, "{line}");
    assert_eq!(pool.shown("qs", "state_volume"), "");
    let after = console_until(&pool.p, None, "qs", Duration::from_secs(30), |seen| {
        heartbeat_seqs(seen).first().map(|n| n.to_string())
    })
    .and_then(|n| n.parse::<u64>().ok())
    .unwrap_or_else(|| panic!("the resumed guest counts\n{}", pool.logs()));
    println!("heartbeat {before} seen before the suspend, {after} first after the resume");
    assert!(
        after > before,
        "the count goes on from {before}, not from 1: {after}"
    );
    let console = console_until(&pool.p, None, "qs", Duration::from_secs(5), |seen| {
        (heartbeat_seqs(seen).len() >= 3).then(|| seen.to_owned())
    })
    .expect("the resumed guest's console");
    assert!(!console.contains("GUEST start"), "not booted: {console}");
    assert!(
        !pool.ctl(&["vdi-list", "--json"]).contains(&state_volume),
        "the state volume is deleted once the VM runs"
    );

    // Quick migration back: suspended there, resumed here, in one task.
    pool.ctl(&["vm-migrate", "qs", "--quick", "--host", &first]);
    let line = pool.wait_vm("qs", "\"power\": \"running\"", Duration::from_secs(30));
    assert_eq!(field(&line, "host"), first, "{line}");
    let console = console_until(&pool.p, None, "qs", Duration::from_secs(30), |seen| {
        (heartbeat_seqs(seen).len() >= 2).then(|| seen.to_owned())
    })
    .unwrap_or_else(|| {
        panic!(
            "the guest counts after the quick migration\n{}",
            pool.logs()
        )
    });
    let moved = heartbeat_seqs(&console)[0];
    assert!(moved > after, "the count goes on from {after}: {moved}");
    assert!(!console.contains("GUEST start"), "not booted: {console}");
    let tasks = pool.ctl(&["task-list", "--json"]);
    assert!(tasks.contains("vm.migrate.quick"), "{tasks}");

    // What it wrote before the suspend is on its disk: a fresh boot that only reads and
    // checks the pattern finds it whole.
    pool.ctl(&["vm-shutdown", "qs"]);
    pool.wait_vm("qs", "\"power\": \"stopped\"", Duration::from_secs(60));
    pool.ctl(&[
        "vm-set",
        "qs",
        "--cmdline",
        "seed=7 blk=verify mode=heartbeat",
    ]);
    pool.ctl(&["vm-start", "qs"]);
    pool.wait_vm("qs", "\"power\": \"running\"", Duration::from_secs(60));
    let blk = console_until(&pool.p, None, "qs", Duration::from_secs(60), |seen| {
        seen.lines()
            .find(|l| l.starts_with("BLK done") && seen.contains(&format!("{l}\n")))
            .map(str::to_owned)
    })
    .unwrap_or_else(|| panic!("the verifying boot's disk line\n{}", pool.logs()));
    assert_eq!(
        blk, "BLK done devices=1 result=ok",
        "the data read back whole"
    );

    // Destroying a suspended VM takes its saved state along.
    pool.ctl(&["vm-shutdown", "qs", "--force"]);
    pool.wait_vm("qs", "\"power\": \"stopped\"", Duration::from_secs(60));
    pool.ctl(&["vm-start", "qs"]);
    pool.wait_vm("qs", "\"power\": \"running\"", Duration::from_secs(60));
    pool.ctl(&["vm-suspend", "qs"]);
    let saved = pool.shown("qs", "state_volume");
    assert!(pool.ctl(&["vdi-list", "--json"]).contains(&saved));
    pool.ctl(&["vm-destroy", "qs"]);
    assert!(pool.vm("qs").is_none());
    let vdis = pool.ctl(&["vdi-list", "--json"]);
    assert!(!vdis.contains(&saved), "{vdis}");
    assert!(vdis.contains("qs-disk"), "its disk stays: {vdis}");
}
