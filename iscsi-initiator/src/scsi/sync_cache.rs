//! SYNCHRONIZE CACHE(10) (SBC-3 §5.22): makes every acknowledged write durable. A
//! guest's FLUSH becomes this.

use iscsi_pdu::scsi::opcode::SYNCHRONIZE_CACHE_10;

use super::sense::CommandInfo;
use crate::error::Error;
use crate::lun::Lun;
use crate::task::Command;

/// The CDB for the whole LUN (LBA 0, 0 blocks: everything).
pub fn cdb() -> [u8; 10] {
    let mut c = [0u8; 10];
    c[0] = SYNCHRONIZE_CACHE_10;
    c
}

impl Lun {
    /// Makes every write acknowledged before this call durable.
    pub async fn flush(&self) -> Result<(), Error> {
        let cmd = Command::new(self.field, &cdb());
        self.session
            .execute(cmd, CommandInfo::named("SYNCHRONIZE CACHE(10)"))
            .await?;
        Ok(())
    }
}
