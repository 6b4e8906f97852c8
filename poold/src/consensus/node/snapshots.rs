//! When a member takes a state-machine snapshot and compacts its log behind it, and how
//! the snapshot leaves the Raft task: encoded here, stored by a thread of its own.

use std::time::{Duration, Instant};

use raft::StateRole;
use raft::eraftpb::SnapshotMetadata;

use super::handle::{NodeConfig, NodeMsg};
use super::{Fatal, Node, storage_failed};
use crate::state::snapshot;

/// A snapshot the writer thread finished with: what cutting the log behind it needs.
pub struct StoredSnapshot {
    /// False when the stored snapshot was as new already (one from the leader).
    written: bool,
    meta: SnapshotMetadata,
    compact_to: u64,
    bytes: usize,
    encode: Duration,
    started: Instant,
    /// The encoded snapshot's buffer, handed back for the next one.
    buffer: Vec<u8>,
}

impl Node {
    /// Every [`snapshot_interval`] applied entries (or when raft-rs needs a newer snapshot
    /// for a follower), encodes the state machine here, where it cannot change underneath,
    /// and hands the bytes to a writer thread: storing and fsyncing them is the slow part,
    /// and every member reaches the same index at about the same time, so doing it here
    /// would stall the whole pool at once. The log is cut once it is durable.
    pub(super) fn maybe_snapshot(&mut self) -> Result<(), Fatal> {
        if self.snapshot_writer.is_some() {
            return Ok(());
        }
        let applied = self.shared.state.read().expect("state lock").applied_index;
        let snap_index = self.raw.store().snapshot_metadata().index;
        let wanted = self.raw.store().take_snapshot_wanted() && applied > snap_index;
        let interval = snapshot_interval(
            self.cfg.snapshot_interval,
            self.cfg.id,
            self.raw.raft.state == StateRole::Leader,
        );
        if !wanted && applied < snap_index + interval {
            return Ok(());
        }
        let started = Instant::now();
        let mut data = std::mem::take(&mut self.snapshot_buffer);
        snapshot::encode_into(&self.shared.state.read().expect("state lock"), &mut data);
        let encode = started.elapsed();
        let meta = self
            .raw
            .store()
            .snapshot_metadata_at(applied, &self.conf_state)?;
        let writer = self.raw.store().snapshot_writer();
        let tx = self.node_tx.clone();
        let compact_to = applied.saturating_sub(self.cfg.snapshot_keep_entries);
        let thread = std::thread::Builder::new()
            .name(format!("raft-{}-snap", self.cfg.id))
            .spawn(move || {
                let outcome = writer.store(&meta, &data).map(|written| StoredSnapshot {
                    written,
                    meta,
                    compact_to,
                    bytes: data.len(),
                    encode,
                    started,
                    buffer: data,
                });
                let _ = tx.send(NodeMsg::SnapshotStored(outcome));
            })
            .map_err(Fatal::SnapshotThread)?;
        self.snapshot_writer = Some(thread);
        Ok(())
    }

    /// The writer thread is done: on success the log is cut behind the snapshot.
    pub(super) fn snapshot_stored(&mut self, outcome: Result<StoredSnapshot, raft::Error>) {
        if let Some(w) = self.snapshot_writer.take() {
            let _ = w.join();
        }
        let mut done = match outcome {
            Ok(done) => done,
            Err(e) => storage_failed(&Fatal::Storage(e)),
        };
        self.snapshot_buffer = std::mem::take(&mut done.buffer);
        let index = done.meta.index;
        if !done.written {
            tracing::info!(
                index,
                "a newer snapshot was stored meanwhile; this one is dropped"
            );
            return;
        }
        self.shared.metrics.snapshot_bytes.set(done.bytes as u64);
        if let Err(e) = self
            .raw
            .mut_store()
            .snapshot_stored(done.meta, done.compact_to)
        {
            storage_failed(&Fatal::Storage(e));
        }
        tracing::info!(
            index,
            compact_to = done.compact_to,
            bytes = done.bytes,
            encode_ms = done.encode.as_millis() as u64,
            total_ms = done.started.elapsed().as_millis() as u64,
            "took a state snapshot and compacted the log"
        );
    }
}

/// Entries between two snapshots of a member. Encoding one stops the Raft task for a
/// while: on the leader that stops every write, so the leader takes one a quarter as
/// often (its log, kept in memory, grows to four intervals); followers' intervals differ
/// by id, so theirs drift apart instead of coming at the same index, and the leader seldom
/// waits on two stalled followers at once.
pub(super) fn snapshot_interval(base: u64, id: u64, leader: bool) -> u64 {
    if leader {
        base.saturating_mul(4)
    } else {
        base.saturating_add(base / 4 * (id % 4))
    }
}

/// The log entries a member keeps in memory at most in steady work: its snapshot interval,
/// the tail kept behind a snapshot, and a little for the snapshot being written; capped,
/// since a very long interval is better grown into than reserved.
pub(super) fn log_room(cfg: &NodeConfig, leader: bool) -> usize {
    let interval = snapshot_interval(cfg.snapshot_interval, cfg.id, leader);
    let room = interval
        .saturating_add(interval / 8)
        .saturating_add(cfg.snapshot_keep_entries);
    room.min(1 << 20) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_leader_snapshots_least_often_and_followers_apart() {
        assert_eq!(snapshot_interval(50_000, 1, true), 200_000);
        assert_eq!(snapshot_interval(50_000, 2, true), 200_000);
        let followers: Vec<u64> = (1..=4)
            .map(|id| snapshot_interval(50_000, id, false))
            .collect();
        assert_eq!(followers, vec![62_500, 75_000, 87_500, 50_000]);
        assert_eq!(snapshot_interval(1, 3, false), 1);
        assert_eq!(snapshot_interval(u64::MAX, 7, true), u64::MAX);
    }

    #[test]
    fn the_log_room_covers_an_interval_and_the_kept_tail_up_to_a_cap() {
        let cfg = NodeConfig::new(2, "p");
        let (follower, leader) = (log_room(&cfg, false), log_room(&cfg, true));
        assert!(follower as u64 >= 75_000 + cfg.snapshot_keep_entries);
        assert!(leader as u64 >= 200_000 + cfg.snapshot_keep_entries);
        let huge = NodeConfig {
            snapshot_interval: u64::MAX,
            ..NodeConfig::new(2, "p")
        };
        assert_eq!(log_room(&huge, true), 1 << 20);
    }
}
