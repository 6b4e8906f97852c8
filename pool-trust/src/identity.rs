//! Who a certificate speaks for: the pool it belongs to ([`PoolId`]) and the daemon or
//! tool inside it ([`Identity`]).
//!
//! A certificate names its identity in one URI subject alternative name,
//! `pool://<pool-id>/<role>/<id>`:
//!
//! | identity | URI |
//! |---|---|
//! | coordinator member 3 | `pool://<pool-id>/member/3` |
//! | host `7c0e…` | `pool://<pool-id>/host/7c0e…` |
//! | storage endpoint `sr-1` | `pool://<pool-id>/storage/sr-1` |
//! | a named tool (`poolctl` of the lab) | `pool://<pool-id>/client/lab` |
//!
//! and one DNS name, `<role>-<id>.<pool-id>.pool.internal` ([`Identity::dns_name`]), so
//! that a client can ask rustls for a particular peer whatever address it dialled. The
//! daemon's own addresses are further DNS/IP names; they matter for server-name checks
//! only, never for authorization, which reads the URI alone.
//!
//! Pool ids and the string ids are DNS labels: 1 to 48 characters of `a-z`, `0-9` and
//! `-`, neither first nor last a `-` (a UUID's text form is one). Member ids are decimal,
//! from 1, without leading zeros.

use std::fmt;
use std::str::FromStr;

use crate::cert::{CertError, CertInfo};

/// Start of every identity URI.
pub const URI_SCHEME: &str = "pool://";
/// Suffix of every identity DNS name, after the pool id.
pub const DNS_SUFFIX: &str = "pool.internal";
/// The longest pool id or string id.
pub const MAX_ID_LEN: usize = 48;
/// Inputs longer than this are quoted in errors only up to it.
const QUOTE_LEN: usize = 120;

/// Errors parsing or checking an identity.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// A pool id or string id that is not a short DNS label.
    #[error("invalid {what} {input:?}: {reason}")]
    InvalidId {
        what: &'static str,
        input: String,
        reason: &'static str,
    },
    /// A URI that is not `pool://<pool-id>/<role>/<id>`.
    #[error("malformed identity URI {input:?}: {reason}")]
    Malformed { input: String, reason: &'static str },
    /// A role this version does not know.
    #[error("unknown role {role:?}")]
    UnknownRole { role: String },
    /// An identity of another pool.
    #[error("identity of pool {found:?}, expected pool {expected}")]
    WrongPool { expected: PoolId, found: String },
    /// A certificate with no `pool://` URI name.
    #[error("the certificate names no pool identity")]
    NoIdentity,
    /// A certificate with more than one `pool://` URI name.
    #[error("the certificate names {count} pool identities, expected one")]
    SeveralIdentities { count: usize },
    /// A CA certificate presented as a peer's.
    #[error("a CA certificate is not a peer identity")]
    CaCertificate,
    /// The certificate itself could not be read.
    #[error("unreadable certificate")]
    Cert {
        #[source]
        source: CertError,
    },
}

fn quote(s: &str) -> String {
    s.chars().take(QUOTE_LEN).collect()
}

/// Checks that `s` is a short DNS label (see the module docs).
fn check_label(what: &'static str, s: &str) -> Result<(), IdentityError> {
    let bad = |reason| IdentityError::InvalidId {
        what,
        input: quote(s),
        reason,
    };
    if s.is_empty() {
        return Err(bad("empty"));
    }
    if s.len() > MAX_ID_LEN {
        return Err(bad("longer than 48 characters"));
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(bad("only a-z, 0-9 and '-' are allowed"));
    }
    if s.starts_with('-') || s.ends_with('-') {
        return Err(bad("starts or ends with '-'"));
    }
    Ok(())
}

/// The DNS name every coordinator member's certificate carries besides its own
/// (`coordinators.<pool-id>.pool.internal`): clients that may reach any member (poolctl,
/// hosts) give it to rustls as the server name, whatever address they dial.
pub fn coordinators_name(pool: &PoolId) -> String {
    format!("coordinators.{pool}.{DNS_SUFFIX}")
}

/// A pool's id: chosen when the pool is founded, carried by its CA and every certificate
/// the CA signs. A certificate of another pool is refused even if a CA of both were
/// trusted.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PoolId(String);

impl PoolId {
    /// A new random pool id (a UUID v4 in its hyphenated text form).
    pub fn generate() -> PoolId {
        PoolId(uuid::Uuid::new_v4().to_string())
    }

    /// Parses a pool id.
    pub fn parse(s: &str) -> Result<PoolId, IdentityError> {
        check_label("pool id", s)?;
        Ok(PoolId(s.to_owned()))
    }

    /// The id's text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PoolId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for PoolId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PoolId({})", self.0)
    }
}

impl FromStr for PoolId {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        PoolId::parse(s)
    }
}

/// The kind of an [`Identity`], which is what services authorize by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// A coordinator member (`poold`).
    Member,
    /// A host agent (`hostd`).
    Host,
    /// A storage endpoint (`storaged`).
    Storage,
    /// A tool acting for a person (`poolctl`, `poold-bench`); it gets no daemon's rights,
    /// and `PoolService` still authorizes the user by token.
    Client,
    /// A metrics scraper (Prometheus): it may read the daemons' `/metrics` and nothing
    /// else.
    Monitor,
}

impl Role {
    /// The role's word in URIs and DNS names.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Member => "member",
            Role::Host => "host",
            Role::Storage => "storage",
            Role::Client => "client",
            Role::Monitor => "monitor",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "member" => Ok(Role::Member),
            "host" => Ok(Role::Host),
            "storage" => Ok(Role::Storage),
            "client" => Ok(Role::Client),
            "monitor" => Ok(Role::Monitor),
            _ => Err(IdentityError::UnknownRole { role: quote(s) }),
        }
    }
}

/// Who a certificate speaks for inside its pool.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Identity {
    /// Coordinator member N (its Raft id, from 1).
    Member(u64),
    /// A host, by the id the pool gave it when it joined (a UUID).
    Host(String),
    /// A storage endpoint, by its storage repository id.
    Storage(String),
    /// A named tool acting for a person.
    Client(String),
    /// A named metrics scraper.
    Monitor(String),
}

impl Identity {
    /// The identity's role.
    pub fn role(&self) -> Role {
        match self {
            Identity::Member(_) => Role::Member,
            Identity::Host(_) => Role::Host,
            Identity::Storage(_) => Role::Storage,
            Identity::Client(_) => Role::Client,
            Identity::Monitor(_) => Role::Monitor,
        }
    }

    /// Checks the id: a member id from 1, a string id a short DNS label. Every parser in
    /// this module returns only valid identities; a value built directly is checked here
    /// before a certificate or token is made for it.
    pub fn validate(&self) -> Result<(), IdentityError> {
        match self {
            Identity::Member(0) => Err(IdentityError::InvalidId {
                what: "member id",
                input: "0".into(),
                reason: "member ids start at 1",
            }),
            Identity::Member(_) => Ok(()),
            Identity::Host(id) => check_label("host id", id),
            Identity::Storage(id) => check_label("storage id", id),
            Identity::Client(id) => check_label("client name", id),
            Identity::Monitor(id) => check_label("monitor name", id),
        }
    }

    fn id_text(&self) -> String {
        match self {
            Identity::Member(n) => n.to_string(),
            Identity::Host(id)
            | Identity::Storage(id)
            | Identity::Client(id)
            | Identity::Monitor(id) => id.clone(),
        }
    }

    /// `<role>/<id>`, e.g. `member/3`: the identity without its pool, as a token record
    /// or a log line stores it.
    pub fn path(&self) -> String {
        format!("{}/{}", self.role(), self.id_text())
    }

    /// Parses [`Identity::path`]'s form.
    pub fn parse_path(s: &str) -> Result<Identity, IdentityError> {
        let malformed = |reason| IdentityError::Malformed {
            input: quote(s),
            reason,
        };
        let (role, id) = s.split_once('/').ok_or_else(|| malformed("no '/'"))?;
        let identity = match role.parse::<Role>()? {
            Role::Member => {
                if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(malformed("a member id is a decimal number"));
                }
                if id.starts_with('0') {
                    return Err(malformed("a member id has no leading zeros and is not 0"));
                }
                Identity::Member(id.parse().map_err(|_| malformed("member id too large"))?)
            }
            Role::Host => Identity::Host(id.to_owned()),
            Role::Storage => Identity::Storage(id.to_owned()),
            Role::Client => Identity::Client(id.to_owned()),
            Role::Monitor => Identity::Monitor(id.to_owned()),
        };
        identity.validate()?;
        Ok(identity)
    }

    /// `pool://<pool-id>/<role>/<id>`: the URI name a certificate carries.
    pub fn uri(&self, pool: &PoolId) -> String {
        format!("{URI_SCHEME}{pool}/{}", self.path())
    }

    /// Parses an identity URI and refuses one of another pool.
    pub fn parse_uri(uri: &str, pool: &PoolId) -> Result<Identity, IdentityError> {
        let rest = uri
            .strip_prefix(URI_SCHEME)
            .ok_or_else(|| IdentityError::Malformed {
                input: quote(uri),
                reason: "does not start with pool://",
            })?;
        let (found, path) = rest.split_once('/').ok_or(IdentityError::Malformed {
            input: quote(uri),
            reason: "no role after the pool id",
        })?;
        if found != pool.as_str() {
            return Err(IdentityError::WrongPool {
                expected: pool.clone(),
                found: quote(found),
            });
        }
        Identity::parse_path(path)
    }

    /// `<role>-<id>.<pool-id>.pool.internal`: the DNS name a certificate carries for its
    /// identity, which a client gives rustls as the server name to accept only that peer.
    pub fn dns_name(&self, pool: &PoolId) -> String {
        format!("{}-{}.{pool}.{DNS_SUFFIX}", self.role(), self.id_text())
    }

    /// The identity a peer's (already verified) DER certificate names: its one
    /// `pool://` URI, which must be of `pool`. Other URIs are ignored; none, several, a
    /// malformed one or a CA certificate are refused.
    pub fn from_peer_cert(der: &[u8], pool: &PoolId) -> Result<Identity, IdentityError> {
        let info = CertInfo::parse(der).map_err(|source| IdentityError::Cert { source })?;
        Identity::from_cert_info(&info, pool)
    }

    /// As [`Identity::from_peer_cert`], for a certificate already read.
    pub fn from_cert_info(info: &CertInfo, pool: &PoolId) -> Result<Identity, IdentityError> {
        if info.is_ca {
            return Err(IdentityError::CaCertificate);
        }
        let mut uris = info.uris.iter().filter(|u| u.starts_with(URI_SCHEME));
        let first = uris.next().ok_or(IdentityError::NoIdentity)?;
        let others = uris.count();
        if others > 0 {
            return Err(IdentityError::SeveralIdentities { count: others + 1 });
        }
        Identity::parse_uri(first, pool)
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.path())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool() -> PoolId {
        PoolId::parse("3f2a9c1e-0b4d-4e8f-9a71-5c6d7e8f9a0b").unwrap()
    }

    #[test]
    fn identities_round_trip_through_uri_and_path() {
        let pool = pool();
        for id in [
            Identity::Member(1),
            Identity::Member(u64::MAX),
            Identity::Host(uuid::Uuid::new_v4().to_string()),
            Identity::Storage("sr-1".into()),
            Identity::Client("lab".into()),
            Identity::Monitor("prom".into()),
        ] {
            id.validate().unwrap();
            let uri = id.uri(&pool);
            assert!(uri.starts_with("pool://3f2a9c1e-"), "{uri}");
            assert_eq!(Identity::parse_uri(&uri, &pool).unwrap(), id);
            assert_eq!(Identity::parse_path(&id.path()).unwrap(), id);
        }
        assert_eq!(
            Identity::Member(3).uri(&pool),
            "pool://3f2a9c1e-0b4d-4e8f-9a71-5c6d7e8f9a0b/member/3"
        );
        assert_eq!(
            Identity::Member(3).dns_name(&pool),
            "member-3.3f2a9c1e-0b4d-4e8f-9a71-5c6d7e8f9a0b.pool.internal"
        );
    }

    #[test]
    fn another_pools_identity_is_refused() {
        let other = PoolId::generate();
        let uri = Identity::Member(2).uri(&other);
        assert!(matches!(
            Identity::parse_uri(&uri, &pool()),
            Err(IdentityError::WrongPool { .. })
        ));
    }

    #[test]
    fn malformed_uris_are_typed_errors() {
        let p = pool();
        let base = format!("pool://{p}");
        let cases = [
            String::new(),
            "pool:/x/member/1".into(),
            "https://example.com/member/1".into(),
            base.clone(),
            format!("{base}/"),
            format!("{base}/member"),
            format!("{base}/member/"),
            format!("{base}/member/0"),
            format!("{base}/member/01"),
            format!("{base}/member/+1"),
            format!("{base}/member/-1"),
            format!("{base}/member/18446744073709551616"),
            format!("{base}/member/1/extra"),
            format!("{base}/ca"),
            format!("{base}/admin/1"),
            format!("{base}/host/"),
            format!("{base}/host/UPPER"),
            format!("{base}/host/-lead"),
            format!("{base}/host/trail-"),
            format!("{base}/host/a.b"),
            format!("{base}/host/a/b"),
            format!("{base}/host/{}", "a".repeat(49)),
            format!("{base}/storage/sp ace"),
            format!("{base}/client/é"),
        ];
        for c in &cases {
            assert!(Identity::parse_uri(c, &p).is_err(), "{c:?} accepted");
        }
    }

    #[test]
    fn pool_ids_are_checked() {
        assert!(PoolId::parse(&PoolId::generate().to_string()).is_ok());
        for bad in ["", "A", "a_b", "-a", "a-", &"a".repeat(49), "a/b"] {
            assert!(PoolId::parse(bad).is_err(), "{bad:?} accepted");
        }
    }
}
