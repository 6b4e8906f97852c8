//! `poolctl host-*`: the hosts of the pool, joining them and taking them out of service.

use clap::Subcommand;
use pool_client::new_request_id;
use proto::coordinator as pb;

use crate::ctl::{Ctl, call};
use crate::output::{Table, host_state, human_bytes, ts};

#[derive(Debug, Subcommand)]
pub enum HostCommand {
    /// Hosts of the pool.
    #[command(name = "host-list")]
    List,
    /// Let a new host join: without ADDRESS, a one-time join token for host NAME, in a
    /// join file for `hostd --join FILE` (the host gets its certificate with it). With
    /// ADDRESS, add a host that already has its certificate and runs there.
    #[command(name = "host-join")]
    Join {
        name: String,
        /// hostd's gRPC address (a host with its certificate already).
        address: Option<String>,
        /// How long the token is valid (e.g. 30m, 1h; at most 24h).
        #[arg(long, value_parser = super::join::parse_ttl, conflicts_with = "address")]
        ttl: Option<u32>,
        /// Write the join file here (0600; never over an existing file) instead of stdout.
        #[arg(long, conflicts_with = "address")]
        out: Option<std::path::PathBuf>,
    },
    /// Let a host receive VMs again.
    #[command(name = "host-enable")]
    Enable { host: String },
    /// Keep a host from receiving new VMs.
    #[command(name = "host-disable")]
    Disable { host: String },
    /// Live-migrate every VM away from a host, then put it in maintenance.
    #[command(name = "host-evacuate")]
    Evacuate { host: String },
}

pub async fn run(ctl: &mut Ctl, command: HostCommand) -> anyhow::Result<()> {
    match command {
        HostCommand::List => {
            let hosts = ctl.hosts().await?;
            let mut t = Table::new(&[
                "ID",
                "NAME",
                "ADDRESS",
                "STATE",
                "VMS",
                "MEMORY USED",
                "MEMORY",
                "HEARTBEAT",
                "NICS",
            ]);
            for h in hosts {
                let total = h.info.as_ref().map_or(0, |i| i.memory_total_bytes);
                t.row(vec![
                    h.id.into(),
                    h.name.into(),
                    h.address.into(),
                    host_state(h.state).into(),
                    (h.vm_ids.len() as u64).into(),
                    human_bytes(h.memory_allocated_bytes).into(),
                    human_bytes(total).into(),
                    ts(&h.last_heartbeat_at).into(),
                    h.nics.join(",").into(),
                ]);
            }
            ctl.print(&t);
        }
        HostCommand::Join {
            name,
            address: None,
            ttl,
            out,
        } => {
            super::join::create(ctl, pb::JoinRole::Host, name, ttl, out.as_deref()).await?;
        }
        HostCommand::Join {
            name,
            address: Some(address),
            ..
        } => {
            let r = call!(
                ctl.client,
                join_host,
                pb::JoinHostRequest {
                    request_id: new_request_id(),
                    name,
                    address
                }
            )?;
            ctl.follow(r).await?;
        }
        HostCommand::Enable { host } => {
            let req = pb::HostRef {
                request_id: new_request_id(),
                host_id: ctl.host_id(&host).await?,
            };
            let r = call!(ctl.client, enable_host, req)?;
            ctl.follow(r).await?;
        }
        HostCommand::Disable { host } => {
            let req = pb::HostRef {
                request_id: new_request_id(),
                host_id: ctl.host_id(&host).await?,
            };
            let r = call!(ctl.client, disable_host, req)?;
            ctl.follow(r).await?;
        }
        HostCommand::Evacuate { host } => {
            let req = pb::HostRef {
                request_id: new_request_id(),
                host_id: ctl.host_id(&host).await?,
            };
            let r = call!(ctl.client, evacuate_host, req)?;
            ctl.follow(r).await?;
        }
    }
    Ok(())
}
