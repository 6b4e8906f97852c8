//! `PoolService`: the pool as people and tools see it, served by every member.
//!
//! Every call is authorized first ([`crate::auth`]: the caller's token and roles against
//! the method); every call that changes the pool is written to the audit log, by the
//! state machine when the change reaches the log, here when it is refused before.
//! Changes that need storaged or hostd start a job ([`crate::jobs`]) and answer with its
//! task, finished when the job took less than [`QUICK`].
//!
//! # Layout
//! - `api.rs`: the tonic `PoolService` impl; each call authorizes and hands over to the
//!   file of its resource.
//! - `authorize.rs`: who may call, and the audit of what was refused before the log.
//! - `request.rs`: required arguments, paging, job refusals as answers.
//! - one file per resource: `members.rs` (the Raft group), `settings.rs` (pool and HA
//!   settings), `hosts.rs`, `join.rs` (join tokens and certificates), `metrics.rs`, `storage.rs` (repositories, volumes, volume
//!   access), `vms.rs` (VMs, their snapshots, placement), `networks.rs` (guest networks
//!   and VIFs), `console.rs`, `export.rs` (a VM as an OVA download), `templates.rs`,
//!   `tasks.rs`, `events.rs` (the change feed), `users.rs` (users, roles, login, the
//!   audit log).

use std::sync::Arc;
use std::time::Duration;

use tonic::Status;

use crate::auth::Caller;
use crate::coordinator::Coordinator;
use crate::state::command::JobSpec;
use proto::coordinator as pb;

mod alerts;
mod api;
mod authorize;
pub mod console;
mod events;
pub mod export;
mod hosts;
mod join;
mod members;
mod metrics;
mod networks;
mod request;
mod roll;
mod settings;
mod storage;
mod tasks;
mod templates;
mod users;
mod vms;

/// How long a call waits for the job it started before answering with the running task.
pub const QUICK: Duration = Duration::from_secs(3);

/// The server side of `PoolService`: the member's coordinator and the backends that jobs
/// and volume access act through.
#[derive(Clone)]
pub struct PoolHandler {
    pub c: Arc<Coordinator>,
    pub hosts: Arc<dyn crate::backend::HostOps>,
    pub storage: Arc<dyn crate::backend::StorageOps>,
}

impl PoolHandler {
    fn env(&self) -> crate::jobs::Env {
        crate::jobs::Env {
            ledger: self.c.clone(),
            storage: self.storage.clone(),
            hosts: self.hosts.clone(),
            backup_roots: self.c.backup_roots.clone(),
        }
    }

    /// Commits a job and waits up to [`QUICK`] for it to finish.
    async fn start_job(
        &self,
        who: &Caller,
        request_id: &str,
        spec: JobSpec,
    ) -> Result<pb::Task, Status> {
        self.c
            .write_and_wait(who, request_id, request::job(spec), QUICK)
            .await
    }
}
