//! Storage: repositories (a storaged's thin pool), the volumes in them, direct iSCSI
//! access to a volume from outside the pool, and who may reach a volume (its exports).

use std::collections::HashMap;

use proto::coordinator as pb;
use proto::host as hpb;
use proto::storage as spb;
use tonic::Status;

use super::PoolHandler;
use super::request::{job_status, need, page};
use crate::auth::Caller;
use crate::jobs::storage::SrLoc;
use crate::state::command::*;

pub(super) async fn create_sr(
    svc: &PoolHandler,
    who: &Caller,
    r: pb::CreateStorageRepositoryRequest,
) -> Result<pb::Task, Status> {
    need("name", &r.name)?;
    need("address", &r.address)?;
    if r.thin_pool_id.is_empty() && r.create_pool.is_none() {
        return Err(Status::invalid_argument(
            "give thin_pool_id (adopt an existing thin pool of that storaged) or create_pool",
        ));
    }
    let sr = pb::StorageRepository {
        id: uuid::Uuid::new_v4().to_string(),
        name: r.name,
        address: r.address,
        thin_pool_id: r.thin_pool_id,
        portals: vec![],
        usage: None,
        shared: true,
        reachable: true,
    };
    svc.start_job(
        who,
        &r.request_id,
        JobSpec::CreateSr(CreateSrJob {
            sr: Some(sr),
            create_pool: r.create_pool,
        }),
    )
    .await
}

pub(super) async fn get_sr(svc: &PoolHandler, id: String) -> Result<pb::StorageRepository, Status> {
    svc.c
        .read(|s| s.srs.get(&id).cloned())
        .await?
        .ok_or_else(|| Status::not_found(format!("no storage repository with id {id}")))
}

pub(super) async fn list_srs(
    svc: &PoolHandler,
    r: pb::ListStorageRepositoriesRequest,
) -> Result<pb::ListStorageRepositoriesResponse, Status> {
    let (repositories, next) = svc
        .c
        .read(|s| {
            page(
                s.srs.iter().map(|(k, v)| (k.clone(), v.clone())),
                r.page.as_ref(),
            )
        })
        .await?;
    Ok(pb::ListStorageRepositoriesResponse {
        repositories,
        next_page_token: next,
    })
}

pub(super) async fn remove_sr(
    svc: &PoolHandler,
    who: &Caller,
    r: pb::RemoveStorageRepositoryRequest,
) -> Result<pb::Task, Status> {
    svc.c
        .write(who, &r.request_id, Op::RemoveSr(ObjectId { id: r.sr_id }))
        .await
}

fn volume_job(action: VolumeAction) -> VolumeJob {
    VolumeJob {
        action: action as i32,
        ..Default::default()
    }
}

pub(super) async fn create_volume(
    svc: &PoolHandler,
    who: &Caller,
    r: pb::CreateVolumeRequest,
) -> Result<pb::Task, Status> {
    need("sr_id", &r.sr_id)?;
    need("name", &r.name)?;
    let v = VolumeJob {
        sr_id: r.sr_id,
        name: r.name,
        size_bytes: r.virtual_size_bytes,
        labels: r.labels,
        ..volume_job(VolumeAction::Create)
    };
    svc.start_job(who, &r.request_id, JobSpec::Volume(v)).await
}

pub(super) async fn get_volume(
    svc: &PoolHandler,
    id: String,
) -> Result<proto::storage::Volume, Status> {
    svc.c
        .read(|s| s.volumes.get(&id).cloned())
        .await?
        .ok_or_else(|| Status::not_found(format!("no volume with id {id}")))
}

pub(super) async fn list_volumes(
    svc: &PoolHandler,
    r: pb::ListVolumesRequest,
) -> Result<pb::ListVolumesResponse, Status> {
    let (volumes, next) = svc
        .c
        .read(|s| {
            page(
                s.volumes
                    .iter()
                    .filter(|(_, v)| r.sr_id.is_empty() || v.pool_id == r.sr_id)
                    .map(|(k, v)| (k.clone(), v.clone())),
                r.page.as_ref(),
            )
        })
        .await?;
    Ok(pb::ListVolumesResponse {
        volumes,
        next_page_token: next,
    })
}

pub(super) async fn resize_volume(
    svc: &PoolHandler,
    who: &Caller,
    r: pb::ResizeVolumeRequest,
) -> Result<pb::Task, Status> {
    let v = VolumeJob {
        volume_id: r.volume_id,
        size_bytes: r.new_virtual_size_bytes,
        force: r.force,
        ..volume_job(VolumeAction::Resize)
    };
    svc.start_job(who, &r.request_id, JobSpec::Volume(v)).await
}

pub(super) async fn snapshot_volume(
    svc: &PoolHandler,
    who: &Caller,
    r: pb::SnapshotVolumeRequest,
) -> Result<pb::Task, Status> {
    let v = VolumeJob {
        volume_id: r.volume_id,
        name: r.name,
        ..volume_job(VolumeAction::Snapshot)
    };
    svc.start_job(who, &r.request_id, JobSpec::Volume(v)).await
}

pub(super) async fn clone_volume(
    svc: &PoolHandler,
    who: &Caller,
    r: pb::CloneVolumeRequest,
) -> Result<pb::Task, Status> {
    let v = VolumeJob {
        volume_id: r.source_id,
        name: r.name,
        ..volume_job(VolumeAction::Clone)
    };
    svc.start_job(who, &r.request_id, JobSpec::Volume(v)).await
}

pub(super) async fn revert_volume(
    svc: &PoolHandler,
    who: &Caller,
    r: pb::RevertVolumeRequest,
) -> Result<pb::Task, Status> {
    let v = VolumeJob {
        volume_id: r.volume_id,
        snapshot_id: r.snapshot_id,
        ..volume_job(VolumeAction::Revert)
    };
    svc.start_job(who, &r.request_id, JobSpec::Volume(v)).await
}

pub(super) async fn delete_volume(
    svc: &PoolHandler,
    who: &Caller,
    r: pb::DeleteVolumeRequest,
) -> Result<pb::Task, Status> {
    let v = VolumeJob {
        volume_id: r.volume_id,
        ..volume_job(VolumeAction::Delete)
    };
    svc.start_job(who, &r.request_id, JobSpec::Volume(v)).await
}

/// The chunks where one snapshot of a volume differs from another, asked of the
/// storaged of the volume's repository.
pub(super) async fn changed_chunks(
    svc: &PoolHandler,
    r: spb::ListChangedChunksRequest,
) -> Result<spb::ListChangedChunksResponse, Status> {
    need("volume_id", &r.volume_id)?;
    need("target_snapshot_id", &r.target_snapshot_id)?;
    let loc = svc
        .c
        .read(|s| crate::jobs::storage::volume_loc(s, &r.volume_id))
        .await?
        .map_err(job_status)?;
    svc.storage.changed_chunks(&loc.address, r).await
}

/// Where a volume is and its size; refused while a VM that is not stopped uses it
/// (blocks written under a running guest would corrupt its disk).
async fn volume_for_access(svc: &PoolHandler, volume_id: &str) -> Result<(SrLoc, u64), Status> {
    svc.c
        .read(|s| {
            let loc = crate::jobs::storage::volume_loc(s, volume_id).map_err(job_status)?;
            let size = s.volumes[volume_id].virtual_size_bytes;
            let user = s.vms.values().find(|vm| {
                // The volume of a disk, or the undo overlay a host runs it on.
                let uses = vm
                    .spec
                    .as_ref()
                    .is_some_and(|sp| sp.disks.iter().any(|d| d.volume_id == volume_id))
                    || vm.undo_overlays.iter().any(|o| o.volume_id == volume_id);
                let stopped = vm.desired_power_state() == hpb::PowerState::Stopped
                    && vm.power_state() == hpb::PowerState::Stopped;
                uses && !stopped
            });
            if let Some(vm) = user {
                return Err(Status::failed_precondition(format!(
                    "volume {volume_id} is a disk of VM {} which is not stopped: shut it \
                     down, or export a snapshot of the volume",
                    vm.spec.as_ref().map_or(vm.id.as_str(), |s| s.name.as_str())
                )));
            }
            Ok((loc, size))
        })
        .await?
}

/// Lets an initiator outside the pool reach a volume over iSCSI: its export is granted
/// to the initiator's IQN.
pub(super) async fn open_access(
    svc: &PoolHandler,
    r: &pb::VolumeAccessRequest,
) -> Result<pb::VolumeAccess, Status> {
    need("volume_id", &r.volume_id)?;
    need("initiator_iqn", &r.initiator_iqn)?;
    let (loc, size) = volume_for_access(svc, &r.volume_id).await?;
    crate::jobs::storage::grant_access(&svc.env(), &loc, &r.volume_id, size, &r.initiator_iqn)
        .await
        .map_err(job_status)
}

/// Revokes the initiator's access on every export of the volume; answers how many of its
/// sessions were dropped.
pub(super) async fn close_access(
    svc: &PoolHandler,
    r: &pb::VolumeAccessRequest,
) -> Result<pb::CloseVolumeAccessResponse, Status> {
    need("volume_id", &r.volume_id)?;
    need("initiator_iqn", &r.initiator_iqn)?;
    let loc = svc
        .c
        .read(|s| crate::jobs::storage::volume_loc(s, &r.volume_id))
        .await?
        .map_err(job_status)?;
    let dropped =
        crate::jobs::storage::revoke_access(&svc.env(), &loc, &r.volume_id, &r.initiator_iqn)
            .await
            .map_err(job_status)?;
    Ok(pb::CloseVolumeAccessResponse {
        sessions_dropped: dropped,
    })
}

/// A volume's exports as its repository's storaged has them, each grant named by the pool
/// host whose initiator it is; CHAP credentials are left out.
pub(super) async fn list_exports(
    svc: &PoolHandler,
    r: pb::ListVolumeExportsRequest,
) -> Result<pb::ListVolumeExportsResponse, Status> {
    need("volume_id", &r.volume_id)?;
    let (loc, hosts) = svc
        .c
        .read(|s| {
            let loc = crate::jobs::storage::volume_loc(s, &r.volume_id).map_err(job_status)?;
            Ok::<_, Status>((loc, host_initiators(s)))
        })
        .await??;
    let exports = svc
        .storage
        .list_exports(&loc.address, &r.volume_id)
        .await
        .map_err(|s| {
            if crate::backend::transient(&s) {
                Status::unavailable(format!(
                    "the storaged of repository {} at {} did not answer: {}",
                    loc.sr_id,
                    loc.address,
                    s.message()
                ))
            } else {
                s
            }
        })?;
    Ok(pb::ListVolumeExportsResponse {
        exports: exports
            .into_iter()
            .map(|e| volume_export(e, &hosts))
            .collect(),
    })
}

/// Pool hosts by the initiator name they reported: IQN → host name.
fn host_initiators(s: &crate::state::PoolState) -> HashMap<String, String> {
    s.hosts
        .values()
        .filter_map(|h| {
            let iqn = &h.info.as_ref()?.initiator_iqn;
            (!iqn.is_empty()).then(|| (iqn.clone(), h.name.clone()))
        })
        .collect()
}

/// storaged's export as the pool shows it: no CHAP credential is copied.
fn volume_export(e: spb::Export, hosts: &HashMap<String, String>) -> pb::VolumeExport {
    pb::VolumeExport {
        id: e.id,
        target_iqn: e.target_iqn,
        lun: e.lun,
        portals: e.portals,
        read_only: e.read_only,
        grants: e
            .grants
            .into_iter()
            .map(|g| pb::VolumeExportGrant {
                host_name: hosts.get(&g.initiator_iqn).cloned().unwrap_or_default(),
                initiator_iqn: g.initiator_iqn,
                granted_at: g.granted_at,
            })
            .collect(),
        session_initiators: e.sessions.into_iter().map(|s| s.initiator_iqn).collect(),
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::*;

    /// A grant carries its initiator, when, and the pool host it is; its CHAP secrets
    /// (both ways) never leave poold.
    #[test]
    fn an_export_shows_grants_by_host_and_no_chap_secret() {
        let chap = |user: &str, secret: &str| spb::ChapCredentials {
            username: user.into(),
            secret: secret.into(),
        };
        let e = spb::Export {
            id: "e1".into(),
            volume_id: "vol1".into(),
            target_iqn: "iqn.2026-11.lab:vol1".into(),
            lun: 3,
            portals: vec!["10.0.0.9:3260".into()],
            read_only: true,
            grants: vec![
                spb::AccessGrant {
                    export_id: "e1".into(),
                    initiator_iqn: "iqn.h1".into(),
                    chap: Some(chap("iqn.h1", "initiator-secret-1")),
                    mutual_chap: Some(chap("target", "target-secret-1")),
                    granted_at: Some(proto::timestamp(5_000)),
                },
                spb::AccessGrant {
                    export_id: "e1".into(),
                    initiator_iqn: "iqn.outside".into(),
                    chap: Some(chap("iqn.outside", "initiator-secret-2")),
                    ..Default::default()
                },
            ],
            sessions: vec![spb::IscsiSession {
                initiator_iqn: "iqn.h1".into(),
                isid: "00023d000001".into(),
                ..Default::default()
            }],
            serial: "s".into(),
            naa_id: "n".into(),
        };
        let hosts = HashMap::from([("iqn.h1".to_string(), "one".to_string())]);
        let v = volume_export(e, &hosts);
        assert_eq!(
            (v.id.as_str(), v.target_iqn.as_str(), v.lun, v.read_only),
            ("e1", "iqn.2026-11.lab:vol1", 3, true)
        );
        assert_eq!(v.portals, ["10.0.0.9:3260"]);
        let grants: Vec<(&str, &str)> = v
            .grants
            .iter()
            .map(|g| (g.initiator_iqn.as_str(), g.host_name.as_str()))
            .collect();
        assert_eq!(grants, [("iqn.h1", "one"), ("iqn.outside", "")]);
        assert_eq!(v.grants[0].granted_at, Some(proto::timestamp(5_000)));
        assert_eq!(v.session_initiators, ["iqn.h1"]);
        let wire = String::from_utf8_lossy(&v.encode_to_vec()).into_owned();
        assert!(!wire.contains("secret"), "{wire:?}");
    }

    #[test]
    fn hosts_are_known_by_the_initiator_they_reported() {
        let mut s = crate::state::PoolState::default();
        for (id, iqn) in [("h1", "iqn.h1"), ("h2", ""), ("h3", "iqn.h3")] {
            s.hosts.insert(
                id.into(),
                pb::Host {
                    id: id.into(),
                    name: format!("name-{id}"),
                    info: Some(hpb::HostInfo {
                        initiator_iqn: iqn.into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            );
        }
        s.hosts.insert(
            "h4".into(),
            pb::Host {
                id: "h4".into(),
                ..Default::default()
            },
        );
        let m = host_initiators(&s);
        assert_eq!(m.len(), 2, "{m:?}");
        assert_eq!(m["iqn.h1"], "name-h1");
        assert_eq!(m["iqn.h3"], "name-h3");
    }
}
