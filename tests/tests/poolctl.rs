//! `poolctl` against a real three-member coordinator: it finds the leader, changes the
//! pool through tasks, prints tables and JSON, and says what to do when something fails.

use std::time::Duration;

use e2e_tests::{Coordinators, PoolArg, poolctl, secret_file, wait_for};

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

    // Leadership moves on request to another member, and member-list shows it there.
    let leader_line = |json: &str| {
        json.lines()
            .find(|l| l.contains("\"leader\": true"))
            .map(str::to_owned)
            .unwrap_or_default()
    };
    let next = if leader_line(&members).contains("\"id\": 2,") {
        "3"
    } else {
        "2"
    };
    let o = poolctl(&p, &["member-transfer", next, "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains(&format!("\"leader\": {next}")),
        "{}",
        text(&o)
    );
    let o = poolctl(&p, &["member-list", "--json"]);
    let members = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        leader_line(&members).contains(&format!("\"id\": {next},")),
        "{members}"
    );
    let o = poolctl(&p, &["member-transfer", "9"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("not a voter"), "{}", text(&o));

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
    // By default the tasks people started (here the joins, by the pool's first admin, and
    // the founding: of that admin, and of the pool's CA in its state); --all adds the
    // pool's own (host reports and the like).
    let rows = |json: &str| json.lines().filter(|l| l.contains("\"id\":")).count();
    assert!(tasks.contains("\"kind\": \"host.join\""), "{tasks}");
    assert!(
        tasks
            .lines()
            .filter(|l| l.contains("\"id\":"))
            .all(|l| l.contains("\"by\": \"admin\"")
                || (l.contains("\"by\": \"bootstrap\"") && l.contains("user.create"))
                || (l.contains("\"by\": \"founding\"") && l.contains("pool.set_ca"))),
        "{tasks}"
    );
    assert!(!tasks.contains("host.report"), "{tasks}");
    let o = poolctl(&p, &["task-list", "--all", "--json"]);
    let all = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(o.status.success(), "{}", text(&o));
    assert!(rows(&all) >= rows(&tasks), "{all}\n{tasks}");

    // With every member gone, poolctl says so and what to check.
    drop(pool);
    let o = poolctl(&p, &["host-list"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("is the pool running"), "{}", text(&o));
}

/// The position, kind and name of each event line of `poolctl events --json`.
fn events(out: &str) -> Vec<(u64, String, String)> {
    let field = |l: &str, key: &str| -> String {
        let tag = format!("\"{key}\": ");
        let Some(at) = l.find(&tag) else {
            return String::new();
        };
        let rest = &l[at + tag.len()..];
        let end = rest.find([',', '}']).unwrap_or(rest.len());
        rest[..end].trim_matches('"').to_owned()
    };
    out.lines()
        .filter(|l| l.contains("\"kind\""))
        .map(|l| {
            let position = field(l, "position").parse().expect("a position");
            (position, field(l, "kind"), field(l, "name"))
        })
        .collect()
}

#[test]
fn the_change_feed_lists_every_object_then_follows_and_resumes_on_another_member() {
    use std::io::BufRead;

    let dir = tempfile::tempdir().unwrap();
    let mut pool = Coordinators::start(dir.path(), 3);
    let p = pool.pool_arg();
    wait_for(Duration::from_secs(30), || {
        poolctl(&p, &["member-list"]).status.success().then_some(())
    })
    .expect("a leader within 30 s");
    let o = poolctl(&p, &["host-join", "h1", "127.0.0.1:7001"]);
    assert!(o.status.success(), "{}", text(&o));

    // From nothing: a reset, then every object at one position, and it ends there.
    let o = poolctl(&p, &["events", "--json"]);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(
        out.starts_with("{\"position\": ")
            && out.lines().next().unwrap().contains("\"reset\": true"),
        "{out}"
    );
    let listing = events(&out);
    let at = listing[0].0;
    assert!(listing.iter().all(|e| e.0 == at), "{out}");
    assert_eq!(listing[0].1, "pool", "{out}");
    assert!(
        listing.iter().any(|e| e.1 == "host" && e.2 == "h1"),
        "{out}"
    );

    // From a position: only what came after it, no reset.
    let o = poolctl(&p, &["host-disable", "h1"]);
    assert!(o.status.success(), "{}", text(&o));
    let o = poolctl(&p, &["events", "--json", "--after", &at.to_string()]);
    let out = text(&o);
    assert!(o.status.success() && !out.contains("reset"), "{out}");
    let after = events(&out);
    assert!(after.iter().all(|e| e.0 > at), "{out}");
    assert!(
        out.contains("\"name\": \"h1\", \"state\": \"disabled\""),
        "{out}"
    );
    let caught_up = after.iter().map(|e| e.0).max().unwrap();

    // Following: a change shows up as it is committed, and when the member the stream
    // is on dies, the feed goes on from another member without a gap or a repeat.
    let mut follow = p
        .poolctl()
        .args([
            "events",
            "--json",
            "--follow",
            "--after",
            &caught_up.to_string(),
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let stdout = follow.stdout.take().unwrap();
    std::thread::spawn(move || {
        for l in std::io::BufReader::new(stdout).lines() {
            let Ok(l) = l else { break };
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    let mut seen: Vec<String> = Vec::new();
    let mut wait_line = |what: &str| {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::time::Instant::now() < deadline {
            if let Ok(l) = rx.recv_timeout(Duration::from_millis(200)) {
                let hit = l.contains(what);
                seen.push(l);
                if hit {
                    return;
                }
            }
        }
        panic!("no event with {what} in 20 s:\n{}", seen.join("\n"));
    };
    let o = poolctl(&p, &["host-join", "h2", "127.0.0.1:7002"]);
    assert!(o.status.success(), "{}", text(&o));
    wait_line("\"name\": \"h2\"");
    let members =
        String::from_utf8_lossy(&poolctl(&p, &["member-list", "--json"]).stdout).to_string();
    let leader: usize = members
        .lines()
        .find(|l| l.contains("\"leader\": true"))
        .and_then(|l| l.split("\"id\": ").nth(1))
        .and_then(|r| r.split(',').next())
        .and_then(|id| id.trim().parse().ok())
        .expect("a leader");
    pool.procs[leader - 1].kill();
    let o = wait_for(Duration::from_secs(30), || {
        let o = poolctl(&p, &["host-disable", "h2"]);
        o.status.success().then_some(o)
    })
    .expect("the pool goes on with two members");
    assert!(o.status.success(), "{}", text(&o));
    wait_line("\"name\": \"h2\", \"state\": \"disabled\"");
    let _ = follow.kill();
    let _ = follow.wait();
    let got = events(&seen.join("\n"));
    assert!(got.iter().all(|e| e.0 > caught_up), "{seen:?}");
    assert!(
        got.windows(2).all(|w| w[0].0 <= w[1].0),
        "in order: {seen:?}"
    );
    let mut keys: Vec<_> = seen.iter().filter(|l| l.contains("\"kind\"")).collect();
    let n = keys.len();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), n, "nothing twice: {seen:?}");
    assert!(
        !seen.iter().any(|l| l.contains("reset")),
        "resumed, not reloaded: {seen:?}"
    );
}

/// Runs poolctl with a token (or none) and returns whether it succeeded and its output.
fn as_user(p: &PoolArg, token: Option<&str>, args: &[&str]) -> (bool, String) {
    let p = match token {
        Some(t) => p.as_token(t),
        None => p.anonymous(),
    };
    let o = poolctl(&p, args);
    (o.status.success(), text(&o))
}

#[test]
fn roles_decide_what_each_user_may_do_and_the_audit_log_says_who_did_it() {
    let dir = tempfile::tempdir().unwrap();
    let pool = Coordinators::start(dir.path(), 3);
    let p = pool.pool_arg();
    wait_for(Duration::from_secs(30), || {
        poolctl(&p, &["member-list"]).status.success().then_some(())
    })
    .expect("a leader within 30 s");
    // Passwords from files (never on a command line), 12 characters or more.
    let pw = |name: &str| secret_file(dir.path(), name, &format!("{name}-is-long-enough"));

    // The pool was founded with its first admin: no token, no entry; the admin adds alice.
    let (ok, out) = as_user(&p, None, &["host-list"]);
    assert!(!ok, "a founded pool refuses calls without a token: {out}");
    let founder = p.token.clone().expect("the harness logged in as admin");
    let (ok, out) = as_user(
        &p,
        Some(&founder),
        &[
            "user-add",
            "alice",
            "--password-file",
            &pw("a-secret"),
            "--role",
            "pool-admin",
        ],
    );
    assert!(ok, "{out}");
    let (ok, out) = as_user(&p, None, &["host-list"]);
    assert!(
        !ok,
        "a pool with users refuses calls without a token: {out}"
    );
    assert!(
        out.contains("Unauthenticated") && out.contains("log in"),
        "{out}"
    );

    let (ok, out) = as_user(
        &p,
        None,
        &["login", "alice", "--password-file", &pw("wrong")],
    );
    assert!(!ok, "a wrong password is refused: {out}");
    let (ok, out) = as_user(
        &p,
        None,
        &["login", "alice", "--password-file", &pw("a-secret")],
    );
    assert!(ok, "{out}");
    let admin = out.lines().next().unwrap().trim().to_owned();
    assert!(admin.starts_with("v2."), "{out}");

    let (ok, out) = as_user(
        &p,
        Some(&admin),
        &[
            "user-add",
            "bob",
            "--password-file",
            &pw("b-secret"),
            "--role",
            "read-only",
        ],
    );
    assert!(ok, "{out}");
    let (ok, out) = as_user(
        &p,
        None,
        &["login", "bob", "--password-file", &pw("b-secret")],
    );
    assert!(ok, "{out}");
    let reader = out.lines().next().unwrap().trim().to_owned();

    // read-only reads but changes nothing; a grant by the admin lets it act.
    let (ok, out) = as_user(&p, Some(&reader), &["host-list"]);
    assert!(ok, "{out}");
    // The change feed shows read-only every object but the users; an admin sees them.
    let (ok, out) = as_user(&p, Some(&reader), &["events", "--json"]);
    assert!(ok && out.contains("\"kind\": \"pool\""), "{out}");
    assert!(!out.contains("\"kind\": \"user\""), "{out}");
    let (ok, out) = as_user(&p, Some(&admin), &["events", "--json"]);
    assert!(ok && out.contains("\"kind\": \"user\", \"id\""), "{out}");
    assert!(out.contains("\"name\": \"bob\""), "{out}");
    assert!(
        !out.contains("\"kind\": \"audit\""),
        "a listing has no audit: {out}"
    );
    let listed_at = events(&out)[0].0.to_string();
    let (ok, out) = as_user(&p, Some(&reader), &["host-join", "h1", "127.0.0.1:7001"]);
    assert!(!ok, "read-only cannot join a host: {out}");
    assert!(
        out.contains("PermissionDenied") && out.contains("pool-admin"),
        "{out}"
    );
    let (ok, out) = as_user(&p, Some(&admin), &["host-list", "--json"]);
    assert!(
        ok && !out.contains("h1"),
        "the refused call changed nothing: {out}"
    );
    // The refusal reaches the feed as an audit record, for those who may read the log.
    let since = ["events", "--json", "--after", listed_at.as_str()];
    let audited = wait_for(Duration::from_secs(10), || {
        let (ok, out) = as_user(&p, Some(&admin), &since);
        (ok && out.contains("\"kind\": \"audit\"") && out.contains("JoinHost by bob")).then_some(())
    });
    assert!(audited.is_some(), "{}", as_user(&p, Some(&admin), &since).1);
    let (ok, out) = as_user(&p, Some(&reader), &since);
    assert!(ok && !out.contains("\"kind\": \"audit\""), "{out}");
    let (ok, out) = as_user(&p, Some(&admin), &["role-grant", "bob", "pool-operator"]);
    assert!(ok, "{out}");
    let (ok, out) = as_user(&p, Some(&reader), &["host-join", "h1", "127.0.0.1:7001"]);
    assert!(ok, "a granted role takes effect on the same token: {out}");
    let (ok, out) = as_user(
        &p,
        Some(&reader),
        &[
            "user-add",
            "eve",
            "--password-file",
            &pw("e-secret"),
            "--role",
            "pool-admin",
        ],
    );
    assert!(!ok, "pool-operator cannot add users: {out}");

    // The audit log names who did what, refusals included; reading it needs pool-operator.
    let (ok, out) = as_user(&p, Some(&admin), &["audit-log", "--json"]);
    assert!(ok, "{out}");
    let line = |user: &str, method: &str| {
        out.lines()
            .find(|l| l.contains(&format!("\"user\": \"{user}\"")) && l.contains(method))
            .map(str::to_owned)
    };
    assert!(line("alice", "CreateUser").is_some(), "{out}");
    assert!(line("bob", "JoinHost").is_some(), "{out}");
    let refused = out
        .lines()
        .filter(|l| l.contains("\"user\": \"bob\"") && l.contains("JoinHost"))
        .count();
    assert!(refused >= 2, "the refused join is audited too: {out}");

    // A change feed followed with a token ends once the token is revoked.
    let mut follow = p
        .as_token(&reader)
        .poolctl()
        .args(["events", "--follow"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert!(follow.try_wait().unwrap().is_none(), "the feed is followed");
    let (ok, out) = as_user(&p, Some(&admin), &["user-revoke-tokens", "bob"]);
    assert!(ok, "{out}");
    let ended = wait_for(Duration::from_secs(15), || follow.try_wait().unwrap());
    let Some(status) = ended else {
        let _ = follow.kill();
        panic!("a revoked token still follows the feed");
    };
    let out = follow.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !status.success() && err.contains("Unauthenticated"),
        "{err}"
    );
}
