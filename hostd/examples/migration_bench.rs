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

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use hostd::console::Console;
use hostd::migration::{self, Incoming, SendOptions, StreamTls};
use hostd::testguest::{self, heartbeat_sum, heartbeats};
use hostd::vmm::{BootProtocol, BootSpec, Vm, VmSpec};
use proto::host::MigrationProgress;

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
        cpuid_mask: vec![],
    }
}

fn percentile(v: &[f64], p: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let i = ((s.len() as f64 - 1.0) * p).round() as usize;
    s[i.min(s.len() - 1)]
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

/// Two hosts of a pool made for the run (`host-0`, `host-1`), their credentials in memory.
fn hosts() -> [StreamTls; 2] {
    use pool_trust::{DaemonTls, Identity, PoolCa, PoolId, Validity};
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let validity = Validity::starting(now_ms, Duration::from_secs(86_400));
    let ca = PoolCa::create(PoolId::parse("bench").unwrap(), validity).unwrap();
    [0, 1].map(|i| {
        let creds = ca
            .issue(&Identity::Host(format!("host-{i}")), &[], validity)
            .unwrap();
        StreamTls::new(&DaemonTls {
            bundle: ca.bundle(),
            creds,
        })
        .unwrap()
    })
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
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (src, dst) = (hop % 2, 1 - hop % 2);
        let inc = Incoming {
            vm_id: "bench".into(),
            token: "bench-token".into(),
            source_host: tls[src].host().to_owned(),
            tls: tls[dst].clone(),
            spec: spec(cmd, vcpus, mib),
        };
        let dest = std::thread::spawn(move || {
            let console = Console::new(4 << 20, None).unwrap();
            let abort = AtomicBool::new(false);
            let vm = migration::receive(
                &listener,
                &inc,
                console.clone(),
                &abort,
                Instant::now() + Duration::from_secs(60),
                &mut || {},
            );
            (vm, console)
        });
        let opts = SendOptions {
            vm_id: "bench".into(),
            token: "bench-token".into(),
            destination: addr,
            destination_host: tls[dst].host().to_owned(),
            tls: tls[src].clone(),
            downtime_budget: migration::DEFAULT_DOWNTIME,
            max_rounds: migration::DEFAULT_MAX_ROUNDS,
            timeout: Duration::from_secs(60),
            auto_converge: false,
            bandwidth_limit: 0,
        };
        let sent = migration::send(
            &current.0,
            &opts,
            &AtomicBool::new(false),
            MigrationProgress::default(),
            &mut |_| {},
        )
        .unwrap_or_else(|e| panic!("{name} hop {hop}: {}", proto::error_chain(&e)));
        current.0.stop();
        texts.push(current.1.text());
        let (vm, console) = dest.join().unwrap();
        let vm = vm.unwrap();
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

/// A QMP connection: one JSON object per line each way.
struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    fn connect(path: &Path) -> Qmp {
        let deadline = Instant::now() + Duration::from_secs(20);
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) => {
                    assert!(Instant::now() < deadline, "QMP {}: {e}", path.display());
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let mut q = Qmp {
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
        };
        let mut greeting = String::new();
        q.reader.read_line(&mut greeting).unwrap();
        q.cmd(r#"{"execute":"qmp_capabilities"}"#);
        q
    }

    /// Sends a command; returns its answer line (events in between are skipped), or
    /// an empty line if QEMU closed the connection (it does on quit).
    fn cmd(&mut self, json: &str) -> String {
        if writeln!(self.writer, "{json}").is_err() {
            return String::new();
        }
        loop {
            let mut line = String::new();
            if self.reader.read_line(&mut line).unwrap_or(0) == 0 {
                return String::new();
            }
            if line.contains("\"return\"") || line.contains("\"error\"") {
                return line;
            }
        }
    }
}

/// The number after `"key": ` in a QMP answer.
fn json_u64(line: &str, key: &str) -> Option<u64> {
    let at = line.find(&format!("\"{key}\":"))? + key.len() + 3;
    let digits: String = line[at..]
        .trim_start()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

struct QemuVm {
    child: Child,
    qmp: Qmp,
    serial: PathBuf,
}

impl QemuVm {
    /// A QMP command that must succeed.
    fn qmp_ok(&mut self, json: &str) {
        let answer = self.qmp.cmd(json);
        assert!(answer.contains("\"return\""), "QMP {json}: {answer}");
    }

    fn quit(&mut self) {
        self.qmp.cmd(r#"{"execute":"quit"}"#);
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.child.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for QemuVm {
    /// Never leaves a QEMU behind, whatever happened.
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
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
    let sock = dir.join(format!("q{n}.qmp"));
    let serial = dir.join(format!("q{n}.log"));
    let mut c = Command::new("qemu-system-x86_64");
    c.args(["-M", "pc", "-enable-kvm", "-cpu", "qemu64", "-smp"])
        .arg(vcpus.to_string())
        .arg("-m")
        .arg(mib.to_string())
        .args(["-nodefaults", "-no-user-config", "-display", "none"])
        .arg("-serial")
        .arg(format!("file:{}", serial.display()))
        .args([
            "-no-reboot",
            "-device",
            "isa-debug-exit,iobase=0xf4,iosize=0x04",
        ])
        .arg("-kernel")
        .arg(testguest::elf_path())
        .arg("-append")
        .arg(cmd)
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", sock.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    if let Some(tls) = tls {
        // A VM is a destination, then a source: it gets both ends' credentials.
        for end in ["server", "client"] {
            c.arg("-object").arg(format!(
                "tls-creds-x509,id=tls-{end},dir={},endpoint={end},verify-peer=on",
                tls.display()
            ));
        }
    }
    match (incoming, tls) {
        (Some(port), None) => {
            c.arg("-incoming").arg(format!("tcp:127.0.0.1:{port}"));
        }
        // The TLS credentials are a migration parameter, set before it listens.
        (Some(_), Some(_)) => {
            c.args(["-incoming", "defer"]);
        }
        (None, _) => {}
    }
    let child = c.spawn().expect("starting qemu-system-x86_64");
    let mut vm = QemuVm {
        child,
        qmp: Qmp::connect(&sock),
        serial,
    };
    if let (Some(port), Some(_)) = (incoming, tls) {
        vm.qmp_ok(r#"{"execute":"migrate-set-parameters","arguments":{"tls-creds":"tls-server"}}"#);
        vm.qmp_ok(&format!(
            r#"{{"execute":"migrate-incoming","arguments":{{"uri":"tcp:127.0.0.1:{port}"}}}}"#
        ));
    }
    vm
}

fn serial_heartbeats(q: &QemuVm) -> usize {
    heartbeats(&String::from_utf8_lossy(
        &std::fs::read(&q.serial).unwrap_or_default(),
    ))
    .len()
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
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let dest = qemu_vm(dir.path(), hop + 1, cmd, size, Some(port), tls);
        current.qmp_ok(
            r#"{"execute":"migrate-set-parameters","arguments":{"downtime-limit":300,"max-bandwidth":100000000000}}"#,
        );
        if tls.is_some() {
            current.qmp_ok(
                r#"{"execute":"migrate-set-parameters","arguments":{"tls-creds":"tls-client","tls-hostname":"127.0.0.1"}}"#,
            );
        }
        let answer = current.qmp.cmd(&format!(
            r#"{{"execute":"migrate","arguments":{{"uri":"tcp:127.0.0.1:{port}"}}}}"#
        ));
        assert!(answer.contains("return"), "migrate: {answer}");
        let deadline = Instant::now() + Duration::from_secs(60);
        let done = loop {
            let q = current.qmp.cmd(r#"{"execute":"query-migrate"}"#);
            if q.contains("\"status\": \"completed\"") {
                break q;
            }
            assert!(
                !q.contains("\"status\": \"failed\"") && Instant::now() < deadline,
                "QEMU migration: {q}"
            );
            std::thread::sleep(Duration::from_millis(2));
        };
        let downtime = json_u64(&done, "downtime").expect("downtime") as f64;
        let total = json_u64(&done, "total-time").expect("total-time") as f64;
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
    run("idle", IDLE, 3, hops, vcpus, mib);
    run("dirty", DIRTY, 4, hops, vcpus, mib);
    let have_qemu = Command::new("qemu-system-x86_64")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let tls = std::env::var_os("QEMU_TLS_DIR").map(PathBuf::from);
    if have_qemu {
        let tls = tls.as_deref();
        run_qemu("idle", IDLE, hops, (vcpus, mib), tls);
        run_qemu("dirty", DIRTY, hops, (vcpus, mib), tls);
    } else {
        println!("qemu-system-x86_64 not installed: no comparison");
    }
}
