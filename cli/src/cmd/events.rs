//! `poolctl events`: the pool's change feed (`WatchEvents`), one line per changed object.
//! With `--follow` it goes on as changes come and, when its member goes away, resumes on
//! another from the last position it printed, so nothing is missed or shown twice.

use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;
use proto::coordinator as pb;
use proto::coordinator::pool_event::Object;

use crate::ctl::{Ctl, call};
use crate::output::{enum_name, host_state, json_string, or_dash, power, task_state};

#[derive(Debug, Subcommand)]
pub enum EventsCommand {
    /// The pool's changes: every object first (or what came after --after), then, with
    /// --follow, each change as it is committed. Lines: POSITION KIND ID CHANGE NAME STATE.
    Events {
        /// Start after this position (the first column of a line printed before).
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// Keep printing changes until interrupted.
        #[arg(long)]
        follow: bool,
    },
}

pub async fn run(ctl: &mut Ctl, command: EventsCommand) -> anyhow::Result<()> {
    let EventsCommand::Events { after, follow } = command;
    let mut position = after;
    let mut broken = 0u32;
    loop {
        let mut stream = call!(
            ctl.client,
            watch_events,
            pb::WatchEventsRequest { after: position }
        )?;
        loop {
            let msg = match stream.message().await {
                Ok(Some(msg)) => msg,
                Ok(None) => break,
                Err(e) if follow && broken < 30 => {
                    tracing::info!(position, error = %e.message(), "the feed broke; resuming");
                    break;
                }
                Err(e) => return Err(crate::ctl::explain(e)).context("reading the pool's events"),
            };
            broken = 0;
            if msg.reset {
                println!("{}", reset_line(ctl.json, msg.position));
            }
            for e in &msg.events {
                println!("{}", line(ctl.json, e));
            }
            position = msg.position;
            if msg.synced && !follow {
                return Ok(());
            }
        }
        broken += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn reset_line(json: bool, position: u64) -> String {
    if json {
        format!("{{\"position\": {position}, \"reset\": true}}")
    } else {
        format!("{position} reset: every object follows")
    }
}

/// An event's line: POSITION KIND ID CHANGE NAME STATE, or one JSON object.
fn line(json: bool, e: &pb::PoolEvent) -> String {
    let change = if e.deleted { "deleted" } else { "changed" };
    let (name, state) = e.object.as_ref().map(summary).unwrap_or_default();
    if json {
        format!(
            "{{\"position\": {}, \"kind\": {}, \"id\": {}, \"change\": \"{change}\", \"name\": {}, \"state\": {}}}",
            e.position,
            json_string(&e.kind),
            json_string(&e.id),
            json_string(&name),
            json_string(&state)
        )
    } else {
        format!(
            "{} {} {} {change} {} {}",
            e.position,
            e.kind,
            e.id,
            or_dash(name),
            or_dash(state)
        )
    }
}

/// The name and state a person looks for first in an object.
fn summary(o: &Object) -> (String, String) {
    match o {
        Object::Pool(p) => (
            p.settings
                .as_ref()
                .map(|s| s.name.clone())
                .unwrap_or_default(),
            format!("hosts={} vms={}", p.host_count, p.vm_count),
        ),
        Object::Host(h) => (h.name.clone(), host_state(h.state)),
        Object::Sr(s) => (s.name.clone(), String::new()),
        Object::Volume(v) => (v.name.clone(), String::new()),
        Object::Template(t) => (t.name.clone(), String::new()),
        Object::Vm(v) => {
            let name = v.spec.as_ref().map(|s| s.name.clone()).unwrap_or_default();
            let on = if v.host_id.is_empty() {
                String::new()
            } else {
                format!("@{}", v.host_id)
            };
            (name, format!("{}{on}", power(v.power_state)))
        }
        Object::VmSnapshot(s) => (s.name.clone(), String::new()),
        Object::Network(n) => (
            n.name.clone(),
            enum_name(
                pb::NetworkKind::try_from(n.kind)
                    .ok()
                    .map(|k| k.as_str_name()),
                "NETWORK_KIND_",
            ),
        ),
        Object::User(u) => (u.name.clone(), String::new()),
        Object::Task(t) => (
            t.kind.clone(),
            format!("{} {}%", task_state(t.state), t.progress_percent),
        ),
        Object::Audit(a) => (format!("{} by {}", a.method, a.user_name), a.result.clone()),
        Object::Alert(a) => {
            let state = if a.dismissed_at.is_some() {
                "dismissed"
            } else if a.cleared_at.is_some() {
                "cleared"
            } else {
                "open"
            };
            (a.message.clone(), state.to_owned())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_says_what_changed_for_people_and_for_tools() {
        let vm = pb::PoolEvent {
            position: 42,
            kind: "vm".into(),
            id: "vm-1".into(),
            deleted: false,
            object: Some(Object::Vm(pb::Vm {
                id: "vm-1".into(),
                spec: Some(pb::VmSpec {
                    name: "web \"1\"".into(),
                    ..Default::default()
                }),
                power_state: proto::host::PowerState::Running as i32,
                host_id: "h1".into(),
                ..Default::default()
            })),
        };
        assert_eq!(line(false, &vm), "42 vm vm-1 changed web \"1\" running@h1");
        assert_eq!(
            line(true, &vm),
            r#"{"position": 42, "kind": "vm", "id": "vm-1", "change": "changed", "name": "web \"1\"", "state": "running@h1"}"#
        );
        let gone = pb::PoolEvent {
            position: 43,
            kind: "vm".into(),
            id: "vm-1".into(),
            deleted: true,
            object: None,
        };
        assert_eq!(line(false, &gone), "43 vm vm-1 deleted - -");
    }
}
