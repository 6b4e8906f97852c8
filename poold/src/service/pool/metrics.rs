//! `QueryMetrics`: the latest sample of a host or a VM, from its host's last report, or
//! buckets of the member's metrics history ([`crate::history`]). A VM's disk and network
//! metrics are sums over its disks and its network interfaces.

use proto::coordinator as pb;
use proto::host as hpb;
use tonic::Status;

use super::PoolHandler;
use super::request::{need, page};
use crate::history::{History, Metric};
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
    if r.step_seconds == 0 && r.since.is_none() && r.until.is_none() {
        let sample = svc.c.read(|s| sample(s, &r)).await??;
        return Ok(pb::QueryMetricsResponse {
            samples: sample.into_iter().collect(),
            next_page_token: String::new(),
        });
    }
    let history = &svc.c.node.shared.history;
    svc.c
        .read(|s| buckets(s, &history.lock().expect("history lock"), &r))
        .await?
}

fn seconds(t: &Option<proto::prost_types::Timestamp>) -> Option<i64> {
    t.as_ref().map(|t| t.seconds)
}

/// The buckets of history `r` asks for (see `QueryMetricsRequest` in pool.proto).
fn buckets(
    s: &PoolState,
    h: &History,
    r: &pb::QueryMetricsRequest,
) -> Result<pb::QueryMetricsResponse, Status> {
    if !r.step_seconds.is_multiple_of(5) {
        return Err(Status::invalid_argument(format!(
            "step_seconds {} is not a multiple of 5 (the finest buckets are 5 s wide)",
            r.step_seconds
        )));
    }
    let (since, until) = (seconds(&r.since), seconds(&r.until));
    if let (Some(a), Some(b)) = (since, until)
        && a > b
    {
        return Err(Status::invalid_argument("since is after until"));
    }
    // The metric is checked by name first, so an unknown one gets the same answer as for
    // the latest sample.
    let host = s.hosts.contains_key(&r.target_id);
    if !host && !s.vms.contains_key(&r.target_id) {
        return Err(Status::not_found(format!("no host or VM {}", r.target_id)));
    }
    let Some(metric) = Metric::parse(&r.metric, host) else {
        let (kind, known, graphed) = if host {
            ("host", HOST_METRICS, &Metric::HOST[..])
        } else {
            ("VM", VM_METRICS, &Metric::VM[..])
        };
        let graphed: Vec<_> = graphed.iter().map(|m| m.name()).collect();
        return Err(Status::invalid_argument(
            if known.split(", ").any(|k| k == r.metric) {
                format!(
                    "no history is kept of {kind} metric {:?}: only of {}",
                    r.metric,
                    graphed.join(", ")
                )
            } else {
                format!("unknown {kind} metric {:?}: {known}", r.metric)
            },
        ));
    };
    let points = h.query(
        &r.target_id,
        metric,
        i64::from(r.step_seconds),
        since,
        until,
    );
    let (samples, next_page_token) = page(
        points.into_iter().map(|p| {
            (
                format!("{:020}", p.at_s),
                pb::MetricSample {
                    at: Some(proto::prost_types::Timestamp {
                        seconds: p.at_s,
                        nanos: 0,
                    }),
                    value: p.avg,
                    max: p.max,
                },
            )
        }),
        r.page.as_ref(),
    );
    Ok(pb::QueryMetricsResponse {
        samples,
        next_page_token,
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
            max: v,
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
        max: v,
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

    fn history_of(s: &PoolState) -> History {
        // h1's CPU at 10% then 30% in the first minute of an hour, 50% the next minute.
        let mut h = History::default();
        for (t, cpu) in [(0, 10.0), (30, 30.0), (60, 50.0)] {
            let at = proto::timestamp((T0 + t) as u64 * 1000);
            let m = hpb::HostMetrics {
                at: Some(at),
                cpu_percent: cpu,
                ..Default::default()
            };
            h.record(s, "h1", &m);
        }
        h
    }

    const T0: i64 = 1_700_002_800;

    /// (seconds after T0, average, maximum) of each bucket, and the next page's token.
    type Answer = (Vec<(i64, f64, f64)>, String);

    fn ask(
        s: &PoolState,
        h: &History,
        target: &str,
        metric: &str,
        step: u32,
        since: Option<i64>,
        page: Option<(u32, &str)>,
    ) -> Result<Answer, Status> {
        let r = pb::QueryMetricsRequest {
            target_id: target.into(),
            metric: metric.into(),
            step_seconds: step,
            since: since.map(|t| proto::timestamp(t as u64 * 1000)),
            page: page.map(|(size, token)| pb::PageRequest {
                page_size: size,
                page_token: token.into(),
            }),
            ..Default::default()
        };
        let a = buckets(s, h, &r)?;
        let got = a.samples.iter();
        let got = got.map(|m| (m.at.unwrap().seconds - T0, m.value, m.max));
        Ok((got.collect(), a.next_page_token))
    }

    #[test]
    fn a_step_picks_the_tier_and_buckets_come_oldest_first_with_average_and_maximum() {
        let s = pool(vec![]);
        let h = history_of(&s);
        let q = |step, since| {
            ask(&s, &h, "h1", "cpu_percent", step, since, None)
                .unwrap()
                .0
        };
        assert_eq!(
            q(5, None),
            [(0, 10.0, 10.0), (30, 30.0, 30.0), (60, 50.0, 50.0)]
        );
        assert_eq!(q(15, None), q(5, None));
        assert_eq!(q(60, None), [(0, 20.0, 30.0), (60, 50.0, 50.0)]);
        assert_eq!(q(600, None), q(60, None));
        assert_eq!(q(3600, None), [(0, 30.0, 50.0)]);
        assert_eq!(q(86_400, None), [(-T0 % 86_400, 30.0, 50.0)]);
        // since and until keep the buckets that overlap them.
        assert_eq!(q(5, Some(T0 + 35)), [(60, 50.0, 50.0)]);
        assert_eq!(q(5, Some(T0 + 34)), [(30, 30.0, 30.0), (60, 50.0, 50.0)]);
        // A since the 5 s tier no longer reaches (10 minutes back) is read from a coarser one.
        assert_eq!(q(5, Some(T0 - 3600)), [(0, 20.0, 30.0), (60, 50.0, 50.0)]);
        // The latest sample as before, and max with it.
        let r = pb::QueryMetricsRequest {
            target_id: "h1".into(),
            metric: "cpu_percent".into(),
            ..Default::default()
        };
        assert_eq!(sample(&s, &r).unwrap().map(|m| m.max), Some(0.0));
    }

    #[test]
    fn buckets_come_in_pages() {
        let s = pool(vec![]);
        let h = history_of(&s);
        let (first, next) = ask(&s, &h, "h1", "cpu_percent", 5, None, Some((2, ""))).unwrap();
        assert_eq!(first.iter().map(|p| p.0).collect::<Vec<_>>(), [0, 30]);
        let (rest, last) = ask(&s, &h, "h1", "cpu_percent", 5, None, Some((2, &next))).unwrap();
        assert_eq!(rest.iter().map(|p| p.0).collect::<Vec<_>>(), [60]);
        assert_eq!(last, "");
    }

    #[test]
    fn a_bad_step_a_reversed_range_or_a_metric_without_history_is_refused() {
        let s = pool(vec![]);
        let h = history_of(&s);
        let e = ask(&s, &h, "h1", "cpu_percent", 7, None, None).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(
            e.message().contains("not a multiple of 5"),
            "{}",
            e.message()
        );
        let r = pb::QueryMetricsRequest {
            target_id: "h1".into(),
            metric: "cpu_percent".into(),
            step_seconds: 5,
            since: Some(proto::timestamp(2000)),
            until: Some(proto::timestamp(1000)),
            ..Default::default()
        };
        let e = buckets(&s, &h, &r).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert_eq!(e.message(), "since is after until");
        let e = ask(&s, &h, "vm1", "net_tx_forged", 5, None, None).unwrap_err();
        assert!(e.message().contains("unknown VM metric"), "{}", e.message());
        assert!(e.message().contains("net_tx_spoofed"), "{}", e.message());
        let e = ask(&s, &h, "vm1", "net_tx_spoofed", 5, None, None).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("no history"), "{}", e.message());
        assert!(e.message().contains("net_tx_bytes"), "{}", e.message());
        let e = ask(&s, &h, "vm9", "rss_bytes", 5, None, None).unwrap_err();
        assert_eq!(e.code(), tonic::Code::NotFound);
        // A VM with no history yet has no buckets.
        assert_eq!(
            ask(&s, &h, "vm1", "rss_bytes", 5, None, None).unwrap().0,
            []
        );
    }
}
