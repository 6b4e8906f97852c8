//! Serves one file-backed LUN: the conformance run and the benchmarks use this until
//! storaged serves thin volumes.
//!
//! `cargo run -p iscsi-target --release --example serve -- --file PATH --size BYTES
//!  --listen 127.0.0.1:PORT --iqn IQN`

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use iscsi_target::{
    ChapCredentials, FileBlockDevice, FilePrStore, InitiatorAccess, LunConfig, MemoryPrStore,
    PrStore, ServerOptions, TargetConfig, TargetServer, naa_from_serial,
};

#[derive(Parser, Debug)]
#[command(about = "Serve a file as an iSCSI LUN")]
struct Args {
    /// Backing file (created or grown to --size).
    #[arg(long)]
    file: PathBuf,
    /// LUN size in bytes; the file's own size when left out.
    #[arg(long)]
    size: Option<u64>,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:3260")]
    listen: SocketAddr,
    /// Target name.
    #[arg(long, default_value = "iqn.2024-01.org.pool:lun")]
    iqn: String,
    /// Logical block size (512 or 4096).
    #[arg(long, default_value_t = 512)]
    block_size: u32,
    /// Serve read-only.
    #[arg(long)]
    read_only: bool,
    /// Initiators allowed to log in (any initiator when none is given).
    #[arg(long = "initiator")]
    initiators: Vec<String>,
    /// CHAP user and secret the initiators must authenticate with: USER:SECRET. CHAP is
    /// per initiator, so this needs at least one --initiator.
    #[arg(long, requires = "initiators")]
    chap: Option<String>,
    /// Mutual CHAP user and secret the target answers with: USER:SECRET (needs --chap).
    #[arg(long, requires = "chap")]
    mutual_chap: Option<String>,
    /// Directory keeping persistent reservations across restarts (memory when left out).
    #[arg(long)]
    pr_dir: Option<PathBuf>,
    /// Serial number of the LUN (stable identity, VPD 0x80/0x83).
    #[arg(long)]
    serial: Option<String>,
}

fn creds(s: &str) -> anyhow::Result<ChapCredentials> {
    let (user, secret) = s
        .split_once(':')
        .context("CHAP credentials are USER:SECRET")?;
    Ok(ChapCredentials {
        user: user.into(),
        secret: secret.as_bytes().to_vec(),
    })
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let dev = FileBlockDevice::open(&args.file, args.size, args.block_size, args.read_only)
        .with_context(|| format!("opening {}", args.file.display()))?;
    let serial = args.serial.clone().unwrap_or_else(|| {
        args.file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "lun0".into())
    });
    let store: Arc<dyn PrStore> = match &args.pr_dir {
        Some(d) => Arc::new(FilePrStore::new(d)?),
        None => Arc::new(MemoryPrStore::default()),
    };
    let chap = args.chap.as_deref().map(creds).transpose()?;
    let mutual = args.mutual_chap.as_deref().map(creds).transpose()?;
    let server = TargetServer::new(ServerOptions::default(), store);
    server.add_target(TargetConfig {
        iqn: args.iqn.clone(),
        alias: Some("pool-lun".into()),
        luns: vec![LunConfig {
            id: 0,
            device: Arc::new(dev),
            naa: naa_from_serial(&serial),
            serial,
        }],
        initiators: args
            .initiators
            .iter()
            .map(|n| InitiatorAccess {
                name: n.clone(),
                chap: chap.clone(),
                mutual_chap: mutual.clone(),
            })
            .collect(),
        allow_any_initiator: args.initiators.is_empty(),
    })?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("binding {}", args.listen))?;
        tracing::info!(listen = %listener.local_addr()?, iqn = %args.iqn, "serving");
        let shutdown = async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        };
        server.run(listener, shutdown).await?;
        anyhow::Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &[&str] = &["serve", "--file", "f", "--iqn", "iqn.2024-01.t:x"];

    fn parse(extra: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(BASE.iter().chain(extra))
    }

    #[test]
    fn chap_needs_an_initiator_to_apply_to() {
        assert!(parse(&["--chap", "u:s"]).is_err());
        assert!(parse(&["--initiator", "iqn.2024-01.h:1", "--mutual-chap", "t:s"]).is_err());
        assert!(parse(&["--initiator", "iqn.2024-01.h:1", "--chap", "u:s"]).is_ok());
        assert!(parse(&[]).is_ok());
    }
}
