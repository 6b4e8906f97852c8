//! `poolctl sr-*`: storage repositories (a storaged endpoint and one of its thin pools).

use anyhow::bail;
use clap::Subcommand;
use pool_client::new_request_id;
use proto::coordinator as pb;

use crate::ctl::{Ctl, call};
use crate::output::{Table, human_bytes, parse_size};

#[derive(Debug, Subcommand)]
pub enum SrCommand {
    /// Add a storage repository: a storaged endpoint and one of its thin pools.
    #[command(name = "sr-create")]
    Create {
        name: String,
        /// storaged's gRPC address.
        address: String,
        /// An existing thin pool of that storaged...
        #[arg(long, conflicts_with = "file")]
        thin_pool: Option<String>,
        /// ...or a new one on this file (on the storage host).
        #[arg(long, requires = "size")]
        file: Option<String>,
        #[arg(long, value_parser = parse_size)]
        size: Option<u64>,
    },
    /// A one-time join token for a new storage endpoint NAME, in a join file: its
    /// storaged gets its certificate with it (`join_file` in its configuration).
    #[command(name = "storage-join")]
    Join {
        name: String,
        /// How long the token is valid (e.g. 30m, 1h; at most 24h).
        #[arg(long, value_parser = super::join::parse_ttl)]
        ttl: Option<u32>,
        /// Write the join file here (0600; never over an existing file) instead of stdout.
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
    /// Storage repositories and their space.
    #[command(name = "sr-list")]
    List,
}

pub async fn run(ctl: &mut Ctl, command: SrCommand) -> anyhow::Result<()> {
    match command {
        SrCommand::Create {
            name,
            address,
            thin_pool,
            file,
            size,
        } => {
            let create_pool = file.map(|f| proto::storage::CreatePoolRequest {
                name: name.clone(),
                backing_kind: proto::storage::BackingKind::File as i32,
                backing_path: f,
                size_bytes: size.unwrap_or(0),
                chunk_size_bytes: 0,
                warning_threshold_percent: 0,
            });
            if thin_pool.is_none() && create_pool.is_none() {
                bail!(
                    "give --thin-pool (an existing pool of that storaged) or --file and --size (a new one)"
                );
            }
            let r = call!(
                ctl.client,
                create_storage_repository,
                pb::CreateStorageRepositoryRequest {
                    request_id: new_request_id(),
                    name,
                    address,
                    thin_pool_id: thin_pool.unwrap_or_default(),
                    create_pool,
                }
            )?;
            ctl.follow(r).await?;
        }
        SrCommand::Join { name, ttl, out } => {
            super::join::create(ctl, pb::JoinRole::Storage, name, ttl, out.as_deref()).await?;
        }
        SrCommand::List => {
            let srs = ctl.srs().await?;
            let mut t = Table::new(&[
                "ID",
                "NAME",
                "ADDRESS",
                "USED",
                "SIZE",
                "PROVISIONED",
                "REACHABLE",
            ]);
            for s in srs {
                let u = s.usage.unwrap_or_default();
                t.row(vec![
                    s.id.into(),
                    s.name.into(),
                    s.address.into(),
                    human_bytes(u.used_bytes).into(),
                    human_bytes(u.total_bytes).into(),
                    human_bytes(u.provisioned_bytes).into(),
                    s.reachable.into(),
                ]);
            }
            ctl.print(&t);
        }
    }
    Ok(())
}
