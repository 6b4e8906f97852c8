//! The three-host pool of `deploy/lab-netns.sh`: each `hostd` in its own network
//! namespace behind a bridge, so a host can be cut off like a pulled cable. An HA VM
//! runs on one host; its link goes down; the pool fences the host and restarts the VM on
//! another; the link comes back and the host rejoins after stopping its stale copy.
//!
//! Needs root and network namespaces; says plainly why it skipped where it has neither.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use e2e_tests::pool::{console_line, field, guest_elf, guest_vm};
use e2e_tests::{PoolArg, binary, poolctl, poolctl_ok, text, wait_for};

/// The lab's members and CA (the script founds the pool in the lab's `pki`).
static POOL: std::sync::OnceLock<PoolArg> = std::sync::OnceLock::new();

fn pool() -> &'static PoolArg {
    POOL.get().expect("the lab is up")
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/lab-netns.sh")
}

/// Why this machine cannot run the namespace lab, if it cannot.
fn unavailable() -> Option<String> {
    let uid = Command::new("id").arg("-u").output().ok()?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        return Some("not root (network namespaces and a bridge need it)".into());
    }
    let probe = format!("pool-probe-{}", std::process::id());
    match Command::new("ip").args(["netns", "add", &probe]).output() {
        Err(e) => Some(format!("no `ip` command (iproute2): {e}")),
        Ok(o) if !o.status.success() => Some(format!(
            "cannot make a network namespace: {}",
            text(&o).trim()
        )),
        Ok(_) => {
            let _ = Command::new("ip").args(["netns", "del", &probe]).status();
            None
        }
    }
}

/// Runs the script; `down` again when dropped, whatever happened.
struct Lab {
    dir: PathBuf,
    bin: PathBuf,
}

impl Lab {
    fn run(&self, args: &[&str]) -> std::process::Output {
        Command::new("bash")
            .arg(script())
            .args(args)
            .env("BIN", &self.bin)
            .env(
                "IMAGE_DIR",
                self.dir.parent().expect("the test's directory"),
            )
            .output()
            .expect("run deploy/lab-netns.sh")
    }

    fn logs(&self) -> String {
        let mut out = String::new();
        for e in std::fs::read_dir(self.dir.join("logs"))
            .into_iter()
            .flatten()
        {
            let e = e.unwrap();
            let t = std::fs::read_to_string(e.path()).unwrap_or_default();
            let cut = t.len().saturating_sub(3000);
            let cut = (cut..t.len())
                .find(|i| t.is_char_boundary(*i))
                .unwrap_or(t.len());
            out += &format!("--- {} ---\n{}\n", e.path().display(), &t[cut..]);
        }
        out
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let o = self.run(&["down", &self.dir.display().to_string()]);
        if !o.status.success() {
            eprintln!("lab-netns.sh down: {}", text(&o));
        }
    }
}

fn vm_line(name: &str) -> Option<String> {
    let o = poolctl(pool(), &["vm-list", "--json"]);
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .find(|l| l.contains(&format!("\"name\": \"{name}\"")))
        .map(str::to_owned)
}

fn host_line(id: &str) -> String {
    poolctl_ok(pool(), &["host-list", "--json"])
        .lines()
        .find(|l| l.contains(&format!("\"id\": \"{id}\"")))
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn the_netns_lab_fences_a_cut_off_host_and_takes_it_back() {
    if let Some(why) = unavailable() {
        println!("skipped: {why}");
        return;
    }
    // The script runs the binaries of this build.
    let bin = binary("poolctl").parent().unwrap().to_owned();
    for b in ["poold", "storaged", "hostd", "hostd-vmm"] {
        let _ = binary(b);
    }
    let tmp = tempfile::tempdir().unwrap();
    let lab = Lab {
        dir: tmp.path().join("lab"),
        bin,
    };
    // Left over from a run that was killed: start clean.
    drop(Lab {
        dir: lab.dir.clone(),
        bin: lab.bin.clone(),
    });
    let o = lab.run(&["up", &lab.dir.display().to_string()]);
    assert!(o.status.success(), "{}\n{}", text(&o), lab.logs());
    // The script founded the pool with its admin and logged in (the token is in its
    // client configuration).
    let client = std::fs::read_to_string(lab.dir.join("client.toml")).unwrap();
    let token = client
        .lines()
        .find_map(|l| l.strip_prefix("token = \""))
        .and_then(|t| t.strip_suffix('"'))
        .map(str::to_owned);
    assert!(token.is_some(), "no token in the lab's client.toml");
    POOL.set(PoolArg {
        addrs: "10.77.0.1:7101,10.77.0.1:7102,10.77.0.1:7103".into(),
        pki: lab.dir.join("pki"),
        pool_id: "netns".into(),
        token,
    })
    .expect("one lab per run");
    let hosts = poolctl_ok(pool(), &["host-list", "--json"]);
    assert_eq!(
        hosts.matches("\"state\": \"enabled\"").count(),
        3,
        "{hosts}"
    );
    for i in 1..=3 {
        assert!(
            hosts.contains(&format!("\"address\": \"10.77.0.1{i}:7000\"")),
            "host {i} in its namespace: {hosts}"
        );
    }

    poolctl_ok(pool(), &["pool-set", "--heartbeat-timeout", "2"]);
    poolctl_ok(
        pool(),
        &["pool-ha-enable", "--failures", "1", "--timeout", "2"],
    );
    poolctl_ok(
        pool(),
        &["vdi-create", "d1", "--sr", "netns-sr", "--size", "16M"],
    );
    let elf = guest_elf(tmp.path());
    poolctl_ok(
        pool(),
        &guest_vm(
            "v1",
            "d1",
            &elf,
            "seed=4 blk=rw mode=heartbeat hb_ms=100",
            &["--ha", "restart", "--start"],
        ),
    );
    let line = wait_for(Duration::from_secs(60), || {
        vm_line("v1").filter(|l| l.contains("\"power\": \"running\""))
    })
    .unwrap_or_else(|| panic!("v1 running\n{}", lab.logs()));
    let first = field(&line, "host");
    let hb = console_line(pool(), "v1", "HB seq=", Duration::from_secs(30))
        .unwrap_or_else(|| panic!("v1 beats\n{}", lab.logs()));
    assert!(hb.contains("bad=0"), "{hb}");

    // Pull the cable of v1's host.
    let n = field(&host_line(&first), "address")
        .trim_start_matches("10.77.0.1")
        .trim_end_matches(":7000")
        .to_owned();
    let o = lab.run(&["cut", &n]);
    assert!(o.status.success(), "{}", text(&o));
    let line = wait_for(Duration::from_secs(90), || {
        vm_line("v1").filter(|l| l.contains("\"power\": \"running\"") && field(l, "host") != first)
    })
    .unwrap_or_else(|| {
        let _ = lab.run(&["heal", &n]);
        panic!("v1 restarted off the cut host\n{}", lab.logs())
    });
    assert!(!field(&line, "host").is_empty());
    assert!(
        host_line(&first).contains("\"state\": \"fenced\""),
        "{}",
        host_line(&first)
    );

    // Plug it back: the host stops its stale copy and rejoins.
    let o = lab.run(&["heal", &n]);
    assert!(o.status.success(), "{}", text(&o));
    wait_for(Duration::from_secs(60), || {
        host_line(&first)
            .contains("\"state\": \"enabled\"")
            .then_some(())
    })
    .unwrap_or_else(|| panic!("the host rejoined\n{}", lab.logs()));
    let line = vm_line("v1").expect("v1 listed");
    assert!(
        line.contains("\"power\": \"running\"") && field(&line, "host") != first,
        "v1 runs once, on the new host: {line}"
    );
    let hb = console_line(pool(), "v1", "HB seq=", Duration::from_secs(30))
        .unwrap_or_else(|| panic!("v1 beats on its new host\n{}", lab.logs()));
    assert!(hb.contains("bad=0"), "{hb}");
}
