//! The pool's trust in the replicated state: its CA (committed once, with the founding)
//! and the join tokens it issued, kept as records without their secrets until they
//! expire. Spending a token is a command, so it is decided once for the whole pool: of
//! two joins racing with one token, the one applied first wins and the other is refused.

// A refusal's `CommandResult` is the very value the proposer hears (see `machine.rs`).
#![allow(clippy::result_large_err)]

use pool_trust::{CaBundle, CertInfo, Fingerprint, Identity, PoolCa, TokenId, TokenRecord};
use tonic::Code;

use super::command::{
    CaRollRecord, CommandResult, FinishCaRoll, IssuedRecord, JoinTokenRecord, PoolCaRecord,
    RedeemJoinToken, StartCaRoll,
};
use super::machine::{Applied, PoolState, err};

/// Join tokens a pool keeps at most, used or not, until they expire.
pub const JOIN_TOKENS_KEPT: usize = 1_000;

/// Issuance records a pool keeps at most (one per identity, until its certificate
/// expires).
pub const ISSUED_KEPT: usize = 10_000;

/// What a pool founded without its CA answers to joins.
pub const NO_CA: &str = "this pool has no CA in its state; certificates are issued offline \
                         (poolctl pki-issue)";

impl PoolState {
    /// The pool's CA from the state, if it was founded with one.
    pub fn pool_ca(&self) -> Option<Result<PoolCa, pool_trust::CaError>> {
        self.pool_ca
            .as_ref()
            .map(|r| PoolCa::from_pem(&r.cert_pem, &r.key_pem))
    }

    /// The CAs every daemon of the pool should trust now: the signing CA, and during a
    /// roll the one it replaces.
    pub fn trust_bundle(&self) -> Option<Result<CaBundle, pool_trust::CaError>> {
        let ca = self.pool_ca.as_ref()?;
        let mut pem = ca.cert_pem.clone();
        if let Some(roll) = &self.ca_roll {
            if !pem.ends_with('\n') {
                pem.push('\n');
            }
            pem.push_str(&roll.previous_cert_pem);
        }
        Some(CaBundle::from_pem(&pem))
    }

    /// The fingerprint of the CA a roll retires.
    pub fn previous_ca_fingerprint(&self) -> Option<Fingerprint> {
        let roll = self.ca_roll.as_ref()?;
        CaBundle::from_pem(&roll.previous_cert_pem)
            .ok()
            .and_then(|b| b.certs().first().map(|c| c.fingerprint()))
    }

    /// The record of join token `id`, in `pool_trust`'s form.
    pub fn join_token(&self, id: &TokenId) -> Option<TokenRecord> {
        self.join_tokens.get(&id.to_string()).and_then(token_record)
    }

    pub(crate) fn set_pool_ca(&mut self, r: &PoolCaRecord) -> Result<Applied, CommandResult> {
        if let Some(have) = &self.pool_ca {
            return if have.cert_pem == r.cert_pem {
                Ok(Applied::done(&self.pool_id))
            } else {
                Err(err(Code::AlreadyExists, "the pool already has its CA"))
            };
        }
        let ca = PoolCa::from_pem(&r.cert_pem, &r.key_pem).map_err(|e| {
            err(
                Code::InvalidArgument,
                format!("not a CA: {}", proto::error_chain(&e)),
            )
        })?;
        if ca.pool_id().as_str() != self.pool_id {
            return Err(err(
                Code::InvalidArgument,
                format!(
                    "the CA is of pool {}, not of this pool {}",
                    ca.pool_id(),
                    self.pool_id
                ),
            ));
        }
        self.pool_ca = Some(r.clone());
        Ok(Applied::done(&self.pool_id))
    }

    pub(crate) fn create_join_token(
        &mut self,
        r: &JoinTokenRecord,
        at_ms: u64,
    ) -> Result<Applied, CommandResult> {
        if self.pool_ca.is_none() {
            return Err(err(Code::FailedPrecondition, NO_CA));
        }
        let record = token_record(r)
            .ok_or_else(|| err(Code::InvalidArgument, "a malformed join token record"))?;
        if record.used || record.expires_at_ms <= at_ms {
            return Err(err(
                Code::InvalidArgument,
                "a new join token is unused and not yet expired",
            ));
        }
        self.prune_join_tokens(at_ms);
        if self.join_tokens.contains_key(&r.id) {
            return Err(err(Code::AlreadyExists, format!("join token {}", r.id)));
        }
        if self.join_tokens.len() >= JOIN_TOKENS_KEPT {
            return Err(err(
                Code::ResourceExhausted,
                format!(
                    "the pool holds {JOIN_TOKENS_KEPT} join tokens that have not expired; \
                     wait for some to expire"
                ),
            ));
        }
        self.join_tokens.insert(r.id.clone(), r.clone());
        Ok(Applied::done(record.identity.path()))
    }

    pub(crate) fn redeem_join_token(
        &mut self,
        r: &RedeemJoinToken,
        at_ms: u64,
    ) -> Result<Applied, CommandResult> {
        if self.pool_ca.is_none() {
            return Err(err(Code::FailedPrecondition, NO_CA));
        }
        let denied = |m: String| err(Code::PermissionDenied, m);
        let Some(record) = self.join_tokens.get_mut(&r.token_id) else {
            return Err(denied(format!(
                "no join token {} in this pool (never issued, or expired and forgotten)",
                r.token_id
            )));
        };
        if record.used {
            return Err(err(
                Code::FailedPrecondition,
                format!("join token {} was already used", r.token_id),
            ));
        }
        if at_ms >= record.expires_at_ms {
            return Err(err(
                Code::FailedPrecondition,
                format!(
                    "join token {} expired at {} ms since the epoch",
                    r.token_id, record.expires_at_ms
                ),
            ));
        }
        if record.identity != r.identity {
            return Err(denied(format!(
                "join token {} is for {}, not {}",
                r.token_id, record.identity, r.identity
            )));
        }
        record.used = true;
        let target = record.identity.clone();
        self.prune_join_tokens(at_ms);
        Ok(Applied::done(target))
    }

    pub(crate) fn start_ca_roll(
        &mut self,
        r: &StartCaRoll,
        at_ms: u64,
    ) -> Result<Applied, CommandResult> {
        let Some(current) = self.pool_ca.clone() else {
            return Err(err(Code::FailedPrecondition, NO_CA));
        };
        if self.ca_roll.is_some() {
            let previous = self
                .previous_ca_fingerprint()
                .map_or_else(String::new, |f| f.to_string());
            return Err(err(
                Code::FailedPrecondition,
                format!("a CA roll is under way (retiring {previous}): finish it first"),
            ));
        }
        let bad = |m: String| err(Code::InvalidArgument, m);
        let next_record = r.next.clone().ok_or_else(|| bad("no new CA".into()))?;
        let next = PoolCa::from_pem(&next_record.cert_pem, &next_record.key_pem)
            .map_err(|e| bad(format!("the new CA: {}", proto::error_chain(&e))))?;
        let old = PoolCa::from_pem(&current.cert_pem, &current.key_pem)
            .map_err(|e| bad(format!("the current CA: {}", proto::error_chain(&e))))?;
        if next.pool_id() != old.pool_id() || next.cert().fingerprint() == old.cert().fingerprint()
        {
            return Err(bad("the new CA must be another CA of this pool".into()));
        }
        // The cross certificate carries the new CA's key under the old CA's name as issuer;
        // the proposer signed it (the signature is checked by every peer's TLS).
        let cross = pool_trust::cert::certs_from_pem(&r.cross_pem)
            .ok()
            .and_then(|d| d.first().and_then(|der| CertInfo::parse(der).ok()))
            .ok_or_else(|| bad("the cross certificate is not a certificate".into()))?;
        let (next_info, old_info) = (next.cert().info(), old.cert().info());
        if !cross.is_ca
            || cross.public_key != next_info.public_key
            || cross.subject != next_info.subject
            || cross.issuer != old_info.subject
        {
            return Err(bad(
                "the cross certificate is not the new CA's, issued by the current one".into(),
            ));
        }
        self.ca_roll = Some(CaRollRecord {
            previous_cert_pem: current.cert_pem,
            cross_pem: r.cross_pem.clone(),
            started_at_ms: at_ms,
        });
        self.pool_ca = Some(next_record);
        Ok(Applied::done(next.cert().fingerprint().to_string()))
    }

    pub(crate) fn finish_ca_roll(&mut self, r: &FinishCaRoll) -> Result<Applied, CommandResult> {
        let Some(previous) = self.previous_ca_fingerprint() else {
            return Err(err(Code::FailedPrecondition, "no CA roll is under way"));
        };
        if previous.to_string() != r.previous_fingerprint {
            return Err(err(
                Code::FailedPrecondition,
                format!(
                    "the roll under way retires {previous}, not {}",
                    r.previous_fingerprint
                ),
            ));
        }
        self.ca_roll = None;
        Ok(Applied::done(previous.to_string()))
    }

    pub(crate) fn record_issued(
        &mut self,
        r: &IssuedRecord,
        at_ms: u64,
    ) -> Result<Applied, CommandResult> {
        Identity::parse_path(&r.identity)
            .map_err(|e| err(Code::InvalidArgument, proto::error_chain(&e).to_string()))?;
        self.issued.retain(|_, i| i.not_after_ms > at_ms);
        if self.issued.len() >= ISSUED_KEPT && !self.issued.contains_key(&r.identity) {
            return Err(err(
                Code::ResourceExhausted,
                format!("the pool keeps {ISSUED_KEPT} certificate records at most"),
            ));
        }
        self.issued.insert(r.identity.clone(), r.clone());
        Ok(Applied::done(r.identity.clone()))
    }

    /// Forgets the tokens past their expiry, used or not: a late replay is then refused
    /// as unknown.
    fn prune_join_tokens(&mut self, now_ms: u64) {
        self.join_tokens.retain(|_, t| t.expires_at_ms > now_ms);
    }
}

/// The log's record in `pool_trust`'s form; `None` when malformed.
pub fn token_record(r: &JoinTokenRecord) -> Option<TokenRecord> {
    Some(TokenRecord {
        id: TokenId::parse(&r.id).ok()?,
        secret_hash: r.secret_hash.as_slice().try_into().ok()?,
        identity: Identity::parse_path(&r.identity).ok()?,
        expires_at_ms: r.expires_at_ms,
        used: r.used,
    })
}

/// `pool_trust`'s record in the log's form.
pub fn join_token_record(r: &TokenRecord) -> JoinTokenRecord {
    JoinTokenRecord {
        id: r.id.to_string(),
        secret_hash: r.secret_hash.to_vec(),
        identity: r.identity.path(),
        expires_at_ms: r.expires_at_ms,
        used: r.used,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use pool_trust::token::{self, JoinToken};
    use pool_trust::{PoolId, Validity};

    use super::*;
    use crate::state::command::{Command, Op};

    const NOW: u64 = 1_800_000_000_000;

    fn apply(s: &mut PoolState, at_ms: u64, op: Op) -> CommandResult {
        let index = s.applied_index + 1;
        s.apply(
            index,
            &Command {
                at_ms,
                op: Some(op),
                ..Default::default()
            },
        )
    }

    fn ca_record(pool: &str) -> PoolCaRecord {
        let ca = PoolCa::create(
            PoolId::parse(pool).unwrap(),
            Validity::starting(NOW, Duration::from_secs(86_400)),
        )
        .unwrap();
        let (cert_pem, key_pem) = ca.to_pem();
        PoolCaRecord { cert_pem, key_pem }
    }

    /// A pool with its CA and one host token issued at `NOW` for a minute.
    fn pool_with_token() -> (PoolState, JoinToken) {
        let mut s = PoolState::new("pool-a", BTreeMap::new());
        assert_eq!(
            apply(&mut s, NOW, Op::SetPoolCa(ca_record("pool-a"))).code,
            0
        );
        let (token, record) =
            token::issue(Identity::Host("h1".into()), NOW, Duration::from_secs(60)).unwrap();
        let r = apply(&mut s, NOW, Op::CreateJoinToken(join_token_record(&record)));
        assert_eq!(r.code, 0, "{}", r.message);
        (s, token)
    }

    fn redeem(id: &TokenId, identity: &str) -> Op {
        Op::RedeemJoinToken(RedeemJoinToken {
            token_id: id.to_string(),
            identity: identity.into(),
        })
    }

    #[test]
    fn a_token_is_spent_once() {
        let (mut s, token) = pool_with_token();
        let r = apply(&mut s, NOW + 1, redeem(&token.id(), "host/h1"));
        assert_eq!(r.code, 0, "{}", r.message);
        assert!(s.join_token(&token.id()).unwrap().used);
        let before = s.join_tokens.clone();
        let again = apply(&mut s, NOW + 2, redeem(&token.id(), "host/h1"));
        assert_eq!(again.code, Code::FailedPrecondition as i32);
        assert!(again.message.contains("already used"), "{}", again.message);
        assert_eq!(s.join_tokens, before, "a refusal changes nothing");
        // The record the proposer checks says so too, before any command.
        let record = s.join_token(&token.id()).unwrap();
        assert!(matches!(
            record.verify(&token, &Identity::Host("h1".into()), NOW + 3),
            Err(pool_trust::TokenError::AlreadyUsed)
        ));
    }

    #[test]
    fn an_expired_token_is_refused_then_forgotten() {
        let (mut s, token) = pool_with_token();
        let r = apply(&mut s, NOW + 60_000, redeem(&token.id(), "host/h1"));
        assert_eq!(r.code, Code::FailedPrecondition as i32);
        assert!(r.message.contains("expired"), "{}", r.message);
        assert!(!s.join_token(&token.id()).unwrap().used);
        // The next token issued prunes it; a late replay is then unknown.
        let (_, other) =
            token::issue(Identity::Member(2), NOW + 61_000, Duration::from_secs(60)).unwrap();
        let r = apply(
            &mut s,
            NOW + 61_000,
            Op::CreateJoinToken(join_token_record(&other)),
        );
        assert_eq!(r.code, 0, "{}", r.message);
        assert!(s.join_token(&token.id()).is_none());
        assert_eq!(s.join_tokens.len(), 1);
        let r = apply(&mut s, NOW + 61_001, redeem(&token.id(), "host/h1"));
        assert_eq!(r.code, Code::PermissionDenied as i32);
    }

    #[test]
    fn another_identity_is_refused_and_spends_nothing() {
        let (mut s, token) = pool_with_token();
        for claim in ["host/h2", "member/1", "storage/h1"] {
            let r = apply(&mut s, NOW + 1, redeem(&token.id(), claim));
            assert_eq!(r.code, Code::PermissionDenied as i32, "{claim}");
        }
        assert!(!s.join_token(&token.id()).unwrap().used);
        assert_eq!(
            apply(&mut s, NOW + 1, redeem(&token.id(), "host/h1")).code,
            0
        );
    }

    #[test]
    fn tokens_need_the_pools_ca_and_the_ca_is_set_once() {
        let mut s = PoolState::new("pool-a", BTreeMap::new());
        let (token, record) =
            token::issue(Identity::Host("h1".into()), NOW, Duration::from_secs(60)).unwrap();
        let r = apply(&mut s, NOW, Op::CreateJoinToken(join_token_record(&record)));
        assert_eq!(r.code, Code::FailedPrecondition as i32);
        assert_eq!(r.message, NO_CA);
        let r = apply(&mut s, NOW, redeem(&token.id(), "host/h1"));
        assert_eq!(r.code, Code::FailedPrecondition as i32);
        // Another pool's CA is refused; the first of this pool's is kept.
        let r = apply(&mut s, NOW, Op::SetPoolCa(ca_record("pool-b")));
        assert_eq!(r.code, Code::InvalidArgument as i32);
        assert!(s.pool_ca.is_none());
        let ca = ca_record("pool-a");
        assert_eq!(apply(&mut s, NOW, Op::SetPoolCa(ca.clone())).code, 0);
        assert_eq!(apply(&mut s, NOW, Op::SetPoolCa(ca.clone())).code, 0);
        let r = apply(&mut s, NOW, Op::SetPoolCa(ca_record("pool-a")));
        assert_eq!(r.code, Code::AlreadyExists as i32);
        assert_eq!(s.pool_ca.as_ref(), Some(&ca));
        assert!(s.pool_ca().unwrap().is_ok());
        assert!(
            !format!("{s:?}").contains(&ca.key_pem),
            "the key never shows in Debug"
        );
        // And the state keeps both through a snapshot.
        let r = apply(&mut s, NOW, Op::CreateJoinToken(join_token_record(&record)));
        assert_eq!(r.code, 0, "{}", r.message);
        let back = crate::state::snapshot::decode(&crate::state::snapshot::encode(&s)).unwrap();
        assert_eq!(back.pool_ca, s.pool_ca);
        assert_eq!(back.join_tokens, s.join_tokens);
    }

    /// A roll's command from the pool's current CA to a new one: (op, new CA).
    fn roll_op(s: &PoolState) -> (Op, PoolCa) {
        let old = s.pool_ca().unwrap().unwrap();
        let next = old
            .roll(Validity::starting(NOW, Duration::from_secs(86_400)))
            .unwrap();
        let cross = old.cross_sign(&next).unwrap();
        let (cert_pem, key_pem) = next.to_pem();
        let op = Op::StartCaRoll(StartCaRoll {
            next: Some(PoolCaRecord { cert_pem, key_pem }),
            cross_pem: cross.pem(),
        });
        (op, next)
    }

    #[test]
    fn a_roll_trusts_both_cas_signs_with_the_new_and_finishes_once() {
        let (mut s, _) = pool_with_token();
        let old = s.pool_ca().unwrap().unwrap();
        assert_eq!(s.trust_bundle().unwrap().unwrap().certs().len(), 1);
        let (op, next) = roll_op(&s);
        let r = apply(&mut s, NOW + 1, op);
        assert_eq!(r.code, 0, "{}", r.message);
        assert_eq!(
            s.pool_ca().unwrap().unwrap().cert().fingerprint(),
            next.cert().fingerprint()
        );
        let bundle = s.trust_bundle().unwrap().unwrap();
        assert!(bundle.contains(&old.cert().fingerprint()));
        assert!(bundle.contains(&next.cert().fingerprint()));
        assert_eq!(s.previous_ca_fingerprint(), Some(old.cert().fingerprint()));

        // A second roll waits for this one; a finish naming another CA changes nothing.
        let (again, _) = roll_op(&s);
        let r = apply(&mut s, NOW + 2, again);
        assert_eq!(r.code, Code::FailedPrecondition as i32, "{}", r.message);
        let wrong = Op::FinishCaRoll(FinishCaRoll {
            previous_fingerprint: next.cert().fingerprint().to_string(),
        });
        assert_eq!(
            apply(&mut s, NOW + 3, wrong).code,
            Code::FailedPrecondition as i32
        );
        assert!(s.ca_roll.is_some());

        let finish = Op::FinishCaRoll(FinishCaRoll {
            previous_fingerprint: old.cert().fingerprint().to_string(),
        });
        let r = apply(&mut s, NOW + 4, finish.clone());
        assert_eq!(r.code, 0, "{}", r.message);
        let bundle = s.trust_bundle().unwrap().unwrap();
        assert_eq!(bundle.certs().len(), 1);
        assert!(bundle.contains(&next.cert().fingerprint()));
        assert_eq!(
            apply(&mut s, NOW + 5, finish).code,
            Code::FailedPrecondition as i32
        );
    }

    #[test]
    fn a_roll_needs_a_cross_certificate_from_the_current_ca() {
        let (mut s, _) = pool_with_token();
        let before = s.pool_ca.clone();
        let (Op::StartCaRoll(mut good), _) = roll_op(&s) else {
            unreachable!()
        };
        // Cross-signed by a stranger CA of the same pool: not the current CA's word.
        let stranger = PoolCa::create(
            PoolId::parse("pool-a").unwrap(),
            Validity::starting(NOW, Duration::from_secs(86_400)),
        )
        .unwrap();
        let next = PoolCa::from_pem(
            &good.next.as_ref().unwrap().cert_pem,
            &good.next.as_ref().unwrap().key_pem,
        )
        .unwrap();
        let forged = stranger.cross_sign(&next).unwrap();
        let mut bad = good.clone();
        bad.cross_pem = forged.pem();
        let r = apply(&mut s, NOW + 1, Op::StartCaRoll(bad));
        assert_eq!(r.code, Code::InvalidArgument as i32, "{}", r.message);
        // The current CA itself as the new one.
        good.next = before.clone();
        let r = apply(&mut s, NOW + 1, Op::StartCaRoll(good));
        assert_eq!(r.code, Code::InvalidArgument as i32, "{}", r.message);
        assert_eq!(s.pool_ca, before);
        assert!(s.ca_roll.is_none());
    }

    #[test]
    fn issued_records_keep_the_latest_per_identity_until_it_expires() {
        let mut s = PoolState::new("pool-a", BTreeMap::new());
        let record = |who: &str, not_after_ms| {
            Op::RecordIssued(IssuedRecord {
                identity: who.into(),
                issuer: "sha256:aa".into(),
                not_after_ms,
            })
        };
        assert_eq!(apply(&mut s, NOW, record("host/h1", NOW + 10)).code, 0);
        assert_eq!(apply(&mut s, NOW, record("host/h1", NOW + 20)).code, 0);
        assert_eq!(s.issued["host/h1"].not_after_ms, NOW + 20);
        assert_eq!(
            apply(&mut s, NOW + 30, record("member/2", NOW + 90)).code,
            0
        );
        assert!(!s.issued.contains_key("host/h1"), "expired and forgotten");
        let r = apply(&mut s, NOW, record("nobody", NOW + 10));
        assert_eq!(r.code, Code::InvalidArgument as i32);
    }
}
