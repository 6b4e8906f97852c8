//! Volumes, snapshots and clones: what callers see of them, and every structural
//! change (create, snapshot, clone, revert, resize, delete), each committed before it
//! returns.

use std::collections::BTreeMap;

use uuid::Uuid;

use super::io::Piece;
use super::{PoolError, State, ThinPool, unix_secs, validate_name};
use crate::meta::{VolumeKind, VolumeRecord};
use crate::tree::{NO_NODE, NodeId, height_for};

/// A volume, snapshot or clone as the pool works on it. What is stored is a
/// [`VolumeRecord`]; the two convert into each other at import and at commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Volume {
    pub(super) id: Uuid,
    pub(super) name: String,
    pub(super) kind: VolumeKind,
    /// The volume this one was derived from (it may since have been deleted).
    pub(super) origin: Option<Uuid>,
    pub(super) size: u64,
    pub(super) block_size: u32,
    /// Root of the mapping tree, [`NO_NODE`] while nothing is mapped.
    pub(super) root: NodeId,
    pub(super) height: u8,
    /// Virtual chunks mapped (allocated) in this volume.
    pub(super) mapped: u64,
    /// Seconds since the Unix epoch.
    pub(super) created_at: u64,
    pub(super) labels: BTreeMap<String, String>,
}

impl Volume {
    pub(super) fn read_only(&self) -> bool {
        self.kind == VolumeKind::Snapshot
    }
}

impl From<VolumeRecord> for Volume {
    fn from(r: VolumeRecord) -> Self {
        Volume {
            id: r.id,
            name: r.name,
            kind: r.kind,
            origin: r.origin,
            size: r.size,
            block_size: r.block_size,
            root: r.root,
            height: r.height,
            mapped: r.mapped,
            created_at: r.created_at,
            labels: r.labels,
        }
    }
}

impl From<&Volume> for VolumeRecord {
    fn from(v: &Volume) -> Self {
        VolumeRecord {
            id: v.id,
            name: v.name.clone(),
            kind: v.kind,
            origin: v.origin,
            size: v.size,
            block_size: v.block_size,
            root: v.root,
            height: v.height,
            mapped: v.mapped,
            created_at: v.created_at,
            labels: v.labels.clone(),
        }
    }
}

/// A volume as callers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeInfo {
    pub id: Uuid,
    pub name: String,
    pub kind: VolumeKind,
    pub origin: Option<Uuid>,
    pub size: u64,
    pub block_size: u32,
    pub allocated_bytes: u64,
    pub exclusive_bytes: u64,
    pub shared_bytes: u64,
    pub created_at: u64,
    pub labels: BTreeMap<String, String>,
}

impl VolumeInfo {
    pub fn read_only(&self) -> bool {
        self.kind == VolumeKind::Snapshot
    }
}

impl ThinPool {
    fn info(&self, st: &State, rec: &Volume) -> VolumeInfo {
        let cs = self.inner.chunk_size;
        let (mut allocated, mut exclusive) = (0u64, 0u64);
        st.forest.walk(
            rec.root,
            rec.height,
            |c| st.space.refs(c),
            |_, _, shared| {
                allocated += 1;
                if !shared {
                    exclusive += 1;
                }
            },
        );
        VolumeInfo {
            id: rec.id,
            name: rec.name.clone(),
            kind: rec.kind,
            origin: rec.origin.filter(|o| st.volumes.contains_key(o)),
            size: rec.size,
            block_size: rec.block_size,
            allocated_bytes: allocated * cs,
            exclusive_bytes: exclusive * cs,
            shared_bytes: (allocated - exclusive) * cs,
            created_at: rec.created_at,
            labels: rec.labels.clone(),
        }
    }

    /// A volume's size and whether it is read-only, without walking its tree.
    pub fn volume_size(&self, id: Uuid) -> Result<(u64, bool), PoolError> {
        let st = self.read_state();
        let rec = st.volume(id)?;
        Ok((rec.size, rec.read_only()))
    }

    pub fn volume_info(&self, id: Uuid) -> Result<VolumeInfo, PoolError> {
        let st = self.read_state();
        let rec = st.volume(id)?;
        Ok(self.info(&st, rec))
    }

    /// Every volume, snapshot and clone, sorted by creation time then name.
    pub fn list_volumes(&self) -> Vec<VolumeInfo> {
        let st = self.read_state();
        let mut out: Vec<VolumeInfo> = st.volumes.values().map(|r| self.info(&st, r)).collect();
        out.sort_by(|a, b| (a.created_at, &a.name, a.id).cmp(&(b.created_at, &b.name, b.id)));
        out
    }

    pub fn find_volume(&self, name: &str) -> Option<Uuid> {
        self.read_state()
            .volumes
            .values()
            .find(|v| v.name == name)
            .map(|v| v.id)
    }

    /// Creates a thin volume; its size may exceed the pool (overcommit).
    pub fn create_volume(
        &self,
        name: &str,
        size: u64,
        block_size: u32,
        labels: BTreeMap<String, String>,
    ) -> Result<VolumeInfo, PoolError> {
        self.check_failed()?;
        validate_name(name)?;
        let block_size = if block_size == 0 { 512 } else { block_size };
        if block_size != 512 && block_size != 4096 {
            return Err(PoolError::InvalidArgument(format!(
                "block size {block_size} must be 512 or 4096"
            )));
        }
        if size == 0 || !size.is_multiple_of(u64::from(block_size)) {
            return Err(PoolError::InvalidArgument(format!(
                "size {size} must be a non-zero multiple of the block size {block_size}"
            )));
        }
        let id = {
            let mut st = self.write_state();
            if st.name_taken(name) {
                return Err(PoolError::NameTaken(name.to_owned()));
            }
            let rec = Volume {
                id: Uuid::new_v4(),
                name: name.to_owned(),
                kind: VolumeKind::Volume,
                origin: None,
                size,
                block_size,
                root: NO_NODE,
                height: height_for(size.div_ceil(self.inner.chunk_size)),
                mapped: 0,
                created_at: unix_secs(),
                labels,
            };
            let id = rec.id;
            st.volumes.insert(id, rec);
            st.dirty_volumes.insert(id);
            id
        };
        self.flush()?;
        tracing::info!(pool = %self.inner.id, volume = %id, name, size, "created volume");
        self.volume_info(id)
    }

    fn derive_volume(
        &self,
        source: Uuid,
        name: &str,
        kind: VolumeKind,
        labels: BTreeMap<String, String>,
    ) -> Result<VolumeInfo, PoolError> {
        self.check_failed()?;
        validate_name(name)?;
        let rec = {
            let mut st = self.write_state();
            if st.name_taken(name) {
                return Err(PoolError::NameTaken(name.to_owned()));
            }
            let src = st.volume(source)?;
            let rec = Volume {
                id: Uuid::new_v4(),
                name: name.to_owned(),
                kind,
                origin: Some(source),
                size: src.size,
                block_size: src.block_size,
                root: src.root,
                height: src.height,
                mapped: src.mapped,
                created_at: unix_secs(),
                labels,
            };
            // O(1): one more reference on the root, whatever the volume holds.
            st.forest.incref(rec.root);
            st.volumes.insert(rec.id, rec.clone());
            st.dirty_volumes.insert(rec.id);
            rec
        };
        // The commit syncs data first, so the snapshot's chunks hold what was written.
        self.flush()?;
        tracing::info!(pool = %self.inner.id, source = %source, id = %rec.id, ?kind, name, "derived volume");
        // Just taken, it shares every chunk with its source: no walk needed to say so.
        let allocated = rec.mapped * self.inner.chunk_size;
        Ok(VolumeInfo {
            id: rec.id,
            name: rec.name,
            kind: rec.kind,
            origin: rec.origin,
            size: rec.size,
            block_size: rec.block_size,
            allocated_bytes: allocated,
            exclusive_bytes: 0,
            shared_bytes: allocated,
            created_at: rec.created_at,
            labels: rec.labels,
        })
    }

    /// A read-only, point-in-time copy of a volume (or clone).
    pub fn snapshot(
        &self,
        source: Uuid,
        name: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<VolumeInfo, PoolError> {
        self.derive_volume(source, name, VolumeKind::Snapshot, labels)
    }

    /// A writable copy of a volume, clone or snapshot.
    pub fn clone_volume(
        &self,
        source: Uuid,
        name: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<VolumeInfo, PoolError> {
        self.derive_volume(source, name, VolumeKind::Clone, labels)
    }

    /// Makes `volume` read what `snapshot` (a snapshot of it) holds.
    pub fn revert(&self, volume: Uuid, snapshot: Uuid) -> Result<VolumeInfo, PoolError> {
        self.check_failed()?;
        {
            let mut st = self.write_state();
            let vol = st.volume(volume)?.clone();
            let snap = st.volume(snapshot)?.clone();
            if vol.read_only() {
                return Err(PoolError::ReadOnly { id: volume });
            }
            if snap.kind != VolumeKind::Snapshot || snap.origin != Some(volume) {
                return Err(PoolError::NotSnapshotOf { snapshot, volume });
            }
            let State {
                forest,
                space,
                volumes,
                dirty_volumes,
                ..
            } = &mut *st;
            forest.incref(snap.root);
            forest.decref(vol.root, space);
            let rec = volumes.get_mut(&volume).expect("checked");
            rec.root = snap.root;
            rec.height = snap.height;
            rec.mapped = snap.mapped;
            rec.size = snap.size;
            dirty_volumes.insert(volume);
        }
        self.flush()?;
        tracing::info!(pool = %self.inner.id, %volume, %snapshot, "reverted volume");
        self.volume_info(volume)
    }

    /// Changes a volume's size. Shrinking discards data past the new end and needs `force`.
    pub fn resize(
        &self,
        volume: Uuid,
        new_size: u64,
        force: bool,
    ) -> Result<VolumeInfo, PoolError> {
        self.check_failed()?;
        let cs = self.inner.chunk_size;
        {
            let mut st = self.write_state();
            let rec = st.volume(volume)?.clone();
            if rec.read_only() {
                return Err(PoolError::ReadOnly { id: volume });
            }
            if new_size == 0 || !new_size.is_multiple_of(u64::from(rec.block_size)) {
                return Err(PoolError::InvalidArgument(format!(
                    "size {new_size} must be a non-zero multiple of the block size {}",
                    rec.block_size
                )));
            }
            if new_size < rec.size {
                if !force {
                    return Err(PoolError::ShrinkNeedsForce {
                        id: volume,
                        from: rec.size,
                        to: new_size,
                    });
                }
                // Zero the tail of the last chunk so a later grow reads zeros there.
                if !new_size.is_multiple_of(cs)
                    && st
                        .forest
                        .lookup(rec.root, rec.height, new_size / cs)
                        .chunk
                        .is_some()
                {
                    let n = (cs - new_size % cs).min(rec.size - new_size);
                    let mut buf = Vec::new();
                    let zeros = iscsi_target::block::page_aligned_zeros(&mut buf, n as usize);
                    let piece = Piece {
                        vchunk: new_size / cs,
                        within: new_size % cs,
                        at: 0,
                        len: n as usize,
                    };
                    self.write_piece_locked(&mut st, volume, piece, zeros)?;
                }
                let State {
                    forest,
                    space,
                    volumes,
                    ..
                } = &mut *st;
                let rec = volumes.get_mut(&volume).expect("checked");
                let mut root = rec.root;
                for (v, _) in forest.mapped_range(root, rec.height, new_size.div_ceil(cs), u64::MAX)
                {
                    forest.unmap(&mut root, rec.height, v, space);
                    rec.mapped -= 1;
                }
                rec.root = root;
                rec.size = new_size;
            } else {
                let State {
                    forest, volumes, ..
                } = &mut *st;
                let rec = volumes.get_mut(&volume).expect("checked");
                let height = height_for(new_size.div_ceil(cs));
                if height > rec.height {
                    let mut root = rec.root;
                    forest.grow(&mut root, rec.height, height);
                    rec.root = root;
                    rec.height = height;
                }
                rec.size = new_size;
            }
            st.dirty_volumes.insert(volume);
        }
        self.flush()?;
        tracing::info!(pool = %self.inner.id, %volume, new_size, "resized volume");
        self.volume_info(volume)
    }

    /// Deletes a volume, snapshot or clone. Returns the bytes freed (chunks no one else
    /// referenced).
    pub fn delete_volume(&self, volume: Uuid) -> Result<u64, PoolError> {
        self.check_failed()?;
        let freed = {
            let mut st = self.write_state();
            let rec = st.volume(volume)?.clone();
            let before = st.space.used();
            let State {
                forest,
                space,
                volumes,
                dirty_volumes,
                deleted_volumes,
                ..
            } = &mut *st;
            forest.decref(rec.root, space);
            volumes.remove(&volume);
            dirty_volumes.remove(&volume);
            deleted_volumes.insert(volume);
            (before - st.space.used()) * self.inner.chunk_size
        };
        self.flush()?;
        tracing::info!(pool = %self.inner.id, %volume, freed, "deleted volume");
        Ok(freed)
    }
}
