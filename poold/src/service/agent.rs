//! `HostAgentService`: hostd's heartbeats.
//!
//! A heartbeat is soft state: the leader keeps the latest one of each host in memory and
//! commits a report through Raft only when something the pool acts on changed (the host
//! comes back from unreachable, its info, its NICs or a VM's power state changed) or every
//! [`REPORT_EVERY`] to refresh `last_heartbeat_at`; the samples it kept meanwhile (one per
//! 5 s) ride along, so the metrics history's finest tier is full. A follower forwards heartbeats to the
//! leader. [`poll_hosts`] asks each host itself (for hostd that does not call Heartbeat),
//! feeding the same path ([`observe`]). [`monitor`] marks hosts unreachable once they
//! miss heartbeats past the pool's timeout, counting from the leader's own start of term
//! for hosts it never heard from.

use std::sync::Arc;
use std::time::{Duration, Instant};

use proto::coordinator as pb;
use proto::coordinator::host_agent_service_client::HostAgentServiceClient;
use proto::coordinator::host_agent_service_server::HostAgentService;
use tonic::{Request, Response, Status};

use crate::consensus::transport::member_address;
use crate::coordinator::{Coordinator, Liveness};
use crate::state::command::{HostReport, MarkUnreachable, Op, ReportedVm};

/// A committed report at least this often per host, to keep `last_heartbeat_at` fresh.
pub const REPORT_EVERY: Duration = Duration::from_secs(30);

pub struct AgentApi {
    pub c: Arc<Coordinator>,
}

#[tonic::async_trait]
impl HostAgentService for AgentApi {
    async fn heartbeat(
        &self,
        r: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        // A host reports only as itself: the host the message names must be the one its
        // certificate names. A member forwarding a heartbeat checked that already.
        if let Some(pool_trust::Identity::Host(name)) = crate::tls::caller(&r) {
            let req = r.get_ref();
            let known = self
                .c
                .node
                .state()
                .hosts
                .get(&req.host_id)
                .map(|h| h.name.clone());
            if known.as_deref().is_some_and(|n| n != name) {
                tracing::warn!(caller = %name, host_id = %req.host_id, "refused a heartbeat for another host");
                return Err(Status::permission_denied(format!(
                    "host {name} may report only as itself, not as host {}",
                    req.host_id
                )));
            }
        }
        let req = r.into_inner();
        if !self.c.is_leader() {
            return forward(&self.c, req).await;
        }
        observe(&self.c, req).await.map(Response::new)
    }
}

/// The leader takes in what a host reports (by its own heartbeat or by the leader's
/// poll): liveness in memory, a committed report when something the pool acts on
/// changed. Answers with the host's state and the VMs it must stop.
pub async fn observe(
    c: &Coordinator,
    req: pb::HeartbeatRequest,
) -> Result<pb::HeartbeatResponse, Status> {
    c.leader_term_start();
    let (host, timeout_s) = {
        let s = c.node.state();
        let host = s.hosts.get(&req.host_id).cloned().ok_or_else(|| {
            Status::not_found(format!(
                "host {} has not joined this pool; call JoinHost first",
                req.host_id
            ))
        })?;
        (host, s.settings.host_heartbeat_timeout_seconds)
    };
    let now = Instant::now();
    let reported: std::collections::BTreeMap<String, i32> = req
        .vms
        .iter()
        .map(|v| (v.id.clone(), v.power_state))
        .collect();
    let must_commit = {
        let mut live = c.liveness.lock().expect("liveness lock");
        let prev = live.get(&req.host_id).cloned();
        let prev_committed = prev.as_ref().map(|p| p.last_committed);
        let state = c.node.state();
        let vm_changed = req.vms.iter().any(|v| {
            state.takes_report(&req.host_id, &v.id, v.power_state)
                && state.vms.get(&v.id).is_some_and(|x| {
                    x.power_state != v.power_state
                        || x.last_stop_reason != v.last_stop_reason
                        || v.started_at.as_ref().is_some_and(|t| {
                            x.started_at.as_ref().map(proto::timestamp_ms)
                                != Some(proto::timestamp_ms(t))
                        })
                })
        });
        let info_changed = req.info.is_some() && req.info != host.info;
        let nics_changed = req.nics_known && req.nics != host.nics;
        let stale = prev
            .as_ref()
            .is_none_or(|p| now.duration_since(p.last_committed) >= REPORT_EVERY);
        // Back from unreachable; or fenced and its VMs changed (it may rejoin once none
        // runs).
        let back = host.state() == pb::HostState::Unreachable
            || (host.state() == pb::HostState::Fenced
                && prev.as_ref().is_none_or(|p| p.vms != reported));
        let must = vm_changed || info_changed || nics_changed || stale || back;
        let mut fine = prev.map(|p| p.fine).unwrap_or_default();
        let earlier = match &req.metrics {
            Some(m) if must => fine.commit(m),
            Some(m) => {
                fine.offer(m);
                Vec::new()
            }
            None => Vec::new(),
        };
        live.insert(
            req.host_id.clone(),
            Liveness {
                last_seen: now,
                last_committed: if must {
                    now
                } else {
                    prev_committed.unwrap_or(now)
                },
                sequence: req.sequence,
                vms: reported.clone(),
                metrics: req.metrics.clone(),
                fine,
            },
        );
        must.then_some(earlier)
    };
    let mut state = host.state();
    if let Some(earlier_metrics) = must_commit {
        let op = Op::HostReport(HostReport {
            host_id: req.host_id.clone(),
            info: req.info.clone(),
            metrics: req.metrics.clone(),
            vms: req
                .vms
                .iter()
                .map(|v| ReportedVm {
                    vm_id: v.id.clone(),
                    power_state: v.power_state,
                    last_stop_reason: v.last_stop_reason,
                    started_at_ms: v.started_at.as_ref().map_or(0, proto::timestamp_ms),
                })
                .collect(),
            nics: req.nics.clone(),
            nics_known: req.nics_known,
            earlier_metrics,
        });
        let cmd = c.command(&crate::auth::Caller::internal(), "", op);
        c.submit(&cmd).await?.into_status()?;
        state = c
            .node
            .state()
            .hosts
            .get(&req.host_id)
            .map_or(state, |h| h.state());
    }
    // VMs the host runs that the pool does not place there.
    let stale_vm_ids = {
        let s = c.node.state();
        req.vms
            .iter()
            .filter(|v| crate::state::vms::active(v.power_state))
            .filter(|v| {
                let placed_here = s.vms.get(&v.id).is_some_and(|x| x.host_id == req.host_id);
                // A restore (resume, revert to a checkpoint) runs it here before the job
                // places it here, as a migration's destination does.
                !placed_here && !s.job_moves_vm_on(&v.id, &req.host_id)
            })
            .map(|v| v.id.clone())
            .collect()
    };
    Ok(pb::HeartbeatResponse {
        state: state as i32,
        stale_vm_ids,
        next_heartbeat_ms: (timeout_s.max(3) * 1000 / 3).min(5000),
    })
}

/// How often the leader polls each host.
pub const POLL_EVERY: Duration = Duration::from_secs(1);
/// Host info (CPU, memory, initiator) is fetched again this often.
const INFO_EVERY: Duration = Duration::from_secs(15);

/// Leader-only loop: asks every host what it runs (hostd's ListVms, GetHostInfo,
/// GetHostMetrics) and takes the answers in as heartbeats. A host that does not answer
/// is not seen; past the heartbeat timeout [`monitor`] marks it unreachable. This is how
/// the pool watches hosts whose hostd does not call Heartbeat itself.
pub async fn poll_hosts(
    c: Arc<Coordinator>,
    hosts: Arc<dyn crate::backend::HostOps>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let info_at: Arc<std::sync::Mutex<std::collections::HashMap<String, Instant>>> =
        Default::default();
    let mut seq = 0u64;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(POLL_EVERY) => {}
            _ = shutdown.changed() => {}
        }
        if *shutdown.borrow() {
            return;
        }
        if c.leader_term_start().is_none() {
            info_at.lock().expect("info lock").clear();
            continue;
        }
        seq += 1;
        let targets: Vec<(String, String)> = c
            .node
            .state()
            .hosts
            .values()
            .map(|h| (h.id.clone(), h.address.clone()))
            .collect();
        let polls = targets.into_iter().map(|(id, addr)| {
            let c = c.clone();
            let hosts = hosts.clone();
            let info_at = info_at.clone();
            tokio::spawn(async move {
                let want_info = info_at
                    .lock()
                    .expect("info lock")
                    .get(&id)
                    .is_none_or(|t| t.elapsed() >= INFO_EVERY);
                let vms = match hosts.list_vms(&addr).await {
                    Ok(v) => v,
                    Err(e) => {
                        tracing::debug!(host = %id, error = %e, "host did not answer the poll");
                        return;
                    }
                };
                let info = if want_info {
                    match hosts.info(&addr).await {
                        Ok(i) => {
                            info_at
                                .lock()
                                .expect("info lock")
                                .insert(id.clone(), Instant::now());
                            Some(i)
                        }
                        Err(_) => return,
                    }
                } else {
                    None
                };
                let metrics = if want_info {
                    hosts.metrics(&addr).await.ok()
                } else {
                    None
                };
                let req = pb::HeartbeatRequest {
                    host_id: id.clone(),
                    info,
                    metrics,
                    vms,
                    sequence: seq,
                    // hostd's API does not list its NICs: they come with its heartbeats.
                    nics: vec![],
                    nics_known: false,
                };
                if let Err(e) = observe(&c, req).await {
                    tracing::debug!(host = %id, error = %e, "poll not recorded");
                }
            })
        });
        let handles: Vec<_> = polls.collect();
        for h in handles {
            let _ = h.await;
        }
    }
}

async fn forward(
    c: &Coordinator,
    req: pb::HeartbeatRequest,
) -> Result<Response<pb::HeartbeatResponse>, Status> {
    let st = c.node.status();
    if st.leader_id == 0 || c.faults.blocks(st.leader_id) {
        return Err(Status::unavailable(
            "no reachable leader to take the heartbeat; retry",
        ));
    }
    let addr = member_address(&c.node.shared, &c.seeds, st.leader_id)
        .ok_or_else(|| Status::unavailable("leader address unknown"))?;
    let ch = crate::tls::endpoint(
        &addr,
        c.tls.as_ref(),
        Some(&pool_trust::Identity::Member(st.leader_id)),
    )?
    .connect()
    .await
    .map_err(|e| Status::unavailable(format!("leader {addr}: {}", proto::error_chain(&e))))?;
    HostAgentServiceClient::new(ch).heartbeat(req).await
}

/// Leader-only loop: marks hosts unreachable past the heartbeat timeout.
pub async fn monitor(c: Arc<Coordinator>, shutdown: tokio::sync::watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tick.tick().await;
        if *shutdown.borrow() {
            return;
        }
        let Some(since) = c.leader_term_start() else {
            continue;
        };
        let due: Vec<String> = {
            let s = c.node.state();
            let timeout =
                Duration::from_secs(s.settings.host_heartbeat_timeout_seconds.max(1) as u64);
            let live = c.liveness.lock().expect("liveness lock");
            let now = Instant::now();
            s.hosts
                .values()
                .filter(|h| {
                    matches!(
                        h.state(),
                        pb::HostState::Enabled
                            | pb::HostState::Disabled
                            | pb::HostState::Maintenance
                    )
                })
                .filter(|h| {
                    let seen = live.get(&h.id).map_or(since, |l| l.last_seen);
                    now.duration_since(seen) > timeout
                })
                .map(|h| h.id.clone())
                .collect()
        };
        if due.is_empty() {
            continue;
        }
        tracing::warn!(hosts = ?due, "hosts missed heartbeats past the timeout: marking unreachable");
        let cmd = c.command(
            &crate::auth::Caller::internal(),
            "",
            Op::MarkUnreachable(MarkUnreachable { host_ids: due }),
        );
        if let Err(e) = c.submit(&cmd).await {
            tracing::warn!(error = %e, "could not mark hosts unreachable");
        }
    }
}
