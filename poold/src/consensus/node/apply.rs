//! Applying committed entries to the state machine, and sending their proposers' answers.

use std::time::Instant;

use prost::Message as _;
use raft::eraftpb::{Entry, EntryType};

use super::{Fatal, Node};
use crate::state::command::{Command, CommandResult, Op};

impl Node {
    /// Applies `entries` in order under one write lock of the state, then hands the
    /// answers of this member's proposals to the replier in one batch. The metrics of
    /// each host report applied go into the member's history, timed by the samples' own
    /// `at` (the state machine itself keeps only the latest).
    pub(super) fn apply(&mut self, entries: Vec<Entry>) -> Result<(), Fatal> {
        if entries.is_empty() {
            return Ok(());
        }
        let mut last = 0;
        let mut answers = Vec::new();
        {
            // The state stays locked across the batch while `apply_conf_change` borrows
            // `self` mutably: the lock is taken through a second handle to `shared`.
            let shared = self.shared.clone();
            let mut state = shared.state.write().expect("state lock");
            let mut feed = shared.feed.lock().expect("feed lock");
            let mut history = shared.history.lock().expect("history lock");
            let mut reported = false;
            for e in entries {
                let started = Instant::now();
                last = e.index;
                let pid = self.own_proposal(&e.context);
                let outcome = match e.entry_type {
                    EntryType::EntryNormal => {
                        if e.data.is_empty() {
                            // A new leader's empty entry.
                            state.applied_index = e.index;
                            continue;
                        }
                        let result = match Command::decode(e.data.as_ref()) {
                            Ok(cmd) => {
                                let result = state.apply(e.index, &cmd);
                                if result.code == 0
                                    && let Some(Op::HostReport(r)) = &cmd.op
                                    && let Some(m) = &r.metrics
                                {
                                    for earlier in &r.earlier_metrics {
                                        history.record(&state, &r.host_id, earlier);
                                    }
                                    history.record(&state, &r.host_id, m);
                                    reported = true;
                                }
                                result
                            }
                            Err(err) => {
                                state.applied_index = e.index;
                                CommandResult::error(
                                    tonic::Code::Internal,
                                    format!("undecodable command at index {}: {err}", e.index),
                                )
                            }
                        };
                        Ok((result, e.index))
                    }
                    EntryType::EntryConfChangeV2 | EntryType::EntryConfChange => {
                        self.apply_conf_change(&mut state, &e)?
                    }
                };
                let events = state.take_events(e.index);
                if !events.is_empty() {
                    feed.push(events);
                }
                self.shared
                    .metrics
                    .apply_seconds
                    .observe(started.elapsed().as_secs_f64());
                if let Some((reply, proposed)) = pid.and_then(|p| self.proposals.remove(&p)) {
                    self.shared
                        .metrics
                        .proposal_seconds
                        .observe(proposed.elapsed().as_secs_f64());
                    answers.push((reply, outcome));
                }
            }
            // Hosts and VMs removed since take their series with them; checked once a
            // batch, and only when reports came (they do every few seconds).
            if reported {
                history.prune(&state);
            }
        }
        if !answers.is_empty() {
            let _ = self.replier.send(answers);
        }
        self.shared.applied.send_replace(last);
        Ok(())
    }
}
