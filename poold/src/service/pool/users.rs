//! Users: logging in, creating and deleting users, their roles, and the audit log of
//! what they did.

use proto::coordinator as pb;
use tonic::Status;

use super::PoolHandler;
use super::request::{need, page};
use crate::auth::{self, Caller};
use crate::state::command::*;

/// Checks a user's password and issues a token; a failed login is audited. The one call
/// that needs no token.
pub(super) async fn login(
    svc: &PoolHandler,
    peer: String,
    r: pb::LoginRequest,
) -> Result<pb::LoginResponse, Status> {
    let (user, key) = svc
        .c
        .read(|s| (s.user_by_name(&r.user_name).cloned(), s.token_key.clone()))
        .await?;
    let ok = user
        .as_ref()
        .is_some_and(|u| auth::check_password(&u.password_hash, &r.password));
    let Some(u) = user.filter(|_| ok) else {
        let who = Caller {
            name: r.user_name.clone(),
            level: auth::Level::ReadOnly,
            method: "Login".into(),
            peer,
        };
        let s = Status::unauthenticated("wrong user name or password");
        svc.audit(&who, &s);
        return Err(s);
    };
    let expires = proto::unix_ms() + auth::TOKEN_TTL.as_millis() as u64;
    Ok(pb::LoginResponse {
        token: auth::issue_token(&key, &u.user.id, expires),
        expires_at: Some(proto::timestamp(expires)),
        user: Some(u.user),
    })
}

/// A new user; the password is hashed here, never logged, and a fresh token key comes
/// along (the state machine keeps the first one: see `PoolState::create_user`).
pub(super) async fn create(
    svc: &PoolHandler,
    who: &Caller,
    r: pb::CreateUserRequest,
) -> Result<pb::Task, Status> {
    need("name", &r.name)?;
    if r.password.len() < 8 {
        return Err(Status::invalid_argument(
            "a password needs at least 8 characters",
        ));
    }
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
        password_hash: auth::hash_password(&r.password),
        token_key: rand::random::<[u8; 32]>().to_vec(),
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
