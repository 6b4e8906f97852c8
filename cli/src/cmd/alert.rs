//! `poolctl alerts`: what the pool raised (a host unreachable, a repository over 90% full,
//! an HA restart, a failed task), and `alert-dismiss`.

use clap::Subcommand;
use pool_client::new_request_id;
use proto::coordinator as pb;

use crate::ctl::{Ctl, call};
use crate::output::{Table, enum_name, ts};

#[derive(Debug, Subcommand)]
pub enum AlertCommand {
    /// Open alerts, newest first: a host unreachable, a repository over 90% full, an HA
    /// restart, a failed task. Conditions clear by themselves once they end.
    #[command(name = "alerts")]
    List {
        /// Also the cleared and dismissed ones the pool keeps (the latest 1000).
        #[arg(long)]
        all: bool,
    },
    /// Take an alert off the open list.
    #[command(name = "alert-dismiss")]
    Dismiss { id: String },
}

pub async fn run(ctl: &mut Ctl, command: AlertCommand) -> anyhow::Result<()> {
    match command {
        AlertCommand::List { all } => {
            let mut alerts = Vec::new();
            let mut token = String::new();
            loop {
                let r = call!(
                    ctl.client,
                    list_alerts,
                    pb::ListAlertsRequest {
                        page: Some(pb::PageRequest {
                            page_size: 1000,
                            page_token: token.clone(),
                        }),
                        all,
                    }
                )?;
                alerts.extend(r.alerts);
                if r.next_page_token.is_empty() {
                    break;
                }
                token = r.next_page_token;
            }
            ctl.print(&alert_table(alerts));
        }
        AlertCommand::Dismiss { id } => {
            let r = call!(
                ctl.client,
                dismiss_alert,
                pb::DismissAlertRequest {
                    request_id: new_request_id(),
                    alert_id: id,
                }
            )?;
            ctl.follow(r).await?;
        }
    }
    Ok(())
}

fn alert_table(mut alerts: Vec<pb::Alert>) -> Table {
    // The pool lists them as raised; people read the latest first.
    alerts.reverse();
    let mut t = Table::new(&[
        "ID",
        "RAISED",
        "SEVERITY",
        "KIND",
        "TARGET",
        "MESSAGE",
        "CLEARED",
        "DISMISSED",
    ]);
    for a in alerts {
        let severity = enum_name(
            pb::AlertSeverity::try_from(a.severity)
                .ok()
                .map(|s| s.as_str_name()),
            "ALERT_SEVERITY_",
        );
        let kind = enum_name(
            pb::AlertKind::try_from(a.kind)
                .ok()
                .map(|k| k.as_str_name()),
            "ALERT_KIND_",
        );
        let dismissed = if a.dismissed_at.is_some() {
            format!("{} by {}", ts(&a.dismissed_at), a.dismissed_by)
        } else {
            "-".to_owned()
        };
        t.row(vec![
            a.id.into(),
            ts(&a.raised_at).into(),
            severity.into(),
            kind.into(),
            a.target_id.into(),
            a.message.into(),
            ts(&a.cleared_at).into(),
            dismissed.into(),
        ]);
    }
    t
}
