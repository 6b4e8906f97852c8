//! Live-migration benchmark: the test guest hops back and forth between two VMs of this
//! process over the real migration stream on loopback TCP (the same code the VM
//! processes run), idle and while it rewrites memory; then the same guest ELF, command
//! line, vCPUs and memory under QEMU (`-enable-kvm -cpu qemu64`, `-incoming tcp:`, QMP
//! `migrate` with the same 300 ms downtime limit and no bandwidth cap), hop for hop.
//!
//! Our stream is TLS 1.3 between two hosts' pool certificates, as in production. QEMU
//! migrates in clear, unless `QEMU_TLS_DIR` names a directory of x509 credentials in
//! QEMU's names (ca-cert.pem, server-cert.pem, server-key.pem, client-cert.pem,
//! client-key.pem; bench/trust.sh makes them): then every QEMU has a server and a client
//! `tls-creds-x509` object on them, both verifying the peer, the destination listens
//! (`-incoming defer`, `migrate-incoming`) with the server's and the source migrates with
//! the client's, checking the server's certificate names 127.0.0.1.
//!
//! `cargo run --release -p hostd --example migration_bench -- [hops] [vcpus] [mib]`
//! prints lines `RESULT <who> <scenario> downtime_ms=<median> p99=<..> total_ms=<median>
//! p99=<..>`, who being hostd, qemu or (over TLS) qemu_tls (bench/migration.sh and
//! bench/trust.sh read them).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hostd::console::Console;
use hostd::testguest::{self, heartbeat_sum, heartbeats};
use hostd::vmm::{BootProtocol, BootSpec, Vm, VmSpec};

use common::{QemuVm, free_port, hosts, migrate_hop, percentile};

fn spec(cmdline: &str, vcpus: u32, mib: u64) -> VmSpec {
    VmSpec {
        vcpus,
        memory_bytes: mib << 20,
        boot: BootSpec {
            kernel: testguest::elf_path().to_owned(),
            initrd: None,
            cmdline: cmdline.into(),
            protocol: BootProtocol::Auto,
        },
        disks: vec![],
        nets: vec![],
        cpuid_mask: vec![],
    }
}

fn wait_heartbeats(console: &Console, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while heartbeats(&console.text()).len() < n {
        assert!(
            Instant::now() < deadline,
            "no heartbeats: {}",
            console.text()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn run(name: &str, cmd: &str, seed: u64, hops: usize, vcpus: u32, mib: u64) {
    let tls = hosts();
    let console = Console::new(4 << 20, None).unwrap();
    let mut vm = Vm::new(&spec(cmd, vcpus, mib), console.clone()).unwrap();
    vm.start().unwrap();
    wait_heartbeats(&console, 3);
    let (mut downtimes, mut totals) = (Vec::new(), Vec::new());
    let mut texts = Vec::new();
    let mut current = (vm, console);
    for hop in 0..hops {
        let (sent, vm, console) = migrate_hop(
            &current.0,
            &tls,
            hop,
            spec(cmd, vcpus, mib),
            Duration::from_secs(60),
        );
        texts.push(current.1.text());
        downtimes.push(sent.downtime.as_secs_f64() * 1000.0);
        totals.push(sent.total.as_secs_f64() * 1000.0);
        eprintln!(
            "{name} hop {hop}: downtime {:.1} ms (pause {:.2}, last delta {:.2}, restore {:.2}, resume {:.2}), total {:.1} ms, rounds {}, {} KiB",
            downtimes[hop],
            sent.switchover.pause.as_secs_f64() * 1000.0,
            sent.switchover.last_delta.as_secs_f64() * 1000.0,
            sent.switchover.restore.as_secs_f64() * 1000.0,
            sent.switchover.resume.as_secs_f64() * 1000.0,
            totals[hop],
            sent.rounds,
            sent.bytes_sent >> 10
        );
        // Let the guest run on its new host before it moves again.
        let n = heartbeats(&console.text()).len();
        wait_heartbeats(&console, n + 2);
        current = (vm, console);
    }
    current.0.stop();
    texts.push(current.1.text());
    // The guest went on where it was every time.
    let all = texts.concat();
    for (i, hb) in heartbeats(&all).iter().enumerate() {
        assert_eq!(
            hb.seq,
            i as u64 + 1,
            "{name}: heartbeats skipped or repeated"
        );
        assert_eq!(
            hb.sum,
            heartbeat_sum(seed, hb.seq),
            "{name}: checksum broke"
        );
        assert_eq!(hb.bad, 0, "{name}: dirtied memory lost");
    }
    println!(
        "RESULT hostd {name} downtime_ms={:.2} p99={:.2} total_ms={:.2} p99={:.2}",
        percentile(&downtimes, 0.5),
        percentile(&downtimes, 0.99),
        percentile(&totals, 0.5),
        percentile(&totals, 0.99),
    );
}

/// A QEMU running the guest; with `incoming`, waiting for a migration on that port (over
/// TLS when `tls` names QEMU's credential directory).
fn qemu_vm(
    dir: &Path,
    n: usize,
    cmd: &str,
    (vcpus, mib): (u32, u64),
    incoming: Option<u16>,
    tls: Option<&Path>,
) -> QemuVm {
    let mut c = Command::new("qemu-system-x86_64");
    c.args(["-M", "pc", "-enable-kvm", "-cpu", "qemu64", "-smp"])
        .arg(vcpus.to_string())
        .arg("-m")
        .arg(mib.to_string())
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        .args([
            "-no-reboot",
            "-device",
            "isa-debug-exit,iobase=0xf4,iosize=0x04",
        ])
        .arg("-kernel")
        .arg(testguest::elf_path())
        .arg("-append")
        .arg(cmd)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    QemuVm::start_migratable(c, dir, n, incoming, tls)
}

fn serial_heartbeats(q: &QemuVm) -> usize {
    heartbeats(&q.serial_text()).len()
}

fn wait_serial(q: &QemuVm, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while serial_heartbeats(q) < n {
        assert!(Instant::now() < deadline, "QEMU guest: no heartbeats");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn run_qemu(name: &str, cmd: &str, hops: usize, size: (u32, u64), tls: Option<&Path>) {
    let who = if tls.is_some() { "qemu_tls" } else { "qemu" };
    let dir = tempfile::tempdir().unwrap();
    let mut current = qemu_vm(dir.path(), 0, cmd, size, None, tls);
    wait_serial(&current, 3);
    let (mut downtimes, mut totals) = (Vec::new(), Vec::new());
    for hop in 0..hops {
        let port = free_port();
        let dest = qemu_vm(dir.path(), hop + 1, cmd, size, Some(port), tls);
        let (downtime, total) = current.migrate(port, tls.is_some());
        eprintln!("{who} {name} hop {hop}: downtime {downtime} ms, total {total} ms");
        downtimes.push(downtime);
        totals.push(total);
        current.quit();
        let n = serial_heartbeats(&dest);
        wait_serial(&dest, n + 2);
        current = dest;
    }
    current.quit();
    println!(
        "RESULT {who} {name} downtime_ms={:.2} p99={:.2} total_ms={:.2} p99={:.2}",
        percentile(&downtimes, 0.5),
        percentile(&downtimes, 0.99),
        percentile(&totals, 0.5),
        percentile(&totals, 0.99),
    );
}

const IDLE: &str = "seed=3 mode=heartbeat hb_ms=50";
const DIRTY: &str = "seed=4 mode=heartbeat hb_ms=50 dirty_mib_s=50 dirty_mib=32";

fn main() {
    let mut args = std::env::args().skip(1);
    let hops: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(10);
    let vcpus: u32 = args.next().and_then(|a| a.parse().ok()).unwrap_or(2);
    let mib: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(256);
    let have_qemu = Command::new("qemu-system-x86_64")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !have_qemu {
        // The comparison is the point: no half table (bench/migration.sh installs QEMU).
        eprintln!(
            "qemu-system-x86_64 is missing: install qemu-system-x86, qemu-utils and qemu-block-extra"
        );
        std::process::exit(1);
    }
    run("idle", IDLE, 3, hops, vcpus, mib);
    run("dirty", DIRTY, 4, hops, vcpus, mib);
    let tls = std::env::var_os("QEMU_TLS_DIR").map(PathBuf::from);
    let tls = tls.as_deref();
    run_qemu("idle", IDLE, hops, (vcpus, mib), tls);
    run_qemu("dirty", DIRTY, hops, (vcpus, mib), tls);
}
