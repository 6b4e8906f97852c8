//! `poolctl pool-*`: pool-wide settings, HA, and rolling the pool's CA.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Subcommand;
use pool_client::new_request_id;
use proto::coordinator as pb;

use crate::ctl::{Ctl, call};
use crate::output::{Table, Value, ts};

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
    /// Print the CA bundle the pool's daemons trust now (PEM; during a CA roll, both
    /// CAs): what `--ca FILE` should hold.
    #[command(name = "pool-ca")]
    Ca,
    /// Roll the pool's CA without downtime: a new CA (cross-signed by the current one)
    /// signs from now on, every running daemon renews onto it within seconds, then the
    /// old CA is dropped. Rerun to resume an interrupted roll.
    #[command(name = "pool-rotate-ca")]
    RotateCa {
        /// Show where the roll stands (each daemon's CA) and change nothing.
        #[arg(long, conflicts_with_all = ["finish", "force"])]
        status: bool,
        /// Only drop the old CA (a roll started with --no-wait).
        #[arg(long)]
        finish: bool,
        /// Drop the old CA even though some daemons have not renewed (they must join
        /// the pool again).
        #[arg(long)]
        force: bool,
        /// Seconds to wait for every daemon to renew before giving up (the roll stays
        /// under way; rerun to resume).
        #[arg(long, default_value_t = 300)]
        timeout: u64,
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
        PoolCommand::Ca => {
            let trust = call!(ctl.client, get_trust, pb::GetTrustRequest {})?;
            print!("{}", trust.ca_bundle_pem);
        }
        PoolCommand::RotateCa {
            status,
            finish,
            force,
            timeout,
        } => {
            let step = |step, force| pb::RotateCaRequest {
                step: step as i32,
                force,
                request_id: new_request_id(),
            };
            if status {
                let roll = call!(ctl.client, rotate_ca, step(pb::RotateCaStep::Status, false))?;
                ctl.print(&holders(&roll));
                return Ok(());
            }
            if !finish {
                let roll = call!(ctl.client, rotate_ca, step(pb::RotateCaStep::Start, false))?;
                eprintln!(
                    "rolling the CA: {} -> {}",
                    roll.previous_ca_fingerprint, roll.signing_ca_fingerprint
                );
                if !ctl.wait {
                    ctl.print(&holders(&roll));
                    return Ok(());
                }
                wait_renewed(ctl, Duration::from_secs(timeout)).await?;
            }
            // A pinned CA follows the roll now, while members still present the new CA
            // signed by the old one: after the finish they present the new one alone.
            if let Some((members, known)) = &ctl.pins {
                let met = crate::pin::probe(members).await?;
                crate::pin::settle(
                    &met,
                    known,
                    crate::pin::FirstUse {
                        trust_new_pool: false,
                    },
                )?;
            }
            if let Some(file) = ctl.ca_file.clone() {
                ca_file_follows(ctl, &file).await?;
            }
            let roll = call!(ctl.client, rotate_ca, step(pb::RotateCaStep::Finish, force))?;
            eprintln!("the pool's CA is now {}", roll.signing_ca_fingerprint);
            ctl.print(&holders(&roll));
        }
    }
    Ok(())
}

/// Refuses to finish a roll while the CA bundle poolctl was given lacks the new CA:
/// once the members drop the old one, this poolctl could not reach them any more.
async fn ca_file_follows(ctl: &mut Ctl, file: &std::path::Path) -> anyhow::Result<()> {
    let trust = call!(ctl.client, get_trust, pb::GetTrustRequest {})?;
    let have = pool_trust::CaBundle::load(file)
        .map_err(|e| anyhow::anyhow!(proto::error_chain(&e)))
        .with_context(|| format!("reading {}", file.display()))?;
    let signing = trust.signing_ca_fingerprint.parse()?;
    if !have.contains(&signing) {
        bail!(
            "{} (the CA bundle poolctl trusts) does not hold the new CA {signing}: write \
             `poolctl pool-ca > {}` (it holds both CAs during the roll), then finish with \
             `poolctl pool-rotate-ca --finish`",
            file.display(),
            file.display()
        );
    }
    Ok(())
}

/// Waits until every daemon the pool knows holds a certificate of the new CA, saying
/// who is left as that changes.
async fn wait_renewed(ctl: &mut Ctl, limit: Duration) -> anyhow::Result<()> {
    let start = Instant::now();
    let mut said = String::new();
    loop {
        let roll = call!(
            ctl.client,
            rotate_ca,
            pb::RotateCaRequest {
                step: pb::RotateCaStep::Status as i32,
                ..Default::default()
            }
        )?;
        let left: Vec<&str> = roll
            .holders
            .iter()
            .filter(|h| !h.current)
            .map(|h| h.identity.as_str())
            .collect();
        if roll.ready {
            return Ok(());
        }
        let now = match left.len() {
            0 => "waiting for daemons the pool has no record of to renew".to_owned(),
            n => format!("waiting for {n} to renew: {}", left.join(", ")),
        };
        if now != said {
            eprintln!("{now}");
            said = now;
        }
        if start.elapsed() >= limit {
            bail!(
                "{} daemon(s) did not renew within {}s: {}; the roll stays under way (the \
                 pool trusts both CAs): start them, then rerun `poolctl pool-rotate-ca`, or \
                 drop the old CA with `--finish --force`",
                left.len(),
                limit.as_secs(),
                left.join(", ")
            );
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn holders(roll: &pb::CaRoll) -> Table {
    let mut t = Table::new(&["IDENTITY", "CA", "CURRENT", "EXPIRES"]);
    for h in &roll.holders {
        t.row(vec![
            h.identity.as_str().into(),
            if h.issuer_fingerprint.is_empty() {
                "(none on record)".into()
            } else {
                h.issuer_fingerprint.as_str().into()
            },
            Value::Bool(h.current),
            match h.not_after_ms {
                0 => "-".into(),
                ms => ts(&Some(proto::timestamp(ms))).as_str().into(),
            },
        ]);
    }
    t
}
