//! Alerts, as XenServer raises them: a host that stopped heartbeating, a repository over
//! 90% full, an HA restart, a failed task. Apply raises and clears them as it changes the
//! state, with the command's time, so every member holds the same alerts, a new leader
//! has them all, and they reach the change feed as objects of kind "alert".
//!
//! A condition (a host unreachable, a repository full) has at most one open alert, which
//! clears by itself when the condition ends; an event (a restart, a failure) gets one alert
//! each. Either stays on the open list until it clears or someone dismisses it.

#![allow(clippy::result_large_err)]

use proto::coordinator as pb;
use tonic::Code;

use super::PoolState;
use super::command::CommandResult;
use super::machine::{Applied, err};

/// Alerts kept; the oldest closed ones are forgotten first.
pub const ALERTS_KEPT: usize = 1000;
/// A repository whose used space passes this share of its size raises an alert...
pub const SR_FULL_PERCENT: u64 = 90;
/// ... which clears once it is back under this one (no alert storm at the edge).
pub const SR_CLEAR_PERCENT: u64 = 85;

/// Whether the alert is still on the open list.
pub fn is_open(a: &pb::Alert) -> bool {
    a.cleared_at.is_none() && a.dismissed_at.is_none()
}

/// Whether alerts of this kind follow a condition (one open at a time, cleared by the pool)
/// rather than an event.
fn is_condition(kind: pb::AlertKind) -> bool {
    matches!(kind, pb::AlertKind::HostUnreachable | pb::AlertKind::SrFull)
}

impl PoolState {
    /// Raises an alert about `target`, unless it is a condition already open.
    pub(super) fn raise_alert(
        &mut self,
        kind: pb::AlertKind,
        severity: pb::AlertSeverity,
        target: &str,
        message: String,
        at_ms: u64,
    ) {
        if is_condition(kind) && self.open_alert(kind, target).is_some() {
            return;
        }
        self.alert_seq += 1;
        // Fixed-width hex: ids sort as the alerts were raised.
        let id = format!("{:016x}", self.alert_seq);
        self.alerts.insert(
            id.clone(),
            pb::Alert {
                id,
                kind: kind as i32,
                severity: severity as i32,
                target_id: target.to_owned(),
                message,
                raised_at: Some(proto::timestamp(at_ms)),
                ..Default::default()
            },
        );
        self.forget_old_alerts();
    }

    /// Ends the open alert of a condition about `target`, if there is one.
    pub(super) fn clear_alert(&mut self, kind: pb::AlertKind, target: &str, at_ms: u64) {
        if let Some(id) = self.open_alert(kind, target)
            && let Some(a) = self.alerts.get_mut(&id)
        {
            a.cleared_at = Some(proto::timestamp(at_ms));
        }
    }

    fn open_alert(&self, kind: pb::AlertKind, target: &str) -> Option<String> {
        // Newest first: an open alert is almost always a recent one.
        self.alerts
            .values()
            .rev()
            .find(|a| a.kind == kind as i32 && a.target_id == target && is_open(a))
            .map(|a| a.id.clone())
    }

    pub(super) fn dismiss_alert(
        &mut self,
        id: &str,
        by: &str,
        at_ms: u64,
    ) -> Result<Applied, CommandResult> {
        let a = self
            .alerts
            .get_mut(id)
            .ok_or_else(|| err(Code::NotFound, format!("no alert with id {id}")))?;
        if a.dismissed_at.is_none() {
            a.dismissed_at = Some(proto::timestamp(at_ms));
            a.dismissed_by = by.to_owned();
        }
        Ok(Applied::done(id))
    }

    /// Keeps [`ALERTS_KEPT`]: the oldest closed alerts go first, then the oldest open ones.
    fn forget_old_alerts(&mut self) {
        while self.alerts.len() > ALERTS_KEPT {
            let victim = self
                .alerts
                .values()
                .find(|a| !is_open(a))
                .or_else(|| self.alerts.values().next())
                .map(|a| a.id.clone())
                .expect("more than none");
            self.alerts.remove(&victim);
        }
    }

    /// Raises or clears each repository's "full" alert from its latest usage.
    pub(super) fn check_sr_space(&mut self, sr_id: &str, at_ms: u64) {
        let Some(sr) = self.srs.get(sr_id) else {
            return;
        };
        let Some(u) = sr.usage.filter(|u| u.total_bytes > 0) else {
            return;
        };
        let percent = u.used_bytes.saturating_mul(100) / u.total_bytes;
        if percent >= SR_FULL_PERCENT {
            let message = format!(
                "storage repository {} is {percent}% full ({} of {} bytes used)",
                sr.name, u.used_bytes, u.total_bytes
            );
            self.raise_alert(
                pb::AlertKind::SrFull,
                pb::AlertSeverity::Warning,
                sr_id,
                message,
                at_ms,
            );
        } else if percent < SR_CLEAR_PERCENT {
            self.clear_alert(pb::AlertKind::SrFull, sr_id, at_ms);
        }
    }

    /// The name people know a host by, for alert messages.
    pub(super) fn host_name(&self, id: &str) -> String {
        self.hosts
            .get(id)
            .map_or_else(|| id.to_owned(), |h| h.name.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::super::command::{MarkUnreachable, Op, SrFigures, StorageRefresh};
    use super::super::machine::tests::{cmd, join, report};
    use super::*;

    fn state() -> PoolState {
        PoolState::new("p", Default::default())
    }

    fn open(s: &PoolState) -> Vec<&pb::Alert> {
        s.alerts.values().filter(|a| is_open(a)).collect()
    }

    #[test]
    fn a_condition_raises_one_alert_until_it_clears_and_events_one_each() {
        let mut s = state();
        let (host, warn) = (pb::AlertKind::HostUnreachable, pb::AlertSeverity::Warning);
        s.raise_alert(host, warn, "h1", "h1 down".into(), 10);
        s.raise_alert(host, warn, "h1", "h1 down".into(), 20);
        assert_eq!(open(&s).len(), 1, "one open alert per condition");
        s.clear_alert(host, "h1", 30);
        assert!(open(&s).is_empty());
        assert_eq!(
            s.alerts.values().next().unwrap().cleared_at,
            Some(proto::timestamp(30))
        );
        s.raise_alert(host, warn, "h1", "h1 down again".into(), 40);
        assert_eq!(open(&s).len(), 1, "the condition came back: a new alert");
        let failed = pb::AlertKind::TaskFailed;
        s.raise_alert(failed, pb::AlertSeverity::Error, "t1", "x".into(), 50);
        s.raise_alert(failed, pb::AlertSeverity::Error, "t1", "x".into(), 60);
        assert_eq!(open(&s).len(), 3, "every event counts");
        // Ids sort as raised.
        let ids: Vec<_> = s.alerts.keys().cloned().collect();
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(ids, sorted);
    }

    #[test]
    fn a_dismissed_alert_leaves_the_open_list_and_unknown_ids_are_refused() {
        let mut s = state();
        s.raise_alert(
            pb::AlertKind::HaRestart,
            pb::AlertSeverity::Warning,
            "vm1",
            "restarted".into(),
            1,
        );
        let id = s.alerts.keys().next().unwrap().clone();
        s.dismiss_alert(&id, "admin", 5).unwrap();
        assert!(open(&s).is_empty());
        assert_eq!(s.alerts[&id].dismissed_by, "admin");
        let e = s.dismiss_alert("nope", "admin", 6).unwrap_err();
        assert_eq!(e.code, Code::NotFound as i32);
    }

    #[test]
    fn the_kept_alerts_are_bounded_closed_ones_forgotten_first() {
        let mut s = state();
        let (host, warn) = (pb::AlertKind::HostUnreachable, pb::AlertSeverity::Warning);
        // One open condition, then many closed events.
        s.raise_alert(host, warn, "h1", "down".into(), 1);
        for i in 0..ALERTS_KEPT as u64 + 50 {
            s.raise_alert(pb::AlertKind::HaRestart, warn, "vm", "r".into(), 2 + i);
            let newest = s.alerts.keys().next_back().unwrap().clone();
            s.dismiss_alert(&newest, "a", 3 + i).unwrap();
        }
        assert_eq!(s.alerts.len(), ALERTS_KEPT);
        assert!(
            s.open_alert(host, "h1").is_some(),
            "the open alert outlived newer closed ones"
        );
    }

    fn kinds(s: &PoolState) -> Vec<(pb::AlertKind, String)> {
        open(s)
            .iter()
            .map(|a| (a.kind(), a.target_id.clone()))
            .collect()
    }

    #[test]
    fn a_host_that_stops_heartbeating_raises_one_and_its_return_clears_it() {
        let mut s = state();
        s.apply(1, &cmd("j", 1, join("h1", "10.0.0.1:7000")));
        let down = || {
            Op::MarkUnreachable(MarkUnreachable {
                host_ids: vec!["h1".into()],
            })
        };
        s.apply(2, &cmd("", 2_000, down()));
        s.apply(3, &cmd("", 3_000, down()));
        assert_eq!(
            kinds(&s),
            vec![(pb::AlertKind::HostUnreachable, "h1".to_owned())]
        );
        assert!(open(&s)[0].message.contains("h1"), "{:?}", open(&s)[0]);
        // The alert reaches the change feed.
        let events = s.take_events(3);
        assert!(events.iter().any(|e| e.kind == "alert"), "{events:?}");
        s.apply(4, &cmd("", 4_000, report("h1", 8, 2)));
        assert!(kinds(&s).is_empty(), "back: cleared");
        let a = s.alerts.values().next().unwrap();
        assert_eq!(a.cleared_at, Some(proto::timestamp(4_000)));
    }

    #[test]
    fn a_repository_over_ninety_percent_raises_one_and_clears_under_eighty_five() {
        let mut s = state();
        s.apply(
            1,
            &cmd(
                "sr",
                1,
                Op::CreateSr(pb::StorageRepository {
                    id: "sr1".into(),
                    name: "fast".into(),
                    address: "10.0.0.9:7300".into(),
                    ..Default::default()
                }),
            ),
        );
        let used = |percent: u64| {
            Op::StorageRefresh(StorageRefresh {
                srs: vec![SrFigures {
                    sr_id: "sr1".into(),
                    reachable: true,
                    usage: Some(proto::storage::PoolUsage {
                        total_bytes: 1000,
                        used_bytes: percent * 10,
                        ..Default::default()
                    }),
                    ..Default::default()
                }],
            })
        };
        for (i, (percent, open_after)) in [(50, 0), (90, 1), (95, 1), (87, 1), (84, 0), (91, 1)]
            .into_iter()
            .enumerate()
        {
            let i = i as u64 + 2;
            s.apply(i, &cmd("", i * 1000, used(percent)));
            assert_eq!(kinds(&s).len(), open_after, "at {percent}%");
        }
        assert_eq!(s.alerts.len(), 2, "one per crossing");
        assert!(
            open(&s)[0].message.contains("fast is 91% full"),
            "{:?}",
            open(&s)[0]
        );
    }

    #[test]
    fn alerts_survive_a_snapshot() {
        let mut s = state();
        s.raise_alert(
            pb::AlertKind::TaskFailed,
            pb::AlertSeverity::Error,
            "t1",
            "task vm.migrate failed: no room".into(),
            7,
        );
        let back = crate::state::snapshot::decode(&crate::state::snapshot::encode(&s)).unwrap();
        assert_eq!(back.alerts, s.alerts);
        assert_eq!(back.alert_seq, 1);
    }

    #[test]
    fn a_failed_job_raises_one_a_cancelled_one_none() {
        use super::super::command::{Command, CreateSrJob, FinishJob, Job, JobSpec};
        let mut s = state();
        let start = |s: &mut PoolState, n: u64, task: &str| {
            let job = Job {
                spec: Some(JobSpec::CreateSr(CreateSrJob {
                    sr: Some(pb::StorageRepository {
                        id: format!("sr-{task}"),
                        name: format!("sr-{task}"),
                        address: "10.0.0.9:7300".into(),
                        thin_pool_id: "tp".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                })),
                ..Default::default()
            };
            let r = s.apply(
                n,
                &Command {
                    task_id: task.into(),
                    at_ms: n,
                    op: Some(Op::StartJob(job)),
                    ..Default::default()
                },
            );
            assert_eq!(r.code, 0, "{}", r.message);
        };
        let finish = |s: &mut PoolState, n: u64, task: &str, code: Code| {
            s.apply(
                n,
                &cmd(
                    "",
                    n,
                    Op::FinishJob(FinishJob {
                        task_id: task.into(),
                        code: code as i32,
                        message: "storaged refused".into(),
                        ..Default::default()
                    }),
                ),
            );
        };
        start(&mut s, 1, "t1");
        finish(&mut s, 2, "t1", Code::Unavailable);
        start(&mut s, 3, "t2");
        finish(&mut s, 4, "t2", Code::Cancelled);
        assert_eq!(
            kinds(&s),
            vec![(pb::AlertKind::TaskFailed, "t1".to_owned())]
        );
        assert!(
            open(&s)[0].message.ends_with("failed: storaged refused"),
            "{:?}",
            open(&s)[0]
        );
    }
}
