//! Reconciliation: the leader compares what the pool wants (committed VM placements and
//! desired power states) with what hosts report, and acts on hosts and on the storage to
//! close the gap.
//!
//! [`plan`] is pure and idempotent: the same state and reports give the same actions, and
//! an action that already took effect drops out of the next plan. So a new leader needs no
//! hand-over: it plans from the replicated state and the reports it receives, and picks up
//! where the old one stopped. [`Reconciler`] paces the actions (the same one is not
//! re-sent while it may still be in flight) and runs them through [`HostActions`], the
//! narrow interface to hosts; [`Actuator`] implements it over hostd and storaged.
//!
//! Storage access follows the VMs:
//! - before a host creates a VM, each disk's volume (an undo disk's overlay) is exported
//!   and the host's initiator granted ([`crate::jobs::vm::disk_access`]), and hostd gets
//!   iSCSI disk configs;
//! - [`plan_access`] revokes a pool host's grant on a volume once no VM that uses the
//!   volume is placed on, migrating to, or still running on that host. Hosts the pool
//!   cannot see (unreachable) keep their grants: cutting them off is fencing's job, done
//!   only with HA on and in its order (see [`crate::jobs::ha`]).
//!
//! VMs held by a job that pauses, moves, saves or restores them (snapshot, migration,
//! reboot, suspend, resume) are left to that job.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use proto::coordinator as pb;
use proto::host as hpb;
use proto::storage as spb;

use crate::coordinator::Coordinator;
use crate::jobs::{Env, JobError};
use crate::state::PoolState;
use crate::state::command::JobSpec;
use crate::state::vms::active;

/// What the reconciler does to one VM on one host.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Action {
    /// Grant the host the VM's disks, define the VM there and boot it.
    Create {
        vm_id: String,
    },
    /// The host has the VM stopped: boot it again, defined afresh from the pool's spec.
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
    /// The host has a VM the pool placed elsewhere, stopped, or no longer knows: stop
    /// and forget it.
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
    #[error("host {address} refused {what}")]
    Refused {
        address: String,
        what: String,
        #[source]
        source: tonic::Status,
    },
    #[error("VM {vm_id} is no longer in the pool state")]
    UnknownVm { vm_id: String },
    /// The pool state changed since the round planned the step (a job took the VM, or
    /// it moved): not sent, so the host does not act against the job.
    #[error("VM {vm_id} changed since this step was planned; not sent")]
    Overtaken { vm_id: String },
    #[error("preparing the VM's disks failed")]
    Disks(#[source] JobError),
}

/// Reported power states: host id → VM id → `pool.host.v1.PowerState`.
pub type Reported = BTreeMap<String, BTreeMap<String, i32>>;

/// The actions that bring hosts to the desired state. Hosts that did not report (never
/// heard from) or are unreachable are left alone: what they run is unknown. A fenced host
/// that reports again only has its stale VMs removed.
pub fn plan(state: &PoolState, reported: &Reported) -> Vec<Step> {
    use hpb::PowerState as P;
    let held = held_vms(state);
    let mut out = Vec::new();
    for (host_id, vms) in reported {
        let Some(host) = state.hosts.get(host_id) else {
            continue;
        };
        if host.state() == pb::HostState::Unreachable {
            continue;
        }
        let step = |action| Step {
            host_id: host_id.clone(),
            address: host.address.clone(),
            action,
        };
        // VMs the pool placed on this host.
        for vm in state.vms.values().filter(|v| v.host_id == *host_id) {
            if held.contains(vm.id.as_str()) {
                continue;
            }
            let have = vms.get(&vm.id).and_then(|p| P::try_from(*p).ok());
            let id = vm.id.clone();
            let a = match (vm.desired_power_state(), have) {
                (P::Running, None) => Some(Action::Create { vm_id: id }),
                (P::Running, Some(P::Stopped | P::Crashed)) => Some(Action::Start { vm_id: id }),
                (P::Running, Some(P::Paused)) => Some(Action::Resume { vm_id: id }),
                (P::Paused, Some(P::Running)) => Some(Action::Pause { vm_id: id }),
                (P::Stopped, Some(P::Running | P::Paused)) => Some(Action::Stop {
                    force: state.force_stop.contains(&id),
                    vm_id: id,
                }),
                _ => None,
            };
            out.extend(a.map(step));
        }
        // VMs the host has that the pool does not place there: running ones are stopped,
        // stopped definitions are removed (a later start defines the VM afresh).
        for vm_id in vms.keys() {
            let placed_here = state.vms.get(vm_id).is_some_and(|v| v.host_id == *host_id);
            let migrating_here = state
                .migration_of(vm_id)
                .is_some_and(|m| m.destination_host_id == *host_id || m.source_host_id == *host_id);
            if !placed_here && !migrating_here && !held.contains(vm_id.as_str()) {
                out.push(step(Action::DestroyStale {
                    vm_id: vm_id.clone(),
                }));
            }
        }
    }
    out.sort();
    out
}

/// Whether `step` still fits the pool state as it is now. A round acts after it planned,
/// and a job may have taken the VM meanwhile: a DestroyStale of the stopped definition a
/// restore is about to replace would then destroy the restored VM, and the next round
/// would boot it afresh.
fn due_now(state: &PoolState, step: &Step) -> bool {
    let vm_id = vm_of(&step.action);
    if held_vms(state).contains(vm_id) {
        return false;
    }
    let here = state
        .vms
        .get(vm_id)
        .is_some_and(|v| v.host_id == step.host_id);
    match step.action {
        Action::DestroyStale { .. } => !here && state.migration_of(vm_id).is_none(),
        _ => here,
    }
}

/// VMs a running job holds still: reconciliation leaves them to it.
fn held_vms(state: &PoolState) -> BTreeSet<&str> {
    state
        .jobs
        .values()
        .filter(|j| j.holds_vm_still())
        .filter_map(|j| j.busy_vm())
        .collect()
}

/// A grant to take back: `initiator` (of `host_id`, empty for a client outside the pool)
/// on `export_id` of storaged `address`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Revoke {
    pub address: String,
    pub export_id: String,
    pub initiator: String,
    pub host_id: String,
}

/// Grants to take back: those of pool hosts that no VM needs any more, and those of
/// clients outside the pool (an import or export's access) to a volume that a running VM
/// uses, which the VM's start revoked unless the grant raced it. `exports`: storaged
/// address → its exports as listed.
pub fn plan_access(
    state: &PoolState,
    reported: &Reported,
    exports: &BTreeMap<String, Vec<spb::Export>>,
) -> Vec<Revoke> {
    // Hosts whose grants the reconciler manages: those it can see.
    let hosts: BTreeMap<String, &pb::Host> = state
        .hosts
        .values()
        .filter(|h| {
            matches!(
                h.state(),
                pb::HostState::Enabled | pb::HostState::Disabled | pb::HostState::Maintenance
            ) && reported.contains_key(&h.id)
        })
        .filter_map(|h| {
            let iqn = h.info.as_ref()?.initiator_iqn.clone();
            (!iqn.is_empty()).then_some((iqn, h))
        })
        .collect();
    let pool_initiators: BTreeSet<&str> = state
        .hosts
        .values()
        .filter_map(|h| h.info.as_ref().map(|i| i.initiator_iqn.as_str()))
        .filter(|i| !i.is_empty())
        .collect();
    // Volumes a VM runs on (as its host reports, or moving): no outside client may have them.
    let mut in_use: BTreeSet<&str> = BTreeSet::new();
    let mut wanted: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for vm in state.vms.values() {
        let running = state.migration_of(&vm.id).is_some()
            || reported
                .values()
                .any(|vms| vms.get(&vm.id).is_some_and(|p| active(*p)));
        // What a host runs the VM on: an undo disk's overlay, where it has one.
        let disks = running_volumes(vm);
        if running {
            in_use.extend(disks.iter().copied());
        }
        let mut on: BTreeSet<&str> = BTreeSet::new();
        if !vm.host_id.is_empty() {
            on.insert(&vm.host_id);
        }
        if let Some(m) = state.migration_of(&vm.id) {
            on.insert(&m.destination_host_id);
            on.insert(&m.source_host_id);
        }
        for (h, vms) in reported {
            if vms.get(&vm.id).is_some_and(|p| active(*p)) {
                on.insert(h);
            }
        }
        for v in disks {
            wanted.entry(v).or_default().extend(on.iter());
        }
    }
    // A job that saves or restores a VM needs its host(s) to keep the VM's disks and its
    // state volume until it ends: a suspended VM is on no host, a resumed or reverted one
    // is placed only by the finish (a revert's disks are the job's `disks` output), and a
    // checkpoint's state volume is in the pool only then.
    for job in state.jobs.values() {
        let output = |k: &str| job.outputs.get(k).map(String::as_str);
        let (vm_id, hosts, state_volume) = match &job.spec {
            Some(JobSpec::SuspendVm(j)) => (
                &j.vm_id,
                vec![j.host_id.as_str(), j.resume_on_host_id.as_str()],
                output("state_volume"),
            ),
            Some(JobSpec::ResumeVm(j)) => (
                &j.vm_id,
                vec![j.host_id.as_str()],
                state.vms.get(&j.vm_id).map(|v| v.state_volume_id.as_str()),
            ),
            Some(JobSpec::SnapshotVm(j)) if j.memory => (
                &j.vm_id,
                state
                    .vms
                    .get(&j.vm_id)
                    .map(|v| vec![v.host_id.as_str()])
                    .unwrap_or_default(),
                output("state_volume"),
            ),
            Some(JobSpec::RevertVm(j)) if !j.host_id.is_empty() => (
                &j.vm_id,
                vec![j.host_id.as_str()],
                state
                    .vm_snapshots
                    .get(&j.snapshot_id)
                    .map(|s| s.state_volume_id.as_str()),
            ),
            _ => continue,
        };
        let hosts = hosts.into_iter().filter(|h| !h.is_empty());
        let disks = state.vms.get(vm_id).into_iter().flat_map(running_volumes);
        let made = output("disks").into_iter().flat_map(|d| d.split(','));
        for v in disks
            .chain(made)
            .chain(state_volume)
            .filter(|v| !v.is_empty())
        {
            wanted.entry(v).or_default().extend(hosts.clone());
        }
    }
    let mut out = Vec::new();
    for (address, list) in exports {
        for e in list {
            for g in &e.grants {
                if !pool_initiators.contains(g.initiator_iqn.as_str()) {
                    if in_use.contains(e.volume_id.as_str()) {
                        out.push(Revoke {
                            address: address.clone(),
                            export_id: e.id.clone(),
                            initiator: g.initiator_iqn.clone(),
                            host_id: String::new(),
                        });
                    }
                    continue;
                }
                let Some(h) = hosts.get(&g.initiator_iqn) else {
                    continue;
                };
                let needed = wanted
                    .get(e.volume_id.as_str())
                    .is_some_and(|w| w.contains(h.id.as_str()));
                if !needed {
                    out.push(Revoke {
                        address: address.clone(),
                        export_id: e.id.clone(),
                        initiator: g.initiator_iqn.clone(),
                        host_id: h.id.clone(),
                    });
                }
            }
        }
    }
    out.sort();
    out
}

/// The volumes a host runs a VM's disks on: each disk's, or its undo overlay.
fn running_volumes(vm: &pb::Vm) -> Vec<&str> {
    vm.spec
        .iter()
        .flat_map(|s| &s.disks)
        .map(|d| {
            vm.undo_overlays
                .iter()
                .find(|o| o.disk_id == d.disk_id)
                .map_or(d.volume_id.as_str(), |o| o.volume_id.as_str())
        })
        .collect()
}

/// A private network's VXLAN peers as each host running a VM on it should have them:
/// (host id, network id) → (host address, the network with its peers, every other pool
/// host). A host's peers are set when its VM starts there; hosts join and leave after.
pub fn plan_peers(
    state: &PoolState,
    reported: &Reported,
) -> BTreeMap<(String, String), (String, hpb::NetworkAttachment)> {
    let mut out = BTreeMap::new();
    for vm in state.vms.values() {
        let Some(host) = state.hosts.get(&vm.host_id) else {
            continue;
        };
        let runs_there = reported
            .get(&vm.host_id)
            .and_then(|vms| vms.get(&vm.id))
            .is_some_and(|p| active(*p));
        if host.state() == pb::HostState::Unreachable || !runs_there {
            continue;
        }
        for net in crate::jobs::vifs::nets_on(state, vm, &vm.host_id) {
            let Some(a) = net.network else { continue };
            if a.kind() == hpb::AttachmentKind::Private {
                out.insert(
                    (vm.host_id.clone(), a.network_id.clone()),
                    (host.address.clone(), a),
                );
            }
        }
    }
    out
}

/// The host operations reconciliation needs.
#[tonic::async_trait]
pub trait HostActions: Send + Sync {
    async fn perform(&self, step: &Step, vm: Option<&pb::Vm>) -> Result<(), ActionError>;
}

/// Task kinds whose job moves a VM, or brings it back up on a host: until the host
/// reports again, its last report shows the VM as it was before.
const MOVING_KINDS: [&str; 6] = [
    "vm.revert",
    "vm.resume",
    "vm.suspend",
    "vm.migrate",
    "vm.migrate.quick",
    "vm.reboot",
];

/// Paces actions: one that was sent is not sent again for [`Reconciler::RETRY_AFTER`].
/// A VM that such a job let go (seen held at the last round and no longer, or its task
/// finished since) is acted on only from reports its hosts sent after this round saw
/// that: an older one may show it as before the job (a restore's host listing the
/// stopped VM it replaced, a migration's source still running it), and acting on that
/// would boot the VM afresh over the one the job left running, or destroy it.
pub struct Reconciler {
    actions: Arc<dyn HostActions>,
    recent: HashMap<Step, Instant>,
    /// The VMs jobs held at the last round.
    held: BTreeSet<String>,
    /// Finished tasks already seen, and whether a round has run (a new leader's first
    /// round counts the tasks that finished before it as old).
    finished: BTreeSet<String>,
    primed: bool,
    /// When a round saw each VM let go.
    let_go: HashMap<String, Instant>,
}

impl Reconciler {
    pub const RETRY_AFTER: Duration = Duration::from_secs(10);
    /// How long a let-go VM waits for a fresh report at most (a host that does not
    /// report is left alone anyway).
    const LET_GO_FOR: Duration = Duration::from_secs(60);

    pub fn new(actions: Arc<dyn HostActions>) -> Self {
        Reconciler {
            actions,
            recent: HashMap::new(),
            held: BTreeSet::new(),
            finished: BTreeSet::new(),
            primed: false,
            let_go: HashMap::new(),
        }
    }

    /// One round: plans and performs what is due; returns what it tried and how it went.
    /// `received`: when each host's report arrived (a host not in it counts as fresh);
    /// `ended`: the pool's latest ended tasks as (task id, kind, target), [`ended_tasks`].
    pub async fn round(
        &mut self,
        state: &PoolState,
        reported: &Reported,
        received: &BTreeMap<String, Instant>,
        ended: &[(String, String, String)],
        now: Instant,
    ) -> Vec<(Step, Result<(), ActionError>)> {
        self.note_let_go(state, ended, now);
        let stale = |s: &Step| {
            let (Some(at), Some(heard)) =
                (self.let_go.get(vm_of(&s.action)), received.get(&s.host_id))
            else {
                return false;
            };
            heard <= at
        };
        let steps: Vec<Step> = plan(state, reported)
            .into_iter()
            .filter(|s| !stale(s))
            .collect();
        let keys: BTreeSet<Step> = steps.iter().map(pacing_key).collect();
        self.recent
            .retain(|s, at| keys.contains(s) && now.duration_since(*at) < Self::RETRY_AFTER);
        let due: Vec<Step> = steps
            .into_iter()
            .filter(|s| !self.recent.contains_key(&pacing_key(s)))
            .collect();
        for s in &due {
            self.recent.insert(pacing_key(s), now);
        }
        // Hosts act at once; one slow host does not hold up the others.
        let runs = due.into_iter().map(|s| {
            let actions = self.actions.clone();
            let vm = state.vms.get(vm_of(&s.action)).cloned();
            async move {
                let r = actions.perform(&s, vm.as_ref()).await;
                (s, r)
            }
        });
        join_all(runs).await
    }
}

impl Reconciler {
    /// Records the VMs jobs let go since the last round (see [`Reconciler`]).
    fn note_let_go(&mut self, state: &PoolState, ended: &[(String, String, String)], now: Instant) {
        let held: BTreeSet<String> = held_vms(state).into_iter().map(str::to_owned).collect();
        let mut gone: Vec<String> = self.held.difference(&held).cloned().collect();
        self.held = held;
        let mut still = BTreeSet::new();
        for (id, kind, target) in ended {
            still.insert(id.clone());
            if !self.finished.contains(id) && self.primed && MOVING_KINDS.contains(&kind.as_str()) {
                gone.push(target.clone());
            }
        }
        self.finished = still;
        self.primed = true;
        for vm in gone {
            self.let_go.insert(vm, now);
        }
        self.let_go
            .retain(|_, at| now.duration_since(*at) < Self::LET_GO_FOR);
    }
}

/// What pacing counts as the same action. Booting a VM is one action whether it is a
/// Create or a Start: a report the host sent while the boot was in flight shows the VM
/// defined but stopped, and must not make the next round boot it again (a Start destroys
/// the definition first, which would kill the VM that is booting).
fn pacing_key(s: &Step) -> Step {
    match &s.action {
        Action::Start { vm_id } => Step {
            action: Action::Create {
                vm_id: vm_id.clone(),
            },
            ..s.clone()
        },
        _ => s.clone(),
    }
}

fn vm_of(a: &Action) -> &str {
    match a {
        Action::Create { vm_id }
        | Action::Start { vm_id }
        | Action::Stop { vm_id, .. }
        | Action::Pause { vm_id }
        | Action::Resume { vm_id }
        | Action::DestroyStale { vm_id } => vm_id,
    }
}

/// Runs futures concurrently and collects their outputs in order.
async fn join_all<F: std::future::Future + Send + 'static>(
    fs: impl Iterator<Item = F>,
) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let handles: Vec<_> = fs.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        if let Ok(v) = h.await {
            out.push(v);
        }
    }
    out
}

/// [`HostActions`] over hostd (and storaged, for the disks of a VM being created).
pub struct Actuator {
    pub env: Env,
}

#[tonic::async_trait]
impl HostActions for Actuator {
    async fn perform(&self, step: &Step, vm: Option<&pb::Vm>) -> Result<(), ActionError> {
        if !crate::jobs::read(&*self.env.ledger, |s| due_now(s, step)) {
            return Err(ActionError::Overtaken {
                vm_id: vm_of(&step.action).to_owned(),
            });
        }
        let h = &self.env.hosts;
        let addr = step.address.as_str();
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
            Action::Create { vm_id } | Action::Start { vm_id } => {
                // A stopped VM is booted from the pool's spec, not from the definition the
                // host kept: the spec may have changed since (command line, memory, disks
                // after a revert), so that definition goes first.
                if matches!(step.action, Action::Start { .. }) {
                    match h.destroy_vm(addr, vm_id).await {
                        Ok(()) => {}
                        Err(s) if s.code() == tonic::Code::NotFound => {}
                        Err(s) => return Err(refused("DestroyVm")(s)),
                    }
                }
                let vm = vm.ok_or_else(|| ActionError::UnknownVm {
                    vm_id: vm_id.clone(),
                })?;
                let access = crate::jobs::vm::disk_access(&self.env, vm, &step.host_id)
                    .await
                    .map_err(ActionError::Disks)?;
                let start = vm.desired_power_state() == hpb::PowerState::Running;
                h.create_vm(
                    addr,
                    hpb::CreateVmRequest {
                        vm_id: vm_id.clone(),
                        config: Some(crate::jobs::vm::vm_config(vm, access)),
                        start,
                    },
                )
                .await
                .map_err(refused("CreateVm"))?;
            }
            Action::Stop { vm_id, force } => {
                h.shutdown_vm(addr, vm_id, *force)
                    .await
                    .map_err(refused("ShutdownVm"))?;
            }
            Action::Pause { vm_id } => {
                h.pause_vm(addr, vm_id).await.map_err(refused("PauseVm"))?;
            }
            Action::Resume { vm_id } => {
                h.resume_vm(addr, vm_id)
                    .await
                    .map_err(refused("ResumeVm"))?;
            }
            Action::DestroyStale { vm_id } => match h.destroy_vm(addr, vm_id).await {
                Ok(()) => {}
                Err(s) if s.code() == tonic::Code::NotFound => {}
                Err(s) => return Err(refused("DestroyVm")(s)),
            },
        }
        Ok(())
    }
}

/// How many of the pool's latest tasks a round looks at for ended jobs: far more than
/// end between two rounds.
const ENDED_LOOKED_AT: usize = 256;

/// The latest ended tasks of `state` (the full state: a round's copy has no tasks), as
/// (task id, kind, target).
fn ended_tasks(state: &PoolState) -> Vec<(String, String, String)> {
    state
        .task_order
        .iter()
        .rev()
        .take(ENDED_LOOKED_AT)
        .filter_map(|id| state.tasks.get(id))
        .filter(|t| {
            matches!(
                t.state(),
                pb::TaskState::Succeeded | pb::TaskState::Failed | pb::TaskState::Cancelled
            )
        })
        .map(|t| (t.id.clone(), t.kind.clone(), t.target_id.clone()))
        .collect()
}

/// The VMs each host last reported, and when that report arrived.
fn reports(c: &Coordinator) -> (Reported, BTreeMap<String, Instant>) {
    let live = c.liveness.lock().expect("liveness lock");
    let vms = live.iter().map(|(h, l)| (h.clone(), l.vms.clone()));
    let at = live.iter().map(|(h, l)| (h.clone(), l.last_seen));
    (vms.collect(), at.collect())
}

/// Leader-only loop: a reconciliation round every half second (VMs), and one every two
/// seconds for storage access.
pub async fn run(c: Arc<Coordinator>, env: Env, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let mut rec = Reconciler::new(Arc::new(Actuator { env: env.clone() }));
    let mut revoked: HashMap<Revoke, Instant> = HashMap::new();
    // The peers each (host, private network) was last given, so unchanged sets are not
    // sent again.
    let mut peers_sent: HashMap<(String, String), Vec<String>> = HashMap::new();
    let mut round = 0u64;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = shutdown.changed() => {}
        }
        if *shutdown.borrow() {
            return;
        }
        if c.leader_term_start().is_none() {
            continue;
        }
        round += 1;
        let (reported, received) = reports(&c);
        if reported.is_empty() {
            continue;
        }
        let (state, ended) = {
            let full = c.node.state();
            (Arc::new(full.clone_without_history()), ended_tasks(&full))
        };
        let now = Instant::now();
        for (step, r) in rec.round(&state, &reported, &received, &ended, now).await {
            match r {
                Ok(()) => tracing::info!(?step, "reconciled"),
                Err(e @ ActionError::Overtaken { .. }) => tracing::info!(?step, "{e}"),
                Err(e) => {
                    tracing::warn!(?step, error = %e, cause = ?std::error::Error::source(&e), "reconciliation step failed; will retry")
                }
            }
        }
        if !round.is_multiple_of(4) {
            continue;
        }
        let peers = plan_peers(&state, &reported);
        peers_sent.retain(|k, _| peers.contains_key(k));
        for (key, (addr, network)) in peers {
            if peers_sent.get(&key) == Some(&network.peers) {
                continue;
            }
            let want = network.peers.clone();
            match env.hosts.set_network_peers(&addr, network).await {
                Ok(r) => {
                    if !r.added.is_empty() || !r.removed.is_empty() {
                        tracing::info!(host = %key.0, network = %key.1, added = ?r.added, removed = ?r.removed, "private network peers updated");
                    }
                    if r.present {
                        peers_sent.insert(key, want);
                    }
                }
                Err(e) => {
                    tracing::warn!(host = %key.0, network = %key.1, error = %e, "setting private network peers failed; will retry")
                }
            }
        }
        let mut addrs: Vec<String> = state.srs.values().map(|s| s.address.clone()).collect();
        addrs.sort();
        addrs.dedup();
        let mut exports = BTreeMap::new();
        for a in addrs {
            if let Ok(list) = env.storage.list_exports(&a, "").await {
                exports.insert(a, list);
            }
        }
        // The state and reports are read again after the listing: a client granted a disk
        // of a VM that had just stopped is listed with its grant, and the VM seen running
        // in the round's older reports would have that grant taken away.
        let (reported, _) = reports(&c);
        let state = c.node.state().clone_without_history();
        let now = Instant::now();
        revoked.retain(|_, at| now.duration_since(*at) < Reconciler::RETRY_AFTER);
        for r in plan_access(&state, &reported, &exports) {
            if revoked.contains_key(&r) {
                continue;
            }
            revoked.insert(r.clone(), now);
            match env
                .storage
                .revoke(&r.address, &r.export_id, &r.initiator)
                .await
            {
                Ok(n) => tracing::info!(?r, sessions = n, "revoked a grant no VM needs"),
                Err(e) if e.code() == tonic::Code::NotFound => {}
                Err(e) => tracing::warn!(?r, error = %e, "revoke failed; will retry"),
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

    /// Export `id` of volume `vol`, granted to `grants`.
    fn export(id: &str, vol: &str, grants: &[&str]) -> spb::Export {
        spb::Export {
            id: id.into(),
            volume_id: vol.into(),
            grants: grants
                .iter()
                .map(|g| spb::AccessGrant {
                    initiator_iqn: (*g).into(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }
    #[test]
    fn an_undo_vms_host_keeps_its_overlay_and_gives_back_the_base() {
        let mut state = crate::jobs::test_utils::World::two_hosts_one_running_vm().state();
        let vm = state.vms.get_mut("vm1").unwrap();
        vm.spec.as_mut().unwrap().disks[0].undo = true;
        vm.undo_overlays = vec![pb::UndoOverlay {
            disk_id: "vda".into(),
            volume_id: "ov1".into(),
            snapshot_id: "s1".into(),
        }];
        let client = "iqn.2026-11.lab:poolctl-export";
        let exports = BTreeMap::from([(
            "st:1".to_string(),
            vec![
                export("e-vol1", "vol1", &["iqn.h1"]),
                export("e-ov1", "ov1", &["iqn.h1", client]),
            ],
        )]);
        let running: Reported = BTreeMap::from([
            (
                "h1".into(),
                BTreeMap::from([("vm1".into(), P::Running as i32)]),
            ),
            ("h2".into(), BTreeMap::new()),
        ]);
        let revokes: Vec<(String, String)> = plan_access(&state, &running, &exports)
            .into_iter()
            .map(|r| (r.export_id, r.initiator))
            .collect();
        assert_eq!(
            revokes,
            [
                ("e-ov1".to_string(), client.to_string()),
                ("e-vol1".to_string(), "iqn.h1".to_string()),
            ]
        );
    }

    #[test]
    fn a_clients_grant_goes_only_from_a_volume_a_vm_runs_on() {
        let state = crate::jobs::test_utils::World::two_hosts_one_running_vm().state();
        let client = "iqn.2026-11.lab:poolctl-export";
        let exports = BTreeMap::from([(
            "st:1".to_string(),
            vec![
                export("e-vol1", "vol1", &["iqn.h1", client]),
                export("e-vol9", "vol9", &[client]),
            ],
        )]);
        let running: Reported = BTreeMap::from([
            (
                "h1".into(),
                BTreeMap::from([("vm1".into(), P::Running as i32)]),
            ),
            ("h2".into(), BTreeMap::new()),
        ]);
        let revokes = plan_access(&state, &running, &exports);
        assert_eq!(
            revokes,
            vec![Revoke {
                address: "st:1".into(),
                export_id: "e-vol1".into(),
                initiator: client.into(),
                host_id: String::new(),
            }]
        );
        // Stopped, its disk may be exported or imported.
        let stopped: Reported = BTreeMap::from([
            (
                "h1".into(),
                BTreeMap::from([("vm1".into(), P::Stopped as i32)]),
            ),
            ("h2".into(), BTreeMap::new()),
        ]);
        assert!(
            plan_access(&state, &stopped, &exports)
                .iter()
                .all(|r| r.initiator != client)
        );
    }

    /// A suspended VM is on no host, so its hosts' grants go; while a resume job runs,
    /// the host it restores on keeps the disks and the state volume it was granted, and
    /// the VM that host already runs is left to the job.
    #[test]
    fn a_resume_keeps_its_hosts_grants_and_its_restored_vm() {
        let world = crate::jobs::test_utils::World::two_hosts_one_running_vm();
        {
            let mut s = world.ledger.state.lock().unwrap();
            let vm = s.vms.get_mut("vm1").unwrap();
            vm.host_id.clear();
            vm.power_state = P::Suspended as i32;
            vm.desired_power_state = P::Suspended as i32;
            vm.state_volume_id = "st1".into();
            let st1 = spb::Volume {
                id: "st1".into(),
                pool_id: "sr1".into(),
                ..Default::default()
            };
            s.volumes.insert("st1".into(), st1);
            s.rebuild_alloc();
        }
        let export = |vol: &str, grants: &[&str]| spb::Export {
            id: format!("e-{vol}"),
            volume_id: vol.into(),
            grants: grants
                .iter()
                .map(|g| spb::AccessGrant {
                    initiator_iqn: (*g).into(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        let exports = BTreeMap::from([(
            "st:1".to_string(),
            vec![
                export("vol1", &["iqn.h1", "iqn.h2"]),
                export("st1", &["iqn.h1", "iqn.h2"]),
            ],
        )]);
        let reported: Reported = BTreeMap::from([
            ("h1".into(), BTreeMap::new()),
            (
                "h2".into(),
                BTreeMap::from([("vm1".into(), P::Running as i32)]),
            ),
        ]);
        let revoked = |state: &PoolState| -> Vec<(String, String)> {
            plan_access(state, &reported, &exports)
                .into_iter()
                .map(|r| (r.export_id, r.host_id))
                .collect()
        };
        // No job: h2 runs a VM the pool placed nowhere (a stale copy).
        let idle = world.state();
        assert!(plan(&idle, &reported).iter().any(|s| s.action
            == Action::DestroyStale {
                vm_id: "vm1".into()
            }));
        world.start_job(Job {
            spec: Some(JobSpec::ResumeVm(ResumeVmJob {
                vm_id: "vm1".into(),
                host_id: "h2".into(),
            })),
            ..Default::default()
        });
        let resuming = world.state();
        assert_eq!(
            revoked(&resuming),
            [
                ("e-st1".to_string(), "h1".to_string()),
                ("e-vol1".to_string(), "h1".to_string())
            ]
        );
        assert!(plan(&resuming, &reported).is_empty());
    }

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
        let r = rec
            .round(&s, &reported(&[]), &BTreeMap::new(), &[], t0)
            .await;
        assert_eq!(r.len(), 1);
        assert!(r[0].1.is_err());
        // Within the retry window the same step is not sent again.
        assert!(
            rec.round(
                &s,
                &reported(&[]),
                &BTreeMap::new(),
                &[],
                t0 + Duration::from_secs(1)
            )
            .await
            .is_empty()
        );
        // After it, it is retried (and succeeds now).
        *hosts.fail.lock().unwrap() = false;
        let r = rec
            .round(
                &s,
                &reported(&[]),
                &BTreeMap::new(),
                &[],
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
                &BTreeMap::new(),
                &[],
                t0 + Duration::from_secs(30),
            )
            .await;
        assert!(r.is_empty());
        // A new leader (a fresh reconciler) plans the same from the same facts.
        let mut fresh = Reconciler::new(hosts.clone());
        assert!(
            fresh
                .round(
                    &s,
                    &reported(&[("h1", "vm1", P::Running)]),
                    &BTreeMap::new(),
                    &[],
                    t0
                )
                .await
                .is_empty()
        );
        let _ = Op::DestroyVm(ObjectId::default());
    }

    /// A VM a job has just let go (here a restore that replaced the stopped VM h1 had) is
    /// not booted afresh on a report h1 sent before that: only on one sent after.
    #[tokio::test]
    async fn a_vm_a_job_let_go_waits_for_a_report_sent_after() {
        let hosts = Arc::new(FakeHosts::default());
        let mut rec = Reconciler::new(hosts.clone());
        let mut s = state_with(&[("vm1", "", P::Stopped)]);
        s.jobs.insert(
            "t1".into(),
            Job {
                task_id: "t1".into(),
                spec: Some(JobSpec::RevertVm(RevertVmJob {
                    vm_id: "vm1".into(),
                    snapshot_id: "cp".into(),
                    host_id: "h1".into(),
                })),
                ..Default::default()
            },
        );
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let stopped = reported(&[("h1", "vm1", P::Stopped)]);
        let heard = |ms| BTreeMap::from([("h1".to_string(), at(ms))]);
        assert!(
            rec.round(&s, &stopped, &heard(0), &[], at(0))
                .await
                .is_empty()
        );
        // The job ends: vm1 runs on h1. h1's last report is from before.
        s.jobs.clear();
        let vm = s.vms.get_mut("vm1").unwrap();
        vm.host_id = "h1".into();
        vm.power_state = P::Running as i32;
        vm.desired_power_state = P::Running as i32;
        assert!(
            rec.round(&s, &stopped, &heard(400), &[], at(500))
                .await
                .is_empty()
        );
        assert!(
            rec.round(&s, &stopped, &heard(400), &[], at(1000))
                .await
                .is_empty()
        );
        // A report sent after shows it running: nothing to do; one showing it stopped
        // (it really stopped) is acted on.
        let running = reported(&[("h1", "vm1", P::Running)]);
        assert!(
            rec.round(&s, &running, &heard(1200), &[], at(1500))
                .await
                .is_empty()
        );
        let r = rec.round(&s, &stopped, &heard(1700), &[], at(2000)).await;
        assert_eq!(
            r.iter()
                .map(|(st, _)| st.action.clone())
                .collect::<Vec<_>>(),
            [Action::Start {
                vm_id: "vm1".into()
            }]
        );
        // A job that started and ended between two rounds (its finished task says so):
        // vm1 resumed on h2, whose last report still has the VM it replaced, stopped.
        let ended = [("t2".to_string(), "vm.resume".to_string(), "vm1".to_string())];
        s.vms.get_mut("vm1").unwrap().host_id = "h2".into();
        let on_h2 = |p| reported(&[("h2", "vm1", p)]);
        let heard_h2 = |ms| BTreeMap::from([("h2".to_string(), at(ms))]);
        let r = rec
            .round(&s, &on_h2(P::Stopped), &heard_h2(2900), &ended, at(3000))
            .await;
        assert!(r.is_empty(), "{r:?}");
        let r = rec
            .round(&s, &on_h2(P::Stopped), &heard_h2(3200), &ended, at(3500))
            .await;
        assert_eq!(r.len(), 1, "{r:?}");
    }

    /// A step planned before a job took its VM (or moved it) is not sent.
    #[test]
    fn a_step_overtaken_by_a_job_or_a_move_is_no_longer_due() {
        let mut s = state_with(&[("vm1", "", P::Stopped)]);
        let step = |host: &str, action| Step {
            host_id: host.into(),
            address: format!("{host}:7000"),
            action,
        };
        let destroy = step(
            "h1",
            Action::DestroyStale {
                vm_id: "vm1".into(),
            },
        );
        assert!(due_now(&s, &destroy));
        s.jobs.insert(
            "t1".into(),
            Job {
                task_id: "t1".into(),
                spec: Some(JobSpec::RevertVm(RevertVmJob {
                    vm_id: "vm1".into(),
                    snapshot_id: "cp".into(),
                    host_id: "h1".into(),
                })),
                ..Default::default()
            },
        );
        assert!(!due_now(&s, &destroy), "the revert restores it there");
        s.jobs.clear();
        s.vms.get_mut("vm1").unwrap().host_id = "h1".into();
        assert!(!due_now(&s, &destroy), "placed there now");
        let create = step(
            "h2",
            Action::Create {
                vm_id: "vm1".into(),
            },
        );
        assert!(!due_now(&s, &create), "placed elsewhere now");
        assert!(due_now(
            &s,
            &step(
                "h1",
                Action::Create {
                    vm_id: "vm1".into()
                }
            )
        ));
    }

    #[test]
    fn a_private_networks_peers_follow_the_pools_hosts() {
        let mut s = state_with(&[("vm1", "h1", P::Running), ("vm2", "h2", P::Running)]);
        for (id, kind) in [
            ("net1", pb::NetworkKind::Private),
            ("net2", pb::NetworkKind::Internal),
        ] {
            s.networks.insert(
                id.into(),
                pb::Network {
                    id: id.into(),
                    name: id.into(),
                    kind: kind as i32,
                    mtu: 1500,
                    vni: 7,
                    ..Default::default()
                },
            );
        }
        let vif = |vm: &str, net: &str| pb::Vif {
            id: format!("{vm}-{net}"),
            vm_id: vm.into(),
            network_id: net.into(),
            mac: "02:00:00:00:00:01".into(),
            ..Default::default()
        };
        s.vms.get_mut("vm1").unwrap().vifs = vec![vif("vm1", "net1"), vif("vm1", "net2")];
        s.vms.get_mut("vm2").unwrap().vifs = vec![vif("vm2", "net1")];
        // vm2 does not run yet: only h1 carries the private network.
        let peers = |s: &PoolState, r: &Reported| -> Vec<(String, String, Vec<String>)> {
            plan_peers(s, r)
                .into_iter()
                .map(|((h, n), (_, a))| (h, n, a.peers))
                .collect()
        };
        let r = reported(&[("h1", "vm1", P::Running)]);
        assert_eq!(
            peers(&s, &r),
            [("h1".into(), "net1".into(), vec!["h2".into()])]
        );
        // A host joins: both carriers get it as a peer.
        s.hosts.insert(
            "h3".into(),
            pb::Host {
                id: "h3".into(),
                address: "h3:7000".into(),
                state: pb::HostState::Enabled as i32,
                ..Default::default()
            },
        );
        let r = reported(&[("h1", "vm1", P::Running), ("h2", "vm2", P::Running)]);
        assert_eq!(
            peers(&s, &r),
            [
                ("h1".into(), "net1".into(), vec!["h2".into(), "h3".into()]),
                ("h2".into(), "net1".into(), vec!["h1".into(), "h3".into()]),
            ]
        );
    }

    #[tokio::test]
    async fn a_vm_booting_is_not_booted_again_on_a_report_sent_meanwhile() {
        let hosts = Arc::new(FakeHosts::default());
        let mut rec = Reconciler::new(hosts.clone());
        let s = state_with(&[("vm1", "h1", P::Running)]);
        let t0 = Instant::now();
        let r = rec
            .round(&s, &reported(&[]), &BTreeMap::new(), &[], t0)
            .await;
        assert!(matches!(
            r[..],
            [(
                Step {
                    action: Action::Create { .. },
                    ..
                },
                Ok(())
            )]
        ));
        // The host's next report was made while the VM process was starting: defined,
        // stopped. Booting it again (a Start) would destroy the VM that is booting.
        let stopped = reported(&[("h1", "vm1", P::Stopped)]);
        let r = rec
            .round(
                &s,
                &stopped,
                &BTreeMap::new(),
                &[],
                t0 + Duration::from_secs(1),
            )
            .await;
        assert!(r.is_empty(), "{r:?}");
        // A VM still stopped after the retry window is started.
        let r = rec
            .round(
                &s,
                &stopped,
                &BTreeMap::new(),
                &[],
                t0 + Reconciler::RETRY_AFTER + Duration::from_secs(1),
            )
            .await;
        assert!(matches!(
            r[..],
            [(
                Step {
                    action: Action::Start { .. },
                    ..
                },
                Ok(())
            )]
        ));
        assert_eq!(hosts.calls.lock().unwrap().len(), 2);
    }
}
