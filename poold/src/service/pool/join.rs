//! Joining the pool with a one-time token: a pool-admin asks for a token for one identity
//! (`CreateJoinToken`); the new daemon presents it with its certificate request (`Join`)
//! and gets its certificate, signed by the CA in the pool's replicated state.
//!
//! The token is spent through the log *before* the certificate is signed
//! (`RedeemJoinToken`): the state machine refuses a used or expired token, so a replay, a
//! second daemon with the same token or two racing joins get no certificate, whichever
//! member they call.

use std::time::Duration;

use pool_trust::token::{self, DEFAULT_TOKEN_TTL, JoinToken, TokenError};
use pool_trust::{CaCert, CertificateRequest, Identity, PoolCa, TokenRecord, Validity};
use proto::coordinator as pb;
use tonic::{Code, Status};

use super::PoolHandler;
use super::authorize::peer_of;
use crate::auth::{Caller, Level};
use crate::coordinator::AUDITED;
use crate::state::command::{IssuedRecord, Op, RedeemJoinToken};
use crate::state::trust::{NO_CA, join_token_record};

/// The longest a join token may live.
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// How long a certificate issued at joining is valid.
pub const JOINED_CERT_VALIDITY: Duration = Duration::from_secs(90 * 24 * 60 * 60);

/// What a token is asked for: the identity its certificate will name.
fn identity(role: i32, name: &str) -> Result<Identity, Status> {
    let bad = |m: String| Status::invalid_argument(m);
    let id = match pb::JoinRole::try_from(role) {
        Ok(pb::JoinRole::Host) => Identity::Host(name.to_owned()),
        Ok(pb::JoinRole::Storage) => Identity::Storage(name.to_owned()),
        Ok(pb::JoinRole::Member) => Identity::Member(name.parse().map_err(|_| {
            bad(format!(
                "a member is named by its id (1, 2, ...), not {name:?}"
            ))
        })?),
        _ => return Err(bad("role must be host, storage or member".into())),
    };
    id.validate()
        .map_err(|e| bad(proto::error_chain(&e).to_string()))?;
    Ok(id)
}

/// The pool's signing CA and what goes with what it signs now.
pub(super) struct Signer {
    pub ca: PoolCa,
    /// The CAs a daemon of the pool trusts (during a roll, the old one too), PEM.
    pub bundle_pem: String,
    /// During a roll: the new CA cross-signed by the old, sent after each certificate.
    pub cross: Option<CaCert>,
}

impl Signer {
    /// Signs `request` for `JOINED_CERT_VALIDITY` from `now`: the certificate's chain,
    /// PEM, and its record for the state.
    fn sign(
        &self,
        request: &CertificateRequest,
        now: u64,
    ) -> Result<(String, IssuedRecord), Status> {
        let validity = Validity::starting(now, JOINED_CERT_VALIDITY);
        let leaf = self
            .ca
            .sign(request, request.names(), validity)
            .map_err(|e| Status::internal(format!("signing: {}", proto::error_chain(&e))))?;
        let chain = pool_trust::leaf::chain_pem(&leaf, self.cross.as_slice());
        let record = IssuedRecord {
            identity: request.identity().path(),
            issuer: self.ca.cert().fingerprint().to_string(),
            not_after_ms: now.saturating_add(JOINED_CERT_VALIDITY.as_millis() as u64),
        };
        Ok((chain, record))
    }
}

/// The pool's signing CA and the members' addresses (what a joining daemon is told).
pub(super) async fn signer(svc: &PoolHandler) -> Result<(Signer, Vec<String>), Status> {
    let (record, bundle, cross, members) = svc
        .c
        .read(|s| {
            (
                s.pool_ca.clone(),
                s.trust_bundle(),
                s.ca_roll.as_ref().map(|r| r.cross_pem.clone()),
                s.members.values().cloned().collect(),
            )
        })
        .await?;
    let record = record.ok_or_else(|| Status::failed_precondition(NO_CA))?;
    let internal = |what: &str, e: &dyn std::error::Error| {
        Status::internal(format!("the pool's {what}: {}", proto::error_chain(e)))
    };
    let ca = PoolCa::from_pem(&record.cert_pem, &record.key_pem).map_err(|e| internal("CA", &e))?;
    let bundle = bundle
        .ok_or_else(|| Status::failed_precondition(NO_CA))?
        .map_err(|e| internal("CA bundle", &e))?;
    let cross = match cross {
        Some(pem) => Some(
            pool_trust::cert::certs_from_pem(&pem)
                .map_err(|e| internal("cross certificate", &e))?
                .into_iter()
                .next()
                .map(CaCert::from_der)
                .ok_or_else(|| Status::internal("the pool's cross certificate is empty"))?
                .map_err(|e| internal("cross certificate", &e))?,
        ),
        None => None,
    };
    let signer = Signer {
        ca,
        bundle_pem: bundle.to_pem(),
        cross,
    };
    Ok((signer, members))
}

pub(super) async fn create_token(
    svc: &PoolHandler,
    who: &Caller,
    r: pb::CreateJoinTokenRequest,
) -> Result<pb::CreateJoinTokenResponse, Status> {
    let identity = identity(r.role, &r.name)?;
    let ttl = match r.ttl_seconds {
        0 => DEFAULT_TOKEN_TTL,
        s if Duration::from_secs(s.into()) > MAX_TOKEN_TTL => {
            return Err(Status::invalid_argument(format!(
                "ttl_seconds {s} is more than the {} allowed (24 h)",
                MAX_TOKEN_TTL.as_secs()
            )));
        }
        s => Duration::from_secs(s.into()),
    };
    let (signer, members) = signer(svc).await?;
    let now = proto::unix_ms();
    let (token, record) = token::issue(identity.clone(), now, ttl)
        .map_err(|e| Status::invalid_argument(proto::error_chain(&e)))?;
    // A fresh request id, not the caller's: a retry answered from the first call's result
    // would hand out this new token, whose record was never committed.
    let op = Op::CreateJoinToken(join_token_record(&record));
    svc.c.write(who, "", op).await?;
    Ok(pb::CreateJoinTokenResponse {
        token: token.reveal(),
        pool_id: signer.ca.pool_id().to_string(),
        ca_bundle_pem: signer.bundle_pem,
        member_addresses: members,
        identity: identity.path(),
        expires_at: Some(proto::timestamp(record.expires_at_ms)),
    })
}

/// The answer to a `Join`: the refusal, audited here unless the state machine did.
pub(super) async fn join(
    svc: &PoolHandler,
    peer: String,
    r: pb::JoinRequest,
) -> Result<pb::JoinResponse, Status> {
    // Never the token's text: its id only, which is what the pool lists and logs.
    let token = JoinToken::parse(&r.token);
    let who = Caller {
        name: match &token {
            Ok(t) => format!("join-token/{}", t.id()),
            Err(_) => "(no valid join token)".into(),
        },
        level: Level::ReadOnly,
        method: "Join".into(),
        peer,
    };
    let res = match token {
        Ok(token) => redeem_and_sign(svc, &who, &token, &r.csr_pem).await,
        Err(e) => Err(Status::permission_denied(proto::error_chain(&e))),
    };
    if let Err(s) = &res
        && !s.metadata().contains_key(AUDITED)
    {
        svc.audit(&who, s);
    }
    res
}

async fn redeem_and_sign(
    svc: &PoolHandler,
    who: &Caller,
    token: &JoinToken,
    csr_pem: &str,
) -> Result<pb::JoinResponse, Status> {
    let (signer, _) = signer(svc).await?;
    let request = CertificateRequest::from_pem(csr_pem, signer.ca.pool_id()).map_err(|e| {
        Status::invalid_argument(format!(
            "the certificate request: {}",
            proto::error_chain(&e)
        ))
    })?;
    let id = token.id();
    let record: Option<TokenRecord> = svc.c.read(|s| s.join_token(&id)).await?;
    let record = record.ok_or_else(|| {
        Status::permission_denied(format!(
            "no join token {id} in this pool (never issued, or expired and forgotten)"
        ))
    })?;
    let now = proto::unix_ms();
    record
        .verify(token, request.identity(), now)
        .map_err(refusal)?;
    // Spent in the log first: only the command that marks it used gets a certificate.
    let op = Op::RedeemJoinToken(RedeemJoinToken {
        token_id: id.to_string(),
        identity: request.identity().path(),
    });
    svc.c.write(who, "", op).await?;
    let (cert, record) = signer.sign(&request, now)?;
    svc.c.write(who, "", Op::RecordIssued(record)).await?;
    tracing::info!(identity = %request.identity(), token = %id, peer = %who.peer, "a daemon joined the pool");
    Ok(pb::JoinResponse {
        certificate_pem: cert,
        ca_bundle_pem: signer.bundle_pem,
        identity: request.identity().path(),
    })
}

/// `RenewCertificate`: the caller's current certificate (verified in the handshake) says
/// who it is; the request must be for that identity, which must still be of the pool (a
/// member of it, a host it has a record of). Every answer is audited.
pub(super) async fn renew(
    svc: &PoolHandler,
    r: tonic::Request<pb::RenewCertificateRequest>,
) -> Result<pb::JoinResponse, Status> {
    let peer = peer_of(&r);
    let (signer, _) = signer(svc).await?;
    let caller = pool_trust::tls::peer_identity(&r, signer.ca.pool_id())?;
    let who = Caller {
        name: caller.path(),
        level: Level::ReadOnly,
        method: "RenewCertificate".into(),
        peer,
    };
    let res = renew_for(svc, &who, &signer, &caller, &r.get_ref().csr_pem).await;
    let ok = Status::ok(format!("certificate of {caller} renewed"));
    svc.audit(&who, res.as_ref().err().unwrap_or(&ok));
    let cert = res?;
    tracing::info!(identity = %caller, peer = %who.peer, "certificate renewed");
    Ok(pb::JoinResponse {
        certificate_pem: cert,
        ca_bundle_pem: signer.bundle_pem,
        identity: caller.path(),
    })
}

async fn renew_for(
    svc: &PoolHandler,
    who: &Caller,
    signer: &Signer,
    caller: &Identity,
    csr_pem: &str,
) -> Result<String, Status> {
    let request = CertificateRequest::from_pem(csr_pem, signer.ca.pool_id()).map_err(|e| {
        Status::invalid_argument(format!(
            "the certificate request: {}",
            proto::error_chain(&e)
        ))
    })?;
    if request.identity() != caller {
        return Err(Status::permission_denied(format!(
            "{caller} may renew its own certificate only, not one for {}",
            request.identity()
        )));
    }
    let known = {
        let caller = caller.clone();
        svc.c
            .read(move |s| match &caller {
                Identity::Member(id) => s.members.contains_key(id),
                Identity::Host(name) => s.hosts.values().any(|h| &h.name == name),
                // Storage endpoints are not recorded by name in the state; their
                // certificate is the pool's word.
                Identity::Storage(_) => true,
                Identity::Client(_) | Identity::Monitor(_) => false,
            })
            .await?
    };
    if !known {
        return Err(Status::permission_denied(format!(
            "{caller} is not (or no longer) part of this pool"
        )));
    }
    let (cert, record) = signer.sign(&request, proto::unix_ms())?;
    svc.c.write(who, "", Op::RecordIssued(record)).await?;
    Ok(cert)
}

/// A token that does not let its holder have the certificate asked for.
fn refusal(e: TokenError) -> Status {
    let code = match e {
        TokenError::AlreadyUsed | TokenError::Expired { .. } => Code::FailedPrecondition,
        _ => Code::PermissionDenied,
    };
    Status::new(code, proto::error_chain(&e))
}

/// The caller's address, for `Join`'s audit.
pub(super) fn peer<T>(r: &tonic::Request<T>) -> String {
    peer_of(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_identities_are_checked() {
        assert_eq!(
            identity(pb::JoinRole::Host as i32, "h1").unwrap(),
            Identity::Host("h1".into())
        );
        assert_eq!(
            identity(pb::JoinRole::Member as i32, "4").unwrap(),
            Identity::Member(4)
        );
        for (role, name) in [
            (pb::JoinRole::Member as i32, "four"),
            (pb::JoinRole::Member as i32, "0"),
            (pb::JoinRole::Host as i32, "Bad Name"),
            (pb::JoinRole::Unspecified as i32, "h1"),
            (99, "h1"),
        ] {
            assert_eq!(
                identity(role, name).unwrap_err().code(),
                Code::InvalidArgument,
                "{role} {name}"
            );
        }
    }
}
