//! Rolling the pool's CA without downtime (`RotateCa`) and telling daemons what to trust
//! (`GetTrust`).
//!
//! START makes a new CA and a cross certificate (the new CA's key signed by the old
//! one) and commits both: from then on every certificate the pool signs is of the new CA
//! and carries the cross certificate, so a daemon that still trusts only the old CA
//! accepts it, while the bundle every daemon is given holds both CAs. Daemons ask
//! `GetTrust` every few seconds and renew at once when the signing CA or the bundle
//! changed. FINISH drops the old CA once every daemon the pool knows (its members, its
//! hosts, and whoever it issued a certificate) holds one of the new CA; with `force`,
//! those that do not are left to join again.

use std::collections::BTreeMap;
use std::time::Duration;

use pool_trust::ca::DEFAULT_CA_VALIDITY;
use pool_trust::{Identity, Validity};
use proto::coordinator as pb;
use tonic::{Request, Status};

use super::PoolHandler;
use super::join::signer;
use crate::auth::Caller;
use crate::state::command::{FinishCaRoll, Op, PoolCaRecord, StartCaRoll};
use crate::state::trust::NO_CA;

/// How long a roll runs at least: every running daemon asks what to trust in that time
/// and renews, including those the pool has no certificate record of.
const FINISH_GRACE: Duration = Duration::from_secs(2 * pool_client::join::TRUST_POLL.as_secs());

/// `GetTrust`: for a daemon of the pool (its certificate) or any user.
pub(super) async fn get_trust(
    svc: &PoolHandler,
    r: &Request<pb::GetTrustRequest>,
) -> Result<pb::Trust, Status> {
    let by_certificate = svc
        .c
        .tls
        .as_ref()
        .is_some_and(|tls| pool_trust::tls::peer_identity(r, tls.pool_id()).is_ok());
    if !by_certificate {
        svc.authorize(r, "GetTrust")?;
    }
    let (signer, _) = signer(svc).await?;
    Ok(pb::Trust {
        ca_bundle_pem: signer.bundle_pem,
        signing_ca_fingerprint: signer.ca.cert().fingerprint().to_string(),
    })
}

/// `RotateCa` (pool-admin): STATUS, START (or the roll under way) or FINISH.
pub(super) async fn rotate_ca(
    svc: &PoolHandler,
    who: &Caller,
    r: pb::RotateCaRequest,
) -> Result<pb::CaRoll, Status> {
    match pb::RotateCaStep::try_from(r.step) {
        Ok(pb::RotateCaStep::Status) => {}
        Ok(pb::RotateCaStep::Start) => start(svc, who, &r.request_id).await?,
        Ok(pb::RotateCaStep::Finish) => finish(svc, who, &r.request_id, r.force).await?,
        _ => {
            return Err(Status::invalid_argument(
                "step must be status, start or finish",
            ));
        }
    }
    status(svc).await
}

async fn start(svc: &PoolHandler, who: &Caller, request_id: &str) -> Result<(), Status> {
    let (record, rolling) = svc
        .c
        .read(|s| (s.pool_ca.clone(), s.ca_roll.is_some()))
        .await?;
    let record = record.ok_or_else(|| Status::failed_precondition(NO_CA))?;
    if rolling {
        // Started before (this call retried, or a second operator): carry on with it.
        return Ok(());
    }
    let internal = |what: &str, e: pool_trust::CaError| {
        Status::internal(format!("{what}: {}", proto::error_chain(&e)))
    };
    let old = pool_trust::PoolCa::from_pem(&record.cert_pem, &record.key_pem)
        .map_err(|e| internal("the pool's CA", e))?;
    let next = old
        .roll(Validity::starting(proto::unix_ms(), DEFAULT_CA_VALIDITY))
        .map_err(|e| internal("making the new CA", e))?;
    let cross = old
        .cross_sign(&next)
        .map_err(|e| internal("cross-signing the new CA", e))?;
    let (cert_pem, key_pem) = next.to_pem();
    let op = Op::StartCaRoll(StartCaRoll {
        next: Some(PoolCaRecord { cert_pem, key_pem }),
        cross_pem: cross.pem(),
    });
    svc.c.write(who, request_id, op).await?;
    tracing::info!(from = %old.cert().fingerprint(), to = %next.cert().fingerprint(), "CA roll started");
    Ok(())
}

async fn finish(
    svc: &PoolHandler,
    who: &Caller,
    request_id: &str,
    force: bool,
) -> Result<(), Status> {
    let roll = status(svc).await?;
    if roll.previous_ca_fingerprint.is_empty() {
        return Err(Status::failed_precondition("no CA roll is under way"));
    }
    if roll.pending == 0 && !roll.ready && !force {
        return Err(Status::failed_precondition(format!(
            "the roll started less than {}s ago: daemons the pool has no record of may not \
             have renewed yet; retry in a few seconds",
            FINISH_GRACE.as_secs()
        )));
    }
    if roll.pending > 0 && !force {
        let pending: Vec<&str> = roll
            .holders
            .iter()
            .filter(|h| !h.current)
            .map(|h| h.identity.as_str())
            .collect();
        return Err(Status::failed_precondition(format!(
            "{} daemon(s) hold no certificate of the new CA yet: {}; they renew within \
             seconds if running and reachable (finish with force to leave them out)",
            roll.pending,
            pending.join(", ")
        )));
    }
    let op = Op::FinishCaRoll(FinishCaRoll {
        previous_fingerprint: roll.previous_ca_fingerprint,
    });
    svc.c.write(who, request_id, op).await?;
    tracing::info!(to = %roll.signing_ca_fingerprint, "CA roll finished");
    Ok(())
}

/// Where every daemon the pool knows stands: its members, its hosts, and any identity
/// holding a certificate the pool issued.
async fn status(svc: &PoolHandler) -> Result<pb::CaRoll, Status> {
    svc.c
        .read(|s| {
            let signing = s
                .pool_ca()
                .ok_or_else(|| Status::failed_precondition(NO_CA))?
                .map_err(|e| Status::internal(proto::error_chain(&e).to_string()))?
                .cert()
                .fingerprint()
                .to_string();
            let now = proto::unix_ms();
            let mut holders: BTreeMap<String, pb::TrustHolder> = s
                .members
                .keys()
                .map(|id| Identity::Member(*id).path())
                .chain(
                    s.hosts
                        .values()
                        .map(|h| Identity::Host(h.name.clone()).path()),
                )
                .chain(
                    s.issued
                        .values()
                        .filter(|i| i.not_after_ms > now)
                        .map(|i| i.identity.clone()),
                )
                .map(|identity| {
                    (
                        identity.clone(),
                        pb::TrustHolder {
                            identity,
                            ..Default::default()
                        },
                    )
                })
                .collect();
            for (identity, holder) in &mut holders {
                if let Some(i) = s.issued.get(identity).filter(|i| i.not_after_ms > now) {
                    holder.issuer_fingerprint = i.issuer.clone();
                    holder.not_after_ms = i.not_after_ms;
                    holder.current = i.issuer == signing;
                }
            }
            let previous = s
                .previous_ca_fingerprint()
                .map_or_else(String::new, |f| f.to_string());
            let pending = if previous.is_empty() {
                0
            } else {
                holders.values().filter(|h| !h.current).count() as u32
            };
            let started = s.ca_roll.as_ref().map_or(0, |r| r.started_at_ms);
            let ready = !previous.is_empty()
                && pending == 0
                && now.saturating_sub(started) >= FINISH_GRACE.as_millis() as u64;
            Ok(pb::CaRoll {
                signing_ca_fingerprint: signing,
                previous_ca_fingerprint: previous,
                holders: holders.into_values().collect(),
                pending,
                ready,
            })
        })
        .await?
}
