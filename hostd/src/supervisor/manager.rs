//! The daemon's side: the table of VMs this host knows, one process per running VM, and
//! the lifecycle operations the gRPC service calls.
//!
//! Each running VM is a `hostd vmm` process with its directory under
//! `<run_dir>/vms/<id>/` (its record, control socket, console log and own log). The
//! daemon talks to it over the control socket, keeps the console history for streams,
//! and notices when the process ends, however it ends. VM processes do not depend on the
//! daemon: when `hostd` restarts it finds them again through their directories.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prost::Message;
use proto::host::{
    DiskConfig, MigrationPhase, MigrationProgress, PowerState, StopReason, Vm as VmProto, VmConfig,
    VmMetrics,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::{oneshot, watch};

use super::child::{CONSOLE_LOG, CONTROL_SOCKET, RECORD_FILE, VMM_LOG};
use super::frame;
use super::protocol::{
    Command, Empty, Event, IncomingRecord, MigrateSend, Polite, Reply, VmRecord, VmState, command,
    event,
};
use super::spec::{self, SpecError};
use crate::console::{Console, ConsoleOut, DEFAULT_BUFFER_BYTES};

/// How long a new VM process may take to open its control socket and boot.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a command to a VM process may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// Shutdown waits this much past the guest's own timeout for the process to end.
const STOP_GRACE: Duration = Duration::from_secs(10);
const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
pub struct ManagerConfig {
    /// Where VM directories live.
    pub run_dir: PathBuf,
    /// The program VM processes run: `hostd-vmm` (with no `vmm_args`), or `hostd` with
    /// `vmm_args = ["vmm"]`. Either is then given `--dir <vm dir>`.
    pub vmm_binary: PathBuf,
    pub vmm_args: Vec<String>,
    /// Memory kept back for the host itself.
    pub reserved_memory_bytes: u64,
    /// VM processes die with the daemon (for tests); otherwise they outlive it and the
    /// next daemon finds them again.
    pub tie_vms_to_daemon: bool,
    /// The iSCSI name VM processes log in to targets with (empty: no iSCSI disks).
    pub initiator_iqn: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    #[error("no VM {0}")]
    NotFound(String),
    #[error("VM {id} already exists")]
    AlreadyExists { id: String },
    #[error("VM id {0:?} must be 1 to 64 characters of [A-Za-z0-9._-]")]
    BadId(String),
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("VM {id} is {state:?}; {what} needs it {need}")]
    WrongState {
        id: String,
        state: PowerState,
        what: &'static str,
        need: &'static str,
    },
    #[error("VM {id} needs {need} bytes of memory; this host can give {available}")]
    NoMemory {
        id: String,
        need: u64,
        available: u64,
    },
    #[error("disk {disk:?} is {what} VM {id}")]
    Disk {
        id: String,
        disk: String,
        what: &'static str,
    },
    #[error("cannot prepare {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the VM process for {id}")]
    Spawn {
        id: String,
        #[source]
        source: std::io::Error,
    },
    #[error("VM {id} did not start: {detail}")]
    StartFailed { id: String, detail: String },
    #[error("VM {id}: {detail}")]
    Command { id: String, detail: String },
    #[error("VM {id}'s process is not answering ({what})")]
    Unresponsive { id: String, what: String },
}

/// What the daemon knows of one VM.
struct Record {
    config: VmConfig,
    state: VmState,
    pid: u32,
}

struct Conn {
    writer: OwnedWriteHalf,
    next_id: u64,
}

struct Entry {
    id: String,
    record: Mutex<Record>,
    console: Arc<Console>,
    conn: tokio::sync::Mutex<Option<Conn>>,
    pending: Arc<Mutex<HashMap<u64, oneshot::Sender<Reply>>>>,
    /// Bumped on every state change, for waiters.
    changed: watch::Sender<u64>,
    /// Serialises lifecycle operations on this VM.
    op: tokio::sync::Mutex<()>,
    /// The VM process, when this daemon started it.
    child: Mutex<Option<tokio::process::Child>>,
    /// The latest progress of this VM's outgoing migration, if it ever had one.
    migration: watch::Sender<Option<MigrationProgress>>,
}

/// Whether a migration in this phase is over.
pub fn migration_ended(p: &MigrationProgress) -> bool {
    matches!(
        MigrationPhase::try_from(p.phase),
        Ok(MigrationPhase::Completed | MigrationPhase::Failed | MigrationPhase::Cancelled)
    )
}

pub struct Manager {
    cfg: ManagerConfig,
    vms: tokio::sync::Mutex<BTreeMap<String, Arc<Entry>>>,
}

fn power(state: &VmState) -> PowerState {
    PowerState::try_from(state.power).unwrap_or(PowerState::Unspecified)
}

fn is_live(p: PowerState) -> bool {
    matches!(
        p,
        PowerState::Running | PowerState::Paused | PowerState::Migrating
    )
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && id != "."
        && id != ".."
}

impl Entry {
    fn new(id: String, config: VmConfig, state: VmState) -> Arc<Self> {
        let ring = match config.console_buffer_bytes {
            0 => DEFAULT_BUFFER_BYTES,
            n => n as usize,
        };
        Arc::new(Self {
            id,
            record: Mutex::new(Record {
                config,
                state,
                pid: 0,
            }),
            console: Console::new(ring, None).expect("a console without a log cannot fail"),
            conn: tokio::sync::Mutex::new(None),
            pending: Arc::new(Mutex::new(HashMap::new())),
            changed: watch::channel(0).0,
            op: tokio::sync::Mutex::new(()),
            child: Mutex::new(None),
            migration: watch::channel(None).0,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Record> {
        self.record.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn power(&self) -> PowerState {
        power(&self.lock().state)
    }

    fn set_state(&self, state: VmState) {
        {
            let mut r = self.lock();
            r.pid = if state.last { 0 } else { state.pid };
            r.state = state;
        }
        self.changed.send_modify(|n| *n += 1);
    }

    fn to_proto(&self) -> VmProto {
        let r = self.lock();
        VmProto {
            id: self.id.clone(),
            config: Some(r.config.clone()),
            power_state: r.state.power,
            last_stop_reason: r.state.last_stop,
            last_stop_detail: r.state.detail.clone(),
            started_at: (r.state.started_at_unix_ms > 0).then(|| proto::prost_types::Timestamp {
                seconds: (r.state.started_at_unix_ms / 1000) as i64,
                nanos: ((r.state.started_at_unix_ms % 1000) * 1_000_000) as i32,
            }),
            vmm_pid: r.pid,
            migration_id: self
                .migration
                .borrow()
                .as_ref()
                .filter(|p| !migration_ended(p))
                .map(|p| p.migration_id.clone())
                .unwrap_or_default(),
        }
    }

    /// Sends a command and waits for its reply.
    async fn command(&self, op: command::Op) -> Result<Reply, ManagerError> {
        let (tx, rx) = oneshot::channel();
        {
            let mut conn = self.conn.lock().await;
            let Some(c) = conn.as_mut() else {
                return Err(ManagerError::Unresponsive {
                    id: self.id.clone(),
                    what: "no control connection".into(),
                });
            };
            c.next_id += 1;
            let id = c.next_id;
            self.pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(id, tx);
            let bytes = frame::encode(&Command { id, op: Some(op) });
            if let Err(e) = c.writer.write_all(&bytes).await {
                self.pending
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
                return Err(ManagerError::Unresponsive {
                    id: self.id.clone(),
                    what: e.to_string(),
                });
            }
        }
        let reply = tokio::time::timeout(COMMAND_TIMEOUT, rx)
            .await
            .map_err(|_| ManagerError::Unresponsive {
                id: self.id.clone(),
                what: format!("no reply in {COMMAND_TIMEOUT:?}"),
            })?
            .map_err(|_| ManagerError::Unresponsive {
                id: self.id.clone(),
                what: "the VM process exited".into(),
            })?;
        if let Some(s) = reply.state.clone() {
            self.set_state(s);
        }
        if reply.error.is_empty() {
            Ok(reply)
        } else {
            Err(ManagerError::Command {
                id: self.id.clone(),
                detail: reply.error,
            })
        }
    }

    /// Waits until `done` holds for the state, or the timeout passes.
    async fn wait_until(&self, timeout: Duration, done: impl Fn(&VmState) -> bool) -> bool {
        let mut rx = self.changed.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if done(&self.lock().state) {
                return true;
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                return done(&self.lock().state);
            }
        }
    }
}

fn vmm_log_tail(dir: &Path) -> String {
    let text = std::fs::read_to_string(dir.join(VMM_LOG)).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(5).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
}

impl Manager {
    /// A manager over `cfg.run_dir`; VM processes left by an earlier daemon are found
    /// again (their directories name them) and the stale directories of dead ones removed.
    pub async fn new(cfg: ManagerConfig) -> Result<Arc<Self>, ManagerError> {
        let vms_dir = cfg.run_dir.join("vms");
        std::fs::create_dir_all(&vms_dir).map_err(|source| ManagerError::Io {
            path: vms_dir.clone(),
            source,
        })?;
        let mgr = Arc::new(Self {
            cfg,
            vms: tokio::sync::Mutex::new(BTreeMap::new()),
        });
        mgr.reattach().await;
        Ok(mgr)
    }

    fn vm_dir(&self, id: &str) -> PathBuf {
        self.cfg.run_dir.join("vms").join(id)
    }

    async fn reattach(self: &Arc<Self>) {
        let Ok(dirs) = std::fs::read_dir(self.cfg.run_dir.join("vms")) else {
            return;
        };
        for dir in dirs.filter_map(|d| d.ok().map(|d| d.path())) {
            let Ok(record) = super::child::read_record(&dir) else {
                continue;
            };
            let sock = dir.join(CONTROL_SOCKET);
            match UnixStream::connect(&sock).await {
                Ok(stream) => {
                    let entry = Entry::new(
                        record.id.clone(),
                        record.config.unwrap_or_default(),
                        VmState::default(),
                    );
                    self.attach(&entry, stream).await;
                    match entry.command(command::Op::Status(Empty {})).await {
                        Ok(_) => {
                            tracing::info!(vm = %entry.id, "found a running VM again");
                            self.vms.lock().await.insert(entry.id.clone(), entry);
                        }
                        Err(e) => {
                            tracing::warn!(vm = %record.id, error = %e, "VM process found but not answering")
                        }
                    }
                }
                Err(_) => {
                    tracing::info!(dir = %dir.display(), "removing the directory of a VM that is gone");
                    let _ = std::fs::remove_dir_all(&dir);
                }
            }
        }
    }

    async fn get(&self, id: &str) -> Result<Arc<Entry>, ManagerError> {
        self.vms
            .lock()
            .await
            .get(id)
            .cloned()
            .ok_or_else(|| ManagerError::NotFound(id.to_owned()))
    }

    pub async fn create(
        self: &Arc<Self>,
        id: String,
        config: VmConfig,
        start: bool,
    ) -> Result<VmProto, ManagerError> {
        let id = if id.is_empty() {
            uuid::Uuid::new_v4().to_string()
        } else {
            id
        };
        if !valid_id(&id) {
            return Err(ManagerError::BadId(id));
        }
        spec::validate(&config, &self.cfg.initiator_iqn)?;
        let entry = Entry::new(
            id.clone(),
            config,
            VmState {
                power: PowerState::Stopped as i32,
                last_stop: StopReason::None as i32,
                ..Default::default()
            },
        );
        {
            let mut vms = self.vms.lock().await;
            if vms.contains_key(&id) {
                return Err(ManagerError::AlreadyExists { id });
            }
            vms.insert(id.clone(), entry.clone());
        }
        if start && let Err(e) = self.start(&id).await {
            // A create that cannot start leaves nothing behind.
            self.vms.lock().await.remove(&id);
            let _ = std::fs::remove_dir_all(self.vm_dir(&id));
            return Err(e);
        }
        Ok(entry.to_proto())
    }

    fn memory_in_use(vms: &BTreeMap<String, Arc<Entry>>, except: &str) -> u64 {
        vms.values()
            .filter(|e| e.id != except && is_live(e.power()))
            .map(|e| e.lock().config.memory_bytes)
            .sum()
    }

    /// Memory VMs may still be given.
    pub async fn memory_available(&self) -> u64 {
        let vms = self.vms.lock().await;
        let total = crate::host::meminfo().total_bytes;
        total
            .saturating_sub(self.cfg.reserved_memory_bytes)
            .saturating_sub(Self::memory_in_use(&vms, ""))
    }

    pub async fn start(self: &Arc<Self>, id: &str) -> Result<VmProto, ManagerError> {
        let entry = self.get(id).await?;
        let _op = entry.op.lock().await;
        let state = entry.power();
        if is_live(state) {
            return Err(ManagerError::WrongState {
                id: id.into(),
                state,
                what: "start",
                need: "stopped",
            });
        }
        let config = entry.lock().config.clone();
        spec::validate(&config, &self.cfg.initiator_iqn)?;
        {
            let vms = self.vms.lock().await;
            let total = crate::host::meminfo().total_bytes;
            let available = total
                .saturating_sub(self.cfg.reserved_memory_bytes)
                .saturating_sub(Self::memory_in_use(&vms, id));
            if config.memory_bytes > available {
                return Err(ManagerError::NoMemory {
                    id: id.into(),
                    need: config.memory_bytes,
                    available,
                });
            }
        }
        let dir = self.vm_dir(id);
        self.spawn(&entry, &dir, config, None).await?;
        Ok(entry.to_proto())
    }

    async fn spawn(
        self: &Arc<Self>,
        entry: &Arc<Entry>,
        dir: &Path,
        config: VmConfig,
        incoming: Option<IncomingRecord>,
    ) -> Result<(), ManagerError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| ManagerError::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let record = VmRecord {
            id: entry.id.clone(),
            config: Some(config),
            initiator_iqn: self.cfg.initiator_iqn.clone(),
            incoming,
        };
        // The record holds CHAP secrets and a migration's token: readable by us only.
        {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let path = dir.join(RECORD_FILE);
            let _ = std::fs::remove_file(&path);
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .and_then(|mut f| f.write_all(&record.encode_to_vec()))
                .map_err(io(&path))?;
        }
        let sock = dir.join(CONTROL_SOCKET);
        let _ = std::fs::remove_file(&sock);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(VMM_LOG))
            .map_err(io(dir))?;
        let mut cmd = tokio::process::Command::new(&self.cfg.vmm_binary);
        cmd.args(&self.cfg.vmm_args)
            .arg("--dir")
            .arg(dir)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .process_group(0)
            .kill_on_drop(false);
        if self.cfg.tie_vms_to_daemon {
            // SAFETY: the closure runs in the forked child before exec and only makes
            // one async-signal-safe system call.
            unsafe {
                cmd.pre_exec(|| {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        }
        let mut child = cmd.spawn().map_err(|source| ManagerError::Spawn {
            id: entry.id.clone(),
            source,
        })?;
        let pid = child.id().unwrap_or(0);
        entry.lock().pid = pid;
        let started = Instant::now();
        let stream = loop {
            match UnixStream::connect(&sock).await {
                Ok(s) => break s,
                Err(_) if started.elapsed() < START_TIMEOUT => {
                    if let Ok(Some(status)) = child.try_wait() {
                        entry.lock().pid = 0;
                        return Err(ManagerError::StartFailed {
                            id: entry.id.clone(),
                            detail: format!(
                                "the VM process exited ({status}): {}",
                                vmm_log_tail(dir)
                            ),
                        });
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                Err(e) => {
                    let _ = child.start_kill();
                    let _ = child.wait().await;
                    entry.lock().pid = 0;
                    return Err(ManagerError::StartFailed {
                        id: entry.id.clone(),
                        detail: format!("no control socket after {START_TIMEOUT:?}: {e}"),
                    });
                }
            }
        };
        *entry.child.lock().unwrap_or_else(|p| p.into_inner()) = Some(child);
        // The first state the process sends says whether the VM booted.
        let seen = *entry.changed.borrow();
        self.attach(entry, stream).await;
        let mut rx = entry.changed.subscribe();
        let booted = tokio::time::timeout(START_TIMEOUT, async {
            loop {
                if *rx.borrow_and_update() != seen {
                    let s = entry.lock().state.clone();
                    let listening =
                        power(&s) == PowerState::Migrating && !s.migration_address.is_empty();
                    if s.last || power(&s) == PowerState::Running || listening {
                        return s;
                    }
                }
                if rx.changed().await.is_err() {
                    return entry.lock().state.clone();
                }
            }
        })
        .await;
        match booted {
            Ok(s) if !s.last => Ok(()),
            Ok(s) => Err(ManagerError::StartFailed {
                id: entry.id.clone(),
                detail: s.detail,
            }),
            Err(_) => {
                self.kill(entry).await;
                Err(ManagerError::StartFailed {
                    id: entry.id.clone(),
                    detail: format!("the VM did not boot within {START_TIMEOUT:?}"),
                })
            }
        }
    }

    /// Reads the VM process's events until its connection closes, then records how the
    /// process ended.
    async fn attach(self: &Arc<Self>, entry: &Arc<Entry>, stream: UnixStream) {
        let (mut reader, writer) = stream.into_split();
        *entry.conn.lock().await = Some(Conn { writer, next_id: 0 });
        let entry = entry.clone();
        let dir = self.vm_dir(&entry.id);
        tokio::spawn(async move {
            let mut buf = Vec::new();
            let mut chunk = vec![0u8; 64 * 1024];
            let mut final_seen = false;
            'read: loop {
                let n = match reader.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                buf.extend_from_slice(&chunk[..n]);
                loop {
                    match frame::decode::<Event>(&mut buf) {
                        Ok(Some(ev)) => match ev.kind {
                            Some(event::Kind::Console(data)) => entry.console.write(&data),
                            Some(event::Kind::Migration(p)) => {
                                entry.migration.send_replace(Some(p));
                            }
                            Some(event::Kind::State(s)) => {
                                final_seen |= s.last;
                                entry.set_state(s);
                            }
                            Some(event::Kind::Reply(r)) => {
                                let waiter = entry
                                    .pending
                                    .lock()
                                    .unwrap_or_else(|p| p.into_inner())
                                    .remove(&r.id);
                                if let Some(w) = waiter {
                                    let _ = w.send(r);
                                }
                            }
                            None => {}
                        },
                        Ok(None) => break,
                        Err(e) => {
                            tracing::warn!(vm = %entry.id, error = %e, "bad frame from a VM process");
                            break 'read;
                        }
                    }
                }
            }
            *entry.conn.lock().await = None;
            entry.migration.send_if_modified(|m| match m {
                Some(p) if !migration_ended(p) => {
                    p.phase = MigrationPhase::Failed as i32;
                    p.error = "the VM process ended during the migration".into();
                    true
                }
                _ => false,
            });
            entry
                .pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clear();
            // Reap the process and say how it ended if it did not say so itself.
            let child = entry.child.lock().unwrap_or_else(|p| p.into_inner()).take();
            let status = match child {
                Some(mut c) => tokio::time::timeout(Duration::from_secs(10), c.wait())
                    .await
                    .ok()
                    .and_then(Result::ok),
                None => None,
            };
            if !final_seen {
                let how = match status {
                    Some(s) => format!("the VM process ended unexpectedly ({s})"),
                    None => "the VM process's control connection closed".into(),
                };
                let tail = vmm_log_tail(&dir);
                let detail = if tail.is_empty() {
                    how
                } else {
                    format!("{how}; its log: {tail}")
                };
                tracing::warn!(vm = %entry.id, %detail, "VM process lost");
                let mut s = entry.lock().state.clone();
                s.power = PowerState::Crashed as i32;
                s.last_stop = StopReason::VmmError as i32;
                s.detail = detail;
                s.last = true;
                entry.set_state(s);
            }
            entry.lock().pid = 0;
        });
    }

    async fn kill(&self, entry: &Entry) {
        let pid = entry.lock().pid;
        if pid != 0 {
            // SAFETY: plain kill(2) of the VM process this daemon started or found.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
        entry
            .wait_until(STOP_GRACE, |s| s.last || !is_live(power(s)))
            .await;
    }

    fn require(
        entry: &Entry,
        what: &'static str,
        need: &'static str,
        ok: impl Fn(PowerState) -> bool,
    ) -> Result<(), ManagerError> {
        let state = entry.power();
        if ok(state) {
            Ok(())
        } else {
            Err(ManagerError::WrongState {
                id: entry.id.clone(),
                state,
                what,
                need,
            })
        }
    }

    pub async fn pause(&self, id: &str) -> Result<VmProto, ManagerError> {
        let entry = self.get(id).await?;
        let _op = entry.op.lock().await;
        Self::require(&entry, "pause", "running", |s| s == PowerState::Running)?;
        entry.command(command::Op::Pause(Empty {})).await?;
        Ok(entry.to_proto())
    }

    pub async fn resume(&self, id: &str) -> Result<VmProto, ManagerError> {
        let entry = self.get(id).await?;
        let _op = entry.op.lock().await;
        Self::require(&entry, "resume", "paused", |s| s == PowerState::Paused)?;
        entry.command(command::Op::Resume(Empty {})).await?;
        Ok(entry.to_proto())
    }

    pub async fn reboot(&self, id: &str, force: bool) -> Result<VmProto, ManagerError> {
        let entry = self.get(id).await?;
        let _op = entry.op.lock().await;
        Self::require(&entry, "reboot", "running or paused", |s| {
            matches!(s, PowerState::Running | PowerState::Paused)
        })?;
        let boots = entry.lock().state.boots;
        entry
            .command(command::Op::Reboot(Polite {
                force,
                timeout_ms: DEFAULT_SHUTDOWN_TIMEOUT.as_millis() as u32,
            }))
            .await?;
        if force {
            entry
                .wait_until(STOP_GRACE, |s| {
                    s.last || (s.boots > boots && power(s) == PowerState::Running)
                })
                .await;
        }
        Ok(entry.to_proto())
    }

    pub async fn shutdown(
        &self,
        id: &str,
        force: bool,
        timeout: Duration,
    ) -> Result<VmProto, ManagerError> {
        let entry = self.get(id).await?;
        let _op = entry.op.lock().await;
        if !is_live(entry.power()) {
            return Ok(entry.to_proto());
        }
        let timeout = if timeout.is_zero() {
            DEFAULT_SHUTDOWN_TIMEOUT
        } else {
            timeout
        };
        let op = if force {
            command::Op::Stop(Empty {})
        } else {
            command::Op::Shutdown(Polite {
                force: false,
                timeout_ms: timeout.as_millis().min(u128::from(u32::MAX)) as u32,
            })
        };
        if let Err(e) = entry.command(op).await {
            tracing::warn!(vm = %id, error = %e, "stop request not answered; killing the VM process");
            self.kill(&entry).await;
        }
        let wait = if force {
            STOP_GRACE
        } else {
            timeout + STOP_GRACE
        };
        if !entry.wait_until(wait, |s| s.last).await {
            self.kill(&entry).await;
        }
        Ok(entry.to_proto())
    }

    pub async fn destroy(&self, id: &str) -> Result<(), ManagerError> {
        let entry = self.get(id).await?;
        {
            let _op = entry.op.lock().await;
            if is_live(entry.power()) {
                let _ = entry.command(command::Op::Stop(Empty {})).await;
                if !entry.wait_until(STOP_GRACE, |s| s.last).await {
                    self.kill(&entry).await;
                }
            }
        }
        self.vms.lock().await.remove(id);
        let dir = self.vm_dir(id);
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .map_err(|source| ManagerError::Io { path: dir, source })?;
        }
        Ok(())
    }

    pub async fn get_vm(&self, id: &str) -> Result<VmProto, ManagerError> {
        Ok(self.get(id).await?.to_proto())
    }

    /// VMs in id order, `page_size` at a time (0: all), after `page_token` (an id).
    pub async fn list(&self, page_size: usize, page_token: &str) -> (Vec<VmProto>, String) {
        let vms = self.vms.lock().await;
        // Ids are never empty, so an empty token excludes nothing.
        let mut out: Vec<VmProto> = vms
            .range::<str, _>((
                std::ops::Bound::Excluded(page_token),
                std::ops::Bound::Unbounded,
            ))
            .map(|(_, e)| e.to_proto())
            .collect();
        if page_size > 0 && out.len() > page_size {
            out.truncate(page_size);
            let next = out.last().map(|v| v.id.clone()).unwrap_or_default();
            return (out, next);
        }
        (out, String::new())
    }

    pub async fn metrics(&self, id: &str) -> Result<VmMetrics, ManagerError> {
        let entry = self.get(id).await?;
        if !is_live(entry.power()) {
            return Ok(VmMetrics {
                vm_id: id.into(),
                at: Some(super::child::prost_types_now()),
                ..Default::default()
            });
        }
        let reply = entry.command(command::Op::Metrics(Empty {})).await?;
        Ok(reply.metrics.unwrap_or_default())
    }

    /// Metrics of every running VM.
    pub async fn all_metrics(&self) -> Vec<VmMetrics> {
        let entries: Vec<Arc<Entry>> = self.vms.lock().await.values().cloned().collect();
        let mut out = Vec::new();
        for e in entries.iter().filter(|e| is_live(e.power())) {
            if let Ok(r) = e.command(command::Op::Metrics(Empty {})).await
                && let Some(m) = r.metrics
            {
                out.push(m);
            }
        }
        out
    }

    /// (VMs running, vCPUs and memory assigned to them).
    pub async fn usage(&self) -> (u32, u32, u64) {
        let vms = self.vms.lock().await;
        vms.values()
            .filter(|e| is_live(e.power()))
            .fold((0, 0, 0), |(n, c, m), e| {
                let r = e.lock();
                (n + 1, c + r.config.vcpus, m + r.config.memory_bytes)
            })
    }

    pub async fn console(&self, id: &str) -> Result<Arc<Console>, ManagerError> {
        Ok(self.get(id).await?.console.clone())
    }

    pub async fn console_input(&self, id: &str, data: Vec<u8>) -> Result<(), ManagerError> {
        let entry = self.get(id).await?;
        Self::require(&entry, "console input", "running", is_live)?;
        entry
            .command(command::Op::ConsoleInput(data))
            .await
            .map(|_| ())
    }

    /// Attaches a disk to a stopped VM: disks are announced to the guest at boot, so a
    /// running VM gets new disks on its next start, not live.
    pub async fn attach_disk(&self, id: &str, disk: DiskConfig) -> Result<VmProto, ManagerError> {
        let entry = self.get(id).await?;
        let _op = entry.op.lock().await;
        Self::require(
            &entry,
            "attaching a disk",
            "stopped (disks are announced at boot)",
            |s| !is_live(s),
        )?;
        spec::validate_disk(&disk, &self.cfg.initiator_iqn)?;
        let mut config = entry.lock().config.clone();
        if config.disks.iter().any(|d| d.id == disk.id) {
            return Err(ManagerError::Disk {
                id: id.into(),
                disk: disk.id,
                what: "already attached to",
            });
        }
        config.disks.push(disk);
        spec::validate(&config, &self.cfg.initiator_iqn)?;
        entry.lock().config = config;
        Ok(entry.to_proto())
    }

    pub async fn detach_disk(&self, id: &str, disk_id: &str) -> Result<VmProto, ManagerError> {
        let entry = self.get(id).await?;
        let _op = entry.op.lock().await;
        Self::require(
            &entry,
            "detaching a disk",
            "stopped (disks are announced at boot)",
            |s| !is_live(s),
        )?;
        let mut r = entry.lock();
        let before = r.config.disks.len();
        r.config.disks.retain(|d| d.id != disk_id);
        if r.config.disks.len() == before {
            return Err(ManagerError::Disk {
                id: id.into(),
                disk: disk_id.into(),
                what: "not attached to",
            });
        }
        drop(r);
        Ok(entry.to_proto())
    }

    /// Prepares to receive VM `id` by live migration: starts its process, which opens
    /// the disks (logging in to iSCSI volumes) and listens on `listen_ip` for the source
    /// presenting `token`. Returns the listener's host:port. A stopped VM of the same id
    /// (a failed earlier attempt) is replaced; a live one is refused.
    pub async fn prepare_incoming(
        self: &Arc<Self>,
        id: &str,
        config: VmConfig,
        token: &str,
        listen_ip: &str,
    ) -> Result<String, ManagerError> {
        if !valid_id(id) {
            return Err(ManagerError::BadId(id.into()));
        }
        spec::validate(&config, &self.cfg.initiator_iqn)?;
        let entry = Entry::new(
            id.to_owned(),
            config.clone(),
            VmState {
                power: PowerState::Migrating as i32,
                last_stop: StopReason::None as i32,
                ..Default::default()
            },
        );
        {
            let mut vms = self.vms.lock().await;
            if let Some(old) = vms.get(id) {
                let state = old.power();
                if is_live(state) {
                    return Err(ManagerError::WrongState {
                        id: id.into(),
                        state,
                        what: "receiving it by migration",
                        need: "absent or stopped here",
                    });
                }
            }
            let total = crate::host::meminfo().total_bytes;
            let available = total
                .saturating_sub(self.cfg.reserved_memory_bytes)
                .saturating_sub(Self::memory_in_use(&vms, id));
            if config.memory_bytes > available {
                return Err(ManagerError::NoMemory {
                    id: id.into(),
                    need: config.memory_bytes,
                    available,
                });
            }
            vms.insert(id.to_owned(), entry.clone());
        }
        let dir = self.vm_dir(id);
        let _ = std::fs::remove_dir_all(&dir);
        let incoming = IncomingRecord {
            token: token.to_owned(),
            listen_ip: listen_ip.to_owned(),
            wait_seconds: 0,
        };
        let _op = entry.op.lock().await;
        match self.spawn(&entry, &dir, config, Some(incoming)).await {
            Ok(()) => {
                let s = entry.lock().state.clone();
                if s.last {
                    return Err(ManagerError::StartFailed {
                        id: id.into(),
                        detail: s.detail,
                    });
                }
                Ok(s.migration_address)
            }
            Err(e) => {
                self.vms.lock().await.remove(id);
                let _ = std::fs::remove_dir_all(&dir);
                Err(e)
            }
        }
    }

    /// Starts sending VM `id` to another host; progress arrives on the returned
    /// receiver until a phase that ends it.
    pub async fn migrate_send(
        &self,
        id: &str,
        m: MigrateSend,
    ) -> Result<watch::Receiver<Option<MigrationProgress>>, ManagerError> {
        let entry = self.get(id).await?;
        let _op = entry.op.lock().await;
        Self::require(&entry, "live migration", "running", |s| {
            s == PowerState::Running
        })?;
        if let Some(p) = entry.migration.borrow().as_ref()
            && !migration_ended(p)
        {
            return Err(ManagerError::Command {
                id: id.into(),
                detail: format!("migration {} is under way", p.migration_id),
            });
        }
        entry.migration.send_replace(Some(MigrationProgress {
            migration_id: m.migration_id.clone(),
            vm_id: id.into(),
            phase: MigrationPhase::Preparing as i32,
            memory_total_bytes: entry.lock().config.memory_bytes,
            ..Default::default()
        }));
        let rx = entry.migration.subscribe();
        if let Err(e) = entry.command(command::Op::MigrateSend(m)).await {
            entry.migration.send_modify(|p| {
                if let Some(p) = p {
                    p.phase = MigrationPhase::Failed as i32;
                    p.error = crate::error_chain(&e);
                }
            });
            return Err(e);
        }
        Ok(rx)
    }

    /// The latest progress of VM `id`'s migration.
    pub async fn migration(&self, id: &str) -> Result<Option<MigrationProgress>, ManagerError> {
        Ok(self.get(id).await?.migration.borrow().clone())
    }

    /// Asks VM `id`'s process to cancel its migration (it answers at once; the outcome
    /// comes as progress: Cancelled, or Completed if the switchover was already
    /// committed).
    pub async fn cancel_migration(&self, id: &str) -> Result<(), ManagerError> {
        let entry = self.get(id).await?;
        entry
            .command(command::Op::CancelMigration(Empty {}))
            .await
            .map(|_| ())
    }

    /// Forgets VM `id` once its process has ended after migrating away (its directory
    /// goes too: the VM lives on another host now).
    pub async fn forget_migrated(&self, id: &str) {
        let Ok(entry) = self.get(id).await else {
            return;
        };
        let gone = entry
            .wait_until(STOP_GRACE, |s| {
                s.last && s.last_stop == StopReason::MigratedAway as i32
            })
            .await;
        if gone {
            let mut vms = self.vms.lock().await;
            if vms.get(id).is_some_and(|e| Arc::ptr_eq(e, &entry)) {
                vms.remove(id);
                let _ = std::fs::remove_dir_all(self.vm_dir(id));
            }
        }
    }

    /// Stops every VM this daemon runs (for a daemon told to take its VMs with it).
    pub async fn stop_all(&self) {
        let ids: Vec<String> = self.vms.lock().await.keys().cloned().collect();
        for id in ids {
            let _ = self.shutdown(&id, true, Duration::ZERO).await;
        }
    }

    /// The console log file of a VM (everything it printed, across reboots).
    pub fn console_log_path(&self, id: &str) -> PathBuf {
        self.vm_dir(id).join(CONSOLE_LOG)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_safe_as_directory_names() {
        assert!(valid_id("vm-1.a_b"));
        assert!(valid_id(&uuid::Uuid::new_v4().to_string()));
        for bad in ["", ".", "..", "a/b", "a b", &"x".repeat(65)] {
            assert!(!valid_id(bad), "{bad:?}");
        }
    }
}
