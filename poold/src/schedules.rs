//! Scheduled snapshots, checkpoints and backups: the leader's loop over
//! `PoolSettings.schedules`.
//!
//! Each second the leader [`plan`]s against the state and the clock: a schedule due since
//! its last run starts a VM snapshot job (named `NAME-YYYYMMDD-HHMM` after the due time,
//! tagged with the schedule); otherwise, the oldest of its snapshots that its
//! [`Retention`](pb::Retention) no longer keeps is deleted by a job. A backup schedule
//! first has its newest snapshot written into its chain by a backup job (`jobs::backup`,
//! which prunes the chain's points by the retention), once, written or not; of its
//! snapshots only the chain's base stays. All are ordinary
//! tasks (requested by "schedule NAME"), one job per VM at a time. Everything is read from
//! the replicated state (the last due time of each schedule is committed with its run), so
//! a new leader carries on where the last one stopped, and a run is never taken twice: the
//! state machine refuses a run not later than the last. A run missed while no member led
//! is made up once.

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;

use proto::coordinator as pb;

use crate::coordinator::Coordinator;
use crate::jobs::{Ledger, read};
use crate::state::PoolState;
use crate::state::command::*;
use crate::state::schedules::latest_due;

const DAY_MS: i64 = 86_400_000;

/// The name of the snapshot a run due at `due_ms` takes.
pub fn snapshot_name(schedule: &str, due_ms: u64) -> String {
    let days = (due_ms as i64).div_euclid(DAY_MS);
    let (y, m, d) = proto::civil_from_days(days);
    let mins = (due_ms as i64).rem_euclid(DAY_MS) / 60_000;
    format!(
        "{schedule}-{y:04}{m:02}{d:02}-{:02}{:02}",
        mins / 60,
        mins % 60
    )
}

/// The job one run of `s` starts; `at_ms` names its snapshot.
pub fn run_job(s: &pb::Schedule, at_ms: u64, due_at_ms: u64, manual: bool) -> ScheduleJob {
    ScheduleJob {
        schedule: s.name.clone(),
        due_at_ms,
        manual,
        job: Some(Job {
            spec: Some(JobSpec::SnapshotVm(SnapshotVmJob {
                snapshot_id: uuid::Uuid::new_v4().to_string(),
                vm_id: s.vm_id.clone(),
                name: snapshot_name(&s.name, at_ms),
                memory: s.kind() == pb::ScheduleKind::Checkpoint,
                schedule: s.name.clone(),
            })),
            ..Default::default()
        }),
    }
}

/// The job that writes snapshot `snapshot_id` of backup schedule `s` into its chain.
fn backup_job(s: &pb::Schedule, snapshot_id: &str) -> ScheduleJob {
    ScheduleJob {
        schedule: s.name.clone(),
        job: Some(Job {
            spec: Some(JobSpec::BackupVm(BackupVmJob {
                vm_id: s.vm_id.clone(),
                snapshot_id: snapshot_id.to_owned(),
                directory: s.directory.clone(),
                schedule: s.name.clone(),
                retention: s.retention,
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The schedule's snapshots now in the pool, as `(id, taken at ms)`.
pub fn snapshots_of(st: &PoolState, s: &pb::Schedule) -> Vec<(String, u64)> {
    st.vm_snapshots
        .values()
        .filter(|x| x.schedule == s.name && x.vm_id == s.vm_id)
        .map(|x| {
            let at = x.created_at.as_ref().map_or(0, |t| {
                (t.seconds.max(0) as u64) * 1000 + (t.nanos.max(0) as u64) / 1_000_000
            });
            (x.id.clone(), at)
        })
        .collect()
}

/// What is due at `now_ms`: at most one job per VM, none for a VM a job holds.
pub fn plan(st: &PoolState, now_ms: u64) -> Vec<ScheduleJob> {
    let mut busy: HashSet<&str> = st.jobs.values().filter_map(Job::busy_vm).collect();
    // A snapshot a clone reads cannot be deleted until the clone ends.
    let read_by_clone: HashSet<&str> = st
        .jobs
        .values()
        .filter_map(|j| match &j.spec {
            Some(JobSpec::CloneVm(c)) => Some(c.source_id.as_str()),
            _ => None,
        })
        .collect();
    // Backup schedules whose chain a job is writing now.
    let writing: HashSet<&str> = st
        .jobs
        .values()
        .filter_map(|j| match &j.spec {
            Some(JobSpec::BackupVm(b)) => Some(b.schedule.as_str()),
            _ => None,
        })
        .collect();
    let mut out = Vec::new();
    for s in &st.settings.schedules {
        if s.disabled || !st.vms.contains_key(&s.vm_id) || busy.contains(s.vm_id.as_str()) {
            continue;
        }
        let due = latest_due(s, now_ms);
        let last = st.schedule_runs.get(&s.name).map_or(0, |r| r.last_due_ms);
        if due > last {
            out.push(run_job(s, due, due, false));
            busy.insert(s.vm_id.as_str());
            continue;
        }
        let mine = snapshots_of(st, s);
        let keep = if s.kind() == pb::ScheduleKind::Backup {
            let run = st.schedule_runs.get(&s.name).cloned().unwrap_or_default();
            if writing.contains(s.name.as_str()) {
                continue;
            }
            let newest = mine
                .iter()
                .max_by(|a, b| a.1.cmp(&b.1).then_with(|| a.0.cmp(&b.0)));
            if let Some((id, _)) = newest
                && *id != run.backup_tried_snapshot_id
                && *id != run.backup_snapshot_id
            {
                out.push(backup_job(s, id));
                continue;
            }
            // Only the chain's base stays: the directory keeps the points.
            BTreeSet::from([run.backup_snapshot_id])
        } else {
            proto::retention_kept(&mine, &s.retention.unwrap_or_default())
        };
        if let Some((oldest, _)) = mine
            .iter()
            .filter(|(id, _)| !keep.contains(id) && !read_by_clone.contains(id.as_str()))
            .min_by(|a, b| a.1.cmp(&b.1).then_with(|| a.0.cmp(&b.0)))
        {
            out.push(ScheduleJob {
                schedule: s.name.clone(),
                job: Some(Job {
                    spec: Some(JobSpec::DeleteVmSnapshot(DeleteVmSnapshotJob {
                        vm_id: s.vm_id.clone(),
                        snapshot_id: oldest.clone(),
                    })),
                    ..Default::default()
                }),
                ..Default::default()
            });
            busy.insert(s.vm_id.as_str());
        }
    }
    out
}

/// Starts what [`plan`] finds due; returns how many jobs it started.
pub async fn tick(l: &dyn Ledger, now_ms: u64) -> usize {
    let due = read(l, |s| plan(s, now_ms));
    let mut started = 0;
    for j in due {
        let name = j.schedule.clone();
        match l.commit("", Op::ScheduleJob(j)).await {
            Ok(r) if r.code == 0 => started += 1,
            Ok(r) => tracing::debug!(schedule = %name, error = %r.message, "schedule job refused"),
            Err(e) => {
                tracing::info!(schedule = %name, error = %e, "schedule job not committed");
                break;
            }
        }
    }
    started
}

/// Leader-only loop.
pub async fn run(c: Arc<Coordinator>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = shutdown.changed() => {}
        }
        if *shutdown.borrow() {
            return;
        }
        if c.leader_term_start().is_none() {
            continue;
        }
        tick(&*c, proto::unix_ms()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::test_utils::World;
    use crate::state::schedules::next_due;
    use proto::host as hpb;

    const HOUR: u64 = 3_600_000;
    const DAY: u64 = 24 * HOUR;
    /// 2026-12-01 00:00 UTC, a Tuesday.
    const DEC_1: u64 = 1_796_083_200_000;

    fn retention(last: u32, daily: u32, weekly: u32) -> pb::Retention {
        pb::Retention {
            keep_last: last,
            keep_daily: daily,
            keep_weekly: weekly,
        }
    }

    fn nightly() -> pb::Schedule {
        pb::Schedule {
            name: "nightly".into(),
            vm_id: "vm1".into(),
            kind: pb::ScheduleKind::Snapshot as i32,
            every_seconds: 86_400,
            at_seconds: 2 * 3600,
            retention: Some(retention(2, 4, 3)),
            disabled: false,
            directory: String::new(),
        }
    }

    #[test]
    fn due_times_follow_the_period_from_a_monday() {
        let s = nightly();
        assert_eq!(latest_due(&s, DEC_1 + HOUR), DEC_1 - DAY + 2 * HOUR);
        assert_eq!(latest_due(&s, DEC_1 + 2 * HOUR), DEC_1 + 2 * HOUR);
        assert_eq!(next_due(&s, DEC_1 + 2 * HOUR), DEC_1 + DAY + 2 * HOUR);
        // Weekly at Monday 06:00: 2026-12-07 is the Monday after DEC_1.
        let weekly = pb::Schedule {
            every_seconds: 7 * 86_400,
            at_seconds: 6 * 3600,
            ..nightly()
        };
        assert_eq!(next_due(&weekly, DEC_1), DEC_1 + 6 * DAY + 6 * HOUR);
        assert_eq!(
            snapshot_name("nightly", DEC_1 + 2 * HOUR),
            "nightly-20261201-0200"
        );
    }

    /// Runs the loop's tick at `now` on the world's clock and drives every job it started
    /// to its end, as the leader's job runner would.
    async fn tick_at(w: &World, now: u64) -> usize {
        *w.ledger.clock_ms.lock().unwrap() = Some(now);
        let n = tick(&*w.ledger, now).await;
        let jobs: Vec<String> = w.state().jobs.keys().cloned().collect();
        for j in jobs {
            w.drive(&j).await;
        }
        n
    }

    fn scheduled_names(w: &World, schedule: &str) -> Vec<String> {
        let mut v: Vec<String> = w
            .state()
            .vm_snapshots
            .values()
            .filter(|s| s.schedule == schedule)
            .map(|s| s.name.clone())
            .collect();
        v.sort();
        v
    }

    fn tasks_of(w: &World, kind: &str) -> Vec<pb::Task> {
        let st = w.state();
        st.task_order
            .iter()
            .map(|id| (*st.tasks[id]).clone())
            .filter(|t| t.kind == kind)
            .collect()
    }

    async fn commit(w: &World, op: Op) -> CommandResult {
        w.ledger.commit("", op).await.unwrap()
    }

    #[tokio::test]
    async fn a_month_on_a_fake_clock_keeps_what_the_retention_says() {
        let w = World::two_hosts_one_running_vm();
        *w.ledger.clock_ms.lock().unwrap() = Some(DEC_1);
        let r = commit(&w, Op::SetSchedule(nightly())).await;
        assert_eq!(r.code, 0, "{}", r.message);
        // A person's snapshot is never the schedule's to delete.
        let mine = w.start_job(Job {
            spec: Some(JobSpec::SnapshotVm(SnapshotVmJob {
                snapshot_id: "manual".into(),
                vm_id: "vm1".into(),
                name: "before".into(),
                ..Default::default()
            })),
            ..Default::default()
        });
        w.drive(&mine).await;

        // Hourly ticks from 2026-12-01 00:00 to 2026-12-30 23:00.
        let mut most = 0;
        for h in 0..30 * 24 {
            if h % 24 == 1 {
                // An hour before each run, only what the rules keep is left: 4 days and
                // the newest of 2 weeks before, on the days when neither is among the 4.
                most = most.max(scheduled_names(&w, "nightly").len());
            }
            tick_at(&w, DEC_1 + h * HOUR).await;
        }
        assert_eq!(
            scheduled_names(&w, "nightly"),
            [
                "nightly-20261220-0200", // the newest of the week of the 14th
                "nightly-20261227-0200", // of the week of the 21st; a daily one too
                "nightly-20261228-0200",
                "nightly-20261229-0200",
                "nightly-20261230-0200",
            ]
        );
        // Pruned as it went.
        assert!(most <= 6, "{most} snapshots before a run");
        let runs = tasks_of(&w, "vm.snapshot");
        assert_eq!(runs.len(), 31, "30 runs and the person's");
        assert!(
            runs.iter()
                .all(|t| t.state == pb::TaskState::Succeeded as i32)
        );
        assert_eq!(
            runs.iter()
                .filter(|t| t.requested_by == "schedule nightly")
                .count(),
            30
        );
        let deletes = tasks_of(&w, "vm.snapshot.delete");
        assert_eq!(deletes.len(), 25);
        assert!(deletes.iter().all(|t| t.requested_by == "schedule nightly"));
        assert!(w.state().vm_snapshots.contains_key("manual"));

        // Nobody led for three days: the run missed is made up once, not three times.
        let jan_2 = DEC_1 + 32 * DAY + 10 * HOUR;
        assert_eq!(tick_at(&w, jan_2).await, 1);
        // Nothing to delete: the week of the 28th keeps the 2nd, the 27th and the 20th
        // stay the newest of their weeks.
        assert_eq!(tick_at(&w, jan_2 + HOUR).await, 0);
        let names = scheduled_names(&w, "nightly");
        assert_eq!(names.last().unwrap(), "nightly-20270102-0200");
        assert_eq!(tasks_of(&w, "vm.snapshot").len(), 32);
        assert_eq!(
            w.state().schedule_runs["nightly"].last_due_ms,
            DEC_1 + 32 * DAY + 2 * HOUR
        );

        // Disabled: nothing taken, nothing deleted.
        let off = pb::Schedule {
            disabled: true,
            retention: Some(retention(1, 0, 0)),
            ..nightly()
        };
        assert_eq!(commit(&w, Op::SetSchedule(off)).await.code, 0);
        for h in 0..48 {
            assert_eq!(tick_at(&w, jan_2 + (3 + h) * HOUR).await, 0);
        }
        assert_eq!(scheduled_names(&w, "nightly"), names);

        // Deleted: its snapshots stay, as a person's.
        let del = commit(
            &w,
            Op::DeleteSchedule(ObjectId {
                id: "nightly".into(),
            }),
        )
        .await;
        assert_eq!(del.code, 0, "{}", del.message);
        assert!(scheduled_names(&w, "nightly").is_empty());
        assert_eq!(w.state().vm_snapshots.len(), names.len() + 1);
        assert!(!w.state().schedule_runs.contains_key("nightly"));
    }

    #[tokio::test]
    async fn a_run_the_pool_refuses_fails_its_task_once_a_period() {
        let w = World::two_hosts_one_running_vm();
        w.storage.set_free(1 << 40);
        w.stop_vm1();
        *w.ledger.clock_ms.lock().unwrap() = Some(DEC_1);
        let hourly = pb::Schedule {
            name: "mem".into(),
            kind: pb::ScheduleKind::Checkpoint as i32,
            every_seconds: 3600,
            at_seconds: 0,
            ..nightly()
        };
        assert_eq!(commit(&w, Op::SetSchedule(hourly)).await.code, 0);
        for m in 0..60 {
            tick_at(&w, DEC_1 + HOUR + m * 60_000).await;
        }
        let runs = tasks_of(&w, "vm.snapshot");
        assert_eq!(runs.len(), 1, "one failed run an hour, not one a tick");
        assert_eq!(runs[0].state, pb::TaskState::Failed as i32);
        assert_eq!(runs[0].requested_by, "schedule mem");
        assert!(
            runs[0].error_message.contains("running"),
            "{}",
            runs[0].error_message
        );
        assert!(runs[0].finished_at.is_some());
        let st = w.state();
        assert!(st.jobs.is_empty() && st.vm_snapshots.is_empty());
        assert!(
            st.alerts
                .values()
                .any(|a| a.message.contains("schedule mem")),
            "a failed run raises an alert"
        );
        assert_eq!(st.schedule_runs["mem"].last_task_id, runs[0].id);
        // The VM runs again: the next hour's checkpoint is taken.
        {
            let mut s = w.ledger.state.lock().unwrap();
            let vm = s.vms.get_mut("vm1").unwrap();
            vm.host_id = "h1".into();
            vm.desired_power_state = hpb::PowerState::Running as i32;
            vm.power_state = hpb::PowerState::Running as i32;
        }
        tick_at(&w, DEC_1 + 2 * HOUR).await;
        let runs = tasks_of(&w, "vm.snapshot");
        assert_eq!(runs.len(), 2);
        assert_eq!(
            runs[1].state,
            pb::TaskState::Succeeded as i32,
            "{}",
            runs[1].error_message
        );
        let snap = w.state().vm_snapshots.values().next().cloned().unwrap();
        assert_eq!(snap.name, "mem-20261201-0200");
        assert!(
            !snap.state_volume_id.is_empty(),
            "a checkpoint saves memory"
        );
    }

    /// Ends every backup job as its executor would, written or not (the writer itself is
    /// `pool_image::backup`'s, run against real daemons in tests/tests/backup.rs).
    async fn end_backups(w: &World, written: bool) -> Vec<String> {
        let jobs: Vec<(String, BackupVmJob)> = w
            .state()
            .jobs
            .values()
            .filter_map(|j| match &j.spec {
                Some(JobSpec::BackupVm(b)) => Some((j.task_id.clone(), b.clone())),
                _ => None,
            })
            .collect();
        for (task_id, b) in &jobs {
            let done = EffectKind::BackupWritten(BackupWritten {
                schedule: b.schedule.clone(),
                snapshot_id: b.snapshot_id.clone(),
                written,
            });
            let f = FinishJob {
                task_id: task_id.clone(),
                code: if written {
                    0
                } else {
                    tonic::Code::Aborted as i32
                },
                message: if written { "" } else { "disk full" }.into(),
                effects: vec![Effect { kind: Some(done) }],
                ..Default::default()
            };
            assert_eq!(commit(w, Op::FinishJob(f)).await.code, 0);
        }
        jobs.into_iter().map(|(_, b)| b.snapshot_id).collect()
    }

    /// Ticks at `now` and drives the snapshot and delete jobs that starts; backup jobs are
    /// left running.
    async fn tick_but_backups(w: &World, now: u64) -> usize {
        *w.ledger.clock_ms.lock().unwrap() = Some(now);
        let n = tick(&*w.ledger, now).await;
        let jobs: Vec<String> = w
            .state()
            .jobs
            .values()
            .filter(|j| !matches!(j.spec, Some(JobSpec::BackupVm(_))))
            .map(|j| j.task_id.clone())
            .collect();
        for j in jobs {
            w.drive(&j).await;
        }
        n
    }

    #[tokio::test]
    async fn a_backup_schedule_writes_each_snapshot_once_and_keeps_only_its_base() {
        let w = World::two_hosts_one_running_vm();
        *w.ledger.clock_ms.lock().unwrap() = Some(DEC_1);
        let backup = pb::Schedule {
            name: "bk".into(),
            kind: pb::ScheduleKind::Backup as i32,
            directory: "/srv/backups/vm1".into(),
            retention: Some(retention(7, 0, 0)),
            ..nightly()
        };
        assert_eq!(commit(&w, Op::SetSchedule(backup)).await.code, 0);
        let ids = |w: &World| {
            let mut v: Vec<String> = snapshots_of(&w.state(), &w.state().settings.schedules[0])
                .into_iter()
                .map(|(id, _)| id)
                .collect();
            v.sort();
            v
        };

        // Night 1: the snapshot, then a backup job for it, and nothing else meanwhile.
        assert_eq!(tick_but_backups(&w, DEC_1 + 2 * HOUR).await, 1);
        let first = ids(&w);
        assert_eq!(first.len(), 1);
        assert_eq!(tick_but_backups(&w, DEC_1 + 2 * HOUR + 1000).await, 1);
        let st = w.state();
        let job = st.jobs.values().next().expect("a backup job");
        let Some(JobSpec::BackupVm(b)) = &job.spec else {
            panic!("{job:?}")
        };
        assert_eq!(
            (b.snapshot_id.as_str(), b.directory.as_str()),
            (first[0].as_str(), "/srv/backups/vm1")
        );
        assert_eq!(b.retention, Some(retention(7, 0, 0)));
        assert_eq!(st.tasks[&job.task_id].requested_by, "schedule bk");
        assert_eq!(st.tasks[&job.task_id].kind, "vm.backup");
        assert_eq!(
            tick_but_backups(&w, DEC_1 + 2 * HOUR + 2000).await,
            0,
            "one backup job at a time, and no delete while it writes"
        );
        assert_eq!(end_backups(&w, true).await, first);
        assert_eq!(tick_but_backups(&w, DEC_1 + 3 * HOUR).await, 0);
        assert_eq!(ids(&w), first, "the base stays");

        // Night 2: written; the first snapshot, no longer the base, goes.
        tick_but_backups(&w, DEC_1 + DAY + 2 * HOUR).await;
        tick_but_backups(&w, DEC_1 + DAY + 2 * HOUR + 1000).await;
        let second = end_backups(&w, true).await;
        assert_eq!(second.len(), 1);
        assert_eq!(tick_but_backups(&w, DEC_1 + DAY + 3 * HOUR).await, 1);
        assert_eq!(ids(&w), second);
        let run = &w.state().schedule_runs["bk"];
        assert_eq!(run.backup_snapshot_id, second[0]);

        // Night 3: the backup fails (the task says so, an alert is raised); it is not
        // tried again, and its snapshot goes, the base stays.
        tick_but_backups(&w, DEC_1 + 2 * DAY + 2 * HOUR).await;
        tick_but_backups(&w, DEC_1 + 2 * DAY + 2 * HOUR + 1000).await;
        let third = end_backups(&w, false).await;
        for m in 0..10 {
            tick_but_backups(&w, DEC_1 + 2 * DAY + 3 * HOUR + m * 60_000).await;
        }
        assert_eq!(ids(&w), second);
        let backups = tasks_of(&w, "vm.backup");
        assert_eq!(backups.len(), 3, "each snapshot tried once");
        assert_eq!(backups[2].state, pb::TaskState::Failed as i32);
        assert!(
            w.state()
                .alerts
                .values()
                .any(|a| a.message.contains("vm.backup") && a.message.contains("disk full"))
        );
        let run = &w.state().schedule_runs["bk"];
        assert_eq!(
            (&run.backup_snapshot_id, &run.backup_tried_snapshot_id),
            (&second[0], &third[0])
        );
    }

    #[tokio::test]
    async fn bad_schedules_and_settings_are_refused_and_change_nothing() {
        let w = World::two_hosts_one_running_vm();
        let before = w.state().settings.clone();
        for (bad, why) in [
            (
                pb::Schedule {
                    every_seconds: 30,
                    ..nightly()
                },
                "every_seconds",
            ),
            (
                pb::Schedule {
                    at_seconds: 86_400,
                    ..nightly()
                },
                "at_seconds",
            ),
            (
                pb::Schedule {
                    vm_id: "nope".into(),
                    ..nightly()
                },
                "no VM",
            ),
            (
                pb::Schedule {
                    name: "a b".into(),
                    ..nightly()
                },
                "schedule name",
            ),
            (
                pb::Schedule {
                    kind: pb::ScheduleKind::Unspecified as i32,
                    ..nightly()
                },
                "kind",
            ),
            (
                pb::Schedule {
                    kind: pb::ScheduleKind::Backup as i32,
                    ..nightly()
                },
                "absolute path",
            ),
            (
                pb::Schedule {
                    kind: pb::ScheduleKind::Backup as i32,
                    directory: "/srv/../etc".into(),
                    ..nightly()
                },
                "absolute path",
            ),
            (
                pb::Schedule {
                    directory: "/srv/backups".into(),
                    ..nightly()
                },
                "only a backup schedule",
            ),
        ] {
            let r = commit(&w, Op::SetSchedule(bad)).await;
            assert_ne!(r.code, 0);
            assert!(r.message.contains(why), "{why}: {}", r.message);
        }
        assert_eq!(w.state().settings, before);
        assert_eq!(commit(&w, Op::SetSchedule(nightly())).await.code, 0);
        // UpdatePoolSettings keeps them when left out, refuses a change.
        let mut s = w.state().settings.clone();
        s.schedules.clear();
        s.name = "renamed".into();
        assert_eq!(commit(&w, Op::UpdateSettings(s.clone())).await.code, 0);
        assert_eq!(w.state().settings.schedules, [nightly()]);
        s.schedules = vec![pb::Schedule {
            every_seconds: 3600,
            ..nightly()
        }];
        let r = commit(&w, Op::UpdateSettings(s)).await;
        assert!(r.message.contains("SetSchedule"), "{}", r.message);
        assert_eq!(w.state().settings.schedules, [nightly()]);
        let r = commit(&w, Op::DeleteSchedule(ObjectId { id: "other".into() })).await;
        assert_eq!(r.code, tonic::Code::NotFound as i32);
    }
}
