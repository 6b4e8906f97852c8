//! The pool as a whole: its id, settings and counts, and its HA settings.

use proto::coordinator as pb;
use tonic::Status;

use super::PoolHandler;
use crate::auth::Caller;
use crate::state::command::Op;

pub(super) async fn get_pool(svc: &PoolHandler) -> Result<pb::Pool, Status> {
    let st = svc.c.node.status();
    svc.c
        .read(|s| pb::Pool {
            id: s.pool_id.clone(),
            settings: Some(s.settings.clone()),
            leader_member_id: st.leader_id.to_string(),
            raft_term: st.term,
            commit_index: st.commit_index,
            host_count: s.hosts.len() as u32,
            vm_count: s.vms.len() as u32,
            ha: Some(s.ha),
        })
        .await
}

pub(super) async fn update(
    svc: &PoolHandler,
    who: &Caller,
    r: pb::UpdatePoolSettingsRequest,
) -> Result<pb::Task, Status> {
    let s = r
        .settings
        .ok_or_else(|| Status::invalid_argument("settings are required"))?;
    crate::state::machine::validate_settings(&s).map_err(|e| e.into_status().unwrap_err())?;
    svc.c.write(who, &r.request_id, Op::UpdateSettings(s)).await
}

pub(super) async fn get_ha(svc: &PoolHandler) -> Result<pb::HaSettings, Status> {
    svc.c.read(|s| s.ha).await
}

pub(super) async fn set_ha(
    svc: &PoolHandler,
    who: &Caller,
    r: pb::SetHaSettingsRequest,
) -> Result<pb::Task, Status> {
    let h = r
        .settings
        .ok_or_else(|| Status::invalid_argument("settings are required"))?;
    if h.failure_timeout_seconds > 3600 {
        return Err(Status::invalid_argument(
            "failure_timeout_seconds must be at most 3600",
        ));
    }
    svc.c.write(who, &r.request_id, Op::SetHa(h)).await
}
