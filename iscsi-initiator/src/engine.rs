//! The full feature phase on one connection: one task owns the socket and every command
//! in flight on it.
//!
//! Requests arrive on a channel and wait in the session's queue until the CmdSN window
//! and the queue depth let them go; each gets an Initiator Task Tag (a slot index and a
//! generation, so a late PDU for a finished task never matches a new one). Outgoing PDUs
//! gather in a vector of buffers that one `writev` sends (write data is never copied);
//! incoming bytes are cut into PDUs, except that a long Data-In segment is read straight
//! into its command's buffer ("direct placement") instead of through the receive buffer.
//!
//! The engine answers R2Ts with Data-Out, target NOP-In pings with NOP-Outs, pings the
//! target itself when the connection is idle, aborts (ABORT TASK) and retries a command
//! that takes longer than the command timeout, and leaves by logging out when the caller
//! asks, when every handle is gone, or when the target asks (async event 1).
//!
//! When the connection fails the engine returns: commands in flight go back to the front
//! of the queue, in CmdSN order, for the session to send again on its next connection.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use iscsi_pdu::bhs::{
    self, BHS_LEN, DataIn, DataOut, Header, LogoutRequest, NopIn, NopOut, Opcode, R2t,
    RESERVED_TAG, ScsiCommand, ScsiResponse, TaskMgmtRequest, TaskMgmtResponse, async_event,
    reject_reason, tmf,
};
use iscsi_pdu::frame::{self, DIGEST_LEN, FrameConfig, RawPdu};
use iscsi_pdu::serial;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::config::{Negotiated, SessionConfig};
use crate::connection::ConnError;
use crate::error::Error;
use crate::journal::{self, Entry, Journal};
use crate::login::LoggedIn;
use crate::scsi::sense::{self, CommandInfo, Verdict};
use crate::session::Counters;
use crate::task::{Command, Done, Op, Outcome, Request};

/// Room reserved in the receive buffer before each read.
const RX_CHUNK: usize = 256 * 1024;
/// Data-In segments at least this long are placed straight into the command's buffer.
const DIRECT_MIN: usize = 16 * 1024;
/// Bytes queued for sending above which no new command is started.
const TX_HIGH_WATER: usize = 8 << 20;
/// Buffers one `writev` takes at most.
const MAX_IOV: usize = 64;
/// Pieces of write data shorter than this are copied into the header buffer.
const COPY_BELOW: usize = 2048;
/// Timer resolution of command timeouts and keepalive.
const TICK: Duration = Duration::from_millis(100);
/// Reads per wake-up before the engine looks at its other work.
const READS_PER_WAKE: usize = 32;

/// What one read from the socket gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Read {
    /// `n` bytes (0: the peer closed); `drained` when fewer came than there was room
    /// for, so the socket is empty for now.
    Data { n: usize, drained: bool },
    /// Nothing to read.
    Empty,
}

/// One read through `read`, which returns at most `want` bytes. A short read means the
/// socket is drained: its readiness is cleared at once (tokio keeps it if an event came
/// in meanwhile), which spares the read that would only have said EAGAIN.
fn read_once(
    stream: &TcpStream,
    want: usize,
    read: impl FnOnce() -> std::io::Result<usize>,
) -> std::io::Result<Read> {
    let mut short = None;
    let r = stream.try_io(Interest::READABLE, || {
        let n = read()?;
        if n > 0 && n < want {
            short = Some(n);
            return Err(std::io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    match r {
        Ok(n) => Ok(Read::Data { n, drained: false }),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(match short {
            Some(n) => Read::Data { n, drained: true },
            None => Read::Empty,
        }),
        Err(e) => Err(e),
    }
}

/// Why the engine returned.
#[derive(Debug)]
pub(crate) enum Exit {
    /// Logged out because a caller asked or every handle was dropped.
    LoggedOut,
    /// The target asked us to log out; log in again.
    Relogin,
    Failed(ConnError),
}

/// Who waits for a task.
#[derive(Debug)]
enum Owner {
    Caller(Request),
    /// Our ABORT TASK of a command that timed out.
    Abort {
        victim: u32,
    },
    /// Our NOP-Out ping of an idle connection.
    KeepAlive,
    /// Our Logout Request.
    Logout,
    /// A journaled write sent again on a new connection.
    Replay {
        entry: Entry,
        cmd: Command,
        attempts: u32,
    },
    /// Our own SYNCHRONIZE CACHE, when the journal grows past its limit.
    Flush {
        cmd: Command,
    },
}

#[derive(Debug)]
struct Task {
    itt: u32,
    owner: Owner,
    cmd_sn: u32,
    deadline: Instant,
    /// Data-In bytes placed so far.
    received: usize,
    next_data_sn: u32,
    /// Our ABORT TASK for this command, once it timed out.
    aborting: Option<u32>,
    /// For a SYNCHRONIZE CACHE: the journal mark it covers.
    flush_mark: u64,
}

impl Task {
    fn command(&mut self) -> Option<&mut Command> {
        match &mut self.owner {
            Owner::Caller(Request {
                op: Op::Scsi(c), ..
            })
            | Owner::Replay { cmd: c, .. }
            | Owner::Flush { cmd: c } => Some(c),
            _ => None,
        }
    }

    /// A SCSI command (of a caller or our own), which holds a CmdSN and a queue slot.
    fn is_scsi(&self) -> bool {
        match &self.owner {
            Owner::Caller(r) => r.is_scsi(),
            Owner::Replay { .. } | Owner::Flush { .. } => true,
            _ => false,
        }
    }
}

/// Tasks by ITT: the low 16 bits index a slot, the next 15 are the slot's generation.
#[derive(Debug, Default)]
struct Slots {
    slots: Vec<(u16, Option<Task>)>,
    free: Vec<u16>,
    live: usize,
}

impl Slots {
    fn insert(&mut self, make: impl FnOnce(u32) -> Task) -> Option<u32> {
        let idx = match self.free.pop() {
            Some(i) => i,
            None => {
                if self.slots.len() > usize::from(u16::MAX) {
                    return None;
                }
                self.slots.push((0, None));
                (self.slots.len() - 1) as u16
            }
        };
        let slot = &mut self.slots[usize::from(idx)];
        slot.0 = (slot.0 + 1) & 0x7fff;
        let itt = (u32::from(slot.0) << 16) | u32::from(idx);
        slot.1 = Some(make(itt));
        self.live += 1;
        Some(itt)
    }

    fn full(&self) -> bool {
        self.free.is_empty() && self.slots.len() > usize::from(u16::MAX)
    }

    fn get_mut(&mut self, itt: u32) -> Option<&mut Task> {
        let slot = self.slots.get_mut((itt & 0xffff) as usize)?;
        if u32::from(slot.0) != itt >> 16 {
            return None;
        }
        slot.1.as_mut()
    }

    fn remove(&mut self, itt: u32) -> Option<Task> {
        let idx = (itt & 0xffff) as usize;
        let slot = self.slots.get_mut(idx)?;
        if u32::from(slot.0) != itt >> 16 {
            return None;
        }
        let t = slot.1.take()?;
        self.free.push(idx as u16);
        self.live -= 1;
        Some(t)
    }

    fn drain(&mut self) -> Vec<Task> {
        let mut out = Vec::with_capacity(self.live);
        for (i, slot) in self.slots.iter_mut().enumerate() {
            if let Some(t) = slot.1.take() {
                out.push(t);
                self.free.push(i as u16);
            }
        }
        self.live = 0;
        out
    }

    fn itts(&self) -> impl Iterator<Item = (u32, &Task)> {
        self.slots
            .iter()
            .filter_map(|(_, t)| t.as_ref().map(|t| (t.itt, t)))
    }
}

/// Outgoing bytes: small pieces (headers, digests, short data) gathered in one buffer,
/// long data segments kept as they are, all sent with `writev`.
#[derive(Debug, Default)]
struct TxQueue {
    segs: VecDeque<Bytes>,
    small: BytesMut,
    len: usize,
}

impl TxQueue {
    fn push_small(&mut self, b: &[u8]) {
        self.small.extend_from_slice(b);
        self.len += b.len();
    }

    fn push_data(&mut self, d: Bytes) {
        if d.len() < COPY_BELOW {
            self.push_small(&d);
            return;
        }
        self.seal();
        self.len += d.len();
        self.segs.push_back(d);
    }

    fn seal(&mut self) {
        if !self.small.is_empty() {
            self.segs.push_back(self.small.split().freeze());
        }
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Writes what the socket takes now. `Ok(true)` when everything went.
    fn flush(&mut self, stream: &TcpStream) -> std::io::Result<bool> {
        self.seal();
        while !self.segs.is_empty() {
            let mut iov = [IoSlice::new(&[]); MAX_IOV];
            let n = self.segs.len().min(MAX_IOV);
            for (slot, seg) in iov.iter_mut().zip(self.segs.iter()) {
                *slot = IoSlice::new(seg);
            }
            match stream.try_write_vectored(&iov[..n]) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(mut written) => {
                    self.len -= written;
                    while written > 0 {
                        let front = self.segs.front_mut().expect("written bytes were queued");
                        if written >= front.len() {
                            written -= front.len();
                            self.segs.pop_front();
                        } else {
                            front.advance(written);
                            written = 0;
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }
}

/// A long Data-In segment being read straight into its command's buffer.
#[derive(Debug)]
struct Direct {
    header: DataIn,
    /// Where the segment starts in the command's buffer, and its length.
    seg_start: usize,
    seg_len: usize,
    /// Next byte to read, and how many are left.
    at: usize,
    remaining: usize,
    /// Padding and data digest after the segment.
    trailer: usize,
    /// The task went away (aborted): read the bytes and throw them away.
    discard: bool,
}

/// Why the engine is winding down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Why {
    /// A caller asked to log out.
    User,
    /// Every handle of the session is gone.
    Dropped,
    /// The target asked us to log out (async event 1).
    Target,
}

#[derive(Debug)]
enum Leaving {
    /// Waiting for the commands in flight to finish (until the deadline).
    Draining { why: Why, until: Instant },
    /// Logout Request sent.
    LoggingOut { why: Why },
}

pub(crate) struct Engine<'q> {
    stream: TcpStream,
    cfg: Arc<SessionConfig>,
    params: Negotiated,
    rx_cfg: FrameConfig,
    tx_cfg: FrameConfig,
    rx: BytesMut,
    direct: Option<Direct>,
    /// Bytes to read next on their own (the trailer of a direct placement and the next
    /// header), so that a following long segment is not pulled into `rx`.
    small_read: usize,
    scratch: Vec<u8>,
    tx: TxQueue,
    slots: Slots,
    /// Requests not yet sent, shared with the session across reconnects.
    queue: &'q mut VecDeque<Request>,
    /// Acknowledged writes not yet flushed, shared with the session likewise.
    journal: &'q mut Journal,
    /// Journal entries still to replay on this connection, oldest first, with the
    /// attempts each has had.
    replay: VecDeque<(Entry, u32)>,
    /// Replays in flight, whose ranges later replays must not overlap.
    replaying: Vec<Entry>,
    /// Our own flushes in flight, and when we may try again after one failed.
    own_flushes: usize,
    own_flush_after: Instant,
    /// Requests in `queue` that are not SCSI commands (they skip the window).
    immediate_queued: usize,
    scsi_in_flight: usize,
    cmd_sn: u32,
    exp_cmd_sn: u32,
    max_cmd_sn: u32,
    exp_stat_sn: u32,
    last_rx: Instant,
    /// When the CmdSN window closed with commands waiting.
    window_closed_since: Option<Instant>,
    keepalive: Option<u32>,
    leaving: Option<Leaving>,
    /// Who asked to log out, answered once the logout is done.
    logout_reply: Option<Request>,
    exit: Option<Exit>,
    completed: usize,
    counters: Arc<Counters>,
}

impl<'q> Engine<'q> {
    pub fn new(
        logged: LoggedIn,
        cfg: Arc<SessionConfig>,
        queue: &'q mut VecDeque<Request>,
        journal: &'q mut Journal,
        counters: Arc<Counters>,
    ) -> Self {
        let immediate_queued = queue.iter().filter(|r| !r.is_scsi()).count();
        // Every new connection first writes again what was acknowledged and not
        // flushed: the target may have lost it (see `journal`).
        journal.reconnected();
        let replay: VecDeque<(Entry, u32)> = journal.entries().map(|e| (e.clone(), 0)).collect();
        if !replay.is_empty() {
            tracing::info!(
                commands = replay.len(),
                bytes = journal.bytes(),
                "replaying acknowledged writes not yet flushed"
            );
        }
        Self {
            stream: logged.framed.stream,
            params: logged.params,
            rx_cfg: logged.framed.rx_cfg,
            tx_cfg: logged.framed.tx_cfg,
            rx: logged.framed.rx,
            direct: None,
            small_read: 0,
            scratch: vec![0u8; 64 * 1024],
            tx: TxQueue::default(),
            slots: Slots::default(),
            queue,
            journal,
            replay,
            replaying: Vec::new(),
            own_flushes: 0,
            own_flush_after: Instant::now(),
            immediate_queued,
            scsi_in_flight: 0,
            cmd_sn: logged.cmd_sn,
            exp_cmd_sn: logged.exp_cmd_sn,
            max_cmd_sn: logged.max_cmd_sn,
            exp_stat_sn: logged.exp_stat_sn,
            last_rx: Instant::now(),
            window_closed_since: None,
            keepalive: None,
            leaving: None,
            logout_reply: None,
            exit: None,
            completed: 0,
            counters,
            cfg,
        }
    }

    /// Runs until the connection fails or the session logs out. Commands in flight are
    /// back in the queue when this returns.
    pub async fn run(mut self, submissions: &mut mpsc::Receiver<Request>) -> Exit {
        let mut exit = self.serve(submissions).await;
        if let Exit::Failed(e) = &exit
            && let Some(
                Leaving::LoggingOut {
                    why: Why::User | Why::Dropped,
                }
                | Leaving::Draining {
                    why: Why::User | Why::Dropped,
                    ..
                },
            ) = &self.leaving
        {
            // Leaving anyway: a connection lost on the way out is as good as a logout.
            tracing::debug!(error = %e, "connection lost while logging out");
            exit = Exit::LoggedOut;
        }
        self.teardown();
        exit
    }

    async fn serve(&mut self, submissions: &mut mpsc::Receiver<Request>) -> Exit {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut accepting = true;
        // Bytes that came with the last login response belong to the full feature phase.
        if !self.rx.is_empty()
            && let Err(e) = self.process_rx()
        {
            return Exit::Failed(e);
        }
        let mut next_check = Instant::now() + TICK;
        let mut busy = false;
        loop {
            // Timers are checked here too: on a busy connection the socket is always
            // ready and the tick branch below would never be polled.
            let now = Instant::now();
            if now >= next_check {
                next_check = now + TICK;
                if let Err(e) = self.on_tick() {
                    return Exit::Failed(e);
                }
            }
            if self.completed > 0 && busy {
                // The socket still has data: let the callers whose commands just finished
                // run and submit their next ones before reading on. (When it is drained
                // they run anyway while this task waits, and their submissions leave
                // together in one write.)
                tokio::task::yield_now().await;
            }
            self.completed = 0;
            busy = false;
            if accepting {
                for _ in 0..1024 {
                    match submissions.try_recv() {
                        Ok(r) => self.enqueue(r),
                        Err(_) => break,
                    }
                }
            }
            self.pump();
            if let Err(e) = self.flush() {
                return Exit::Failed(e);
            }
            if let Some(exit) = self.exit.take() {
                return exit;
            }
            let interest = if self.tx.is_empty() {
                Interest::READABLE
            } else {
                Interest::READABLE | Interest::WRITABLE
            };
            tokio::select! {
                biased;
                ready = self.stream.ready(interest) => match ready {
                    Ok(r) => {
                        if r.is_readable() || r.is_read_closed() {
                            match self.on_readable() {
                                Ok(drained) => busy = !drained,
                                // A logout answered just before the close still counts.
                                Err(e) => return self.exit.take().unwrap_or(Exit::Failed(e)),
                            }
                        }
                    }
                    Err(e) => return Exit::Failed(ConnError::Io(e)),
                },
                req = submissions.recv(), if accepting => match req {
                    Some(r) => self.enqueue(r),
                    None => {
                        accepting = false;
                        if self.leaving.is_none() {
                            self.begin_leaving(Why::Dropped);
                        }
                    }
                },
                _ = tick.tick() => {}
            }
        }
    }

    fn enqueue(&mut self, r: Request) {
        if !r.is_scsi() {
            self.immediate_queued += 1;
        }
        self.queue.push_back(r);
    }

    /// Puts every command in flight back at the front of the queue, oldest first.
    fn teardown(&mut self) {
        let mut tasks = self.slots.drain();
        let base = self.exp_cmd_sn;
        tasks.sort_by_key(|t| t.cmd_sn.wrapping_sub(base));
        for t in tasks.into_iter().rev() {
            if let Owner::Caller(mut req) = t.owner {
                if t.aborting.is_some() {
                    req.timeouts += 1;
                }
                if req.timeouts > self.cfg.max_retries {
                    self.fail_timeout(req);
                } else {
                    self.counters.retries.fetch_add(1, Ordering::Relaxed);
                    self.queue.push_front(req);
                }
            }
        }
        // Logged out: the session closes and answers it (with everything still queued)
        // once its state says so. Not logged out: the session sends it again after
        // the next login.
        if let Some(reply) = self.logout_reply.take() {
            self.queue.push_front(reply);
        }
        self.counters
            .in_flight
            .store(0, std::sync::atomic::Ordering::Relaxed);
    }

    fn fail_timeout(&self, req: Request) {
        let err = Error::Timeout {
            command: req.name,
            attempts: req.timeouts,
            each: self.cfg.timeouts.command,
        };
        req.finish(Err(err));
    }

    // ---- sending ----

    fn flush(&mut self) -> Result<(), ConnError> {
        if self.tx.is_empty() {
            return Ok(());
        }
        self.counters.sends.fetch_add(1, Ordering::Relaxed);
        self.tx
            .flush(&self.stream)
            .map(|_| ())
            .map_err(ConnError::Io)
    }

    fn push_pdu(&mut self, h: &Header, data: Bytes) {
        let eh = frame::encode_header(h, data.len(), &self.tx_cfg);
        self.tx.push_small(eh.as_bytes());
        if !data.is_empty() {
            let tr = frame::trailer(&data, &self.tx_cfg);
            self.tx.push_data(data);
            self.tx.push_small(tr.as_bytes());
        }
    }

    /// Sends what the queue holds as far as the window, the queue depth and the send
    /// buffer allow.
    fn pump(&mut self) {
        if self.immediate_queued > 0 {
            let mut i = 0;
            while i < self.queue.len() && self.immediate_queued > 0 {
                if self.queue[i].is_scsi() {
                    i += 1;
                    continue;
                }
                let r = self.queue.remove(i).expect("index checked");
                self.immediate_queued -= 1;
                self.send_immediate(r);
            }
        }
        self.pump_own();
        // Callers' commands wait until every replay is done.
        while self.replay.is_empty() && self.replaying.is_empty() {
            let Some(front) = self.queue.front() else {
                break;
            };
            if front.abandoned() {
                self.queue.pop_front();
                continue;
            }
            let write = front
                .command()
                .is_some_and(|c| journal::kind(&c.cdb) == journal::Kind::Volatile);
            if write && self.own_flushes > 0 && self.journal.full() {
                // The journal is full and our flush will empty it: writes wait for it
                // rather than push out entries a replay would need.
                break;
            }
            if !self.can_send_command() {
                break;
            }
            let req = self.queue.pop_front().expect("front checked");
            self.send_command(Owner::Caller(req));
        }
        if self.queue.is_empty() || serial::le(self.cmd_sn, self.max_cmd_sn) {
            self.window_closed_since = None;
        }
        if let Some(Leaving::Draining { why, until }) = self.leaving
            && (self.scsi_in_flight == 0 || Instant::now() >= until)
        {
            self.send_logout(why);
        }
    }

    /// Registers a task. Callers check [`Slots::full`] first.
    fn new_task(&mut self, owner: Owner, cmd_sn: u32, limit: Duration) -> u32 {
        let deadline = Instant::now() + limit;
        self.slots
            .insert(|itt| Task {
                itt,
                owner,
                cmd_sn,
                deadline,
                received: 0,
                next_data_sn: 0,
                aborting: None,
                flush_mark: 0,
            })
            .expect("callers check for a free slot")
    }

    /// Whether one more SCSI command may go now: window open, queue depth and send
    /// buffer not exhausted, not leaving.
    fn can_send_command(&mut self) -> bool {
        let depth = self.cfg.limits.queue_depth.max(1) as usize;
        if self.leaving.is_some()
            || self.scsi_in_flight >= depth
            || self.tx.len > TX_HIGH_WATER
            || self.slots.full()
        {
            return false;
        }
        if !serial::le(self.cmd_sn, self.max_cmd_sn) {
            self.window_closed_since.get_or_insert_with(Instant::now);
            return false;
        }
        true
    }

    /// Sends a SCSI command (a caller's, a replay, or our own flush) with the next CmdSN:
    /// the command PDU with any immediate data, then any unsolicited Data-Out.
    fn send_command(&mut self, owner: Owner) {
        let cmd_sn = self.cmd_sn;
        let itt = self.new_task(owner, cmd_sn, self.cfg.timeouts.command);
        let mark = self.journal.mark();
        let task = self.slots.get_mut(itt).expect("just inserted");
        let cmd = task.command().expect("only commands are sent here");
        let (lun, cdb, attr) = (cmd.lun, cmd.cdb, cmd.attr);
        let data_out = cmd.data_out.clone();
        let read_len = cmd.data_in.len();
        if journal::kind(&cdb) == journal::Kind::Flush {
            task.flush_mark = mark;
        }
        let write_len = data_out.len();
        self.cmd_sn = self.cmd_sn.wrapping_add(1);
        self.scsi_in_flight += 1;
        let in_flight = self.scsi_in_flight as u64;
        self.counters.commands.fetch_add(1, Ordering::Relaxed);
        self.counters.in_flight.store(in_flight, Ordering::Relaxed);
        self.counters
            .max_in_flight
            .fetch_max(in_flight, Ordering::Relaxed);
        let p = self.params;
        let max_seg = p.max_xmit_data_segment as usize;
        let first_burst = p.first_burst as usize;
        let immediate = if p.immediate_data {
            write_len.min(first_burst).min(max_seg)
        } else {
            0
        };
        let unsolicited = if p.initial_r2t {
            immediate
        } else {
            write_len.min(first_burst)
        };
        let h = ScsiCommand {
            immediate: false,
            final_: unsolicited <= immediate,
            read: read_len > 0,
            write: write_len > 0,
            attr,
            lun,
            itt,
            expected_data_len: if write_len > 0 { write_len } else { read_len } as u32,
            cmd_sn,
            exp_stat_sn: self.exp_stat_sn,
            cdb,
        };
        self.push_pdu(&Header::ScsiCommand(h), data_out.slice(..immediate));
        if unsolicited > immediate {
            self.send_data_out(
                lun,
                itt,
                RESERVED_TAG,
                &data_out,
                immediate,
                unsolicited - immediate,
            );
        }
    }

    /// Replays journaled writes (never two overlapping ones at once, so none can land
    /// after a newer one), and flushes by ourselves when the journal is over its limit.
    fn pump_own(&mut self) {
        while let Some((e, _)) = self.replay.front() {
            if self.replaying.iter().any(|r| r.overlaps(e)) || !self.can_send_command() {
                return;
            }
            let (entry, attempts) = self.replay.pop_front().expect("front checked");
            self.replaying.push(entry.clone());
            self.counters.replayed.fetch_add(1, Ordering::Relaxed);
            let cmd = entry.command();
            self.send_command(Owner::Replay {
                entry,
                cmd,
                attempts,
            });
        }
        if !self.replaying.is_empty()
            || self.own_flushes > 0
            || !self.journal.wants_flush()
            || Instant::now() < self.own_flush_after
        {
            return;
        }
        let mut luns: Vec<u64> = self.journal.entries().map(|e| e.lun).collect();
        luns.sort_unstable();
        luns.dedup();
        for lun in luns {
            if !self.can_send_command() {
                return;
            }
            let cdb = crate::scsi::sync_cache::cdb();
            self.own_flushes += 1;
            self.send_command(Owner::Flush {
                cmd: Command::new(lun, &cdb),
            });
        }
    }

    /// Data-Out PDUs for `len` bytes from `offset`: one sequence (DataSN from 0, F on
    /// the last), each PDU within the target's MaxRecvDataSegmentLength.
    fn send_data_out(
        &mut self,
        lun: u64,
        itt: u32,
        ttt: u32,
        data: &Bytes,
        offset: usize,
        len: usize,
    ) {
        let max_seg = (self.params.max_xmit_data_segment as usize).max(512);
        let end = offset + len;
        let mut at = offset;
        let mut data_sn = 0u32;
        while at < end {
            let n = max_seg.min(end - at);
            let h = DataOut {
                final_: at + n == end,
                lun,
                itt,
                ttt,
                exp_stat_sn: self.exp_stat_sn,
                data_sn,
                buffer_offset: at as u32,
            };
            self.push_pdu(&Header::DataOut(h), data.slice(at..at + n));
            at += n;
            data_sn = data_sn.wrapping_add(1);
        }
    }

    fn send_immediate(&mut self, req: Request) {
        if req.abandoned() {
            return;
        }
        let limit = self.cfg.timeouts.task_management;
        if self.slots.full() && !matches!(req.op, Op::Logout) {
            req.finish(Err(Error::InvalidArgument {
                reason: "too many tasks in flight".into(),
            }));
            return;
        }
        match &req.op {
            Op::TaskManagement { function, lun } => {
                let (function, lun) = (*function, *lun);
                let itt = self.new_task(Owner::Caller(req), self.cmd_sn, limit);
                self.push_tmf(function, lun, itt, RESERVED_TAG, 0);
            }
            Op::Ping => {
                let itt = self.new_task(Owner::Caller(req), self.cmd_sn, limit);
                self.push_ping(itt);
            }
            Op::Logout => {
                if self.leaving.is_none() && self.logout_reply.is_none() {
                    self.logout_reply = Some(req);
                    self.begin_leaving(Why::User);
                } else if self.logout_reply.is_none() {
                    self.logout_reply = Some(req);
                } else {
                    req.finish(Ok(Done::Logout));
                }
            }
            Op::Scsi(_) => unreachable!("SCSI commands are not immediate"),
        }
    }

    fn push_tmf(&mut self, function: u8, lun: u64, itt: u32, referenced: u32, ref_cmd_sn: u32) {
        let h = TaskMgmtRequest {
            immediate: true,
            function,
            lun,
            itt,
            referenced_task_tag: referenced,
            cmd_sn: self.cmd_sn,
            exp_stat_sn: self.exp_stat_sn,
            ref_cmd_sn,
            exp_data_sn: 0,
        };
        self.push_pdu(&Header::TaskMgmtRequest(h), Bytes::new());
    }

    fn push_ping(&mut self, itt: u32) {
        let h = NopOut {
            immediate: true,
            lun: 0,
            itt,
            ttt: RESERVED_TAG,
            cmd_sn: self.cmd_sn,
            exp_stat_sn: self.exp_stat_sn,
        };
        self.counters.pings.fetch_add(1, Ordering::Relaxed);
        self.push_pdu(&Header::NopOut(h), Bytes::new());
    }

    fn begin_leaving(&mut self, why: Why) {
        let grace = match why {
            Why::User | Why::Dropped => self.cfg.timeouts.task_management,
            Why::Target => Duration::from_secs(2),
        };
        self.leaving = Some(Leaving::Draining {
            why,
            until: Instant::now() + grace,
        });
    }

    fn send_logout(&mut self, why: Why) {
        let limit = self.cfg.timeouts.task_management;
        if self.slots.full() {
            self.exit = Some(Exit::Failed(ConnError::protocol("no task slot for logout")));
            return;
        }
        let itt = self.new_task(Owner::Logout, self.cmd_sn, limit);
        let h = LogoutRequest {
            immediate: true,
            reason: 0,
            itt,
            cid: 0,
            cmd_sn: self.cmd_sn,
            exp_stat_sn: self.exp_stat_sn,
        };
        self.push_pdu(&Header::LogoutRequest(h), Bytes::new());
        self.leaving = Some(Leaving::LoggingOut { why });
    }

    // ---- timers ----

    fn on_tick(&mut self) -> Result<(), ConnError> {
        let now = Instant::now();
        let expired: Vec<u32> = self
            .slots
            .itts()
            .filter(|(_, t)| now >= t.deadline)
            .map(|(itt, _)| itt)
            .collect();
        for itt in expired {
            let Some(task) = self.slots.get_mut(itt) else {
                continue;
            };
            match &task.owner {
                Owner::Caller(r) if r.is_scsi() => {
                    if task.aborting.is_some() {
                        continue;
                    }
                    tracing::warn!(command = r.name, itt, "command timed out; aborting it");
                    let (cmd_sn, lun) = (task.cmd_sn, task.command().map_or(0, |c| c.lun));
                    let limit = self.cfg.timeouts.task_management;
                    if self.slots.full() {
                        return Err(ConnError::protocol("no task slot for ABORT TASK"));
                    }
                    let abort = self.new_task(Owner::Abort { victim: itt }, self.cmd_sn, limit);
                    if let Some(task) = self.slots.get_mut(itt) {
                        task.aborting = Some(abort);
                    }
                    self.counters.aborts.fetch_add(1, Ordering::Relaxed);
                    self.push_tmf(tmf::ABORT_TASK, lun, abort, itt, cmd_sn);
                }
                Owner::Caller(r) => {
                    return Err(ConnError::Timeout {
                        what: r.name,
                        after: self.cfg.timeouts.task_management,
                    });
                }
                Owner::Replay { .. } | Owner::Flush { .. } => {
                    // Our own commands: the next connection replays or flushes again.
                    return Err(ConnError::Timeout {
                        what: "replayed write or own flush",
                        after: self.cfg.timeouts.command,
                    });
                }
                Owner::Abort { .. } => {
                    return Err(ConnError::Timeout {
                        what: "ABORT TASK",
                        after: self.cfg.timeouts.task_management,
                    });
                }
                Owner::KeepAlive => {
                    return Err(ConnError::Timeout {
                        what: "NOP-Out ping",
                        after: self.cfg.timeouts.nop_timeout,
                    });
                }
                Owner::Logout => {
                    tracing::warn!("logout not answered; closing the connection");
                    let why = match self.leaving {
                        Some(Leaving::LoggingOut { why }) => why,
                        _ => Why::User,
                    };
                    self.slots.remove(itt);
                    self.exit = Some(match why {
                        Why::Target => Exit::Relogin,
                        _ => Exit::LoggedOut,
                    });
                    return Ok(());
                }
            }
        }
        if let Some(since) = self.window_closed_since
            && now.duration_since(since) >= self.cfg.timeouts.command
        {
            return Err(ConnError::protocol(format!(
                "the CmdSN window stayed closed for {:?}",
                self.cfg.timeouts.command
            )));
        }
        if let Some(interval) = self.cfg.timeouts.nop_interval
            && self.keepalive.is_none()
            && self.leaving.is_none()
            && now.duration_since(self.last_rx) >= interval
        {
            let limit = self.cfg.timeouts.nop_timeout;
            if !self.slots.full() {
                let itt = self.new_task(Owner::KeepAlive, self.cmd_sn, limit);
                self.keepalive = Some(itt);
                self.push_ping(itt);
            }
        }
        if let Some(Leaving::Draining { why, until }) = self.leaving
            && now >= until
        {
            self.send_logout(why);
        }
        Ok(())
    }

    // ---- receiving ----

    /// Reads and handles what the socket has. Returns whether the socket was drained
    /// (false when it stopped after [`READS_PER_WAKE`] reads with more to come).
    fn on_readable(&mut self) -> Result<bool, ConnError> {
        for _ in 0..READS_PER_WAKE {
            if self.exit.is_some() {
                return Ok(true);
            }
            let read = if let Some(d) = self.direct.as_mut().filter(|d| d.remaining > 0) {
                let buf: &mut [u8] =
                    match self.slots.get_mut(d.header.itt).and_then(|t| t.command()) {
                        Some(cmd) if !d.discard => &mut cmd.data_in[d.at..d.at + d.remaining],
                        _ => {
                            d.discard = true;
                            let n = d.remaining.min(self.scratch.len());
                            &mut self.scratch[..n]
                        }
                    };
                let want = buf.len();
                let stream = &self.stream;
                let read = read_once(stream, want, || stream.try_read(buf));
                if let Ok(Read::Data { n, .. }) = read {
                    d.at += n;
                    d.remaining -= n;
                    if d.remaining == 0 {
                        // Read just the trailer and the next header: if that is another
                        // long Data-In, its segment goes straight to its buffer too
                        // instead of through the receive buffer.
                        let hd = if self.rx_cfg.header_digest {
                            DIGEST_LEN
                        } else {
                            0
                        };
                        self.small_read = d.trailer + BHS_LEN + hd;
                    }
                }
                read
            } else if self.small_read > 0 {
                let mut head = [0u8; BHS_LEN + 2 * DIGEST_LEN + 3];
                let want = self.small_read.min(head.len());
                let stream = &self.stream;
                let read = read_once(stream, want, || stream.try_read(&mut head[..want]));
                if let Ok(Read::Data { n, .. }) = read {
                    self.small_read -= n;
                    self.rx.extend_from_slice(&head[..n]);
                }
                read
            } else {
                self.rx.reserve(RX_CHUNK);
                let want = self.rx.capacity() - self.rx.len();
                let (stream, rx) = (&self.stream, &mut self.rx);
                read_once(stream, want, || stream.try_read_buf(rx))
            };
            match read {
                Ok(Read::Data { n: 0, .. }) => return Err(ConnError::Closed),
                Ok(Read::Data { drained, .. }) => {
                    self.last_rx = Instant::now();
                    self.process_rx()?;
                    if drained {
                        return Ok(true);
                    }
                }
                Ok(Read::Empty) => return Ok(true),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ConnError::Io(e)),
            }
        }
        Ok(false)
    }

    /// Handles every whole PDU in the receive buffer, and starts direct placement of a
    /// long Data-In segment whose header is there.
    fn process_rx(&mut self) -> Result<(), ConnError> {
        loop {
            if let Some(d) = &self.direct {
                if d.remaining > 0 || self.rx.len() < d.trailer {
                    return Ok(());
                }
                let d = self.direct.take().expect("checked");
                self.finish_direct(d)?;
                continue;
            }
            let Some(total) = frame::frame_len(&self.rx, &self.rx_cfg).map_err(ConnError::Pdu)?
            else {
                return Ok(());
            };
            if self.rx.len() >= total {
                let pdu = frame::decode(&mut self.rx, &self.rx_cfg)
                    .map_err(ConnError::Pdu)?
                    .expect("a whole frame is buffered");
                self.handle(pdu)?;
                continue;
            }
            if !self.start_direct()? {
                return Ok(());
            }
        }
    }

    /// Starts direct placement when the buffer holds the header of a long Data-In whose
    /// segment has not all arrived. Returns whether it did.
    fn start_direct(&mut self) -> Result<bool, ConnError> {
        let Some(bhs) = self.rx.first_chunk::<BHS_LEN>() else {
            return Ok(false);
        };
        if Opcode::from_byte(bhs[0]).ok() != Some(Opcode::DataIn) {
            return Ok(false);
        }
        let ahs = bhs::total_ahs_len(bhs);
        let data_len = bhs::data_segment_len(bhs);
        let hd = if self.rx_cfg.header_digest {
            DIGEST_LEN
        } else {
            0
        };
        let head = BHS_LEN + ahs + hd;
        if data_len < DIRECT_MIN || self.rx.len() < head {
            return Ok(false);
        }
        if hd > 0 {
            let expected = frame::crc32c(&[&self.rx[..BHS_LEN + ahs]]);
            let d = &self.rx[BHS_LEN + ahs..head];
            let got = u32::from_le_bytes([d[0], d[1], d[2], d[3]]);
            if expected != got {
                return Err(ConnError::Pdu(iscsi_pdu::PduError::HeaderDigest {
                    expected,
                    got,
                }));
            }
        }
        let Header::DataIn(h) = Header::parse(bhs).map_err(ConnError::Pdu)? else {
            return Ok(false);
        };
        let offset = h.buffer_offset as usize;
        let Some(task) = self.slots.get_mut(h.itt) else {
            // Unknown task: let the whole frame arrive and be dropped as usual.
            return Ok(false);
        };
        let expected_sn = task.next_data_sn;
        let Some(cmd) = task.command() else {
            return Ok(false);
        };
        if h.data_sn != expected_sn || offset + data_len > cmd.data_in.len() {
            // Invalid: the whole-frame path reports it.
            return Ok(false);
        }
        self.rx.advance(head);
        let have = self.rx.len().min(data_len);
        cmd.data_in[offset..offset + have].copy_from_slice(&self.rx[..have]);
        self.rx.advance(have);
        let trailer = frame::pad_len(data_len)
            + if self.rx_cfg.data_digest {
                DIGEST_LEN
            } else {
                0
            };
        self.counters
            .direct_bytes
            .fetch_add(data_len as u64, Ordering::Relaxed);
        self.direct = Some(Direct {
            header: h,
            seg_start: offset,
            seg_len: data_len,
            at: offset + have,
            remaining: data_len - have,
            trailer,
            discard: false,
        });
        Ok(true)
    }

    /// The segment of a direct placement is in: check padding and digest, then account
    /// for the Data-In as if it had come whole.
    fn finish_direct(&mut self, d: Direct) -> Result<(), ConnError> {
        let pad = frame::pad_len(d.seg_len);
        if self.rx_cfg.data_digest && !d.discard {
            let digest = &self.rx[pad..pad + DIGEST_LEN];
            let got = u32::from_le_bytes([digest[0], digest[1], digest[2], digest[3]]);
            let cmd = self
                .slots
                .get_mut(d.header.itt)
                .and_then(|t| t.command())
                .ok_or_else(|| ConnError::protocol("direct placement lost its task"))?;
            let seg = &cmd.data_in[d.seg_start..d.seg_start + d.seg_len];
            let expected = frame::crc32c(&[seg, &self.rx[..pad]]);
            if expected != got {
                return Err(ConnError::Pdu(iscsi_pdu::PduError::DataDigest {
                    itt: d.header.itt,
                    expected,
                    got,
                }));
            }
        }
        self.rx.advance(d.trailer);
        self.note_numbers(&Header::DataIn(d.header));
        if d.discard {
            return Ok(());
        }
        self.data_in_placed(d.header, d.seg_len)
    }

    fn handle(&mut self, pdu: RawPdu) -> Result<(), ConnError> {
        let h = pdu.header().map_err(ConnError::Pdu)?;
        self.note_numbers(&h);
        match h {
            Header::DataIn(d) => self.data_in(d, pdu.data),
            Header::ScsiResponse(r) => self.scsi_response(r, pdu.data),
            Header::R2t(r) => self.r2t(r),
            Header::NopIn(n) => {
                self.nop_in(n, pdu.data);
                Ok(())
            }
            Header::TaskMgmtResponse(t) => self.tmf_response(t),
            Header::LogoutResponse(l) => {
                self.logout_response(l.itt, l.response);
                Ok(())
            }
            Header::AsyncMessage(m) => {
                self.async_message(m, &pdu.data);
                Ok(())
            }
            Header::Reject(r) => self.reject(r.reason, &pdu.data),
            Header::TextResponse(t) => {
                tracing::debug!(itt = t.itt, "unsolicited text response ignored");
                Ok(())
            }
            other => Err(ConnError::protocol(format!(
                "{:?} from the target in the full feature phase",
                other.opcode()
            ))),
        }
    }

    /// StatSN and the CmdSN window from any target PDU that carries them.
    fn note_numbers(&mut self, h: &Header) {
        let (stat, window) = match h {
            Header::ScsiResponse(r) => (Some(r.stat_sn), Some((r.exp_cmd_sn, r.max_cmd_sn))),
            Header::DataIn(d) => (
                d.has_status.then_some(d.stat_sn),
                Some((d.exp_cmd_sn, d.max_cmd_sn)),
            ),
            Header::R2t(r) => (None, Some((r.exp_cmd_sn, r.max_cmd_sn))),
            Header::NopIn(n) => (
                (n.itt != RESERVED_TAG).then_some(n.stat_sn),
                Some((n.exp_cmd_sn, n.max_cmd_sn)),
            ),
            Header::TaskMgmtResponse(t) => (Some(t.stat_sn), Some((t.exp_cmd_sn, t.max_cmd_sn))),
            Header::LogoutResponse(l) => (Some(l.stat_sn), Some((l.exp_cmd_sn, l.max_cmd_sn))),
            Header::TextResponse(t) => (Some(t.stat_sn), Some((t.exp_cmd_sn, t.max_cmd_sn))),
            Header::AsyncMessage(m) => (Some(m.stat_sn), Some((m.exp_cmd_sn, m.max_cmd_sn))),
            Header::Reject(r) => (Some(r.stat_sn), Some((r.exp_cmd_sn, r.max_cmd_sn))),
            _ => (None, None),
        };
        if let Some(s) = stat
            && serial::ge(s, self.exp_stat_sn)
        {
            self.exp_stat_sn = s.wrapping_add(1);
        }
        if let Some((exp, max)) = window
            // A MaxCmdSN below ExpCmdSN - 1 is invalid and ignored (RFC 7143 §4.2.2.1).
            && serial::ge(max, exp.wrapping_sub(1))
        {
            if serial::gt(exp, self.exp_cmd_sn) {
                self.exp_cmd_sn = exp;
            }
            if serial::gt(max, self.max_cmd_sn) {
                self.max_cmd_sn = max;
            }
        }
    }

    fn data_in(&mut self, d: DataIn, data: Bytes) -> Result<(), ConnError> {
        let Some(task) = self.slots.get_mut(d.itt) else {
            tracing::trace!(itt = d.itt, "Data-In for a task no longer here");
            return Ok(());
        };
        let expected_sn = task.next_data_sn;
        let Some(cmd) = task.command() else {
            return Err(ConnError::protocol(
                "Data-In for a task that is not a command",
            ));
        };
        let offset = d.buffer_offset as usize;
        if d.data_sn != expected_sn {
            return Err(ConnError::protocol(format!(
                "Data-In DataSN {} where {expected_sn} was due",
                d.data_sn
            )));
        }
        if offset + data.len() > cmd.data_in.len() {
            return Err(ConnError::protocol(format!(
                "Data-In of {} bytes at {offset} beyond the {} expected",
                data.len(),
                cmd.data_in.len()
            )));
        }
        cmd.data_in[offset..offset + data.len()].copy_from_slice(&data);
        self.data_in_placed(d, data.len())
    }

    /// Accounts for a Data-In whose data is in place; completes the command when it
    /// carries the status.
    fn data_in_placed(&mut self, d: DataIn, len: usize) -> Result<(), ConnError> {
        let Some(task) = self.slots.get_mut(d.itt) else {
            return Ok(());
        };
        task.next_data_sn = task.next_data_sn.wrapping_add(1);
        task.received = task.received.max(d.buffer_offset as usize + len);
        if !d.has_status {
            return Ok(());
        }
        if !d.final_ {
            return Err(ConnError::protocol("Data-In with status but without F"));
        }
        self.complete_scsi(d.itt, 0, d.status, None);
        Ok(())
    }

    fn scsi_response(&mut self, r: ScsiResponse, data: Bytes) -> Result<(), ConnError> {
        if self.slots.get_mut(r.itt).is_some_and(|t| !t.is_scsi()) {
            return Err(ConnError::protocol(
                "SCSI Response for a task that is not a command",
            ));
        }
        let sense = if data.len() >= 2 {
            let n = usize::from(u16::from_be_bytes([data[0], data[1]]));
            (n > 0).then(|| data.slice(2..(2 + n).min(data.len())))
        } else {
            None
        };
        self.complete_scsi(r.itt, r.response, r.status, sense);
        Ok(())
    }

    fn complete_scsi(&mut self, itt: u32, response: u8, status: u8, sense: Option<Bytes>) {
        let Some(task) = self.slots.remove(itt) else {
            tracing::trace!(itt, "response for a task no longer here");
            return;
        };
        if let Some(abort) = task.aborting {
            // The command finished after all: forget the abort's victim.
            if let Some(a) = self.slots.get_mut(abort) {
                a.owner = Owner::Abort {
                    victim: RESERVED_TAG,
                };
            }
        }
        self.scsi_in_flight -= 1;
        self.completed += 1;
        self.counters
            .in_flight
            .store(self.scsi_in_flight as u64, Ordering::Relaxed);
        let good = response == 0 && status == sense::status::GOOD;
        match task.owner {
            Owner::Caller(req) => {
                let Request { op, reply, .. } = req;
                let Op::Scsi(command) = op else {
                    return;
                };
                let mut writes_lost = false;
                if good {
                    match journal::kind(&command.cdb) {
                        journal::Kind::Volatile => self.journal.record(&command),
                        journal::Kind::Flush => {
                            self.journal.flushed(command.lun, task.flush_mark);
                            writes_lost = std::mem::take(&mut self.journal.lost);
                        }
                        journal::Kind::Other => {}
                    }
                }
                let _ = reply.send(Ok(Done::Scsi(Outcome {
                    command,
                    received: task.received,
                    response,
                    status,
                    sense,
                    writes_lost,
                })));
            }
            Owner::Replay {
                entry, attempts, ..
            } => {
                self.replaying.retain(|e| e.seq != entry.seq);
                if good {
                    return;
                }
                let info = CommandInfo::named("replayed write");
                let verdict = if response == 0 {
                    sense::classify(&info, status, sense.as_deref())
                } else {
                    Verdict::Retry {
                        delay_ms: 0,
                        why: "target failure",
                    }
                };
                match verdict {
                    Verdict::Done => {}
                    Verdict::Retry { .. } if attempts < self.cfg.max_retries => {
                        self.replay.push_front((entry, attempts + 1));
                    }
                    Verdict::Retry { why, .. } => {
                        tracing::error!(why, "a replayed write kept failing; it may be lost");
                        self.journal.lost = true;
                    }
                    Verdict::Fail(e) => {
                        tracing::error!(error = %e, "the target refused a replayed write; it may be lost");
                        self.journal.lost = true;
                    }
                }
            }
            Owner::Flush { cmd } => {
                self.own_flushes -= 1;
                if good {
                    self.counters.own_flushes.fetch_add(1, Ordering::Relaxed);
                    self.journal.flushed(cmd.lun, task.flush_mark);
                } else {
                    tracing::warn!(status, response, "our own SYNCHRONIZE CACHE failed");
                    self.own_flush_after = Instant::now() + Duration::from_secs(1);
                }
            }
            _ => {}
        }
    }

    fn r2t(&mut self, r: R2t) -> Result<(), ConnError> {
        let Some(task) = self.slots.get_mut(r.itt) else {
            tracing::trace!(itt = r.itt, "R2T for a task no longer here");
            return Ok(());
        };
        if task.aborting.is_some() {
            return Ok(());
        }
        let Some(cmd) = task.command() else {
            return Err(ConnError::protocol("R2T for a task that is not a command"));
        };
        let (offset, len) = (r.buffer_offset as usize, r.desired_len as usize);
        if len == 0 || offset + len > cmd.data_out.len() {
            return Err(ConnError::protocol(format!(
                "R2T for {len} bytes at {offset} of a {}-byte write",
                cmd.data_out.len()
            )));
        }
        let (lun, data) = (cmd.lun, cmd.data_out.clone());
        self.counters.r2ts.fetch_add(1, Ordering::Relaxed);
        self.send_data_out(lun, r.itt, r.ttt, &data, offset, len);
        Ok(())
    }

    fn nop_in(&mut self, n: NopIn, data: Bytes) {
        if n.ttt != RESERVED_TAG {
            // The target pings us: answer with its TTT and its data.
            let h = NopOut {
                immediate: true,
                lun: n.lun,
                itt: RESERVED_TAG,
                ttt: n.ttt,
                cmd_sn: self.cmd_sn,
                exp_stat_sn: self.exp_stat_sn,
            };
            self.counters.target_pings.fetch_add(1, Ordering::Relaxed);
            self.push_pdu(&Header::NopOut(h), data);
        }
        if n.itt == RESERVED_TAG {
            return;
        }
        match self.slots.remove(n.itt).map(|t| t.owner) {
            Some(Owner::KeepAlive) => self.keepalive = None,
            Some(Owner::Caller(req)) => req.finish(Ok(Done::Ping)),
            Some(other) => tracing::debug!(?other, "NOP-In for a task that is not a ping"),
            None => {}
        }
    }

    fn tmf_response(&mut self, t: TaskMgmtResponse) -> Result<(), ConnError> {
        let Some(task) = self.slots.remove(t.itt) else {
            return Ok(());
        };
        match task.owner {
            Owner::Caller(req) => req.finish(Ok(Done::TaskManagement {
                response: t.response,
            })),
            Owner::Abort { victim } => {
                if t.response != tmf::FUNCTION_COMPLETE && t.response != tmf::TASK_DOES_NOT_EXIST {
                    return Err(ConnError::protocol(format!(
                        "ABORT TASK of a timed-out command answered {}",
                        t.response
                    )));
                }
                if let Some(v) = self.slots.remove(victim) {
                    self.scsi_in_flight -= 1;
                    if let Owner::Caller(mut req) = v.owner {
                        req.timeouts += 1;
                        if req.timeouts > self.cfg.max_retries {
                            self.fail_timeout(req);
                        } else {
                            self.counters.retries.fetch_add(1, Ordering::Relaxed);
                            self.queue.push_front(req);
                        }
                    }
                }
            }
            other => {
                return Err(ConnError::protocol(format!(
                    "task management response for {other:?}"
                )));
            }
        }
        Ok(())
    }

    fn logout_response(&mut self, itt: u32, response: u8) {
        if !matches!(self.slots.remove(itt).map(|t| t.owner), Some(Owner::Logout)) {
            tracing::debug!(itt, "logout response for no logout of ours");
            return;
        }
        if response != 0 {
            tracing::warn!(response, "logout answered with an error; closing anyway");
        }
        let why = match self.leaving {
            Some(Leaving::LoggingOut { why }) => why,
            _ => Why::User,
        };
        self.exit = Some(match why {
            Why::Target => Exit::Relogin,
            Why::User | Why::Dropped => Exit::LoggedOut,
        });
    }

    fn async_message(&mut self, m: bhs::AsyncMessage, data: &[u8]) {
        match m.event {
            async_event::SCSI_ASYNC_EVENT => {
                let sense = data.get(2..).and_then(crate::scsi::sense::Sense::parse);
                tracing::info!(?sense, lun = m.lun, "SCSI asynchronous event");
            }
            async_event::LOGOUT_REQUEST => {
                tracing::info!(
                    within_s = m.parameter3,
                    "the target asks us to log out; logging in again afterwards"
                );
                if self.leaving.is_none() {
                    self.begin_leaving(Why::Target);
                }
            }
            async_event::DROPPING_CONNECTION | async_event::DROPPING_ALL_CONNECTIONS => {
                tracing::info!(
                    time2wait = m.parameter2,
                    "the target is dropping the connection"
                );
            }
            other => tracing::debug!(event = other, "asynchronous message ignored"),
        }
    }

    fn reject(&mut self, reason: u8, data: &[u8]) -> Result<(), ConnError> {
        let Some(bhs) = data.first_chunk::<BHS_LEN>() else {
            return Err(ConnError::protocol("Reject without the rejected header"));
        };
        let itt = bhs::itt_of(bhs);
        let opcode = Opcode::from_byte(bhs[0]).ok();
        tracing::warn!(reason, ?opcode, itt, "the target rejected a PDU");
        if reason == reject_reason::DATA_DIGEST_ERROR || opcode == Some(Opcode::DataOut) {
            // At ErrorRecoveryLevel 0 a lost Data-Out cannot be resent alone.
            return Err(ConnError::protocol(format!(
                "Data-Out rejected (reason {reason:#x})"
            )));
        }
        let Some(task) = self.slots.remove(itt) else {
            return Ok(());
        };
        if task.is_scsi() {
            self.scsi_in_flight -= 1;
        }
        match task.owner {
            Owner::Caller(req) => {
                if reason == reject_reason::IMMEDIATE_COMMAND_REJECT
                    || reason == reject_reason::WAITING_FOR_LOGOUT
                {
                    // Not refused for what it is: send it again (after the relogin).
                    self.queue.push_front(req);
                } else {
                    let name = req.name;
                    req.finish(Err(Error::Rejected {
                        command: name,
                        reason,
                    }));
                }
            }
            Owner::KeepAlive => self.keepalive = None,
            Owner::Replay { entry, .. } => {
                self.replaying.retain(|e| e.seq != entry.seq);
                tracing::error!(
                    reason,
                    "the target rejected a replayed write; it may be lost"
                );
                self.journal.lost = true;
            }
            Owner::Flush { .. } => {
                self.own_flushes -= 1;
                self.own_flush_after = Instant::now() + Duration::from_secs(1);
            }
            Owner::Abort { .. } | Owner::Logout => {
                return Err(ConnError::protocol(format!(
                    "the target rejected our {opcode:?} (reason {reason:#x})"
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_tag_generations_so_stale_tags_never_match() {
        let mut s = Slots::default();
        let mk = |itt| Task {
            itt,
            owner: Owner::KeepAlive,
            cmd_sn: 0,
            deadline: Instant::now(),
            received: 0,
            next_data_sn: 0,
            aborting: None,
            flush_mark: 0,
        };
        let a = s.insert(mk).unwrap();
        assert!(s.remove(a).is_some());
        let b = s.insert(mk).unwrap();
        // Same slot, new generation.
        assert_eq!(a & 0xffff, b & 0xffff);
        assert_ne!(a, b);
        assert!(s.get_mut(a).is_none());
        assert!(s.get_mut(b).is_some());
        assert_ne!(b, RESERVED_TAG);
        assert_eq!(s.drain().len(), 1);
        assert_eq!(s.live, 0);
    }

    #[test]
    fn tx_queue_keeps_long_data_apart_and_counts_bytes() {
        let mut q = TxQueue::default();
        q.push_small(&[1; 48]);
        q.push_data(Bytes::from(vec![2u8; 100]));
        q.push_data(Bytes::from(vec![3u8; 8192]));
        q.push_small(&[4; 4]);
        q.seal();
        assert_eq!(q.len, 48 + 100 + 8192 + 4);
        // Small pieces merged around the long segment.
        assert_eq!(q.segs.len(), 3);
        assert_eq!(q.segs[0].len(), 148);
        assert_eq!(q.segs[1].len(), 8192);
    }
}
