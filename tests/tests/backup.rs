//! VM backups against a real pool (three `poold`, one `hostd`, one `storaged`), through
//! `poolctl` as a person would: a full backup of a VM whose disk holds a known image, the
//! test guest rewriting about 1% of the disk, an incremental backup that holds only that,
//! each point restored as a new VM whose disk must equal, byte for byte, what the VM's
//! disk held at that point; then the refusals: a corrupt chunk named by verify and refused
//! by restore, and a repository without room, each leaving the pool as it was; last, the
//! chain pruned to its newest point, which restores as before. A backup schedule's chain,
//! written and pruned by the coordinator, restores the same way.

use std::path::Path;
use std::time::Duration;

use e2e_tests::pool::{Api, Pool, field, guest_elf, guest_vm};
use e2e_tests::{poolctl, text, wait_for};
use proto::storage as spb;

const DISK: usize = 16 << 20;
const CHUNK: usize = 64 << 10;
/// An id no object has.
const NOBODY: &str = "00000000-0000-4000-8000-000000000027";

/// A disk image with no zero block: every chunk of it is allocated once imported.
fn image(path: &Path) -> Vec<u8> {
    let data: Vec<u8> = (0..DISK)
        .map(|i| (i / 512 % 251) as u8 ^ (i % 253) as u8 | 1)
        .collect();
    std::fs::write(path, &data).unwrap();
    data
}

/// The chunks two images differ in.
fn changed_chunks(a: &[u8], b: &[u8]) -> Vec<usize> {
    (0..a.len().div_ceil(CHUNK))
        .filter(|&c| a[c * CHUNK..(c + 1) * CHUNK] != b[c * CHUNK..(c + 1) * CHUNK])
        .collect()
}

/// "N chunks" from `vm-backup`'s report line.
fn chunks_in(report: &str) -> usize {
    let words: Vec<&str> = report.split_whitespace().collect();
    let i = words
        .iter()
        .position(|w| *w == "chunks,")
        .unwrap_or_else(|| panic!("a chunk count in {report:?}"));
    words[i - 1].parse().unwrap()
}

/// A pool of one host with a repository `sr1`, and VM `vm` (stopped) whose disk `disk` is
/// [`image`] imported; the guest runs `cmdline` when started. The image's bytes.
fn pool_with_imaged_vm(dir: &Path, vm: &str, disk: &str, cmdline: &str) -> (Pool, Vec<u8>) {
    let pool = Pool::start(dir, 1);
    pool.wait_hosts_enabled();
    pool.create_sr(dir, "sr1", "256M");
    let raw = dir.join("disk.raw");
    let data = image(&raw);
    pool.ctl(&[
        "vdi-import",
        &raw.display().to_string(),
        disk,
        "--sr",
        "sr1",
    ]);
    let elf = guest_elf(dir);
    pool.ctl(&guest_vm(vm, disk, &elf, cmdline, &[]));
    (pool, data)
}

#[test]
fn full_then_incremental_backups_restore_each_point_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    // The guest writes its pattern over the first 160 KiB and zeroes and discards 16 KiB
    // after it (about 1% of the disk), then powers off.
    let (pool, at_point_1) = pool_with_imaged_vm(
        dir.path(),
        "bk",
        "bk-disk",
        "seed=5 blk=write blk_kib=160 mode=once",
    );
    let backups = dir.path().join("backups");
    let b = backups.display().to_string();

    let full = pool.ctl(&["vm-backup", "bk", &b]);
    assert_eq!(chunks_in(&full), DISK / CHUNK, "{full}");

    pool.ctl(&["vm-start", "bk"]);
    pool.wait_vm("bk", "\"power\": \"stopped\"", Duration::from_secs(60));
    let at_point_2 = pool.disk_bytes(dir.path(), "bk-disk");
    let rewritten = changed_chunks(&at_point_1, &at_point_2);
    assert!(
        !rewritten.is_empty() && rewritten.len() <= 4,
        "{rewritten:?}\n{}",
        pool.logs()
    );

    let incremental = pool.ctl(&["vm-backup", "bk", &b]);
    assert_eq!(chunks_in(&incremental), rewritten.len(), "{incremental}");
    // Only the newest backup's VM snapshot stays, as the next one's base.
    let snaps = pool.ctl(&["vm-snapshot-list", "bk"]);
    assert_eq!(snaps.matches("backup-").count(), 1, "{snaps}");
    assert!(snaps.contains("backup-2-"), "{snaps}");

    let verified = pool.ctl(&["vm-backup-verify", &b]);
    assert!(verified.contains("2 points"), "{verified}");

    for (point, want) in [("1", &at_point_1), ("2", &at_point_2)] {
        let name = format!("r{point}");
        pool.ctl(&["vm-restore", &b, "--point", point, "--name", &name]);
        assert!(pool.vm(&name).is_some(), "restored VM {name} listed");
        let got = pool.disk_bytes(dir.path(), &format!("{name}-vda"));
        assert_eq!(got.len(), want.len());
        assert!(
            got == *want,
            "point {point} restored with chunks {:?} differing",
            changed_chunks(&got, want)
        );
    }

    // The pool's answer for a restored disk: every chunk, one range; another lineage and
    // an unknown volume are refused with their codes.
    let vdis = pool.ctl(&["vdi-list", "--json"]);
    let id = |name: &str| {
        vdis.lines()
            .find(|l| l.contains(&format!("\"name\": \"{name}\"")))
            .map(|l| field(l, "id"))
            .unwrap_or_else(|| panic!("{name} in {vdis}"))
    };
    let api = Api::connect(&pool.p);
    let ask = |volume: String, target: String| {
        let r = spb::ListChangedChunksRequest {
            volume_id: volume,
            target_snapshot_id: target,
            ..Default::default()
        };
        api.call(r, |mut c, r| async move { c.list_changed_chunks(r).await })
    };
    let all = ask(id("r2-vda"), id("r2-vda")).unwrap();
    let whole = spb::ChunkRange {
        first_chunk: 0,
        chunk_count: (DISK / CHUNK) as u64,
        mapped: true,
    };
    assert_eq!(all.ranges, [whole]);
    assert_eq!(
        (all.chunk_size_bytes, all.target_size_bytes),
        (CHUNK as u64, DISK as u64)
    );
    let other = ask(id("bk-disk"), id("r2-vda")).unwrap_err();
    assert_eq!(other.code(), tonic::Code::InvalidArgument, "{other:?}");
    let unknown = ask(NOBODY.into(), NOBODY.into()).unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound, "{unknown:?}");

    // No room: a repository smaller than the disk's data refuses before anything is made.
    pool.create_sr(dir.path(), "tiny", "4M");
    let o = poolctl(&pool.p, &["vm-restore", &b, "--name", "r3", "--sr", "tiny"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("free"), "{}", text(&o));
    assert!(pool.vm("r3").is_none());

    // A corrupt chunk: verify names its file, restore refuses and makes nothing.
    let data = backups.join("point-0002").join("disk-vda.data");
    let mut bytes = std::fs::read(&data).unwrap();
    bytes[CHUNK + 17] ^= 0x40;
    std::fs::write(&data, &bytes).unwrap();
    let o = poolctl(&pool.p, &["vm-backup-verify", &b]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains(&data.display().to_string()),
        "{}",
        text(&o)
    );
    let o = poolctl(&pool.p, &["vm-restore", &b, "--name", "r4"]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains(&data.display().to_string()),
        "{}",
        text(&o)
    );
    assert!(pool.vm("r4").is_none());
    let vdis = pool.ctl(&["vdi-list"]);
    assert!(
        !vdis.contains("r3-vda") && !vdis.contains("r4-vda"),
        "{vdis}"
    );
    // Point 1 does not depend on point 2: it still restores.
    pool.ctl(&["vm-restore", &b, "--point", "1", "--name", "r5"]);

    // A missing link: every verb names it, and no backup is taken over it.
    let moved = dir.path().join("point-0001");
    std::fs::rename(backups.join("point-0001"), &moved).unwrap();
    let missing = backups.join("point-0001").join("manifest.json");
    for args in [
        vec!["vm-backup-verify", &b],
        vec!["vm-restore", &b, "--name", "r6"],
        vec!["vm-backup", "bk", &b],
    ] {
        let o = poolctl(&pool.p, &args);
        assert!(!o.status.success(), "{args:?}");
        assert!(
            text(&o).contains(&missing.display().to_string()),
            "{args:?}: {}",
            text(&o)
        );
    }
    assert!(!backups.join("point-0003").exists());
    let snaps = pool.ctl(&["vm-snapshot-list", "bk"]);
    assert_eq!(snaps.matches("backup-").count(), 1, "{snaps}");

    // Mended, the chain takes a third point (nothing changed) and is pruned to it: the
    // last point restores as before, the dropped ones are named as gone.
    std::fs::rename(&moved, backups.join("point-0001")).unwrap();
    bytes[CHUNK + 17] ^= 0x40;
    std::fs::write(&data, &bytes).unwrap();
    let third = pool.ctl(&["vm-backup", "bk", &b]);
    assert_eq!(chunks_in(&third), 0, "{third}");
    let dry = pool.ctl(&["vm-backup-prune", &b, "--keep-last", "1", "--dry-run"]);
    assert!(dry.contains("would prune 1, 2"), "{dry}");
    let pruned = pool.ctl(&["vm-backup-prune", &b, "--keep-last", "1"]);
    assert!(pruned.contains("kept points 3; pruned 1, 2"), "{pruned}");
    assert!(!backups.join("point-0001").join("manifest.json").exists());
    let verified = pool.ctl(&["vm-backup-verify", &b]);
    assert!(verified.contains("1 points"), "{verified}");
    pool.ctl(&["vm-restore", &b, "--name", "r7"]);
    assert!(
        pool.disk_bytes(dir.path(), "r7-vda") == at_point_2,
        "point 3 restored after the prune"
    );
    let o = poolctl(&pool.p, &["vm-restore", &b, "--point", "1", "--name", "r8"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("holds points 3"), "{}", text(&o));
    // The next backup builds on the pruned chain.
    let fourth = pool.ctl(&["vm-backup", "bk", &b]);
    assert_eq!(chunks_in(&fourth), 0, "{fourth}");
    pool.ctl(&["vm-backup-verify", &b]);
}

/// The `vm.backup` tasks a schedule started, as task-list's JSON lines.
fn backup_tasks(pool: &Pool, schedule: &str) -> Vec<String> {
    let by = format!("\"by\": \"schedule {schedule}\"");
    pool.ctl(&["task-list", "--all", "--json"])
        .lines()
        .filter(|l| l.contains(&by) && field(l, "kind") == "vm.backup")
        .map(str::to_owned)
        .collect()
}

/// Runs schedule `name` now and waits for the backup job its snapshot starts to end;
/// that task's line.
fn run_backup(pool: &Pool, name: &str) -> String {
    let before = backup_task_ids(pool, name);
    pool.ctl(&["schedule-run", name]);
    backup_task_end(pool, name, &before)
}

/// The schedule's VM snapshots, by name.
fn schedule_snapshots(pool: &Pool, vm: &str, schedule: &str) -> Vec<String> {
    pool.ctl(&["vm-snapshot-list", vm, "--json"])
        .lines()
        .filter(|l| l.contains("\"id\"") && field(l, "schedule") == schedule)
        .map(|l| field(l, "name"))
        .collect()
}

/// A backup schedule, run now three times: the leader writes its chain (full, then
/// incremental) in the format `vm-backup` writes, prunes it to the retention, keeps only
/// the newest point's snapshot, and the chain restores byte for byte; a directory it
/// cannot write fails the task once, with an alert, and leaves nothing behind; one outside
/// the members' --backup-root is refused by them.
#[test]
fn a_backup_schedule_writes_and_prunes_a_chain_that_restores() {
    let dir = tempfile::tempdir().unwrap();
    let (pool, at_point_1) = pool_with_imaged_vm(
        dir.path(),
        "sb",
        "sb-disk",
        "seed=9 blk=write blk_kib=160 mode=once",
    );
    let backups = dir.path().join("nightly");
    let b = backups.display().to_string();
    pool.refused(
        &[
            "schedule-set",
            "nb",
            "--vm",
            "sb",
            "--every",
            "1d",
            "--backup-dir",
            "nightly",
        ],
        "absolute path",
    );
    pool.ctl(&[
        "schedule-set",
        "nb",
        "--vm",
        "sb",
        "--every",
        "1d",
        "--backup-dir",
        &b,
        "--keep-last",
        "2",
    ]);
    let list = pool.ctl(&["schedule-list"]);
    assert!(list.contains(&format!("backup to {b}")), "{list}");

    let t1 = run_backup(&pool, "nb");
    assert_eq!(field(&t1, "state"), "succeeded", "{t1}\n{}", pool.logs());
    let verified = pool.ctl(&["vm-backup-verify", &b]);
    assert!(verified.contains("1 points"), "{verified}");

    pool.ctl(&["vm-start", "sb"]);
    pool.wait_vm("sb", "\"power\": \"stopped\"", Duration::from_secs(60));
    let at_point_2 = pool.disk_bytes(dir.path(), "sb-disk");
    assert_ne!(at_point_1, at_point_2, "the guest wrote");
    let t2 = run_backup(&pool, "nb");
    assert_eq!(field(&t2, "state"), "succeeded", "{t2}");
    let t3 = run_backup(&pool, "nb");
    assert_eq!(field(&t3, "state"), "succeeded", "{t3}");

    // Kept: the last two points; of the schedule's snapshots, the newest point's.
    let verified = pool.ctl(&["vm-backup-verify", &b]);
    assert!(verified.contains("2 points"), "{verified}");
    assert!(!backups.join("point-0001").join("manifest.json").exists());
    assert!(backups.join("point-0003").join("manifest.json").exists());
    let snaps = wait_for(Duration::from_secs(30), || {
        let s = schedule_snapshots(&pool, "sb", "nb");
        (s.len() == 1).then_some(s)
    })
    .unwrap_or_else(|| {
        panic!(
            "one snapshot stays: {:?}",
            schedule_snapshots(&pool, "sb", "nb")
        )
    });
    assert!(snaps[0].starts_with("nb-"), "{snaps:?}");
    for (point, name) in [("2", "rb2"), ("3", "rb3")] {
        pool.ctl(&["vm-restore", &b, "--point", point, "--name", name]);
        assert!(
            pool.disk_bytes(dir.path(), &format!("{name}-vda")) == at_point_2,
            "point {point} restored"
        );
    }

    // A directory that cannot be made: the task fails once and says where; an alert.
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"not a directory").unwrap();
    let bad = file.join("sub").display().to_string();
    pool.ctl(&[
        "schedule-set",
        "bad",
        "--vm",
        "sb",
        "--every",
        "1d",
        "--backup-dir",
        &bad,
    ]);
    let failed = run_backup(&pool, "bad");
    assert_eq!(field(&failed, "state"), "failed", "{failed}");
    let tasks = pool.ctl(&["task-list", "--all", "--json"]);
    assert!(
        tasks.contains(&bad),
        "the task names the directory: {tasks}"
    );
    let alerts = pool.ctl(&["alerts", "--json"]);
    assert!(alerts.contains("vm.backup"), "{alerts}");
    let gone = wait_for(Duration::from_secs(30), || {
        schedule_snapshots(&pool, "sb", "bad")
            .is_empty()
            .then_some(())
    });
    assert!(gone.is_some(), "the failed run's snapshot is deleted");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(backup_tasks(&pool, "bad").len(), 1, "tried once");

    // Outside the members' --backup-root: refused by the member, which writes as root.
    let outside = format!("/var/tmp/pool-e2e-{}", std::process::id());
    pool.ctl(&[
        "schedule-set",
        "out",
        "--vm",
        "sb",
        "--every",
        "1d",
        "--backup-dir",
        &outside,
    ]);
    let refused = run_backup(&pool, "out");
    assert_eq!(field(&refused, "state"), "failed", "{refused}");
    assert!(
        field(&refused, "error").contains("--backup-root"),
        "{refused}"
    );
    assert!(!Path::new(&outside).exists());
}

/// `storaged` dies by SIGKILL while a backup reads the VM's changed chunks. Left dead,
/// the backup fails and says so, leaves no point behind, and the chain before it stays
/// whole; restarted at once, the backup rides over it and its point is whole.
#[test]
fn a_storaged_killed_during_a_backup_leaves_the_chain_valid() {
    const CHANGED_KIB: usize = 12 << 10;
    let dir = tempfile::tempdir().unwrap();
    let cmdline = format!("seed=7 blk=write blk_kib={CHANGED_KIB} mode=once");
    let (mut pool, at_point_1) = pool_with_imaged_vm(dir.path(), "kb", "kill-disk", &cmdline);
    let backups = dir.path().join("backups");
    let b = backups.display().to_string();
    pool.ctl(&["vm-backup", "kb", &b]);
    pool.ctl(&["vm-start", "kb"]);
    pool.wait_vm("kb", "\"power\": \"stopped\"", Duration::from_secs(120));
    let at_point_2 = pool.disk_bytes(dir.path(), "kill-disk");
    let rewritten = changed_chunks(&at_point_1, &at_point_2).len();
    assert!(
        rewritten >= CHANGED_KIB / 64,
        "{rewritten} chunks rewritten"
    );
    let storaged_dir = dir.path().join("storaged");
    let tmp = backups.join("point-0002.tmp");

    // Left dead: the backup fails, and point 1 is all the chain holds.
    let backup = backup_until_it_reads(&pool, &b, &tmp);
    let storaged_addr = pool.storaged.addr.clone();
    pool.storaged.kill();
    let (ok, said) = finish(backup);
    assert!(!ok, "the backup succeeded without storaged: {said}");
    println!("the backup without storaged said: {said}");
    // It names storaged as the daemon that did not answer, not the pool.
    assert!(
        said.contains(&format!("daemon at {storaged_addr}")) && !said.contains("no member"),
        "{said}"
    );
    assert!(
        !tmp.exists() && !backups.join("point-0002").exists(),
        "{said}"
    );
    let verified = pool.ctl(&["vm-backup-verify", &b]);
    assert!(verified.contains("1 points"), "{verified}");
    assert!(said.contains("is being deleted"), "{said}");
    pool.storaged.restart(&storaged_dir, &pool.p);
    // The failed point's VM snapshot goes once storaged is back; point 1's stays.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let snaps = pool.ctl(&["vm-snapshot-list", "kb"]);
        if snaps.matches("backup-").count() == 1 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{snaps}");
        std::thread::sleep(Duration::from_millis(200));
    }
    pool.ctl(&["vm-restore", &b, "--point", "1", "--name", "k1"]);
    assert!(
        pool.disk_bytes(dir.path(), "k1-vda") == at_point_1,
        "point 1 restored"
    );

    // Restarted at once: the backup goes on, and point 2 holds just the rewritten chunks.
    let backup = backup_until_it_reads(&pool, &b, &tmp);
    pool.storaged.restart(&storaged_dir, &pool.p);
    let (ok, said) = finish(backup);
    assert!(ok, "{said}\n{}", pool.logs());
    assert_eq!(chunks_in(&said), rewritten, "{said}");
    let verified = pool.ctl(&["vm-backup-verify", &b]);
    assert!(verified.contains("2 points"), "{verified}");
    pool.ctl(&["vm-restore", &b, "--point", "2", "--name", "k2"]);
    assert!(
        pool.disk_bytes(dir.path(), "k2-vda") == at_point_2,
        "point 2 restored"
    );
}

/// The id of the member leading now.
fn leader(pool: &Pool) -> usize {
    let members = pool.ctl(&["member-list", "--json"]);
    members
        .lines()
        .find(|l| l.contains("\"leader\": true"))
        .and_then(|l| {
            let id = l.split("\"id\": ").nth(1)?;
            id.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
        })
        .unwrap_or_else(|| panic!("a leader among {members}"))
}

/// Runs schedule `name`; returns once the backup job it starts has begun the point in
/// `tmp`, with storaged frozen (SIGSTOP) right then, so that the job is in the middle of
/// its reads until storaged is let go.
fn schedule_run_until_it_reads(pool: &Pool, name: &str, tmp: &Path) -> Vec<String> {
    let before = backup_task_ids(pool, name);
    pool.ctl(&["schedule-run", name]);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !tmp.join("vm-spec.pb").exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the backup job never started {}: {}\n{}",
            tmp.display(),
            pool.ctl(&["task-list", "--all", "--json"]),
            pool.logs()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    e2e_tests::pool::signal(pool.storaged.daemon.proc.pid(), "-STOP");
    before
}

/// The ids of schedule `name`'s backup tasks so far (listed by id, not in order).
fn backup_task_ids(pool: &Pool, name: &str) -> Vec<String> {
    backup_tasks(pool, name)
        .iter()
        .map(|t| field(t, "id"))
        .collect()
}

/// Waits for a backup task of schedule `name` other than those in `before` to end; its
/// line.
fn backup_task_end(pool: &Pool, name: &str, before: &[String]) -> String {
    wait_for(Duration::from_secs(120), || {
        backup_tasks(pool, name).into_iter().find(|t| {
            !before.contains(&field(t, "id"))
                && matches!(field(t, "state").as_str(), "succeeded" | "failed")
        })
    })
    .unwrap_or_else(|| {
        panic!(
            "schedule {name}'s backup ended: {}\n{}",
            pool.ctl(&["task-list", "--all", "--json"]),
            pool.logs()
        )
    })
}

#[test]
fn a_scheduled_backup_survives_its_leader_leaving_or_dying_mid_write() {
    let dir = tempfile::tempdir().unwrap();
    let (mut pool, at_point_1) = pool_with_imaged_vm(
        dir.path(),
        "lb",
        "lb-disk",
        "seed=3 blk=write blk_kib=4096 mode=once",
    );
    let backups = dir.path().join("leader-backups");
    let b = backups.display().to_string();
    pool.ctl(&[
        "schedule-set",
        "lbs",
        "--vm",
        "lb",
        "--every",
        "1d",
        "--backup-dir",
        &b,
        "--keep-last",
        "5",
    ]);
    let storaged = pool.storaged.daemon.proc.pid();

    // Leadership moves while the job reads: the old leader's writer, on a thread of its
    // own, goes on to the end of its point; the new leader's run of the job waits for the
    // directory, finds that point written and writes nothing twice.
    let first = leader(&pool);
    let before = schedule_run_until_it_reads(&pool, "lbs", &backups.join("point-0001.tmp"));
    let to = if first == 1 { 2 } else { 1 };
    pool.ctl(&["member-transfer", &to.to_string()]);
    e2e_tests::pool::signal(storaged, "-CONT");
    let t = backup_task_end(&pool, "lbs", &before);
    assert_eq!(field(&t, "state"), "succeeded", "{t}\n{}", pool.logs());
    assert_ne!(leader(&pool), first);
    let verified = pool.ctl(&["vm-backup-verify", &b]);
    assert!(verified.contains("1 points"), "{verified}");
    assert!(!backups.join("point-0002").exists() && !backups.join("point-0001.tmp").exists());

    // The leader dies while the job reads: the new leader runs the job again from the
    // start, over what the dead one left half written.
    pool.ctl(&["vm-start", "lb"]);
    pool.wait_vm("lb", "\"power\": \"stopped\"", Duration::from_secs(120));
    let at_point_2 = pool.disk_bytes(dir.path(), "lb-disk");
    assert_ne!(at_point_1, at_point_2, "the guest wrote");
    let dead = leader(&pool);
    let before = schedule_run_until_it_reads(&pool, "lbs", &backups.join("point-0002.tmp"));
    pool.coordinators.procs[dead - 1].kill();
    e2e_tests::pool::signal(storaged, "-CONT");
    let t = backup_task_end(&pool, "lbs", &before);
    assert_eq!(field(&t, "state"), "succeeded", "{t}\n{}", pool.logs());
    let verified = pool.ctl(&["vm-backup-verify", &b]);
    assert!(verified.contains("2 points"), "{verified}");
    for (point, name, want) in [("1", "lb1", &at_point_1), ("2", "lb2", &at_point_2)] {
        pool.ctl(&["vm-restore", &b, "--point", point, "--name", name]);
        assert!(
            pool.disk_bytes(dir.path(), &format!("{name}-vda")) == *want,
            "point {point} restored"
        );
    }
    // Of the schedule's snapshots only the newest point's stays, the next one's base.
    let snaps = wait_for(Duration::from_secs(30), || {
        let s = schedule_snapshots(&pool, "lb", "lbs");
        (s.len() == 1).then_some(s)
    })
    .unwrap_or_else(|| {
        panic!(
            "one snapshot stays: {:?}",
            schedule_snapshots(&pool, "lb", "lbs")
        )
    });
    assert!(snaps[0].starts_with("lbs-"), "{snaps:?}");
    pool.coordinators.restart(dead);
}

/// `vm-backup` of VM kb into `root`, with storaged frozen (SIGSTOP) the moment the new
/// point's directory has its spec: its chunks are read from storaged after that, so
/// whatever happens to storaged next lands in the middle of the reads.
fn backup_until_it_reads(pool: &Pool, root: &str, tmp: &Path) -> std::process::Child {
    let mut backup = pool
        .p
        .poolctl()
        .args(["vm-backup", "kb", root])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !tmp.join("vm-spec.pb").exists() {
        if std::time::Instant::now() > deadline || backup.try_wait().unwrap().is_some() {
            let _ = backup.kill();
            let (_, said) = finish(backup);
            panic!(
                "the backup never started its point: {said}\n{}",
                pool.logs()
            );
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    e2e_tests::pool::signal(pool.storaged.daemon.proc.pid(), "-STOP");
    backup
}

/// Whether a poolctl run succeeded, and what it said.
fn finish(child: std::process::Child) -> (bool, String) {
    let out = child.wait_with_output().unwrap();
    (out.status.success(), text(&out))
}

/// Figures, not a check: `vm-backup` of a 4 GiB disk whose every chunk holds data, in
/// full, then again after the guest rewrote 1% of it (41 MiB, one region). Run with
/// `cargo test -p e2e-tests --test backup -- --ignored --nocapture` (about 13 GB of
/// disk in the temporary directory).
#[test]
#[ignore]
fn backup_times_on_a_4_gib_disk() {
    const SIZE: usize = 4 << 30;
    let dir = tempfile::tempdir().unwrap();
    let pool = Pool::start(dir.path(), 1);
    pool.wait_hosts_enabled();
    pool.create_sr(dir.path(), "sr1", "10G");
    let raw = dir.path().join("disk.raw");
    {
        use std::io::Write;
        let mut f = std::io::BufWriter::new(std::fs::File::create(&raw).unwrap());
        let block: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8 | 1).collect();
        for _ in 0..SIZE >> 20 {
            f.write_all(&block).unwrap();
        }
    }
    let raw = raw.display().to_string();
    pool.ctl(&["vdi-import", &raw, "big-disk", "--sr", "sr1"]);
    std::fs::remove_file(&raw).unwrap();
    let elf = guest_elf(dir.path());
    let one_percent = format!("seed=9 blk=write blk_kib={} mode=once", (SIZE >> 10) / 100);
    pool.ctl(&guest_vm("big", "big-disk", &elf, &one_percent, &[]));
    let b = dir.path().join("backups").display().to_string();

    let start = std::time::Instant::now();
    let full = pool.ctl(&["vm-backup", "big", &b]);
    let full_time = start.elapsed();
    pool.ctl(&["vm-start", "big"]);
    pool.wait_vm("big", "\"power\": \"stopped\"", Duration::from_secs(300));
    let start = std::time::Instant::now();
    let incremental = pool.ctl(&["vm-backup", "big", &b]);
    let incremental_time = start.elapsed();
    println!("full: {full}incremental: {incremental}");
    println!(
        "backup of a 4 GiB disk: full {:.2} s, incremental after 1% rewritten {:.2} s, ratio {:.3}",
        full_time.as_secs_f64(),
        incremental_time.as_secs_f64(),
        incremental_time.as_secs_f64() / full_time.as_secs_f64()
    );
    assert_eq!(chunks_in(&full), SIZE / CHUNK, "{full}");
    assert!(
        chunks_in(&incremental) >= SIZE / CHUNK / 100,
        "{incremental}"
    );
    println!(
        "BENCH backup_incremental_vs_full {:.3} x",
        incremental_time.as_secs_f64() / full_time.as_secs_f64()
    );
}
