//! Reconciliation: the leader compares what the pool wants (committed VM placements and
//! desired power states) with what hosts report in their heartbeats, and acts on hosts to
//! close the gap.
//!
//! [`plan`] is pure and idempotent: the same state and reports give the same actions, and
//! an action that already took effect drops out of the next plan. So a new leader needs no
//! hand-over: it plans from the replicated state and the heartbeats it receives, and picks
//! up where the old one stopped. [`Reconciler`] paces the actions (the same one is not
//! re-sent while it may still be in flight) and runs them through [`HostActions`], the
//! narrow interface to hosts; [`GrpcHostActions`] implements it over hostd's HostService.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use proto::coordinator as pb;
use proto::host as hpb;
use proto::host::host_service_client::HostServiceClient;
use tokio::sync::Mutex;

use crate::coordinator::Coordinator;
use crate::state::PoolState;

/// What the reconciler does to one VM on one host.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Action {
    /// Define the VM on the host and boot it.
    Create {
        vm_id: String,
    },
    Start {
        vm_id: String,
    },
    Stop {
        vm_id: String,
        force: bool,
    },
    Pause {
        vm_id: String,
    },
    Resume {
        vm_id: String,
    },
    /// The host runs a VM the pool placed elsewhere (or no longer knows): stop and forget it.
    DestroyStale {
        vm_id: String,
    },
}

/// An action for a host.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Step {
    pub host_id: String,
    pub address: String,
    pub action: Action,
}

#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    #[error("host {address} cannot be reached")]
    Connect {
        address: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("host {address} refused {what}")]
    Refused {
        address: String,
        what: String,
        #[source]
        source: tonic::Status,
    },
    #[error("VM {vm_id} is no longer in the pool state")]
    UnknownVm { vm_id: String },
}

/// Reported power states: host id → VM id → `pool.host.v1.PowerState`.
pub type Reported = BTreeMap<String, BTreeMap<String, i32>>;

/// The actions that bring hosts to the desired state. Hosts that did not report (never
/// heard from, unreachable, fenced) are left alone: what they run is unknown.
pub fn plan(state: &PoolState, reported: &Reported) -> Vec<Step> {
    use hpb::PowerState as P;
    let mut out = Vec::new();
    for (host_id, vms) in reported {
        let Some(host) = state.hosts.get(host_id) else {
            continue;
        };
        if matches!(
            host.state(),
            pb::HostState::Unreachable | pb::HostState::Fenced
        ) {
            continue;
        }
        let step = |action| Step {
            host_id: host_id.clone(),
            address: host.address.clone(),
            action,
        };
        // VMs the pool placed on this host.
        for vm in state.vms.values().filter(|v| v.host_id == *host_id) {
            let have = vms.get(&vm.id).and_then(|p| P::try_from(*p).ok());
            let id = vm.id.clone();
            let a = match (vm.desired_power_state(), have) {
                (P::Running, None) => Some(Action::Create { vm_id: id }),
                (P::Running, Some(P::Stopped | P::Crashed)) => Some(Action::Start { vm_id: id }),
                (P::Running, Some(P::Paused)) => Some(Action::Resume { vm_id: id }),
                (P::Paused, Some(P::Running)) => Some(Action::Pause { vm_id: id }),
                (P::Stopped, Some(P::Running | P::Paused)) => Some(Action::Stop {
                    vm_id: id,
                    force: false,
                }),
                _ => None,
            };
            out.extend(a.map(step));
        }
        // VMs the host runs that the pool does not place there.
        for (vm_id, p) in vms {
            let placed_here = state.vms.get(vm_id).is_some_and(|v| v.host_id == *host_id);
            let active = matches!(P::try_from(*p), Ok(P::Running | P::Paused));
            if !placed_here && active {
                out.push(step(Action::DestroyStale {
                    vm_id: vm_id.clone(),
                }));
            }
        }
    }
    out.sort();
    out
}

/// The host operations reconciliation needs.
#[tonic::async_trait]
pub trait HostActions: Send + Sync {
    async fn perform(&self, step: &Step, vm: Option<&pb::Vm>) -> Result<(), ActionError>;
}

/// Paces actions: one that was sent is not sent again for [`Reconciler::RETRY_AFTER`].
pub struct Reconciler {
    actions: Arc<dyn HostActions>,
    recent: HashMap<Step, Instant>,
}

impl Reconciler {
    pub const RETRY_AFTER: Duration = Duration::from_secs(10);

    pub fn new(actions: Arc<dyn HostActions>) -> Self {
        Reconciler {
            actions,
            recent: HashMap::new(),
        }
    }

    /// One round: plans and performs what is due; returns what it tried and how it went.
    pub async fn round(
        &mut self,
        state: &PoolState,
        reported: &Reported,
        now: Instant,
    ) -> Vec<(Step, Result<(), ActionError>)> {
        let steps = plan(state, reported);
        self.recent
            .retain(|s, at| steps.contains(s) && now.duration_since(*at) < Self::RETRY_AFTER);
        let mut done = Vec::new();
        for s in steps {
            if self.recent.contains_key(&s) {
                continue;
            }
            self.recent.insert(s.clone(), now);
            let vm_id = match &s.action {
                Action::Create { vm_id }
                | Action::Start { vm_id }
                | Action::Stop { vm_id, .. }
                | Action::Pause { vm_id }
                | Action::Resume { vm_id }
                | Action::DestroyStale { vm_id } => vm_id,
            };
            let r = self.actions.perform(&s, state.vms.get(vm_id)).await;
            done.push((s, r));
        }
        done
    }
}

/// The hostd configuration of a pool VM.
pub fn vm_config(state: &PoolState, vm: &pb::Vm) -> hpb::VmConfig {
    let spec = vm.spec.clone().unwrap_or_default();
    let disks = spec
        .disks
        .iter()
        .map(|d| {
            let portal = state
                .volumes
                .get(&d.volume_id)
                .and_then(|v| state.srs.get(&v.pool_id))
                .and_then(|sr| sr.portals.first().cloned())
                .unwrap_or_default();
            hpb::DiskConfig {
                id: d.disk_id.clone(),
                backend: Some(hpb::disk_config::Backend::Iscsi(hpb::IscsiDisk {
                    portal,
                    volume_id: d.volume_id.clone(),
                    ..Default::default()
                })),
                read_only: d.read_only,
            }
        })
        .collect();
    hpb::VmConfig {
        name: spec.name,
        vcpus: spec.vcpus,
        memory_bytes: spec.memory_bytes,
        boot: spec.boot,
        disks,
        cpuid_mask: vec![],
        console_buffer_bytes: 64 << 10,
        labels: spec.labels,
    }
}

/// [`HostActions`] over hostd's gRPC HostService.
#[derive(Default)]
pub struct GrpcHostActions {
    clients: Mutex<HashMap<String, HostServiceClient<tonic::transport::Channel>>>,
    /// Pool state needed to build VM configs, set by the loop before each round.
    pub state: Mutex<Option<Arc<PoolState>>>,
}

impl GrpcHostActions {
    async fn client(
        &self,
        address: &str,
    ) -> Result<HostServiceClient<tonic::transport::Channel>, ActionError> {
        if let Some(c) = self.clients.lock().await.get(address) {
            return Ok(c.clone());
        }
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
            .map(|e| {
                e.connect_timeout(Duration::from_secs(2))
                    .timeout(Duration::from_secs(30))
            })
            .map_err(|source| ActionError::Connect {
                address: address.to_owned(),
                source,
            })?
            .connect()
            .await
            .map_err(|source| ActionError::Connect {
                address: address.to_owned(),
                source,
            })?;
        let c = HostServiceClient::new(ch);
        self.clients
            .lock()
            .await
            .insert(address.to_owned(), c.clone());
        Ok(c)
    }
}

#[tonic::async_trait]
impl HostActions for GrpcHostActions {
    async fn perform(&self, step: &Step, vm: Option<&pb::Vm>) -> Result<(), ActionError> {
        let mut c = self.client(&step.address).await?;
        let refused = |what: &str| {
            let address = step.address.clone();
            let what = what.to_owned();
            move |source| ActionError::Refused {
                address,
                what,
                source,
            }
        };
        match &step.action {
            Action::Create { vm_id } => {
                let vm = vm.ok_or_else(|| ActionError::UnknownVm {
                    vm_id: vm_id.clone(),
                })?;
                let state = self.state.lock().await.clone().unwrap_or_default();
                c.create_vm(hpb::CreateVmRequest {
                    vm_id: vm_id.clone(),
                    config: Some(vm_config(&state, vm)),
                    start: true,
                })
                .await
                .map_err(refused("CreateVm"))?;
            }
            Action::Start { vm_id } => {
                c.start_vm(hpb::VmRequest {
                    vm_id: vm_id.clone(),
                })
                .await
                .map_err(refused("StartVm"))?;
            }
            Action::Stop { vm_id, force } => {
                c.shutdown_vm(hpb::ShutdownVmRequest {
                    vm_id: vm_id.clone(),
                    force: *force,
                    timeout_seconds: 60,
                })
                .await
                .map_err(refused("ShutdownVm"))?;
            }
            Action::Pause { vm_id } => {
                c.pause_vm(hpb::VmRequest {
                    vm_id: vm_id.clone(),
                })
                .await
                .map_err(refused("PauseVm"))?;
            }
            Action::Resume { vm_id } => {
                c.resume_vm(hpb::VmRequest {
                    vm_id: vm_id.clone(),
                })
                .await
                .map_err(refused("ResumeVm"))?;
            }
            Action::DestroyStale { vm_id } => {
                c.destroy_vm(hpb::VmRequest {
                    vm_id: vm_id.clone(),
                })
                .await
                .map_err(refused("DestroyVm"))?;
            }
        }
        Ok(())
    }
}

/// Leader-only loop: a reconciliation round every second.
pub async fn run(
    c: Arc<Coordinator>,
    actions: Arc<GrpcHostActions>,
    shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let mut rec = Reconciler::new(actions.clone());
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        if *shutdown.borrow() {
            return;
        }
        if c.leader_term_start().is_none() {
            continue;
        }
        let reported: Reported = c
            .liveness
            .lock()
            .expect("liveness lock")
            .iter()
            .map(|(h, l)| (h.clone(), l.vms.clone()))
            .collect();
        if reported.is_empty() {
            continue;
        }
        let state = Arc::new(c.node.state().clone());
        *actions.state.lock().await = Some(state.clone());
        for (step, r) in rec.round(&state, &reported, Instant::now()).await {
            match r {
                Ok(()) => tracing::info!(?step, "reconciled"),
                Err(e) => {
                    tracing::warn!(?step, error = %e, "reconciliation step failed; will retry")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::command::*;
    use hpb::PowerState as P;
    use std::sync::Mutex as StdMutex;

    fn state_with(vms: &[(&str, &str, P)]) -> PoolState {
        let mut s = PoolState::new("p", BTreeMap::new());
        for h in ["h1", "h2"] {
            s.hosts.insert(
                h.into(),
                pb::Host {
                    id: h.into(),
                    address: format!("{h}:7000"),
                    state: pb::HostState::Enabled as i32,
                    ..Default::default()
                },
            );
        }
        for (id, host, desired) in vms {
            s.vms.insert(
                (*id).into(),
                pb::Vm {
                    id: (*id).into(),
                    host_id: (*host).into(),
                    desired_power_state: *desired as i32,
                    spec: Some(pb::VmSpec {
                        name: (*id).into(),
                        vcpus: 1,
                        memory_bytes: 64 << 20,
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            );
        }
        s
    }

    fn reported(r: &[(&str, &str, P)]) -> Reported {
        let mut m: Reported = BTreeMap::new();
        for h in ["h1", "h2"] {
            m.insert(h.into(), BTreeMap::new());
        }
        for (host, vm, p) in r {
            m.get_mut(*host).unwrap().insert((*vm).into(), *p as i32);
        }
        m
    }

    #[test]
    fn plan_table() {
        struct Case {
            name: &'static str,
            vms: Vec<(&'static str, &'static str, P)>,
            reported: Vec<(&'static str, &'static str, P)>,
            expect: Vec<(&'static str, Action)>,
        }
        let a = |s: &str| s.to_string();
        let cases = vec![
            Case {
                name: "desired running, absent: create",
                vms: vec![("vm1", "h1", P::Running)],
                reported: vec![],
                expect: vec![("h1", Action::Create { vm_id: a("vm1") })],
            },
            Case {
                name: "desired running, stopped: start",
                vms: vec![("vm1", "h1", P::Running)],
                reported: vec![("h1", "vm1", P::Stopped)],
                expect: vec![("h1", Action::Start { vm_id: a("vm1") })],
            },
            Case {
                name: "desired running, running: nothing",
                vms: vec![("vm1", "h1", P::Running)],
                reported: vec![("h1", "vm1", P::Running)],
                expect: vec![],
            },
            Case {
                name: "desired stopped, running: stop",
                vms: vec![("vm1", "h1", P::Stopped)],
                reported: vec![("h1", "vm1", P::Running)],
                expect: vec![(
                    "h1",
                    Action::Stop {
                        vm_id: a("vm1"),
                        force: false,
                    },
                )],
            },
            Case {
                name: "desired paused, running: pause; paused wanted running: resume",
                vms: vec![("vm1", "h1", P::Paused), ("vm2", "h1", P::Running)],
                reported: vec![("h1", "vm1", P::Running), ("h1", "vm2", P::Paused)],
                expect: vec![
                    ("h1", Action::Pause { vm_id: a("vm1") }),
                    ("h1", Action::Resume { vm_id: a("vm2") }),
                ],
            },
            Case {
                name: "running where the pool placed it elsewhere: destroy the stale copy",
                vms: vec![("vm1", "h2", P::Running)],
                reported: vec![("h1", "vm1", P::Running), ("h2", "vm1", P::Running)],
                expect: vec![("h1", Action::DestroyStale { vm_id: a("vm1") })],
            },
            Case {
                name: "unknown VM running: destroy",
                vms: vec![],
                reported: vec![("h2", "ghost", P::Running)],
                expect: vec![("h2", Action::DestroyStale { vm_id: a("ghost") })],
            },
        ];
        for c in cases {
            let s = state_with(&c.vms);
            let got: Vec<(String, Action)> = plan(&s, &reported(&c.reported))
                .into_iter()
                .map(|st| (st.host_id, st.action))
                .collect();
            let want: Vec<(String, Action)> = c
                .expect
                .into_iter()
                .map(|(h, a)| (h.to_string(), a))
                .collect();
            assert_eq!(got, want, "{}", c.name);
        }
    }

    #[test]
    fn hosts_without_reports_or_unreachable_are_left_alone() {
        let mut s = state_with(&[("vm1", "h1", P::Running)]);
        assert!(plan(&s, &BTreeMap::new()).is_empty());
        s.hosts.get_mut("h1").unwrap().state = pb::HostState::Unreachable as i32;
        assert!(plan(&s, &reported(&[])).is_empty());
    }

    /// A host double that records calls and can be told to fail.
    #[derive(Default)]
    struct FakeHosts {
        calls: StdMutex<Vec<Step>>,
        fail: StdMutex<bool>,
    }

    #[tonic::async_trait]
    impl HostActions for FakeHosts {
        async fn perform(&self, step: &Step, _vm: Option<&pb::Vm>) -> Result<(), ActionError> {
            self.calls.lock().unwrap().push(step.clone());
            if *self.fail.lock().unwrap() {
                return Err(ActionError::Refused {
                    address: step.address.clone(),
                    what: "test".into(),
                    source: tonic::Status::unavailable("down"),
                });
            }
            Ok(())
        }
    }

    #[tokio::test]
    async fn reconciler_paces_retries_and_stops_when_converged() {
        let hosts = Arc::new(FakeHosts::default());
        let mut rec = Reconciler::new(hosts.clone());
        let s = state_with(&[("vm1", "h1", P::Running)]);
        let t0 = Instant::now();
        *hosts.fail.lock().unwrap() = true;
        let r = rec.round(&s, &reported(&[]), t0).await;
        assert_eq!(r.len(), 1);
        assert!(r[0].1.is_err());
        // Within the retry window the same step is not sent again.
        assert!(
            rec.round(&s, &reported(&[]), t0 + Duration::from_secs(1))
                .await
                .is_empty()
        );
        // After it, it is retried (and succeeds now).
        *hosts.fail.lock().unwrap() = false;
        let r = rec
            .round(
                &s,
                &reported(&[]),
                t0 + Reconciler::RETRY_AFTER + Duration::from_secs(1),
            )
            .await;
        assert!(r[0].1.is_ok());
        assert_eq!(hosts.calls.lock().unwrap().len(), 2);
        // Once the host reports it running, there is nothing left to do.
        let r = rec
            .round(
                &s,
                &reported(&[("h1", "vm1", P::Running)]),
                t0 + Duration::from_secs(30),
            )
            .await;
        assert!(r.is_empty());
        // A new leader (a fresh reconciler) plans the same from the same facts.
        let mut fresh = Reconciler::new(hosts.clone());
        assert!(
            fresh
                .round(&s, &reported(&[("h1", "vm1", P::Running)]), t0)
                .await
                .is_empty()
        );
        let _ = Op::DestroyVm(ObjectId::default());
    }
}
