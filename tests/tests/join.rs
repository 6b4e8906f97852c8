//! Joining a pool with a one-time token, with real processes: a pool founded with its CA
//! in its state (`poold --found-ca`) issues a join file (`poolctl host-join NAME --out`),
//! and `hostd --join FILE` with no TLS directory gets its certificate with it, joins and
//! heartbeats. A second use of the token, an expired token, a token claimed for another
//! host, and a read-only user's request for a token are refused and change nothing.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use e2e_tests::join::{
    add_member, host_join_file, hostd_joining, join_file, member_joining, run_until_exit,
};
use e2e_tests::{Coordinators, Daemon, poolctl, poolctl_ok, secret_file, text, wait_for};

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

/// A `hostd --join` that must be refused: it exits with an error naming `why`, and
/// writes no TLS directory.
fn refused(cmd: std::process::Command, tls_dir: &Path, why: &str) {
    let o = run_until_exit(cmd, Duration::from_secs(30)).expect("hostd was not refused");
    assert!(!o.status.success(), "{}", text(&o));
    assert!(text(&o).contains(why), "expected {why:?}: {}", text(&o));
    assert!(
        !tls_dir.exists(),
        "a refused join wrote {}",
        tls_dir.display()
    );
}

#[test]
fn a_host_joins_once_with_its_token() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let pool = Coordinators::start(dir, 3);
    let p = pool.pool_arg();

    // The join file: 0600, never overwritten, the token in it and never on a command line.
    let file = host_join_file(&p, dir, "h1", &[]);
    assert_eq!(mode(&file), 0o600);
    let body = std::fs::read_to_string(&file).unwrap();
    assert!(
        body.contains("pooljoin-") && body.contains("identity = \"host/h1\""),
        "{body}"
    );
    let o = poolctl(&p, &["host-join", "h1", "--out", file.to_str().unwrap()]);
    assert!(
        !o.status.success() && text(&o).contains("never overwritten"),
        "{}",
        text(&o)
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), body);

    // hostd with no TLS directory joins with it, heartbeats and shows in host-list.
    let tls1 = dir.join("h1-tls");
    let cmd = hostd_joining(dir, "h1", "127.0.0.41", &file, &tls1);
    let mut h1 = Daemon::spawn("h1", cmd, &dir.join("h1.log"));
    h1.wait_line("hostd listening on ", Duration::from_secs(30));
    assert_eq!(mode(&tls1), 0o700);
    assert_eq!(mode(&tls1.join("key.pem")), 0o600);
    let hosts = wait_for(Duration::from_secs(30), || {
        let s = poolctl_ok(&p, &["host-list", "--json"]);
        (s.contains("\"name\": \"h1\"")
            && s.contains("\"state\": \"enabled\"")
            && !s.contains("\"heartbeat\": \"-\""))
        .then_some(s)
    })
    .unwrap_or_else(|| panic!("h1 joined and heartbeats; its log:\n{}", h1.log_text()));
    assert!(
        !h1.log_text().contains("pooljoin-"),
        "hostd logged its token"
    );

    // The same file again, for a second host directory: the token is spent.
    let tls2 = dir.join("h1-again-tls");
    refused(
        hostd_joining(dir, "h1", "127.0.0.42", &file, &tls2),
        &tls2,
        "already used",
    );
    // hostd with its TLS directory already there refuses --join before calling anyone.
    refused_existing(dir, &file, &tls1);
    assert_eq!(
        poolctl_ok(&p, &["host-list", "--json"])
            .matches("\"id\":")
            .count(),
        1
    );

    // An expired token.
    let short = host_join_file(&p, dir, "h2", &["--ttl", "1s"]);
    std::thread::sleep(Duration::from_millis(1500));
    let tls = dir.join("h2-tls");
    refused(
        hostd_joining(dir, "h2", "127.0.0.43", &short, &tls),
        &tls,
        "expired",
    );

    // A token for h3 with a certificate request for h4: the pool checks the identity
    // (the file is edited so hostd itself does not refuse first). The token stays unspent.
    let h3 = host_join_file(&p, dir, "h3", &[]);
    let forged = dir.join("h4.join");
    let text3 = std::fs::read_to_string(&h3).unwrap();
    std::fs::write(&forged, text3.replace("host/h3", "host/h4")).unwrap();
    let tls = dir.join("h4-tls");
    refused(
        hostd_joining(dir, "h4", "127.0.0.44", &forged, &tls),
        &tls,
        "PermissionDenied",
    );
    let hosts_after = poolctl_ok(&p, &["host-list", "--json"]);
    assert_eq!(
        hosts_after.matches("\"id\":").count(),
        1,
        "{hosts_after}\n{hosts}"
    );

    // A read-only user cannot have a token.
    let reader = read_only_user(&pool, dir);
    let o = reader
        .poolctl()
        .args(["host-join", "h5", "--out"])
        .arg(dir.join("h5.join"))
        .output()
        .unwrap();
    assert!(
        !o.status.success() && text(&o).contains("PermissionDenied"),
        "{}",
        text(&o)
    );
    assert!(!dir.join("h5.join").exists());

    // Each refusal is in the audit log.
    let audit = poolctl_ok(&p, &["audit-log", "--json"]);
    let joins = audit.lines().filter(|l| l.contains("\"Join\"")).count();
    assert!(
        joins >= 4,
        "the joins (one granted, three refused) are audited:\n{audit}"
    );
    assert!(
        !audit.contains("pooljoin-"),
        "no token text in the audit log"
    );
}

fn refused_existing(dir: &Path, file: &Path, tls: &Path) {
    let cmd = hostd_joining(dir, "h1", "127.0.0.41", file, tls);
    let o = run_until_exit(cmd, Duration::from_secs(30)).expect("hostd was not refused");
    assert!(
        !o.status.success() && text(&o).contains("already joined"),
        "{}",
        text(&o)
    );
}

fn read_only_user(pool: &Coordinators, dir: &Path) -> e2e_tests::PoolArg {
    let pw = secret_file(dir, "reader-password", "reader-password-1");
    poolctl_ok(
        &pool.pool,
        &[
            "user-add",
            "reader",
            "--password-file",
            &pw,
            "--role",
            "read-only",
        ],
    );
    let token = pool.pool.login("reader", Path::new(&pw));
    e2e_tests::PoolArg {
        token: Some(token),
        ..pool.pool.clone()
    }
}

#[test]
fn a_pool_founded_without_its_ca_issues_no_token() {
    let tmp = tempfile::tempdir().unwrap();
    let pool = Coordinators::start_without_ca(tmp.path(), 1);
    let out = tmp.path().join("h1.join");
    let o = poolctl(
        &pool.pool,
        &["host-join", "h1", "--out", out.to_str().unwrap()],
    );
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("FailedPrecondition") && text(&o).contains("poolctl pki-issue"),
        "{}",
        text(&o)
    );
    assert!(!out.exists());
}

#[test]
fn of_two_hosts_racing_with_one_token_one_joins() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let pool = Coordinators::start(dir, 3);
    let file = host_join_file(&pool.pool, dir, "h1", &[]);
    let tls = [dir.join("a-tls"), dir.join("b-tls")];
    let mut children: Vec<_> = ["127.0.0.51", "127.0.0.52"]
        .iter()
        .zip(&tls)
        .map(|(ip, t)| {
            hostd_joining(dir, "h1", ip, &file, t)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    // The loser exits refused; the winner runs on with its TLS directory.
    let loser = wait_for(Duration::from_secs(30), || {
        children
            .iter_mut()
            .position(|c| c.try_wait().unwrap().is_some())
    })
    .expect("one of the two hosts was refused");
    let winner = 1 - loser;
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        children[winner].try_wait().unwrap().is_none(),
        "the winner runs on"
    );
    let loser_out = children.remove(loser).wait_with_output().unwrap();
    let why = String::from_utf8_lossy(&loser_out.stderr);
    assert!(why.contains("already used"), "{why}");
    assert!(tls[winner].exists() && !tls[loser].exists());
    for mut c in children {
        let _ = c.kill();
        let _ = c.wait();
    }
}

#[test]
fn a_new_member_joins_with_its_token() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut pool = Coordinators::start(dir, 3);
    let file = join_file(&pool.pool, dir, "member-join", "4", &[]);
    assert_eq!(mode(&file), 0o600);
    let addr = format!("127.0.0.1:{}", e2e_tests::free_port());
    let m4 = member_joining(dir, &pool.addrs, 4, &addr, &file);
    pool.procs.push(m4);
    let tls = dir.join("member-4-tls");
    wait_for(Duration::from_secs(20), || {
        tls.join("cert.pem").exists().then_some(())
    })
    .unwrap_or_else(|| {
        let log = std::fs::read_to_string(dir.join("poold-4.log")).unwrap_or_default();
        panic!("member 4 got no certificate: {log}")
    });
    assert_eq!(mode(&tls), 0o700);
    assert_eq!(mode(&tls.join("key.pem")), 0o600);
    let mut last = String::new();
    wait_for(Duration::from_secs(20), || {
        add_member(&pool.pool, 4, &addr).map_err(|e| last = e).ok()
    })
    .unwrap_or_else(|| panic!("AddMember 4: {last}"));
    // The new member follows the log over mutual TLS with the certificate it was issued.
    let members = wait_for(Duration::from_secs(30), || {
        let s = poolctl_ok(&pool.pool, &["member-list", "--json"]);
        let line = s.lines().find(|l| l.contains("\"id\": 4,"))?.to_owned();
        line.contains("\"reachable\": true").then_some(s)
    });
    assert!(members.is_some(), "member 4 joined and follows");
}

/// `storaged serve` with `join_file` and a TLS directory still to be made.
fn storaged_joining(dir: &Path, name: &str, join: &Path, tls_dir: &Path) -> std::process::Command {
    let state = dir.join(name);
    std::fs::create_dir_all(&state).unwrap();
    let config = state.join("storaged.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\niscsi_listen = \"127.0.0.1:0\"\nstate_dir = {:?}\n\
             tls_dir = {tls_dir:?}\njoin_file = {join:?}\n",
            state.join("state")
        ),
    )
    .unwrap();
    let mut cmd = std::process::Command::new(e2e_tests::binary("storaged"));
    cmd.args(["--log", "info", "serve", "--config"]).arg(config);
    cmd
}

#[test]
fn a_storage_endpoint_joins_once_with_its_token_and_the_members_reach_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let pool = Coordinators::start(dir, 1);
    let p = pool.pool_arg();
    let file = join_file(&p, dir, "storage-join", "s1", &[]);
    let tls = dir.join("s1-tls");
    let mut s1 = Daemon::spawn(
        "s1",
        storaged_joining(dir, "s1", &file, &tls),
        &dir.join("s1.log"),
    );
    let addr = s1.wait_line("LISTENING ", Duration::from_secs(30));
    assert_eq!(mode(&tls), 0o700);
    assert_eq!(mode(&tls.join("key.pem")), 0o600);
    let joined = pool_trust::DaemonTls::load(&tls).unwrap();
    assert_eq!(
        joined.identity(),
        &pool_trust::Identity::Storage("s1".into())
    );
    assert!(
        !s1.log_text().contains("pooljoin-"),
        "storaged logged its token"
    );
    // A coordinator member reaches it by its address (the certificate names it).
    let member = p
        .ca()
        .issue(&pool_trust::Identity::Member(1), &[], &dir.join("m1"))
        .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let tls = pool_trust::tls::client_tls(&member.bundle, Some(&member.creds), None).unwrap();
        let ch = tonic::transport::Endpoint::from_shared(format!("https://{addr}"))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .unwrap();
        proto::storage::storage_service_client::StorageServiceClient::new(ch)
            .list_pools(proto::storage::ListPoolsRequest::default())
            .await
            .expect("a member calls the joined storage endpoint");
    });
    // The file again, for another directory: spent.
    let again = dir.join("s1-again-tls");
    let o = run_until_exit(
        storaged_joining(dir, "s1b", &file, &again),
        Duration::from_secs(30),
    )
    .expect("storaged was not refused");
    assert!(!o.status.success());
    assert!(text(&o).contains("already used"), "{}", text(&o));
    assert!(!again.exists());
}
