//! `iscsi`: discover targets, look at LUNs, copy between a LUN and a file, and measure a
//! LUN under a fixed load, with the `iscsi-initiator` library.
//!
//! LUNs are named by URL, as libiscsi's tools name them:
//! `iscsi://[USER[%SECRET]@]HOST[:PORT]/TARGET-IQN/LUN`.

mod bench;
mod copy;
mod url;

use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use iscsi_initiator::{Chap, Session, SessionConfig, discover};

use crate::url::LunUrl;

#[derive(Parser, Debug)]
#[command(name = "iscsi", about = "iSCSI initiator tool", version)]
struct Cli {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    cmd: Cmd,
}

/// Options every subcommand takes.
#[derive(Args, Debug, Clone)]
struct Common {
    /// Our iSCSI name.
    #[arg(long, global = true, default_value = "iqn.2024-01.org.pool:iscsi-cli")]
    initiator: String,
    /// CHAP credentials USER:SECRET (also accepted in the URL as USER%SECRET@).
    #[arg(long, global = true)]
    chap: Option<String>,
    /// Mutual CHAP: the identity USER:SECRET the target must prove.
    #[arg(long, global = true)]
    mutual_chap: Option<String>,
    /// CRC32C header digests.
    #[arg(long, global = true)]
    header_digest: bool,
    /// CRC32C data digests.
    #[arg(long, global = true)]
    data_digest: bool,
    /// Seconds a session may stay down before calls fail.
    #[arg(long, global = true, default_value_t = 30)]
    replacement_timeout: u64,
    /// MaxRecvDataSegmentLength we declare (bytes).
    #[arg(long, global = true, default_value_t = 1024 * 1024)]
    max_recv_segment: u32,
    /// Runtime worker threads (1: a single-threaded runtime).
    #[arg(long, global = true, default_value_t = 1)]
    threads: usize,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// List the targets a portal offers (SendTargets).
    Discover {
        /// HOST or HOST:PORT
        portal: String,
    },
    /// List targets, their LUNs, sizes and products.
    Ls {
        /// HOST or HOST:PORT
        portal: String,
    },
    /// Standard INQUIRY data, serial number and identifiers of a LUN.
    Inq { url: String },
    /// Size and block size of a LUN.
    Capacity { url: String },
    /// Copy a LUN (or part of it) into a file.
    Read {
        url: String,
        /// Destination file ("-" for standard output).
        #[arg(long)]
        out: String,
        #[command(flatten)]
        range: copy::Range,
    },
    /// Copy a file onto a LUN.
    Write {
        url: String,
        /// Source file ("-" for standard input).
        #[arg(long = "in")]
        input: String,
        #[command(flatten)]
        range: copy::Range,
        /// SYNCHRONIZE CACHE at the end.
        #[arg(long)]
        flush: bool,
    },
    /// Fixed load: random or sequential reads or writes at a queue depth for a time.
    Bench(bench::BenchArgs),
}

fn creds(s: &str) -> anyhow::Result<Chap> {
    let (user, secret) = s
        .split_once(':')
        .context("CHAP credentials are USER:SECRET")?;
    Ok(Chap::new(user, secret.as_bytes().to_vec()))
}

impl Common {
    fn config(
        &self,
        portal: &str,
        target: &str,
        url_chap: Option<Chap>,
    ) -> anyhow::Result<SessionConfig> {
        let mut cfg = SessionConfig::new(portal, target, &self.initiator);
        cfg.chap = match (&self.chap, url_chap) {
            (Some(c), _) => Some(creds(c)?),
            (None, c) => c,
        };
        cfg.mutual_chap = self.mutual_chap.as_deref().map(creds).transpose()?;
        cfg.header_digest = self.header_digest;
        cfg.data_digest = self.data_digest;
        cfg.timeouts.replacement = Duration::from_secs(self.replacement_timeout);
        cfg.limits.max_recv_data_segment = self.max_recv_segment;
        Ok(cfg)
    }

    async fn open(&self, url: &str) -> anyhow::Result<(Session, iscsi_initiator::Lun)> {
        let u = LunUrl::parse(url)?;
        let cfg = self.config(&u.portal, &u.target, u.chap.clone())?;
        // The error names the target and portal itself.
        let session = Session::connect(cfg).await?;
        let lun = session
            .lun(u.lun)
            .await
            .with_context(|| format!("opening LUN {}", u.lun))?;
        Ok((session, lun))
    }
}

fn main() {
    if let Err(e) = real_main() {
        // The cause chain on one line, without a backtrace.
        eprintln!("iscsi: {e:#}");
        std::process::exit(1);
    }
}

fn real_main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let rt = if cli.common.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(cli.common.threads)
            .enable_all()
            .build()?
    };
    rt.block_on(run(cli))
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

async fn run(cli: Cli) -> anyhow::Result<()> {
    let c = &cli.common;
    match cli.cmd {
        Cmd::Discover { portal } => {
            let cfg = c.config(&portal, "-", None)?;
            for t in discover(&cfg).await? {
                for p in &t.portals {
                    match p.group {
                        Some(g) => println!("{},{} {}", p.address, g, t.name),
                        None => println!("{} {}", p.address, t.name),
                    }
                }
                if t.portals.is_empty() {
                    println!("{} {}", portal, t.name);
                }
            }
        }
        Cmd::Ls { portal } => {
            let cfg = c.config(&portal, "-", None)?;
            for t in discover(&cfg).await? {
                println!("Target: {}", t.name);
                let cfg = c.config(&portal, &t.name, None)?;
                let session = match Session::connect(cfg).await {
                    Ok(s) => s,
                    Err(e) => {
                        println!("  (cannot log in: {e})");
                        continue;
                    }
                };
                for id in session.report_luns().await? {
                    match session.lun(id).await {
                        Ok(lun) => {
                            let inq = lun.inquiry().await?;
                            println!(
                                "  Lun:{id:<3} Type:{:#04x} {} {} Size:{} ({} x {} B{})",
                                inq.device_type,
                                inq.vendor,
                                inq.product,
                                human(lun.size()),
                                lun.blocks(),
                                lun.block_size(),
                                if lun.capacity().thin { ", thin" } else { "" }
                            );
                        }
                        Err(_) => println!("  Lun:{id:<3} (no block device)"),
                    }
                }
                session.logout().await?;
            }
        }
        Cmd::Inq { url } => {
            let (session, lun) = c.open(&url).await?;
            let i = lun.inquiry().await?;
            println!("Vendor:    {}", i.vendor);
            println!("Product:   {}", i.product);
            println!("Revision:  {}", i.revision);
            println!(
                "Type:      {:#04x} (qualifier {})",
                i.device_type, i.qualifier
            );
            println!("Version:   {:#04x}", i.version);
            println!("CmdQue:    {}", i.command_queueing);
            if let Ok(s) = lun.serial().await {
                println!("Serial:    {s}");
            }
            if let Ok(ids) = lun.device_ids().await {
                for d in ids {
                    let hex: String = d.value.iter().map(|b| format!("{b:02x}")).collect();
                    println!("Id:        type {} assoc {} {hex}", d.kind, d.association);
                }
            }
            let l = lun.limits();
            println!(
                "Limits:    max transfer {} blocks, max unmap {} blocks, CAW {} blocks",
                l.max_transfer_blocks, l.max_unmap_blocks, l.max_compare_and_write_blocks
            );
            session.logout().await?;
        }
        Cmd::Capacity { url } => {
            let (session, lun) = c.open(&url).await?;
            let cap = lun.capacity();
            println!(
                "{} bytes ({}): {} blocks of {} bytes{}",
                lun.size(),
                human(lun.size()),
                cap.blocks,
                cap.block_size,
                if cap.thin { ", thin provisioned" } else { "" }
            );
            session.logout().await?;
        }
        Cmd::Read { url, out, range } => {
            let (session, lun) = c.open(&url).await?;
            copy::lun_to_file(&lun, &out, &range).await?;
            session.logout().await?;
        }
        Cmd::Write {
            url,
            input,
            range,
            flush,
        } => {
            let (session, lun) = c.open(&url).await?;
            copy::file_to_lun(&lun, &input, &range).await?;
            if flush {
                lun.flush().await?;
            }
            session.logout().await?;
        }
        Cmd::Bench(args) => {
            let (session, lun) = c.open(&args.url).await?;
            bench::run(&lun, &args).await?;
            session.logout().await?;
        }
    }
    Ok(())
}
