//! Tasks: what a change is doing, looked up, listed, followed as it goes, cancelled.

use std::pin::Pin;
use std::time::Duration;

use proto::coordinator as pb;
use tonic::Status;
use tonic::codegen::tokio_stream::Stream;

use super::PoolHandler;
use super::request::page;
use crate::auth::Caller;
use crate::coordinator::task_finished;
use crate::state::command::{ObjectId, Op};

/// A task's successive states, the first as it is now, the last once it ended.
pub type TaskStream = Pin<Box<dyn Stream<Item = Result<pb::Task, Status>> + Send + 'static>>;

pub(super) async fn get(svc: &PoolHandler, id: String) -> Result<pb::Task, Status> {
    svc.c.read(|s| s.task(&id)).await?.ok_or_else(|| {
        Status::not_found(format!(
            "no task with id {id} (finished tasks are kept for a while, not forever)"
        ))
    })
}

pub(super) async fn list(
    svc: &PoolHandler,
    r: pb::ListTasksRequest,
) -> Result<pb::ListTasksResponse, Status> {
    let (tasks, next) = svc
        .c
        .read(|s| {
            page(
                s.tasks
                    .iter()
                    .filter(|(_, t)| r.state == 0 || t.state == r.state)
                    .filter(|(_, t)| r.target_id.is_empty() || t.target_id == r.target_id)
                    .map(|(k, v)| (k.clone(), (**v).clone())),
                r.page.as_ref(),
            )
        })
        .await?;
    Ok(pb::ListTasksResponse {
        tasks,
        next_page_token: next,
    })
}

/// Sends the task each time it changes until it ends.
pub(super) async fn watch(svc: &PoolHandler, id: String) -> Result<TaskStream, Status> {
    let first = svc
        .c
        .read(|s| s.task(&id))
        .await?
        .ok_or_else(|| Status::not_found(format!("no task with id {id}")))?;
    let c = svc.c.clone();
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        let mut applied = c.node.shared.applied.subscribe();
        let mut last = first;
        if tx.send(Ok(last.clone())).await.is_err() {
            return;
        }
        while !task_finished(&last) {
            // A change is applied on this member first; a slow one is re-read at least
            // every second.
            let _ = tokio::time::timeout(Duration::from_secs(1), applied.changed()).await;
            let now = c.node.state().task(&last.id);
            match now {
                Some(t) if t != last => {
                    last = t;
                    if tx.send(Ok(last.clone())).await.is_err() {
                        return;
                    }
                }
                Some(_) => {}
                None => {
                    let _ = tx
                        .send(Err(Status::not_found("the task was forgotten")))
                        .await;
                    return;
                }
            }
        }
    });
    Ok(Box::pin(
        tonic::codegen::tokio_stream::wrappers::ReceiverStream::new(rx),
    ))
}

/// Asks the task's job to stop (only a migration can); answers the task as it is then.
pub(super) async fn cancel(
    svc: &PoolHandler,
    who: &Caller,
    id: String,
) -> Result<pb::Task, Status> {
    let res = svc
        .c
        .write(who, "", Op::CancelJob(ObjectId { id: id.clone() }))
        .await;
    svc.done(who, res)?;
    svc.c
        .read(|s| s.task(&id))
        .await?
        .ok_or_else(|| Status::not_found(format!("no task with id {id}")))
}
