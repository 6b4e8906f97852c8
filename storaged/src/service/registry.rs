//! The pools this daemon holds, and `<state_dir>/pools.json`, the list it imports at
//! start.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};
use tonic::Status;
use uuid::Uuid;

use super::convert::parse_id;
use crate::BackingKind;
use crate::pool::{ImportOptions, ThinPool};

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

/// Why the daemon's list of pools cannot be opened.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("cannot create the state directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the pool registry {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the pool registry {path} is not a list of pools")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
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
    pub fn open(state_dir: Option<&Path>) -> Result<Arc<Storage>, RegistryError> {
        let registry = state_dir.map(|d| d.join("pools.json"));
        let storage = Arc::new(Storage {
            pools: RwLock::new(HashMap::new()),
            registry: registry.clone(),
        });
        if let Some(reg) = &registry {
            if let Some(dir) = reg.parent() {
                std::fs::create_dir_all(dir).map_err(|source| RegistryError::CreateDir {
                    path: dir.to_owned(),
                    source,
                })?;
            }
            if reg.exists() {
                let bytes = std::fs::read(reg).map_err(|source| RegistryError::Read {
                    path: reg.clone(),
                    source,
                })?;
                let entries: Vec<PoolEntry> =
                    serde_json::from_slice(&bytes).map_err(|source| RegistryError::Parse {
                        path: reg.clone(),
                        source,
                    })?;
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
                            tracing::error!(pool = %e.id, path = %e.path.display(), error = &err as &dyn std::error::Error, "cannot import pool")
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
            .find(|p| p.volume_size(volume).is_ok())
            .ok_or_else(|| Status::not_found(format!("no volume, snapshot or clone {volume}")))
    }

    pub(super) fn save_registry(&self) -> Result<(), Status> {
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
                tracing::error!(pool = %p.id(), error = &e as &dyn std::error::Error, "periodic commit failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_registry_is_a_typed_error_and_a_missing_pool_is_left_out() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        // No registry yet: an empty daemon, and the state directory is made.
        let storage = Storage::open(Some(&state)).unwrap();
        assert!(storage.pools().is_empty());
        assert!(state.is_dir());

        let reg = state.join("pools.json");
        std::fs::write(&reg, "{not json").unwrap();
        assert!(matches!(
            Storage::open(Some(&state)),
            Err(RegistryError::Parse { path, .. }) if path == reg
        ));

        let gone = PoolEntry {
            id: Uuid::new_v4(),
            kind: EntryKind::File,
            path: dir.path().join("gone.img"),
            meta_dir: dir.path().join("gone.img.meta"),
        };
        std::fs::write(&reg, serde_json::to_vec(&[gone]).unwrap()).unwrap();
        assert!(Storage::open(Some(&state)).unwrap().pools().is_empty());
    }
}
