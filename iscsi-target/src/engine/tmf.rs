//! Task management: ABORT TASK, ABORT/CLEAR TASK SET, the resets, and the response
//! that waits for the aborted commands to finish before it goes out.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use iscsi_pdu::bhs::{self, Header, TaskMgmtRequest, TaskMgmtResponse, tmf};
use iscsi_pdu::serial;

use super::Engine;
use super::wire::send_shared;
use crate::lun::{Lun, push_ua};
use crate::scsi::sense::Sense;
use crate::session::{SessionHandle, TaskEntry, wait_tasks};

impl Engine {
    /// Sends a task management response once `tasks` have finished, from the blocking
    /// pool so the engine keeps serving meanwhile.
    fn respond_tmf_after(
        &mut self,
        itt: u32,
        response: u8,
        tasks: Vec<Arc<TaskEntry>>,
        then_close: Vec<Arc<SessionHandle>>,
    ) {
        let r = TaskMgmtResponse {
            response,
            itt,
            ..Default::default()
        };
        if tasks.is_empty() && then_close.is_empty() {
            self.push(Header::TaskMgmtResponse(r), Bytes::new());
            return;
        }
        if let Err(e) = self.flush() {
            tracing::debug!(error = %e, "send failed");
        }
        let wire = self.wire.clone();
        let sn = self.sn.clone();
        let rt = self.rt.clone();
        self.rt.spawn_blocking(move || {
            rt.block_on(wait_tasks(tasks));
            send_shared(
                &wire,
                &sn,
                vec![(Header::TaskMgmtResponse(r), Bytes::new())],
            );
            for s in then_close {
                s.request_close();
            }
        });
    }

    pub(super) fn task_mgmt(&mut self, t: TaskMgmtRequest) {
        let itt = t.itt;
        let lun_id = bhs::decode_lun(t.lun);
        let lun_exists = self.lun(t.lun).is_some();
        match t.function {
            tmf::ABORT_TASK => {
                let r = t.referenced_task_tag;
                if self.drop_pending(r) || self.held.remove(&t.ref_cmd_sn).is_some() {
                    self.respond_tmf_after(itt, tmf::FUNCTION_COMPLETE, Vec::new(), Vec::new());
                    return;
                }
                let task = {
                    let tasks = self.session.tasks.lock().expect("task map poisoned");
                    let t = tasks.get(&r).cloned();
                    if let Some(t) = &t {
                        t.aborted.store(true, Ordering::SeqCst);
                    }
                    t
                };
                match task {
                    Some(task) => {
                        self.respond_tmf_after(itt, tmf::FUNCTION_COMPLETE, vec![task], Vec::new())
                    }
                    None => {
                        // Not here. A RefCmdSN still inside the window names a command
                        // yet to arrive: it counts as received and aborted (§11.5.1).
                        // Otherwise the task finished (its response is out) or never was.
                        let response =
                            if serial::in_window(t.ref_cmd_sn, self.sn.exp(), self.sn.max())
                                && serial::lt(t.ref_cmd_sn, t.cmd_sn)
                            {
                                tmf::FUNCTION_COMPLETE
                            } else {
                                tmf::TASK_DOES_NOT_EXIST
                            };
                        self.respond_tmf_after(itt, response, Vec::new(), Vec::new());
                    }
                }
            }
            tmf::ABORT_TASK_SET | tmf::CLEAR_TASK_SET => {
                if !lun_exists {
                    self.respond_tmf_after(itt, tmf::LUN_DOES_NOT_EXIST, Vec::new(), Vec::new());
                    return;
                }
                let lun = lun_id.expect("LUN exists");
                let mine: Vec<u32> = self
                    .pending
                    .iter()
                    .filter(|(_, w)| w.lun.id == lun)
                    .map(|(itt, _)| *itt)
                    .collect();
                for itt in mine {
                    self.drop_pending(itt);
                }
                let tasks = self.session.abort_tasks(Some(lun));
                self.respond_tmf_after(itt, tmf::FUNCTION_COMPLETE, tasks, Vec::new());
            }
            tmf::LOGICAL_UNIT_RESET | tmf::TARGET_WARM_RESET | tmf::TARGET_COLD_RESET => {
                let luns: Vec<Arc<Lun>> = if t.function == tmf::LOGICAL_UNIT_RESET {
                    match self.lun(t.lun) {
                        Some(l) => vec![l],
                        None => {
                            self.respond_tmf_after(
                                itt,
                                tmf::LUN_DOES_NOT_EXIST,
                                Vec::new(),
                                Vec::new(),
                            );
                            return;
                        }
                    }
                } else {
                    crate::scsi::Fabric::luns(&*self.fabric)
                };
                let ids: Vec<u16> = luns.iter().map(|l| l.id).collect();
                let mine: Vec<u32> = self
                    .pending
                    .iter()
                    .filter(|(_, w)| ids.contains(&w.lun.id))
                    .map(|(itt, _)| *itt)
                    .collect();
                for itt in mine {
                    self.drop_pending(itt);
                }
                let mut tasks = Vec::new();
                let sessions = self.inner.sessions_of(&self.target.iqn);
                for s in &sessions {
                    for id in &ids {
                        tasks.extend(s.abort_tasks(Some(*id)));
                    }
                }
                let nexuses: Vec<String> = sessions.iter().map(|s| s.nexus.clone()).collect();
                let sense = if t.function == tmf::LOGICAL_UNIT_RESET {
                    Sense::BUS_DEVICE_RESET
                } else {
                    Sense::POWER_ON_RESET
                };
                for lun in &luns {
                    let mut st = lun.state();
                    st.reserve6 = None;
                    st.prevent_removal.clear();
                    for n in &nexuses {
                        push_ua(&mut st, n, sense);
                    }
                }
                // A cold reset ends every session of the target, ours included, once the
                // response is on the wire.
                let close = if t.function == tmf::TARGET_COLD_RESET {
                    sessions
                } else {
                    Vec::new()
                };
                self.respond_tmf_after(itt, tmf::FUNCTION_COMPLETE, tasks, close);
            }
            tmf::TASK_REASSIGN => {
                self.respond_tmf_after(itt, tmf::REASSIGNMENT_NOT_SUPPORTED, Vec::new(), Vec::new())
            }
            tmf::CLEAR_ACA => {
                self.respond_tmf_after(itt, tmf::FUNCTION_NOT_SUPPORTED, Vec::new(), Vec::new())
            }
            _ => self.respond_tmf_after(itt, tmf::FUNCTION_REJECTED, Vec::new(), Vec::new()),
        }
    }
}
