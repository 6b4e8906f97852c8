//! Fixtures for the pool's unit tests: small file-backed pools in a temporary directory.

use std::collections::BTreeMap;
use std::path::PathBuf;

use uuid::Uuid;

use super::{CreateOptions, ImportOptions, PoolError, ThinPool};
use crate::backing::BackingKind;
use crate::superblock::DATA_OFFSET;

pub(super) const CHUNK: u64 = 64 << 10;

/// A pool on a file in its own temporary directory (removed when dropped).
pub(super) struct TestPool {
    pub(super) pool: ThinPool,
    pub(super) path: PathBuf,
    _dir: tempfile::TempDir,
}

impl TestPool {
    /// A pool of `chunks` chunks of [`CHUNK`] bytes.
    pub(super) fn new(chunks: u64) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pool.img");
        let pool = ThinPool::create(&options(path.clone(), chunks)).unwrap();
        TestPool {
            pool,
            path,
            _dir: dir,
        }
    }

    /// Closes the pool and imports it again from what is on disk: what was committed
    /// survives, nothing else.
    pub(super) fn reopen(self) -> Self {
        let TestPool { pool, path, _dir } = self;
        drop(pool);
        let pool = ThinPool::import(&import_options(path.clone())).unwrap();
        TestPool { pool, path, _dir }
    }

    /// A volume of `chunks` virtual chunks with 512-byte blocks.
    pub(super) fn volume(&self, name: &str, chunks: u64) -> Uuid {
        self.pool
            .create_volume(name, chunks * CHUNK, 512, BTreeMap::new())
            .unwrap()
            .id
    }

    pub(super) fn read(&self, volume: Uuid, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.pool.read(volume, offset, &mut buf).unwrap();
        buf
    }
}

pub(super) fn options(path: PathBuf, chunks: u64) -> CreateOptions {
    CreateOptions {
        name: "test".into(),
        kind: BackingKind::File,
        path,
        size: Some(DATA_OFFSET + chunks * CHUNK),
        chunk_size: CHUNK,
        meta_dir: None,
        warning_threshold_percent: 0,
    }
}

pub(super) fn import_options(path: PathBuf) -> ImportOptions {
    ImportOptions {
        kind: BackingKind::File,
        path,
        meta_dir: None,
        expected_id: None,
    }
}

/// A distinct pattern per offset, so a read from the wrong place shows.
pub(super) fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i / 512) as u8).wrapping_mul(31) ^ (i as u8))
        .collect()
}

/// Asserts `result` failed with an error `matches` accepts.
pub(super) fn assert_err<T: std::fmt::Debug>(
    result: Result<T, PoolError>,
    matches: impl Fn(&PoolError) -> bool,
) {
    match result {
        Err(e) if matches(&e) => {}
        other => panic!("unexpected result {other:?}"),
    }
}
