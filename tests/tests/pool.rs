//! The whole pool with real processes: three `poold` members, three `hostd` on
//! 127.0.0.11-13 that join the pool by themselves and heartbeat, and one `storaged` with a
//! file-backed thin pool; driven through `poolctl` as a person would.

use std::path::Path;
use std::time::{Duration, Instant};

use e2e_tests::pool::{
    Pool, can_open, console_line, disk_chap, field, guest_elf, guest_vm, processes_with, signal,
    targets,
};
use e2e_tests::{poolctl, poolctl_ok, wait_for};

/// Hosts join by themselves, then a VM goes through its whole life: SR, disk, VM, template,
/// a VM from the template started on a host, its guest's heartbeat on the console, a
/// clean shutdown and destroy.
#[test]
fn hosts_join_and_a_vm_lives_its_life() {
    let dir = tempfile::tempdir().unwrap();
    let pool = Pool::start(dir.path(), 3);

    // Every hostd joined and heartbeats: three enabled hosts with their info.
    let hosts = pool.wait_hosts_enabled();
    for h in &pool.hosts {
        let line = hosts
            .lines()
            .find(|l| l.contains(&format!("\"address\": \"{}\"", h.addr)))
            .unwrap_or_else(|| panic!("{} at {} listed: {hosts}", h.name, h.addr));
        assert!(
            line.contains(&format!("\"name\": \"{}\"", h.name)),
            "{line}"
        );
    }

    pool.create_sr(dir.path(), "sr1", "1G");
    pool.ctl(&["vdi-create", "base-disk", "--sr", "sr1", "--size", "16M"]);
    let elf = guest_elf(dir.path());
    pool.ctl(&guest_vm(
        "base",
        "base-disk",
        &elf,
        "seed=7 blk=rw mode=heartbeat hb_ms=200",
        &[],
    ));
    pool.ctl(&["template-create", "guest", "base"]);
    let t = pool.ctl(&["template-list"]);
    assert!(t.contains("guest"), "{t}");

    pool.ctl(&[
        "vm-create",
        "demo",
        "--template",
        "guest",
        "--memory",
        "64M",
        "--start",
    ]);
    let line = pool.wait_vm("demo", "\"power\": \"running\"", Duration::from_secs(60));
    let host = field(&line, "host");
    assert!(!host.is_empty(), "{line}");

    // The guest runs on its iSCSI disk and prints heartbeats we can read through the pool.
    let hb = console_line(&pool.p, "demo", "HB seq=", Duration::from_secs(60))
        .unwrap_or_else(|| panic!("a guest heartbeat on the console\n{}", pool.logs()));
    assert!(hb.contains("bad=0"), "{hb}");
    let blk =
        console_line(&pool.p, "demo", "BLK done", Duration::from_secs(10)).unwrap_or_else(|| {
            panic!(
                "the disk check line in the console history\n{}",
                pool.logs()
            )
        });
    assert!(blk.contains("result=ok"), "{blk}");

    // With every coordinator gone the hosts keep their VMs running and keep trying;
    // when the pool is back they report again.
    let mut pool = pool;
    pool.coordinators.kill_all();
    // The pool asked for a heartbeat every 5 s (a third of its 30 s timeout, at most 5 s).
    wait_for(Duration::from_secs(20), || {
        pool.hosts
            .iter()
            .all(|h| h.daemon.log_text().contains("VMs keep running"))
            .then_some(())
    })
    .unwrap_or_else(|| panic!("every host saw its heartbeat fail\n{}", pool.logs()));
    for h in &mut pool.hosts {
        assert!(
            h.daemon.proc.child.try_wait().unwrap().is_none(),
            "{} keeps running without the pool",
            h.name
        );
    }
    let procs = processes_with(&format!("{}/", dir.path().display()))
        .into_iter()
        .filter(|p| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains("vmm"))
        })
        .count();
    assert_eq!(procs, 1, "the demo VM's process still runs");
    pool.coordinators.restart_all();
    let hb = console_line(&pool.p, "demo", "HB seq=", Duration::from_secs(60))
        .unwrap_or_else(|| panic!("the guest ran on through the outage\n{}", pool.logs()));
    assert!(hb.contains("bad=0"), "{hb}");
    wait_for(Duration::from_secs(30), || {
        pool.hosts
            .iter()
            .all(|h| h.daemon.log_text().contains("the pool answers again"))
            .then_some(())
    })
    .unwrap_or_else(|| panic!("every host heartbeats again\n{}", pool.logs()));

    pool.ctl(&["vm-shutdown", "demo"]);
    pool.wait_vm("demo", "\"power\": \"stopped\"", Duration::from_secs(60));
    pool.ctl(&["vm-destroy", "demo", "--delete-disks"]);
    assert!(pool.vm("demo").is_none(), "demo destroyed");
    let vdis = pool.ctl(&["vdi-list"]);
    assert!(
        vdis.contains("base-disk"),
        "the template's source disk stays: {vdis}"
    );
}

/// A host running an HA-protected VM dies (SIGKILL; its VM processes die with it). The
/// pool marks it unreachable, fences it at storaged (its initiator can no longer open the
/// VM's disk) and restarts the VM on another host, where the guest runs again.
#[test]
fn ha_restarts_a_dead_hosts_vm_elsewhere_after_fencing_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut pool = Pool::start(dir.path(), 2);
    pool.wait_hosts_enabled();
    pool.ctl(&["pool-set", "--heartbeat-timeout", "2"]);
    pool.ctl(&["pool-ha-enable", "--failures", "1", "--timeout", "2"]);
    pool.create_sr(dir.path(), "sr1", "1G");
    pool.ctl(&["vdi-create", "ha-disk", "--sr", "sr1", "--size", "16M"]);
    let elf = guest_elf(dir.path());
    pool.ctl(&guest_vm(
        "ha-vm",
        "ha-disk",
        &elf,
        "seed=9 blk=rw mode=heartbeat hb_ms=100",
        &["--ha", "restart", "--start"],
    ));
    let line = pool.wait_vm("ha-vm", "\"power\": \"running\"", Duration::from_secs(60));
    let first = field(&line, "host");
    console_line(&pool.p, "ha-vm", "HB seq=", Duration::from_secs(30))
        .unwrap_or_else(|| panic!("the guest runs before the failure\n{}", pool.logs()));

    // Which hostd that is, and the VM's target as its initiator sees it.
    let victim = pool.host_index(&first);
    let victim_addr = pool.hosts[victim].addr.clone();
    let victim_iqn = pool.hosts[victim].iqn.clone();
    let survivor_iqn = pool.hosts[1 - victim].iqn.clone();
    let portal = pool.storaged.iscsi.clone();
    let seen = targets(&portal, &victim_iqn);
    assert_eq!(
        seen.len(),
        1,
        "the VM's one disk is granted to its host: {seen:?}"
    );
    let target = seen[0].clone();
    let vm_id = field(&line, "id");
    let victim_chap = disk_chap(&pool.p, &victim_addr, &vm_id);
    assert!(
        can_open(&portal, &target, &victim_iqn, Some(&victim_chap)),
        "the running host can open its disk with the CHAP secret the pool gave it"
    );
    assert!(
        !can_open(&portal, &target, &victim_iqn, None),
        "an initiator name alone opens nothing"
    );

    let died = Instant::now();
    pool.hosts[victim].daemon.proc.kill();
    let line = pool.wait_vm("ha-vm", "\"power\": \"running\"", Duration::from_secs(90));
    // Running again, and somewhere else.
    let line = if field(&line, "host") == first {
        wait_for(Duration::from_secs(90), || {
            pool.vm("ha-vm")
                .filter(|l| l.contains("\"power\": \"running\"") && field(l, "host") != first)
        })
        .unwrap_or_else(|| panic!("ha-vm restarted elsewhere\n{}", pool.logs()))
    } else {
        line
    };
    let restarted = died.elapsed();
    assert_ne!(field(&line, "host"), first);
    println!("BENCH ha_restart_s {:.2} s", restarted.as_secs_f64());

    // The dead host is fenced: it is marked so, and its initiator can no longer open the
    // disk, which the new host can.
    let hosts = poolctl_ok(&pool.p, &["host-list", "--json"]);
    let dead = hosts
        .lines()
        .find(|l| l.contains(&format!("\"id\": \"{first}\"")))
        .expect("listed");
    assert!(dead.contains("\"state\": \"fenced\""), "{dead}");
    assert!(
        !can_open(&portal, &target, &victim_iqn, Some(&victim_chap)),
        "the fenced host's initiator is refused, its secret and all"
    );
    let survivor_addr = pool.hosts[1 - victim].addr.clone();
    let survivor_chap = disk_chap(&pool.p, &survivor_addr, &vm_id);
    assert_ne!(
        survivor_chap.secret, victim_chap.secret,
        "each host has its own"
    );
    assert!(
        can_open(&portal, &target, &survivor_iqn, Some(&survivor_chap)),
        "the new host's initiator is granted"
    );
    assert!(
        !can_open(&portal, &target, &survivor_iqn, Some(&victim_chap)),
        "another host's secret does not open it"
    );
    let hb = console_line(&pool.p, "ha-vm", "HB seq=", Duration::from_secs(30))
        .unwrap_or_else(|| panic!("the guest runs on the new host\n{}", pool.logs()));
    assert!(hb.contains("bad=0"), "{hb}");

    // Alerts as XenServer raises them: the dead host, and the restart.
    let alerts = pool.ctl(&["alerts", "--json"]);
    let alert = |kind: &str, target: &str| {
        alerts
            .lines()
            .find(|l| {
                l.contains(&format!("\"kind\": \"{kind}\""))
                    && l.contains(&format!("\"target\": \"{target}\""))
            })
            .unwrap_or_else(|| panic!("a {kind} alert about {target}: {alerts}"))
            .to_owned()
    };
    alert("host-unreachable", &first);
    let restart = alert("ha-restart", &vm_id);
    assert!(restart.contains("\"severity\": \"warning\""), "{restart}");
    // Dismissed, it leaves the open list and stays on the whole one.
    pool.ctl(&["alert-dismiss", &field(&restart, "id")]);
    assert!(!pool.ctl(&["alerts"]).contains("ha-restart"));
    let all = pool.ctl(&["alerts", "--all", "--json"]);
    assert!(
        all.lines().any(|l| l.contains("ha-restart")
            && l.contains("\"dismissed\": \"")
            && l.contains(" by admin")),
        "{all}"
    );
}

/// A host cut off from the pool but still alive (its hostd frozen with SIGSTOP, its VM
/// process running on): the pool fences it at storaged and restarts the VM elsewhere.
/// When the host comes back, the heartbeat answer names the VM stale, the host stops its
/// old copy, and rejoins enabled; the VM runs once, on the new host.
#[test]
fn a_fenced_host_that_comes_back_stops_its_stale_vm_and_rejoins() {
    let dir = tempfile::tempdir().unwrap();
    let pool = Pool::start(dir.path(), 2);
    pool.wait_hosts_enabled();
    pool.ctl(&["pool-set", "--heartbeat-timeout", "2"]);
    pool.ctl(&["pool-ha-enable", "--failures", "1", "--timeout", "2"]);
    pool.create_sr(dir.path(), "sr1", "1G");
    pool.ctl(&["vdi-create", "p-disk", "--sr", "sr1", "--size", "16M"]);
    let elf = guest_elf(dir.path());
    pool.ctl(&guest_vm(
        "p-vm",
        "p-disk",
        &elf,
        "seed=3 blk=rw mode=heartbeat hb_ms=100",
        &["--ha", "restart", "--start"],
    ));
    let line = pool.wait_vm("p-vm", "\"power\": \"running\"", Duration::from_secs(60));
    let vm_id = field(&line, "id");
    let first = field(&line, "host");
    let hosts = poolctl_ok(&pool.p, &["host-list", "--json"]);
    let addr = field(
        hosts
            .lines()
            .find(|l| l.contains(&format!("\"id\": \"{first}\"")))
            .expect("host listed"),
        "address",
    );
    let victim = pool
        .hosts
        .iter()
        .position(|h| h.addr == addr)
        .expect("ours");
    let run_dir = dir
        .path()
        .join(&pool.hosts[victim].name)
        .display()
        .to_string();
    let vm_procs = processes_with(&format!("{run_dir}/"));
    assert!(
        !vm_procs.is_empty(),
        "the VM's process runs under {run_dir}"
    );

    // Cut the host off: hostd stops answering, its VM process keeps running.
    let hostd_pid = pool.hosts[victim].daemon.proc.pid();
    signal(hostd_pid, "-STOP");
    let line = wait_for(Duration::from_secs(90), || {
        pool.vm("p-vm")
            .filter(|l| l.contains("\"power\": \"running\"") && field(l, "host") != first)
    })
    .unwrap_or_else(|| {
        signal(hostd_pid, "-CONT");
        panic!("p-vm restarted elsewhere\n{}", pool.logs())
    });
    assert_eq!(field(&line, "id"), vm_id);
    assert!(
        vm_procs
            .iter()
            .any(|p| Path::new(&format!("/proc/{p}")).exists()),
        "the old copy still runs while its host is frozen (the test would prove nothing)"
    );
    let hosts = poolctl_ok(&pool.p, &["host-list", "--json"]);
    assert!(
        hosts
            .lines()
            .any(|l| l.contains(&format!("\"id\": \"{first}\"")) && l.contains("fenced")),
        "{hosts}"
    );

    // Back: the agent's heartbeat learns the VM is stale and stops the old copy; the host
    // rejoins once it runs none of its old VMs.
    signal(hostd_pid, "-CONT");
    wait_for(Duration::from_secs(30), || {
        vm_procs
            .iter()
            .all(|p| !Path::new(&format!("/proc/{p}")).exists())
            .then_some(())
    })
    .unwrap_or_else(|| panic!("the stale copy stopped\n{}", pool.logs()));
    wait_for(Duration::from_secs(30), || {
        let o = poolctl(&pool.p, &["host-list", "--json"]);
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .any(|l| {
                l.contains(&format!("\"id\": \"{first}\"")) && l.contains("\"state\": \"enabled\"")
            })
            .then_some(())
    })
    .unwrap_or_else(|| panic!("the host rejoined enabled\n{}", pool.logs()));
    let line = pool.vm("p-vm").expect("listed");
    assert!(
        line.contains("\"power\": \"running\"") && field(&line, "host") != first,
        "{line}"
    );
    // The agent (on the heartbeat's answer) and reconciliation both stop stale copies;
    // whichever came first, say which.
    let by_agent = pool.hosts[victim]
        .daemon
        .log_text()
        .contains("placed this VM elsewhere");
    println!("stale copy stopped by the host's agent: {by_agent}");
}
