//! `poolctl lab` as a test runs it: started in a directory of the test's, used through
//! the client configuration it writes, stopped with Ctrl-C as a user stops it.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::pool::signal;
use crate::{binary, text};

/// `poolctl lab` in `dir` with `args` (hosts, demo VM...), once it says it is ready.
pub fn start(dir: &Path, args: &[&str]) -> Child {
    let mut child = Command::new(binary("poolctl"))
        .arg("lab")
        .args(args)
        .args(["--sr-size", "256M", "--dir"])
        .arg(dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("run poolctl lab");
    let out = child.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let start = Instant::now();
    loop {
        // The first start may build the web console's pages (npm) before the daemons.
        let left = Duration::from_secs(180).saturating_sub(start.elapsed());
        match rx.recv_timeout(left) {
            Ok(l) if l.starts_with("LAB READY") => break,
            Ok(_) => {}
            Err(_) => {
                let _ = child.kill();
                let logs = std::fs::read_dir(dir.join("logs"))
                    .map(|d| {
                        d.filter_map(Result::ok)
                            .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
                            .collect::<Vec<_>>()
                            .join("\n---\n")
                    })
                    .unwrap_or_default();
                panic!("the lab was not ready within 180 s\n{logs}");
            }
        }
    }
    // Keep draining its output so it never blocks on a full pipe.
    std::thread::spawn(move || while rx.recv().is_ok() {});
    child
}

/// Ctrl-C, as a user stops it: every daemon stops and the lab exits.
pub fn stop(mut lab: Child) {
    signal(lab.id(), "-INT");
    let start = Instant::now();
    while lab.try_wait().unwrap().is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the lab did not stop"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// poolctl with the lab's client configuration (and no token from the environment).
pub fn ctl_command(dir: &Path) -> Command {
    let mut c = Command::new(binary("poolctl"));
    c.arg("--config")
        .arg(dir.join("client.toml"))
        .env_remove("POOLCTL_TOKEN");
    c
}

pub fn ctl(dir: &Path, args: &[&str]) -> Output {
    ctl_command(dir).args(args).output().expect("run poolctl")
}

pub fn ctl_ok(dir: &Path, args: &[&str]) -> String {
    let o = ctl(dir, args);
    assert!(o.status.success(), "poolctl {args:?}: {}", text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}
