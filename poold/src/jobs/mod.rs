//! Long operations, carried out by the leader.
//!
//! A PoolService call that needs storaged or hostd to act commits a [`Job`] (checked by
//! the state machine before anything is done: a job that cannot succeed is refused at
//! once) and answers with its running task. The leader's [`run`] loop gives every job
//! an executor; the executor does the job's steps through [`StorageOps`] and
//! [`HostOps`], records progress and step outputs ([`JobStep`]) and ends it with a
//! [`FinishJob`] that carries the job's effects on the pool state, or its error.
//!
//! **A new leader resumes every job from the start**, so every step is idempotent:
//! objects a step creates on storaged carry the labels `poold.task` and `poold.step`
//! and are looked up by them before being created again (a call that succeeded just
//! before the old leader died is found, not repeated); resizes, reverts, grants and
//! revokes are idempotent by nature; deletes treat "not found" as done. Where a step
//! changes something that must be undone (a VM paused for a crash-consistent snapshot),
//! the intent is committed as a step output before the change, so the next executor
//! knows to undo it.
//!
//! # Layout
//! - this file: the runner, the [`Ledger`] jobs read and commit through, the job error;
//! - [`storage`]: storage repositories and volumes;
//! - [`vm`]: templates, VM snapshots (taken, reverted to, deleted), clones, destroys,
//!   reboots, and the disk access (export + grant) a host needs to run a VM;
//! - [`vifs`]: a VM's network interfaces as the host it runs on gets them;
//! - [`migrate`]: live migration between hosts;
//! - [`suspend`]: suspend to a state volume, resume from it, quick migration;
//! - [`checkpoint`]: VM snapshots with memory (taken by [`vm`]'s snapshot job, reverted
//!   to by its revert job);
//! - [`undo`]: undo disks: the start that makes a VM's overlays, their commit or discard;
//! - [`ha`]: fencing an unreachable host at the storage, restarting its VMs elsewhere;
//! - [`backup`]: a backup schedule's snapshot written into its chain, the chain pruned.

pub mod backup;
pub mod checkpoint;
pub mod ha;
pub mod migrate;
pub mod storage;
pub mod suspend;
pub mod undo;
pub mod vifs;
pub mod vm;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tonic::{Code, Status};

use crate::auth::Caller;
use crate::backend::{HostOps, StorageOps, transient};
use crate::coordinator::Coordinator;
use crate::state::PoolState;
use crate::state::command::*;

/// The pool state as jobs see it: read the current state, commit a command.
#[tonic::async_trait]
pub trait Ledger: Send + Sync {
    fn view(&self, f: &mut dyn FnMut(&PoolState));
    async fn commit(&self, request_id: &str, op: Op) -> Result<CommandResult, Status>;
}

/// Runs `f` on the ledger's current state.
pub fn read<T>(l: &dyn Ledger, f: impl FnOnce(&PoolState) -> T) -> T {
    let mut f = Some(f);
    let mut out = None;
    l.view(&mut |s| {
        if let Some(f) = f.take() {
            out = Some(f(s));
        }
    });
    out.expect("view calls its closure once")
}

#[tonic::async_trait]
impl Ledger for Coordinator {
    fn view(&self, f: &mut dyn FnMut(&PoolState)) {
        f(&self.node.state())
    }

    async fn commit(&self, request_id: &str, op: Op) -> Result<CommandResult, Status> {
        let cmd = self.command(&Caller::internal(), request_id, op);
        self.submit(&cmd).await
    }
}

/// The first 8 characters of an id (a task's), for the names of what a job makes.
pub(crate) fn short(id: &str) -> &str {
    id.get(..8).unwrap_or(id)
}

/// What jobs act through.
#[derive(Clone)]
pub struct Env {
    pub ledger: Arc<dyn Ledger>,
    pub storage: Arc<dyn StorageOps>,
    pub hosts: Arc<dyn HostOps>,
    /// Where this member may write backup chains (`Coordinator::backup_roots`).
    pub backup_roots: Arc<[std::path::PathBuf]>,
}

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// A daemon did not answer or was busy: the step is tried again later.
    #[error("{what}")]
    Transient {
        what: String,
        #[source]
        source: Status,
    },
    /// The job cannot succeed; it fails with this code and message.
    #[error("{message}")]
    Refused { code: Code, message: String },
    #[error("cancelled")]
    Cancelled,
    /// A commit failed (this member no longer leads, or no quorum): the executor stops;
    /// the leader runs the job again.
    #[error("committing a step failed")]
    Commit(#[source] Status),
}

impl JobError {
    pub fn refused(code: Code, message: impl Into<String>) -> JobError {
        JobError::Refused {
            code,
            message: message.into(),
        }
    }

    /// A daemon's answer: transient codes are retried, others end the job.
    pub fn from_status(what: impl Into<String>, s: Status) -> JobError {
        let what = what.into();
        if transient(&s) {
            JobError::Transient { what, source: s }
        } else {
            JobError::Refused {
                code: s.code(),
                message: format!("{what}: {}", s.message()),
            }
        }
    }

    /// For people: the step and, for a transient failure, its cause.
    pub fn describe(&self) -> String {
        match self {
            JobError::Transient { what, source } => format!("{what}: {}", source.message()),
            other => other.to_string(),
        }
    }
}

/// What a finished job changes and reports.
#[derive(Debug, Default)]
pub struct Finish {
    pub effects: Vec<Effect>,
    pub results: HashMap<String, String>,
    /// The object created, when the job created one.
    pub target: String,
    /// The job failed with this code and message after changes it must keep, which
    /// `effects` carry (a quick migration's suspend, when the restore failed).
    pub failed: Option<(Code, String)>,
}

impl Finish {
    pub fn effect(mut self, k: EffectKind) -> Self {
        self.effects.push(Effect { kind: Some(k) });
        self
    }

    pub fn result(mut self, k: &str, v: impl ToString) -> Self {
        self.results.insert(k.to_owned(), v.to_string());
        self
    }
}

impl Env {
    /// Records progress and step outputs.
    pub async fn step(
        &self,
        task_id: &str,
        progress: u32,
        message: &str,
        outputs: &[(&str, &str)],
    ) -> Result<(), JobError> {
        let op = Op::JobStep(JobStep {
            task_id: task_id.to_owned(),
            progress_percent: progress,
            status_message: message.to_owned(),
            outputs: outputs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            results: HashMap::new(),
        });
        let r = self.ledger.commit("", op).await.map_err(JobError::Commit)?;
        if r.code != 0 {
            // The job ended meanwhile (finished by a previous leader's executor).
            return Err(JobError::Commit(Status::new(Code::from(r.code), r.message)));
        }
        Ok(())
    }

    /// The job as the state holds it now (None once it ended).
    pub fn job(&self, task_id: &str) -> Option<Job> {
        read(&*self.ledger, |s| s.jobs.get(task_id).cloned())
    }
}

/// Runs one job to its end (or until this member stops leading).
pub async fn drive(env: Env, task_id: String) {
    let mut backoff = Duration::from_millis(250);
    let mut last_wait_note = String::new();
    loop {
        let Some(job) = env.job(&task_id) else {
            return;
        };
        let outcome = execute(&env, &job).await;
        let finish = match outcome {
            Ok(Finish {
                effects,
                results,
                failed: Some((code, message)),
                ..
            }) => FinishJob {
                task_id: task_id.clone(),
                code: code as i32,
                message,
                effects,
                results,
                target_id: String::new(),
            },
            Ok(f) => FinishJob {
                task_id: task_id.clone(),
                code: 0,
                message: String::new(),
                effects: f.effects,
                results: f.results,
                target_id: f.target,
            },
            Err(JobError::Refused { code, message }) => FinishJob {
                task_id: task_id.clone(),
                code: code as i32,
                message,
                ..Default::default()
            },
            Err(JobError::Cancelled) => FinishJob {
                task_id: task_id.clone(),
                code: Code::Cancelled as i32,
                message: "cancelled on request; nothing was changed".into(),
                ..Default::default()
            },
            Err(JobError::Commit(s)) => {
                tracing::info!(task = %task_id, error = %s, "job paused: commit failed");
                return;
            }
            Err(e @ JobError::Transient { .. }) => {
                let note = format!("waiting: {}", e.describe());
                tracing::warn!(task = %task_id, kind = job.kind(), "{note}; retrying");
                if note != last_wait_note {
                    let progress = read(&*env.ledger, |s| {
                        s.tasks.get(&task_id).map_or(0, |t| t.progress_percent)
                    });
                    if env.step(&task_id, progress, &note, &[]).await.is_err() {
                        return;
                    }
                    last_wait_note = note;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(3));
                continue;
            }
        };
        let failed = finish.code != 0;
        match env
            .ledger
            .commit(&format!("finish-{task_id}"), Op::FinishJob(finish))
            .await
        {
            Ok(_) if failed => tracing::info!(task = %task_id, kind = job.kind(), "job failed"),
            Ok(_) => tracing::info!(task = %task_id, kind = job.kind(), "job done"),
            Err(e) => tracing::warn!(task = %task_id, error = %e, "could not finish the job"),
        }
        return;
    }
}

/// One attempt at a job, start to end.
pub async fn execute(env: &Env, job: &Job) -> Result<Finish, JobError> {
    let Some(spec) = &job.spec else {
        return Err(JobError::refused(Code::InvalidArgument, "empty job"));
    };
    match spec {
        JobSpec::CreateSr(j) => storage::create_sr(env, job, j).await,
        JobSpec::Volume(v) => storage::volume(env, job, v).await,
        JobSpec::VmFromTemplate(j) => vm::from_template(env, job, j).await,
        JobSpec::TemplateFromVm(j) => vm::template_from_vm(env, job, j).await,
        JobSpec::SnapshotVm(j) => vm::snapshot_vm(env, job, j).await,
        JobSpec::RevertVm(j) => vm::revert_vm(env, job, j).await,
        JobSpec::DeleteVmSnapshot(j) => vm::delete_vm_snapshot(env, job, j).await,
        JobSpec::CloneVm(j) => vm::clone_vm(env, job, j).await,
        JobSpec::DestroyVm(j) => vm::destroy_vm(env, job, j).await,
        JobSpec::RebootVm(j) => vm::reboot_vm(env, j).await,
        JobSpec::MigrateVm(j) => migrate::migrate(env, job, j).await,
        JobSpec::FenceHost(j) => ha::fence(env, job, j).await,
        JobSpec::SuspendVm(j) => suspend::suspend(env, job, j).await,
        JobSpec::ResumeVm(j) => suspend::resume(env, job, j).await,
        JobSpec::StartUndoVm(j) => undo::start(env, job, j).await,
        JobSpec::EndUndo(j) => undo::end(env, job, j).await,
        JobSpec::BackupVm(j) => backup::backup_vm(env, job, j).await,
    }
}

/// Leader-only loop: gives every job an executor; stops them all when this member stops
/// leading (the next leader starts them again).
pub async fn run(c: Arc<Coordinator>, env: Env, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let mut running: HashMap<String, tokio::task::JoinHandle<()>> = HashMap::new();
    let mut term = 0;
    let mut applied = c.node.shared.applied.subscribe();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = applied.changed() => {}
            _ = shutdown.changed() => {}
        }
        if *shutdown.borrow() {
            break;
        }
        let st = c.node.status();
        if st.leader_id != st.id || st.term != term {
            for (_, h) in running.drain() {
                h.abort();
            }
            term = st.term;
            if st.leader_id != st.id {
                continue;
            }
        }
        running.retain(|_, h| !h.is_finished());
        let ids: Vec<String> = c
            .node
            .state()
            .jobs
            .keys()
            .filter(|id| !running.contains_key(*id))
            .cloned()
            .collect();
        for id in ids {
            let h = tokio::spawn(drive(env.clone(), id.clone()));
            running.insert(id, h);
        }
    }
    for (_, h) in running.drain() {
        h.abort();
    }
}

#[cfg(test)]
pub(crate) mod test_utils;
