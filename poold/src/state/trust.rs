//! The pool's trust in the replicated state: its CA (committed once, with the founding)
//! and the join tokens it issued, kept as records without their secrets until they
//! expire. Spending a token is a command, so it is decided once for the whole pool: of
//! two joins racing with one token, the one applied first wins and the other is refused.

// A refusal's `CommandResult` is the very value the proposer hears (see `machine.rs`).
#![allow(clippy::result_large_err)]

use pool_trust::{Identity, PoolCa, TokenId, TokenRecord};
use tonic::Code;

use super::command::{CommandResult, JoinTokenRecord, PoolCaRecord, RedeemJoinToken};
use super::machine::{Applied, PoolState, err};

/// Join tokens a pool keeps at most, used or not, until they expire.
pub const JOIN_TOKENS_KEPT: usize = 1_000;

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
}
