//! `poolctl task-list`: tasks (long operations) and their progress.

use clap::Subcommand;
use proto::coordinator as pb;

use crate::ctl::Ctl;
use crate::output::{Table, Value, or_dash, task_state, ts};

#[derive(Debug, Subcommand)]
pub enum TaskCommand {
    /// Tasks (long operations) and their progress: those people started, unless --all.
    #[command(name = "task-list")]
    List {
        /// Also the pool's own tasks (host reports, restarts and other internal work).
        #[arg(long)]
        all: bool,
    },
}

pub async fn run(ctl: &mut Ctl, command: TaskCommand) -> anyhow::Result<()> {
    match command {
        TaskCommand::List { all } => {
            let tasks = ctl.tasks().await?;
            ctl.print(&task_table(tasks, all));
        }
    }
    Ok(())
}

/// Whether a person (or a tool acting for one) started the task: the pool's own commands
/// (host reports, the leader's loops) carry no user in `requested_by`. Membership changes
/// are always an operator's, though their Raft command has no room for the caller.
fn started_by_a_user(t: &pb::Task) -> bool {
    !t.requested_by.is_empty() || t.kind == "pool.member_change"
}

/// The task-list table: the tasks users started, or every task with `all`.
fn task_table(tasks: Vec<pb::Task>, all: bool) -> Table {
    let mut t = Table::new(&[
        "ID", "KIND", "STATE", "PROGRESS", "TARGET", "BY", "CREATED", "ERROR",
    ]);
    for task in tasks.into_iter().filter(|t| all || started_by_a_user(t)) {
        let by = or_dash(task.requested_by);
        t.row(vec![
            task.id.into(),
            task.kind.into(),
            task_state(task.state).into(),
            Value::Int(i128::from(task.progress_percent)),
            task.target_id.into(),
            by.into(),
            ts(&task.created_at).into(),
            task.error_message.into(),
        ]);
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(id: &str, kind: &str, by: &str) -> pb::Task {
        pb::Task {
            id: id.into(),
            kind: kind.into(),
            requested_by: by.into(),
            state: pb::TaskState::Succeeded as i32,
            ..Default::default()
        }
    }

    #[test]
    fn task_list_shows_what_users_started_unless_all() {
        let tasks = vec![
            task("t1", "host.report", ""),
            task("t2", "vm.start", "alice"),
            task("t3", "host.report", ""),
            task("t4", "host.join", "anonymous"),
            task("t5", "pool.member_change", ""),
        ];
        let ids = |t: &Table| -> Vec<String> {
            t.rows
                .iter()
                .map(|r| match &r[0] {
                    Value::Text(s) => s.clone(),
                    other => panic!("{other:?}"),
                })
                .collect()
        };
        let mine = task_table(tasks.clone(), false);
        assert_eq!(ids(&mine), ["t2", "t4", "t5"]);
        assert!(mine.render(true).contains("\"by\": \"alice\""));
        let every = task_table(tasks, true);
        assert_eq!(ids(&every), ["t1", "t2", "t3", "t4", "t5"]);
        assert!(every.render(false).contains("host.report"));
        assert!(!mine.render(false).contains("host.report"));
    }
}
