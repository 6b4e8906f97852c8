//! Live migration, orchestrated: the destination is granted the VM's volumes and prepared
//! (PrepareMigrationReceive), the source sends (StartMigrationSend) while its progress
//! goes into the task, and only a completed switchover moves the VM in the pool state.
//! Any failure (or a cancel) before that leaves the VM where it ran: the destination's
//! incoming VM is destroyed, and the access reconciler revokes the destination's grant
//! once no job or placement needs it; the source's grant is revoked the same way once the
//! VM has left it, never before.
//!
//! The migration's id is committed as a step output as soon as the source names it, so
//! a new leader that takes the job over follows the same migration (GetMigration)
//! instead of starting another.

use std::time::{Duration, Instant};

use proto::host as hpb;
use tonic::Code;
use tonic::codegen::tokio_stream::StreamExt;

use super::vm::{disk_access, host_addr, host_name, vm_config};
use super::{Env, Finish, JobError, read};
use crate::state::command::*;

/// How long the source may stay silent during a migration before the pool asks it
/// directly how the migration is going.
const SILENCE: Duration = Duration::from_secs(30);

fn percent(p: &hpb::MigrationProgress) -> u32 {
    use hpb::MigrationPhase as M;
    match M::try_from(p.phase).unwrap_or(M::Unspecified) {
        M::Unspecified | M::Preparing => 5,
        M::CheckingCpu => 10,
        M::FullCopy => {
            10 + (p.bytes_sent.min(p.memory_total_bytes) * 50)
                .checked_div(p.memory_total_bytes)
                .unwrap_or(0) as u32
        }
        M::DirtyRounds => 60 + (p.round * 5).min(30),
        M::Switchover => 95,
        M::Completed | M::Failed | M::Cancelled => 99,
    }
}

fn describe(p: &hpb::MigrationProgress) -> String {
    use hpb::MigrationPhase as M;
    match M::try_from(p.phase).unwrap_or(M::Unspecified) {
        M::FullCopy => format!(
            "copying memory: {} of {} MiB",
            p.bytes_sent >> 20,
            p.memory_total_bytes >> 20
        ),
        M::DirtyRounds => format!(
            "round {}: {} MiB dirty, expected downtime {} ms",
            p.round,
            p.dirty_bytes_last_round >> 20,
            p.expected_downtime_ms
        ),
        M::Switchover => "switching over".into(),
        other => other
            .as_str_name()
            .trim_start_matches("MIGRATION_PHASE_")
            .to_lowercase(),
    }
}

fn finished(vm_id: &str, to: &str, p: &hpb::MigrationProgress) -> Finish {
    Finish::default()
        .result("downtime_ms", p.downtime_ms)
        .result("total_time_ms", p.total_time_ms)
        .result("rounds", p.round)
        .result("bytes_sent", p.bytes_sent)
        .result("destination_host_id", to)
        .effect(EffectKind::MoveVm(MoveVm {
            vm_id: vm_id.to_owned(),
            to_host_id: to.to_owned(),
        }))
}

pub async fn migrate(env: &Env, job: &Job, j: &MigrateVmJob) -> Result<Finish, JobError> {
    let (vm, src, dst, names) = read(&*env.ledger, |s| {
        let vm = s.vms.get(&j.vm_id).cloned().ok_or_else(|| {
            JobError::refused(Code::NotFound, format!("no VM with id {}", j.vm_id))
        })?;
        Ok::<_, JobError>((
            vm,
            host_addr(s, &j.source_host_id)?,
            host_addr(s, &j.destination_host_id)?,
            // The names the hosts' certificates carry: each end of the stream accepts
            // only the other's.
            (
                host_name(s, &j.source_host_id)?,
                host_name(s, &j.destination_host_id)?,
            ),
        ))
    })?;
    if let Some(mid) = job.outputs.get("migration_id") {
        // A previous attempt started it: follow that one.
        return follow(env, job, j, &src, &dst, mid, None).await;
    }
    if job.cancel_requested {
        return Err(JobError::Cancelled);
    }
    env.step(
        &job.task_id,
        2,
        "granting the destination access to the disks",
        &[],
    )
    .await?;
    let disks = disk_access(env, &vm, &j.destination_host_id).await?;
    let prep = env
        .hosts
        .prepare_migration_receive(
            &dst,
            hpb::PrepareMigrationReceiveRequest {
                vm_id: vm.id.clone(),
                config: Some(vm_config(&vm, disks)),
                token: j.token.clone(),
                source_host: names.0,
            },
        )
        .await
        .map_err(|s| JobError::from_status("preparing the destination", s))?;
    env.step(&job.task_id, 5, "destination ready", &[]).await?;
    let stream = env
        .hosts
        .start_migration_send(
            &src,
            hpb::StartMigrationSendRequest {
                vm_id: vm.id.clone(),
                destination_address: prep.address.clone(),
                token: j.token.clone(),
                downtime_budget_ms: j.downtime_budget_ms,
                max_rounds: 0,
                timeout_seconds: 0,
                auto_converge: j.auto_converge,
                bandwidth_limit_bytes_per_second: 0,
                destination_host: names.1,
                destination_stream_version: prep.stream_version,
            },
        )
        .await;
    let stream = match stream {
        Ok(s) => s,
        Err(s) => {
            abandon(env, &dst, &vm.id).await;
            return Err(
                JobError::from_status("starting the migration on the source", s).into_refusal(),
            );
        }
    };
    follow(env, job, j, &src, &dst, "", Some(stream)).await
}

impl JobError {
    /// A failure after the migration began is final for this job: the VM stays on the
    /// source and the operator may try again.
    fn into_refusal(self) -> JobError {
        match self {
            JobError::Transient { what, source } => JobError::Refused {
                code: Code::Unavailable,
                message: format!("{what}: {}", source.message()),
            },
            other => other,
        }
    }
}

/// Removes the incoming VM from the destination (best effort: reconciliation removes it
/// later if this fails, since the pool does not place it there).
async fn abandon(env: &Env, dst: &str, vm_id: &str) {
    if let Err(e) = env.hosts.destroy_vm(dst, vm_id).await
        && e.code() != Code::NotFound
    {
        tracing::warn!(vm = vm_id, destination = dst, error = %e, "incoming VM not removed; reconciliation will");
    }
}

/// Follows a migration to its end, from its progress stream or, without one, by asking
/// the source.
async fn follow(
    env: &Env,
    job: &Job,
    j: &MigrateVmJob,
    src: &str,
    dst: &str,
    known_id: &str,
    mut stream: Option<crate::backend::ProgressStream>,
) -> Result<Finish, JobError> {
    let mut mid = known_id.to_owned();
    let mut last_note = Instant::now() - Duration::from_secs(10);
    let mut cancel_sent = false;
    loop {
        let progress = match stream.as_mut() {
            Some(s) => match tokio::time::timeout(SILENCE, s.next()).await {
                Ok(Some(Ok(p))) => Some(p),
                Ok(Some(Err(e))) => {
                    tracing::warn!(task = %job.task_id, error = %e, "migration stream broke; asking the source");
                    stream = None;
                    None
                }
                Ok(None) | Err(_) => {
                    stream = None;
                    None
                }
            },
            None => None,
        };
        let p = match progress {
            Some(p) => p,
            None if mid.is_empty() => {
                abandon(env, dst, &j.vm_id).await;
                return Err(JobError::refused(
                    Code::Unavailable,
                    "the source ended the migration without naming it; the VM stays on the source",
                ));
            }
            None => match env.hosts.get_migration(src, &mid).await {
                Ok(p) => {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    p
                }
                Err(s) if crate::backend::transient(&s) => {
                    return Err(JobError::from_status(
                        "asking the source about the migration",
                        s,
                    ));
                }
                Err(s) => {
                    abandon(env, dst, &j.vm_id).await;
                    return Err(JobError::refused(
                        s.code(),
                        format!(
                            "the source no longer knows migration {mid} ({}); the VM stays on the source",
                            s.message()
                        ),
                    ));
                }
            },
        };
        if mid.is_empty() && !p.migration_id.is_empty() {
            mid = p.migration_id.clone();
            env.step(
                &job.task_id,
                percent(&p),
                &describe(&p),
                &[("migration_id", &mid)],
            )
            .await?;
        }
        use hpb::MigrationPhase as M;
        match M::try_from(p.phase).unwrap_or(M::Unspecified) {
            M::Completed => return Ok(finished(&j.vm_id, &j.destination_host_id, &p)),
            M::Failed => {
                abandon(env, dst, &j.vm_id).await;
                return Err(JobError::refused(
                    Code::Aborted,
                    format!(
                        "migration failed: {}; the VM keeps running on the source",
                        if p.error.is_empty() {
                            "no reason given"
                        } else {
                            &p.error
                        }
                    ),
                ));
            }
            M::Cancelled => {
                abandon(env, dst, &j.vm_id).await;
                return Err(JobError::Cancelled);
            }
            _ => {}
        }
        if last_note.elapsed() >= Duration::from_secs(1) {
            last_note = Instant::now();
            let op = Op::JobStep(JobStep {
                task_id: job.task_id.clone(),
                progress_percent: percent(&p),
                status_message: describe(&p),
                outputs: Default::default(),
                results: [
                    ("round".to_owned(), p.round.to_string()),
                    ("bytes_sent".to_owned(), p.bytes_sent.to_string()),
                    (
                        "expected_downtime_ms".to_owned(),
                        p.expected_downtime_ms.to_string(),
                    ),
                ]
                .into_iter()
                .collect(),
            });
            env.ledger.commit("", op).await.map_err(JobError::Commit)?;
            let cancel = env.job(&job.task_id).is_some_and(|x| x.cancel_requested);
            if cancel && !cancel_sent && !mid.is_empty() {
                cancel_sent = true;
                if let Err(e) = env.hosts.cancel_migration(src, &mid).await {
                    tracing::warn!(task = %job.task_id, error = %e, "cancel refused (switchover may be under way)");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::test_utils::*;
    use proto::host::MigrationPhase as M;

    fn progress(phase: M, round: u32) -> hpb::MigrationProgress {
        hpb::MigrationProgress {
            migration_id: "mig-1".into(),
            vm_id: "vm1".into(),
            phase: phase as i32,
            round,
            memory_total_bytes: 64 << 20,
            bytes_sent: 64 << 20,
            downtime_ms: if phase == M::Completed { 42 } else { 0 },
            total_time_ms: 900,
            error: if phase == M::Failed {
                "destination vanished".into()
            } else {
                String::new()
            },
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn a_completed_migration_moves_the_vm_and_reports_its_figures() {
        let world = World::two_hosts_one_running_vm();
        world.hosts.migration(vec![
            progress(M::FullCopy, 0),
            progress(M::DirtyRounds, 1),
            progress(M::Switchover, 2),
            progress(M::Completed, 2),
        ]);
        let task = world.start_job(migrate_job("vm1", "h1", "h2"));
        // What the source's heartbeats say while it sends.
        world.report_power("vm1", hpb::PowerState::Migrating);
        world.drive(&task).await;
        let s = world.state();
        assert_eq!(s.vms["vm1"].host_id, "h2", "the VM moved");
        assert_eq!(
            s.vms["vm1"].power_state(),
            hpb::PowerState::Running,
            "the VM runs on the destination as soon as the job ends: a second migration need not wait for a heartbeat"
        );
        let t = &s.tasks[&task];
        assert_eq!(t.state, proto::coordinator::TaskState::Succeeded as i32);
        assert_eq!(t.results["downtime_ms"], "42");
        let calls = world.hosts.calls();
        // The destination was granted before it was prepared, prepared before the source
        // sent (speaking the stream version the destination reads), and nothing was
        // revoked by the job.
        let grant = world.storage.position("grant:e-vol1:iqn.h2");
        let prep = position(&calls, "prepare:h2:7000");
        let send = position(&calls, "send:h1:7000:v3");
        assert!(grant.is_some() && prep < send, "{calls:?}");
        assert!(
            !world
                .storage
                .calls()
                .iter()
                .any(|c| c.starts_with("revoke"))
        );
        assert!(s.jobs.is_empty());
    }

    #[tokio::test]
    async fn a_failed_migration_leaves_the_vm_on_the_source() {
        let world = World::two_hosts_one_running_vm();
        world
            .hosts
            .migration(vec![progress(M::FullCopy, 0), progress(M::Failed, 0)]);
        let task = world.start_job(migrate_job("vm1", "h1", "h2"));
        world.drive(&task).await;
        let s = world.state();
        assert_eq!(s.vms["vm1"].host_id, "h1");
        let t = &s.tasks[&task];
        assert_eq!(t.state, proto::coordinator::TaskState::Failed as i32);
        assert!(t.error_message.contains("destination vanished"), "{t:?}");
        assert!(t.error_message.contains("keeps running on the source"));
        // The destination's incoming VM was removed.
        assert!(
            world
                .hosts
                .calls()
                .iter()
                .any(|c| c == "destroy:h2:7000:vm1")
        );
    }

    #[tokio::test]
    async fn a_refused_start_leaves_the_vm_on_the_source() {
        let world = World::two_hosts_one_running_vm();
        world.hosts.refuse_migration(tonic::Status::unimplemented(
            "live migration is not built yet",
        ));
        let task = world.start_job(migrate_job("vm1", "h1", "h2"));
        world.drive(&task).await;
        let s = world.state();
        assert_eq!(s.vms["vm1"].host_id, "h1");
        let t = &s.tasks[&task];
        assert_eq!(t.state, proto::coordinator::TaskState::Failed as i32);
        assert_eq!(t.error_code, "Unimplemented");
    }

    #[tokio::test]
    async fn a_new_leader_follows_the_migration_already_under_way() {
        let world = World::two_hosts_one_running_vm();
        let task = world.start_job(migrate_job("vm1", "h1", "h2"));
        // The previous leader recorded the migration id, then died.
        world.record_output(&task, "migration_id", "mig-1");
        world.hosts.migration_status(progress(M::Completed, 3));
        world.drive(&task).await;
        let s = world.state();
        assert_eq!(s.vms["vm1"].host_id, "h2");
        let calls = world.hosts.calls();
        assert!(
            !calls
                .iter()
                .any(|c| c.starts_with("prepare") || c.starts_with("send")),
            "no second migration: {calls:?}"
        );
    }

    #[tokio::test]
    async fn a_cancelled_migration_leaves_the_vm_on_the_source() {
        let world = World::two_hosts_one_running_vm();
        world
            .hosts
            .migration(vec![progress(M::FullCopy, 0), progress(M::Cancelled, 0)]);
        let task = world.start_job(migrate_job("vm1", "h1", "h2"));
        world.cancel(&task);
        world.drive(&task).await;
        let s = world.state();
        assert_eq!(s.vms["vm1"].host_id, "h1");
        assert_eq!(
            s.tasks[&task].state,
            proto::coordinator::TaskState::Cancelled as i32
        );
    }
}
