//! `poolctl vm-backup`, `vm-restore`, `vm-backup-verify`, `vm-backup-prune`: a VM's disks
//! and spec kept in a chain of full and incremental backups in a directory (see
//! `crate::backup`).

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
    /// Drop the points of the chain in DIR that no --keep-* rule keeps (the newest always
    /// stays). No data is copied: the point after a dropped one takes over the chunks it
    /// still needs. No pool needed.
    #[command(name = "vm-backup-prune")]
    Prune(PruneArgs),
}

#[derive(Debug, clap::Args)]
pub struct PruneArgs {
    pub dir: PathBuf,
    /// Keep the newest N points.
    #[arg(long, default_value_t = 0)]
    pub keep_last: u32,
    /// Keep the newest point of each of the last N days that have one (UTC).
    #[arg(long, default_value_t = 0)]
    pub keep_daily: u32,
    /// Keep the newest point of each of the last N weeks that have one (from Monday, UTC).
    #[arg(long, default_value_t = 0)]
    pub keep_weekly: u32,
    /// Say what would go, change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

pub async fn run(ctl: &mut Ctl, command: BackupCommand) -> anyhow::Result<()> {
    match command {
        BackupCommand::Backup { vm, dir } => {
            let (t, took) = backup::backup(ctl, &vm, &dir).await?;
            println!(
                "backup point {} of {vm} in {}: {} chunks, {} (snapshot {:.2} s, changed \
                 chunks read and written {:.2} s, base snapshot deleted {:.2} s)",
                t.point,
                dir.display(),
                t.chunks,
                human_bytes(t.bytes),
                took.snapshot.as_secs_f64(),
                took.write.as_secs_f64(),
                took.delete.as_secs_f64()
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
        BackupCommand::Prune(p) => prune(p)?,
    }
    Ok(())
}

/// Prunes the chain in `p.dir`; runs without a pool.
pub fn prune(p: PruneArgs) -> anyhow::Result<()> {
    let retention = proto::coordinator::Retention {
        keep_last: p.keep_last,
        keep_daily: p.keep_daily,
        keep_weekly: p.keep_weekly,
    };
    let r = backup::prune(&p.dir, &retention, p.dry_run)?;
    let list = |v: &[u32]| v.iter().map(u32::to_string).collect::<Vec<_>>().join(", ");
    let (go, freed) = if p.dry_run {
        ("would prune", "would free")
    } else {
        ("pruned", "freed")
    };
    println!(
        "kept points {}; {go} {}; {freed} {}",
        list(&r.kept),
        if r.removed.is_empty() {
            "none".into()
        } else {
            list(&r.removed)
        },
        human_bytes(r.freed_bytes)
    );
    if r.carried_bytes > 0 {
        println!(
            "{} {} of chunks still read out of mostly unread files into the points kept",
            if p.dry_run { "would copy" } else { "copied" },
            human_bytes(r.carried_bytes)
        );
    }
    if r.held_bytes > 0 {
        println!(
            "{} of pruned points' data stays, read by the points kept ({} of it no longer \
             read: a file goes when no kept point reads any of it, or is compacted once \
             most of it is unread)",
            human_bytes(r.held_bytes),
            human_bytes(r.dead_bytes)
        );
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
