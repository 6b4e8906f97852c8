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
//! them without a thread switch. What blocks is kept off it: the WAL's syncer thread does
//! the fdatasync and reports back (`Node::on_durable`), a writer thread does sled's
//! writes, another stores snapshots. What still runs here and takes time: encoding a
//! snapshot, a checkpoint (sled's flush) and installing a snapshot from the leader, each
//! rare and each a pause the member's API shares.
//!
//! # Layout
//! - here: starting the task, its loop, and the ordered `on_ready` pass;
//! - `handle`: the handle, messages, errors and status the rest of poold sees;
//! - `proposals`: tagging this member's proposals and answering their waiters;
//! - `apply`: applying committed entries to the state machine;
//! - `membership`: checking, holding back and applying membership changes, and
//!   leadership transfer;
//! - `reads`: linearizable reads (ReadIndex rounds);
//! - `metrics`: latencies and counts measured for Prometheus;
//! - `snapshots`: when to take a snapshot and compact the log, off the Raft task.

mod apply;
mod handle;
mod membership;
mod metrics;
mod proposals;
mod reads;
mod snapshots;

pub use handle::{NodeConfig, NodeError, NodeHandle, NodeMsg, NodeStatus, Shared};
pub use membership::MemberChangeError;
pub use metrics::{NodeMetrics, encode_scrape};
pub use snapshots::StoredSnapshot;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::mpsc::{UnboundedReceiver as Receiver, UnboundedSender as Sender};

use raft::eraftpb::{ConfState, Message};
use raft::{RawNode, SnapshotStatus, StateRole};
use tokio::sync::watch;

use super::storage::DiskStorage;
use super::transport::Transport;
use crate::history::History;
use crate::state::feed::Feed;
use crate::state::machine::PoolState;
use crate::state::snapshot::{self, SnapshotError};
use handle::{ProposeOutcome, ProposeReply};
use membership::WaitingConfChange;
use reads::ReadReply;
use snapshots::log_room;

/// Why the node task could not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeStartError {
    #[error("cannot read the stored state-machine snapshot")]
    ReadSnapshot(#[source] raft::Error),
    #[error("the stored state-machine snapshot at index {index} does not decode")]
    DecodeSnapshot {
        index: u64,
        #[source]
        source: SnapshotError,
    },
    #[error("the Raft settings are invalid")]
    Config(#[source] raft::Error),
    #[error("raft-rs refused to start the member")]
    Raft(#[source] raft::Error),
}

/// Why the node task stops the member: going on could break what it promised.
#[derive(Debug, thiserror::Error)]
enum Fatal {
    #[error("Raft storage failed")]
    Storage(#[from] raft::Error),
    #[error("the snapshot from the leader at index {index} does not decode")]
    LeaderSnapshot {
        index: u64,
        #[source]
        source: SnapshotError,
    },
    #[error("the committed membership change at index {index} does not decode")]
    ConfChange {
        index: u64,
        #[source]
        source: protobuf::ProtobufError,
    },
    #[error("cannot start the snapshot writer thread")]
    SnapshotThread(#[source] std::io::Error),
}

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
    /// Waiters of this member's proposals, and when each came (its latency metric).
    proposals: HashMap<u64, (ProposeReply, Instant)>,
    /// Reads waiting for the next ReadIndex round, and rounds in flight.
    reads_waiting: Vec<ReadReply>,
    reads_in_flight: HashMap<u64, Vec<ReadReply>>,
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
    /// `Ready`s handed to the WAL and not yet durable: (WAL write, ready number).
    persisting: VecDeque<(u64, u64)>,
    /// Messages that may leave only once WAL write `.0` is durable (votes, append
    /// acknowledgements), in order.
    held: VecDeque<(u64, Vec<Message>)>,
    /// Where applied proposals' answers go, a batch per pass (see `start`).
    replier: Sender<Vec<(ProposeReply, ProposeOutcome)>>,
}

/// Starts the node task on `transport_rt`. `storage` must be bootstrapped already (or
/// empty, for a member that joins an existing group and waits for its snapshot).
/// `history` is the metrics history the member saved; it is in place before the first
/// entry is applied again, so those entries find their samples already there.
pub fn start(
    cfg: NodeConfig,
    storage: DiskStorage,
    history: History,
    transport_rt: tokio::runtime::Handle,
    faults: Arc<super::transport::Faults>,
) -> Result<NodeHandle, NodeStartError> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let node_rt = transport_rt.clone();
    let snap_meta = storage.snapshot_metadata().clone();
    let (state, conf_state) = if snap_meta.index == 0 {
        (
            PoolState::new(&cfg.pool_id, BTreeMap::new()),
            ConfState::default(),
        )
    } else {
        let data = storage
            .snapshot_data()
            .map_err(NodeStartError::ReadSnapshot)?;
        let mut s = snapshot::decode(&data).map_err(|source| NodeStartError::DecodeSnapshot {
            index: snap_meta.index,
            source,
        })?;
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
        feed: Mutex::new(Feed::new(applied)),
        history: Mutex::new(history),
        metrics: NodeMetrics::default(),
    });
    let raft_cfg = raft_config(&cfg, applied);
    raft_cfg.validate().map_err(NodeStartError::Config)?;
    let mut storage = storage;
    storage.reserve_log(log_room(&cfg, false));
    let wake = tx.clone();
    storage.set_durable_waker(Box::new(move || {
        let _ = wake.send(NodeMsg::Durable);
    }));
    let raw = RawNode::new(&raft_cfg, storage, &super::log::logger(cfg.id))
        .map_err(NodeStartError::Raft)?;
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
        cfg.tls.clone(),
    );
    transport.seeds = cfg.seeds.clone();
    let mut node = Node {
        cfg,
        raw,
        shared,
        transport,
        incarnation: proposals::new_incarnation(),
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
        // One append per follower per pass, not one per proposal: a pass under load holds
        // many proposals, and each append is an envelope on the peer stream, a step on
        // the follower and a response back.
        batch_append: true,
        check_quorum: true,
        pre_vote: true,
        read_only_option: raft::ReadOnlyOption::Safe,
        ..Default::default()
    }
}

impl Node {
    async fn run(mut self, mut rx: Receiver<NodeMsg>) {
        let mut last_tick = Instant::now();
        loop {
            // What the last `on_durable` made ready (a commit, say) is handled at once.
            let wait = if self.raw.has_ready() {
                Duration::ZERO
            } else {
                self.cfg.tick.saturating_sub(last_tick.elapsed())
            };
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
            // `on_durable` again after the pass: messages held for a write that is already
            // durable (a follower's answer to a heartbeat that brought nothing to write,
            // which a ReadIndex round waits for) leave now, not after the next wake-up,
            // which may be a whole tick away when no other message comes.
            if let Err(e) = self
                .on_durable()
                .and_then(|_| self.on_ready())
                .and_then(|_| self.maybe_snapshot())
                .and_then(|_| self.on_durable())
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
            NodeMsg::Propose { command, reply } => self.propose(command, reply),
            NodeMsg::ConfChange { change, reply } => self.conf_change(change, reply),
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
            // Only wakes the loop: `on_durable` asks the WAL what is durable.
            NodeMsg::Durable => {}
            NodeMsg::SnapshotStored(outcome) => self.snapshot_stored(outcome),
            NodeMsg::TransferLeader { to, reply } => {
                let _ = reply.send(self.transfer_leader(to));
            }
        }
    }

    /// What the WAL made durable since the last look: raft-rs learns which `Ready`s are
    /// persisted (a leader counts its own log toward a commit only from here), and the
    /// messages held for them leave. Called between passes, never inside one.
    fn on_durable(&mut self) -> Result<(), Fatal> {
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
    fn on_ready(&mut self) -> Result<(), Fatal> {
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
            let index = snap.get_metadata().index;
            let mut state = snapshot::decode(&snap.data)
                .map_err(|source| Fatal::LeaderSnapshot { index, source })?;
            self.raw.mut_store().apply_snapshot(&snap)?;
            state.applied_index = index;
            self.conf_state = snap.get_metadata().get_conf_state().clone();
            let mut current = self.shared.state.write().expect("state lock");
            *current = state;
            self.shared.feed.lock().expect("feed lock").reset(index);
            drop(current);
            self.snapshots_installed += 1;
            self.shared
                .metrics
                .snapshot_bytes
                .set(snap.data.len() as u64);
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

        // 4. New entries and the hard state (term, vote) go to the WAL, whose syncer
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
        self.answer_reads(ready.take_read_states());

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
            if seen.1 != 0 && seen.1 != self.leader_seen.1 {
                self.shared.metrics.leader_changes.inc();
            }
            self.leader_seen = seen;
            if self.raw.raft.state == StateRole::Leader {
                // A leader keeps a longer log (see `snapshot_interval`): grow it once, now.
                let room = log_room(&self.cfg, true);
                self.raw.mut_store().reserve_log(room);
            }
            self.fail_proposals_if_deposed();
            self.fail_reads_in_flight();
        }
        Ok(())
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
            role: r.state,
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

/// The storage failed: this member cannot go on safely. It stops; the others keep the
/// pool going, and this one recovers from its disk on restart.
fn storage_failed(e: &Fatal) -> ! {
    tracing::error!(
        error = e as &dyn std::error::Error,
        "Raft storage failed; stopping this member"
    );
    std::process::exit(70);
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
