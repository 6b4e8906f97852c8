//! What the node task measures for Prometheus (`GET /metrics` on the web port, `web.rs`),
//! beside the status it publishes: how long proposals wait for their answer and entries
//! take to apply, leadership changes, the size of the last snapshot. The names are
//! listed in `docs/metrics.md`.

use std::borrow::Cow;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use raft::StateRole;

use super::handle::NodeStatus;

/// Counters and histograms the node task feeds as it runs.
#[derive(Debug)]
pub struct NodeMetrics {
    /// From a proposal reaching the node task to its entry applied here (leader only).
    pub proposal_seconds: Histogram,
    /// One committed entry applied to the state machine.
    pub apply_seconds: Histogram,
    /// Times this member saw a new leader.
    pub leader_changes: Counter,
    /// The encoded size of the last state-machine snapshot stored or installed here.
    pub snapshot_bytes: Gauge<u64, AtomicU64>,
}

impl Default for NodeMetrics {
    fn default() -> Self {
        NodeMetrics {
            // 100 µs to 3.3 s: one fsync on a fast disk to an election's worth of waiting.
            proposal_seconds: Histogram::new(exponential_buckets(0.000_1, 2.0, 16)),
            // 1 µs to 33 ms: most entries are a few map updates.
            apply_seconds: Histogram::new(exponential_buckets(0.000_001, 2.0, 16)),
            leader_changes: Counter::default(),
            snapshot_bytes: Gauge::default(),
        }
    }
}

/// The scrape of this member now; every series carries the member's id as `member`.
pub fn encode_scrape(status: &NodeStatus, metrics: &NodeMetrics) -> String {
    let member = [(Cow::Borrowed("member"), Cow::Owned(status.id.to_string()))];
    let mut r = Registry::with_prefix_and_labels("poold", member.into_iter());
    for (name, help, value) in [
        ("raft_term", "The member's current Raft term.", status.term),
        (
            "raft_commit_index",
            "The highest log index the member knows committed.",
            status.commit_index,
        ),
        (
            "raft_applied_index",
            "The highest log index applied to the member's state machine.",
            status.applied_index,
        ),
        (
            "raft_last_log_index",
            "The last index of the member's log.",
            status.last_log_index,
        ),
        (
            "raft_snapshot_index",
            "The log index the member's latest snapshot covers.",
            status.snapshot_index,
        ),
        (
            "raft_leader_id",
            "The member this member takes for leader (0: none known).",
            status.leader_id,
        ),
        (
            "raft_is_leader",
            "1 while this member leads, else 0.",
            u64::from(status.role == StateRole::Leader),
        ),
        (
            "raft_voters",
            "Voting members in the member's configuration.",
            status.voters.len() as u64,
        ),
        (
            "raft_snapshot_bytes",
            "Encoded size of the last state-machine snapshot stored or installed here.",
            metrics.snapshot_bytes.get(),
        ),
    ] {
        r.register(name, help, ConstGauge::new(value));
    }
    r.register(
        "raft_leader_changes",
        "Times this member saw a new leader since it started.",
        ConstCounter::new(metrics.leader_changes.get()),
    );
    r.register(
        "raft_snapshots_installed",
        "Snapshots from the leader installed since this member started.",
        ConstCounter::new(status.snapshots_installed),
    );
    r.register(
        "raft_proposal_duration_seconds",
        "From a proposal reaching the leader's Raft task to its entry applied there.",
        metrics.proposal_seconds.clone(),
    );
    r.register(
        "raft_apply_duration_seconds",
        "Time to apply one committed entry to the state machine.",
        metrics.apply_seconds.clone(),
    );
    let mut out = String::new();
    encode(&mut out, &r).expect("writing to a String cannot fail");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_members_status_and_timings_scrape_under_its_id() {
        let status = NodeStatus {
            id: 2,
            term: 3,
            commit_index: 40,
            applied_index: 39,
            role: StateRole::Leader,
            ..Default::default()
        };
        let m = NodeMetrics::default();
        m.apply_seconds.observe(0.000_003);
        m.leader_changes.inc();
        m.snapshot_bytes.set(1234);
        let text = encode_scrape(&status, &m);
        for line in [
            r#"poold_raft_term{member="2"} 3"#,
            r#"poold_raft_applied_index{member="2"} 39"#,
            r#"poold_raft_is_leader{member="2"} 1"#,
            r#"poold_raft_snapshot_bytes{member="2"} 1234"#,
            r#"poold_raft_leader_changes_total{member="2"} 1"#,
            r#"poold_raft_apply_duration_seconds_count{member="2"} 1"#,
            r#"poold_raft_proposal_duration_seconds_count{member="2"} 0"#,
            "# EOF",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing from:\n{text}"
            );
        }
    }
}
