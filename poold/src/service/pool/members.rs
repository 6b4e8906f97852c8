//! The Raft group as people see it: its members, adding and removing them (the change
//! itself is the coordinator's: [`Coordinator::change_members`]), moving leadership.
//!
//! [`Coordinator::change_members`]: crate::coordinator::Coordinator::change_members

use proto::coordinator as pb;
use tonic::Status;

use super::PoolHandler;
use crate::auth::Caller;
use crate::coordinator::MembershipChange;

/// The members in the current configuration (voters, learners, and voters leaving a
/// joint configuration), as this member's node sees them.
pub(super) async fn list(svc: &PoolHandler) -> Result<pb::ListMembersResponse, Status> {
    let st = svc.c.node.status();
    let members = svc.c.read(|s| s.members.clone()).await?;
    let mut ids: Vec<u64> = st
        .voters
        .iter()
        .chain(&st.learners)
        .chain(&st.voters_outgoing)
        .copied()
        .collect();
    ids.sort_unstable();
    ids.dedup();
    let out = ids
        .into_iter()
        .map(|id| {
            let (matched, active) = st.progress.get(&id).copied().unwrap_or((0, id == st.id));
            pb::Member {
                id,
                address: members.get(&id).cloned().unwrap_or_default(),
                role: if st.learners.contains(&id) {
                    pb::MemberRole::Learner
                } else {
                    pb::MemberRole::Voter
                } as i32,
                leader: id == st.leader_id,
                reachable: active,
                match_index: matched,
            }
        })
        .collect();
    Ok(pb::ListMembersResponse { members: out })
}

pub(super) async fn add(
    svc: &PoolHandler,
    who: &Caller,
    r: pb::AddMemberRequest,
) -> Result<pb::Task, Status> {
    if r.member_id == 0 {
        return Err(Status::invalid_argument("member_id must be non-zero"));
    }
    r.address
        .parse::<std::net::SocketAddr>()
        .map_err(|e| Status::invalid_argument(format!("address {:?}: {e}", r.address)))?;
    if r.replaces_member_id != 0 && r.replaces_member_id == r.member_id {
        return Err(Status::invalid_argument("a member cannot replace itself"));
    }
    let change = MembershipChange::Add {
        id: r.member_id,
        address: r.address,
        learner: r.role == pb::MemberRole::Learner as i32,
        replaces: Some(r.replaces_member_id).filter(|&id| id != 0),
    };
    commit_change(svc, who, &r.request_id, change).await
}

pub(super) async fn remove(
    svc: &PoolHandler,
    who: &Caller,
    r: pb::RemoveMemberRequest,
) -> Result<pb::Task, Status> {
    let change = MembershipChange::Remove { id: r.member_id };
    commit_change(svc, who, &r.request_id, change).await
}

/// Commits the change and audits it (it is no state-machine command, so the apply does
/// not).
async fn commit_change(
    svc: &PoolHandler,
    who: &Caller,
    request_id: &str,
    change: MembershipChange,
) -> Result<pb::Task, Status> {
    let t = svc.c.change_members(request_id, &change).await?;
    svc.audit(who, &Status::new(tonic::Code::Ok, format!("task {}", t.id)));
    Ok(t)
}

/// Moves leadership to member `to`, audited whichever way it went.
pub(super) async fn transfer_leadership(
    svc: &PoolHandler,
    who: &Caller,
    to: u64,
) -> Result<pb::TransferLeadershipResponse, Status> {
    let res = if to == 0 {
        Err(Status::invalid_argument("member_id must be non-zero"))
    } else {
        svc.c.transfer_leadership(to).await
    };
    match res {
        Ok((leader_id, term)) => {
            svc.audit(who, &Status::ok(format!("leadership moved to member {to}")));
            Ok(pb::TransferLeadershipResponse { leader_id, term })
        }
        Err(s) => {
            svc.audit(who, &s);
            Err(s)
        }
    }
}
