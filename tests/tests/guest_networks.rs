//! Guest networks end to end with real VMs, on the three-host pool of
//! `deploy/lab-netns.sh` (each `hostd` in its own network namespace, so a private
//! network's VXLAN really crosses between hosts): two VMs on one private network on
//! different hosts exchange UDP; a VM on another private network cannot even resolve
//! them; the receiver live-migrates while a sender streams at 200 pps and loses no more
//! than its measured downtime and the MAC announce explain.
//!
//! Needs root and network namespaces; says plainly why it skipped where it has neither.

use std::time::{Duration, Instant};

use e2e_tests::netns_lab::{Lab, unavailable};
use e2e_tests::pool::{console_until, field, guest_elf, guest_vm};
use e2e_tests::{PoolArg, poolctl, poolctl_ok, text, wait_for};

/// Datagrams `a` sends to `b`'s sink.
const SENT: u64 = 500;
/// The paced stream during the migration: `STREAM` datagrams at `PPS`.
const STREAM: u64 = 1200;
const PPS: u64 = 200;

static POOL: std::sync::OnceLock<PoolArg> = std::sync::OnceLock::new();

fn pool() -> &'static PoolArg {
    POOL.get().expect("the lab is up")
}

/// The id of the host named `name` (the lab names its hosts h1, h2, h3).
fn host_id(name: &str) -> String {
    let hosts = poolctl_ok(pool(), &["host-list", "--json"]);
    let line = hosts
        .lines()
        .find(|l| l.contains(&format!("\"name\": \"{name}\"")))
        .unwrap_or_else(|| panic!("no host {name}: {hosts}"));
    field(line, "id")
}

/// The number after `key=` among a console line's words.
fn counter(line: &str, key: &str) -> u64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
}

/// The whole `GUEST net rx=` counter lines seen so far, oldest first.
fn counter_lines(seen: &str) -> Vec<&str> {
    seen.split_inclusive('\n')
        .filter(|l| l.ends_with('\n') && l.starts_with("GUEST net rx="))
        .map(str::trim_end)
        .collect()
}

/// Creates VM `name` on `network` with a 16 MiB disk of its own, booting the test guest
/// with `cmdline`, and starts it on `host`.
fn start_vm(lab: &Lab, elf: &str, name: &str, network: &str, cmdline: &str, host: &str) {
    let disk = format!("d-{name}");
    poolctl_ok(
        pool(),
        &["vdi-create", &disk, "--sr", "netns-sr", "--size", "16M"],
    );
    poolctl_ok(
        pool(),
        &guest_vm(name, &disk, elf, cmdline, &["--network", network]),
    );
    poolctl_ok(pool(), &["vm-start", name, "--host", host]);
    wait_for(Duration::from_secs(30), || {
        lab.vm_line(name)
            .filter(|l| l.contains("\"power\": \"running\""))
    })
    .unwrap_or_else(|| panic!("{name} running on {host}\n{}", lab.logs()));
}

/// The first whole console line of `vm` starting with `prefix`, from its start.
fn wait_line(lab: &Lab, vm: &str, prefix: &str, limit: Duration) -> String {
    console_until(pool(), None, vm, limit, |seen| {
        seen.split_inclusive('\n')
            .find(|l| l.ends_with('\n') && l.starts_with(prefix))
            .map(|l| l.trim_end().to_owned())
    })
    .unwrap_or_else(|| {
        panic!(
            "{vm} printed no {prefix:?} within {limit:?}\n{}",
            lab.logs()
        )
    })
}

/// `b`'s sink count from a counter line it printed after at least `settle` of watching
/// (its `net_stats_ms` is shorter), so the figure is a fresh one; or, sooner, from the
/// first line whose count reaches `enough`.
fn sink_now(lab: &Lab, settle: Duration, enough: u64) -> u64 {
    let start = Instant::now();
    let line = console_until(
        pool(),
        None,
        "b",
        settle + Duration::from_secs(20),
        |seen| {
            let lines = counter_lines(seen);
            let last = lines.last()?;
            (start.elapsed() >= settle || counter(last, "sink") >= enough).then(|| last.to_string())
        },
    )
    .unwrap_or_else(|| panic!("b printed no counters\n{}", lab.logs()));
    counter(&line, "sink")
}

#[test]
fn vms_on_a_private_network_talk_across_hosts_and_through_a_migration_and_no_other_network_reaches_them()
 {
    if let Some(why) = unavailable() {
        println!("skipped: {why}");
        return;
    }
    let began = Instant::now();
    let lab = Lab::up();
    POOL.set(lab.pool.clone()).expect("one lab per run");
    println!("{:?}: lab up", began.elapsed());
    poolctl_ok(pool(), &["network-create", "p1", "--kind", "private"]);
    poolctl_ok(pool(), &["network-create", "p2", "--kind", "private"]);
    let elf = guest_elf(lab.image_dir());

    // b on host 2 counts what reaches its UDP sink, and says so every 250 ms.
    start_vm(
        &lab,
        &elf,
        "b",
        "p1",
        "ip=10.88.0.2/24 udp_sink=9 net_stats_ms=250",
        "h2",
    );
    let up = wait_line(&lab, "b", "GUEST net up", Duration::from_secs(30));
    assert!(up.contains("ip=10.88.0.2/24"), "{up}");
    assert_eq!(sink_now(&lab, Duration::from_millis(600), 0), 0);

    println!("{:?}: b serving", began.elapsed());
    // a on host 1 resolves b by ARP over the VXLAN between the namespaces and sends.
    start_vm(
        &lab,
        &elf,
        "a",
        "p1",
        &format!("ip=10.88.0.1/24 udp_send=10.88.0.2:9,count={SENT}"),
        "h1",
    );
    let sent = wait_line(&lab, "a", "NET send", Duration::from_secs(30));
    assert_eq!(counter(&sent, "packets"), SENT, "{sent}");
    let got = sink_now(&lab, Duration::from_secs(5), SENT);
    assert_eq!(got, SENT, "b's sink after a sent {SENT}");

    println!("{:?}: a sent", began.elapsed());
    // c on p2, on b's own host, with an address on the same subnet: its ARP for b is
    // answered by nobody (the guest gives up after 10 s), and b counts nothing more.
    start_vm(
        &lab,
        &elf,
        "c",
        "p2",
        &format!("ip=10.88.0.3/24 udp_send=10.88.0.2:9,count={SENT}"),
        "h2",
    );
    let failed = wait_line(&lab, "c", "NET send", Duration::from_secs(30));
    assert!(failed.contains("error=arp-timeout"), "{failed}");
    let got = sink_now(&lab, Duration::from_millis(600), SENT + 1);
    assert_eq!(got, SENT, "b's sink after c tried to send");

    println!("{:?}: c refused", began.elapsed());
    // d on host 1 streams at PPS while b live-migrates from host 2 to host 3.
    start_vm(
        &lab,
        &elf,
        "d",
        "p1",
        &format!("ip=10.88.0.4/24 udp_send=10.88.0.2:9,count={STREAM},pps={PPS}"),
        "h1",
    );
    // The stream is flowing once b's count moves past a's datagrams.
    sink_now(&lab, Duration::from_secs(15), SENT + PPS / 2);
    println!("{:?}: stream flowing", began.elapsed());
    let migrating = Instant::now();
    let o = poolctl(pool(), &["vm-migrate", "b", "--host", "h3"]);
    let migration_ms = migrating.elapsed().as_millis() as u64;
    assert!(o.status.success(), "{}\n{}", text(&o), lab.logs());
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let downtime_ms: u64 = out
        .lines()
        .find_map(|l| l.strip_prefix("downtime ")?.strip_suffix(" ms"))
        .and_then(|d| d.trim().parse().ok())
        .unwrap_or_else(|| panic!("vm-migrate says its downtime: {out}"));
    // The pool records the end of the migration just after the command returns.
    let h3 = host_id("h3");
    wait_for(Duration::from_secs(30), || {
        lab.vm_line("b")
            .filter(|l| l.contains("\"power\": \"running\"") && field(l, "host") == h3)
    })
    .unwrap_or_else(|| panic!("b runs on host 3: {:?}", lab.vm_line("b")));
    println!("{:?}: migrated", began.elapsed());
    let streamed = wait_line(
        &lab,
        "d",
        "NET send",
        Duration::from_secs(STREAM / PPS + 20),
    );
    assert_eq!(counter(&streamed, "packets"), STREAM, "{streamed}");
    let got = sink_now(&lab, Duration::from_secs(2), u64::MAX);
    let lost = (SENT + STREAM).saturating_sub(got);
    let extra = got.saturating_sub(SENT + STREAM);
    // Private networks do not learn remote MACs: host 1 sends each datagram to every
    // other host, so the destination's tap, plugged before the switchover, also queues
    // what the source still delivers. The destination drops that queue when the source
    // has paused: nothing reaches b twice.
    // What may be lost: the datagrams sent while b was paused (they may reach only the
    // source's tap, which goes away with it), then until b's new port takes them (the
    // first announce round goes out as b resumes, the next 50 ms later in case the
    // first is lost), and 200 ms for scheduling on a busy 2-core machine.
    let bound = (downtime_ms + 250) * PPS / 1000 + 1;
    println!(
        "migration of b at {PPS} pps: downtime {downtime_ms} ms, migration {migration_ms} ms, \
         lost {lost} of {STREAM} (bound {bound}), delivered twice {extra}"
    );
    assert!(
        lost <= bound,
        "b lost {lost} datagrams in a migration with {downtime_ms} ms downtime (bound {bound})\n{}",
        lab.logs()
    );
    assert_eq!(
        extra, 0,
        "b counted {extra} datagrams more than were sent in a {migration_ms} ms migration"
    );
    println!("guest networks test took {:?}", began.elapsed());
}
