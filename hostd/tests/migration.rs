//! Live migration against real KVM and real TCP on loopback.
//!
//! The first tests drive the migration stream directly between two VMs of this process
//! (source: a running test guest; destination: `migration::receive` on a listener); the
//! daemon tests below go through `HostService` on two `hostd` servers bound to
//! different loopback addresses, with the VMs in their own `hostd-vmm` processes.

mod common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use hostd::console::Console;
use hostd::devices::virtio::block::{Disk, FileBackend};
use hostd::migration::{self, Incoming, MigrationError, SendOptions};
use hostd::testguest::{self, check_pattern, heartbeat_sum, heartbeats};
use hostd::vmm::{BootProtocol, BootSpec, Vm, VmSpec};
use proto::host::MigrationProgress;

const WAIT: Duration = Duration::from_secs(30);

fn spec(cmdline: &str, disk: Option<&Path>) -> VmSpec {
    VmSpec {
        vcpus: 2,
        memory_bytes: 64 << 20,
        boot: BootSpec {
            kernel: testguest::elf_path().to_owned(),
            initrd: None,
            cmdline: cmdline.into(),
            protocol: BootProtocol::Auto,
        },
        disks: disk
            .map(|p| {
                vec![Disk::new(
                    "vda",
                    Arc::new(FileBackend::open(p, false).unwrap()),
                    false,
                )]
            })
            .unwrap_or_default(),
        cpuid_mask: vec![],
    }
}

fn image(dir: &tempfile::TempDir, bytes: u64) -> PathBuf {
    let path = dir.path().join("disk.img");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(bytes)
        .unwrap();
    path
}

fn options(addr: &str, token: &str) -> SendOptions {
    SendOptions {
        vm_id: "vm1".into(),
        token: token.into(),
        destination: addr.into(),
        downtime_budget: migration::DEFAULT_DOWNTIME,
        max_rounds: migration::DEFAULT_MAX_ROUNDS,
        timeout: Duration::from_secs(60),
        auto_converge: false,
        bandwidth_limit: 0,
    }
}

type Receiving = std::thread::JoinHandle<(Result<Vm, MigrationError>, Arc<Console>)>;

/// Starts a destination for `spec` on a fresh loopback port; returns its address and
/// the thread that ends with the received VM and its console.
fn destination(spec: VmSpec, token: &str) -> (String, Receiving) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let inc = Incoming {
        vm_id: "vm1".into(),
        token: token.into(),
        spec,
    };
    let t = std::thread::spawn(move || {
        let console = Console::new(1 << 20, None).unwrap();
        let abort = AtomicBool::new(false);
        let vm = migration::receive(
            &listener,
            &inc,
            console.clone(),
            &abort,
            Instant::now() + WAIT,
            &mut || {},
        );
        (vm, console)
    });
    (addr, t)
}

fn wait_heartbeats(console: &Console, n: usize) {
    let deadline = Instant::now() + WAIT;
    while heartbeats(&console.text()).len() < n {
        assert!(
            Instant::now() < deadline,
            "fewer than {n} heartbeats: {}",
            console.text()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Every heartbeat once, in order, with the checksum of its sequence number and no
/// dirtied page lost.
fn assert_chain(text: &str, seed: u64) -> usize {
    let hbs = heartbeats(text);
    for (i, hb) in hbs.iter().enumerate() {
        assert_eq!(hb.seq, i as u64 + 1, "{text}");
        assert_eq!(hb.sum, heartbeat_sum(seed, hb.seq), "{text}");
        assert_eq!(hb.bad, 0, "{text}");
    }
    hbs.len()
}

#[test]
fn a_dirtying_guest_moves_over_the_stream_and_goes_on_where_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let img = image(&dir, 8 << 20);
    let cmd = "seed=5 blk=write mode=heartbeat hb_ms=20 dirty_mib_s=64 dirty_mib=8";
    let console_a = Console::new(1 << 20, None).unwrap();
    let mut a = Vm::new(&spec(cmd, Some(&img)), console_a.clone()).unwrap();
    a.start().unwrap();
    wait_heartbeats(&console_a, 5);

    let mut vms = vec![(a, console_a)];
    let mut texts = Vec::new();
    for hop in 0..3 {
        let (src, src_console) = vms.pop().unwrap();
        let (addr, dest) = destination(spec(cmd, Some(&img)), "s3cret");
        let mut reports: Vec<MigrationProgress> = Vec::new();
        let sent = migration::send(
            &src,
            &options(&addr, "s3cret"),
            &AtomicBool::new(false),
            MigrationProgress::default(),
            &mut |p| reports.push(p.clone()),
        )
        .unwrap_or_else(|e| panic!("hop {hop}: {}", hostd::error_chain(&e)));
        assert!(sent.confirmed);
        src.stop();
        drop(src);
        texts.push(src_console.text());
        let (vm, console) = dest.join().unwrap();
        let vm = vm.unwrap();
        assert!(
            reports.iter().any(|p| p.phase == 3) && reports.iter().any(|p| p.phase == 5),
            "full copy and switchover reported: {reports:?}"
        );
        eprintln!(
            "hop {hop}: downtime {:?}, total {:?}, rounds {}, {} bytes",
            sent.downtime, sent.total, sent.rounds, sent.bytes_sent
        );
        let before = heartbeats(&console.text()).len();
        wait_heartbeats(&console, before + 3);
        vms.push((vm, console));
    }
    let (last, console) = vms.pop().unwrap();
    last.stop();
    drop(last);
    texts.push(console.text());
    let all = texts.concat();
    assert!(assert_chain(&all, 5) > 15, "{all}");
    // The pattern the guest wrote before the first hop is on the disk.
    let bytes = std::fs::read(&img).unwrap();
    assert_eq!(check_pattern(5, 0, 0, &bytes[..256 << 10]), Ok(()));
}

#[test]
fn a_wrong_token_is_refused_before_any_page_and_the_source_runs_on() {
    let cmd = "seed=9 mode=heartbeat hb_ms=20";
    let console_a = Console::new(1 << 20, None).unwrap();
    let mut a = Vm::new(&spec(cmd, None), console_a.clone()).unwrap();
    a.start().unwrap();
    wait_heartbeats(&console_a, 2);
    let (addr, dest) = destination(spec(cmd, None), "right");
    let err = migration::send(
        &a,
        &options(&addr, "wrong"),
        &AtomicBool::new(false),
        MigrationProgress::default(),
        &mut |_| {},
    )
    .unwrap_err();
    assert!(
        matches!(&err, MigrationError::Refused { reason } if reason.contains("token")),
        "{err:?}"
    );
    assert!(!a.is_paused());
    let n = heartbeats(&console_a.text()).len();
    wait_heartbeats(&console_a, n + 2);
    // The destination still waits, and the right token gets through.
    migration::send(
        &a,
        &options(&addr, "right"),
        &AtomicBool::new(false),
        MigrationProgress::default(),
        &mut |_| {},
    )
    .unwrap();
    a.stop();
    let (vm, console) = dest.join().unwrap();
    let vm = vm.unwrap();
    let n = heartbeats(&console.text()).len();
    wait_heartbeats(&console, n + 2);
    vm.stop();
    assert!(assert_chain(&format!("{}{}", console_a.text(), console.text()), 9) > 4);
}

#[test]
fn a_guest_that_cannot_converge_stays_on_the_source_and_a_retry_moves_it() {
    let cmd = "seed=13 mode=heartbeat hb_ms=20 dirty_mib_s=64 dirty_mib=8";
    let console_a = Console::new(1 << 20, None).unwrap();
    let mut a = Vm::new(&spec(cmd, None), console_a.clone()).unwrap();
    a.start().unwrap();
    wait_heartbeats(&console_a, 3);
    let (addr, dest) = destination(spec(cmd, None), "t");
    // No downtime at all is allowed: the rounds never fit, and the limit ends it.
    let mut opts = options(&addr, "t");
    opts.downtime_budget = Duration::ZERO;
    opts.max_rounds = 3;
    let mut reports: Vec<MigrationProgress> = Vec::new();
    let err = migration::send(
        &a,
        &opts,
        &AtomicBool::new(false),
        MigrationProgress::default(),
        &mut |p| reports.push(p.clone()),
    )
    .unwrap_err();
    assert!(
        matches!(err, MigrationError::NoConvergence { rounds: 3, .. }),
        "{err:?}"
    );
    let last = reports.last().unwrap();
    assert_eq!(last.round, 3);
    assert!(
        last.dirty_bytes_last_round > 0 && last.dirty_rate_bytes_per_second > 0,
        "the dirty log sees the guest's writes: {last:?}"
    );
    assert!(!a.is_paused());
    let n = heartbeats(&console_a.text()).len();
    wait_heartbeats(&console_a, n + 2);
    // The destination dropped that attempt; a new one (new destination) succeeds.
    let (vm, _) = dest.join().unwrap();
    assert!(vm.is_err());
    let (addr, dest) = destination(spec(cmd, None), "t");
    let sent = migration::send(
        &a,
        &options(&addr, "t"),
        &AtomicBool::new(false),
        MigrationProgress::default(),
        &mut |_| {},
    )
    .unwrap();
    assert!(sent.confirmed);
    a.stop();
    let (vm, console) = dest.join().unwrap();
    let vm = vm.unwrap();
    let n = heartbeats(&console.text()).len();
    wait_heartbeats(&console, n + 2);
    vm.stop();
    assert!(assert_chain(&format!("{}{}", console_a.text(), console.text()), 13) > 5);
}
