//! The iSCSI backend: a disk that is a LUN of an iSCSI target, reached through one
//! `iscsi-initiator` session per disk.
//!
//! The session lives on a small tokio runtime owned by the VM process. Reads, writes and
//! flushes run as tasks there ([`AsyncBlockIo`]); discard and write-zeroes go through the
//! blocking face of the LUN ([`iscsi_initiator::blocking::BlockingLun`]). Commands from
//! all of them pipeline on the one session. The session logs out when the disk is dropped
//! (the VM stops or is destroyed).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;

use iscsi_initiator::blocking::BlockingLun;
use iscsi_initiator::{Chap, Session, SessionConfig};
use tokio::runtime::Runtime;

use super::backend::{AsyncBlockIo, BackendError, BlockBackend, Done};

/// How long a logout may take when the disk goes away.
const LOGOUT_TIMEOUT: Duration = Duration::from_secs(5);

/// Where a disk is and who we are to the target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IscsiTarget {
    pub portal: String,
    pub target_iqn: String,
    pub lun: u16,
    pub initiator_iqn: String,
    pub chap: Option<(String, String)>,
    pub mutual_chap: Option<(String, String)>,
}

impl IscsiTarget {
    fn describe(&self) -> String {
        format!(
            "iscsi {} lun {} at {}",
            self.target_iqn, self.lun, self.portal
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IscsiError {
    #[error("cannot start the iSCSI runtime")]
    Runtime(#[source] std::io::Error),
    #[error("opening {target}")]
    Login {
        target: String,
        #[source]
        source: Box<iscsi_initiator::Error>,
    },
    #[error("{target} has no LUN {lun}")]
    Lun {
        target: String,
        lun: u16,
        #[source]
        source: Box<iscsi_initiator::Error>,
    },
    #[error("{target} has {block_size}-byte blocks; virtio-blk disks here need 512 or 4096")]
    BlockSize { target: String, block_size: u32 },
}

/// A runtime for the iSCSI sessions of one VM process, made when the first iSCSI disk
/// is opened.
pub fn runtime() -> Result<Arc<Runtime>, IscsiError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("iscsi")
        .enable_all()
        .build()
        .map(Arc::new)
        .map_err(IscsiError::Runtime)
}

pub struct IscsiBackend {
    lun: BlockingLun,
    async_lun: iscsi_initiator::Lun,
    session: Session,
    describe: String,
    discard: bool,
    /// Where the session's tasks run; `rt` keeps that runtime alive.
    handle: tokio::runtime::Handle,
    /// Operations started since the task that runs them was spawned (see `start`).
    starting: Arc<Mutex<Vec<Op>>>,
    // Last: the runtime outlives the session's tasks. An Option only so that `drop` can
    // hand it to the thread that logs out (see there).
    rt: Option<Arc<Runtime>>,
}

impl IscsiBackend {
    /// Logs in and opens the LUN.
    pub fn open(rt: Arc<Runtime>, target: &IscsiTarget) -> Result<Self, IscsiError> {
        let mut cfg = SessionConfig::new(
            target.portal.clone(),
            target.target_iqn.clone(),
            target.initiator_iqn.clone(),
        );
        cfg.chap = target
            .chap
            .as_ref()
            .map(|(u, s)| Chap::new(u.clone(), s.as_bytes().to_vec()));
        cfg.mutual_chap = target
            .mutual_chap
            .as_ref()
            .map(|(u, s)| Chap::new(u.clone(), s.as_bytes().to_vec()));
        let describe = target.describe();
        let session = rt
            .block_on(Session::connect(cfg))
            .map_err(|source| IscsiError::Login {
                target: describe.clone(),
                source: Box::new(source),
            })?;
        let lun = match rt.block_on(session.lun(target.lun)) {
            Ok(lun) => lun,
            Err(source) => {
                let _ = rt.block_on(async {
                    tokio::time::timeout(LOGOUT_TIMEOUT, session.logout()).await
                });
                return Err(IscsiError::Lun {
                    target: describe,
                    lun: target.lun,
                    source: Box::new(source),
                });
            }
        };
        if !matches!(lun.block_size(), 512 | 4096) {
            return Err(IscsiError::BlockSize {
                target: describe,
                block_size: lun.block_size(),
            });
        }
        let discard = lun.limits().max_unmap_blocks > 0;
        Ok(Self {
            async_lun: lun.clone(),
            lun: BlockingLun::new(lun, rt.handle().clone()),
            session,
            describe,
            discard,
            handle: rt.handle().clone(),
            starting: Arc::new(Mutex::new(Vec::new())),
            rt: Some(rt),
        })
    }
}

fn io_err(op: &'static str, offset: u64, len: u64, e: iscsi_initiator::Error) -> BackendError {
    BackendError::Io {
        op,
        offset,
        len,
        source: std::io::Error::other(e),
    }
}

impl BlockBackend for IscsiBackend {
    fn size(&self) -> u64 {
        self.lun.size()
    }

    fn block_size(&self) -> u32 {
        self.lun.lun().block_size()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        let len = buf.len() as u64;
        self.lun
            .read_at(offset, buf)
            .map_err(|e| io_err("read", offset, len, e))
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<(), BackendError> {
        self.lun
            .write_at(offset, buf)
            .map_err(|e| io_err("write", offset, buf.len() as u64, e))
    }

    fn flush(&self) -> Result<(), BackendError> {
        self.lun.flush().map_err(|e| io_err("flush", 0, 0, e))
    }

    fn supports_discard(&self) -> bool {
        self.discard
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        self.lun
            .discard(offset, len)
            .map_err(|e| io_err("discard", offset, len, e))
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        self.lun
            .write_zeroes(offset, len, false)
            .map_err(|e| io_err("write-zeroes", offset, len, e))
    }

    fn describe(&self) -> String {
        self.describe.clone()
    }

    fn async_io(&self) -> Option<&dyn AsyncBlockIo> {
        Some(self)
    }
}

type Op = Pin<Box<dyn Future<Output = ()> + Send>>;

impl IscsiBackend {
    /// The session's counters.
    pub fn stats(&self) -> iscsi_initiator::Stats {
        self.session.stats()
    }

    /// Runs `op` on the session's runtime, in one task with the other operations started
    /// before that task gets to run: the device starts a whole pass over the guest's ring
    /// from the runtime's thread, so those are the pass's requests, and their commands
    /// reach the session together and leave in one write. (A task per request would wake
    /// the session after each submission, and each command would cost a write and a
    /// wake-up of the target of its own.)
    fn start(&self, op: Op) {
        let mut starting = self.starting.lock().unwrap_or_else(|p| p.into_inner());
        starting.push(op);
        if starting.len() > 1 {
            return;
        }
        drop(starting);
        let starting = self.starting.clone();
        self.handle.spawn(async move {
            let mut ops: FuturesUnordered<Op> =
                std::mem::take(&mut *starting.lock().unwrap_or_else(|p| p.into_inner()))
                    .into_iter()
                    .collect();
            while ops.next().await.is_some() {}
        });
    }
}

/// Reads, writes and flushes as tasks on the session's runtime: the virtio worker hands
/// a request over and goes on, the session pipelines what is in flight, and the task
/// completes the request from the runtime's thread as soon as the response arrives.
impl AsyncBlockIo for IscsiBackend {
    fn read(&self, offset: u64, len: usize, done: Done<Vec<u8>>) {
        let lun = self.async_lun.clone();
        let lba = offset / u64::from(lun.block_size());
        self.start(Box::pin(async move {
            let r = lun.read_into(lba, bytes::BytesMut::zeroed(len)).await;
            done(
                r.map(|b| b.to_vec())
                    .map_err(|e| io_err("read", offset, len as u64, e)),
            );
        }));
    }

    fn write(&self, offset: u64, data: Vec<u8>, done: Done<()>) {
        let lun = self.async_lun.clone();
        let lba = offset / u64::from(lun.block_size());
        let len = data.len() as u64;
        self.start(Box::pin(async move {
            let r = lun.write(lba, bytes::Bytes::from(data)).await;
            done(r.map_err(|e| io_err("write", offset, len, e)));
        }));
    }

    fn flush(&self, done: Done<()>) {
        let lun = self.async_lun.clone();
        self.start(Box::pin(async move {
            done(lun.flush().await.map_err(|e| io_err("flush", 0, 0, e)));
        }));
    }

    fn runtime(&self) -> Option<tokio::runtime::Handle> {
        Some(self.handle.clone())
    }
}

impl Drop for IscsiBackend {
    fn drop(&mut self) {
        let session = self.session.clone();
        let Some(rt) = self.rt.take() else {
            return;
        };
        let describe = self.describe.clone();
        let logout = move || {
            let r =
                rt.block_on(
                    async move { tokio::time::timeout(LOGOUT_TIMEOUT, session.logout()).await },
                );
            if !matches!(r, Ok(Ok(()))) {
                tracing::warn!(disk = %describe, "iSCSI logout did not complete cleanly");
            }
        };
        if tokio::runtime::Handle::try_current().is_err() {
            logout();
        } else {
            // The last reference went on a thread of a runtime (a stopping disk's final
            // completion ran there): blocking on, or dropping, a runtime is not allowed
            // there, so a thread of its own logs out and lets the runtime go. It takes
            // this disk's own reference to the runtime: one left here could be the last
            // when that thread ends first, and would drop the runtime on this thread.
            let _ = std::thread::Builder::new()
                .name("iscsi-logout".into())
                .spawn(logout);
        }
    }
}
