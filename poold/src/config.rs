//! poold's configuration file (TOML). Every field is optional; the command line wins.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This member's Raft id (non-zero, unique in the pool).
    pub member_id: Option<u64>,
    /// gRPC address of `PoolService` and of the peer transport.
    pub listen: Option<SocketAddr>,
    /// Raft log, hard state and snapshots.
    pub data_dir: Option<PathBuf>,
    /// The initial members: id → address. Only read when the data directory is empty.
    /// A joining member lists the existing ones here, to reach them before its snapshot.
    #[serde(default)]
    pub initial_members: BTreeMap<u64, SocketAddr>,
    /// Name of the pool: members refuse Raft messages from another pool.
    pub pool_id: Option<String>,
    /// This member's TLS directory: CA bundle, certificate and key (see `poold --help`).
    pub tls_dir: Option<PathBuf>,
    /// Start empty and wait to be added (AddMember) to an existing pool.
    pub join: Option<bool>,
    /// Raft tick in milliseconds (elections after 10–20 ticks, heartbeats every 2).
    pub tick_ms: Option<u64>,
    /// Snapshot the state and compact the log every this many entries.
    pub snapshot_interval: Option<u64>,
    /// Entries kept behind a snapshot for slightly slow followers.
    pub snapshot_keep_entries: Option<u64>,
    /// Threads serving gRPC (clients, hosts and the peer transport); the Raft log, fsync
    /// and state machine have their own thread. Default 1; see `poold --help`.
    pub api_threads: Option<usize>,
    /// Directories under which backup schedules may have this member write (`--backup-root`).
    #[serde(default)]
    pub backup_roots: Vec<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is not valid")]
    Parse {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })
    }

    pub fn parse(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_members_and_rejects_unknown_fields() {
        let cfg = Config::parse(
            "member_id = 2\n[initial_members]\n1 = \"127.0.0.1:7101\"\n2 = \"127.0.0.1:7102\"\n",
        )
        .unwrap();
        assert_eq!(cfg.member_id, Some(2));
        assert_eq!(cfg.initial_members.len(), 2);
        assert_eq!(cfg.api_threads, None);
        assert_eq!(
            Config::parse("api_threads = 4\n").unwrap().api_threads,
            Some(4)
        );
        assert!(Config::parse("api_threads = -1\n").is_err());
        assert!(Config::parse("member = 2").is_err());
    }
}
