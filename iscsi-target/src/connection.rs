//! One TCP connection: the login phase, then either a discovery session (SendTargets)
//! or a normal session's full feature phase.
//!
//! The full feature phase runs as two tasks. The reader owns the socket's read half and
//! all per-connection state (CmdSN window, writes collecting data, R2Ts); it never waits
//! on the device. SCSI commands run on blocking threads and hand their response PDUs to
//! the writer task, which stamps StatSN/ExpCmdSN/MaxCmdSN in send order and writes
//! batches of PDUs with vectored writes, so large Data-In payloads are never copied.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::IoSlice;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use iscsi_pdu::bhs::{
    self, DataIn, DataOut, Header, LoginResponse, LogoutRequest, LogoutResponse, NopIn, NopOut,
    R2t, RESERVED_TAG, Reject, ScsiCommand, ScsiResponse, TaskMgmtRequest, TaskMgmtResponse,
    TextRequest, TextResponse, login_status, reject_reason, tmf,
};
use iscsi_pdu::frame::{self, FrameConfig, RawPdu};
use iscsi_pdu::{PduError, serial, text};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot, watch};

use crate::login::{Established, Login, Step};
use crate::lun::{Lun, push_ua};
use crate::scsi::sense::{Sense, status};
use crate::scsi::{self, Ctx, MAX_TRANSFER_BYTES};
use crate::server::{Inner, TargetEntry, TargetFabric};
use crate::session::{SessionHandle, SessionParams, SessionType, TaskEntry, wait_tasks};

/// Why a connection ended.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnError {
    #[error("socket")]
    Io(#[from] std::io::Error),
    #[error("malformed PDU")]
    Pdu(#[from] PduError),
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    #[error("peer closed the connection")]
    Closed,
}

/// Reads whole PDUs off the socket.
struct PduReader {
    rd: OwnedReadHalf,
    buf: BytesMut,
    cfg: FrameConfig,
}

impl PduReader {
    async fn next(&mut self) -> Result<RawPdu, ConnError> {
        loop {
            if let Some(pdu) = frame::decode(&mut self.buf, &self.cfg)? {
                return Ok(pdu);
            }
            // Reserve room for the whole frame when its header says how long it is.
            let want = frame::frame_len(&self.buf, &self.cfg)?.unwrap_or(0);
            self.buf
                .reserve(want.saturating_sub(self.buf.len()).max(64 * 1024));
            if self.rd.read_buf(&mut self.buf).await? == 0 {
                return Err(ConnError::Closed);
            }
        }
    }
}

async fn write_pdu(
    wr: &mut OwnedWriteHalf,
    header: &Header,
    data: &[u8],
    cfg: &FrameConfig,
) -> Result<(), ConnError> {
    let mut out = Vec::with_capacity(64 + data.len());
    frame::encode(header, &[], data, cfg, &mut out)?;
    wr.write_all(&out).await?;
    Ok(())
}

/// Serves one accepted connection until it ends.
pub(crate) async fn serve(inner: Arc<Inner>, stream: TcpStream, peer: SocketAddr) {
    let _ = stream.set_nodelay(true);
    let local = stream.local_addr().ok();
    let (rd, mut wr) = stream.into_split();
    let mut reader = PduReader {
        rd,
        buf: BytesMut::with_capacity(64 * 1024),
        cfg: FrameConfig::default(),
    };
    let login = tokio::time::timeout(
        inner.options.login_timeout,
        login_phase(&inner, &mut reader, &mut wr, peer),
    )
    .await;
    let (est, session) = match login {
        Ok(Ok(Some(done))) => done,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "login ended");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "login timed out");
            return;
        }
    };
    reader.cfg = FrameConfig {
        header_digest: est.params.header_digest,
        data_digest: est.params.data_digest,
        max_recv_data_segment: est.params.max_recv_data_segment,
    };
    match est.session_type {
        SessionType::Discovery => {
            if let Err(e) = discovery(&inner, &mut reader, &mut wr, &est, local).await {
                tracing::debug!(%peer, error = %e, "discovery session ended");
            }
        }
        SessionType::Normal => {
            let session = session.expect("normal sessions are admitted");
            normal_session(inner, reader, wr, est, session).await
        }
    }
}

async fn login_phase(
    inner: &Inner,
    reader: &mut PduReader,
    wr: &mut OwnedWriteHalf,
    peer: SocketAddr,
) -> Result<Option<(Established, Option<Arc<SessionHandle>>)>, ConnError> {
    let mut login = Login::new(inner);
    loop {
        let pdu = reader.next().await?;
        let req = match pdu.header() {
            Ok(Header::LoginRequest(r)) => r,
            // Anything else before login completes ends the connection (§6.3).
            _ => return Err(ConnError::Protocol("non-login PDU during login")),
        };
        match login.step(&req, &pdu.data) {
            Step::Continue(r, data) => {
                write_pdu(
                    wr,
                    &Header::LoginResponse(r),
                    &data,
                    &FrameConfig::default(),
                )
                .await?
            }
            Step::Fail(r) => {
                tracing::info!(
                    class = r.status_class,
                    detail = r.status_detail,
                    "login refused"
                );
                write_pdu(wr, &Header::LoginResponse(r), &[], &FrameConfig::default()).await?;
                let _ = wr.shutdown().await;
                return Ok(None);
            }
            Step::Complete(mut r, data) => {
                let est = login.established();
                let mut session = None;
                match est.session_type {
                    SessionType::Discovery => {
                        r.tsih = inner.new_tsih();
                    }
                    SessionType::Normal => match admit(inner, &est, peer).await {
                        Ok(s) => {
                            r.tsih = s.tsih;
                            session = Some(s);
                        }
                        Err(status) => {
                            let fail = LoginResponse {
                                transit: false,
                                nsg: 0,
                                tsih: 0,
                                status_class: status.0,
                                status_detail: status.1,
                                ..r
                            };
                            write_pdu(
                                wr,
                                &Header::LoginResponse(fail),
                                &[],
                                &FrameConfig::default(),
                            )
                            .await?;
                            return Ok(None);
                        }
                    },
                }
                if let Err(e) = write_pdu(
                    wr,
                    &Header::LoginResponse(r),
                    &data,
                    &FrameConfig::default(),
                )
                .await
                {
                    if let Some(s) = session {
                        inner.unregister(s.id);
                        s.closed.send_replace(true);
                    }
                    return Err(e);
                }
                let mut est = est;
                est.tsih = r.tsih;
                return Ok(Some((est, session)));
            }
        }
    }
}

/// Decides the TSIH of a completed normal login: a new session (reinstating one with the
/// same initiator, ISID and target), or a connection that replaces the one a session has.
async fn admit(
    inner: &Inner,
    est: &Established,
    peer: SocketAddr,
) -> Result<Arc<SessionHandle>, (u8, u8)> {
    let target = est.target.as_ref().expect("normal sessions have a target");
    let same = |s: &SessionHandle| {
        s.initiator == est.initiator && s.isid == est.isid && s.target == target.iqn
    };
    let existing: Vec<Arc<SessionHandle>> = inner
        .sessions
        .lock()
        .expect("sessions lock poisoned")
        .values()
        .filter(|s| same(s))
        .cloned()
        .collect();
    if est.tsih != 0 && !existing.iter().any(|s| s.tsih == est.tsih) {
        return Err(login_status::SESSION_DOES_NOT_EXIST);
    }
    // Reinstatement (TSIH 0) or connection replacement (TSIH given, one connection per
    // session): the old connection goes first, with its tasks (ErrorRecoveryLevel 0).
    for s in &existing {
        s.abort_tasks(None);
        s.request_close();
    }
    for s in existing {
        if tokio::time::timeout(Duration::from_secs(10), s.wait_closed())
            .await
            .is_err()
        {
            return Err(login_status::SERVICE_UNAVAILABLE);
        }
    }
    // Register first, then look at the ACL: a revoke either removes the grant before
    // this check (the login is refused) or finds the session registered (and drops it).
    let tsih = if est.tsih != 0 {
        est.tsih
    } else {
        inner.new_tsih()
    };
    let session = Arc::new(SessionHandle::new(
        inner.new_session_id(),
        tsih,
        est.isid,
        est.initiator.clone(),
        target.iqn.clone(),
        peer,
    ));
    inner.register(session.clone());
    let refuse = if target
        .acl
        .read()
        .expect("ACL lock poisoned")
        .access(&est.initiator)
        .is_none()
    {
        Some(login_status::AUTHORIZATION_FAILURE)
    } else if inner.target(&target.iqn).is_none() {
        Some(login_status::TARGET_REMOVED)
    } else {
        None
    };
    if let Some(status) = refuse {
        inner.unregister(session.id);
        session.closed.send_replace(true);
        return Err(status);
    }
    Ok(session)
}

/// A discovery session: SendTargets, NOP and Logout, answered one at a time.
async fn discovery(
    inner: &Inner,
    reader: &mut PduReader,
    wr: &mut OwnedWriteHalf,
    est: &Established,
    local: Option<SocketAddr>,
) -> Result<(), ConnError> {
    let cfg = reader.cfg;
    let mut stat_sn = est.stat_sn;
    let mut exp_cmd_sn = est.cmd_sn;
    let window = inner.options.command_window;
    let mut pending_text: Vec<u8> = Vec::new();
    let mut more: Option<(u32, Vec<u8>)> = None;
    loop {
        let pdu = reader.next().await?;
        let header = match pdu.header() {
            Ok(h) => h,
            Err(_) => {
                send_reject(
                    wr,
                    &cfg,
                    &pdu,
                    reject_reason::COMMAND_NOT_SUPPORTED,
                    &mut stat_sn,
                    exp_cmd_sn,
                    window,
                )
                .await?;
                continue;
            }
        };
        match header {
            Header::TextRequest(t) => {
                if !t.immediate && t.cmd_sn == exp_cmd_sn {
                    exp_cmd_sn = exp_cmd_sn.wrapping_add(1);
                }
                let body = if t.ttt != RESERVED_TAG {
                    match more.take() {
                        Some((ttt, rest)) if ttt == t.ttt => rest,
                        _ => Vec::new(),
                    }
                } else {
                    if pending_text.len() + pdu.data.len() > 64 * 1024 {
                        return Err(ConnError::Protocol("text request too long"));
                    }
                    pending_text.extend_from_slice(&pdu.data);
                    if t.continue_ {
                        let r = TextResponse {
                            final_: false,
                            continue_: false,
                            lun: t.lun,
                            itt: t.itt,
                            ttt: 0x1000,
                            stat_sn,
                            exp_cmd_sn,
                            max_cmd_sn: exp_cmd_sn.wrapping_add(window - 1),
                        };
                        stat_sn = stat_sn.wrapping_add(1);
                        write_pdu(wr, &Header::TextResponse(r), &[], &cfg).await?;
                        continue;
                    }
                    let pairs = text::parse(&std::mem::take(&mut pending_text))
                        .map_err(|_| ConnError::Protocol("bad text keys"))?;
                    text::encode(&answer_text(inner, &est.initiator, None, &pairs, local))
                };
                let max = est.params.max_xmit_data_segment as usize;
                let (chunk, rest) = body.split_at(body.len().min(max));
                let last = rest.is_empty();
                let ttt = if last { RESERVED_TAG } else { 0x2000 };
                if !last {
                    more = Some((ttt, rest.to_vec()));
                }
                let r = TextResponse {
                    final_: last,
                    continue_: !last,
                    lun: t.lun,
                    itt: t.itt,
                    ttt,
                    stat_sn,
                    exp_cmd_sn,
                    max_cmd_sn: exp_cmd_sn.wrapping_add(window - 1),
                };
                stat_sn = stat_sn.wrapping_add(1);
                write_pdu(wr, &Header::TextResponse(r), chunk, &cfg).await?;
            }
            Header::NopOut(n) => {
                if !n.immediate && n.cmd_sn == exp_cmd_sn {
                    exp_cmd_sn = exp_cmd_sn.wrapping_add(1);
                }
                if n.itt != RESERVED_TAG {
                    let r = NopIn {
                        lun: n.lun,
                        itt: n.itt,
                        ttt: RESERVED_TAG,
                        stat_sn,
                        exp_cmd_sn,
                        max_cmd_sn: exp_cmd_sn.wrapping_add(window - 1),
                    };
                    stat_sn = stat_sn.wrapping_add(1);
                    write_pdu(wr, &Header::NopIn(r), &pdu.data, &cfg).await?;
                }
            }
            Header::LogoutRequest(l) => {
                if !l.immediate && l.cmd_sn == exp_cmd_sn {
                    exp_cmd_sn = exp_cmd_sn.wrapping_add(1);
                }
                let r = LogoutResponse {
                    response: 0,
                    itt: l.itt,
                    stat_sn,
                    exp_cmd_sn,
                    max_cmd_sn: exp_cmd_sn.wrapping_add(window - 1),
                    time2wait: 0,
                    time2retain: 0,
                };
                write_pdu(wr, &Header::LogoutResponse(r), &[], &cfg).await?;
                let _ = wr.shutdown().await;
                return Ok(());
            }
            _ => {
                // SCSI commands and the like have no place in a discovery session.
                send_reject(
                    wr,
                    &cfg,
                    &pdu,
                    reject_reason::PROTOCOL_ERROR,
                    &mut stat_sn,
                    exp_cmd_sn,
                    window,
                )
                .await?;
            }
        }
    }
}

async fn send_reject(
    wr: &mut OwnedWriteHalf,
    cfg: &FrameConfig,
    pdu: &RawPdu,
    reason: u8,
    stat_sn: &mut u32,
    exp_cmd_sn: u32,
    window: u32,
) -> Result<(), ConnError> {
    let r = Reject {
        reason,
        stat_sn: *stat_sn,
        exp_cmd_sn,
        max_cmd_sn: exp_cmd_sn.wrapping_add(window - 1),
        data_sn: 0,
    };
    *stat_sn = stat_sn.wrapping_add(1);
    write_pdu(wr, &Header::Reject(r), &pdu.bhs, cfg).await
}

/// The answer to Text keys: SendTargets lists the targets this initiator may reach.
fn answer_text(
    inner: &Inner,
    initiator: &str,
    current: Option<&str>,
    pairs: &[(String, String)],
    local: Option<SocketAddr>,
) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (k, v) in pairs {
        if k != "SendTargets" {
            out.push((k.clone(), text::NOT_UNDERSTOOD.to_owned()));
            continue;
        }
        let portal = inner.options.advertised_portal.or(local);
        let targets: Vec<Arc<TargetEntry>> = inner
            .targets
            .read()
            .expect("targets lock poisoned")
            .values()
            .filter(|t| match v.as_str() {
                "All" => current.is_none(),
                "" => current == Some(t.iqn.as_str()),
                name => t.iqn == name,
            })
            .cloned()
            .collect();
        for t in targets {
            if t.acl
                .read()
                .expect("ACL lock poisoned")
                .access(initiator)
                .is_none()
            {
                continue;
            }
            out.push(("TargetName".into(), t.iqn.clone()));
            if let Some(p) = portal {
                let addr = match p {
                    SocketAddr::V4(a) => a.to_string(),
                    SocketAddr::V6(a) => format!("[{}]:{}", a.ip(), a.port()),
                };
                out.push((
                    "TargetAddress".into(),
                    format!("{addr},{}", inner.options.portal_group),
                ));
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// Full feature phase of a normal session.

/// Sequence numbers the reader and writer share.
struct Sn {
    exp_cmd_sn: AtomicU32,
    window: u32,
}

/// What the writer sends.
enum Out {
    Pdus(Vec<(Header, Bytes)>),
    /// Acknowledged once everything queued before it is on the wire.
    Flush(oneshot::Sender<()>),
}

/// Stamps the sequence numbers a target PDU carries; returns whether StatSN advanced.
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

/// Payloads up to this size are copied next to their header; larger ones are written
/// from their own buffer.
const COPY_LIMIT: usize = 16 * 1024;

async fn writer(
    mut wr: OwnedWriteHalf,
    mut rx: mpsc::UnboundedReceiver<Out>,
    sn: Arc<Sn>,
    cfg: FrameConfig,
    mut stat_sn: u32,
) {
    enum Seg {
        Arena(usize, usize),
        Data(Bytes),
    }
    let mut arena: Vec<u8> = Vec::with_capacity(64 * 1024);
    let mut segs: Vec<Seg> = Vec::new();
    let mut acks: Vec<oneshot::Sender<()>> = Vec::new();
    while let Some(first) = rx.recv().await {
        arena.clear();
        segs.clear();
        let mut next = Some(first);
        let mut count = 0;
        while let Some(msg) = next.take() {
            match msg {
                Out::Pdus(pdus) => {
                    for (mut h, data) in pdus {
                        let exp = sn.exp_cmd_sn.load(Ordering::Acquire);
                        stamp(&mut h, &mut stat_sn, exp, exp.wrapping_add(sn.window - 1));
                        let start = arena.len();
                        arena.extend_from_slice(
                            frame::encode_header(&h, data.len(), &cfg).as_bytes(),
                        );
                        if data.len() <= COPY_LIMIT {
                            arena.extend_from_slice(&data);
                            arena.extend_from_slice(frame::trailer(&data, &cfg).as_bytes());
                            segs.push(Seg::Arena(start, arena.len()));
                        } else {
                            segs.push(Seg::Arena(start, arena.len()));
                            let t = frame::trailer(&data, &cfg);
                            segs.push(Seg::Data(data));
                            let ts = arena.len();
                            arena.extend_from_slice(t.as_bytes());
                            segs.push(Seg::Arena(ts, arena.len()));
                        }
                        count += 1;
                    }
                }
                Out::Flush(ack) => acks.push(ack),
            }
            if count < 256 && arena.len() < 1 << 20 {
                next = rx.try_recv().ok();
            }
        }
        let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(segs.len());
        // Merge adjacent arena ranges into one slice.
        let mut open: Option<(usize, usize)> = None;
        for s in &segs {
            match s {
                Seg::Arena(a, b) => match open {
                    Some((oa, ob)) if ob == *a => open = Some((oa, *b)),
                    Some((oa, ob)) => {
                        slices.push(IoSlice::new(&arena[oa..ob]));
                        open = Some((*a, *b));
                    }
                    None => open = Some((*a, *b)),
                },
                Seg::Data(d) => {
                    if let Some((oa, ob)) = open.take() {
                        slices.push(IoSlice::new(&arena[oa..ob]));
                    }
                    slices.push(IoSlice::new(d));
                }
            }
        }
        if let Some((oa, ob)) = open {
            slices.push(IoSlice::new(&arena[oa..ob]));
        }
        slices.retain(|s| !s.is_empty());
        if write_all_vectored(&mut wr, &mut slices).await.is_err() {
            break;
        }
        for a in acks.drain(..) {
            let _ = a.send(());
        }
    }
    let _ = wr.shutdown().await;
}

async fn write_all_vectored(
    wr: &mut OwnedWriteHalf,
    mut slices: &mut [IoSlice<'_>],
) -> std::io::Result<()> {
    while !slices.is_empty() {
        let n = wr.write_vectored(slices).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut slices, n);
    }
    Ok(())
}

/// Data buffers (write data collected, read data produced) one connection may hold at
/// once; a command that would go over is answered TASK SET FULL.
const CONNECTION_MEMORY: u64 = 256 << 20;
/// Unit of [`CONNECTION_MEMORY`] permits.
const MEMORY_UNIT: u64 = 4096;

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

/// A command held back because its CmdSN is ahead of ExpCmdSN.
struct Held {
    pdu: RawPdu,
}

struct Ffp {
    inner: Arc<Inner>,
    session: Arc<SessionHandle>,
    target: Arc<TargetEntry>,
    fabric: Arc<TargetFabric>,
    params: SessionParams,
    sn: Arc<Sn>,
    tx: mpsc::UnboundedSender<Out>,
    pending: HashMap<u32, PendingWrite>,
    held: BTreeMap<u32, Held>,
    next_ttt: u32,
    r2t_bytes: u64,
    r2t_waiting: VecDeque<u32>,
    text_more: Option<(u32, Vec<u8>)>,
    text_partial: Vec<u8>,
    ping: Option<(u32, tokio::time::Instant)>,
    local: Option<SocketAddr>,
    logout: bool,
    memory: Arc<Semaphore>,
}

async fn normal_session(
    inner: Arc<Inner>,
    mut reader: PduReader,
    wr: OwnedWriteHalf,
    est: Established,
    session: Arc<SessionHandle>,
) {
    let target = est.target.clone().expect("normal sessions have a target");
    let local = wr.local_addr().ok();
    let peer = session.peer;
    tracing::info!(initiator = %est.initiator, target = %target.iqn, tsih = est.tsih, %peer, "session started");
    let sn = Arc::new(Sn {
        exp_cmd_sn: AtomicU32::new(est.cmd_sn),
        window: inner.options.command_window,
    });
    let (tx, rx) = mpsc::unbounded_channel();
    let writer_task = tokio::spawn(writer(wr, rx, sn.clone(), reader.cfg, est.stat_sn));
    let mut ffp = Ffp {
        fabric: Arc::new(TargetFabric {
            inner: inner.clone(),
            target: target.clone(),
        }),
        inner: inner.clone(),
        session: session.clone(),
        target,
        params: est.params,
        sn,
        tx,
        pending: HashMap::new(),
        held: BTreeMap::new(),
        next_ttt: 1,
        r2t_bytes: 0,
        r2t_waiting: VecDeque::new(),
        text_more: None,
        text_partial: Vec::new(),
        ping: None,
        local,
        logout: false,
        memory: Arc::new(Semaphore::new((CONNECTION_MEMORY / MEMORY_UNIT) as usize)),
    };
    let result = ffp.run(&mut reader).await;
    match &result {
        Ok(()) => tracing::info!(initiator = %est.initiator, tsih = est.tsih, "session logged out"),
        Err(e) => {
            tracing::info!(initiator = %est.initiator, tsih = est.tsih, error = %e, "session dropped")
        }
    }
    // Connection gone: finish every task before saying the session is closed, so a
    // revoke that waits for this knows nothing more reaches the LUNs.
    ffp.pending.clear();
    let tasks: Vec<Arc<TaskEntry>> = session
        .tasks
        .lock()
        .expect("task map poisoned")
        .values()
        .cloned()
        .collect();
    wait_tasks(tasks).await;
    let Ffp { tx, fabric, .. } = ffp;
    drop(tx);
    let _ = tokio::time::timeout(Duration::from_secs(5), writer_task).await;
    // I_T nexus loss: SPC-2 reservations and medium removal prevention end with it.
    for lun in crate::scsi::Fabric::luns(&*fabric) {
        let mut st = lun.state();
        if st.reserve6.as_deref() == Some(session.nexus.as_str()) {
            st.reserve6 = None;
        }
        st.prevent_removal.remove(&session.nexus);
    }
    inner.unregister(session.id);
    session.closed.send_replace(true);
}

impl Ffp {
    fn send(&self, pdus: Vec<(Header, Bytes)>) {
        let _ = self.tx.send(Out::Pdus(pdus));
    }

    async fn flush(&self) {
        let (ack, done) = oneshot::channel();
        if self.tx.send(Out::Flush(ack)).is_ok() {
            let _ = done.await;
        }
    }

    fn exp_cmd_sn(&self) -> u32 {
        self.sn.exp_cmd_sn.load(Ordering::Acquire)
    }

    fn max_cmd_sn(&self) -> u32 {
        self.exp_cmd_sn().wrapping_add(self.sn.window - 1)
    }

    fn reject(&self, pdu: &RawPdu, reason: u8) {
        let r = Reject {
            reason,
            ..Default::default()
        };
        self.send(vec![(Header::Reject(r), Bytes::copy_from_slice(&pdu.bhs))]);
    }

    async fn run(&mut self, reader: &mut PduReader) -> Result<(), ConnError> {
        let mut kill = self.session.kill.subscribe();
        let mut stopping = self.inner.stopping.subscribe();
        let nop_interval = self.inner.options.nop_interval;
        loop {
            if *kill.borrow() || *stopping.borrow() {
                return Err(ConnError::Protocol("session closed by the target"));
            }
            let idle = async {
                match (nop_interval, self.ping) {
                    (_, Some((_, deadline))) => tokio::time::sleep_until(deadline).await,
                    (Some(i), None) => tokio::time::sleep(i).await,
                    (None, None) => std::future::pending().await,
                }
            };
            let pdu = tokio::select! {
                biased;
                _ = kill.changed() => continue,
                _ = stopping.changed() => {
                    self.request_logout().await;
                    continue;
                }
                pdu = reader.next() => pdu?,
                () = idle => {
                    if self.ping.is_some() {
                        return Err(ConnError::Protocol("NOP-In ping not answered"));
                    }
                    self.send_ping();
                    continue;
                }
            };
            self.handle(pdu).await?;
            if self.logout {
                return Ok(());
            }
        }
    }

    /// Asks the initiator to log out before the server stops (async event 1).
    async fn request_logout(&self) {
        let m = bhs::AsyncMessage {
            event: bhs::async_event::LOGOUT_REQUEST,
            parameter3: 2,
            ..Default::default()
        };
        self.send(vec![(Header::AsyncMessage(m), Bytes::new())]);
        self.flush().await;
        // Give it the two seconds Parameter3 promised, then the loop closes us.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }

    fn send_ping(&mut self) {
        let ttt = self.new_ttt();
        self.ping = Some((
            ttt,
            tokio::time::Instant::now() + self.inner.options.nop_timeout,
        ));
        let n = NopIn {
            lun: 0,
            itt: RESERVED_TAG,
            ttt,
            ..Default::default()
        };
        self.send(vec![(Header::NopIn(n), Bytes::new())]);
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
        let exp = self.exp_cmd_sn();
        if cmd_sn == exp {
            self.sn
                .exp_cmd_sn
                .store(exp.wrapping_add(1), Ordering::Release);
            return true;
        }
        if serial::in_window(cmd_sn, exp, self.max_cmd_sn()) {
            if self.held.len() < self.sn.window as usize {
                self.held.insert(cmd_sn, Held { pdu: pdu.clone() });
            }
        } else {
            tracing::debug!(cmd_sn, exp, "CmdSN outside the window: dropped");
        }
        false
    }

    async fn handle(&mut self, pdu: RawPdu) -> Result<(), ConnError> {
        self.handle_one(pdu).await?;
        // Commands that waited for a CmdSN gap to fill may go now.
        while let Some(held) = self.held.remove(&self.exp_cmd_sn()) {
            self.sn
                .exp_cmd_sn
                .store(self.exp_cmd_sn().wrapping_add(1), Ordering::Release);
            self.dispatch(held.pdu).await?;
        }
        Ok(())
    }

    async fn handle_one(&mut self, pdu: RawPdu) -> Result<(), ConnError> {
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
        self.dispatch(pdu).await
    }

    async fn dispatch(&mut self, pdu: RawPdu) -> Result<(), ConnError> {
        let header = pdu.header()?;
        match header {
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
                self.logout_request(l).await;
                Ok(())
            }
            Header::SnackRequest(_) => {
                // ErrorRecoveryLevel 0: nothing to retransmit from.
                self.reject(&pdu, reject_reason::SNACK_REJECT);
                Ok(())
            }
            Header::LoginRequest(_) => {
                self.reject(&pdu, reject_reason::PROTOCOL_ERROR);
                Ok(())
            }
            _ => {
                // A target opcode from the initiator.
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
        self.send(vec![(Header::NopIn(r), data)]);
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

    fn scsi_command(&mut self, c: ScsiCommand, pdu: RawPdu) -> Result<(), ConnError> {
        // CDBs longer than 16 bytes continue in an extended-CDB AHS.
        let mut cdb = BytesMut::from(&c.cdb[..]);
        if !pdu.ahs.is_empty() {
            for a in frame::parse_ahs(pdu.ahs.clone())? {
                if a.kind == frame::ahs_type::EXTENDED_CDB {
                    cdb.extend_from_slice(&a.data);
                }
            }
        }
        let cdb = cdb.freeze();
        let Some(lun) = self.lun(c.lun) else {
            self.no_such_lun(c, &cdb);
            return Ok(());
        };
        let edtl = c.expected_data_len;
        if c.write && u64::from(edtl) > 2 * MAX_TRANSFER_BYTES + 4096 {
            // More than any command we serve can take: refuse before any data is buffered.
            self.respond_check(c, Sense::invalid_cdb_field(0, None));
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
                    let reply = scsi::Reply {
                        status: status::TASK_SET_FULL,
                        ..Default::default()
                    };
                    self.send(build_response(
                        &c,
                        reply,
                        self.params.max_xmit_data_segment,
                        self.params.max_burst,
                    ));
                    return Ok(());
                }
            }
        };
        if !c.write || c.expected_data_len == 0 {
            self.execute(c, lun, cdb, Bytes::new(), permit);
            return Ok(());
        }
        let immediate = pdu.data;
        if immediate.len() > edtl as usize
            || (!immediate.is_empty() && !self.params.immediate_data)
            || immediate.len() > self.params.first_burst as usize
        {
            return Err(ConnError::Protocol(
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
                let ttt = {
                    let t = self.next_ttt;
                    self.next_ttt = self.next_ttt.wrapping_add(1);
                    if self.next_ttt == RESERVED_TAG {
                        self.next_ttt = 1;
                    }
                    t
                };
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
        if !r2ts.is_empty() {
            self.send(
                r2ts.into_iter()
                    .map(|r| (Header::R2t(r), Bytes::new()))
                    .collect(),
            );
        }
    }

    fn release_r2t_budget(&mut self, bytes: u64) {
        self.r2t_bytes = self.r2t_bytes.saturating_sub(bytes);
        let waiting: Vec<u32> = self.r2t_waiting.drain(..).collect();
        for itt in waiting {
            self.pump_r2t(itt);
        }
    }

    fn data_out(&mut self, d: DataOut, data: Bytes) -> Result<(), ConnError> {
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
                return Err(ConnError::Protocol("unsolicited Data-Out out of order"));
            }
            w.unsolicited_data_sn += 1;
            w.buf.extend_from_slice(&data);
            w.received += len;
            if d.final_ || w.received >= w.unsolicited {
                w.unsolicited_done = true;
            }
        } else {
            let Some(r) = w.r2ts.get_mut(&d.ttt) else {
                return Err(ConnError::Protocol("Data-Out for an unknown R2T"));
            };
            if d.data_sn != r.data_sn
                || d.buffer_offset != r.offset + r.received
                || r.received + len > r.len
            {
                return Err(ConnError::Protocol("solicited Data-Out out of order"));
            }
            r.data_sn += 1;
            r.received += len;
            let at = d.buffer_offset as usize;
            if w.buf.len() < at + data.len() {
                w.buf.resize(at + data.len(), 0);
            }
            w.buf[at..at + data.len()].copy_from_slice(&data);
            w.received += len;
            if r.received == r.len {
                freed = u64::from(r.len);
                w.r2ts.remove(&d.ttt);
            } else if d.final_ {
                return Err(ConnError::Protocol("R2T sequence ended short"));
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

    fn no_such_lun(&self, c: ScsiCommand, cdb: &[u8]) {
        match cdb[0] {
            scsi::op::INQUIRY if cdb.len() >= 6 && cdb[1] & 1 == 0 => {
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
                self.send(build_response(
                    &c,
                    reply,
                    self.params.max_xmit_data_segment,
                    self.params.max_burst,
                ));
            }
            scsi::op::REPORT_LUNS => {
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
                        self.send(build_response(
                            &c,
                            reply,
                            self.params.max_xmit_data_segment,
                            self.params.max_burst,
                        ));
                    }
                }
            }
            _ => self.respond_check(c, Sense::LUN_NOT_SUPPORTED),
        }
    }

    fn respond_check(&self, c: ScsiCommand, sense: Sense) {
        let reply = scsi::Reply {
            status: status::CHECK_CONDITION,
            sense: sense.to_fixed().to_vec(),
            ..Default::default()
        };
        self.send(build_response(
            &c,
            reply,
            self.params.max_xmit_data_segment,
            self.params.max_burst,
        ));
    }

    /// Runs a command on a blocking thread; its response goes straight to the writer.
    fn execute(
        &self,
        c: ScsiCommand,
        lun: Arc<Lun>,
        cdb: Bytes,
        data: Bytes,
        permit: Option<OwnedSemaphorePermit>,
    ) {
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
        let tx = self.tx.clone();
        let max_seg = self.params.max_xmit_data_segment;
        let max_burst = self.params.max_burst;
        tokio::task::spawn_blocking(move || {
            // Held until the response is queued: the buffers count against the budget.
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
                let _ = tx.send(Out::Pdus(build_response(&c, reply, max_seg, max_burst)));
            }
            entry.done.send_replace(true);
        });
    }

    fn task_mgmt(&mut self, t: TaskMgmtRequest) {
        let itt = t.itt;
        let respond = move |tx: &mpsc::UnboundedSender<Out>, response: u8| {
            let r = TaskMgmtResponse {
                response,
                itt,
                ..Default::default()
            };
            let _ = tx.send(Out::Pdus(vec![(Header::TaskMgmtResponse(r), Bytes::new())]));
        };
        let lun_id = bhs::decode_lun(t.lun);
        let lun_exists = self.lun(t.lun).is_some();
        match t.function {
            tmf::ABORT_TASK => {
                let r = t.referenced_task_tag;
                if let Some(w) = self.pending.remove(&r) {
                    let outstanding: u64 = w.r2ts.values().map(|s| u64::from(s.len)).sum();
                    self.release_r2t_budget(outstanding);
                    respond(&self.tx, tmf::FUNCTION_COMPLETE);
                    return;
                }
                if self.held.remove(&t.ref_cmd_sn).is_some() {
                    respond(&self.tx, tmf::FUNCTION_COMPLETE);
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
                        let tx = self.tx.clone();
                        tokio::spawn(async move {
                            wait_tasks(vec![task]).await;
                            respond(&tx, tmf::FUNCTION_COMPLETE);
                        });
                    }
                    None => {
                        // Not here. A RefCmdSN still inside the window names a command
                        // yet to arrive: it counts as received and aborted (§11.5.1).
                        // Otherwise the task finished (its response is out) or never was.
                        let exp = self.exp_cmd_sn();
                        if serial::in_window(t.ref_cmd_sn, exp, self.max_cmd_sn())
                            && serial::lt(t.ref_cmd_sn, t.cmd_sn)
                        {
                            respond(&self.tx, tmf::FUNCTION_COMPLETE);
                        } else {
                            respond(&self.tx, tmf::TASK_DOES_NOT_EXIST);
                        }
                    }
                }
            }
            tmf::ABORT_TASK_SET | tmf::CLEAR_TASK_SET => {
                if !lun_exists {
                    respond(&self.tx, tmf::LUN_DOES_NOT_EXIST);
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
                    if let Some(w) = self.pending.remove(&itt) {
                        let outstanding: u64 = w.r2ts.values().map(|s| u64::from(s.len)).sum();
                        self.release_r2t_budget(outstanding);
                    }
                }
                let tasks = self.session.abort_tasks(Some(lun));
                let tx = self.tx.clone();
                tokio::spawn(async move {
                    wait_tasks(tasks).await;
                    respond(&tx, tmf::FUNCTION_COMPLETE);
                });
            }
            tmf::LOGICAL_UNIT_RESET | tmf::TARGET_WARM_RESET | tmf::TARGET_COLD_RESET => {
                let luns: Vec<Arc<Lun>> = if t.function == tmf::LOGICAL_UNIT_RESET {
                    match self.lun(t.lun) {
                        Some(l) => vec![l],
                        None => {
                            respond(&self.tx, tmf::LUN_DOES_NOT_EXIST);
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
                    if let Some(w) = self.pending.remove(&itt) {
                        let outstanding: u64 = w.r2ts.values().map(|s| u64::from(s.len)).sum();
                        self.release_r2t_budget(outstanding);
                    }
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
                let tx = self.tx.clone();
                let cold = t.function == tmf::TARGET_COLD_RESET;
                tokio::spawn(async move {
                    wait_tasks(tasks).await;
                    respond(&tx, tmf::FUNCTION_COMPLETE);
                    if cold {
                        // A cold reset ends every session of the target, ours included,
                        // once the response is on the wire.
                        let (ack, done) = oneshot::channel();
                        let _ = tx.send(Out::Flush(ack));
                        let _ = done.await;
                        for s in sessions {
                            s.request_close();
                        }
                    }
                });
            }
            tmf::TASK_REASSIGN => respond(&self.tx, tmf::REASSIGNMENT_NOT_SUPPORTED),
            tmf::CLEAR_ACA => respond(&self.tx, tmf::FUNCTION_NOT_SUPPORTED),
            _ => respond(&self.tx, tmf::FUNCTION_REJECTED),
        }
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
                self.send(vec![(Header::TextResponse(r), Bytes::new())]);
                return Ok(());
            }
            let pairs = text::parse(&std::mem::take(&mut self.text_partial))
                .map_err(|_| ConnError::Protocol("bad text keys"))?;
            text::encode(&answer_text(
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
        self.send(vec![(
            Header::TextResponse(r),
            Bytes::copy_from_slice(chunk),
        )]);
        Ok(())
    }

    async fn logout_request(&mut self, l: LogoutRequest) {
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
            wait_tasks(tasks).await;
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
        self.send(vec![(Header::LogoutResponse(r), Bytes::new())]);
        self.flush().await;
        if response == 0 {
            self.logout = true;
        }
    }
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
