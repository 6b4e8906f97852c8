//! The login phase from the initiator's side (RFC 7143 §6.3, §7, §12.1.3): security
//! negotiation (None, CHAP, mutual CHAP), operational negotiation of our
//! [`Limits`](crate::Limits), and the stage transitions up to the full feature phase.
//!
//! `negotiation` is the pure part: it builds each request's keys and digests each
//! response. `login` drives it over a connection, one PDU at a time.

mod negotiation;

use iscsi_pdu::bhs::{Header, LoginRequest, stage};
use iscsi_pdu::text;

use crate::config::{Negotiated, SessionConfig};
use crate::connection::{ConnError, Framed};
use negotiation::{MAX_ROUNDS, Negotiation, Next};

/// Why a login did not reach the full feature phase.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    #[error("the target refused the login: {status}")]
    Refused { status: LoginStatus },
    #[error("the target redirects us to {address}")]
    Redirected { address: String },
    #[error("the target answered {key}={value}, which we cannot accept")]
    Negotiation { key: String, value: String },
    #[error("the target asks for {method} authentication, which is not configured")]
    AuthMethod { method: String },
    #[error("the target failed mutual CHAP authentication")]
    MutualAuth,
    #[error("the target sent a malformed login response: {reason}")]
    Protocol { reason: String },
    #[error("login connection failed")]
    Conn(#[from] ConnError),
}

impl LoginError {
    fn protocol(reason: impl Into<String>) -> Self {
        Self::Protocol {
            reason: reason.into(),
        }
    }

    fn negotiation(key: &str, value: &str) -> Self {
        Self::Negotiation {
            key: key.to_owned(),
            value: value.to_owned(),
        }
    }
}

/// A Login Response status (RFC 7143 §11.13.5), printable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoginStatus {
    pub class: u8,
    pub detail: u8,
}

impl LoginStatus {
    /// Whether the target's verdict is about the initiator's credentials.
    pub fn is_auth_failure(&self) -> bool {
        self.class == 2 && (self.detail == 1 || self.detail == 2)
    }
}

impl std::fmt::Display for LoginStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = match (self.class, self.detail) {
            (0, 0) => "success",
            (1, 1) => "target moved temporarily",
            (1, 2) => "target moved permanently",
            (2, 0) => "initiator error",
            (2, 1) => "authentication failure",
            (2, 2) => "authorization failure",
            (2, 3) => "target not found",
            (2, 4) => "target removed",
            (2, 5) => "unsupported version",
            (2, 6) => "too many connections",
            (2, 7) => "missing parameter",
            (2, 8) => "cannot include in session",
            (2, 9) => "session type not supported",
            (2, 10) => "session does not exist",
            (2, 11) => "invalid request during login",
            (3, 0) => "target error",
            (3, 1) => "service unavailable",
            (3, 2) => "out of resources",
            _ => "unknown status",
        };
        write!(f, "{what} ({:#04x}/{:#04x})", self.class, self.detail)
    }
}

/// Normal sessions reach LUNs; discovery sessions only ask SendTargets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionKind {
    Normal,
    Discovery,
}

/// The identity of one login: which session (ISID, TSIH), which connection and where
/// the command numbering starts.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LoginIds {
    pub isid: [u8; 6],
    /// 0 for a new session (or to reinstate one with the same ISID).
    pub tsih: u16,
    pub cid: u16,
    pub itt: u32,
    pub cmd_sn: u32,
}

/// A connection in the full feature phase and the numbers it starts with.
#[derive(Debug)]
pub(crate) struct LoggedIn {
    pub framed: Framed,
    pub params: Negotiated,
    pub target_alias: Option<String>,
    /// The CmdSN of the first command (the login's own, which login does not advance).
    pub cmd_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub exp_stat_sn: u32,
}

/// Runs a login on a fresh connection, bounded by the login timeout.
pub(crate) async fn login(
    mut framed: Framed,
    cfg: &SessionConfig,
    kind: SessionKind,
    ids: LoginIds,
) -> Result<LoggedIn, LoginError> {
    let limit = cfg.timeouts.login;
    let deadline = tokio::time::Instant::now() + limit;
    let mut neg = Negotiation::new(cfg, kind);
    let mut next = neg.first();
    let mut exp_stat_sn = 0u32;
    let mut csg_sent = stage::SECURITY;
    for _ in 0..MAX_ROUNDS {
        let (csg, transit, nsg, keys) = match next {
            Next::Send {
                csg,
                transit,
                nsg,
                keys,
            } => (csg, transit, nsg, keys),
            Next::Done => unreachable!("handled below"),
        };
        csg_sent = csg;
        let req = LoginRequest {
            transit,
            continue_: false,
            csg,
            nsg: if transit { nsg } else { 0 },
            version_max: 0,
            version_min: 0,
            isid: ids.isid,
            tsih: ids.tsih,
            itt: ids.itt,
            cid: ids.cid,
            cmd_sn: ids.cmd_sn,
            exp_stat_sn,
        };
        tracing::trace!(csg, transit, nsg, ?keys, "login request");
        framed
            .send(
                &Header::LoginRequest(req),
                &text::encode(&keys),
                deadline,
                limit,
            )
            .await?;
        let pdu = framed.recv(deadline, "login", limit).await?;
        let resp = match pdu.header().map_err(ConnError::Pdu)? {
            Header::LoginResponse(r) => r,
            other => {
                return Err(LoginError::protocol(format!(
                    "{:?} during login",
                    other.opcode()
                )));
            }
        };
        if resp.itt != ids.itt {
            return Err(LoginError::protocol("login response for another task tag"));
        }
        exp_stat_sn = resp.stat_sn.wrapping_add(1);
        match resp.status_class {
            0 => {}
            1 => {
                let pairs = text::parse(&pdu.data).unwrap_or_default();
                let address = pairs
                    .iter()
                    .find(|(k, _)| k == "TargetAddress")
                    .map(|(_, v)| v.clone())
                    .ok_or_else(|| LoginError::protocol("redirect without TargetAddress"))?;
                return Err(LoginError::Redirected { address });
            }
            _ => {
                return Err(LoginError::Refused {
                    status: LoginStatus {
                        class: resp.status_class,
                        detail: resp.status_detail,
                    },
                });
            }
        }
        if resp.version_active != 0 {
            return Err(LoginError::protocol(format!(
                "version {} is not RFC 7143",
                resp.version_active
            )));
        }
        next = neg.on_response(&resp, &pdu.data)?;
        if next == Next::Done {
            let params = neg.params();
            framed.rx_cfg.header_digest = params.header_digest;
            framed.rx_cfg.data_digest = params.data_digest;
            framed.rx_cfg.max_recv_data_segment = params.max_recv_data_segment;
            framed.tx_cfg.header_digest = params.header_digest;
            framed.tx_cfg.data_digest = params.data_digest;
            framed.tx_cfg.max_recv_data_segment = params.max_xmit_data_segment;
            return Ok(LoggedIn {
                framed,
                params,
                target_alias: neg.target_alias().map(str::to_owned),
                cmd_sn: ids.cmd_sn,
                exp_cmd_sn: resp.exp_cmd_sn,
                max_cmd_sn: resp.max_cmd_sn,
                exp_stat_sn,
            });
        }
    }
    Err(LoginError::protocol(format!(
        "no full feature phase after {MAX_ROUNDS} exchanges (stuck in stage {csg_sent})"
    )))
}

/// Connects to `cfg`'s portal and logs in, following up to three redirects.
pub(crate) async fn connect_and_login(
    cfg: &SessionConfig,
    kind: SessionKind,
    ids: LoginIds,
) -> Result<LoggedIn, LoginError> {
    let mut portal = cfg.portal_addr();
    for _ in 0..3 {
        let framed = Framed::connect(&portal, cfg.timeouts.connect).await?;
        match login(framed, cfg, kind, ids).await {
            Err(LoginError::Redirected { address }) => {
                // TargetAddress is host:port[,tpgt].
                let addr = address.split(',').next().unwrap_or_default();
                tracing::info!(from = %portal, to = %addr, "login redirected");
                portal = crate::config::with_default_port(addr);
            }
            other => return other,
        }
    }
    Err(LoginError::protocol("more than three redirects"))
}
