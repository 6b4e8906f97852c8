//! Storage repositories and volumes: the jobs that act on storaged.
//!
//! In the pool state a volume's `pool_id` is its storage repository's id (storaged's own
//! thin pool id is the repository's `thin_pool_id`); volume ids are storaged's.

use std::collections::HashMap;

use proto::coordinator as pb;
use proto::storage as spb;
use tonic::Code;

use super::{Env, Finish, JobError, read};
use crate::state::command::*;

/// Labels that tie a storaged object to the job step that made it.
pub const TASK_LABEL: &str = "poold.task";
pub const STEP_LABEL: &str = "poold.step";

/// Where a repository lives: storaged's address and the thin pool id.
#[derive(Debug, Clone, PartialEq)]
pub struct SrLoc {
    pub sr_id: String,
    pub address: String,
    pub thin_pool_id: String,
}

pub fn sr_loc(s: &crate::state::PoolState, sr_id: &str) -> Result<SrLoc, JobError> {
    let sr = s.srs.get(sr_id).ok_or_else(|| {
        JobError::refused(Code::NotFound, format!("no storage repository {sr_id}"))
    })?;
    Ok(SrLoc {
        sr_id: sr.id.clone(),
        address: sr.address.clone(),
        thin_pool_id: sr.thin_pool_id.clone(),
    })
}

/// The repository of a volume the pool knows.
pub fn volume_loc(s: &crate::state::PoolState, volume_id: &str) -> Result<SrLoc, JobError> {
    let v = s.volumes.get(volume_id).ok_or_else(|| {
        JobError::refused(Code::NotFound, format!("no volume with id {volume_id}"))
    })?;
    sr_loc(s, &v.pool_id)
}

/// A storaged volume as the pool records it.
pub fn pooled(mut v: spb::Volume, sr_id: &str) -> spb::Volume {
    v.pool_id = sr_id.to_owned();
    v
}

pub fn labels(
    task_id: &str,
    step: &str,
    user: &HashMap<String, String>,
) -> HashMap<String, String> {
    let mut l = user.clone();
    l.insert(TASK_LABEL.into(), task_id.into());
    l.insert(STEP_LABEL.into(), step.into());
    l
}

/// The volume an earlier attempt of this step created, if any.
pub async fn find_made(
    env: &Env,
    loc: &SrLoc,
    task_id: &str,
    step: &str,
) -> Result<Option<spb::Volume>, JobError> {
    let all = env
        .storage
        .list_volumes(&loc.address, &loc.thin_pool_id)
        .await
        .map_err(|s| JobError::from_status(format!("listing volumes of {}", loc.address), s))?;
    Ok(all.into_iter().find(|v| {
        v.labels.get(TASK_LABEL).map(String::as_str) == Some(task_id)
            && v.labels.get(STEP_LABEL).map(String::as_str) == Some(step)
    }))
}

/// What a step makes: a snapshot or a clone of `source`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Make {
    Snapshot,
    Clone,
}

/// Snapshots or clones `source` once per (task, step): an earlier attempt's result is
/// found by its labels and returned instead.
#[allow(clippy::too_many_arguments)]
pub async fn make_once(
    env: &Env,
    loc: &SrLoc,
    task_id: &str,
    step: &str,
    what: Make,
    source: &str,
    name: &str,
    user_labels: &HashMap<String, String>,
) -> Result<spb::Volume, JobError> {
    if let Some(v) = find_made(env, loc, task_id, step).await? {
        return Ok(pooled(v, &loc.sr_id));
    }
    let l = labels(task_id, step, user_labels);
    let r = match what {
        Make::Snapshot => {
            env.storage
                .snapshot(
                    &loc.address,
                    spb::CreateSnapshotRequest {
                        volume_id: source.to_owned(),
                        name: name.to_owned(),
                        labels: l,
                    },
                )
                .await
        }
        Make::Clone => {
            env.storage
                .clone_volume(
                    &loc.address,
                    spb::CloneVolumeRequest {
                        source_id: source.to_owned(),
                        name: name.to_owned(),
                        labels: l,
                    },
                )
                .await
        }
    };
    match r {
        Ok(v) => Ok(pooled(v, &loc.sr_id)),
        // A concurrent attempt (a previous leader's executor) took the name first.
        Err(s) if s.code() == Code::AlreadyExists => {
            match find_made(env, loc, task_id, step).await? {
                Some(v) => Ok(pooled(v, &loc.sr_id)),
                None => Err(JobError::refused(
                    Code::AlreadyExists,
                    format!("a volume named {name:?} already exists in that repository"),
                )),
            }
        }
        Err(s) => Err(JobError::from_status(
            format!("{what:?} of volume {source}"),
            s,
        )),
    }
}

/// Deletes a volume on storaged; absent already counts as done.
pub async fn delete_once(env: &Env, loc: &SrLoc, volume_id: &str) -> Result<(), JobError> {
    match env
        .storage
        .delete_volume(&loc.address, volume_id, true)
        .await
    {
        Ok(()) => Ok(()),
        Err(s) if s.code() == Code::NotFound => Ok(()),
        Err(s) => Err(JobError::from_status(
            format!("deleting volume {volume_id}"),
            s,
        )),
    }
}

/// Grants `initiator` iSCSI access to the volume's export (made if missing) with the CHAP
/// secrets the pool derives for that initiator: how an initiator outside the pool logs in
/// (poolctl's transfers, the web console's downloads, scheduled backups).
pub async fn grant_access(
    env: &Env,
    loc: &SrLoc,
    volume_id: &str,
    size_bytes: u64,
    initiator: &str,
) -> Result<pb::VolumeAccess, JobError> {
    let export = super::vm::export_of(env, loc, volume_id).await?;
    let key = read(&*env.ledger, |s| s.token_key.clone());
    let chap = crate::chap::secrets(&key, initiator).map_err(|s| JobError::Refused {
        code: s.code(),
        message: s.message().to_owned(),
    })?;
    let d = super::vm::grant_volume(env, loc, &export, volume_id, initiator, &chap).await?;
    Ok(pb::VolumeAccess {
        portal: d.portal,
        target_iqn: d.target_iqn,
        lun: d.lun,
        size_bytes,
        chap_username: d.chap_username,
        chap_secret: d.chap_secret,
        mutual_chap_username: d.mutual_chap_username,
        mutual_chap_secret: d.mutual_chap_secret,
    })
}

/// Revokes `initiator` on every export of the volume; answers how many of its sessions
/// were dropped.
pub async fn revoke_access(
    env: &Env,
    loc: &SrLoc,
    volume_id: &str,
    initiator: &str,
) -> Result<u32, JobError> {
    let what = |s| JobError::from_status(format!("revoking {initiator} on volume {volume_id}"), s);
    let mut dropped = 0;
    for e in env
        .storage
        .list_exports(&loc.address, volume_id)
        .await
        .map_err(what)?
    {
        dropped += env
            .storage
            .revoke(&loc.address, &e.id, initiator)
            .await
            .map_err(what)?;
    }
    Ok(dropped)
}

pub async fn create_sr(env: &Env, job: &Job, j: &CreateSrJob) -> Result<Finish, JobError> {
    let mut sr =
        j.sr.clone()
            .ok_or_else(|| JobError::refused(Code::InvalidArgument, "no repository given"))?;
    let addr = sr.address.clone();
    let pools = env
        .storage
        .list_pools(&addr)
        .await
        .map_err(|s| JobError::from_status(format!("reaching storaged at {addr}"), s))?;
    let pool = if !sr.thin_pool_id.is_empty() {
        pools
            .into_iter()
            .find(|p| p.id == sr.thin_pool_id)
            .ok_or_else(|| {
                JobError::refused(
                    Code::NotFound,
                    format!(
                        "storaged at {addr} has no thin pool {}; ListPools there shows what it has",
                        sr.thin_pool_id
                    ),
                )
            })?
    } else {
        let req = j.create_pool.clone().unwrap_or_default();
        // An earlier attempt may have created it: same backing path.
        match pools
            .into_iter()
            .find(|p| !req.backing_path.is_empty() && p.backing_path == req.backing_path)
        {
            Some(p) => p,
            None => {
                let mut req = req;
                if req.name.is_empty() {
                    req.name = sr.name.clone();
                }
                env.storage.create_pool(&addr, req).await.map_err(|s| {
                    JobError::from_status(format!("creating a thin pool at {addr}"), s)
                })?
            }
        }
    };
    sr.thin_pool_id = pool.id.clone();
    sr.usage = pool.usage;
    sr.reachable = true;
    sr.shared = true;
    let loc = SrLoc {
        sr_id: sr.id.clone(),
        address: addr.clone(),
        thin_pool_id: pool.id.clone(),
    };
    let exports = env
        .storage
        .list_exports(&addr, "")
        .await
        .map_err(|s| JobError::from_status(format!("listing exports at {addr}"), s))?;
    if let Some(e) = exports.iter().find(|e| !e.portals.is_empty()) {
        sr.portals = e.portals.clone();
    }
    // An adopted pool brings its volumes along.
    let volumes = env
        .storage
        .list_volumes(&addr, &loc.thin_pool_id)
        .await
        .map_err(|s| JobError::from_status(format!("listing volumes at {addr}"), s))?;
    let already: Vec<String> = read(&*env.ledger, |s| {
        volumes
            .iter()
            .filter(|v| s.volumes.contains_key(&v.id))
            .map(|v| v.id.clone())
            .collect()
    });
    let mut f = Finish {
        target: sr.id.clone(),
        ..Default::default()
    }
    .result("thin_pool_id", &pool.id)
    .result("volumes_adopted", volumes.len() - already.len());
    for v in volumes.into_iter().filter(|v| !already.contains(&v.id)) {
        f = f.effect(EffectKind::PutVolume(pooled(v, &sr.id)));
    }
    let _ = job;
    Ok(f.effect(EffectKind::PutSr(sr)))
}

pub async fn volume(env: &Env, job: &Job, v: &VolumeJob) -> Result<Finish, JobError> {
    let action = VolumeAction::try_from(v.action).unwrap_or(VolumeAction::Unspecified);
    let loc = read(&*env.ledger, |s| {
        if action == VolumeAction::Create {
            sr_loc(s, &v.sr_id)
        } else {
            volume_loc(s, &v.volume_id)
        }
    })?;
    let addr = loc.address.as_str();
    let done = |vol: spb::Volume| {
        let id = vol.id.clone();
        Finish {
            target: id.clone(),
            ..Default::default()
        }
        .result("volume_id", &id)
        .effect(EffectKind::PutVolume(pooled(vol, &loc.sr_id)))
    };
    match action {
        VolumeAction::Create => {
            if let Some(vol) = find_made(env, &loc, &job.task_id, "volume").await? {
                return Ok(done(vol));
            }
            let r = env
                .storage
                .create_volume(
                    addr,
                    spb::CreateVolumeRequest {
                        pool_id: loc.thin_pool_id.clone(),
                        name: v.name.clone(),
                        virtual_size_bytes: v.size_bytes,
                        block_size_bytes: 0,
                        labels: labels(&job.task_id, "volume", &v.labels),
                    },
                )
                .await;
            match r {
                Ok(vol) => Ok(done(vol)),
                Err(s) if s.code() == Code::AlreadyExists => {
                    match find_made(env, &loc, &job.task_id, "volume").await? {
                        Some(vol) => Ok(done(vol)),
                        None => Err(JobError::refused(
                            Code::AlreadyExists,
                            format!(
                                "a volume named {:?} already exists in that repository; choose another name",
                                v.name
                            ),
                        )),
                    }
                }
                Err(s) => Err(JobError::from_status("creating the volume", s)),
            }
        }
        VolumeAction::Resize => {
            let vol = env
                .storage
                .resize_volume(
                    addr,
                    spb::ResizeVolumeRequest {
                        volume_id: v.volume_id.clone(),
                        new_virtual_size_bytes: v.size_bytes,
                        force: v.force,
                    },
                )
                .await
                .map_err(|s| JobError::from_status("resizing the volume", s))?;
            Ok(done(vol))
        }
        VolumeAction::Snapshot | VolumeAction::Clone => {
            let what = if action == VolumeAction::Snapshot {
                Make::Snapshot
            } else {
                Make::Clone
            };
            let vol = make_once(
                env,
                &loc,
                &job.task_id,
                "volume",
                what,
                &v.volume_id,
                &v.name,
                &v.labels,
            )
            .await?;
            Ok(done(vol))
        }
        VolumeAction::Revert => {
            let vol = env
                .storage
                .revert(addr, &v.volume_id, &v.snapshot_id)
                .await
                .map_err(|s| JobError::from_status("reverting the volume", s))?;
            Ok(done(vol))
        }
        VolumeAction::Delete => {
            delete_once(env, &loc, &v.volume_id).await?;
            Ok(Finish {
                target: v.volume_id.clone(),
                ..Default::default()
            }
            .effect(EffectKind::RemoveVolume(v.volume_id.clone())))
        }
        VolumeAction::Unspecified => Err(JobError::refused(
            Code::InvalidArgument,
            "unknown volume action",
        )),
    }
}

/// Leader-only loop: every few seconds, storaged's figures (usage, allocation, portals,
/// reachability) are committed where they changed, so every member answers with them.
pub async fn refresh_loop(
    c: std::sync::Arc<crate::coordinator::Coordinator>,
    env: Env,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_secs(3)) => {}
            _ = shutdown.changed() => {}
        }
        if *shutdown.borrow() {
            return;
        }
        if !c.is_leader() {
            continue;
        }
        let srs: Vec<pb::StorageRepository> =
            read(&*env.ledger, |s| s.srs.values().cloned().collect());
        let mut figures = Vec::new();
        for sr in srs {
            let f = sr_figures(&env, &sr).await;
            let changed = read(&*env.ledger, |s| {
                let Some(cur) = s.srs.get(&sr.id) else {
                    return false;
                };
                cur.reachable != f.reachable
                    || (f.usage.is_some() && cur.usage != f.usage)
                    || (!f.portals.is_empty() && cur.portals != f.portals)
                    || f.volumes.iter().any(|v| {
                        s.volumes
                            .get(&v.id)
                            .is_some_and(|mine| *mine != pooled(v.clone(), &sr.id))
                    })
            });
            if changed {
                figures.push(f);
            }
        }
        if figures.is_empty() {
            continue;
        }
        if let Err(e) = env
            .ledger
            .commit("", Op::StorageRefresh(StorageRefresh { srs: figures }))
            .await
        {
            tracing::debug!(error = %e, "storage figures not committed");
        }
    }
}

async fn sr_figures(env: &Env, sr: &pb::StorageRepository) -> SrFigures {
    let addr = &sr.address;
    let usage = env.storage.pool_usage(addr, &sr.thin_pool_id).await;
    let volumes = env.storage.list_volumes(addr, &sr.thin_pool_id).await;
    let exports = env.storage.list_exports(addr, "").await;
    let reachable = usage.is_ok() && volumes.is_ok();
    SrFigures {
        sr_id: sr.id.clone(),
        reachable,
        usage: usage.ok(),
        portals: exports
            .ok()
            .and_then(|e| e.into_iter().find(|e| !e.portals.is_empty()))
            .map(|e| e.portals)
            .unwrap_or_default(),
        volumes: volumes.unwrap_or_default(),
    }
}
