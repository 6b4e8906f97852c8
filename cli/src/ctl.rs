//! What every verb works through: the pool client and the output mode ([`Ctl`]), the
//! [`call!`] macro that sends one request with retries, turning a gRPC status into advice,
//! and following a task to its end.

use std::time::Duration;

use anyhow::{Context, bail};
use pool_client::PoolClient;
use proto::coordinator as pb;

use crate::output::{Progress, Table, task_state};

/// Sends one request (built once, so a retry on another member reuses its request id).
macro_rules! call {
    ($c:expr, $method:ident, $req:expr) => {{
        let req = $req;
        $c.call(|mut p| {
            let req = req.clone();
            async move { p.$method(req).await }
        })
        .await
        .map_err($crate::ctl::explain)
    }};
}
pub(crate) use call;

/// Turns a gRPC status into an error that says what to do.
pub fn explain(s: tonic::Status) -> anyhow::Error {
    let backend;
    let hint = match s.code() {
        _ if pool_client::certificate_refused(&s) => {
            "\nhint: the member's certificate is not signed by the CA poolctl trusts (--ca, or \
             the one pinned in ~/.config/poolctl/known_pools): this is another pool, or its CA \
             changed; check --ca and --pool"
        }
        _ if let Some(addr) = pool_client::unreachable_backend(&s) => {
            backend = format!(
                "\nhint: the coordinator answered, but the pool's daemon at {addr} (a storaged \
                 or a hostd) did not: is it running?"
            );
            &backend
        }
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => {
            "\nhint: no coordinator answered; is the pool running (poolctl lab) and --pool right?"
        }
        tonic::Code::Unauthenticated => "\nhint: log in and pass the token (config file `token`)",
        tonic::Code::PermissionDenied => "\nhint: your role does not allow this; ask a pool-admin",
        tonic::Code::Unimplemented => "\nnote: this coordinator does not offer that yet",
        _ => "",
    };
    anyhow::anyhow!("{:?}: {}{hint}", s.code(), s.message())
}

/// The pool client and how to show results.
pub struct Ctl {
    pub client: PoolClient,
    /// JSON instead of tables.
    pub json: bool,
    /// Follow a change's task to its end.
    pub wait: bool,
    /// When the pool's CA is pinned (no `--ca`): the members to probe and the known-pools
    /// file, to follow a CA roll (`pool-rotate-ca`).
    pub pins: Option<(Vec<String>, std::path::PathBuf)>,
    /// The CA bundle file poolctl was given instead (`--ca`, or `ca` in its config).
    pub ca_file: Option<std::path::PathBuf>,
}

impl Ctl {
    pub fn print(&self, t: &Table) {
        print!("{}", t.render(self.json));
    }

    /// The task's states as the pool streams them (WatchTask: each change as a member
    /// applies it, no polling delay), from `task` until it ends. A stream that breaks (a
    /// member gone) is opened again on whichever member answers; one that keeps breaking
    /// with nothing new is an error.
    async fn watch(
        &mut self,
        mut task: pb::Task,
        bar: &mut Progress,
        finished: impl Fn(&pb::Task) -> bool,
    ) -> anyhow::Result<pb::Task> {
        let mut broken = 0u32;
        loop {
            if !self.json {
                bar.show(task.progress_percent, &task.status_message);
            }
            let req = pb::GetTaskRequest {
                task_id: task.id.clone(),
            };
            let mut stream = call!(self.client, watch_task, req)?;
            loop {
                match stream.message().await {
                    Ok(Some(t)) => {
                        if t != task {
                            broken = 0;
                        }
                        task = t;
                        if finished(&task) {
                            return Ok(task);
                        }
                        if !self.json {
                            bar.show(task.progress_percent, &task.status_message);
                        }
                    }
                    Ok(None) => break,
                    Err(e) if e.code() == tonic::Code::NotFound => return Err(explain(e)),
                    Err(e) => {
                        tracing::info!(task = %task.id, error = %e.message(), "the task's stream broke; following it again");
                        break;
                    }
                }
            }
            broken += 1;
            if broken > 30 {
                bail!(
                    "following task {}: the pool ended its stream 30 times with no change",
                    task.id
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Shows the task a change started and, unless told not to, follows it to its end.
    pub async fn follow(&mut self, resp: pb::TaskResponse) -> anyhow::Result<pb::Task> {
        let mut task = resp
            .task
            .context("the coordinator answered without a task")?;
        let finished = |t: &pb::Task| {
            matches!(
                pb::TaskState::try_from(t.state),
                Ok(pb::TaskState::Succeeded | pb::TaskState::Failed | pb::TaskState::Cancelled)
            )
        };
        let mut bar = Progress::new();
        if self.wait && !finished(&task) {
            task = self.watch(task, &mut bar, finished).await?;
        }
        bar.done();
        if pb::TaskState::try_from(task.state) == Ok(pb::TaskState::Failed) {
            bail!(
                "task {} ({}) failed: {}: {}",
                task.id,
                task.kind,
                task.error_code,
                task.error_message
            );
        }
        if self.json {
            let mut t = Table::new(&["TASK", "KIND", "STATE", "TARGET"]);
            t.row(vec![
                task.id.clone().into(),
                task.kind.clone().into(),
                task_state(task.state).into(),
                task.target_id.clone().into(),
            ]);
            self.print(&t);
        } else {
            println!(
                "{} {} ({}) {}",
                task.kind,
                task_state(task.state),
                task.id,
                task.target_id
            );
        }
        Ok(task)
    }
}
