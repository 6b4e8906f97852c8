//! hostd's configuration file (TOML). Every field is optional; the command line wins.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// gRPC address of the `HostService`.
    pub listen: Option<SocketAddr>,
    /// Address of the dedicated live-migration stream.
    pub migration_listen: Option<SocketAddr>,
    /// Where VM consoles' logs and runtime sockets go.
    pub run_dir: Option<PathBuf>,
    /// The iSCSI initiator name this host logs in with.
    pub initiator_iqn: Option<String>,
    /// Memory kept back for the host itself, in bytes.
    pub reserved_memory_bytes: Option<u64>,
    /// This host's id in the pool (default: the hostname).
    pub host_id: Option<String>,
    /// Stop VMs when the daemon exits (VM processes die with it). By default VMs keep
    /// running and the next daemon finds them again.
    pub tie_vms_to_daemon: Option<bool>,
    /// The TLS directory: the pool's CA bundle, this host's certificate and key.
    pub tls_dir: Option<PathBuf>,
    /// Where VMs' kernels, initrds and file disks may come from (default
    /// /var/lib/hostd/images); any other host path is refused.
    #[serde(default)]
    pub image_dirs: Vec<PathBuf>,
    /// Membership of a pool: without this section the host runs on its own.
    pub pool: Option<PoolConfig>,
    /// The underlay address private networks' VXLAN traffic leaves from and the other
    /// hosts send to (default: the address this host advertises to the pool).
    pub vxlan_local: Option<std::net::IpAddr>,
    /// The VXLAN UDP port, the same on every host of the pool (default 4789).
    pub vxlan_port: Option<u16>,
    /// How long (µs, at most 1000) a VIF's worker may busy-poll after traffic before it
    /// sleeps, for VIFs whose config gives none: lower round trips for host CPU
    /// (default 50; 0: never, for hosts packed with VMs).
    pub vif_busy_poll_us: Option<u32>,
}

/// The `[pool]` section: where the coordinators are and how this host is known to them.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// Coordinator members (`host:port`), any of them; heartbeats reach the leader through
    /// whichever answers.
    #[serde(default)]
    pub coordinators: Vec<String>,
    /// The `HostService` address the pool reaches this host at (default: `listen`, when
    /// that is not a wildcard address).
    pub advertise: Option<String>,
    /// The name this host joins under (default: `host_id`, else the hostname).
    pub name: Option<String>,
    /// Join the pool when it does not know this host's address yet (default true).
    pub join: Option<bool>,
    /// Heartbeat interval in milliseconds until the pool asks for another (default 1000).
    pub heartbeat_interval_ms: Option<u64>,
    /// Token sent as `authorization: Bearer` on the pool calls that need a user (looking up
    /// and joining); heartbeats need none.
    pub token: Option<String>,
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
    /// The configuration with its secrets (the pool token) blanked, for logging.
    pub fn redacted(&self) -> Config {
        let mut c = self.clone();
        if let Some(pool) = &mut c.pool
            && pool.token.is_some()
        {
            pool.token = Some("<redacted>".into());
        }
        c
    }

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
    fn parses_known_fields_and_rejects_unknown_ones() {
        let cfg =
            Config::parse("listen = \"127.0.0.11:7001\"\ninitiator_iqn = \"iqn.2026-11.lab:h1\"\n")
                .unwrap();
        assert_eq!(cfg.listen, Some("127.0.0.11:7001".parse().unwrap()));
        assert_eq!(cfg.initiator_iqn.as_deref(), Some("iqn.2026-11.lab:h1"));
        assert!(Config::parse("listne = \"127.0.0.1:1\"").is_err());
    }

    #[test]
    fn pool_section() {
        let cfg = Config::parse(
            "[pool]\ncoordinators = [\"127.0.0.1:7101\", \"127.0.0.1:7102\"]\n\
             advertise = \"127.0.0.11:7000\"\nheartbeat_interval_ms = 500\n",
        )
        .unwrap();
        let pool = cfg.pool.unwrap();
        assert_eq!(pool.coordinators.len(), 2);
        assert_eq!(pool.advertise.as_deref(), Some("127.0.0.11:7000"));
        assert_eq!(pool.heartbeat_interval_ms, Some(500));
        assert_eq!(pool.join, None);
        assert!(Config::parse("[pool]\ncoordinator = []\n").is_err());
        assert_eq!(Config::parse("").unwrap().pool, None);
    }
}
