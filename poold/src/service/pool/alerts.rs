//! Alerts: listed (the open ones, or all kept) and dismissed. The pool raises and clears
//! them itself as it applies changes (`crate::state::alerts`).

use proto::coordinator as pb;
use tonic::Status;

use super::PoolHandler;
use super::request::page;
use crate::auth::Caller;
use crate::state::alerts::is_open;
use crate::state::command::{ObjectId, Op};

pub(super) async fn list(
    svc: &PoolHandler,
    r: pb::ListAlertsRequest,
) -> Result<pb::ListAlertsResponse, Status> {
    let (alerts, next) = svc
        .c
        .read(|s| {
            page(
                s.alerts
                    .iter()
                    .filter(|(_, a)| r.all || is_open(a))
                    .map(|(k, v)| (k.clone(), v.clone())),
                r.page.as_ref(),
            )
        })
        .await?;
    Ok(pb::ListAlertsResponse {
        alerts,
        next_page_token: next,
    })
}

pub(super) async fn dismiss(
    svc: &PoolHandler,
    who: &Caller,
    r: pb::DismissAlertRequest,
) -> Result<pb::Task, Status> {
    if r.alert_id.is_empty() {
        return Err(Status::invalid_argument("alert_id is required"));
    }
    svc.c
        .write(
            who,
            &r.request_id,
            Op::DismissAlert(ObjectId { id: r.alert_id }),
        )
        .await
}
