//! The full feature phase on one connection: one task owns the socket and every command
//! in flight on it.
//!
//! Requests arrive on a channel and wait in the session's queue until the CmdSN window
//! and the queue depth let them go; each gets an Initiator Task Tag (a slot index and a
//! generation, so a late PDU for a finished task never matches a new one). Outgoing PDUs
//! gather in a batch that `writev` sends (long data segments are not copied);
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
//!
//! # Layout
//! - this file: the engine's state, its event loop, timers (command timeouts, keepalive,
//!   the closed window) and leaving (drain, logout, teardown).
//! - `slots`: the tasks in flight by ITT, and who waits for each.
//! - `schedule`: what goes next, within the window, the queue depth and the send buffer.
//! - `tx`: the PDUs we send, and the socket writes of their batch.
//! - `rx`: reading and framing, and direct placement of long Data-In segments.
//! - `responses`: what each PDU from the target does to the tasks in flight.

mod responses;
mod rx;
mod schedule;
mod slots;
mod tx;

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use iscsi_pdu::bhs::{Header, LogoutRequest, tmf};
use iscsi_pdu::frame::FrameConfig;
use iscsi_pdu::tx::TxBatch;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::config::{Negotiated, SessionConfig};
use crate::connection::ConnError;
use crate::error::Error;
use crate::journal::{Entry, Journal};
use crate::login::LoggedIn;
use crate::session::Counters;
use crate::task::Request;
use rx::Direct;
use slots::{Owner, Slots};

/// Timer resolution of command timeouts and keepalive.
const TICK: Duration = Duration::from_millis(100);

/// Why the engine returned.
#[derive(Debug)]
pub(crate) enum Exit {
    /// Logged out because a caller asked or every handle was dropped.
    LoggedOut,
    /// The target asked us to log out; log in again.
    Relogin,
    Failed(ConnError),
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
    tx: TxBatch,
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
            tx: TxBatch::default(),
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
}
