//! `deploy/docker-compose.yml`: three nested hosts, each container running a coordinator
//! member and a host agent (node1 also the storage box), from an image built FROM scratch
//! out of this workspace, run as the multi-host fault scenario that containers make easy.
//!
//! Everywhere: the image's root file system is assembled by `deploy/docker/build-image.sh`
//! and every daemon starts inside it (chroot), so a missing library or file fails here.
//! Where a Docker engine answers (CI starts one; compose v2 or v1, whichever is there), the
//! pool comes up and an HA VM boots, live-migrates between containers, is restarted
//! elsewhere when its node is `docker kill`ed (the node fenced at the storage) and when its
//! node's network is disconnected (its member in the minority; reconnected, the node
//! rejoins and the VM runs exactly once), and keeps running through a rolling restart of
//! all three containers. Where no engine answers the test says so and stops after the
//! first part, except under CI, where that is a failure.
//!
//! For `bench/run.sh pool`: `COMPOSE_HA_RUNS=N` kills N nodes in turn, and the test prints
//! `BENCH compose_ha_restart_s` per kill and `BENCH compose_partition_recover_s`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use e2e_tests::pool::{can_open, console_until, disk_chap, field, guest_elf, guest_vm, targets};
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

/// The compose command that is here (`docker compose`, v2, or `docker-compose`, v1), or why
/// compose cannot run here.
fn compose_command() -> Result<Vec<&'static str>, String> {
    match Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .output()
    {
        Err(e) => return Err(format!("no docker client: {e}")),
        Ok(o) if !o.status.success() => {
            return Err(format!(
                "no Docker engine answers: {}",
                text(&o).lines().last().unwrap_or("").trim()
            ));
        }
        Ok(_) => {}
    }
    let works = |argv: &[&str]| {
        Command::new(argv[0])
            .args(&argv[1..])
            .arg("version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    [vec!["docker", "compose"], vec!["docker-compose"]]
        .into_iter()
        .find(|argv| works(argv))
        .ok_or_else(|| "neither `docker compose` nor `docker-compose` runs".into())
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
    let argv = match compose_command() {
        Ok(argv) => argv,
        Err(why) if std::env::var_os("CI").is_some() => {
            panic!("CI starts a Docker engine for this test, yet: {why}")
        }
        Err(why) => {
            println!("skipped the compose pool: {why}");
            return;
        }
    };
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
    let c = Compose {
        argv,
        pki: pool.pki.clone(),
    };
    // A project left by an earlier run that died would hold the addresses.
    let _ = c.run(&["down", "-v"]);
    let _down = Down(&c);
    c.ok(&["up", "-d"]);
    // The nodes found the pool with the admin whose password found-pool.sh made.
    pool.token = Some(pool.login("admin", &pool.pki.join("admin-password")));
    let p = &pool;
    for n in 1..=3 {
        c.wait_enabled(p, n);
    }
    poolctl_ok(p, &["pool-set", "--heartbeat-timeout", "2"]);
    poolctl_ok(p, &["pool-ha-enable", "--failures", "1", "--timeout", "2"]);
    poolctl_ok(
        p,
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
    poolctl_ok(p, &["vdi-create", "d1", "--sr", "sr1", "--size", "16M"]);
    poolctl_ok(
        p,
        &guest_vm(
            "v1",
            "d1",
            "/srv/pool/guest.elf",
            "seed=2 blk=rw mode=heartbeat hb_ms=100",
            &["--ha", "restart", "--start"],
        ),
    );
    c.wait_running(p, |_| true);
    let mut seq = c.beat(p, 0);
    let vm_id = field(&vm_line(p).expect("v1 listed"), "id");

    // 3. Live migration between containers: the same run goes on (its heartbeat counts on).
    let from = c.vm_node(p);
    let to = if from == 2 { 3 } else { 2 };
    poolctl_ok(p, &["vm-migrate", "v1", "--host", &format!("node{to}")]);
    assert_eq!(c.vm_node(p), to, "v1 moved to node{to}");
    seq = c.beat(p, seq);

    // 4. `docker kill` of the node running the HA VM: the node is fenced at the storage and
    // the VM restarts on another node; the node, started again, rejoins.
    let runs: usize = std::env::var("COMPOSE_HA_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    for _ in 0..runs {
        let victim = c.vm_off_storage_node(p);
        let iqn = format!("iqn.2026-11.org.pool.compose:node{victim}");
        let seen = targets(PORTAL, &iqn);
        assert_eq!(
            seen.len(),
            1,
            "v1's disk is granted to node{victim}: {seen:?}"
        );
        let chap = disk_chap(p, &format!("172.28.0.1{victim}:7000"), &vm_id);
        assert!(can_open(PORTAL, &seen[0], &iqn, Some(&chap)));
        let killed = Instant::now();
        c.docker(&["kill", &c.container(victim)]);
        c.wait_running(p, |line| node_of(p, &field(line, "host")) != victim);
        println!(
            "BENCH compose_ha_restart_s {:.2} s",
            killed.elapsed().as_secs_f64()
        );
        let state = host_line(p, victim);
        assert!(state.contains("\"state\": \"fenced\""), "{state}");
        assert!(
            !can_open(PORTAL, &seen[0], &iqn, Some(&chap)),
            "the killed node's initiator is refused at the storage"
        );
        // A new boot: its heartbeat starts again from the beginning.
        seq = c.beat(p, 0);
        c.ok(&["start", &format!("node{victim}")]);
        c.wait_enabled(p, victim);
    }

    // 5. `docker network disconnect` of the VM's node: its member is in the minority, its VM
    // is fenced and restarted elsewhere; reconnected, the node rejoins and the VM runs once.
    let cut = c.vm_off_storage_node(p);
    let net = c.network(cut);
    let cid = c.container(cut);
    c.docker(&["network", "disconnect", &net, &cid]);
    let healed = std::cell::Cell::new(false);
    let heal = || {
        if !healed.replace(true) {
            let ip = format!("172.28.0.1{cut}");
            c.docker(&["network", "connect", "--ip", &ip, &net, &cid]);
        }
    };
    let restarted = wait_for(Duration::from_secs(90), || {
        vm_line(p).filter(|l| running(l) && node_of(p, &field(l, "host")) != cut)
    });
    if restarted.is_none() {
        heal();
        panic!("v1 restarted off the cut node\n{}", c.logs());
    }
    assert!(
        host_line(p, cut).contains("\"state\": \"fenced\""),
        "{}",
        host_line(p, cut)
    );
    // The majority leads and commits without the cut member: another leader, and a change
    // made now is there when the member is back.
    let members = poolctl_ok(p, &["member-list", "--json"]);
    let cut_member = members
        .lines()
        .find(|l| l.contains(&format!("\"id\": {cut},")))
        .unwrap_or_else(|| panic!("member {cut} listed: {members}"));
    assert!(
        cut_member.contains("\"reachable\": false") && cut_member.contains("\"leader\": false"),
        "{cut_member}"
    );
    poolctl_ok(
        p,
        &[
            "vdi-create",
            "made-while-cut",
            "--sr",
            "sr1",
            "--size",
            "4M",
        ],
    );
    let reconnected = Instant::now();
    heal();
    c.wait_enabled(p, cut);
    // Exactly once: the cut node's copy is gone and v1 runs on its new node.
    wait_for(Duration::from_secs(60), || (!c.runs_vm(cut)).then_some(()))
        .unwrap_or_else(|| panic!("node{cut} stopped its stale copy of v1\n{}", c.logs()));
    let line = vm_line(p).expect("v1 listed");
    assert!(
        running(&line) && node_of(p, &field(&line, "host")) != cut,
        "{line}"
    );
    println!(
        "BENCH compose_partition_recover_s {:.2} s",
        reconnected.elapsed().as_secs_f64()
    );
    let copies = (1..=3).filter(|&n| c.runs_vm(n)).count();
    assert_eq!(copies, 1, "v1 runs on exactly one node");
    // The member caught up: asked alone, it serves what the majority committed without it.
    let alone = PoolArg {
        addrs: format!("172.28.0.1{cut}:7101"),
        ..pool.clone()
    };
    wait_for(Duration::from_secs(30), || {
        let o = poolctl(&alone, &["vdi-list"]);
        text(&o).contains("made-while-cut").then_some(())
    })
    .unwrap_or_else(|| panic!("member {cut} caught up\n{}", c.logs()));
    seq = c.beat(p, seq);

    // 6. A rolling restart, one container at a time, each emptied first by live migration as
    // an upgrade would: the pool state and the same run of v1 survive (node1's restart also
    // restarts the storage box under the running VM).
    // What the pool holds, less what moves (where v1 runs, how full its disk is).
    let held = || {
        let mut rows: Vec<String> = ["vm-list", "vdi-list", "sr-list", "host-list"]
            .iter()
            .flat_map(|list| {
                poolctl_ok(p, &[list, "--json"])
                    .lines()
                    .filter(|l| l.contains("\"id\": "))
                    .map(|l| format!("{list} {} {}", field(l, "id"), field(l, "name")))
                    .collect::<Vec<_>>()
            })
            .collect();
        rows.sort();
        rows
    };
    let before = held();
    for n in 1..=3 {
        if c.vm_node(p) == n {
            let to = if n == 3 { 2 } else { 3 };
            poolctl_ok(p, &["vm-migrate", "v1", "--host", &format!("node{to}")]);
        }
        c.ok(&["restart", &format!("node{n}")]);
        c.wait_enabled(p, n);
        c.wait_members(p);
        seq = c.beat(p, seq);
    }
    assert_eq!(held(), before, "the pool state survived the roll");
    assert!(running(&vm_line(p).expect("v1 listed")));
    println!("v1 beat on through the roll (HB seq={seq})");
}

const PORTAL: &str = "172.28.0.11:3260";

struct Compose {
    argv: Vec<&'static str>,
    pki: PathBuf,
}

/// Takes the compose pool down at the end, whatever happened.
struct Down<'a>(&'a Compose);

impl Drop for Down<'_> {
    fn drop(&mut self) {
        let _ = self.0.run(&["down", "-v"]);
    }
}

impl Compose {
    fn run(&self, args: &[&str]) -> Output {
        Command::new(self.argv[0])
            .args(&self.argv[1..])
            .args(["-p", "pool-e2e", "-f"])
            .arg(deploy().join("docker-compose.yml"))
            .args(args)
            .env("POOL_PKI", &self.pki)
            .output()
            .expect("run docker compose")
    }

    fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(o.status.success(), "compose {args:?}: {}", text(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    fn docker(&self, args: &[&str]) -> String {
        let o = Command::new("docker")
            .args(args)
            .output()
            .expect("run docker");
        assert!(o.status.success(), "docker {args:?}: {}", text(&o));
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    fn logs(&self) -> String {
        text(&self.run(&["logs", "--tail", "60"]))
    }

    /// Node n's container (its name differs between compose v1 and v2).
    fn container(&self, n: u8) -> String {
        let id = self.ok(&["ps", "-q", &format!("node{n}")]);
        let id = id.trim();
        assert!(!id.is_empty(), "node{n} has a container");
        id.to_owned()
    }

    /// The compose network node n is on.
    fn network(&self, n: u8) -> String {
        let nets = self.docker(&[
            "inspect",
            "--format",
            "{{range $k, $v := .NetworkSettings.Networks}}{{$k}} {{end}}",
            &self.container(n),
        ]);
        let nets: Vec<&str> = nets.split_whitespace().collect();
        assert_eq!(
            nets.len(),
            1,
            "node{n} is on the one pool network: {nets:?}"
        );
        nets[0].to_owned()
    }

    /// Whether node n's container holds a VM process.
    fn runs_vm(&self, n: u8) -> bool {
        let o = Command::new("docker")
            .args(["top", &self.container(n)])
            .output()
            .expect("run docker top");
        String::from_utf8_lossy(&o.stdout).contains("hostd-vmm")
    }

    fn wait_enabled(&self, p: &PoolArg, n: u8) {
        wait_for(Duration::from_secs(120), || {
            host_line(p, n)
                .contains("\"state\": \"enabled\"")
                .then_some(())
        })
        .unwrap_or_else(|| panic!("node{n} enabled\n{}", self.logs()));
    }

    /// Until all three members are reachable from the leader.
    fn wait_members(&self, p: &PoolArg) {
        wait_for(Duration::from_secs(60), || {
            let o = poolctl(p, &["member-list", "--json"]);
            (o.status.success() && text(&o).matches("\"reachable\": true").count() == 3)
                .then_some(())
        })
        .unwrap_or_else(|| panic!("three members reachable\n{}", self.logs()));
    }

    fn wait_running(&self, p: &PoolArg, also: impl Fn(&str) -> bool) -> String {
        wait_for(Duration::from_secs(90), || {
            vm_line(p).filter(|l| running(l) && also(l))
        })
        .unwrap_or_else(|| panic!("v1 running\n{}", self.logs()))
    }

    /// The node v1 runs on.
    fn vm_node(&self, p: &PoolArg) -> u8 {
        let line = self.wait_running(p, |_| true);
        node_of(p, &field(&line, "host"))
    }

    /// The node v1 runs on, after moving it off node1: killing the storage box's node
    /// would take the VM's disk with it.
    fn vm_off_storage_node(&self, p: &PoolArg) -> u8 {
        if self.vm_node(p) == 1 {
            poolctl_ok(p, &["vm-migrate", "v1", "--host", "node2"]);
        }
        let n = self.vm_node(p);
        assert_ne!(n, 1);
        n
    }

    /// A heartbeat of v1 past `after`, with no bad page; its sequence number.
    fn beat(&self, p: &PoolArg, after: u64) -> u64 {
        let line = console_until(p, None, "v1", Duration::from_secs(60), |seen| {
            seen.lines()
                .filter(|l| l.starts_with("HB seq=") && seen.contains(&format!("{l}\n")))
                .find(|l| seq_of(l) > after)
                .map(str::to_owned)
        })
        .unwrap_or_else(|| panic!("v1 beats past seq={after}\n{}", self.logs()));
        assert!(line.contains("bad=0"), "{line}");
        seq_of(&line)
    }
}

fn seq_of(line: &str) -> u64 {
    field_value(line, "seq")
}

fn field_value(line: &str, key: &str) -> u64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn running(line: &str) -> bool {
    line.contains("\"power\": \"running\"")
}

fn vm_line(p: &PoolArg) -> Option<String> {
    let o = poolctl(p, &["vm-list", "--json"]);
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .find(|l| l.contains("\"name\": \"v1\""))
        .map(str::to_owned)
}

/// The compose node (1-3) of the pool host with this id.
fn node_of(p: &PoolArg, host_id: &str) -> u8 {
    let hosts = poolctl_ok(p, &["host-list", "--json"]);
    let name = hosts
        .lines()
        .find(|l| l.contains(&format!("\"id\": \"{host_id}\"")))
        .map(|l| field(l, "name"))
        .unwrap_or_default();
    name.strip_prefix("node")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("host {host_id:?} ({name:?}) is a compose node: {hosts}"))
}

fn host_line(p: &PoolArg, n: u8) -> String {
    let o = poolctl(p, &["host-list", "--json"]);
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .find(|l| l.contains(&format!("\"name\": \"node{n}\"")))
        .unwrap_or_default()
        .to_owned()
}
