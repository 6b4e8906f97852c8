//! The latest metrics sample of a host or a VM, from its host's last report (the pool
//! keeps no history). A VM's disk and network metrics are sums over its disks and its
//! network interfaces.

use proto::coordinator as pb;
use proto::host as hpb;
use tonic::Status;

use super::PoolHandler;
use super::request::need;
use crate::state::PoolState;

const HOST_METRICS: &str =
    "cpu_percent, memory_used_bytes, memory_assigned_to_vms_bytes, vms_running";
const VM_METRICS: &str = "vcpu_time_ns, rss_bytes, disk_read_bytes, disk_write_bytes, \
    net_rx_packets, net_rx_bytes, net_rx_dropped, net_tx_packets, net_tx_bytes, \
    net_tx_dropped, net_tx_spoofed, net_errors";

pub(super) async fn query(
    svc: &PoolHandler,
    r: pb::QueryMetricsRequest,
) -> Result<pb::QueryMetricsResponse, Status> {
    need("target_id", &r.target_id)?;
    let sample = svc.c.read(|s| sample(s, &r)).await??;
    Ok(pb::QueryMetricsResponse {
        samples: sample.into_iter().collect(),
        next_page_token: String::new(),
    })
}

/// The latest value of `r.metric` for `r.target_id`; None when its host has not
/// reported it yet.
fn sample(s: &PoolState, r: &pb::QueryMetricsRequest) -> Result<Option<pb::MetricSample>, Status> {
    if let Some(h) = s.hosts.get(&r.target_id) {
        let m = h.last_metrics.clone().unwrap_or_default();
        let v = match r.metric.as_str() {
            "cpu_percent" => m.cpu_percent,
            "memory_used_bytes" => m.memory_used_bytes as f64,
            "memory_assigned_to_vms_bytes" => m.memory_assigned_to_vms_bytes as f64,
            "vms_running" => m.vms_running as f64,
            other => {
                return Err(Status::invalid_argument(format!(
                    "unknown host metric {other:?}: {HOST_METRICS}"
                )));
            }
        };
        return Ok(m.at.map(|at| pb::MetricSample {
            at: Some(at),
            value: v,
        }));
    }
    let vm = s
        .vms
        .get(&r.target_id)
        .ok_or_else(|| Status::not_found(format!("no host or VM {}", r.target_id)))?;
    let m = s
        .hosts
        .get(&vm.host_id)
        .and_then(|h| h.last_metrics.as_ref())
        .and_then(|m| m.vms.iter().find(|x| x.vm_id == vm.id));
    let Some(m) = m else { return Ok(None) };
    let disks = |f: fn(&hpb::DiskMetrics) -> u64| m.disks.iter().map(f).sum::<u64>() as f64;
    let nics = |f: fn(&hpb::NicMetrics) -> u64| m.nics.iter().map(f).sum::<u64>() as f64;
    let v = match r.metric.as_str() {
        "vcpu_time_ns" => m.vcpu_time_ns as f64,
        "rss_bytes" => m.rss_bytes as f64,
        "disk_read_bytes" => disks(|d| d.read_bytes),
        "disk_write_bytes" => disks(|d| d.write_bytes),
        "net_rx_packets" => nics(|n| n.rx_packets),
        "net_rx_bytes" => nics(|n| n.rx_bytes),
        "net_rx_dropped" => nics(|n| n.rx_dropped),
        "net_tx_packets" => nics(|n| n.tx_packets),
        "net_tx_bytes" => nics(|n| n.tx_bytes),
        "net_tx_dropped" => nics(|n| n.tx_dropped),
        "net_tx_spoofed" => nics(|n| n.tx_spoofed),
        "net_errors" => nics(|n| n.rx_errors + n.tx_errors + n.invalid),
        other => {
            return Err(Status::invalid_argument(format!(
                "unknown VM metric {other:?}: {VM_METRICS}"
            )));
        }
    };
    Ok(m.at.map(|at| pb::MetricSample {
        at: Some(at),
        value: v,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::command::{Command, HostReport, JoinHost, Op};

    fn apply(s: &mut PoolState, op: Op) {
        let n = s.applied_index + 1;
        let r = s.apply(
            n,
            &Command {
                request_id: format!("r{n}"),
                at_ms: 1000 + n,
                task_id: format!("t{n}"),
                op: Some(op),
                ..Default::default()
            },
        );
        assert_eq!(r.code, 0, "{}", r.message);
    }

    fn nic(id: &str, rx: u64, tx: u64, spoofed: u64) -> hpb::NicMetrics {
        hpb::NicMetrics {
            nic_id: id.into(),
            mac: "02:00:00:00:00:01".into(),
            rx_packets: rx,
            rx_bytes: rx * 100,
            tx_packets: tx,
            tx_bytes: tx * 60,
            tx_spoofed: spoofed,
            tx_dropped: spoofed + 1,
            rx_errors: 1,
            invalid: 2,
            ..Default::default()
        }
    }

    /// A pool whose host h1 runs vm1 and last reported `nics` for it.
    fn pool(nics: Vec<hpb::NicMetrics>) -> PoolState {
        let mut s = PoolState::default();
        apply(
            &mut s,
            Op::JoinHost(JoinHost {
                host_id: "h1".into(),
                name: "h1".into(),
                address: "10.0.0.1:7000".into(),
            }),
        );
        s.vms.insert(
            "vm1".into(),
            pb::Vm {
                id: "vm1".into(),
                host_id: "h1".into(),
                ..Default::default()
            },
        );
        apply(
            &mut s,
            Op::HostReport(HostReport {
                host_id: "h1".into(),
                metrics: Some(hpb::HostMetrics {
                    at: Some(proto::timestamp(5000)),
                    vms: vec![hpb::VmMetrics {
                        vm_id: "vm1".into(),
                        at: Some(proto::timestamp(5000)),
                        nics,
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
                ..Default::default()
            }),
        );
        s
    }

    fn query(s: &PoolState, target: &str, metric: &str) -> Result<Option<f64>, Status> {
        let r = pb::QueryMetricsRequest {
            target_id: target.into(),
            metric: metric.into(),
            ..Default::default()
        };
        Ok(sample(s, &r)?.map(|m| m.value))
    }

    #[test]
    fn a_vms_network_counters_from_its_hosts_heartbeat_are_summed_over_its_nics() {
        let s = pool(vec![nic("eth0", 10, 7, 3), nic("eth1", 5, 4, 0)]);
        let q = |metric| query(&s, "vm1", metric).unwrap();
        assert_eq!(q("net_rx_packets"), Some(15.0));
        assert_eq!(q("net_rx_bytes"), Some(1500.0));
        assert_eq!(q("net_tx_packets"), Some(11.0));
        assert_eq!(q("net_tx_bytes"), Some(660.0));
        assert_eq!(q("net_tx_spoofed"), Some(3.0));
        assert_eq!(q("net_tx_dropped"), Some(5.0));
        assert_eq!(q("net_rx_dropped"), Some(0.0));
        assert_eq!(q("net_errors"), Some(6.0));
    }

    #[test]
    fn an_unknown_metric_is_refused_and_names_the_known_ones() {
        let s = pool(vec![nic("eth0", 1, 1, 0)]);
        let e = query(&s, "vm1", "net_tx_forged").unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("net_tx_spoofed"), "{}", e.message());
        let e = query(&s, "vm2", "net_tx_spoofed").unwrap_err();
        assert_eq!(e.code(), tonic::Code::NotFound);
        // A VM its host has not reported yet has no sample.
        let mut s = s;
        s.vms.get_mut("vm1").unwrap().host_id.clear();
        assert_eq!(query(&s, "vm1", "net_tx_spoofed").unwrap(), None);
    }
}
