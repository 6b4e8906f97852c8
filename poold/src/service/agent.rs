//! `HostAgentService`: hostd's heartbeats.
//!
//! A heartbeat is soft state: the leader keeps the latest one of each host in memory and
//! commits a report through Raft only when something the pool acts on changed (the host
//! comes back from unreachable, its info or a VM's power state changed) or every
//! [`REPORT_EVERY`] to refresh `last_heartbeat_at`. A follower forwards heartbeats to the
//! leader. [`monitor`] marks hosts unreachable once they miss heartbeats past the pool's
//! timeout, counting from the leader's own start of term for hosts it never heard from.

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
        let req = r.into_inner();
        if !self.c.is_leader() {
            return forward(&self.c, req).await;
        }
        self.c.leader_term_start();
        let (host, timeout_s, placed) = {
            let s = self.c.node.state();
            let host = s.hosts.get(&req.host_id).cloned().ok_or_else(|| {
                Status::not_found(format!(
                    "host {} has not joined this pool; call JoinHost first",
                    req.host_id
                ))
            })?;
            let placed: Vec<(String, String)> = req
                .vms
                .iter()
                .map(|v| {
                    (
                        v.id.clone(),
                        s.vms
                            .get(&v.id)
                            .map(|x| x.host_id.clone())
                            .unwrap_or_default(),
                    )
                })
                .collect();
            (host, s.settings.host_heartbeat_timeout_seconds, placed)
        };
        let now = Instant::now();
        let reported: std::collections::BTreeMap<String, i32> = req
            .vms
            .iter()
            .map(|v| (v.id.clone(), v.power_state))
            .collect();
        let must_commit = {
            let mut live = self.c.liveness.lock().expect("liveness lock");
            let prev = live.get(&req.host_id).cloned();
            let state = self.c.node.state();
            let vm_changed = req.vms.iter().any(|v| {
                state
                    .vms
                    .get(&v.id)
                    .is_some_and(|x| x.host_id == req.host_id && x.power_state != v.power_state)
            });
            let info_changed = req.info.is_some() && req.info != host.info;
            let stale = prev
                .as_ref()
                .is_none_or(|p| now.duration_since(p.last_committed) >= REPORT_EVERY);
            let back = host.state() == pb::HostState::Unreachable;
            let must = vm_changed || info_changed || stale || back;
            live.insert(
                req.host_id.clone(),
                Liveness {
                    last_seen: now,
                    last_committed: if must {
                        now
                    } else {
                        prev.as_ref().map_or(now, |p| p.last_committed)
                    },
                    sequence: req.sequence,
                    vms: reported.clone(),
                    metrics: req.metrics.clone(),
                },
            );
            must
        };
        let mut state = host.state();
        if must_commit {
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
                    })
                    .collect(),
            });
            let cmd = self.c.command("", op);
            self.c.submit(&cmd).await?.into_status()?;
            state = self
                .c
                .node
                .state()
                .hosts
                .get(&req.host_id)
                .map_or(state, |h| h.state());
        }
        let stale_vm_ids = placed
            .into_iter()
            .filter(|(_, placed_on)| *placed_on != req.host_id)
            .map(|(id, _)| id)
            .collect();
        Ok(Response::new(pb::HeartbeatResponse {
            state: state as i32,
            stale_vm_ids,
            next_heartbeat_ms: (timeout_s.max(3) * 1000 / 3).min(5000),
        }))
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
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| Status::internal(e.to_string()))?
        .connect_timeout(Duration::from_secs(1))
        .connect()
        .await
        .map_err(|e| Status::unavailable(format!("leader {addr}: {e}")))?;
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
        let cmd = c.command("", Op::MarkUnreachable(MarkUnreachable { host_ids: due }));
        if let Err(e) = c.submit(&cmd).await {
            tracing::warn!(error = %e, "could not mark hosts unreachable");
        }
    }
}
