//! Users, roles and tokens: who may call what.
//!
//! - **Passwords** are stored as PBKDF2-HMAC-SHA256 hashes with a random salt
//!   (`pbkdf2-sha256$<iterations>$<salt hex>$<hash hex>`), computed by the member that
//!   takes the request (the state machine only stores them), at least
//!   [`MIN_PASSWORD_LEN`] characters long; the stored credential is that hash, followed
//!   by `$<token stamp hex>` once the user's tokens were revoked ([`with_token_stamp`]).
//!   Hashing and checking run on the blocking pool, a few at a time
//!   ([`check_password_blocking`]): the API runtime may be a single thread that Raft and
//!   every other call share.
//! - **Logins** do the same work whether the user exists or not (an unknown name is
//!   checked against a dummy hash) and fail with one message; failures are throttled per
//!   user name and per source address (`service::pool::users::LoginThrottle`).
//! - **Tokens** are stateless and signed: `v2.<user id>.<expiry ms>.<HMAC-SHA256 hex>`,
//!   with a key derived from the pool's key (in the replicated state, chosen with the
//!   first user) and the user's stored credential, so any member checks any token without
//!   a write, and a new password or a new token stamp ([`with_token_stamp`]) revokes
//!   every token the user had. A token names the user, not the roles: roles are read from
//!   the current state at each call, so a revoked role or a deleted user takes effect at
//!   once. Clients send `authorization: Bearer <token>`.
//! - **Roles** are nested, each one allowing what the one below does and more:
//!   read-only (every Get/List/Watch) < vm-operator (power and console) < vm-admin (VMs,
//!   their VIFs, volumes, templates, snapshots, migration) < pool-operator (hosts, storage
//!   repositories, networks, HA, members, pool settings, audit log) < pool-admin (users
//!   and roles).
//!   ChangePassword and RevokeTokens are open to every user for themselves; acting on
//!   another user needs pool-admin (checked by the call, which knows the target).
//! - **Bootstrap**: a pool with no user is open (every caller acts as pool-admin, named
//!   "anonymous" in the audit log) until the first user — who must be a pool-admin — is
//!   created; `poold --admin-password-file` creates that first user ("admin") when the
//!   pool starts, so a production pool is never open.

use std::sync::LazyLock;
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
/// The fewest characters a new password may have.
pub const MIN_PASSWORD_LEN: usize = 12;
/// The most characters a new password may have (it is hashed on every login).
pub const MAX_PASSWORD_LEN: usize = 1024;

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
    // Which chunks changed, never their data.
    ("ListChangedChunks", Level::ReadOnly, false),
    // Initiator names and sessions only: never a CHAP secret.
    ("ListVolumeExports", Level::ReadOnly, false),
    ("GetVm", Level::ReadOnly, false),
    ("ListVms", Level::ReadOnly, false),
    ("ListVmSnapshots", Level::ReadOnly, false),
    ("ExplainPlacement", Level::ReadOnly, false),
    ("GetNetwork", Level::ReadOnly, false),
    ("ListNetworks", Level::ReadOnly, false),
    ("ListVifs", Level::ReadOnly, false),
    ("GetTemplate", Level::ReadOnly, false),
    ("ListTemplates", Level::ReadOnly, false),
    ("GetHaSettings", Level::ReadOnly, false),
    ("GetTask", Level::ReadOnly, false),
    ("ListTasks", Level::ReadOnly, false),
    ("WatchTask", Level::ReadOnly, false),
    ("WatchEvents", Level::ReadOnly, false),
    ("ListRoles", Level::ReadOnly, false),
    ("QueryMetrics", Level::ReadOnly, false),
    ("ListAlerts", Level::ReadOnly, false),
    ("ListSchedules", Level::ReadOnly, false),
    ("StartVm", Level::VmOperator, true),
    ("ShutdownVm", Level::VmOperator, true),
    ("RebootVm", Level::VmOperator, true),
    ("PauseVm", Level::VmOperator, true),
    ("ResumeVm", Level::VmOperator, true),
    ("SuspendVm", Level::VmOperator, true),
    ("StreamVmConsole", Level::VmOperator, false),
    ("CreateConsoleTicket", Level::VmOperator, false),
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
    ("DeleteVmSnapshot", Level::VmAdmin, true),
    ("CloneVm", Level::VmAdmin, true),
    ("UndoVmChanges", Level::VmAdmin, true),
    ("CreateVif", Level::VmAdmin, true),
    ("UpdateVif", Level::VmAdmin, true),
    ("DestroyVif", Level::VmAdmin, true),
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
    ("CreateNetwork", Level::PoolOperator, true),
    ("DestroyNetwork", Level::PoolOperator, true),
    ("UpdateNetwork", Level::PoolOperator, true),
    ("SetHaSettings", Level::PoolOperator, true),
    // Schedules take and delete snapshots of any VM, and use the pool's storage.
    ("SetSchedule", Level::PoolOperator, true),
    ("DeleteSchedule", Level::PoolOperator, true),
    ("RunSchedule", Level::PoolOperator, true),
    ("ListUsers", Level::PoolOperator, false),
    ("ListAuditEvents", Level::PoolOperator, false),
    ("DismissAlert", Level::PoolOperator, true),
    ("CreateUser", Level::PoolAdmin, true),
    ("DeleteUser", Level::PoolAdmin, true),
    ("GrantRole", Level::PoolAdmin, true),
    ("RevokeRole", Level::PoolAdmin, true),
    ("CreateJoinToken", Level::PoolAdmin, true),
    ("RotateCa", Level::PoolAdmin, true),
    // Daemons ask with their certificate; any user may read what the pool trusts.
    ("GetTrust", Level::ReadOnly, false),
    // Every user for themselves; another user's needs pool-admin (the call checks).
    ("ChangePassword", Level::ReadOnly, true),
    ("RevokeTokens", Level::ReadOnly, true),
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
    /// Also a token whose user was deleted, changed password or had tokens revoked: its
    /// key is gone with the credential it was derived from.
    #[error(
        "the token is not valid for this pool (revoked, its user deleted, or a bad signature or format); log in again"
    )]
    BadToken,
    #[error("the token expired; log in again")]
    Expired,
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
    let u = state
        .users
        .get(token_user(token)?)
        .ok_or(AuthError::BadToken)?;
    verify_token(
        &state.token_key,
        &u.user.id,
        &u.password_hash,
        token,
        now_ms,
    )?;
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

pub(crate) fn hex(b: &[u8]) -> String {
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

/// Whether `password` matches a stored credential (a hash, with or without a token
/// stamp).
pub fn check_password(stored: &str, password: &str) -> bool {
    let parts: Vec<&str> = stored.split('$').collect();
    let (&[scheme, iters, salt, hash] | &[scheme, iters, salt, hash, _]) = &parts[..] else {
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

/// The key that signs one user's tokens: the pool's key bound to the user's stored
/// credential, so replacing the credential (a new password, a new token stamp) revokes
/// every token signed before.
fn user_token_key(pool_key: &[u8], user_id: &str, credential: &str) -> [u8; 32] {
    let msg = format!("poold token key\0{user_id}\0{credential}");
    hmac_sha256(pool_key, msg.as_bytes())
}

/// A credential with its token stamp set to `stamp` (hex, from the proposer's random
/// source): the same password, none of the old tokens. `None` when `stored` is not a
/// credential or `stamp` not a stamp.
pub fn with_token_stamp(stored: &str, stamp: &str) -> Option<String> {
    let parts: Vec<&str> = stored.split('$').collect();
    if !(4..=5).contains(&parts.len()) || parts[0] != "pbkdf2-sha256" {
        return None;
    }
    if stamp.len() < 16 || unhex(stamp).is_none() {
        return None;
    }
    Some(format!("{}${stamp}", parts[..4].join("$")))
}

/// A fresh token stamp.
pub fn new_token_stamp() -> String {
    hex(&rand::random::<[u8; 16]>())
}

/// Whether a string is a credential the state may store.
pub fn is_credential(stored: &str) -> bool {
    with_token_stamp(stored, "00000000000000000000000000000000").is_some()
}

/// Why a new password is refused.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PasswordError {
    #[error("a password needs at least {MIN_PASSWORD_LEN} characters (this one has {len})")]
    TooShort { len: usize },
    #[error("a password may have at most {MAX_PASSWORD_LEN} characters (this one has {len})")]
    TooLong { len: usize },
}

impl From<PasswordError> for Status {
    fn from(e: PasswordError) -> Status {
        Status::invalid_argument(e.to_string())
    }
}

/// Checks a new password (CreateUser, ChangePassword, `poold --admin-password-file`).
pub fn check_new_password(password: &str) -> Result<(), PasswordError> {
    let len = password.chars().count();
    if len < MIN_PASSWORD_LEN {
        return Err(PasswordError::TooShort { len });
    }
    if len > MAX_PASSWORD_LEN {
        return Err(PasswordError::TooLong { len });
    }
    Ok(())
}

/// Checked in place of a stored hash when a login names no user, so that both cases cost
/// the same PBKDF2 run. No password matches it (its hash is all zeros).
static DUMMY: LazyLock<String> = LazyLock::new(|| {
    format!(
        "pbkdf2-sha256${PBKDF2_ITERATIONS}${}${}",
        hex(b"poold-no-user-00"),
        hex(&[0u8; 32])
    )
});

/// Password hashes run at once: all cores but one, which stays for the API runtime, Raft
/// and the other calls, however many logins arrive.
static HASHING: LazyLock<tokio::sync::Semaphore> = LazyLock::new(|| {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    tokio::sync::Semaphore::new(cores.saturating_sub(1).max(1))
});

/// Runs a PBKDF2 job on the blocking pool, after waiting for a turn.
async fn on_hashing_thread<T: Send + 'static>(
    job: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Status> {
    let _turn = HASHING
        .acquire()
        .await
        .map_err(|_| Status::unavailable("this member is shutting down"))?;
    tokio::task::spawn_blocking(job)
        .await
        .map_err(|e| Status::internal(format!("password hashing failed: {e}")))
}

/// [`check_password`] on the blocking pool; a missing user (`stored == None`) is checked
/// against [`DUMMY`] and never matches.
pub async fn check_password_blocking(
    stored: Option<String>,
    password: String,
) -> Result<bool, Status> {
    on_hashing_thread(move || match stored {
        Some(h) => check_password(&h, &password),
        None => {
            check_password(&DUMMY, &password);
            false
        }
    })
    .await
}

/// [`hash_password`] on the blocking pool.
pub async fn hash_password_blocking(password: String) -> Result<String, Status> {
    on_hashing_thread(move || hash_password(&password)).await
}

/// A signed token for a user, valid until `expires_ms`.
pub fn issue_token(pool_key: &[u8], user_id: &str, credential: &str, expires_ms: u64) -> String {
    let body = format!("v2.{user_id}.{expires_ms}");
    let key = user_token_key(pool_key, user_id, credential);
    format!("{body}.{}", hex(&hmac_sha256(&key, body.as_bytes())))
}

/// The user id a token claims, not yet verified (it picks the credential to verify with).
pub fn token_user(token: &str) -> Result<&str, AuthError> {
    let mut parts = token.rsplitn(3, '.');
    let (Some(_sig), Some(_exp), Some(head)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(AuthError::BadToken);
    };
    head.strip_prefix("v2.")
        .filter(|u| !u.is_empty())
        .ok_or(AuthError::BadToken)
}

/// Checks a token of `user_id`, whose stored credential is `credential`: its signature,
/// then its expiry.
pub fn verify_token(
    pool_key: &[u8],
    user_id: &str,
    credential: &str,
    token: &str,
    now_ms: u64,
) -> Result<(), AuthError> {
    if pool_key.is_empty() || token_user(token)? != user_id {
        return Err(AuthError::BadToken);
    }
    let (body, sig) = token.rsplit_once('.').ok_or(AuthError::BadToken)?;
    let sig = unhex(sig).ok_or(AuthError::BadToken)?;
    let key = user_token_key(pool_key, user_id, credential);
    if !same(&hmac_sha256(&key, body.as_bytes()), &sig) {
        return Err(AuthError::BadToken);
    }
    let exp = body.rsplit_once('.').map(|(_, e)| e).unwrap_or_default();
    let exp: u64 = exp.parse().map_err(|_| AuthError::BadToken)?;
    if now_ms >= exp {
        return Err(AuthError::Expired);
    }
    Ok(())
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
                .chain(["Login", "Join"].map(|m| format!("pool.v1.PoolService/{m}")))
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

    const CRED: &str = "pbkdf2-sha256$1000$00$11";

    #[test]
    fn tokens_verify_expire_and_resist_tampering() {
        let key = [7u8; 32];
        let t = issue_token(&key, "u1", CRED, 10_000);
        assert_eq!(token_user(&t), Ok("u1"));
        assert_eq!(verify_token(&key, "u1", CRED, &t, 9_999), Ok(()));
        assert_eq!(
            verify_token(&key, "u1", CRED, &t, 10_000),
            Err(AuthError::Expired)
        );
        assert_eq!(
            verify_token(&[8u8; 32], "u1", CRED, &t, 1),
            Err(AuthError::BadToken),
            "another pool's key"
        );
        let forged = t.replace("v2.u1.", "v2.u2.");
        assert_eq!(
            verify_token(&key, "u2", CRED, &forged, 1),
            Err(AuthError::BadToken)
        );
        assert_eq!(
            verify_token(&key, "u2", CRED, &t, 1),
            Err(AuthError::BadToken),
            "a token checked as another user's"
        );
        let later = t.replace(".10000.", ".99999999.");
        assert_eq!(
            verify_token(&key, "u1", CRED, &later, 1),
            Err(AuthError::BadToken)
        );
        for bad in ["", "v2", "v2..1.ab", "v1.u1.10000.ab", "u1.10000.ab"] {
            assert!(token_user(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_new_credential_or_token_stamp_revokes_old_tokens() {
        let key = [7u8; 32];
        let t = issue_token(&key, "u1", CRED, 10_000);
        let stamped = with_token_stamp(CRED, &new_token_stamp()).unwrap();
        assert_eq!(
            verify_token(&key, "u1", &stamped, &t, 1),
            Err(AuthError::BadToken)
        );
        let t2 = issue_token(&key, "u1", &stamped, 10_000);
        assert_eq!(verify_token(&key, "u1", &stamped, &t2, 1), Ok(()));
        let restamped = with_token_stamp(&stamped, &new_token_stamp()).unwrap();
        assert_eq!(
            verify_token(&key, "u1", &restamped, &t2, 1),
            Err(AuthError::BadToken)
        );
        let other_password = "pbkdf2-sha256$1000$00$22";
        assert_eq!(
            verify_token(&key, "u1", other_password, &t, 1),
            Err(AuthError::BadToken)
        );
    }

    #[test]
    fn a_token_stamp_keeps_the_password_and_is_checked() {
        let h = hash_with("correct horse", b"0123456789abcdef", 1000);
        let stamped = with_token_stamp(&h, "00112233445566778899aabbccddeeff").unwrap();
        assert!(stamped.starts_with(&h));
        assert!(check_password(&stamped, "correct horse"));
        assert!(!check_password(&stamped, "correct horsf"));
        let again = with_token_stamp(&stamped, "ffeeddccbbaa99887766554433221100").unwrap();
        assert_eq!(again.matches('$').count(), 4, "one stamp, replaced");
        assert!(with_token_stamp(&h, "short").is_none());
        assert!(with_token_stamp(&h, "not hex at all!!").is_none());
        assert!(with_token_stamp("plain", "00112233445566778899").is_none());
        assert!(is_credential(&h) && is_credential(&stamped) && !is_credential("x$y"));
    }

    #[test]
    fn new_passwords_have_a_minimum_and_a_maximum_length() {
        let short = "a".repeat(MIN_PASSWORD_LEN - 1);
        assert_eq!(
            check_new_password(&short),
            Err(PasswordError::TooShort {
                len: MIN_PASSWORD_LEN - 1
            })
        );
        // Characters, not bytes: eleven two-byte characters are still too short.
        assert!(check_new_password(&"é".repeat(MIN_PASSWORD_LEN - 1)).is_err());
        assert!(check_new_password(&"a".repeat(MIN_PASSWORD_LEN)).is_ok());
        assert!(check_new_password(&"a".repeat(MAX_PASSWORD_LEN + 1)).is_err());
        let s = Status::from(check_new_password("pw").unwrap_err());
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
        assert!(s.message().contains("at least 12 characters"), "{s:?}");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn checking_runs_off_the_runtime_thread_and_a_missing_user_never_matches() {
        let h = hash_with("correct horse", b"0123456789abcdef", 1000);
        // On a current-thread runtime, a ticker keeps running while a check is under
        // way only if the check is not on this thread.
        let ticks = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let t = ticks.clone();
        let ticker = tokio::spawn(async move {
            loop {
                t.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        });
        let mut checks = Vec::new();
        for _ in 0..4 {
            checks.push(check_password_blocking(None, "correct horse".into()).await);
        }
        ticker.abort();
        assert!(checks.iter().all(|c| matches!(c, Ok(false))));
        assert!(
            ticks.load(std::sync::atomic::Ordering::Relaxed) > 4,
            "the runtime thread ran while passwords were checked"
        );
        assert!(
            check_password_blocking(Some(h.clone()), "correct horse".into())
                .await
                .unwrap()
        );
        assert!(
            !check_password_blocking(Some(h), "wrong".into())
                .await
                .unwrap()
        );
        let fresh = hash_password_blocking("correct horse".into())
            .await
            .unwrap();
        assert!(check_password(&fresh, "correct horse"));
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
                    password_hash: CRED.into(),
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
                issue_token(&s.token_key, &format!("id-{user}"), CRED, 100)
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
        let gone = format!(
            "Bearer {}",
            issue_token(&s.token_key, "id-ghost", CRED, 100)
        );
        assert_eq!(
            authorize(&s, Some(&gone), "ListVms", "", 1),
            Err(AuthError::BadToken)
        );
        // Every user may reach ChangePassword and RevokeTokens (for themselves).
        let ro = format!("Bearer {}", issue_token(&s.token_key, "id-ro", CRED, 100));
        for m in ["ChangePassword", "RevokeTokens"] {
            assert!(authorize(&s, Some(&ro), m, "", 1).is_ok(), "{m}");
            assert!(rule(m).1, "{m} is audited");
        }
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
        // Login and Join need no user token.
        assert_eq!(admin.allowed_methods.len(), METHODS.len() + 2);
        let ro = roles
            .iter()
            .find(|r| r.role == pb::Role::ReadOnly as i32)
            .unwrap();
        assert!(ro.allowed_methods.iter().all(|m| !m.ends_with("/StartVm")));
    }
}
