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

// ---------------------------------------------------------------------------------------
// Through HostService: two daemons, VMs in their own processes.

mod daemons {
    use super::common::{self, Daemon, WAIT};
    use super::*;
    use proto::host::host_service_client::HostServiceClient;
    use proto::host::*;
    use tonic::transport::Channel;

    const TOKEN: &str = "0123456789abcdef";
    const SEED: u64 = 7;

    struct Pool {
        _dir: tempfile::TempDir,
        img: PathBuf,
        hosts: [Daemon; 2],
    }

    async fn pool() -> Pool {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("shared.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(8 << 20)
            .unwrap();
        let a = Daemon::start_at(&dir.path().join("a"), 256 << 20, "127.0.0.1").await;
        let b = Daemon::start_at(&dir.path().join("b"), 256 << 20, "127.0.0.2").await;
        Pool {
            _dir: dir,
            img,
            hosts: [a, b],
        }
    }

    fn vm_config(img: &Path, dirty_mib_s: u32) -> VmConfig {
        let mut cfg = common::config(&format!(
            "seed={SEED} blk=write mode=heartbeat hb_ms=20 dirty_mib_s={dirty_mib_s} dirty_mib=8"
        ));
        cfg.vcpus = 2;
        cfg.disks = vec![DiskConfig {
            id: "vda".into(),
            backend: Some(disk_config::Backend::FilePath(img.display().to_string())),
            read_only: false,
        }];
        cfg
    }

    async fn console_text(d: &Daemon, id: &str) -> String {
        d.manager.console(id).await.unwrap().text()
    }

    /// Waits for `n` more complete heartbeats on `d`'s console of VM `id`.
    async fn more_heartbeats(d: &Daemon, id: &str, n: usize) {
        let console = d.manager.console(id).await.unwrap();
        let start = heartbeats(&console.text()).len();
        let deadline = Instant::now() + WAIT;
        while heartbeats(&console.text()).len() < start + n {
            assert!(
                Instant::now() < deadline,
                "no heartbeats on {}: {}",
                d.addr,
                console.text()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    struct Attempt {
        progress: Vec<MigrationProgress>,
    }

    impl Attempt {
        fn last(&self) -> &MigrationProgress {
            self.progress.last().expect("some progress")
        }
        fn phase(&self) -> MigrationPhase {
            MigrationPhase::try_from(self.last().phase).unwrap()
        }
    }

    async fn prepare(dst: &mut HostServiceClient<Channel>, img: &Path, dirty: u32) -> String {
        dst.prepare_migration_receive(PrepareMigrationReceiveRequest {
            vm_id: "m1".into(),
            config: Some(vm_config(img, dirty)),
            token: TOKEN.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .address
    }

    fn request(address: &str, token: &str) -> StartMigrationSendRequest {
        StartMigrationSendRequest {
            vm_id: "m1".into(),
            destination_address: address.into(),
            token: token.into(),
            ..Default::default()
        }
    }

    /// Sends and follows the progress stream to its end; `during` sees each report
    /// and may act (kill, cut, cancel).
    async fn send(
        src: &mut HostServiceClient<Channel>,
        req: StartMigrationSendRequest,
        mut during: impl AsyncFnMut(&MigrationProgress),
    ) -> Attempt {
        let mut stream = src.start_migration_send(req).await.unwrap().into_inner();
        let mut progress = Vec::new();
        loop {
            match tokio::time::timeout(WAIT, stream.message()).await {
                Ok(Ok(Some(p))) => {
                    during(&p).await;
                    progress.push(p);
                }
                Ok(Ok(None)) => break,
                other => panic!("progress stream: {other:?} after {progress:?}"),
            }
        }
        Attempt { progress }
    }

    fn assert_pattern(img: &Path) {
        let bytes = std::fs::read(img).unwrap();
        assert_eq!(
            check_pattern(SEED, 0, 0, &bytes[..256 << 10]),
            Ok(()),
            "the disk pattern"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_vm_migrates_back_and_forth_ten_times_without_losing_a_beat() {
        let p = pool().await;
        let mut clients = [p.hosts[0].client().await, p.hosts[1].client().await];
        common::create(&mut clients[0], "m1", vm_config(&p.img, 32), true).await;
        more_heartbeats(&p.hosts[0], "m1", 5).await;
        assert_pattern(&p.img);
        let mut texts = Vec::new();
        let hops: usize = std::env::var("HOSTD_MIGRATION_HOPS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(10);
        let mut downtimes = Vec::new();
        for hop in 0..hops {
            let (s, d) = (hop % 2, 1 - hop % 2);
            let src_console = p.hosts[s].manager.console("m1").await.unwrap();
            let address = prepare(&mut clients[d], &p.img, 32).await;
            let a = send(&mut clients[s], request(&address, TOKEN), async |_| {}).await;
            assert_eq!(
                a.phase(),
                MigrationPhase::Completed,
                "hop {hop}: {:?}",
                a.last()
            );
            assert!(a.last().error.is_empty(), "{:?}", a.last());
            downtimes.push(a.last().downtime_ms);
            assert!(
                a.progress
                    .iter()
                    .any(|x| x.phase == MigrationPhase::FullCopy as i32),
                "{:?}",
                a.progress
            );
            let vm = common::wait_state(&mut clients[d], "m1", PowerState::Running).await;
            assert!(common::process_alive(vm.vmm_pid));
            more_heartbeats(&p.hosts[d], "m1", 2).await;
            texts.push(src_console.text());
            // The source let the VM go.
            let deadline = Instant::now() + WAIT;
            while clients[s]
                .get_vm(VmRequest { vm_id: "m1".into() })
                .await
                .is_ok()
            {
                assert!(Instant::now() < deadline, "the source never forgot the VM");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            assert_pattern(&p.img);
        }
        let last = hops % 2;
        texts.push(console_text(&p.hosts[last], "m1").await);
        let all = texts.concat();
        let n = assert_chain(&all, SEED);
        eprintln!("{hops} hops, {n} heartbeats, downtimes (ms): {downtimes:?}");
        assert!(n > 5 + 2 * hops, "{all}");
    }
}
