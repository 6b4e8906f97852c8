//! A whole pool for the end-to-end tests: three coordinator members, `storaged` and some
//! hosts, with helpers to drive it through `poolctl` and to watch its guests.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use proto::coordinator::pool_service_client::PoolServiceClient;
use proto::host as hpb;
use proto::host::host_service_client::HostServiceClient;

use crate::{Coordinators, Hostd, PoolArg, Storaged, binary, poolctl, poolctl_ok, text, wait_for};

/// A running pool and where its parts are.
pub struct Pool {
    pub coordinators: Coordinators,
    pub storaged: Storaged,
    pub hosts: Vec<Hostd>,
    pub p: PoolArg,
    /// Sent by `ctl`, `vm` and `wait_vm` once the pool has users.
    pub token: Option<String>,
}

impl Pool {
    pub fn start(dir: &Path, hosts: usize) -> Pool {
        let coordinators = Coordinators::start(dir, 3);
        let p = coordinators.pool_arg();
        wait_leader(&p);
        let storaged = Storaged::start(&dir.join("storaged"), &p);
        let hosts = (0..hosts)
            .map(|i| {
                Hostd::start(
                    dir,
                    &format!("h{}", i + 1),
                    &format!("127.0.0.{}", 11 + i),
                    &p,
                )
            })
            .collect();
        Pool {
            coordinators,
            storaged,
            hosts,
            p,
            token: None,
        }
    }

    /// The pool as the admin once logged in (`token`), else as `p` is.
    fn client(&self) -> PoolArg {
        match &self.token {
            Some(t) => self.p.as_token(t),
            None => self.p.clone(),
        }
    }

    /// Makes storage repository `name` on a sparse file of `size` in `dir`; sr-create's output.
    pub fn create_sr(&self, dir: &Path, name: &str, size: &str) -> String {
        let img = dir.join(format!("{name}.img")).display().to_string();
        self.ctl(&[
            "sr-create",
            name,
            &self.storaged.addr,
            "--file",
            &img,
            "--size",
            size,
        ])
    }

    pub fn ctl(&self, args: &[&str]) -> String {
        poolctl_ok(&self.client(), args)
    }

    /// Waits until every host of ours has joined and is enabled; returns `host-list --json`.
    pub fn wait_hosts_enabled(&self) -> String {
        let n = self.hosts.len();
        wait_for(Duration::from_secs(30), || {
            let o = poolctl(&self.client(), &["host-list", "--json"]);
            let s = String::from_utf8_lossy(&o.stdout).into_owned();
            (s.matches("\"state\": \"enabled\"").count() == n).then_some(s)
        })
        .unwrap_or_else(|| panic!("{n} hosts joined\n{}", self.logs()))
    }

    /// The logs of every daemon, for a failing assertion.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for h in &self.hosts {
            out += &format!("--- {} ---\n{}\n", h.name, tail(&h.daemon.log_text()));
        }
        out += &format!(
            "--- storaged ---\n{}\n",
            tail(&self.storaged.daemon.log_text())
        );
        for i in 1..=3 {
            let log = std::fs::read_to_string(self.coordinators.dir.join(format!("poold-{i}.log")))
                .unwrap_or_default();
            out += &format!("--- poold-{i} ---\n{}\n", tail(&log));
        }
        out
    }

    /// The JSON line of the VM named `name` in `vm-list --json`.
    pub fn vm(&self, name: &str) -> Option<String> {
        let o = poolctl(&self.client(), &["vm-list", "--json"]);
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .find(|l| l.contains(&format!("\"name\": \"{name}\"")))
            .map(str::to_owned)
    }

    /// Waits until the VM's line in `vm-list --json` contains `want`.
    pub fn wait_vm(&self, name: &str, want: &str, limit: Duration) -> String {
        wait_for(limit, || self.vm(name).filter(|l| l.contains(want))).unwrap_or_else(|| {
            panic!(
                "VM {name} not {want} within {limit:?}: {:?}\n{}",
                self.vm(name),
                self.logs()
            )
        })
    }

    /// The bytes of volume `vdi`, read by `poolctl vdi-export` into `dir` (as
    /// `<vdi>.exported.raw`, a name no image a test imports has).
    pub fn disk_bytes(&self, dir: &Path, vdi: &str) -> Vec<u8> {
        let file = dir.join(format!("{vdi}.exported.raw"));
        let _ = std::fs::remove_file(&file);
        self.ctl(&["vdi-export", vdi, &file.display().to_string()]);
        std::fs::read(&file).unwrap()
    }

    /// A poolctl call that must fail; its output, which must say `why`.
    pub fn refused(&self, args: &[&str], why: &str) -> String {
        let o = poolctl(&self.client(), args);
        let out = text(&o);
        assert!(!o.status.success(), "{args:?} was refused: {out}");
        assert!(out.contains(why), "{args:?}: the error says {why:?}: {out}");
        out
    }

    /// The value of row `key` of `vm-show VM --json`.
    /// Which of our hosts (its index in `hosts`) the pool knows as `host_id`.
    pub fn host_index(&self, host_id: &str) -> usize {
        let hosts = self.ctl(&["host-list", "--json"]);
        let line = hosts
            .lines()
            .find(|l| l.contains(&format!("\"id\": \"{host_id}\"")))
            .unwrap_or_else(|| panic!("host {host_id} listed: {hosts}"));
        let addr = field(line, "address");
        self.hosts
            .iter()
            .position(|h| h.addr == addr)
            .unwrap_or_else(|| panic!("host {host_id} at {addr} is one of ours"))
    }

    pub fn shown(&self, vm: &str, key: &str) -> String {
        let out = self.ctl(&["vm-show", vm, "--json"]);
        let line = out
            .lines()
            .find(|l| l.contains(&format!("\"field\": \"{key}\"")))
            .unwrap_or_else(|| panic!("vm-show lists {key}: {out}"));
        field(line, "value")
    }
}

/// The heartbeat numbers (`HB seq=N`) of the whole lines in `seen`, in order.
pub fn heartbeat_seqs(seen: &str) -> Vec<u64> {
    seen.lines()
        .filter(|l| seen.contains(&format!("{l}\n")))
        .filter_map(|l| l.strip_prefix("HB seq="))
        .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
        .collect()
}

/// `PoolService` over gRPC as the holder of `PoolArg::token`, for answers poolctl does
/// not show as they are (a status code, every field of a message) and calls it has no
/// verb for (OpenVolumeAccess alone).
pub struct Api {
    rt: tokio::runtime::Runtime,
    channel: tonic::transport::Channel,
    token: String,
}

impl Api {
    /// Connected to the first member that takes the connection.
    pub fn connect(pool: &PoolArg) -> Api {
        let bundle = pool_trust::CaBundle::load(&pool.bundle()).expect("the pool's CA bundle");
        let tls = pool_trust::tls::client_tls(&bundle, None, None)
            .expect("TLS")
            .domain_name(pool_trust::coordinators_name(bundle.pool_id()));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let channel = rt
            .block_on(async {
                let mut last = String::new();
                for member in pool.addrs.split(',') {
                    let endpoint =
                        tonic::transport::Endpoint::from_shared(format!("https://{member}"))
                            .and_then(|e| e.tls_config(tls.clone()))
                            .map_err(|e| e.to_string())?;
                    match endpoint.connect().await {
                        Ok(c) => return Ok(c),
                        Err(e) => last = format!("{member}: {e}"),
                    }
                }
                Err(last)
            })
            .unwrap_or_else(|e| panic!("no member of {} answers: {e}", pool.addrs));
        Api {
            rt,
            channel,
            token: pool.token.clone().unwrap_or_default(),
        }
    }

    /// One call: `f` sends `request` (with the token) through the client it is given,
    /// e.g. `|mut c, r| async move { c.get_vm(r).await }`.
    pub fn call<T, R, F, Fut>(&self, request: T, f: F) -> Result<R, tonic::Status>
    where
        F: FnOnce(PoolServiceClient<tonic::transport::Channel>, tonic::Request<T>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<R>, tonic::Status>>,
    {
        let mut request = tonic::Request::new(request);
        if !self.token.is_empty() {
            let bearer = format!("Bearer {}", self.token).parse().expect("a token");
            request.metadata_mut().insert("authorization", bearer);
        }
        let client = PoolServiceClient::new(self.channel.clone());
        self.rt
            .block_on(f(client, request))
            .map(tonic::Response::into_inner)
    }
}

/// Waits until the pool's members have elected a leader (30 s at most).
pub fn wait_leader(p: &PoolArg) {
    wait_for(Duration::from_secs(30), || {
        let o = poolctl(p, &["member-list", "--json"]);
        (o.status.success() && String::from_utf8_lossy(&o.stdout).contains("\"leader\": true"))
            .then_some(())
    })
    .expect("a leader within 30 s");
}

pub fn tail(s: &str) -> &str {
    let cut = s.len().saturating_sub(6000);
    let cut = (cut..s.len())
        .find(|i| s.is_char_boundary(*i))
        .unwrap_or(s.len());
    &s[cut..]
}

/// The value of `"key": "value"` in a JSON line.
pub fn field(line: &str, key: &str) -> String {
    let pat = format!("\"{key}\": \"");
    let start = line
        .find(&pat)
        .map(|i| i + pat.len())
        .unwrap_or_else(|| panic!("no {key} in {line}"));
    line[start..]
        .split('"')
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// Streams the VM's console through `poolctl vm-console` until a line starting with
/// `prefix` shows, and returns that line.
pub fn console_line(p: &PoolArg, vm: &str, prefix: &str, limit: Duration) -> Option<String> {
    console_until(p, None, vm, limit, |seen| {
        seen.lines()
            .find(|l| l.starts_with(prefix) && seen.contains(&format!("{l}\n")))
            .map(str::to_owned)
    })
}

/// The first whole line starting with `prefix` that comes after a line containing
/// `after` (say, the `GUEST start` line of one boot, whose command line is unique).
pub fn line_after(seen: &str, after: &str, prefix: &str) -> Option<String> {
    let from = seen.find(after)?;
    let rest = &seen[from..];
    rest.lines()
        .skip(1)
        .find(|l| l.starts_with(prefix) && rest.contains(&format!("{l}\n")))
        .map(str::to_owned)
}

/// Streams the VM's console (as the token's user, if given) until `found` returns
/// something for the text seen so far, or `limit` passes.
pub fn console_until(
    p: &PoolArg,
    token: Option<&str>,
    vm: &str,
    limit: Duration,
    mut found: impl FnMut(&str) -> Option<String>,
) -> Option<String> {
    let p = match token {
        Some(t) => p.as_token(t),
        None => p.clone(),
    };
    let mut child = p
        .poolctl()
        .args(["vm-console", vm])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run poolctl vm-console");
    let mut out = child.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                return;
            }
        }
    });
    let start = Instant::now();
    let mut seen = String::new();
    let result = loop {
        if let Some(r) = found(&seen) {
            break Some(r);
        }
        let left = limit.saturating_sub(start.elapsed());
        if left.is_zero() {
            break None;
        }
        match rx.recv_timeout(left.min(Duration::from_millis(200))) {
            Ok(b) => seen.push_str(&String::from_utf8_lossy(&b)),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(_) => break None,
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    if result.is_none() {
        // Why the console ended, when poolctl said (a VM on no host, say).
        let mut why = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = e.read_to_string(&mut why);
        }
        eprintln!(
            "console of {vm} did not show what was awaited:\n{}{}",
            tail(&seen),
            why.trim_end()
        );
    }
    result
}

/// `poolctl vm-create` arguments for a 64 MiB VM `name` that boots the test guest
/// (`kernel`) with `cmdline` from `disk`; `extra` follows (`--ha restart`, `--start`).
pub fn guest_vm<'a>(
    name: &'a str,
    disk: &'a str,
    kernel: &'a str,
    cmdline: &'a str,
    extra: &[&'a str],
) -> Vec<&'a str> {
    let mut args = vec![
        "vm-create",
        name,
        "--disk",
        disk,
        "--kernel",
        kernel,
        "--cmdline",
        cmdline,
        "--memory",
        "64M",
    ];
    args.extend_from_slice(extra);
    args
}

/// The test guest, written where every host reads it (the hosts share this machine).
pub fn guest_elf(dir: &Path) -> String {
    let path = dir.join("guest.elf");
    let o = Command::new(binary("hostd"))
        .args(["guest-elf", "--out"])
        .arg(&path)
        .output()
        .expect("run hostd guest-elf");
    assert!(o.status.success(), "{}", text(&o));
    path.display().to_string()
}

/// Whether `initiator` may open the LUN of `target` (an `iscsi capacity` through the
/// portal): a fenced host's name must be refused, a granted one must not.
pub fn can_open(portal: &str, target: &str, initiator: &str, chap: Option<&Chap>) -> bool {
    let auth = chap
        .map(|c| format!("{}%{}@", c.user, c.secret))
        .unwrap_or_default();
    let o = Command::new(binary("iscsi"))
        .args([
            "--initiator",
            initiator,
            "--replacement-timeout",
            "2",
            "capacity",
        ])
        .arg(format!("iscsi://{auth}{portal}/{target}/0"))
        .output()
        .expect("run iscsi capacity");
    o.status.success()
}

/// A CHAP user and secret.
#[derive(Clone, Debug)]
pub struct Chap {
    pub user: String,
    pub secret: String,
}

/// The CHAP credentials a host logs in to its VM's first disk with, as the pool handed
/// them to it: read with `HostService.GetVm` as a coordinator member (nobody else may).
pub fn disk_chap(pool: &PoolArg, host_addr: &str, vm_id: &str) -> Chap {
    let dir = pool.tls_dir(pool_trust::Identity::Member(99), &[]);
    let tls = pool_trust::DaemonTls::load(&dir).expect("the probe's TLS directory");
    let ip = host_addr.split(':').next().unwrap_or_default().to_owned();
    let config = pool_trust::tls::client_tls(&tls.bundle, Some(&tls.creds), None)
        .expect("TLS")
        .domain_name(ip);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let vm = rt
        .block_on(async {
            let ch = tonic::transport::Endpoint::from_shared(format!("https://{host_addr}"))?
                .tls_config(config)?
                .connect()
                .await?;
            let vm = HostServiceClient::new(ch)
                .get_vm(hpb::VmRequest {
                    vm_id: vm_id.to_owned(),
                })
                .await
                .map_err(|s| format!("GetVm: {s}"))?;
            Ok::<_, Box<dyn std::error::Error>>(vm.into_inner())
        })
        .unwrap_or_else(|e| panic!("reading VM {vm_id} on {host_addr}: {e}"));
    let disk = vm.config.and_then(|c| c.disks.into_iter().next());
    match disk.and_then(|d| d.backend) {
        Some(hpb::disk_config::Backend::Iscsi(i)) => Chap {
            user: i.chap_username,
            secret: i.chap_secret,
        },
        other => panic!("VM {vm_id}'s first disk is not iSCSI: {other:?}"),
    }
}

/// The targets a portal shows to `initiator` (SendTargets).
pub fn targets(portal: &str, initiator: &str) -> Vec<String> {
    let o = Command::new(binary("iscsi"))
        .args(["--initiator", initiator, "discover", portal])
        .output()
        .expect("run iscsi discover");
    String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .filter(|w| w.starts_with("iqn."))
        .map(str::to_owned)
        .collect()
}

/// Processes whose command line mentions `needle` (e.g. a host's run directory).
pub fn processes_with(needle: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline"))
            && String::from_utf8_lossy(&cmd).contains(needle)
        {
            out.push(pid);
        }
    }
    out
}

pub fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill {sig} {pid}");
}
