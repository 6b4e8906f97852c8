//! A session to one target: the handle many tasks share, and the task behind it that
//! keeps the session alive.
//!
//! [`Session`] is cheap to clone; every clone (and every [`Lun`]) submits to the same
//! engine, which pipelines all of them on one connection. The session task runs the
//! engine; when the connection fails or the target restarts, it reconnects with backoff,
//! reinstates the session (same ISID, TSIH 0: the target ends the old one) and sends
//! again every command that had not completed. Callers see only latency, unless the
//! session stays down longer than the replacement timeout: then the waiting commands
//! fail with [`Error::SessionFailed`], and so does every new one until a login succeeds.
//!
//! Commands that come back with UNIT ATTENTION (as every command does after a target
//! restart), BUSY, TASK SET FULL or ABORTED COMMAND are retried by the caller's own task,
//! a bounded number of times.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use iscsi_pdu::bhs::{encode_lun, tmf};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::config::{Negotiated, SessionConfig, random_isid};
use crate::engine::{Engine, Exit};
use crate::error::{Error, SessionDown};
use crate::journal::Journal;
use crate::login::{self, LoggedIn, LoginIds, SessionKind};
use crate::lun::Lun;
use crate::scsi::luns;
use crate::scsi::sense::{self, CommandInfo, Verdict};
use crate::task::{Command, Done, Op, Outcome, Request};

/// Requests that may wait in the channel before callers block on submitting.
const CHANNEL: usize = 1024;

/// Live counters of a session, updated by its engine.
#[derive(Debug, Default)]
pub struct Counters {
    pub commands: AtomicU64,
    pub retries: AtomicU64,
    pub aborts: AtomicU64,
    pub reconnects: AtomicU64,
    pub pings: AtomicU64,
    pub target_pings: AtomicU64,
    pub r2ts: AtomicU64,
    pub direct_bytes: AtomicU64,
    pub replayed: AtomicU64,
    pub own_flushes: AtomicU64,
    pub in_flight: AtomicU64,
    pub max_in_flight: AtomicU64,
    pub sends: AtomicU64,
}

/// A snapshot of a session's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stats {
    /// SCSI commands sent (each attempt counts).
    pub commands: u64,
    /// Commands sent again: after a reconnect, a unit attention, a busy target...
    pub retries: u64,
    /// ABORT TASKs sent for commands that timed out.
    pub aborts: u64,
    /// Successful logins after the first.
    pub reconnects: u64,
    /// NOP-Out pings we sent.
    pub pings: u64,
    /// NOP-In pings of the target we answered.
    pub target_pings: u64,
    /// R2Ts answered.
    pub r2ts: u64,
    /// Data-In bytes read straight into callers' buffers.
    pub direct_bytes: u64,
    /// Acknowledged, unflushed writes sent again after a reconnect.
    pub replayed: u64,
    /// SYNCHRONIZE CACHEs the session sent by itself to bound its journal.
    pub own_flushes: u64,
    /// Commands in flight now, and the most ever at once.
    pub in_flight: u64,
    pub max_in_flight: u64,
    /// Times the PDUs queued went to the socket together (one write, or more when the
    /// socket was full): commands over sends is how many commands share a write.
    pub sends: u64,
}

/// Where the session stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionState {
    /// Logged in; commands flow.
    Up,
    /// Connection lost at `since`; reconnecting, commands wait.
    Recovering { since: Instant },
    /// Down for longer than the replacement timeout: commands fail until a login succeeds.
    Failed { since: Instant },
    /// Logged out or shut down.
    Closed,
}

#[derive(Debug)]
struct Status {
    state: SessionState,
    params: Negotiated,
    target_alias: Option<String>,
}

struct Shared {
    tx: mpsc::Sender<Request>,
    cfg: Arc<SessionConfig>,
    isid: [u8; 6],
    status: Arc<Mutex<Status>>,
    counters: Arc<Counters>,
}

/// A logged-in session. Clone it freely: clones share the session.
#[derive(Clone)]
pub struct Session {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("target", &self.shared.cfg.target)
            .field("portal", &self.shared.cfg.portal)
            .field("state", &self.state())
            .finish()
    }
}

fn check_config(cfg: &SessionConfig) -> Result<(), Error> {
    let bad = |reason: &str| {
        Err(Error::InvalidArgument {
            reason: reason.to_owned(),
        })
    };
    let l = &cfg.limits;
    if cfg.initiator.is_empty() || cfg.target.is_empty() {
        return bad("the initiator and target names must not be empty");
    }
    if cfg.mutual_chap.is_some() && cfg.chap.is_none() {
        return bad("mutual CHAP needs CHAP credentials too");
    }
    if [l.max_recv_data_segment, l.max_burst, l.first_burst]
        .iter()
        .any(|&v| !(512..=16_777_215).contains(&v))
    {
        return bad("data segment and burst lengths must lie in 512..=16777215");
    }
    if l.queue_depth == 0 || l.queue_depth > 60_000 || l.max_outstanding_r2t == 0 {
        return bad("queue depth must lie in 1..=60000 and MaxOutstandingR2T be at least 1");
    }
    Ok(())
}

impl Session {
    /// Logs in to `cfg.target` at `cfg.portal` and starts the session task. This first
    /// login is not retried: a wrong name, address or secret is reported at once.
    ///
    /// Must be called within a tokio runtime; the session task runs on it.
    pub async fn connect(cfg: SessionConfig) -> Result<Self, Error> {
        check_config(&cfg)?;
        let isid = cfg.isid.unwrap_or_else(random_isid);
        let ids = LoginIds {
            isid,
            tsih: 0,
            cid: 0,
            itt: 0,
            cmd_sn: rand::random(),
        };
        let logged = login::connect_and_login(&cfg, SessionKind::Normal, ids)
            .await
            .map_err(|source| Error::Login {
                target: cfg.target.clone(),
                portal: cfg.portal.clone(),
                source,
            })?;
        tracing::info!(target = %cfg.target, portal = %cfg.portal, tsih = logged.params.tsih,
            params = ?logged.params, "logged in");
        let cfg = Arc::new(cfg);
        let (tx, rx) = mpsc::channel(CHANNEL);
        let status = Arc::new(Mutex::new(Status {
            state: SessionState::Up,
            params: logged.params,
            target_alias: logged.target_alias.clone(),
        }));
        let counters = Arc::new(Counters::default());
        let actor = Actor {
            cfg: cfg.clone(),
            isid,
            rx,
            queue: VecDeque::new(),
            journal: Journal::new(cfg.journal_limit),
            status: status.clone(),
            counters: counters.clone(),
        };
        tokio::spawn(actor.run(logged));
        Ok(Self {
            shared: Arc::new(Shared {
                tx,
                cfg,
                isid,
                status,
                counters,
            }),
        })
    }

    pub fn config(&self) -> &SessionConfig {
        &self.shared.cfg
    }

    /// The ISID this session logs in with (every reconnect uses the same one).
    pub fn isid(&self) -> [u8; 6] {
        self.shared.isid
    }

    /// What the current (or last) login negotiated.
    pub fn negotiated(&self) -> Negotiated {
        self.shared.status.lock().expect("status lock").params
    }

    pub fn target_alias(&self) -> Option<String> {
        self.shared
            .status
            .lock()
            .expect("status lock")
            .target_alias
            .clone()
    }

    pub fn state(&self) -> SessionState {
        self.shared.status.lock().expect("status lock").state
    }

    pub fn stats(&self) -> Stats {
        let c = &self.shared.counters;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Stats {
            commands: g(&c.commands),
            retries: g(&c.retries),
            aborts: g(&c.aborts),
            reconnects: g(&c.reconnects),
            pings: g(&c.pings),
            target_pings: g(&c.target_pings),
            r2ts: g(&c.r2ts),
            direct_bytes: g(&c.direct_bytes),
            replayed: g(&c.replayed),
            own_flushes: g(&c.own_flushes),
            in_flight: g(&c.in_flight),
            max_in_flight: g(&c.max_in_flight),
            sends: g(&c.sends),
        }
    }

    /// Opens a LUN: reads its capacity and block size.
    pub async fn lun(&self, id: u16) -> Result<Lun, Error> {
        Lun::open(self.clone(), id).await
    }

    /// The LUNs the target reports (REPORT LUNS, through LUN 0).
    pub async fn report_luns(&self) -> Result<Vec<u16>, Error> {
        luns::report_luns(self).await
    }

    /// A NOP-Out ping answered by the target.
    pub async fn ping(&self) -> Result<(), Error> {
        match self.submit(Op::Ping, "NOP-Out").await? {
            Done::Ping => Ok(()),
            other => Err(unexpected("NOP-Out", &other)),
        }
    }

    /// A task management function on a LUN (LOGICAL UNIT RESET, ABORT TASK SET,
    /// CLEAR TASK SET, TARGET WARM RESET: see [`iscsi_pdu::bhs::tmf`]).
    pub async fn task_management(&self, function: u8, lun: u16) -> Result<(), Error> {
        let op = Op::TaskManagement {
            function,
            lun: encode_lun(lun),
        };
        match self.submit(op, "task management").await? {
            Done::TaskManagement { response } if response == tmf::FUNCTION_COMPLETE => Ok(()),
            Done::TaskManagement { response } => Err(Error::TaskManagement { function, response }),
            other => Err(unexpected("task management", &other)),
        }
    }

    /// Logs out once the commands in flight have finished (waiting at most the task
    /// management timeout). Afterwards every call fails with [`Error::Closed`].
    pub async fn logout(&self) -> Result<(), Error> {
        match self.submit(Op::Logout, "logout").await {
            Ok(_) | Err(Error::Closed) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Runs one SCSI command: retries it on a unit attention, a busy target or an aborted
    /// command, and turns any other failure into a typed error. The outcome holds what
    /// was read.
    pub async fn execute(&self, mut cmd: Command, info: CommandInfo) -> Result<Outcome, Error> {
        let max = self.shared.cfg.max_retries;
        let mut attempt = 0u32;
        loop {
            let out = match self.submit(Op::Scsi(cmd), info.name).await? {
                Done::Scsi(out) => out,
                other => return Err(unexpected(info.name, &other)),
            };
            if out.writes_lost {
                return Err(Error::WritesLost { command: info.name });
            }
            let verdict = if out.response != 0 {
                Verdict::Retry {
                    delay_ms: 50,
                    why: "target failure",
                }
            } else {
                sense::classify(&info, out.status, out.sense.as_deref())
            };
            match verdict {
                Verdict::Done => return Ok(out),
                Verdict::Fail(e) => return Err(e),
                Verdict::Retry { delay_ms, why } => {
                    if attempt >= max {
                        return Err(exhausted(&info, &out));
                    }
                    attempt += 1;
                    tracing::debug!(command = info.name, why, attempt, "retrying");
                    self.shared.counters.retries.fetch_add(1, Ordering::Relaxed);
                    if delay_ms > 0 {
                        let ms = delay_ms.saturating_mul(1 << attempt.min(6));
                        tokio::time::sleep(Duration::from_millis(ms)).await;
                    }
                    cmd = out.command;
                }
            }
        }
    }

    /// Reads with a CDB of the caller's choice into `buf` (resized to `len`): for
    /// commands this crate has no method for.
    pub async fn execute_read(
        &self,
        lun: u16,
        cdb: &[u8],
        buf: BytesMut,
        len: usize,
        info: CommandInfo,
    ) -> Result<Outcome, Error> {
        let cmd = Command::new(encode_lun(lun), cdb).with_data_in(buf, len);
        self.execute(cmd, info).await
    }

    /// The longest a caller could legitimately wait for one submission: every attempt
    /// timing out, plus a full replacement window. Past it something is broken, and the
    /// caller gets an error rather than a hang.
    fn watchdog(&self) -> Duration {
        let t = &self.shared.cfg.timeouts;
        let attempts = self.shared.cfg.max_retries + 2;
        (t.command + t.task_management) * attempts
            + t.replacement
            + t.connect
            + t.login
            + Duration::from_secs(30)
    }

    pub(crate) async fn submit(&self, op: Op, name: &'static str) -> Result<Done, Error> {
        let (req, rx) = Request::new(op, name);
        let limit = self.watchdog();
        let wait = async {
            self.shared.tx.send(req).await.map_err(|_| Error::Closed)?;
            rx.await.map_err(|_| Error::Closed)?
        };
        match tokio::time::timeout(limit, wait).await {
            Ok(r) => r,
            Err(_) => Err(Error::Timeout {
                command: name,
                attempts: 1,
                each: limit,
            }),
        }
    }
}

fn unexpected(command: &'static str, done: &Done) -> Error {
    Error::BadResponse {
        command,
        reason: format!("the engine answered {done:?}"),
    }
}

/// The error a command that was retried as often as allowed ends with.
fn exhausted(info: &CommandInfo, out: &Outcome) -> Error {
    if out.response != 0 {
        return Error::TargetFailure {
            command: info.name,
            response: out.response,
        };
    }
    match out.sense.as_deref().and_then(sense::Sense::parse) {
        Some(s) => Error::CheckCondition {
            command: info.name,
            sense: s,
        },
        None => Error::Status {
            command: info.name,
            status: out.status,
        },
    }
}

/// The task behind a session: runs the engine, and reconnects when it fails.
struct Actor {
    cfg: Arc<SessionConfig>,
    isid: [u8; 6],
    rx: mpsc::Receiver<Request>,
    queue: VecDeque<Request>,
    journal: Journal,
    status: Arc<Mutex<Status>>,
    counters: Arc<Counters>,
}

impl Actor {
    async fn run(mut self, first: LoggedIn) {
        let mut logged = first;
        // Connections that fail soon after login (a target that accepts and then drops
        // us) must not turn into a tight reconnect loop.
        let mut flap = Duration::ZERO;
        loop {
            let started = Instant::now();
            {
                let mut st = self.status.lock().expect("status lock");
                st.state = SessionState::Up;
                st.params = logged.params;
                st.target_alias = logged.target_alias.clone();
            }
            let engine = Engine::new(
                logged,
                self.cfg.clone(),
                &mut self.queue,
                &mut self.journal,
                self.counters.clone(),
            );
            let cause = match engine.run(&mut self.rx).await {
                Exit::LoggedOut => {
                    tracing::info!(target = %self.cfg.target, "logged out");
                    self.close();
                    return;
                }
                Exit::Relogin => {
                    tracing::info!(target = %self.cfg.target, "logged out at the target's request");
                    Arc::new(SessionDown::TargetLogout)
                }
                Exit::Failed(e) => {
                    tracing::warn!(target = %self.cfg.target, error = &e as &dyn std::error::Error,
                        queued = self.queue.len(), "connection lost; recovering");
                    Arc::new(SessionDown::Connection(e))
                }
            };
            if started.elapsed() < Duration::from_secs(2) {
                flap = (flap * 2)
                    .max(Duration::from_millis(100))
                    .min(self.cfg.timeouts.max_backoff);
            } else {
                flap = Duration::ZERO;
            }
            match self.recover(cause, flap).await {
                Some(l) => {
                    self.counters.reconnects.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(target = %self.cfg.target, tsih = l.params.tsih,
                        resending = self.queue.len(), "session reinstated");
                    logged = l;
                }
                None => {
                    self.close();
                    return;
                }
            }
        }
    }

    fn set_state(&self, state: SessionState) {
        self.status.lock().expect("status lock").state = state;
    }

    fn session_failed(&self, last: &Arc<SessionDown>) -> Error {
        Error::SessionFailed {
            target: self.cfg.target.clone(),
            timeout: self.cfg.timeouts.replacement,
            last: last.clone(),
        }
    }

    /// Logs in again until it works. `None` when every handle is gone or a caller asked
    /// to log out meanwhile.
    async fn recover(&mut self, mut last: Arc<SessionDown>, delay: Duration) -> Option<LoggedIn> {
        let lost_at = Instant::now();
        self.set_state(SessionState::Recovering { since: lost_at });
        let t = self.cfg.timeouts;
        let deadline = lost_at + t.replacement;
        let mut failed = false;
        let mut backoff = Duration::from_millis(50);
        let mut next_try = Instant::now() + delay;
        loop {
            // Wait for the next attempt, taking requests meanwhile.
            loop {
                tokio::select! {
                    req = self.rx.recv() => match req {
                        Some(r) => {
                            if !self.accept_while_down(r, failed, &last) {
                                return None;
                            }
                        }
                        None => return None,
                    },
                    _ = tokio::time::sleep_until(deadline), if !failed => {
                        failed = true;
                        self.set_state(SessionState::Failed { since: lost_at });
                        self.fail_queue(&last);
                    }
                    _ = tokio::time::sleep_until(next_try) => break,
                }
            }
            let cfg = self.cfg.clone();
            let ids = LoginIds {
                isid: self.isid,
                tsih: 0,
                cid: 0,
                itt: 0,
                cmd_sn: rand::random(),
            };
            let attempt = async move {
                let limit = cfg.timeouts.connect + cfg.timeouts.login;
                match tokio::time::timeout(
                    limit,
                    login::connect_and_login(&cfg, SessionKind::Normal, ids),
                )
                .await
                {
                    Ok(r) => r,
                    Err(_) => Err(login::LoginError::Conn(
                        crate::connection::ConnError::Timeout {
                            what: "reconnect",
                            after: limit,
                        },
                    )),
                }
            };
            tokio::pin!(attempt);
            let result = loop {
                tokio::select! {
                    r = &mut attempt => break r,
                    req = self.rx.recv() => match req {
                        Some(r) => {
                            if !self.accept_while_down(r, failed, &last) {
                                return None;
                            }
                        }
                        None => return None,
                    },
                    _ = tokio::time::sleep_until(deadline), if !failed => {
                        failed = true;
                        self.set_state(SessionState::Failed { since: lost_at });
                        self.fail_queue(&last);
                    }
                }
            };
            match result {
                Ok(l) => return Some(l),
                Err(e) => {
                    tracing::debug!(target = %self.cfg.target, error = &e as &dyn std::error::Error, "reconnect failed");
                    last = Arc::new(SessionDown::Login(e));
                }
            }
            if failed {
                self.fail_queue(&last);
            }
            // Backoff with ±25 % jitter so a pool of hosts does not reconnect in step.
            let jitter = rand::random_range(0.75..1.25);
            next_try = Instant::now() + backoff.mul_f64(jitter);
            backoff = (backoff * 2).min(t.max_backoff);
        }
    }

    /// A request that arrives while the session is down. Returns false when the session
    /// should stop (a logout).
    fn accept_while_down(&mut self, r: Request, failed: bool, last: &Arc<SessionDown>) -> bool {
        if matches!(r.op, Op::Logout) {
            // Answered (as closed) by `close`, once the state says so.
            self.queue.push_back(r);
            return false;
        }
        if failed {
            let e = self.session_failed(last);
            r.finish(Err(e));
        } else {
            self.queue.push_back(r);
        }
        true
    }

    fn fail_queue(&mut self, last: &Arc<SessionDown>) {
        if !self.queue.is_empty() {
            tracing::warn!(target = %self.cfg.target, failed = self.queue.len(),
                "session down past its replacement timeout; failing its commands");
        }
        for r in std::mem::take(&mut self.queue) {
            let e = self.session_failed(last);
            r.finish(Err(e));
        }
    }

    fn close(&mut self) {
        self.set_state(SessionState::Closed);
        self.rx.close();
        for r in std::mem::take(&mut self.queue) {
            r.finish(Err(Error::Closed));
        }
        while let Ok(r) = self.rx.try_recv() {
            r.finish(Err(Error::Closed));
        }
    }
}
