//! Downloads from the web console's port: a VM as an OVA (`vm.rs`), a disk or disk
//! snapshot as a qcow2 or raw image (`disk.rs`). A browser cannot speak iSCSI, so the
//! member reads the disks (over iSCSI, mutual CHAP, `pool_image::volume`) and qemu-img
//! makes the files, in a private directory.
//!
//! Preparing takes minutes and may fail midway (a snapshot job, a storaged, qemu-img),
//! so it is a step of its own that the page follows:
//! 1. `POST` [`PREPARE_PATH`] `?vm=<id>` or `?volume=<id>&format=qcow2|raw`, with the
//!    caller's token: the work starts and its id is answered at once;
//! 2. `GET` [`STATUS_PATH`] `?id=`: phase, disk i of n, bytes read of total, error
//!    ([`pool_image::progress::Progress`] as JSON); `DELETE` cancels it;
//! 3. `POST` [`TICKET_PATH`] `?id=` once ready: a one-shot ticket, as a download cannot
//!    carry a header;
//! 4. `GET` [`DOWNLOAD_PATH`] `?ticket=`: the file, the caller's token checked again.
//!
//! An export is member-local: its files are on this member's disk and its status in
//! this member's memory, not in the Raft state (a page asks the member it was served by;
//! another member does not know the id, and a restart forgets it and empties the
//! directory). Only the user who started an export sees, cancels or downloads it. Its
//! files go after the download, on cancel, or [`KEEP`] after it ended.

mod disk;
mod vm;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pool_image::package::Package;
use pool_image::progress::{Phase, Progress};
use pool_image::qemu::{Format, ScratchDir};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tonic::Status;

use super::PoolHandler;
use super::console::Tickets;
use crate::auth::Caller;

/// Where an export is started (`POST`, `?vm=<id>` or `?volume=<id>&format=`).
pub const PREPARE_PATH: &str = "/export/prepare";
/// Where its progress is read (`GET ?id=`) or it is cancelled (`DELETE ?id=`).
pub const STATUS_PATH: &str = "/export/status";
/// Where a ready export's download ticket is asked for (`POST ?id=`).
pub const TICKET_PATH: &str = "/export/ticket";
/// Where the file is downloaded (`GET`, `?ticket=`).
pub const DOWNLOAD_PATH: &str = "/export/download";
/// The calls a VM export makes on the caller's behalf (what `poolctl vm-export
/// --snapshot` makes): each must be the caller's to make.
pub const VM_METHODS: &[&str] = &["SnapshotVm", "OpenVolumeAccess", "DeleteVmSnapshot"];
/// The calls a disk download makes (what `poolctl vdi-export` makes).
pub const DISK_METHODS: &[&str] = &["OpenVolumeAccess", "CloseVolumeAccess"];
/// Exports one member holds at once, from start until their files go (each holds whole
/// disks in the scratch directory and reads them with qemu-img).
const AT_ONCE: usize = 2;
/// How long an ended export waits for its download (or its failure to be read).
pub const KEEP: Duration = Duration::from_secs(600);

/// What to export.
#[derive(Debug, Clone)]
pub enum Target {
    Vm(String),
    Disk { volume_id: String, format: Format },
}

impl Target {
    fn methods(&self) -> &'static [&'static str] {
        match self {
            Target::Vm(_) => VM_METHODS,
            Target::Disk { .. } => DISK_METHODS,
        }
    }

    /// The audit log's name of the call.
    fn method(&self) -> &'static str {
        match self {
            Target::Vm(_) => "ExportVm",
            Target::Disk { .. } => "ExportVolume",
        }
    }
}

/// What `?vm=` or `?volume=` with `?format=` name: a plain id each, and a format
/// [`disk::FORMATS`] has.
pub fn target(vm: &str, volume: &str, format: &str) -> Result<Target, Status> {
    let plain =
        |id: &str| !id.is_empty() && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    match (vm, volume) {
        (vm, "") if plain(vm) => Ok(Target::Vm(vm.to_owned())),
        ("", volume) if plain(volume) => Ok(Target::Disk {
            volume_id: volume.to_owned(),
            format: disk::format(if format.is_empty() { "qcow2" } else { format })?,
        }),
        _ => Err(Status::invalid_argument(
            "name a VM (?vm=<id>) or a volume (?volume=<id>&format=qcow2|raw)",
        )),
    }
}

/// What a finished export downloads.
pub enum Prepared {
    Package(Package),
    /// A disk image in the export's directory.
    File {
        path: PathBuf,
        name: String,
    },
}

impl Prepared {
    pub fn file_name(&self) -> String {
        match self {
            Prepared::Package(p) => p.file_name(),
            Prepared::File { name, .. } => name.clone(),
        }
    }

    fn size(&self) -> anyhow::Result<u64> {
        Ok(match self {
            Prepared::Package(p) => p.size()?,
            Prepared::File { path, .. } => std::fs::metadata(path)?.len(),
        })
    }

    /// Writes the whole download into `out` (blocking).
    pub fn write(&self, mut out: impl std::io::Write) -> anyhow::Result<()> {
        match self {
            Prepared::Package(p) => {
                p.write(out)?;
            }
            Prepared::File { path, .. } => {
                std::io::copy(&mut std::fs::File::open(path)?, &mut out)?;
                out.flush()?;
            }
        }
        Ok(())
    }
}

/// A ready download with its files, which go when it is dropped.
pub struct Ready {
    pub prepared: Prepared,
    pub size: u64,
    _scratch: ScratchDir,
    _permit: OwnedSemaphorePermit,
}

/// One export on this member.
struct Export {
    /// The user who started it: the only one who may see it.
    owner: String,
    target: Target,
    progress: Arc<Mutex<Progress>>,
    /// Set to cancel the work (it still deletes its snapshot and grants).
    cancel: watch::Sender<bool>,
    /// The files once ready, until downloaded.
    ready: Option<Ready>,
}

/// This member's exports, download tickets and scratch space.
pub struct Exports {
    tickets: Tickets,
    /// A private directory under the data directory: disks are read and converted here.
    scratch: PathBuf,
    running: Arc<Semaphore>,
    open: Mutex<HashMap<String, Export>>,
    keep: Duration,
}

impl Exports {
    /// Exports that work under `scratch` (made 0700; emptied: what is there was left by
    /// a member stopped in the middle of an export).
    pub fn new(scratch: PathBuf) -> std::io::Result<Exports> {
        Exports::keeping(scratch, KEEP)
    }

    /// As [`Exports::new`], ended exports kept `keep`.
    pub fn keeping(scratch: PathBuf, keep: Duration) -> std::io::Result<Exports> {
        use std::os::unix::fs::DirBuilderExt;
        match std::fs::remove_dir_all(&scratch) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&scratch)?;
        Ok(Exports {
            tickets: Tickets::default(),
            scratch,
            running: Arc::new(Semaphore::new(AT_ONCE)),
            open: Mutex::new(HashMap::new()),
            keep,
        })
    }

    pub fn scratch(&self) -> &Path {
        &self.scratch
    }

    fn open(&self) -> std::sync::MutexGuard<'_, HashMap<String, Export>> {
        self.open.lock().expect("exports lock")
    }

    /// Registers an export of `target` for `owner` and holds a place for it: its id,
    /// directory and progress, or 429 when [`AT_ONCE`] are held.
    fn begin(
        &self,
        owner: &str,
        target: Target,
        first: Phase,
        disks: u32,
    ) -> Result<Begun, Status> {
        let permit = self.running.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "{AT_ONCE} exports are held on this member; retry when one is downloaded or \
                 cancelled"
            ))
        })?;
        let scratch = ScratchDir::new(Some(&self.scratch))
            .map_err(|e| Status::internal(format!("making a private directory: {e}")))?;
        let id = crate::auth::hex(&rand::random::<[u8; 16]>());
        let progress = Arc::new(Mutex::new(Progress::new(first, disks)));
        let (cancel, cancelled) = watch::channel(false);
        self.open().insert(
            id.clone(),
            Export {
                owner: owner.to_owned(),
                target,
                progress: progress.clone(),
                cancel,
                ready: None,
            },
        );
        Ok(Begun {
            id,
            progress,
            cancelled,
            scratch,
            permit,
        })
    }

    /// Records how export `id` ended and forgets it [`Exports::keep`] later (its files
    /// with it, if not downloaded). A cancelled export is gone already: its files go now.
    fn end(self: &Arc<Self>, id: &str, res: Result<Ready, Status>) {
        {
            let mut open = self.open();
            let Some(e) = open.get_mut(id) else { return };
            let mut p = e.progress.lock().expect("progress lock");
            match res {
                Ok(r) => {
                    p.ready(r.prepared.file_name(), r.size);
                    e.ready = Some(r);
                }
                Err(s) => p.fail(s.message()),
            }
        }
        let (ex, id) = (self.clone(), id.to_owned());
        tokio::spawn(async move {
            tokio::time::sleep(ex.keep).await;
            if ex.open().remove(&id).is_some() {
                tracing::info!(export = %id, "an export nobody downloaded is removed");
            }
        });
    }
}

/// A place held by [`Exports::begin`].
struct Begun {
    id: String,
    progress: Arc<Mutex<Progress>>,
    cancelled: watch::Receiver<bool>,
    scratch: ScratchDir,
    permit: OwnedSemaphorePermit,
}

/// What the work of an export is given.
pub(super) struct Work<'a> {
    pub svc: &'a PoolHandler,
    pub who: &'a Caller,
    pub dir: &'a Path,
    progress: &'a Mutex<Progress>,
    cancelled: watch::Receiver<bool>,
}

impl Work<'_> {
    fn update(&self, f: impl FnOnce(&mut Progress)) {
        f(&mut self.progress.lock().expect("progress lock"));
    }

    fn is_cancelled(&self) -> bool {
        *self.cancelled.borrow()
    }

    /// Runs `fut` unless the export is cancelled first.
    async fn unless_cancelled<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T, Status>>,
    ) -> Result<T, Status> {
        let mut c = self.cancelled.clone();
        tokio::select! {
            r = fut => r,
            _ = c.wait_for(|c| *c) => Err(cancelled()),
        }
    }
}

fn cancelled() -> Status {
    Status::cancelled("the export was cancelled")
}

/// The request a call here stands for, for [`PoolHandler::authorize`].
fn request(header: Option<&str>, peer: Option<std::net::SocketAddr>) -> tonic::Request<()> {
    let mut req = tonic::Request::new(());
    if let Some(h) = header.and_then(|h| h.parse().ok()) {
        req.metadata_mut().insert("authorization", h);
    }
    req.extensions_mut()
        .insert(tonic::transport::server::TcpConnectInfo {
            local_addr: None,
            remote_addr: peer,
        });
    req
}

/// The caller, if it may make every one of `target`'s methods.
fn authorize(
    svc: &PoolHandler,
    header: Option<&str>,
    peer: Option<std::net::SocketAddr>,
    target: &Target,
) -> Result<Caller, Status> {
    let req = request(header, peer);
    let mut who = None;
    for m in target.methods() {
        who = Some(svc.authorize(&req, m)?);
    }
    let mut who = who.expect("an export makes calls");
    who.method = target.method().into();
    Ok(who)
}

/// Starts exporting `target` for the caller whose `authorization` header this is: the
/// export's id. Refused as the calls it makes would be, for a VM without disks or a
/// volume not there, and when [`AT_ONCE`] are held.
pub async fn start(
    svc: &PoolHandler,
    ex: &Arc<Exports>,
    header: Option<&str>,
    peer: Option<std::net::SocketAddr>,
    target: Target,
) -> Result<String, Status> {
    let who = authorize(svc, header, peer, &target)?;
    let (first, disks) = match &target {
        Target::Vm(vm_id) => {
            let vm = vm::vm(svc, vm_id).await?;
            let n = vm.spec.as_ref().map_or(0, |s| s.disks.len());
            if n == 0 {
                return Err(Status::failed_precondition(format!(
                    "VM {vm_id} has no disks to export"
                )));
            }
            (Phase::Snapshot, n as u32)
        }
        Target::Disk { volume_id, .. } => {
            disk::volume(svc, volume_id).await?;
            (Phase::Reading, 1)
        }
    };
    let b = ex.begin(&who.name, target.clone(), first, disks)?;
    let (svc, ex) = (svc.clone(), ex.clone());
    // The work is a task of its own: the page only follows it, and a cancel still has the
    // snapshot deleted and the grants revoked.
    let id = b.id.clone();
    tokio::spawn(async move {
        let res = {
            let work = Work {
                svc: &svc,
                who: &who,
                dir: b.scratch.path(),
                progress: &b.progress,
                cancelled: b.cancelled,
            };
            match &target {
                Target::Vm(vm_id) => vm::build(&work, vm_id).await.map(Prepared::Package),
                Target::Disk { volume_id, format } => disk::build(&work, volume_id, *format).await,
            }
        };
        let res = res.and_then(|prepared| {
            let size = prepared
                .size()
                .map_err(|e| Status::internal(format!("{e:#}")))?;
            Ok(Ready {
                prepared,
                size,
                _scratch: b.scratch,
                _permit: b.permit,
            })
        });
        let what = match &target {
            Target::Vm(vm_id) => format!("VM {vm_id}"),
            Target::Disk { volume_id, format } => {
                format!("volume {volume_id} as {}", format.qemu_name())
            }
        };
        let detail = match &res {
            Ok(_) => Status::ok(format!("export of {what} (web, from {})", who.peer)),
            Err(s) => s.clone(),
        };
        svc.audit(&who, &detail);
        ex.end(&id, res);
    });
    Ok(b.id)
}

/// Export `id`, if it is the caller's: the caller may still make its calls, and is the
/// user who started it.
fn mine<T>(
    svc: &PoolHandler,
    ex: &Exports,
    header: Option<&str>,
    peer: Option<std::net::SocketAddr>,
    id: &str,
    f: impl FnOnce(&mut HashMap<String, Export>, Caller) -> Result<T, Status>,
) -> Result<T, Status> {
    let target = ex.open().get(id).map(|e| e.target.clone());
    let target = target.ok_or_else(|| {
        Status::not_found(format!(
            "no export {id} on this member: it was downloaded, cancelled or kept past {} \
             min, or started on another member",
            ex.keep.as_secs() / 60
        ))
    })?;
    let who = authorize(svc, header, peer, &target)?;
    let mut open = ex.open();
    match open.get(id) {
        None => Err(Status::not_found(format!("export {id} has just ended"))),
        Some(e) if e.owner != who.name => Err(Status::permission_denied(format!(
            "export {id} is another user's"
        ))),
        Some(_) => f(&mut open, who),
    }
}

/// How far export `id` has got.
pub fn status(
    svc: &PoolHandler,
    ex: &Exports,
    header: Option<&str>,
    peer: Option<std::net::SocketAddr>,
    id: &str,
) -> Result<Progress, Status> {
    mine(svc, ex, header, peer, id, |open, _| {
        Ok(open[id].progress.lock().expect("progress lock").clone())
    })
}

/// Cancels export `id`: its work stops (what it took is given back) and its files go.
pub fn cancel(
    svc: &PoolHandler,
    ex: &Exports,
    header: Option<&str>,
    peer: Option<std::net::SocketAddr>,
    id: &str,
) -> Result<(), Status> {
    let e = mine(svc, ex, header, peer, id, |open, _| {
        Ok(open.remove(id).expect("looked up"))
    })?;
    let _ = e.cancel.send(true);
    Ok(())
}

/// A one-shot ticket for downloading export `id`, once it is ready.
pub fn ticket(
    svc: &PoolHandler,
    ex: &Exports,
    header: Option<&str>,
    peer: Option<std::net::SocketAddr>,
    id: &str,
) -> Result<String, Status> {
    mine(svc, ex, header, peer, id, |open, who| {
        let p = open[id].progress.lock().expect("progress lock").clone();
        match p.phase {
            Phase::Ready => ex.tickets.issue(&who, header.map(str::to_owned), id),
            Phase::Failed => Err(Status::failed_precondition(format!(
                "export {id} failed: {}",
                p.error
            ))),
            _ => Err(Status::failed_precondition(format!(
                "export {id} is not ready yet"
            ))),
        }
    })
}

/// Spends `ticket`: the export's files, taken out of the list (they go when the
/// download is done with them).
pub fn download(
    svc: &PoolHandler,
    ex: &Exports,
    ticket: &str,
    peer: Option<std::net::SocketAddr>,
) -> Result<Ready, Status> {
    let t = ex.tickets.redeem(ticket).ok_or_else(|| {
        Status::permission_denied("unknown, used or expired export ticket: ask for another")
    })?;
    // The ticket names the export (`vm_id` is the console tickets' name for its object);
    // a token revoked since the ticket was issued downloads nothing.
    let id = t.vm_id;
    mine(svc, ex, t.header.as_deref(), peer, &id, |open, _| {
        open.remove(&id)
            .and_then(|e| e.ready)
            .ok_or_else(|| Status::failed_precondition(format!("export {id} is not ready")))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_ended_export_goes_with_its_files_after_its_time() {
        let dir = tempfile::tempdir().unwrap();
        let scratch = dir.path().join("exports");
        let ex = Arc::new(Exports::keeping(scratch.clone(), Duration::from_millis(300)).unwrap());
        let target = || Target::Disk {
            volume_id: "v".into(),
            format: Format::Raw,
        };
        let a = ex.begin("alice", target(), Phase::Reading, 1).unwrap();
        let b = ex.begin("alice", target(), Phase::Reading, 1).unwrap();
        let third = ex
            .begin("alice", target(), Phase::Reading, 1)
            .err()
            .unwrap();
        assert_eq!(third.code(), tonic::Code::ResourceExhausted);
        let file = a.scratch.path().join("v.raw");
        std::fs::write(&file, b"disk").unwrap();
        let ready = Ready {
            prepared: Prepared::File {
                path: file,
                name: "v.raw".into(),
            },
            size: 4,
            _scratch: a.scratch,
            _permit: a.permit,
        };
        ex.end(&a.id, Ok(ready));
        ex.end(&b.id, Err(Status::unavailable("storaged is down")));
        {
            let open = ex.open();
            let p = open[&a.id].progress.lock().unwrap().clone();
            assert_eq!(
                (p.phase, p.file.as_str(), p.size),
                (Phase::Ready, "v.raw", 4)
            );
            let p = open[&b.id].progress.lock().unwrap().clone();
            assert_eq!(
                (p.phase, p.error.as_str()),
                (Phase::Failed, "storaged is down")
            );
        }
        assert_eq!(std::fs::read_dir(&scratch).unwrap().count(), 2);
        // The ready one still holds its place; the failed one gave its back with its work.
        drop(b.scratch);
        drop(b.permit);
        let _c = ex.begin("alice", target(), Phase::Reading, 1).unwrap();
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert!(!ex.open().contains_key(&a.id) && !ex.open().contains_key(&b.id));
        // The one begun last is still there: only the two ended ones went.
        assert_eq!(ex.open().len(), 1);
        assert_eq!(std::fs::read_dir(&scratch).unwrap().count(), 1);
    }
}
