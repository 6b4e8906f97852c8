//! `poolctl schedule-*`: scheduled VM snapshots, checkpoints and backups with retention,
//! pool settings the coordinator runs as tasks (requested by "schedule NAME").

use std::collections::HashMap;

use anyhow::bail;
use clap::Subcommand;
use pool_client::new_request_id;
use proto::coordinator as pb;

use crate::ctl::{Ctl, call};
use crate::output::{Table, ts};

#[derive(Debug, Subcommand)]
pub enum ScheduleCommand {
    /// Add a schedule, or replace the one named NAME: snapshot (or checkpoint, or back up)
    /// VM every period, keeping what the --keep rules say (all, when none is given). Times
    /// are UTC.
    #[command(name = "schedule-set")]
    Set {
        name: String,
        #[arg(long)]
        vm: String,
        /// The period: a number and s, m, h, d or w (90m, 6h, 1d, 1w).
        #[arg(long, value_parser = parse_period)]
        every: u32,
        /// When in the period: HH:MM from midnight (or from Monday's for a weekly
        /// period), DAY HH:MM for a weekly one (e.g. "sun 03:00"), or a period as --every
        /// takes it. Default: the period's start.
        #[arg(long, value_parser = parse_at)]
        at: Option<u32>,
        /// Checkpoints (memory too; the VM must be running) instead of disk snapshots.
        #[arg(long)]
        checkpoint: bool,
        /// Back the VM up into this directory instead (vm-backup's chain: full, then
        /// incremental); the --keep rules prune its points. An absolute path on the
        /// coordinator members, which write into it as they lead: a shared mount.
        #[arg(long, value_name = "DIR", conflicts_with = "checkpoint")]
        backup_dir: Option<String>,
        /// Keep the newest N.
        #[arg(long, default_value_t = 0)]
        keep_last: u32,
        /// Keep the newest of each of the last N days.
        #[arg(long, default_value_t = 0)]
        keep_daily: u32,
        /// Keep the newest of each of the last N weeks (from Monday).
        #[arg(long, default_value_t = 0)]
        keep_weekly: u32,
        /// Set it, but take and delete nothing until it is set again without this.
        #[arg(long)]
        disabled: bool,
    },
    /// Schedules, with when each runs next and what it last did.
    #[command(name = "schedule-list")]
    List,
    /// Delete a schedule; the snapshots it took stay, as anyone's.
    #[command(name = "schedule-delete")]
    Delete { name: String },
    /// Run a schedule now (its next run stays when it was due).
    #[command(name = "schedule-run")]
    Run { name: String },
}

pub async fn run(ctl: &mut Ctl, command: ScheduleCommand) -> anyhow::Result<()> {
    match command {
        ScheduleCommand::Set {
            name,
            vm,
            every,
            at,
            checkpoint,
            backup_dir,
            keep_last,
            keep_daily,
            keep_weekly,
            disabled,
        } => {
            let vm_id = ctl.vm_id(&vm).await?;
            let at = at.unwrap_or(0);
            if at >= every {
                bail!(
                    "--at {} is not within the period of {}",
                    period(at),
                    period(every)
                );
            }
            let kind = match (&backup_dir, checkpoint) {
                (Some(_), _) => pb::ScheduleKind::Backup,
                (None, true) => pb::ScheduleKind::Checkpoint,
                (None, false) => pb::ScheduleKind::Snapshot,
            };
            let r = call!(
                ctl.client,
                set_schedule,
                pb::SetScheduleRequest {
                    request_id: new_request_id(),
                    schedule: Some(pb::Schedule {
                        name,
                        vm_id,
                        kind: kind as i32,
                        every_seconds: every,
                        at_seconds: at,
                        retention: Some(pb::Retention {
                            keep_last,
                            keep_daily,
                            keep_weekly,
                        }),
                        disabled,
                        directory: backup_dir.unwrap_or_default(),
                    }),
                }
            )?;
            ctl.follow(r).await?;
        }
        ScheduleCommand::List => {
            let r = call!(ctl.client, list_schedules, pb::ListSchedulesRequest {})?;
            let names: HashMap<String, String> = ctl
                .vms()
                .await?
                .into_iter()
                .map(|v| (v.id, v.spec.map(|s| s.name).unwrap_or_default()))
                .collect();
            ctl.print(&schedule_table(r.schedules, &names));
        }
        ScheduleCommand::Delete { name } => {
            let r = call!(
                ctl.client,
                delete_schedule,
                pb::DeleteScheduleRequest {
                    request_id: new_request_id(),
                    name,
                }
            )?;
            ctl.follow(r).await?;
        }
        ScheduleCommand::Run { name } => {
            let r = call!(
                ctl.client,
                run_schedule,
                pb::RunScheduleRequest {
                    request_id: new_request_id(),
                    name,
                }
            )?;
            ctl.follow(r).await?;
        }
    }
    Ok(())
}

fn schedule_table(list: Vec<pb::ScheduleStatus>, vm_names: &HashMap<String, String>) -> Table {
    let mut t = Table::new(&[
        "NAME",
        "VM",
        "KIND",
        "EVERY",
        "AT",
        "KEEP",
        "NEXT",
        "LAST",
        "LAST TASK",
        "SNAPSHOTS",
    ]);
    for st in list {
        let s = st.schedule.unwrap_or_default();
        let kind = match s.kind() {
            pb::ScheduleKind::Checkpoint => "checkpoint".to_owned(),
            pb::ScheduleKind::Backup => format!("backup to {}", s.directory),
            _ => "snapshot".to_owned(),
        };
        let r = s.retention.unwrap_or_default();
        let keep = if r.keep_last == 0 && r.keep_daily == 0 && r.keep_weekly == 0 {
            "all".to_owned()
        } else {
            format!(
                "last {}, daily {}, weekly {}",
                r.keep_last, r.keep_daily, r.keep_weekly
            )
        };
        let next = if s.disabled {
            "disabled".to_owned()
        } else {
            ts(&st.next_due)
        };
        t.row(vec![
            s.name.as_str().into(),
            vm_names
                .get(&s.vm_id)
                .cloned()
                .unwrap_or_else(|| format!("{} (gone)", s.vm_id))
                .into(),
            kind.into(),
            period(s.every_seconds).into(),
            period(s.at_seconds).into(),
            keep.into(),
            next.into(),
            ts(&st.last_due).into(),
            st.last_task_id.into(),
            u64::from(st.snapshots).into(),
        ]);
    }
    t
}

const UNITS: [(char, u32); 5] = [
    ('w', 604_800),
    ('d', 86_400),
    ('h', 3600),
    ('m', 60),
    ('s', 1),
];

/// "90m", "6h", "1d", "1w" → seconds.
fn parse_period(s: &str) -> Result<u32, String> {
    let s = s.trim();
    let unit = s.chars().last().ok_or("an empty period")?;
    let (_, mult) = UNITS
        .iter()
        .find(|(u, _)| *u == unit)
        .ok_or_else(|| format!("{s:?}: a number and s, m, h, d or w (e.g. 6h, 1d)"))?;
    let n: u32 = s[..s.len() - 1]
        .parse()
        .map_err(|_| format!("{s:?}: a number and s, m, h, d or w (e.g. 6h, 1d)"))?;
    n.checked_mul(*mult)
        .filter(|v| *v > 0)
        .ok_or_else(|| format!("{s:?} is out of range"))
}

/// "HH:MM", "DAY HH:MM" (mon..sun) or a period → seconds into the period.
fn parse_at(s: &str) -> Result<u32, String> {
    let s = s.trim().to_ascii_lowercase();
    let (day, time) = match s.split_once(' ') {
        Some((d, t)) => {
            let days = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
            let i = days
                .iter()
                .position(|x| d.starts_with(x))
                .ok_or_else(|| format!("{d:?} is not a day (mon..sun)"))?;
            (i as u32, t.trim().to_owned())
        }
        None => (0, s.clone()),
    };
    let Some((h, m)) = time.split_once(':') else {
        return if day == 0 {
            parse_period(&time)
        } else {
            Err(format!("{time:?}: HH:MM"))
        };
    };
    let h: u32 = h.parse().map_err(|_| format!("{time:?}: HH:MM"))?;
    let m: u32 = m.parse().map_err(|_| format!("{time:?}: HH:MM"))?;
    if h > 23 || m > 59 {
        return Err(format!("{time:?}: HH:MM, 00:00 to 23:59"));
    }
    Ok(day * 86_400 + h * 3600 + m * 60)
}

/// Seconds as the largest whole units: 86400 → "1d", 5400 → "90m", 0 → "0s".
fn period(secs: u32) -> String {
    UNITS
        .iter()
        .find(|(_, m)| secs > 0 && secs.is_multiple_of(*m))
        .map_or_else(|| "0s".to_owned(), |(u, m)| format!("{}{u}", secs / m))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_and_times_parse_as_people_write_them() {
        assert_eq!(parse_period("90m"), Ok(5400));
        assert_eq!(parse_period("1d"), Ok(86_400));
        assert_eq!(parse_period("2w"), Ok(1_209_600));
        assert!(parse_period("1y").is_err());
        assert!(parse_period("0h").is_err());
        assert!(parse_period("h").is_err());
        assert_eq!(parse_at("02:30"), Ok(9000));
        assert_eq!(parse_at("Sun 03:00"), Ok(6 * 86_400 + 3 * 3600));
        assert_eq!(parse_at("45m"), Ok(2700));
        assert!(parse_at("24:00").is_err());
        assert!(parse_at("someday 01:00").is_err());
        assert_eq!(period(86_400), "1d");
        assert_eq!(period(5400), "90m");
        assert_eq!(period(0), "0s");
    }
}
