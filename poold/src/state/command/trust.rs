//! The commands of the pool's trust: its CA committed with the founding, join tokens
//! issued and spent. Declared here so `command.rs` stays a table of the log's commands;
//! the apply is in `state/trust.rs`.

use std::fmt;

/// The pool's CA, as the founding member commits it: certificate and PKCS#8 key, PEM.
/// The key is the pool's root secret: it lives only in the members' Raft state (in their
/// 0700 data directories) and `Debug` never shows it.
#[derive(Clone, PartialEq, prost::Message)]
#[prost(skip_debug)]
pub struct PoolCaRecord {
    #[prost(string, tag = "1")]
    pub cert_pem: String,
    #[prost(string, tag = "2")]
    pub key_pem: String,
}

impl fmt::Debug for PoolCaRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolCaRecord")
            .field("cert_pem_len", &self.cert_pem.len())
            .field("key_pem", &"[elided]")
            .finish()
    }
}

/// What the pool keeps of a join token (`pool_trust::TokenRecord` in the log's format):
/// the hash of its secret, never the secret.
#[derive(Clone, PartialEq, prost::Message)]
pub struct JoinTokenRecord {
    /// The token's public id, 16 hex digits.
    #[prost(string, tag = "1")]
    pub id: String,
    #[prost(bytes = "vec", tag = "2")]
    pub secret_hash: Vec<u8>,
    /// The one identity it lets its holder claim, as `<role>/<id>`.
    #[prost(string, tag = "3")]
    pub identity: String,
    #[prost(uint64, tag = "4")]
    pub expires_at_ms: u64,
    #[prost(bool, tag = "5")]
    pub used: bool,
}

/// Spends a token for `identity`. The proposer has checked the secret against the record
/// (records never change but for `used`); apply refuses a used, expired or unknown token
/// or another identity, so of two racing joins one wins.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RedeemJoinToken {
    #[prost(string, tag = "1")]
    pub token_id: String,
    #[prost(string, tag = "2")]
    pub identity: String,
}

/// A CA roll under way: the CA being retired (its certificate only: it signs nothing
/// any more) and the cross certificate — the new CA's key signed by the old — that goes
/// with every certificate issued during the roll, so daemons still trusting only the old
/// CA accept the new ones.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CaRollRecord {
    #[prost(string, tag = "1")]
    pub previous_cert_pem: String,
    #[prost(string, tag = "2")]
    pub cross_pem: String,
    #[prost(uint64, tag = "3")]
    pub started_at_ms: u64,
}

/// Starts a roll: `next` signs from now on; the CA it replaces stays trusted.
#[derive(Clone, PartialEq, prost::Message)]
pub struct StartCaRoll {
    #[prost(message, optional, tag = "1")]
    pub next: Option<PoolCaRecord>,
    #[prost(string, tag = "2")]
    pub cross_pem: String,
}

/// Ends the roll that retires the CA of `previous_fingerprint` (so a late or repeated
/// finish cannot end a later roll).
#[derive(Clone, PartialEq, prost::Message)]
pub struct FinishCaRoll {
    #[prost(string, tag = "1")]
    pub previous_fingerprint: String,
}

/// A certificate the pool issued (at a join or a renewal): which CA signed it for whom,
/// until when. A roll finishes when every daemon's latest one is of the new CA.
#[derive(Clone, PartialEq, prost::Message)]
pub struct IssuedRecord {
    /// `<role>/<id>`.
    #[prost(string, tag = "1")]
    pub identity: String,
    /// `sha256:<hex>` of the signing CA.
    #[prost(string, tag = "2")]
    pub issuer: String,
    #[prost(uint64, tag = "3")]
    pub not_after_ms: u64,
}
