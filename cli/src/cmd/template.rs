//! `poolctl template-*`: templates VMs are created from.

use clap::Subcommand;
use pool_client::new_request_id;
use proto::coordinator as pb;

use crate::ctl::{Ctl, call};
use crate::output::{Table, human_bytes};

#[derive(Debug, Subcommand)]
pub enum TemplateCommand {
    /// Make a template of a stopped VM.
    #[command(name = "template-create")]
    Create { name: String, vm: String },
    /// Templates VMs can be created from.
    #[command(name = "template-list")]
    List,
}

pub async fn run(ctl: &mut Ctl, command: TemplateCommand) -> anyhow::Result<()> {
    match command {
        TemplateCommand::Create { name, vm } => {
            let vm_id = ctl.vm_id(&vm).await?;
            let r = call!(
                ctl.client,
                create_template,
                pb::CreateTemplateRequest {
                    request_id: new_request_id(),
                    name,
                    source: Some(pb::create_template_request::Source::VmId(vm_id)),
                }
            )?;
            ctl.follow(r).await?;
        }
        TemplateCommand::List => {
            let r = call!(
                ctl.client,
                list_templates,
                pb::ListTemplatesRequest { page: None }
            )?;
            let mut t = Table::new(&["ID", "NAME", "VCPUS", "MEMORY", "DISKS"]);
            for tpl in r.templates {
                let spec = tpl.spec.unwrap_or_default();
                t.row(vec![
                    tpl.id.into(),
                    tpl.name.into(),
                    spec.vcpus.into(),
                    human_bytes(spec.memory_bytes).into(),
                    (tpl.disk_volumes.len() as u64).into(),
                ]);
            }
            ctl.print(&t);
        }
    }
    Ok(())
}
