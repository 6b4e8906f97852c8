//! Undo disks through the pool, with real processes: three `poold` members, one `hostd`
//! and one `storaged`. A disk holding the test guest's pattern of one seed is put in undo
//! mode; the guest, started with another seed, writes its pattern over it, and once it is
//! shut down the disk's own volume (read through `vdi-export`) still holds the first
//! pattern. A discard leaves it so; a second start (on the same overlay across a stop)
//! then a commit makes it hold the second pattern, and no overlay is left. Refusals
//! change nothing.

use std::time::Duration;

use e2e_tests::pool::{Pool, console_until, guest_elf, guest_vm};

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
