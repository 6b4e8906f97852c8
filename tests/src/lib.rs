//! End-to-end tests of the pool: they start the real daemons (`storaged`, `hostd`,
//! `poold`) and `poolctl` as processes and drive them as users do. This library holds
//! what those tests share; the tests are under `tests/tests/`.

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
            other => other,
        };
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-q", "-p", package, "--bin", name]);
        if dir.file_name().is_some_and(|p| p == "release") {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("run cargo build");
        assert!(status.success(), "building {name} failed");
    }
    path
}

pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind port 0");
    l.local_addr().expect("local address").port()
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

/// Three (or `n`) `poold` members on loopback, each with its own data directory.
pub struct Coordinators {
    pub dir: PathBuf,
    pub addrs: Vec<String>,
    pub procs: Vec<Process>,
}

impl Coordinators {
    pub fn start(dir: &Path, n: usize) -> Coordinators {
        let addrs: Vec<String> = (0..n)
            .map(|_| format!("127.0.0.1:{}", free_port()))
            .collect();
        let mut procs = Vec::new();
        for (i, addr) in addrs.iter().enumerate() {
            let id = i + 1;
            let mut cmd = Command::new(binary("poold"));
            cmd.args([
                "--member-id",
                &id.to_string(),
                "--listen",
                addr,
                "--pool-id",
                "e2e",
            ])
            .arg("--data-dir")
            .arg(dir.join(format!("poold-{id}")))
            .args(["--log", "warn"]);
            for (j, a) in addrs.iter().enumerate() {
                cmd.arg("--member").arg(format!("{}={a}", j + 1));
            }
            cmd.stdout(Stdio::null()).stderr(Stdio::null());
            procs.push(Process::spawn(&format!("poold-{id}"), cmd));
        }
        Coordinators {
            dir: dir.to_owned(),
            addrs,
            procs,
        }
    }

    pub fn pool_arg(&self) -> String {
        self.addrs.join(",")
    }
}

/// Runs `poolctl` against the given members and returns its output.
pub fn poolctl(pool: &str, args: &[&str]) -> Output {
    Command::new(binary("poolctl"))
        .arg("--pool")
        .arg(pool)
        .args(args)
        .output()
        .expect("run poolctl")
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
