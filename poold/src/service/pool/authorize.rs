//! Who may make a call, and the audit log entries of calls answered without a command
//! of their own: a refusal before the log, a membership or leadership change, volume
//! access.

use pool_trust::Identity;
use proto::coordinator as pb;
use tonic::{Request, Response, Status};

use super::PoolHandler;
use crate::auth::{self, Caller};
use crate::coordinator::AUDITED;
use crate::state::command::Op;

impl PoolHandler {
    /// Authorizes a call to `method`: the caller, or the refusal (logged; audited when the
    /// method changes the pool).
    pub(super) fn authorize<T>(&self, r: &Request<T>, method: &str) -> Result<Caller, Status> {
        let header = header_of(r);
        let peer = peer_of(r);
        let decided = auth::authorize(
            &self.c.node.state(),
            header.as_deref(),
            method,
            &peer,
            proto::unix_ms(),
        );
        decided.map_err(|e| {
            let name = match &e {
                auth::AuthError::Denied { user, .. } => user.clone(),
                _ => "(not logged in)".into(),
            };
            let s = Status::from(e);
            let who = Caller {
                name,
                level: auth::Level::ReadOnly,
                method: method.to_owned(),
                peer,
            };
            if auth::rule(method).1 {
                self.audit(&who, &s);
            } else {
                log_refusal(&who, &s);
            }
            s
        })
    }

    /// As [`PoolHandler::authorize`], for the calls a host makes with its own certificate
    /// instead of a user's token (finding itself, joining): the host's name comes back
    /// with the caller, for the handler to hold the host to itself.
    pub(super) fn authorize_host<T>(
        &self,
        r: &Request<T>,
        method: &str,
    ) -> Result<(Caller, Option<String>), Status> {
        if let Some(tls) = &self.c.tls
            && let Ok(Identity::Host(name)) = pool_trust::tls::peer_identity(r, tls.pool_id())
        {
            let who = Caller {
                name: format!("host/{name}"),
                level: auth::Level::PoolAdmin,
                method: method.to_owned(),
                peer: peer_of(r),
            };
            return Ok((who, Some(name)));
        }
        self.authorize(r, method).map(|who| (who, None))
    }

    /// Writes an outcome that never reached the log to the audit log (in the background:
    /// the caller hears the answer at once); a refusal is logged here too.
    pub(super) fn audit(&self, who: &Caller, s: &Status) {
        if s.code() != tonic::Code::Ok {
            log_refusal(who, s);
        }
        let c = self.c.clone();
        let e = pb::AuditEvent {
            user_name: who.name.clone(),
            method: who.method.clone(),
            result: if s.code() == tonic::Code::Ok {
                "OK".into()
            } else {
                format!("{:?}", s.code())
            },
            detail: s.message().to_owned(),
            peer_address: who.peer.clone(),
            ..Default::default()
        };
        tokio::spawn(async move {
            let cmd = c.command(&Caller::internal(), "", Op::Audit(e));
            if let Err(err) = c.submit(&cmd).await {
                tracing::warn!(error = %err, "audit event not recorded");
            }
        });
    }

    /// Audits a grant or a revoke of volume access, whichever way it went.
    pub(super) fn audit_access<T>(
        &self,
        who: &Caller,
        r: &pb::VolumeAccessRequest,
        res: &Result<T, Status>,
    ) {
        let ok = Status::ok(format!("{} for {}", r.volume_id, r.initiator_iqn));
        self.audit(who, res.as_ref().err().unwrap_or(&ok));
    }

    /// The answer of a change: its task, or its refusal (audited unless the state machine
    /// already did).
    pub(super) fn done(
        &self,
        who: &Caller,
        r: Result<pb::Task, Status>,
    ) -> Result<Response<pb::TaskResponse>, Status> {
        match r {
            Ok(t) => Ok(Response::new(pb::TaskResponse { task: Some(t) })),
            Err(s) => {
                if !s.metadata().contains_key(AUDITED) {
                    self.audit(who, &s);
                }
                Err(s)
            }
        }
    }
}

/// Logs a refused call: who, what, from where and why (the status says nothing secret:
/// no password or token ever goes into one).
pub(super) fn log_refusal(who: &Caller, s: &Status) {
    tracing::warn!(
        user = %who.name,
        method = %who.method,
        peer = %who.peer,
        code = ?s.code(),
        result = %s.message(),
        "call refused"
    );
}

/// The caller's address, as the audit log records it.
/// The request's `authorization` header, if it has one that is text.
pub(super) fn header_of<T>(r: &Request<T>) -> Option<String> {
    r.metadata()
        .get(auth::HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

pub(super) fn peer_of<T>(r: &Request<T>) -> String {
    r.remote_addr().map(|a| a.to_string()).unwrap_or_default()
}
