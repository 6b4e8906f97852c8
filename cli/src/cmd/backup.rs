//! `poolctl vm-backup`, `vm-restore`, `vm-backup-verify`: a VM's disks and spec kept in a
//! chain of full and incremental backups in a directory (see `crate::backup`).

use std::path::PathBuf;

use clap::Subcommand;

use crate::backup::{self, format};
use crate::ctl::Ctl;
use crate::output::human_bytes;

#[derive(Debug, Subcommand)]
pub enum BackupCommand {
    /// Back up a VM into DIR: in full the first time, then only the chunks changed since
    /// the last backup (the pool keeps that backup's snapshot as the next one's base).
    #[command(name = "vm-backup")]
    Backup { vm: String, dir: PathBuf },
    /// Make a new VM (stopped, new disks) from a point of the backup chain in DIR.
    #[command(name = "vm-restore")]
    Restore {
        dir: PathBuf,
        /// The point to restore (1 is the full backup); default the last.
        #[arg(long)]
        point: Option<u32>,
        /// The new VM's name; default `<vm>-restored-<point>`.
        #[arg(long)]
        name: Option<String>,
        /// Repository for the new disks; default the one the VM's first disk was on.
        #[arg(long)]
        sr: Option<String>,
    },
    /// Re-read every file of the backup chain in DIR and check every digest (no pool
    /// needed).
    #[command(name = "vm-backup-verify")]
    Verify { dir: PathBuf },
}

pub async fn run(ctl: &mut Ctl, command: BackupCommand) -> anyhow::Result<()> {
    match command {
        BackupCommand::Backup { vm, dir } => {
            let t = backup::backup(ctl, &vm, &dir).await?;
            println!(
                "backup point {} of {vm} in {}: {} chunks, {}",
                t.point,
                dir.display(),
                t.chunks,
                human_bytes(t.bytes)
            );
        }
        BackupCommand::Restore {
            dir,
            point,
            name,
            sr,
        } => {
            let id = backup::restore(
                ctl,
                backup::RestoreArgs {
                    root: &dir,
                    point,
                    name,
                    sr,
                },
            )
            .await?;
            println!("restored VM {id}");
        }
        BackupCommand::Verify { dir } => verify(&dir)?,
    }
    Ok(())
}

/// Checks the whole chain in `dir`; runs without a pool.
pub fn verify(dir: &std::path::Path) -> anyhow::Result<()> {
    let chain = format::load_chain(dir)?;
    if chain.is_empty() {
        anyhow::bail!("{} holds no backup point", dir.display());
    }
    let chunks = format::verify(&chain)?;
    println!(
        "{} points, {chunks} chunks: every digest matches",
        chain.len()
    );
    Ok(())
}
