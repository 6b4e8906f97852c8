//! Who may do what: `login`, `user-add`, `user-passwd`, `user-revoke-tokens`,
//! `role-grant`, and the `audit-log` of who did it.
//!
//! Passwords never come from the command line (where `ps` shows them): from a file
//! (`--password-file`), else from stdin, prompted without echo on a terminal.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Subcommand;
use pool_client::new_request_id;
use proto::coordinator as pb;

use crate::ctl::{Ctl, call};
use crate::lookup::pick;
use crate::output::{Table, ts};

#[derive(Debug, Subcommand)]
pub enum UserCommand {
    /// Log in and print a token for --token / POOLCTL_TOKEN / the config file. The
    /// password comes from --password-file, else from stdin (prompted on a terminal).
    Login {
        user: String,
        /// A file whose first line is the password (else POOLCTL_PASSWORD, else stdin).
        #[arg(long)]
        password_file: Option<PathBuf>,
    },
    /// Add a user with roles. The password (12 characters or more) comes from
    /// --password-file, else from stdin (prompted twice on a terminal).
    UserAdd {
        name: String,
        /// A file whose first line is the password (else POOLCTL_NEW_PASSWORD, else stdin).
        #[arg(long)]
        password_file: Option<PathBuf>,
        #[arg(long, value_parser = role)]
        role: Vec<pb::Role>,
    },
    /// Change a password: your own without NAME (the old password is asked first), or
    /// NAME's as a pool-admin. Every token of the user stops working: log in again.
    UserPasswd {
        /// The user (name or id); yourself when omitted.
        name: Option<String>,
        /// A file whose first line is the new password (else stdin).
        #[arg(long)]
        password_file: Option<PathBuf>,
        /// A file whose first line is your old password (else stdin, before the new one).
        #[arg(long)]
        old_password_file: Option<PathBuf>,
    },
    /// Make every token of a user stop working (yours without NAME; NAME's as a
    /// pool-admin), keeping the user and the password.
    UserRevokeTokens {
        /// The user (name or id); yourself when omitted.
        name: Option<String>,
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
        UserCommand::Login {
            user,
            password_file,
        } => {
            let mut input = Input::new();
            let password = match (&password_file, from_env("POOLCTL_PASSWORD")) {
                (None, Some(p)) => p,
                _ => input.password(password_file.as_deref(), "password", false)?,
            };
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
            password_file,
            role: roles,
        } => {
            let mut input = Input::new();
            let password = match (&password_file, from_env("POOLCTL_NEW_PASSWORD")) {
                (None, Some(p)) => p,
                _ => input.password(password_file.as_deref(), "new password", true)?,
            };
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
        UserCommand::UserPasswd {
            name,
            password_file,
            old_password_file,
        } => {
            let mut input = Input::new();
            // Someone else's password needs no old one, unless a file gives it.
            let old_password = match (&name, &old_password_file) {
                (Some(_), None) => String::new(),
                _ => input.password(old_password_file.as_deref(), "old password", false)?,
            };
            let new_password = input.password(password_file.as_deref(), "new password", true)?;
            let user_id = match &name {
                Some(n) => user_id(ctl, n).await?,
                None => String::new(),
            };
            let r = call!(
                ctl.client,
                change_password,
                pb::ChangePasswordRequest {
                    request_id: new_request_id(),
                    user_id,
                    old_password,
                    new_password
                }
            )
            .map_err(|e| match name {
                Some(_) if e.to_string().contains("old_password is required") => {
                    e.context("to change your own password, leave NAME out")
                }
                _ => e,
            })?;
            ctl.follow(r).await?;
            eprintln!("the user's tokens no longer work: log in again");
        }
        UserCommand::UserRevokeTokens { name } => {
            let user_id = match &name {
                Some(n) => user_id(ctl, n).await?,
                None => String::new(),
            };
            let r = call!(
                ctl.client,
                revoke_tokens,
                pb::RevokeTokensRequest {
                    request_id: new_request_id(),
                    user_id
                }
            )?;
            ctl.follow(r).await?;
            eprintln!("every token of the user is revoked: log in again");
        }
        UserCommand::RoleGrant { user, role } => {
            let role = role as i32;
            let user_id = user_id(ctl, &user).await?;
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

/// A user's id from a name or id (ListUsers: pool-operator and up).
async fn user_id(ctl: &mut Ctl, user: &str) -> anyhow::Result<String> {
    let users = call!(ctl.client, list_users, pb::ListUsersRequest { page: None })?;
    pick(
        users.users.iter().map(|u| (u.id.as_str(), u.name.as_str())),
        user,
        "user",
    )
}

/// A password from the environment variable `env` (only its owner can read a process's
/// environment, unlike its command line), when set and not empty.
fn from_env(env: &str) -> Option<String> {
    std::env::var(env).ok().filter(|p| !p.is_empty())
}

/// Where passwords come from: files, or stdin, read a line at a time (so that the old
/// and the new password can be piped one after the other).
struct Input<R> {
    stdin: R,
    terminal: bool,
}

impl Input<std::io::StdinLock<'static>> {
    fn new() -> Self {
        Input {
            stdin: std::io::stdin().lock(),
            terminal: std::io::stdin().is_terminal(),
        }
    }
}

impl<R: BufRead> Input<R> {
    /// `what` from `file`'s first line, else from stdin; on a terminal, prompted without
    /// echo (twice when `confirm`).
    fn password(
        &mut self,
        file: Option<&Path>,
        what: &str,
        confirm: bool,
    ) -> anyhow::Result<String> {
        let p = match file {
            Some(f) => first_line(f)?,
            None if self.terminal => {
                let p = self.hidden(&format!("{what}: "))?;
                if confirm && self.hidden(&format!("{what} again: "))? != p {
                    bail!("the two entries differ");
                }
                p
            }
            None => {
                let mut line = String::new();
                if self.stdin.read_line(&mut line)? == 0 {
                    bail!("no {what} on stdin (or give --password-file)");
                }
                line.trim_end_matches(['\n', '\r']).to_owned()
            }
        };
        if p.is_empty() {
            bail!("the {what} is empty");
        }
        Ok(p)
    }

    /// A line from the terminal with echo off (restored after, whatever happens).
    fn hidden(&mut self, prompt: &str) -> anyhow::Result<String> {
        eprint!("{prompt}");
        std::io::stderr().flush()?;
        let echo = NoEcho::new();
        let mut line = String::new();
        let n = self.stdin.read_line(&mut line);
        drop(echo);
        eprintln!();
        if n? == 0 {
            bail!("no input");
        }
        Ok(line.trim_end_matches(['\n', '\r']).to_owned())
    }
}

/// A password file's first line; a warning when others may read the file.
fn first_line(f: &Path) -> anyhow::Result<String> {
    use std::os::unix::fs::PermissionsExt;
    let text = std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
    let mode = std::fs::metadata(f)?.permissions().mode();
    if mode & 0o077 != 0 {
        eprintln!(
            "warning: {} is readable by others (mode {:o}); chmod 600 it",
            f.display(),
            mode & 0o777
        );
    }
    Ok(text.lines().next().unwrap_or_default().to_owned())
}

/// Terminal echo off on stdin while it lives.
struct NoEcho(Option<libc::termios>);

impl NoEcho {
    fn new() -> NoEcho {
        // SAFETY: termios is plain data, for which all zero bytes is a valid value.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: fd 0 stays open for the process's life and `t` is a valid termios to
        // fill; a failure (not a terminal) is answered below.
        if unsafe { libc::tcgetattr(libc::STDIN_FILENO, &mut t) } != 0 {
            return NoEcho(None);
        }
        let saved = t;
        t.c_lflag &= !libc::ECHO;
        // SAFETY: as above, with a termios that tcgetattr filled and only ECHO changed.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &t) };
        NoEcho(Some(saved))
    }
}

impl Drop for NoEcho {
    fn drop(&mut self) {
        if let Some(t) = &self.0 {
            // SAFETY: restores the settings tcgetattr read from the same open fd 0.
            unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, t) };
        }
    }
}

/// `--role`, checked while the arguments are parsed.
fn role(name: &str) -> anyhow::Result<pb::Role> {
    let want = format!("ROLE_{}", name.to_uppercase().replace('-', "_"));
    pb::Role::from_str_name(&want).filter(|r| *r != pb::Role::Unspecified).with_context(|| {
        format!("unknown role {name:?}: pool-admin, pool-operator, vm-admin, vm-operator or read-only")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn piped(text: &str) -> Input<std::io::Cursor<Vec<u8>>> {
        Input {
            stdin: std::io::Cursor::new(text.as_bytes().to_vec()),
            terminal: false,
        }
    }

    #[test]
    fn piped_passwords_are_read_a_line_each() {
        let mut i = piped("old one here\r\nnew one here\n");
        assert_eq!(
            i.password(None, "old password", false).unwrap(),
            "old one here"
        );
        assert_eq!(
            i.password(None, "new password", true).unwrap(),
            "new one here"
        );
        let e = i.password(None, "new password", false).unwrap_err();
        assert!(e.to_string().contains("no new password on stdin"), "{e}");
        let e = piped("\n").password(None, "password", false).unwrap_err();
        assert!(e.to_string().contains("empty"), "{e}");
    }

    #[test]
    fn a_password_file_gives_its_first_line_and_wins_over_stdin() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("poolctl-pw-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("pw");
        std::fs::write(&f, "from the file\nsecond line\n").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        let mut i = piped("from stdin\n");
        assert_eq!(
            i.password(Some(&f), "password", true).unwrap(),
            "from the file"
        );
        assert_eq!(i.password(None, "password", false).unwrap(), "from stdin");
        let missing = dir.join("none");
        assert!(i.password(Some(&missing), "password", false).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
