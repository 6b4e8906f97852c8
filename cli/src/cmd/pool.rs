//! `poolctl pool-*`: pool-wide settings and HA.

use clap::Subcommand;
use pool_client::new_request_id;
use proto::coordinator as pb;

use crate::ctl::{Ctl, call};

#[derive(Debug, Subcommand)]
pub enum PoolCommand {
    /// Change pool settings; what is not given stays as it is.
    #[command(name = "pool-set")]
    Set {
        /// Seconds without heartbeats before a host counts as unreachable.
        #[arg(long)]
        heartbeat_timeout: Option<u32>,
        /// Default downtime budget of live migrations, in milliseconds.
        #[arg(long)]
        downtime_ms: Option<u32>,
    },
    /// Turn HA on: hosts that stop heartbeating are fenced and their VMs restarted.
    #[command(name = "pool-ha-enable")]
    HaEnable {
        /// Host failures to plan room for.
        #[arg(long, default_value_t = 1)]
        failures: u32,
        /// Seconds without heartbeats before a host counts as dead.
        #[arg(long, default_value_t = 15)]
        timeout: u32,
    },
}

pub async fn run(ctl: &mut Ctl, command: PoolCommand) -> anyhow::Result<()> {
    match command {
        PoolCommand::Set {
            heartbeat_timeout,
            downtime_ms,
        } => {
            let pool = call!(ctl.client, get_pool, pb::GetPoolRequest {})?;
            let mut settings = pool.settings.unwrap_or_default();
            if let Some(t) = heartbeat_timeout {
                settings.host_heartbeat_timeout_seconds = t;
            }
            if let Some(d) = downtime_ms {
                settings.migration_downtime_budget_ms = d;
            }
            let r = call!(
                ctl.client,
                update_pool_settings,
                pb::UpdatePoolSettingsRequest {
                    request_id: new_request_id(),
                    settings: Some(settings),
                }
            )?;
            ctl.follow(r).await?;
        }
        PoolCommand::HaEnable { failures, timeout } => {
            let r = call!(
                ctl.client,
                set_ha_settings,
                pb::SetHaSettingsRequest {
                    request_id: new_request_id(),
                    settings: Some(pb::HaSettings {
                        enabled: true,
                        host_failures_to_tolerate: failures,
                        failure_timeout_seconds: timeout
                    }),
                }
            )?;
            ctl.follow(r).await?;
        }
    }
    Ok(())
}
