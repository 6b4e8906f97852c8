//! `CoordinatorPeerService`: Raft messages and forwarded proposals from other members,
//! plus the member status and the test-only fault injector.

use std::sync::Arc;

use prost::Message as _;
use proto::coordinator as pb;
use proto::coordinator::coordinator_peer_service_server::CoordinatorPeerService;
use protobuf::Message as _;
use tonic::{Request, Response, Status, Streaming};

use crate::consensus::node::NodeMsg;
use crate::consensus::transport::FAULT_ENV;
use crate::coordinator::{Coordinator, node_status};

pub struct PeerApi {
    pub c: Arc<Coordinator>,
}

#[tonic::async_trait]
impl CoordinatorPeerService for PeerApi {
    async fn send_messages(
        &self,
        r: Request<Streaming<pb::RaftEnvelope>>,
    ) -> Result<Response<pb::RaftAck>, Status> {
        let sender = match crate::tls::caller(&r) {
            Some(pool_trust::Identity::Member(id)) => Some(*id),
            _ => None,
        };
        let mut stream = r.into_inner();
        let pool_id = self.c.pool_id();
        let me = self.c.id();
        // One stream carries one member's messages: its address is noted once.
        let mut learned = false;
        while let Some(env) = stream.message().await? {
            if env.pool_id != pool_id {
                return Err(Status::permission_denied(format!(
                    "member {} of pool {:?} sent to pool {:?}",
                    env.from_member_id, env.pool_id, pool_id
                )));
            }
            if self.c.faults.blocks(env.from_member_id) {
                continue;
            }
            let msg = raft::eraftpb::Message::parse_from_bytes(&env.message)
                .map_err(|e| Status::invalid_argument(format!("undecodable Raft message: {e}")))?;
            // A member speaks only for itself: the certificate, the envelope and the
            // message must name the same sender.
            if sender.is_some_and(|id| id != env.from_member_id || id != msg.from) {
                return Err(Status::permission_denied(format!(
                    "member {:?} sent a message as member {} (from {})",
                    sender, env.from_member_id, msg.from
                )));
            }
            if msg.to != me {
                return Err(Status::invalid_argument(format!(
                    "message for member {} reached member {me}",
                    msg.to
                )));
            }
            if !env.from_address.is_empty() && !learned {
                learned = true;
                self.c
                    .node
                    .shared
                    .learned_addresses
                    .write()
                    .expect("addresses lock")
                    .insert(env.from_member_id, env.from_address.clone());
            }
            self.c
                .node
                .send(NodeMsg::Raft(Box::new(msg)))
                .map_err(node_status)?;
        }
        Ok(Response::new(pb::RaftAck {}))
    }

    async fn propose(
        &self,
        r: Request<pb::ProposeRequest>,
    ) -> Result<Response<pb::ProposeResponse>, Status> {
        let r = r.into_inner();
        if r.pool_id != self.c.pool_id() {
            return Err(Status::permission_denied("proposal from another pool"));
        }
        if self.c.faults.blocks(r.from_member_id) {
            return Err(Status::unavailable("dropped by fault injection"));
        }
        let (result, index) = tokio::time::timeout(
            crate::coordinator::WRITE_DEADLINE,
            self.c.node.propose(r.command),
        )
        .await
        .map_err(|_| Status::deadline_exceeded("commit timed out on the leader"))?
        .map_err(node_status)?;
        Ok(Response::new(pb::ProposeResponse {
            result: result.encode_to_vec(),
            index,
        }))
    }

    async fn get_member_status(
        &self,
        _r: Request<pb::MemberStatusRequest>,
    ) -> Result<Response<pb::MemberStatus>, Status> {
        let s = self.c.node.status();
        Ok(Response::new(pb::MemberStatus {
            member_id: s.id,
            leader_id: s.leader_id,
            term: s.term,
            commit_index: s.commit_index,
            applied_index: s.applied_index,
            first_log_index: s.first_log_index,
            last_log_index: s.last_log_index,
            snapshot_index: s.snapshot_index,
            snapshots_installed: s.snapshots_installed,
            role: role_name(s.role).to_owned(),
            voters: s.voters,
            learners: s.learners,
            voters_outgoing: s.voters_outgoing,
        }))
    }

    async fn set_faults(
        &self,
        r: Request<pb::SetFaultsRequest>,
    ) -> Result<Response<pb::SetFaultsResponse>, Status> {
        let peers = r.into_inner().isolate_from;
        if !self.c.faults.set_isolated(peers.iter().copied()) {
            return Err(Status::failed_precondition(format!(
                "fault injection is off; start poold with {FAULT_ENV}=1 (tests only)"
            )));
        }
        tracing::warn!(?peers, "fault injection: isolated from members");
        Ok(Response::new(pb::SetFaultsResponse {}))
    }
}

/// A Raft role as `MemberStatus.role` spells it.
fn role_name(role: raft::StateRole) -> &'static str {
    match role {
        raft::StateRole::Leader => "leader",
        raft::StateRole::Follower => "follower",
        raft::StateRole::Candidate => "candidate",
        raft::StateRole::PreCandidate => "pre-candidate",
    }
}
