//! The pure part of the login: which keys each request carries, and what each response
//! means for the security stage (None, CHAP, mutual CHAP) and the operational one. No
//! I/O: [`super::login`] sends and receives.

use std::collections::HashSet;

use iscsi_pdu::bhs::{LoginResponse, stage};
use iscsi_pdu::{chap, text};

use super::{LoginError, SessionKind};
use crate::config::{Chap, Limits, Negotiated, SessionConfig};

#[derive(Debug, Clone, PartialEq, Eq)]
enum Auth {
    /// AuthMethod offered, no answer yet.
    Offered,
    /// AuthMethod=CHAP agreed; CHAP_A sent.
    AlgorithmSent,
    /// Our response sent (and our challenge, for mutual CHAP).
    ResponseSent {
        mutual: Option<(u8, Vec<u8>)>,
    },
    Done,
}

/// The pure login state: what to send next, and what each response means.
pub(super) struct Negotiation<'a> {
    cfg: &'a SessionConfig,
    kind: SessionKind,
    stage: u8,
    auth: Auth,
    /// Keys we offered in the operational stage, awaiting answers.
    offered: HashSet<&'static str>,
    /// Target-initiated keys we must answer in the next request.
    answers: Vec<(String, String)>,
    params: Negotiated,
    target_alias: Option<String>,
    /// Text of a response split across PDUs (C bit).
    partial: Vec<u8>,
}

/// What the driver does after a response.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Next {
    /// Send this request (stage, transit, next stage, keys).
    Send {
        csg: u8,
        transit: bool,
        nsg: u8,
        keys: Vec<(String, String)>,
    },
    /// Full feature phase reached.
    Done,
}

/// Login exchanges allowed before giving up.
pub(super) const MAX_ROUNDS: usize = 16;

impl<'a> Negotiation<'a> {
    pub fn new(cfg: &'a SessionConfig, kind: SessionKind) -> Self {
        Self {
            cfg,
            kind,
            stage: stage::SECURITY,
            auth: Auth::Offered,
            offered: HashSet::new(),
            answers: Vec::new(),
            params: Negotiated {
                max_recv_data_segment: cfg.limits.max_recv_data_segment,
                ..Negotiated::default()
            },
            target_alias: None,
            partial: Vec::new(),
        }
    }

    /// The first request: who we are, where we go, and how we authenticate.
    pub fn first(&mut self) -> Next {
        let mut keys = vec![("InitiatorName".to_owned(), self.cfg.initiator.clone())];
        if let Some(a) = &self.cfg.initiator_alias {
            keys.push(("InitiatorAlias".into(), a.clone()));
        }
        match self.kind {
            SessionKind::Normal => {
                keys.push(("SessionType".into(), "Normal".into()));
                keys.push(("TargetName".into(), self.cfg.target.clone()));
            }
            SessionKind::Discovery => keys.push(("SessionType".into(), "Discovery".into())),
        }
        let chap = self.cfg.chap.is_some();
        keys.push((
            "AuthMethod".into(),
            if chap { "CHAP" } else { "None" }.into(),
        ));
        Next::Send {
            csg: stage::SECURITY,
            transit: !chap,
            nsg: stage::OPERATIONAL,
            keys,
        }
    }

    /// Digests one response (already checked for a success status).
    pub fn on_response(&mut self, resp: &LoginResponse, data: &[u8]) -> Result<Next, LoginError> {
        if resp.csg != self.stage {
            return Err(LoginError::protocol(format!(
                "response for stage {} while in stage {}",
                resp.csg, self.stage
            )));
        }
        self.partial.extend_from_slice(data);
        if resp.continue_ {
            if self.partial.len() > 64 * 1024 {
                return Err(LoginError::protocol("more than 64 KiB of login text"));
            }
            // More text follows: ask for it with an empty request (§11.12.2).
            return Ok(Next::Send {
                csg: self.stage,
                transit: false,
                nsg: 0,
                keys: Vec::new(),
            });
        }
        let pairs = text::parse(&std::mem::take(&mut self.partial))
            .map_err(|e| LoginError::protocol(e.to_string()))?;
        for (k, v) in &pairs {
            match k.as_str() {
                "TargetAlias" => self.target_alias = Some(v.clone()),
                "TargetPortalGroupTag" => {
                    self.params.target_portal_group = text::parse_number(v)
                        .ok()
                        .and_then(|n| u16::try_from(n).ok())
                }
                _ => {}
            }
        }
        if self.stage == stage::SECURITY {
            let keys = self.security(&pairs)?;
            if resp.transit {
                if self.auth != Auth::Done {
                    return Err(LoginError::protocol(
                        "the target left the security stage before authentication ended",
                    ));
                }
                if resp.nsg == stage::FULL_FEATURE {
                    // Allowed only if we offered it, which we never do from security.
                    return Err(LoginError::protocol("skipped the operational stage"));
                }
                self.stage = stage::OPERATIONAL;
                return Ok(self.operational_offer());
            }
            let transit = self.auth == Auth::Done || matches!(self.auth, Auth::ResponseSent { .. });
            return Ok(Next::Send {
                csg: stage::SECURITY,
                transit,
                nsg: stage::OPERATIONAL,
                keys,
            });
        }
        // Operational stage.
        self.operational(&pairs)?;
        if resp.transit {
            if resp.nsg != stage::FULL_FEATURE {
                return Err(LoginError::protocol(
                    "the target moved to an unexpected stage",
                ));
            }
            if !self.offered.is_empty() {
                let missing: Vec<&str> = self.offered.iter().copied().collect();
                tracing::debug!(?missing, "target left keys unanswered; defaults apply");
                for k in missing {
                    self.apply_default(k);
                }
            }
            self.params.tsih = resp.tsih;
            return Ok(Next::Done);
        }
        Ok(Next::Send {
            csg: stage::OPERATIONAL,
            transit: true,
            nsg: stage::FULL_FEATURE,
            keys: std::mem::take(&mut self.answers),
        })
    }

    fn security(
        &mut self,
        pairs: &[(String, String)],
    ) -> Result<Vec<(String, String)>, LoginError> {
        let get = |k: &str| {
            pairs
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.as_str())
        };
        let mut keys = Vec::new();
        match std::mem::replace(&mut self.auth, Auth::Done) {
            Auth::Offered => match get("AuthMethod") {
                Some("CHAP") if self.cfg.chap.is_some() => {
                    keys.push(("CHAP_A".into(), chap::ALGORITHM_MD5.to_string()));
                    self.auth = Auth::AlgorithmSent;
                }
                Some("None") if self.cfg.chap.is_none() => {}
                // tgt omits AuthMethod when it agrees to None and we asked to transit.
                None if self.cfg.chap.is_none() => {}
                Some(other) => {
                    return Err(LoginError::AuthMethod {
                        method: other.to_owned(),
                    });
                }
                None => return Err(LoginError::negotiation("AuthMethod", "(no answer)")),
            },
            Auth::AlgorithmSent => {
                let creds = self.cfg.chap.as_ref().expect("CHAP configured");
                let alg = get("CHAP_A").ok_or_else(|| LoginError::protocol("no CHAP_A"))?;
                if alg != "5" {
                    return Err(LoginError::negotiation("CHAP_A", alg));
                }
                let id = get("CHAP_I")
                    .and_then(|i| text::parse_number(i).ok())
                    .and_then(|i| u8::try_from(i).ok())
                    .ok_or_else(|| LoginError::protocol("missing or bad CHAP_I"))?;
                let challenge = get("CHAP_C")
                    .and_then(|c| chap::decode_binary(c).ok())
                    .filter(|c| !c.is_empty())
                    .ok_or_else(|| LoginError::protocol("missing or bad CHAP_C"))?;
                let r = chap::response(id, &creds.secret, &challenge);
                keys.push(("CHAP_N".into(), creds.user.clone()));
                keys.push(("CHAP_R".into(), chap::encode_hex(&r)));
                let mutual = if self.cfg.mutual_chap.is_some() {
                    let our_id: u8 = rand::random();
                    let mut ours: Vec<u8> = (0..chap::MIN_CHALLENGE_LEN)
                        .map(|_| rand::random::<u8>())
                        .collect();
                    // Never echo the target's challenge back: a reflection attack.
                    if ours == challenge {
                        ours[0] ^= 0xff;
                    }
                    keys.push(("CHAP_I".into(), our_id.to_string()));
                    keys.push(("CHAP_C".into(), chap::encode_hex(&ours)));
                    Some((our_id, ours))
                } else {
                    None
                };
                self.auth = Auth::ResponseSent { mutual };
            }
            Auth::ResponseSent { mutual } => {
                if let Some((id, challenge)) = mutual {
                    let expect: &Chap = self.cfg.mutual_chap.as_ref().expect("mutual configured");
                    let name = get("CHAP_N");
                    let resp = get("CHAP_R").and_then(|r| chap::decode_binary(r).ok());
                    let ok = name == Some(expect.user.as_str())
                        && resp.is_some_and(|r| chap::verify(id, &expect.secret, &challenge, &r));
                    if !ok {
                        return Err(LoginError::MutualAuth);
                    }
                }
            }
            Auth::Done => {}
        }
        Ok(keys)
    }

    /// The keys of our first operational request.
    fn operational_offer(&mut self) -> Next {
        let l: &Limits = &self.cfg.limits;
        let digest = |on: bool| if on { "CRC32C" } else { "None" }.to_owned();
        let mut keys: Vec<(&'static str, String)> = vec![
            ("HeaderDigest", digest(self.cfg.header_digest)),
            ("DataDigest", digest(self.cfg.data_digest)),
        ];
        if self.kind == SessionKind::Normal {
            keys.extend([
                ("InitialR2T", text::bool_str(l.initial_r2t).to_owned()),
                ("ImmediateData", text::bool_str(l.immediate_data).to_owned()),
                ("MaxBurstLength", l.max_burst.to_string()),
                (
                    "FirstBurstLength",
                    l.first_burst.min(l.max_burst).to_string(),
                ),
                ("MaxOutstandingR2T", l.max_outstanding_r2t.to_string()),
                ("MaxConnections", "1".to_owned()),
                ("ErrorRecoveryLevel", "0".to_owned()),
                ("DefaultTime2Wait", "0".to_owned()),
                ("DefaultTime2Retain", "0".to_owned()),
                ("DataPDUInOrder", "Yes".to_owned()),
                ("DataSequenceInOrder", "Yes".to_owned()),
            ]);
        }
        self.offered = keys.iter().map(|(k, _)| *k).collect();
        // Declarative: no answer expected.
        keys.push((
            "MaxRecvDataSegmentLength",
            l.max_recv_data_segment.to_string(),
        ));
        Next::Send {
            csg: stage::OPERATIONAL,
            transit: true,
            nsg: stage::FULL_FEATURE,
            keys: keys.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
        }
    }

    /// Applies answers to our offers and queues answers to the target's own offers.
    fn operational(&mut self, pairs: &[(String, String)]) -> Result<(), LoginError> {
        for (k, v) in pairs {
            let key = k.as_str();
            if key == "MaxRecvDataSegmentLength" {
                let n = number(key, v)?;
                if !(512..=16_777_215).contains(&n) {
                    return Err(LoginError::negotiation(key, v));
                }
                self.params.max_xmit_data_segment = n as u32;
                continue;
            }
            if matches!(
                key,
                "TargetAlias" | "TargetPortalGroupTag" | "TargetAddress" | "TargetName"
            ) {
                continue;
            }
            if let Some(spec) = self.offered.take(key) {
                self.answer(spec, v)?;
            } else {
                // The target opens a negotiation of its own: answer it next time.
                let answer = self.respond(key, v)?;
                self.answers.push((k.clone(), answer));
            }
        }
        Ok(())
    }

    /// The target's answer to a key we offered.
    fn answer(&mut self, key: &'static str, v: &str) -> Result<(), LoginError> {
        if v == text::IRRELEVANT || v == text::NOT_UNDERSTOOD || v == text::REJECT {
            // Irrelevant (e.g. FirstBurstLength without unsolicited data) leaves the
            // default; a rejected digest we require is fatal.
            if (key == "HeaderDigest" && self.cfg.header_digest)
                || (key == "DataDigest" && self.cfg.data_digest)
            {
                return Err(LoginError::negotiation(key, v));
            }
            self.apply_default(key);
            return Ok(());
        }
        let l = &self.cfg.limits;
        match key {
            "HeaderDigest" | "DataDigest" => {
                let want = if key == "HeaderDigest" {
                    self.cfg.header_digest
                } else {
                    self.cfg.data_digest
                };
                let got = if v.eq_ignore_ascii_case("CRC32C") {
                    true
                } else if v.eq_ignore_ascii_case("None") {
                    false
                } else {
                    return Err(LoginError::negotiation(key, v));
                };
                if got != want {
                    return Err(LoginError::negotiation(key, v));
                }
                if key == "HeaderDigest" {
                    self.params.header_digest = got;
                } else {
                    self.params.data_digest = got;
                }
            }
            "MaxBurstLength" | "FirstBurstLength" => {
                let n = number(key, v)?;
                let ours = if key == "MaxBurstLength" {
                    l.max_burst
                } else {
                    l.first_burst.min(l.max_burst)
                };
                if !(512..=u64::from(ours)).contains(&n) {
                    return Err(LoginError::negotiation(key, v));
                }
                if key == "MaxBurstLength" {
                    self.params.max_burst = n as u32;
                } else {
                    self.params.first_burst = n as u32;
                }
            }
            "MaxOutstandingR2T" => {
                let n = number(key, v)?;
                if !(1..=u64::from(l.max_outstanding_r2t)).contains(&n) {
                    return Err(LoginError::negotiation(key, v));
                }
                self.params.max_outstanding_r2t = n as u32;
            }
            "MaxConnections" | "ErrorRecoveryLevel" => {
                let n = number(key, v)?;
                let ours = if key == "MaxConnections" { 1 } else { 0 };
                if n != ours {
                    return Err(LoginError::negotiation(key, v));
                }
            }
            "DefaultTime2Wait" => self.params.default_time2wait = number(key, v)?.min(3600) as u16,
            "DefaultTime2Retain" => {
                self.params.default_time2retain = number(key, v)?.min(3600) as u16
            }
            "InitialR2T" => {
                let b = boolean(key, v)?;
                if l.initial_r2t && !b {
                    return Err(LoginError::negotiation(key, v));
                }
                self.params.initial_r2t = b;
            }
            "ImmediateData" => {
                let b = boolean(key, v)?;
                if !l.immediate_data && b {
                    return Err(LoginError::negotiation(key, v));
                }
                self.params.immediate_data = b;
            }
            "DataPDUInOrder" | "DataSequenceInOrder" => {
                // We offered Yes; OR makes the result Yes whatever they answer.
                boolean(key, v)?;
            }
            _ => {}
        }
        Ok(())
    }

    /// The value a key takes when the target does not negotiate it: the RFC default,
    /// limited by what we offered.
    fn apply_default(&mut self, key: &str) {
        let l = &self.cfg.limits;
        let d = Negotiated::default();
        match key {
            "HeaderDigest" => self.params.header_digest = false,
            "DataDigest" => self.params.data_digest = false,
            "MaxBurstLength" => self.params.max_burst = d.max_burst.min(l.max_burst),
            "FirstBurstLength" => {
                self.params.first_burst = d.first_burst.min(l.first_burst).min(l.max_burst)
            }
            "MaxOutstandingR2T" => self.params.max_outstanding_r2t = 1,
            "InitialR2T" => self.params.initial_r2t = true,
            "ImmediateData" => self.params.immediate_data = l.immediate_data,
            _ => {}
        }
        self.offered.remove(key);
    }

    /// Our answer to a key the target offered first.
    fn respond(&mut self, key: &str, v: &str) -> Result<String, LoginError> {
        let Some(spec) = text::spec(key) else {
            return Ok(text::NOT_UNDERSTOOD.to_owned());
        };
        let l = &self.cfg.limits;
        Ok(match key {
            "HeaderDigest" | "DataDigest" => {
                let want = if key == "HeaderDigest" {
                    self.cfg.header_digest
                } else {
                    self.cfg.data_digest
                };
                let ours: &[&str] = if want { &["CRC32C"] } else { &["None"] };
                match text::negotiate_list(v, ours) {
                    Some(c) => c.to_owned(),
                    None => text::REJECT.to_owned(),
                }
            }
            "MaxBurstLength" | "FirstBurstLength" | "MaxOutstandingR2T" => {
                let ours = match key {
                    "MaxBurstLength" => l.max_burst,
                    "FirstBurstLength" => l.first_burst,
                    _ => l.max_outstanding_r2t,
                };
                let n = text::negotiate_number(spec, v, ours.into())
                    .map_err(|_| LoginError::negotiation(key, v))?;
                match key {
                    "MaxBurstLength" => self.params.max_burst = n as u32,
                    "FirstBurstLength" => self.params.first_burst = n as u32,
                    _ => self.params.max_outstanding_r2t = n as u32,
                }
                n.to_string()
            }
            "InitialR2T" | "ImmediateData" => {
                let ours = if key == "InitialR2T" {
                    l.initial_r2t
                } else {
                    l.immediate_data
                };
                let b = text::negotiate_bool(spec, v, ours)
                    .map_err(|_| LoginError::negotiation(key, v))?;
                if key == "InitialR2T" {
                    self.params.initial_r2t = b;
                } else {
                    self.params.immediate_data = b;
                }
                text::bool_str(b).to_owned()
            }
            "MaxConnections" | "ErrorRecoveryLevel" => {
                let ours = u64::from(key == "MaxConnections");
                text::negotiate_number(spec, v, ours)
                    .map_err(|_| LoginError::negotiation(key, v))?
                    .to_string()
            }
            "DataPDUInOrder" | "DataSequenceInOrder" => "Yes".to_owned(),
            "IFMarker" | "OFMarker" => "No".to_owned(),
            "DefaultTime2Wait" | "DefaultTime2Retain" => {
                let n = text::parse_number(v).map_err(|_| LoginError::negotiation(key, v))?;
                n.min(3600).to_string()
            }
            _ => text::IRRELEVANT.to_owned(),
        })
    }

    pub fn params(&self) -> Negotiated {
        self.params
    }

    pub fn target_alias(&self) -> Option<&str> {
        self.target_alias.as_deref()
    }
}

fn number(key: &str, v: &str) -> Result<u64, LoginError> {
    text::parse_number(v).map_err(|_| LoginError::negotiation(key, v))
}

fn boolean(key: &str, v: &str) -> Result<bool, LoginError> {
    text::parse_bool(v).map_err(|_| LoginError::negotiation(key, v))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resp(csg: u8, transit: bool, nsg: u8) -> LoginResponse {
        LoginResponse {
            csg,
            transit,
            nsg,
            ..Default::default()
        }
    }

    fn keys(next: &Next) -> Vec<(String, String)> {
        match next {
            Next::Send { keys, .. } => keys.clone(),
            Next::Done => Vec::new(),
        }
    }

    fn get<'a>(k: &'a [(String, String)], key: &str) -> Option<&'a str> {
        k.iter().find(|(n, _)| n == key).map(|(_, v)| v.as_str())
    }

    #[test]
    fn chap_with_mutual_authentication() {
        let mut cfg = SessionConfig::new("x", "iqn.t", "iqn.i");
        cfg.chap = Some(Chap::new("user", "secret-one"));
        cfg.mutual_chap = Some(Chap::new("tgt", "secret-two"));
        let mut n = Negotiation::new(&cfg, SessionKind::Normal);
        let first = n.first();
        assert_eq!(get(&keys(&first), "AuthMethod"), Some("CHAP"));
        let next = n
            .on_response(&resp(0, false, 0), b"AuthMethod=CHAP\0")
            .unwrap();
        assert_eq!(get(&keys(&next), "CHAP_A"), Some("5"));
        let next = n
            .on_response(
                &resp(0, false, 0),
                b"CHAP_A=5\0CHAP_I=7\0CHAP_C=0x0102030405060708090a0b0c0d0e0f10\0",
            )
            .unwrap();
        let k = keys(&next);
        let expect = chap::response(7, b"secret-one", &(1..=16).collect::<Vec<u8>>());
        assert_eq!(get(&k, "CHAP_R"), Some(chap::encode_hex(&expect).as_str()));
        let id: u8 = get(&k, "CHAP_I").unwrap().parse().unwrap();
        let c = chap::decode_binary(get(&k, "CHAP_C").unwrap()).unwrap();
        // A wrong answer from the target is refused.
        let mut bad = Negotiation {
            auth: n.auth.clone(),
            ..Negotiation::new(&cfg, SessionKind::Normal)
        };
        let wrong = chap::response(id, b"not-the-secret", &c);
        let data = format!("CHAP_N=tgt\0CHAP_R={}\0", chap::encode_hex(&wrong));
        assert!(matches!(
            bad.on_response(&resp(0, true, 1), data.as_bytes()),
            Err(LoginError::MutualAuth)
        ));
        // The right one moves on to the operational stage.
        let right = chap::response(id, b"secret-two", &c);
        let data = format!("CHAP_N=tgt\0CHAP_R={}\0", chap::encode_hex(&right));
        let next = n.on_response(&resp(0, true, 1), data.as_bytes()).unwrap();
        assert_eq!(get(&keys(&next), "MaxBurstLength"), Some("1048576"));
    }

    #[test]
    fn operational_answers_set_the_parameters() {
        let mut cfg = SessionConfig::new("x", "iqn.t", "iqn.i");
        cfg.header_digest = true;
        let mut n = Negotiation::new(&cfg, SessionKind::Normal);
        n.first();
        n.on_response(&resp(0, true, 1), b"").unwrap();
        let data = b"HeaderDigest=CRC32C\0DataDigest=None\0InitialR2T=Yes\0ImmediateData=Yes\0\
MaxBurstLength=262144\0FirstBurstLength=65536\0MaxOutstandingR2T=1\0MaxConnections=1\0\
ErrorRecoveryLevel=0\0DefaultTime2Wait=2\0DefaultTime2Retain=0\0DataPDUInOrder=Yes\0\
DataSequenceInOrder=Yes\0MaxRecvDataSegmentLength=8192\0";
        let mut r = resp(1, true, 3);
        r.tsih = 9;
        assert_eq!(n.on_response(&r, data).unwrap(), Next::Done);
        let p = n.params();
        assert!(p.header_digest && !p.data_digest && p.initial_r2t && p.immediate_data);
        assert_eq!(
            (p.max_burst, p.first_burst, p.max_xmit_data_segment),
            (262144, 65536, 8192)
        );
        assert_eq!(p.tsih, 9);
    }

    #[test]
    fn a_refused_required_digest_or_a_raised_limit_is_an_error() {
        let mut cfg = SessionConfig::new("x", "iqn.t", "iqn.i");
        cfg.data_digest = true;
        let mut n = Negotiation::new(&cfg, SessionKind::Normal);
        n.first();
        n.on_response(&resp(0, true, 1), b"").unwrap();
        assert!(
            n.on_response(&resp(1, false, 0), b"DataDigest=None\0")
                .is_err()
        );
        let cfg = SessionConfig::new("x", "iqn.t", "iqn.i");
        let mut n = Negotiation::new(&cfg, SessionKind::Normal);
        n.first();
        n.on_response(&resp(0, true, 1), b"").unwrap();
        assert!(
            n.on_response(&resp(1, false, 0), b"MaxBurstLength=99999999\0")
                .is_err()
        );
    }

    #[test]
    fn target_initiated_keys_are_answered_next_round() {
        let cfg = SessionConfig::new("x", "iqn.t", "iqn.i");
        let mut n = Negotiation::new(&cfg, SessionKind::Normal);
        n.first();
        n.on_response(&resp(0, true, 1), b"").unwrap();
        let next = n
            .on_response(&resp(1, false, 0), b"OFMarker=No\0X-vendor=1\0")
            .unwrap();
        let k = keys(&next);
        assert_eq!(get(&k, "OFMarker"), Some("No"));
        assert_eq!(get(&k, "X-vendor"), Some("NotUnderstood"));
    }
}
