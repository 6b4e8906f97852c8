//! Hosts: joining, looking up, enabling and disabling, evacuating, removing.

use proto::coordinator as pb;
use tonic::Status;

use super::PoolHandler;
use super::request::{job, need, page};
use crate::auth::Caller;
use crate::state::command::*;

pub(super) async fn join(
    svc: &PoolHandler,
    who: &Caller,
    r: pb::JoinHostRequest,
) -> Result<pb::Task, Status> {
    need("address", &r.address)?;
    let name = if r.name.is_empty() {
        r.address.clone()
    } else {
        r.name
    };
    let op = Op::JoinHost(JoinHost {
        host_id: uuid::Uuid::new_v4().to_string(),
        name,
        address: r.address,
    });
    svc.c.write(who, &r.request_id, op).await
}

pub(super) async fn get(svc: &PoolHandler, id: String) -> Result<pb::Host, Status> {
    svc.c
        .read(|s| s.hosts.get(&id).cloned())
        .await?
        .ok_or_else(|| Status::not_found(format!("no host with id {id}")))
}

pub(super) async fn list(
    svc: &PoolHandler,
    r: pb::ListHostsRequest,
) -> Result<pb::ListHostsResponse, Status> {
    let (hosts, next) = svc
        .c
        .read(|s| {
            page(
                s.hosts
                    .iter()
                    .filter(|(_, h)| r.state == 0 || h.state == r.state)
                    .map(|(k, v)| (k.clone(), v.clone())),
                r.page.as_ref(),
            )
        })
        .await?;
    Ok(pb::ListHostsResponse {
        hosts,
        next_page_token: next,
    })
}

/// Enables or disables a host (a disabled host takes no new VM).
pub(super) async fn set_state(
    svc: &PoolHandler,
    who: &Caller,
    r: pb::HostRef,
    state: pb::HostState,
) -> Result<pb::Task, Status> {
    let op = Op::SetHostState(SetHostState {
        host_id: r.host_id,
        state: state as i32,
    });
    svc.c.write(who, &r.request_id, op).await
}

/// Empties a host for maintenance: no new VM lands on it meanwhile, each VM is
/// live-migrated by a job of its own, and the last one to finish puts the host in
/// maintenance. The answer is the first migration's task (or, with no VM, the change
/// to maintenance).
pub(super) async fn evacuate(
    svc: &PoolHandler,
    who: &Caller,
    r: pb::HostRef,
) -> Result<pb::Task, Status> {
    need("host_id", &r.host_id)?;
    let vms: Vec<pb::Vm> = svc
        .c
        .read(|s| {
            s.vms
                .values()
                .filter(|v| v.host_id == r.host_id)
                .cloned()
                .collect()
        })
        .await?;
    if vms.is_empty() {
        let op = Op::SetHostState(SetHostState {
            host_id: r.host_id.clone(),
            state: pb::HostState::Maintenance as i32,
        });
        return svc.c.write(who, &r.request_id, op).await;
    }
    let op = Op::SetHostState(SetHostState {
        host_id: r.host_id.clone(),
        state: pb::HostState::Disabled as i32,
    });
    svc.c
        .write(who, &format!("{}-disable", r.request_id), op)
        .await?;
    let budget = svc
        .c
        .read(|s| s.settings.migration_downtime_budget_ms)
        .await?;
    let mut first = None;
    for vm in vms {
        let dest = super::vms::destination(svc, &vm, "").await?;
        let t = svc
            .c
            .write(
                who,
                &format!("{}-{}", r.request_id, vm.id),
                job(JobSpec::MigrateVm(MigrateVmJob {
                    vm_id: vm.id.clone(),
                    source_host_id: r.host_id.clone(),
                    destination_host_id: dest,
                    downtime_budget_ms: budget,
                    auto_converge: true,
                    token: uuid::Uuid::new_v4().simple().to_string(),
                    evacuating_host_id: r.host_id.clone(),
                })),
            )
            .await?;
        first.get_or_insert(t);
    }
    Ok(first.expect("at least one VM"))
}

pub(super) async fn remove(
    svc: &PoolHandler,
    who: &Caller,
    r: pb::HostRef,
) -> Result<pb::Task, Status> {
    svc.c
        .write(
            who,
            &r.request_id,
            Op::RemoveHost(ObjectId { id: r.host_id }),
        )
        .await
}
