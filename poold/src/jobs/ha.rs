//! High availability: fencing a host that stopped answering, then restarting its VMs
//! elsewhere.
//!
//! A host that misses heartbeats is not trusted to have stopped writing: it may be cut
//! off from the pool and still running its VMs. So, with HA on, once a host has been
//! silent past the HA timeout the leader starts a fence job, and the order is strict:
//!
//! 1. **Fence at the storage.** On every storaged of the pool, every export that grants
//!    the host's initiator is revoked. storaged answers a revoke only after that
//!    initiator's sessions are closed and their commands finished, and refuses its new
//!    logins, so once every revoke has returned the host can write nothing more. The
//!    exports are listed again to check that no grant or session of the host is left.
//!    A storaged that does not answer keeps the job waiting (and the VMs down): a VM is
//!    never started twice on shared disks.
//! 2. **Mark the host fenced** in the same commit that takes its VMs off it: HA-protected
//!    VMs (restart, best-effort) keep wanting to run and wait for a placement, the others
//!    are stopped.
//! 3. **Restart** ([`restart_pending`]): VMs waiting for a placement are placed by
//!    priority (restart before best-effort), then by their order, lowest first, each
//!    through the scheduler and a Raft commit; reconciliation then grants the new host
//!    access and boots them there.
//!
//! A fenced host that comes back is told which VMs to stop (its heartbeat answer lists
//! them as stale) and reconciliation destroys them; it rejoins (enabled) only once it
//! reports none running.

use std::sync::Arc;
use std::time::{Duration, Instant};

use proto::coordinator as pb;
use proto::host as hpb;
use tonic::Code;

use super::{Env, Finish, JobError, read};
use crate::auth::Caller;
use crate::coordinator::Coordinator;
use crate::scheduler;
use crate::state::command::*;

pub async fn fence(env: &Env, job: &Job, f: &FenceHostJob) -> Result<Finish, JobError> {
    let (iqn, srs) = read(&*env.ledger, |s| {
        let iqn = s
            .hosts
            .get(&f.host_id)
            .and_then(|h| h.info.as_ref())
            .map(|i| i.initiator_iqn.clone())
            .filter(|i| !i.is_empty())
            .unwrap_or_else(|| f.initiator_iqn.clone());
        let srs: Vec<(String, String)> = s
            .srs
            .values()
            .map(|sr| (sr.id.clone(), sr.address.clone()))
            .collect();
        (iqn, srs)
    });
    let mut revoked = 0u32;
    let mut dropped = 0u32;
    if iqn.is_empty() {
        // The pool grants hosts by the initiator they report; one that never reported an
        // initiator was never granted anything.
        tracing::warn!(host = %f.host_id, "fencing a host that never reported an initiator: no grant to revoke");
    } else {
        let mut addrs: Vec<String> = srs.iter().map(|(_, a)| a.clone()).collect();
        addrs.sort();
        addrs.dedup();
        for (i, addr) in addrs.iter().enumerate() {
            env.step(
                &job.task_id,
                (10 + i * 80 / addrs.len()) as u32,
                &format!("revoking {iqn} at storaged {addr}"),
                &[],
            )
            .await?;
            let exports = env.storage.list_exports(addr, "").await.map_err(|s| {
                JobError::Transient {
                    what: format!(
                        "storaged at {addr} does not answer: host {} cannot be fenced yet, its VMs wait",
                        f.host_id
                    ),
                    source: s,
                }
            })?;
            for e in exports
                .iter()
                .filter(|e| e.grants.iter().any(|g| g.initiator_iqn == iqn))
            {
                match env.storage.revoke(addr, &e.id, &iqn).await {
                    Ok(n) => {
                        revoked += 1;
                        dropped += n;
                    }
                    // Revoked meanwhile (a previous attempt): done.
                    Err(s) if s.code() == Code::NotFound => {}
                    Err(s) => {
                        return Err(JobError::Transient {
                            what: format!("revoking {iqn} on export {} at {addr}", e.id),
                            source: s,
                        });
                    }
                }
            }
            // Check: nothing of the host is left on this storaged.
            let after =
                env.storage
                    .list_exports(addr, "")
                    .await
                    .map_err(|s| JobError::Transient {
                        what: format!("checking the fence at {addr}"),
                        source: s,
                    })?;
            if let Some(e) = after.iter().find(|e| {
                e.grants.iter().any(|g| g.initiator_iqn == iqn)
                    || e.sessions.iter().any(|x| x.initiator_iqn == iqn)
            }) {
                return Err(JobError::Transient {
                    what: format!("export {} at {addr} still lets {iqn} in", e.id),
                    source: tonic::Status::unavailable("fence not complete"),
                });
            }
        }
    }
    Ok(Finish {
        target: f.host_id.clone(),
        ..Default::default()
    }
    .result("initiator_iqn", &iqn)
    .result("exports_revoked", revoked)
    .result("sessions_dropped", dropped)
    .effect(EffectKind::HostFenced(f.host_id.clone())))
}

/// VMs waiting for a placement after their host was fenced, in restart order: restart
/// priority before best-effort, then by HA order, then by id.
pub fn pending_restarts(s: &crate::state::PoolState) -> Vec<pb::Vm> {
    let mut v: Vec<pb::Vm> = s
        .vms
        .values()
        .filter(|vm| {
            vm.host_id.is_empty()
                && vm.desired_power_state() == hpb::PowerState::Running
                && vm.last_stop_reason() == hpb::StopReason::Fenced
        })
        .cloned()
        .collect();
    let rank = |vm: &pb::Vm| {
        let spec = vm.spec.clone().unwrap_or_default();
        let p = match spec.ha_priority() {
            pb::HaRestartPriority::Restart => 0,
            pb::HaRestartPriority::BestEffort => 1,
            _ => 2,
        };
        (p, spec.ha_order, vm.id.clone())
    };
    v.sort_by_key(rank);
    v
}

/// Places the VMs waiting for a restart, in order; a VM with no room waits for the next
/// round (and a best-effort VM never takes room before a restart one).
pub async fn restart_pending(c: &Coordinator) {
    let pending = pending_restarts(&c.node.state());
    let mut blocked_restart = false;
    for vm in pending {
        let spec = vm.spec.clone().unwrap_or_default();
        if spec.ha_priority() != pb::HaRestartPriority::Restart && blocked_restart {
            break;
        }
        let placed = {
            let s = c.node.state();
            let hosts = s.candidates();
            scheduler::place(&hosts, &s.vm_demand(&vm), &s.policy()).map(|i| hosts[i].id.clone())
        };
        let host = match placed {
            Ok(h) => h,
            Err(u) => {
                tracing::warn!(vm = %vm.id, reason = %u, "HA restart waits: no host has room");
                if spec.ha_priority() == pb::HaRestartPriority::Restart {
                    blocked_restart = true;
                }
                continue;
            }
        };
        let op = Op::SetVmPower(SetVmPower {
            vm_id: vm.id.clone(),
            desired: hpb::PowerState::Running as i32,
            host_id: host.clone(),
            force: false,
            reboot: false,
            ha_restart: true,
        });
        let cmd = c.command(&Caller::internal(), "", op);
        match c.submit(&cmd).await {
            Ok(r) if r.code == 0 => {
                tracing::info!(vm = %vm.id, host = %host, "HA: VM placed for restart")
            }
            Ok(r) => {
                tracing::info!(vm = %vm.id, error = %r.message, "HA placement not committed; retrying")
            }
            Err(e) => {
                tracing::warn!(error = %e, "HA placement not committed");
                return;
            }
        }
    }
}

/// Leader-only loop: starts fence jobs for hosts silent past the HA timeout, and places
/// VMs waiting for a restart.
pub async fn run(c: Arc<Coordinator>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            _ = shutdown.changed() => {}
        }
        if *shutdown.borrow() {
            return;
        }
        let Some(since) = c.leader_term_start() else {
            continue;
        };
        let due: Vec<(String, String)> = {
            let s = c.node.state();
            if !s.ha.enabled {
                Vec::new()
            } else {
                let secs = if s.ha.failure_timeout_seconds > 0 {
                    s.ha.failure_timeout_seconds
                } else {
                    s.settings.host_heartbeat_timeout_seconds
                };
                let timeout = Duration::from_secs(secs.max(1) as u64);
                let live = c.liveness.lock().expect("liveness lock");
                let now = Instant::now();
                s.hosts
                    .values()
                    .filter(|h| h.state() == pb::HostState::Unreachable)
                    .filter(|h| s.fence_job(&h.id).is_none())
                    .filter(|h| {
                        let seen = live.get(&h.id).map_or(since, |l| l.last_seen.max(since));
                        now.duration_since(seen) > timeout
                    })
                    .map(|h| {
                        (
                            h.id.clone(),
                            h.info
                                .as_ref()
                                .map(|i| i.initiator_iqn.clone())
                                .unwrap_or_default(),
                        )
                    })
                    .collect()
            }
        };
        for (host_id, iqn) in due {
            tracing::warn!(host = %host_id, "host silent past the HA timeout: fencing it");
            let op = Op::StartJob(Job {
                task_id: String::new(),
                outputs: Default::default(),
                cancel_requested: false,
                spec: Some(JobSpec::FenceHost(FenceHostJob {
                    host_id: host_id.clone(),
                    initiator_iqn: iqn,
                })),
            });
            let cmd = c.command(&Caller::internal(), "", op);
            if let Err(e) = c.submit(&cmd).await {
                tracing::warn!(host = %host_id, error = %e, "could not start fencing");
            }
        }
        restart_pending(&c).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::test_utils::*;

    #[tokio::test]
    async fn fencing_revokes_every_grant_of_the_host_then_marks_it_fenced() {
        let world = World::two_hosts_one_running_vm();
        world.storage.grant_now("e-vol1", "iqn.h1");
        world.storage.grant_now("e-vol1", "iqn.h2");
        world.storage.grant_now("e-other", "iqn.h1");
        world.mark_unreachable("h1");
        let task = world.start_job(Job {
            spec: Some(JobSpec::FenceHost(FenceHostJob {
                host_id: "h1".into(),
                initiator_iqn: "iqn.h1".into(),
            })),
            ..Default::default()
        });
        world.drive(&task).await;
        let s = world.state();
        assert_eq!(s.hosts["h1"].state(), pb::HostState::Fenced);
        // Both of h1's grants went, h2's stayed.
        let calls = world.storage.calls();
        assert!(
            calls.contains(&"revoke:e-vol1:iqn.h1".to_string()),
            "{calls:?}"
        );
        assert!(
            calls.contains(&"revoke:e-other:iqn.h1".to_string()),
            "{calls:?}"
        );
        assert!(
            !calls
                .iter()
                .any(|c| c.contains("iqn.h2") && c.starts_with("revoke"))
        );
        // The HA VM left the host and waits for a restart; it was not started before
        // the fence completed (no placement exists yet).
        let vm = &s.vms["vm1"];
        assert!(vm.host_id.is_empty());
        assert_eq!(vm.desired_power_state(), hpb::PowerState::Running);
        assert_eq!(vm.last_stop_reason(), hpb::StopReason::Fenced);
        assert_eq!(pending_restarts(&s).len(), 1);
    }

    #[tokio::test]
    async fn an_unreachable_storaged_keeps_the_host_unfenced_and_its_vms_down() {
        let world = World::two_hosts_one_running_vm();
        world.storage.grant_now("e-vol1", "iqn.h1");
        world.mark_unreachable("h1");
        world
            .storage
            .fail_with(tonic::Status::unavailable("connection refused"));
        let task = world.start_job(Job {
            spec: Some(JobSpec::FenceHost(FenceHostJob {
                host_id: "h1".into(),
                initiator_iqn: "iqn.h1".into(),
            })),
            ..Default::default()
        });
        let env = world.env();
        let job = env.job(&task).unwrap();
        let e = crate::jobs::execute(&env, &job).await.unwrap_err();
        assert!(matches!(e, JobError::Transient { .. }), "{e:?}");
        let s = world.state();
        assert_eq!(s.hosts["h1"].state(), pb::HostState::Unreachable);
        assert_eq!(s.vms["vm1"].host_id, "h1", "not moved before the fence");
        assert!(pending_restarts(&s).is_empty());
    }

    #[test]
    fn restarts_go_by_priority_then_order() {
        let mut s = crate::state::PoolState::default();
        for (id, prio, order) in [
            ("a", pb::HaRestartPriority::BestEffort, 0),
            ("b", pb::HaRestartPriority::Restart, 5),
            ("c", pb::HaRestartPriority::Restart, 1),
            ("d", pb::HaRestartPriority::None, 0),
        ] {
            s.vms.insert(
                id.into(),
                pb::Vm {
                    id: id.into(),
                    desired_power_state: hpb::PowerState::Running as i32,
                    last_stop_reason: hpb::StopReason::Fenced as i32,
                    spec: Some(pb::VmSpec {
                        ha_priority: prio as i32,
                        ha_order: order,
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            );
        }
        let order: Vec<String> = pending_restarts(&s).into_iter().map(|v| v.id).collect();
        assert_eq!(order, ["c", "b", "a", "d"]);
    }
}
