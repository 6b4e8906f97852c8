//! The one task that owns the Raft `RawNode`, its storage and the state machine.
//!
//! Everything else talks to it through [`NodeHandle`]: gRPC handlers send proposals,
//! reads and incoming Raft messages into its channel and wait on a oneshot reply. The
//! task drains its channel, ticks, and runs one ordered `on_ready` pass (see
//! `Node::on_ready` for why each step comes where it does), then yields so that the
//! handlers and peer tasks it woke run before the next pass.
//!
//! It runs on the API runtime, beside the gRPC handlers and the peer transport: on the
//! default one-thread runtime a proposal, an incoming append or an answer moves between
//! them without a thread switch. (As a thread of its own, the Raft loop and the API
//! thread woke each other several times a write, and on this PVM host the two cores spent
//! more time switching threads and waiting in the run queue than doing the work.) What
//! blocks is kept off it: the journal's syncer thread does the fdatasync and reports back
//! (`Node::on_durable`), a writer thread does sled's writes, another stores snapshots.
//! What still runs here and takes time: encoding a snapshot (50-170 ms at 100,000
//! remembered requests), a checkpoint (sled's flush, 1-17 ms) and installing a snapshot
//! from the leader, each rare and each a pause the member's API shares.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::mpsc::{UnboundedReceiver as Receiver, UnboundedSender as Sender};

use prost::Message as _;
use protobuf::Message as _;
use raft::eraftpb::{ConfChangeV2, ConfState, Entry, EntryType, Message, SnapshotMetadata};
use raft::{RawNode, SnapshotStatus, StateRole};
use tokio::sync::{oneshot, watch};

use super::storage::DiskStorage;
use super::transport::Transport;
use crate::state::command::{Command, CommandResult, MemberChange};
use crate::state::machine::PoolState;
use crate::state::snapshot;

/// Settings of the Raft member.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub id: u64,
    pub pool_id: String,
    pub tick: Duration,
    pub election_ticks: usize,
    pub heartbeat_ticks: usize,
    /// Take a state-machine snapshot (and compact the log) every this many applied entries.
    pub snapshot_interval: u64,
    /// Entries kept behind a snapshot for followers that are only a little behind.
    pub snapshot_keep_entries: u64,
    /// Addresses of members known before the replicated member list is (a joining member).
    pub seeds: BTreeMap<u64, String>,
    /// Append messages in flight to one follower before the leader waits for an answer.
    pub max_inflight_appends: usize,
}

impl NodeConfig {
    pub fn new(id: u64, pool_id: &str) -> Self {
        NodeConfig {
            id,
            pool_id: pool_id.to_owned(),
            tick: Duration::from_millis(100),
            election_ticks: 10,
            heartbeat_ticks: 2,
            snapshot_interval: 50_000,
            snapshot_keep_entries: 5_000,
            seeds: BTreeMap::new(),
            max_inflight_appends: 256,
        }
    }
}

#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum NodeError {
    #[error("this member is not the leader (leader: {leader:?})")]
    NotLeader { leader: Option<u64> },
    #[error("the proposal was dropped: {0}")]
    Dropped(String),
    #[error("leadership changed before the proposal was applied; its outcome is unknown")]
    LeadershipLost,
    #[error("the Raft member has stopped")]
    Stopped,
    #[error("membership change refused: {0}")]
    BadMemberChange(String),
}

/// What the node task publishes after each pass.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeStatus {
    pub id: u64,
    pub leader_id: u64,
    pub term: u64,
    pub role: String,
    pub commit_index: u64,
    pub applied_index: u64,
    pub first_log_index: u64,
    pub last_log_index: u64,
    pub snapshot_index: u64,
    pub snapshots_installed: u64,
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
    pub voters_outgoing: Vec<u64>,
    /// Leader only: each member's match index and whether it was heard from recently.
    pub progress: BTreeMap<u64, (u64, bool)>,
}

/// State shared by the node task (the only writer) and the request handlers.
pub struct Shared {
    pub state: RwLock<PoolState>,
    pub status: Mutex<NodeStatus>,
    pub applied: watch::Sender<u64>,
    /// Member addresses learned from the members that sent us Raft messages; used only
    /// for members the replicated state does not name yet (see `member_address`).
    pub learned_addresses: RwLock<BTreeMap<u64, String>>,
}

type ProposeOutcome = Result<(CommandResult, u64), NodeError>;
type ProposeReply = oneshot::Sender<ProposeOutcome>;

pub enum NodeMsg {
    /// A message from another member.
    Raft(Box<Message>),
    Propose {
        command: Vec<u8>,
        reply: ProposeReply,
    },
    ConfChange {
        change: Box<ConfChangeV2>,
        reply: ProposeReply,
    },
    /// Linearizable read: replies with the index the state machine must reach first.
    ReadIndex {
        reply: oneshot::Sender<Result<u64, NodeError>>,
    },
    Unreachable(u64),
    SnapshotSent {
        to: u64,
        ok: bool,
    },
    /// Leader only: hand leadership to voter `to`.
    TransferLeader {
        to: u64,
        reply: oneshot::Sender<Result<(), NodeError>>,
    },
    /// The snapshot writer finished (see `Node::maybe_snapshot`).
    SnapshotStored(Result<StoredSnapshot, String>),
    /// The journal made more writes durable (see `Node::on_durable`).
    Durable,
}

/// A snapshot the writer thread finished with: what cutting the log behind it needs.
pub struct StoredSnapshot {
    /// False when the stored snapshot was as new already (one from the leader).
    written: bool,
    meta: SnapshotMetadata,
    compact_to: u64,
    bytes: usize,
    encode: Duration,
    started: Instant,
    /// The encoded snapshot's buffer, handed back for the next one.
    buffer: Vec<u8>,
}

/// A cheap handle to the node task.
#[derive(Clone)]
pub struct NodeHandle {
    tx: Sender<NodeMsg>,
    pub shared: Arc<Shared>,
    pub id: u64,
}

impl NodeHandle {
    pub fn send(&self, msg: NodeMsg) -> Result<(), NodeError> {
        self.tx.send(msg).map_err(|_| NodeError::Stopped)
    }

    /// Proposes an encoded command on this member (which must lead) and waits until it is
    /// applied here; returns its result and log index.
    pub async fn propose(&self, command: Vec<u8>) -> Result<(CommandResult, u64), NodeError> {
        let (reply, rx) = oneshot::channel();
        self.send(NodeMsg::Propose { command, reply })?;
        rx.await.map_err(|_| NodeError::Stopped)?
    }

    pub async fn conf_change(
        &self,
        change: ConfChangeV2,
    ) -> Result<(CommandResult, u64), NodeError> {
        let (reply, rx) = oneshot::channel();
        self.send(NodeMsg::ConfChange {
            change: Box::new(change),
            reply,
        })?;
        rx.await.map_err(|_| NodeError::Stopped)?
    }

    /// Asks this member, which must lead, to hand leadership to `to`; returns once the
    /// handover has started (the caller watches the status for its end).
    pub async fn transfer_leader(&self, to: u64) -> Result<(), NodeError> {
        let (reply, rx) = oneshot::channel();
        self.send(NodeMsg::TransferLeader { to, reply })?;
        rx.await.map_err(|_| NodeError::Stopped)?
    }

    /// Waits until this member's state machine reflects every write committed before the
    /// call (Raft ReadIndex, confirmed by a quorum of heartbeats).
    pub async fn read_barrier(&self) -> Result<(), NodeError> {
        let (reply, rx) = oneshot::channel();
        self.send(NodeMsg::ReadIndex { reply })?;
        let index = rx.await.map_err(|_| NodeError::Stopped)??;
        let mut applied = self.shared.applied.subscribe();
        applied
            .wait_for(|a| *a >= index)
            .await
            .map_err(|_| NodeError::Stopped)?;
        Ok(())
    }

    pub fn status(&self) -> NodeStatus {
        self.shared.status.lock().expect("status lock").clone()
    }

    pub fn state(&self) -> std::sync::RwLockReadGuard<'_, PoolState> {
        self.shared.state.read().expect("state lock")
    }
}

/// A membership change held until the members it needs answer a heartbeat, or `until`.
struct WaitingConfChange {
    change: Box<ConfChangeV2>,
    reply: ProposeReply,
    until: Instant,
}

static INCARNATION: AtomicU64 = AtomicU64::new(0);

struct Node {
    cfg: NodeConfig,
    raw: RawNode<DiskStorage>,
    shared: Arc<Shared>,
    transport: Transport,
    /// Identifies this process's proposals in entry contexts: member id, a random
    /// incarnation (so a restarted process never answers for its predecessor's entries)
    /// and a counter.
    incarnation: u64,
    next_proposal: u64,
    proposals: HashMap<u64, ProposeReply>,
    /// Reads waiting for the next ReadIndex round, and rounds in flight.
    reads_waiting: Vec<oneshot::Sender<Result<u64, NodeError>>>,
    reads_in_flight: HashMap<u64, Vec<oneshot::Sender<Result<u64, NodeError>>>>,
    next_read: u64,
    conf_state: ConfState,
    leader_seen: (u64, u64),
    snapshots_installed: u64,
    /// When each peer was last heard from: whether a change keeps a live quorum.
    last_heard: HashMap<u64, Instant>,
    /// Membership changes that lacked a reachable quorum when they came, waiting (after a
    /// heartbeat round) until `until` for the missing members to answer.
    conf_waiting: Vec<WaitingConfChange>,
    /// The thread storing a state-machine snapshot, while it runs.
    snapshot_writer: Option<std::thread::JoinHandle<()>>,
    /// The last snapshot's buffer, encoded into again by the next.
    snapshot_buffer: Vec<u8>,
    node_tx: Sender<NodeMsg>,
    /// Whether this member was leader at its last `Ready`.
    led: bool,
    /// `Ready`s handed to the journal and not yet durable: (journal write, ready number).
    persisting: VecDeque<(u64, u64)>,
    /// Messages that may leave only once journal write `.0` is durable (votes, append
    /// acknowledgements), in order.
    held: VecDeque<(u64, Vec<Message>)>,
    /// Where applied proposals' answers go, a batch per pass (see `start`).
    replier: tokio::sync::mpsc::UnboundedSender<Vec<(ProposeReply, ProposeOutcome)>>,
}

/// Starts the node task on `transport_rt`. `storage` must be bootstrapped already (or
/// empty, for a member that joins an existing group and waits for its snapshot).
pub fn start(
    cfg: NodeConfig,
    storage: DiskStorage,
    transport_rt: tokio::runtime::Handle,
    faults: Arc<super::transport::Faults>,
) -> Result<NodeHandle, Box<dyn std::error::Error + Send + Sync>> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let node_rt = transport_rt.clone();
    let snap_meta = storage.snapshot_metadata().clone();
    let (state, conf_state) = if snap_meta.index == 0 {
        (
            PoolState::new(&cfg.pool_id, BTreeMap::new()),
            ConfState::default(),
        )
    } else {
        let mut s = snapshot::decode(&storage.snapshot_data()?)?;
        s.applied_index = snap_meta.index;
        (s, snap_meta.get_conf_state().clone())
    };
    let applied = state.applied_index;
    let shared = Arc::new(Shared {
        state: RwLock::new(state),
        status: Mutex::new(NodeStatus {
            id: cfg.id,
            ..Default::default()
        }),
        applied: watch::channel(applied).0,
        learned_addresses: RwLock::new(BTreeMap::new()),
    });
    let raft_cfg = raft_config(&cfg, applied);
    raft_cfg.validate()?;
    let mut storage = storage;
    storage.reserve_log(log_room(&cfg, false));
    let wake = tx.clone();
    storage.set_durable_waker(Box::new(move || {
        let _ = wake.send(NodeMsg::Durable);
    }));
    let raw = RawNode::new(&raft_cfg, storage, &super::log::logger(cfg.id))?;
    let handle = NodeHandle {
        tx: tx.clone(),
        shared: shared.clone(),
        id: cfg.id,
    };
    // Answers go out a batch at a time through one task: on a one-thread runtime the
    // handlers it completes run back to back, so their responses leave in one write per
    // connection, and on a multi-thread runtime the node task, wherever it runs, wakes
    // the answering side once per pass instead of once per proposal.
    let (replier, mut replies) =
        tokio::sync::mpsc::unbounded_channel::<Vec<(ProposeReply, ProposeOutcome)>>();
    transport_rt.spawn(async move {
        while let Some(batch) = replies.recv().await {
            for (reply, outcome) in batch {
                let _ = reply.send(outcome);
            }
        }
    });
    let mut transport = Transport::new(
        cfg.id,
        cfg.pool_id.clone(),
        transport_rt,
        tx.clone(),
        shared.clone(),
        faults,
    );
    transport.seeds = cfg.seeds.clone();
    let incarnation = rand::random::<u64>() ^ INCARNATION.fetch_add(1, Ordering::Relaxed);
    let mut node = Node {
        cfg,
        raw,
        shared,
        transport,
        incarnation,
        next_proposal: 1,
        proposals: HashMap::new(),
        reads_waiting: Vec::new(),
        reads_in_flight: HashMap::new(),
        next_read: 1,
        conf_state,
        leader_seen: (0, 0),
        snapshots_installed: 0,
        last_heard: HashMap::new(),
        conf_waiting: Vec::new(),
        snapshot_writer: None,
        snapshot_buffer: Vec::new(),
        node_tx: tx,
        led: false,
        persisting: VecDeque::new(),
        held: VecDeque::new(),
        replier,
    };
    node.publish();
    node_rt.spawn(node.run(rx));
    Ok(handle)
}

fn raft_config(cfg: &NodeConfig, applied: u64) -> raft::Config {
    raft::Config {
        id: cfg.id,
        election_tick: cfg.election_ticks,
        heartbeat_tick: cfg.heartbeat_ticks,
        applied,
        max_size_per_msg: 1 << 20,
        max_inflight_msgs: cfg.max_inflight_appends,
        // One append per follower per pass, not one per proposal: with 64 clients a pass
        // holds dozens of proposals, and each append is an envelope on the peer stream, a
        // step on the follower and a response back.
        batch_append: true,
        check_quorum: true,
        pre_vote: true,
        read_only_option: raft::ReadOnlyOption::Safe,
        ..Default::default()
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Node {
    async fn run(mut self, mut rx: Receiver<NodeMsg>) {
        let mut last_tick = Instant::now();
        loop {
            let wait = self.cfg.tick.saturating_sub(last_tick.elapsed());
            match tokio::time::timeout(wait, rx.recv()).await {
                Ok(Some(m)) => self.handle(m),
                Err(_) => {}
                Ok(None) => break,
            }
            // Take everything already queued so one Ready (one fsync) covers it all:
            // this batching is what lets throughput grow with concurrent clients.
            for _ in 0..8192 {
                match rx.try_recv() {
                    Ok(m) => self.handle(m),
                    Err(_) => break,
                }
            }
            if last_tick.elapsed() >= self.cfg.tick {
                self.raw.tick();
                last_tick = Instant::now();
            }
            self.start_read_round();
            self.recheck_conf_changes();
            // Compaction after the pass, so a snapshot covers everything it applied.
            if let Err(e) = self
                .on_durable()
                .and_then(|_| self.on_ready())
                .and_then(|_| self.maybe_snapshot())
            {
                storage_failed(&e);
            }
            self.publish();
            // Let the handlers and peer tasks this pass woke run before the next pass,
            // so that what they send in the meantime is taken in one pass.
            tokio::task::yield_now().await;
        }
        if let Some(w) = self.snapshot_writer.take() {
            let _ = w.join();
        }
        tracing::info!("Raft member stopped");
    }

    fn handle(&mut self, m: NodeMsg) {
        match m {
            NodeMsg::Raft(msg) => {
                self.last_heard.insert(msg.from, Instant::now());
                if let Err(e) = self.raw.step(*msg) {
                    tracing::debug!(error = %e, "dropped a Raft message");
                }
            }
            NodeMsg::Propose { command, reply } => {
                if self.raw.raft.state != StateRole::Leader {
                    let _ = reply.send(Err(self.not_leader()));
                    return;
                }
                let pid = self.next_proposal;
                self.next_proposal += 1;
                match self.raw.propose(self.context(pid), command) {
                    Ok(()) => {
                        self.proposals.insert(pid, reply);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(NodeError::Dropped(e.to_string())));
                    }
                }
            }
            NodeMsg::ConfChange { change, reply } => {
                if self.raw.raft.state != StateRole::Leader {
                    let _ = reply.send(Err(self.not_leader()));
                    return;
                }
                let voters = match self.new_voters(&change) {
                    Ok(v) => v,
                    Err(why) => {
                        let _ = reply.send(Err(NodeError::BadMemberChange(why)));
                        return;
                    }
                };
                if self.reachable_quorum(&voters).is_ok() {
                    self.propose_conf_change(*change, reply);
                } else {
                    // Silence may be a stall (ours or theirs) rather than a dead member:
                    // ask everyone for a heartbeat and decide once they had time to answer.
                    self.raw.ping();
                    self.conf_waiting.push(WaitingConfChange {
                        change,
                        reply,
                        until: Instant::now() + self.election_timeout(),
                    });
                }
            }
            NodeMsg::ReadIndex { reply } => self.reads_waiting.push(reply),
            NodeMsg::Unreachable(id) => self.raw.report_unreachable(id),
            NodeMsg::SnapshotSent { to, ok } => self.raw.report_snapshot(
                to,
                if ok {
                    SnapshotStatus::Finish
                } else {
                    SnapshotStatus::Failure
                },
            ),
            // Only wakes the loop: `on_durable` asks the journal what is durable.
            NodeMsg::Durable => {}
            NodeMsg::SnapshotStored(outcome) => {
                if let Some(w) = self.snapshot_writer.take() {
                    let _ = w.join();
                }
                match outcome {
                    Ok(done) => self.snapshot_stored(done),
                    Err(e) => storage_failed(&e),
                }
            }
            NodeMsg::TransferLeader { to, reply } => {
                if self.raw.raft.state != StateRole::Leader {
                    let _ = reply.send(Err(self.not_leader()));
                    return;
                }
                if !self.conf_state.voters.contains(&to) {
                    let _ = reply.send(Err(NodeError::BadMemberChange(format!(
                        "member {to} is not a voter, so it cannot lead"
                    ))));
                    return;
                }
                if to != self.cfg.id {
                    // raft-rs waits until `to` has the whole log, then tells it to
                    // campaign at once; proposals meanwhile are refused as not leader.
                    self.raw.transfer_leader(to);
                }
                let _ = reply.send(Ok(()));
            }
        }
    }

    fn not_leader(&self) -> NodeError {
        let l = self.raw.raft.leader_id;
        NodeError::NotLeader {
            leader: (l != 0).then_some(l),
        }
    }

    fn context(&self, pid: u64) -> Vec<u8> {
        let mut c = Vec::with_capacity(24);
        c.extend_from_slice(&self.cfg.id.to_be_bytes());
        c.extend_from_slice(&self.incarnation.to_be_bytes());
        c.extend_from_slice(&pid.to_be_bytes());
        c
    }

    fn own_proposal(&self, ctx: &[u8]) -> Option<u64> {
        if ctx.len() == 24
            && ctx[..8] == self.cfg.id.to_be_bytes()
            && ctx[8..16] == self.incarnation.to_be_bytes()
        {
            Some(u64::from_be_bytes(ctx[16..].try_into().expect("8 bytes")))
        } else {
            None
        }
    }

    fn election_timeout(&self) -> Duration {
        self.cfg.tick * self.cfg.election_ticks as u32
    }

    fn propose_conf_change(&mut self, change: ConfChangeV2, reply: ProposeReply) {
        let pid = self.next_proposal;
        self.next_proposal += 1;
        match self.raw.propose_conf_change(self.context(pid), change) {
            Ok(()) => {
                self.proposals.insert(pid, reply);
            }
            Err(e) => {
                let _ = reply.send(Err(NodeError::BadMemberChange(e.to_string())));
            }
        }
    }

    /// Proposes each waiting membership change whose quorum has answered, and refuses
    /// those whose members stayed silent past their wait.
    fn recheck_conf_changes(&mut self) {
        if self.conf_waiting.is_empty() {
            return;
        }
        for w in std::mem::take(&mut self.conf_waiting) {
            if self.raw.raft.state != StateRole::Leader {
                let _ = w.reply.send(Err(self.not_leader()));
                continue;
            }
            let checked = self
                .new_voters(&w.change)
                .and_then(|voters| self.reachable_quorum(&voters));
            match checked {
                Ok(()) => self.propose_conf_change(*w.change, w.reply),
                Err(why) if Instant::now() >= w.until => {
                    let _ = w.reply.send(Err(NodeError::BadMemberChange(why)));
                }
                Err(_) => self.conf_waiting.push(w),
            }
        }
    }

    /// The voters after `cc`, or why the change is malformed: one while a joint-consensus
    /// change is in progress, the removal of a non-member, or of the last voter.
    fn new_voters(&self, cc: &ConfChangeV2) -> Result<Vec<u64>, String> {
        use raft::eraftpb::ConfChangeType::*;
        if !self.conf_state.voters_outgoing.is_empty() {
            return Err("a joint-consensus change is still in progress; retry shortly".into());
        }
        let mut voters: Vec<u64> = self.conf_state.voters.clone();
        for c in cc.changes.iter() {
            match c.change_type {
                AddNode => {
                    if !voters.contains(&c.node_id) {
                        voters.push(c.node_id);
                    }
                }
                RemoveNode => {
                    if !self.conf_state.voters.contains(&c.node_id)
                        && !self.conf_state.learners.contains(&c.node_id)
                    {
                        return Err(format!("member {} is not in the group", c.node_id));
                    }
                    voters.retain(|v| *v != c.node_id);
                }
                AddLearnerNode => voters.retain(|v| *v != c.node_id),
            }
        }
        if voters.is_empty() {
            return Err("the change would leave no voter".into());
        }
        Ok(voters)
    }

    /// Refuses a configuration without a quorum of members that are up to date and were
    /// heard from within an election timeout.
    fn reachable_quorum(&self, voters: &[u64]) -> Result<(), String> {
        let prs = self.raw.raft.prs();
        let window = self.election_timeout();
        let active = voters
            .iter()
            .filter(|v| {
                **v == self.cfg.id
                    || (prs.get(**v).is_some_and(|p| p.matched > 0)
                        && self.last_heard.get(v).is_some_and(|t| t.elapsed() < window))
            })
            .count();
        let existing_new = voters
            .iter()
            .filter(|v| self.conf_state.voters.contains(v))
            .count();
        // New voters start empty: they count only once they have caught up, so a change
        // that needs them for its quorum would stall the pool.
        if active < voters.len() / 2 + 1 {
            return Err(format!(
                "the new configuration {voters:?} needs {} reachable, caught-up voters but has {active} \
                 ({existing_new} existing); bring members back or add learners first",
                voters.len() / 2 + 1
            ));
        }
        Ok(())
    }

    fn start_read_round(&mut self) {
        if self.reads_waiting.is_empty() {
            return;
        }
        if self.raw.raft.leader_id == 0 {
            for r in self.reads_waiting.drain(..) {
                let _ = r.send(Err(NodeError::NotLeader { leader: None }));
            }
            return;
        }
        let id = self.next_read;
        self.next_read += 1;
        let mut ctx = self.incarnation.to_be_bytes().to_vec();
        ctx.extend_from_slice(&id.to_be_bytes());
        self.raw.read_index(ctx);
        self.reads_in_flight
            .insert(id, std::mem::take(&mut self.reads_waiting));
    }

    /// What the journal made durable since the last look: raft-rs learns which `Ready`s
    /// are persisted (a leader counts its own log toward a commit only from here), and the
    /// messages held for them leave. Called between passes, never inside one.
    fn on_durable(&mut self) -> Result<(), raft::Error> {
        let durable = self.raw.store().durable()?;
        let mut persisted = None;
        while let Some(&(write, number)) = self.persisting.front() {
            if write > durable {
                break;
            }
            persisted = Some(number);
            self.persisting.pop_front();
        }
        if let Some(number) = persisted {
            self.raw.on_persist_ready(number);
        }
        while self
            .held
            .front()
            .is_some_and(|(write, _)| *write <= durable)
        {
            let (_, msgs) = self.held.pop_front().expect("non-empty");
            self.transport.send(msgs);
        }
        Ok(())
    }

    /// One ordered pass over what raft-rs has ready.
    fn on_ready(&mut self) -> Result<(), raft::Error> {
        if !self.raw.has_ready() {
            return Ok(());
        }
        if self.raw.raft.state == StateRole::Leader && !self.led {
            // raft-rs requires a new leader to have nothing of its follower days still
            // waiting for the disk. Its votes waited for its log, so this is already true
            // unless it needed no votes (the only voter): then wait here, once.
            let submitted = self.raw.store().submitted();
            self.raw.store().wait_durable(submitted)?;
            self.on_durable()?;
        }
        self.led = self.raw.raft.state == StateRole::Leader;
        let mut ready = self.raw.ready();

        // 1. A leader's messages (appends, heartbeats) go out before its own log write:
        //    the leader may append to followers in parallel with persisting its entries
        //    (Raft thesis §10.2.1), since it counts itself only once they are persisted.
        if !ready.messages().is_empty() {
            self.transport.send(ready.take_messages());
        }

        // 2. A snapshot from the leader replaces log and state machine. It comes before
        //    entries and committed entries because those continue from it.
        if !ready.snapshot().is_empty() {
            let snap = ready.snapshot().clone();
            let mut state = snapshot::decode(&snap.data)
                .map_err(|e| raft::Error::Store(raft::StorageError::Other(Box::new(e))))?;
            let index = snap.get_metadata().index;
            self.raw.mut_store().apply_snapshot(&snap)?;
            state.applied_index = index;
            self.conf_state = snap.get_metadata().get_conf_state().clone();
            *self.shared.state.write().expect("state lock") = state;
            self.snapshots_installed += 1;
            self.shared.applied.send_replace(index);
            tracing::info!(index, "installed a snapshot from the leader");
        }

        // 3. Committed entries are already durable here (raft-rs hands out only entries
        //    this member persisted), so applying them need not wait for this pass's fsync
        //    nor hold it up. A leader applies them first: its clients wait for the answers,
        //    and what it appends now is already on its way to the followers. A follower
        //    applies them last: the leader waits for its acknowledgement of the new
        //    entries, and nobody waits for its apply.
        let mut committed = ready.take_committed_entries();
        if self.raw.raft.state == StateRole::Leader {
            self.apply(std::mem::take(&mut committed))?;
        }

        // 4. New entries and the hard state (term, vote) go to the journal, whose syncer
        //    thread writes and fdatasyncs them while this task goes on (takes the next
        //    messages, commits, answers clients). raft-rs says when a Ready must be durable:
        //    new entries, a snapshot, or a new term or vote. A hard state that only moves
        //    the commit index rides with the next such write (a commit index can be learned
        //    again from the leader), which spares one fsync per commit.
        if !ready.entries().is_empty() {
            self.raw.mut_store().append(ready.entries())?;
        }
        if let Some(hs) = ready.hs() {
            self.raw.mut_store().set_hard_state(hs)?;
        }
        // A snapshot from the leader was made durable in step 2 already, and raft-rs
        // marks the state machine restored from it only once the Ready is persisted:
        // that Ready is finished here and now.
        let installed = !ready.snapshot().is_empty();
        let needs = if ready.must_sync() {
            let write = self.raw.mut_store().persist()?;
            self.persisting.push_back((write, ready.number()));
            if installed {
                self.raw.store().wait_durable(write)?;
            }
            write
        } else {
            self.raw.store().submitted()
        };

        // 5. Messages that acknowledge what this member stored (a vote, an append
        //    response) wait until it is durable, and go in order (`on_durable`): sent
        //    before, a crash could make this member forget what it promised, which breaks
        //    Raft's safety. Then a follower's apply (step 3).
        let held = ready.take_persisted_messages();
        if !held.is_empty() {
            self.held.push_back((needs, held));
        }
        self.apply(committed)?;

        // 6. ReadIndex answers: each waiter reads once its state machine reaches `index`.
        for rs in ready.take_read_states() {
            if rs.request_ctx.len() == 16 && rs.request_ctx[..8] == self.incarnation.to_be_bytes() {
                let id = u64::from_be_bytes(rs.request_ctx[8..].try_into().expect("8 bytes"));
                for w in self.reads_in_flight.remove(&id).unwrap_or_default() {
                    let _ = w.send(Ok(rs.index));
                }
            }
        }

        // 7. Tell raft-rs this Ready is handled but not yet durable (`on_durable` says when
        //    it is), and that its committed entries are applied.
        self.raw.advance_append_async(ready);
        if installed {
            self.on_durable()?;
        }
        self.raw.advance_apply();

        // 8. Leadership changes: proposals and reads of a deposed leader may never be
        //    answered by the log, so their waiters learn the outcome is unknown now (a
        //    client retries with the same request id; idempotency makes that safe).
        let seen = (self.raw.raft.term, self.raw.raft.leader_id);
        if seen != self.leader_seen {
            self.leader_seen = seen;
            if self.raw.raft.state == StateRole::Leader {
                // A leader keeps a longer log (see `snapshot_interval`): grow it once, now.
                let room = log_room(&self.cfg, true);
                self.raw.mut_store().reserve_log(room);
            }
            if self.raw.raft.state != StateRole::Leader {
                for (_, r) in self.proposals.drain() {
                    let _ = r.send(Err(NodeError::LeadershipLost));
                }
            }
            for (_, ws) in self.reads_in_flight.drain() {
                for w in ws {
                    let _ = w.send(Err(NodeError::LeadershipLost));
                }
            }
        }
        Ok(())
    }

    fn apply(&mut self, entries: Vec<Entry>) -> Result<(), raft::Error> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut last = 0;
        let mut answers = Vec::new();
        {
            let mut state = self.shared.state.write().expect("state lock");
            for e in entries {
                last = e.index;
                let pid = self.own_proposal(&e.context);
                match e.entry_type {
                    EntryType::EntryNormal => {
                        if e.data.is_empty() {
                            // A new leader's empty entry.
                            state.applied_index = e.index;
                            continue;
                        }
                        let result = match Command::decode(e.data.as_ref()) {
                            Ok(cmd) => state.apply(e.index, &cmd),
                            Err(err) => {
                                state.applied_index = e.index;
                                CommandResult::error(
                                    tonic::Code::Internal,
                                    format!("undecodable command at index {}: {err}", e.index),
                                )
                            }
                        };
                        if let Some(reply) = pid.and_then(|p| self.proposals.remove(&p)) {
                            answers.push((reply, Ok((result, e.index))));
                        }
                    }
                    EntryType::EntryConfChangeV2 | EntryType::EntryConfChange => {
                        let cc: ConfChangeV2 = if e.entry_type == EntryType::EntryConfChangeV2 {
                            ConfChangeV2::parse_from_bytes(&e.data).map_err(|err| {
                                raft::Error::Store(raft::StorageError::Other(Box::new(err)))
                            })?
                        } else {
                            let v1 = raft::eraftpb::ConfChange::parse_from_bytes(&e.data).map_err(
                                |err| raft::Error::Store(raft::StorageError::Other(Box::new(err))),
                            )?;
                            // Only V2 changes are proposed here; a V1 entry is read as
                            // the single change it is.
                            let mut one = raft::eraftpb::ConfChangeSingle::default();
                            one.change_type = v1.change_type;
                            one.node_id = v1.node_id;
                            let mut v2 = ConfChangeV2::default();
                            v2.changes.push(one);
                            v2.context = v1.context;
                            v2
                        };
                        let outcome = match self.raw.apply_conf_change(&cc) {
                            Ok(cs) => {
                                self.conf_state = cs;
                                let change =
                                    MemberChange::decode(cc.context.as_ref()).unwrap_or_default();
                                let mut all = self.conf_state.voters.clone();
                                all.extend(&self.conf_state.learners);
                                all.extend(&self.conf_state.voters_outgoing);
                                all.extend(&self.conf_state.learners_next);
                                state.apply_member_change(e.index, &change, &all);
                                let task = change.task_id.clone();
                                Ok((
                                    CommandResult::ok(state.task(&task).unwrap_or_default()),
                                    e.index,
                                ))
                            }
                            Err(err) => {
                                state.applied_index = e.index;
                                Err(NodeError::BadMemberChange(err.to_string()))
                            }
                        };
                        if let Some(reply) = pid.and_then(|p| self.proposals.remove(&p)) {
                            answers.push((reply, outcome));
                        }
                    }
                }
            }
        }
        if !answers.is_empty() {
            let _ = self.replier.send(answers);
        }
        self.shared.applied.send_replace(last);
        Ok(())
    }

    /// Every [`snapshot_interval`] applied entries (or when raft-rs needs a newer snapshot
    /// for a follower), encodes the state machine here, where it cannot change underneath,
    /// and hands the bytes to a writer thread: storing and fsyncing ~15 MB is the slow
    /// part, and every member reaches the same index at about the same time, so doing it
    /// here would stall the whole pool at once. The log is cut once it is durable.
    fn maybe_snapshot(&mut self) -> Result<(), raft::Error> {
        if self.snapshot_writer.is_some() {
            return Ok(());
        }
        let applied = self.shared.state.read().expect("state lock").applied_index;
        let snap_index = self.raw.store().snapshot_metadata().index;
        let wanted = self.raw.store().take_snapshot_wanted() && applied > snap_index;
        let interval = snapshot_interval(
            self.cfg.snapshot_interval,
            self.cfg.id,
            self.raw.raft.state == StateRole::Leader,
        );
        if !wanted && applied < snap_index + interval {
            return Ok(());
        }
        let started = Instant::now();
        let mut data = std::mem::take(&mut self.snapshot_buffer);
        snapshot::encode_into(&self.shared.state.read().expect("state lock"), &mut data);
        let encode = started.elapsed();
        let meta = self
            .raw
            .store()
            .snapshot_metadata_at(applied, &self.conf_state)?;
        let writer = self.raw.store().snapshot_writer();
        let tx = self.node_tx.clone();
        let compact_to = applied.saturating_sub(self.cfg.snapshot_keep_entries);
        let thread = std::thread::Builder::new()
            .name(format!("raft-{}-snap", self.cfg.id))
            .spawn(move || {
                let outcome = writer
                    .store(&meta, &data)
                    .map(|written| StoredSnapshot {
                        written,
                        meta,
                        compact_to,
                        bytes: data.len(),
                        encode,
                        started,
                        buffer: data,
                    })
                    .map_err(|e| e.to_string());
                let _ = tx.send(NodeMsg::SnapshotStored(outcome));
            })
            .map_err(|e| raft::Error::Store(raft::StorageError::Other(Box::new(e))))?;
        self.snapshot_writer = Some(thread);
        Ok(())
    }

    fn snapshot_stored(&mut self, mut done: StoredSnapshot) {
        self.snapshot_buffer = std::mem::take(&mut done.buffer);
        let index = done.meta.index;
        if !done.written {
            tracing::info!(
                index,
                "a newer snapshot was stored meanwhile; this one is dropped"
            );
            return;
        }
        if let Err(e) = self
            .raw
            .mut_store()
            .snapshot_stored(done.meta, done.compact_to)
        {
            storage_failed(&e);
        }
        tracing::info!(
            index,
            compact_to = done.compact_to,
            bytes = done.bytes,
            encode_ms = done.encode.as_millis() as u64,
            total_ms = done.started.elapsed().as_millis() as u64,
            "took a state snapshot and compacted the log"
        );
    }

    fn publish(&mut self) {
        let r = &self.raw.raft;
        let store = self.raw.store();
        let mut progress = BTreeMap::new();
        if r.state == StateRole::Leader {
            for (id, p) in r.prs().iter() {
                progress.insert(*id, (p.matched, p.recent_active));
            }
        }
        let st = NodeStatus {
            id: self.cfg.id,
            leader_id: r.leader_id,
            term: r.term,
            role: match r.state {
                StateRole::Leader => "leader",
                StateRole::Follower => "follower",
                StateRole::Candidate => "candidate",
                StateRole::PreCandidate => "pre-candidate",
            }
            .to_owned(),
            commit_index: r.raft_log.committed,
            applied_index: *self.shared.applied.borrow(),
            first_log_index: store.first_index(),
            last_log_index: store.last_index(),
            snapshot_index: store.snapshot_metadata().index,
            snapshots_installed: self.snapshots_installed,
            voters: self.conf_state.voters.clone(),
            learners: self.conf_state.learners.clone(),
            voters_outgoing: self.conf_state.voters_outgoing.clone(),
            progress,
        };
        *self.shared.status.lock().expect("status lock") = st;
    }
}

/// Entries between two snapshots of a member. Encoding one stops the Raft task (60-160
/// ms for a state remembering 100,000 requests): on the leader that stops every write, so
/// the leader takes one a quarter as often (its log, kept in memory, grows to four
/// intervals); followers' intervals differ by id, so theirs drift apart instead of coming
/// at the same index, and the leader seldom waits on two stalled followers at once.
fn snapshot_interval(base: u64, id: u64, leader: bool) -> u64 {
    if leader {
        base.saturating_mul(4)
    } else {
        base.saturating_add(base / 4 * (id % 4))
    }
}

/// The log entries a member keeps in memory at most in steady work: its snapshot interval,
/// the tail kept behind a snapshot, and a little for the snapshot being written; capped,
/// since a very long interval is better grown into than reserved.
fn log_room(cfg: &NodeConfig, leader: bool) -> usize {
    let interval = snapshot_interval(cfg.snapshot_interval, cfg.id, leader);
    let room = interval
        .saturating_add(interval / 8)
        .saturating_add(cfg.snapshot_keep_entries);
    room.min(1 << 20) as usize
}

/// The storage failed: this member cannot go on safely. It stops; the others keep the
/// pool going, and this one recovers from its disk on restart.
fn storage_failed(e: &dyn std::fmt::Display) -> ! {
    tracing::error!(error = %e, "Raft storage failed; stopping this member");
    std::process::exit(70);
}

/// Milliseconds since the epoch, for stamping commands at proposal time.
pub fn stamp() -> u64 {
    now_ms()
}

#[cfg(test)]
mod tests {
    use raft::eraftpb::MessageType;
    use raft::storage::MemStorage;

    use super::*;

    /// A leader of voters {1, 2, 3} built on raft-rs's in-memory storage.
    fn leader() -> RawNode<MemStorage> {
        let cfg = NodeConfig::new(1, "test-pool");
        let store = MemStorage::new_with_conf_state(ConfState::from((vec![1, 2, 3], vec![])));
        let mut raw = RawNode::new(
            &raft_config(&cfg, 0),
            store,
            &crate::consensus::log::logger(1),
        )
        .expect("raw node");
        raw.campaign().expect("campaign");
        for kind in [
            MessageType::MsgRequestPreVoteResponse,
            MessageType::MsgRequestVoteResponse,
        ] {
            let term = raw.raft.term;
            let mut m = Message::default();
            m.set_msg_type(kind);
            m.from = 2;
            m.to = 1;
            m.term = if kind == MessageType::MsgRequestPreVoteResponse {
                term + 1
            } else {
                term
            };
            raw.step(m).expect("vote");
        }
        assert_eq!(raw.raft.state, StateRole::Leader);
        // The new leader's empty entry, acknowledged by both so they replicate.
        let mut rd = raw.ready();
        raw.mut_store().wl().append(rd.entries()).unwrap();
        let last = raw.raft.raft_log.last_index();
        let _ = rd.take_messages();
        let _ = raw.advance(rd);
        for f in [2, 3] {
            let mut m = Message::default();
            m.set_msg_type(MessageType::MsgAppendResponse);
            m.from = f;
            m.to = 1;
            m.term = raw.raft.term;
            m.index = last;
            raw.step(m).expect("append response");
        }
        if raw.has_ready() {
            let mut rd = raw.ready();
            raw.mut_store().wl().append(rd.entries()).unwrap();
            let _ = rd.take_messages();
            let _ = raw.advance(rd);
        }
        raw
    }

    #[test]
    fn the_leader_snapshots_least_often_and_followers_apart() {
        assert_eq!(snapshot_interval(50_000, 1, true), 200_000);
        assert_eq!(snapshot_interval(50_000, 2, true), 200_000);
        let followers: Vec<u64> = (1..=4)
            .map(|id| snapshot_interval(50_000, id, false))
            .collect();
        assert_eq!(followers, vec![62_500, 75_000, 87_500, 50_000]);
        assert_eq!(snapshot_interval(1, 3, false), 1);
        assert_eq!(snapshot_interval(u64::MAX, 7, true), u64::MAX);
    }

    #[test]
    fn the_log_room_covers_an_interval_and_the_kept_tail_up_to_a_cap() {
        let cfg = NodeConfig::new(2, "p");
        let (follower, leader) = (log_room(&cfg, false), log_room(&cfg, true));
        assert!(follower as u64 >= 75_000 + cfg.snapshot_keep_entries);
        assert!(leader as u64 >= 200_000 + cfg.snapshot_keep_entries);
        let huge = NodeConfig {
            snapshot_interval: u64::MAX,
            ..NodeConfig::new(2, "p")
        };
        assert_eq!(log_room(&huge, true), 1 << 20);
    }

    #[test]
    fn proposals_of_one_pass_go_to_each_follower_in_one_append() {
        let mut raw = leader();
        for i in 0..20u8 {
            raw.propose(vec![], vec![i]).expect("propose");
        }
        let mut rd = raw.ready();
        let msgs = rd.take_messages();
        let appends: Vec<_> = msgs
            .iter()
            .filter(|m| m.get_msg_type() == MessageType::MsgAppend)
            .collect();
        assert_eq!(appends.len(), 2, "{msgs:?}");
        for to in [2, 3] {
            let a = appends.iter().find(|m| m.to == to).expect("an append each");
            assert_eq!(a.entries.len(), 20);
        }
    }
}
