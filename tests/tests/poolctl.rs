//! `poolctl` against a real three-member coordinator: it finds the leader, changes the
//! pool through tasks, prints tables and JSON, and says what to do when something fails.

use std::time::Duration;

use e2e_tests::{Coordinators, poolctl, wait_for};

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn hosts_and_tasks_through_poolctl() {
    let dir = tempfile::tempdir().unwrap();
    let pool = Coordinators::start(dir.path(), 3);
    let p = pool.pool_arg();
    // The members elect a leader; poolctl finds it.
    let members = wait_for(Duration::from_secs(30), || {
        let o = poolctl(&p, &["member-list", "--json"]);
        let s = String::from_utf8_lossy(&o.stdout).to_string();
        (o.status.success() && s.contains("\"leader\": true")).then_some(s)
    })
    .expect("a leader within 30 s");
    assert_eq!(members.matches("\"id\":").count(), 3, "{members}");

    let o = poolctl(&p, &["host-join", "h1", "127.0.0.1:7001"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("succeeded"), "{}", text(&o));
    let o = poolctl(&p, &["host-join", "h2", "127.0.0.1:7002"]);
    assert!(o.status.success(), "{}", text(&o));

    let o = poolctl(&p, &["host-list"]);
    let table = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(table.starts_with("ID"), "{table}");
    assert!(table.contains("h1") && table.contains("h2"), "{table}");

    let o = poolctl(&p, &["host-disable", "h1"]);
    assert!(o.status.success(), "{}", text(&o));
    let o = poolctl(&p, &["host-list", "--json"]);
    let json = String::from_utf8_lossy(&o.stdout).to_string();
    let h1 = json
        .lines()
        .find(|l| l.contains("\"name\": \"h1\""))
        .expect("h1 listed");
    assert!(h1.contains("\"state\": \"disabled\""), "{json}");

    // Names that match nothing are refused with a hint, and nothing changes.
    let o = poolctl(&p, &["host-enable", "nosuch"]);
    assert!(!o.status.success());
    assert!(
        text(&o).contains("no host named \"nosuch\""),
        "{}",
        text(&o)
    );

    let o = poolctl(&p, &["task-list", "--json"]);
    let tasks = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(o.status.success(), "{}", text(&o));
    assert!(tasks.contains("\"state\": \"succeeded\""), "{tasks}");

    // With every member gone, poolctl says so and what to check.
    drop(pool);
    let o = poolctl(&p, &["host-list"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("is the pool running"), "{}", text(&o));
}
