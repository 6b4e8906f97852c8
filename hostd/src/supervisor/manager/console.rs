//! A VM's console as the daemon serves it: the history and live output, input to the
//! guest, and the log file.

use std::path::PathBuf;
use std::sync::Arc;

use super::{Manager, ManagerError, is_live};
use crate::console::Console;
use crate::supervisor::child::CONSOLE_LOG;
use crate::supervisor::protocol::command;

impl Manager {
    pub async fn console(&self, id: &str) -> Result<Arc<Console>, ManagerError> {
        Ok(self.get(id).await?.console.clone())
    }

    pub async fn console_input(&self, id: &str, data: Vec<u8>) -> Result<(), ManagerError> {
        let entry = self.get(id).await?;
        Self::require(&entry, "console input", "running", is_live).await?;
        entry
            .command(command::Op::ConsoleInput(data))
            .await
            .map(|_| ())
    }

    /// The console log file of a VM (everything it printed, across reboots).
    pub fn console_log_path(&self, id: &str) -> PathBuf {
        self.vm_dir(id).join(CONSOLE_LOG)
    }
}
