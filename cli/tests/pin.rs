//! `poolctl` without `--ca`, against real TLS servers: the pool's CA is pinned on first
//! contact only with consent, used silently afterwards, a changed CA is refused, and `--ca`
//! leaves the pins alone. The servers present member certificates of a pool CA made for
//! the test through `pool_trust::tls::server_tls`, as poold does, and answer every call
//! `Unimplemented`: a call that gets that answer went through TLS to the server. The last
//! test does the same against a real poold member, login included.

use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use pool_trust::{ClientAuth, Identity, LocalCa, PoolId};
use tonic::transport::ServerTlsConfig;

/// A TLS server on a fixed address, answering every gRPC call `Unimplemented`.
struct Member {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Member {
    fn start(addr: SocketAddr, tls: ServerTlsConfig) -> Member {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready, listening) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                // Address reuse: a second server takes over the first one's port.
                let socket = tokio::net::TcpSocket::new_v4().unwrap();
                socket.set_reuseaddr(true).unwrap();
                socket.bind(addr).unwrap();
                let listener = socket.listen(64).unwrap();
                ready.send(()).unwrap();
                tonic::transport::Server::builder()
                    .tls_config(tls)
                    .unwrap()
                    .add_routes(tonic::service::Routes::default())
                    .serve_with_incoming_shutdown(
                        tokio_stream::wrappers::TcpListenerStream::new(listener),
                        async {
                            let _ = stopped.await;
                        },
                    )
                    .await
                    .unwrap();
            });
        });
        listening.recv().expect("the server started");
        Member {
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        let _ = self.stop.take().unwrap().send(());
        let _ = self.thread.take().unwrap().join();
    }
}

fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// A pool CA in `dir` (created for `pool` if missing) and a member's TLS configuration.
fn member_tls(dir: &Path, pool: &PoolId) -> (LocalCa, ServerTlsConfig) {
    let ca = LocalCa::open_or_create(dir, pool).unwrap();
    let tls = ca
        .issue(&Identity::Member(1), &["127.0.0.1"], &dir.join("member-1"))
        .unwrap()
        .server(ClientAuth::Optional)
        .unwrap();
    (ca, tls)
}

/// poolctl as a user runs it from a script: no terminal, its own home, no CA given.
fn poolctl(home: &Path, addr: SocketAddr, extra: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_poolctl"))
        .args(["host-list", "--pool", &addr.to_string()])
        .args(extra)
        .env("HOME", home)
        .env("XDG_CONFIG_HOME", home.join("config"))
        .env("POOLCTL_TOKEN", "pooltok-not-a-real-token")
        .env_remove("POOLCTL_CA")
        .env_remove("POOLCTL_POOL")
        .env_remove("POOLCTL_TRUST_NEW_POOL")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("run poolctl")
}

fn pin_file(home: &Path) -> PathBuf {
    home.join("config/poolctl/known_pools")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The call went through TLS and reached the server (which answers every call so).
fn reached(out: &Output) -> bool {
    stderr(out).contains("Unimplemented")
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

#[test]
fn a_pool_is_pinned_with_consent_used_after_and_a_changed_ca_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    std::fs::create_dir(&home).unwrap();
    let pool = PoolId::generate();
    let (ca, tls) = member_tls(&tmp.path().join("pki"), &pool);
    let fingerprint = ca.ca().cert().fingerprint().to_string();
    let addr = free_addr();
    let member = Member::start(addr, tls);

    // First contact, no terminal, no consent: refused, the fingerprint shown, nothing
    // pinned, no call made.
    let out = poolctl(&home, addr, &[], &[]);
    let err = stderr(&out);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains(&fingerprint), "{err}");
    assert!(err.contains(pool.as_str()), "{err}");
    assert!(err.contains("--trust-new-pool"), "{err}");
    assert!(!reached(&out), "{err}");
    assert!(!pin_file(&home).exists());

    // With consent: pinned (0600 in a 0700 directory) and the call reaches the pool.
    let out = poolctl(&home, addr, &[], &[("POOLCTL_TRUST_NEW_POOL", "1")]);
    let err = stderr(&out);
    assert!(reached(&out), "{err}");
    assert!(
        err.contains(&fingerprint) && err.contains("pinned pool"),
        "{err}"
    );
    let pins = std::fs::read_to_string(pin_file(&home)).unwrap();
    assert!(pins.contains(&format!("{pool} {fingerprint} ")), "{pins}");
    assert_eq!(mode(&pin_file(&home)), 0o600);
    assert_eq!(mode(pin_file(&home).parent().unwrap()), 0o700);

    // Known pool, same CA: used silently, even without consent.
    let out = poolctl(&home, addr, &[], &[]);
    let err = stderr(&out);
    assert!(reached(&out), "{err}");
    assert!(!err.contains("has not met"), "{err}");
    assert_eq!(std::fs::read_to_string(pin_file(&home)).unwrap(), pins);

    // Another CA claiming the same pool at the same address: refused before any call,
    // consent or not, and the pin stays.
    drop(member);
    let (other, tls) = member_tls(&tmp.path().join("impostor"), &pool);
    let other_fingerprint = other.ca().cert().fingerprint().to_string();
    let impostor = Member::start(addr, tls);
    for env in [&[][..], &[("POOLCTL_TRUST_NEW_POOL", "1")][..]] {
        let out = poolctl(&home, addr, &[], env);
        let err = stderr(&out);
        assert!(!out.status.success(), "{err}");
        assert!(err.contains("the pool's CA changed"), "{err}");
        assert!(
            err.contains(&format!("pinned {fingerprint} now {other_fingerprint}")),
            "{err}"
        );
        assert!(err.contains("known_pools"), "{err}");
        assert!(!reached(&out), "{err}");
        assert_eq!(std::fs::read_to_string(pin_file(&home)).unwrap(), pins);
    }

    // --ca wins: the impostor's own bundle is believed, and the pins are not touched.
    let bundle = other.bundle_path();
    let out = poolctl(&home, addr, &["--ca", bundle.to_str().unwrap()], &[]);
    assert!(reached(&out), "{}", stderr(&out));
    assert_eq!(std::fs::read_to_string(pin_file(&home)).unwrap(), pins);
    // ... and with no pins yet, none are written.
    let fresh = tmp.path().join("fresh");
    std::fs::create_dir(&fresh).unwrap();
    let out = poolctl(&fresh, addr, &["--ca", bundle.to_str().unwrap()], &[]);
    assert!(reached(&out), "{}", stderr(&out));
    assert!(!pin_file(&fresh).exists());
    drop(impostor);
}

#[test]
fn a_member_whose_chain_does_not_hold_is_refused_and_nothing_is_pinned() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    std::fs::create_dir(&home).unwrap();
    let pool = PoolId::generate();
    let (a, _) = member_tls(&tmp.path().join("a"), &pool);
    let (b, _) = member_tls(&tmp.path().join("b"), &pool);
    // Signed by CA a, presenting CA b as its chain: b is a CA of the pool, but not the
    // one that signed the member.
    let dir = tmp.path().join("a/member-1");
    let cert = std::fs::read_to_string(dir.join("cert.pem")).unwrap();
    let key = std::fs::read_to_string(dir.join("key.pem")).unwrap();
    let cases = [
        (
            format!("{cert}{}", b.ca().cert().pem()),
            "no CA it sent signs it",
        ),
        (cert.clone(), "sent no CA certificate"),
    ];
    for (chain, says) in cases {
        let tls = ServerTlsConfig::new().identity(tonic::transport::Identity::from_pem(
            chain.as_bytes(),
            key.as_bytes(),
        ));
        let addr = free_addr();
        let _member = Member::start(addr, tls);
        let out = poolctl(&home, addr, &[], &[("POOLCTL_TRUST_NEW_POOL", "1")]);
        let err = stderr(&out);
        assert!(!out.status.success(), "{err}");
        assert!(err.contains(says), "wanted {says:?} in {err}");
        assert!(!reached(&out), "{err}");
        assert!(!pin_file(&home).exists());
    }
    // The same member with its real chain is pinned: the refusals were about the chain.
    let addr = free_addr();
    let _member = Member::start(
        addr,
        ServerTlsConfig::new().identity(tonic::transport::Identity::from_pem(
            format!("{cert}{}", a.ca().cert().pem()).as_bytes(),
            key.as_bytes(),
        )),
    );
    let out = poolctl(&home, addr, &[], &[("POOLCTL_TRUST_NEW_POOL", "1")]);
    assert!(reached(&out), "{}", stderr(&out));
    assert!(pin_file(&home).exists());
}

#[test]
fn a_member_address_in_clear_is_refused_before_anything_is_sent() {
    let tmp = tempfile::tempdir().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    for (args, env) in [
        (vec!["--pool".to_owned(), format!("http://{addr}")], None),
        (vec![], Some(format!("127.0.0.1:1,http://{addr}"))),
    ] {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_poolctl"));
        cmd.arg("host-list")
            .args(&args)
            .env("HOME", tmp.path())
            .env("XDG_CONFIG_HOME", tmp.path())
            .env("POOLCTL_TOKEN", "pooltok-not-a-real-token")
            .env("POOLCTL_TRUST_NEW_POOL", "1")
            .env_remove("POOLCTL_CA")
            .stdin(Stdio::null());
        if let Some(pool) = &env {
            cmd.env("POOLCTL_POOL", pool);
        }
        let out = cmd.output().expect("run poolctl");
        let err = stderr(&out);
        assert!(!out.status.success(), "{err}");
        assert!(err.contains("over TLS only"), "{err}");
        assert!(listener.accept().is_err(), "poolctl connected: {err}");
    }
}

/// The poold binary beside poolctl, built if missing (as the end-to-end harness does).
fn poold() -> PathBuf {
    let path = Path::new(env!("CARGO_BIN_EXE_poolctl")).with_file_name("poold");
    if !path.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "-q", "-p", "poold", "--bin", "poold"])
            .status()
            .expect("run cargo build");
        assert!(status.success(), "building poold failed");
    }
    path
}

/// A child process killed when dropped, so a failing test leaves nothing running.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_real_member_is_pinned_and_the_login_and_calls_go_through_the_pin() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    std::fs::create_dir(&home).unwrap();
    let pool = PoolId::generate();
    let (ca, _) = member_tls(&tmp.path().join("pki"), &pool);
    let password = tmp.path().join("secrets/admin-password");
    pool_trust::files::write_private(&password, b"correct-horse-battery-staple\n").unwrap();
    let addr = free_addr();
    let _poold = Killed(
        Command::new(poold())
            .args(["--member-id", "1", "--listen", &addr.to_string()])
            .args(["--pool-id", pool.as_str(), "--log", "warn"])
            .arg("--member")
            .arg(format!("1={addr}"))
            .arg("--data-dir")
            .arg(tmp.path().join("poold-1"))
            .arg("--tls-dir")
            .arg(tmp.path().join("pki/member-1"))
            .arg("--admin-password-file")
            .arg(&password)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start poold"),
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(std::time::Instant::now() < deadline, "poold never listened");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }

    // No token exists yet; the login's password goes only to the pinned pool.
    let login = |env: &[(&str, &str)]| {
        Command::new(env!("CARGO_BIN_EXE_poolctl"))
            .args(["login", "admin", "--pool", &addr.to_string()])
            .arg("--password-file")
            .arg(&password)
            .env("HOME", &home)
            .env("XDG_CONFIG_HOME", home.join("config"))
            .env_remove("POOLCTL_CA")
            .env_remove("POOLCTL_TOKEN")
            .env_remove("POOLCTL_TRUST_NEW_POOL")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .output()
            .expect("run poolctl login")
    };
    let out = login(&[]);
    assert!(!out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains(&ca.ca().cert().fingerprint().to_string()));
    assert!(!pin_file(&home).exists());

    let out = login(&[("POOLCTL_TRUST_NEW_POOL", "1")]);
    assert!(stderr(&out).contains("pinned pool"), "{}", stderr(&out));
    // The first admin exists once the member has elected itself; until then the pinned
    // pool answers the login, refusing it.
    let mut out = out;
    while !out.status.success() {
        assert!(std::time::Instant::now() < deadline, "{}", stderr(&out));
        std::thread::sleep(std::time::Duration::from_millis(200));
        out = login(&[]);
        assert!(!stderr(&out).contains("has not met"), "{}", stderr(&out));
    }
    let token = String::from_utf8(out.stdout).unwrap();
    let pins = std::fs::read_to_string(pin_file(&home)).unwrap();
    assert!(pins.contains(&ca.ca().cert().fingerprint().to_string()));

    let out = poolctl(&home, addr, &[], &[("POOLCTL_TOKEN", token.trim())]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(std::fs::read_to_string(pin_file(&home)).unwrap(), pins);
}
