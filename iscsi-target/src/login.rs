//! The login phase (RFC 7143 §6.3, §7): security negotiation (None or CHAP, with mutual
//! CHAP), operational negotiation of every RFC 7143 key, and stage transitions. A pure
//! state machine over login PDUs: the connection reads and writes them.

use std::collections::HashSet;
use std::sync::Arc;

use iscsi_pdu::bhs::{LoginRequest, LoginResponse, login_status, stage};
use iscsi_pdu::{chap, text};

use crate::config::{InitiatorAccess, ServerOptions};
use crate::server::{Inner, TargetEntry};
use crate::session::{SessionParams, SessionType};

/// Most bytes of text one login may accumulate across continued PDUs.
const MAX_LOGIN_TEXT: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Auth {
    /// Nothing negotiated yet.
    Start,
    /// AuthMethod=CHAP agreed; waiting for CHAP_A.
    ChapAlgorithm,
    /// Challenge sent; waiting for CHAP_N and CHAP_R.
    ChapResponse { id: u8, challenge: Vec<u8> },
    /// Authenticated (or no authentication needed).
    Done,
}

/// What the connection does with one login request.
#[derive(Debug)]
pub(crate) enum Step {
    /// Send the response and read the next request.
    Continue(LoginResponse, Vec<u8>),
    /// Send the response (a failure status) and close the connection.
    Fail(LoginResponse),
    /// Send the response (after filling in the TSIH) and enter full feature phase.
    Complete(LoginResponse, Vec<u8>),
}

/// The negotiated outcome, valid once [`Step::Complete`] was returned.
#[derive(Debug, Clone)]
pub(crate) struct Established {
    pub session_type: SessionType,
    pub initiator: String,
    pub target: Option<Arc<TargetEntry>>,
    pub params: SessionParams,
    pub isid: [u8; 6],
    /// The TSIH the initiator sent: 0 for a new session.
    pub tsih: u16,
    /// The CmdSN the session starts at (the login's).
    pub cmd_sn: u32,
    /// The next StatSN to send after login.
    pub stat_sn: u32,
}

pub(crate) struct Login<'a> {
    inner: &'a Inner,
    opts: &'a ServerOptions,
    first: Option<LoginRequest>,
    stage: u8,
    initiator: Option<String>,
    session_type: SessionType,
    target: Option<Arc<TargetEntry>>,
    access: Option<InitiatorAccess>,
    auth: Auth,
    params: SessionParams,
    seen: HashSet<String>,
    declared_mrdsl: bool,
    partial: Vec<u8>,
    stat_sn: u32,
}

type Pairs = Vec<(String, String)>;

/// A failed login: the status to answer with.
struct Refuse((u8, u8));

impl<'a> Login<'a> {
    pub fn new(inner: &'a Inner) -> Self {
        Self {
            inner,
            opts: &inner.options,
            first: None,
            stage: stage::SECURITY,
            initiator: None,
            session_type: SessionType::Normal,
            target: None,
            access: None,
            auth: Auth::Start,
            params: SessionParams::default(),
            seen: HashSet::new(),
            declared_mrdsl: false,
            partial: Vec::new(),
            stat_sn: rand::random::<u32>() | 1,
        }
    }

    /// The negotiated session; call after [`Step::Complete`].
    pub fn established(&self) -> Established {
        let first = self.first.expect("established after a login request");
        Established {
            session_type: self.session_type,
            initiator: self.initiator.clone().unwrap_or_default(),
            target: self.target.clone(),
            params: self.params,
            isid: first.isid,
            tsih: first.tsih,
            cmd_sn: first.cmd_sn,
            stat_sn: self.stat_sn,
        }
    }

    fn response(&mut self, req: &LoginRequest, transit: bool, status: (u8, u8)) -> LoginResponse {
        let cmd_sn = req.cmd_sn;
        let r = LoginResponse {
            transit,
            continue_: false,
            csg: req.csg,
            nsg: if transit { req.nsg } else { 0 },
            version_max: 0,
            version_active: 0,
            isid: req.isid,
            tsih: if status == login_status::SUCCESS {
                req.tsih
            } else {
                0
            },
            itt: req.itt,
            stat_sn: self.stat_sn,
            exp_cmd_sn: cmd_sn,
            max_cmd_sn: cmd_sn.wrapping_add(self.opts.command_window - 1),
            status_class: status.0,
            status_detail: status.1,
        };
        self.stat_sn = self.stat_sn.wrapping_add(1);
        r
    }

    fn fail(&mut self, req: &LoginRequest, status: (u8, u8)) -> Step {
        let r = self.response(req, false, status);
        Step::Fail(r)
    }

    /// Processes one Login Request with its data segment.
    pub fn step(&mut self, req: &LoginRequest, data: &[u8]) -> Step {
        tracing::debug!(csg = req.csg, nsg = req.nsg, transit = req.transit,
            keys = %String::from_utf8_lossy(data).replace('\0', " "), "login request");
        match self.step_inner(req, data) {
            Ok(step) => step,
            Err(Refuse(status)) => self.fail(req, status),
        }
    }

    fn step_inner(&mut self, req: &LoginRequest, data: &[u8]) -> Result<Step, Refuse> {
        if req.version_min > 0 {
            return Err(Refuse(login_status::UNSUPPORTED_VERSION));
        }
        match &self.first {
            None => {
                // The initiator may skip the security stage (§6.3).
                self.first = Some(*req);
                self.stage = req.csg;
            }
            Some(f) if f.isid != req.isid || f.tsih != req.tsih || f.cid != req.cid => {
                return Err(Refuse(login_status::INITIATOR_ERROR));
            }
            Some(_) => {}
        }
        if req.csg != self.stage || req.csg == 2 {
            return Err(Refuse(login_status::INITIATOR_ERROR));
        }
        if req.transit && (req.nsg <= req.csg || req.nsg == 2) {
            return Err(Refuse(login_status::INITIATOR_ERROR));
        }
        if self.partial.len() + data.len() > MAX_LOGIN_TEXT {
            return Err(Refuse(login_status::OUT_OF_RESOURCES));
        }
        self.partial.extend_from_slice(data);
        if req.continue_ {
            // More text follows: acknowledge with an empty response (§11.12.2).
            let r = self.response(req, false, login_status::SUCCESS);
            return Ok(Step::Continue(r, Vec::new()));
        }
        let pairs = text::parse(&std::mem::take(&mut self.partial))
            .map_err(|_| Refuse(login_status::INITIATOR_ERROR))?;
        let mut out: Pairs = Vec::new();
        let first_pdu = self.initiator.is_none();
        if first_pdu {
            self.identify(&pairs, &mut out)?;
        }
        if req.csg == stage::OPERATIONAL && self.auth != Auth::Done {
            // Skipping the security stage is only fine when no authentication is needed.
            if self.needs_chap() {
                return Err(Refuse(login_status::AUTHENTICATION_FAILURE));
            }
            self.auth = Auth::Done;
        }
        self.negotiate(req, &pairs, &mut out)?;
        let mut transit = req.transit;
        if req.csg == stage::SECURITY && transit && self.auth != Auth::Done {
            match self.auth {
                Auth::Start if !self.needs_chap() => self.auth = Auth::Done,
                Auth::Start => return Err(Refuse(login_status::AUTHENTICATION_FAILURE)),
                // Mid-exchange: keep negotiating.
                _ => transit = false,
            }
        }
        if transit
            && req.nsg == stage::FULL_FEATURE
            && !self.declared_mrdsl
            && req.csg == stage::OPERATIONAL
        {
            out.push((
                "MaxRecvDataSegmentLength".into(),
                self.opts.max_recv_data_segment.to_string(),
            ));
            self.declared_mrdsl = true;
            self.params.max_recv_data_segment = self.opts.max_recv_data_segment;
        }
        if self.params.first_burst > self.params.max_burst {
            self.params.first_burst = self.params.max_burst;
        }
        let r = self.response(req, transit, login_status::SUCCESS);
        if transit {
            self.stage = req.nsg;
        }
        let data = text::encode(&out);
        Ok(if transit && req.nsg == stage::FULL_FEATURE {
            Step::Complete(r, data)
        } else {
            Step::Continue(r, data)
        })
    }

    fn needs_chap(&self) -> bool {
        self.access.as_ref().is_some_and(|a| a.chap.is_some())
    }

    /// First PDU: who is logging in, to what, and may they.
    fn identify(&mut self, pairs: &Pairs, out: &mut Pairs) -> Result<(), Refuse> {
        let get = |k: &str| {
            pairs
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.as_str())
        };
        let initiator = get("InitiatorName").ok_or(Refuse(login_status::MISSING_PARAMETER))?;
        if !crate::server::valid_iscsi_name(initiator) {
            return Err(Refuse(login_status::INITIATOR_ERROR));
        }
        self.initiator = Some(initiator.to_owned());
        self.session_type = match get("SessionType").unwrap_or("Normal") {
            "Normal" => SessionType::Normal,
            "Discovery" => SessionType::Discovery,
            _ => return Err(Refuse(login_status::SESSION_TYPE_NOT_SUPPORTED)),
        };
        match self.session_type {
            SessionType::Discovery => {
                // Anyone may ask which targets exist; SendTargets lists only the targets
                // the initiator may log in to.
                self.access = Some(InitiatorAccess::open(initiator));
            }
            SessionType::Normal => {
                let name = get("TargetName").ok_or(Refuse(login_status::MISSING_PARAMETER))?;
                let target = self
                    .inner
                    .target(name)
                    .ok_or(Refuse(login_status::NOT_FOUND))?;
                let access = target
                    .acl
                    .read()
                    .expect("ACL lock poisoned")
                    .access(initiator)
                    .ok_or(Refuse(login_status::AUTHORIZATION_FAILURE))?;
                out.push((
                    "TargetPortalGroupTag".into(),
                    self.opts.portal_group.to_string(),
                ));
                if let Some(alias) = &target.alias {
                    out.push(("TargetAlias".into(), alias.clone()));
                }
                self.access = Some(access);
                self.target = Some(target);
            }
        }
        Ok(())
    }

    fn negotiate(
        &mut self,
        req: &LoginRequest,
        pairs: &Pairs,
        out: &mut Pairs,
    ) -> Result<(), Refuse> {
        let err = || Refuse(login_status::INITIATOR_ERROR);
        let mut chap_keys: Vec<(&str, &str)> = Vec::new();
        for (key, value) in pairs {
            let key = key.as_str();
            let value = value.as_str();
            if key.starts_with("CHAP_") {
                chap_keys.push((key, value));
                continue;
            }
            match key {
                // Declarations of the first PDU (checked there); a later change is an error.
                "InitiatorName" => {
                    if self.initiator.as_deref() != Some(value) {
                        return Err(err());
                    }
                    continue;
                }
                "TargetName" => {
                    if self.target.as_ref().is_none_or(|t| t.iqn != value) {
                        return Err(err());
                    }
                    continue;
                }
                "SessionType" | "InitiatorAlias" | "X#NodeArchitecture" => continue,
                "TargetAlias" | "TargetAddress" | "TargetPortalGroupTag" => return Err(err()),
                _ => {}
            }
            if !self.seen.insert(key.to_owned()) {
                // A key negotiated twice in one login is a protocol error (§6.2).
                return Err(err());
            }
            let answer: String = match key {
                "AuthMethod" => {
                    if req.csg != stage::SECURITY {
                        return Err(err());
                    }
                    self.auth_method(value)?
                }
                "HeaderDigest" | "DataDigest" => {
                    match text::negotiate_list(value, &["None", "CRC32C"]) {
                        Some(v) => {
                            let on = v.eq_ignore_ascii_case("CRC32C");
                            if key == "HeaderDigest" {
                                self.params.header_digest = on;
                            } else {
                                self.params.data_digest = on;
                            }
                            if on { "CRC32C" } else { "None" }.to_owned()
                        }
                        None => text::REJECT.to_owned(),
                    }
                }
                "MaxRecvDataSegmentLength" => {
                    let spec = text::spec(key).expect("standard key");
                    let v = text::negotiate_number(spec, value, u64::MAX).map_err(|_| err())?;
                    self.params.max_xmit_data_segment = v as u32;
                    if !self.declared_mrdsl && req.csg == stage::OPERATIONAL {
                        self.declared_mrdsl = true;
                        self.params.max_recv_data_segment = self.opts.max_recv_data_segment;
                        out.push((key.to_owned(), self.opts.max_recv_data_segment.to_string()));
                    }
                    continue;
                }
                "MaxBurstLength" | "FirstBurstLength" | "MaxOutstandingR2T"
                | "DefaultTime2Wait" | "DefaultTime2Retain" | "ErrorRecoveryLevel"
                | "MaxConnections" | "iSCSIProtocolLevel" => {
                    let spec = text::spec(key).expect("standard key");
                    let ours: u64 = match key {
                        "MaxBurstLength" => self.opts.max_burst.into(),
                        "FirstBurstLength" => self.opts.first_burst.into(),
                        "MaxOutstandingR2T" => self.opts.max_outstanding_r2t.into(),
                        "DefaultTime2Wait" => 2,
                        "DefaultTime2Retain" => 20,
                        "ErrorRecoveryLevel" => 0,
                        "MaxConnections" => 1,
                        _ => 1,
                    };
                    let v = text::negotiate_number(spec, value, ours).map_err(|_| err())?;
                    match key {
                        "MaxBurstLength" => self.params.max_burst = v as u32,
                        "FirstBurstLength" => self.params.first_burst = v as u32,
                        "MaxOutstandingR2T" => self.params.max_outstanding_r2t = v as u32,
                        "DefaultTime2Wait" => self.params.default_time2wait = v as u16,
                        "DefaultTime2Retain" => self.params.default_time2retain = v as u16,
                        _ => {}
                    }
                    v.to_string()
                }
                "InitialR2T"
                | "ImmediateData"
                | "DataPDUInOrder"
                | "DataSequenceInOrder"
                | "IFMarker"
                | "OFMarker" => {
                    let spec = text::spec(key).expect("standard key");
                    let ours = match key {
                        "InitialR2T" => self.opts.initial_r2t,
                        "ImmediateData" => self.opts.immediate_data,
                        // We deliver and expect data in order; markers are not supported.
                        "DataPDUInOrder" | "DataSequenceInOrder" => true,
                        _ => false,
                    };
                    let v = text::negotiate_bool(spec, value, ours).map_err(|_| err())?;
                    match key {
                        "InitialR2T" => self.params.initial_r2t = v,
                        "ImmediateData" => self.params.immediate_data = v,
                        _ => {}
                    }
                    text::bool_str(v).to_owned()
                }
                "OFMarkInt" | "IFMarkInt" | "SendTargets" => text::IRRELEVANT.to_owned(),
                "TaskReporting" => text::negotiate_list(value, &["RFC3720"])
                    .unwrap_or(text::REJECT)
                    .to_owned(),
                _ => text::NOT_UNDERSTOOD.to_owned(),
            };
            out.push((key.to_owned(), answer));
        }
        if !chap_keys.is_empty() {
            if req.csg != stage::SECURITY {
                return Err(err());
            }
            self.chap(&chap_keys, out)?;
        }
        Ok(())
    }

    fn auth_method(&mut self, offered: &str) -> Result<String, Refuse> {
        let choice = if self.needs_chap() {
            text::negotiate_list(offered, &["CHAP"])
        } else {
            text::negotiate_list(offered, &["None"])
        };
        match choice {
            Some(c) if c.eq_ignore_ascii_case("CHAP") => {
                self.auth = Auth::ChapAlgorithm;
                Ok("CHAP".into())
            }
            Some(_) => {
                self.auth = Auth::Done;
                Ok("None".into())
            }
            None => Err(Refuse(login_status::AUTHENTICATION_FAILURE)),
        }
    }

    fn chap(&mut self, keys: &[(&str, &str)], out: &mut Pairs) -> Result<(), Refuse> {
        let auth_fail = || Refuse(login_status::AUTHENTICATION_FAILURE);
        let get = |k: &str| keys.iter().find(|(key, _)| *key == k).map(|(_, v)| *v);
        match std::mem::replace(&mut self.auth, Auth::Start) {
            Auth::ChapAlgorithm => {
                let algs = get("CHAP_A").ok_or_else(auth_fail)?;
                if !algs.split(',').any(|a| a == "5") {
                    return Err(auth_fail());
                }
                let id: u8 = rand::random();
                let challenge: Vec<u8> = (0..chap::MIN_CHALLENGE_LEN)
                    .map(|_| rand::random::<u8>())
                    .collect();
                out.push(("CHAP_A".into(), "5".into()));
                out.push(("CHAP_I".into(), id.to_string()));
                out.push(("CHAP_C".into(), chap::encode_hex(&challenge)));
                self.auth = Auth::ChapResponse { id, challenge };
                Ok(())
            }
            Auth::ChapResponse { id, challenge } => {
                let creds = self
                    .access
                    .as_ref()
                    .and_then(|a| a.chap.clone())
                    .ok_or_else(auth_fail)?;
                let name = get("CHAP_N").ok_or_else(auth_fail)?;
                let resp = get("CHAP_R")
                    .and_then(|r| chap::decode_binary(r).ok())
                    .ok_or_else(auth_fail)?;
                if name != creds.user || !chap::verify(id, &creds.secret, &challenge, &resp) {
                    return Err(auth_fail());
                }
                match (get("CHAP_I"), get("CHAP_C")) {
                    (None, None) => {}
                    (Some(i), Some(c)) => {
                        let mutual = self
                            .access
                            .as_ref()
                            .and_then(|a| a.mutual_chap.clone())
                            .ok_or_else(auth_fail)?;
                        let i = text::parse_number(i)
                            .ok()
                            .and_then(|i| u8::try_from(i).ok())
                            .ok_or_else(auth_fail)?;
                        let c = chap::decode_binary(c).map_err(|_| auth_fail())?;
                        // A challenge equal to ours would let a reflection attack through.
                        if c == challenge || c.is_empty() {
                            return Err(auth_fail());
                        }
                        let r = chap::response(i, &mutual.secret, &c);
                        out.push(("CHAP_N".into(), mutual.user.clone()));
                        out.push(("CHAP_R".into(), chap::encode_hex(&r)));
                    }
                    _ => return Err(auth_fail()),
                }
                self.auth = Auth::Done;
                Ok(())
            }
            // CHAP keys without AuthMethod=CHAP agreed first.
            _ => Err(Refuse(login_status::INITIATOR_ERROR)),
        }
    }
}
