//! The virtio-blk device: what it offers the driver, its config space, and what serves its
//! queue once the driver has set it up: a worker thread, or a task on the backend's runtime
//! (see [`AsyncBlockIo::runtime`](super::backend::AsyncBlockIo::runtime)).

use std::os::unix::io::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::Disk;
use super::request::{
    Desc, DiskContext, MAX_SEGMENTS, Request, SECTOR_SIZE, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR,
    complete,
};
use crate::devices::bus::lock;
use crate::devices::virtio::{
    ActivateContext, ActivateError, INT_VRING, VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_RING_INDIRECT_DESC, VIRTIO_F_VERSION_1, VIRTIO_ID_BLOCK, VirtioDevice,
    VirtioInterrupt,
};
use crate::vmm::GuestRam;

const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
const VIRTIO_BLK_F_RO: u64 = 1 << 5;
const VIRTIO_BLK_F_BLK_SIZE: u64 = 1 << 6;
const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
const VIRTIO_BLK_F_DISCARD: u64 = 1 << 13;
const VIRTIO_BLK_F_WRITE_ZEROES: u64 = 1 << 14;

pub const QUEUE_SIZE: u16 = 256;
/// How long the worker watches for the next request before sleeping.
const POLL_WINDOW: Duration = Duration::from_micros(50);
/// How long a stopping worker waits for requests in flight in the backend.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);
const CONFIG_LEN: usize = 64;
/// Largest discard / write-zeroes request, in sectors (4 GiB - 512).
const MAX_DISCARD_SECTORS: u32 = u32::MAX >> 9;

/// Where the queue is served.
enum Server {
    /// A thread of its own, for backends whose I/O blocks.
    Thread(JoinHandle<Queue>),
    /// A task on the backend's runtime; it hands the queue back on this channel when it
    /// stops.
    Task(std::sync::mpsc::Receiver<Queue>),
}

struct Worker {
    server: Server,
    stop: EventFd,
}

pub struct Block {
    disk: Disk,
    config: [u8; CONFIG_LEN],
    features: u64,
    queue_sizes: [u16; 1],
    worker: Option<Worker>,
}

impl Block {
    pub fn new(disk: Disk) -> Self {
        let capacity = disk.backend.size() / SECTOR_SIZE;
        let mut features = VIRTIO_F_VERSION_1
            | VIRTIO_F_RING_EVENT_IDX
            | VIRTIO_F_RING_INDIRECT_DESC
            | VIRTIO_BLK_F_SEG_MAX
            | VIRTIO_BLK_F_BLK_SIZE
            | VIRTIO_BLK_F_FLUSH;
        if disk.read_only {
            features |= VIRTIO_BLK_F_RO;
        } else {
            features |= VIRTIO_BLK_F_WRITE_ZEROES;
            if disk.backend.supports_discard() {
                features |= VIRTIO_BLK_F_DISCARD;
            }
        }
        // struct virtio_blk_config, the fields up to write_zeroes_may_unmap.
        let mut config = [0u8; CONFIG_LEN];
        config[0..8].copy_from_slice(&capacity.to_le_bytes());
        config[12..16].copy_from_slice(&u32::from(QUEUE_SIZE - 2).to_le_bytes()); // seg_max
        config[20..24].copy_from_slice(&disk.backend.block_size().to_le_bytes()); // blk_size
        config[36..40].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
        config[40..44].copy_from_slice(&MAX_SEGMENTS.to_le_bytes());
        config[44..48].copy_from_slice(&1u32.to_le_bytes()); // discard alignment, sectors
        config[48..52].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
        config[52..56].copy_from_slice(&MAX_SEGMENTS.to_le_bytes());
        config[56] = 1; // write_zeroes_may_unmap
        Self {
            disk,
            config,
            features,
            queue_sizes: [QUEUE_SIZE],
            worker: None,
        }
    }

    fn context(&self) -> DiskContext {
        let mut id = [0u8; VIRTIO_BLK_ID_BYTES];
        let name = self.disk.id.as_bytes();
        let n = name.len().min(VIRTIO_BLK_ID_BYTES);
        id[..n].copy_from_slice(&name[..n]);
        DiskContext {
            backend: self.disk.backend.clone(),
            read_only: self.disk.read_only,
            capacity: self.disk.backend.size() / SECTOR_SIZE,
            block_size: self.disk.backend.block_size(),
            id,
            metrics: self.disk.metrics.clone(),
        }
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let start = offset as usize;
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.config.get(start + i).copied().unwrap_or(0);
        }
    }

    fn activate(&mut self, mut ctx: ActivateContext) -> Result<(), ActivateError> {
        self.reset();
        let queue = ctx.queues.remove(0);
        let kick = ctx.kicks.remove(0);
        let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(ActivateError::Worker)?;
        let worker_stop = stop.try_clone().map_err(ActivateError::Worker)?;
        let shared = Arc::new(Shared {
            mem: ctx.mem,
            queue: Mutex::new(queue),
            interrupt: ctx.interrupt,
            disk: self.context(),
            inflight: Mutex::new(0),
            drained: Condvar::new(),
            drained_async: tokio::sync::Notify::new(),
        });
        let runtime = self.disk.backend.async_io().and_then(|io| io.runtime());
        let (kick, worker_stop) = if let Some(rt) = runtime {
            match watch_both(&rt, kick, worker_stop) {
                Ok((kick, worker_stop)) => {
                    let (tx, rx) = std::sync::mpsc::sync_channel(1);
                    rt.spawn(async move {
                        let _ = tx.send(serve_on_runtime(shared, kick, worker_stop).await);
                    });
                    self.worker = Some(Worker {
                        server: Server::Task(rx),
                        stop,
                    });
                    return Ok(());
                }
                Err((kick, worker_stop, e)) => {
                    tracing::warn!(disk = %self.disk.id, error = %e, "cannot watch the queue on the backend's runtime; serving it from a thread");
                    (kick, worker_stop)
                }
            }
        } else {
            (kick, worker_stop)
        };
        let thread = std::thread::Builder::new()
            .name(format!("blk-{}", self.disk.id))
            .spawn(move || serve(shared, kick, worker_stop))
            .map_err(ActivateError::Worker)?;
        self.worker = Some(Worker {
            server: Server::Thread(thread),
            stop,
        });
        Ok(())
    }

    fn reset(&mut self) {
        self.quiesce();
    }

    fn quiesce(&mut self) -> Vec<Queue> {
        let Some(w) = self.worker.take() else {
            return Vec::new();
        };
        let _ = w.stop.write(1);
        let queue = match w.server {
            Server::Thread(thread) => thread.join().ok(),
            // The task drains within DRAIN_TIMEOUT; a runtime shut down under it drops
            // the sender, which ends the wait at once.
            Server::Task(rx) => rx.recv_timeout(DRAIN_TIMEOUT + Duration::from_secs(5)).ok(),
        };
        match queue {
            Some(queue) => vec![queue],
            None => {
                tracing::error!(disk = %self.disk.id, "virtio-blk worker panicked or did not stop");
                Vec::new()
            }
        }
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        self.reset();
    }
}

/// Waits for readability on either fd; true when `stop` fired.
fn wait(kick: &EventFd, stop: &EventFd) -> bool {
    let mut fds = [
        libc::pollfd {
            fd: kick.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: stop.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: `fds` is a valid array of two pollfd that outlives the call.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if r >= 0 {
            return fds[1].revents != 0;
        }
        if std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            tracing::error!(error = %std::io::Error::last_os_error(), "virtio-blk poll");
            return true;
        }
    }
}

/// What the worker and in-flight asynchronous requests share.
struct Shared {
    mem: GuestRam,
    queue: Mutex<Queue>,
    interrupt: Arc<VirtioInterrupt>,
    disk: DiskContext,
    /// Requests handed to the backend's asynchronous face and not completed yet.
    inflight: Mutex<usize>,
    drained: Condvar,
    /// The same, for a queue served on the backend's runtime (which must not block).
    drained_async: tokio::sync::Notify,
}

impl Shared {
    /// Returns a finished request's descriptors to the driver and tells it, if it wants.
    fn complete(&self, head: u16, used_len: u32) {
        let mut q = lock(&self.queue);
        if let Err(e) = q.add_used(&self.mem, head, used_len) {
            tracing::warn!(disk = %self.disk.id_str(), error = %e, "virtio-blk used ring");
        }
        if q.needs_notification(&self.mem).unwrap_or(true) {
            self.interrupt.signal(INT_VRING);
        }
    }

    fn finished_async(&self) {
        let mut n = lock(&self.inflight);
        *n -= 1;
        if *n == 0 {
            self.drained.notify_all();
            self.drained_async.notify_waiters();
        }
    }

    /// [`Shared::drain`] for the runtime: completions run on the same thread, so this
    /// waits without blocking it.
    async fn drain_async(&self) {
        let deadline = tokio::time::Instant::now() + DRAIN_TIMEOUT;
        loop {
            let notified = self.drained_async.notified();
            tokio::pin!(notified);
            // Registered before the count is read, so a completion in between is not missed.
            notified.as_mut().enable();
            let n = *lock(&self.inflight);
            if n == 0 {
                return;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                tracing::error!(disk = %self.disk.id_str(), inflight = n, "requests still in flight at stop");
                return;
            }
        }
    }

    /// Waits until every asynchronous request has completed.
    fn drain(&self) {
        let mut n = lock(&self.inflight);
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        while *n > 0 {
            let now = Instant::now();
            if now >= deadline {
                tracing::error!(disk = %self.disk.id_str(), inflight = *n, "requests still in flight at stop");
                return;
            }
            n = self
                .drained
                .wait_timeout(n, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

/// The queue worker thread: serves requests until it is stopped, then waits for the
/// requests still in flight and hands the queue back.
fn serve(shared: Arc<Shared>, kick: EventFd, stop: EventFd) -> Queue {
    let mut bounce = Vec::new();
    // The driver may have queued requests before it set DRIVER_OK.
    process(&shared, &mut bounce, Mode::Thread);
    while !wait(&kick, &stop) {
        let _ = kick.read();
        loop {
            process(&shared, &mut bounce, Mode::Thread);
            if !poll_for_more(&shared) {
                break;
            }
        }
    }
    shared.drain();
    std::mem::take(&mut *lock(&shared.queue))
}

/// The queue served as a task on the backend's runtime: a kick wakes the thread that
/// starts each request's I/O and later completes it.
async fn serve_on_runtime(shared: Arc<Shared>, kick: Watched, stop: Watched) -> Queue {
    process(&shared, &mut Vec::new(), Mode::Runtime);
    loop {
        tokio::select! {
            biased;
            _ = stop.readable() => break,
            ready = kick.readable() => match ready {
                Ok(mut ready) => {
                    // Both eventfds are non-blocking: an empty counter is WouldBlock,
                    // which clears the readiness.
                    if ready.try_io(|fd| fd.get_ref().read()).is_err() {
                        continue;
                    }
                    process(&shared, &mut Vec::new(), Mode::Runtime);
                }
                Err(e) => {
                    tracing::error!(disk = %shared.disk.id_str(), error = %e, "virtio-blk kick");
                    break;
                }
            },
        }
    }
    shared.drain_async().await;
    std::mem::take(&mut *lock(&shared.queue))
}

type Watched = tokio::io::unix::AsyncFd<EventFd>;

/// Registers the kick and stop eventfds with `rt`'s reactor; gives both back on failure.
fn watch_both(
    rt: &tokio::runtime::Handle,
    kick: EventFd,
    stop: EventFd,
) -> Result<(Watched, Watched), (EventFd, EventFd, std::io::Error)> {
    let _in = rt.enter();
    let kick = match watch(kick) {
        Ok(k) => k,
        Err((k, e)) => return Err((k, stop, e)),
    };
    match watch(stop) {
        Ok(s) => Ok((kick, s)),
        Err((s, e)) => Err((kick.into_inner(), s, e)),
    }
}

fn watch(fd: EventFd) -> Result<Watched, (EventFd, std::io::Error)> {
    // SAFETY: the EventFd owns its descriptor and moves into the AsyncFd, so the
    // descriptor stays open and the same for as long as the AsyncFd lives.
    unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
        .map_err(|e| e.into_parts())
}

/// Which thread serves the queue: the blocking face of a backend may be called on the
/// worker thread, never on the runtime.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Thread,
    Runtime,
}

/// After a batch, watches the available ring for a short while before going back to
/// sleep: a driver waiting for a completion usually submits its next request within
/// microseconds, and catching it here saves a thread wake-up (tens of microseconds on a
/// busy host) per request. Returns true when a request arrived.
fn poll_for_more(shared: &Shared) -> bool {
    // With requests in flight on the backend's own thread, the driver's next request
    // follows their completion, far later than the window: polling would only take CPU
    // from the threads that complete them.
    if *lock(&shared.inflight) > 0 {
        return false;
    }
    let until = Instant::now() + POLL_WINDOW;
    while Instant::now() < until {
        let q = lock(&shared.queue);
        match q.avail_idx(&shared.mem, Ordering::Acquire) {
            Ok(idx) if idx.0 != q.next_avail() => return true,
            Ok(_) => {
                drop(q);
                std::hint::spin_loop();
            }
            Err(_) => return false,
        }
    }
    false
}

/// Serves every available request: at once on this thread, or handed to the backend's
/// asynchronous face when it has one.
fn process(shared: &Arc<Shared>, bounce: &mut Vec<u8>, mode: Mode) {
    let mut retried = false;
    loop {
        let mut batch = Vec::new();
        {
            let mut q = lock(&shared.queue);
            if let Err(e) = q.disable_notification(&shared.mem) {
                tracing::warn!(disk = %shared.disk.id_str(), error = %e, "virtio-blk queue");
                return;
            }
            while let Some(chain) = q.pop_descriptor_chain(&shared.mem) {
                let head = chain.head_index();
                let descs: Vec<Desc> = chain.map(Desc::from).collect();
                batch.push((head, descs));
            }
        }
        let popped = !batch.is_empty();
        for (head, descs) in batch {
            handle(shared, head, &descs, bounce, mode);
        }
        match lock(&shared.queue).enable_notification(&shared.mem) {
            Ok(true) if popped || !retried => {
                // A request that came after the ring was found empty is popped next round.
                retried = !popped;
                continue;
            }
            Ok(true) => {
                // The driver says there is more, yet twice nothing could be popped: its
                // available index is not valid. Wait for its next kick rather than spin.
                shared.disk.metrics.invalid();
                tracing::warn!(disk = %shared.disk.id_str(), "virtio-blk available ring index is not valid");
                break;
            }
            Ok(false) => break,
            Err(e) => {
                tracing::warn!(disk = %shared.disk.id_str(), error = %e, "virtio-blk queue");
                break;
            }
        }
    }
}

fn handle(shared: &Arc<Shared>, head: u16, descs: &[Desc], bounce: &mut Vec<u8>, mode: Mode) {
    let (mem, disk) = (&shared.mem, &shared.disk);
    let req = match Request::parse(descs, mem) {
        Ok(req) => req,
        Err((e, status)) => {
            disk.metrics.invalid();
            tracing::debug!(disk = %disk.id_str(), error = %e, "malformed virtio-blk request");
            let used = status.map_or(0, |s| complete(mem, s, VIRTIO_BLK_S_IOERR, 0).used_len);
            return shared.complete(head, used);
        }
    };
    match disk.backend.async_io() {
        Some(io) if req.is_async_kind() => {
            *lock(&shared.inflight) += 1;
            let later = shared.clone();
            let now = req.start_async(mem, disk, io, move |c| {
                later.complete(head, c.used_len);
                later.finished_async();
            });
            if let Some(c) = now {
                shared.complete(head, c.used_len);
                shared.finished_async();
            }
        }
        _ if mode == Mode::Runtime => {
            // Discard, write-zeroes and the id use the blocking face: off the runtime.
            *lock(&shared.inflight) += 1;
            let later = shared.clone();
            tokio::task::spawn_blocking(move || {
                let c = req.execute(&later.mem, &later.disk, &mut Vec::new());
                later.complete(head, c.used_len);
                later.finished_async();
            });
        }
        _ => {
            let c = req.execute(mem, disk, bounce);
            shared.complete(head, c.used_len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::IrqLine;
    use crate::devices::virtio::block::backend::FileBackend;
    use crate::devices::virtio::net::test_utils::{DriverQueue, mem};
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn a_driver_whose_available_index_runs_past_its_ring_is_counted_not_spun_on() {
        let img = tempfile::NamedTempFile::new().unwrap();
        img.as_file().set_len(1 << 20).unwrap();
        let backend = FileBackend::open(img.path(), false).unwrap();
        let block = Block::new(Disk::new("vda", Arc::new(backend), false));
        let mem = mem();
        let driver = DriverQueue::new(16, 0x1000);
        let shared = Arc::new(Shared {
            mem: mem.clone(),
            queue: Mutex::new(driver.queue()),
            interrupt: Arc::new(VirtioInterrupt::new(IrqLine::new(5).unwrap())),
            disk: block.context(),
            inflight: Mutex::new(0),
            drained: Condvar::new(),
            drained_async: tokio::sync::Notify::new(),
        });
        // The available ring's index, 1000 entries ahead of a 16-entry ring.
        mem.write_obj(1000u16, GuestAddress(0x1000 + 16 * 16 + 2))
            .unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let worker = shared.clone();
        std::thread::spawn(move || {
            process(&worker, &mut Vec::new(), Mode::Thread);
            let _ = tx.send(());
        });
        rx.recv_timeout(Duration::from_secs(5))
            .expect("the worker spins on a broken ring instead of waiting for a kick");
        assert_eq!(block.disk.metrics.snapshot().invalid, 1);
    }
}
