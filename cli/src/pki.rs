//! `poolctl pki-init` and `pki-issue`: founding a pool's CA on this machine and giving
//! daemons their TLS directories, for set-ups that start daemons by hand or by script
//! (the network-namespace lab, compose, systemd). `poolctl lab` does the same by itself.
//! These run offline: they touch only local files.

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use pool_trust::{Identity, LocalCa, PoolId};

#[derive(Debug, Subcommand)]
pub enum PkiCommand {
    /// Create the pool's CA in DIR (the key 0600 in DIR/ca, the public bundle DIR/ca.pem
    /// that clients and daemons trust); an existing CA there is kept.
    #[command(name = "pki-init")]
    Init {
        dir: PathBuf,
        /// The pool's id: the coordinators' `--pool-id`, carried by every certificate.
        #[arg(long)]
        pool_id: String,
    },
    /// Issue a daemon's TLS directory (ca.pem, cert.pem, key.pem) from the CA in DIR.
    #[command(name = "pki-issue")]
    Issue {
        dir: PathBuf,
        /// The pool's id (as given to pki-init).
        #[arg(long)]
        pool_id: String,
        /// Whom the certificate names: member/N, host/NAME, storage/NAME, client/NAME or
        /// monitor/NAME (a metrics scraper: it may read `/metrics` and nothing else).
        #[arg(long)]
        identity: String,
        /// An address (IP or DNS name) clients dial the daemon at; repeat for more.
        #[arg(long = "name")]
        names: Vec<String>,
        /// The TLS directory to write (created 0700).
        #[arg(long)]
        out: PathBuf,
    },
}

pub fn run(command: PkiCommand) -> anyhow::Result<()> {
    match command {
        PkiCommand::Init { dir, pool_id } => {
            let ca = open(&dir, &pool_id)?;
            println!(
                "pool {pool_id}: CA {} (bundle {})",
                ca.ca().cert().fingerprint(),
                ca.bundle_path().display()
            );
        }
        PkiCommand::Issue {
            dir,
            pool_id,
            identity,
            names,
            out,
        } => {
            let ca = open(&dir, &pool_id)?;
            let identity = Identity::parse_path(&identity)
                .map_err(|e| anyhow::anyhow!("--identity {identity}: {e}"))?;
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            ca.issue(&identity, &names, &out)
                .map_err(|e| anyhow::anyhow!(proto::error_chain(&e)))
                .with_context(|| format!("issuing {identity}"))?;
            println!("{identity}: {}", out.display());
        }
    }
    Ok(())
}

fn open(dir: &std::path::Path, pool_id: &str) -> anyhow::Result<LocalCa> {
    let pool = PoolId::parse(pool_id).map_err(|e| anyhow::anyhow!("--pool-id: {e}"))?;
    LocalCa::open_or_create(dir, &pool)
        .map_err(|e| anyhow::anyhow!(proto::error_chain(&e)))
        .with_context(|| format!("the pool CA in {}", dir.display()))
}
