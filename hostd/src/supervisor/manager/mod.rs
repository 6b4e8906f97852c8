//! The daemon's side: the table of VMs this host knows, one process per running VM, and
//! the lifecycle operations the gRPC service calls.
//!
//! Each running VM is a `hostd vmm` process with its directory under
//! `<run_dir>/vms/<id>/` (its record, control socket, console log and own log). The
//! daemon talks to it over the control socket, keeps the console history for streams,
//! and notices when the process ends, however it ends. VM processes do not depend on the
//! daemon: when `hostd` restarts it finds them again through their directories.
//!
//! # Layout
//! This file holds the [`Manager`], its configuration and error, and what its parts
//! share; its methods live by concern:
//! - `entry`: one VM as the daemon knows it, and commands to its process.
//! - `process`: spawning a VM process, reading its events, reaping and killing it,
//!   finding it again after a daemon restart.
//! - `lifecycle`: create, start, pause, resume, reboot, shutdown, destroy.
//! - `status`: reading VMs, their metrics and the host's memory left for them.
//! - `console`: console history, input and log.
//! - `disks`: attaching and detaching disks.
//! - `migration`: receiving, sending and cancelling live migrations.
//! - `save`: saving a VM into a state volume, and restoring one from it.
//! - `nets`: plugging and unplugging the taps of VMs' network interfaces.

mod console;
mod disks;
mod entry;
mod lifecycle;
mod migration;
mod nets;
mod process;
mod save;
mod status;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use proto::host::{PowerState, StopReason, VmConfig};

pub use migration::migration_ended;

use super::protocol::VmState;
use super::spec::SpecError;
use entry::Entry;

/// Shutdown waits this much past the guest's own timeout for the process to end.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// How long a call to a VM still arriving here waits for it to run.
const ARRIVAL_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct ManagerConfig {
    /// Where VM directories live.
    pub run_dir: PathBuf,
    /// The program VM processes run: `hostd-vmm` (with no `vmm_args`), or `hostd` with
    /// `vmm_args = ["vmm"]`. Either is then given `--dir <vm dir>`.
    pub vmm_binary: PathBuf,
    pub vmm_args: Vec<String>,
    /// Memory kept back for the host itself.
    pub reserved_memory_bytes: u64,
    /// VM processes die with the daemon (for tests); otherwise they outlive it and the
    /// next daemon finds them again.
    pub tie_vms_to_daemon: bool,
    /// The iSCSI name VM processes log in to targets with (empty: no iSCSI disks).
    pub initiator_iqn: String,
    /// Where VMs' kernels, initrds and file disks may come from.
    pub image_dirs: crate::supervisor::spec::ImageDirs,
    /// The host's TLS directory: VM processes read it for the migration stream.
    pub tls_dir: PathBuf,
    /// This host's side of the pool's networks, in the daemon's network namespace;
    /// `None`: VMs' interfaces must name taps made by someone else.
    pub networks: Option<crate::network::HostNetConfig>,
    /// The busy-poll ceiling of VIFs whose config gives none, in µs (0: off); `None`:
    /// the VMM's default.
    pub vif_busy_poll_us: Option<u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    #[error("no VM {0}")]
    NotFound(String),
    #[error("VM {id} already exists")]
    AlreadyExists { id: String },
    #[error("VM id {0:?} must be 1 to 64 characters of [A-Za-z0-9._-]")]
    BadId(String),
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("VM {id} is {state:?}; {what} needs it {need}")]
    WrongState {
        id: String,
        state: PowerState,
        what: &'static str,
        need: &'static str,
    },
    #[error("VM {id} needs {need} bytes of memory; this host can give {available}")]
    NoMemory {
        id: String,
        need: u64,
        available: u64,
    },
    #[error("disk {disk:?} is {what} VM {id}")]
    Disk {
        id: String,
        disk: String,
        what: &'static str,
    },
    #[error("cannot prepare {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the VM process for {id}")]
    Spawn {
        id: String,
        #[source]
        source: std::io::Error,
    },
    #[error("VM {id} did not start: {detail}")]
    StartFailed { id: String, detail: String },
    #[error("VM {id}: {detail}")]
    Command { id: String, detail: String },
    #[error(
        "VM {id} has network interfaces for this host to plug, and this host has no host \
         networking configured"
    )]
    NoHostNetworks { id: String },
    #[error("VM {id}: network interface {nic:?}")]
    Network {
        id: String,
        nic: String,
        #[source]
        source: Box<crate::network::NetworkError>,
    },
    #[error("this host has no host networking configured")]
    HostNetworkingOff,
    #[error("network {network:?}: setting its VXLAN peers")]
    NetworkPeers {
        network: String,
        #[source]
        source: Box<crate::network::NetworkError>,
    },
    #[error("setting up host networking")]
    HostNetworks(#[source] Box<crate::network::NetworkError>),
    #[error("VM {id}'s process is not answering ({what})")]
    Unresponsive { id: String, what: String },
}

pub struct Manager {
    cfg: ManagerConfig,
    networks: Option<Arc<crate::network::HostNetworks>>,
    vms: tokio::sync::Mutex<BTreeMap<String, Arc<Entry>>>,
}

fn power(state: &VmState) -> PowerState {
    PowerState::try_from(state.power).unwrap_or(PowerState::Unspecified)
}

/// How a VM process's VM comes to run.
#[derive(Debug, Clone)]
enum Arrival {
    Boot,
    /// By live migration, from the source it waits for.
    Migration(super::protocol::IncomingRecord),
    /// From the state saved in this volume.
    Restore(proto::host::IscsiDisk),
}

fn is_live(p: PowerState) -> bool {
    matches!(
        p,
        PowerState::Running | PowerState::Paused | PowerState::Migrating
    )
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        && id != "."
        && id != ".."
}

impl Manager {
    /// A manager over `cfg.run_dir`; VM processes left by an earlier daemon are found
    /// again (their directories name them), the stale directories of dead ones removed,
    /// and the network devices of VMs it does not know.
    pub async fn new(cfg: ManagerConfig) -> Result<Arc<Self>, ManagerError> {
        let vms_dir = cfg.run_dir.join("vms");
        // VM records hold the CHAP secrets of their disks: 0600 files in 0700 directories.
        {
            use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&vms_dir)
                .and_then(|()| {
                    std::fs::set_permissions(&vms_dir, std::fs::Permissions::from_mode(0o700))
                })
                .map_err(|source| ManagerError::Io {
                    path: vms_dir.clone(),
                    source,
                })?;
        }
        let networks = match &cfg.networks {
            Some(c) => Some(Arc::new(
                crate::network::HostNetworks::new(c.clone())
                    .map_err(|e| ManagerError::HostNetworks(Box::new(e)))?,
            )),
            None => None,
        };
        let mgr = Arc::new(Self {
            cfg,
            networks,
            vms: tokio::sync::Mutex::new(BTreeMap::new()),
        });
        mgr.reattach().await;
        mgr.cleanup_stale_nets().await;
        Ok(mgr)
    }

    fn vm_dir(&self, id: &str) -> PathBuf {
        self.cfg.run_dir.join("vms").join(id)
    }

    async fn get(&self, id: &str) -> Result<Arc<Entry>, ManagerError> {
        self.vms
            .lock()
            .await
            .get(id)
            .cloned()
            .ok_or_else(|| ManagerError::NotFound(id.to_owned()))
    }

    /// Memory the host can still give a VM: its total, less the reserve and what the
    /// live VMs other than `except` hold.
    fn memory_free(&self, vms: &BTreeMap<String, Arc<Entry>>, except: &str) -> u64 {
        let in_use: u64 = vms
            .values()
            .filter(|e| e.id != except && is_live(e.power()))
            .map(|e| e.lock().config.memory_bytes)
            .sum();
        crate::host::meminfo()
            .total_bytes
            .saturating_sub(self.cfg.reserved_memory_bytes)
            .saturating_sub(in_use)
    }

    /// Refuses VM `id` if it needs more memory than the host can still give it.
    fn admit_memory(
        &self,
        vms: &BTreeMap<String, Arc<Entry>>,
        id: &str,
        need: u64,
    ) -> Result<(), ManagerError> {
        let available = self.memory_free(vms, id);
        if need > available {
            return Err(ManagerError::NoMemory {
                id: id.into(),
                need,
                available,
            });
        }
        Ok(())
    }

    /// Takes VM `id`'s place for a VM arriving already running (by migration, from a
    /// saved state): a stopped VM of that id is replaced, a live one refused, and the
    /// memory must be there. The arriving VM starts with `power` and a fresh directory.
    async fn claim_slot(
        &self,
        id: &str,
        config: &VmConfig,
        power: PowerState,
        what: &'static str,
    ) -> Result<Arc<Entry>, ManagerError> {
        if !valid_id(id) {
            return Err(ManagerError::BadId(id.into()));
        }
        let entry = Entry::new(
            id.to_owned(),
            config.clone(),
            VmState {
                power: power as i32,
                last_stop: StopReason::None as i32,
                ..Default::default()
            },
        );
        {
            let mut vms = self.vms.lock().await;
            if let Some(old) = vms.get(id) {
                let state = old.power();
                if is_live(state) {
                    return Err(ManagerError::WrongState {
                        id: id.into(),
                        state,
                        what,
                        need: "absent or stopped here",
                    });
                }
            }
            self.admit_memory(&vms, id, config.memory_bytes)?;
            vms.insert(id.to_owned(), entry.clone());
        }
        let _ = std::fs::remove_dir_all(self.vm_dir(id));
        Ok(entry)
    }

    /// Gives back a slot `claim_slot` took for a VM that never ran: the entry (unless
    /// another has replaced it since) and its directory.
    async fn release_slot(&self, entry: &Arc<Entry>) {
        let mut vms = self.vms.lock().await;
        if vms.get(&entry.id).is_some_and(|e| Arc::ptr_eq(e, entry)) {
            vms.remove(&entry.id);
        }
        let _ = std::fs::remove_dir_all(self.vm_dir(&entry.id));
    }

    /// Ok when VM `entry`'s state is `ok`, else a WrongState error naming `what` was
    /// asked and the state it `need`s. A VM still arriving here (by migration or from a
    /// saved state) reads Migrating until its process says it runs, which can come a
    /// moment after the coordinator heard the move was done and sent its next call: that
    /// call waits for the arrival (at most [`ARRIVAL_WAIT`]) rather than fail.
    async fn require(
        entry: &Entry,
        what: &'static str,
        need: &'static str,
        ok: impl Fn(PowerState) -> bool,
    ) -> Result<(), ManagerError> {
        let mut state = entry.power();
        if !ok(state) && entry.arriving() {
            entry
                .wait_until(ARRIVAL_WAIT, |s| power(s) != PowerState::Migrating)
                .await;
            state = entry.power();
        }
        if ok(state) {
            Ok(())
        } else {
            Err(ManagerError::WrongState {
                id: entry.id.clone(),
                state,
                what,
                need,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_safe_as_directory_names() {
        assert!(valid_id("vm-1.a_b"));
        assert!(valid_id(&uuid::Uuid::new_v4().to_string()));
        for bad in ["", ".", "..", "a/b", "a b", &"x".repeat(65)] {
            assert!(!valid_id(bad), "{bad:?}");
        }
    }
}
