//! `poolctl` as a user runs it, without a pool: bad arguments fail at once, with a message
//! that says what is accepted, and before anything is sent to the pool.

use std::net::TcpListener;
use std::process::{Command, Output};

/// A coordinator address that notices any connection made to it.
struct Sentinel(TcpListener);

impl Sentinel {
    fn new() -> Sentinel {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind port 0");
        l.set_nonblocking(true).expect("nonblocking listener");
        Sentinel(l)
    }

    fn addr(&self) -> String {
        self.0.local_addr().expect("local address").to_string()
    }

    fn was_contacted(&self) -> bool {
        self.0.accept().is_ok()
    }

    /// What the first connection made to it sent before closing (empty if none).
    fn received(&self) -> Vec<u8> {
        use std::io::Read;
        let Ok((mut c, _)) = self.0.accept() else {
            return Vec::new();
        };
        c.set_nonblocking(false).expect("blocking stream");
        let mut bytes = Vec::new();
        let _ = c.read_to_end(&mut bytes);
        bytes
    }
}

fn poolctl(pool: &Sentinel, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_poolctl"))
        .args(args)
        .args(["--pool", &pool.addr()])
        .env_remove("POOLCTL_TOKEN")
        .output()
        .expect("run poolctl")
}

fn rejected(args: &[&str], says: &str) {
    let pool = Sentinel::new();
    let out = poolctl(&pool, args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
    assert!(err.contains(says), "{args:?}: wanted {says:?} in: {err}");
    assert!(!pool.was_contacted(), "{args:?} reached the pool");
}

#[test]
fn a_size_with_an_unknown_unit_is_refused() {
    rejected(
        &["vm-create", "web", "--memory", "12Q"],
        "unknown size unit in \"12Q\" (use K, M, G or T)",
    );
    rejected(
        &["vdi-create", "d", "--sr", "sr1", "--size", "lots"],
        "--size",
    );
}

#[test]
fn an_unknown_ha_priority_is_refused() {
    rejected(
        &["vm-create", "web", "--ha", "always"],
        "use none, best-effort or restart",
    );
    rejected(&["vm-set", "web", "--ha", "sometimes"], "--ha");
}

#[test]
fn an_unknown_role_is_refused() {
    rejected(
        &["user-add", "ann", "--role", "root"],
        "unknown role \"root\"",
    );
    rejected(
        &["role-grant", "ann", "superuser"],
        "pool-admin, pool-operator",
    );
}

#[test]
fn an_unknown_verb_is_refused_and_help_lists_the_verbs() {
    rejected(&["vm-explode", "web"], "unrecognized subcommand");
    let out = Command::new(env!("CARGO_BIN_EXE_poolctl"))
        .arg("--help")
        .output()
        .expect("run poolctl --help");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for verb in ["lab", "host-list", "vm-create", "vm-migrate", "member-list"] {
        assert!(help.contains(verb), "{verb} missing from --help:\n{help}");
    }
}

#[test]
fn without_the_pools_ca_nothing_is_sent() {
    // With no CA, poolctl asks the pool for its certificate (pin.rs): a TLS handshake and
    // nothing else, and a member that does not complete it gets nothing.
    let pool = Sentinel::new();
    let home = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_poolctl"))
        .args(["host-list", "--pool", &pool.addr()])
        .env_remove("POOLCTL_CA")
        .env("POOLCTL_TOKEN", "pooltok-not-a-real-token")
        .env("HOME", home.path())
        .env("XDG_CONFIG_HOME", home.path())
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run poolctl");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("no TLS handshake"), "{err}");
    let sent = pool.received();
    assert_eq!(
        sent.first(),
        Some(&0x16),
        "not a TLS handshake record: {sent:?}"
    );
    assert!(
        !sent.windows(7).any(|w| w == b"pooltok"),
        "the token crossed the network"
    );
    assert!(!home.path().join("poolctl").exists(), "pinned nothing met");

    let dir = tempfile::tempdir().unwrap();
    let not_a_ca = dir.path().join("ca.pem");
    std::fs::write(&not_a_ca, "not a certificate\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_poolctl"))
        .args(["host-list", "--pool", &pool.addr(), "--ca"])
        .arg(&not_a_ca)
        .output()
        .expect("run poolctl");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("CA bundle"), "{err}");
    assert!(!pool.was_contacted());
}

#[test]
fn a_password_on_the_command_line_is_refused() {
    rejected(
        &["login", "ann", "--password", "hunter2-hunter2"],
        "unexpected argument '--password'",
    );
    rejected(
        &["user-add", "ann", "--password", "hunter2-hunter2"],
        "unexpected argument '--password'",
    );
}

#[test]
fn a_token_on_the_command_line_is_refused_before_anything_is_sent() {
    let pool = Sentinel::new();
    let out = poolctl(&pool, &["host-list", "--token", "pooltok-visible-in-ps"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("--token is refused") && err.contains("POOLCTL_TOKEN"),
        "{err}"
    );
    assert!(!pool.was_contacted());
}
