//! Scheduled VM snapshots against a real pool (three `poold`, one `storaged`), through
//! `poolctl`: the leader runs a schedule when it is due, as a task a person can see;
//! runs asked for now keep only what the retention says, deleting the oldest of the
//! schedule's snapshots and never a person's; a run the pool refuses fails its task and
//! raises an alert; bad schedules are refused and change nothing; deleting a schedule
//! leaves its snapshots. (A month of runs and retention on a fake clock is poold's unit
//! test `schedules::tests`.)

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use e2e_tests::pool::{Pool, field, guest_elf, guest_vm};
use e2e_tests::wait_for;

/// `(name, id, schedule)` of the VM's snapshots.
fn snapshots(pool: &Pool, vm: &str) -> Vec<(String, String, String)> {
    pool.ctl(&["vm-snapshot-list", vm, "--json"])
        .lines()
        .filter(|l| l.contains("\"id\""))
        .map(|l| (field(l, "name"), field(l, "id"), field(l, "schedule")))
        .collect()
}

/// The ids of `schedule`'s snapshots, sorted.
fn of_schedule(rows: &[(String, String, String)], schedule: &str) -> Vec<String> {
    let mut ids: Vec<String> = rows
        .iter()
        .filter(|r| r.2 == schedule)
        .map(|r| r.1.clone())
        .collect();
    ids.sort();
    ids
}

#[test]
fn schedules_run_as_tasks_and_their_retention_deletes_only_their_oldest() {
    let dir = tempfile::tempdir().unwrap();
    let pool = Pool::start(dir.path(), 0);
    pool.create_sr(dir.path(), "sr1", "256M");
    pool.ctl(&["vdi-create", "sd", "--sr", "sr1", "--size", "16M"]);
    let elf = guest_elf(dir.path());
    pool.ctl(&guest_vm("sv", "sd", &elf, "seed=1", &[]));

    // Bad schedules: refused, nothing set.
    pool.refused(
        &["schedule-set", "s", "--vm", "sv", "--every", "30s"],
        "every_seconds must be 60",
    );
    pool.refused(
        &["schedule-set", "s", "--vm", "nope", "--every", "1h"],
        "nope",
    );
    pool.refused(
        &[
            "schedule-set",
            "s",
            "--vm",
            "sv",
            "--every",
            "1h",
            "--at",
            "02:00",
        ],
        "not within the period",
    );
    pool.refused(
        &["schedule-set", "a b", "--vm", "sv", "--every", "1h"],
        "schedule name",
    );
    pool.refused(&["schedule-run", "nope"], "no schedule named");
    assert!(
        !pool.ctl(&["schedule-list", "--json"]).contains("\"name\""),
        "nothing set"
    );

    // Due on its own within seconds: every minute, at the second 8 s from now.
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let at = format!("{}s", (now + 8) % 60);
    pool.ctl(&[
        "schedule-set",
        "minutely",
        "--vm",
        "sv",
        "--every",
        "1m",
        "--at",
        &at,
        "--keep-last",
        "1",
    ]);
    let rows = wait_for(Duration::from_secs(40), || {
        let rows = snapshots(&pool, "sv");
        (!of_schedule(&rows, "minutely").is_empty()).then_some(rows)
    })
    .unwrap_or_else(|| panic!("the leader ran the schedule\n{}", pool.logs()));
    let name = &rows.iter().find(|r| r.2 == "minutely").unwrap().0;
    assert!(name.starts_with("minutely-"), "{name}");
    let tasks = pool.ctl(&["task-list", "--json"]);
    let run = tasks
        .lines()
        .find(|l| l.contains("\"by\": \"schedule minutely\""))
        .unwrap_or_else(|| panic!("a task by the schedule: {tasks}"));
    assert_eq!(field(run, "kind"), "vm.snapshot", "{run}");
    pool.ctl(&["schedule-delete", "minutely"]);

    // A person's snapshot, then three runs asked for now of a schedule keeping 2.
    pool.ctl(&["vm-snapshot", "sv", "mine"]);
    pool.ctl(&[
        "schedule-set",
        "hourly",
        "--vm",
        "sv",
        "--every",
        "1h",
        "--keep-last",
        "2",
    ]);
    let mut taken = Vec::new();
    for _ in 0..3 {
        pool.ctl(&["schedule-run", "hourly"]);
        let rows = snapshots(&pool, "sv");
        let new: Vec<String> = of_schedule(&rows, "hourly")
            .into_iter()
            .filter(|id| !taken.contains(id))
            .collect();
        taken.extend(new);
    }
    assert_eq!(taken.len(), 3, "three runs, three snapshots: {taken:?}");
    let kept = wait_for(Duration::from_secs(20), || {
        let now = of_schedule(&snapshots(&pool, "sv"), "hourly");
        (now.len() == 2).then_some(now)
    })
    .unwrap_or_else(|| {
        panic!(
            "the retention keeps 2: {:?}\n{}",
            snapshots(&pool, "sv"),
            pool.logs()
        )
    });
    let mut newest = taken[1..].to_vec();
    newest.sort();
    assert_eq!(kept, newest, "the oldest went: {taken:?}");
    let rows = snapshots(&pool, "sv");
    assert!(
        rows.iter().any(|r| r.0 == "mine"),
        "a person's stays: {rows:?}"
    );
    // The minutely one is a person's now (its schedule was deleted): kept too.
    assert_eq!(rows.len(), 4, "{rows:?}");
    let tasks = pool.ctl(&["task-list", "--json"]);
    let delete = tasks
        .lines()
        .find(|l| l.contains("vm.snapshot.delete"))
        .unwrap_or_else(|| panic!("the retention's delete is a task: {tasks}"));
    assert_eq!(field(delete, "by"), "schedule hourly", "{delete}");
    assert_eq!(field(delete, "state"), "succeeded", "{delete}");

    let list = pool.ctl(&["schedule-list", "--json"]);
    let line = list
        .lines()
        .find(|l| l.contains("\"name\": \"hourly\""))
        .unwrap_or_else(|| panic!("{list}"));
    assert!(line.contains("\"snapshots\": 2"), "{line}");
    assert_eq!(field(line, "keep"), "last 2, daily 0, weekly 0", "{line}");

    // A checkpoint of a stopped VM: the run's task fails, and says why; an alert too.
    pool.ctl(&[
        "schedule-set",
        "mem",
        "--vm",
        "sv",
        "--every",
        "1d",
        "--checkpoint",
    ]);
    pool.refused(&["schedule-run", "mem"], "running or paused");
    let alerts = pool.ctl(&["alerts", "--json"]);
    assert!(alerts.contains("schedule mem"), "{alerts}");

    // Pool settings change as before; the schedules stay.
    pool.ctl(&["pool-set", "--heartbeat-timeout", "31"]);
    let list = pool.ctl(&["schedule-list", "--json"]);
    assert_eq!(list.matches("\"name\"").count(), 2, "{list}");

    // Deleted: its snapshots stay, no schedule's any more.
    pool.ctl(&["schedule-delete", "hourly"]);
    let rows = snapshots(&pool, "sv");
    assert_eq!(rows.len(), 4, "{rows:?}");
    assert!(of_schedule(&rows, "hourly").is_empty(), "{rows:?}");
    pool.refused(&["schedule-delete", "hourly"], "no schedule named");
}
