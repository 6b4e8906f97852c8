//! `poolctl member-*`: the coordinator members and who leads.

use clap::Subcommand;
use proto::coordinator as pb;

use crate::ctl::{Ctl, call};
use crate::output::{Table, enum_name};

#[derive(Debug, Subcommand)]
pub enum MemberCommand {
    /// Coordinator members and who leads.
    #[command(name = "member-list")]
    List,
    /// A one-time join token for a new coordinator member ID, in a join file: the new
    /// member gets its certificate with it, then is added with AddMember.
    #[command(name = "member-join")]
    Join {
        member: u64,
        /// How long the token is valid (e.g. 30m, 1h; at most 24h).
        #[arg(long, value_parser = super::join::parse_ttl)]
        ttl: Option<u32>,
        /// Write the join file here (0600; never over an existing file) instead of stdout.
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
    /// Move coordinator leadership to another voting member (before maintenance).
    #[command(name = "member-transfer")]
    Transfer {
        /// The member id that should lead.
        member: u64,
    },
}

pub async fn run(ctl: &mut Ctl, command: MemberCommand) -> anyhow::Result<()> {
    match command {
        MemberCommand::List => {
            let r = call!(ctl.client, list_members, pb::ListMembersRequest {})?;
            let mut t = Table::new(&["ID", "ADDRESS", "ROLE", "LEADER", "REACHABLE"]);
            for m in r.members {
                let role = enum_name(
                    pb::MemberRole::try_from(m.role)
                        .ok()
                        .map(|r| r.as_str_name()),
                    "MEMBER_ROLE_",
                );
                t.row(vec![
                    m.id.into(),
                    m.address.into(),
                    role.into(),
                    m.leader.into(),
                    m.reachable.into(),
                ]);
            }
            ctl.print(&t);
        }
        MemberCommand::Join { member, ttl, out } => {
            let name = member.to_string();
            super::join::create(ctl, pb::JoinRole::Member, name, ttl, out.as_deref()).await?;
        }
        MemberCommand::Transfer { member } => {
            let r = call!(
                ctl.client,
                transfer_leadership,
                pb::TransferLeadershipRequest { member_id: member }
            )?;
            let mut t = Table::new(&["LEADER", "TERM"]);
            t.row(vec![r.leader_id.into(), r.term.into()]);
            ctl.print(&t);
        }
    }
    Ok(())
}
