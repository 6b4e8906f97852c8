//! The state machine's users, roles and audit log.

#![allow(clippy::result_large_err)]

use proto::coordinator as pb;
use tonic::Code;

use super::command::*;
use super::machine::{AUDIT_KEPT, PoolState, UserRecord, err};

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

    pub(crate) fn set_role(&mut self, r: &SetRole) -> Result<String, CommandResult> {
        if pb::Role::try_from(r.role).is_err() || r.role == 0 {
            return Err(err(Code::InvalidArgument, "unknown role"));
        }
        let admins = self.admins();
        let u = self
            .users
            .get_mut(&r.user_id)
            .ok_or_else(|| err(Code::NotFound, format!("no user with id {}", r.user_id)))?;
        if r.grant {
            if !u.user.roles.contains(&r.role) {
                u.user.roles.push(r.role);
                u.user.roles.sort_unstable();
            }
        } else {
            if r.role == pb::Role::PoolAdmin as i32 && u.user.roles.contains(&r.role) && admins == 1
            {
                return Err(err(
                    Code::FailedPrecondition,
                    format!("{} is the last pool-admin", u.user.name),
                ));
            }
            u.user.roles.retain(|x| *x != r.role);
        }
        Ok(r.user_id.clone())
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
