//! TEST UNIT READY (SPC-4 §6.47): whether the LUN accepts media access commands.

use iscsi_pdu::scsi::opcode::TEST_UNIT_READY;

use super::sense::CommandInfo;
use crate::error::Error;
use crate::lun::Lun;
use crate::task::Command;

impl Lun {
    /// Succeeds when the LUN is ready; [`Error::NotReady`] says why it is not.
    pub async fn test_unit_ready(&self) -> Result<(), Error> {
        let cmd = Command::new(self.field, &[TEST_UNIT_READY, 0, 0, 0, 0, 0]);
        self.session
            .execute(cmd, CommandInfo::named("TEST UNIT READY"))
            .await?;
        Ok(())
    }

    /// LOGICAL UNIT RESET: aborts every task on the LUN, of every initiator.
    pub async fn reset(&self) -> Result<(), Error> {
        self.session
            .task_management(iscsi_pdu::bhs::tmf::LOGICAL_UNIT_RESET, self.id)
            .await
    }
}
