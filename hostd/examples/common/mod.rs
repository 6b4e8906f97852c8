//! What the benchmarks share: a QEMU child with its QMP connection, and medians.

#![allow(dead_code)] // each example uses part of it

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hostd::migration::StreamTls;

/// Two hosts of a pool made for the run (`host-0`, `host-1`), their credentials in memory.
pub fn hosts() -> [StreamTls; 2] {
    use pool_trust::{DaemonTls, Identity, PoolCa, PoolId, Validity};
    let now_ms = proto::unix_ms();
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

pub fn percentile(v: &[f64], p: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let i = ((s.len() as f64 - 1.0) * p).round() as usize;
    s[i.min(s.len() - 1)]
}

/// A QMP connection: one JSON object per line each way.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    pub fn connect(path: &Path) -> Qmp {
        let deadline = Instant::now() + Duration::from_secs(60);
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
            .set_read_timeout(Some(Duration::from_secs(120)))
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
    pub fn cmd(&mut self, json: &str) -> String {
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
pub fn json_u64(line: &str, key: &str) -> Option<u64> {
    let at = line.find(&format!("\"{key}\":"))? + key.len() + 3;
    let digits: String = line[at..]
        .trim_start()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// A QEMU started with a QMP socket and its serial console in a file.
pub struct QemuVm {
    pub child: Child,
    pub qmp: Qmp,
    pub serial: PathBuf,
}

impl QemuVm {
    /// Starts `cmd` (a `qemu-system-x86_64` with the machine's arguments) as VM `n` of
    /// `dir`, adding the QMP socket and the serial file.
    pub fn start(mut cmd: Command, dir: &Path, n: usize) -> QemuVm {
        let sock = dir.join(format!("q{n}.qmp"));
        let serial = dir.join(format!("q{n}.log"));
        cmd.arg("-serial")
            .arg(format!("file:{}", serial.display()))
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", sock.display()));
        let child = cmd.spawn().expect("starting qemu-system-x86_64");
        QemuVm {
            child,
            qmp: Qmp::connect(&sock),
            serial,
        }
    }

    /// A QMP command that must succeed.
    /// Starts `cmd` (a QEMU command line) with QEMU's TLS migration credentials when `tls`
    /// names a directory of them in QEMU's names (ca-cert.pem, server-cert.pem,
    /// server-key.pem, client-cert.pem, client-key.pem): a server and a client
    /// `tls-creds-x509` object, both verifying the peer, since every VM is a destination and
    /// then a source. With `incoming`, it waits for a migration on that loopback port (over
    /// TLS with the server's credentials: `-incoming defer`, then `migrate-incoming`).
    pub fn start_migratable(
        mut cmd: Command,
        dir: &Path,
        n: usize,
        incoming: Option<u16>,
        tls: Option<&Path>,
    ) -> QemuVm {
        if let Some(tls) = tls {
            for end in ["server", "client"] {
                cmd.arg("-object").arg(format!(
                    "tls-creds-x509,id=tls-{end},dir={},endpoint={end},verify-peer=on",
                    tls.display()
                ));
            }
        }
        match (incoming, tls) {
            (Some(port), None) => {
                cmd.arg("-incoming").arg(format!("tcp:127.0.0.1:{port}"));
            }
            // The TLS credentials are a migration parameter, set before it listens.
            (Some(_), Some(_)) => {
                cmd.args(["-incoming", "defer"]);
            }
            (None, _) => {}
        }
        let mut vm = QemuVm::start(cmd, dir, n);
        if let (Some(port), Some(_)) = (incoming, tls) {
            vm.qmp_ok(
                r#"{"execute":"migrate-set-parameters","arguments":{"tls-creds":"tls-server"}}"#,
            );
            vm.qmp_ok(&format!(
                r#"{{"execute":"migrate-incoming","arguments":{{"uri":"tcp:127.0.0.1:{port}"}}}}"#
            ));
        }
        vm
    }

    pub fn qmp_ok(&mut self, json: &str) {
        let answer = self.qmp.cmd(json);
        assert!(answer.contains("\"return\""), "QMP {json}: {answer}");
    }

    pub fn serial_text(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.serial).unwrap_or_default()).into_owned()
    }

    /// Migrates to `tcp:127.0.0.1:port` with the benchmarks' parameters (300 ms downtime
    /// limit like ours, no bandwidth cap); returns QEMU's downtime and total time in ms.
    pub fn migrate(&mut self, port: u16, tls: bool) -> (f64, f64) {
        self.qmp_ok(
            r#"{"execute":"migrate-set-parameters","arguments":{"downtime-limit":300,"max-bandwidth":100000000000}}"#,
        );
        if tls {
            self.qmp_ok(
                r#"{"execute":"migrate-set-parameters","arguments":{"tls-creds":"tls-client","tls-hostname":"127.0.0.1"}}"#,
            );
        }
        let answer = self.qmp.cmd(&format!(
            r#"{{"execute":"migrate","arguments":{{"uri":"tcp:127.0.0.1:{port}"}}}}"#
        ));
        assert!(answer.contains("return"), "migrate: {answer}");
        let deadline = Instant::now() + Duration::from_secs(300);
        let done = loop {
            let q = self.qmp.cmd(r#"{"execute":"query-migrate"}"#);
            // A VM that came in by migration may still report that incoming migration
            // (completed, no times) right after `migrate`: only an outgoing one has times.
            if q.contains("\"status\": \"completed\"")
                && json_u64(&q, "total-time").is_some_and(|t| t > 0)
            {
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
        (downtime, total)
    }

    pub fn quit(&mut self) {
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

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Spawns `cmd`, returns the milliseconds until `marker` appears on its stdout and the
/// milliseconds until any byte appears; then waits for it to exit (the guest powers off).
pub fn time_to_marker(marker: &[u8], cmd: Command) -> (f64, f64) {
    let limit = Duration::from_secs(600);
    time_to_marker_within(marker, cmd, limit)
        .unwrap_or_else(|| panic!("no marker within {limit:?}"))
}

/// [`time_to_marker`], the process killed once `limit` has passed since its start; `None`
/// if the marker had not come by then.
pub fn time_to_marker_within(
    marker: &[u8],
    mut cmd: Command,
    limit: Duration,
) -> Option<(f64, f64)> {
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::null())
        .stdin(Stdio::null());
    let start = Instant::now();
    let mut child = cmd.spawn().expect("spawn");
    let pid = child.id() as i32;
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    let watchdog = std::thread::spawn(move || {
        if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(limit) {
            // SAFETY: the child is not reaped before this thread is joined, so the pid is
            // still its own.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    });
    let mut out = child.stdout.take().unwrap();
    let mut seen = Vec::new();
    let (mut first, mut at) = (None, None);
    let mut buf = [0u8; 4096];
    // Until the process exits (or is killed): stdout closes.
    loop {
        let n = out.read(&mut buf).unwrap_or(0);
        if n == 0 {
            break;
        }
        first.get_or_insert_with(|| start.elapsed());
        if at.is_none() {
            seen.extend_from_slice(&buf[..n]);
            if seen.windows(marker.len()).any(|w| w == marker) {
                at = Some(start.elapsed());
            }
        }
    }
    let _ = stop.send(());
    let _ = watchdog.join();
    let _ = child.wait();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    Some((ms(at?), ms(first?)))
}

/// One live-migration hop of `vm` between this process's two hosts (`hop` even: host 0 to
/// host 1) over loopback TCP, as the VM processes do it; the destination VM is built from
/// `spec`. Returns the source's figures and the running destination with its console.
pub fn migrate_hop(
    vm: &hostd::vmm::Vm,
    tls: &[StreamTls; 2],
    n: usize,
    spec: hostd::vmm::VmSpec,
    timeout: Duration,
) -> (
    hostd::migration::Sent,
    hostd::vmm::Vm,
    std::sync::Arc<hostd::console::Console>,
) {
    migrate_hop_then(vm, tls, n, spec, timeout, |_| {})
}

/// [`migrate_hop`], calling `on_running` with the destination VM as soon as it runs
/// there, where a VM process starts its work after a switchover (announcing its MACs).
pub fn migrate_hop_then(
    vm: &hostd::vmm::Vm,
    tls: &[StreamTls; 2],
    n: usize,
    spec: hostd::vmm::VmSpec,
    timeout: Duration,
    on_running: impl FnOnce(&hostd::vmm::Vm) + Send + 'static,
) -> (
    hostd::migration::Sent,
    hostd::vmm::Vm,
    std::sync::Arc<hostd::console::Console>,
) {
    use hostd::console::Console;
    use hostd::migration::{self, Incoming, SendOptions};
    use std::sync::atomic::AtomicBool;

    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (src, dst) = (n % 2, 1 - n % 2);
    let inc = Incoming {
        vm_id: "bench".into(),
        token: "bench-token".into(),
        source_host: tls[src].host().to_owned(),
        tls: tls[dst].clone(),
        spec,
    };
    let dest = std::thread::spawn(move || {
        let console = Console::new(4 << 20, None).unwrap();
        let vm = migration::receive(
            &listener,
            &inc,
            console.clone(),
            &AtomicBool::new(false),
            Instant::now() + timeout,
            &mut || {},
        );
        if let Ok(vm) = &vm {
            on_running(vm);
        }
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
        timeout,
        auto_converge: false,
        bandwidth_limit: 0,
        stream_version: migration::wire::VERSION,
    };
    let sent = migration::send(
        vm,
        &opts,
        &AtomicBool::new(false),
        proto::host::MigrationProgress::default(),
        &mut |_| {},
    )
    .unwrap_or_else(|e| panic!("hop {n}: {}", proto::error_chain(&e)));
    vm.stop();
    let (dest_vm, console) = dest.join().unwrap();
    let dest_vm = dest_vm.unwrap_or_else(|e| panic!("hop {n}: {}", proto::error_chain(&e)));
    (sent, dest_vm, console)
}
