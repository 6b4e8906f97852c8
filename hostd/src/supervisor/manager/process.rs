//! The VM process: writing its record and spawning it, reading its events until its
//! control connection closes and then saying how it ended, killing it, and finding the
//! processes an earlier daemon left running.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prost::Message;
use proto::host::{MigrationPhase, PowerState, StopReason, VmConfig};
use tokio::io::AsyncReadExt;
use tokio::net::UnixStream;

use super::entry::{Conn, Entry};
use super::{Arrival, Manager, ManagerError, STOP_GRACE, is_live, migration_ended, power};
use crate::console::ConsoleOut;
use crate::supervisor::child::{CONTROL_SOCKET, RECORD_FILE, VMM_LOG};
use crate::supervisor::frame;
use crate::supervisor::protocol::{Empty, Event, VmRecord, VmState, command, event};

/// How long a new VM process may take to open its control socket and boot.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a start waits for the reader of the VM's previous process to finish.
const READER_TIMEOUT: Duration = Duration::from_secs(15);

fn vmm_log_tail(dir: &Path) -> String {
    let text = std::fs::read_to_string(dir.join(VMM_LOG)).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(5).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
}

impl Manager {
    pub(super) async fn reattach(self: &Arc<Self>) {
        let Ok(dirs) = std::fs::read_dir(self.cfg.run_dir.join("vms")) else {
            return;
        };
        for dir in dirs.filter_map(|d| d.ok().map(|d| d.path())) {
            let Ok(record) = crate::supervisor::child::read_record(&dir) else {
                continue;
            };
            let sock = dir.join(CONTROL_SOCKET);
            match UnixStream::connect(&sock).await {
                Ok(stream) => {
                    let entry = Entry::new(
                        record.id.clone(),
                        super::nets::as_given(record.config.unwrap_or_default()),
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

    /// Plugs the VM's taps, then starts its process; a start that fails unplugs them
    /// again.
    pub(super) async fn spawn(
        self: &Arc<Self>,
        entry: &Arc<Entry>,
        dir: &Path,
        config: VmConfig,
        arrival: Arrival,
    ) -> Result<(), ManagerError> {
        let plugged = self.plug_nets(&entry.id, config.clone()).await?;
        let result = self.spawn_process(entry, dir, plugged, arrival).await;
        if result.is_err() {
            self.unplug_nets(&entry.id, &config).await;
        }
        result
    }

    async fn spawn_process(
        self: &Arc<Self>,
        entry: &Arc<Entry>,
        dir: &Path,
        config: VmConfig,
        arrival: Arrival,
    ) -> Result<(), ManagerError> {
        let (incoming, restore_from) = match arrival {
            Arrival::Boot => (None, None),
            Arrival::Migration(inc) => (Some(inc), None),
            Arrival::Restore(v) => (None, Some(v)),
        };
        // The previous process's reader must be done with the entry's connection and
        // child before this process gets them.
        if tokio::time::timeout(READER_TIMEOUT, entry.reader.lock())
            .await
            .is_err()
        {
            return Err(ManagerError::StartFailed {
                id: entry.id.clone(),
                detail: format!(
                    "the VM's previous process still had its control connection open after {READER_TIMEOUT:?}"
                ),
            });
        }
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| ManagerError::Io { path, source }
        };
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io(dir))?;
        }
        let record = VmRecord {
            id: entry.id.clone(),
            config: Some(config),
            initiator_iqn: self.cfg.initiator_iqn.clone(),
            incoming,
            restore_from,
            vif_busy_poll_us: self.cfg.vif_busy_poll_us,
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
    pub(super) async fn attach(self: &Arc<Self>, entry: &Arc<Entry>, stream: UnixStream) {
        let (mut reader, writer) = stream.into_split();
        *entry.conn.lock().await = Some(Conn { writer, next_id: 0 });
        let entry = entry.clone();
        let dir = self.vm_dir(&entry.id);
        let manager = self.clone();
        let reading = entry.reader.clone().lock_owned().await;
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
            drop(reading);
            // A VM that stopped by itself (guest poweroff, a crash, migrated away) gives
            // its taps back. Under the VM's op lock, so a start that plugs them again
            // comes wholly before (and the VM is live here) or after; and only while
            // this entry is the VM's. The table stays locked until the taps are gone: a
            // VM coming back by migration (a new entry) plugs its taps after, not before
            // this removes them from under it.
            let _op = entry.op.lock().await;
            let vms = manager.vms.lock().await;
            let current = vms.get(&entry.id).is_some_and(|e| Arc::ptr_eq(e, &entry));
            if current && !is_live(entry.power()) {
                let config = entry.lock().config.clone();
                manager.unplug_nets(&entry.id, &config).await;
            }
            drop(vms);
        });
    }

    pub(super) async fn kill(&self, entry: &Entry) {
        let pid = entry.lock().pid;
        if pid != 0 {
            // SAFETY: plain kill(2) of the VM process this daemon started or found.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
        entry
            .wait_until(STOP_GRACE, |s| s.last || !is_live(power(s)))
            .await;
    }
}
