//! What an initiator sends after login: a sequence of CDBs with their Data-Out, from two
//! initiator ports, run by `scsi::execute` against two small in-memory LUNs that share
//! reservations, mode pages and unit attentions across the sequence, as a real target's
//! sessions do.
//!
//! Besides "no panic": data-in is never longer than the allocation length (or, for READ,
//! the transfer length) the CDB asks for, and commands without Data-In return none; a
//! CHECK CONDITION always carries well-formed sense data and other statuses none; and
//! the device is never asked for a byte outside the LUN or a range that is not whole
//! blocks (the in-memory device panics if it is).
//!
//! Input: one byte of LUN set-up (bit 0: 4096-byte blocks; bit 1: thin; bit 2: LUN 0 is
//! read-only; bit 3: unmapped blocks read as zeros), then commands, each:
//! `flags` (bit 0: from the second port; bit 1: to LUN 1; bit 2: the expected transfer
//! length is the Data-Out's length; bit 3: the given one is in 512-byte units),
//! a CDB length (mod 33) and the CDB, a u16 expected transfer length, a u16 Data-Out
//! length and the Data-Out (what is left when the input runs short).
#![no_main]

use std::sync::{Arc, Mutex, OnceLock};

use iscsi_target::MemoryPrStore;
use iscsi_target::block::{BlockDevice, BlockError, Provisioning};
use iscsi_target::lun::{Lun, LunConfig, naa_from_serial};
use iscsi_target::scsi::sense::status;
use iscsi_target::scsi::{self, Ctx, Fabric};
use libfuzzer_sys::fuzz_target;

/// Commands per input: enough for register, reserve, then conflicting I/O.
const MAX_COMMANDS: usize = 64;

/// A LUN's blocks in memory. The target promises to check every range before calling
/// (block.rs), so any access outside the device or off block boundaries is a finding.
struct MemDisk {
    data: Mutex<Vec<u8>>,
    block_size: u32,
    read_only: bool,
    thin: bool,
    zero_after_unmap: bool,
}

impl MemDisk {
    fn check(&self, op: &str, offset: u64, len: u64) -> std::ops::Range<usize> {
        let bs = u64::from(self.block_size);
        let size = self.size();
        assert!(
            offset.is_multiple_of(bs) && len.is_multiple_of(bs),
            "{op} at {offset} of {len} bytes is not whole {bs}-byte blocks"
        );
        let end = offset.checked_add(len).expect("range end overflows");
        assert!(
            end <= size,
            "{op} at {offset} of {len} bytes past the LUN's {size}"
        );
        offset as usize..end as usize
    }
}

impl BlockDevice for MemDisk {
    fn block_size(&self) -> u32 {
        self.block_size
    }
    fn size(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        let r = self.check("read", offset, buf.len() as u64);
        buf.copy_from_slice(&self.data.lock().unwrap()[r]);
        Ok(())
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), BlockError> {
        let r = self.check("write", offset, data.len() as u64);
        assert!(!self.read_only, "write to a read-only LUN");
        self.data.lock().unwrap()[r].copy_from_slice(data);
        Ok(())
    }
    fn flush(&self) -> Result<(), BlockError> {
        Ok(())
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn provisioning(&self) -> Provisioning {
        Provisioning {
            thin: self.thin,
            reads_zero_after_unmap: self.zero_after_unmap,
            unmap_granularity: if self.thin {
                u64::from(self.block_size) * 4
            } else {
                0
            },
        }
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        let r = self.check("discard", offset, len);
        assert!(!self.read_only, "discard on a read-only LUN");
        if self.zero_after_unmap {
            self.data.lock().unwrap()[r].fill(0);
        }
        Ok(())
    }
    fn write_zeroes(&self, offset: u64, len: u64, _unmap: bool) -> Result<(), BlockError> {
        let r = self.check("write zeroes", offset, len);
        assert!(!self.read_only, "write zeroes to a read-only LUN");
        self.data.lock().unwrap()[r].fill(0);
        Ok(())
    }
}

struct Target {
    luns: Vec<Arc<Lun>>,
}

impl Fabric for Target {
    fn luns(&self) -> Vec<Arc<Lun>> {
        self.luns.clone()
    }
    fn nexuses(&self) -> Vec<String> {
        PORTS.iter().map(|p| p.to_string()).collect()
    }
    fn abort_tasks_of(&self, _lun: u16, _nexus: &str) {}
    fn target_name(&self) -> String {
        "iqn.2024-01.org.example:fuzz".into()
    }
    fn portal_group(&self) -> u16 {
        1
    }
}

const PORTS: [&str; 2] = [
    "iqn.2024-01.org.example:a,i,0x400001370000",
    "iqn.2024-01.org.example:b,i,0x400001370001",
];

/// `SCSI_FUZZ_TRACE=1` prints each command and what it got, to see how far an input
/// (a seed, a corpus entry) gets.
fn tracing() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("SCSI_FUZZ_TRACE").is_some())
}

struct Input<'a>(&'a [u8]);

impl<'a> Input<'a> {
    fn u8(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8().unwrap_or(0), self.u8().unwrap_or(0)])
    }
    fn take(&mut self, n: usize) -> &'a [u8] {
        let (a, b) = self.0.split_at(n.min(self.0.len()));
        self.0 = b;
        a
    }
}

fn be(cdb: &[u8], at: usize, n: usize) -> u64 {
    cdb[at..at + n]
        .iter()
        .fold(0, |v, &b| (v << 8) | u64::from(b))
}

/// The most Data-In bytes the CDB allows (SPC-4, SBC-3), computed here from the
/// standard's field positions rather than the target's code. Only called for CDBs at
/// least as long as their opcode's group says.
fn data_in_limit(cdb: &[u8], block_size: u64) -> u64 {
    use iscsi_pdu::scsi::opcode::*;
    match cdb[0] {
        INQUIRY => be(cdb, 3, 2),
        REQUEST_SENSE | MODE_SENSE_6 => u64::from(cdb[4]),
        MODE_SENSE_10 | PERSISTENT_RESERVE_IN | READ_DEFECT_DATA_10 => be(cdb, 7, 2),
        REPORT_LUNS | MAINTENANCE_IN | READ_DEFECT_DATA_12 => be(cdb, 6, 4),
        READ_CAPACITY_10 => 8,
        // READ CAPACITY(16) and GET LBA STATUS alike.
        SERVICE_ACTION_IN_16 | RECEIVE_COPY_RESULTS => be(cdb, 10, 4),
        READ_6 => {
            let n = if cdb[4] == 0 { 256 } else { u64::from(cdb[4]) };
            n * block_size
        }
        READ_10 => be(cdb, 7, 2) * block_size,
        READ_12 => be(cdb, 6, 4) * block_size,
        READ_16 => be(cdb, 10, 4) * block_size,
        _ => 0,
    }
}

fn check_sense(sense: &[u8], cdb: &[u8]) {
    let code = sense.first().map(|c| c & 0x7f);
    match code {
        Some(0x70 | 0x71) => {
            assert!(
                sense.len() >= 18,
                "short fixed sense {sense:02x?} for {cdb:02x?}"
            );
            assert_ne!(
                sense[2] & 0x0f,
                0,
                "CHECK CONDITION with NO SENSE for {cdb:02x?}"
            );
            assert_eq!(usize::from(sense[7]) + 8, sense.len(), "{sense:02x?}");
        }
        Some(0x72 | 0x73) => {
            assert!(
                sense.len() >= 8,
                "short descriptor sense {sense:02x?} for {cdb:02x?}"
            );
            assert_ne!(
                sense[1] & 0x0f,
                0,
                "CHECK CONDITION with NO SENSE for {cdb:02x?}"
            );
            assert_eq!(usize::from(sense[7]) + 8, sense.len(), "{sense:02x?}");
        }
        _ => panic!("CHECK CONDITION without valid sense data: {sense:02x?} for {cdb:02x?}"),
    }
}

fn lun(id: u16, blocks: u64, setup: u8, read_only: bool) -> Arc<Lun> {
    let block_size = if setup & 1 != 0 { 4096 } else { 512 };
    let serial = format!("fuzz-{id}");
    let device = MemDisk {
        data: Mutex::new(vec![0; (blocks * block_size) as usize]),
        block_size: block_size as u32,
        read_only,
        thin: setup & 2 != 0,
        zero_after_unmap: setup & 8 != 0,
    };
    let cfg = LunConfig {
        id,
        device: Arc::new(device),
        naa: naa_from_serial(&serial),
        serial,
    };
    Arc::new(Lun::new(cfg, Arc::new(MemoryPrStore::default())).expect("memory store"))
}

fuzz_target!(|data: &[u8]| {
    let mut input = Input(data);
    let Some(setup) = input.u8() else { return };
    let target = Target {
        luns: vec![lun(0, 64, setup, setup & 4 != 0), lun(1, 24, setup, false)],
    };
    for _ in 0..MAX_COMMANDS {
        let Some(flags) = input.u8() else { break };
        let cdb_len = usize::from(input.u8().unwrap_or(0) % 33);
        let cdb = input.take(cdb_len);
        let mut edtl = u32::from(input.u16());
        if flags & 8 != 0 {
            edtl <<= 9;
        }
        let dlen = usize::from(input.u16());
        let data_out = input.take(if flags & 4 != 0 {
            dlen
        } else {
            dlen.min(edtl as usize)
        });
        if flags & 4 != 0 {
            edtl = data_out.len() as u32;
        }
        let lun = &target.luns[usize::from(flags >> 1 & 1)];
        let ctx = Ctx {
            lun,
            nexus: PORTS[usize::from(flags & 1)],
            fabric: &target,
            edtl,
            data_out,
        };
        let reply = scsi::execute(&ctx, cdb);
        if tracing() {
            eprintln!(
                "lun {} port {} cdb {cdb:02x?} edtl {edtl} out {}: status {:#04x} sense {:02x?} in {}",
                lun.id,
                flags & 1,
                data_out.len(),
                reply.status,
                reply.sense.get(..14).unwrap_or(&reply.sense),
                reply.data_in.len()
            );
        }
        if reply.status == status::CHECK_CONDITION {
            check_sense(&reply.sense, cdb);
        } else {
            assert!(
                reply.sense.is_empty(),
                "sense with status {:#x}",
                reply.status
            );
        }
        if reply.status != status::GOOD {
            assert!(
                reply.data_in.is_empty(),
                "data-in with status {:#x}",
                reply.status
            );
            continue;
        }
        let limit = data_in_limit(cdb, u64::from(lun.block_size()));
        assert!(
            reply.data_in.len() as u64 <= limit,
            "{} bytes of data-in for {cdb:02x?}, which allows {limit}",
            reply.data_in.len()
        );
        if let Some(n) = reply.data_in_len {
            assert!(reply.data_in.len() as u64 <= n);
        }
    }
});
