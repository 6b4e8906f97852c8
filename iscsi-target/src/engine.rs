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

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::{IoSlice, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use iscsi_pdu::bhs::{
    self, DataIn, DataOut, Header, LogoutRequest, LogoutResponse, NopIn, NopOut, R2t, RESERVED_TAG,
    Reject, ScsiCommand, ScsiResponse, TaskMgmtRequest, TaskMgmtResponse, TextRequest,
    TextResponse, reject_reason, tmf,
};
use iscsi_pdu::frame::{self, FrameConfig, RawPdu};
use iscsi_pdu::{PduError, serial, text};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

use crate::login::Established;
use crate::lun::{Lun, push_ua};
use crate::scsi::sense::{Sense, status};
use crate::scsi::{self, Ctx, MAX_TRANSFER_BYTES, op};
use crate::server::{Inner, TargetEntry, TargetFabric};
use crate::session::{SessionHandle, SessionParams, TaskEntry, wait_tasks};

/// Why a connection ended.
#[derive(Debug, thiserror::Error)]
pub(crate) enum EngineError {
    #[error("socket")]
    Io(#[from] std::io::Error),
    #[error("malformed PDU")]
    Pdu(#[from] PduError),
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    #[error("peer closed the connection")]
    Closed,
    #[error("closed by the target")]
    Killed,
}

/// Data buffers (write data collected, read data produced) one connection may hold at
/// once; a command that would go over is answered TASK SET FULL.
const CONNECTION_MEMORY: u64 = 256 << 20;
/// Unit of [`CONNECTION_MEMORY`] permits.
const MEMORY_UNIT: u64 = 4096;
/// How often a blocked read wakes up to look at timers and the stop flag.
const TICK: Duration = Duration::from_millis(250);
/// Payloads up to this size are copied next to their header; larger ones are written
/// from their own buffer.
const COPY_LIMIT: usize = 16 * 1024;
/// Most PDUs one batch collects before its responses go out.
const BATCH: usize = 64;
/// Transfers this large run on the blocking pool: their copies then overlap with the
/// engine reading the next commands.
const BIG_TRANSFER: u32 = 256 * 1024;

/// Sequence numbers the engine and the blocking pool share.
struct Sn {
    exp_cmd_sn: AtomicU32,
    window: u32,
}

impl Sn {
    fn exp(&self) -> u32 {
        self.exp_cmd_sn.load(Ordering::Acquire)
    }
    fn max(&self) -> u32 {
        self.exp().wrapping_add(self.window - 1)
    }
}

/// The sending side of the socket: whoever holds the lock stamps StatSN and writes.
struct Wire {
    stream: TcpStream,
    cfg: FrameConfig,
    stat_sn: u32,
    arena: Vec<u8>,
}

/// Stamps the sequence numbers a target PDU carries, advancing StatSN where the PDU
/// consumes one (RFC 7143 §4.2.2.2).
fn stamp(h: &mut Header, stat_sn: &mut u32, exp: u32, max: u32) {
    let mut take = |advance: bool| {
        let sn = *stat_sn;
        if advance {
            *stat_sn = stat_sn.wrapping_add(1);
        }
        sn
    };
    match h {
        Header::ScsiResponse(r) => {
            r.stat_sn = take(true);
            r.exp_cmd_sn = exp;
            r.max_cmd_sn = max;
        }
        Header::DataIn(d) => {
            d.stat_sn = if d.has_status { take(true) } else { 0 };
            d.exp_cmd_sn = exp;
            d.max_cmd_sn = max;
        }
        Header::R2t(r) => {
            r.stat_sn = take(false);
            r.exp_cmd_sn = exp;
            r.max_cmd_sn = max;
        }
        Header::NopIn(n) => {
            n.stat_sn = take(n.itt != RESERVED_TAG);
            n.exp_cmd_sn = exp;
            n.max_cmd_sn = max;
        }
        Header::TaskMgmtResponse(r) => {
            r.stat_sn = take(true);
            r.exp_cmd_sn = exp;
            r.max_cmd_sn = max;
        }
        Header::TextResponse(r) => {
            r.stat_sn = take(true);
            r.exp_cmd_sn = exp;
            r.max_cmd_sn = max;
        }
        Header::LogoutResponse(r) => {
            r.stat_sn = take(true);
            r.exp_cmd_sn = exp;
            r.max_cmd_sn = max;
        }
        Header::Reject(r) => {
            r.stat_sn = take(true);
            r.exp_cmd_sn = exp;
            r.max_cmd_sn = max;
        }
        Header::AsyncMessage(a) => {
            a.stat_sn = take(true);
            a.exp_cmd_sn = exp;
            a.max_cmd_sn = max;
        }
        _ => {}
    }
}

impl Wire {
    /// Stamps and writes `pdus` with as few system calls as the payloads allow.
    fn send(&mut self, pdus: Vec<(Header, Bytes)>, sn: &Sn) -> std::io::Result<()> {
        if pdus.is_empty() {
            return Ok(());
        }
        enum Seg {
            Arena(usize, usize),
            Data(Bytes),
        }
        self.arena.clear();
        let mut segs: Vec<Seg> = Vec::with_capacity(pdus.len() * 2);
        let exp = sn.exp();
        let max = exp.wrapping_add(sn.window - 1);
        let mut open = 0usize;
        for (mut h, data) in pdus {
            stamp(&mut h, &mut self.stat_sn, exp, max);
            self.arena
                .extend_from_slice(frame::encode_header(&h, data.len(), &self.cfg).as_bytes());
            let trailer = frame::trailer(&data, &self.cfg);
            if data.len() <= COPY_LIMIT {
                self.arena.extend_from_slice(&data);
            } else {
                segs.push(Seg::Arena(open, self.arena.len()));
                segs.push(Seg::Data(data));
                open = self.arena.len();
            }
            self.arena.extend_from_slice(trailer.as_bytes());
        }
        segs.push(Seg::Arena(open, self.arena.len()));
        let mut slices: Vec<IoSlice<'_>> = segs
            .iter()
            .map(|s| match s {
                Seg::Arena(a, b) => IoSlice::new(&self.arena[*a..*b]),
                Seg::Data(d) => IoSlice::new(d),
            })
            .filter(|s| !s.is_empty())
            .collect();
        let mut slices = &mut slices[..];
        while !slices.is_empty() {
            let n = (&self.stream).write_vectored(slices)?;
            if n == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            IoSlice::advance_slices(&mut slices, n);
        }
        Ok(())
    }
}

/// Sends through the shared wire; a failed write means the connection is going away,
/// which the engine's read will notice.
fn send_shared(wire: &Mutex<Wire>, sn: &Sn, pdus: Vec<(Header, Bytes)>) {
    let mut w = wire.lock().expect("wire lock poisoned");
    if let Err(e) = w.send(pdus, sn) {
        tracing::debug!(error = %e, "send failed");
        let _ = w.stream.shutdown(std::net::Shutdown::Both);
    }
}

/// A write command collecting its data.
struct PendingWrite {
    permit: Option<OwnedSemaphorePermit>,
    cmd: ScsiCommand,
    lun: Arc<Lun>,
    cdb: Bytes,
    buf: Vec<u8>,
    /// Bytes received so far.
    received: u32,
    /// Bytes of unsolicited data (immediate plus Data-Out without R2T) expected.
    unsolicited: u32,
    unsolicited_data_sn: u32,
    /// Whether the unsolicited sequence is over.
    unsolicited_done: bool,
    /// Outstanding R2Ts by target transfer tag.
    r2ts: BTreeMap<u32, R2tState>,
    next_r2t_offset: u32,
    r2t_sn: u32,
}

struct R2tState {
    offset: u32,
    len: u32,
    received: u32,
    data_sn: u32,
}

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
        let wire = Wire {
            stream: stream.try_clone()?,
            cfg: FrameConfig {
                max_recv_data_segment: est.params.max_xmit_data_segment,
                ..cfg
            },
            stat_sn: est.stat_sn,
            arena: Vec::with_capacity(64 * 1024),
        };
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
        self.pending.clear();
        // Nothing this session sent may reach a LUN after it is reported closed.
        let tasks: Vec<Arc<TaskEntry>> = self
            .session
            .tasks
            .lock()
            .expect("task map poisoned")
            .values()
            .cloned()
            .collect();
        self.rt.block_on(wait_tasks(tasks));
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

    fn serve(&mut self) -> Result<(), EngineError> {
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
                return Err(EngineError::Killed);
            }
            if self.leaving.is_none() && *stopping.borrow_and_update() {
                self.request_logout();
                self.flush()?;
            }
            self.fill()?;
        }
    }

    /// Reads what the socket has; on a quiet tick checks timers instead.
    fn fill(&mut self) -> Result<(), EngineError> {
        let want = frame::frame_len(&self.buf, &self.rx_cfg)?.unwrap_or(0);
        let room = want.saturating_sub(self.buf.len()).max(64 * 1024);
        self.buf.reserve(room);
        match read_into(&self.stream, &mut self.buf) {
            Ok(0) => Err(EngineError::Closed),
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

    fn tick(&mut self) -> Result<(), EngineError> {
        if *self.session.kill.borrow() {
            return Err(EngineError::Killed);
        }
        let now = Instant::now();
        if self.leaving.is_some_and(|t| now >= t) {
            return Err(EngineError::Protocol("the server stopped"));
        }
        if let Some((_, deadline)) = self.ping {
            if now >= deadline {
                return Err(EngineError::Protocol("NOP-In ping not answered"));
            }
        } else if let Some(interval) = self.inner.options.nop_interval
            && now.duration_since(self.last_heard) >= interval
        {
            self.send_ping();
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), EngineError> {
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

    fn push(&mut self, h: Header, data: Bytes) {
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

    fn new_ttt(&mut self) -> u32 {
        let t = self.next_ttt;
        self.next_ttt = self.next_ttt.wrapping_add(1);
        if self.next_ttt == RESERVED_TAG {
            self.next_ttt = 1;
        }
        t
    }

    /// CmdSN ordering (§4.2.2.1): in-order commands advance ExpCmdSN; ones ahead within
    /// the window wait; the rest are dropped silently. Returns whether to process now.
    fn order(&mut self, immediate: bool, cmd_sn: u32, pdu: &RawPdu) -> bool {
        if immediate {
            return true;
        }
        let exp = self.sn.exp();
        if cmd_sn == exp {
            self.sn
                .exp_cmd_sn
                .store(exp.wrapping_add(1), Ordering::Release);
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

    fn handle(&mut self, pdu: RawPdu) -> Result<(), EngineError> {
        self.handle_one(pdu)?;
        // Commands that waited for a CmdSN gap to fill may go now.
        while let Some(held) = self.held.remove(&self.sn.exp()) {
            self.sn
                .exp_cmd_sn
                .store(self.sn.exp().wrapping_add(1), Ordering::Release);
            self.dispatch(held)?;
        }
        Ok(())
    }

    fn handle_one(&mut self, pdu: RawPdu) -> Result<(), EngineError> {
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

    fn dispatch(&mut self, pdu: RawPdu) -> Result<(), EngineError> {
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

    fn lun(&self, field: u64) -> Option<Arc<Lun>> {
        let id = bhs::decode_lun(field)?;
        self.target
            .luns
            .read()
            .expect("LUN map poisoned")
            .get(&id)
            .cloned()
    }

    fn respond(&mut self, c: &ScsiCommand, reply: scsi::Reply) {
        let pdus = build_response(
            c,
            reply,
            self.params.max_xmit_data_segment,
            self.params.max_burst,
        );
        self.out.extend(pdus);
    }

    fn respond_status(&mut self, c: &ScsiCommand, status: u8, sense: Option<Sense>) {
        let reply = scsi::Reply {
            status,
            sense: sense.map(|s| s.to_fixed().to_vec()).unwrap_or_default(),
            ..Default::default()
        };
        self.respond(c, reply);
    }

    fn scsi_command(&mut self, c: ScsiCommand, pdu: RawPdu) -> Result<(), EngineError> {
        // CDBs longer than 16 bytes continue in an extended-CDB AHS.
        let cdb = if pdu.ahs.is_empty() {
            Bytes::copy_from_slice(&c.cdb)
        } else {
            let mut cdb = BytesMut::from(&c.cdb[..]);
            for a in frame::parse_ahs(pdu.ahs.clone())? {
                if a.kind == frame::ahs_type::EXTENDED_CDB {
                    cdb.extend_from_slice(&a.data);
                }
            }
            cdb.freeze()
        };
        let Some(lun) = self.lun(c.lun) else {
            self.no_such_lun(c, &cdb);
            return Ok(());
        };
        let edtl = c.expected_data_len;
        if c.write && u64::from(edtl) > 2 * MAX_TRANSFER_BYTES + 4096 {
            // More than any command we serve can take: refuse before any data is buffered.
            self.respond_status(
                &c,
                status::CHECK_CONDITION,
                Some(Sense::invalid_cdb_field(0, None)),
            );
            return Ok(());
        }
        let units = u64::from(edtl)
            .min(MAX_TRANSFER_BYTES)
            .div_ceil(MEMORY_UNIT) as u32;
        let permit = if units == 0 {
            None
        } else {
            match self.memory.clone().try_acquire_many_owned(units) {
                Ok(p) => Some(p),
                Err(_) => {
                    self.respond_status(&c, status::TASK_SET_FULL, None);
                    return Ok(());
                }
            }
        };
        if !c.write || edtl == 0 {
            self.execute(c, lun, cdb, Bytes::new(), permit);
            return Ok(());
        }
        let immediate = pdu.data;
        if immediate.len() > edtl as usize
            || (!immediate.is_empty() && !self.params.immediate_data)
            || immediate.len() > self.params.first_burst as usize
        {
            return Err(EngineError::Protocol(
                "immediate data beyond what was negotiated",
            ));
        }
        if immediate.len() == edtl as usize {
            self.execute(c, lun, cdb, immediate, permit);
            return Ok(());
        }
        let unsolicited = if !self.params.initial_r2t && !c.final_ {
            self.params.first_burst.min(edtl)
        } else {
            immediate.len() as u32
        };
        let mut buf = Vec::with_capacity(edtl as usize);
        buf.extend_from_slice(&immediate);
        let w = PendingWrite {
            permit,
            cmd: c,
            lun,
            cdb,
            buf,
            received: immediate.len() as u32,
            unsolicited,
            unsolicited_data_sn: 0,
            unsolicited_done: immediate.len() as u32 >= unsolicited,
            r2ts: BTreeMap::new(),
            next_r2t_offset: unsolicited,
            r2t_sn: 0,
        };
        let ready = w.unsolicited_done;
        self.pending.insert(c.itt, w);
        if ready {
            self.pump_r2t(c.itt);
        }
        Ok(())
    }

    /// Issues R2Ts for a write while it is under MaxOutstandingR2T and the connection's
    /// budget of solicited bytes.
    fn pump_r2t(&mut self, itt: u32) {
        let budget = self.inner.options.max_r2t_bytes_per_connection;
        let max_outstanding = self.params.max_outstanding_r2t.max(1) as usize;
        let max_burst = self.params.max_burst;
        let mut r2ts = Vec::new();
        let mut waiting = false;
        {
            let Some(w) = self.pending.get_mut(&itt) else {
                return;
            };
            let edtl = w.cmd.expected_data_len;
            while w.r2ts.len() < max_outstanding && w.next_r2t_offset < edtl {
                let len = max_burst.min(edtl - w.next_r2t_offset);
                if self.r2t_bytes > 0 && self.r2t_bytes + u64::from(len) > budget {
                    waiting = true;
                    break;
                }
                let ttt = self.next_ttt;
                self.next_ttt = self.next_ttt.wrapping_add(1);
                if self.next_ttt == RESERVED_TAG {
                    self.next_ttt = 1;
                }
                w.r2ts.insert(
                    ttt,
                    R2tState {
                        offset: w.next_r2t_offset,
                        len,
                        received: 0,
                        data_sn: 0,
                    },
                );
                r2ts.push(R2t {
                    lun: w.cmd.lun,
                    itt,
                    ttt,
                    r2t_sn: w.r2t_sn,
                    buffer_offset: w.next_r2t_offset,
                    desired_len: len,
                    ..Default::default()
                });
                w.r2t_sn = w.r2t_sn.wrapping_add(1);
                w.next_r2t_offset += len;
                self.r2t_bytes += u64::from(len);
            }
        }
        if waiting && !self.r2t_waiting.contains(&itt) {
            self.r2t_waiting.push_back(itt);
        }
        for r in r2ts {
            self.push(Header::R2t(r), Bytes::new());
        }
    }

    fn release_r2t_budget(&mut self, bytes: u64) {
        self.r2t_bytes = self.r2t_bytes.saturating_sub(bytes);
        let waiting: Vec<u32> = self.r2t_waiting.drain(..).collect();
        for itt in waiting {
            self.pump_r2t(itt);
        }
    }

    fn drop_pending(&mut self, itt: u32) -> bool {
        match self.pending.remove(&itt) {
            Some(w) => {
                let outstanding: u64 = w.r2ts.values().map(|s| u64::from(s.len)).sum();
                self.release_r2t_budget(outstanding);
                true
            }
            None => false,
        }
    }

    fn data_out(&mut self, d: DataOut, data: Bytes) -> Result<(), EngineError> {
        let Some(w) = self.pending.get_mut(&d.itt) else {
            // Data for a task that already ended (refused early or aborted): discard.
            return Ok(());
        };
        let len = data.len() as u32;
        let edtl = w.cmd.expected_data_len;
        let mut freed = 0u64;
        if d.ttt == RESERVED_TAG {
            if w.unsolicited_done
                || d.data_sn != w.unsolicited_data_sn
                || d.buffer_offset != w.received
                || d.buffer_offset + len > w.unsolicited
            {
                return Err(EngineError::Protocol("unsolicited Data-Out out of order"));
            }
            w.unsolicited_data_sn += 1;
            w.buf.extend_from_slice(&data);
            w.received += len;
            if d.final_ || w.received >= w.unsolicited {
                w.unsolicited_done = true;
            }
        } else {
            let Some(r) = w.r2ts.get_mut(&d.ttt) else {
                return Err(EngineError::Protocol("Data-Out for an unknown R2T"));
            };
            if d.data_sn != r.data_sn
                || d.buffer_offset != r.offset + r.received
                || r.received + len > r.len
            {
                return Err(EngineError::Protocol("solicited Data-Out out of order"));
            }
            r.data_sn += 1;
            r.received += len;
            let at = d.buffer_offset as usize;
            if w.buf.len() == at {
                w.buf.extend_from_slice(&data);
            } else {
                if w.buf.len() < at + data.len() {
                    w.buf.resize(at + data.len(), 0);
                }
                w.buf[at..at + data.len()].copy_from_slice(&data);
            }
            w.received += len;
            if r.received == r.len {
                freed = u64::from(r.len);
                w.r2ts.remove(&d.ttt);
            } else if d.final_ {
                return Err(EngineError::Protocol("R2T sequence ended short"));
            }
        }
        let complete = w.received >= edtl;
        let unsolicited_done = w.unsolicited_done;
        if complete {
            let w = self.pending.remove(&d.itt).expect("present above");
            self.execute(w.cmd, w.lun, w.cdb, Bytes::from(w.buf), w.permit);
        } else if unsolicited_done {
            self.pump_r2t(d.itt);
        }
        if freed > 0 {
            self.release_r2t_budget(freed);
        }
        Ok(())
    }

    fn no_such_lun(&mut self, c: ScsiCommand, cdb: &[u8]) {
        match cdb[0] {
            op::INQUIRY if cdb.len() >= 6 && cdb[1] & 1 == 0 => {
                // Peripheral qualifier 011b: no logical unit here.
                let mut d = vec![0u8; 36];
                d[0] = 0x7f;
                d[2] = 0x06;
                d[3] = 0x12;
                d[4] = 31;
                let alloc = usize::from(u16::from_be_bytes([cdb[3], cdb[4]]));
                d.truncate(alloc);
                let reply = scsi::Reply {
                    status: status::GOOD,
                    data_in: d,
                    ..Default::default()
                };
                self.respond(&c, reply);
            }
            op::REPORT_LUNS => {
                // Any LUN answers REPORT LUNS: use the first one's view.
                let first = self
                    .target
                    .luns
                    .read()
                    .expect("LUN map poisoned")
                    .values()
                    .next()
                    .cloned();
                match first {
                    Some(lun) => {
                        self.execute(c, lun, Bytes::copy_from_slice(cdb), Bytes::new(), None)
                    }
                    None => {
                        let alloc = if cdb.len() >= 10 {
                            u32::from_be_bytes([cdb[6], cdb[7], cdb[8], cdb[9]]) as usize
                        } else {
                            0
                        };
                        let mut d = vec![0u8; 8];
                        d.truncate(alloc);
                        let reply = scsi::Reply {
                            status: status::GOOD,
                            data_in: d,
                            ..Default::default()
                        };
                        self.respond(&c, reply);
                    }
                }
            }
            _ => self.respond_status(&c, status::CHECK_CONDITION, Some(Sense::LUN_NOT_SUPPORTED)),
        }
    }

    /// Runs a command: here when it is quick, on the blocking pool when it may take long
    /// (the engine keeps reading and answering meanwhile).
    fn execute(
        &mut self,
        c: ScsiCommand,
        lun: Arc<Lun>,
        cdb: Bytes,
        data: Bytes,
        permit: Option<OwnedSemaphorePermit>,
    ) {
        if !may_take_long(&cdb) && c.expected_data_len < BIG_TRANSFER {
            let reply = {
                let ctx = Ctx {
                    lun: &lun,
                    nexus: &self.session.nexus,
                    fabric: &*self.fabric,
                    edtl: c.expected_data_len,
                    data_out: &data,
                };
                scsi::execute(&ctx, &cdb)
            };
            self.respond(&c, reply);
            drop(permit);
            return;
        }
        // Answers queued before this command go first.
        if let Err(e) = self.flush() {
            tracing::debug!(error = %e, "send failed");
        }
        let entry = Arc::new(TaskEntry {
            lun: lun.id,
            aborted: Default::default(),
            done: watch::channel(false).0,
        });
        self.session
            .tasks
            .lock()
            .expect("task map poisoned")
            .insert(c.itt, entry.clone());
        let session = self.session.clone();
        let fabric = self.fabric.clone();
        let wire = self.wire.clone();
        let sn = self.sn.clone();
        let max_seg = self.params.max_xmit_data_segment;
        let max_burst = self.params.max_burst;
        self.rt.spawn_blocking(move || {
            // Held until the response is sent: the buffers count against the budget.
            let _permit = permit;
            let reply = if entry.aborted.load(Ordering::SeqCst) {
                None
            } else {
                let ctx = Ctx {
                    lun: &lun,
                    nexus: &session.nexus,
                    fabric: &*fabric,
                    edtl: c.expected_data_len,
                    data_out: &data,
                };
                Some(scsi::execute(&ctx, &cdb))
            };
            // Leave the task map and read the abort flag under one lock, so an ABORT TASK
            // either finds the task (and its response is never sent) or does not (and
            // answers that the task does not exist while the response goes out).
            let send = {
                let mut tasks = session.tasks.lock().expect("task map poisoned");
                if tasks.get(&c.itt).is_some_and(|t| Arc::ptr_eq(t, &entry)) {
                    tasks.remove(&c.itt);
                }
                !entry.aborted.load(Ordering::SeqCst)
            };
            if let Some(reply) = reply
                && send
            {
                send_shared(&wire, &sn, build_response(&c, reply, max_seg, max_burst));
            }
            entry.done.send_replace(true);
        });
    }

    /// Sends a task management response once `tasks` have finished, from the blocking
    /// pool so the engine keeps serving meanwhile.
    fn respond_tmf_after(
        &mut self,
        itt: u32,
        response: u8,
        tasks: Vec<Arc<TaskEntry>>,
        then_close: Vec<Arc<SessionHandle>>,
    ) {
        let r = TaskMgmtResponse {
            response,
            itt,
            ..Default::default()
        };
        if tasks.is_empty() && then_close.is_empty() {
            self.push(Header::TaskMgmtResponse(r), Bytes::new());
            return;
        }
        if let Err(e) = self.flush() {
            tracing::debug!(error = %e, "send failed");
        }
        let wire = self.wire.clone();
        let sn = self.sn.clone();
        let rt = self.rt.clone();
        self.rt.spawn_blocking(move || {
            rt.block_on(wait_tasks(tasks));
            send_shared(
                &wire,
                &sn,
                vec![(Header::TaskMgmtResponse(r), Bytes::new())],
            );
            for s in then_close {
                s.request_close();
            }
        });
    }

    fn task_mgmt(&mut self, t: TaskMgmtRequest) {
        let itt = t.itt;
        let lun_id = bhs::decode_lun(t.lun);
        let lun_exists = self.lun(t.lun).is_some();
        match t.function {
            tmf::ABORT_TASK => {
                let r = t.referenced_task_tag;
                if self.drop_pending(r) || self.held.remove(&t.ref_cmd_sn).is_some() {
                    self.respond_tmf_after(itt, tmf::FUNCTION_COMPLETE, Vec::new(), Vec::new());
                    return;
                }
                let task = {
                    let tasks = self.session.tasks.lock().expect("task map poisoned");
                    let t = tasks.get(&r).cloned();
                    if let Some(t) = &t {
                        t.aborted.store(true, Ordering::SeqCst);
                    }
                    t
                };
                match task {
                    Some(task) => {
                        self.respond_tmf_after(itt, tmf::FUNCTION_COMPLETE, vec![task], Vec::new())
                    }
                    None => {
                        // Not here. A RefCmdSN still inside the window names a command
                        // yet to arrive: it counts as received and aborted (§11.5.1).
                        // Otherwise the task finished (its response is out) or never was.
                        let response =
                            if serial::in_window(t.ref_cmd_sn, self.sn.exp(), self.sn.max())
                                && serial::lt(t.ref_cmd_sn, t.cmd_sn)
                            {
                                tmf::FUNCTION_COMPLETE
                            } else {
                                tmf::TASK_DOES_NOT_EXIST
                            };
                        self.respond_tmf_after(itt, response, Vec::new(), Vec::new());
                    }
                }
            }
            tmf::ABORT_TASK_SET | tmf::CLEAR_TASK_SET => {
                if !lun_exists {
                    self.respond_tmf_after(itt, tmf::LUN_DOES_NOT_EXIST, Vec::new(), Vec::new());
                    return;
                }
                let lun = lun_id.expect("LUN exists");
                let mine: Vec<u32> = self
                    .pending
                    .iter()
                    .filter(|(_, w)| w.lun.id == lun)
                    .map(|(itt, _)| *itt)
                    .collect();
                for itt in mine {
                    self.drop_pending(itt);
                }
                let tasks = self.session.abort_tasks(Some(lun));
                self.respond_tmf_after(itt, tmf::FUNCTION_COMPLETE, tasks, Vec::new());
            }
            tmf::LOGICAL_UNIT_RESET | tmf::TARGET_WARM_RESET | tmf::TARGET_COLD_RESET => {
                let luns: Vec<Arc<Lun>> = if t.function == tmf::LOGICAL_UNIT_RESET {
                    match self.lun(t.lun) {
                        Some(l) => vec![l],
                        None => {
                            self.respond_tmf_after(
                                itt,
                                tmf::LUN_DOES_NOT_EXIST,
                                Vec::new(),
                                Vec::new(),
                            );
                            return;
                        }
                    }
                } else {
                    crate::scsi::Fabric::luns(&*self.fabric)
                };
                let ids: Vec<u16> = luns.iter().map(|l| l.id).collect();
                let mine: Vec<u32> = self
                    .pending
                    .iter()
                    .filter(|(_, w)| ids.contains(&w.lun.id))
                    .map(|(itt, _)| *itt)
                    .collect();
                for itt in mine {
                    self.drop_pending(itt);
                }
                let mut tasks = Vec::new();
                let sessions = self.inner.sessions_of(&self.target.iqn);
                for s in &sessions {
                    for id in &ids {
                        tasks.extend(s.abort_tasks(Some(*id)));
                    }
                }
                let nexuses: Vec<String> = sessions.iter().map(|s| s.nexus.clone()).collect();
                let sense = if t.function == tmf::LOGICAL_UNIT_RESET {
                    Sense::BUS_DEVICE_RESET
                } else {
                    Sense::POWER_ON_RESET
                };
                for lun in &luns {
                    let mut st = lun.state();
                    st.reserve6 = None;
                    st.prevent_removal.clear();
                    for n in &nexuses {
                        push_ua(&mut st, n, sense);
                    }
                }
                // A cold reset ends every session of the target, ours included, once the
                // response is on the wire.
                let close = if t.function == tmf::TARGET_COLD_RESET {
                    sessions
                } else {
                    Vec::new()
                };
                self.respond_tmf_after(itt, tmf::FUNCTION_COMPLETE, tasks, close);
            }
            tmf::TASK_REASSIGN => {
                self.respond_tmf_after(itt, tmf::REASSIGNMENT_NOT_SUPPORTED, Vec::new(), Vec::new())
            }
            tmf::CLEAR_ACA => {
                self.respond_tmf_after(itt, tmf::FUNCTION_NOT_SUPPORTED, Vec::new(), Vec::new())
            }
            _ => self.respond_tmf_after(itt, tmf::FUNCTION_REJECTED, Vec::new(), Vec::new()),
        }
    }

    fn text(&mut self, t: TextRequest, data: &[u8]) -> Result<(), EngineError> {
        let body = if t.ttt != RESERVED_TAG {
            match self.text_more.take() {
                Some((ttt, rest)) if ttt == t.ttt => rest,
                _ => Vec::new(),
            }
        } else {
            if self.text_partial.len() + data.len() > 64 * 1024 {
                return Err(EngineError::Protocol("text request too long"));
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
                .map_err(|_| EngineError::Protocol("bad text keys"))?;
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

/// Commands that may block for long (a flush, a big copy) run off the engine thread.
fn may_take_long(cdb: &[u8]) -> bool {
    match cdb[0] {
        op::SYNCHRONIZE_CACHE_10
        | op::SYNCHRONIZE_CACHE_16
        | op::UNMAP
        | op::WRITE_SAME_10
        | op::WRITE_SAME_16
        | op::EXTENDED_COPY
        | op::COMPARE_AND_WRITE
        | op::PERSISTENT_RESERVE_OUT
        | op::WRITE_VERIFY_10
        | op::WRITE_VERIFY_12
        | op::WRITE_VERIFY_16 => true,
        // Writes with FUA wait for the device to make them durable.
        op::WRITE_10 | op::WRITE_12 | op::WRITE_16 | op::ORWRITE_16 => cdb[1] & 0x08 != 0,
        _ => false,
    }
}

/// Reads into the spare capacity of `buf` with one `recv`.
fn read_into(stream: &TcpStream, buf: &mut BytesMut) -> std::io::Result<usize> {
    use std::os::fd::AsRawFd;
    let spare = buf.spare_capacity_mut();
    // SAFETY: `spare` is writable memory of `spare.len()` bytes owned by `buf`; recv
    // writes at most that many bytes into it and the descriptor belongs to `stream`,
    // which outlives the call.
    let n = unsafe {
        libc::recv(
            stream.as_raw_fd(),
            spare.as_mut_ptr().cast(),
            spare.len(),
            0,
        )
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let n = n as usize;
    // SAFETY: recv initialised the first `n` bytes of the spare capacity.
    unsafe { buf.set_len(buf.len() + n) };
    Ok(n)
}
/// Turns a finished command into PDUs: Data-In carrying the data (the last with status
/// when there is no sense: phase collapse), or Data-In then a SCSI Response.
fn build_response(
    c: &ScsiCommand,
    reply: scsi::Reply,
    max_seg: u32,
    max_burst: u32,
) -> Vec<(Header, Bytes)> {
    let edtl = c.expected_data_len;
    let mut data = reply.data_in;
    let produced = reply.data_in_len.unwrap_or(data.len() as u64);
    // Residuals compare what the command moved with what the initiator expected.
    let moved = if c.write && !c.read {
        u64::from(reply.data_out_len)
    } else {
        produced
    };
    let (overflow, underflow, residual) = match moved.cmp(&u64::from(edtl)) {
        std::cmp::Ordering::Greater => (true, false, (moved - u64::from(edtl)) as u32),
        std::cmp::Ordering::Less => (false, true, (u64::from(edtl) - moved) as u32),
        std::cmp::Ordering::Equal => (false, false, 0),
    };
    if !c.read {
        data.clear();
    }
    data.truncate(edtl as usize);
    let data = Bytes::from(data);
    let mut pdus = Vec::new();
    let collapse = reply.status == status::GOOD && reply.sense.is_empty() && !data.is_empty();
    let max_seg = max_seg.max(512) as usize;
    let max_burst = max_burst.max(512) as usize;
    let mut offset = 0usize;
    let mut data_sn = 0u32;
    while offset < data.len() {
        // A Data-In sequence ends (F) at every MaxBurstLength boundary.
        let burst_end = (offset / max_burst + 1) * max_burst;
        let end = (offset + max_seg).min(data.len()).min(burst_end);
        let last = end == data.len();
        let mut d = DataIn {
            final_: last || end == burst_end,
            lun: 0,
            itt: c.itt,
            ttt: RESERVED_TAG,
            data_sn,
            buffer_offset: offset as u32,
            ..Default::default()
        };
        if last && collapse {
            d.has_status = true;
            d.status = reply.status;
            d.overflow = overflow;
            d.underflow = underflow;
            d.residual = residual;
        }
        pdus.push((Header::DataIn(d), data.slice(offset..end)));
        data_sn += 1;
        offset = end;
    }
    if !collapse {
        let mut payload = Vec::new();
        if !reply.sense.is_empty() {
            payload.extend_from_slice(&(reply.sense.len() as u16).to_be_bytes());
            payload.extend_from_slice(&reply.sense);
        }
        let r = ScsiResponse {
            overflow,
            underflow,
            response: 0,
            status: reply.status,
            itt: c.itt,
            exp_data_sn: data_sn,
            residual,
            ..Default::default()
        };
        pdus.push((Header::ScsiResponse(r), Bytes::from(payload)));
    }
    pdus
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(read: bool, write: bool, edtl: u32) -> ScsiCommand {
        ScsiCommand {
            immediate: false,
            final_: true,
            read,
            write,
            attr: 1,
            lun: 0,
            itt: 9,
            expected_data_len: edtl,
            cmd_sn: 0,
            exp_stat_sn: 0,
            cdb: [0; 16],
        }
    }

    #[test]
    fn read_data_is_split_by_segment_and_burst_with_status_on_the_last() {
        let reply = scsi::Reply {
            status: status::GOOD,
            data_in: vec![1u8; 10_000],
            ..Default::default()
        };
        let pdus = build_response(&cmd(true, false, 10_000), reply, 4096, 8192);
        assert_eq!(pdus.len(), 3);
        let offsets: Vec<(u32, usize, bool, bool)> = pdus
            .iter()
            .map(|(h, d)| match h {
                Header::DataIn(x) => (x.buffer_offset, d.len(), x.final_, x.has_status),
                _ => panic!("not Data-In"),
            })
            .collect();
        assert_eq!(
            offsets,
            vec![
                (0, 4096, false, false),
                (4096, 4096, true, false),
                (8192, 1808, true, true)
            ]
        );
    }

    #[test]
    fn residuals_for_short_and_long_transfers() {
        let reply = scsi::Reply {
            status: status::GOOD,
            data_in: vec![0u8; 512],
            ..Default::default()
        };
        let pdus = build_response(&cmd(true, false, 200), reply, 8192, 8192);
        match &pdus[0].0 {
            Header::DataIn(d) => assert!(d.overflow && d.residual == 312 && d.has_status),
            _ => panic!(),
        }
        assert_eq!(pdus[0].1.len(), 200);
        let reply = scsi::Reply {
            status: status::GOOD,
            data_out_len: 512,
            ..Default::default()
        };
        let pdus = build_response(&cmd(false, true, 10_000), reply, 8192, 8192);
        match &pdus[0].0 {
            Header::ScsiResponse(r) => assert!(r.underflow && r.residual == 10_000 - 512),
            _ => panic!(),
        }
    }

    #[test]
    fn check_condition_carries_sense_in_a_response_pdu() {
        let reply = scsi::Reply {
            status: status::CHECK_CONDITION,
            sense: Sense::LBA_OUT_OF_RANGE.to_fixed().to_vec(),
            ..Default::default()
        };
        let pdus = build_response(&cmd(true, false, 512), reply, 8192, 8192);
        assert_eq!(pdus.len(), 1);
        assert_eq!(&pdus[0].1[..2], &18u16.to_be_bytes());
    }
}
