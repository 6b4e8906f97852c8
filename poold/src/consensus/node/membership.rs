//! Membership: checking a change before it is proposed (it must keep a reachable,
//! caught-up quorum), holding one back while silent members get a chance to answer,
//! applying a committed change, and handing leadership to another voter.

use std::time::{Duration, Instant};

use prost::Message as _;
use protobuf::Message as _;
use raft::StateRole;
use raft::eraftpb::{ConfChangeV2, ConfState, Entry, EntryType};

use super::handle::{NodeError, ProposeOutcome, ProposeReply};
use super::{Fatal, Node};
use crate::state::command::{CommandResult, MemberChange};
use crate::state::machine::PoolState;

/// Why a membership change (or a leadership transfer) is refused before it is proposed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MemberChangeError {
    #[error("a joint-consensus change is still in progress; retry shortly")]
    JointInProgress,
    #[error("member {member} is not in the group")]
    NotInGroup { member: u64 },
    #[error("the change would leave no voter")]
    NoVoter,
    #[error(
        "the new configuration {voters:?} needs {needed} reachable, caught-up voters but has \
         {active} ({existing} existing); bring members back or add learners first"
    )]
    NoQuorum {
        voters: Vec<u64>,
        needed: usize,
        active: usize,
        existing: usize,
    },
    #[error("member {member} is not a voter, so it cannot lead")]
    NotAVoter { member: u64 },
}

/// A membership change held until the members it needs answer a heartbeat, or `until`.
pub(super) struct WaitingConfChange {
    change: Box<ConfChangeV2>,
    reply: ProposeReply,
    until: Instant,
}

impl Node {
    /// A membership change from a client: proposed at once when the new configuration
    /// has a reachable quorum, held for an election timeout otherwise.
    pub(super) fn conf_change(&mut self, change: Box<ConfChangeV2>, reply: ProposeReply) {
        if self.raw.raft.state != StateRole::Leader {
            let _ = reply.send(Err(self.not_leader()));
            return;
        }
        let voters = match new_voters(&self.conf_state, &change) {
            Ok(v) => v,
            Err(why) => {
                let _ = reply.send(Err(why.into()));
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

    fn propose_conf_change(&mut self, change: ConfChangeV2, reply: ProposeReply) {
        let pid = self.next_proposal_id();
        match self.raw.propose_conf_change(self.context(pid), change) {
            Ok(()) => {
                self.proposals
                    .insert(pid, (reply, std::time::Instant::now()));
            }
            Err(e) => {
                let _ = reply.send(Err(NodeError::ChangeRejected(e.to_string())));
            }
        }
    }

    /// Proposes each waiting membership change whose quorum has answered, and refuses
    /// those whose members stayed silent past their wait.
    pub(super) fn recheck_conf_changes(&mut self) {
        if self.conf_waiting.is_empty() {
            return;
        }
        for w in std::mem::take(&mut self.conf_waiting) {
            if self.raw.raft.state != StateRole::Leader {
                let _ = w.reply.send(Err(self.not_leader()));
                continue;
            }
            let checked = new_voters(&self.conf_state, &w.change)
                .and_then(|voters| self.reachable_quorum(&voters));
            match checked {
                Ok(()) => self.propose_conf_change(*w.change, w.reply),
                Err(why) if Instant::now() >= w.until => {
                    let _ = w.reply.send(Err(why.into()));
                }
                Err(_) => self.conf_waiting.push(w),
            }
        }
    }

    /// Refuses a configuration without a quorum of members that are up to date and were
    /// heard from within an election timeout.
    fn reachable_quorum(&self, voters: &[u64]) -> Result<(), MemberChangeError> {
        let prs = self.raw.raft.prs();
        let window = self.election_timeout();
        quorum_check(voters, &self.conf_state.voters, |v| {
            v == self.cfg.id
                || (prs.get(v).is_some_and(|p| p.matched > 0)
                    && self
                        .last_heard
                        .get(&v)
                        .is_some_and(|t| t.elapsed() < window))
        })
    }

    pub(super) fn election_timeout(&self) -> Duration {
        self.cfg.tick * self.cfg.election_ticks as u32
    }

    /// Leader only: hands leadership to voter `to` (raft-rs waits until `to` has the whole
    /// log, then tells it to campaign at once; proposals meanwhile are refused as not
    /// leader).
    pub(super) fn transfer_leader(&mut self, to: u64) -> Result<(), NodeError> {
        if self.raw.raft.state != StateRole::Leader {
            return Err(self.not_leader());
        }
        if !self.conf_state.voters.contains(&to) {
            return Err(MemberChangeError::NotAVoter { member: to }.into());
        }
        if to != self.cfg.id {
            self.raw.transfer_leader(to);
        }
        Ok(())
    }

    /// Applies a committed membership change entry to raft-rs and the state machine;
    /// returns the answer for its proposer.
    pub(super) fn apply_conf_change(
        &mut self,
        state: &mut PoolState,
        e: &Entry,
    ) -> Result<ProposeOutcome, Fatal> {
        let cc = decode_conf_change(e)?;
        Ok(match self.raw.apply_conf_change(&cc) {
            Ok(cs) => {
                self.conf_state = cs;
                let change = MemberChange::decode(cc.context.as_ref()).unwrap_or_default();
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
                Err(NodeError::ChangeRejected(err.to_string()))
            }
        })
    }
}

/// A membership change entry as a V2 change. Only V2 changes are proposed here; a V1 entry
/// is read as the single change it is.
fn decode_conf_change(e: &Entry) -> Result<ConfChangeV2, Fatal> {
    let undecodable = |source| Fatal::ConfChange {
        index: e.index,
        source,
    };
    if e.entry_type == EntryType::EntryConfChangeV2 {
        return ConfChangeV2::parse_from_bytes(&e.data).map_err(undecodable);
    }
    let v1 = raft::eraftpb::ConfChange::parse_from_bytes(&e.data).map_err(undecodable)?;
    let mut one = raft::eraftpb::ConfChangeSingle::default();
    one.change_type = v1.change_type;
    one.node_id = v1.node_id;
    let mut v2 = ConfChangeV2::default();
    v2.changes.push(one);
    v2.context = v1.context;
    Ok(v2)
}

/// The voters after `cc`, or why the change is malformed: one while a joint-consensus
/// change is in progress, the removal of a non-member, or of the last voter.
fn new_voters(conf: &ConfState, cc: &ConfChangeV2) -> Result<Vec<u64>, MemberChangeError> {
    use raft::eraftpb::ConfChangeType::*;
    if !conf.voters_outgoing.is_empty() {
        return Err(MemberChangeError::JointInProgress);
    }
    let mut voters: Vec<u64> = conf.voters.clone();
    for c in cc.changes.iter() {
        match c.change_type {
            AddNode => {
                if !voters.contains(&c.node_id) {
                    voters.push(c.node_id);
                }
            }
            RemoveNode => {
                if !conf.voters.contains(&c.node_id) && !conf.learners.contains(&c.node_id) {
                    return Err(MemberChangeError::NotInGroup { member: c.node_id });
                }
                voters.retain(|v| *v != c.node_id);
            }
            AddLearnerNode => voters.retain(|v| *v != c.node_id),
        }
    }
    if voters.is_empty() {
        return Err(MemberChangeError::NoVoter);
    }
    Ok(voters)
}

/// Whether `voters` hold a majority of `active` ones. New voters start empty: they count
/// only once they have caught up (`active` says so), so a change that needs them for its
/// quorum would stall the pool. `current` (today's voters) only explains the refusal.
fn quorum_check(
    voters: &[u64],
    current: &[u64],
    active: impl Fn(u64) -> bool,
) -> Result<(), MemberChangeError> {
    let needed = voters.len() / 2 + 1;
    let active = voters.iter().filter(|v| active(**v)).count();
    if active < needed {
        return Err(MemberChangeError::NoQuorum {
            voters: voters.to_vec(),
            needed,
            active,
            existing: voters.iter().filter(|v| current.contains(v)).count(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::eraftpb::{ConfChangeSingle, ConfChangeType};

    fn change(changes: &[(ConfChangeType, u64)]) -> ConfChangeV2 {
        let mut cc = ConfChangeV2::default();
        for (kind, id) in changes {
            let mut one = ConfChangeSingle::default();
            one.change_type = *kind;
            one.node_id = *id;
            cc.changes.push(one);
        }
        cc
    }

    #[test]
    fn new_voters_follow_the_change_or_say_why_not() {
        use ConfChangeType::*;
        let conf = ConfState::from((vec![1, 2, 3], vec![4]));
        let joint = {
            let mut c = conf.clone();
            c.voters_outgoing = vec![1, 2];
            c
        };
        let cases = vec![
            (&conf, vec![(AddNode, 5)], Ok(vec![1, 2, 3, 5])),
            (&conf, vec![(AddNode, 2)], Ok(vec![1, 2, 3])),
            (
                &conf,
                vec![(AddNode, 4), (RemoveNode, 1)],
                Ok(vec![2, 3, 4]),
            ),
            (&conf, vec![(AddLearnerNode, 3)], Ok(vec![1, 2])),
            (&conf, vec![(RemoveNode, 4)], Ok(vec![1, 2, 3])),
            (
                &conf,
                vec![(RemoveNode, 9)],
                Err(MemberChangeError::NotInGroup { member: 9 }),
            ),
            (
                &conf,
                vec![(RemoveNode, 1), (RemoveNode, 2), (RemoveNode, 3)],
                Err(MemberChangeError::NoVoter),
            ),
            (
                &joint,
                vec![(AddNode, 5)],
                Err(MemberChangeError::JointInProgress),
            ),
        ];
        for (conf, changes, want) in cases {
            assert_eq!(new_voters(conf, &change(&changes)), want, "{changes:?}");
        }
    }

    #[test]
    fn a_configuration_needs_a_majority_of_active_voters() {
        let up = |ids: &'static [u64]| move |v: u64| ids.contains(&v);
        assert_eq!(quorum_check(&[1, 2, 3], &[1, 2, 3], up(&[1, 2])), Ok(()));
        assert_eq!(
            quorum_check(&[1, 2, 3, 4], &[1, 2, 3], up(&[1, 2])),
            Err(MemberChangeError::NoQuorum {
                voters: vec![1, 2, 3, 4],
                needed: 3,
                active: 2,
                existing: 3,
            })
        );
        // A new voter that has not caught up does not count.
        assert!(quorum_check(&[1, 4], &[1, 2, 3], up(&[1])).is_err());
        assert_eq!(quorum_check(&[1], &[1], up(&[1])), Ok(()));
        let refused = quorum_check(&[1, 2, 3], &[1, 2, 3], up(&[1]))
            .unwrap_err()
            .to_string();
        assert_eq!(
            refused,
            "the new configuration [1, 2, 3] needs 2 reachable, caught-up voters but has 1 \
             (3 existing); bring members back or add learners first"
        );
    }
}
