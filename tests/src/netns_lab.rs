//! The pool of `deploy/lab-netns.sh` for tests: three hosts, each `hostd` in its own
//! network namespace behind the bridge `poolbr0` (so a link can be cut like a cable and a
//! private network's VXLAN really crosses between hosts), and the pool the script founded.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::{PoolArg, binary, poolctl, poolctl_ok, text};

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/lab-netns.sh")
}

/// Why this machine cannot run the namespace lab, if it cannot.
/// Lets frames across `bridge` through iptables' FORWARD chain (`on`), or takes that rule
/// back, as `deploy/lab-netns.sh` does for its own bridge: with br_netfilter loaded,
/// bridged frames cross FORWARD, whose policy a Docker engine sets to DROP.
pub fn allow_forwarding(bridge: &str, on: bool) {
    let rule = ["FORWARD", "-i", bridge, "-o", bridge, "-j", "ACCEPT"];
    let iptables = |op: &str| {
        Command::new("iptables")
            .arg(op)
            .args(rule)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if on {
        if !iptables("-C") && !iptables("-I") {
            // No iptables here, so no FORWARD policy to pass.
            println!("iptables: no rule added for {bridge}");
        }
    } else {
        while iptables("-C") && iptables("-D") {}
    }
}

pub fn unavailable() -> Option<String> {
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

/// The lab, brought `down` again when dropped, whatever happened.
pub struct Lab {
    pub dir: PathBuf,
    bin: PathBuf,
    /// Its members and CA, logged in as the admin the script made.
    pub pool: PoolArg,
    _tmp: tempfile::TempDir,
}

impl Lab {
    /// Brings the lab up with this build's binaries (after taking down what a killed run
    /// left); its three hosts are enabled in the pool, each at its namespace's address.
    pub fn up() -> Lab {
        let bin = binary("poolctl").parent().unwrap().to_owned();
        for b in ["poold", "storaged", "hostd", "hostd-vmm"] {
            let _ = binary(b);
        }
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("lab");
        let mut lab = Lab {
            pool: PoolArg {
                addrs: "10.77.0.1:7101,10.77.0.1:7102,10.77.0.1:7103".into(),
                pki: dir.join("pki"),
                pool_id: "netns".into(),
                token: None,
            },
            dir,
            bin,
            _tmp: tmp,
        };
        // Left over from a run that was killed: start clean.
        let o = lab.run(&["down", &lab.dir.display().to_string()]);
        if !o.status.success() {
            eprintln!("lab-netns.sh down: {}", text(&o));
        }
        let o = lab.run(&["up", &lab.dir.display().to_string()]);
        assert!(o.status.success(), "{}\n{}", text(&o), lab.logs());
        // The script founded the pool with its admin and logged in (the token is in its
        // client configuration).
        let client = std::fs::read_to_string(lab.dir.join("client.toml")).unwrap();
        lab.pool.token = client
            .lines()
            .find_map(|l| l.strip_prefix("token = \""))
            .and_then(|t| t.strip_suffix('"'))
            .map(str::to_owned);
        assert!(
            lab.pool.token.is_some(),
            "no token in the lab's client.toml"
        );
        let hosts = poolctl_ok(&lab.pool, &["host-list", "--json"]);
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
        lab
    }

    /// Where the lab's hosts take VMs' kernels and file disks from.
    pub fn image_dir(&self) -> &Path {
        self.dir.parent().expect("the test's directory")
    }

    /// Runs `deploy/lab-netns.sh ARGS` (up, down, cut, heal) on this lab.
    pub fn run(&self, args: &[&str]) -> Output {
        Command::new("bash")
            .arg(script())
            .args(args)
            .env("BIN", &self.bin)
            .env("HOSTS", "3")
            .env("IMAGE_DIR", self.image_dir())
            .output()
            .expect("run deploy/lab-netns.sh")
    }

    /// The end of every daemon's log.
    pub fn logs(&self) -> String {
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

    /// The `vm-list --json` line of VM `name`.
    pub fn vm_line(&self, name: &str) -> Option<String> {
        let o = poolctl(&self.pool, &["vm-list", "--json"]);
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .find(|l| l.contains(&format!("\"name\": \"{name}\"")))
            .map(str::to_owned)
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
