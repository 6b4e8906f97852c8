//! How full the pool is, and growing it.

use crate::backing::BackingKind;
use crate::meta::VolumeKind;
use crate::tree::NO_CHUNK;

use super::{PoolError, ThinPool};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Usage {
    pub chunk_size: u64,
    pub total_chunks: u64,
    pub used_chunks: u64,
    /// Free chunks, including those waiting for the next commit to become reusable.
    pub free_chunks: u64,
    pub pending_free_chunks: u64,
    pub provisioned_bytes: u64,
    pub warning_threshold_percent: u32,
    pub warning: bool,
    pub metadata_bytes: u64,
    pub volume_count: u32,
    pub snapshot_count: u32,
}

impl Usage {
    pub fn total_bytes(&self) -> u64 {
        self.total_chunks * self.chunk_size
    }
    pub fn used_bytes(&self) -> u64 {
        self.used_chunks * self.chunk_size
    }
    pub fn free_bytes(&self) -> u64 {
        self.free_chunks * self.chunk_size
    }
    pub fn used_percent(&self) -> f64 {
        if self.total_chunks == 0 {
            return 100.0;
        }
        self.used_chunks as f64 * 100.0 / self.total_chunks as f64
    }
}

impl ThinPool {
    pub fn usage(&self) -> Usage {
        let st = self.read_state();
        let total = st.space.total();
        let used = st.space.used();
        let warning = used * 100 >= total * u64::from(st.meta.warning_threshold_percent);
        Usage {
            chunk_size: self.inner.chunk_size,
            total_chunks: total,
            used_chunks: used,
            free_chunks: total - used,
            pending_free_chunks: st.space.pending_free(),
            provisioned_bytes: st
                .volumes
                .values()
                .filter(|v| v.kind != VolumeKind::Snapshot)
                .map(|v| v.size)
                .sum(),
            warning_threshold_percent: st.meta.warning_threshold_percent,
            warning,
            metadata_bytes: self.inner.meta.size_on_disk(),
            volume_count: st
                .volumes
                .values()
                .filter(|v| v.kind != VolumeKind::Snapshot)
                .count() as u32,
            snapshot_count: st
                .volumes
                .values()
                .filter(|v| v.kind == VolumeKind::Snapshot)
                .count() as u32,
        }
    }

    /// Grows the pool. For a file, to `new_size` bytes; for a device, to what it now
    /// offers (`new_size` may cap it).
    pub fn extend(&self, new_size: Option<u64>) -> Result<Usage, PoolError> {
        self.check_failed()?;
        let cs = self.inner.chunk_size;
        {
            let _serial = self
                .inner
                .commit_lock
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let backing = &self.inner.backing;
            let current = backing.size()?;
            let target = match (backing.kind(), new_size) {
                (BackingKind::File, Some(s)) => s,
                (BackingKind::File, None) => {
                    return Err(PoolError::InvalidArgument(
                        "extending a file-backed pool needs the new size".into(),
                    ));
                }
                (BackingKind::BlockDevice, Some(s)) if s > current => {
                    return Err(PoolError::InvalidArgument(format!(
                        "{s} bytes is more than the device's {current}"
                    )));
                }
                (BackingKind::BlockDevice, s) => s.unwrap_or(current),
            };
            let chunks =
                ((target.saturating_sub(self.inner.data_offset)) / cs).min(u64::from(NO_CHUNK - 1));
            let old = self.read_state().meta.chunk_count;
            if chunks <= old {
                return Err(PoolError::InvalidArgument(format!(
                    "{target} bytes hold {chunks} chunks, no more than the pool's {old}"
                )));
            }
            if backing.kind() == BackingKind::File && target > current {
                backing.grow_file(target)?;
            }
            let mut st = self.write_state();
            st.space
                .extend(chunks as usize, backing.kind() == BackingKind::File);
            st.meta.chunk_count = chunks;
            st.meta_dirty = true;
            st.warned = false;
        }
        self.flush()?;
        tracing::info!(pool = %self.inner.id, "extended pool");
        Ok(self.usage())
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_utils::{CHUNK, TestPool, assert_err};
    use super::*;
    use crate::superblock::DATA_OFFSET;

    #[test]
    fn usage_counts_chunks_volumes_and_provisioned_space() {
        let t = TestPool::new(20);
        let empty = t.pool.usage();
        assert_eq!(
            (empty.total_chunks, empty.used_chunks, empty.free_chunks),
            (20, 0, 20)
        );
        assert_eq!(empty.total_bytes(), 20 * CHUNK);
        assert_eq!(empty.warning_threshold_percent, 80);
        assert!(!empty.warning);

        let vol = t.volume("v", 40);
        t.pool.write(vol, 0, &vec![1; 16 * CHUNK as usize]).unwrap();
        t.pool.snapshot(vol, "v@1", Default::default()).unwrap();
        let u = t.pool.usage();
        assert_eq!((u.used_chunks, u.free_chunks), (16, 4));
        assert_eq!(u.used_percent(), 80.0);
        assert!(u.warning, "at the threshold");
        assert_eq!((u.volume_count, u.snapshot_count), (1, 1));
        assert_eq!(
            u.provisioned_bytes,
            40 * CHUNK,
            "snapshots provision nothing"
        );
    }

    #[test]
    fn extend_grows_a_file_pool_and_refuses_to_shrink_it() {
        let t = TestPool::new(16);
        let size = DATA_OFFSET + 16 * CHUNK;
        for bad in [None, Some(size), Some(size - CHUNK)] {
            assert_err(t.pool.extend(bad), |e| {
                matches!(e, PoolError::InvalidArgument(_))
            });
        }
        assert_eq!(t.pool.usage().total_chunks, 16);
        let u = t.pool.extend(Some(size + 8 * CHUNK)).unwrap();
        assert_eq!((u.total_chunks, u.free_chunks), (24, 24));
        assert_eq!(std::fs::metadata(&t.path).unwrap().len(), size + 8 * CHUNK);
        let vol = t.volume("v", 24);
        t.pool.write(vol, 0, &vec![2; 24 * CHUNK as usize]).unwrap();
        t.pool.flush().unwrap();
        let t = t.reopen();
        assert_eq!(t.pool.usage().total_chunks, 24);
        assert_eq!(t.read(vol, 23 * CHUNK, 512), vec![2; 512]);
    }
}
