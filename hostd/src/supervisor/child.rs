//! The VM process: `hostd vmm --dir <vm dir>`. It runs one VM (rebuilding it on every
//! reboot), serves the control socket in the VM's directory, writes the console log, and
//! exits when the VM stops for good, its last state sent.
//!
//! Threads: the runner (this module's loop, which owns the [`Vm`]), one accepting and
//! reading control connections, one forwarding console output, one waiting for each
//! boot's exit, and the VM's own vCPU and device threads.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prost::Message;
use proto::host::{
    DiskMetrics, MigrationPhase, MigrationProgress, PowerState, StopReason, VmMetrics,
};

use super::frame;
use super::protocol::{
    Command, Event, IncomingRecord, MigrateSend, Reply, VmRecord, VmState, command, event,
};
use super::spec;
use crate::console::Console;
use crate::migration::{self, Incoming, MigrationError, SendOptions};
use crate::vmm::{Vm, VmExit, VmSpec};

pub const RECORD_FILE: &str = "vm.pb";
pub const CONTROL_SOCKET: &str = "control.sock";
pub const CONSOLE_LOG: &str = "console.log";
pub const VMM_LOG: &str = "vmm.log";

/// How long a paused vCPU may take to stop.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(10);
/// History the VM process keeps itself (the daemon keeps the long one).
const CHILD_CONSOLE_RING: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum ChildError {
    #[error("cannot read the VM record {path}")]
    Record {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the VM record {path} does not decode")]
    RecordDecode {
        path: PathBuf,
        #[source]
        source: prost::DecodeError,
    },
    #[error("cannot listen on {path}")]
    Listen {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Console(#[from] crate::console::ConsoleError),
    #[error("the VM could not start: {0}")]
    Boot(String),
}

pub fn read_record(dir: &Path) -> Result<VmRecord, ChildError> {
    let path = dir.join(RECORD_FILE);
    let bytes = std::fs::read(&path).map_err(|source| ChildError::Record {
        path: path.clone(),
        source,
    })?;
    VmRecord::decode(bytes.as_slice()).map_err(|source| ChildError::RecordDecode { path, source })
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The control connection the daemon holds now, if any; every event goes through it.
/// The newest connection wins: a restarted daemon takes over from one that is gone. The
/// last state published is kept and sent to each new connection first, so a daemon that
/// connects after the VM booted still learns it did.
#[derive(Clone, Default)]
struct Outbox(Arc<Mutex<OutboxInner>>);

#[derive(Default)]
struct OutboxInner {
    generation: u64,
    stream: Option<UnixStream>,
    state: Option<VmState>,
}

impl OutboxInner {
    fn write(&mut self, e: &Event) {
        let bytes = frame::encode(e);
        if let Some(s) = self.stream.as_mut()
            && s.write_all(&bytes).is_err()
        {
            // The daemon went away; the next one connects and gets the state again.
            self.stream = None;
        }
    }
}

impl Outbox {
    fn lock(&self) -> std::sync::MutexGuard<'_, OutboxInner> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn send(&self, e: &Event) {
        self.lock().write(e);
    }

    fn publish(&self, state: VmState) {
        let mut inner = self.lock();
        inner.write(&Event {
            kind: Some(event::Kind::State(state.clone())),
        });
        inner.state = Some(state);
    }

    /// Makes `stream` the connection events go to, sends it the current state, and
    /// returns its generation.
    fn replace(&self, stream: UnixStream) -> u64 {
        let mut inner = self.lock();
        inner.generation += 1;
        inner.stream = Some(stream);
        if let Some(state) = inner.state.clone() {
            inner.write(&Event {
                kind: Some(event::Kind::State(state)),
            });
        }
        inner.generation
    }

    /// Forgets the connection of `generation` if it is still the current one.
    fn forget(&self, generation: u64) {
        let mut inner = self.lock();
        if inner.generation == generation {
            inner.stream = None;
        }
    }
}

enum Msg {
    Cmd(Command),
    Exited(VmExit),
}

/// How a migration the runner started ended.
enum MigrateEnd {
    /// The VM runs on the destination.
    Moved,
    /// It runs here still.
    StayedHere,
    /// It stopped meanwhile (the guest stopped, or a stop was asked: then true).
    Exited(VmExit, bool),
}

/// Runs the VM process; returns when the VM has stopped for good.
pub fn run(dir: &Path) -> Result<(), ChildError> {
    let record = read_record(dir)?;
    let config = record.config.clone().unwrap_or_default();
    let sock_path = dir.join(CONTROL_SOCKET);
    let _ = std::fs::remove_file(&sock_path);
    let listener = UnixListener::bind(&sock_path).map_err(|source| ChildError::Listen {
        path: sock_path.clone(),
        source,
    })?;
    let console = Console::new(CHILD_CONSOLE_RING, Some(&dir.join(CONSOLE_LOG)))?;
    let outbox = Outbox::default();
    let (tx, rx) = mpsc::channel::<Msg>();
    let mut runner = Runner {
        id: record.id.clone(),
        state: VmState {
            power: PowerState::Stopped as i32,
            last_stop: StopReason::None as i32,
            pid: std::process::id(),
            ..Default::default()
        },
        outbox: outbox.clone(),
        console: console.clone(),
        tx: tx.clone(),
    };

    {
        let outbox = outbox.clone();
        let tx = tx.clone();
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || accept_loop(listener, outbox, tx))
            .expect("spawning the control thread");
    }
    {
        let outbox = outbox.clone();
        let console = console.clone();
        std::thread::Builder::new()
            .name("console".into())
            .spawn(move || forward_console(&console, &outbox))
            .expect("spawning the console thread");
    }

    // Disks are opened (iSCSI sessions logged in) here, before the VM boots or, for an
    // incoming migration, before the source is told to switch over.
    let spec = match spec::to_spec(&config, &record.initiator_iqn) {
        Ok(s) => s,
        Err(e) => return Err(runner.fail_to_start(crate::error_chain(&e))),
    };
    let first = match &record.incoming {
        Some(inc) => match runner.receive(&spec, inc, &rx) {
            Some(vm) => Some(vm),
            None => {
                console.flush();
                let _ = std::fs::remove_file(&sock_path);
                return Ok(());
            }
        },
        None => None,
    };
    let result = runner.run(&spec, &rx, first);
    console.flush();
    let _ = std::fs::remove_file(&sock_path);
    result
}

fn accept_loop(listener: UnixListener, outbox: Outbox, tx: mpsc::Sender<Msg>) {
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let Ok(writer) = conn.try_clone() else {
            continue;
        };
        let generation = outbox.replace(writer);
        let (outbox, tx) = (outbox.clone(), tx.clone());
        let spawned = std::thread::Builder::new()
            .name("control-conn".into())
            .spawn(move || {
                read_commands(conn, &tx);
                outbox.forget(generation);
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot serve a control connection");
        }
    }
}

/// Passes a connection's commands to the runner until it closes.
fn read_commands(mut conn: UnixStream, tx: &mpsc::Sender<Msg>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = match conn.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        loop {
            match frame::decode::<Command>(&mut buf) {
                Ok(Some(cmd)) => {
                    if tx.send(Msg::Cmd(cmd)).is_err() {
                        return;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "bad control frame; dropping the connection");
                    let _ = conn.shutdown(std::net::Shutdown::Both);
                    return;
                }
            }
        }
    }
}

fn forward_console(console: &Console, outbox: &Outbox) {
    let mut live = console.subscribe().live;
    loop {
        let mut data = match live.blocking_recv() {
            Ok(chunk) => chunk.to_vec(),
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                format!("\r\n[hostd: {n} console chunks lost]\r\n").into_bytes()
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        };
        // Batch what else is already there into one frame.
        while data.len() < 64 * 1024 {
            match live.try_recv() {
                Ok(more) => data.extend_from_slice(&more),
                Err(_) => break,
            }
        }
        outbox.send(&Event {
            kind: Some(event::Kind::Console(data)),
        });
    }
}

/// What the owner asked for that is still under way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Intent {
    Reboot,
    Stop {
        forced: bool,
    },
    /// The VM now runs on another host.
    MigratedAway,
}

struct Runner {
    id: String,
    state: VmState,
    outbox: Outbox,
    console: Arc<Console>,
    tx: mpsc::Sender<Msg>,
}

impl Runner {
    fn publish(&self) {
        self.outbox.publish(self.state.clone());
    }

    fn reply(&self, id: u64, error: String, metrics: Option<VmMetrics>) {
        self.outbox.send(&Event {
            kind: Some(event::Kind::Reply(Reply {
                id,
                error,
                state: Some(self.state.clone()),
                metrics,
            })),
        });
    }

    fn finish(&mut self, power: PowerState, reason: StopReason, detail: String) {
        self.state.power = power as i32;
        self.state.last_stop = reason as i32;
        self.state.detail = detail;
        self.state.last = true;
        self.publish();
    }

    fn fail_to_start(&mut self, detail: String) -> ChildError {
        tracing::error!(%detail, "VM cannot start");
        self.finish(PowerState::Crashed, StopReason::VmmError, detail.clone());
        ChildError::Boot(detail)
    }

    fn run(
        &mut self,
        spec: &VmSpec,
        rx: &mpsc::Receiver<Msg>,
        mut first: Option<Vm>,
    ) -> Result<(), ChildError> {
        loop {
            let built = match first.take() {
                Some(vm) => Ok(vm),
                None => Vm::new(spec, self.console.clone()).and_then(|mut vm| {
                    vm.start()?;
                    Ok(vm)
                }),
            };
            let mut vm = match built {
                Ok(vm) => vm,
                Err(e) => return Err(self.fail_to_start(crate::error_chain(&e))),
            };
            self.state.boots += 1;
            self.state.power = PowerState::Running as i32;
            self.state.started_at_unix_ms = unix_ms();
            self.publish();
            tracing::info!(boots = self.state.boots, "VM running");
            let ctl = vm.run_control();
            let tx = self.tx.clone();
            std::thread::Builder::new()
                .name("exit-wait".into())
                .spawn(move || {
                    if let Some(exit) = ctl.wait_exit(None) {
                        let _ = tx.send(Msg::Exited(exit));
                    }
                })
                .expect("spawning the exit waiter");

            let (exit, intent) = self.serve(&mut vm, rx);
            drop(vm);
            tracing::info!(%exit, ?intent, "VM stopped");
            match (intent, &exit) {
                (Some(Intent::MigratedAway), _) => {
                    let detail = std::mem::take(&mut self.state.detail);
                    self.finish(PowerState::Stopped, StopReason::MigratedAway, detail)
                }
                (Some(Intent::Reboot), _) | (None, VmExit::Reset) => {
                    self.state.last_stop = if intent.is_some() {
                        StopReason::Forced as i32
                    } else {
                        StopReason::GuestReset as i32
                    };
                    self.state.detail = exit.to_string();
                    continue;
                }
                (Some(Intent::Stop { forced: true }), VmExit::Stopped) => self.finish(
                    PowerState::Stopped,
                    StopReason::Forced,
                    "stopped by request".into(),
                ),
                (_, VmExit::Poweroff { .. }) | (Some(Intent::Stop { .. }), VmExit::Reset) => self
                    .finish(
                        PowerState::Stopped,
                        StopReason::GuestPoweroff,
                        exit.to_string(),
                    ),
                (_, VmExit::TripleFault { .. }) => self.finish(
                    PowerState::Crashed,
                    StopReason::TripleFault,
                    exit.to_string(),
                ),
                (_, VmExit::Stopped) => {
                    // The polite request timed out and the VM was forced.
                    self.finish(PowerState::Stopped, StopReason::Forced, exit.to_string())
                }
                (_, VmExit::Crash { .. }) => {
                    self.finish(PowerState::Crashed, StopReason::VmmError, exit.to_string())
                }
            }
            return Ok(());
        }
    }

    /// Serves commands until this boot's VM stops; says how and what was asked.
    fn serve(&mut self, vm: &mut Vm, rx: &mpsc::Receiver<Msg>) -> (VmExit, Option<Intent>) {
        let mut intent: Option<Intent> = None;
        let mut deadline: Option<Instant> = None;
        loop {
            let msg = match deadline {
                Some(d) => match rx.recv_timeout(d.saturating_duration_since(Instant::now())) {
                    Ok(m) => m,
                    Err(RecvTimeoutError::Timeout) => {
                        tracing::info!("the guest did not act on the request in time; forcing");
                        deadline = None;
                        vm.stop();
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => {
                        vm.stop();
                        return (VmExit::Stopped, intent);
                    }
                },
                None => match rx.recv() {
                    Ok(m) => m,
                    Err(_) => {
                        vm.stop();
                        return (VmExit::Stopped, intent);
                    }
                },
            };
            let cmd = match msg {
                Msg::Exited(exit) => return (exit, intent),
                Msg::Cmd(cmd) => cmd,
            };
            let id = cmd.id;
            let mut metrics = None;
            let result: Result<(), String> = match cmd.op {
                Some(command::Op::Pause(_)) => vm
                    .pause(PAUSE_TIMEOUT)
                    .map_err(|e| e.to_string())
                    .map(|()| {
                        self.state.power = PowerState::Paused as i32;
                        self.publish();
                    }),
                Some(command::Op::Resume(_)) => vm.resume().map_err(|e| e.to_string()).map(|()| {
                    self.state.power = PowerState::Running as i32;
                    self.publish();
                }),
                Some(command::Op::Reboot(p)) | Some(command::Op::Shutdown(p))
                    if intent.is_some() && !p.force =>
                {
                    Err(format!("a {intent:?} is already under way; use force"))
                }
                Some(command::Op::Reboot(p)) => {
                    intent = Some(Intent::Reboot);
                    self.polite(vm, &p, &mut deadline);
                    Ok(())
                }
                Some(command::Op::Shutdown(p)) => {
                    intent = Some(Intent::Stop { forced: p.force });
                    self.polite(vm, &p, &mut deadline);
                    Ok(())
                }
                Some(command::Op::Stop(_)) => {
                    intent = Some(Intent::Stop { forced: true });
                    let _ = vm.resume();
                    vm.stop();
                    Ok(())
                }
                Some(command::Op::Status(_)) => Ok(()),
                Some(command::Op::Metrics(_)) => {
                    metrics = Some(self.metrics(vm));
                    Ok(())
                }
                Some(command::Op::MigrateSend(m)) if intent.is_none() && !vm.is_paused() => {
                    self.reply(id, String::new(), None);
                    match self.migrate(vm, rx, &m) {
                        MigrateEnd::Moved => {
                            return (VmExit::Stopped, Some(Intent::MigratedAway));
                        }
                        MigrateEnd::StayedHere => {}
                        MigrateEnd::Exited(exit, stop) => {
                            return (exit, stop.then_some(Intent::Stop { forced: true }));
                        }
                    }
                    continue;
                }
                Some(command::Op::MigrateSend(_)) => {
                    Err("only a running VM with no stop or reboot under way can migrate".into())
                }
                Some(command::Op::CancelMigration(_)) => Err("no migration is under way".into()),
                Some(command::Op::ConsoleInput(data)) => {
                    let n = vm.console_input(&data);
                    if n < data.len() {
                        Err(format!(
                            "console input: {} of {} bytes fit in the UART",
                            n,
                            data.len()
                        ))
                    } else {
                        Ok(())
                    }
                }
                None => Err("empty command".into()),
            };
            self.reply(id, result.err().unwrap_or_default(), metrics);
        }
    }

    /// Sends the VM to another host while serving commands. Status and metrics are
    /// answered, a stop cancels the migration first, anything else waits its turn.
    fn migrate(&mut self, vm: &Vm, rx: &mpsc::Receiver<Msg>, m: &MigrateSend) -> MigrateEnd {
        let opts = SendOptions {
            vm_id: self.id.clone(),
            token: m.token.clone(),
            destination: m.destination.clone(),
            downtime_budget: match m.downtime_budget_ms {
                0 => migration::DEFAULT_DOWNTIME,
                ms => Duration::from_millis(u64::from(ms)),
            },
            max_rounds: match m.max_rounds {
                0 => migration::DEFAULT_MAX_ROUNDS,
                n => n,
            },
            timeout: match m.timeout_seconds {
                0 => migration::DEFAULT_TIMEOUT,
                s => Duration::from_secs(u64::from(s)),
            },
            auto_converge: m.auto_converge,
            bandwidth_limit: m.bandwidth_limit_bytes_per_second,
        };
        let base = MigrationProgress {
            migration_id: m.migration_id.clone(),
            vm_id: self.id.clone(),
            ..Default::default()
        };
        let cancel = AtomicBool::new(false);
        self.state.power = PowerState::Migrating as i32;
        self.publish();
        tracing::info!(migration = %m.migration_id, to = %m.destination, "migration starting");
        let mut exited: Option<VmExit> = None;
        let mut stop_asked = false;
        let outbox = self.outbox.clone();
        let result = std::thread::scope(|scope| {
            let sender = scope.spawn(|| {
                let mut report = |p: &MigrationProgress| {
                    outbox.send(&Event {
                        kind: Some(event::Kind::Migration(p.clone())),
                    });
                };
                migration::send(vm, &opts, &cancel, base.clone(), &mut report)
            });
            while !sender.is_finished() {
                let msg = match rx.recv_timeout(Duration::from_millis(20)) {
                    Ok(m) => m,
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => {
                        cancel.store(true, Ordering::Release);
                        continue;
                    }
                };
                let cmd = match msg {
                    Msg::Exited(exit) => {
                        cancel.store(true, Ordering::Release);
                        exited = Some(exit);
                        continue;
                    }
                    Msg::Cmd(cmd) => cmd,
                };
                let (error, metrics) = match cmd.op {
                    Some(command::Op::Status(_)) => (String::new(), None),
                    Some(command::Op::Metrics(_)) => (String::new(), Some(self.metrics(vm))),
                    Some(command::Op::CancelMigration(_)) => {
                        cancel.store(true, Ordering::Release);
                        (String::new(), None)
                    }
                    Some(command::Op::Stop(_)) => {
                        cancel.store(true, Ordering::Release);
                        stop_asked = true;
                        (String::new(), None)
                    }
                    _ => (
                        "a live migration is under way; cancel it first".into(),
                        None,
                    ),
                };
                self.reply(cmd.id, error, metrics);
            }
            sender.join().unwrap_or_else(|_| {
                Err(MigrationError::Io {
                    what: "the migration thread panicked",
                    source: std::io::Error::other("panic"),
                })
            })
        });
        let mut last = base;
        last.memory_total_bytes = vm.memory_bytes();
        match result {
            Ok(sent) => {
                last.phase = MigrationPhase::Completed as i32;
                last.round = sent.rounds;
                last.bytes_sent = sent.bytes_sent;
                last.downtime_ms = sent.downtime.as_millis() as u32;
                last.total_time_ms = sent.total.as_millis() as u32;
                last.throttle_percent = sent.throttle_percent;
                if !sent.confirmed {
                    last.error = "the destination's confirmation was lost after switchover".into();
                }
                tracing::info!(downtime = ?sent.downtime, total = ?sent.total, rounds = sent.rounds, "migrated");
                self.state.detail = format!("migrated to {}", m.destination);
                self.outbox.send(&Event {
                    kind: Some(event::Kind::Migration(last)),
                });
                // The guest runs on the destination now; never here again.
                vm.stop();
                MigrateEnd::Moved
            }
            Err(e) => {
                let cancelled = matches!(e, MigrationError::Cancelled);
                last.phase = if cancelled {
                    MigrationPhase::Cancelled
                } else {
                    MigrationPhase::Failed
                } as i32;
                last.error = crate::error_chain(&e);
                tracing::warn!(error = %last.error, "migration did not complete; the VM runs here");
                // The state first, then the outcome: whoever sees the outcome and tries
                // again finds the VM running.
                let end = if let Some(exit) = exited {
                    MigrateEnd::Exited(exit, false)
                } else if stop_asked {
                    vm.stop();
                    MigrateEnd::Exited(VmExit::Stopped, true)
                } else {
                    self.state.power = PowerState::Running as i32;
                    self.publish();
                    MigrateEnd::StayedHere
                };
                self.outbox.send(&Event {
                    kind: Some(event::Kind::Migration(last)),
                });
                end
            }
        }
    }

    /// Waits for an incoming VM and receives it; `None` if it never came (the reason is
    /// published as the last state).
    fn receive(
        &mut self,
        spec: &VmSpec,
        inc: &IncomingRecord,
        rx: &mpsc::Receiver<Msg>,
    ) -> Option<Vm> {
        let ip = if inc.listen_ip.is_empty() {
            "127.0.0.1"
        } else {
            inc.listen_ip.as_str()
        };
        let listener = match std::net::TcpListener::bind((ip, 0)) {
            Ok(l) => l,
            Err(e) => {
                self.fail_to_start(format!("cannot listen for the migration on {ip}: {e}"));
                return None;
            }
        };
        let addr = match listener.local_addr() {
            Ok(a) => a,
            Err(e) => {
                self.fail_to_start(format!("migration listener: {e}"));
                return None;
            }
        };
        let wait = match inc.wait_seconds {
            0 => Duration::from_secs(600),
            s => Duration::from_secs(u64::from(s)),
        };
        self.state.power = PowerState::Migrating as i32;
        self.state.migration_address = addr.to_string();
        self.publish();
        tracing::info!(%addr, "waiting for the incoming VM");
        let incoming = Incoming {
            vm_id: self.id.clone(),
            token: inc.token.clone(),
            spec: spec.clone(),
        };
        let abort = AtomicBool::new(false);
        let console: Arc<dyn crate::console::ConsoleOut> = self.console.clone();
        let result = std::thread::scope(|scope| {
            let receiver = scope.spawn(|| {
                migration::receive(
                    &listener,
                    &incoming,
                    console,
                    &abort,
                    Instant::now() + wait,
                    &mut || {},
                )
            });
            while !receiver.is_finished() {
                let msg = match rx.recv_timeout(Duration::from_millis(20)) {
                    Ok(m) => m,
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Disconnected) => {
                        abort.store(true, Ordering::Release);
                        continue;
                    }
                };
                let Msg::Cmd(cmd) = msg else { continue };
                let error = match cmd.op {
                    Some(command::Op::Status(_)) | Some(command::Op::Metrics(_)) => String::new(),
                    Some(command::Op::Stop(_)) | Some(command::Op::Shutdown(_)) => {
                        abort.store(true, Ordering::Release);
                        String::new()
                    }
                    _ => "the VM is arriving by live migration".into(),
                };
                self.reply(cmd.id, error, None);
            }
            receiver.join().unwrap_or_else(|_| {
                Err(MigrationError::Io {
                    what: "the receiving thread panicked",
                    source: std::io::Error::other("panic"),
                })
            })
        });
        self.state.migration_address.clear();
        match result {
            Ok(vm) => {
                tracing::info!("incoming VM running");
                Some(vm)
            }
            Err(e) => {
                let detail = format!(
                    "incoming migration did not complete: {}",
                    crate::error_chain(&e)
                );
                tracing::warn!(%detail);
                let reason = if matches!(e, MigrationError::Cancelled) {
                    StopReason::Forced
                } else {
                    StopReason::VmmError
                };
                self.finish(PowerState::Stopped, reason, detail);
                None
            }
        }
    }

    /// A polite request (shutdown or reboot): at once when forced, else Ctrl-Alt-Del and a
    /// deadline after which the VM is forced.
    fn polite(&mut self, vm: &Vm, p: &super::protocol::Polite, deadline: &mut Option<Instant>) {
        if p.force {
            let _ = vm.resume();
            vm.stop();
        } else {
            if vm.is_paused() {
                let _ = vm.resume();
                self.state.power = PowerState::Running as i32;
            }
            vm.request_shutdown();
            let timeout = if p.timeout_ms == 0 {
                Duration::from_secs(60)
            } else {
                Duration::from_millis(u64::from(p.timeout_ms))
            };
            *deadline = Some(Instant::now() + timeout);
        }
    }

    fn metrics(&self, vm: &Vm) -> VmMetrics {
        VmMetrics {
            vm_id: self.id.clone(),
            at: Some(prost_types_now()),
            vcpu_time_ns: vm.vcpu_cpu_ns(),
            memory_bytes: vm.memory_bytes(),
            rss_bytes: crate::host::process_rss_bytes(std::process::id()).unwrap_or(0),
            guest_resident_bytes: vm.guest_resident_bytes(),
            disks: vm
                .disk_metrics()
                .into_iter()
                .map(|(id, m)| DiskMetrics {
                    disk_id: id,
                    read_ops: m.read_ops,
                    write_ops: m.write_ops,
                    flush_ops: m.flush_ops,
                    discard_ops: m.discard_ops + m.write_zeroes_ops,
                    read_bytes: m.read_bytes,
                    write_bytes: m.write_bytes,
                    read_latency_us: m.mean_read_latency_us,
                    write_latency_us: m.mean_write_latency_us,
                    errors: m.errors + m.invalid,
                })
                .collect(),
        }
    }
}

pub fn prost_types_now() -> proto::prost_types::Timestamp {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    proto::prost_types::Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}
