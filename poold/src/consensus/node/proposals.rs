//! Proposals of this member: how an entry is tagged as ours, who waits for its answer, and
//! what the waiters learn when leadership moves before the log answers them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use raft::StateRole;

use super::Node;
use super::handle::{NodeError, ProposeReply};

/// Mixed into each process's incarnation, so two nodes of one process (tests) differ too.
static INCARNATION: AtomicU64 = AtomicU64::new(0);

/// A random number that identifies this process's proposals: a restarted process never
/// answers for its predecessor's entries.
pub(super) fn new_incarnation() -> u64 {
    rand::random::<u64>() ^ INCARNATION.fetch_add(1, Ordering::Relaxed)
}

impl Node {
    /// Proposes an encoded command; its answer goes to `reply` once applied here.
    pub(super) fn propose(&mut self, command: Vec<u8>, reply: ProposeReply) {
        if self.raw.raft.state != StateRole::Leader {
            let _ = reply.send(Err(self.not_leader()));
            return;
        }
        let pid = self.next_proposal_id();
        match self.raw.propose(self.context(pid), command) {
            Ok(()) => {
                self.proposals.insert(pid, (reply, Instant::now()));
            }
            Err(e) => {
                let _ = reply.send(Err(NodeError::Dropped(e.to_string())));
            }
        }
    }

    pub(super) fn next_proposal_id(&mut self) -> u64 {
        let pid = self.next_proposal;
        self.next_proposal += 1;
        pid
    }

    pub(super) fn not_leader(&self) -> NodeError {
        let l = self.raw.raft.leader_id;
        NodeError::NotLeader {
            leader: (l != 0).then_some(l),
        }
    }

    /// The entry context of proposal `pid`: member id, incarnation, proposal id.
    pub(super) fn context(&self, pid: u64) -> Vec<u8> {
        let mut c = Vec::with_capacity(24);
        c.extend_from_slice(&self.cfg.id.to_be_bytes());
        c.extend_from_slice(&self.incarnation.to_be_bytes());
        c.extend_from_slice(&pid.to_be_bytes());
        c
    }

    /// The proposal id of an entry this process proposed; `None` for anyone else's.
    pub(super) fn own_proposal(&self, ctx: &[u8]) -> Option<u64> {
        if ctx.len() == 24
            && ctx[..8] == self.cfg.id.to_be_bytes()
            && ctx[8..16] == self.incarnation.to_be_bytes()
        {
            Some(u64::from_be_bytes(ctx[16..].try_into().expect("8 bytes")))
        } else {
            None
        }
    }

    /// A member that stopped leading may never see its proposals in the log: their
    /// waiters learn the outcome is unknown now (a client retries with the same request
    /// id; idempotency makes that safe).
    pub(super) fn fail_proposals_if_deposed(&mut self) {
        if self.raw.raft.state != StateRole::Leader {
            for (_, (r, _)) in self.proposals.drain() {
                let _ = r.send(Err(NodeError::LeadershipLost));
            }
        }
    }
}
