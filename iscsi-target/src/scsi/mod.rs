//! The SCSI command set (SPC-4, SBC-3) over a [`Lun`]: parse the CDB, check unit
//! attentions and reservations, run the command. Runs on blocking threads: commands call
//! the block device directly.
//!
//! One file per command family; each exposes functions taking a [`Ctx`] and the CDB and
//! returning the data-in bytes or a [`Failure`].

pub mod capacity;
pub mod caw;
pub mod inquiry;
pub mod lba_status;
pub mod luns;
pub mod mode;
pub mod opcodes;
pub mod persistent;
pub mod reserve;
pub mod rw;
pub mod sense;
pub mod sync_cache;
pub mod unit;
pub mod unmap;
pub mod write_same;
pub mod xcopy;

use std::sync::Arc;

use iscsi_pdu::scsi::opcode;

use crate::lun::Lun;
use sense::{Failure, Sense, status};

/// Largest single transfer we accept (reported in VPD 0xB0): bounds the memory one
/// command can take.
pub const MAX_TRANSFER_BYTES: u64 = 64 << 20;

/// What the command set needs from the target around it.
pub trait Fabric: Sync {
    /// The target's LUNs, in LUN order.
    fn luns(&self) -> Vec<Arc<Lun>>;
    /// The initiator ports with a session to this target now.
    fn nexuses(&self) -> Vec<String>;
    /// Aborts the tasks `nexus` has on `lun` (PREEMPT AND ABORT).
    fn abort_tasks_of(&self, lun: u16, nexus: &str);
    /// The target's iSCSI name, for VPD 0x83.
    fn target_name(&self) -> String;
    /// Relative target port identifier and target portal group tag.
    fn portal_group(&self) -> u16;
}

/// One command's surroundings.
pub struct Ctx<'a> {
    pub lun: &'a Arc<Lun>,
    /// The initiator port (`iqn,i,0x<isid>`) that sent it.
    pub nexus: &'a str,
    pub fabric: &'a dyn Fabric,
    /// iSCSI Expected Data Transfer Length.
    pub edtl: u32,
    /// The Data-Out bytes received (at most `edtl`).
    pub data_out: &'a [u8],
}

/// A finished command.
#[derive(Debug, Default)]
pub struct Reply {
    pub status: u8,
    /// Sense data, already encoded (fixed or descriptor format).
    pub sense: Vec<u8>,
    pub data_in: Vec<u8>,
    /// Bytes of Data-In the CDB asked for when `data_in` holds only the part the initiator
    /// can take (reads stop at the expected transfer length), for residual accounting.
    pub data_in_len: Option<u64>,
    /// Bytes of Data-Out the CDB asked for, for residual accounting.
    pub data_out_len: u32,
}

pub type CmdResult = Result<Vec<u8>, Failure>;

/// How a command relates to reservations and unit attentions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    /// Runs whatever the reservations (INQUIRY, REPORT LUNS, PR commands...).
    Always,
    /// Reads the medium or its state.
    Read,
    /// Changes the medium or the LUN's state.
    Write,
}

fn access_of(cdb: &[u8]) -> Access {
    use opcode::*;
    match cdb[0] {
        INQUIRY
        | REPORT_LUNS
        | REQUEST_SENSE
        | PERSISTENT_RESERVE_IN
        | PERSISTENT_RESERVE_OUT
        | READ_CAPACITY_10
        | TEST_UNIT_READY
        | MAINTENANCE_IN
        | RELEASE_6 => Access::Always,
        SERVICE_ACTION_IN_16 if cdb[1] & 0x1f == opcode::SAI_READ_CAPACITY_16 => Access::Always,
        READ_6 | READ_10 | READ_12 | READ_16 | VERIFY_10 | VERIFY_12 | VERIFY_16 | PRE_FETCH_10
        | PRE_FETCH_16 | SERVICE_ACTION_IN_16 | MODE_SENSE_6 | MODE_SENSE_10
        | READ_DEFECT_DATA_10 | READ_DEFECT_DATA_12 | RECEIVE_COPY_RESULTS => Access::Read,
        _ => Access::Write,
    }
}

/// The CDB length of an opcode by its group (SPC-4 §4.2.5.1), `None` for vendor groups.
pub fn cdb_len(opcode: u8) -> Option<usize> {
    match opcode >> 5 {
        0 => Some(6),
        1 | 2 => Some(10),
        4 => Some(16),
        5 => Some(12),
        _ => None,
    }
}

/// Runs one command. Never panics on any CDB or data.
pub fn execute(ctx: &Ctx<'_>, cdb: &[u8]) -> Reply {
    let mut reply = execute_inner(ctx, cdb);
    if reply.status != status::GOOD {
        reply.data_in_len = None;
    }
    reply
}

fn execute_inner(ctx: &Ctx<'_>, cdb: &[u8]) -> Reply {
    let mut reply = Reply::default();
    let d_sense = ctx.lun.state().mode.d_sense;
    let result = match cdb_len(cdb.first().copied().unwrap_or(0xff)) {
        Some(n) if cdb.len() >= n => dispatch(ctx, cdb, &mut reply),
        _ => Err(Sense::INVALID_OPCODE.into()),
    };
    match result {
        Ok(data) => {
            reply.status = status::GOOD;
            reply.data_in = data;
        }
        Err(f) => {
            reply.data_in.clear();
            match f {
                Failure::Check(s) => {
                    reply.status = status::CHECK_CONDITION;
                    reply.sense = if d_sense {
                        s.to_descriptor()
                    } else {
                        s.to_fixed().to_vec()
                    };
                }
                Failure::ReservationConflict => reply.status = status::RESERVATION_CONFLICT,
                Failure::Busy => reply.status = status::BUSY,
                Failure::TaskSetFull => reply.status = status::TASK_SET_FULL,
            }
        }
    }
    reply
}

fn dispatch(ctx: &Ctx<'_>, cdb: &[u8], reply: &mut Reply) -> CmdResult {
    let access = access_of(cdb);
    {
        let mut st = ctx.lun.state();
        // Unit attentions go first, except for commands that must never see them.
        if !matches!(
            cdb[0],
            opcode::INQUIRY | opcode::REPORT_LUNS | opcode::REQUEST_SENSE
        ) && let Some(q) = st.unit_attentions.get_mut(ctx.nexus)
            && let Some(ua) = q.pop_front()
        {
            return Err(ua.into());
        }
        if access != Access::Always {
            if let Some(holder) = &st.reserve6
                && holder != ctx.nexus
            {
                return Err(Failure::ReservationConflict);
            }
            if st.pr.conflicts(ctx.nexus, access == Access::Write) {
                return Err(Failure::ReservationConflict);
            }
        }
        if st.stopped
            && access != Access::Always
            && !matches!(
                cdb[0],
                opcode::START_STOP_UNIT | opcode::MODE_SENSE_6 | opcode::MODE_SENSE_10
            )
        {
            // LOGICAL UNIT NOT READY, INITIALIZING COMMAND REQUIRED.
            return Err(Sense::new(sense::key::NOT_READY, 0x04, 0x02).into());
        }
    }
    use opcode::*;
    match cdb[0] {
        TEST_UNIT_READY => unit::test_unit_ready(ctx, cdb),
        REQUEST_SENSE => unit::request_sense(ctx, cdb),
        INQUIRY => inquiry::inquiry(ctx, cdb),
        REPORT_LUNS => luns::report_luns(ctx, cdb),
        READ_CAPACITY_10 => capacity::read_capacity_10(ctx, cdb),
        SERVICE_ACTION_IN_16 => match cdb[1] & 0x1f {
            SAI_READ_CAPACITY_16 => capacity::read_capacity_16(ctx, cdb),
            SAI_GET_LBA_STATUS => lba_status::get_lba_status(ctx, cdb),
            _ => Err(Sense::invalid_cdb_field(1, Some(4)).into()),
        },
        READ_6 | READ_10 | READ_12 | READ_16 => rw::read(ctx, cdb, reply),
        WRITE_6 | WRITE_10 | WRITE_12 | WRITE_16 => rw::write(ctx, cdb, false, reply),
        WRITE_VERIFY_10 | WRITE_VERIFY_12 | WRITE_VERIFY_16 => rw::write(ctx, cdb, true, reply),
        VERIFY_10 | VERIFY_12 | VERIFY_16 => rw::verify(ctx, cdb, reply),
        PRE_FETCH_10 | PRE_FETCH_16 => rw::pre_fetch(ctx, cdb),
        SYNCHRONIZE_CACHE_10 | SYNCHRONIZE_CACHE_16 => sync_cache::synchronize_cache(ctx, cdb),
        UNMAP => unmap::unmap(ctx, cdb, reply),
        WRITE_SAME_10 | WRITE_SAME_16 => write_same::write_same(ctx, cdb, reply),
        COMPARE_AND_WRITE => caw::compare_and_write(ctx, cdb, reply),
        ORWRITE_16 => rw::or_write(ctx, cdb, reply),
        MODE_SENSE_6 | MODE_SENSE_10 => mode::mode_sense(ctx, cdb),
        MODE_SELECT_6 | MODE_SELECT_10 => mode::mode_select(ctx, cdb, reply),
        START_STOP_UNIT => unit::start_stop_unit(ctx, cdb),
        PREVENT_ALLOW => unit::prevent_allow(ctx, cdb),
        READ_DEFECT_DATA_10 | READ_DEFECT_DATA_12 => unit::read_defect_data(ctx, cdb),
        PERSISTENT_RESERVE_IN => persistent::persistent_reserve_in(ctx, cdb),
        PERSISTENT_RESERVE_OUT => persistent::persistent_reserve_out(ctx, cdb, reply),
        RESERVE_6 => reserve::reserve_6(ctx, cdb),
        RELEASE_6 => reserve::release_6(ctx, cdb),
        MAINTENANCE_IN => match cdb[1] & 0x1f {
            MI_REPORT_SUPPORTED_OPCODES => opcodes::report_supported_opcodes(ctx, cdb),
            _ => Err(Sense::invalid_cdb_field(1, Some(4)).into()),
        },
        EXTENDED_COPY => xcopy::extended_copy(ctx, cdb, reply),
        RECEIVE_COPY_RESULTS => xcopy::receive_copy_results(ctx, cdb),
        _ => Err(Sense::INVALID_OPCODE.into()),
    }
}

/// Truncates `data` to the allocation length.
pub fn truncate(mut data: Vec<u8>, alloc: usize) -> Vec<u8> {
    data.truncate(alloc);
    data
}

/// Checks that `lba..lba+blocks` lies on the medium.
pub fn check_lba(ctx: &Ctx<'_>, lba: u64, blocks: u64) -> Result<(), Failure> {
    let capacity = ctx.lun.blocks();
    match lba.checked_add(blocks) {
        Some(end) if lba <= capacity && end <= capacity => Ok(()),
        _ => Err(Sense::LBA_OUT_OF_RANGE.into()),
    }
}

/// Refuses writes to a read-only or software-write-protected LUN.
pub fn check_writable(ctx: &Ctx<'_>) -> Result<(), Failure> {
    if ctx.lun.device.read_only() || ctx.lun.state().mode.swp {
        return Err(Sense::WRITE_PROTECTED.into());
    }
    Ok(())
}

#[cfg(test)]
pub mod test_utils {
    //! A LUN on a temporary file and a fabric around it, for command tests.
    use super::*;
    use crate::block::FileBlockDevice;
    use crate::lun::LunConfig;
    use crate::pr::MemoryPrStore;

    pub struct TestFabric {
        pub luns: Vec<Arc<Lun>>,
        pub _dir: tempfile::TempDir,
    }

    impl TestFabric {
        pub fn new(blocks: u64) -> Self {
            let dir = tempfile::tempdir().unwrap();
            let dev =
                FileBlockDevice::open(&dir.path().join("lun"), Some(blocks * 512), 512, false)
                    .unwrap();
            let lun = Lun::new(
                LunConfig {
                    id: 0,
                    device: Arc::new(dev),
                    serial: "test-serial".into(),
                    naa: crate::lun::naa_from_serial("test-serial"),
                },
                Arc::new(MemoryPrStore::default()),
            )
            .unwrap();
            Self {
                luns: vec![Arc::new(lun)],
                _dir: dir,
            }
        }

        /// Runs `cdb` from `nexus` with `data` as Data-Out.
        pub fn run(&self, nexus: &str, cdb: &[u8], data: &[u8]) -> Reply {
            let ctx = Ctx {
                lun: &self.luns[0],
                nexus,
                fabric: self,
                edtl: if data.is_empty() {
                    65536
                } else {
                    data.len() as u32
                },
                data_out: data,
            };
            execute(&ctx, cdb)
        }
    }

    impl Fabric for TestFabric {
        fn luns(&self) -> Vec<Arc<Lun>> {
            self.luns.clone()
        }
        fn nexuses(&self) -> Vec<String> {
            vec!["a".into(), "b".into()]
        }
        fn abort_tasks_of(&self, _lun: u16, _nexus: &str) {}
        fn target_name(&self) -> String {
            "iqn.2024-01.test:t".into()
        }
        fn portal_group(&self) -> u16 {
            1
        }
    }
}
