//! The pool's metadata in sled: the pool record, volumes, mapping-tree nodes and the space
//! map's reference-count pages. Everything a commit changes goes in one sled batch
//! (atomic), then sled is flushed (durable) before the commit is acknowledged.
//!
//! Keys:
//! - `meta` → [`PoolMeta`] (JSON)
//! - `v` + volume id (16 bytes) → [`VolumeRecord`] (JSON)
//! - `n` + node id (u64 big-endian) → a node, see [`encode_node`]
//! - `r` + page number (u64 big-endian) → [`REFS_PER_PAGE`] reference counts (u32 LE)
//! - `x` + export id (16 bytes) → an export record (JSON), owned by the service layer
//!
//! Node encoding, version 1: `[version=1][kind: 1 leaf, 2 interior][used: u16 LE]`
//! `[form: 1 dense, 2 sparse]` then, dense: 512 values; sparse: `count: u16 LE` and
//! `count × (index: u16 LE, value)`; values are u32 LE (chunks) or u64 LE (nodes).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::space::REFS_PER_PAGE;
use crate::tree::{ChunkId, Entries, FANOUT, NO_CHUNK, NO_NODE, Node, NodeId};

/// Format of the metadata records this build writes (`PoolMeta::format`).
pub const META_FORMAT: u32 = 1;
/// Formats this build reads. A store of an older format in the range is read as is and
/// carries this build's format from its next commit on; a newer one is refused, since
/// its records may mean what this build cannot know.
pub const META_FORMATS_ACCEPTED: std::ops::RangeInclusive<u32> = 1..=META_FORMAT;
const NODE_VERSION: u8 = 1;

#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("metadata store at {path} cannot be opened")]
    Open {
        path: PathBuf,
        #[source]
        source: sled::Error,
    },
    #[error("metadata directory {path} already holds a pool's metadata")]
    NotEmpty { path: PathBuf },
    #[error("metadata directory {path} holds no pool")]
    Missing { path: PathBuf },
    #[error("metadata store I/O failed")]
    Store(#[from] sled::Error),
    #[error("metadata store could not be made durable")]
    Sync(#[from] sled_sync::SyncError),
    #[error("the metadata at {path} has format {found}, this storaged reads {accepted:?}")]
    Version {
        path: PathBuf,
        found: u32,
        accepted: std::ops::RangeInclusive<u32>,
    },
    #[error("metadata record {key} is corrupt")]
    Record {
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("metadata node {id} is corrupt")]
    Node {
        id: NodeId,
        #[source]
        source: NodeError,
    },
    #[error("metadata key {key} is not a valid {what} key")]
    Key { what: &'static str, key: String },
    #[error("reference count page {page} holds {len} bytes, which do not fit {chunks} chunks")]
    RefPage {
        page: usize,
        len: usize,
        chunks: usize,
    },
}

/// What is wrong with an encoded tree node (see the module docs for the encoding).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeError {
    #[error("{len} bytes is too short for a node")]
    TooShort { len: usize },
    #[error("node version {found} is not supported (this build reads {NODE_VERSION})")]
    Version { found: u8 },
    #[error("unknown node kind {kind}")]
    Kind { kind: u8 },
    #[error("unknown node form {form}")]
    Form { form: u8 },
    #[error("dense body of {len} bytes")]
    DenseBody { len: usize },
    #[error("sparse node without a count")]
    SparseCount,
    #[error("sparse body of {len} bytes for {count} entries")]
    SparseBody { len: usize, count: usize },
    #[error("entry index {index} out of range")]
    Index { index: usize },
    #[error("header says {header} entries, body has {body}")]
    Used { header: u16, body: usize },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolMeta {
    pub format: u32,
    pub pool_id: Uuid,
    pub name: String,
    pub chunk_size: u32,
    pub chunk_count: u64,
    pub next_node_id: NodeId,
    pub created_at: u64,
    pub warning_threshold_percent: u32,
    pub commit_seq: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VolumeKind {
    Volume,
    Snapshot,
    Clone,
}

/// A volume, snapshot or clone as persisted (JSON, under `v` + its id). Its fields are
/// part of [`META_FORMAT`]: renaming or retyping one is a format change. The pool works
/// on its own runtime type and converts at import and at commit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub id: Uuid,
    pub name: String,
    pub kind: VolumeKind,
    pub origin: Option<Uuid>,
    pub size: u64,
    pub block_size: u32,
    pub root: NodeId,
    pub height: u8,
    /// Virtual chunks mapped (allocated) in this volume.
    pub mapped: u64,
    pub created_at: u64,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// Everything loaded at import.
#[derive(Debug)]
pub struct Loaded {
    pub meta: PoolMeta,
    pub volumes: Vec<VolumeRecord>,
    /// Nodes with `refs` = 0: the caller derives counts from the graph.
    pub nodes: HashMap<NodeId, Node>,
    /// Stored reference count per chunk.
    pub refs: Vec<u32>,
    /// Extra records (exports), by key suffix.
    pub exports: Vec<(Vec<u8>, Vec<u8>)>,
}

pub struct MetaStore {
    db: sled_sync::SyncedDb,
    path: PathBuf,
}

impl std::fmt::Debug for MetaStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetaStore")
            .field("path", &self.path)
            .finish()
    }
}

pub fn volume_key(id: &Uuid) -> Vec<u8> {
    let mut k = vec![b'v'];
    k.extend_from_slice(id.as_bytes());
    k
}

pub fn node_key(id: NodeId) -> [u8; 9] {
    let mut k = [b'n'; 9];
    k[1..].copy_from_slice(&id.to_be_bytes());
    k
}

pub fn page_key(page: u64) -> [u8; 9] {
    let mut k = [b'r'; 9];
    k[1..].copy_from_slice(&page.to_be_bytes());
    k
}

pub fn export_key(id: &Uuid) -> Vec<u8> {
    let mut k = vec![b'x'];
    k.extend_from_slice(id.as_bytes());
    k
}

impl MetaStore {
    /// The pool's raw sled database at `path` (the store opens it this way; fsck's tests
    /// damage it through it). sled's background threads can hold a dropped database for
    /// a moment, and its file lock with it: a re-open right after a close waits for them,
    /// briefly.
    pub fn open_db(path: &Path) -> Result<sled::Db, MetaError> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let result = sled::Config::new()
                .path(path)
                // Commits flush explicitly; a timer adds nothing but extra syncs.
                .flush_every_ms(None)
                .open();
            match result {
                Err(sled::Error::Io(e))
                    if e.to_string().contains("could not acquire lock")
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                other => {
                    return other.map_err(|source| MetaError::Open {
                        path: path.to_owned(),
                        source,
                    });
                }
            }
        }
    }

    /// Creates the store for a new pool; refuses a directory that already holds one.
    pub fn create(path: &Path, meta: &PoolMeta) -> Result<Self, MetaError> {
        if path.exists()
            && std::fs::read_dir(path)
                .map(|mut d| d.next().is_some())
                .unwrap_or(true)
        {
            return Err(MetaError::NotEmpty {
                path: path.to_owned(),
            });
        }
        let db = sled_sync::SyncedDb::new(Self::open_db(path)?, path)?;
        let store = MetaStore {
            db,
            path: path.to_owned(),
        };
        let mut batch = sled::Batch::default();
        batch.insert("meta", encode_json(meta));
        store.commit(batch)?;
        Ok(store)
    }

    pub fn open(path: &Path) -> Result<Self, MetaError> {
        if !path.exists() {
            return Err(MetaError::Missing {
                path: path.to_owned(),
            });
        }
        let db = Self::open_db(path)?;
        if !db.contains_key("meta")? {
            return Err(MetaError::Missing {
                path: path.to_owned(),
            });
        }
        Ok(MetaStore {
            db: sled_sync::SyncedDb::new(db, path)?,
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Applies a batch atomically and makes it durable.
    pub fn commit(&self, batch: sled::Batch) -> Result<(), MetaError> {
        self.db.db().apply_batch(batch)?;
        // sled's flush alone is not durable; see `sled_sync`.
        self.db.flush()?;
        Ok(())
    }

    pub fn size_on_disk(&self) -> u64 {
        self.db.db().size_on_disk().unwrap_or(0)
    }

    pub fn load(&self) -> Result<Loaded, MetaError> {
        let meta: PoolMeta = decode_json(
            "meta",
            &self
                .db
                .db()
                .get("meta")?
                .ok_or_else(|| MetaError::Missing {
                    path: self.path.clone(),
                })?,
        )?;
        if !META_FORMATS_ACCEPTED.contains(&meta.format) {
            return Err(MetaError::Version {
                path: self.path.clone(),
                found: meta.format,
                accepted: META_FORMATS_ACCEPTED,
            });
        }
        let mut volumes = Vec::new();
        for item in self.db.db().scan_prefix("v") {
            let (k, v) = item?;
            volumes.push(decode_json::<VolumeRecord>(&hex_key(&k), &v)?);
        }
        let mut nodes = HashMap::new();
        for item in self.db.db().scan_prefix("n") {
            let (k, v) = item?;
            let id = u64::from_be_bytes(k[1..].try_into().map_err(|_| MetaError::Key {
                what: "node",
                key: hex_key(&k),
            })?);
            nodes.insert(
                id,
                decode_node(&v).map_err(|source| MetaError::Node { id, source })?,
            );
        }
        let mut refs = vec![0u32; meta.chunk_count as usize];
        for item in self.db.db().scan_prefix("r") {
            let (k, v) = item?;
            let page = u64::from_be_bytes(k[1..].try_into().map_err(|_| MetaError::Key {
                what: "reference count page",
                key: hex_key(&k),
            })?) as usize;
            let start = page * REFS_PER_PAGE;
            if v.len() % 4 != 0 || start + v.len() / 4 > refs.len() {
                return Err(MetaError::RefPage {
                    page,
                    len: v.len(),
                    chunks: refs.len(),
                });
            }
            for (i, c) in v.chunks_exact(4).enumerate() {
                refs[start + i] = u32::from_le_bytes(c.try_into().expect("4 bytes"));
            }
        }
        let mut exports = Vec::new();
        for item in self.db.db().scan_prefix("x") {
            let (k, v) = item?;
            exports.push((k[1..].to_vec(), v.to_vec()));
        }
        Ok(Loaded {
            meta,
            volumes,
            nodes,
            refs,
            exports,
        })
    }
}

fn hex_key(k: &[u8]) -> String {
    k.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn encode_json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("metadata records always serialise")
}

pub fn decode_json<T: for<'a> Deserialize<'a>>(key: &str, bytes: &[u8]) -> Result<T, MetaError> {
    serde_json::from_slice(bytes).map_err(|source| MetaError::Record {
        key: key.to_owned(),
        source,
    })
}

/// Encodes a node, choosing the smaller of the dense and sparse forms.
pub fn encode_node(node: &Node) -> Vec<u8> {
    let (kind, width) = match node.entries {
        Entries::Leaf(_) => (1u8, 4usize),
        Entries::Interior(_) => (2u8, 8usize),
    };
    let used = usize::from(node.used);
    let dense = used * (2 + width) >= FANOUT * width;
    let mut out = Vec::with_capacity(
        8 + if dense {
            FANOUT * width
        } else {
            used * (2 + width)
        },
    );
    out.push(NODE_VERSION);
    out.push(kind);
    out.extend_from_slice(&node.used.to_le_bytes());
    out.push(if dense { 1 } else { 2 });
    if !dense {
        out.extend_from_slice(&node.used.to_le_bytes());
    }
    let mut put = |i: usize, value: u64, empty: bool| {
        if dense {
            out.extend_from_slice(&value.to_le_bytes()[..width]);
        } else if !empty {
            out.extend_from_slice(&(i as u16).to_le_bytes());
            out.extend_from_slice(&value.to_le_bytes()[..width]);
        }
    };
    match &node.entries {
        Entries::Leaf(e) => {
            for (i, &c) in e.iter().enumerate() {
                put(i, u64::from(c), c == NO_CHUNK);
            }
        }
        Entries::Interior(e) => {
            for (i, &n) in e.iter().enumerate() {
                put(i, n, n == NO_NODE);
            }
        }
    }
    out
}

/// Decodes a node with `refs` = 0. Errors say what is wrong, for fsck's report.
pub fn decode_node(b: &[u8]) -> Result<Node, NodeError> {
    if b.len() < 5 {
        return Err(NodeError::TooShort { len: b.len() });
    }
    if b[0] != NODE_VERSION {
        return Err(NodeError::Version { found: b[0] });
    }
    let leaf = match b[1] {
        1 => true,
        2 => false,
        kind => return Err(NodeError::Kind { kind }),
    };
    let width = if leaf { 4 } else { 8 };
    let used = u16::from_le_bytes([b[2], b[3]]);
    let value = |s: &[u8]| -> u64 {
        let mut v = [0u8; 8];
        v[..width].copy_from_slice(s);
        u64::from_le_bytes(v)
    };
    let mut values = vec![None; FANOUT];
    match b[4] {
        1 => {
            let body = &b[5..];
            if body.len() != FANOUT * width {
                return Err(NodeError::DenseBody { len: body.len() });
            }
            for (i, s) in body.chunks_exact(width).enumerate() {
                values[i] = Some(value(s));
            }
        }
        2 => {
            if b.len() < 7 {
                return Err(NodeError::SparseCount);
            }
            let count = usize::from(u16::from_le_bytes([b[5], b[6]]));
            let body = &b[7..];
            if body.len() != count * (2 + width) {
                return Err(NodeError::SparseBody {
                    len: body.len(),
                    count,
                });
            }
            for s in body.chunks_exact(2 + width) {
                let i = usize::from(u16::from_le_bytes([s[0], s[1]]));
                if i >= FANOUT {
                    return Err(NodeError::Index { index: i });
                }
                values[i] = Some(value(&s[2..]));
            }
        }
        form => return Err(NodeError::Form { form }),
    }
    let entries = if leaf {
        let mut e = Box::new([NO_CHUNK; FANOUT]);
        for (i, v) in values.iter().enumerate() {
            if let Some(v) = v {
                e[i] = *v as ChunkId;
            }
        }
        Entries::Leaf(e)
    } else {
        let mut e = Box::new([NO_NODE; FANOUT]);
        for (i, v) in values.iter().enumerate() {
            if let Some(v) = v {
                e[i] = *v;
            }
        }
        Entries::Interior(e)
    };
    let node = Node {
        refs: 0,
        used,
        entries,
    };
    let actual = match &node.entries {
        Entries::Leaf(e) => e.iter().filter(|&&c| c != NO_CHUNK).count(),
        Entries::Interior(e) => e.iter().filter(|&&n| n != NO_NODE).count(),
    };
    if actual != usize::from(used) {
        return Err(NodeError::Used {
            header: used,
            body: actual,
        });
    }
    Ok(node)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(entries: &[(usize, ChunkId)]) -> Node {
        let mut e = Box::new([NO_CHUNK; FANOUT]);
        for &(i, c) in entries {
            e[i] = c;
        }
        Node {
            refs: 0,
            used: entries.len() as u16,
            entries: Entries::Leaf(e),
        }
    }

    #[test]
    fn nodes_round_trip_sparse_and_dense() {
        let sparse = leaf(&[(0, 5), (511, 0), (7, 1 << 30)]);
        let bytes = encode_node(&sparse);
        assert_eq!(bytes[4], 2);
        assert_eq!(decode_node(&bytes).unwrap(), sparse);

        let all: Vec<(usize, ChunkId)> = (0..FANOUT).map(|i| (i, i as ChunkId * 3)).collect();
        let dense = leaf(&all);
        let bytes = encode_node(&dense);
        assert_eq!(bytes[4], 1);
        assert_eq!(bytes.len(), 5 + FANOUT * 4);
        assert_eq!(decode_node(&bytes).unwrap(), dense);

        let mut children = Box::new([NO_NODE; FANOUT]);
        children[3] = 99;
        let interior = Node {
            refs: 0,
            used: 1,
            entries: Entries::Interior(children),
        };
        assert_eq!(decode_node(&encode_node(&interior)).unwrap(), interior);
    }

    #[test]
    fn corrupt_nodes_say_what_is_wrong() {
        let good = encode_node(&leaf(&[(1, 2)]));
        assert_eq!(decode_node(&good[..3]), Err(NodeError::TooShort { len: 3 }));
        let mut b = good.clone();
        b[0] = 9;
        assert_eq!(decode_node(&b), Err(NodeError::Version { found: 9 }));
        let mut b = good.clone();
        b[1] = 7;
        assert_eq!(decode_node(&b), Err(NodeError::Kind { kind: 7 }));
        let mut b = good.clone();
        b[4] = 3;
        assert_eq!(decode_node(&b), Err(NodeError::Form { form: 3 }));
        let mut b = good;
        b[2] = 2;
        assert_eq!(decode_node(&b), Err(NodeError::Used { header: 2, body: 1 }));
    }

    #[test]
    fn corrupt_nodes_are_errors_not_panics() {
        let good = encode_node(&leaf(&[(1, 2)]));
        for cut in 0..good.len() {
            assert!(decode_node(&good[..cut]).is_err(), "cut at {cut}");
        }
        let mut bad_count = good.clone();
        bad_count[2] = 9;
        assert!(decode_node(&bad_count).is_err());
        let mut bad_index = good;
        bad_index[7] = 0xff;
        bad_index[8] = 0xff;
        assert!(decode_node(&bad_index).is_err());
    }
}
