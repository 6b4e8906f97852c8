//! The `StorageService` of `proto/storage.proto` over the pools this daemon holds.
//!
//! Every pool call blocks on disk I/O, so handlers run it on tokio's blocking pool. Errors
//! carry a status code a client can act on (NotFound, AlreadyExists, InvalidArgument,
//! ResourceExhausted for a full pool, FailedPrecondition, Unavailable for a failed pool).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use proto::storage::{self as pb, storage_service_server::StorageService};
use serde::{Deserialize, Serialize};
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::backing::BackingError;
use crate::export::{Chap, ExportError, ExportRecord, Exports, Grant};
use crate::pool::{CreateOptions, ImportOptions, PoolError, ThinPool, Usage, VolumeInfo};
use crate::{BackingKind, VolumeKind};

/// Page size when the client asks for none, and the most a page holds.
const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 1000;

/// A pool this daemon imports at start, as kept in `<state_dir>/pools.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolEntry {
    pub id: Uuid,
    pub kind: EntryKind,
    pub path: PathBuf,
    pub meta_dir: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    File,
    BlockDevice,
}

impl From<EntryKind> for BackingKind {
    fn from(k: EntryKind) -> Self {
        match k {
            EntryKind::File => BackingKind::File,
            EntryKind::BlockDevice => BackingKind::BlockDevice,
        }
    }
}

impl From<BackingKind> for EntryKind {
    fn from(k: BackingKind) -> Self {
        match k {
            BackingKind::File => EntryKind::File,
            BackingKind::BlockDevice => EntryKind::BlockDevice,
        }
    }
}

/// The pools of this daemon.
#[derive(Debug)]
pub struct Storage {
    pools: RwLock<HashMap<Uuid, ThinPool>>,
    registry: Option<PathBuf>,
}

impl Storage {
    /// Imports the pools listed in `<state_dir>/pools.json` (a pool that fails to import is
    /// logged and left out, so one bad device does not stop the others).
    pub fn open(state_dir: Option<&Path>) -> anyhow::Result<Arc<Storage>> {
        let registry = state_dir.map(|d| d.join("pools.json"));
        let storage = Arc::new(Storage {
            pools: RwLock::new(HashMap::new()),
            registry: registry.clone(),
        });
        if let Some(reg) = &registry {
            if let Some(dir) = reg.parent() {
                std::fs::create_dir_all(dir)?;
            }
            if reg.exists() {
                let entries: Vec<PoolEntry> = serde_json::from_slice(&std::fs::read(reg)?)?;
                for e in entries {
                    let opts = ImportOptions {
                        kind: e.kind.into(),
                        path: e.path.clone(),
                        meta_dir: Some(e.meta_dir.clone()),
                        expected_id: Some(e.id),
                    };
                    match ThinPool::import(&opts) {
                        Ok(p) => storage.add(p),
                        Err(err) => {
                            tracing::error!(pool = %e.id, path = %e.path.display(), "cannot import pool: {err}")
                        }
                    }
                }
            }
        }
        Ok(storage)
    }

    pub fn add(&self, pool: ThinPool) {
        self.pools
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(pool.id(), pool);
    }

    pub fn pools(&self) -> Vec<ThinPool> {
        let mut v: Vec<ThinPool> = self
            .pools
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        v.sort_by_key(|p| (p.name().to_owned(), p.id()));
        v
    }

    pub fn pool(&self, id: &str) -> Result<ThinPool, Status> {
        let id = parse_id("pool_id", id)?;
        self.pools
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
            .cloned()
            .ok_or_else(|| Status::not_found(format!("no pool {id} on this storaged")))
    }

    /// The pool that holds a volume.
    pub fn pool_of(&self, volume: Uuid) -> Result<ThinPool, Status> {
        self.pools()
            .into_iter()
            .find(|p| p.volume_info(volume).is_ok())
            .ok_or_else(|| Status::not_found(format!("no volume, snapshot or clone {volume}")))
    }

    fn save_registry(&self) -> Result<(), Status> {
        let Some(reg) = &self.registry else {
            return Ok(());
        };
        let entries: Vec<PoolEntry> = self
            .pools()
            .iter()
            .map(|p| PoolEntry {
                id: p.id(),
                kind: p.backing_kind().into(),
                path: p.backing_path().to_owned(),
                meta_dir: p.meta_dir().to_owned(),
            })
            .collect();
        let tmp = reg.with_extension("json.tmp");
        let write = || -> std::io::Result<()> {
            let f = std::fs::File::create(&tmp)?;
            serde_json::to_writer_pretty(&f, &entries)?;
            f.sync_all()?;
            std::fs::rename(&tmp, reg)?;
            if let Some(dir) = reg.parent() {
                std::fs::File::open(dir)?.sync_all()?;
            }
            Ok(())
        };
        write().map_err(|e| {
            Status::internal(format!(
                "cannot save the pool registry {}: {e}",
                reg.display()
            ))
        })
    }

    /// Commits every pool (frees become reusable; data becomes durable).
    pub fn flush_all(&self) {
        for p in self.pools() {
            if let Err(e) = p.flush() {
                tracing::error!(pool = %p.id(), "periodic commit failed: {e}");
            }
        }
    }
}

pub fn status(e: PoolError) -> Status {
    let msg = e.to_string();
    match e {
        PoolError::NoVolume(_) => Status::not_found(msg),
        PoolError::NameTaken(_) | PoolError::AlreadyPool { .. } => Status::already_exists(msg),
        PoolError::InvalidArgument(_)
        | PoolError::OutOfRange { .. }
        | PoolError::Misaligned { .. } => Status::invalid_argument(msg),
        PoolError::NoSpace => Status::resource_exhausted(msg),
        PoolError::ReadOnly { .. }
        | PoolError::ShrinkNeedsForce { .. }
        | PoolError::NotSnapshotOf { .. }
        | PoolError::NotEmpty { .. }
        | PoolError::Superblock { .. }
        | PoolError::MetaMismatch { .. }
        | PoolError::UnexpectedPool { .. }
        | PoolError::Corrupt { .. } => Status::failed_precondition(msg),
        PoolError::Backing(BackingError::InUse { .. }) => Status::failed_precondition(msg),
        PoolError::Backing(BackingError::Open { .. })
        | PoolError::Backing(BackingError::WrongKind { .. }) => Status::invalid_argument(msg),
        PoolError::Meta(crate::meta::MetaError::NotEmpty { .. })
        | PoolError::Meta(crate::meta::MetaError::Missing { .. }) => {
            Status::failed_precondition(msg)
        }
        PoolError::Failed => Status::unavailable(msg),
        PoolError::Backing(_) | PoolError::Meta(_) => Status::internal(msg),
    }
}

fn parse_id(field: &str, s: &str) -> Result<Uuid, Status> {
    s.parse()
        .map_err(|_| Status::invalid_argument(format!("{field} {s:?} is not a UUID")))
}

fn timestamp(secs: u64) -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp {
        seconds: secs as i64,
        nanos: 0,
    })
}

/// Runs blocking pool work off the reactor.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Status> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("storage task failed: {e}")))?
}

/// A page of `items`, with the offset-based token of the next page.
fn page<T>(items: Vec<T>, page_size: u32, token: &str) -> Result<(Vec<T>, String), Status> {
    let start: usize = if token.is_empty() {
        0
    } else {
        token.parse().map_err(|_| {
            Status::invalid_argument(format!(
                "page_token {token:?} is not one this server issued"
            ))
        })?
    };
    let size = match page_size as usize {
        0 => DEFAULT_PAGE,
        n => n.min(MAX_PAGE),
    };
    let total = items.len();
    let out: Vec<T> = items.into_iter().skip(start).take(size).collect();
    let next = if start + out.len() < total {
        (start + out.len()).to_string()
    } else {
        String::new()
    };
    Ok((out, next))
}

fn pb_usage(u: &Usage) -> pb::PoolUsage {
    pb::PoolUsage {
        total_chunks: u.total_chunks,
        used_chunks: u.used_chunks,
        free_chunks: u.free_chunks,
        total_bytes: u.total_bytes(),
        used_bytes: u.used_bytes(),
        free_bytes: u.free_bytes(),
        provisioned_bytes: u.provisioned_bytes,
        warning_threshold_percent: u.warning_threshold_percent,
        warning: u.warning,
        metadata_bytes: u.metadata_bytes,
        volume_count: u.volume_count,
        snapshot_count: u.snapshot_count,
    }
}

fn pb_pool(p: &ThinPool) -> pb::ThinPool {
    let u = p.usage();
    let state = if u.free_chunks == 0 {
        pb::PoolState::Full
    } else if u.warning {
        pb::PoolState::LowSpace
    } else {
        pb::PoolState::Online
    };
    pb::ThinPool {
        id: p.id().to_string(),
        name: p.name().to_owned(),
        backing_kind: match p.backing_kind() {
            BackingKind::File => pb::BackingKind::File,
            BackingKind::BlockDevice => pb::BackingKind::BlockDevice,
        } as i32,
        backing_path: p.backing_path().display().to_string(),
        chunk_size_bytes: p.chunk_size(),
        data_size_bytes: u.total_bytes(),
        device_size_bytes: u.total_bytes() + crate::superblock::DATA_OFFSET,
        usage: Some(pb_usage(&u)),
        created_at: None,
        state: state as i32,
    }
}

fn pb_kind(k: VolumeKind) -> pb::VolumeKind {
    match k {
        VolumeKind::Volume => pb::VolumeKind::Volume,
        VolumeKind::Snapshot => pb::VolumeKind::Snapshot,
        VolumeKind::Clone => pb::VolumeKind::Clone,
    }
}

pub fn pb_volume(pool: &ThinPool, v: &VolumeInfo) -> pb::Volume {
    pb::Volume {
        id: v.id.to_string(),
        pool_id: pool.id().to_string(),
        name: v.name.clone(),
        kind: pb_kind(v.kind) as i32,
        origin_id: v.origin.map(|o| o.to_string()).unwrap_or_default(),
        virtual_size_bytes: v.size,
        allocated_bytes: v.allocated_bytes,
        exclusive_bytes: v.exclusive_bytes,
        shared_bytes: v.shared_bytes,
        read_only: v.read_only(),
        block_size_bytes: v.block_size,
        created_at: timestamp(v.created_at),
        labels: v.labels.clone().into_iter().collect(),
    }
}

fn labels(map: HashMap<String, String>) -> BTreeMap<String, String> {
    map.into_iter().collect()
}

fn backing_kind(k: i32) -> Result<BackingKind, Status> {
    match pb::BackingKind::try_from(k) {
        Ok(pb::BackingKind::File) => Ok(BackingKind::File),
        Ok(pb::BackingKind::BlockDevice) => Ok(BackingKind::BlockDevice),
        _ => Err(Status::invalid_argument(
            "backing_kind must be BACKING_KIND_FILE or BACKING_KIND_BLOCK_DEVICE",
        )),
    }
}

fn volume_id(field: &str, s: &str) -> Result<Uuid, Status> {
    parse_id(field, s)
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

fn chap_field(field: &str, c: Option<pb::ChapCredentials>) -> Result<Option<Chap>, Status> {
    match c {
        None => Ok(None),
        Some(c) if c.username.is_empty() && c.secret.is_empty() => Ok(None),
        Some(c) => {
            if c.username.is_empty() {
                return Err(Status::invalid_argument(format!(
                    "{field}.username is required"
                )));
            }
            // RFC 7143 section 12.1.3: secrets of at least 12 bytes (96 bits).
            if c.secret.len() < 12 || c.secret.len() > 255 {
                return Err(Status::invalid_argument(format!(
                    "{field}.secret must be 12 to 255 bytes"
                )));
            }
            Ok(Some(Chap {
                user: c.username,
                secret: c.secret,
            }))
        }
    }
}

fn pb_grant(export: &Uuid, g: &Grant) -> pb::AccessGrant {
    // Secrets are write-only: the user name says which credentials are set.
    let creds = |c: &Option<Chap>| {
        c.as_ref().map(|c| pb::ChapCredentials {
            username: c.user.clone(),
            secret: String::new(),
        })
    };
    pb::AccessGrant {
        export_id: export.to_string(),
        initiator_iqn: g.initiator.clone(),
        chap: creds(&g.chap),
        mutual_chap: creds(&g.mutual_chap),
        granted_at: timestamp(g.granted_at),
    }
}

pub fn export_status(e: ExportError) -> Status {
    let msg = e.to_string();
    match e {
        ExportError::NoExport(_) | ExportError::NoGrant { .. } => Status::not_found(msg),
        ExportError::AlreadyExported { .. } | ExportError::LunTaken { .. } => {
            Status::already_exists(msg)
        }
        ExportError::BadLun(_) => Status::invalid_argument(msg),
        ExportError::Pool(p) => status(p),
        ExportError::Target(t) => Status::failed_precondition(format!("{msg}: {t}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_walk_the_whole_list() {
        let items: Vec<u32> = (0..250).collect();
        let (a, t) = page(items.clone(), 100, "").unwrap();
        assert_eq!(a.len(), 100);
        let (b, t) = page(items.clone(), 100, &t).unwrap();
        assert_eq!(b[0], 100);
        let (c, t) = page(items.clone(), 100, &t).unwrap();
        assert_eq!((c.len(), t.as_str()), (50, ""));
        assert!(page(items, 10, "zz").is_err());
    }

    #[test]
    fn errors_map_to_actionable_codes() {
        assert_eq!(
            status(PoolError::NoSpace).code(),
            tonic::Code::ResourceExhausted
        );
        assert_eq!(
            status(PoolError::NoVolume(Uuid::nil())).code(),
            tonic::Code::NotFound
        );
        assert_eq!(
            status(PoolError::NameTaken("a".into())).code(),
            tonic::Code::AlreadyExists
        );
        assert_eq!(status(PoolError::Failed).code(), tonic::Code::Unavailable);
    }
}
