//! `poolctl`: the command-line tool of the pool, and `poolctl lab`, the one-machine pool.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use serde::Deserialize;

/// Drive a pool of KVM hosts with shared iSCSI thin storage.
#[derive(Debug, Parser)]
#[command(name = "poolctl", version, about)]
struct Args {
    /// TOML configuration file (coordinator addresses, token).
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    /// Log filter (RUST_LOG wins when set).
    #[arg(long, global = true, default_value = "warn")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a one-machine pool: 3 hosts, 3 coordinator members and a file-backed storage box.
    Lab {
        /// Where the lab keeps its state; running again resumes the same pool.
        #[arg(long, default_value = "./lab-data")]
        data_dir: PathBuf,
    },
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// Coordinator members to try, in order, to find the leader.
    #[serde(default)]
    coordinators: Vec<String>,
    /// Token from `Login`, sent on every call.
    token: Option<String>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&args.log));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let config: Config = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?
        }
        None => Config::default(),
    };
    tracing::debug!(
        coordinators = ?config.coordinators,
        token = config.token.is_some(),
        "poolctl configuration"
    );
    match args.command {
        Command::Lab { data_dir } => lab(&data_dir),
    }
}

fn lab(data_dir: &std::path::Path) -> anyhow::Result<()> {
    anyhow::bail!(
        "the one-machine pool cannot start yet (data dir {}): storaged, hostd and poold \
         are still being built (see the open issues); nothing was started",
        data_dir.display()
    )
}
