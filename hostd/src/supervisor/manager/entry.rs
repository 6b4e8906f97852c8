//! One VM as the daemon knows it: its configuration and last state, its console history,
//! the control connection to its process with the commands awaiting replies, and its
//! migration's progress.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proto::host::{MigrationProgress, PowerState, Vm as VmProto, VmConfig};
use tokio::io::AsyncWriteExt;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::{oneshot, watch};

use super::{ManagerError, migration_ended, power};
use crate::console::{Console, DEFAULT_BUFFER_BYTES};
use crate::supervisor::frame;
use crate::supervisor::protocol::{Command, Reply, VmState, command};

/// How long a command to a VM process may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// What the daemon knows of one VM.
pub(super) struct Record {
    pub(super) config: VmConfig,
    pub(super) state: VmState,
    pub(super) pid: u32,
}

pub(super) struct Conn {
    pub(super) writer: OwnedWriteHalf,
    pub(super) next_id: u64,
}

pub(super) struct Entry {
    pub(super) id: String,
    pub(super) record: Mutex<Record>,
    pub(super) console: Arc<Console>,
    pub(super) conn: tokio::sync::Mutex<Option<Conn>>,
    pub(super) pending: Arc<Mutex<HashMap<u64, oneshot::Sender<Reply>>>>,
    /// Bumped on every state change, for waiters.
    pub(super) changed: watch::Sender<u64>,
    /// Serialises lifecycle operations on this VM.
    pub(super) op: tokio::sync::Mutex<()>,
    /// The VM process, when this daemon started it.
    pub(super) child: Mutex<Option<tokio::process::Child>>,
    /// Held by the task reading a VM process's events until it has reaped the process
    /// and cleared its connection, so a new process is not started (and its connection
    /// and child not taken) while the last one's reader is still winding down.
    pub(super) reader: Arc<tokio::sync::Mutex<()>>,
    /// The latest progress of this VM's outgoing migration, if it ever had one.
    pub(super) migration: watch::Sender<Option<MigrationProgress>>,
}

impl Entry {
    pub(super) fn new(id: String, config: VmConfig, state: VmState) -> Arc<Self> {
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
            reader: Arc::new(tokio::sync::Mutex::new(())),
            migration: watch::channel(None).0,
        })
    }

    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, Record> {
        self.record.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn power(&self) -> PowerState {
        power(&self.lock().state)
    }

    /// Whether the VM is arriving here (by migration or from a saved state): it reads
    /// Migrating, and not because this host is sending it away.
    pub(super) fn arriving(&self) -> bool {
        self.power() == PowerState::Migrating
            && self.migration.borrow().as_ref().is_none_or(migration_ended)
    }

    pub(super) fn set_state(&self, state: VmState) {
        {
            let mut r = self.lock();
            r.pid = if state.last { 0 } else { state.pid };
            r.state = state;
        }
        self.changed.send_modify(|n| *n += 1);
    }

    pub(super) fn to_proto(&self) -> VmProto {
        let r = self.lock();
        VmProto {
            id: self.id.clone(),
            config: Some(r.config.clone()),
            power_state: r.state.power,
            last_stop_reason: r.state.last_stop,
            last_stop_detail: r.state.detail.clone(),
            started_at: (r.state.started_at_unix_ms > 0)
                .then(|| proto::timestamp(r.state.started_at_unix_ms)),
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
    pub(super) async fn command(&self, op: command::Op) -> Result<Reply, ManagerError> {
        self.command_within(op, COMMAND_TIMEOUT).await
    }

    /// Sends a command and waits up to `timeout` for its reply (a save takes as long as
    /// writing the VM's memory does).
    pub(super) async fn command_within(
        &self,
        op: command::Op,
        timeout: Duration,
    ) -> Result<Reply, ManagerError> {
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
        let reply = tokio::time::timeout(timeout, rx)
            .await
            .map_err(|_| ManagerError::Unresponsive {
                id: self.id.clone(),
                what: format!("no reply in {timeout:?}"),
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
    pub(super) async fn wait_until(
        &self,
        timeout: Duration,
        done: impl Fn(&VmState) -> bool,
    ) -> bool {
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
