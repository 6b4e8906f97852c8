//! Users: logging in (with its throttle), creating and deleting users, their roles,
//! passwords and tokens, and the audit log of what they did.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use proto::coordinator as pb;
use sha2::{Digest, Sha256};
use tonic::Status;

use super::PoolHandler;
use super::request::{need, page};
use crate::auth::{self, Caller, Level};
use crate::state::command::*;
use crate::state::machine::UserRecord;

/// Checks a user's password and issues a token. The one call that needs no token, so the
/// one an attacker can repeat at will: refused while its name or address is throttled,
/// the same work and the same answer for an unknown name as for a wrong password, and the
/// hashing off the runtime thread. Failures and the first throttled refusal of a window
/// are audited (not every refusal of a flood: each audit event is a Raft write).
pub(super) async fn login(
    svc: &PoolHandler,
    peer: String,
    r: pb::LoginRequest,
) -> Result<pb::LoginResponse, Status> {
    let source = source_ip(&peer);
    let who = Caller {
        name: r.user_name.clone(),
        level: Level::ReadOnly,
        method: "Login".into(),
        peer,
    };
    if let Err(t) = begin_attempt(&r.user_name, source) {
        let s = t.status();
        refused(svc, &who, &s, t.first);
        return Err(s);
    }
    let read = svc
        .c
        .read(|s| (s.user_by_name(&r.user_name).cloned(), s.token_key.clone()))
        .await;
    let (user, key) = read.inspect_err(|_| throttle().undo(&r.user_name, source))?;
    let stored = user.as_ref().map(|u| u.password_hash.clone());
    let ok = auth::check_password_blocking(stored, r.password).await?;
    let Some(u) = user.filter(|_| ok) else {
        let s = Status::unauthenticated("wrong user name or password");
        refused(svc, &who, &s, true);
        return Err(s);
    };
    throttle().succeeded(&r.user_name, source);
    let expires = proto::unix_ms() + auth::TOKEN_TTL.as_millis() as u64;
    Ok(pb::LoginResponse {
        token: auth::issue_token(&key, &u.user.id, &u.password_hash, expires),
        expires_at: Some(proto::timestamp(expires)),
        user: Some(u.user),
    })
}

/// A refused login: audited when `audit` (else only logged: a flood of refusals that
/// the throttle answered is one audit event per window, not one per attempt).
fn refused(svc: &PoolHandler, who: &Caller, s: &Status, audit: bool) {
    if audit {
        svc.audit(who, s);
    } else {
        tracing::debug!(user = %who.name, peer = %who.peer, "login refused: throttled");
    }
}

/// The address a call came from (the throttle's per-source key).
fn source_ip(peer: &str) -> Option<IpAddr> {
    peer.parse::<SocketAddr>().ok().map(|a| a.ip())
}

fn begin_attempt(user: &str, source: Option<IpAddr>) -> Result<(), Throttled> {
    throttle().begin(user, source, Instant::now())
}

/// A new user; the password is hashed here, never logged, and a fresh token key comes
/// along (the state machine keeps the first one: see `PoolState::create_user`).
pub(super) async fn create(
    svc: &PoolHandler,
    who: &Caller,
    r: pb::CreateUserRequest,
) -> Result<pb::Task, Status> {
    need("name", &r.name)?;
    auth::check_new_password(&r.password)?;
    if let Some(prev) = svc
        .c
        .read(|s| s.lookup_request(&r.request_id, "user.create"))
        .await?
    {
        return prev.into_status();
    }
    let op = Op::CreateUser(CreateUser {
        user: Some(pb::User {
            id: uuid::Uuid::new_v4().to_string(),
            name: r.name,
            roles: r.roles,
            created_at: None,
        }),
        password_hash: auth::hash_password_blocking(r.password).await?,
        token_key: rand::random::<[u8; 32]>().to_vec(),
    });
    svc.c.write(who, &r.request_id, op).await
}

/// The user a ChangePassword or RevokeTokens acts on: `user_id`, or the caller when it
/// is empty; someone else only for a pool-admin.
async fn target(svc: &PoolHandler, who: &Caller, user_id: &str) -> Result<UserRecord, Status> {
    let (id, name) = (user_id.to_owned(), who.name.clone());
    let found = svc
        .c
        .read(move |s| {
            if id.is_empty() {
                s.user_by_name(&name).cloned()
            } else {
                s.users.get(&id).cloned()
            }
        })
        .await?;
    let u = found.ok_or_else(|| {
        if user_id.is_empty() {
            Status::failed_precondition(
                "the caller is no user of this pool (an open pool): name the user by id",
            )
        } else {
            Status::not_found(format!("no user with id {user_id}"))
        }
    })?;
    if u.user.name != who.name && who.level < Level::PoolAdmin {
        return Err(Status::permission_denied(format!(
            "user {:?} may not {} another user: that needs role pool-admin",
            who.name, who.method
        )));
    }
    Ok(u)
}

/// A new password: one's own with the old one (throttled like a login: a stolen token
/// must not become a password oracle), anyone's for a pool-admin. The new credential
/// revokes the user's tokens; it is committed only if the stored one is still the one
/// checked here.
pub(super) async fn change_password(
    svc: &PoolHandler,
    who: &Caller,
    r: pb::ChangePasswordRequest,
) -> Result<pb::Task, Status> {
    auth::check_new_password(&r.new_password)?;
    if let Some(prev) = svc
        .c
        .read(|s| s.lookup_request(&r.request_id, "user.set_password"))
        .await?
    {
        return prev.into_status();
    }
    let u = target(svc, who, &r.user_id).await?;
    if u.user.name == who.name {
        if r.old_password.is_empty() {
            return Err(Status::invalid_argument(
                "old_password is required to change one's own password",
            ));
        }
        let source = source_ip(&who.peer);
        begin_attempt(&who.name, source).map_err(|t| t.status())?;
        let stored = Some(u.password_hash.clone());
        if !auth::check_password_blocking(stored, r.old_password).await? {
            return Err(Status::permission_denied("the old password is wrong"));
        }
        throttle().succeeded(&who.name, source);
    }
    let op = Op::SetRole(SetRole {
        user_id: u.user.id,
        credential: auth::hash_password_blocking(r.new_password).await?,
        if_credential: u.password_hash,
        ..Default::default()
    });
    svc.c.write(who, &r.request_id, op).await
}

/// Revokes every token of a user (one's own, or anyone's for a pool-admin): a new token
/// stamp in the stored credential, which the old tokens' key was derived from.
pub(super) async fn revoke_tokens(
    svc: &PoolHandler,
    who: &Caller,
    r: pb::RevokeTokensRequest,
) -> Result<pb::Task, Status> {
    let u = target(svc, who, &r.user_id).await?;
    let op = Op::SetRole(SetRole {
        user_id: u.user.id,
        token_stamp: auth::new_token_stamp(),
        ..Default::default()
    });
    svc.c.write(who, &r.request_id, op).await
}

pub(super) async fn list(
    svc: &PoolHandler,
    r: pb::ListUsersRequest,
) -> Result<pb::ListUsersResponse, Status> {
    let (users, next) = svc
        .c
        .read(|s| {
            page(
                s.users.iter().map(|(k, v)| (k.clone(), v.user.clone())),
                r.page.as_ref(),
            )
        })
        .await?;
    Ok(pb::ListUsersResponse {
        users,
        next_page_token: next,
    })
}

pub(super) async fn delete(
    svc: &PoolHandler,
    who: &Caller,
    r: pb::DeleteUserRequest,
) -> Result<pb::Task, Status> {
    svc.c
        .write(
            who,
            &r.request_id,
            Op::DeleteUser(ObjectId { id: r.user_id }),
        )
        .await
}

/// Grants (`grant`) or revokes a role.
pub(super) async fn set_role(
    svc: &PoolHandler,
    who: &Caller,
    request_id: &str,
    user_id: String,
    role: i32,
    grant: bool,
) -> Result<pb::Task, Status> {
    let op = Op::SetRole(SetRole {
        user_id,
        role,
        grant,
        ..Default::default()
    });
    svc.c.write(who, request_id, op).await
}

pub(super) fn roles() -> pb::ListRolesResponse {
    pb::ListRolesResponse {
        roles: auth::describe_roles(),
    }
}

/// The audit log, oldest first, by user and from a time on.
pub(super) async fn audit_events(
    svc: &PoolHandler,
    r: pb::ListAuditEventsRequest,
) -> Result<pb::ListAuditEventsResponse, Status> {
    let since = r.since.map_or(i64::MIN, |t| t.seconds);
    let (events, next) = svc
        .c
        .read(|s| {
            // Event ids are sequence numbers in fixed-width hex, so they order as the
            // events do and serve as page tokens.
            page(
                s.audit
                    .iter()
                    .filter(|e| r.user_name.is_empty() || e.user_name == r.user_name)
                    .filter(|e| e.at.as_ref().map_or(i64::MIN, |t| t.seconds) >= since)
                    .map(|e| (e.id.clone(), e.clone())),
                r.page.as_ref(),
            )
        })
        .await?;
    Ok(pb::ListAuditEventsResponse {
        events,
        next_page_token: next,
    })
}

/// Failed logins a user name or a source address may have in a window (the default).
pub const LOGIN_FAILURES: u32 = 5;
/// How long a run of failures counts (the default).
pub const LOGIN_WINDOW: Duration = Duration::from_secs(300);
/// Names and addresses the throttle remembers at most; the oldest go first.
pub const THROTTLE_ENTRIES: usize = 10_000;

/// What a throttle entry counts failures of: a user name (its SHA-256, so a long name
/// costs no more memory than a short one) or a source address (IPv6 by its /64, which
/// one client usually holds whole).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum ThrottleKey {
    User([u8; 32]),
    Source(IpAddr),
}

fn source_key(ip: IpAddr) -> ThrottleKey {
    ThrottleKey::Source(match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        },
        v4 => v4,
    })
}

#[derive(Debug, Clone, Copy)]
struct Strikes {
    /// The first failure of the window.
    since: Instant,
    count: u32,
    /// Whether a refusal in this window was already reported (the audit log gets the
    /// first, not every one of a flood).
    reported: bool,
}

/// A login refused before its password is checked.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Throttled {
    pub retry_after: Duration,
    /// Refused for the user name (else for the source address).
    pub user: bool,
    /// The first refusal of this window for that name or address.
    pub first: bool,
}

impl Throttled {
    pub fn status(&self) -> Status {
        let what = if self.user {
            "for this user name"
        } else {
            "from this address"
        };
        Status::resource_exhausted(format!(
            "too many failed logins {what}; retry after {} s",
            self.retry_after.as_secs().max(1)
        ))
    }
}

/// Failed logins per user name and per source address: after `limit` failures within
/// `window`, further attempts of that name or from that address are refused until the
/// window that the first failure opened has passed.
///
/// Kept in the memory of the member that serves the call, not replicated: a failure
/// costs no Raft write, and a client that spreads its guesses over the members gets at
/// most `limit` per member per window.
#[derive(Debug)]
pub struct LoginThrottle {
    limit: u32,
    window: Duration,
    cap: usize,
    strikes: HashMap<ThrottleKey, Strikes>,
}

impl LoginThrottle {
    pub fn new(limit: u32, window: Duration, cap: usize) -> LoginThrottle {
        LoginThrottle {
            limit: limit.max(1),
            window,
            cap: cap.max(2),
            strikes: HashMap::new(),
        }
    }

    /// The defaults, or `POOLD_LOGIN_FAILURES` and `POOLD_LOGIN_WINDOW_MS` when set.
    pub fn from_env() -> LoginThrottle {
        fn var<T: std::str::FromStr>(name: &str) -> Option<T> {
            let v = std::env::var(name).ok()?;
            let parsed = v.parse().ok();
            if parsed.is_none() {
                tracing::warn!(name, value = %v, "not a number; the default applies");
            }
            parsed
        }
        LoginThrottle::new(
            var("POOLD_LOGIN_FAILURES").unwrap_or(LOGIN_FAILURES),
            var("POOLD_LOGIN_WINDOW_MS").map_or(LOGIN_WINDOW, Duration::from_millis),
            THROTTLE_ENTRIES,
        )
    }

    fn keys(user: &str, source: Option<IpAddr>) -> impl Iterator<Item = ThrottleKey> {
        let user = ThrottleKey::User(Sha256::digest(user.as_bytes()).into());
        std::iter::once(user).chain(source.map(source_key))
    }

    /// Counts an attempt as a failure until [`LoginThrottle::succeeded`] says otherwise
    /// (so concurrent guesses cannot all pass before the first fails), or refuses it.
    pub fn begin(
        &mut self,
        user: &str,
        source: Option<IpAddr>,
        now: Instant,
    ) -> Result<(), Throttled> {
        let keys: Vec<ThrottleKey> = Self::keys(user, source).collect();
        for k in &keys {
            let Some(s) = self.strikes.get_mut(k) else {
                continue;
            };
            let end = s.since + self.window;
            if now >= end {
                self.strikes.remove(k);
            } else if s.count >= self.limit {
                let first = !s.reported;
                s.reported = true;
                return Err(Throttled {
                    retry_after: end - now,
                    user: matches!(k, ThrottleKey::User(_)),
                    first,
                });
            }
        }
        for k in keys {
            if !self.strikes.contains_key(&k) {
                self.make_room(now);
            }
            let s = self.strikes.entry(k).or_insert(Strikes {
                since: now,
                count: 0,
                reported: false,
            });
            s.count += 1;
        }
        Ok(())
    }

    /// A right password: the user's failures are forgotten and the address's attempt
    /// does not count.
    pub fn succeeded(&mut self, user: &str, source: Option<IpAddr>) {
        for k in Self::keys(user, source) {
            match k {
                ThrottleKey::User(_) => {
                    self.strikes.remove(&k);
                }
                ThrottleKey::Source(_) => {
                    if let Some(s) = self.strikes.get_mut(&k) {
                        s.count = s.count.saturating_sub(1);
                    }
                }
            }
        }
    }

    /// An attempt that checked no password (the state could not be read): not a failure.
    pub fn undo(&mut self, user: &str, source: Option<IpAddr>) {
        for k in Self::keys(user, source) {
            if let Some(s) = self.strikes.get_mut(&k) {
                s.count = s.count.saturating_sub(1);
            }
        }
    }

    /// Frees a place for a new entry: the expired ones, else the oldest.
    fn make_room(&mut self, now: Instant) {
        if self.strikes.len() < self.cap {
            return;
        }
        let window = self.window;
        self.strikes.retain(|_, s| now < s.since + window);
        if self.strikes.len() >= self.cap
            && let Some(oldest) = self
                .strikes
                .iter()
                .min_by_key(|(_, s)| s.since)
                .map(|(k, _)| k.clone())
        {
            self.strikes.remove(&oldest);
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.strikes.len()
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.strikes.is_empty()
    }
}

/// This member's throttle (one per process: a poold process is one member).
fn throttle() -> std::sync::MutexGuard<'static, LoginThrottle> {
    static T: OnceLock<Mutex<LoginThrottle>> = OnceLock::new();
    T.get_or_init(|| Mutex::new(LoginThrottle::from_env()))
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_secs(60);

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn a_user_is_refused_after_the_limit_until_the_window_passes() {
        let mut t = LoginThrottle::new(3, WINDOW, 100);
        let t0 = Instant::now();
        for i in 0..3 {
            let src = ip(&format!("10.0.0.{i}"));
            assert!(t.begin("ann", src, t0).is_ok(), "attempt {i}");
        }
        let r = t.begin("ann", ip("10.0.0.9"), t0 + Duration::from_secs(10));
        let r = r.unwrap_err();
        assert!(r.user && r.first);
        assert_eq!(r.retry_after, Duration::from_secs(50));
        let s = r.status();
        assert_eq!(s.code(), tonic::Code::ResourceExhausted);
        assert!(s.message().contains("retry after 50 s"), "{s:?}");
        let again = t.begin("ann", ip("10.0.0.9"), t0 + Duration::from_secs(11));
        assert!(!again.unwrap_err().first, "one report per window");
        assert!(
            t.begin("bob", ip("10.0.0.8"), t0).is_ok(),
            "others unaffected"
        );
        assert!(t.begin("ann", ip("10.0.0.9"), t0 + WINDOW).is_ok());
    }

    #[test]
    fn a_source_is_refused_whatever_names_it_tries() {
        let mut t = LoginThrottle::new(3, WINDOW, 100);
        let now = Instant::now();
        for name in ["a", "b", "c"] {
            assert!(t.begin(name, ip("192.0.2.7"), now).is_ok());
        }
        let r = t.begin("d", ip("192.0.2.7"), now).unwrap_err();
        assert!(!r.user);
        assert!(r.status().message().contains("from this address"));
        // One IPv6 client holds its whole /64.
        for i in 0..3 {
            let src = ip(&format!("2001:db8:1:2::{i}"));
            assert!(t.begin(&format!("v6-{i}"), src, now).is_ok());
        }
        assert!(t.begin("v6-x", ip("2001:db8:1:2:ffff::1"), now).is_err());
        assert!(t.begin("v6-y", ip("2001:db8:1:3::1"), now).is_ok());
    }

    #[test]
    fn success_resets_the_user_and_does_not_count_against_the_source() {
        let mut t = LoginThrottle::new(2, WINDOW, 100);
        let now = Instant::now();
        let src = ip("10.1.1.1");
        assert!(t.begin("ann", src, now).is_ok());
        assert!(t.begin("ann", src, now).is_ok());
        t.succeeded("ann", src);
        // The user's slate is clean; the address kept one failure.
        assert!(t.begin("ann", ip("10.1.1.2"), now).is_ok());
        assert!(t.begin("ann", ip("10.1.1.2"), now).is_ok());
        assert!(t.begin("ann", ip("10.1.1.2"), now).is_err());
        assert!(t.begin("bob", src, now).is_ok());
        assert!(t.begin("carl", src, now).is_err(), "the address's second");
        // An attempt that checked nothing (no quorum to read the user) is no failure.
        t.undo("dan", ip("10.1.1.3"));
        assert!(t.begin("dan", ip("10.1.1.3"), now).is_ok());
        t.undo("dan", ip("10.1.1.3"));
        assert!(t.begin("dan", ip("10.1.1.3"), now).is_ok());
        assert!(t.begin("dan", ip("10.1.1.3"), now).is_ok());
        assert!(t.begin("dan", ip("10.1.1.3"), now).is_err());
    }

    #[test]
    fn concurrent_guesses_count_before_their_answers() {
        let mut t = LoginThrottle::new(5, WINDOW, 100);
        let now = Instant::now();
        let passed = (0..50)
            .filter(|_| t.begin("ann", ip("10.2.2.2"), now).is_ok())
            .count();
        assert_eq!(passed, 5);
    }

    #[test]
    fn memory_is_bounded_and_the_oldest_go_first() {
        let mut t = LoginThrottle::new(1, WINDOW, 10);
        let t0 = Instant::now();
        assert!(t.begin("victim", None, t0).is_ok());
        assert!(t.begin("victim", None, t0).is_err());
        for i in 0..100 {
            let at = t0 + Duration::from_millis(i + 1);
            let _ = t.begin(&format!("spray-{i}"), None, at);
            assert!(t.len() <= 10, "{} entries", t.len());
        }
        assert!(!t.is_empty());
        assert!(
            t.begin("victim", None, t0 + Duration::from_millis(200))
                .is_ok()
        );
        // Expired entries go before live ones.
        let mut t = LoginThrottle::new(1, Duration::from_secs(1), 3);
        let _ = t.begin("old", None, t0);
        let _ = t.begin("live-1", None, t0 + Duration::from_secs(2));
        let _ = t.begin("live-2", None, t0 + Duration::from_secs(2));
        let _ = t.begin("new", None, t0 + Duration::from_secs(2));
        assert!(
            t.begin("live-1", None, t0 + Duration::from_secs(2))
                .is_err()
        );
    }

    #[test]
    fn the_source_is_the_peer_address_ip() {
        assert_eq!(source_ip("10.0.0.1:5000"), ip("10.0.0.1"));
        assert_eq!(source_ip("[2001:db8::1]:443"), ip("2001:db8::1"));
        assert_eq!(source_ip(""), None);
    }
}
