//! The state machine's users (roles, passwords, token revocation) and audit log.

#![allow(clippy::result_large_err)]

use proto::coordinator as pb;
use tonic::Code;

use super::command::*;
use super::machine::{AUDIT_KEPT, PoolState, UserRecord, err};
use crate::auth;

impl PoolState {
    pub fn user_by_name(&self, name: &str) -> Option<&UserRecord> {
        self.users.values().find(|u| u.user.name == name)
    }

    fn admins(&self) -> usize {
        self.users
            .values()
            .filter(|u| u.user.roles.contains(&(pb::Role::PoolAdmin as i32)))
            .count()
    }

    pub(crate) fn create_user(
        &mut self,
        c: &CreateUser,
        at_ms: u64,
    ) -> Result<String, CommandResult> {
        let mut user = c
            .user
            .clone()
            .ok_or_else(|| err(Code::InvalidArgument, "no user given"))?;
        if user.id.is_empty() || user.name.is_empty() {
            return Err(err(Code::InvalidArgument, "a user needs a name"));
        }
        if c.password_hash.is_empty() {
            return Err(err(Code::InvalidArgument, "a user needs a password"));
        }
        if let Some(o) = self.user_by_name(&user.name) {
            return Err(err(
                Code::AlreadyExists,
                format!("user {:?} exists (id {})", user.name, o.user.id),
            ));
        }
        if user
            .roles
            .iter()
            .any(|r| pb::Role::try_from(*r).is_err() || *r == 0)
        {
            return Err(err(Code::InvalidArgument, "unknown role"));
        }
        if self.users.is_empty() && !user.roles.contains(&(pb::Role::PoolAdmin as i32)) {
            return Err(err(
                Code::FailedPrecondition,
                "the first user must be a pool-admin (else nobody could manage users)",
            ));
        }
        if self.token_key.is_empty() {
            if c.token_key.len() < 32 {
                return Err(err(Code::InvalidArgument, "token key too short"));
            }
            self.token_key = c.token_key.clone();
        }
        user.roles.sort_unstable();
        user.roles.dedup();
        user.created_at = Some(proto::timestamp(at_ms));
        let id = user.id.clone();
        self.users.insert(
            id.clone(),
            UserRecord {
                user,
                password_hash: c.password_hash.clone(),
            },
        );
        Ok(id)
    }

    pub(crate) fn delete_user(&mut self, id: &str) -> Result<String, CommandResult> {
        let u = self
            .users
            .get(id)
            .ok_or_else(|| err(Code::NotFound, format!("no user with id {id}")))?;
        if u.user.roles.contains(&(pb::Role::PoolAdmin as i32)) && self.admins() == 1 {
            return Err(err(
                Code::FailedPrecondition,
                format!("{} is the last pool-admin; make another first", u.user.name),
            ));
        }
        self.users.remove(id);
        Ok(id.to_owned())
    }

    /// Applies a change to one user: a role, a password, or its tokens revoked.
    pub(crate) fn set_role(&mut self, r: &SetRole) -> Result<String, CommandResult> {
        match r.change() {
            UserChange::Role { role, grant } => self.change_role(&r.user_id, role, grant),
            UserChange::Password {
                credential,
                if_credential,
            } => self.set_password(&r.user_id, credential, if_credential),
            UserChange::RevokeTokens { stamp } => self.revoke_tokens(&r.user_id, stamp),
        }
    }

    fn user_mut(&mut self, id: &str) -> Result<&mut UserRecord, CommandResult> {
        self.users
            .get_mut(id)
            .ok_or_else(|| err(Code::NotFound, format!("no user with id {id}")))
    }

    fn change_role(&mut self, id: &str, role: i32, grant: bool) -> Result<String, CommandResult> {
        if pb::Role::try_from(role).is_err() || role == 0 {
            return Err(err(Code::InvalidArgument, "unknown role"));
        }
        let admins = self.admins();
        let u = self.user_mut(id)?;
        if grant {
            if !u.user.roles.contains(&role) {
                u.user.roles.push(role);
                u.user.roles.sort_unstable();
            }
        } else {
            if role == pb::Role::PoolAdmin as i32 && u.user.roles.contains(&role) && admins == 1 {
                return Err(err(
                    Code::FailedPrecondition,
                    format!("{} is the last pool-admin", u.user.name),
                ));
            }
            u.user.roles.retain(|x| *x != role);
        }
        Ok(id.to_owned())
    }

    /// A new credential, if the stored one is still `if_credential` (when given): the
    /// proposer checked the old password, or the caller's right, against that one.
    fn set_password(
        &mut self,
        id: &str,
        credential: &str,
        if_credential: &str,
    ) -> Result<String, CommandResult> {
        if !auth::is_credential(credential) {
            return Err(err(Code::InvalidArgument, "not a password hash"));
        }
        let u = self.user_mut(id)?;
        if !if_credential.is_empty() && u.password_hash != if_credential {
            return Err(err(
                Code::Aborted,
                format!(
                    "the password of {} changed meanwhile; check again and retry",
                    u.user.name
                ),
            ));
        }
        u.password_hash = credential.to_owned();
        Ok(id.to_owned())
    }

    /// A new token stamp: every token the user had stops verifying; the password stays.
    fn revoke_tokens(&mut self, id: &str, stamp: &str) -> Result<String, CommandResult> {
        let u = self.user_mut(id)?;
        u.password_hash = auth::with_token_stamp(&u.password_hash, stamp)
            .ok_or_else(|| err(Code::InvalidArgument, "not a token stamp (16+ hex digits)"))?;
        Ok(id.to_owned())
    }

    /// Appends an event; its id is the next sequence number (16 hex digits).
    pub(crate) fn push_audit(&mut self, mut e: pb::AuditEvent) {
        let next = self
            .audit
            .back()
            .and_then(|l| u64::from_str_radix(&l.id, 16).ok())
            .map_or(1, |n| n + 1);
        e.id = format!("{next:016x}");
        self.audit.push_back(e);
        while self.audit.len() > AUDIT_KEPT {
            self.audit.pop_front();
        }
    }

    /// An event the services record themselves (a call refused before the log, a
    /// membership change), stamped with the time of the command that carries it.
    pub(super) fn audit_event(&mut self, e: &pb::AuditEvent, at_ms: u64) {
        let mut e = e.clone();
        e.at = Some(proto::timestamp(at_ms));
        self.push_audit(e);
    }

    /// The audit record of an applied command that a person asked for.
    pub(crate) fn record_audit(&mut self, cmd: &Command, result: &CommandResult) {
        let task = result.task.as_ref();
        let e = pb::AuditEvent {
            id: String::new(),
            at: Some(proto::timestamp(cmd.at_ms)),
            user_name: cmd.requested_by.clone(),
            method: cmd.method.clone(),
            target_id: task.map(|t| t.target_id.clone()).unwrap_or_default(),
            result: if result.code == 0 {
                "OK".into()
            } else {
                format!("{:?}", Code::from(result.code))
            },
            detail: result.message.clone(),
            task_id: task.map(|t| t.id.clone()).unwrap_or_default(),
            peer_address: cmd.peer.clone(),
        };
        self.push_audit(e);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(request_id: &str, op: Op) -> Command {
        Command {
            request_id: request_id.into(),
            at_ms: 1_000,
            task_id: format!("task-{request_id}"),
            requested_by: "admin".into(),
            method: "ChangePassword".into(),
            peer: String::new(),
            op: Some(op),
        }
    }

    /// A pool with one pool-admin, "ann", whose password is "old password!".
    fn pool() -> (PoolState, String) {
        let mut s = PoolState::default();
        let hash = auth::hash_password("old password!");
        let r = s.apply(
            1,
            &cmd(
                "create",
                Op::CreateUser(CreateUser {
                    user: Some(pb::User {
                        id: "u-ann".into(),
                        name: "ann".into(),
                        roles: vec![pb::Role::PoolAdmin as i32],
                        created_at: None,
                    }),
                    password_hash: hash.clone(),
                    token_key: vec![9; 32],
                }),
            ),
        );
        assert_eq!(r.code, 0, "{r:?}");
        (s, hash)
    }

    fn change(user_id: &str, credential: &str, if_credential: &str) -> Op {
        Op::SetRole(SetRole {
            user_id: user_id.into(),
            credential: credential.into(),
            if_credential: if_credential.into(),
            ..Default::default()
        })
    }

    #[test]
    fn a_password_change_replaces_the_credential_and_revokes_tokens() {
        let (mut s, old) = pool();
        let token = auth::issue_token(&s.token_key, "u-ann", &old, u64::MAX);
        let new = auth::hash_password("new password!");
        let r = s.apply(2, &cmd("pw", change("u-ann", &new, &old)));
        assert_eq!(r.code, 0, "{r:?}");
        assert_eq!(r.task.unwrap().kind, "user.set_password");
        let u = &s.users["u-ann"];
        assert!(auth::check_password(&u.password_hash, "new password!"));
        assert!(!auth::check_password(&u.password_hash, "old password!"));
        assert_eq!(
            auth::verify_token(&s.token_key, "u-ann", &u.password_hash, &token, 1),
            Err(auth::AuthError::BadToken)
        );
        let e = s.audit.back().unwrap();
        assert_eq!(
            (e.method.as_str(), e.result.as_str()),
            ("ChangePassword", "OK")
        );
        assert!(!e.detail.contains(&new), "the hash is not in the audit log");
    }

    #[test]
    fn a_password_change_checked_against_a_stale_credential_is_aborted() {
        let (mut s, old) = pool();
        let first = auth::hash_password("first change!");
        assert_eq!(s.apply(2, &cmd("a", change("u-ann", &first, &old))).code, 0);
        let second = auth::hash_password("second change");
        let r = s.apply(3, &cmd("b", change("u-ann", &second, &old)));
        assert_eq!(r.code, tonic::Code::Aborted as i32, "{r:?}");
        assert_eq!(s.users["u-ann"].password_hash, first, "nothing changed");
        // Aborted is retryable: the request id is not spent.
        assert!(s.lookup_request("b", "user.set_password").is_none());
    }

    #[test]
    fn bad_changes_are_refused_and_change_nothing() {
        let (mut s, old) = pool();
        let before = s.users.clone();
        let cases = [
            (
                change("u-ann", "plaintext", ""),
                tonic::Code::InvalidArgument,
            ),
            (change("u-nobody", &old, ""), tonic::Code::NotFound),
            (
                Op::SetRole(SetRole {
                    user_id: "u-ann".into(),
                    token_stamp: "not hex".into(),
                    ..Default::default()
                }),
                tonic::Code::InvalidArgument,
            ),
        ];
        for (i, (op, code)) in cases.into_iter().enumerate() {
            let r = s.apply(2 + i as u64, &cmd(&format!("bad{i}"), op));
            assert_eq!(r.code, code as i32, "case {i}: {r:?}");
        }
        assert_eq!(s.users, before);
    }

    #[test]
    fn revoking_tokens_keeps_the_password_and_each_revocation_counts() {
        let (mut s, old) = pool();
        let t1 = auth::issue_token(&s.token_key, "u-ann", &old, u64::MAX);
        let revoke = |stamp: &str| {
            Op::SetRole(SetRole {
                user_id: "u-ann".into(),
                token_stamp: stamp.into(),
                ..Default::default()
            })
        };
        let r = s.apply(2, &cmd("r1", revoke("00112233445566778899aabbccddeeff")));
        assert_eq!(r.task.unwrap().kind, "user.revoke_tokens");
        let cred = s.users["u-ann"].password_hash.clone();
        assert!(auth::check_password(&cred, "old password!"));
        assert!(auth::verify_token(&s.token_key, "u-ann", &cred, &t1, 1).is_err());
        let t2 = auth::issue_token(&s.token_key, "u-ann", &cred, u64::MAX);
        assert!(auth::verify_token(&s.token_key, "u-ann", &cred, &t2, 1).is_ok());
        s.apply(3, &cmd("r2", revoke("ffeeddccbbaa99887766554433221100")));
        let cred = &s.users["u-ann"].password_hash;
        assert!(auth::verify_token(&s.token_key, "u-ann", cred, &t2, 1).is_err());
    }

    #[test]
    fn role_changes_still_work_and_keep_the_last_admin() {
        let (mut s, _) = pool();
        let role = |grant| {
            Op::SetRole(SetRole {
                user_id: "u-ann".into(),
                role: pb::Role::PoolAdmin as i32,
                grant,
                ..Default::default()
            })
        };
        let r = s.apply(2, &cmd("g", role(false)));
        assert_eq!(r.code, tonic::Code::FailedPrecondition as i32);
        let r = s.apply(3, &cmd("v", role(true)));
        assert_eq!(r.task.unwrap().kind, "user.grant_role");
    }
}
