//! What goes next: callers' requests wait in the session's queue until the CmdSN window,
//! the queue depth and the send buffer let them go. Task management, pings and logout
//! skip the window; journal replays and our own flushes go before callers' commands.

use std::sync::atomic::Ordering;

use iscsi_pdu::bhs::RESERVED_TAG;
use iscsi_pdu::serial;
use tokio::time::Instant;

use super::slots::Owner;
use super::{Engine, Leaving, Why};
use crate::error::Error;
use crate::journal;
use crate::task::{Command, Done, Op, Request};

/// Bytes queued for sending above which no new command is started.
const TX_HIGH_WATER: usize = 8 << 20;

impl Engine<'_> {
    /// Sends what the queue holds as far as the window, the queue depth and the send
    /// buffer allow.
    pub(super) fn pump(&mut self) {
        if self.immediate_queued > 0 {
            let mut i = 0;
            while i < self.queue.len() && self.immediate_queued > 0 {
                if self.queue[i].is_scsi() {
                    i += 1;
                    continue;
                }
                let r = self.queue.remove(i).expect("index checked");
                self.immediate_queued -= 1;
                self.send_immediate(r);
            }
        }
        self.pump_own();
        // Callers' commands wait until every replay is done.
        while self.replay.is_empty() && self.replaying.is_empty() {
            let Some(front) = self.queue.front() else {
                break;
            };
            if front.abandoned() {
                self.queue.pop_front();
                continue;
            }
            let write = front
                .command()
                .is_some_and(|c| journal::kind(&c.cdb) == journal::Kind::Volatile);
            if write && self.own_flushes > 0 && self.journal.full() {
                // The journal is full and our flush will empty it: writes wait for it
                // rather than push out entries a replay would need.
                break;
            }
            if !self.can_send_command() {
                break;
            }
            let req = self.queue.pop_front().expect("front checked");
            self.send_command(Owner::Caller(req));
        }
        if self.queue.is_empty() || serial::le(self.cmd_sn, self.max_cmd_sn) {
            self.window_closed_since = None;
        }
        if let Some(Leaving::Draining { why, until }) = self.leaving
            && (self.scsi_in_flight == 0 || Instant::now() >= until)
        {
            self.send_logout(why);
        }
    }

    /// Whether one more SCSI command may go now: window open, queue depth and send
    /// buffer not exhausted, not leaving.
    fn can_send_command(&mut self) -> bool {
        let depth = self.cfg.limits.queue_depth.max(1) as usize;
        if self.leaving.is_some()
            || self.scsi_in_flight >= depth
            || self.tx.len() > TX_HIGH_WATER
            || self.slots.full()
        {
            return false;
        }
        if !serial::le(self.cmd_sn, self.max_cmd_sn) {
            self.window_closed_since.get_or_insert_with(Instant::now);
            return false;
        }
        true
    }

    /// Replays journaled writes (never two overlapping ones at once, so none can land
    /// after a newer one), and flushes by ourselves when the journal is over its limit.
    fn pump_own(&mut self) {
        while let Some((e, _)) = self.replay.front() {
            if self.replaying.iter().any(|r| r.overlaps(e)) || !self.can_send_command() {
                return;
            }
            let (entry, attempts) = self.replay.pop_front().expect("front checked");
            self.replaying.push(entry.clone());
            self.counters.replayed.fetch_add(1, Ordering::Relaxed);
            let cmd = entry.command();
            self.send_command(Owner::Replay {
                entry,
                cmd,
                attempts,
            });
        }
        if !self.replaying.is_empty()
            || self.own_flushes > 0
            || !self.journal.wants_flush()
            || Instant::now() < self.own_flush_after
        {
            return;
        }
        let mut luns: Vec<u64> = self.journal.entries().map(|e| e.lun).collect();
        luns.sort_unstable();
        luns.dedup();
        for lun in luns {
            if !self.can_send_command() {
                return;
            }
            let cdb = crate::scsi::sync_cache::cdb();
            self.own_flushes += 1;
            self.send_command(Owner::Flush {
                cmd: Command::new(lun, &cdb),
            });
        }
    }

    fn send_immediate(&mut self, req: Request) {
        if req.abandoned() {
            return;
        }
        let limit = self.cfg.timeouts.task_management;
        if self.slots.full() && !matches!(req.op, Op::Logout) {
            req.finish(Err(Error::InvalidArgument {
                reason: "too many tasks in flight".into(),
            }));
            return;
        }
        match &req.op {
            Op::TaskManagement { function, lun } => {
                let (function, lun) = (*function, *lun);
                let itt = self.new_task(Owner::Caller(req), self.cmd_sn, limit);
                self.push_tmf(function, lun, itt, RESERVED_TAG, 0);
            }
            Op::Ping => {
                let itt = self.new_task(Owner::Caller(req), self.cmd_sn, limit);
                self.push_ping(itt);
            }
            Op::Logout => {
                if self.leaving.is_none() && self.logout_reply.is_none() {
                    self.logout_reply = Some(req);
                    self.begin_leaving(Why::User);
                } else if self.logout_reply.is_none() {
                    self.logout_reply = Some(req);
                } else {
                    req.finish(Ok(Done::Logout));
                }
            }
            Op::Scsi(_) => unreachable!("SCSI commands are not immediate"),
        }
    }
}
