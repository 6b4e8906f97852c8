//! Exports: volumes served as LUNs of iSCSI targets, and who may log in to them.
//!
//! An export record lives in the metadata of the pool that holds its volume, so it is
//! committed with the pool and found again at import. Access is granted per target: when
//! several exports share a target, a grant or revoke applies to all of them, and every
//! one of their records says so. A revoke returns only once that initiator's sessions
//! are closed and their commands have finished, so nothing it sent reaches a volume
//! afterwards: the pool's fencing primitive.

use std::collections::BTreeMap;
use std::sync::Arc;

use iscsi_target::{
    ChapCredentials, ConfigError, InitiatorAccess, LunConfig, SessionInfo, TargetConfig,
    TargetServer, naa_from_serial,
};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::meta::export_key;
use crate::metrics::LunMetrics;
use crate::pool::{PoolError, ThinPool};
use crate::volume::ThinVolume;

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("no export {0}")]
    NoExport(Uuid),
    #[error("volume {volume} is already exported as {export}")]
    AlreadyExported { volume: Uuid, export: Uuid },
    #[error("LUN {lun} of target {iqn} is already used")]
    LunTaken { iqn: String, lun: u16 },
    #[error("LUN {0} is out of range (0..16384)")]
    BadLun(u32),
    #[error("{initiator} has no grant on export {export}")]
    NoGrant { export: Uuid, initiator: String },
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error("the iSCSI target refused the change")]
    Target(#[from] ConfigError),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chap {
    pub user: String,
    pub secret: String,
}

impl From<&Chap> for ChapCredentials {
    fn from(c: &Chap) -> Self {
        ChapCredentials {
            user: c.user.clone(),
            secret: c.secret.as_bytes().to_vec(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    pub initiator: String,
    pub chap: Option<Chap>,
    pub mutual_chap: Option<Chap>,
    pub granted_at: u64,
}

impl Grant {
    fn access(&self) -> InitiatorAccess {
        InitiatorAccess {
            name: self.initiator.clone(),
            chap: self.chap.as_ref().map(Into::into),
            mutual_chap: self.mutual_chap.as_ref().map(Into::into),
        }
    }
}

/// An export as persisted in its pool's metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportRecord {
    pub id: Uuid,
    pub pool_id: Uuid,
    pub volume_id: Uuid,
    pub target_iqn: String,
    pub lun: u16,
    pub read_only: bool,
    /// VPD 0x80 serial; the NAA identifier derives from it, so both survive restarts.
    pub serial: String,
    pub grants: Vec<Grant>,
}

impl ExportRecord {
    pub fn naa(&self) -> [u8; 16] {
        naa_from_serial(&self.serial)
    }
}

/// Export records as a pool's metadata holds them (those read at import).
pub fn recorded(pool: &ThinPool) -> Vec<ExportRecord> {
    pool.imported_records()
        .iter()
        .filter_map(|(_, v)| serde_json::from_slice(v).ok())
        .collect()
}

/// Adds an export to a pool that no daemon serves (offline configuration: the daemon
/// serves it when it imports the pool).
pub fn add_offline(
    pool: &ThinPool,
    volume: Uuid,
    target_iqn: &str,
    lun: u16,
    read_only: bool,
    grants: Vec<Grant>,
) -> Result<ExportRecord, ExportError> {
    pool.volume_size(volume)?;
    if lun >= 16384 {
        return Err(ExportError::BadLun(u32::from(lun)));
    }
    let existing = recorded(pool);
    if let Some(r) = existing.iter().find(|r| r.volume_id == volume) {
        return Err(ExportError::AlreadyExported {
            volume,
            export: r.id,
        });
    }
    if existing
        .iter()
        .any(|r| r.target_iqn == target_iqn && r.lun == lun)
    {
        return Err(ExportError::LunTaken {
            iqn: target_iqn.to_owned(),
            lun,
        });
    }
    let rec = ExportRecord {
        id: Uuid::new_v4(),
        pool_id: pool.id(),
        volume_id: volume,
        target_iqn: target_iqn.to_owned(),
        lun,
        read_only,
        serial: volume.simple().to_string(),
        grants,
    };
    Exports::persist(pool, &rec)?;
    Ok(rec)
}

/// Removes an export from a pool that no daemon serves.
pub fn delete_offline(pool: &ThinPool, id: Uuid) -> Result<(), ExportError> {
    if !recorded(pool).iter().any(|r| r.id == id) {
        return Err(ExportError::NoExport(id));
    }
    pool.stage_record(export_key(&id), None);
    pool.flush()?;
    Ok(())
}

/// The exports of one storaged and the target that serves them.
#[derive(Debug)]
pub struct Exports {
    server: TargetServer,
    iqn_prefix: String,
    portals: Vec<String>,
    records: tokio::sync::Mutex<BTreeMap<Uuid, ExportRecord>>,
    luns: LunMetrics,
}

impl Exports {
    pub fn new(server: TargetServer, iqn_prefix: String, portals: Vec<String>) -> Arc<Self> {
        Arc::new(Exports {
            server,
            iqn_prefix,
            portals,
            records: tokio::sync::Mutex::new(BTreeMap::new()),
            luns: LunMetrics::default(),
        })
    }

    /// The counters of the LUNs served.
    pub fn lun_metrics(&self) -> &LunMetrics {
        &self.luns
    }

    pub fn server(&self) -> &TargetServer {
        &self.server
    }

    pub fn portals(&self) -> &[String] {
        &self.portals
    }

    fn lun_config(&self, pool: &ThinPool, rec: &ExportRecord) -> Result<LunConfig, ExportError> {
        let dev = ThinVolume::open_with(pool, rec.volume_id, rec.read_only)?;
        Ok(LunConfig {
            id: rec.lun,
            device: Arc::new(self.luns.measure(rec, dev)),
            serial: rec.serial.clone(),
            naa: rec.naa(),
        })
    }

    /// Serves a record: adds its LUN to its target (creating the target if needed).
    fn serve(
        &self,
        pool: &ThinPool,
        rec: &ExportRecord,
        all: &BTreeMap<Uuid, ExportRecord>,
    ) -> Result<(), ExportError> {
        let lun = self.lun_config(pool, rec)?;
        let shares_target = all
            .values()
            .any(|r| r.id != rec.id && r.target_iqn == rec.target_iqn);
        if shares_target {
            self.server.add_lun(&rec.target_iqn, lun)?;
            for g in &rec.grants {
                self.server.grant(&rec.target_iqn, g.access())?;
            }
        } else {
            self.server.add_target(TargetConfig {
                iqn: rec.target_iqn.clone(),
                alias: None,
                luns: vec![lun],
                initiators: rec.grants.iter().map(Grant::access).collect(),
                allow_any_initiator: false,
            })?;
        }
        Ok(())
    }

    /// Serves the exports recorded in a pool's metadata (at start or import).
    pub async fn load(&self, pool: &ThinPool) {
        let mut records = self.records.lock().await;
        for (key, value) in pool.imported_records() {
            let rec: ExportRecord = match serde_json::from_slice(value) {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(pool = %pool.id(), key = ?key, "unreadable export record: {e}");
                    continue;
                }
            };
            if pool.volume_size(rec.volume_id).is_err() {
                tracing::warn!(export = %rec.id, volume = %rec.volume_id, "export of a missing volume; not served");
                continue;
            }
            match self.serve(pool, &rec, &records) {
                Ok(()) => {
                    records.insert(rec.id, rec);
                }
                Err(e) => {
                    tracing::error!(export = %rec.id, error = &e as &dyn std::error::Error, "cannot serve export")
                }
            }
        }
    }

    fn persist(pool: &ThinPool, rec: &ExportRecord) -> Result<(), PoolError> {
        pool.stage_record(
            export_key(&rec.id),
            Some(serde_json::to_vec(rec).expect("export records serialise")),
        );
        pool.flush()
    }

    async fn persist_blocking(pool: ThinPool, recs: Vec<ExportRecord>) -> Result<(), ExportError> {
        tokio::task::spawn_blocking(move || {
            for r in &recs {
                pool.stage_record(
                    export_key(&r.id),
                    Some(serde_json::to_vec(r).expect("export records serialise")),
                );
            }
            pool.flush()
        })
        .await
        .map_err(|e| PoolError::InvalidArgument(format!("commit task failed: {e}")))??;
        Ok(())
    }

    /// Exports a volume as `lun` of `target_iqn` (derived from the volume id when empty).
    pub async fn create(
        &self,
        pool: &ThinPool,
        volume: Uuid,
        target_iqn: &str,
        lun: u32,
        read_only: bool,
    ) -> Result<ExportRecord, ExportError> {
        let lun = u16::try_from(lun)
            .ok()
            .filter(|&l| l < 16384)
            .ok_or(ExportError::BadLun(lun))?;
        pool.volume_size(volume)?;
        let mut records = self.records.lock().await;
        if let Some(r) = records.values().find(|r| r.volume_id == volume) {
            return Err(ExportError::AlreadyExported {
                volume,
                export: r.id,
            });
        }
        let iqn = if target_iqn.is_empty() {
            format!("{}:{}", self.iqn_prefix, volume)
        } else {
            target_iqn.to_owned()
        };
        if records
            .values()
            .any(|r| r.target_iqn == iqn && r.lun == lun)
        {
            return Err(ExportError::LunTaken { iqn, lun });
        }
        // A new LUN of an existing target inherits that target's grants.
        let grants = records
            .values()
            .find(|r| r.target_iqn == iqn)
            .map(|r| r.grants.clone())
            .unwrap_or_default();
        let rec = ExportRecord {
            id: Uuid::new_v4(),
            pool_id: pool.id(),
            volume_id: volume,
            target_iqn: iqn,
            lun,
            read_only,
            serial: volume.simple().to_string(),
            grants,
        };
        self.serve(pool, &rec, &records)?;
        let p = pool.clone();
        let r = rec.clone();
        let committed = tokio::task::spawn_blocking(move || Self::persist(&p, &r))
            .await
            .map_err(|e| PoolError::InvalidArgument(format!("commit task failed: {e}")))?;
        if let Err(e) = committed {
            self.unserve(&rec, &records).await;
            return Err(e.into());
        }
        records.insert(rec.id, rec.clone());
        tracing::info!(export = %rec.id, volume = %volume, target = %rec.target_iqn, lun, "exported volume");
        Ok(rec)
    }

    async fn unserve(&self, rec: &ExportRecord, all: &BTreeMap<Uuid, ExportRecord>) {
        let others = all
            .values()
            .any(|r| r.id != rec.id && r.target_iqn == rec.target_iqn);
        let result = if others {
            self.server.remove_lun(&rec.target_iqn, rec.lun).await
        } else {
            self.server.remove_target(&rec.target_iqn).await
        };
        if let Err(e) = result {
            tracing::warn!(export = %rec.id, error = &e as &dyn std::error::Error, "cannot remove the export from the target");
        }
        self.luns.forget(rec);
    }

    pub async fn get(&self, id: Uuid) -> Result<ExportRecord, ExportError> {
        self.records
            .lock()
            .await
            .get(&id)
            .cloned()
            .ok_or(ExportError::NoExport(id))
    }

    pub async fn list(&self) -> Vec<ExportRecord> {
        self.records.lock().await.values().cloned().collect()
    }

    pub async fn of_volume(&self, volume: Uuid) -> Vec<ExportRecord> {
        self.records
            .lock()
            .await
            .values()
            .filter(|r| r.volume_id == volume)
            .cloned()
            .collect()
    }

    /// Sessions logged in to an export's target.
    pub fn sessions(&self, rec: &ExportRecord) -> Vec<SessionInfo> {
        self.server
            .sessions()
            .into_iter()
            .filter(|s| s.target == rec.target_iqn)
            .collect()
    }

    /// Stops serving an export; returns the sessions that were dropped.
    pub async fn delete(&self, pool: &ThinPool, id: Uuid) -> Result<u32, ExportError> {
        let mut records = self.records.lock().await;
        let rec = records.get(&id).cloned().ok_or(ExportError::NoExport(id))?;
        let before = self.sessions(&rec).len() as u32;
        self.unserve(&rec, &records).await;
        let after = self.sessions(&rec).len() as u32;
        records.remove(&id);
        let p = pool.clone();
        tokio::task::spawn_blocking(move || {
            p.stage_record(export_key(&id), None);
            p.flush()
        })
        .await
        .map_err(|e| PoolError::InvalidArgument(format!("commit task failed: {e}")))??;
        tracing::info!(export = %id, "export deleted");
        Ok(before - after)
    }

    /// Grants an initiator access to the export's target (replacing earlier credentials).
    pub async fn grant(
        &self,
        pool: &ThinPool,
        id: Uuid,
        grant: Grant,
    ) -> Result<ExportRecord, ExportError> {
        let mut records = self.records.lock().await;
        let iqn = records
            .get(&id)
            .ok_or(ExportError::NoExport(id))?
            .target_iqn
            .clone();
        self.server.grant(&iqn, grant.access())?;
        let mut changed = Vec::new();
        for r in records.values_mut().filter(|r| r.target_iqn == iqn) {
            r.grants.retain(|g| g.initiator != grant.initiator);
            r.grants.push(grant.clone());
            changed.push(r.clone());
        }
        Self::persist_blocking(pool.clone(), changed).await?;
        tracing::info!(export = %id, initiator = %grant.initiator, chap = grant.chap.is_some(), "access granted");
        Ok(records[&id].clone())
    }

    /// Revokes an initiator: its sessions to the target are closed (and their commands
    /// finished) before this returns, and new logins are refused. Returns the sessions
    /// dropped.
    pub async fn revoke(
        &self,
        pool: &ThinPool,
        id: Uuid,
        initiator: &str,
    ) -> Result<u32, ExportError> {
        let mut records = self.records.lock().await;
        let rec = records.get(&id).cloned().ok_or(ExportError::NoExport(id))?;
        if !rec.grants.iter().any(|g| g.initiator == initiator) {
            return Err(ExportError::NoGrant {
                export: id,
                initiator: initiator.to_owned(),
            });
        }
        let before = self
            .sessions(&rec)
            .iter()
            .filter(|s| s.initiator == initiator)
            .count() as u32;
        self.server.revoke(&rec.target_iqn, initiator).await?;
        let mut changed = Vec::new();
        for r in records
            .values_mut()
            .filter(|r| r.target_iqn == rec.target_iqn)
        {
            r.grants.retain(|g| g.initiator != initiator);
            changed.push(r.clone());
        }
        Self::persist_blocking(pool.clone(), changed).await?;
        tracing::info!(export = %id, initiator, sessions = before, "access revoked");
        Ok(before)
    }

    pub fn new_grant(initiator: &str, chap: Option<Chap>, mutual_chap: Option<Chap>) -> Grant {
        Grant {
            initiator: initiator.to_owned(),
            chap,
            mutual_chap,
            // Seconds, as the record stores it.
            granted_at: proto::unix_ms() / 1000,
        }
    }
}
