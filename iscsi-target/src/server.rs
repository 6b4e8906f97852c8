//! The target server: the management API `storaged` calls (targets, LUNs, grants,
//! revokes, sessions) and `run(listener, shutdown)`, which serves connections until the
//! shutdown future completes.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinSet;

use crate::config::{InitiatorAccess, ServerOptions, TargetConfig};
use crate::lun::{Lun, LunConfig, push_ua};
use crate::pr::{MemoryPrStore, PrStore, PrStoreError};
use crate::scsi::Fabric;
use crate::scsi::sense::Sense;
use crate::session::{SessionHandle, SessionInfo, wait_tasks};

/// What the management API can refuse.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("target {iqn} already exists")]
    TargetExists { iqn: String },
    #[error("no target {iqn}")]
    NoSuchTarget { iqn: String },
    #[error("{name:?} is not a valid iSCSI name")]
    BadName { name: String },
    #[error("LUN {lun} of target {iqn} already exists")]
    LunExists { iqn: String, lun: u16 },
    #[error("no LUN {lun} in target {iqn}")]
    NoSuchLun { iqn: String, lun: u16 },
    #[error("LUN {lun} is out of range (0..16384)")]
    BadLun { lun: u16 },
    #[error("LUN {lun}: the device's block size {block_size} is not 512 or 4096")]
    BadBlockSize { lun: u16, block_size: u32 },
    #[error("no grant for initiator {initiator} on target {iqn}")]
    NoSuchGrant { iqn: String, initiator: String },
    #[error("mutual CHAP for {initiator} needs CHAP credentials too")]
    MutualWithoutChap { initiator: String },
    #[error("loading persistent reservations of LUN {lun}")]
    Reservations {
        lun: u16,
        #[source]
        source: PrStoreError,
    },
}

/// A login refused because its initiator has as many sessions as it may.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("initiator {initiator} already has {max} sessions, the most it may have")]
pub(crate) struct TooManyConnections {
    pub initiator: String,
    pub max: usize,
}

/// Who may log in to a target.
#[derive(Debug, Default)]
pub(crate) struct Acl {
    pub allow_any: bool,
    pub grants: BTreeMap<String, InitiatorAccess>,
    /// Initiators revoked while `allow_any` is set: refused even so.
    pub revoked: std::collections::BTreeSet<String>,
}

impl Acl {
    /// The access an initiator has: `None` when it may not log in.
    pub fn access(&self, initiator: &str) -> Option<InitiatorAccess> {
        if let Some(g) = self.grants.get(initiator) {
            return Some(g.clone());
        }
        (self.allow_any && !self.revoked.contains(initiator))
            .then(|| InitiatorAccess::open(initiator))
    }
}

/// A target as the server holds it.
#[derive(Debug)]
pub(crate) struct TargetEntry {
    pub iqn: String,
    pub alias: Option<String>,
    pub luns: RwLock<BTreeMap<u16, Arc<Lun>>>,
    pub acl: RwLock<Acl>,
}

pub(crate) struct Inner {
    pub options: ServerOptions,
    pub targets: RwLock<BTreeMap<String, Arc<TargetEntry>>>,
    pub sessions: Mutex<HashMap<u64, Arc<SessionHandle>>>,
    pub pr_store: Arc<dyn PrStore>,
    /// Becomes true when `run`'s shutdown future completes.
    pub stopping: tokio::sync::watch::Sender<bool>,
    /// Discovery sessions by initiator name (normal ones are in `sessions`). Locked after
    /// `sessions` when both are held.
    discovery: Mutex<HashMap<String, usize>>,
    next_session: AtomicU64,
    next_tsih: AtomicU16,
}

/// A discovery session's place in the per-initiator count; dropping it gives it back.
pub(crate) struct DiscoverySlot {
    inner: Arc<Inner>,
    initiator: String,
}

impl Drop for DiscoverySlot {
    fn drop(&mut self) {
        let mut d = self
            .inner
            .discovery
            .lock()
            .expect("discovery lock poisoned");
        if let Some(n) = d.get_mut(&self.initiator) {
            *n -= 1;
            if *n == 0 {
                d.remove(&self.initiator);
            }
        }
    }
}

impl Inner {
    pub fn target(&self, iqn: &str) -> Option<Arc<TargetEntry>> {
        self.targets
            .read()
            .expect("targets lock poisoned")
            .get(iqn)
            .cloned()
    }

    pub fn sessions_of(&self, target: &str) -> Vec<Arc<SessionHandle>> {
        self.sessions
            .lock()
            .expect("sessions lock poisoned")
            .values()
            .filter(|s| s.target == target)
            .cloned()
            .collect()
    }

    pub fn new_session_id(&self) -> u64 {
        self.next_session.fetch_add(1, Ordering::Relaxed)
    }

    /// A TSIH no live session uses (never 0).
    pub fn new_tsih(&self) -> u16 {
        let sessions = self.sessions.lock().expect("sessions lock poisoned");
        loop {
            let t = self.next_tsih.fetch_add(1, Ordering::Relaxed);
            if t != 0 && !sessions.values().any(|s| s.tsih == t) {
                return t;
            }
        }
    }

    /// Registers a normal session unless its initiator already has
    /// `max_connections_per_initiator` sessions (normal and discovery); counted and
    /// inserted under one lock, so racing logins cannot both take the last place.
    pub fn register(&self, s: Arc<SessionHandle>) -> Result<(), TooManyConnections> {
        let mut sessions = self.sessions.lock().expect("sessions lock poisoned");
        self.check_room(&sessions, &s.initiator)?;
        sessions.insert(s.id, s);
        Ok(())
    }

    /// Takes a place for a discovery session of `initiator`, under the same limit.
    pub fn enter_discovery(
        self: &Arc<Self>,
        initiator: &str,
    ) -> Result<DiscoverySlot, TooManyConnections> {
        let sessions = self.sessions.lock().expect("sessions lock poisoned");
        self.check_room(&sessions, initiator)?;
        *self
            .discovery
            .lock()
            .expect("discovery lock poisoned")
            .entry(initiator.to_owned())
            .or_default() += 1;
        Ok(DiscoverySlot {
            inner: self.clone(),
            initiator: initiator.to_owned(),
        })
    }

    fn check_room(
        &self,
        sessions: &HashMap<u64, Arc<SessionHandle>>,
        initiator: &str,
    ) -> Result<(), TooManyConnections> {
        let normal = sessions
            .values()
            .filter(|s| s.initiator == initiator)
            .count();
        let discovery = self
            .discovery
            .lock()
            .expect("discovery lock poisoned")
            .get(initiator)
            .copied()
            .unwrap_or(0);
        let max = self.options.max_connections_per_initiator;
        if normal + discovery >= max {
            return Err(TooManyConnections {
                initiator: initiator.to_owned(),
                max,
            });
        }
        Ok(())
    }

    pub fn unregister(&self, id: u64) {
        self.sessions
            .lock()
            .expect("sessions lock poisoned")
            .remove(&id);
    }
}

/// The [`Fabric`] one target's commands see.
pub(crate) struct TargetFabric {
    pub inner: Arc<Inner>,
    pub target: Arc<TargetEntry>,
}

impl Fabric for TargetFabric {
    fn luns(&self) -> Vec<Arc<Lun>> {
        self.target
            .luns
            .read()
            .expect("LUN map poisoned")
            .values()
            .cloned()
            .collect()
    }

    fn nexuses(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .inner
            .sessions_of(&self.target.iqn)
            .iter()
            .map(|s| s.nexus.clone())
            .collect();
        v.sort();
        v.dedup();
        v
    }

    fn abort_tasks_of(&self, lun: u16, nexus: &str) {
        for s in self.inner.sessions_of(&self.target.iqn) {
            if s.nexus == nexus {
                s.abort_tasks(Some(lun));
            }
        }
    }

    fn target_name(&self) -> String {
        self.target.iqn.clone()
    }

    fn portal_group(&self) -> u16 {
        self.inner.options.portal_group
    }
}

/// Checks the form of an iSCSI name (RFC 3720 §3.2.6): `iqn.`, `eui.` or `naa.`, no spaces,
/// at most 223 bytes.
pub fn valid_iscsi_name(name: &str) -> bool {
    let lower_ok = name
        .bytes()
        .all(|c| c.is_ascii_alphanumeric() || b".-:".contains(&c));
    name.len() <= 223
        && lower_ok
        && (name.starts_with("iqn.") || name.starts_with("eui.") || name.starts_with("naa."))
}

/// The iSCSI target server. Cheap to clone; all clones manage the same targets.
#[derive(Clone)]
pub struct TargetServer {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for TargetServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TargetServer").finish_non_exhaustive()
    }
}

impl TargetServer {
    /// A server whose persistent reservations are kept in `pr_store`.
    pub fn new(options: ServerOptions, pr_store: Arc<dyn PrStore>) -> Self {
        Self {
            inner: Arc::new(Inner {
                options,
                targets: RwLock::new(BTreeMap::new()),
                sessions: Mutex::new(HashMap::new()),
                pr_store,
                stopping: tokio::sync::watch::channel(false).0,
                discovery: Mutex::new(HashMap::new()),
                next_session: AtomicU64::new(1),
                next_tsih: AtomicU16::new(1),
            }),
        }
    }

    /// A server that forgets reservations on restart (tests, labs).
    pub fn in_memory(options: ServerOptions) -> Self {
        Self::new(options, Arc::new(MemoryPrStore::default()))
    }

    fn check_lun(cfg: &LunConfig) -> Result<(), ConfigError> {
        if cfg.id >= 16384 {
            return Err(ConfigError::BadLun { lun: cfg.id });
        }
        let bs = cfg.device.block_size();
        if bs != 512 && bs != 4096 {
            return Err(ConfigError::BadBlockSize {
                lun: cfg.id,
                block_size: bs,
            });
        }
        Ok(())
    }

    fn check_access(a: &InitiatorAccess) -> Result<(), ConfigError> {
        if !valid_iscsi_name(&a.name) {
            return Err(ConfigError::BadName {
                name: a.name.clone(),
            });
        }
        if a.mutual_chap.is_some() && a.chap.is_none() {
            return Err(ConfigError::MutualWithoutChap {
                initiator: a.name.clone(),
            });
        }
        Ok(())
    }

    /// Creates a target. Nothing changes when any part of the config is invalid.
    pub fn add_target(&self, cfg: TargetConfig) -> Result<(), ConfigError> {
        if !valid_iscsi_name(&cfg.iqn) {
            return Err(ConfigError::BadName { name: cfg.iqn });
        }
        let mut luns = BTreeMap::new();
        for l in cfg.luns {
            Self::check_lun(&l)?;
            let id = l.id;
            if luns.contains_key(&id) {
                return Err(ConfigError::LunExists {
                    iqn: cfg.iqn.clone(),
                    lun: id,
                });
            }
            let lun = Lun::new(l, self.inner.pr_store.clone())
                .map_err(|source| ConfigError::Reservations { lun: id, source })?;
            luns.insert(id, Arc::new(lun));
        }
        let mut acl = Acl {
            allow_any: cfg.allow_any_initiator,
            ..Acl::default()
        };
        for a in cfg.initiators {
            Self::check_access(&a)?;
            acl.grants.insert(a.name.clone(), a);
        }
        let mut targets = self.inner.targets.write().expect("targets lock poisoned");
        if targets.contains_key(&cfg.iqn) {
            return Err(ConfigError::TargetExists { iqn: cfg.iqn });
        }
        targets.insert(
            cfg.iqn.clone(),
            Arc::new(TargetEntry {
                iqn: cfg.iqn,
                alias: cfg.alias,
                luns: RwLock::new(luns),
                acl: RwLock::new(acl),
            }),
        );
        Ok(())
    }

    /// Removes a target: its sessions are dropped and their tasks finished before this
    /// returns.
    pub async fn remove_target(&self, iqn: &str) -> Result<(), ConfigError> {
        let removed = self
            .inner
            .targets
            .write()
            .expect("targets lock poisoned")
            .remove(iqn);
        if removed.is_none() {
            return Err(ConfigError::NoSuchTarget { iqn: iqn.into() });
        }
        self.drop_sessions(|s| s.target == iqn).await;
        Ok(())
    }

    fn entry(&self, iqn: &str) -> Result<Arc<TargetEntry>, ConfigError> {
        self.inner
            .target(iqn)
            .ok_or_else(|| ConfigError::NoSuchTarget { iqn: iqn.into() })
    }

    /// Adds a LUN to a target; initiators logged in learn of it through a unit attention.
    pub fn add_lun(&self, iqn: &str, cfg: LunConfig) -> Result<(), ConfigError> {
        Self::check_lun(&cfg)?;
        let t = self.entry(iqn)?;
        let id = cfg.id;
        let lun = Lun::new(cfg, self.inner.pr_store.clone())
            .map_err(|source| ConfigError::Reservations { lun: id, source })?;
        {
            let mut luns = t.luns.write().expect("LUN map poisoned");
            if luns.contains_key(&id) {
                return Err(ConfigError::LunExists {
                    iqn: iqn.into(),
                    lun: id,
                });
            }
            luns.insert(id, Arc::new(lun));
        }
        self.luns_changed(&t);
        Ok(())
    }

    /// Removes a LUN; its tasks in flight finish before this returns.
    pub async fn remove_lun(&self, iqn: &str, lun: u16) -> Result<(), ConfigError> {
        let t = self.entry(iqn)?;
        let removed = t.luns.write().expect("LUN map poisoned").remove(&lun);
        if removed.is_none() {
            return Err(ConfigError::NoSuchLun {
                iqn: iqn.into(),
                lun,
            });
        }
        let mut tasks = Vec::new();
        for s in self.inner.sessions_of(iqn) {
            tasks.extend(s.abort_tasks(Some(lun)));
        }
        wait_tasks(tasks).await;
        self.luns_changed(&t);
        Ok(())
    }

    fn luns_changed(&self, t: &TargetEntry) {
        let nexuses: Vec<String> = self
            .inner
            .sessions_of(&t.iqn)
            .iter()
            .map(|s| s.nexus.clone())
            .collect();
        for lun in t.luns.read().expect("LUN map poisoned").values() {
            let mut st = lun.state();
            for n in &nexuses {
                push_ua(&mut st, n, Sense::REPORTED_LUNS_DATA_CHANGED);
            }
        }
    }

    /// Grants an initiator access (replacing any earlier grant and its credentials).
    pub fn grant(&self, iqn: &str, access: InitiatorAccess) -> Result<(), ConfigError> {
        Self::check_access(&access)?;
        let t = self.entry(iqn)?;
        let mut acl = t.acl.write().expect("ACL lock poisoned");
        acl.revoked.remove(&access.name);
        acl.grants.insert(access.name.clone(), access);
        Ok(())
    }

    /// Revokes an initiator: new logins are refused from now on, and every session it has
    /// to the target is dropped. Returns once those sessions are closed and their tasks
    /// have finished touching the LUNs, so nothing that initiator sent reaches a LUN after
    /// this returns: the pool's fencing primitive.
    pub async fn revoke(&self, iqn: &str, initiator: &str) -> Result<(), ConfigError> {
        let t = self.entry(iqn)?;
        {
            let mut acl = t.acl.write().expect("ACL lock poisoned");
            let had = acl.grants.remove(initiator).is_some();
            if acl.allow_any {
                acl.revoked.insert(initiator.to_owned());
            } else if !had {
                return Err(ConfigError::NoSuchGrant {
                    iqn: iqn.into(),
                    initiator: initiator.into(),
                });
            }
        }
        self.drop_sessions(|s| s.target == iqn && s.initiator == initiator)
            .await;
        Ok(())
    }

    async fn drop_sessions(&self, which: impl Fn(&SessionHandle) -> bool) {
        let victims: Vec<Arc<SessionHandle>> = self
            .inner
            .sessions
            .lock()
            .expect("sessions lock poisoned")
            .values()
            .filter(|s| which(s))
            .cloned()
            .collect();
        for s in &victims {
            s.abort_tasks(None);
            s.request_close();
        }
        for s in victims {
            s.wait_closed().await;
        }
    }

    /// The sessions logged in now.
    pub fn sessions(&self) -> Vec<SessionInfo> {
        let mut v: Vec<SessionInfo> = self
            .inner
            .sessions
            .lock()
            .expect("sessions lock poisoned")
            .values()
            .map(|s| SessionInfo::from(&**s))
            .collect();
        v.sort_by(|a, b| (&a.target, &a.initiator, a.tsih).cmp(&(&b.target, &b.initiator, b.tsih)));
        v
    }

    /// The targets configured, by name.
    pub fn targets(&self) -> Vec<String> {
        self.inner
            .targets
            .read()
            .expect("targets lock poisoned")
            .keys()
            .cloned()
            .collect()
    }

    /// Serves connections from `listener` until `shutdown` completes; then asks every
    /// session to close and waits (a bounded time) for their tasks to finish.
    pub async fn run(
        &self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> std::io::Result<()> {
        let mut conns = JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                accepted = listener.accept() => {
                    let (stream, peer) = match accepted {
                        Ok(a) => a,
                        Err(e) => {
                            // Out of descriptors and the like: back off rather than spin.
                            tracing::warn!(error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                    let inner = self.inner.clone();
                    conns.spawn(async move {
                        crate::connection::serve(inner, stream, peer).await;
                    });
                }
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
            }
        }
        // Sessions ask their initiators to log out (async event), then close.
        self.inner.stopping.send_replace(true);
        let drain = async { while conns.join_next().await.is_some() {} };
        if tokio::time::timeout(Duration::from_secs(10), drain)
            .await
            .is_err()
        {
            tracing::warn!("connections did not close within 10 s of shutdown");
            conns.abort_all();
        }
        Ok(())
    }
}
