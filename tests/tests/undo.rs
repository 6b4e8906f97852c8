//! Undo disks through the pool, with real processes: three `poold` members, one `hostd`
//! and one `storaged`. A disk holding the test guest's pattern of one seed is put in undo
//! mode; the guest, started with another seed, writes its pattern over it, and once it is
//! shut down the disk's own volume (read through `vdi-export`) still holds the first
//! pattern. A discard leaves it so; a second start (on the same overlay across a stop)
//! then a commit makes it hold the second pattern, and no overlay is left. Refusals
//! change nothing. An undo VM keeps its overlay through a live migration and an HA
//! restart, and a template made from it keeps its disks in undo mode.

use std::time::Duration;

use e2e_tests::pool::{Pool, console_until, field, guest_elf, guest_vm, heartbeat_seqs};
use e2e_tests::wait_for;

/// Starts VM `vm` and waits until its guest has written (and checked) its disk.
fn run_guest_once(pool: &Pool, vm: &str) {
    pool.ctl(&["vm-start", vm]);
    pool.wait_vm(vm, "\"power\": \"running\"", Duration::from_secs(60));
    let blk = console_until(&pool.p, None, vm, Duration::from_secs(60), |seen| {
        seen.lines()
            .find(|l| l.starts_with("BLK done") && seen.contains(&format!("{l}\n")))
            .map(str::to_owned)
    })
    .unwrap_or_else(|| panic!("the guest's disk line\n{}", pool.logs()));
    assert_eq!(blk, "BLK done devices=1 result=ok");
}

fn shut_down(pool: &Pool, vm: &str) {
    pool.ctl(&["vm-shutdown", vm, "--force"]);
    pool.wait_vm(vm, "\"power\": \"stopped\"", Duration::from_secs(60));
}

#[test]
fn an_undo_disk_is_discarded_then_committed() {
    let dir = tempfile::tempdir().unwrap();
    let pool = Pool::start(dir.path(), 1);
    pool.wait_hosts_enabled();
    pool.create_sr(dir.path(), "sr1", "1G");
    pool.ctl(&["vdi-create", "u-disk", "--sr", "sr1", "--size", "16M"]);
    let elf = guest_elf(dir.path());

    // The first pattern, written in normal mode.
    pool.ctl(&guest_vm(
        "u",
        "u-disk",
        &elf,
        "seed=1 blk=rw mode=heartbeat",
        &[],
    ));
    run_guest_once(&pool, "u");
    shut_down(&pool, "u");
    let original = pool.disk_bytes(dir.path(), "u-disk");
    assert!(original.iter().any(|b| *b != 0), "the guest wrote its disk");
    pool.ctl(&["vdi-snapshot", "u-disk", "u-before"]);
    let volumes = || pool.ctl(&["vdi-list", "--json"]).matches("\"id\"").count();
    let base_volumes = volumes();

    // Undo mode, then a start with another seed: the guest writes its overlay.
    pool.ctl(&["vm-disk-mode", "u", "vda", "undo"]);
    assert_eq!(pool.shown("u", "undo_disks"), "vda:none");
    pool.ctl(&["vm-set", "u", "--cmdline", "seed=2 blk=rw mode=heartbeat"]);
    run_guest_once(&pool, "u");
    let overlay = pool.shown("u", "undo_overlays");
    let overlay_id = overlay
        .strip_prefix("vda=")
        .expect("vda's overlay")
        .to_owned();
    assert!(
        pool.ctl(&["vdi-list", "--json"]).contains(&overlay_id),
        "the overlay is a volume of the pool"
    );
    pool.refused(&["vm-undo", "u", "commit"], "shut it down first");
    shut_down(&pool, "u");

    // Stopped with changes pending: the base holds the first pattern still.
    assert_eq!(pool.shown("u", "undo_disks"), "vda:pending");
    assert!(pool.ctl(&["vm-list", "--long"]).contains("vda:pending"));
    assert!(
        pool.disk_bytes(dir.path(), "u-disk") == original,
        "the base is not written while the overlay exists"
    );
    let changed = pool.disk_bytes(dir.path(), &overlay_id);
    assert!(changed != original, "the guest wrote its overlay");

    // Refused while pending, and nothing changed.
    pool.refused(&["vdi-destroy", "u-disk"], "pending undo changes");
    pool.refused(&["vdi-destroy", &overlay_id], "pending undo changes");
    pool.refused(
        &["vdi-revert", "u-disk", "u-before"],
        "pending undo changes",
    );
    pool.refused(
        &["vm-disk-mode", "u", "vda", "normal"],
        "pending undo changes",
    );
    pool.refused(&["vm-undo", "nosuchvm", "commit"], "nosuchvm");
    assert_eq!(pool.shown("u", "undo_overlays"), overlay);

    // A backup reads what the guest sees: a snapshot of the overlay.
    let backups = dir.path().join("backups").display().to_string();
    pool.ctl(&["vm-backup", "u", &backups]);

    // Discard: the base is exactly as before the start, the overlay gone (the backup's
    // VM snapshot stays, as the next backup's base).
    pool.ctl(&["vm-undo", "u", "discard"]);
    assert_eq!(pool.shown("u", "undo_disks"), "vda:none");
    assert_eq!(pool.shown("u", "undo_overlays"), "");
    assert!(
        pool.disk_bytes(dir.path(), "u-disk") == original,
        "discarded"
    );
    let base_volumes = base_volumes + 1;
    assert_eq!(volumes(), base_volumes, "no overlay or snapshot left");
    // The next backup reads the disk's own volume: whole, since the overlay the last one
    // read is gone.
    pool.ctl(&["vm-backup", "u", &backups]);
    pool.ctl(&["vm-backup-verify", &backups]);
    let manifest =
        std::fs::read_to_string(dir.path().join("backups/point-0002/manifest.json")).unwrap();
    assert!(manifest.contains("\"full\": true"), "{manifest}");
    assert_eq!(volumes(), base_volumes);
    pool.refused(&["vm-undo", "u", "discard"], "no pending undo changes");
    pool.refused(&["vm-undo", "u", "commit"], "no pending undo changes");

    // Start again, stop, start again: the second start goes on on the same overlay.
    run_guest_once(&pool, "u");
    let overlay = pool.shown("u", "undo_overlays");
    shut_down(&pool, "u");
    pool.ctl(&[
        "vm-set",
        "u",
        "--cmdline",
        "seed=2 blk=verify mode=heartbeat",
    ]);
    run_guest_once(&pool, "u");
    assert_eq!(
        pool.shown("u", "undo_overlays"),
        overlay,
        "the same overlay"
    );
    shut_down(&pool, "u");
    let overlay_id = overlay.strip_prefix("vda=").unwrap().to_owned();
    let changed = pool.disk_bytes(dir.path(), &overlay_id);
    assert!(changed != original);

    // Commit: the base holds the overlay's data, and no overlay is left.
    pool.ctl(&["vm-undo", "u", "commit"]);
    assert_eq!(pool.shown("u", "undo_overlays"), "");
    let committed = pool.disk_bytes(dir.path(), "u-disk");
    assert!(committed == changed, "the base holds what the guest wrote");
    assert_eq!(volumes(), base_volumes, "no overlay or snapshot left");

    // Back in normal mode, a boot that only checks finds the second pattern.
    pool.ctl(&["vm-disk-mode", "u", "vda", "normal"]);
    run_guest_once(&pool, "u");
    assert_eq!(pool.shown("u", "undo_overlays"), "");
    shut_down(&pool, "u");
    pool.ctl(&["vm-destroy", "u"]);

    // A repository without room for the overlay to grow to its disk's size: the start
    // fails with the reason, the VM stays stopped, and no volume is left behind.
    pool.create_sr(dir.path(), "small", "64M");
    pool.ctl(&["vdi-create", "big-disk", "--sr", "small", "--size", "256M"]);
    pool.ctl(&guest_vm(
        "full",
        "big-disk",
        &elf,
        "seed=3 blk=rw mode=heartbeat",
        &["--undo"],
    ));
    assert_eq!(pool.shown("full", "undo_disks"), "vda:none");
    let before = volumes();
    pool.refused(&["vm-start", "full"], "MiB free");
    assert_eq!(pool.shown("full", "power"), "stopped");
    assert_eq!(pool.shown("full", "undo_overlays"), "");
    assert_eq!(volumes(), before, "nothing left behind");
    pool.ctl(&["vm-destroy", "full"]);
}

/// The highest heartbeat `vm`'s console shows, once it is past `above`.
fn heartbeat_past(pool: &Pool, vm: &str, above: u64) -> u64 {
    console_until(&pool.p, None, vm, Duration::from_secs(60), |seen| {
        let max = heartbeat_seqs(seen).into_iter().max()?;
        (max > above).then(|| max.to_string())
    })
    .and_then(|n| n.parse().ok())
    .unwrap_or_else(|| panic!("{vm} counts past {above}\n{}", pool.logs()))
}

/// Waits until `vm` runs on a host other than `not`; that host.
fn running_elsewhere(pool: &Pool, vm: &str, not: &str) -> String {
    wait_for(Duration::from_secs(90), || {
        pool.vm(vm)
            .filter(|l| l.contains("\"power\": \"running\"") && field(l, "host") != not)
            .map(|l| field(&l, "host"))
    })
    .unwrap_or_else(|| panic!("{vm} running on another host than {not}\n{}", pool.logs()))
}

#[test]
fn an_undo_vm_keeps_its_overlay_through_migration_and_ha_and_its_template_stays_undo() {
    let dir = tempfile::tempdir().unwrap();
    let mut pool = Pool::start(dir.path(), 2);
    pool.wait_hosts_enabled();
    pool.ctl(&["pool-set", "--heartbeat-timeout", "2"]);
    pool.ctl(&["pool-ha-enable", "--failures", "1", "--timeout", "2"]);
    pool.create_sr(dir.path(), "sr1", "1G");
    pool.ctl(&["vdi-create", "m-disk", "--sr", "sr1", "--size", "16M"]);
    let base = pool.disk_bytes(dir.path(), "m-disk");
    let elf = guest_elf(dir.path());
    pool.ctl(&guest_vm(
        "m",
        "m-disk",
        &elf,
        "seed=4 blk=rw mode=heartbeat hb_ms=200",
        &["--undo", "--ha", "restart"],
    ));
    run_guest_once(&pool, "m");
    let overlay = pool.shown("m", "undo_overlays");
    assert!(overlay.starts_with("vda="), "{overlay}");

    // Live migration: the guest goes on counting on the same overlay.
    let line = pool.wait_vm("m", "\"power\": \"running\"", Duration::from_secs(10));
    let first = field(&line, "host");
    let before = heartbeat_past(&pool, "m", 2);
    let hosts = pool.ctl(&["host-list", "--json"]);
    let other = hosts
        .lines()
        .filter(|l| l.contains("\"id\": \""))
        .map(|l| field(l, "id"))
        .find(|h| *h != first)
        .expect("a second host");
    pool.ctl(&["vm-migrate", "m", "--host", &other]);
    assert_eq!(running_elsewhere(&pool, "m", &first), other);
    heartbeat_past(&pool, "m", before + 2);
    assert_eq!(
        pool.shown("m", "undo_overlays"),
        overlay,
        "the same overlay"
    );

    // HA: its host dies; the VM is restarted on the other one, on the same overlay, and
    // the guest (booted afresh) finds and checks its disk there.
    let victim = pool.host_index(&other);
    pool.hosts[victim].daemon.proc.kill();
    assert_eq!(running_elsewhere(&pool, "m", &other), first);
    assert_eq!(
        pool.shown("m", "undo_overlays"),
        overlay,
        "the same overlay"
    );
    let blk = console_until(&pool.p, None, "m", Duration::from_secs(60), |seen| {
        seen.lines()
            .find(|l| l.starts_with("BLK done") && seen.contains(&format!("{l}\n")))
            .map(str::to_owned)
    })
    .unwrap_or_else(|| panic!("the restarted guest's disk line\n{}", pool.logs()));
    assert_eq!(blk, "BLK done devices=1 result=ok");
    shut_down(&pool, "m");
    assert_eq!(pool.shown("m", "undo_disks"), "vda:pending");
    assert!(
        pool.disk_bytes(dir.path(), "m-disk") == base,
        "the disk's own volume is never written while its changes are pending"
    );

    // A template of the VM: what the guest sees, and its disk still in undo mode, so a VM
    // made from it runs on an overlay of its own.
    pool.ctl(&["template-create", "mt", "m"]);
    pool.ctl(&["vm-create", "from-t", "--template", "mt", "--memory", "64M"]);
    assert_eq!(pool.shown("from-t", "undo_disks"), "vda:none");
    pool.ctl(&[
        "vm-set",
        "from-t",
        "--cmdline",
        "seed=4 blk=verify mode=heartbeat",
    ]);
    run_guest_once(&pool, "from-t");
    let own = pool.shown("from-t", "undo_overlays");
    assert!(own.starts_with("vda=") && own != overlay, "{own}");
    shut_down(&pool, "from-t");
    assert_eq!(pool.shown("from-t", "undo_disks"), "vda:pending");
}
