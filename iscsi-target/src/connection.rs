//! One TCP connection, on the async reactor: the login phase, then either a discovery
//! session (SendTargets) served here, or a normal session, whose full feature phase
//! [`crate::engine`] runs on a blocking thread of its own.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use iscsi_pdu::bhs::{
    Header, LoginResponse, LogoutResponse, NopIn, RESERVED_TAG, Reject, TextResponse, login_status,
    reject_reason,
};
use iscsi_pdu::frame::{self, FrameConfig, RawPdu};
use iscsi_pdu::{PduError, text};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use crate::login::{Established, Login, Step};
use crate::server::{DiscoverySlot, Inner, TargetEntry};
use crate::session::{SessionHandle, SessionType};

/// Why a connection ended, in login, discovery or the full feature phase (`engine`).
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnError {
    #[error("socket")]
    Io(#[from] std::io::Error),
    #[error("malformed PDU")]
    Pdu(#[from] PduError),
    #[error("Data-Out refused")]
    DataOut(#[from] crate::engine::DataOutError),
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    #[error("peer closed the connection")]
    Closed,
    /// The target ended the session (`SessionHandle::request_close`).
    #[error("closed by the target")]
    Killed,
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
    let (est, admitted) = match login {
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
    match admitted {
        Admitted::Discovery(slot) => {
            if let Err(e) = discovery(&inner, &mut reader, &mut wr, &est, local).await {
                tracing::debug!(%peer, error = %e, "discovery session ended");
            }
            drop(slot);
        }
        Admitted::Normal(session) => {
            // The full feature phase runs on a blocking thread of its own (engine.rs).
            let stream = match reader.rd.reunite(wr).map(|s| s.into_std()) {
                Ok(Ok(s)) => s,
                _ => {
                    inner.unregister(session.id);
                    session.closed.send_replace(true);
                    return;
                }
            };
            let rt = tokio::runtime::Handle::current();
            let engine = match crate::engine::Engine::new(
                inner.clone(),
                rt,
                session.clone(),
                &est,
                stream,
                reader.buf,
            ) {
                Ok(e) => e,
                Err(e) => {
                    tracing::warn!(error = %e, "starting the session engine");
                    inner.unregister(session.id);
                    session.closed.send_replace(true);
                    return;
                }
            };
            tracing::info!(initiator = %est.initiator, target = %session.target, tsih = session.tsih, %peer, "session started");
            // A thread of its own rather than one from the blocking pool: sessions live
            // long, and the pool is for the commands they hand off.
            let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
            let spawned = std::thread::Builder::new()
                .name(format!("iscsi-tsih-{}", session.tsih))
                .spawn(move || {
                    engine.run();
                    let _ = done_tx.send(());
                });
            match spawned {
                Ok(_) => {
                    let _ = done_rx.await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "no thread for the session");
                    inner.unregister(session.id);
                    session.closed.send_replace(true);
                }
            }
        }
    }
}

/// What a completed login was admitted as.
enum Admitted {
    /// Holds the initiator's place in the count until the session ends.
    Discovery(DiscoverySlot),
    Normal(Arc<SessionHandle>),
}

async fn login_phase(
    inner: &Arc<Inner>,
    reader: &mut PduReader,
    wr: &mut OwnedWriteHalf,
    peer: SocketAddr,
) -> Result<Option<(Established, Admitted)>, ConnError> {
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
                let admitted = match est.session_type {
                    SessionType::Discovery => inner
                        .enter_discovery(&est.initiator)
                        .map(Admitted::Discovery)
                        .map_err(|e| {
                            tracing::info!(%peer, error = %e, "discovery login refused");
                            login_status::OUT_OF_RESOURCES
                        }),
                    SessionType::Normal => admit(inner, &est, peer).await.map(Admitted::Normal),
                };
                let admitted = match admitted {
                    Ok(a) => a,
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
                };
                r.tsih = match &admitted {
                    Admitted::Discovery(_) => inner.new_tsih(),
                    Admitted::Normal(s) => s.tsih,
                };
                if let Err(e) = write_pdu(
                    wr,
                    &Header::LoginResponse(r),
                    &data,
                    &FrameConfig::default(),
                )
                .await
                {
                    if let Admitted::Normal(s) = admitted {
                        inner.unregister(s.id);
                        s.closed.send_replace(true);
                    }
                    return Err(e);
                }
                let mut est = est;
                est.tsih = r.tsih;
                return Ok(Some((est, admitted)));
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
    if let Err(e) = inner.register(session.clone()) {
        tracing::info!(%peer, error = %e, "login refused");
        return Err(login_status::OUT_OF_RESOURCES);
    }
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
    let idle = inner.options.discovery_idle_timeout;
    loop {
        let Ok(pdu) = tokio::time::timeout(idle, reader.next()).await else {
            tracing::info!(initiator = %est.initiator, ?idle, "discovery session idle: closed");
            let _ = wr.shutdown().await;
            return Ok(());
        };
        let pdu = pdu?;
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
pub(crate) fn answer_text(
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
