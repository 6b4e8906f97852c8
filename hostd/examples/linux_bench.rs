//! The Linux guest benchmark behind `bench/linux.sh`, run where KVM runs Linux (inside the
//! emulated KVM host on a PVM machine): hostd against QEMU's `-M microvm`, the same
//! kernel, initramfs, command line, memory and vCPUs, taking turns.
//!
//! - boot: from starting the process (`hostd run`, or `qemu-system-x86_64`) to the init's
//!   first line on the serial console; the init then powers off;
//! - migration: the guest prints a tick every 0.1 s while it hops between two VMs over
//!   loopback TCP (ours: this process's VMs over the real migration stream, as in
//!   `migration_bench`; QEMU: `-incoming tcp:`, QMP `migrate`, 300 ms downtime limit like
//!   ours); each VMM's own downtime figure, and the ticks must go on after every hop. Ours
//!   is TLS 1.3 as in production; QEMU's in clear, and again over TLS (`tls-creds-x509`)
//!   when `QEMU_TLS_DIR` names its credentials (see `common::QemuVm::start_migratable`).
//!
//! `linux_bench HOSTD QEMU BZIMAGE INITRAMFS RUNS HOPS` prints `RESULT <who> boot_ms=..`
//! and `RESULT <who> downtime_ms=..` lines (medians) for hostd, qemu and qemu_tls.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hostd::console::Console;
use hostd::vmm::{BootProtocol, BootSpec, Vm, VmSpec};

use common::{QemuVm, free_port, hosts, median, migrate_hop, time_to_marker_within};

const VCPUS: u32 = 2;
const MIB: u64 = 256;
/// The init prints this first, then powers off (`bench=boot`) or ticks (`bench=tick`).
const MARKER: &[u8] = b"BENCH-INIT";
const BOOT_CMDLINE: &str = "console=ttyS0 panic=-1 quiet bench=boot";
const TICK_CMDLINE: &str = "console=ttyS0 panic=-1 quiet bench=tick";

struct Guest {
    kernel: PathBuf,
    initrd: PathBuf,
}

fn hostd_boot(hostd: &Path, g: &Guest) -> Command {
    let mut c = Command::new(hostd);
    c.args(["--log", "error", "run", "--kernel"])
        .arg(&g.kernel)
        .arg("--initrd")
        .arg(&g.initrd)
        .args(["--vcpus", &VCPUS.to_string()])
        .args(["--memory-mib", &MIB.to_string(), "--cmdline", BOOT_CMDLINE]);
    c
}

/// QEMU's microvm with the guest; the caller adds the console and, for a destination,
/// `-incoming`.
fn qemu(qemu: &Path, g: &Guest, cmdline: &str) -> Command {
    qemu_on(qemu, g, cmdline, "microvm")
}

/// The same on machine type `machine` (with its options).
fn qemu_on(qemu: &Path, g: &Guest, cmdline: &str, machine: &str) -> Command {
    let mut c = Command::new(qemu);
    c.args(["-M", machine, "-enable-kvm", "-cpu", "host", "-smp"])
        .arg(VCPUS.to_string())
        .arg("-m")
        .arg(MIB.to_string())
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        .arg("-no-reboot")
        .arg("-kernel")
        .arg(&g.kernel)
        .arg("-initrd")
        .arg(&g.initrd)
        .arg("-append")
        .arg(cmdline)
        .stdin(Stdio::null());
    c
}

/// A boot may stall in the emulated host (QEMU's emulated SVM, either VMM): how long one
/// may take, and how many tries a run gets.
const BOOT_LIMIT: Duration = Duration::from_secs(180);
const BOOT_TRIES: usize = 3;

/// Milliseconds to the init's first line, trying again after a stall (reported).
fn boot_once(who: &str, run: usize, cmd: impl Fn() -> Command) -> f64 {
    for attempt in 1..=BOOT_TRIES {
        match time_to_marker_within(MARKER, cmd(), BOOT_LIMIT) {
            Some((ms, _)) => return ms,
            None => eprintln!(
                "boot {run}: {who} printed no init line within {BOOT_LIMIT:?} (try {attempt})"
            ),
        }
    }
    panic!("{who} did not boot in {BOOT_TRIES} tries");
}

/// Boots each VMM `runs` times, taking turns. QEMU twice: as the issue names it
/// (`-M microvm`, which has no RTC unless asked: Linux then spends ~4 s finding the CMOS
/// clock broken, as `printk.time=1` shows), and with `rtc=on`, which shows how much of
/// the difference that wait is.
fn boots(hostd: &Path, qemu_bin: &Path, g: &Guest, runs: usize) {
    let (mut ours, mut theirs, mut rtc) = (Vec::new(), Vec::new(), Vec::new());
    let qemu_boot = |machine: &'static str| {
        move || {
            let mut q = qemu_on(qemu_bin, g, BOOT_CMDLINE, machine);
            q.args(["-serial", "stdio"]);
            q
        }
    };
    for run in 0..runs {
        let h = boot_once("hostd", run, || hostd_boot(hostd, g));
        let m = boot_once("qemu", run, qemu_boot("microvm"));
        let r = boot_once("qemu rtc=on", run, qemu_boot("microvm,rtc=on"));
        eprintln!("boot {run}: hostd {h:.0} ms, qemu {m:.0} ms, qemu with rtc=on {r:.0} ms");
        ours.push(h);
        theirs.push(m);
        rtc.push(r);
    }
    println!("RESULT hostd boot_ms={:.1}", median(ours));
    println!("RESULT qemu boot_ms={:.1}", median(theirs));
    println!("RESULT qemu_rtc boot_ms={:.1}", median(rtc));
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn ticks(text: &str) -> usize {
    text.matches("BENCH-TICK ").count()
}

/// Waits until `text()` shows `n` ticks.
fn wait_ticks(who: &str, n: usize, text: impl Fn() -> String) {
    let deadline = Instant::now() + Duration::from_secs(180);
    while ticks(&text()) < n {
        assert!(
            Instant::now() < deadline,
            "{who}: the guest stopped ticking: {}",
            text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn linux_spec(g: &Guest) -> VmSpec {
    VmSpec {
        vcpus: VCPUS,
        memory_bytes: MIB << 20,
        boot: BootSpec {
            kernel: g.kernel.clone(),
            initrd: Some(g.initrd.clone()),
            cmdline: TICK_CMDLINE.into(),
            protocol: BootProtocol::Auto,
        },
        disks: vec![],
        nets: vec![],
        cpuid_mask: vec![],
    }
}

fn hostd_hops(g: &Guest, hops: usize) {
    let tls = hosts();
    let console = Console::new(4 << 20, None).unwrap();
    let mut vm = Vm::new(&linux_spec(g), console.clone()).unwrap();
    vm.start().unwrap();
    wait_ticks("hostd", 3, || console.text());
    let mut downtimes = Vec::new();
    let mut current = (vm, console);
    for hop in 0..hops {
        let (sent, vm, console) = migrate_hop(
            &current.0,
            &tls,
            hop,
            linux_spec(g),
            Duration::from_secs(300),
        );
        let downtime = sent.downtime.as_secs_f64() * 1000.0;
        eprintln!(
            "hostd hop {hop}: downtime {downtime:.1} ms (pause {:.1}, last delta {:.1} for {} KiB, {} pages as deltas, {} unchanged, restore {:.1}, resume {:.1}), total {:.0} ms, rounds {} of {:?} KiB, {} KiB",
            ms(sent.switchover.pause),
            ms(sent.switchover.last_delta),
            sent.switchover.last_delta_bytes >> 10,
            sent.switchover.last_delta_pages,
            sent.switchover.last_same_pages,
            ms(sent.switchover.restore),
            ms(sent.switchover.resume),
            ms(sent.total),
            sent.rounds,
            sent.switchover
                .round_bytes
                .iter()
                .map(|b| b >> 10)
                .collect::<Vec<_>>(),
            sent.bytes_sent >> 10
        );
        downtimes.push(downtime);
        // The guest goes on where it was on its new host before it moves again.
        wait_ticks("hostd", 3, || console.text());
        current = (vm, console);
    }
    current.0.stop();
    println!("RESULT hostd downtime_ms={:.1}", median(downtimes));
}

/// QEMU's hops, in clear or (with `tls`, its credential directory) over TLS.
fn qemu_hops(qemu_bin: &Path, g: &Guest, hops: usize, tls: Option<&Path>) {
    let who = if tls.is_some() { "qemu_tls" } else { "qemu" };
    let dir = tempfile::tempdir().unwrap();
    let start = |n, incoming| {
        QemuVm::start_migratable(
            qemu(qemu_bin, g, TICK_CMDLINE),
            dir.path(),
            n,
            incoming,
            tls,
        )
    };
    let mut current = start(0, None);
    wait_ticks(who, 3, || current.serial_text());
    let mut downtimes = Vec::new();
    for hop in 0..hops {
        let port = free_port();
        let dest = start(hop + 1, Some(port));
        let (downtime, total) = current.migrate(port, tls.is_some());
        eprintln!("{who} hop {hop}: downtime {downtime} ms, total {total} ms");
        downtimes.push(downtime);
        current.quit();
        wait_ticks(who, 3, || dest.serial_text());
        current = dest;
    }
    current.quit();
    println!("RESULT {who} downtime_ms={:.1}", median(downtimes));
}

fn main() {
    // One line, so the emulated host's console watcher sees the whole reason at once.
    std::panic::set_hook(Box::new(|info| {
        eprintln!("BENCH-PANIC {}", info.to_string().replace('\n', " "));
    }));
    let a: Vec<String> = std::env::args().skip(1).collect();
    let [hostd, qemu_bin, kernel, initrd, runs, hops] = &a[..] else {
        eprintln!("usage: linux_bench HOSTD QEMU BZIMAGE INITRAMFS RUNS HOPS");
        std::process::exit(2);
    };
    let g = Guest {
        kernel: kernel.into(),
        initrd: initrd.into(),
    };
    let (runs, hops) = (runs.parse().unwrap(), hops.parse().unwrap());
    boots(Path::new(hostd), Path::new(qemu_bin), &g, runs);
    hostd_hops(&g, hops);
    qemu_hops(Path::new(qemu_bin), &g, hops, None);
    if let Some(tls) = std::env::var_os("QEMU_TLS_DIR") {
        qemu_hops(Path::new(qemu_bin), &g, hops, Some(Path::new(&tls)));
    }
}
