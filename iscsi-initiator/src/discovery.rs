//! SendTargets discovery (RFC 7143 §12.3 and appendix C): a discovery session asks a
//! portal which targets it may log in to, and where.

use iscsi_pdu::bhs::{Header, LogoutRequest, RESERVED_TAG, TextRequest};
use iscsi_pdu::text;
use tokio::time::Instant;

use crate::config::{SessionConfig, random_isid};
use crate::connection::ConnError;
use crate::error::Error;
use crate::login::{self, LoginIds, SessionKind};

/// A target a portal reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscoveredTarget {
    pub name: String,
    pub portals: Vec<Portal>,
}

/// Where a target listens: `host:port` and its portal group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Portal {
    pub address: String,
    pub group: Option<u16>,
}

/// Parses SendTargets text: each `TargetName` followed by its `TargetAddress`es.
pub fn parse_send_targets(pairs: &[(String, String)]) -> Vec<DiscoveredTarget> {
    let mut out: Vec<DiscoveredTarget> = Vec::new();
    for (k, v) in pairs {
        match k.as_str() {
            "TargetName" => out.push(DiscoveredTarget {
                name: v.clone(),
                portals: Vec::new(),
            }),
            "TargetAddress" => {
                if let Some(t) = out.last_mut() {
                    let (address, group) = match v.rsplit_once(',') {
                        Some((a, g)) => (a.to_owned(), g.parse().ok()),
                        None => (v.clone(), None),
                    };
                    t.portals.push(Portal { address, group });
                }
            }
            _ => {}
        }
    }
    out
}

/// Asks `cfg.portal` for its targets (`cfg.target` is not used; the initiator name,
/// CHAP credentials, digests and timeouts are).
pub async fn discover(cfg: &SessionConfig) -> Result<Vec<DiscoveredTarget>, Error> {
    let login_err = |source| Error::Login {
        target: "(discovery)".into(),
        portal: cfg.portal.clone(),
        source,
    };
    let ids = LoginIds {
        isid: cfg.isid.unwrap_or_else(random_isid),
        tsih: 0,
        cid: 0,
        itt: 0,
        cmd_sn: 1,
    };
    let mut logged = login::connect_and_login(cfg, SessionKind::Discovery, ids)
        .await
        .map_err(login_err)?;
    let limit = cfg.timeouts.command;
    let deadline = Instant::now() + limit;
    let conn_err = |e: ConnError| login_err(login::LoginError::Conn(e));
    let mut cmd_sn = logged.cmd_sn;
    let mut exp_stat_sn = logged.exp_stat_sn;
    let mut ttt = RESERVED_TAG;
    let mut data = text::encode(&[("SendTargets", "All")]);
    let mut all = Vec::new();
    let itt = 1;
    for _ in 0..64 {
        let req = TextRequest {
            immediate: false,
            final_: true,
            continue_: false,
            lun: 0,
            itt,
            ttt,
            cmd_sn,
            exp_stat_sn,
        };
        logged
            .framed
            .send(&Header::TextRequest(req), &data, deadline, limit)
            .await
            .map_err(conn_err)?;
        cmd_sn = cmd_sn.wrapping_add(1);
        let pdu = logged
            .framed
            .recv(deadline, "SendTargets", limit)
            .await
            .map_err(conn_err)?;
        let resp = match pdu.header() {
            Ok(Header::TextResponse(r)) if r.itt == itt => r,
            Ok(other) => {
                return Err(conn_err(ConnError::protocol(format!(
                    "{:?} in answer to SendTargets",
                    other.opcode()
                ))));
            }
            Err(e) => return Err(conn_err(ConnError::Pdu(e))),
        };
        exp_stat_sn = resp.stat_sn.wrapping_add(1);
        all.extend_from_slice(&pdu.data);
        if all.len() > 1 << 20 {
            return Err(conn_err(ConnError::protocol(
                "SendTargets answer over 1 MiB",
            )));
        }
        if resp.final_ && !resp.continue_ {
            break;
        }
        // More text: ask for it with an empty request carrying the target's TTT.
        ttt = resp.ttt;
        data = Vec::new();
    }
    let pairs = text::parse(&all).map_err(|e| conn_err(ConnError::Pdu(e)))?;
    // Log out politely; the answer is already ours, so a failure here only gets logged.
    let logout = LogoutRequest {
        immediate: true,
        reason: 0,
        itt: 2,
        cid: 0,
        cmd_sn,
        exp_stat_sn,
    };
    if let Err(e) = logged
        .framed
        .send(&Header::LogoutRequest(logout), &[], deadline, limit)
        .await
    {
        tracing::debug!(error = %e, "discovery logout not sent");
    } else if let Err(e) = logged.framed.recv(deadline, "logout", limit).await {
        tracing::debug!(error = %e, "discovery logout not answered");
    }
    Ok(parse_send_targets(&pairs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_with_their_addresses() {
        let pairs: Vec<(String, String)> = [
            ("TargetName", "iqn.a"),
            ("TargetAddress", "10.0.0.1:3260,1"),
            ("TargetAddress", "[fe80::1]:3260,2"),
            ("TargetName", "iqn.b"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let t = parse_send_targets(&pairs);
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].portals[1].address, "[fe80::1]:3260");
        assert_eq!(t[0].portals[1].group, Some(2));
        assert!(t[1].portals.is_empty());
    }
}
