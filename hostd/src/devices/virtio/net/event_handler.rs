//! The worker of one VIF: one thread that waits on the tap, both queues' kicks, the
//! rate-limit timer and its stop signal, and moves frames.
//!
//! - Tap readable: frames go into the guest's RX buffers. With no buffer posted the
//!   frame in hand waits, and the tap is not watched until the guest posts more (a kick
//!   on the RX queue): no busy loop, and the tap's own queue holds the rest.
//! - TX kick: every frame the guest queued is checked and written to the tap, unless the
//!   rate limit says to wait: then the frame waits in hand and a timer resumes sending.
//!   UDP datagrams of one flow queued back to back go in one write ([`Batch`]), written
//!   before anything else goes and before the worker sleeps.
//! - After traffic the worker watches the tap, the kicks and the TX ring itself (with the
//!   guest's kicks off) for the VIF's [`BusyPoll`] window before it sleeps again.

use std::os::unix::io::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::Nic;
use super::busy_poll::BusyPoll;
use super::coalesce::{Batch, Out};
use super::frame::{self, Chain, ChainError, MAX_FRAME, Refused, VNET_HDR_LEN, VnetHdr};
use super::rate::Limiter;
use crate::devices::virtio::block::request::Desc;
use crate::devices::virtio::{INT_VRING, VirtioInterrupt};
use crate::vmm::GuestRam;

/// A gap between two looks of a watching worker this long means it was off the CPU.
const PREEMPTED: Duration = Duration::from_micros(20);

pub(super) struct Handler {
    mem: GuestRam,
    rx: Queue,
    tx: Queue,
    interrupt: Arc<VirtioInterrupt>,
    nic: Nic,
    acked: u64,
    limiter: Limiter,
    timer: TimerFd,
    /// The timer is armed; TX waits for it.
    throttled: bool,
    rx_buf: Vec<u8>,
    /// Length of the frame in `rx_buf` that waits for a guest buffer.
    rx_pending: Option<usize>,
    /// The guest has no RX buffer: the tap is not watched until it posts one.
    rx_starved: bool,
    /// The tap failed for good (it was deleted): it is not watched any more.
    tap_broken: bool,
    /// The frame in `tx_buf` (header first) waiting for the rate limit, by its head.
    tx_deferred: Option<u16>,
    tx_hdr: VnetHdr,
    tx_buf: Vec<u8>,
    /// UDP datagrams taken from the guest and not written yet.
    batch: Batch,
    /// Off once the kernel refused a batch: datagrams go one by one.
    batching: bool,
    /// Where a refused batch's datagrams are rebuilt.
    scratch: Vec<u8>,
    busy: BusyPoll,
    /// Watching: the guest's TX kicks are off, the worker reads the ring instead.
    spinning: bool,
}

/// Pops the next chain, or, with none, asks the driver for a kick when it adds one
/// (and looks again: one may have come in between).
fn pop(q: &mut Queue, mem: &GuestRam) -> Option<(u16, Vec<Desc>)> {
    let chain = match q.pop_descriptor_chain(mem) {
        Some(c) => c,
        None => match q.enable_notification(mem) {
            Ok(true) => q.pop_descriptor_chain(mem)?,
            _ => return None,
        },
    };
    let head = chain.head_index();
    Some((head, chain.map(Desc::from).collect()))
}

/// Gives the chain popped last back to the queue, as if it had not been popped.
fn unpop(q: &mut Queue) {
    let next = q.next_avail().wrapping_sub(1);
    q.set_next_avail(next);
}

fn add_used(q: &mut Queue, mem: &GuestRam, head: u16, len: u32, nic: &Nic) {
    if let Err(e) = q.add_used(mem, head, len) {
        tracing::warn!(nic = %nic.id, error = %e, "virtio-net used ring");
    }
}

/// Writes what `batch` holds to the tap: the datagram alone, or one USO frame. A kernel
/// that refuses USO (EINVAL: nothing was injected) gets the datagrams one by one, and
/// `batching` goes off.
fn flush(batch: &mut Batch, nic: &Nic, scratch: &mut Vec<u8>, batching: &mut bool) {
    let n = batch.len() as u64;
    match batch.out() {
        None => return,
        Some(Out::One(hdr, frame)) => send_one(nic, hdr, frame),
        Some(Out::Many(hdr, frame)) => match nic.transmit(hdr, frame) {
            Ok(()) => nic.metrics.tx_batch(n, batch.lens().sum()),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                *batching = false;
                tracing::warn!(nic = %nic.id, error = %e, "the kernel refused a UDP segmentation offload frame: datagrams go one by one");
                batch.each(scratch, |hdr, frame| send_one(nic, hdr, frame));
            }
            Err(e) => {
                (0..n).for_each(|_| nic.metrics.tx_error());
                tracing::debug!(nic = %nic.id, error = %e, frames = n, "tap write failed");
            }
        },
    }
    batch.clear();
}

/// Writes one frame from the guest to the tap, counted as sent or failed.
fn send_one(nic: &Nic, hdr: VnetHdr, frame: &[u8]) {
    match nic.transmit(hdr, frame) {
        Ok(()) => nic.metrics.tx(frame.len() as u64),
        Err(e) => {
            nic.metrics.tx_error();
            tracing::debug!(nic = %nic.id, error = %e, "tap write failed");
        }
    }
}

fn notify(q: &mut Queue, mem: &GuestRam, interrupt: &VirtioInterrupt) {
    if q.needs_notification(mem).unwrap_or(true) {
        interrupt.signal(INT_VRING);
    }
}

impl Handler {
    pub(super) fn new(
        mem: GuestRam,
        [rx, tx]: [Queue; 2],
        interrupt: Arc<VirtioInterrupt>,
        nic: Nic,
        acked: u64,
    ) -> std::io::Result<Self> {
        Ok(Self {
            mem,
            rx,
            tx,
            interrupt,
            limiter: Limiter::new(&nic.rate, Instant::now()),
            busy: BusyPoll::new(nic.busy_poll),
            nic,
            acked,
            timer: TimerFd::new()?,
            throttled: false,
            rx_buf: vec![0; VNET_HDR_LEN + MAX_FRAME],
            rx_pending: None,
            rx_starved: false,
            tap_broken: false,
            tx_deferred: None,
            tx_hdr: VnetHdr::default(),
            tx_buf: Vec::with_capacity(VNET_HDR_LEN + MAX_FRAME),
            batch: Batch::default(),
            batching: true,
            scratch: Vec::new(),
            spinning: false,
        })
    }

    /// Serves the queues until `stop` fires; gives them back as they stand.
    pub(super) fn run(mut self, rx_kick: EventFd, tx_kick: EventFd, stop: EventFd) -> Vec<Queue> {
        // The driver may have queued frames and buffers before it set DRIVER_OK.
        self.process_tx();
        self.process_rx();
        let mut last_work = Instant::now();
        let mut last_look = last_work;
        let mut watch_until: Option<Instant> = None;
        loop {
            let watch_tap = !self.rx_starved && !self.tap_broken;
            // A negative fd is passed over: `poll` reports POLLERR and POLLHUP even for
            // an fd asked nothing, and a deleted tap's would wake the worker forever.
            let fd = |fd: i32, on: bool| libc::pollfd {
                fd: if on { fd } else { -1 },
                events: libc::POLLIN,
                revents: 0,
            };
            let mut fds = [
                fd(stop.as_raw_fd(), true),
                fd(rx_kick.as_raw_fd(), true),
                fd(tx_kick.as_raw_fd(), true),
                fd(self.timer.as_raw_fd(), true),
                fd(self.nic.tap.as_raw_fd(), watch_tap),
            ];
            let timeout = if watch_until.is_some() { 0 } else { -1 };
            // SAFETY: `fds` is a valid array of pollfd that outlives the call.
            let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
            if r == 0 {
                let now = Instant::now();
                // A long gap since the last look: another thread had this CPU (the
                // guest's vCPU, the peer). Watching on would take it from them, as
                // vhost-net stops its busy loop when the scheduler wants the CPU.
                let preempted = now.duration_since(last_look) > PREEMPTED;
                last_look = now;
                // Frames the guest queued are taken, and watching goes on only if some
                // were (a ring whose index runs ahead of what it holds would keep this
                // branch spinning; with kicks back on it is reported and slept through).
                let waiting = self.tx_waiting();
                let moved = waiting && self.process_tx();
                if moved && !preempted {
                    last_work = Instant::now();
                    (last_look, watch_until) = (last_work, self.watch(last_work));
                } else if waiting || preempted || watch_until.is_some_and(|t| now >= t) {
                    watch_until = None;
                    self.stop_watching();
                } else {
                    // SAFETY: no arguments; it cannot fail on Linux.
                    unsafe { libc::sched_yield() };
                }
                continue;
            }
            if r < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                tracing::error!(nic = %self.nic.id, error = %e, "virtio-net poll");
                break;
            }
            let ready = |i: usize| fds[i].revents != 0;
            if ready(0) {
                break;
            }
            let idle = last_work.elapsed();
            let mut moved = false;
            if ready(1) {
                let _ = rx_kick.read();
                self.rx_starved = false;
            }
            if ready(2) {
                let _ = tx_kick.read();
            }
            if ready(3) {
                let _ = self.timer.wait();
                self.throttled = false;
            }
            if ready(2) || ready(3) {
                moved |= self.process_tx();
            }
            if ready(1) || ready(4) {
                moved |= self.process_rx();
            }
            if self.spinning && self.tx_waiting() {
                // Kicks are off while watching: the ring is read here too, or traffic
                // toward the guest would hold up what it sends.
                moved |= self.process_tx();
            }
            // Only frames feed the window's rule and open a window: a wake that moved
            // none (buffers refilled, the rate limit's timer) says nothing of when the
            // next frame comes.
            last_look = Instant::now();
            if moved {
                self.busy.woke_after(idle);
                last_work = last_look;
                watch_until = self.watch(last_work);
            }
        }
        if self.tx_deferred.take().is_some() {
            // Popped but not sent: the driver gets it back where it was, so a device
            // restored from these queues sends it.
            unpop(&mut self.tx);
        }
        vec![self.rx, self.tx]
    }

    /// Moves frames from the tap into the guest's buffers while both have some; whether
    /// any for the guest came from the tap or went to the guest. Frames dropped on the
    /// way in (another VLAN's, malformed) are not the guest's traffic: they open no
    /// busy-poll window.
    fn process_rx(&mut self) -> bool {
        let mut used = false;
        let mut read = false;
        loop {
            let len = match self.rx_pending {
                Some(len) => len,
                None if self.tap_broken => break,
                None => match self.nic.tap.read(&mut self.rx_buf) {
                    Ok(len) => len,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        self.nic.metrics.rx_error();
                        tracing::warn!(nic = %self.nic.id, tap = %self.nic.tap.name(), error = %e, "tap read failed; no more frames from it");
                        self.tap_broken = true;
                        break;
                    }
                },
            };
            self.rx_pending = None;
            let Some(hdr) = self
                .rx_buf
                .get(..VNET_HDR_LEN)
                .filter(|_| len >= VNET_HDR_LEN)
            else {
                self.nic.metrics.rx_dropped();
                continue;
            };
            let hdr = VnetHdr::from_bytes(hdr.try_into().expect("header length"));
            let ingress = match frame::ingress(hdr, &self.rx_buf[VNET_HDR_LEN..len], self.nic.vlan)
            {
                Ok(i) => i,
                Err(_) => {
                    self.nic.metrics.rx_dropped();
                    continue;
                }
            };
            read = true;
            let Some((head, descs)) = pop(&mut self.rx, &self.mem) else {
                self.rx_pending = Some(len);
                self.rx_starved = true;
                break;
            };
            let written = Chain::rx(&descs).and_then(|chain| {
                chain.scatter(
                    &self.mem,
                    &[&ingress.hdr.to_bytes(), ingress.head, ingress.tail],
                )
            });
            match written {
                Ok(n) => {
                    add_used(&mut self.rx, &self.mem, head, n, &self.nic);
                    self.nic.metrics.rx((n as usize - VNET_HDR_LEN) as u64);
                }
                Err(ChainError::NoRoom { len, room }) => {
                    // The buffer stays the driver's for the next frame.
                    unpop(&mut self.rx);
                    self.nic.metrics.rx_dropped();
                    tracing::debug!(nic = %self.nic.id, len, room, "frame larger than the guest's buffer");
                }
                Err(e) => {
                    // A malformed buffer is returned empty; the frame tries the next one.
                    self.nic.metrics.invalid();
                    tracing::debug!(nic = %self.nic.id, error = %e, "malformed virtio-net RX buffer");
                    add_used(&mut self.rx, &self.mem, head, 0, &self.nic);
                    self.rx_pending = Some(len);
                }
            }
            used = true;
        }
        if used {
            notify(&mut self.rx, &self.mem, &self.interrupt);
        }
        used || read
    }

    /// Sends every frame the guest queued, until the queue is empty or the rate limit
    /// says to wait; whether it took any.
    fn process_tx(&mut self) -> bool {
        if self.throttled {
            return false;
        }
        let mut took = false;
        let mut used = false;
        let mut retried = false;
        loop {
            if let Err(e) = self.tx.disable_notification(&self.mem) {
                tracing::warn!(nic = %self.nic.id, error = %e, "virtio-net TX queue");
                return took;
            }
            let mut popped = false;
            loop {
                let head = match self.tx_deferred.take() {
                    Some(head) => {
                        took = true;
                        head
                    }
                    None => {
                        let Some(chain) = self.tx.pop_descriptor_chain(&self.mem) else {
                            break;
                        };
                        (popped, took) = (true, true);
                        let head = chain.head_index();
                        let descs: Vec<Desc> = chain.map(Desc::from).collect();
                        if !self.prepare_tx(&descs) {
                            add_used(&mut self.tx, &self.mem, head, 0, &self.nic);
                            used = true;
                            continue;
                        }
                        head
                    }
                };
                let len = (self.tx_buf.len() - VNET_HDR_LEN) as u64;
                if let Err(wait) = self.limiter.admit(len, Instant::now()) {
                    self.tx_deferred = Some(head);
                    self.flush_batch();
                    self.throttle(wait);
                    if used {
                        notify(&mut self.tx, &self.mem, &self.interrupt);
                    }
                    return took;
                }
                self.send_tx();
                add_used(&mut self.tx, &self.mem, head, 0, &self.nic);
                used = true;
            }
            self.flush_batch();
            if self.spinning {
                break;
            }
            match self.tx.enable_notification(&self.mem) {
                Ok(true) if popped || !retried => {
                    // A chain that came after the ring was found empty is popped on the
                    // next round.
                    retried = !popped;
                    continue;
                }
                Ok(true) => {
                    // The driver says there is more, yet twice nothing could be popped:
                    // its ring is broken. Wait for its next kick rather than spin.
                    self.nic.metrics.invalid();
                    tracing::warn!(nic = %self.nic.id, "virtio-net TX ring index is not valid");
                    break;
                }
                Ok(false) => break,
                Err(e) => {
                    tracing::warn!(nic = %self.nic.id, error = %e, "virtio-net TX queue");
                    break;
                }
            }
        }
        if used {
            notify(&mut self.tx, &self.mem, &self.interrupt);
        }
        took
    }

    /// Sends the frame in `tx_buf`: into the batch if it may join it (or start the next
    /// one), else after what the batch holds.
    fn send_tx(&mut self) {
        let frame = &self.tx_buf[VNET_HDR_LEN..];
        if self.batching {
            if self.batch.add(&self.tx_hdr, frame) {
                return;
            }
            flush(
                &mut self.batch,
                &self.nic,
                &mut self.scratch,
                &mut self.batching,
            );
            if self.batching && self.batch.add(&self.tx_hdr, frame) {
                return;
            }
        }
        send_one(&self.nic, self.tx_hdr, frame);
    }

    fn flush_batch(&mut self) {
        flush(
            &mut self.batch,
            &self.nic,
            &mut self.scratch,
            &mut self.batching,
        );
    }

    /// Until when to watch after work done at `now`; none when the window is empty or
    /// sending waits for the rate limit's timer. While watching, the guest's TX kicks
    /// stay off.
    fn watch(&mut self, now: Instant) -> Option<Instant> {
        let window = self.busy.window();
        if window.is_zero() || self.throttled {
            self.stop_watching();
            return None;
        }
        if !self.spinning {
            self.spinning = true;
            if let Err(e) = self.tx.disable_notification(&self.mem) {
                tracing::warn!(nic = %self.nic.id, error = %e, "virtio-net TX queue");
            }
        }
        Some(now + window)
    }

    /// Turns the guest's TX kicks back on (if watching turned them off); a frame queued
    /// meanwhile goes now.
    fn stop_watching(&mut self) {
        if self.spinning {
            self.spinning = false;
            self.process_tx();
        }
    }

    /// The guest has queued a TX chain not taken yet.
    fn tx_waiting(&self) -> bool {
        self.tx
            .avail_idx(&self.mem, std::sync::atomic::Ordering::Acquire)
            .is_ok_and(|i| i.0 != self.tx.next_avail())
    }

    /// Parses a TX chain into `tx_buf` and `tx_hdr`; false (counted) when it must not go.
    fn prepare_tx(&mut self, descs: &[Desc]) -> bool {
        let parsed = Chain::tx(descs).and_then(|c| c.gather(&self.mem, &mut self.tx_buf));
        if let Err(e) = parsed {
            self.nic.metrics.invalid();
            tracing::debug!(nic = %self.nic.id, error = %e, "malformed virtio-net TX chain");
            return false;
        }
        let (hdr, frame) = self.tx_buf.split_at(VNET_HDR_LEN);
        let hdr = VnetHdr::from_bytes(hdr.try_into().expect("header length"));
        self.tx_hdr = match hdr.check_tx(self.acked, frame.len()) {
            Ok(h) => h,
            Err(e) => {
                self.nic.metrics.invalid();
                tracing::debug!(nic = %self.nic.id, error = %e, "bad virtio-net TX header");
                return false;
            }
        };
        match frame::check_egress(
            frame,
            &self.tx_hdr,
            self.nic.mac,
            self.nic.ipv4_lock.as_deref(),
        ) {
            Ok(()) => true,
            Err(Refused::Spoofed { src }) => {
                self.nic.metrics.tx_spoofed();
                tracing::debug!(nic = %self.nic.id, %src, "frame with a forged source MAC dropped");
                false
            }
            Err(Refused::ForeignAddress { src }) => {
                self.nic.metrics.tx_spoofed();
                tracing::debug!(nic = %self.nic.id, %src, "frame from an address not the VIF's dropped");
                false
            }
            Err(why) => {
                self.nic.metrics.tx_dropped();
                tracing::debug!(nic = %self.nic.id, ?why, "frame from the guest dropped");
                false
            }
        }
    }

    fn throttle(&mut self, wait: Duration) {
        self.nic.metrics.tx_throttled();
        // A zero duration would disarm the timer.
        match self.timer.reset(wait.max(Duration::from_nanos(1)), None) {
            Ok(()) => self.throttled = true,
            Err(e) => {
                tracing::error!(nic = %self.nic.id, error = %e, "virtio-net rate-limit timer")
            }
        }
    }
}
