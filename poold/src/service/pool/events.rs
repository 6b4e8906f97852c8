//! `WatchEvents`: the pool's change feed as a stream. A client at position 0, or at one
//! this member no longer keeps, first gets every object (a reset listing, in parts),
//! then the events of each change as it is applied here; one at a kept position gets
//! what came after it and then an empty message marked `synced`. An idle stream gets an empty message with its position now and
//! then, so a client (or a proxy) can tell a quiet pool from a dead connection. Callers
//! see users only if they may list them, audit records only if they may read the log.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use proto::coordinator as pb;
use tonic::Status;
use tonic::codegen::tokio_stream::Stream;

use super::PoolHandler;
use crate::auth;
use crate::coordinator::Coordinator;
use crate::state::changes::{AUDIT_KIND, FeedObject};
use crate::state::machine::UserRecord;

pub type EventStream =
    Pin<Box<dyn Stream<Item = Result<pb::WatchEventsResponse, Status>> + Send + 'static>>;

/// Events per message, about (a change's events are never split).
const BATCH: usize = 500;
/// An idle stream's keep-alive period.
const IDLE: Duration = Duration::from_secs(15);

/// What the stream sends next.
enum Next {
    Listing(Vec<pb::PoolEvent>, u64),
    Changes(Vec<pb::PoolEvent>),
}

/// Serves the feed from `r.after`. The caller's `authorization` header and address are
/// checked again before each message, so a stream ends (Unauthenticated or
/// PermissionDenied) once its token is revoked or its user deleted, and shows users only
/// while the caller's role allows listing them.
pub(super) async fn watch(
    svc: &PoolHandler,
    (header, peer): (Option<String>, String),
    r: pb::WatchEventsRequest,
) -> Result<EventStream, Status> {
    // A member behind the leader first catches up, so that a position given by a
    // member further on reads as caught up here, not as one from elsewhere.
    svc.c.read(|_| ()).await?;
    let c = svc.c.clone();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        let mut applied = c.node.shared.applied.subscribe();
        let mut position = r.after;
        let mut synced = false;
        loop {
            let now = proto::unix_ms();
            let still = auth::authorize(
                &c.node.state(),
                header.as_deref(),
                "WatchEvents",
                &peer,
                now,
            );
            let level = match still {
                Ok(who) => who.level,
                Err(e) => {
                    let _ = tx.send(Err(Status::from(e))).await;
                    return;
                }
            };
            let next = next(&c, position, may_list_users(level));
            let sent = match next {
                Next::Listing(events, at) => {
                    position = at;
                    synced = true;
                    send_listing(&tx, events, at).await
                }
                Next::Changes(events) if events.is_empty() && !synced => {
                    // Caught up from the client's position: it has everything until now.
                    synced = true;
                    let msg = pb::WatchEventsResponse {
                        position,
                        synced: true,
                        ..Default::default()
                    };
                    tx.send(Ok(msg)).await.is_ok()
                }
                Next::Changes(events) if events.is_empty() => {
                    tokio::select! {
                        _ = applied.changed() => continue,
                        _ = tx.closed() => return,
                        _ = tokio::time::sleep(IDLE) => {}
                    }
                    let idle = pb::WatchEventsResponse {
                        position,
                        ..Default::default()
                    };
                    tx.send(Ok(idle)).await.is_ok()
                }
                Next::Changes(events) => {
                    position = events.last().map_or(position, |e| e.position);
                    let events = events.into_iter().filter(|e| visible(e, level)).collect();
                    let msg = pb::WatchEventsResponse {
                        events,
                        position,
                        ..Default::default()
                    };
                    tx.send(Ok(msg)).await.is_ok()
                }
            };
            if !sent {
                return;
            }
        }
    });
    Ok(Box::pin(
        tonic::codegen::tokio_stream::wrappers::ReceiverStream::new(rx),
    ))
}

fn may_list_users(level: auth::Level) -> bool {
    level >= auth::rule("ListUsers").0
}

/// Whether a caller of `level` sees `e`: users only if it may list them, audit records
/// only if it may read the audit log.
fn visible(e: &pb::PoolEvent, level: auth::Level) -> bool {
    match e.kind.as_str() {
        UserRecord::KIND => may_list_users(level),
        AUDIT_KIND => level >= auth::rule("ListAuditEvents").0,
        _ => true,
    }
}

/// Reads the state and the feed together (the feed changes under the state's write
/// lock): a listing at the applied index, or the changes after `position`.
fn next(c: &Arc<Coordinator>, position: u64, with_users: bool) -> Next {
    let state = c.node.state();
    let feed = c.node.shared.feed.lock().expect("feed lock");
    let kept = position != 0 && position <= state.applied_index;
    match feed.after(position, BATCH) {
        Ok(events) if kept => Next::Changes(events),
        _ => Next::Listing(state.listing(with_users), state.applied_index),
    }
}

async fn send_listing(
    tx: &tokio::sync::mpsc::Sender<Result<pb::WatchEventsResponse, Status>>,
    events: Vec<pb::PoolEvent>,
    at: u64,
) -> bool {
    let parts: Vec<Vec<pb::PoolEvent>> = events.chunks(BATCH).map(<[_]>::to_vec).collect();
    let n = parts.len();
    for (i, events) in parts.into_iter().enumerate() {
        let msg = pb::WatchEventsResponse {
            events,
            reset: i == 0,
            synced: i + 1 == n,
            position: at,
        };
        if tx.send(Ok(msg)).await.is_err() {
            return false;
        }
    }
    true
}
