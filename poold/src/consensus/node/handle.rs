//! What the rest of poold sees of the node task: its settings, the handle that sends
//! into its channel, the messages it takes, the errors it answers with and the status it
//! publishes.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::sync::mpsc::UnboundedSender as Sender;

use raft::eraftpb::{ConfChangeV2, Message};
use tokio::sync::{oneshot, watch};

use super::snapshots::StoredSnapshot;
use crate::history::History;
use crate::state::command::CommandResult;
use crate::state::feed::Feed;
use crate::state::machine::PoolState;

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
    /// This member's credentials: peers are called over mutual TLS with them.
    pub tls: Option<crate::tls::LiveTls>,
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
            tls: None,
        }
    }
}

/// Why a proposal, read or leadership transfer was not carried out.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum NodeError {
    #[error("this member is not the leader (leader: {leader:?})")]
    NotLeader { leader: Option<u64> },
    /// raft-rs refused the proposal; its reason, as raft-rs words it.
    #[error("the proposal was dropped: {0}")]
    Dropped(String),
    #[error("leadership changed before the proposal was applied; its outcome is unknown")]
    LeadershipLost,
    #[error("the Raft member has stopped")]
    Stopped,
    #[error("membership change refused: {0}")]
    BadMemberChange(#[from] super::MemberChangeError),
    /// raft-rs refused the configuration change; its reason, as raft-rs words it.
    #[error("membership change refused: {0}")]
    ChangeRejected(String),
}

/// What the node task publishes after each pass.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeStatus {
    pub id: u64,
    pub leader_id: u64,
    pub term: u64,
    pub role: raft::StateRole,
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
    /// The events of the entries applied lately (`WatchEvents`); changed only with the
    /// state's write lock held, so the state and the feed read together agree.
    pub feed: Mutex<Feed>,
    /// The metrics history of the host reports this member applied (saved to its data
    /// directory by `server.rs`); changed with the state's write lock held, after the
    /// state.
    pub history: Mutex<History>,
    /// What the node task measures for Prometheus.
    pub metrics: super::metrics::NodeMetrics,
}

/// A proposal's result and log index, once applied here.
pub(super) type ProposeOutcome = Result<(CommandResult, u64), NodeError>;
pub(super) type ProposeReply = oneshot::Sender<ProposeOutcome>;

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
    SnapshotStored(Result<StoredSnapshot, raft::Error>),
    /// The WAL made more writes durable (see `Node::on_durable`).
    Durable,
}

/// A cheap handle to the node task.
#[derive(Clone)]
pub struct NodeHandle {
    pub(super) tx: Sender<NodeMsg>,
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
