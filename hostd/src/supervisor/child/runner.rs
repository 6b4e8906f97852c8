//! The runner's boot loop: one [`Vm`] per boot, the daemon's commands served while it
//! runs, and how each stop ends (a reboot, or the last state).

use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use proto::host::{DiskMetrics, NicMetrics, PowerState, StopReason, VmMetrics};

use super::migrate::MigrateEnd;
use super::{ChildError, Msg, Runner};
use crate::devices::virtio::net;
use crate::supervisor::protocol::{Event, Polite, Reply, command, event};
use crate::vmm::{Vm, VmExit, VmSpec};

/// How long a paused vCPU may take to stop.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(10);

/// A triple fault restarts the VM (Linux's `reboot=t` makes one on purpose), unless it
/// came this many times in a row, each this soon after its boot: a guest that cannot boot
/// stops as crashed instead of restarting forever.
const FAULT_LOOP_LIMIT: u32 = 5;
const FAULT_LOOP_WINDOW: Duration = Duration::from_secs(10);

/// Triple faults in a row so far, counting the exit of a boot that ran for `ran`.
fn quick_faults(before: u32, exit: &VmExit, ran: Duration) -> u32 {
    match exit {
        VmExit::TripleFault { .. } if ran < FAULT_LOOP_WINDOW => before + 1,
        _ => 0,
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
    /// Its state is saved in a volume; it stops here.
    Suspended,
}

impl Runner {
    pub(super) fn run(
        &mut self,
        spec: &VmSpec,
        rx: &mpsc::Receiver<Msg>,
        mut first: Option<Vm>,
    ) -> Result<(), ChildError> {
        let mut faults = 0;
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
                Err(e) => return Err(self.fail_to_start(proto::error_chain(&e))),
            };
            self.state.boots += 1;
            self.state.power = PowerState::Running as i32;
            self.state.started_at_unix_ms = proto::unix_ms();
            let booted = Instant::now();
            self.publish();
            tracing::info!(boots = self.state.boots, "VM running");
            // Bridges learn the VIFs' port now, not when the guest next sends: after a
            // migration the VM's MACs are behind another host's tap.
            if let Err(e) = net::announce_in_background(vm.nets().to_vec()) {
                tracing::warn!(error = %e, "cannot start announcing the VM's MACs");
            }
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
            faults = quick_faults(faults, &exit, booted.elapsed());
            match (intent, &exit) {
                (Some(Intent::MigratedAway), _) => {
                    let detail = std::mem::take(&mut self.state.detail);
                    self.finish(PowerState::Stopped, StopReason::MigratedAway, detail)
                }
                (Some(Intent::Suspended), _) => self.finish(
                    PowerState::Stopped,
                    StopReason::Suspended,
                    "suspended: its state is saved in a volume".into(),
                ),
                (Some(Intent::Reboot), _) | (None, VmExit::Reset) => {
                    self.state.last_stop = if intent.is_some() {
                        StopReason::Forced as i32
                    } else {
                        StopReason::GuestReset as i32
                    };
                    self.state.detail = exit.to_string();
                    continue;
                }
                (None, VmExit::TripleFault { .. }) if faults < FAULT_LOOP_LIMIT => {
                    self.state.last_stop = StopReason::TripleFault as i32;
                    self.state.detail = format!("{exit}; restarted like a reset");
                    continue;
                }
                (Some(Intent::Stop { forced: true }), VmExit::Stopped) => self.finish(
                    PowerState::Stopped,
                    StopReason::Forced,
                    "stopped by request".into(),
                ),
                (_, VmExit::Poweroff { .. })
                | (Some(Intent::Stop { .. }), VmExit::Reset | VmExit::TripleFault { .. }) => self
                    .finish(
                        PowerState::Stopped,
                        StopReason::GuestPoweroff,
                        exit.to_string(),
                    ),
                (_, VmExit::TripleFault { .. }) => self.finish(
                    PowerState::Crashed,
                    StopReason::TripleFault,
                    format!(
                        "{exit}, {faults} times in a row within {} s of booting",
                        FAULT_LOOP_WINDOW.as_secs()
                    ),
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
                Some(command::Op::Save(s)) if intent.is_none() => match self.save(vm, &s) {
                    Ok(saved) => {
                        let suspended = !s.resume;
                        if suspended {
                            // The state is durable: the guest never runs here again.
                            vm.stop();
                        }
                        self.outbox.send(&Event {
                            kind: Some(event::Kind::Reply(Reply {
                                id,
                                error: String::new(),
                                state: Some(self.state.clone()),
                                metrics: None,
                                saved: Some(saved),
                            })),
                        });
                        if suspended {
                            return (VmExit::Stopped, Some(Intent::Suspended));
                        }
                        continue;
                    }
                    Err(e) => Err(e),
                },
                Some(command::Op::Save(_)) => {
                    Err("a stop or reboot is under way: the VM cannot be saved now".into())
                }
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

    /// A polite request (shutdown or reboot): at once when forced, else the ACPI power
    /// button (or Ctrl-Alt-Del) and a deadline after which the VM is forced.
    fn polite(&mut self, vm: &Vm, p: &Polite, deadline: &mut Option<Instant>) {
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

    pub(super) fn metrics(&self, vm: &Vm) -> VmMetrics {
        VmMetrics {
            vm_id: self.id.clone(),
            at: Some(proto::timestamp(proto::unix_ms())),
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
                    read_time_us: m.read_time_us,
                    write_time_us: m.write_time_us,
                })
                .collect(),
            nics: vm
                .nets()
                .iter()
                .map(|n| {
                    let m = n.metrics.snapshot();
                    NicMetrics {
                        nic_id: n.id.clone(),
                        mac: n.mac.to_string(),
                        rx_packets: m.rx_packets,
                        rx_bytes: m.rx_bytes,
                        rx_dropped: m.rx_dropped,
                        tx_packets: m.tx_packets,
                        tx_bytes: m.tx_bytes,
                        tx_dropped: m.tx_dropped,
                        tx_spoofed: m.tx_spoofed,
                        tx_throttled: m.tx_throttled,
                        rx_errors: m.rx_errors,
                        tx_errors: m.tx_errors,
                        invalid: m.invalid,
                        announces: m.announces,
                        tx_batched: m.tx_batched,
                    }
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_quick_triple_faults_in_a_row_count_towards_the_loop_limit() {
        let fault = VmExit::TripleFault { vcpu: 0 };
        let quick = FAULT_LOOP_WINDOW / 2;
        let mut n = 0;
        for _ in 0..FAULT_LOOP_LIMIT {
            n = quick_faults(n, &fault, quick);
        }
        assert_eq!(n, FAULT_LOOP_LIMIT);
        // A boot that ran long enough, or any other exit, starts the count again.
        assert_eq!(quick_faults(n, &fault, FAULT_LOOP_WINDOW * 2), 0);
        assert_eq!(quick_faults(n, &VmExit::Reset, quick), 0);
        assert_eq!(quick_faults(0, &fault, quick), 1);
    }
}
