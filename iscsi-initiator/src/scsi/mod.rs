//! The SCSI commands (SPC-4, SBC-3) the initiator sends, one file per command family:
//! the CDB, the parameter data, the parsing of what comes back, and the [`crate::Lun`]
//! method that runs it.

pub mod capacity;
pub mod caw;
pub mod inquiry;
pub mod luns;
pub mod persistent;
pub mod read;
pub mod sense;
pub mod sync_cache;
pub mod unit;
pub mod unmap;
pub mod write;
pub mod write_same;

/// A 16-byte CDB of the READ(16)/WRITE(16) shape: opcode, flags, LBA, block count.
pub(crate) fn rw16(opcode: u8, flags: u8, lba: u64, blocks: u32) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = opcode;
    c[1] = flags;
    c[2..10].copy_from_slice(&lba.to_be_bytes());
    c[10..14].copy_from_slice(&blocks.to_be_bytes());
    c
}
