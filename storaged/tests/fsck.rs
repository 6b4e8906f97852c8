//! fsck finds what is wrong in a pool's metadata, and with repair reclaims leaked chunks
//! and drops unreachable nodes. The damage is made by editing the metadata store directly,
//! the way a bug or a bad disk would leave it.

use std::collections::BTreeMap;
use std::path::Path;

use storaged::meta::{MetaStore, encode_node, node_key, page_key};
use storaged::tree::{Entries, FANOUT, NO_CHUNK, Node};
use storaged::{BackingKind, CreateOptions, ImportOptions, ThinPool};

const CHUNK: u64 = 64 << 10;

fn import(path: &Path) -> ThinPool {
    ThinPool::import(&ImportOptions {
        kind: BackingKind::File,
        path: path.to_owned(),
        meta_dir: None,
        expected_id: None,
    })
    .unwrap()
}

#[test]
fn leaks_and_orphans_are_found_and_repaired() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("p.img");
    let pool = ThinPool::create(&CreateOptions {
        name: "fsck".into(),
        kind: BackingKind::File,
        path: img.clone(),
        size: Some((1 << 20) + 32 * CHUNK),
        chunk_size: CHUNK,
        meta_dir: None,
        warning_threshold_percent: 0,
    })
    .unwrap();
    let vol = pool
        .create_volume("v", 8 * CHUNK, 512, BTreeMap::new())
        .unwrap()
        .id;
    pool.write(vol, 0, &vec![3u8; (2 * CHUNK) as usize])
        .unwrap();
    pool.flush().unwrap();
    assert!(pool.check(false).unwrap().clean());
    drop(pool);

    // Damage: chunks 20 and 21 counted as used though nothing maps them (a leak), and a
    // leaf that no volume reaches (an orphan) mapping chunk 22.
    {
        let db = MetaStore::open_db(&dir.path().join("p.img.meta")).unwrap();
        let page = db.get(page_key(0)).unwrap().unwrap();
        let mut refs = page.to_vec();
        for c in [20usize, 21] {
            refs[c * 4..c * 4 + 4].copy_from_slice(&1u32.to_le_bytes());
        }
        db.insert(page_key(0), refs).unwrap();
        let mut entries = Box::new([NO_CHUNK; FANOUT]);
        entries[0] = 22;
        let orphan = Node {
            refs: 0,
            used: 1,
            entries: Entries::Leaf(entries),
        };
        db.insert(node_key(9_999), encode_node(&orphan)).unwrap();
        db.flush().unwrap();
    }

    let pool = import(&img);
    let report = pool.check(false).unwrap();
    assert!(!report.clean());
    assert_eq!(report.leaked_chunks, 2, "{report:?}");
    assert_eq!(report.orphan_nodes, 1, "{report:?}");
    assert_eq!(report.double_allocations, 0);
    assert_eq!(
        pool.usage().used_chunks,
        4,
        "the leak holds space until repaired"
    );

    let report = pool.check(true).unwrap();
    assert_eq!(report.reclaimed_chunks, 2);
    assert!(pool.check(false).unwrap().clean());
    assert_eq!(pool.usage().used_chunks, 2);
    drop(pool);

    // The repair was committed, and the data is untouched.
    let pool = import(&img);
    assert!(pool.check(false).unwrap().clean());
    let mut buf = vec![0u8; (2 * CHUNK) as usize];
    pool.read(vol, 0, &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 3));
}

#[test]
fn a_mapped_chunk_counted_free_is_never_handed_out() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("p.img");
    let pool = ThinPool::create(&CreateOptions {
        name: "fsck".into(),
        kind: BackingKind::File,
        path: img.clone(),
        size: Some((1 << 20) + 16 * CHUNK),
        chunk_size: CHUNK,
        meta_dir: None,
        warning_threshold_percent: 0,
    })
    .unwrap();
    let vol = pool
        .create_volume("v", 16 * CHUNK, 512, BTreeMap::new())
        .unwrap()
        .id;
    pool.write(vol, 0, &[9u8; 512]).unwrap();
    pool.flush().unwrap();
    drop(pool);
    // Damage: the one used chunk is counted free.
    {
        let db = MetaStore::open_db(&dir.path().join("p.img.meta")).unwrap();
        db.insert(page_key(0), vec![0u8; 16 * 4]).unwrap();
        db.flush().unwrap();
    }
    let pool = import(&img);
    let report = pool.check(false).unwrap();
    assert_eq!(report.double_allocations, 1, "{report:?}");
    // Import raised the count, so filling the pool never reuses the mapped chunk.
    for c in 1..16 {
        pool.write(vol, c * CHUNK, &[c as u8; 512]).unwrap();
    }
    let mut buf = [0u8; 512];
    pool.read(vol, 0, &mut buf).unwrap();
    assert_eq!(buf, [9u8; 512]);
    pool.check(true).unwrap();
    assert!(pool.check(false).unwrap().clean());
}
