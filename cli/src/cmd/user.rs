//! Who may do what: `login`, `user-add`, `role-grant`, and the `audit-log` of who did it.

use anyhow::Context;
use clap::Subcommand;
use pool_client::new_request_id;
use proto::coordinator as pb;

use crate::ctl::{Ctl, call};
use crate::lookup::pick;
use crate::output::{Table, ts};

#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Log in and print a token for --token / POOLCTL_TOKEN / the config file.
    Login {
        user: String,
        #[arg(long, env = "POOLCTL_PASSWORD", hide_env_values = true)]
        password: String,
    },
    /// Add a user with a password and roles.
    UserAdd {
        name: String,
        #[arg(long, env = "POOLCTL_NEW_PASSWORD")]
        password: String,
        #[arg(long, value_parser = role)]
        role: Vec<pb::Role>,
    },
    /// Give a user one more role.
    RoleGrant {
        user: String,
        #[arg(value_parser = role)]
        role: pb::Role,
    },
    /// Who did what, when, and how it ended.
    AuditLog,
}

pub async fn run(ctl: &mut Ctl, command: UserCommand) -> anyhow::Result<()> {
    match command {
        UserCommand::Login { user, password } => {
            let r = call!(
                ctl.client,
                login,
                pb::LoginRequest {
                    user_name: user,
                    password
                }
            )?;
            if ctl.json {
                println!("{{\"token\": {}}}", crate::output::json_string(&r.token));
            } else {
                println!("{}", r.token);
                eprintln!("pass it as --token, POOLCTL_TOKEN or `token` in the config file");
            }
        }
        UserCommand::UserAdd {
            name,
            password,
            role: roles,
        } => {
            let roles = roles.into_iter().map(|r| r as i32).collect();
            let r = call!(
                ctl.client,
                create_user,
                pb::CreateUserRequest {
                    request_id: new_request_id(),
                    name,
                    password,
                    roles
                }
            )?;
            ctl.follow(r).await?;
        }
        UserCommand::RoleGrant { user, role } => {
            let role = role as i32;
            let users = call!(ctl.client, list_users, pb::ListUsersRequest { page: None })?;
            let user_id = pick(
                users.users.iter().map(|u| (u.id.as_str(), u.name.as_str())),
                &user,
                "user",
            )?;
            let r = call!(
                ctl.client,
                grant_role,
                pb::GrantRoleRequest {
                    request_id: new_request_id(),
                    user_id,
                    role
                }
            )?;
            ctl.follow(r).await?;
        }
        UserCommand::AuditLog => {
            let r = call!(
                ctl.client,
                list_audit_events,
                pb::ListAuditEventsRequest::default()
            )?;
            let mut t = Table::new(&["WHEN", "USER", "METHOD", "TARGET", "RESULT"]);
            for e in r.events {
                t.row(vec![
                    ts(&e.at).into(),
                    e.user_name.into(),
                    e.method.into(),
                    e.target_id.into(),
                    e.result.into(),
                ]);
            }
            ctl.print(&t);
        }
    }
    Ok(())
}

/// `--role`, checked while the arguments are parsed.
fn role(name: &str) -> anyhow::Result<pb::Role> {
    let want = format!("ROLE_{}", name.to_uppercase().replace('-', "_"));
    pb::Role::from_str_name(&want).filter(|r| *r != pb::Role::Unspecified).with_context(|| {
        format!("unknown role {name:?}: pool-admin, pool-operator, vm-admin, vm-operator or read-only")
    })
}
