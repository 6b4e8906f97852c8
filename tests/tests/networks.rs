//! Guest networks and VIFs in a real pool (three `poold`, two `hostd` that heartbeat their
//! NICs, one `storaged`), driven through `poolctl`: networks of each kind, VMs with VIFs
//! whose MACs the pool assigns and keeps through a live migration, placement that refuses
//! a host without a network's NIC, and bad input refused with a clear error and no change.

use std::time::Duration;

use e2e_tests::pool::{Pool, field, guest_elf, guest_vm};
use e2e_tests::{poolctl, text, wait_for};

/// The NICs a host on this machine reports: what `/sys/class/net` has, without loopback,
/// bridges, taps and VXLAN devices (the hosts share this machine's network namespace).
fn machine_nics() -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir("/sys/class/net")
        .expect("/sys/class/net")
        .filter_map(|e| e.ok())
        .filter(|e| {
            let p = e.path();
            let uevent = std::fs::read_to_string(p.join("uevent")).unwrap_or_default();
            e.file_name() != "lo"
                && !p.join("bridge").exists()
                && !p.join("tun_flags").exists()
                && !uevent.contains("DEVTYPE=vxlan")
                && !uevent.contains("DEVTYPE=bridge")
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    out.sort();
    out
}

/// The JSON line of `name` in a `*-list --json` output.
fn line_of(json: &str, name: &str) -> String {
    json.lines()
        .find(|l| l.contains(&format!("\"name\": \"{name}\"")))
        .unwrap_or_else(|| panic!("{name} listed: {json}"))
        .to_owned()
}

/// A `poolctl` call that must fail, saying `says`, and leave the networks, VIFs and VMs
/// as they were.
fn refused(pool: &Pool, args: &[&str], says: &str) {
    // Every row but its relative creation time ("3s ago").
    let state = || {
        ["network-list", "vif-list", "vm-list"]
            .map(|verb| pool.ctl(&[verb, "--json"]))
            .join("")
            .lines()
            .map(|l| l.split(", \"created\"").next().unwrap_or(l).to_owned())
            .collect::<Vec<_>>()
    };
    let before = state();
    let o = poolctl(&pool.p, args);
    assert!(
        !o.status.success(),
        "poolctl {args:?} succeeded: {}",
        text(&o)
    );
    assert!(
        text(&o).contains(says),
        "poolctl {args:?} should say {says:?}: {}",
        text(&o)
    );
    assert_eq!(state(), before, "poolctl {args:?} changed the pool");
}

#[test]
fn networks_vifs_macs_and_placement_through_poolctl() {
    let dir = tempfile::tempdir().unwrap();
    let pool = Pool::start(dir.path(), 2);
    pool.wait_hosts_enabled();

    // Every host reports this machine's NICs with its heartbeats.
    let nics = machine_nics();
    assert!(
        !nics.is_empty(),
        "this machine has no NIC but loopback, bridges, taps or VXLAN devices"
    );
    let hosts = wait_for(Duration::from_secs(20), || {
        let h = pool.ctl(&["host-list", "--json"]);
        h.lines()
            .filter(|l| l.contains("\"nics\": \"") && !l.contains("\"nics\": \"\""))
            .count()
            .eq(&2)
            .then_some(h)
    })
    .unwrap_or_else(|| panic!("both hosts report NICs\n{}", pool.logs()));
    let h1 = line_of(&hosts, "h1");
    let h2_id = field(&line_of(&hosts, "h2"), "id");
    assert_eq!(field(&h1, "nics"), nics.join(","), "{h1}");
    let nic = &nics[0];

    pool.ctl(&["network-create", "lan", "--kind", "external", "--nic", nic]);
    pool.ctl(&[
        "network-create",
        "lan10",
        "--kind",
        "external",
        "--nic",
        nic,
        "--vlan",
        "10",
    ]);
    pool.ctl(&[
        "network-create",
        "priv",
        "--kind",
        "private",
        "--mtu",
        "1400",
    ]);
    pool.ctl(&[
        "network-create",
        "lab",
        "--kind",
        "internal",
        "--host",
        "h2",
    ]);
    pool.ctl(&[
        "network-create",
        "far",
        "--kind",
        "external",
        "--nic",
        "nosuchnic0",
    ]);
    let nets = pool.ctl(&["network-list", "--json"]);
    let priv_ = line_of(&nets, "priv");
    assert!(priv_.contains("\"kind\": \"private\""), "{priv_}");
    assert!(
        priv_.contains("\"vni\": 1,") && priv_.contains("\"mtu\": 1400,"),
        "{priv_}"
    );
    let lan10 = line_of(&nets, "lan10");
    assert!(
        lan10.contains("\"vlan\": 10,") && lan10.contains("\"mtu\": 1500,"),
        "{lan10}"
    );
    assert_eq!(field(&line_of(&nets, "lab"), "host"), h2_id);

    // Bad networks: each a clear error, nothing changed.
    refused(
        &pool,
        &["network-create", "lan", "--kind", "private"],
        "is taken",
    );
    for tag in ["4095", "5000"] {
        refused(
            &pool,
            &[
                "network-create",
                "v",
                "--kind",
                "external",
                "--nic",
                nic,
                "--vlan",
                tag,
            ],
            "outside 1-4094",
        );
    }
    refused(
        &pool,
        &[
            "network-create",
            "lan-again",
            "--kind",
            "external",
            "--nic",
            nic,
        ],
        "already bridges NIC",
    );
    refused(
        &pool,
        &[
            "network-create",
            "lab2",
            "--kind",
            "internal",
            "--host",
            "nosuchhost",
        ],
        "no host named \"nosuchhost\"",
    );

    // A running VM on two networks, each VIF with a MAC from the pool's prefix.
    pool.create_sr(dir.path(), "sr1", "256M");
    pool.ctl(&["vdi-create", "web-disk", "--sr", "sr1", "--size", "16M"]);
    let elf = guest_elf(dir.path());
    pool.ctl(&guest_vm(
        "web",
        "web-disk",
        &elf,
        "mode=heartbeat hb_ms=200",
        &["--network", "priv", "--network", "lan"],
    ));
    // Not started: this test's hosts share the machine's network namespace (and "lan" is
    // its real NIC), where hostd must not plug networks. VMs that run on networks, migrate
    // and keep their MACs are tests/tests/guest_networks.rs and hostd/tests/vifs.rs, each
    // host in a namespace of its own.
    let web = pool.vm("web").expect("web listed");
    let vifs = field(&web, "vifs");
    let macs: Vec<&str> = vifs
        .split(',')
        .map(|v| v.split('=').nth(1).unwrap())
        .collect();
    assert!(
        vifs.starts_with("priv=02:") && vifs.contains(",lan=02:"),
        "{web}"
    );
    assert_ne!(macs[0], macs[1]);
    assert_eq!(macs[0][..8], macs[1][..8], "one pool prefix: {vifs}");
    let listed = pool.ctl(&["vif-list", "--vm", "web", "--json"]);
    assert_eq!(listed.matches("\"id\":").count(), 2, "{listed}");

    // The network under a VIF stays.
    refused(&pool, &["network-destroy", "lan"], "in use by VIF");

    // Stopped VMs: a VIF given a MAC, and the bad VIFs.
    pool.ctl(&["vm-create", "pinned", "--memory", "64M", "--network", "lab"]);
    pool.ctl(&[
        "vif-create",
        "pinned",
        "priv",
        "--mac",
        "0A:00:27:00:00:07",
        "--rate-packets",
        "5000",
    ]);
    let pinned = pool.ctl(&["vif-list", "--vm", "pinned", "--json"]);
    assert!(
        pinned.contains("\"mac\": \"0a:00:27:00:00:07\""),
        "{pinned}"
    );
    assert!(pinned.contains("5000"), "{pinned}");
    refused(
        &pool,
        &["vif-create", "pinned", "lan", "--mac", macs[0]],
        "already used",
    );
    refused(
        &pool,
        &["vif-create", "pinned", "lan", "--mac", "01:00:5e:00:00:01"],
        "multicast",
    );
    refused(
        &pool,
        &["vif-create", "pinned", "lan", "--rate-bytes", "0"],
        "rate limit of 0",
    );
    refused(
        &pool,
        &["vif-create", "pinned", "nosuchnet"],
        "no network named \"nosuchnet\"",
    );
    refused(
        &pool,
        &[
            "vm-create",
            "orphan",
            "--memory",
            "64M",
            "--network",
            "nosuchnet",
        ],
        "no network named \"nosuchnet\"",
    );

    // A network that locks each VIF to its own addresses hands them out from its subnet:
    // without one, anyone allowed a VIF could claim any address (a router's).
    refused(
        &pool,
        &[
            "network-create",
            "locked",
            "--kind",
            "private",
            "--lock-addresses",
        ],
        "a network that locks addresses needs a subnet",
    );
    refused(
        &pool,
        &[
            "network-create",
            "locked",
            "--kind",
            "private",
            "--subnet",
            "10.0.0.1/24",
        ],
        "host bits set: the network is 10.0.0.0/24",
    );
    refused(
        &pool,
        &[
            "network-create",
            "locked",
            "--kind",
            "external",
            "--nic",
            "eth0",
            "--lock-addresses",
            "--subnet",
            "10.0.0.0/24",
        ],
        "needs its router's address (--gateway)",
    );
    pool.ctl(&[
        "network-create",
        "locked",
        "--kind",
        "private",
        "--lock-addresses",
        "--subnet",
        "10.0.0.0/24",
        "--gateway",
        "10.0.0.1",
    ]);
    let locked = line_of(&pool.ctl(&["network-list", "--json"]), "locked");
    assert!(locked.contains("\"locked\": true"), "{locked}");
    assert!(
        locked.contains("\"subnet\": \"10.0.0.0/24\"")
            && locked.contains("\"gateway\": \"10.0.0.1\""),
        "{locked}"
    );
    assert!(priv_.contains("\"locked\": false"), "{priv_}");
    pool.ctl(&[
        "vif-create",
        "pinned",
        "locked",
        "--ip",
        "10.0.0.2",
        "--ip",
        "10.0.0.3",
    ]);
    let on_locked = pool.ctl(&["vif-list", "--network", "locked", "--json"]);
    assert!(
        on_locked.contains("\"ipv4\": \"10.0.0.2,10.0.0.3\""),
        "{on_locked}"
    );
    for (ip, says) in [
        ("10.0.0.3", "address 10.0.0.3 is VIF"),
        (
            "10.0.0.1",
            "address 10.0.0.1 is network \"locked\"'s gateway",
        ),
        (
            "10.0.1.5",
            "not a host address of network \"locked\"'s subnet 10.0.0.0/24",
        ),
    ] {
        refused(&pool, &["vif-create", "pinned", "locked", "--ip", ip], says);
    }
    refused(
        &pool,
        &["vif-create", "pinned", "priv", "--ip", "10.0.0.256"],
        "not a unicast IPv4 address",
    );
    // A VM made on the network gets the lowest free address; a stopped VM's VIF takes
    // others, or a free one again, and keeps its MAC.
    pool.ctl(&[
        "vm-create",
        "handed",
        "--memory",
        "64M",
        "--network",
        "locked",
    ]);
    let handed = pool.ctl(&["vif-list", "--vm", "handed", "--json"]);
    assert!(handed.contains("\"ipv4\": \"10.0.0.4\""), "{handed}");
    let field = |line: &str, key: &str| {
        let from = line.find(&format!("\"{key}\": \"")).expect(key) + key.len() + 5;
        line[from..].split('"').next().unwrap().to_owned()
    };
    let (vif, mac) = (field(&handed, "id"), field(&handed, "mac"));
    pool.ctl(&["vif-update", &vif, "--ip", "10.0.0.9", "--ip", "10.0.0.10"]);
    let changed = pool.ctl(&["vif-list", "--vm", "handed", "--json"]);
    assert!(
        changed.contains("\"ipv4\": \"10.0.0.9,10.0.0.10\"") && changed.contains(&mac),
        "{changed}"
    );
    refused(
        &pool,
        &["vif-update", &vif, "--ip", "10.0.0.2"],
        "address 10.0.0.2 is VIF",
    );
    refused(&pool, &["vif-update", &vif], "--ip");
    pool.ctl(&["vif-update", &vif, "--reset-ips"]);
    let reset = pool.ctl(&["vif-list", "--vm", "handed", "--json"]);
    assert!(reset.contains("\"ipv4\": \"10.0.0.4\""), "{reset}");
    pool.ctl(&["vm-destroy", "handed"]);

    // Ranges: the pool hands out and allows only the addresses it owns on the LAN.
    fn ranged<'a>(ranges: &[&'a str]) -> Vec<&'a str> {
        let mut a = vec!["network-create", "ranged", "--kind", "private", "--subnet"];
        a.extend(["10.1.0.0/24", "--gateway", "10.1.0.1"]);
        for r in ranges {
            a.extend(["--range", r]);
        }
        a
    }
    refused(
        &pool,
        &ranged(&["10.1.0.1-10.1.0.9"]),
        "range 10.1.0.1-10.1.0.9 holds the gateway 10.1.0.1",
    );
    pool.ctl(&ranged(&["10.1.0.60", "10.1.0.50-10.1.0.51"]));
    let listed = line_of(&pool.ctl(&["network-list", "--json"]), "ranged");
    assert!(
        listed.contains("\"ranges\": \"10.1.0.50-10.1.0.51,10.1.0.60\""),
        "{listed}"
    );
    pool.ctl(&["vif-create", "pinned", "ranged"]);
    let on_ranged = pool.ctl(&["vif-list", "--network", "ranged", "--json"]);
    assert!(on_ranged.contains("\"ipv4\": \"10.1.0.50\""), "{on_ranged}");
    refused(
        &pool,
        &["vif-create", "pinned", "ranged", "--ip", "10.1.0.10"],
        "address 10.1.0.10 is outside network \"ranged\"'s ranges (10.1.0.50-10.1.0.51, 10.1.0.60)",
    );
    // Ranges change around the addresses VIFs hold, and the next VIF comes from them.
    refused(
        &pool,
        &[
            "network-update",
            "ranged",
            "--range",
            "10.1.0.100-10.1.0.199",
        ],
        "holds 10.1.0.50, outside the new ranges",
    );
    pool.ctl(&[
        "network-update",
        "ranged",
        "--range",
        "10.1.0.50",
        "--range",
        "10.1.0.9",
    ]);
    pool.ctl(&["vif-create", "pinned", "ranged"]);
    let readdressed = pool.ctl(&["vif-list", "--network", "ranged", "--json"]);
    assert!(
        readdressed.contains("\"ipv4\": \"10.1.0.9\""),
        "{readdressed}"
    );
    pool.ctl(&["network-update", "ranged", "--no-ranges"]);
    let listed = line_of(&pool.ctl(&["network-list", "--json"]), "ranged");
    assert!(listed.contains("\"ranges\": \"-\""), "{listed}");
    for line in readdressed.lines().filter(|l| l.contains("\"id\"")) {
        pool.ctl(&["vif-destroy", &field(line, "id")]);
    }
    pool.ctl(&["network-destroy", "ranged"]);

    // An internal network pins its VMs to its host; ExplainPlacement names the network.
    let explain = pool.ctl(&["vm-explain", "pinned", "--json"]);
    let rejected = explain
        .lines()
        .find(|l| l.contains("\"eligible\": false"))
        .unwrap_or_else(|| panic!("one host rejected: {explain}"));
    assert!(
        rejected.contains("network: lab is internal to host"),
        "{explain}"
    );
    assert_eq!(
        explain.matches("\"eligible\": true").count(),
        1,
        "{explain}"
    );

    // A network whose NIC no host has: the VM cannot start, and says why.
    pool.ctl(&[
        "vm-create",
        "faraway",
        "--memory",
        "64M",
        "--network",
        "far",
    ]);
    refused(
        &pool,
        &["vm-start", "faraway"],
        "NIC nosuchnic0, which the host lacks",
    );
    let explain = pool.ctl(&["vm-explain", "faraway", "--json"]);
    assert_eq!(
        explain
            .matches("NIC nosuchnic0, which the host lacks")
            .count(),
        2,
        "{explain}"
    );

    // A clone has VIFs on the same networks with MACs of its own, and addresses of its
    // own (its source's are taken): a free one from the locked network's subnet.
    pool.ctl(&["vm-clone", "pinned", "pinned2"]);
    let clone = pool.ctl(&["vif-list", "--vm", "pinned2", "--json"]);
    assert_eq!(clone.matches("\"id\":").count(), 3, "{clone}");
    assert!(!clone.contains("0a:00:27:00:00:07"), "{clone}");
    let on_locked = clone
        .lines()
        .find(|l| l.contains("\"network\": \"locked\""));
    assert!(
        on_locked.is_some_and(|l| l.contains("\"ipv4\": \"10.0.0.4\"")),
        "{clone}"
    );
    assert_eq!(clone.matches("10.0.0.").count(), 1, "{clone}");

    // Once no VIF is on it, a network goes.
    pool.ctl(&["vm-destroy", "faraway"]);
    pool.ctl(&["network-destroy", "far"]);
    assert!(!pool.ctl(&["network-list"]).contains("far"));
}
