//! README's first command, `poolctl lab`: the whole pool on this machine, ready to use
//! with the client configuration it writes, resumed by running it again. Its CA can be
//! rolled like any pool's, and the lab resumed after the roll still works: its daemons
//! keep the certificates they renewed and poolctl follows member 1's CA bundle.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use e2e_tests::pool::signal;
use e2e_tests::{binary, text};
use pool_trust::CaBundle;

/// `poolctl lab` in `dir` with one host and no demo VM, once it says it is ready.
fn start_lab(dir: &Path) -> Child {
    let mut child = Command::new(binary("poolctl"))
        .args([
            "lab",
            "--hosts",
            "1",
            "--no-demo",
            "--sr-size",
            "256M",
            "--dir",
        ])
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
        let left = Duration::from_secs(90).saturating_sub(start.elapsed());
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
                panic!("the lab was not ready within 90 s\n{logs}");
            }
        }
    }
    // Keep draining its output so it never blocks on a full pipe.
    std::thread::spawn(move || while rx.recv().is_ok() {});
    child
}

/// Ctrl-C, as a user stops it: every daemon stops and the lab exits.
fn stop_lab(mut lab: Child) {
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

fn ctl(dir: &Path, args: &[&str]) -> Output {
    Command::new(binary("poolctl"))
        .arg("--config")
        .arg(dir.join("client.toml"))
        .args(args)
        .env_remove("POOLCTL_TOKEN")
        .output()
        .expect("run poolctl")
}

fn ctl_ok(dir: &Path, args: &[&str]) -> String {
    let o = ctl(dir, args);
    assert!(o.status.success(), "poolctl {args:?}: {}", text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Every member's console port answers over HTTPS under the CA member 1 trusts (the
/// lab installs no console pages: the port says so).
fn console_answers(dir: &Path) {
    let bundle = dir.join("pki/member-1").join(pool_trust::BUNDLE_FILE);
    for port in 7141..=7143 {
        let o = Command::new("curl")
            .args(["-sS", "-i", "--cacert"])
            .arg(&bundle)
            .arg(format!("https://127.0.0.1:{port}/"))
            .output()
            .expect("running curl");
        let out = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(out.starts_with("HTTP/2 503"), "{port}: {out}");
        assert!(out.contains("--web-root"), "{port}: {out}");
    }
}

#[test]
fn the_lab_runs_rolls_its_ca_and_resumes_after_the_roll() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("lab");
    let lab = start_lab(&dir);
    let hosts = ctl_ok(&dir, &["host-list", "--json"]);
    assert!(hosts.contains("\"name\": \"h1\""), "{hosts}");
    console_answers(&dir);
    let before = CaBundle::from_pem(&ctl_ok(&dir, &["pool-ca"])).unwrap();
    assert_eq!(before.certs().len(), 1);

    // The lab's poolctl trusts member 1's bundle, which follows the roll by itself.
    let roll = ctl(&dir, &["pool-rotate-ca", "--timeout", "60"]);
    assert!(roll.status.success(), "{}", text(&roll));
    let after = CaBundle::from_pem(&ctl_ok(&dir, &["pool-ca"])).unwrap();
    assert_eq!(after.certs().len(), 1);
    assert_ne!(
        after.certs()[0].fingerprint(),
        before.certs()[0].fingerprint()
    );
    stop_lab(lab);

    // Resumed: the daemons come back with the certificates of the new CA.
    let lab = start_lab(&dir);
    let enabled = e2e_tests::wait_for(Duration::from_secs(30), || {
        let hosts = ctl_ok(&dir, &["host-list", "--json"]);
        hosts.contains("\"state\": \"enabled\"").then_some(())
    });
    assert!(
        enabled.is_some(),
        "{}",
        ctl_ok(&dir, &["host-list", "--json"])
    );
    let now = CaBundle::from_pem(&ctl_ok(&dir, &["pool-ca"])).unwrap();
    assert_eq!(now.certs()[0].fingerprint(), after.certs()[0].fingerprint());
    // The console ports serve certificates of the new CA too.
    console_answers(&dir);
    ctl_ok(
        &dir,
        &[
            "vdi-create",
            "after-roll",
            "--sr",
            "lab-sr",
            "--size",
            "16M",
        ],
    );
    stop_lab(lab);
}
