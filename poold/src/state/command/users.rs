//! The commands that change users: a new user, and a change to one (a role, a password,
//! its tokens revoked). Declared here so `command.rs` stays a table of the log's
//! commands; the apply is in `state/users.rs`.

use proto::coordinator as pb;

#[derive(Clone, PartialEq, prost::Message)]
pub struct CreateUser {
    #[prost(message, optional, tag = "1")]
    pub user: Option<pb::User>,
    /// `pbkdf2-sha256$<iterations>$<salt hex>$<hash hex>`, computed by the proposer.
    #[prost(string, tag = "2")]
    pub password_hash: String,
    /// The pool's token-signing key, chosen by the proposer; kept only when the pool has
    /// none yet (the first user).
    #[prost(bytes = "vec", tag = "3")]
    pub token_key: Vec<u8>,
}

/// A change to one existing user, which of them by the fields set (see
/// [`SetRole::change`]). Named for the only change it carried at first; older log
/// entries (fields 1-3) still decode as role changes.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SetRole {
    #[prost(string, tag = "1")]
    pub user_id: String,
    #[prost(enumeration = "pb::Role", tag = "2")]
    pub role: i32,
    #[prost(bool, tag = "3")]
    pub grant: bool,
    /// A new stored credential (`crate::auth`'s hash of a new password), computed by the
    /// proposer; replacing it revokes the user's tokens.
    #[prost(string, tag = "4")]
    pub credential: String,
    /// With `credential`: the stored credential the proposer checked the change against;
    /// the change is refused (Aborted, retryable) if another came first.
    #[prost(string, tag = "5")]
    pub if_credential: String,
    /// A new token stamp (hex, from the proposer's random source): revokes the user's
    /// tokens, keeping the password.
    #[prost(string, tag = "6")]
    pub token_stamp: String,
}

/// What a [`SetRole`] changes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum UserChange<'a> {
    Role {
        role: i32,
        grant: bool,
    },
    Password {
        credential: &'a str,
        if_credential: &'a str,
    },
    RevokeTokens {
        stamp: &'a str,
    },
}

impl SetRole {
    pub fn change(&self) -> UserChange<'_> {
        if !self.credential.is_empty() {
            UserChange::Password {
                credential: &self.credential,
                if_credential: &self.if_credential,
            }
        } else if !self.token_stamp.is_empty() {
            UserChange::RevokeTokens {
                stamp: &self.token_stamp,
            }
        } else {
            UserChange::Role {
                role: self.role,
                grant: self.grant,
            }
        }
    }
}
