//! The pool as a whole: its id, settings and counts, its HA settings, and its schedules
//! (run by the leader: `crate::schedules`).

use proto::coordinator as pb;
use tonic::Status;

use super::PoolHandler;
use crate::auth::Caller;
use crate::state::command::{ObjectId, Op};
use crate::state::schedules::{latest_due, next_due};

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

pub(super) async fn set_schedule(
    svc: &PoolHandler,
    who: &Caller,
    r: pb::SetScheduleRequest,
) -> Result<pb::Task, Status> {
    let s = r
        .schedule
        .ok_or_else(|| Status::invalid_argument("schedule is required"))?;
    crate::state::schedules::validate_schedule(&s).map_err(|e| e.into_status().unwrap_err())?;
    svc.c.write(who, &r.request_id, Op::SetSchedule(s)).await
}

pub(super) async fn delete_schedule(
    svc: &PoolHandler,
    who: &Caller,
    r: pb::DeleteScheduleRequest,
) -> Result<pb::Task, Status> {
    let op = Op::DeleteSchedule(ObjectId { id: r.name });
    svc.c.write(who, &r.request_id, op).await
}

/// A run now, named after now; the schedule's next run stays when it was due.
pub(super) async fn run_schedule(
    svc: &PoolHandler,
    who: &Caller,
    r: pb::RunScheduleRequest,
) -> Result<pb::Task, Status> {
    let s = svc
        .c
        .read(|s| s.schedule(&r.name).cloned())
        .await?
        .ok_or_else(|| Status::not_found(format!("no schedule named {:?}", r.name)))?;
    let job = crate::schedules::run_job(&s, proto::unix_ms(), 0, true);
    svc.c.write(who, &r.request_id, Op::ScheduleJob(job)).await
}

pub(super) async fn list_schedules(svc: &PoolHandler) -> Result<pb::ListSchedulesResponse, Status> {
    let now = proto::unix_ms();
    svc.c
        .read(|st| pb::ListSchedulesResponse {
            schedules: st
                .settings
                .schedules
                .iter()
                .map(|s| {
                    let run = st.schedule_runs.get(&s.name);
                    pb::ScheduleStatus {
                        schedule: Some(s.clone()),
                        last_due: run
                            .filter(|r| r.last_due_ms > 0 && !r.last_task_id.is_empty())
                            .map(|r| proto::timestamp(r.last_due_ms)),
                        next_due: (!s.disabled).then(|| {
                            let last = run.map_or(0, |r| r.last_due_ms);
                            // A run due and not taken yet (its VM busy) is due now.
                            let at = if latest_due(s, now) > last {
                                now
                            } else {
                                next_due(s, now)
                            };
                            proto::timestamp(at)
                        }),
                        last_task_id: run.map(|r| r.last_task_id.clone()).unwrap_or_default(),
                        snapshots: crate::schedules::snapshots_of(st, s).len() as u32,
                    }
                })
                .collect(),
        })
        .await
}
