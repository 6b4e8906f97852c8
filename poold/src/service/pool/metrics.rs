//! The latest metrics sample of a host or a VM, from its host's last report (the pool
//! keeps no history).

use proto::coordinator as pb;
use proto::host as hpb;
use tonic::Status;

use super::PoolHandler;
use super::request::need;

pub(super) async fn query(
    svc: &PoolHandler,
    r: pb::QueryMetricsRequest,
) -> Result<pb::QueryMetricsResponse, Status> {
    need("target_id", &r.target_id)?;
    let sample = svc
        .c
        .read(|s| {
            if let Some(h) = s.hosts.get(&r.target_id) {
                let m = h.last_metrics.clone().unwrap_or_default();
                let v = match r.metric.as_str() {
                    "cpu_percent" => m.cpu_percent,
                    "memory_used_bytes" => m.memory_used_bytes as f64,
                    "memory_assigned_to_vms_bytes" => m.memory_assigned_to_vms_bytes as f64,
                    "vms_running" => m.vms_running as f64,
                    other => {
                        return Err(Status::invalid_argument(format!(
                            "unknown host metric {other:?}: cpu_percent, memory_used_bytes, memory_assigned_to_vms_bytes, vms_running"
                        )));
                    }
                };
                return Ok(m.at.map(|at| pb::MetricSample { at: Some(at), value: v }));
            }
            let vm = s
                .vms
                .get(&r.target_id)
                .ok_or_else(|| Status::not_found(format!("no host or VM {}", r.target_id)))?;
            let m = s
                .hosts
                .get(&vm.host_id)
                .and_then(|h| h.last_metrics.as_ref())
                .and_then(|m| m.vms.iter().find(|x| x.vm_id == vm.id).cloned());
            let Some(m) = m else { return Ok(None) };
            let disks = |f: fn(&hpb::DiskMetrics) -> u64| m.disks.iter().map(f).sum::<u64>() as f64;
            let v = match r.metric.as_str() {
                "vcpu_time_ns" => m.vcpu_time_ns as f64,
                "rss_bytes" => m.rss_bytes as f64,
                "disk_read_bytes" => disks(|d| d.read_bytes),
                "disk_write_bytes" => disks(|d| d.write_bytes),
                other => {
                    return Err(Status::invalid_argument(format!(
                        "unknown VM metric {other:?}: vcpu_time_ns, rss_bytes, disk_read_bytes, disk_write_bytes"
                    )));
                }
            };
            Ok(m.at.map(|at| pb::MetricSample { at: Some(at), value: v }))
        })
        .await??;
    Ok(pb::QueryMetricsResponse {
        samples: sample.into_iter().collect(),
        next_page_token: String::new(),
    })
}
