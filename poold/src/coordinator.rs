//! The member's request logic between the gRPC services and the Raft node: writes go to
//! the leader (forwarded when this member follows), reads pass a ReadIndex barrier first,
//! placements are scheduled and committed, the Raft group's members and leader change,
//! host heartbeats are tracked.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prost::Message as _;
use proto::coordinator as pb;
use proto::coordinator::coordinator_peer_service_client::CoordinatorPeerServiceClient;
use raft::eraftpb::{ConfChangeSingle, ConfChangeTransition, ConfChangeType, ConfChangeV2};
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::auth::Caller;
use crate::consensus::transport::{Faults, member_address};
use crate::consensus::{NodeError, NodeHandle};
use crate::scheduler;
use crate::state::PoolState;
use crate::state::command::{Command, CommandResult, MemberChange, MemberRecord, Op};

/// How long a write may wait for a leader and its commit before the caller hears
/// "unavailable" (and retries with the same request id).
pub const WRITE_DEADLINE: Duration = Duration::from_secs(8);
/// How long a read may wait for its ReadIndex barrier.
pub const READ_DEADLINE: Duration = Duration::from_secs(5);
/// How long a leadership transfer may take: the new leader must first have the whole log.
pub const LEADERSHIP_TRANSFER_DEADLINE: Duration = Duration::from_secs(5);

/// A change of the Raft group's members, as a person asks for it.
#[derive(Debug, Clone, PartialEq)]
pub enum MembershipChange {
    /// A new member at `address`: a voter, or a learner that only follows the log. With
    /// `replaces`, the old member leaves in the same (joint-consensus) change.
    Add {
        id: u64,
        address: String,
        learner: bool,
        replaces: Option<u64>,
    },
    Remove {
        id: u64,
    },
}

impl MembershipChange {
    /// The Raft configuration change, and the members whose addresses it records.
    fn conf_change(&self) -> (Vec<(ConfChangeType, u64)>, Vec<MemberRecord>) {
        match self {
            MembershipChange::Add {
                id,
                address,
                learner,
                replaces,
            } => {
                let add = if *learner {
                    ConfChangeType::AddLearnerNode
                } else {
                    ConfChangeType::AddNode
                };
                let mut changes = vec![(add, *id)];
                if let Some(old) = replaces {
                    changes.push((ConfChangeType::RemoveNode, *old));
                }
                let record = MemberRecord {
                    id: *id,
                    address: address.clone(),
                };
                (changes, vec![record])
            }
            MembershipChange::Remove { id } => (vec![(ConfChangeType::RemoveNode, *id)], vec![]),
        }
    }
}

/// What the leader keeps in memory about each host between committed reports.
#[derive(Debug, Clone)]
pub struct Liveness {
    pub last_seen: Instant,
    pub last_committed: Instant,
    pub sequence: u64,
    pub vms: BTreeMap<String, i32>,
    pub metrics: Option<proto::host::HostMetrics>,
    /// Samples for the history's finest tier taken since the last committed report, at
    /// most one per [`crate::history::FINEST_S`]; they ride on the next committed report.
    pub fine: crate::history::FineSamples,
}

pub struct Coordinator {
    pub node: NodeHandle,
    pub faults: Arc<Faults>,
    pub seeds: BTreeMap<u64, String>,
    /// This member's credentials: every call it makes goes over mutual TLS with them.
    pub tls: Option<crate::tls::LiveTls>,
    peers: Mutex<HashMap<u64, PeerClient>>,
    /// Leader-only soft state: hosts' last heartbeats, and when this member became leader
    /// (hosts it has not heard from yet get the timeout counted from then).
    pub liveness: Mutex<HashMap<String, Liveness>>,
    pub leader_since: Mutex<Option<(u64, Instant)>>,
    /// One-shot tickets for the web console's websockets (this member's only).
    pub console_tickets: crate::service::pool::console::Tickets,
    /// Where this member may write backup chains (`--backup-root`); none: nowhere.
    pub backup_roots: Arc<[std::path::PathBuf]>,
}

/// A client of another member: its address and the TLS generation it was made with.
type PeerClient = (String, u64, CoordinatorPeerServiceClient<Channel>);

pub fn node_status(e: NodeError) -> Status {
    match e {
        NodeError::NotLeader { .. } | NodeError::LeadershipLost | NodeError::Dropped(_) => {
            Status::unavailable(format!("{e}; retry with the same request_id"))
        }
        NodeError::Stopped => Status::unavailable("this member is shutting down"),
        NodeError::BadMemberChange(e) => Status::failed_precondition(e.to_string()),
        NodeError::ChangeRejected(m) => Status::failed_precondition(m),
    }
}

/// Metadata key marking a refusal that the state machine already wrote to the audit log.
pub const AUDITED: &str = "x-pool-audited";

fn audited(mut s: Status) -> Status {
    s.metadata_mut()
        .insert(AUDITED, tonic::metadata::MetadataValue::from_static("1"));
    s
}

pub fn task_finished(t: &pb::Task) -> bool {
    matches!(
        pb::TaskState::try_from(t.state),
        Ok(pb::TaskState::Succeeded | pb::TaskState::Failed | pb::TaskState::Cancelled)
    )
}

fn retryable(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable | Code::Aborted | Code::DeadlineExceeded
    )
}

impl Coordinator {
    pub fn new(
        node: NodeHandle,
        faults: Arc<Faults>,
        seeds: BTreeMap<u64, String>,
        tls: Option<crate::tls::LiveTls>,
    ) -> Self {
        Coordinator {
            node,
            faults,
            seeds,
            tls,
            peers: Mutex::new(HashMap::new()),
            liveness: Mutex::new(HashMap::new()),
            leader_since: Mutex::new(None),
            console_tickets: Default::default(),
            backup_roots: Arc::from([]),
        }
    }

    pub fn id(&self) -> u64 {
        self.node.id
    }

    pub fn pool_id(&self) -> String {
        self.node.state().pool_id.clone()
    }

    pub fn is_leader(&self) -> bool {
        let st = self.node.status();
        st.leader_id == st.id
    }

    /// Makes a command for `op` with the caller's request id (or a fresh one, so that the
    /// retries below stay idempotent). A command a person asked for (the caller names a
    /// method) is written to the audit log when applied.
    pub fn command(&self, caller: &Caller, request_id: &str, op: Op) -> Command {
        Command {
            request_id: if request_id.is_empty() {
                format!("auto-{}", pool_client::random_uuid())
            } else {
                request_id.to_owned()
            },
            at_ms: proto::unix_ms(),
            task_id: pool_client::random_uuid().to_string(),
            requested_by: caller.name.clone(),
            method: caller.method.clone(),
            peer: caller.peer.clone(),
            op: Some(op),
        }
    }

    /// Commits a command through the leader and returns its result, retrying while there
    /// is no leader or leadership moves.
    pub async fn submit(&self, cmd: &Command) -> Result<CommandResult, Status> {
        let bytes = cmd.encode_to_vec();
        let deadline = Instant::now() + WRITE_DEADLINE;
        let mut last = Status::unavailable("no leader elected yet");
        while Instant::now() < deadline {
            match self.submit_once(&bytes, deadline).await {
                Ok(r) => return Ok(r),
                Err(s) if retryable(&s) => {
                    last = s;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(s) => return Err(s),
            }
        }
        Err(Status::unavailable(format!(
            "could not commit within {WRITE_DEADLINE:?}: {}; retry with the same request_id",
            last.message()
        )))
    }

    async fn submit_once(&self, bytes: &[u8], deadline: Instant) -> Result<CommandResult, Status> {
        let st = self.node.status();
        if st.leader_id == 0 {
            return Err(Status::unavailable("no leader elected yet"));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if st.leader_id == st.id {
            let r = tokio::time::timeout(left, self.node.propose(bytes.to_vec()))
                .await
                .map_err(|_| Status::deadline_exceeded("commit timed out"))?
                .map_err(node_status)?;
            return Ok(r.0);
        }
        if self.faults.blocks(st.leader_id) {
            return Err(Status::unavailable(format!(
                "leader {} is unreachable from this member",
                st.leader_id
            )));
        }
        let mut client = self.peer_client(st.leader_id)?;
        let req = pb::ProposeRequest {
            pool_id: self.pool_id(),
            command: bytes.to_vec(),
            from_member_id: self.id(),
        };
        let resp = tokio::time::timeout(left, client.propose(req))
            .await
            .map_err(|_| Status::deadline_exceeded("forwarded commit timed out"))??;
        CommandResult::decode(resp.into_inner().result.as_slice())
            .map_err(|e| Status::internal(format!("leader sent an undecodable result: {e}")))
    }

    /// A client for another member's CoordinatorPeerService (connected lazily).
    pub fn peer_client(&self, id: u64) -> Result<CoordinatorPeerServiceClient<Channel>, Status> {
        let addr = member_address(&self.node.shared, &self.seeds, id)
            .ok_or_else(|| Status::unavailable(format!("no address known for member {id}")))?;
        let generation = crate::tls::generation(self.tls.as_ref());
        let mut peers = self.peers.lock().expect("peers lock");
        if let Some((a, g, c)) = peers.get(&id)
            && *a == addr
            && *g == generation
        {
            return Ok(c.clone());
        }
        let ch = crate::tls::endpoint(
            &addr,
            self.tls.as_ref(),
            Some(&pool_trust::Identity::Member(id)),
        )?
        .connect_lazy();
        let c = CoordinatorPeerServiceClient::new(ch)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20);
        peers.insert(id, (addr, generation, c.clone()));
        Ok(c)
    }

    /// Commits and turns the result into the call's answer. A refusal by the state
    /// machine carries the [`AUDITED`] mark (the apply wrote it to the audit log).
    pub async fn write(
        &self,
        caller: &Caller,
        request_id: &str,
        op: Op,
    ) -> Result<pb::Task, Status> {
        let cmd = self.command(caller, request_id, op);
        self.submit(&cmd).await?.into_status().map_err(audited)
    }

    /// [`Coordinator::write`], then waits up to `wait` for the task to end, so a quick job
    /// answers finished (the caller follows a longer one with GetTask or WatchTask).
    pub async fn write_and_wait(
        &self,
        caller: &Caller,
        request_id: &str,
        op: Op,
        wait: Duration,
    ) -> Result<pb::Task, Status> {
        let task = self.write(caller, request_id, op).await?;
        Ok(self.wait_task(task, wait).await)
    }

    /// The task once it ends, or as it is after `wait`.
    pub async fn wait_task(&self, task: pb::Task, wait: Duration) -> pb::Task {
        let deadline = tokio::time::Instant::now() + wait;
        let mut applied = self.node.shared.applied.subscribe();
        let mut last = task;
        loop {
            if let Some(t) = self.node.state().task(&last.id) {
                last = t;
            }
            if task_finished(&last) {
                return last;
            }
            if tokio::time::timeout_at(deadline, applied.changed())
                .await
                .is_err()
            {
                return last;
            }
        }
    }

    /// Runs `f` on state that includes every write committed before the call.
    pub async fn read<T>(&self, f: impl FnOnce(&PoolState) -> T) -> Result<T, Status> {
        if self.faults.enabled() {
            let st = self.node.status();
            if st.leader_id != st.id && self.faults.blocks(st.leader_id) {
                return Err(Status::unavailable(
                    "the leader is unreachable from this member",
                ));
            }
        }
        tokio::time::timeout(READ_DEADLINE, self.node.read_barrier())
            .await
            .map_err(|_| Status::unavailable("read barrier timed out: no quorum reachable"))?
            .map_err(node_status)?;
        Ok(f(&self.node.state()))
    }

    /// Chooses a host for the VM (or `preferred` after checking it) on current state;
    /// `networks` are the ids of the networks its VIFs are on.
    pub async fn schedule(
        &self,
        spec: &pb::VmSpec,
        networks: &[&str],
        preferred: &str,
    ) -> Result<String, Status> {
        self.read(|s| {
            let demand = s.demand_on(spec, networks);
            let policy = s.policy();
            if !preferred.is_empty() {
                let h = s
                    .hosts
                    .get(preferred)
                    .ok_or_else(|| Status::not_found(format!("no host with id {preferred}")))?;
                let r = scheduler::hard_filters(&s.candidate(h), &demand, &policy);
                if !r.is_empty() {
                    return Err(Status::failed_precondition(format!(
                        "host {preferred} cannot take the VM: {}",
                        r.iter()
                            .map(|x| x.to_string())
                            .collect::<Vec<_>>()
                            .join("; ")
                    )));
                }
                return Ok(preferred.to_owned());
            }
            let hosts = s.candidates();
            scheduler::place(&hosts, &demand, &policy)
                .map(|i| hosts[i].id.clone())
                .map_err(|u| Status::resource_exhausted(u.to_string()))
        })
        .await?
    }

    /// Places and commits: scheduling is redone when the commit finds that another
    /// placement took the room first (the state machine answers ABORTED then).
    pub async fn place_and_commit(
        &self,
        caller: &Caller,
        request_id: &str,
        spec: &pb::VmSpec,
        networks: &[&str],
        preferred: &str,
        make: impl Fn(String) -> Op,
    ) -> Result<pb::Task, Status> {
        let request_id = if request_id.is_empty() {
            format!("auto-{}", pool_client::random_uuid())
        } else {
            request_id.to_owned()
        };
        let mut last = Status::aborted("placement conflict");
        for _ in 0..5 {
            let host = self.schedule(spec, networks, preferred).await?;
            let cmd = self.command(caller, &request_id, make(host));
            match self.submit(&cmd).await?.into_status() {
                Err(s) if s.code() == Code::Aborted => last = s,
                other => return other.map_err(audited),
            }
        }
        Err(last)
    }

    /// Changes the Raft group's members, on the leader; a retry with the same request id
    /// answers the first change's task. A membership change is not a state-machine
    /// command: the caller audits it.
    pub async fn change_members(
        &self,
        request_id: &str,
        change: &MembershipChange,
    ) -> Result<pb::Task, Status> {
        if let Some(prev) = self
            .read(|s| s.lookup_request(request_id, "pool.member_change"))
            .await?
        {
            return prev.into_status();
        }
        let (changes, members) = change.conf_change();
        let mut cc = ConfChangeV2::default();
        for (t, id) in &changes {
            let mut one = ConfChangeSingle::default();
            one.change_type = *t;
            one.node_id = *id;
            cc.changes.push(one);
        }
        // More than one change (a replacement) goes through joint consensus, left
        // automatically once the joint configuration commits.
        cc.transition = ConfChangeTransition::Auto;
        let ch = MemberChange {
            members,
            request_id: request_id.to_owned(),
            task_id: uuid::Uuid::new_v4().to_string(),
            at_ms: proto::unix_ms(),
        };
        cc.context = ch.encode_to_vec().into();
        if !self.is_leader() {
            let st = self.node.status();
            return Err(Status::unavailable(format!(
                "membership changes are made on the leader (member {}); retry there",
                st.leader_id
            )));
        }
        let (r, _) = self.node.conf_change(cc).await.map_err(node_status)?;
        r.into_status()
    }

    /// Hands leadership to member `to` and waits until it leads: its id and term then.
    /// Not the leader: Unavailable, and the client retries on the leader.
    pub async fn transfer_leadership(&self, to: u64) -> Result<(u64, u64), Status> {
        self.node.transfer_leader(to).await.map_err(node_status)?;
        let deadline = tokio::time::Instant::now() + LEADERSHIP_TRANSFER_DEADLINE;
        loop {
            let (mut leader, mut term) = {
                let st = self.node.shared.status.lock().expect("status lock");
                (st.leader_id, st.term)
            };
            // A leader that is leaving the group hears nothing from its successor, so ask
            // the successor itself.
            if leader != to
                && let Ok(mut p) = self.peer_client(to)
                && let Ok(Ok(st)) = tokio::time::timeout(
                    Duration::from_millis(500),
                    p.get_member_status(pb::MemberStatusRequest {}),
                )
                .await
            {
                let st = st.into_inner();
                if st.leader_id == to {
                    (leader, term) = (to, st.term);
                }
            }
            if leader == to {
                return Ok((leader, term));
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Status::deadline_exceeded(format!(
                    "member {to} did not take over within {LEADERSHIP_TRANSFER_DEADLINE:?} \
                     (leader now {leader}); it may be behind or unreachable: check \
                     ListMembers and try again"
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Keeps `leader_since` current; called by the leader-only loops.
    pub fn leader_term_start(&self) -> Option<Instant> {
        let st = self.node.status();
        let mut ls = self.leader_since.lock().expect("leader lock");
        if st.leader_id != st.id {
            *ls = None;
            return None;
        }
        match *ls {
            Some((term, since)) if term == st.term => Some(since),
            _ => {
                let now = Instant::now();
                *ls = Some((st.term, now));
                // A new leader knows nothing of the hosts' heartbeats: start afresh.
                self.liveness.lock().expect("liveness lock").clear();
                Some(now)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn membership_changes_become_the_raft_configuration_changes() {
        let add = |learner, replaces| MembershipChange::Add {
            id: 4,
            address: "10.0.0.4:7000".into(),
            learner,
            replaces,
        };
        let record = vec![MemberRecord {
            id: 4,
            address: "10.0.0.4:7000".into(),
        }];
        let cases = [
            (
                add(false, None),
                vec![(ConfChangeType::AddNode, 4)],
                record.clone(),
            ),
            (
                add(true, None),
                vec![(ConfChangeType::AddLearnerNode, 4)],
                record.clone(),
            ),
            (
                add(false, Some(1)),
                vec![
                    (ConfChangeType::AddNode, 4),
                    (ConfChangeType::RemoveNode, 1),
                ],
                record,
            ),
            (
                MembershipChange::Remove { id: 2 },
                vec![(ConfChangeType::RemoveNode, 2)],
                vec![],
            ),
        ];
        for (change, changes, members) in cases {
            assert_eq!(change.conf_change(), (changes, members), "{change:?}");
        }
    }
}
