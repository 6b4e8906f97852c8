//! End-to-end tests of the pool: they start the real daemons (`storaged`, `hostd`,
//! `poold`) and `poolctl` as processes and drive them as users do. This library holds
//! what those tests share; the tests are under `tests/tests/`.

pub mod debian;
pub mod emuhost;
pub mod guest;
pub mod join;
pub mod lab;
pub mod netns_lab;
pub mod pool;
pub mod web;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Path of a workspace binary, built (in this test's profile) when it is missing.
///
/// Integration tests only get `CARGO_BIN_EXE_*` for their own package, and these tests
/// run other packages' binaries, which `cargo test --workspace` builds next to the test.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target profile dir");
    let path = dir.join(name);
    if !path.exists() {
        // Every binary is named after its package, but the VM process hostd runs.
        let package = match name {
            "hostd-vmm" => "hostd",
            "iscsi" => "iscsi-initiator",
            other => other,
        };
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-q", "-p", package, "--bin", name]);
        if name == "iscsi" {
            cmd.args(["--features", "cli"]);
        }
        if dir.file_name().is_some_and(|p| p == "release") {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("run cargo build");
        assert!(status.success(), "building {name} failed");
    }
    path
}

/// A loopback port nothing listens on now, never the same twice in one test process:
/// tests running side by side pick their ports before their daemons bind them, and the
/// kernel may hand the same free port to both (a pool's poolctl then met another test's
/// member: "invalid peer certificate: UnknownIssuer").
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind port 0");
        let port = l.local_addr().expect("local address").port();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// A process that is killed (SIGKILL) when dropped, so a failing test leaves nothing behind.
pub struct Process {
    pub name: String,
    pub child: Child,
}

impl Process {
    pub fn spawn(name: &str, mut cmd: Command) -> Process {
        let child = cmd
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        Process {
            name: name.to_owned(),
            child,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The pool id of every pool these tests found.
pub const POOL_ID: &str = "e2e";

/// How tools and daemons reach a pool: its members' addresses and its CA (in `pki`, with
/// the bundle clients trust beside it), from which each daemon a test starts gets its
/// TLS directory.
#[derive(Clone, Debug)]
pub struct PoolArg {
    /// The members, comma-separated (poolctl's `--pool`, hostd's `--pool`).
    pub addrs: String,
    pub pki: PathBuf,
    pub pool_id: String,
    /// Sent by [`PoolArg::poolctl`] (as `POOLCTL_TOKEN`, never on the command line): the
    /// first admin's, once [`Coordinators::start`] has logged in.
    pub token: Option<String>,
}

impl PoolArg {
    /// The pool's CA, created in `pki` the first time.
    pub fn ca(&self) -> pool_trust::LocalCa {
        pool_trust::LocalCa::open_or_create(
            &self.pki,
            &pool_trust::PoolId::parse(&self.pool_id).expect("a valid pool id"),
        )
        .unwrap_or_else(|e| panic!("the pool CA in {}: {e}", self.pki.display()))
    }

    /// A TLS directory for `identity` (dialled at `names`), issued into `dir/<path>`.
    pub fn tls_dir(&self, identity: pool_trust::Identity, names: &[&str]) -> PathBuf {
        let dir = self.pki.join(identity.path().replace('/', "-"));
        self.ca()
            .issue(&identity, names, &dir)
            .unwrap_or_else(|e| panic!("issuing {identity}: {e}"));
        dir
    }

    /// The CA bundle poolctl is given with `--ca`.
    pub fn bundle(&self) -> PathBuf {
        self.pki.join(pool_trust::BUNDLE_FILE)
    }

    /// `poolctl --pool ... --ca ...` with the token if any, ready for its verb.
    pub fn poolctl(&self) -> Command {
        let mut cmd = Command::new(binary("poolctl"));
        cmd.arg("--pool")
            .arg(&self.addrs)
            .arg("--ca")
            .arg(self.bundle());
        match &self.token {
            Some(t) => cmd.env("POOLCTL_TOKEN", t),
            None => cmd.env_remove("POOLCTL_TOKEN"),
        };
        cmd
    }

    /// The same pool as the holder of `token`.
    pub fn as_token(&self, token: &str) -> PoolArg {
        PoolArg {
            token: Some(token.to_owned()),
            ..self.clone()
        }
    }

    /// The same pool as nobody: no token.
    pub fn anonymous(&self) -> PoolArg {
        PoolArg {
            token: None,
            ..self.clone()
        }
    }

    /// Logs in as `user` with the password in `password_file` and returns the token.
    /// First waits until the pool has elected a leader and created its first admin (an
    /// open pool answers anyone; one with users refuses a caller without a token), so no
    /// attempt counts against the login throttle.
    pub fn login(&self, user: &str, password_file: &Path) -> String {
        let mut last = String::new();
        wait_for(Duration::from_secs(30), || {
            let o = poolctl(&self.anonymous(), &["member-list"]);
            last = text(&o);
            (!o.status.success() && last.contains("Unauthenticated")).then_some(())
        })
        .unwrap_or_else(|| panic!("the pool created no admin within 30 s: {last}"));
        wait_for(Duration::from_secs(10), || {
            let o = self
                .anonymous()
                .poolctl()
                .args(["login", user, "--password-file"])
                .arg(password_file)
                .output()
                .expect("run poolctl login");
            last = text(&o);
            o.status.success().then(|| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_owned()
            })
        })
        .unwrap_or_else(|| panic!("logging in as {user}: {last}"))
    }
}

/// The first admin's password in every pool these tests found (its file is
/// `dir/admin-password`).
pub const ADMIN_PASSWORD: &str = "e2e-admin-password";

/// Three (or `n`) `poold` members on loopback, each with its own data directory and TLS
/// directory from the pool's CA (created under `dir/pki`). The pool is founded with its
/// first admin, and `pool` carries the admin's token.
pub struct Coordinators {
    pub dir: PathBuf,
    pub addrs: Vec<String>,
    pub procs: Vec<Process>,
    pub pool: PoolArg,
}

impl Coordinators {
    /// `n` members founding a pool with its CA (`--found-ca`: the pool then issues
    /// certificates to daemons that join with a token).
    pub fn start(dir: &Path, n: usize) -> Coordinators {
        Self::start_with(dir, n, true, None)
    }

    /// As [`Coordinators::start`], the members' certificates valid for `validity` only
    /// (so they renew during a test).
    pub fn start_with_member_validity(dir: &Path, n: usize, validity: Duration) -> Coordinators {
        Self::start_with(dir, n, true, Some(validity))
    }

    /// As [`Coordinators::start`], the CA kept out of the pool's state (certificates are
    /// then issued offline only).
    pub fn start_without_ca(dir: &Path, n: usize) -> Coordinators {
        Self::start_with(dir, n, false, None)
    }

    fn start_with(
        dir: &Path,
        n: usize,
        found_ca: bool,
        member_validity: Option<Duration>,
    ) -> Coordinators {
        let addrs: Vec<String> = (0..n)
            .map(|_| format!("127.0.0.1:{}", free_port()))
            .collect();
        let mut pool = PoolArg {
            addrs: addrs.join(","),
            pki: dir.join("pki"),
            pool_id: POOL_ID.into(),
            token: None,
        };
        for id in 1..=n as u64 {
            let member = pool_trust::Identity::Member(id);
            let dir = pool.tls_dir(member.clone(), &["127.0.0.1"]);
            if let Some(validity) = member_validity {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .expect("a clock after 1970")
                    .as_millis() as u64;
                let names = [pool_trust::AltName::parse("127.0.0.1").expect("an IP")];
                pool.ca()
                    .ca()
                    .issue_dir(
                        &member,
                        &names,
                        pool_trust::Validity::starting(now, validity),
                        &dir,
                    )
                    .unwrap_or_else(|e| panic!("issuing {member}: {e}"));
            }
        }
        let password = secret_file(dir, "admin-password", ADMIN_PASSWORD);
        let procs = (1..=n)
            .map(|id| Self::member(dir, &addrs, id, found_ca, &[]))
            .collect();
        pool.token = Some(pool.login("admin", Path::new(&password)));
        Coordinators {
            dir: dir.to_owned(),
            addrs,
            procs,
            pool,
        }
    }

    fn member(dir: &Path, addrs: &[String], id: usize, found_ca: bool, extra: &[&str]) -> Process {
        let mut cmd = Command::new(binary("poold"));
        cmd.args([
            "--member-id",
            &id.to_string(),
            "--listen",
            &addrs[id - 1],
            "--pool-id",
            POOL_ID,
        ])
        .arg("--data-dir")
        .arg(dir.join(format!("poold-{id}")))
        .arg("--tls-dir")
        .arg(dir.join(format!("pki/member-{id}")))
        .arg("--admin-password-file")
        .arg(dir.join("admin-password"))
        // Backup schedules may write anywhere in the test's own directory.
        .arg("--backup-root")
        .arg(dir)
        .args(["--log", "info,raft=warn"]);
        if found_ca {
            // The directory `LocalCa` keeps: poold finds the CA in its `ca/`.
            cmd.arg("--found-ca").arg(dir.join("pki"));
        }
        for (j, a) in addrs.iter().enumerate() {
            cmd.arg("--member").arg(format!("{}={a}", j + 1));
        }
        cmd.args(extra);
        // Each member's log stays in the test's directory for when a test fails (appended
        // to across restarts).
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(format!("poold-{id}.log")))
            .map(Stdio::from)
            .unwrap_or_else(|_| Stdio::null());
        cmd.stdout(Stdio::null()).stderr(log);
        Process::spawn(&format!("poold-{id}"), cmd)
    }

    /// SIGKILLs every member (their state stays on disk).
    pub fn kill_all(&mut self) {
        for p in &mut self.procs {
            p.kill();
        }
    }

    /// Starts every member again on the same addresses and data directories.
    pub fn restart_all(&mut self) {
        self.kill_all();
        self.procs = (1..=self.addrs.len())
            // A pool founded with its CA keeps it in its state: no --found-ca again.
            .map(|id| Self::member(&self.dir, &self.addrs, id, false, &[]))
            .collect();
    }

    /// SIGKILLs member `id` (1-based) and starts it again.
    pub fn restart(&mut self, id: usize) {
        self.restart_with(id, &[]);
    }

    /// SIGKILLs member `id` (1-based) and starts it again with `extra` arguments.
    pub fn restart_with(&mut self, id: usize, extra: &[&str]) {
        self.procs[id - 1].kill();
        self.procs[id - 1] = Self::member(&self.dir, &self.addrs, id, false, extra);
    }

    pub fn pool_arg(&self) -> PoolArg {
        self.pool.clone()
    }
}

/// Runs `poolctl` against the given pool and returns its output.
pub fn poolctl(pool: &PoolArg, args: &[&str]) -> Output {
    // Under `timeout`: a task that never ends fails the test (exit 124) in 10 minutes
    // instead of holding CI until its own limit.
    let inner = pool.poolctl();
    let mut cmd = Command::new("timeout");
    cmd.args(["--kill-after=10", "600"])
        .arg(inner.get_program())
        .args(inner.get_args());
    for (k, v) in inner.get_envs() {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    cmd.args(args).output().expect("run poolctl")
}

/// Writes `secret` into a new 0600 file `dir/<name>` and returns its path, for
/// `--password-file` (a secret never goes on a command line).
pub fn secret_file(dir: &Path, name: &str, secret: &str) -> String {
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(name);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    std::io::Write::write_all(&mut f, format!("{secret}\n").as_bytes()).expect("write secret");
    path.display().to_string()
}

/// Retries `f` until it returns `Some` or `limit` passes.
pub fn wait_for<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if start.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A daemon whose stdout lines are collected (daemons print their bound addresses there)
/// and whose stderr goes to a log file, read when a test fails.
pub struct Daemon {
    pub proc: Process,
    pub log: PathBuf,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Daemon {
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Daemon {
        let err = std::fs::File::create(log).unwrap_or_else(|e| panic!("{}: {e}", log.display()));
        cmd.stdout(Stdio::piped()).stderr(Stdio::from(err));
        let mut proc = Process::spawn(name, cmd);
        let out = proc.child.stdout.take().expect("piped stdout");
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(out).lines() {
                let Ok(line) = line else { return };
                sink.lock().expect("lines lock").push(line);
            }
        });
        Daemon {
            proc,
            log: log.to_owned(),
            lines,
        }
    }

    /// The rest of the first stdout line that starts with `prefix`, waiting up to `limit`.
    pub fn wait_line(&mut self, prefix: &str, limit: Duration) -> String {
        let found = wait_for(limit, || {
            if let Ok(Some(status)) = self.proc.child.try_wait() {
                panic!(
                    "{} exited ({status}) before printing {prefix:?}; its log:\n{}",
                    self.proc.name,
                    self.log_text()
                );
            }
            self.lines
                .lock()
                .expect("lines lock")
                .iter()
                .find_map(|l| l.strip_prefix(prefix).map(str::to_owned))
        });
        found.unwrap_or_else(|| {
            panic!(
                "{} did not print {prefix:?} within {limit:?}; its log:\n{}",
                self.proc.name,
                self.log_text()
            )
        })
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// `storaged` on loopback with its state under `dir`; pools are created through the pool
/// (`poolctl sr-create --file`).
pub struct Storaged {
    pub daemon: Daemon,
    /// StorageService.
    pub addr: String,
    pub iscsi: String,
}

impl Storaged {
    /// Started with a storage certificate of `pool`'s CA, so its members can call it.
    pub fn start(dir: &Path, pool: &PoolArg) -> Storaged {
        Self::start_on(dir, pool, "127.0.0.1:0", "127.0.0.1:0")
    }

    /// SIGKILL, as a crash; `restart` brings it back.
    pub fn kill(&mut self) {
        self.daemon.proc.kill();
    }

    /// The same state and ports again (the pool knows its repositories by this address),
    /// as the init system would after a crash; the last run's log is kept as `.log.1`.
    pub fn restart(&mut self, dir: &Path, pool: &PoolArg) {
        self.kill();
        let (addr, iscsi) = (self.addr.clone(), self.iscsi.clone());
        let _ = std::fs::rename(&self.daemon.log, self.daemon.log.with_extension("log.1"));
        *self = Self::start_on(dir, pool, &addr, &iscsi);
    }

    fn start_on(dir: &Path, pool: &PoolArg, listen: &str, iscsi_listen: &str) -> Storaged {
        std::fs::create_dir_all(dir).expect("storaged dir");
        let tls = pool.tls_dir(
            pool_trust::Identity::Storage("storaged".into()),
            &["127.0.0.1"],
        );
        let config = dir.join("storaged.toml");
        std::fs::write(
            &config,
            format!(
                "listen = {listen:?}\niscsi_listen = {iscsi_listen:?}\nstate_dir = {:?}\n\
                 tls_dir = {tls:?}\ncoordinators = {:?}\n",
                dir.join("state"),
                pool.addrs.split(',').collect::<Vec<_>>(),
            ),
        )
        .expect("storaged config");
        let mut cmd = Command::new(binary("storaged"));
        cmd.args(["--log", "info", "serve", "--config"])
            .arg(&config);
        let mut daemon = Daemon::spawn("storaged", cmd, &dir.join("storaged.log"));
        let addr = daemon.wait_line("LISTENING ", Duration::from_secs(30));
        let iscsi = daemon.wait_line("ISCSI ", Duration::from_secs(5));
        Storaged {
            daemon,
            addr,
            iscsi,
        }
    }
}

/// One `hostd` on `ip` (e.g. 127.0.0.11) that joins the pool by itself and heartbeats;
/// its VMs die with it (`--tie-vms`), so a killed host leaves nothing behind.
pub struct Hostd {
    pub daemon: Daemon,
    pub name: String,
    /// HostService, the address the pool knows the host by.
    pub addr: String,
    pub iqn: String,
}

impl Hostd {
    pub fn start(dir: &Path, name: &str, ip: &str, pool: &PoolArg) -> Hostd {
        let tls = pool.tls_dir(pool_trust::Identity::Host(name.into()), &[ip]);
        Self::start_with_tls(dir, name, ip, pool, &tls)
    }

    /// As [`Hostd::start`], with the TLS directory `tls` made beforehand.
    pub fn start_with_tls(dir: &Path, name: &str, ip: &str, pool: &PoolArg, tls: &Path) -> Hostd {
        let run = dir.join(name);
        std::fs::create_dir_all(&run).expect("hostd run dir");
        // The daemon starts VM processes with the lean binary beside it when it is built.
        let _ = binary("hostd-vmm");
        let iqn = format!("iqn.2026-11.org.pool.e2e:{name}");
        let mut cmd = Command::new(binary("hostd"));
        cmd.args(["--listen", &format!("{ip}:0"), "--tie-vms"])
            .arg("--run-dir")
            .arg(&run)
            .args(["--initiator-iqn", &iqn, "--host-id", name])
            .arg("--tls-dir")
            .arg(tls)
            // The test's guest kernel and images are written into its directory.
            .arg("--image-dir")
            .arg(dir)
            .args([
                "--pool",
                &pool.addrs,
                "--heartbeat-ms",
                "500",
                "--log",
                "info",
            ]);
        let mut daemon = Daemon::spawn(name, cmd, &dir.join(format!("{name}.log")));
        let addr = daemon.wait_line("hostd listening on ", Duration::from_secs(30));
        Hostd {
            daemon,
            name: name.to_owned(),
            addr,
            iqn,
        }
    }
}

/// The stdout and stderr of a command, for assertion messages.
pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Runs `poolctl` and panics with its output unless it succeeds.
pub fn poolctl_ok(pool: &PoolArg, args: &[&str]) -> String {
    let o = poolctl(pool, args);
    assert!(
        o.status.success(),
        "poolctl {}: {}",
        args.join(" "),
        text(&o)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}
