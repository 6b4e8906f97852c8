//! What each PDU from the target does: SCSI responses and Data-In complete commands (and
//! keep the journal), R2Ts draw Data-Out, NOP-Ins answer or ask for pings, and task
//! management, logout, asynchronous messages and rejects change the tasks in flight.
//! Every PDU first moves StatSN and the CmdSN window on.

use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use iscsi_pdu::bhs::{
    self, BHS_LEN, DataIn, Header, NopIn, NopOut, Opcode, R2t, RESERVED_TAG, ScsiResponse,
    TaskMgmtResponse, async_event, reject_reason, tmf,
};
use iscsi_pdu::frame::RawPdu;
use iscsi_pdu::serial;
use tokio::time::Instant;

use super::slots::Owner;
use super::{Engine, Exit, Leaving, Why};
use crate::connection::ConnError;
use crate::error::Error;
use crate::journal;
use crate::scsi::sense::{self, CommandInfo, Verdict};
use crate::task::{Done, Op, Outcome, Request};

impl Engine<'_> {
    pub(super) fn handle(&mut self, pdu: RawPdu) -> Result<(), ConnError> {
        let h = pdu.header().map_err(ConnError::Pdu)?;
        self.note_numbers(&h);
        match h {
            Header::DataIn(d) => self.data_in(d, pdu.data),
            Header::ScsiResponse(r) => self.scsi_response(r, pdu.data),
            Header::R2t(r) => self.r2t(r),
            Header::NopIn(n) => {
                self.nop_in(n, pdu.data);
                Ok(())
            }
            Header::TaskMgmtResponse(t) => self.tmf_response(t),
            Header::LogoutResponse(l) => {
                self.logout_response(l.itt, l.response);
                Ok(())
            }
            Header::AsyncMessage(m) => {
                self.async_message(m, &pdu.data);
                Ok(())
            }
            Header::Reject(r) => self.reject(r.reason, &pdu.data),
            Header::TextResponse(t) => {
                tracing::debug!(itt = t.itt, "unsolicited text response ignored");
                Ok(())
            }
            other => Err(ConnError::protocol(format!(
                "{:?} from the target in the full feature phase",
                other.opcode()
            ))),
        }
    }

    /// StatSN and the CmdSN window from any target PDU that carries them.
    pub(super) fn note_numbers(&mut self, h: &Header) {
        let (stat, window) = match h {
            Header::ScsiResponse(r) => (Some(r.stat_sn), Some((r.exp_cmd_sn, r.max_cmd_sn))),
            Header::DataIn(d) => (
                d.has_status.then_some(d.stat_sn),
                Some((d.exp_cmd_sn, d.max_cmd_sn)),
            ),
            Header::R2t(r) => (None, Some((r.exp_cmd_sn, r.max_cmd_sn))),
            Header::NopIn(n) => (
                (n.itt != RESERVED_TAG).then_some(n.stat_sn),
                Some((n.exp_cmd_sn, n.max_cmd_sn)),
            ),
            Header::TaskMgmtResponse(t) => (Some(t.stat_sn), Some((t.exp_cmd_sn, t.max_cmd_sn))),
            Header::LogoutResponse(l) => (Some(l.stat_sn), Some((l.exp_cmd_sn, l.max_cmd_sn))),
            Header::TextResponse(t) => (Some(t.stat_sn), Some((t.exp_cmd_sn, t.max_cmd_sn))),
            Header::AsyncMessage(m) => (Some(m.stat_sn), Some((m.exp_cmd_sn, m.max_cmd_sn))),
            Header::Reject(r) => (Some(r.stat_sn), Some((r.exp_cmd_sn, r.max_cmd_sn))),
            _ => (None, None),
        };
        if let Some(s) = stat
            && serial::ge(s, self.exp_stat_sn)
        {
            self.exp_stat_sn = s.wrapping_add(1);
        }
        if let Some((exp, max)) = window
            // A MaxCmdSN below ExpCmdSN - 1 is invalid and ignored (RFC 7143 §4.2.2.1).
            && serial::ge(max, exp.wrapping_sub(1))
        {
            if serial::gt(exp, self.exp_cmd_sn) {
                self.exp_cmd_sn = exp;
            }
            if serial::gt(max, self.max_cmd_sn) {
                self.max_cmd_sn = max;
            }
        }
    }

    fn data_in(&mut self, d: DataIn, data: Bytes) -> Result<(), ConnError> {
        let Some(task) = self.slots.get_mut(d.itt) else {
            tracing::trace!(itt = d.itt, "Data-In for a task no longer here");
            return Ok(());
        };
        let expected_sn = task.next_data_sn;
        let Some(cmd) = task.command() else {
            return Err(ConnError::protocol(
                "Data-In for a task that is not a command",
            ));
        };
        let offset = d.buffer_offset as usize;
        if d.data_sn != expected_sn {
            return Err(ConnError::protocol(format!(
                "Data-In DataSN {} where {expected_sn} was due",
                d.data_sn
            )));
        }
        if offset + data.len() > cmd.data_in.len() {
            return Err(ConnError::protocol(format!(
                "Data-In of {} bytes at {offset} beyond the {} expected",
                data.len(),
                cmd.data_in.len()
            )));
        }
        cmd.data_in[offset..offset + data.len()].copy_from_slice(&data);
        self.data_in_placed(d, data.len())
    }

    /// Accounts for a Data-In whose data is in place; completes the command when it
    /// carries the status.
    pub(super) fn data_in_placed(&mut self, d: DataIn, len: usize) -> Result<(), ConnError> {
        let Some(task) = self.slots.get_mut(d.itt) else {
            return Ok(());
        };
        task.next_data_sn = task.next_data_sn.wrapping_add(1);
        task.received = task.received.max(d.buffer_offset as usize + len);
        if !d.has_status {
            return Ok(());
        }
        if !d.final_ {
            return Err(ConnError::protocol("Data-In with status but without F"));
        }
        self.complete_scsi(d.itt, 0, d.status, None);
        Ok(())
    }

    fn scsi_response(&mut self, r: ScsiResponse, data: Bytes) -> Result<(), ConnError> {
        if self.slots.get_mut(r.itt).is_some_and(|t| !t.is_scsi()) {
            return Err(ConnError::protocol(
                "SCSI Response for a task that is not a command",
            ));
        }
        let sense = if data.len() >= 2 {
            let n = usize::from(u16::from_be_bytes([data[0], data[1]]));
            (n > 0).then(|| data.slice(2..(2 + n).min(data.len())))
        } else {
            None
        };
        self.complete_scsi(r.itt, r.response, r.status, sense);
        Ok(())
    }

    fn complete_scsi(&mut self, itt: u32, response: u8, status: u8, sense: Option<Bytes>) {
        let Some(task) = self.slots.remove(itt) else {
            tracing::trace!(itt, "response for a task no longer here");
            return;
        };
        if let Some(abort) = task.aborting {
            // The command finished after all: forget the abort's victim.
            if let Some(a) = self.slots.get_mut(abort) {
                a.owner = Owner::Abort {
                    victim: RESERVED_TAG,
                };
            }
        }
        self.scsi_in_flight -= 1;
        self.completed += 1;
        self.counters
            .in_flight
            .store(self.scsi_in_flight as u64, Ordering::Relaxed);
        let good = response == 0 && status == sense::status::GOOD;
        match task.owner {
            Owner::Caller(req) => {
                let Request { op, reply, .. } = req;
                let Op::Scsi(command) = op else {
                    return;
                };
                let mut writes_lost = false;
                if good {
                    match journal::kind(&command.cdb) {
                        journal::Kind::Volatile => self.journal.record(&command),
                        journal::Kind::Flush => {
                            self.journal.flushed(command.lun, task.flush_mark);
                            writes_lost = std::mem::take(&mut self.journal.lost);
                        }
                        journal::Kind::Other => {}
                    }
                }
                let _ = reply.send(Ok(Done::Scsi(Outcome {
                    command,
                    received: task.received,
                    response,
                    status,
                    sense,
                    writes_lost,
                })));
            }
            Owner::Replay {
                entry, attempts, ..
            } => {
                self.replaying.retain(|e| e.seq != entry.seq);
                if good {
                    return;
                }
                let info = CommandInfo::named("replayed write");
                let verdict = if response == 0 {
                    sense::classify(&info, status, sense.as_deref())
                } else {
                    Verdict::Retry {
                        delay_ms: 0,
                        why: "target failure",
                    }
                };
                match verdict {
                    Verdict::Done => {}
                    Verdict::Retry { .. } if attempts < self.cfg.max_retries => {
                        self.replay.push_front((entry, attempts + 1));
                    }
                    Verdict::Retry { why, .. } => {
                        tracing::error!(why, "a replayed write kept failing; it may be lost");
                        self.journal.lost = true;
                    }
                    Verdict::Fail(e) => {
                        tracing::error!(error = %e, "the target refused a replayed write; it may be lost");
                        self.journal.lost = true;
                    }
                }
            }
            Owner::Flush { cmd } => {
                self.own_flushes -= 1;
                if good {
                    self.counters.own_flushes.fetch_add(1, Ordering::Relaxed);
                    self.journal.flushed(cmd.lun, task.flush_mark);
                } else {
                    tracing::warn!(status, response, "our own SYNCHRONIZE CACHE failed");
                    self.own_flush_after = Instant::now() + Duration::from_secs(1);
                }
            }
            _ => {}
        }
    }

    fn r2t(&mut self, r: R2t) -> Result<(), ConnError> {
        let Some(task) = self.slots.get_mut(r.itt) else {
            tracing::trace!(itt = r.itt, "R2T for a task no longer here");
            return Ok(());
        };
        if task.aborting.is_some() {
            return Ok(());
        }
        let Some(cmd) = task.command() else {
            return Err(ConnError::protocol("R2T for a task that is not a command"));
        };
        let (offset, len) = (r.buffer_offset as usize, r.desired_len as usize);
        if len == 0 || offset + len > cmd.data_out.len() {
            return Err(ConnError::protocol(format!(
                "R2T for {len} bytes at {offset} of a {}-byte write",
                cmd.data_out.len()
            )));
        }
        let (lun, data) = (cmd.lun, cmd.data_out.clone());
        self.counters.r2ts.fetch_add(1, Ordering::Relaxed);
        self.send_data_out(lun, r.itt, r.ttt, &data, offset, len);
        Ok(())
    }

    fn nop_in(&mut self, n: NopIn, data: Bytes) {
        if n.ttt != RESERVED_TAG {
            // The target pings us: answer with its TTT and its data.
            let h = NopOut {
                immediate: true,
                lun: n.lun,
                itt: RESERVED_TAG,
                ttt: n.ttt,
                cmd_sn: self.cmd_sn,
                exp_stat_sn: self.exp_stat_sn,
            };
            self.counters.target_pings.fetch_add(1, Ordering::Relaxed);
            self.push_pdu(&Header::NopOut(h), data);
        }
        if n.itt == RESERVED_TAG {
            return;
        }
        match self.slots.remove(n.itt).map(|t| t.owner) {
            Some(Owner::KeepAlive) => self.keepalive = None,
            Some(Owner::Caller(req)) => req.finish(Ok(Done::Ping)),
            Some(other) => tracing::debug!(?other, "NOP-In for a task that is not a ping"),
            None => {}
        }
    }

    fn tmf_response(&mut self, t: TaskMgmtResponse) -> Result<(), ConnError> {
        let Some(task) = self.slots.remove(t.itt) else {
            return Ok(());
        };
        match task.owner {
            Owner::Caller(req) => req.finish(Ok(Done::TaskManagement {
                response: t.response,
            })),
            Owner::Abort { victim } => {
                if t.response != tmf::FUNCTION_COMPLETE && t.response != tmf::TASK_DOES_NOT_EXIST {
                    return Err(ConnError::protocol(format!(
                        "ABORT TASK of a timed-out command answered {}",
                        t.response
                    )));
                }
                if let Some(v) = self.slots.remove(victim) {
                    self.scsi_in_flight -= 1;
                    if let Owner::Caller(mut req) = v.owner {
                        req.timeouts += 1;
                        if req.timeouts > self.cfg.max_retries {
                            self.fail_timeout(req);
                        } else {
                            self.counters.retries.fetch_add(1, Ordering::Relaxed);
                            self.queue.push_front(req);
                        }
                    }
                }
            }
            other => {
                return Err(ConnError::protocol(format!(
                    "task management response for {other:?}"
                )));
            }
        }
        Ok(())
    }

    fn logout_response(&mut self, itt: u32, response: u8) {
        if !matches!(self.slots.remove(itt).map(|t| t.owner), Some(Owner::Logout)) {
            tracing::debug!(itt, "logout response for no logout of ours");
            return;
        }
        if response != 0 {
            tracing::warn!(response, "logout answered with an error; closing anyway");
        }
        let why = match self.leaving {
            Some(Leaving::LoggingOut { why }) => why,
            _ => Why::User,
        };
        self.exit = Some(match why {
            Why::Target => Exit::Relogin,
            Why::User | Why::Dropped => Exit::LoggedOut,
        });
    }

    fn async_message(&mut self, m: bhs::AsyncMessage, data: &[u8]) {
        match m.event {
            async_event::SCSI_ASYNC_EVENT => {
                let sense = data.get(2..).and_then(crate::scsi::sense::Sense::parse);
                tracing::info!(?sense, lun = m.lun, "SCSI asynchronous event");
            }
            async_event::LOGOUT_REQUEST => {
                tracing::info!(
                    within_s = m.parameter3,
                    "the target asks us to log out; logging in again afterwards"
                );
                if self.leaving.is_none() {
                    self.begin_leaving(Why::Target);
                }
            }
            async_event::DROPPING_CONNECTION | async_event::DROPPING_ALL_CONNECTIONS => {
                tracing::info!(
                    time2wait = m.parameter2,
                    "the target is dropping the connection"
                );
            }
            other => tracing::debug!(event = other, "asynchronous message ignored"),
        }
    }

    fn reject(&mut self, reason: u8, data: &[u8]) -> Result<(), ConnError> {
        let Some(bhs) = data.first_chunk::<BHS_LEN>() else {
            return Err(ConnError::protocol("Reject without the rejected header"));
        };
        let itt = bhs::itt_of(bhs);
        let opcode = Opcode::from_byte(bhs[0]).ok();
        tracing::warn!(reason, ?opcode, itt, "the target rejected a PDU");
        if reason == reject_reason::DATA_DIGEST_ERROR || opcode == Some(Opcode::DataOut) {
            // At ErrorRecoveryLevel 0 a lost Data-Out cannot be resent alone.
            return Err(ConnError::protocol(format!(
                "Data-Out rejected (reason {reason:#x})"
            )));
        }
        let Some(task) = self.slots.remove(itt) else {
            return Ok(());
        };
        if task.is_scsi() {
            self.scsi_in_flight -= 1;
        }
        match task.owner {
            Owner::Caller(req) => {
                if reason == reject_reason::IMMEDIATE_COMMAND_REJECT
                    || reason == reject_reason::WAITING_FOR_LOGOUT
                {
                    // Not refused for what it is: send it again (after the relogin).
                    self.queue.push_front(req);
                } else {
                    let name = req.name;
                    req.finish(Err(Error::Rejected {
                        command: name,
                        reason,
                    }));
                }
            }
            Owner::KeepAlive => self.keepalive = None,
            Owner::Replay { entry, .. } => {
                self.replaying.retain(|e| e.seq != entry.seq);
                tracing::error!(
                    reason,
                    "the target rejected a replayed write; it may be lost"
                );
                self.journal.lost = true;
            }
            Owner::Flush { .. } => {
                self.own_flushes -= 1;
                self.own_flush_after = Instant::now() + Duration::from_secs(1);
            }
            Owner::Abort { .. } | Owner::Logout => {
                return Err(ConnError::protocol(format!(
                    "the target rejected our {opcode:?} (reason {reason:#x})"
                )));
            }
        }
        Ok(())
    }
}
