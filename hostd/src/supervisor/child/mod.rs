//! The VM process: `hostd vmm --dir <vm dir>`. It runs one VM (rebuilding it on every
//! reboot), serves the control socket in the VM's directory, writes the console log, and
//! exits when the VM stops for good, its last state sent.
//!
//! Threads: the runner (the boot loop, which owns the [`crate::vmm::Vm`]), one accepting
//! and reading control connections, one forwarding console output, one waiting for each
//! boot's exit, and the VM's own vCPU and device threads.
//!
//! # Layout
//! This file holds the entry point ([`run`]), the VM's directory and record, and the
//! `Runner`, which owns the VM; the rest by concern:
//! - `control`: the control socket, commands in and events out.
//! - `runner`: the boot loop and the commands served while the VM runs.
//! - `migrate`: sending the VM to another host, and receiving one.
//! - `save`: saving the VM into a state volume, and starting one from it.

mod control;
mod migrate;
mod runner;
mod save;

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc;

use prost::Message;
use proto::host::{PowerState, StopReason, VmMetrics};

use super::protocol::{Command, Event, Reply, VmRecord, VmState, event};
use super::spec;
use crate::console::Console;
use crate::vmm::VmExit;
use control::{Outbox, accept_loop, forward_console};

pub const RECORD_FILE: &str = "vm.pb";
pub const CONTROL_SOCKET: &str = "control.sock";
pub const CONSOLE_LOG: &str = "console.log";
pub const VMM_LOG: &str = "vmm.log";

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

/// What the runner waits for: a command from the daemon, or the VM's exit.
enum Msg {
    Cmd(Command),
    Exited(VmExit),
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
        initiator_iqn: record.initiator_iqn.clone(),
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
    let spec = match spec::to_spec(&config, &record.initiator_iqn, record.vif_busy_poll_us) {
        Ok(s) => s,
        Err(e) => return Err(runner.fail_to_start(proto::error_chain(&e))),
    };
    let arrived = match (&record.incoming, &record.restore_from) {
        (Some(inc), _) => Some(runner.receive(&spec, inc, &rx)),
        (None, Some(v)) => Some(runner.restore(&spec, v)),
        (None, None) => None,
    };
    let first = match arrived {
        Some(Some(vm)) => Some(vm),
        Some(None) => {
            console.flush();
            let _ = std::fs::remove_file(&sock_path);
            return Ok(());
        }
        None => None,
    };
    let result = runner.run(&spec, &rx, first);
    console.flush();
    let _ = std::fs::remove_file(&sock_path);
    result
}

/// Owns the VM process's state and publishes it; the VM itself lives in its methods.
struct Runner {
    id: String,
    state: VmState,
    outbox: Outbox,
    console: Arc<Console>,
    tx: mpsc::Sender<Msg>,
    /// The iSCSI name to log in to a state volume with.
    initiator_iqn: String,
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
                saved: None,
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
}
