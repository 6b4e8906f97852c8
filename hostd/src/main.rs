use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use hostd::config::Config;

/// Host agent: runs KVM guests whose disks are iSCSI volumes and serves HostService.
#[derive(Debug, Parser)]
#[command(name = "hostd", version, about)]
struct Args {
    /// TOML configuration file.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// gRPC listen address (overrides the config file).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Log filter, e.g. "info" or "hostd=debug" (RUST_LOG wins when set).
    #[arg(long, default_value = "info")]
    log: String,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    init_logging(&args.log);
    let mut config = match &args.config {
        Some(path) => Config::load(path).context("loading configuration")?,
        None => Config::default(),
    };
    if args.listen.is_some() {
        config.listen = args.listen;
    }
    tracing::info!(?config, "hostd starting");
    anyhow::bail!("the hostd daemon is being built")
}

fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
