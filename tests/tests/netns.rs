//! The three-host pool of `deploy/lab-netns.sh`: each `hostd` in its own network
//! namespace behind a bridge, so a host can be cut off like a pulled cable. An HA VM
//! runs on one host; its link goes down; the pool fences the host and restarts the VM on
//! another; the link comes back and the host rejoins after stopping its stale copy.
//!
//! Needs root and network namespaces; says plainly why it skipped where it has neither.

use std::time::Duration;

use e2e_tests::netns_lab::{Lab, unavailable};
use e2e_tests::pool::{console_line, field, guest_elf, guest_vm};
use e2e_tests::{PoolArg, poolctl_ok, text, wait_for};

/// The lab's members and CA (the script founds the pool in the lab's `pki`).
static POOL: std::sync::OnceLock<PoolArg> = std::sync::OnceLock::new();

fn pool() -> &'static PoolArg {
    POOL.get().expect("the lab is up")
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
    let lab = Lab::up();
    POOL.set(lab.pool.clone()).expect("one lab per run");
    poolctl_ok(pool(), &["pool-set", "--heartbeat-timeout", "2"]);
    poolctl_ok(
        pool(),
        &["pool-ha-enable", "--failures", "1", "--timeout", "2"],
    );
    poolctl_ok(
        pool(),
        &["vdi-create", "d1", "--sr", "netns-sr", "--size", "16M"],
    );
    let elf = guest_elf(lab.image_dir());
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
        lab.vm_line("v1")
            .filter(|l| l.contains("\"power\": \"running\""))
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
        lab.vm_line("v1")
            .filter(|l| l.contains("\"power\": \"running\"") && field(l, "host") != first)
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
    let line = lab.vm_line("v1").expect("v1 listed");
    assert!(
        line.contains("\"power\": \"running\"") && field(&line, "host") != first,
        "v1 runs once, on the new host: {line}"
    );
    let hb = console_line(pool(), "v1", "HB seq=", Duration::from_secs(30))
        .unwrap_or_else(|| panic!("v1 beats on its new host\n{}", lab.logs()));
    assert!(hb.contains("bad=0"), "{hb}");
}
