//! Templates: VM specs to create VMs from, made from a spec or from a VM (whose disks a
//! job clones).

use proto::coordinator as pb;
use tonic::Status;

use super::PoolHandler;
use super::request::{need, page};
use crate::auth::Caller;
use crate::state::command::*;

pub(super) async fn create(
    svc: &PoolHandler,
    who: &Caller,
    r: pb::CreateTemplateRequest,
) -> Result<pb::Task, Status> {
    need("name", &r.name)?;
    match r.source {
        Some(pb::create_template_request::Source::Spec(spec)) => {
            let t = pb::Template {
                id: uuid::Uuid::new_v4().to_string(),
                name: r.name,
                spec: Some(spec),
                disk_volumes: Default::default(),
                created_at: None,
            };
            svc.c.write(who, &r.request_id, Op::CreateTemplate(t)).await
        }
        Some(pb::create_template_request::Source::VmId(vm_id)) => {
            svc.start_job(
                who,
                &r.request_id,
                JobSpec::TemplateFromVm(TemplateFromVmJob {
                    template_id: uuid::Uuid::new_v4().to_string(),
                    vm_id,
                    name: r.name,
                }),
            )
            .await
        }
        None => Err(Status::invalid_argument("give a spec or a vm_id")),
    }
}

pub(super) async fn get(svc: &PoolHandler, id: String) -> Result<pb::Template, Status> {
    svc.c
        .read(|s| s.templates.get(&id).cloned())
        .await?
        .ok_or_else(|| Status::not_found(format!("no template with id {id}")))
}

pub(super) async fn list(
    svc: &PoolHandler,
    r: pb::ListTemplatesRequest,
) -> Result<pb::ListTemplatesResponse, Status> {
    let (templates, next) = svc
        .c
        .read(|s| {
            page(
                s.templates.iter().map(|(k, v)| (k.clone(), v.clone())),
                r.page.as_ref(),
            )
        })
        .await?;
    Ok(pb::ListTemplatesResponse {
        templates,
        next_page_token: next,
    })
}

pub(super) async fn delete(
    svc: &PoolHandler,
    who: &Caller,
    r: pb::DeleteTemplateRequest,
) -> Result<pb::Task, Status> {
    svc.c
        .write(
            who,
            &r.request_id,
            Op::DeleteTemplate(ObjectId { id: r.template_id }),
        )
        .await
}
