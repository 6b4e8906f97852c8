//! Space and bad input: a full pool fails only writes that need a new chunk, loses
//! nothing, and works again after `extend`; wrong arguments and wrong devices are clear
//! errors that change nothing.

use std::collections::BTreeMap;
use std::path::Path;

use storaged::{BackingKind, CreateOptions, ImportOptions, PoolError, ThinPool};
use uuid::Uuid;

const CHUNK: u64 = 64 << 10;

fn create(path: &Path, chunks: u64) -> ThinPool {
    ThinPool::create(&CreateOptions {
        name: "space".into(),
        kind: BackingKind::File,
        path: path.to_owned(),
        size: Some((1 << 20) + chunks * CHUNK),
        chunk_size: CHUNK,
        meta_dir: None,
        warning_threshold_percent: 50,
    })
    .unwrap()
}

fn import(path: &Path) -> Result<ThinPool, PoolError> {
    ThinPool::import(&ImportOptions {
        kind: BackingKind::File,
        path: path.to_owned(),
        meta_dir: None,
        expected_id: None,
    })
}

fn read(pool: &ThinPool, vol: Uuid, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    pool.read(vol, offset, &mut buf).unwrap();
    buf
}

#[test]
fn full_pool_refuses_new_chunks_keeps_old_data_and_grows_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.img");
    let pool = create(&path, 16);
    // Overcommit: 64 chunks of virtual space in a 16-chunk pool.
    let vol = pool
        .create_volume("big", 64 * CHUNK, 512, BTreeMap::new())
        .unwrap()
        .id;
    for c in 0..16 {
        pool.write(vol, c * CHUNK, &[c as u8 + 1; 4096]).unwrap();
    }
    pool.flush().unwrap();
    let usage = pool.usage();
    assert_eq!(usage.used_chunks, 16);
    assert!(usage.warning, "above the 50% threshold");

    // A write that needs a chunk fails with the distinct error...
    assert!(matches!(
        pool.write(vol, 20 * CHUNK, &[9; 512]),
        Err(PoolError::NoSpace)
    ));
    // ...while overwrites of allocated chunks and reads work.
    pool.write(vol, 3 * CHUNK + 8192, &[0xaa; 4096]).unwrap();
    assert_eq!(read(&pool, vol, 3 * CHUNK + 8192, 4096), vec![0xaa; 4096]);
    assert_eq!(read(&pool, vol, 20 * CHUNK, 512), vec![0; 512]);
    // A snapshot is allowed (it takes no chunk); breaking sharing then needs one.
    let snap = pool.snapshot(vol, "snap", BTreeMap::new()).unwrap().id;
    assert!(matches!(
        pool.write(vol, 0, &[5; 512]),
        Err(PoolError::NoSpace)
    ));
    assert_eq!(
        read(&pool, vol, 0, 4096),
        vec![1; 4096],
        "a failed write changes nothing"
    );
    pool.flush().unwrap();

    // Growing the pool brings writes back; nothing written before is lost.
    let usage = pool.extend(Some((1 << 20) + 32 * CHUNK)).unwrap();
    assert_eq!(usage.total_chunks, 32);
    pool.write(vol, 20 * CHUNK, &[9; 512]).unwrap();
    pool.write(vol, 0, &[5; 512]).unwrap();
    assert_eq!(read(&pool, vol, 0, 512), vec![5; 512]);
    assert_eq!(read(&pool, snap, 0, 512), vec![1; 512]);
    for c in 1..16 {
        assert_eq!(
            read(&pool, vol, c * CHUNK, 4096),
            vec![c as u8 + 1; 4096],
            "chunk {c}"
        );
    }
    assert_eq!(read(&pool, vol, 3 * CHUNK + 8192, 4096), vec![0xaa; 4096]);
    pool.flush().unwrap();
    drop(pool);
    let pool = import(&path).unwrap();
    assert_eq!(pool.usage().total_chunks, 32);
    assert_eq!(read(&pool, vol, 20 * CHUNK, 512), vec![9; 512]);
    assert!(pool.check(false).unwrap().clean());
}

#[test]
fn discard_frees_whole_chunks_and_zeroes_partial_ones() {
    let dir = tempfile::tempdir().unwrap();
    let pool = create(&dir.path().join("p.img"), 32);
    let vol = pool
        .create_volume("v", 8 * CHUNK, 512, BTreeMap::new())
        .unwrap()
        .id;
    pool.write(vol, 0, &vec![0x11; (4 * CHUNK) as usize])
        .unwrap();
    let snap = pool.snapshot(vol, "s", BTreeMap::new()).unwrap().id;
    assert_eq!(pool.usage().used_chunks, 4);
    // Chunks 1 and 2 whole, halves of chunks 0 and 3.
    pool.discard(vol, CHUNK / 2, 3 * CHUNK).unwrap();
    assert_eq!(
        read(&pool, vol, 0, (CHUNK / 2) as usize),
        vec![0x11; (CHUNK / 2) as usize]
    );
    assert_eq!(
        read(&pool, vol, CHUNK / 2, (3 * CHUNK) as usize),
        vec![0; (3 * CHUNK) as usize]
    );
    assert_eq!(
        read(&pool, vol, 3 * CHUNK + CHUNK / 2, 512),
        vec![0x11; 512]
    );
    // The snapshot still holds everything; the partial chunks were copied, not freed.
    assert_eq!(
        read(&pool, snap, 0, (4 * CHUNK) as usize),
        vec![0x11; (4 * CHUNK) as usize]
    );
    let info = pool.volume_info(vol).unwrap();
    assert_eq!(info.allocated_bytes, 2 * CHUNK);
    assert_eq!(info.exclusive_bytes, 2 * CHUNK);
    assert_eq!(pool.usage().used_chunks, 6);
    // Deleting the snapshot frees exactly the chunks no one else maps.
    assert_eq!(pool.delete_volume(snap).unwrap(), 4 * CHUNK);
    assert_eq!(pool.usage().used_chunks, 2);
    assert!(pool.check(false).unwrap().clean());
}

#[test]
fn bad_input_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.img");
    let pool = create(&path, 32);
    let vol = pool
        .create_volume("v", 4 * CHUNK, 512, BTreeMap::new())
        .unwrap()
        .id;
    let unknown = Uuid::new_v4();
    assert!(matches!(
        pool.write(unknown, 0, &[0; 512]),
        Err(PoolError::NoVolume(_))
    ));
    assert!(matches!(
        pool.snapshot(unknown, "x", BTreeMap::new()),
        Err(PoolError::NoVolume(_))
    ));
    assert!(matches!(
        pool.delete_volume(unknown),
        Err(PoolError::NoVolume(_))
    ));
    assert!(matches!(
        pool.create_volume("odd", 1000, 512, BTreeMap::new()),
        Err(PoolError::InvalidArgument(_))
    ));
    assert!(matches!(
        pool.create_volume("bs", 4096, 1000, BTreeMap::new()),
        Err(PoolError::InvalidArgument(_))
    ));
    assert!(matches!(
        pool.create_volume("v", 4096, 512, BTreeMap::new()),
        Err(PoolError::NameTaken(_))
    ));
    assert!(matches!(
        pool.create_volume("", 4096, 512, BTreeMap::new()),
        Err(PoolError::InvalidArgument(_))
    ));
    let mut buf = [0u8; 512];
    assert!(matches!(
        pool.read(vol, 4 * CHUNK, &mut buf),
        Err(PoolError::OutOfRange { .. })
    ));
    assert!(matches!(
        pool.read(vol, u64::MAX - 511, &mut buf),
        Err(PoolError::OutOfRange { .. })
    ));
    assert!(matches!(
        pool.write(vol, 100, &[0; 512]),
        Err(PoolError::Misaligned { .. })
    ));
    assert!(matches!(
        pool.resize(vol, CHUNK, false),
        Err(PoolError::ShrinkNeedsForce { .. })
    ));
    let snap = pool.snapshot(vol, "s", BTreeMap::new()).unwrap().id;
    assert!(matches!(
        pool.write(snap, 0, &[0; 512]),
        Err(PoolError::ReadOnly { .. })
    ));
    let other = pool
        .create_volume("w", 4 * CHUNK, 512, BTreeMap::new())
        .unwrap()
        .id;
    assert!(matches!(
        pool.revert(other, snap),
        Err(PoolError::NotSnapshotOf { .. })
    ));
    assert_eq!(pool.list_volumes().len(), 3);
    assert_eq!(pool.usage().used_chunks, 0);

    // A second pool on a device that holds one, or a second opener, is refused.
    let again = ThinPool::create(&CreateOptions {
        name: "again".into(),
        kind: BackingKind::File,
        path: path.clone(),
        size: Some(64 << 20),
        chunk_size: CHUNK,
        meta_dir: None,
        warning_threshold_percent: 0,
    });
    assert!(again.is_err(), "{again:?}");
    assert!(import(&path).is_err(), "the pool is open in this process");
    drop(pool);
    assert!(matches!(
        ThinPool::create(&CreateOptions {
            name: "again".into(),
            kind: BackingKind::File,
            path: path.clone(),
            size: Some(64 << 20),
            chunk_size: CHUNK,
            meta_dir: Some(dir.path().join("other.meta")),
            warning_threshold_percent: 0,
        }),
        Err(PoolError::AlreadyPool { .. })
    ));
    assert_eq!(import(&path).unwrap().list_volumes().len(), 3);

    // A file that is not a pool, and a bad chunk size.
    let junk = dir.path().join("junk.img");
    std::fs::write(&junk, vec![0x42u8; 2 << 20]).unwrap();
    assert!(matches!(import(&junk), Err(PoolError::Superblock { .. })));
    let bad = ThinPool::create(&CreateOptions {
        name: "bad".into(),
        kind: BackingKind::File,
        path: dir.path().join("bad.img"),
        size: Some(64 << 20),
        chunk_size: 48 << 10,
        meta_dir: None,
        warning_threshold_percent: 0,
    });
    assert!(matches!(bad, Err(PoolError::InvalidArgument(_))));
    assert!(!dir.path().join("bad.img").exists(), "nothing half-created");
}

#[test]
fn metadata_of_another_pool_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.img");
    let b = dir.path().join("b.img");
    drop(create(&a, 16));
    drop(create(&b, 16));
    let err = ThinPool::import(&ImportOptions {
        kind: BackingKind::File,
        path: a.clone(),
        meta_dir: Some(dir.path().join("b.img.meta")),
        expected_id: None,
    })
    .unwrap_err();
    assert!(matches!(err, PoolError::MetaMismatch { .. }), "{err}");
    let err = ThinPool::import(&ImportOptions {
        kind: BackingKind::File,
        path: a,
        meta_dir: None,
        expected_id: Some(Uuid::new_v4()),
    })
    .unwrap_err();
    assert!(matches!(err, PoolError::UnexpectedPool { .. }), "{err}");
}

#[test]
fn snapshot_of_a_large_volume_copies_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let pool = create(&dir.path().join("p.img"), 2100);
    let vol = pool
        .create_volume("v", 2048 * CHUNK, 512, BTreeMap::new())
        .unwrap()
        .id;
    for c in 0..2048 {
        pool.write(vol, c * CHUNK, &[1; 512]).unwrap();
    }
    pool.flush().unwrap();
    let before = pool.usage();
    let snaps: Vec<Uuid> = (0..20)
        .map(|i| {
            pool.snapshot(vol, &format!("s{i}"), BTreeMap::new())
                .unwrap()
                .id
        })
        .collect();
    let after = pool.usage();
    assert_eq!(
        before.used_chunks, after.used_chunks,
        "snapshots share every chunk"
    );
    let info = pool.volume_info(snaps[7]).unwrap();
    assert_eq!(
        (info.allocated_bytes, info.exclusive_bytes),
        (2048 * CHUNK, 0)
    );
    // A write after the snapshots copies one chunk, whatever their number.
    pool.write(vol, 5 * CHUNK, &[2; 512]).unwrap();
    assert_eq!(pool.usage().used_chunks, after.used_chunks + 1);
    assert_eq!(read(&pool, snaps[19], 5 * CHUNK, 512), vec![1; 512]);
    assert_eq!(read(&pool, vol, 5 * CHUNK, 512), vec![2; 512]);
}

#[test]
fn clone_range_shares_chunks_instead_of_copying() {
    let dir = tempfile::tempdir().unwrap();
    let pool = create(&dir.path().join("p.img"), 64);
    let a = pool
        .create_volume("a", 8 * CHUNK, 512, BTreeMap::new())
        .unwrap()
        .id;
    let b = pool
        .create_volume("b", 8 * CHUNK, 512, BTreeMap::new())
        .unwrap()
        .id;
    pool.write(a, 0, &vec![0x61; (3 * CHUNK) as usize]).unwrap();
    pool.write(b, 4 * CHUNK, &vec![0x62; CHUNK as usize])
        .unwrap();
    let used = pool.usage().used_chunks;
    // Two whole chunks shared, and half a chunk copied.
    assert!(
        pool.clone_range(a, 0, b, 3 * CHUNK, 2 * CHUNK + CHUNK / 2)
            .unwrap()
    );
    assert_eq!(
        read(&pool, b, 3 * CHUNK, (2 * CHUNK + CHUNK / 2) as usize),
        vec![0x61; (2 * CHUNK + CHUNK / 2) as usize]
    );
    assert_eq!(read(&pool, b, 5 * CHUNK + CHUNK / 2, 512), vec![0; 512]);
    // b's old chunk 4 was replaced and freed; one chunk allocated for the copied half.
    assert_eq!(pool.usage().used_chunks, used);
    assert_eq!(pool.volume_info(b).unwrap().shared_bytes, 2 * CHUNK);
    // Copy on write keeps them apart afterwards.
    pool.write(a, 0, &[0x71; 512]).unwrap();
    assert_eq!(read(&pool, b, 3 * CHUNK, 512), vec![0x61; 512]);
    pool.write(b, 4 * CHUNK, &[0x72; 512]).unwrap();
    assert_eq!(read(&pool, a, CHUNK, 512), vec![0x61; 512]);
    // Unaligned offsets are left to the caller.
    assert!(!pool.clone_range(a, 512, b, 0, CHUNK).unwrap());
    pool.flush().unwrap();
    assert!(pool.check(false).unwrap().clean());
}
