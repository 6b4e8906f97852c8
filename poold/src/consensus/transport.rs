//! Raft messages between members over gRPC (`CoordinatorPeerService.SendMessages`).
//!
//! Each peer gets a task with a queue and one long-lived client stream; the node task only
//! pushes into queues and never waits on the network. A peer that cannot be reached is
//! reported to raft-rs (which then probes it gently instead of streaming appends), and a
//! snapshot that could not be handed over is reported as failed so it is sent again.
//!
//! [`Faults`] is the test-only fault injector: when poold runs with
//! `POOLD_FAULT_INJECTION=1`, an admin call can isolate this member from chosen peers, and
//! every Raft message and forwarded proposal between them is dropped both ways.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::mpsc::UnboundedSender as Sender;

use proto::coordinator::RaftEnvelope;
use proto::coordinator::coordinator_peer_service_client::CoordinatorPeerServiceClient;
use protobuf::Message as _;
use raft::eraftpb::{Message, MessageType};
use tokio::sync::mpsc;

use super::node::{NodeMsg, Shared};

/// Environment variable that enables [`Faults`].
pub const FAULT_ENV: &str = "POOLD_FAULT_INJECTION";

#[derive(Debug, Default)]
pub struct Faults {
    enabled: bool,
    isolated: RwLock<HashSet<u64>>,
}

impl Faults {
    pub fn from_env() -> Self {
        Faults {
            enabled: std::env::var(FAULT_ENV).is_ok_and(|v| v == "1"),
            isolated: RwLock::new(HashSet::new()),
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Replaces the set of isolated peers; `false` when fault injection is off.
    pub fn set_isolated(&self, peers: impl IntoIterator<Item = u64>) -> bool {
        if !self.enabled {
            return false;
        }
        *self.isolated.write().expect("faults lock") = peers.into_iter().collect();
        true
    }

    pub fn blocks(&self, peer: u64) -> bool {
        self.enabled && self.isolated.read().expect("faults lock").contains(&peer)
    }
}

/// Where to reach members: the replicated member list first; then, for a member that has
/// just joined and knows no one until its first snapshot, the address a member sent its
/// messages from, and last the addresses given on the command line.
pub fn member_address(shared: &Shared, seeds: &BTreeMap<u64, String>, id: u64) -> Option<String> {
    let known = shared
        .state
        .read()
        .expect("state lock")
        .members
        .get(&id)
        .cloned();
    known
        .or_else(|| {
            shared
                .learned_addresses
                .read()
                .expect("addresses lock")
                .get(&id)
                .cloned()
        })
        .or_else(|| seeds.get(&id).cloned())
}

struct PeerLink {
    address: String,
    /// The [`crate::tls::LiveTls`] generation the link connects with.
    tls_generation: u64,
    queue: mpsc::UnboundedSender<Message>,
}

pub struct Transport {
    id: u64,
    pool_id: String,
    rt: tokio::runtime::Handle,
    node_tx: Sender<NodeMsg>,
    shared: Arc<Shared>,
    faults: Arc<Faults>,
    peers: HashMap<u64, PeerLink>,
    pub seeds: BTreeMap<u64, String>,
    tls: Option<crate::tls::LiveTls>,
}

impl Transport {
    pub fn new(
        id: u64,
        pool_id: String,
        rt: tokio::runtime::Handle,
        node_tx: Sender<NodeMsg>,
        shared: Arc<Shared>,
        faults: Arc<Faults>,
        tls: Option<crate::tls::LiveTls>,
    ) -> Self {
        Transport {
            tls,
            id,
            pool_id,
            rt,
            node_tx,
            shared,
            faults,
            peers: HashMap::new(),
            seeds: BTreeMap::new(),
        }
    }

    /// Queues messages for their peers; never blocks.
    pub fn send(&mut self, msgs: Vec<Message>) {
        for m in msgs {
            let to = m.to;
            let Some(address) = member_address(&self.shared, &self.seeds, to) else {
                tracing::debug!(to, "no address for member; message dropped");
                let _ = self.node_tx.send(NodeMsg::Unreachable(to));
                continue;
            };
            // A renewed certificate makes every link stale: the old one may expire.
            let tls_generation = crate::tls::generation(self.tls.as_ref());
            let stale = self.peers.get(&to).is_none_or(|p| {
                p.address != address || p.tls_generation != tls_generation || p.queue.is_closed()
            });
            if stale {
                let endpoint = match crate::tls::endpoint(
                    &address,
                    self.tls.as_ref(),
                    Some(&pool_trust::Identity::Member(to)),
                ) {
                    Ok(e) => e,
                    Err(e) => {
                        tracing::error!(to, %address, error = %e.message(), "bad member address");
                        let _ = self.node_tx.send(NodeMsg::Unreachable(to));
                        continue;
                    }
                };
                let (tx, rx) = mpsc::unbounded_channel();
                self.rt.spawn(peer_task(PeerTask {
                    from: self.id,
                    from_address: member_address(&self.shared, &self.seeds, self.id)
                        .unwrap_or_default(),
                    to,
                    endpoint,
                    pool_id: self.pool_id.clone(),
                    node_tx: self.node_tx.clone(),
                    faults: self.faults.clone(),
                    queue: rx,
                }));
                self.peers.insert(
                    to,
                    PeerLink {
                        address,
                        tls_generation,
                        queue: tx,
                    },
                );
            }
            let _ = self.peers[&to].queue.send(m);
        }
    }
}

struct PeerTask {
    from: u64,
    from_address: String,
    to: u64,
    endpoint: tonic::transport::Endpoint,
    pool_id: String,
    node_tx: Sender<NodeMsg>,
    faults: Arc<Faults>,
    queue: mpsc::UnboundedReceiver<Message>,
}

async fn peer_task(mut p: PeerTask) {
    let mut backoff = Duration::from_millis(50);
    loop {
        let endpoint = p
            .endpoint
            .clone()
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5));
        let channel = match endpoint.connect().await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(to = p.to, error = %e, "cannot reach member");
                if !drop_queued(&mut p) {
                    return;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                // Wait for the next message before trying again.
                match p.queue.recv().await {
                    Some(m) => {
                        let _ = p.node_tx.send(NodeMsg::Unreachable(p.to));
                        report_if_snapshot(&p, &m, false);
                    }
                    None => return,
                }
                continue;
            }
        };
        backoff = Duration::from_millis(50);
        let mut client = CoordinatorPeerServiceClient::new(channel)
            .max_encoding_message_size(usize::MAX)
            .max_decoding_message_size(usize::MAX);
        let (stx, srx) = mpsc::channel::<RaftEnvelope>(4096);
        let call = tokio::spawn(async move {
            client
                .send_messages(tonic::codegen::tokio_stream::wrappers::ReceiverStream::new(
                    srx,
                ))
                .await
        });
        loop {
            let Some(m) = p.queue.recv().await else {
                return;
            };
            if p.faults.blocks(p.to) {
                report_if_snapshot(&p, &m, false);
                continue;
            }
            let bytes = match m.write_to_bytes() {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!(error = %e, "cannot encode a Raft message");
                    continue;
                }
            };
            let env = RaftEnvelope {
                pool_id: p.pool_id.clone(),
                from_member_id: p.from,
                message: bytes,
                from_address: p.from_address.clone(),
            };
            if stx.send(env).await.is_err() {
                let _ = p.node_tx.send(NodeMsg::Unreachable(p.to));
                report_if_snapshot(&p, &m, false);
                break;
            }
            report_if_snapshot(&p, &m, true);
        }
        match call.await {
            Ok(Err(status)) => tracing::debug!(to = p.to, %status, "peer stream ended"),
            Err(e) => tracing::debug!(to = p.to, error = %e, "peer stream task failed"),
            Ok(Ok(_)) => {}
        }
    }
}

/// Drops what queued while the peer was down; false when the node is gone.
fn drop_queued(p: &mut PeerTask) -> bool {
    let mut any = false;
    loop {
        match p.queue.try_recv() {
            Ok(m) => {
                any = true;
                report_if_snapshot(p, &m, false);
            }
            Err(mpsc::error::TryRecvError::Empty) => break,
            Err(mpsc::error::TryRecvError::Disconnected) => return false,
        }
    }
    if any {
        let _ = p.node_tx.send(NodeMsg::Unreachable(p.to));
    }
    true
}

fn report_if_snapshot(p: &PeerTask, m: &Message, ok: bool) {
    if m.msg_type == MessageType::MsgSnapshot {
        let _ = p.node_tx.send(NodeMsg::SnapshotSent { to: p.to, ok });
    }
}
