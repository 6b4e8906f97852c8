//! `deploy/docker-compose.yml`: three nested hosts, each container running a coordinator
//! member and a host agent (node1 also the storage box), from an image built FROM scratch
//! out of this workspace.
//!
//! Everywhere: the image's root file system is assembled by `deploy/docker/build-image.sh`
//! and every daemon starts inside it (chroot), so a missing library or file fails here.
//! Where a Docker engine with compose answers: the image is built, the pool comes up, and
//! a VM boots on it. Where none answers, the test says so and stops after the first part.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use e2e_tests::pool::{console_line, guest_elf, guest_vm};
use e2e_tests::{PoolArg, binary, poolctl, poolctl_ok, text, wait_for};

const MEMBERS: &str = "172.28.0.11:7101,172.28.0.12:7101,172.28.0.13:7101";

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// This build's binaries, all present.
fn bin_dir() -> PathBuf {
    for b in ["poold", "storaged", "hostd", "hostd-vmm"] {
        let _ = binary(b);
    }
    binary("poolctl").parent().unwrap().to_owned()
}

/// Why the root file system cannot be tried here, if it cannot.
fn no_rootfs() -> Option<String> {
    let uid = Command::new("id").arg("-u").output().ok()?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        return Some("not root (chroot needs it)".into());
    }
    if Command::new("busybox").arg("true").status().is_err() {
        return Some("no busybox (apt-get install busybox-static)".into());
    }
    None
}

/// Why compose cannot run here, if it cannot.
fn no_engine() -> Option<String> {
    match Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .output()
    {
        Err(e) => return Some(format!("no docker client: {e}")),
        Ok(o) if !o.status.success() => {
            return Some(format!(
                "no Docker engine answers: {}",
                text(&o).lines().last().unwrap_or("").trim()
            ));
        }
        Ok(_) => {}
    }
    match Command::new("docker").args(["compose", "version"]).output() {
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(format!("no docker compose: {}", text(&o).trim())),
        Err(e) => Some(format!("no docker compose: {e}")),
    }
}

#[test]
fn the_compose_image_runs_and_the_compose_pool_boots_a_vm() {
    let bin = bin_dir();
    let tmp = tempfile::tempdir().unwrap();

    // 1. The image's root file system, and each daemon started in it.
    match no_rootfs() {
        Some(why) => println!("root file system not tried: {why}"),
        None => {
            let root = tmp.path().join("rootfs");
            let o = Command::new("bash")
                .arg(deploy().join("docker/build-image.sh"))
                .env("BIN", &bin)
                .env("ROOTFS", &root)
                .output()
                .expect("run build-image.sh");
            assert!(o.status.success(), "{}", text(&o));
            for b in ["poold", "storaged", "hostd", "poolctl"] {
                let o = Command::new("chroot")
                    .arg(&root)
                    .arg(format!("/usr/local/bin/{b}"))
                    .arg("--version")
                    .output()
                    .expect("run chroot");
                assert!(
                    o.status.success() && text(&o).starts_with(b),
                    "{b} in the image: {}",
                    text(&o)
                );
            }
            // The start script refuses to run without its settings, saying which.
            let o = Command::new("chroot")
                .arg(&root)
                .args(["/bin/sh", "/usr/local/bin/pool-node"])
                .env_remove("MEMBER_ID")
                .env_remove("NODE_IP")
                .output()
                .expect("run chroot");
            assert!(!o.status.success());
            assert!(text(&o).contains("MEMBER_ID"), "{}", text(&o));
        }
    }

    // 2. The compose pool, where an engine answers.
    if let Some(why) = no_engine() {
        println!("skipped the compose pool: {why}");
        return;
    }
    let o = Command::new("bash")
        .arg(deploy().join("docker/build-image.sh"))
        .env("BIN", &bin)
        .output()
        .expect("run build-image.sh");
    assert!(o.status.success(), "{}", text(&o));
    std::fs::create_dir_all("/srv/pool").expect("/srv/pool for the guest kernel");
    let elf = guest_elf(tmp.path());
    std::fs::copy(&elf, "/srv/pool/guest.elf").expect("guest in /srv/pool");
    // The pool's CA and each node's TLS directories, mounted by the compose file.
    let mut pool = PoolArg {
        addrs: MEMBERS.into(),
        pki: tmp.path().join("pki"),
        pool_id: "compose".into(),
        token: None,
    };
    let o = Command::new("bash")
        .arg(deploy().join("docker/found-pool.sh"))
        .arg(&pool.pki)
        .env("POOLCTL", bin.join("poolctl"))
        .output()
        .expect("run found-pool.sh");
    assert!(o.status.success(), "{}", text(&o));
    let pki = pool.pki.clone();
    let compose = |args: &[&str]| {
        Command::new("docker")
            .args(["compose", "-p", "pool-e2e", "-f"])
            .arg(deploy().join("docker-compose.yml"))
            .args(args)
            .env("POOL_PKI", &pki)
            .output()
            .expect("run docker compose")
    };
    struct Down<F: Fn(&[&str]) -> std::process::Output>(F);
    impl<F: Fn(&[&str]) -> std::process::Output> Drop for Down<F> {
        fn drop(&mut self) {
            let _ = (self.0)(&["down", "-v"]);
        }
    }
    let _down = Down(compose);
    let o = compose(&["up", "-d"]);
    assert!(o.status.success(), "{}", text(&o));
    // The nodes found the pool with the admin whose password found-pool.sh made.
    pool.token = Some(pool.login("admin", &pool.pki.join("admin-password")));
    let logs = || text(&compose(&["logs", "--tail", "60"]));
    wait_for(Duration::from_secs(90), || {
        let o = poolctl(&pool, &["host-list", "--json"]);
        (String::from_utf8_lossy(&o.stdout)
            .matches("\"state\": \"enabled\"")
            .count()
            == 3)
            .then_some(())
    })
    .unwrap_or_else(|| panic!("three nodes joined\n{}", logs()));
    poolctl_ok(
        &pool,
        &[
            "sr-create",
            "sr1",
            "172.28.0.11:7300",
            "--file",
            "/var/lib/storaged/sr1.img",
            "--size",
            "1G",
        ],
    );
    poolctl_ok(&pool, &["vdi-create", "d1", "--sr", "sr1", "--size", "16M"]);
    poolctl_ok(
        &pool,
        &guest_vm(
            "v1",
            "d1",
            "/srv/pool/guest.elf",
            "seed=2 blk=rw mode=heartbeat hb_ms=100",
            &["--start"],
        ),
    );
    let hb = console_line(&pool, "v1", "HB seq=", Duration::from_secs(90))
        .unwrap_or_else(|| panic!("v1 beats in the compose pool\n{}", logs()));
    assert!(hb.contains("bad=0"), "{hb}");
}
