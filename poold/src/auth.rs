//! Users, roles and tokens: who may call what.
//!
//! - **Passwords** are stored as PBKDF2-HMAC-SHA256 hashes with a random salt
//!   (`pbkdf2-sha256$<iterations>$<salt hex>$<hash hex>`), computed by the member that
//!   takes the request (the state machine only stores them).
//! - **Tokens** are stateless and signed: `v1.<user id>.<expiry ms>.<HMAC-SHA256 hex>`,
//!   with a key the pool keeps in its replicated state (chosen with the first user), so
//!   any member checks any token without a write. A token names the user, not the roles:
//!   roles are read from the current state at each call, so a revoked role or a deleted
//!   user takes effect at once. Clients send `authorization: Bearer <token>`.
//! - **Roles** are nested, each one allowing what the one below does and more:
//!   read-only (every Get/List/Watch) < vm-operator (power and console) < vm-admin (VMs,
//!   volumes, templates, snapshots, migration) < pool-operator (hosts, storage
//!   repositories, HA, members, pool settings, audit log) < pool-admin (users and roles).
//! - **Bootstrap**: a pool with no user is open (every caller acts as pool-admin, named
//!   "anonymous" in the audit log) until the first user — who must be a pool-admin — is
//!   created; `poold --admin-password-file` creates that first user ("admin") when the
//!   pool starts, so a production pool is never open.

use std::time::Duration;

use proto::coordinator as pb;
use sha2::{Digest, Sha256};
use tonic::Status;

use crate::state::PoolState;

/// Iterations of PBKDF2 for new password hashes.
pub const PBKDF2_ITERATIONS: u32 = 100_000;
/// How long a token from Login is valid.
pub const TOKEN_TTL: Duration = Duration::from_secs(12 * 3600);
/// The metadata key carrying the token.
pub const HEADER: &str = "authorization";

/// What a role allows, from least to most.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    ReadOnly = 1,
    VmOperator = 2,
    VmAdmin = 3,
    PoolOperator = 4,
    PoolAdmin = 5,
}

pub fn level(role: pb::Role) -> Option<Level> {
    match role {
        pb::Role::ReadOnly => Some(Level::ReadOnly),
        pb::Role::VmOperator => Some(Level::VmOperator),
        pb::Role::VmAdmin => Some(Level::VmAdmin),
        pb::Role::PoolOperator => Some(Level::PoolOperator),
        pb::Role::PoolAdmin => Some(Level::PoolAdmin),
        pb::Role::Unspecified => None,
    }
}

/// Every PoolService method but Login, with the least role that may call it and whether
/// it changes the pool (changes are audited).
pub const METHODS: &[(&str, Level, bool)] = &[
    ("GetPool", Level::ReadOnly, false),
    ("ListMembers", Level::ReadOnly, false),
    ("GetHost", Level::ReadOnly, false),
    ("ListHosts", Level::ReadOnly, false),
    ("GetStorageRepository", Level::ReadOnly, false),
    ("ListStorageRepositories", Level::ReadOnly, false),
    ("GetVolume", Level::ReadOnly, false),
    ("ListVolumes", Level::ReadOnly, false),
    ("GetVm", Level::ReadOnly, false),
    ("ListVms", Level::ReadOnly, false),
    ("ListVmSnapshots", Level::ReadOnly, false),
    ("ExplainPlacement", Level::ReadOnly, false),
    ("GetTemplate", Level::ReadOnly, false),
    ("ListTemplates", Level::ReadOnly, false),
    ("GetHaSettings", Level::ReadOnly, false),
    ("GetTask", Level::ReadOnly, false),
    ("ListTasks", Level::ReadOnly, false),
    ("WatchTask", Level::ReadOnly, false),
    ("ListRoles", Level::ReadOnly, false),
    ("QueryMetrics", Level::ReadOnly, false),
    ("StartVm", Level::VmOperator, true),
    ("ShutdownVm", Level::VmOperator, true),
    ("RebootVm", Level::VmOperator, true),
    ("PauseVm", Level::VmOperator, true),
    ("ResumeVm", Level::VmOperator, true),
    ("StreamVmConsole", Level::VmOperator, false),
    ("CancelTask", Level::VmOperator, true),
    ("CreateVolume", Level::VmAdmin, true),
    ("ResizeVolume", Level::VmAdmin, true),
    ("SnapshotVolume", Level::VmAdmin, true),
    ("CloneVolume", Level::VmAdmin, true),
    ("RevertVolume", Level::VmAdmin, true),
    ("DeleteVolume", Level::VmAdmin, true),
    ("OpenVolumeAccess", Level::VmAdmin, true),
    ("CloseVolumeAccess", Level::VmAdmin, true),
    ("CreateVm", Level::VmAdmin, true),
    ("UpdateVm", Level::VmAdmin, true),
    ("DestroyVm", Level::VmAdmin, true),
    ("MigrateVm", Level::VmAdmin, true),
    ("SnapshotVm", Level::VmAdmin, true),
    ("RevertVm", Level::VmAdmin, true),
    ("CloneVm", Level::VmAdmin, true),
    ("CreateTemplate", Level::VmAdmin, true),
    ("DeleteTemplate", Level::VmAdmin, true),
    ("UpdatePoolSettings", Level::PoolOperator, true),
    ("AddMember", Level::PoolOperator, true),
    ("RemoveMember", Level::PoolOperator, true),
    ("TransferLeadership", Level::PoolOperator, true),
    ("JoinHost", Level::PoolOperator, true),
    ("EnableHost", Level::PoolOperator, true),
    ("DisableHost", Level::PoolOperator, true),
    ("EvacuateHost", Level::PoolOperator, true),
    ("RemoveHost", Level::PoolOperator, true),
    ("CreateStorageRepository", Level::PoolOperator, true),
    ("RemoveStorageRepository", Level::PoolOperator, true),
    ("SetHaSettings", Level::PoolOperator, true),
    ("ListUsers", Level::PoolOperator, false),
    ("ListAuditEvents", Level::PoolOperator, false),
    ("CreateUser", Level::PoolAdmin, true),
    ("DeleteUser", Level::PoolAdmin, true),
    ("GrantRole", Level::PoolAdmin, true),
    ("RevokeRole", Level::PoolAdmin, true),
];

/// The least role for a method and whether it is a change; unknown methods need the most.
pub fn rule(method: &str) -> (Level, bool) {
    METHODS
        .iter()
        .find(|(m, _, _)| *m == method)
        .map_or((Level::PoolAdmin, true), |(_, l, c)| (*l, *c))
}

/// Who is calling, as far as a request can say.
#[derive(Debug, Clone, PartialEq)]
pub struct Caller {
    /// The user name ("anonymous" in an open pool, empty for the pool's own commands).
    pub name: String,
    pub level: Level,
    /// The method called ("StartVm"); empty for internal commands.
    pub method: String,
    pub peer: String,
}

impl Caller {
    /// The pool itself (leader loops, host reports): not audited.
    pub fn internal() -> Caller {
        Caller {
            name: String::new(),
            level: Level::PoolAdmin,
            method: String::new(),
            peer: String::new(),
        }
    }
}

/// Why a call is refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AuthError {
    #[error("this pool requires a login: send \"authorization: Bearer <token>\" from Login")]
    NoToken,
    #[error("the authorization header is not \"Bearer <token>\"")]
    Malformed,
    #[error("the token is not valid for this pool (bad signature or format); log in again")]
    BadToken,
    #[error("the token expired; log in again")]
    Expired,
    #[error("the token's user no longer exists")]
    NoUser,
    #[error("user {user:?} may not call {method}: it needs role {needed} or higher")]
    Denied {
        user: String,
        method: String,
        needed: &'static str,
    },
}

impl From<AuthError> for Status {
    fn from(e: AuthError) -> Status {
        match e {
            AuthError::Denied { .. } => Status::permission_denied(e.to_string()),
            _ => Status::unauthenticated(e.to_string()),
        }
    }
}

pub fn level_name(l: Level) -> &'static str {
    match l {
        Level::ReadOnly => "read-only",
        Level::VmOperator => "vm-operator",
        Level::VmAdmin => "vm-admin",
        Level::PoolOperator => "pool-operator",
        Level::PoolAdmin => "pool-admin",
    }
}

/// Checks a call: the token in `header` (the authorization value, if any) against the
/// pool's users, and the user's roles against the method. `now_ms`: the caller's clock.
pub fn authorize(
    state: &PoolState,
    header: Option<&str>,
    method: &str,
    peer: &str,
    now_ms: u64,
) -> Result<Caller, AuthError> {
    let (needed, _) = rule(method);
    if state.users.is_empty() {
        return Ok(Caller {
            name: "anonymous".into(),
            level: Level::PoolAdmin,
            method: method.to_owned(),
            peer: peer.to_owned(),
        });
    }
    let header = header.ok_or(AuthError::NoToken)?;
    let token = header
        .strip_prefix("Bearer ")
        .or_else(|| header.strip_prefix("bearer "))
        .ok_or(AuthError::Malformed)?
        .trim();
    let user_id = verify_token(&state.token_key, token, now_ms)?;
    let u = state.users.get(&user_id).ok_or(AuthError::NoUser)?;
    let have = u
        .user
        .roles
        .iter()
        .filter_map(|r| pb::Role::try_from(*r).ok().and_then(level))
        .max();
    match have {
        Some(l) if l >= needed => Ok(Caller {
            name: u.user.name.clone(),
            level: l,
            method: method.to_owned(),
            peer: peer.to_owned(),
        }),
        _ => Err(AuthError::Denied {
            user: u.user.name.clone(),
            method: method.to_owned(),
            needed: level_name(needed),
        }),
    }
}

/// HMAC-SHA256 (RFC 2104).
pub fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    Hmac::new(key).mac(msg)
}

/// HMAC with its padded key states computed once (PBKDF2 reuses them per iteration).
struct Hmac {
    inner: Sha256,
    outer: Sha256,
}

impl Hmac {
    fn new(key: &[u8]) -> Hmac {
        let mut block = [0u8; 64];
        if key.len() > 64 {
            block[..32].copy_from_slice(&Sha256::digest(key));
        } else {
            block[..key.len()].copy_from_slice(key);
        }
        let ipad: Vec<u8> = block.iter().map(|b| b ^ 0x36).collect();
        let opad: Vec<u8> = block.iter().map(|b| b ^ 0x5c).collect();
        Hmac {
            inner: Sha256::new().chain_update(&ipad),
            outer: Sha256::new().chain_update(&opad),
        }
    }

    fn mac(&self, msg: &[u8]) -> [u8; 32] {
        let inner = self.inner.clone().chain_update(msg).finalize();
        self.outer.clone().chain_update(inner).finalize().into()
    }
}

/// PBKDF2-HMAC-SHA256 with a 32-byte output (one block, RFC 8018).
pub fn pbkdf2_sha256(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
    let prf = Hmac::new(password);
    let mut first = salt.to_vec();
    first.extend_from_slice(&1u32.to_be_bytes());
    let mut u = prf.mac(&first);
    let mut out = u;
    for _ in 1..iterations {
        u = prf.mac(&u);
        for (o, x) in out.iter_mut().zip(u) {
            *o ^= x;
        }
    }
    out
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Equal in time independent of where the inputs differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A new salted hash of a password.
pub fn hash_password(password: &str) -> String {
    let salt: [u8; 16] = rand::random();
    hash_with(password, &salt, PBKDF2_ITERATIONS)
}

fn hash_with(password: &str, salt: &[u8], iterations: u32) -> String {
    let h = pbkdf2_sha256(password.as_bytes(), salt, iterations);
    format!("pbkdf2-sha256${iterations}${}${}", hex(salt), hex(&h))
}

/// Whether `password` matches a stored hash.
pub fn check_password(stored: &str, password: &str) -> bool {
    let parts: Vec<&str> = stored.split('$').collect();
    let [scheme, iters, salt, hash] = parts[..] else {
        return false;
    };
    let (Ok(iters), Some(salt), Some(hash)) = (iters.parse::<u32>(), unhex(salt), unhex(hash))
    else {
        return false;
    };
    if scheme != "pbkdf2-sha256" || iters == 0 || iters > 10_000_000 {
        return false;
    }
    same(&pbkdf2_sha256(password.as_bytes(), &salt, iters), &hash)
}

/// A signed token for a user, valid until `expires_ms`.
pub fn issue_token(key: &[u8], user_id: &str, expires_ms: u64) -> String {
    let body = format!("v1.{user_id}.{expires_ms}");
    format!("{body}.{}", hex(&hmac_sha256(key, body.as_bytes())))
}

/// The user id a token names, if its signature is right and it has not expired.
pub fn verify_token(key: &[u8], token: &str, now_ms: u64) -> Result<String, AuthError> {
    if key.is_empty() {
        return Err(AuthError::BadToken);
    }
    let (body, sig) = token.rsplit_once('.').ok_or(AuthError::BadToken)?;
    let sig = unhex(sig).ok_or(AuthError::BadToken)?;
    if !same(&hmac_sha256(key, body.as_bytes()), &sig) {
        return Err(AuthError::BadToken);
    }
    let mut parts = body.splitn(3, '.');
    let (Some("v1"), Some(user), Some(exp)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(AuthError::BadToken);
    };
    let exp: u64 = exp.parse().map_err(|_| AuthError::BadToken)?;
    if now_ms >= exp {
        return Err(AuthError::Expired);
    }
    Ok(user.to_owned())
}

/// The roles as ListRoles describes them.
pub fn describe_roles() -> Vec<pb::RoleDescription> {
    [
        (pb::Role::ReadOnly, "sees everything, changes nothing"),
        (
            pb::Role::VmOperator,
            "read-only, plus starting, stopping, rebooting, pausing VMs and their consoles",
        ),
        (
            pb::Role::VmAdmin,
            "vm-operator, plus creating, changing, migrating, snapshotting and destroying VMs, volumes and templates",
        ),
        (
            pb::Role::PoolOperator,
            "vm-admin, plus hosts, storage repositories, HA, coordinator members, pool settings and the audit log",
        ),
        (pb::Role::PoolAdmin, "everything, users and roles included"),
    ]
    .into_iter()
    .map(|(role, d)| {
        let l = level(role).expect("a real role");
        pb::RoleDescription {
            role: role as i32,
            description: d.into(),
            allowed_methods: METHODS
                .iter()
                .filter(|(_, need, _)| *need <= l)
                .map(|(m, _, _)| format!("pool.v1.PoolService/{m}"))
                .chain(std::iter::once("pool.v1.PoolService/Login".to_owned()))
                .collect(),
        }
    })
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::machine::UserRecord;

    #[test]
    fn hmac_matches_rfc_4231_case_2() {
        let mac = hmac_sha256(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(
            hex(&mac),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn pbkdf2_matches_the_published_vector() {
        // PBKDF2-HMAC-SHA256, P="password", S="salt", c=2, dkLen=32.
        assert_eq!(
            hex(&pbkdf2_sha256(b"password", b"salt", 2)),
            "ae4d0c95af6b46d32d0adff928f06dd02a303f8ef3c251dfd6e2d85a95474c43"
        );
    }

    #[test]
    fn passwords_check_and_hashes_are_salted() {
        let a = hash_with("s3cret", b"0123456789abcdef", 1000);
        assert!(check_password(&a, "s3cret"));
        assert!(!check_password(&a, "s3cret!"));
        assert!(!check_password("garbage", "s3cret"));
        let b = hash_password("s3cret");
        let c = hash_password("s3cret");
        assert_ne!(b, c, "a fresh salt each time");
        assert!(check_password(&b, "s3cret"));
    }

    #[test]
    fn tokens_verify_expire_and_resist_tampering() {
        let key = [7u8; 32];
        let t = issue_token(&key, "u1", 10_000);
        assert_eq!(verify_token(&key, &t, 9_999), Ok("u1".into()));
        assert_eq!(verify_token(&key, &t, 10_000), Err(AuthError::Expired));
        assert_eq!(
            verify_token(&[8u8; 32], &t, 1),
            Err(AuthError::BadToken),
            "another pool's key"
        );
        let forged = t.replace("v1.u1.", "v1.u2.");
        assert_eq!(verify_token(&key, &forged, 1), Err(AuthError::BadToken));
        let later = t.replace(".10000.", ".99999999.");
        assert_eq!(verify_token(&key, &later, 1), Err(AuthError::BadToken));
    }

    fn state_with(users: &[(&str, &[pb::Role])]) -> PoolState {
        let mut s = PoolState::default();
        s.token_key = vec![1u8; 32];
        for (name, roles) in users {
            s.users.insert(
                format!("id-{name}"),
                UserRecord {
                    user: pb::User {
                        id: format!("id-{name}"),
                        name: (*name).into(),
                        roles: roles.iter().map(|r| *r as i32).collect(),
                        created_at: None,
                    },
                    password_hash: String::new(),
                },
            );
        }
        s
    }

    #[test]
    fn roles_are_nested_and_checked_per_method() {
        use pb::Role::*;
        let s = state_with(&[
            ("ro", &[ReadOnly]),
            ("op", &[VmOperator]),
            ("va", &[VmAdmin]),
            ("po", &[PoolOperator]),
            ("pa", &[PoolAdmin]),
            ("none", &[]),
        ]);
        let table: &[(&str, &str, bool)] = &[
            ("ro", "ListVms", true),
            ("ro", "StartVm", false),
            ("op", "StartVm", true),
            ("op", "CreateVm", false),
            ("va", "CreateVm", true),
            ("va", "MigrateVm", true),
            ("va", "JoinHost", false),
            ("po", "JoinHost", true),
            ("po", "SetHaSettings", true),
            ("po", "CreateUser", false),
            ("pa", "CreateUser", true),
            ("pa", "NoSuchMethod", true),
            ("po", "NoSuchMethod", false),
            ("none", "ListVms", false),
        ];
        for (user, method, ok) in table {
            let tok = format!(
                "Bearer {}",
                issue_token(&s.token_key, &format!("id-{user}"), 100)
            );
            let r = authorize(&s, Some(&tok), method, "peer", 1);
            assert_eq!(r.is_ok(), *ok, "{user} {method}: {r:?}");
            if let Err(e) = r {
                assert!(matches!(e, AuthError::Denied { .. }));
                assert_eq!(Status::from(e).code(), tonic::Code::PermissionDenied);
            }
        }
        // No token, a bad header, a deleted user.
        assert_eq!(
            authorize(&s, None, "ListVms", "", 1),
            Err(AuthError::NoToken)
        );
        assert_eq!(
            authorize(&s, Some("Basic x"), "ListVms", "", 1),
            Err(AuthError::Malformed)
        );
        let gone = format!("Bearer {}", issue_token(&s.token_key, "id-ghost", 100));
        assert_eq!(
            authorize(&s, Some(&gone), "ListVms", "", 1),
            Err(AuthError::NoUser)
        );
        // A pool without users is open.
        let open = PoolState::default();
        let c = authorize(&open, None, "CreateUser", "p", 1).unwrap();
        assert_eq!(c.name, "anonymous");
    }

    #[test]
    fn every_method_of_the_service_has_a_rule() {
        // Role descriptions list each method once per role that allows it.
        let roles = describe_roles();
        let admin = roles
            .iter()
            .find(|r| r.role == pb::Role::PoolAdmin as i32)
            .unwrap();
        assert_eq!(admin.allowed_methods.len(), METHODS.len() + 1);
        let ro = roles
            .iter()
            .find(|r| r.role == pb::Role::ReadOnly as i32)
            .unwrap();
        assert!(ro.allowed_methods.iter().all(|m| !m.ends_with("/StartVm")));
    }
}
