//! `storaged`: the storage daemon, and the offline tools for its thin pools (like LVM's
//! `lvcreate`/`lvs`/`thin_check`): they open the pool directly and refuse while a running
//! daemon holds it.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args as ClapArgs, Parser, Subcommand};
use storaged::exercise::{BLOCK, Step, Workload, fill_block};
use storaged::{BackingKind, CreateOptions, ImportOptions, ThinPool, VolumeInfo};

/// Thin pools and thin volumes, served over iSCSI and StorageService.
#[derive(Debug, Parser)]
#[command(name = "storaged", version, about)]
struct Args {
    /// Log filter, e.g. "info" or "storaged=debug" (RUST_LOG wins when set).
    #[arg(long, global = true, default_value = "warn")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon: StorageService over gRPC and the iSCSI target.
    Serve {
        /// TOML configuration file.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Thin pools.
    #[command(subcommand)]
    Pool(PoolCommand),
    /// Thin volumes, snapshots and clones.
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// iSCSI exports of a pool's volumes (served when a daemon imports the pool).
    #[command(subcommand)]
    Export(ExportCommand),
    /// Check a pool's mappings against its reference counts and free map.
    Fsck {
        #[command(flatten)]
        pool: PoolLocation,
        /// Reclaim leaked chunks and fix counts.
        #[arg(long)]
        repair: bool,
    },
    /// Run the crash-test workload against a volume until killed (for tests).
    #[command(hide = true)]
    Exercise {
        #[command(flatten)]
        pool: PoolLocation,
        #[arg(long)]
        volume: String,
        #[arg(long)]
        seed: u64,
        /// Stop after this many ops (0: run until killed).
        #[arg(long, default_value_t = 0)]
        ops: u64,
    },
}

#[derive(Debug, ClapArgs)]
#[group(required = true, multiple = false, id = "location")]
struct PoolPath {
    /// The pool's backing file.
    #[arg(long)]
    file: Option<PathBuf>,
    /// The pool's block device.
    #[arg(long)]
    device: Option<PathBuf>,
}

#[derive(Debug, ClapArgs)]
struct PoolLocation {
    #[command(flatten)]
    path: PoolPath,
    /// Metadata directory, when not where the superblock says.
    #[arg(long)]
    meta_dir: Option<PathBuf>,
}

impl PoolLocation {
    fn kind_and_path(&self) -> (BackingKind, PathBuf) {
        match (&self.path.file, &self.path.device) {
            (Some(f), _) => (BackingKind::File, f.clone()),
            (None, Some(d)) => (BackingKind::BlockDevice, d.clone()),
            (None, None) => unreachable!("clap requires one of --file and --device"),
        }
    }

    fn import(&self) -> anyhow::Result<ThinPool> {
        let (kind, path) = self.kind_and_path();
        ThinPool::import(&ImportOptions {
            kind,
            path: path.clone(),
            meta_dir: self.meta_dir.clone(),
            expected_id: None,
        })
        .with_context(|| format!("opening the pool on {}", path.display()))
    }
}

#[derive(Debug, Subcommand)]
enum PoolCommand {
    /// Create a pool on a file (created at --size) or a block device.
    Create {
        #[command(flatten)]
        pool: PoolLocation,
        /// Size of the file, or of the part of the device to use (e.g. 20G).
        #[arg(long, value_parser = parse_size)]
        size: Option<u64>,
        /// Chunk size, a power of two from 64K to 1M.
        #[arg(long, value_parser = parse_size, default_value = "64K")]
        chunk_size: u64,
        #[arg(long, default_value = "pool")]
        name: String,
        /// Usage percentage above which the pool warns.
        #[arg(long, default_value_t = 80)]
        warn_percent: u32,
    },
    /// Check that a device holds a pool and show it.
    Import {
        #[command(flatten)]
        pool: PoolLocation,
    },
    /// Grow a pool (a file to --size; a device to its current size).
    Extend {
        #[command(flatten)]
        pool: PoolLocation,
        #[arg(long, value_parser = parse_size)]
        size: Option<u64>,
    },
    /// Show a pool's space.
    Usage {
        #[command(flatten)]
        pool: PoolLocation,
    },
}

#[derive(Debug, Subcommand)]
enum VolumeCommand {
    /// Create a thin volume (its size may exceed the pool).
    Create {
        #[command(flatten)]
        pool: PoolLocation,
        #[arg(long)]
        name: String,
        #[arg(long, value_parser = parse_size)]
        size: u64,
        #[arg(long, default_value_t = 512)]
        block_size: u32,
    },
    /// List volumes, snapshots and clones.
    List {
        #[command(flatten)]
        pool: PoolLocation,
    },
    /// Take a read-only snapshot.
    Snapshot {
        #[command(flatten)]
        pool: PoolLocation,
        /// The volume's name or id.
        volume: String,
        #[arg(long)]
        name: String,
    },
    /// Make a writable clone of a volume or snapshot.
    Clone {
        #[command(flatten)]
        pool: PoolLocation,
        source: String,
        #[arg(long)]
        name: String,
    },
    /// Revert a volume to one of its snapshots.
    Revert {
        #[command(flatten)]
        pool: PoolLocation,
        volume: String,
        #[arg(long)]
        snapshot: String,
    },
    /// Change a volume's size; shrinking needs --force.
    Resize {
        #[command(flatten)]
        pool: PoolLocation,
        volume: String,
        #[arg(long, value_parser = parse_size)]
        size: u64,
        #[arg(long)]
        force: bool,
    },
    /// Delete a volume, snapshot or clone.
    Delete {
        #[command(flatten)]
        pool: PoolLocation,
        volume: String,
    },
}

#[derive(Debug, Subcommand)]
enum ExportCommand {
    /// Export a volume as a LUN of an iSCSI target.
    Create {
        #[command(flatten)]
        pool: PoolLocation,
        /// The volume's name or id.
        volume: String,
        /// Target name; by default derived from the volume id.
        #[arg(long)]
        target_iqn: Option<String>,
        #[arg(long, default_value_t = 0)]
        lun: u16,
        #[arg(long)]
        read_only: bool,
        /// Initiators allowed to log in (without CHAP); repeat for several.
        #[arg(long = "allow")]
        allow: Vec<String>,
    },
    /// List exports.
    List {
        #[command(flatten)]
        pool: PoolLocation,
    },
    /// Remove an export.
    Delete {
        #[command(flatten)]
        pool: PoolLocation,
        export: uuid::Uuid,
    },
}

/// Parses "4096", "64K", "20G", "1.5T" (binary units).
fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => {
            let unit = s[i..].to_ascii_uppercase();
            let mult: u64 = match unit.trim_end_matches("IB").trim_end_matches('B') {
                "" => 1,
                "K" => 1 << 10,
                "M" => 1 << 20,
                "G" => 1 << 30,
                "T" => 1 << 40,
                _ => return Err(format!("unknown size unit in {s:?} (use K, M, G or T)")),
            };
            (&s[..i], mult)
        }
        None => (s, 1),
    };
    let v: f64 = num.parse().map_err(|_| format!("{s:?} is not a size"))?;
    if v.is_nan() || v < 0.0 || v * mult as f64 > u64::MAX as f64 {
        return Err(format!("{s:?} is out of range"));
    }
    Ok((v * mult as f64) as u64)
}

fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn resolve(pool: &ThinPool, name_or_id: &str) -> anyhow::Result<uuid::Uuid> {
    if let Ok(id) = name_or_id.parse::<uuid::Uuid>() {
        return Ok(id);
    }
    pool.find_volume(name_or_id)
        .with_context(|| format!("no volume named {name_or_id:?} in pool {}", pool.name()))
}

fn print_usage(pool: &ThinPool) {
    let u = pool.usage();
    println!("pool        {} ({})", pool.name(), pool.id());
    println!("backing     {}", pool.backing_path().display());
    println!("metadata    {}", pool.meta_dir().display());
    println!("chunk size  {}", human(u.chunk_size));
    println!(
        "data        {} used of {} ({:.1}%), {} free",
        human(u.used_bytes()),
        human(u.total_bytes()),
        u.used_percent(),
        human(u.free_bytes())
    );
    println!(
        "provisioned {} in {} volumes, {} snapshots",
        human(u.provisioned_bytes),
        u.volume_count,
        u.snapshot_count
    );
    if u.warning {
        println!(
            "WARNING     usage is above the {}% threshold: extend the pool or free space",
            u.warning_threshold_percent
        );
    }
}

fn print_volumes(vols: &[VolumeInfo]) {
    println!(
        "{:<36}  {:<20}  {:<8}  {:>10}  {:>10}  {:>10}  {:>10}",
        "ID", "NAME", "KIND", "SIZE", "ALLOCATED", "EXCLUSIVE", "SHARED"
    );
    for v in vols {
        println!(
            "{:<36}  {:<20}  {:<8}  {:>10}  {:>10}  {:>10}  {:>10}",
            v.id,
            v.name,
            format!("{:?}", v.kind).to_lowercase(),
            human(v.size),
            human(v.allocated_bytes),
            human(v.exclusive_bytes),
            human(v.shared_bytes)
        );
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&args.log))
        .add_directive(
            pool_trust::audit::LOG_DIRECTIVE
                .parse()
                .expect("a valid directive"),
        );
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colour only for a person: not in a journal or a log file.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    match args.command {
        Command::Serve { config } => Ok(storaged::daemon::run(config.as_deref())?),
        Command::Pool(cmd) => pool_command(cmd),
        Command::Volume(cmd) => volume_command(cmd),
        Command::Export(cmd) => export_command(cmd),
        Command::Fsck { pool, repair } => {
            let pool = pool.import()?;
            let report = pool.check(repair)?;
            println!("chunks checked      {}", report.chunks_checked);
            println!("leaked chunks       {}", report.leaked_chunks);
            println!("count mismatches    {}", report.refcount_mismatches);
            println!("double allocations  {}", report.double_allocations);
            println!("orphan nodes        {}", report.orphan_nodes);
            if repair {
                println!("reclaimed chunks    {}", report.reclaimed_chunks);
            }
            for p in &report.problems {
                println!("problem: {p}");
            }
            if report.clean() {
                println!("clean");
                Ok(())
            } else if repair {
                println!("repaired");
                Ok(())
            } else {
                bail!("the pool has problems; run with --repair to fix what can be fixed")
            }
        }
        Command::Exercise {
            pool,
            volume,
            seed,
            ops,
        } => exercise(&pool, &volume, seed, ops),
    }
}

fn pool_command(cmd: PoolCommand) -> anyhow::Result<()> {
    match cmd {
        PoolCommand::Create {
            pool,
            size,
            chunk_size,
            name,
            warn_percent,
        } => {
            let (kind, path) = pool.kind_and_path();
            let p = ThinPool::create(&CreateOptions {
                name,
                kind,
                path: path.clone(),
                size,
                chunk_size,
                meta_dir: pool.meta_dir.clone(),
                warning_threshold_percent: warn_percent,
            })
            .with_context(|| format!("creating a pool on {}", path.display()))?;
            print_usage(&p);
            Ok(())
        }
        PoolCommand::Import { pool } | PoolCommand::Usage { pool } => {
            print_usage(&pool.import()?);
            Ok(())
        }
        PoolCommand::Extend { pool, size } => {
            let p = pool.import()?;
            p.extend(size)?;
            print_usage(&p);
            Ok(())
        }
    }
}

fn volume_command(cmd: VolumeCommand) -> anyhow::Result<()> {
    match cmd {
        VolumeCommand::Create {
            pool,
            name,
            size,
            block_size,
        } => {
            let p = pool.import()?;
            let v = p.create_volume(&name, size, block_size, BTreeMap::new())?;
            print_volumes(&[v]);
        }
        VolumeCommand::List { pool } => print_volumes(&pool.import()?.list_volumes()),
        VolumeCommand::Snapshot { pool, volume, name } => {
            let p = pool.import()?;
            let v = p.snapshot(resolve(&p, &volume)?, &name, BTreeMap::new())?;
            print_volumes(&[v]);
        }
        VolumeCommand::Clone { pool, source, name } => {
            let p = pool.import()?;
            let v = p.clone_volume(resolve(&p, &source)?, &name, BTreeMap::new())?;
            print_volumes(&[v]);
        }
        VolumeCommand::Revert {
            pool,
            volume,
            snapshot,
        } => {
            let p = pool.import()?;
            let v = p.revert(resolve(&p, &volume)?, resolve(&p, &snapshot)?)?;
            print_volumes(&[v]);
        }
        VolumeCommand::Resize {
            pool,
            volume,
            size,
            force,
        } => {
            let p = pool.import()?;
            let v = p.resize(resolve(&p, &volume)?, size, force)?;
            print_volumes(&[v]);
        }
        VolumeCommand::Delete { pool, volume } => {
            let p = pool.import()?;
            let freed = p.delete_volume(resolve(&p, &volume)?)?;
            println!("deleted; {} freed", human(freed));
        }
    }
    Ok(())
}

fn export_command(cmd: ExportCommand) -> anyhow::Result<()> {
    use storaged::export;
    let print = |recs: &[export::ExportRecord]| {
        println!(
            "{:<36}  {:<60}  {:>4}  {:<36}  ALLOWED",
            "ID", "TARGET", "LUN", "VOLUME"
        );
        for r in recs {
            let allowed: Vec<&str> = r.grants.iter().map(|g| g.initiator.as_str()).collect();
            println!(
                "{:<36}  {:<60}  {:>4}  {:<36}  {}",
                r.id,
                r.target_iqn,
                r.lun,
                r.volume_id,
                allowed.join(",")
            );
        }
    };
    match cmd {
        ExportCommand::Create {
            pool,
            volume,
            target_iqn,
            lun,
            read_only,
            allow,
        } => {
            let p = pool.import()?;
            let vol = resolve(&p, &volume)?;
            let iqn = target_iqn.unwrap_or_else(|| {
                format!("{}:{vol}", storaged::daemon::Config::default().iqn_prefix)
            });
            if !iscsi_target::server::valid_iscsi_name(&iqn) {
                bail!("{iqn:?} is not a valid iSCSI name");
            }
            for a in &allow {
                if !iscsi_target::server::valid_iscsi_name(a) {
                    bail!("initiator {a:?} is not a valid iSCSI name");
                }
            }
            let grants = allow
                .iter()
                .map(|a| export::Exports::new_grant(a, None, None))
                .collect();
            let rec = export::add_offline(&p, vol, &iqn, lun, read_only, grants)?;
            print(&[rec]);
        }
        ExportCommand::List { pool } => print(&export::recorded(&pool.import()?)),
        ExportCommand::Delete { pool, export } => {
            export::delete_offline(&pool.import()?, export)?;
            println!("deleted");
        }
    }
    Ok(())
}

/// The crash-test workload: every acknowledged flush or snapshot is announced on stdout
/// before the next op starts.
fn exercise(loc: &PoolLocation, volume: &str, seed: u64, ops: u64) -> anyhow::Result<()> {
    let pool = loc.import()?;
    let vol = resolve(&pool, volume)?;
    let info = pool.volume_info(vol)?;
    let blocks = info.size / BLOCK as u64;
    let mut w = Workload::new(seed, blocks);
    let mut out = std::io::stdout().lock();
    let mut buf = Vec::new();
    writeln!(out, "READY")?;
    out.flush()?;
    loop {
        let (op, step) = w.next_step();
        if ops != 0 && op >= ops {
            return Ok(());
        }
        if op.is_multiple_of(storaged::exercise::PROGRESS_EVERY) {
            writeln!(out, "P {op}")?;
            out.flush()?;
        }
        match step {
            Step::Write { block, blocks } => {
                buf.resize(blocks as usize * BLOCK, 0);
                for (i, b) in buf.chunks_mut(BLOCK).enumerate() {
                    fill_block(seed, op, block + i as u64, b);
                }
                with_space(&pool, vol, op, &mut out, || {
                    pool.write(vol, block * BLOCK as u64, &buf)
                })?;
            }
            Step::Discard { block, blocks } => {
                with_space(&pool, vol, op, &mut out, || {
                    pool.discard(vol, block * BLOCK as u64, blocks * BLOCK as u64)
                })?;
            }
            Step::Flush => {
                pool.flush()?;
                writeln!(out, "F {op}")?;
                out.flush()?;
            }
            Step::Snapshot => {
                // Keep at most three snapshots of the volume: delete the oldest first.
                let mut snaps: Vec<VolumeInfo> = pool
                    .list_volumes()
                    .into_iter()
                    .filter(|v| v.origin == Some(vol) && v.read_only())
                    .collect();
                snaps.sort_by_key(|v| v.name.clone());
                while snaps.len() >= 3 {
                    let old = snaps.remove(0);
                    pool.delete_volume(old.id)?;
                    writeln!(out, "D {op} {}", old.name)?;
                }
                // Names sort in creation order: seed and op, zero-padded.
                let name = format!("s-{seed:020}-{op:012}");
                pool.snapshot(vol, &name, BTreeMap::new())?;
                writeln!(out, "S {op} {name}")?;
                out.flush()?;
            }
        }
    }
}

/// Runs `f` until it does not fail for lack of space, making room the way an operator
/// would: first a commit (freed chunks become reusable), then deleting the oldest
/// snapshot. Rewriting what a failed attempt already wrote is harmless: the content is
/// the same. A commit in the middle of op `op` covers all earlier ops and part of this
/// one, so it is announced as a commit of op `op - 1`.
fn with_space(
    pool: &ThinPool,
    vol: uuid::Uuid,
    op: u64,
    out: &mut impl Write,
    mut f: impl FnMut() -> Result<(), storaged::PoolError>,
) -> anyhow::Result<()> {
    loop {
        match f() {
            Err(storaged::PoolError::NoSpace) => {}
            other => return Ok(other?),
        }
        if pool.usage().pending_free_chunks > 0 {
            pool.flush()?;
            if let Some(prev) = op.checked_sub(1) {
                writeln!(out, "F {prev}")?;
            }
        } else {
            let mut snaps: Vec<VolumeInfo> = pool
                .list_volumes()
                .into_iter()
                .filter(|v| v.origin == Some(vol) && v.read_only())
                .collect();
            snaps.sort_by_key(|v| v.name.clone());
            let Some(old) = snaps.first() else {
                bail!("the pool is full and holds no snapshot to delete");
            };
            pool.delete_volume(old.id)?;
            writeln!(out, "D {} {}", op.saturating_sub(1), old.name)?;
        }
        out.flush()?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("20G"), Ok(20 << 30));
        assert_eq!(parse_size("1.5M"), Ok(3 << 19));
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("x").is_err());
    }
}
