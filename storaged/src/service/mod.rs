//! The `StorageService` of `proto/storage.proto` over the pools this daemon holds.
//!
//! Every pool call blocks on disk I/O, so handlers run it on tokio's blocking pool. Errors
//! carry a status code a client can act on (NotFound, AlreadyExists, InvalidArgument,
//! ResourceExhausted for a full pool, FailedPrecondition, Unavailable for a failed pool).
//!
//! # Layout
//! - `registry.rs`: [`Storage`], the pools this daemon holds and the file that lists them.
//! - `convert.rs`: model to protobuf and back, error codes, paging.
//! - this file: [`StorageApi`], the handlers: check the request, run the pool call,
//!   convert the answer.

use std::path::PathBuf;
use std::sync::Arc;

use proto::storage::{self as pb, storage_service_server::StorageService};
use tonic::{Request, Response, Status};

use crate::export::{ExportRecord, Exports};
use crate::pool::{CreateOptions, ImportOptions, ThinPool};

mod convert;
mod registry;

use convert::{
    backing_kind, chap_field, labels, page, parse_id, pb_grant, pb_kind, pb_pool, pb_usage,
    timestamp, volume_id,
};
pub use convert::{export_status, pb_volume, status};
pub use registry::{EntryKind, PoolEntry, RegistryError, Storage};

/// Ranges of changed chunks per page when the client asks for none, and the most a page
/// holds (a range is a few bytes: pages are larger than listings').
const DEFAULT_CHANGED_PAGE: usize = 1000;
const MAX_CHANGED_PAGE: usize = 10_000;

/// Runs blocking pool work off the reactor.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Status> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("storage task failed: {e}")))?
}

/// The gRPC face of [`Storage`] and its [`Exports`].
#[derive(Debug, Clone)]
pub struct StorageApi {
    storage: Arc<Storage>,
    exports: Arc<Exports>,
}

impl StorageApi {
    pub fn new(storage: Arc<Storage>, exports: Arc<Exports>) -> Self {
        StorageApi { storage, exports }
    }

    fn pb_export(&self, rec: &ExportRecord) -> pb::Export {
        pb::Export {
            id: rec.id.to_string(),
            volume_id: rec.volume_id.to_string(),
            target_iqn: rec.target_iqn.clone(),
            lun: u32::from(rec.lun),
            portals: self.exports.portals().to_vec(),
            read_only: rec.read_only,
            grants: rec.grants.iter().map(|g| pb_grant(&rec.id, g)).collect(),
            sessions: self
                .exports
                .sessions(rec)
                .into_iter()
                .map(|s| pb::IscsiSession {
                    initiator_iqn: s.initiator,
                    isid: s.isid.iter().map(|b| format!("{b:02x}")).collect(),
                    tsih: u32::from(s.tsih),
                    peer_address: s.peer.to_string(),
                    logged_in_at: s
                        .since
                        .duration_since(std::time::UNIX_EPOCH)
                        .ok()
                        .and_then(|d| timestamp(d.as_secs())),
                })
                .collect(),
            serial: rec.serial.clone(),
            naa_id: rec.naa().iter().map(|b| format!("{b:02x}")).collect(),
        }
    }
}

#[tonic::async_trait]
impl StorageService for StorageApi {
    async fn create_pool(
        &self,
        req: Request<pb::CreatePoolRequest>,
    ) -> Result<Response<pb::ThinPool>, Status> {
        let r = req.into_inner();
        let kind = backing_kind(r.backing_kind)?;
        if r.backing_path.is_empty() {
            return Err(Status::invalid_argument("backing_path is required"));
        }
        let storage = self.storage.clone();
        let pool = blocking(move || {
            let pool = ThinPool::create(&CreateOptions {
                name: if r.name.is_empty() {
                    "pool".into()
                } else {
                    r.name
                },
                kind,
                path: PathBuf::from(r.backing_path),
                size: (r.size_bytes != 0).then_some(r.size_bytes),
                chunk_size: r.chunk_size_bytes,
                meta_dir: None,
                warning_threshold_percent: r.warning_threshold_percent,
            })
            .map_err(status)?;
            storage.add(pool.clone());
            storage.save_registry()?;
            Ok(pool)
        })
        .await?;
        Ok(Response::new(pb_pool(&pool)))
    }

    async fn import_pool(
        &self,
        req: Request<pb::ImportPoolRequest>,
    ) -> Result<Response<pb::ThinPool>, Status> {
        let r = req.into_inner();
        let kind = backing_kind(r.backing_kind)?;
        let expected_id = if r.expected_pool_id.is_empty() {
            None
        } else {
            Some(parse_id("expected_pool_id", &r.expected_pool_id)?)
        };
        let storage = self.storage.clone();
        let pool = blocking(move || {
            let pool = ThinPool::import(&ImportOptions {
                kind,
                path: PathBuf::from(&r.backing_path),
                meta_dir: None,
                expected_id,
            })
            .map_err(status)?;
            if storage.pool(&pool.id().to_string()).is_ok() {
                return Err(Status::already_exists(format!(
                    "pool {} is already imported",
                    pool.id()
                )));
            }
            storage.add(pool.clone());
            storage.save_registry()?;
            Ok(pool)
        })
        .await?;
        self.exports.load(&pool).await;
        Ok(Response::new(pb_pool(&pool)))
    }

    async fn extend_pool(
        &self,
        req: Request<pb::ExtendPoolRequest>,
    ) -> Result<Response<pb::ThinPool>, Status> {
        let r = req.into_inner();
        let pool = self.storage.pool(&r.pool_id)?;
        let p = pool.clone();
        blocking(move || {
            p.extend((r.new_size_bytes != 0).then_some(r.new_size_bytes))
                .map_err(status)
        })
        .await?;
        Ok(Response::new(pb_pool(&pool)))
    }

    async fn get_pool(
        &self,
        req: Request<pb::GetPoolRequest>,
    ) -> Result<Response<pb::ThinPool>, Status> {
        let pool = self.storage.pool(&req.into_inner().pool_id)?;
        Ok(Response::new(pb_pool(&pool)))
    }

    async fn list_pools(
        &self,
        req: Request<pb::ListPoolsRequest>,
    ) -> Result<Response<pb::ListPoolsResponse>, Status> {
        let r = req.into_inner();
        let all: Vec<pb::ThinPool> = self.storage.pools().iter().map(pb_pool).collect();
        let (pools, next_page_token) = page(all, r.page_size, &r.page_token)?;
        Ok(Response::new(pb::ListPoolsResponse {
            pools,
            next_page_token,
        }))
    }

    async fn get_pool_usage(
        &self,
        req: Request<pb::GetPoolUsageRequest>,
    ) -> Result<Response<pb::PoolUsage>, Status> {
        let pool = self.storage.pool(&req.into_inner().pool_id)?;
        Ok(Response::new(pb_usage(&pool.usage())))
    }

    async fn check_pool(
        &self,
        req: Request<pb::CheckPoolRequest>,
    ) -> Result<Response<pb::CheckPoolReport>, Status> {
        let r = req.into_inner();
        let pool = self.storage.pool(&r.pool_id)?;
        let id = pool.id().to_string();
        let report = blocking(move || pool.check(r.repair).map_err(status)).await?;
        Ok(Response::new(pb::CheckPoolReport {
            pool_id: id,
            clean: report.clean(),
            chunks_checked: report.chunks_checked,
            leaked_chunks: report.leaked_chunks,
            refcount_mismatches: report.refcount_mismatches,
            double_allocations: report.double_allocations,
            reclaimed_chunks: report.reclaimed_chunks,
            problems: report.problems,
        }))
    }

    async fn create_volume(
        &self,
        req: Request<pb::CreateVolumeRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let r = req.into_inner();
        let pool = self.storage.pool(&r.pool_id)?;
        let p = pool.clone();
        let v = blocking(move || {
            p.create_volume(
                &r.name,
                r.virtual_size_bytes,
                r.block_size_bytes,
                labels(r.labels),
            )
            .map_err(status)
        })
        .await?;
        Ok(Response::new(pb_volume(&pool, &v)))
    }

    async fn get_volume(
        &self,
        req: Request<pb::GetVolumeRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let id = volume_id("volume_id", &req.into_inner().volume_id)?;
        let pool = self.storage.pool_of(id)?;
        let v = pool.volume_info(id).map_err(status)?;
        Ok(Response::new(pb_volume(&pool, &v)))
    }

    async fn list_volumes(
        &self,
        req: Request<pb::ListVolumesRequest>,
    ) -> Result<Response<pb::ListVolumesResponse>, Status> {
        let r = req.into_inner();
        let pools = if r.pool_id.is_empty() {
            self.storage.pools()
        } else {
            vec![self.storage.pool(&r.pool_id)?]
        };
        let kind = match pb::VolumeKind::try_from(r.kind) {
            Ok(pb::VolumeKind::Unspecified) => None,
            Ok(k) => Some(k),
            Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "unknown volume kind {}",
                    r.kind
                )));
            }
        };
        let mut all = Vec::new();
        for p in &pools {
            for v in p.list_volumes() {
                if kind.is_none_or(|k| pb_kind(v.kind) == k) {
                    all.push(pb_volume(p, &v));
                }
            }
        }
        let (volumes, next_page_token) = page(all, r.page_size, &r.page_token)?;
        Ok(Response::new(pb::ListVolumesResponse {
            volumes,
            next_page_token,
        }))
    }

    async fn resize_volume(
        &self,
        req: Request<pb::ResizeVolumeRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let r = req.into_inner();
        let id = volume_id("volume_id", &r.volume_id)?;
        let pool = self.storage.pool_of(id)?;
        let p = pool.clone();
        let v = blocking(move || {
            p.resize(id, r.new_virtual_size_bytes, r.force)
                .map_err(status)
        })
        .await?;
        Ok(Response::new(pb_volume(&pool, &v)))
    }

    async fn delete_volume(
        &self,
        req: Request<pb::DeleteVolumeRequest>,
    ) -> Result<Response<pb::DeleteVolumeResponse>, Status> {
        let r = req.into_inner();
        let id = volume_id("volume_id", &r.volume_id)?;
        let pool = self.storage.pool_of(id)?;
        let exports = self.exports.of_volume(id).await;
        if !exports.is_empty() && !r.force {
            return Err(Status::failed_precondition(format!(
                "volume {id} is exported ({} export(s)); delete them first or pass force",
                exports.len()
            )));
        }
        for e in exports {
            self.exports
                .delete(&pool, e.id)
                .await
                .map_err(export_status)?;
        }
        let freed = blocking(move || pool.delete_volume(id).map_err(status)).await?;
        Ok(Response::new(pb::DeleteVolumeResponse {
            freed_bytes: freed,
        }))
    }

    async fn create_snapshot(
        &self,
        req: Request<pb::CreateSnapshotRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let r = req.into_inner();
        let id = volume_id("volume_id", &r.volume_id)?;
        let pool = self.storage.pool_of(id)?;
        let p = pool.clone();
        let v = blocking(move || p.snapshot(id, &r.name, labels(r.labels)).map_err(status)).await?;
        Ok(Response::new(pb_volume(&pool, &v)))
    }

    async fn clone_volume(
        &self,
        req: Request<pb::CloneVolumeRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let r = req.into_inner();
        let id = volume_id("source_id", &r.source_id)?;
        let pool = self.storage.pool_of(id)?;
        let p = pool.clone();
        let v = blocking(move || {
            p.clone_volume(id, &r.name, labels(r.labels))
                .map_err(status)
        })
        .await?;
        Ok(Response::new(pb_volume(&pool, &v)))
    }

    async fn revert_volume(
        &self,
        req: Request<pb::RevertVolumeRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let r = req.into_inner();
        let id = volume_id("volume_id", &r.volume_id)?;
        let snap = volume_id("snapshot_id", &r.snapshot_id)?;
        let pool = self.storage.pool_of(id)?;
        let p = pool.clone();
        let v = blocking(move || p.revert(id, snap).map_err(status)).await?;
        Ok(Response::new(pb_volume(&pool, &v)))
    }

    async fn list_changed_chunks(
        &self,
        req: Request<pb::ListChangedChunksRequest>,
    ) -> Result<Response<pb::ListChangedChunksResponse>, Status> {
        let r = req.into_inner();
        let id = volume_id("volume_id", &r.volume_id)?;
        let target = volume_id("target_snapshot_id", &r.target_snapshot_id)?;
        let base = if r.base_snapshot_id.is_empty() {
            None
        } else {
            Some(volume_id("base_snapshot_id", &r.base_snapshot_id)?)
        };
        let from = if r.page_token.is_empty() {
            0
        } else {
            r.page_token.parse().map_err(|_| {
                Status::invalid_argument(format!(
                    "page_token {:?} is not one this server issued",
                    r.page_token
                ))
            })?
        };
        let max = match r.page_size {
            0 => DEFAULT_CHANGED_PAGE,
            n => (n as usize).min(MAX_CHANGED_PAGE),
        };
        let pool = self.storage.pool_of(id)?;
        let c = blocking(move || {
            pool.changed_chunks(id, base, target, from, max)
                .map_err(status)
        })
        .await?;
        Ok(Response::new(pb::ListChangedChunksResponse {
            chunk_size_bytes: c.chunk_size,
            target_size_bytes: c.target_size,
            ranges: c
                .ranges
                .iter()
                .map(|r| pb::ChunkRange {
                    first_chunk: r.first,
                    chunk_count: r.count,
                    mapped: r.mapped,
                })
                .collect(),
            next_page_token: c.next.map(|n| n.to_string()).unwrap_or_default(),
            nodes_visited: c.nodes_visited,
        }))
    }

    async fn create_export(
        &self,
        req: Request<pb::CreateExportRequest>,
    ) -> Result<Response<pb::Export>, Status> {
        let r = req.into_inner();
        let id = volume_id("volume_id", &r.volume_id)?;
        let pool = self.storage.pool_of(id)?;
        if !r.target_iqn.is_empty() && !iscsi_target::server::valid_iscsi_name(&r.target_iqn) {
            return Err(Status::invalid_argument(format!(
                "target_iqn {:?} is not a valid iSCSI name",
                r.target_iqn
            )));
        }
        let rec = self
            .exports
            .create(&pool, id, &r.target_iqn, r.lun, r.read_only)
            .await
            .map_err(export_status)?;
        Ok(Response::new(self.pb_export(&rec)))
    }

    async fn get_export(
        &self,
        req: Request<pb::GetExportRequest>,
    ) -> Result<Response<pb::Export>, Status> {
        let id = parse_id("export_id", &req.into_inner().export_id)?;
        let rec = self.exports.get(id).await.map_err(export_status)?;
        Ok(Response::new(self.pb_export(&rec)))
    }

    async fn list_exports(
        &self,
        req: Request<pb::ListExportsRequest>,
    ) -> Result<Response<pb::ListExportsResponse>, Status> {
        let r = req.into_inner();
        let all = if r.volume_id.is_empty() {
            self.exports.list().await
        } else {
            self.exports
                .of_volume(volume_id("volume_id", &r.volume_id)?)
                .await
        };
        let all: Vec<pb::Export> = all.iter().map(|e| self.pb_export(e)).collect();
        let (exports, next_page_token) = page(all, r.page_size, &r.page_token)?;
        Ok(Response::new(pb::ListExportsResponse {
            exports,
            next_page_token,
        }))
    }

    async fn delete_export(
        &self,
        req: Request<pb::DeleteExportRequest>,
    ) -> Result<Response<pb::DeleteExportResponse>, Status> {
        let id = parse_id("export_id", &req.into_inner().export_id)?;
        let rec = self.exports.get(id).await.map_err(export_status)?;
        let pool = self.storage.pool(&rec.pool_id.to_string())?;
        let dropped = self
            .exports
            .delete(&pool, id)
            .await
            .map_err(export_status)?;
        Ok(Response::new(pb::DeleteExportResponse {
            sessions_dropped: dropped,
        }))
    }

    async fn grant_access(
        &self,
        req: Request<pb::GrantAccessRequest>,
    ) -> Result<Response<pb::AccessGrant>, Status> {
        let r = req.into_inner();
        let id = parse_id("export_id", &r.export_id)?;
        if !iscsi_target::server::valid_iscsi_name(&r.initiator_iqn) {
            return Err(Status::invalid_argument(format!(
                "initiator_iqn {:?} is not a valid iSCSI name",
                r.initiator_iqn
            )));
        }
        let chap = chap_field("chap", r.chap)?;
        let mutual = chap_field("mutual_chap", r.mutual_chap)?;
        if mutual.is_some() && chap.is_none() {
            return Err(Status::invalid_argument(
                "mutual_chap needs chap: the target proves itself only to an initiator that proved itself",
            ));
        }
        let rec = self.exports.get(id).await.map_err(export_status)?;
        let pool = self.storage.pool(&rec.pool_id.to_string())?;
        let grant = Exports::new_grant(&r.initiator_iqn, chap, mutual);
        self.exports
            .grant(&pool, id, grant.clone())
            .await
            .map_err(export_status)?;
        Ok(Response::new(pb_grant(&rec.id, &grant)))
    }

    async fn revoke_access(
        &self,
        req: Request<pb::RevokeAccessRequest>,
    ) -> Result<Response<pb::RevokeAccessResponse>, Status> {
        let r = req.into_inner();
        let id = parse_id("export_id", &r.export_id)?;
        let rec = self.exports.get(id).await.map_err(export_status)?;
        let pool = self.storage.pool(&rec.pool_id.to_string())?;
        let dropped = self
            .exports
            .revoke(&pool, id, &r.initiator_iqn)
            .await
            .map_err(export_status)?;
        Ok(Response::new(pb::RevokeAccessResponse {
            sessions_dropped: dropped,
        }))
    }

    async fn list_access(
        &self,
        req: Request<pb::ListAccessRequest>,
    ) -> Result<Response<pb::ListAccessResponse>, Status> {
        let r = req.into_inner();
        let id = parse_id("export_id", &r.export_id)?;
        let rec = self.exports.get(id).await.map_err(export_status)?;
        let all: Vec<pb::AccessGrant> = rec.grants.iter().map(|g| pb_grant(&rec.id, g)).collect();
        let (grants, next_page_token) = page(all, r.page_size, &r.page_token)?;
        Ok(Response::new(pb::ListAccessResponse {
            grants,
            next_page_token,
        }))
    }
}
