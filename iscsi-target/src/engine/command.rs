//! SCSI commands on the connection: the CDB (with its extended-CDB AHS), the LUN, the
//! memory budget, then either collecting write data or running the command: here when it
//! is quick, on the blocking pool when it may take long.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::{Bytes, BytesMut};
use iscsi_pdu::bhs::ScsiCommand;
use iscsi_pdu::frame::{self, RawPdu};
use iscsi_pdu::scsi::opcode;
use iscsi_pdu::{be16, be32};
use tokio::sync::{OwnedSemaphorePermit, watch};

use super::response::build_response;
use super::wire::send_shared;
use super::{CONNECTION_MEMORY, Engine, MEMORY_UNIT};
use crate::connection::ConnError;
use crate::lun::Lun;
use crate::scsi::sense::{Sense, status};
use crate::scsi::{self, Ctx, MAX_TRANSFER_BYTES};
use crate::session::TaskEntry;

/// Transfers this large run on the blocking pool: their copies then overlap with the
/// engine reading the next commands.
const BIG_TRANSFER: u32 = 256 * 1024;

impl Engine {
    pub(super) fn scsi_command(&mut self, c: ScsiCommand, pdu: RawPdu) -> Result<(), ConnError> {
        // CDBs longer than 16 bytes continue in an extended-CDB AHS.
        let cdb = if pdu.ahs.is_empty() {
            Bytes::copy_from_slice(&c.cdb)
        } else {
            let mut cdb = BytesMut::from(&c.cdb[..]);
            for a in frame::parse_ahs(pdu.ahs.clone())? {
                if a.kind == frame::ahs_type::EXTENDED_CDB {
                    cdb.extend_from_slice(&a.data);
                }
            }
            cdb.freeze()
        };
        let Some(lun) = self.lun(c.lun) else {
            self.no_such_lun(c, &cdb);
            return Ok(());
        };
        let edtl = c.expected_data_len;
        if c.write && u64::from(edtl) > MAX_WRITE_BUFFER {
            // More than any command we serve can take: refuse before any data is buffered.
            self.respond_status(
                &c,
                status::CHECK_CONDITION,
                Some(Sense::invalid_cdb_field(0, None)),
            );
            return Ok(());
        }
        let units = budget_units(c.write, edtl);
        let permit = if units == 0 {
            None
        } else {
            match self.memory.clone().try_acquire_many_owned(units) {
                Ok(p) => Some(p),
                Err(_) => {
                    self.respond_status(&c, status::TASK_SET_FULL, None);
                    return Ok(());
                }
            }
        };
        if !c.write || edtl == 0 {
            self.execute(c, lun, cdb, Bytes::new(), permit);
            return Ok(());
        }
        let immediate = pdu.data;
        if immediate.len() > edtl as usize
            || (!immediate.is_empty() && !self.params.immediate_data)
            || immediate.len() > self.params.first_burst as usize
        {
            return Err(ConnError::Protocol(
                "immediate data beyond what was negotiated",
            ));
        }
        if immediate.len() == edtl as usize {
            self.execute(c, lun, cdb, immediate, permit);
            return Ok(());
        }
        self.collect_write(c, lun, cdb, immediate, permit);
        Ok(())
    }

    fn no_such_lun(&mut self, c: ScsiCommand, cdb: &[u8]) {
        match cdb[0] {
            opcode::INQUIRY if cdb.len() >= 6 && cdb[1] & 1 == 0 => {
                // Peripheral qualifier 011b: no logical unit here.
                let mut d = vec![0u8; 36];
                d[0] = 0x7f;
                d[2] = 0x06;
                d[3] = 0x12;
                d[4] = 31;
                d.truncate(usize::from(be16(cdb, 3)));
                self.respond_data(&c, d);
            }
            opcode::REPORT_LUNS => {
                // Any LUN answers REPORT LUNS: use the first one's view.
                let first = self
                    .target
                    .luns
                    .read()
                    .expect("LUN map poisoned")
                    .values()
                    .next()
                    .cloned();
                match first {
                    Some(lun) => {
                        self.execute(c, lun, Bytes::copy_from_slice(cdb), Bytes::new(), None)
                    }
                    None => {
                        let alloc = if cdb.len() >= 10 {
                            be32(cdb, 6) as usize
                        } else {
                            0
                        };
                        let mut d = vec![0u8; 8];
                        d.truncate(alloc);
                        self.respond_data(&c, d);
                    }
                }
            }
            _ => self.respond_status(&c, status::CHECK_CONDITION, Some(Sense::LUN_NOT_SUPPORTED)),
        }
    }

    /// Runs a command: here when it is quick, on the blocking pool when it may take long
    /// (the engine keeps reading and answering meanwhile).
    pub(super) fn execute(
        &mut self,
        c: ScsiCommand,
        lun: Arc<Lun>,
        cdb: Bytes,
        data: Bytes,
        permit: Option<OwnedSemaphorePermit>,
    ) {
        if !may_take_long(&cdb) && c.expected_data_len < BIG_TRANSFER {
            let reply = {
                let ctx = Ctx {
                    lun: &lun,
                    nexus: &self.session.nexus,
                    fabric: &*self.fabric,
                    edtl: c.expected_data_len,
                    data_out: &data,
                };
                scsi::execute(&ctx, &cdb)
            };
            self.respond(&c, reply);
            drop(permit);
            return;
        }
        // Answers queued before this command go first.
        if let Err(e) = self.flush() {
            tracing::debug!(error = %e, "send failed");
        }
        let entry = Arc::new(TaskEntry {
            lun: lun.id,
            aborted: Default::default(),
            done: watch::channel(false).0,
        });
        self.session
            .tasks
            .lock()
            .expect("task map poisoned")
            .insert(c.itt, entry.clone());
        let session = self.session.clone();
        let fabric = self.fabric.clone();
        let wire = self.wire.clone();
        let sn = self.sn.clone();
        let max_seg = self.params.max_xmit_data_segment;
        let max_burst = self.params.max_burst;
        self.rt.spawn_blocking(move || {
            // Held until the response is sent: the buffers count against the budget.
            let _permit = permit;
            let reply = if entry.aborted.load(Ordering::SeqCst) {
                None
            } else {
                let ctx = Ctx {
                    lun: &lun,
                    nexus: &session.nexus,
                    fabric: &*fabric,
                    edtl: c.expected_data_len,
                    data_out: &data,
                };
                Some(scsi::execute(&ctx, &cdb))
            };
            // Leave the task map and read the abort flag under one lock, so an ABORT TASK
            // either finds the task (and its response is never sent) or does not (and
            // answers that the task does not exist while the response goes out).
            let send = {
                let mut tasks = session.tasks.lock().expect("task map poisoned");
                if tasks.get(&c.itt).is_some_and(|t| Arc::ptr_eq(t, &entry)) {
                    tasks.remove(&c.itt);
                }
                !entry.aborted.load(Ordering::SeqCst)
            };
            if let Some(reply) = reply
                && send
            {
                send_shared(&wire, &sn, build_response(&c, reply, max_seg, max_burst));
            }
            entry.done.send_replace(true);
        });
    }
}

/// The most a write's buffer can be: a COMPARE AND WRITE carries twice its blocks, an
/// EXTENDED COPY parameter list a little more than a transfer.
const MAX_WRITE_BUFFER: u64 = 2 * MAX_TRANSFER_BYTES + 4096;
const _: () = assert!(MAX_WRITE_BUFFER <= CONNECTION_MEMORY);

/// Units of the connection's memory budget a command's data takes: the whole buffer a
/// write collects (immediate data, unsolicited and solicited Data-Out, every burst of
/// it, up to its expected length) before it runs, and what a read can produce. Taken in
/// 64 bits from the initiator's 32-bit length, so nothing wraps; the caller has refused
/// writes over [`MAX_WRITE_BUFFER`], which keeps the count within the budget.
fn budget_units(write: bool, edtl: u32) -> u32 {
    let bytes = if write {
        u64::from(edtl).min(MAX_WRITE_BUFFER)
    } else {
        u64::from(edtl).min(MAX_TRANSFER_BYTES)
    };
    // At most CONNECTION_MEMORY / MEMORY_UNIT, far below u32::MAX.
    bytes.div_ceil(MEMORY_UNIT) as u32
}

/// Commands that may block for long (a flush, a big copy) run off the engine thread.
fn may_take_long(cdb: &[u8]) -> bool {
    match cdb[0] {
        opcode::SYNCHRONIZE_CACHE_10
        | opcode::SYNCHRONIZE_CACHE_16
        | opcode::UNMAP
        | opcode::WRITE_SAME_10
        | opcode::WRITE_SAME_16
        | opcode::EXTENDED_COPY
        | opcode::COMPARE_AND_WRITE
        | opcode::PERSISTENT_RESERVE_OUT
        | opcode::WRITE_VERIFY_10
        | opcode::WRITE_VERIFY_12
        | opcode::WRITE_VERIFY_16 => true,
        // Writes with FUA wait for the device to make them durable.
        opcode::WRITE_10 | opcode::WRITE_12 | opcode::WRITE_16 | opcode::ORWRITE_16 => {
            cdb[1] & 0x08 != 0
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_is_budgeted_for_its_whole_buffer_and_nothing_wraps() {
        assert_eq!(budget_units(true, 0), 0);
        assert_eq!(budget_units(true, 1), 1);
        assert_eq!(budget_units(true, 4096), 1);
        // A write may collect twice a transfer (COMPARE AND WRITE): all of it counts.
        let caw = (2 * MAX_TRANSFER_BYTES) as u32;
        assert_eq!(
            u64::from(budget_units(true, caw)),
            2 * MAX_TRANSFER_BYTES / MEMORY_UNIT
        );
        // The largest length an initiator can state neither wraps nor passes the budget.
        for write in [true, false] {
            let units = u64::from(budget_units(write, u32::MAX));
            assert!(units * MEMORY_UNIT <= CONNECTION_MEMORY, "{write}: {units}");
        }
        // A read's buffer is what a command produces at most.
        assert_eq!(
            u64::from(budget_units(false, u32::MAX)),
            MAX_TRANSFER_BYTES / MEMORY_UNIT
        );
    }
}
