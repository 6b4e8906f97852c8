//! The full feature phase of one normal session's connection.
//!
//! After login the connection leaves the async reactor: one blocking thread per
//! connection (the engine) reads every PDU that has arrived, handles them in order (CmdSN
//! window, writes collecting their data, R2Ts, task management, text, logout), runs the
//! quick SCSI commands right there, and sends all their responses with one vectored
//! write. A command queue of 32 costs one wakeup and two system calls per batch, not per
//! command. Commands that may take long (SYNCHRONIZE CACHE, FUA writes, UNMAP, WRITE
//! SAME, EXTENDED COPY, COMPARE AND WRITE) go to the runtime's blocking pool and write
//! their own responses; the wire's lock keeps StatSN in send order.
//!
//! Closing: `SessionHandle::request_close` shuts the socket down, which ends the engine's
//! read at once; the engine then waits for the commands it handed off before it reports
//! the session closed.
//!
//! # Layout
//! - this file: the engine's loop, CmdSN ordering, dispatch by opcode, NOP, text, logout.
//! - `wire`: the socket; the sending side numbers and batches PDUs under one lock.
//! - `command`: SCSI Command PDUs: checks, memory budget, running the command.
//! - `r2t`: write data: immediate and unsolicited data, R2Ts, Data-Out.
//! - `tmf`: task management requests.
//! - `response`: a finished command's Data-In and SCSI Response PDUs.

mod command;
mod r2t;
mod response;
mod tmf;
mod wire;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::TcpStream;
use std::sync::atomic::AtomicU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use iscsi_pdu::bhs::{
    self, Header, LogoutRequest, LogoutResponse, NopIn, NopOut, RESERVED_TAG, Reject, TextRequest,
    TextResponse, reject_reason,
};
use iscsi_pdu::frame::{self, FrameConfig, RawPdu};
use iscsi_pdu::{serial, text};
use tokio::sync::Semaphore;

use crate::connection::ConnError;
use crate::login::Established;
use crate::lun::Lun;
use crate::server::{Inner, TargetEntry, TargetFabric};
use crate::session::{SessionHandle, SessionParams, TaskEntry, wait_tasks};
pub(crate) use r2t::DataOutError;
use r2t::PendingWrite;
use wire::{Sn, Wire, read_into};

/// Data buffers (write data collected, read data produced) one connection may hold at
/// once; a command that would go over is answered TASK SET FULL.
const CONNECTION_MEMORY: u64 = 256 << 20;
/// Unit of [`CONNECTION_MEMORY`] permits.
const MEMORY_UNIT: u64 = 4096;
/// How often a blocked read wakes up to look at timers and the stop flag.
const TICK: Duration = Duration::from_millis(250);
/// Most PDUs one batch collects before its responses go out.
const BATCH: usize = 64;

/// One connection's full feature phase, run on its own thread by [`Engine::run`].
pub(crate) struct Engine {
    inner: Arc<Inner>,
    rt: tokio::runtime::Handle,
    session: Arc<SessionHandle>,
    target: Arc<TargetEntry>,
    fabric: Arc<TargetFabric>,
    params: SessionParams,
    sn: Arc<Sn>,
    stream: TcpStream,
    wire: Arc<Mutex<Wire>>,
    rx_cfg: FrameConfig,
    buf: BytesMut,
    /// Responses produced while handling the current batch of PDUs.
    out: Vec<(Header, Bytes)>,
    pending: HashMap<u32, PendingWrite>,
    held: BTreeMap<u32, RawPdu>,
    next_ttt: u32,
    r2t_bytes: u64,
    r2t_waiting: VecDeque<u32>,
    text_more: Option<(u32, Vec<u8>)>,
    text_partial: Vec<u8>,
    /// Our NOP-In ping waiting for its answer: (TTT, deadline).
    ping: Option<(u32, Instant)>,
    last_heard: Instant,
    local: Option<std::net::SocketAddr>,
    logout: bool,
    /// Set when the server stops: the time by which the initiator should have logged out.
    leaving: Option<Instant>,
    memory: Arc<Semaphore>,
}

impl Engine {
    pub(crate) fn new(
        inner: Arc<Inner>,
        rt: tokio::runtime::Handle,
        session: Arc<SessionHandle>,
        est: &Established,
        stream: TcpStream,
        leftover: BytesMut,
    ) -> std::io::Result<Self> {
        let target = est.target.clone().expect("normal sessions have a target");
        stream.set_nonblocking(false)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(TICK))?;
        let local = stream.local_addr().ok();
        let cfg = FrameConfig {
            header_digest: est.params.header_digest,
            data_digest: est.params.data_digest,
            max_recv_data_segment: est.params.max_recv_data_segment,
        };
        let wire = Wire::new(
            stream.try_clone()?,
            FrameConfig {
                max_recv_data_segment: est.params.max_xmit_data_segment,
                ..cfg
            },
            est.stat_sn,
        );
        session.attach_socket(stream.try_clone()?);
        let window = inner.options.command_window;
        Ok(Self {
            fabric: Arc::new(TargetFabric {
                inner: inner.clone(),
                target: target.clone(),
            }),
            inner,
            rt,
            session,
            target,
            params: est.params,
            sn: Arc::new(Sn {
                exp_cmd_sn: AtomicU32::new(est.cmd_sn),
                window,
            }),
            stream,
            wire: Arc::new(Mutex::new(wire)),
            rx_cfg: cfg,
            buf: leftover,
            out: Vec::new(),
            pending: HashMap::new(),
            held: BTreeMap::new(),
            next_ttt: 1,
            r2t_bytes: 0,
            r2t_waiting: VecDeque::new(),
            text_more: None,
            text_partial: Vec::new(),
            ping: None,
            last_heard: Instant::now(),
            local,
            logout: false,
            leaving: None,
            memory: Arc::new(Semaphore::new((CONNECTION_MEMORY / MEMORY_UNIT) as usize)),
        })
    }

    /// Runs the session until logout, error or a close from the target; then finishes
    /// every command it handed off and marks the session closed.
    pub(crate) fn run(mut self) {
        let result = self.serve();
        let initiator = self.session.initiator.clone();
        let tsih = self.session.tsih;
        match &result {
            Ok(()) => tracing::info!(%initiator, tsih, "session logged out"),
            Err(e) => tracing::info!(%initiator, tsih, error = %e, "session dropped"),
        }
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        // Nothing this session sent may reach a LUN after it is reported closed.
        self.finish_tasks();
        // I_T nexus loss: SPC-2 reservations and medium removal prevention end with it.
        for lun in crate::scsi::Fabric::luns(&*self.fabric) {
            let mut st = lun.state();
            if st.reserve6.as_deref() == Some(self.session.nexus.as_str()) {
                st.reserve6 = None;
            }
            st.prevent_removal.remove(&self.session.nexus);
        }
        self.inner.unregister(self.session.id);
        self.session.closed.send_replace(true);
    }

    /// Drops the writes still collecting data and waits for every command this session
    /// handed to the blocking pool.
    fn finish_tasks(&mut self) {
        self.pending.clear();
        let tasks: Vec<Arc<TaskEntry>> = self
            .session
            .tasks
            .lock()
            .expect("task map poisoned")
            .values()
            .cloned()
            .collect();
        self.rt.block_on(wait_tasks(tasks));
    }

    fn serve(&mut self) -> Result<(), ConnError> {
        let mut stopping = self.inner.stopping.subscribe();
        loop {
            let mut handled = 0;
            while handled < BATCH {
                let Some(pdu) = frame::decode(&mut self.buf, &self.rx_cfg)? else {
                    break;
                };
                handled += 1;
                self.last_heard = Instant::now();
                self.handle(pdu)?;
                if self.logout {
                    self.flush()?;
                    return Ok(());
                }
            }
            self.flush()?;
            if handled == BATCH {
                continue;
            }
            if *self.session.kill.borrow() {
                return Err(ConnError::Killed);
            }
            if self.leaving.is_none() && *stopping.borrow_and_update() {
                self.request_logout();
                self.flush()?;
            }
            self.fill()?;
        }
    }

    /// Reads what the socket has; on a quiet tick checks timers instead.
    fn fill(&mut self) -> Result<(), ConnError> {
        let want = frame::frame_len(&self.buf, &self.rx_cfg)?.unwrap_or(0);
        let room = want.saturating_sub(self.buf.len()).max(64 * 1024);
        self.buf.reserve(room);
        match read_into(&self.stream, &mut self.buf) {
            Ok(0) => Err(ConnError::Closed),
            Ok(_) => Ok(()),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                self.tick()
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    fn tick(&mut self) -> Result<(), ConnError> {
        if *self.session.kill.borrow() {
            return Err(ConnError::Killed);
        }
        let now = Instant::now();
        if self.leaving.is_some_and(|t| now >= t) {
            return Err(ConnError::Protocol("the server stopped"));
        }
        if let Some((_, deadline)) = self.ping {
            if now >= deadline {
                return Err(ConnError::Protocol("NOP-In ping not answered"));
            }
        } else if let Some(interval) = self.inner.options.nop_interval
            && now.duration_since(self.last_heard) >= interval
        {
            self.send_ping();
            self.flush()?;
        }
        Ok(())
    }

    pub(super) fn flush(&mut self) -> Result<(), ConnError> {
        if self.out.is_empty() {
            return Ok(());
        }
        let pdus = std::mem::take(&mut self.out);
        self.wire
            .lock()
            .expect("wire lock poisoned")
            .send(pdus, &self.sn)?;
        Ok(())
    }

    pub(super) fn push(&mut self, h: Header, data: Bytes) {
        self.out.push((h, data));
    }

    fn reject(&mut self, pdu: &RawPdu, reason: u8) {
        let r = Reject {
            reason,
            ..Default::default()
        };
        self.push(Header::Reject(r), Bytes::copy_from_slice(&pdu.bhs));
    }

    /// Asks the initiator to log out before the server stops (async event 1).
    fn request_logout(&mut self) {
        let m = bhs::AsyncMessage {
            event: bhs::async_event::LOGOUT_REQUEST,
            parameter3: 2,
            ..Default::default()
        };
        self.push(Header::AsyncMessage(m), Bytes::new());
        self.leaving = Some(Instant::now() + Duration::from_secs(3));
    }

    fn send_ping(&mut self) {
        let ttt = self.new_ttt();
        self.ping = Some((ttt, Instant::now() + self.inner.options.nop_timeout));
        let n = NopIn {
            itt: RESERVED_TAG,
            ttt,
            ..Default::default()
        };
        self.push(Header::NopIn(n), Bytes::new());
    }

    pub(super) fn new_ttt(&mut self) -> u32 {
        next_tag(&mut self.next_ttt)
    }

    /// CmdSN ordering (§4.2.2.1): in-order commands advance ExpCmdSN; ones ahead within
    /// the window wait; the rest are dropped silently. Returns whether to process now.
    fn order(&mut self, immediate: bool, cmd_sn: u32, pdu: &RawPdu) -> bool {
        if immediate {
            return true;
        }
        let exp = self.sn.exp();
        if cmd_sn == exp {
            self.sn.advance();
            return true;
        }
        if serial::in_window(cmd_sn, exp, self.sn.max()) {
            if self.held.len() < self.sn.window as usize {
                self.held.insert(cmd_sn, pdu.clone());
            }
        } else {
            tracing::debug!(cmd_sn, exp, "CmdSN outside the window: dropped");
        }
        false
    }

    fn handle(&mut self, pdu: RawPdu) -> Result<(), ConnError> {
        self.handle_one(pdu)?;
        // Commands that waited for a CmdSN gap to fill may go now.
        while let Some(held) = self.held.remove(&self.sn.exp()) {
            self.sn.advance();
            self.dispatch(held)?;
        }
        Ok(())
    }

    fn handle_one(&mut self, pdu: RawPdu) -> Result<(), ConnError> {
        let header = match pdu.header() {
            Ok(h) => h,
            Err(_) => {
                self.reject(&pdu, reject_reason::COMMAND_NOT_SUPPORTED);
                return Ok(());
            }
        };
        let (immediate, cmd_sn) = match &header {
            Header::ScsiCommand(c) => (c.immediate, c.cmd_sn),
            Header::TaskMgmtRequest(t) => (t.immediate, t.cmd_sn),
            Header::TextRequest(t) => (t.immediate, t.cmd_sn),
            Header::LogoutRequest(l) => (l.immediate, l.cmd_sn),
            Header::NopOut(n) => (n.immediate || n.itt == RESERVED_TAG, n.cmd_sn),
            _ => (true, 0),
        };
        if !self.order(immediate, cmd_sn, &pdu) {
            return Ok(());
        }
        self.dispatch(pdu)
    }

    fn dispatch(&mut self, pdu: RawPdu) -> Result<(), ConnError> {
        match pdu.header()? {
            Header::ScsiCommand(c) => self.scsi_command(c, pdu),
            Header::DataOut(d) => self.data_out(d, pdu.data),
            Header::NopOut(n) => {
                self.nop_out(n, pdu.data);
                Ok(())
            }
            Header::TaskMgmtRequest(t) => {
                self.task_mgmt(t);
                Ok(())
            }
            Header::TextRequest(t) => self.text(t, &pdu.data),
            Header::LogoutRequest(l) => {
                self.logout_request(l);
                Ok(())
            }
            Header::SnackRequest(_) => {
                // ErrorRecoveryLevel 0: nothing to retransmit from.
                self.reject(&pdu, reject_reason::SNACK_REJECT);
                Ok(())
            }
            _ => {
                // A login request, or a target opcode from the initiator.
                self.reject(&pdu, reject_reason::PROTOCOL_ERROR);
                Ok(())
            }
        }
    }

    fn nop_out(&mut self, n: NopOut, data: Bytes) {
        if n.ttt != RESERVED_TAG {
            // The answer to our ping.
            if self.ping.is_some_and(|(t, _)| t == n.ttt) {
                self.ping = None;
            }
            return;
        }
        if n.itt == RESERVED_TAG {
            return;
        }
        let r = NopIn {
            lun: n.lun,
            itt: n.itt,
            ttt: RESERVED_TAG,
            ..Default::default()
        };
        self.push(Header::NopIn(r), data);
    }

    pub(super) fn lun(&self, field: u64) -> Option<Arc<Lun>> {
        let id = bhs::decode_lun(field)?;
        self.target
            .luns
            .read()
            .expect("LUN map poisoned")
            .get(&id)
            .cloned()
    }

    fn text(&mut self, t: TextRequest, data: &[u8]) -> Result<(), ConnError> {
        let body = if t.ttt != RESERVED_TAG {
            match self.text_more.take() {
                Some((ttt, rest)) if ttt == t.ttt => rest,
                _ => Vec::new(),
            }
        } else {
            if self.text_partial.len() + data.len() > 64 * 1024 {
                return Err(ConnError::Protocol("text request too long"));
            }
            self.text_partial.extend_from_slice(data);
            if t.continue_ {
                let ttt = self.new_ttt();
                let r = TextResponse {
                    lun: t.lun,
                    itt: t.itt,
                    ttt,
                    ..Default::default()
                };
                self.push(Header::TextResponse(r), Bytes::new());
                return Ok(());
            }
            let pairs = text::parse(&std::mem::take(&mut self.text_partial))
                .map_err(|_| ConnError::Protocol("bad text keys"))?;
            text::encode(&crate::connection::answer_text(
                &self.inner,
                &self.session.initiator,
                Some(&self.target.iqn),
                &pairs,
                self.local,
            ))
        };
        let max = self.params.max_xmit_data_segment as usize;
        let (chunk, rest) = body.split_at(body.len().min(max));
        let last = rest.is_empty();
        let ttt = if last { RESERVED_TAG } else { self.new_ttt() };
        if !last {
            self.text_more = Some((ttt, rest.to_vec()));
        }
        let r = TextResponse {
            final_: last,
            continue_: !last,
            lun: t.lun,
            itt: t.itt,
            ttt,
            ..Default::default()
        };
        self.push(Header::TextResponse(r), Bytes::copy_from_slice(chunk));
        Ok(())
    }

    fn logout_request(&mut self, l: LogoutRequest) {
        let response = match l.reason {
            0 | 1 => 0,
            // Removing a connection for recovery needs ErrorRecoveryLevel 2.
            _ => 2,
        };
        if response == 0 {
            // Every command finishes before the Logout Response (§11.14).
            self.finish_tasks();
        }
        let r = LogoutResponse {
            response,
            itt: l.itt,
            time2wait: if response == 0 {
                0
            } else {
                self.params.default_time2wait
            },
            time2retain: if response == 0 {
                0
            } else {
                self.params.default_time2retain
            },
            ..Default::default()
        };
        self.push(Header::LogoutResponse(r), Bytes::new());
        if response == 0 {
            self.logout = true;
        }
    }
}

/// Takes the next target transfer tag, skipping the reserved value.
fn next_tag(next: &mut u32) -> u32 {
    let t = *next;
    *next = next.wrapping_add(1);
    if *next == RESERVED_TAG {
        *next = 1;
    }
    t
}
