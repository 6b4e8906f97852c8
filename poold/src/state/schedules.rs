//! Schedules in the state: `PoolSettings.schedules` changed one at a time, and the jobs
//! their runs and retention start (the leader's loop deciding when is
//! `crate::schedules`). A schedule is named by its name; its snapshots carry it.

#![allow(clippy::result_large_err)]

use proto::coordinator as pb;
use tonic::Code;

use super::command::*;
use super::machine::{Applied, PoolState, err};

/// Periods count from Monday 1970-01-05 00:00 UTC, so a weekly schedule's `at` is from a
/// Monday's midnight and a daily one's from any midnight.
pub const EPOCH_MONDAY_MS: u64 = 4 * 86_400_000;
pub const MIN_EVERY_SECONDS: u32 = 60;
/// A year: a longer period is a typo, not a schedule.
pub const MAX_EVERY_SECONDS: u32 = 366 * 86_400;

fn phase_ms(s: &pb::Schedule) -> (u64, u64) {
    let every = u64::from(s.every_seconds.max(1)) * 1000;
    (EPOCH_MONDAY_MS + u64::from(s.at_seconds) * 1000, every)
}

/// The latest instant the schedule was due at or before `now_ms` (0 before its first).
pub fn latest_due(s: &pb::Schedule, now_ms: u64) -> u64 {
    let (origin, every) = phase_ms(s);
    if now_ms < origin {
        return 0;
    }
    origin + (now_ms - origin) / every * every
}

/// The first instant the schedule is due after `after_ms`.
pub fn next_due(s: &pb::Schedule, after_ms: u64) -> u64 {
    let (origin, every) = phase_ms(s);
    if after_ms < origin {
        return origin;
    }
    latest_due(s, after_ms) + every
}

/// A schedule as the pool accepts it.
pub fn validate_schedule(s: &pb::Schedule) -> Result<(), CommandResult> {
    if s.name.is_empty()
        || s.name.len() > 64
        || !s
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
    {
        return Err(err(
            Code::InvalidArgument,
            format!(
                "schedule name {:?}: 1-64 letters, digits, '-', '_' or '.' (it names the \
                 snapshots it takes)",
                s.name
            ),
        ));
    }
    if s.vm_id.is_empty() {
        return Err(err(Code::InvalidArgument, "a schedule needs a VM (vm_id)"));
    }
    match s.kind() {
        pb::ScheduleKind::Snapshot | pb::ScheduleKind::Checkpoint if !s.directory.is_empty() => {
            return Err(err(
                Code::InvalidArgument,
                "only a backup schedule writes into a directory",
            ));
        }
        pb::ScheduleKind::Snapshot | pb::ScheduleKind::Checkpoint => {}
        pb::ScheduleKind::Backup => check_backup_directory(&s.directory)?,
        pb::ScheduleKind::Unspecified => {
            return Err(err(
                Code::InvalidArgument,
                "a schedule's kind is snapshot, checkpoint or backup",
            ));
        }
    }
    if !(MIN_EVERY_SECONDS..=MAX_EVERY_SECONDS).contains(&s.every_seconds) {
        return Err(err(
            Code::InvalidArgument,
            format!(
                "every_seconds must be {MIN_EVERY_SECONDS}..={MAX_EVERY_SECONDS}, not {}",
                s.every_seconds
            ),
        ));
    }
    if s.at_seconds >= s.every_seconds {
        return Err(err(
            Code::InvalidArgument,
            format!(
                "at_seconds ({}) must be less than every_seconds ({})",
                s.at_seconds, s.every_seconds
            ),
        ));
    }
    Ok(())
}

/// A backup chain's directory as the pool accepts it: absolute, plain (no `.` or `..`
/// component), so that every member names the same place.
pub fn check_backup_directory(d: &str) -> Result<(), CommandResult> {
    let p = std::path::Path::new(d);
    let plain = p.components().all(|c| {
        matches!(
            c,
            std::path::Component::RootDir | std::path::Component::Normal(_)
        )
    });
    if d.is_empty() || !p.is_absolute() || !plain || d.len() > 4096 || d.contains('\0') {
        return Err(err(
            Code::InvalidArgument,
            format!("backup directory {d:?}: an absolute path without . or .. is needed"),
        ));
    }
    Ok(())
}

impl PoolState {
    pub fn schedule(&self, name: &str) -> Option<&pb::Schedule> {
        self.settings.schedules.iter().find(|s| s.name == name)
    }

    /// UpdatePoolSettings carries the schedules it read: kept when unchanged or left
    /// out, refused when changed (SetSchedule and DeleteSchedule change them).
    pub(super) fn keep_schedules(&self, s: &mut pb::PoolSettings) -> Result<(), CommandResult> {
        if s.schedules.is_empty() || s.schedules == self.settings.schedules {
            s.schedules = self.settings.schedules.clone();
            return Ok(());
        }
        Err(err(
            Code::InvalidArgument,
            "schedules are changed with SetSchedule and DeleteSchedule, not UpdatePoolSettings",
        ))
    }

    pub(super) fn set_schedule(
        &mut self,
        s: &pb::Schedule,
        at_ms: u64,
    ) -> Result<Applied, CommandResult> {
        validate_schedule(s)?;
        self.vm(&s.vm_id)?;
        let list = &mut self.settings.schedules;
        match list.iter_mut().find(|o| o.name == s.name) {
            Some(o) => *o = s.clone(),
            None => {
                list.push(s.clone());
                list.sort_by(|a, b| a.name.cmp(&b.name));
            }
        }
        // Due from the next instant on: a new (or re-timed) schedule does not make up the
        // run that was due just before it was set.
        let run = self
            .schedule_runs
            .entry(s.name.clone())
            .or_insert_with(|| ScheduleRun {
                schedule: s.name.clone(),
                ..Default::default()
            });
        run.last_due_ms = run.last_due_ms.max(latest_due(s, at_ms));
        self.marks.pool_touched = true;
        Ok(Applied::done(&s.name))
    }

    pub(super) fn delete_schedule(&mut self, name: &str) -> Result<Applied, CommandResult> {
        if self.schedule(name).is_none() {
            return Err(err(Code::NotFound, format!("no schedule named {name:?}")));
        }
        self.settings.schedules.retain(|s| s.name != name);
        self.schedule_runs.remove(name);
        // Its snapshots are a person's now: no later schedule of that name prunes them.
        let ids: Vec<String> = self
            .vm_snapshots
            .values()
            .filter(|s| s.schedule == name)
            .map(|s| s.id.clone())
            .collect();
        for id in ids {
            if let Some(s) = self.vm_snapshots.get_mut(&id) {
                s.schedule.clear();
            }
        }
        self.marks.pool_touched = true;
        Ok(Applied::done(name))
    }

    /// A schedule's job: a run is recorded (due time, task) even when the job is refused,
    /// and the refusal becomes the task's failure; a retention delete refused is just
    /// refused (the leader tries again later).
    pub(super) fn schedule_job(
        &mut self,
        j: &ScheduleJob,
        task_id: &str,
        at_ms: u64,
    ) -> Result<Applied, CommandResult> {
        let Some(sched) = self.schedule(&j.schedule).cloned() else {
            return Err(err(
                Code::NotFound,
                format!("no schedule named {:?}", j.schedule),
            ));
        };
        let job = j
            .job
            .as_ref()
            .ok_or_else(|| err(Code::InvalidArgument, "a schedule job without its job"))?;
        let run = j.due_at_ms > 0 || j.manual;
        if !run {
            return self.start_job(job, task_id);
        }
        let last = self
            .schedule_runs
            .get(&j.schedule)
            .cloned()
            .unwrap_or_default();
        if !j.manual && j.due_at_ms <= last.last_due_ms {
            return Err(err(
                Code::AlreadyExists,
                format!("schedule {} already ran for {} ms", j.schedule, j.due_at_ms),
            ));
        }
        self.schedule_runs.insert(
            j.schedule.clone(),
            ScheduleRun {
                schedule: j.schedule.clone(),
                last_due_ms: if j.manual {
                    last.last_due_ms
                } else {
                    j.due_at_ms
                },
                last_task_id: task_id.to_owned(),
                ..last
            },
        );
        match self.start_job(job, task_id) {
            Ok(a) => Ok(a),
            Err(refusal) => {
                let message = format!(
                    "task {} failed: schedule {}: {}",
                    job.kind(),
                    j.schedule,
                    refusal.message
                );
                self.raise_alert(
                    pb::AlertKind::TaskFailed,
                    pb::AlertSeverity::Error,
                    task_id,
                    message,
                    at_ms,
                );
                Ok(Applied::failed(sched.vm_id, &refusal))
            }
        }
    }
}
