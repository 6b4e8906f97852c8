//! Reads that verbs build on: whole listings (every page), and turning the name or id a
//! person typed into the one object's id.

use anyhow::bail;
use proto::coordinator as pb;

use crate::ctl::{Ctl, call};

impl Ctl {
    pub async fn hosts(&mut self) -> anyhow::Result<Vec<pb::Host>> {
        let mut out = Vec::new();
        let mut token = String::new();
        loop {
            let r = call!(
                self.client,
                list_hosts,
                pb::ListHostsRequest {
                    page: Some(pb::PageRequest {
                        page_size: 1000,
                        page_token: token.clone()
                    }),
                    state: 0,
                }
            )?;
            out.extend(r.hosts);
            if r.next_page_token.is_empty() {
                return Ok(out);
            }
            token = r.next_page_token;
        }
    }

    pub async fn vms(&mut self) -> anyhow::Result<Vec<pb::Vm>> {
        let mut out = Vec::new();
        let mut token = String::new();
        loop {
            let r = call!(
                self.client,
                list_vms,
                pb::ListVmsRequest {
                    page: Some(pb::PageRequest {
                        page_size: 1000,
                        page_token: token.clone()
                    }),
                    host_id: String::new(),
                }
            )?;
            out.extend(r.vms);
            if r.next_page_token.is_empty() {
                return Ok(out);
            }
            token = r.next_page_token;
        }
    }

    pub async fn vm_snapshots(&mut self, vm_id: &str) -> anyhow::Result<Vec<pb::VmSnapshot>> {
        let mut out = Vec::new();
        let mut token = String::new();
        loop {
            let r = call!(
                self.client,
                list_vm_snapshots,
                pb::ListVmSnapshotsRequest {
                    vm_id: vm_id.to_owned(),
                    page: Some(pb::PageRequest {
                        page_size: 1000,
                        page_token: token.clone()
                    }),
                }
            )?;
            out.extend(r.snapshots);
            if r.next_page_token.is_empty() {
                return Ok(out);
            }
            token = r.next_page_token;
        }
    }

    pub async fn srs(&mut self) -> anyhow::Result<Vec<pb::StorageRepository>> {
        let r = call!(
            self.client,
            list_storage_repositories,
            pb::ListStorageRepositoriesRequest {
                page: Some(pb::PageRequest {
                    page_size: 1000,
                    page_token: String::new()
                }),
            }
        )?;
        Ok(r.repositories)
    }

    pub async fn vdis(&mut self, sr: &str) -> anyhow::Result<Vec<proto::storage::Volume>> {
        let mut out = Vec::new();
        let mut token = String::new();
        loop {
            let r = call!(
                self.client,
                list_volumes,
                pb::ListVolumesRequest {
                    page: Some(pb::PageRequest {
                        page_size: 1000,
                        page_token: token.clone()
                    }),
                    sr_id: sr.to_owned(),
                }
            )?;
            out.extend(r.volumes);
            if r.next_page_token.is_empty() {
                return Ok(out);
            }
            token = r.next_page_token;
        }
    }

    /// Every task, all pages.
    pub async fn tasks(&mut self) -> anyhow::Result<Vec<pb::Task>> {
        let mut out = Vec::new();
        let mut token = String::new();
        loop {
            let r = call!(
                self.client,
                list_tasks,
                pb::ListTasksRequest {
                    page: Some(pb::PageRequest {
                        page_size: 1000,
                        page_token: token.clone()
                    }),
                    ..Default::default()
                }
            )?;
            out.extend(r.tasks);
            if r.next_page_token.is_empty() {
                return Ok(out);
            }
            token = r.next_page_token;
        }
    }

    pub async fn host_id(&mut self, name_or_id: &str) -> anyhow::Result<String> {
        let hosts = self.hosts().await?;
        pick(
            hosts.iter().map(|h| (h.id.as_str(), h.name.as_str())),
            name_or_id,
            "host",
        )
    }

    /// The id of the host named, or empty (the pool chooses) when none is.
    pub async fn host_id_or_any(&mut self, name_or_id: Option<&str>) -> anyhow::Result<String> {
        match name_or_id {
            Some(h) => self.host_id(h).await,
            None => Ok(String::new()),
        }
    }

    pub async fn vm_id(&mut self, name_or_id: &str) -> anyhow::Result<String> {
        let vms = self.vms().await?;
        pick(
            vms.iter().map(|v| {
                (
                    v.id.as_str(),
                    v.spec.as_ref().map_or("", |s| s.name.as_str()),
                )
            }),
            name_or_id,
            "VM",
        )
    }

    pub async fn sr_id(&mut self, name_or_id: &str) -> anyhow::Result<String> {
        let srs = self.srs().await?;
        pick(
            srs.iter().map(|s| (s.id.as_str(), s.name.as_str())),
            name_or_id,
            "storage repository",
        )
    }

    pub async fn vdi_id(&mut self, name_or_id: &str) -> anyhow::Result<String> {
        let vdis = self.vdis("").await?;
        pick(
            vdis.iter().map(|v| (v.id.as_str(), v.name.as_str())),
            name_or_id,
            "disk",
        )
    }

    pub async fn template_id(&mut self, name_or_id: &str) -> anyhow::Result<String> {
        let r = call!(
            self.client,
            list_templates,
            pb::ListTemplatesRequest { page: None }
        )?;
        pick(
            r.templates.iter().map(|t| (t.id.as_str(), t.name.as_str())),
            name_or_id,
            "template",
        )
    }
}

/// The id of the one object whose id or name is `key`.
pub fn pick<'a>(
    items: impl Iterator<Item = (&'a str, &'a str)>,
    key: &str,
    what: &str,
) -> anyhow::Result<String> {
    let matches: Vec<&str> = items
        .filter(|(id, name)| *id == key || *name == key)
        .map(|(id, _)| id)
        .collect();
    match matches.as_slice() {
        [one] => Ok((*one).to_owned()),
        [] => bail!(
            "no {what} named {key:?}; list them with poolctl {}-list",
            what_verb(what)
        ),
        many => bail!(
            "{} {what}s are named {key:?}; use an id: {}",
            many.len(),
            many.join(", ")
        ),
    }
}

fn what_verb(what: &str) -> &'static str {
    match what {
        "host" => "host",
        "VM" => "vm",
        "disk" => "vdi",
        "template" => "template",
        "network" => "network",
        "VM snapshot" | "snapshot of this VM" => "vm-snapshot",
        _ => "sr",
    }
}
