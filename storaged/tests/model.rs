//! Property test of the thin pool against a simple model: random sequences of writes,
//! discards, snapshots, clones, reverts, resizes, deletes, flushes and re-imports; after
//! each sequence every volume reads exactly what the model holds and fsck finds nothing.

use std::collections::BTreeMap;

use proptest::prelude::*;
use storaged::{BackingKind, CreateOptions, ImportOptions, PoolError, ThinPool, VolumeKind};
use uuid::Uuid;

const CHUNK: u64 = 64 << 10;
const BLOCK: u64 = 512;
const MAX_CHUNKS_PER_VOLUME: u64 = 12;

#[derive(Debug, Clone)]
enum Op {
    Create {
        chunks: u64,
        extra_blocks: u64,
    },
    Write {
        vol: usize,
        block: u64,
        blocks: u64,
        byte: u8,
    },
    Discard {
        vol: usize,
        block: u64,
        blocks: u64,
    },
    Snapshot {
        vol: usize,
    },
    Clone {
        vol: usize,
    },
    Revert {
        vol: usize,
        pick: usize,
    },
    Resize {
        vol: usize,
        chunks: u64,
        extra_blocks: u64,
    },
    Delete {
        vol: usize,
    },
    Flush,
    Reimport,
    /// Drops the pool without a flush and imports it again: metadata goes back to the
    /// last commit while the data area keeps every write (as after a process crash).
    Crash,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => (1..MAX_CHUNKS_PER_VOLUME, 0..4u64).prop_map(|(chunks, extra_blocks)| Op::Create { chunks, extra_blocks }),
        10 => (any::<usize>(), any::<u64>(), 1..400u64, any::<u8>()).prop_map(|(vol, block, blocks, byte)| Op::Write { vol, block, blocks, byte }),
        3 => (any::<usize>(), any::<u64>(), 1..600u64).prop_map(|(vol, block, blocks)| Op::Discard { vol, block, blocks }),
        2 => any::<usize>().prop_map(|vol| Op::Snapshot { vol }),
        2 => any::<usize>().prop_map(|vol| Op::Clone { vol }),
        1 => (any::<usize>(), any::<usize>()).prop_map(|(vol, pick)| Op::Revert { vol, pick }),
        1 => (any::<usize>(), 1..MAX_CHUNKS_PER_VOLUME, 0..4u64).prop_map(|(vol, chunks, extra_blocks)| Op::Resize { vol, chunks, extra_blocks }),
        2 => any::<usize>().prop_map(|vol| Op::Delete { vol }),
        2 => Just(Op::Flush),
        1 => Just(Op::Reimport),
        2 => Just(Op::Crash),
    ]
}

struct ModelVolume {
    id: Uuid,
    kind: VolumeKind,
    origin: Option<Uuid>,
    data: Vec<u8>,
    /// Content at the last commit, and per block the bytes written since: after a crash
    /// a block may hold any of them, nothing else.
    committed: Vec<u8>,
    since: BTreeMap<u64, Vec<u8>>,
}

impl ModelVolume {
    fn new(id: Uuid, kind: VolumeKind, origin: Option<Uuid>, data: Vec<u8>) -> Self {
        ModelVolume {
            id,
            kind,
            origin,
            committed: data.clone(),
            data,
            since: BTreeMap::new(),
        }
    }

    fn fill(&mut self, block: u64, blocks: u64, byte: u8) {
        self.data[(block * BLOCK) as usize..((block + blocks) * BLOCK) as usize].fill(byte);
        for b in block..block + blocks {
            self.since.entry(b).or_default().push(byte);
        }
    }
}

struct Harness {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    pool: Option<ThinPool>,
    model: Vec<ModelVolume>,
    names: u64,
}

impl Harness {
    fn new() -> Self {
        // Room for every volume the model can hold, so no write runs out of space.
        Self::with_chunks(400)
    }

    fn with_chunks(chunks: u64) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pool.img");
        let pool = ThinPool::create(&CreateOptions {
            name: "model".into(),
            kind: BackingKind::File,
            path: path.clone(),
            size: Some((1 << 20) + chunks * CHUNK),
            chunk_size: CHUNK,
            meta_dir: None,
            warning_threshold_percent: 0,
        })
        .unwrap();
        Harness {
            _dir: dir,
            path,
            pool: Some(pool),
            model: Vec::new(),
            names: 0,
        }
    }

    fn pool(&self) -> &ThinPool {
        self.pool.as_ref().unwrap()
    }

    fn name(&mut self) -> String {
        self.names += 1;
        format!("v{}", self.names)
    }

    fn pick(&self, i: usize) -> Option<usize> {
        (!self.model.is_empty()).then(|| i % self.model.len())
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Create {
                chunks,
                extra_blocks,
            } => {
                if self.model.len() >= 24 {
                    return;
                }
                let size = chunks * CHUNK + extra_blocks * BLOCK;
                let name = self.name();
                let info = self
                    .pool()
                    .create_volume(&name, size, BLOCK as u32, BTreeMap::new())
                    .unwrap();
                assert_eq!(info.allocated_bytes, 0);
                self.model.push(ModelVolume::new(
                    info.id,
                    VolumeKind::Volume,
                    None,
                    vec![0; size as usize],
                ));
                self.committed();
            }
            Op::Write {
                vol,
                block,
                blocks,
                byte,
            } => {
                let Some(i) = self.pick(vol) else { return };
                let v = &self.model[i];
                let total = v.data.len() as u64 / BLOCK;
                let start = block % total;
                let n = blocks.min(total - start);
                let data = vec![byte; (n * BLOCK) as usize];
                let r = self.pool().write(v.id, start * BLOCK, &data);
                if v.kind == VolumeKind::Snapshot {
                    assert!(matches!(r, Err(PoolError::ReadOnly { .. })), "{r:?}");
                } else {
                    r.unwrap();
                    self.model[i].fill(start, n, byte);
                }
                // Writing past the end is refused and changes nothing.
                let v = &self.model[i];
                let end = v.data.len() as u64;
                assert!(matches!(
                    self.pool().write(v.id, end, &[1; 512]),
                    Err(PoolError::OutOfRange { .. }) | Err(PoolError::ReadOnly { .. })
                ));
            }
            Op::Discard { vol, block, blocks } => {
                let Some(i) = self.pick(vol) else { return };
                let v = &self.model[i];
                let total = v.data.len() as u64 / BLOCK;
                let start = block % total;
                let n = blocks.min(total - start);
                let r = self.pool().discard(v.id, start * BLOCK, n * BLOCK);
                if v.kind == VolumeKind::Snapshot {
                    assert!(matches!(r, Err(PoolError::ReadOnly { .. })));
                } else {
                    r.unwrap();
                    self.model[i].fill(start, n, 0);
                }
            }
            Op::Snapshot { vol } | Op::Clone { vol } => {
                let Some(i) = self.pick(vol) else { return };
                if self.model.len() >= 24 {
                    return;
                }
                let snapshot = matches!(op, Op::Snapshot { .. });
                let name = self.name();
                let src = self.model[i].id;
                let info = if snapshot {
                    self.pool().snapshot(src, &name, BTreeMap::new()).unwrap()
                } else {
                    self.pool()
                        .clone_volume(src, &name, BTreeMap::new())
                        .unwrap()
                };
                let data = self.model[i].data.clone();
                assert_eq!(info.size, data.len() as u64);
                let kind = if snapshot {
                    VolumeKind::Snapshot
                } else {
                    VolumeKind::Clone
                };
                self.model
                    .push(ModelVolume::new(info.id, kind, Some(src), data));
                self.committed();
            }
            Op::Revert { vol, pick } => {
                let Some(i) = self.pick(vol) else { return };
                let id = self.model[i].id;
                let snaps: Vec<usize> = (0..self.model.len())
                    .filter(|&j| {
                        self.model[j].kind == VolumeKind::Snapshot
                            && self.model[j].origin == Some(id)
                    })
                    .collect();
                if snaps.is_empty() {
                    // Reverting to something that is not its snapshot is refused.
                    let other = self.model[(i + 1) % self.model.len()].id;
                    assert!(self.pool().revert(id, other).is_err());
                    return;
                }
                let s = snaps[pick % snaps.len()];
                let r = self.pool().revert(id, self.model[s].id);
                if self.model[i].kind == VolumeKind::Snapshot {
                    assert!(r.is_err());
                } else {
                    r.unwrap();
                    self.model[i].data = self.model[s].data.clone();
                    self.committed();
                }
            }
            Op::Resize {
                vol,
                chunks,
                extra_blocks,
            } => {
                let Some(i) = self.pick(vol) else { return };
                let v = &self.model[i];
                let size = chunks * CHUNK + extra_blocks * BLOCK;
                let shrink = size < v.data.len() as u64;
                if shrink {
                    assert!(
                        self.pool().resize(v.id, size, false).is_err(),
                        "shrink needs force"
                    );
                }
                let r = self.pool().resize(v.id, size, true);
                if v.kind == VolumeKind::Snapshot {
                    assert!(r.is_err());
                } else {
                    r.unwrap();
                    self.model[i].data.resize(size as usize, 0);
                    self.committed();
                }
            }
            Op::Delete { vol } => {
                let Some(i) = self.pick(vol) else { return };
                let v = self.model.remove(i);
                self.pool().delete_volume(v.id).unwrap();
                assert!(matches!(
                    self.pool().volume_info(v.id),
                    Err(PoolError::NoVolume(_))
                ));
                self.committed();
            }
            Op::Flush => {
                self.pool().flush().unwrap();
                self.committed();
            }
            Op::Crash => {
                self.reopen();
                let mut buf = Vec::new();
                for v in &mut self.model {
                    buf.resize(v.data.len(), 0xee);
                    self.pool.as_ref().unwrap().read(v.id, 0, &mut buf).unwrap();
                    for (b, block) in buf.chunks(BLOCK as usize).enumerate() {
                        let byte = block[0];
                        assert!(
                            block.iter().all(|&x| x == byte),
                            "torn block {b} of {}",
                            v.id
                        );
                        let allowed = v.committed[b * BLOCK as usize] == byte
                            || v.since.get(&(b as u64)).is_some_and(|s| s.contains(&byte));
                        assert!(
                            allowed,
                            "after a crash, block {b} of {} reads {byte:#x}, which was neither committed nor written since",
                            v.id
                        );
                    }
                    v.data.clone_from(&buf);
                }
                self.committed();
            }
            Op::Reimport => {
                self.pool().flush().unwrap();
                self.reopen();
            }
        }
    }

    /// Everything so far is committed (a flush or a structural change).
    fn committed(&mut self) {
        for v in &mut self.model {
            v.committed.clone_from(&v.data);
            v.since.clear();
        }
    }

    fn reopen(&mut self) {
        self.pool = None;
        self.pool = Some(
            ThinPool::import(&ImportOptions {
                kind: BackingKind::File,
                path: self.path.clone(),
                meta_dir: None,
                expected_id: None,
            })
            .unwrap(),
        );
    }

    fn verify(&self) {
        let pool = self.pool();
        assert_eq!(pool.list_volumes().len(), self.model.len());
        let mut buf = Vec::new();
        for v in &self.model {
            let info = pool.volume_info(v.id).unwrap();
            assert_eq!(info.size, v.data.len() as u64);
            assert_eq!(info.kind, v.kind);
            assert_eq!(
                info.allocated_bytes,
                info.exclusive_bytes + info.shared_bytes
            );
            buf.resize(v.data.len(), 0xee);
            pool.read(v.id, 0, &mut buf).unwrap();
            if buf != v.data {
                let first = buf.iter().zip(&v.data).position(|(a, b)| a != b).unwrap();
                panic!("volume {} differs from the model at byte {first}", v.id);
            }
        }
        let report = pool.check(false).unwrap();
        assert!(report.clean(), "{report:?}");
        let usage = pool.usage();
        assert_eq!(usage.free_chunks + usage.used_chunks, usage.total_chunks);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn pool_matches_model(ops in proptest::collection::vec(op(), 1..60)) {
        let mut h = Harness::new();
        for op in &ops {
            h.apply(op);
        }
        h.verify();
        // Everything survives a re-import, and deleting every volume frees every chunk.
        h.apply(&Op::Reimport);
        h.verify();
        while !h.model.is_empty() {
            h.apply(&Op::Delete { vol: 0 });
        }
        h.pool().flush().unwrap();
        let usage = h.pool().usage();
        prop_assert_eq!(usage.used_chunks, 0);
        prop_assert!(h.pool().check(false).unwrap().clean());
    }
}

/// The committed metadata can still share a chunk that the live metadata has stopped
/// sharing; overwriting it in place before the next commit would change the other
/// volume's flushed data if the process then crashed.
#[test]
fn chunk_unshared_since_commit_is_not_overwritten_in_place() {
    let mut h = Harness::new();
    h.apply(&Op::Create {
        chunks: 2,
        extra_blocks: 0,
    });
    h.apply(&Op::Write {
        vol: 0,
        block: 0,
        blocks: 128,
        byte: 0x11,
    });
    h.apply(&Op::Clone { vol: 0 });
    // Live: the volume copies chunk 0 away; the clone alone now maps the old chunk.
    h.apply(&Op::Write {
        vol: 0,
        block: 0,
        blocks: 1,
        byte: 0x22,
    });
    h.apply(&Op::Write {
        vol: 1,
        block: 0,
        blocks: 1,
        byte: 0x33,
    });
    h.apply(&Op::Crash);
    h.verify();
}

/// Chunks discarded after the last commit are still mapped in the committed metadata:
/// they are not reused before the next commit, so a full pool stays full until then.
#[test]
fn chunks_freed_since_commit_are_not_reused() {
    let mut h = Harness::with_chunks(16);
    h.apply(&Op::Create {
        chunks: 8,
        extra_blocks: 0,
    });
    h.apply(&Op::Create {
        chunks: 16,
        extra_blocks: 0,
    });
    h.apply(&Op::Write {
        vol: 0,
        block: 0,
        blocks: 8 * 128,
        byte: 0x44,
    });
    h.apply(&Op::Write {
        vol: 1,
        block: 0,
        blocks: 8 * 128,
        byte: 0x55,
    });
    h.apply(&Op::Flush);
    h.apply(&Op::Discard {
        vol: 0,
        block: 0,
        blocks: 8 * 128,
    });
    let vol1 = h.model[1].id;
    let at = 8 * CHUNK;
    assert!(matches!(
        h.pool().write(vol1, at, &[0x66; 512]),
        Err(PoolError::NoSpace)
    ));
    h.apply(&Op::Crash);
    h.verify();
    assert_eq!(
        h.model[0].data,
        vec![0x44; (8 * CHUNK) as usize],
        "the discard was never flushed"
    );
    h.apply(&Op::Discard {
        vol: 0,
        block: 0,
        blocks: 8 * 128,
    });
    h.apply(&Op::Flush);
    h.pool().write(vol1, at, &[0x66; 512]).unwrap();
}
