//! Live migration in the VM process: sending the running VM to another host while the
//! daemon's commands are still answered, and receiving an incoming one before it runs.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use proto::host::{MigrationPhase, MigrationProgress, PowerState, StopReason};

use super::{Msg, Runner};
use crate::migration::{self, Incoming, MigrationError, SendOptions};
use crate::supervisor::protocol::{Event, IncomingRecord, MigrateSend, command, event};
use crate::vmm::{Vm, VmExit, VmSpec};

/// How a migration the runner started ended.
pub(super) enum MigrateEnd {
    /// The VM runs on the destination.
    Moved,
    /// It runs here still.
    StayedHere,
    /// It stopped meanwhile (the guest stopped, or a stop was asked: then true).
    Exited(VmExit, bool),
}

impl Runner {
    /// Sends the VM to another host while serving commands. Status and metrics are
    /// answered, a stop cancels the migration first, anything else waits its turn.
    pub(super) fn migrate(
        &mut self,
        vm: &Vm,
        rx: &mpsc::Receiver<Msg>,
        m: &MigrateSend,
    ) -> MigrateEnd {
        let tls = match migration::StreamTls::load(std::path::Path::new(&m.tls_dir)) {
            Ok(t) => t,
            Err(e) => {
                let error = proto::error_chain(&e);
                tracing::warn!(%error, "migration not started");
                self.outbox.send(&Event {
                    kind: Some(event::Kind::Migration(MigrationProgress {
                        migration_id: m.migration_id.clone(),
                        vm_id: self.id.clone(),
                        phase: MigrationPhase::Failed as i32,
                        error,
                        ..Default::default()
                    })),
                });
                return MigrateEnd::StayedHere;
            }
        };
        let opts = SendOptions {
            destination_host: m.destination_host.clone(),
            tls,
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
            stream_version: migration::wire::speak(m.destination_stream_version),
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
                tracing::info!(
                    downtime = ?sent.downtime,
                    total = ?sent.total,
                    rounds = sent.rounds,
                    round_kib = ?sent.switchover.round_bytes.iter().map(|b| b >> 10).collect::<Vec<_>>(),
                    last_delta_kib = sent.switchover.last_delta_bytes >> 10,
                    last_delta_pages = sent.switchover.last_delta_pages,
                    last_same_pages = sent.switchover.last_same_pages,
                    "migrated"
                );
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
                last.error = proto::error_chain(&e);
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
    pub(super) fn receive(
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
        let tls = match migration::StreamTls::load(std::path::Path::new(&inc.tls_dir)) {
            Ok(t) => t,
            Err(e) => {
                self.fail_to_start(format!(
                    "the migration stream's TLS: {}",
                    proto::error_chain(&e)
                ));
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
            source_host: inc.source_host.clone(),
            tls,
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
                    proto::error_chain(&e)
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
}
