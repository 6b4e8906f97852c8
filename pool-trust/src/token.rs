//! One-time, expiring join tokens: what `poolctl host-join` (and its storage and member
//! equivalents) hands an operator, and what the new daemon presents with its certificate
//! request.
//!
//! A token is an id and a 32-byte random secret, printed as
//! `pooljoin-<16 hex digits>-<64 hex digits>`. The pool keeps a [`TokenRecord`]: the id,
//! the SHA-256 of the secret (never the secret), the one [`Identity`] the token may claim,
//! its expiry and whether it was used. Verification compares the hashes in constant time
//! and refuses a wrong secret, a used or expired token, and a claim of any other identity.
//!
//! **Used once is the caller's to keep.** [`TokenRecord::redeem`] sets `used`; the token
//! is spent only when the caller has persisted that record — in `poold`, committed through
//! Raft — *before* it signs the certificate. A caller that signs first, or keeps the record
//! only in memory, lets a token be replayed (on another member, or after a restart).

use std::fmt;
use std::time::Duration;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::identity::{Identity, IdentityError};

/// First word of every printed token.
pub const TOKEN_PREFIX: &str = "pooljoin";
/// How long a token lives unless the caller says otherwise.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(60 * 60);
/// Length of a printed token.
pub const TOKEN_LEN: usize = TOKEN_PREFIX.len() + 1 + 16 + 1 + 64;
/// Separates the hashed fields from a hash of anything else.
const HASH_DOMAIN: &[u8] = b"pool-trust join token v1\0";

/// Errors parsing or verifying a join token.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// Text that is not a printed token.
    #[error("not a join token (expected pooljoin-<16 hex>-<64 hex>): {reason}")]
    Malformed { reason: &'static str },
    /// A token checked against another token's record.
    #[error("the token's id {presented} is not the record's {record}")]
    WrongId { record: TokenId, presented: TokenId },
    /// The secret does not hash to the record's.
    #[error("wrong token secret")]
    WrongSecret,
    /// The record says the token was used.
    #[error("the join token was already used")]
    AlreadyUsed,
    /// Past the expiry.
    #[error("the join token expired at {expires_at_ms} (now {now_ms}, ms since the epoch)")]
    Expired { expires_at_ms: u64, now_ms: u64 },
    /// A claim of an identity the token was not issued for.
    #[error("the token allows {allowed}, not {claimed}")]
    WrongIdentity {
        allowed: Identity,
        claimed: Identity,
    },
    /// A token asked for an identity that is not valid.
    #[error("cannot issue a token for an invalid identity")]
    InvalidIdentity {
        #[source]
        source: IdentityError,
    },
}

/// A token's public id: what the pool stores and looks records up by, and what may be
/// listed or logged.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TokenId(pub [u8; 8]);

impl TokenId {
    /// Parses 16 lowercase hex digits.
    pub fn parse(s: &str) -> Result<TokenId, TokenError> {
        crate::hex::decode::<8>(s)
            .map(TokenId)
            .ok_or(TokenError::Malformed {
                reason: "the id is not 16 lowercase hex digits",
            })
    }
}

impl fmt::Display for TokenId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&crate::hex::encode(&self.0))
    }
}

impl fmt::Debug for TokenId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenId({self})")
    }
}

/// A join token as its holder has it: id and secret. `Debug` shows the id only; the
/// printable form is [`JoinToken::reveal`], shown once and never logged.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    id: TokenId,
    secret: [u8; 32],
}

impl JoinToken {
    /// The token's id.
    pub fn id(&self) -> TokenId {
        self.id
    }

    /// The printable form, `pooljoin-<id>-<secret>`. It is the secret: give it to the
    /// operator once, never to a log.
    pub fn reveal(&self) -> String {
        format!(
            "{TOKEN_PREFIX}-{}-{}",
            self.id,
            crate::hex::encode(&self.secret)
        )
    }

    /// Parses the printable form; surrounding whitespace (a file's newline) is ignored.
    pub fn parse(text: &str) -> Result<JoinToken, TokenError> {
        let malformed = |reason| TokenError::Malformed { reason };
        let text = text.trim();
        if text.len() != TOKEN_LEN {
            return Err(malformed("wrong length"));
        }
        let rest = text
            .strip_prefix(TOKEN_PREFIX)
            .and_then(|r| r.strip_prefix('-'))
            .ok_or_else(|| malformed("does not start with pooljoin-"))?;
        let (id, secret) = rest
            .split_once('-')
            .ok_or_else(|| malformed("no '-' between id and secret"))?;
        let id = TokenId::parse(id)?;
        let secret = crate::hex::decode::<32>(secret)
            .ok_or_else(|| malformed("the secret is not 64 lowercase hex digits"))?;
        Ok(JoinToken { id, secret })
    }

    fn hash(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(HASH_DOMAIN);
        h.update(self.id.0);
        h.update(self.secret);
        h.finalize().into()
    }
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinToken")
            .field("id", &self.id)
            .field("secret", &"[elided]")
            .finish()
    }
}

/// What the pool keeps of a token: no secret, only its hash. The fields are public so the
/// owner can persist them in its own format (the coordinator's replicated state).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenRecord {
    /// The token's id.
    pub id: TokenId,
    /// SHA-256 over a domain string, the id and the secret.
    pub secret_hash: [u8; 32],
    /// The one identity the token lets its holder claim.
    pub identity: Identity,
    /// Milliseconds since the Unix epoch after which the token is refused.
    pub expires_at_ms: u64,
    /// Set by [`TokenRecord::redeem`]; the caller persists it (see the module docs).
    pub used: bool,
}

/// A new token for `identity`, valid for `ttl` from `now_ms`: the token to hand out and the
/// record to keep.
pub fn issue(
    identity: Identity,
    now_ms: u64,
    ttl: Duration,
) -> Result<(JoinToken, TokenRecord), TokenError> {
    identity
        .validate()
        .map_err(|source| TokenError::InvalidIdentity { source })?;
    let token = JoinToken {
        id: TokenId(rand::random()),
        secret: rand::random(),
    };
    let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
    let record = TokenRecord {
        id: token.id,
        secret_hash: token.hash(),
        identity,
        expires_at_ms: now_ms.saturating_add(ttl_ms),
        used: false,
    };
    Ok((token, record))
}

impl TokenRecord {
    /// Checks `token` against this record for a holder claiming `claim` at `now_ms`,
    /// without spending it. The secret is checked first, in constant time, so that
    /// whoever knows only an id learns nothing of the token's state.
    pub fn verify(
        &self,
        token: &JoinToken,
        claim: &Identity,
        now_ms: u64,
    ) -> Result<(), TokenError> {
        if token.id != self.id {
            return Err(TokenError::WrongId {
                record: self.id,
                presented: token.id,
            });
        }
        if !bool::from(token.hash()[..].ct_eq(&self.secret_hash[..])) {
            return Err(TokenError::WrongSecret);
        }
        if self.used {
            return Err(TokenError::AlreadyUsed);
        }
        if now_ms >= self.expires_at_ms {
            return Err(TokenError::Expired {
                expires_at_ms: self.expires_at_ms,
                now_ms,
            });
        }
        if *claim != self.identity {
            return Err(TokenError::WrongIdentity {
                allowed: self.identity.clone(),
                claimed: claim.clone(),
            });
        }
        Ok(())
    }

    /// [`TokenRecord::verify`], then marks the record used. Persist the record before
    /// acting on the token.
    pub fn redeem(
        &mut self,
        token: &JoinToken,
        claim: &Identity,
        now_ms: u64,
    ) -> Result<(), TokenError> {
        self.verify(token, claim, now_ms)?;
        self.used = true;
        Ok(())
    }
}

/// A password the pool makes up (the first admin's, a lab's): 24 characters from a
/// 57-letter alphabet without look-alikes, about 140 bits.
pub fn generate_password() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz23456789";
    (0..24)
        .map(|_| ALPHABET[rand::random_range(0..ALPHABET.len())] as char)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000_000;

    fn host() -> Identity {
        Identity::Host("7c0e4f7a-8d1b-4c3e-9f2a-1b2c3d4e5f60".into())
    }

    #[test]
    fn a_token_verifies_once_for_its_identity() {
        let (token, mut record) = issue(host(), NOW, Duration::from_secs(600)).unwrap();
        let parsed = JoinToken::parse(&format!("{}\n", token.reveal())).unwrap();
        assert_eq!(parsed, token);
        assert_eq!(record.expires_at_ms, NOW + 600_000);
        record.verify(&parsed, &host(), NOW + 1).unwrap();
        record.redeem(&parsed, &host(), NOW + 1).unwrap();
        assert!(record.used);
        assert!(matches!(
            record.redeem(&parsed, &host(), NOW + 2),
            Err(TokenError::AlreadyUsed)
        ));
    }

    #[test]
    fn expired_tokens_are_refused() {
        let (token, record) = issue(host(), NOW, Duration::from_secs(60)).unwrap();
        record.verify(&token, &host(), NOW + 59_999).unwrap();
        assert!(matches!(
            record.verify(&token, &host(), NOW + 60_000),
            Err(TokenError::Expired { .. })
        ));
    }

    #[test]
    fn a_wrong_secret_is_refused() {
        let (token, record) = issue(host(), NOW, DEFAULT_TOKEN_TTL).unwrap();
        let mut text = token.reveal();
        let last = text.pop().unwrap();
        text.push(if last == '0' { '1' } else { '0' });
        let forged = JoinToken::parse(&text).unwrap();
        assert!(matches!(
            record.verify(&forged, &host(), NOW),
            Err(TokenError::WrongSecret)
        ));
        // Another token's secret with this token's id.
        let (other, _) = issue(host(), NOW, DEFAULT_TOKEN_TTL).unwrap();
        let swapped = format!("{TOKEN_PREFIX}-{}-{}", token.id(), &other.reveal()[26..]);
        assert!(matches!(
            record.verify(&JoinToken::parse(&swapped).unwrap(), &host(), NOW),
            Err(TokenError::WrongSecret)
        ));
        assert!(matches!(
            record.verify(&other, &host(), NOW),
            Err(TokenError::WrongId { .. })
        ));
    }

    #[test]
    fn another_role_or_identity_is_refused() {
        let (token, mut record) = issue(host(), NOW, DEFAULT_TOKEN_TTL).unwrap();
        for claim in [
            Identity::Member(1),
            Identity::Storage("sr-1".into()),
            Identity::Host("00000000-0000-4000-8000-000000000000".into()),
        ] {
            assert!(matches!(
                record.redeem(&token, &claim, NOW),
                Err(TokenError::WrongIdentity { .. })
            ));
        }
        assert!(!record.used, "a refused claim does not spend the token");
    }

    #[test]
    fn malformed_tokens_are_typed_errors() {
        let (token, _) = issue(Identity::Member(2), NOW, DEFAULT_TOKEN_TTL).unwrap();
        let good = token.reveal();
        let cases = [
            String::new(),
            good[..good.len() - 1].to_string(),
            format!("{good}0"),
            good.replacen("pooljoin", "poolj0in", 1),
            good.to_uppercase(),
            good.replacen('-', "_", 1),
            format!("{}{}", &good[..good.len() - 1], 'g'),
            format!("{}é", &good[..good.len() - 2]),
        ];
        for c in &cases {
            assert!(
                matches!(JoinToken::parse(c), Err(TokenError::Malformed { .. })),
                "{c:?} accepted"
            );
        }
        assert!(!format!("{token:?}").contains(&good[26..]));
    }

    #[test]
    fn invalid_identities_get_no_token() {
        assert!(matches!(
            issue(Identity::Member(0), NOW, DEFAULT_TOKEN_TTL),
            Err(TokenError::InvalidIdentity { .. })
        ));
        assert!(issue(Identity::Host("Bad Id".into()), NOW, DEFAULT_TOKEN_TTL).is_err());
    }
}
