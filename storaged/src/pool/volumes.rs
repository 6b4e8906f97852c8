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

    /// Makes `volume` read what `snapshot` holds: a snapshot of it, or of a volume derived
    /// from it through origin links (a snapshot of a clone of one of its snapshots: how an
    /// undo disk's overlay is committed). O(1) and atomic, as a snapshot is: `volume`
    /// takes the snapshot's root.
    pub fn revert(&self, volume: Uuid, snapshot: Uuid) -> Result<VolumeInfo, PoolError> {
        self.check_failed()?;
        {
            let mut st = self.write_state();
            let vol = st.volume(volume)?.clone();
            let snap = st.volume(snapshot)?.clone();
            if vol.read_only() {
                return Err(PoolError::ReadOnly { id: volume });
            }
            if snap.kind != VolumeKind::Snapshot || !st.descends_from(snapshot, volume) {
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

#[cfg(test)]
mod tests {
    use super::super::test_utils::{CHUNK, TestPool, assert_err, pattern};
    use super::*;

    #[test]
    fn records_and_volumes_convert_both_ways() {
        let vol = Volume {
            id: Uuid::new_v4(),
            name: "db".into(),
            kind: VolumeKind::Clone,
            origin: Some(Uuid::new_v4()),
            size: 10 << 30,
            block_size: 4096,
            root: 42,
            height: 3,
            mapped: 17,
            created_at: 1_763_000_000,
            labels: BTreeMap::from([("tier".to_owned(), "gold".to_owned())]),
        };
        let rec = VolumeRecord::from(&vol);
        let stored = crate::meta::encode_json(&rec);
        let back: VolumeRecord = crate::meta::decode_json("v", &stored).unwrap();
        assert_eq!(back, rec);
        assert_eq!(Volume::from(back), vol);
    }

    #[test]
    fn a_stored_format_1_record_still_reads() {
        // The JSON format 1 writes; labels came later and default to none.
        let json = br#"{"id":"6a0e9c5e-3f4b-4d8e-9a43-1d2c3b4a5f60","name":"v","kind":"snapshot",
            "origin":null,"size":1048576,"block_size":512,"root":0,"height":1,"mapped":0,
            "created_at":5}"#;
        let rec: VolumeRecord = crate::meta::decode_json("v", json).unwrap();
        let vol = Volume::from(rec);
        assert!(vol.read_only());
        assert!(vol.labels.is_empty());
        assert_eq!((vol.size, vol.root, vol.created_at), (1 << 20, NO_NODE, 5));
    }

    #[test]
    fn create_validates_and_refuses_a_taken_name() {
        let t = TestPool::new(16);
        let v = t
            .pool
            .create_volume("v", 3 * CHUNK, 0, BTreeMap::new())
            .unwrap();
        assert_eq!(
            (v.block_size, v.size, v.allocated_bytes),
            (512, 3 * CHUNK, 0)
        );
        assert_eq!(v.kind, VolumeKind::Volume);
        // Thin: a volume may be larger than the pool.
        t.pool
            .create_volume("huge", 1 << 40, 4096, BTreeMap::new())
            .unwrap();
        let before = t.pool.list_volumes();
        assert_err(
            t.pool.create_volume("v", CHUNK, 512, BTreeMap::new()),
            |e| matches!(e, PoolError::NameTaken(n) if n == "v"),
        );
        assert_err(t.pool.snapshot(v.id, "huge", BTreeMap::new()), |e| {
            matches!(e, PoolError::NameTaken(_))
        });
        for (size, bs) in [(0, 512), (1000, 512), (CHUNK, 1024), (512, 4096)] {
            assert_err(t.pool.create_volume("w", size, bs, BTreeMap::new()), |e| {
                matches!(e, PoolError::InvalidArgument(_))
            });
        }
        assert_err(
            t.pool.create_volume("a\nb", CHUNK, 512, BTreeMap::new()),
            |e| matches!(e, PoolError::InvalidArgument(_)),
        );
        let other = Uuid::new_v4();
        let unknown = |e: &PoolError| matches!(e, PoolError::NoVolume(id) if *id == other);
        assert_err(t.pool.volume_info(other), unknown);
        assert_err(t.pool.snapshot(other, "s", BTreeMap::new()), unknown);
        assert_err(t.pool.clone_volume(other, "c", BTreeMap::new()), unknown);
        assert_err(t.pool.delete_volume(other), unknown);
        assert_err(t.pool.resize(other, CHUNK, false), unknown);
        assert_eq!(t.pool.list_volumes(), before);
    }

    #[test]
    fn a_snapshot_keeps_its_data_after_the_volume_is_overwritten() {
        let t = TestPool::new(32);
        let vol = t.volume("v", 4);
        let old = pattern(1, 2 * CHUNK as usize);
        t.pool.write(vol, 0, &old).unwrap();
        let snap = t.pool.snapshot(vol, "v@1", BTreeMap::new()).unwrap();
        assert_eq!(snap.kind, VolumeKind::Snapshot);
        assert_eq!(snap.origin, Some(vol));
        assert!(snap.read_only());
        assert_eq!((snap.shared_bytes, snap.exclusive_bytes), (2 * CHUNK, 0));

        let new = pattern(2, CHUNK as usize + 512);
        t.pool.write(vol, 512, &new).unwrap();
        assert_eq!(t.read(snap.id, 0, old.len()), old);
        assert_eq!(t.read(vol, 512, new.len()), new);
        assert_err(
            t.pool.write(snap.id, 0, &[1; 512]),
            |e| matches!(e, PoolError::ReadOnly { id } if *id == snap.id),
        );
        assert_eq!(t.read(snap.id, 0, old.len()), old);

        // Reverting brings the snapshot's data back.
        let reverted = t.pool.revert(vol, snap.id).unwrap();
        assert_eq!(reverted.id, vol);
        assert_eq!(t.read(vol, 0, old.len()), old);
        let t = t.reopen();
        assert_eq!(t.read(snap.id, 0, old.len()), old);
        assert!(t.pool.check(false).unwrap().clean());
    }

    #[test]
    fn revert_needs_a_snapshot_of_that_volume() {
        let t = TestPool::new(16);
        let a = t.volume("a", 1);
        let b = t.volume("b", 1);
        let snap_b = t.pool.snapshot(b, "b@1", BTreeMap::new()).unwrap().id;
        let clone_a = t.pool.clone_volume(a, "a2", BTreeMap::new()).unwrap().id;
        for not_snap in [snap_b, clone_a] {
            assert_err(
                t.pool.revert(a, not_snap),
                |e| matches!(e, PoolError::NotSnapshotOf { volume, .. } if *volume == a),
            );
        }
        assert_err(t.pool.revert(snap_b, snap_b), |e| {
            matches!(e, PoolError::ReadOnly { .. })
        });
        // A snapshot of a clone of b's snapshot is not a's either.
        let b2 = t
            .pool
            .clone_volume(snap_b, "b2", BTreeMap::new())
            .unwrap()
            .id;
        let snap_b2 = t.pool.snapshot(b2, "b2@1", BTreeMap::new()).unwrap().id;
        assert_err(
            t.pool.revert(a, snap_b2),
            |e| matches!(e, PoolError::NotSnapshotOf { volume, .. } if *volume == a),
        );
    }

    #[test]
    fn revert_to_a_snapshot_of_a_clone_of_its_snapshot_takes_the_clones_data() {
        let t = TestPool::new(32);
        let base = t.volume("base", 2);
        let old = pattern(1, 2 * CHUNK as usize);
        t.pool.write(base, 0, &old).unwrap();
        let s1 = t
            .pool
            .snapshot(base, "base@undo", BTreeMap::new())
            .unwrap()
            .id;
        let overlay = t
            .pool
            .clone_volume(s1, "overlay", BTreeMap::new())
            .unwrap()
            .id;
        let new = pattern(2, CHUNK as usize);
        t.pool.write(overlay, 512, &new).unwrap();
        let s2 = t
            .pool
            .snapshot(overlay, "overlay@commit", BTreeMap::new())
            .unwrap()
            .id;
        t.pool.revert(base, s2).unwrap();
        for gone in [s2, overlay, s1] {
            t.pool.delete_volume(gone).unwrap();
        }
        let mut want = old.clone();
        want[512..512 + new.len()].copy_from_slice(&new);
        assert_eq!(t.read(base, 0, want.len()), want);
        let t = t.reopen();
        assert_eq!(t.read(base, 0, want.len()), want);
        assert!(t.pool.check(false).unwrap().clean());
    }

    #[test]
    fn a_clone_shares_its_source_then_diverges() {
        let t = TestPool::new(32);
        let vol = t.volume("v", 4);
        let data = pattern(4, 3 * CHUNK as usize);
        t.pool.write(vol, 0, &data).unwrap();
        t.pool.flush().unwrap();
        let used = t.pool.usage().used_chunks;
        let clone = t.pool.clone_volume(vol, "v2", BTreeMap::new()).unwrap();
        assert_eq!(clone.kind, VolumeKind::Clone);
        assert!(!clone.read_only());
        assert_eq!((clone.shared_bytes, clone.exclusive_bytes), (3 * CHUNK, 0));
        assert_eq!(t.pool.usage().used_chunks, used, "a clone takes no chunk");
        assert_eq!(t.read(clone.id, 0, data.len()), data);

        t.pool.write(clone.id, CHUNK, &[0x55; 4096]).unwrap();
        t.pool.write(vol, 0, &[0x66; 4096]).unwrap();
        let mut in_clone = data.clone();
        in_clone[CHUNK as usize..CHUNK as usize + 4096].fill(0x55);
        let mut in_vol = data;
        in_vol[..4096].fill(0x66);
        assert_eq!(t.read(clone.id, 0, in_clone.len()), in_clone);
        assert_eq!(t.read(vol, 0, in_vol.len()), in_vol);
        // The clone's copy of chunk 1, and chunk 0 the volume no longer maps, are its own.
        let info = t.pool.volume_info(clone.id).unwrap();
        assert_eq!(
            (info.exclusive_bytes, info.shared_bytes),
            (2 * CHUNK, CHUNK)
        );
        assert_eq!(t.pool.usage().used_chunks, used + 2);
    }

    #[test]
    fn delete_frees_what_no_one_else_maps() {
        let t = TestPool::new(32);
        let vol = t.volume("v", 8);
        t.pool
            .write(vol, 0, &pattern(1, 4 * CHUNK as usize))
            .unwrap();
        let snap = t.pool.snapshot(vol, "v@1", BTreeMap::new()).unwrap().id;
        t.pool.write(vol, 0, &[1; 512]).unwrap();
        // The volume alone maps one chunk (the copy); the others are shared.
        assert_eq!(t.pool.delete_volume(vol).unwrap(), CHUNK);
        assert_err(t.pool.volume_info(vol), |e| {
            matches!(e, PoolError::NoVolume(_))
        });
        // The snapshot outlives its origin, which it no longer names.
        assert_eq!(t.pool.volume_info(snap).unwrap().origin, None);
        assert_eq!(t.pool.delete_volume(snap).unwrap(), 4 * CHUNK);
        t.pool.flush().unwrap();
        let usage = t.pool.usage();
        assert_eq!((usage.used_chunks, usage.pending_free_chunks), (0, 0));
        assert!(t.pool.list_volumes().is_empty());
        // The name is free again.
        t.volume("v", 1);
    }

    #[test]
    fn resize_grows_and_shrinks_only_with_force() {
        let t = TestPool::new(32);
        let vol = t.volume("v", 2);
        let data = pattern(8, 2 * CHUNK as usize);
        t.pool.write(vol, 0, &data).unwrap();
        let grown = t.pool.resize(vol, 1 << 30, false).unwrap();
        assert_eq!(grown.size, 1 << 30);
        t.pool.write(vol, (1 << 30) - 512, &[7; 512]).unwrap();
        assert_eq!(t.read(vol, 0, data.len()), data);

        let small = CHUNK + 4096;
        assert_err(
            t.pool.resize(vol, small, false),
            |e| matches!(e, PoolError::ShrinkNeedsForce { from, to, .. } if *from == 1 << 30 && *to == small),
        );
        assert_err(t.pool.resize(vol, 1000, true), |e| {
            matches!(e, PoolError::InvalidArgument(_))
        });
        assert_eq!(t.pool.volume_info(vol).unwrap().size, 1 << 30);
        t.pool.resize(vol, small, true).unwrap();
        assert_eq!(t.read(vol, 0, small as usize), data[..small as usize]);
        // Growing again reads zeros past the old end.
        t.pool.resize(vol, 2 * CHUNK, false).unwrap();
        assert_eq!(
            t.read(vol, small, (CHUNK - 4096) as usize),
            vec![0; (CHUNK - 4096) as usize]
        );
        t.pool.flush().unwrap();
        assert_eq!(t.pool.usage().used_chunks, 2);
        assert!(t.pool.check(false).unwrap().clean());
    }
}
