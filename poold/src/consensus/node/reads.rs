//! Linearizable reads (Raft ReadIndex): reads that came during a pass share one round,
//! and each waiter learns the index its state machine must reach before it reads.

use raft::ReadState;
use tokio::sync::oneshot;

use super::Node;
use super::handle::NodeError;

pub(super) type ReadReply = oneshot::Sender<Result<u64, NodeError>>;

impl Node {
    /// Starts one ReadIndex round for every read waiting; without a known leader they
    /// are refused at once.
    pub(super) fn start_read_round(&mut self) {
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

    /// Answers the rounds raft-rs confirmed: each waiter reads once its state machine
    /// reaches `index`.
    pub(super) fn answer_reads(&mut self, states: Vec<ReadState>) {
        for rs in states {
            if rs.request_ctx.len() == 16 && rs.request_ctx[..8] == self.incarnation.to_be_bytes() {
                let id = u64::from_be_bytes(rs.request_ctx[8..].try_into().expect("8 bytes"));
                for w in self.reads_in_flight.remove(&id).unwrap_or_default() {
                    let _ = w.send(Ok(rs.index));
                }
            }
        }
    }

    /// Rounds of an earlier term or leader may never be confirmed: their waiters learn so.
    pub(super) fn fail_reads_in_flight(&mut self) {
        for (_, ws) in self.reads_in_flight.drain() {
            for w in ws {
                let _ = w.send(Err(NodeError::LeadershipLost));
            }
        }
    }
}
