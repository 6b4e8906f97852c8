//! The host's and its VMs' metrics in the Prometheus text format, served as `GET /metrics`
//! on the `HostService` port (`pool_trust::scrape`: members and monitors only). Names
//! follow the libvirt exporter's conventions and are listed in `docs/metrics.md`.
//!
//! Each scrape asks every running VM process for its counters (the same answer
//! `GetVmMetrics` gives) and encodes them into a registry of its own: the values are the
//! VM processes', nothing is kept here between scrapes.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use proto::host::VmMetrics;

use crate::host::{cpu_busy_seconds, logical_cpus, meminfo};
use crate::supervisor::manager::Manager;

type Labels = Vec<(&'static str, String)>;
type Counters = Family<Labels, Counter<f64, AtomicU64>>;
type Gauges = Family<Labels, Gauge>;

/// What the host measures beside its VMs.
#[derive(Debug, Clone, Copy, Default)]
pub struct HostSample {
    /// Busy CPU time of all the host's CPUs since boot; `None` without /proc/stat.
    pub cpu_seconds: Option<f64>,
    pub cpus: u32,
    pub memory_total_bytes: u64,
    pub memory_used_bytes: u64,
    pub memory_assigned_bytes: u64,
    pub vms_running: u32,
    pub vcpus_assigned: u32,
}

/// The scrape of this host now.
pub async fn render(manager: &Manager, host: &str) -> String {
    let (vms_running, vcpus_assigned, memory_assigned_bytes) = manager.usage().await;
    let mem = meminfo();
    let sample = HostSample {
        cpu_seconds: cpu_busy_seconds(),
        cpus: logical_cpus(),
        memory_total_bytes: mem.total_bytes,
        memory_used_bytes: mem.total_bytes.saturating_sub(mem.available_bytes),
        memory_assigned_bytes,
        vms_running,
        vcpus_assigned,
    };
    encode_scrape(host, &sample, &manager.all_metrics().await)
}

/// A registry's family, registered under `name` (after the `hostd_` prefix).
fn family<M: Default + Clone + prometheus_client::metrics::TypedMetric + std::fmt::Debug>(
    registry: &mut Registry,
    name: &str,
    help: &str,
) -> Family<Labels, M>
where
    Family<Labels, M>: prometheus_client::registry::Metric,
{
    let f = Family::<Labels, M>::default();
    registry.register(name, help, f.clone());
    f
}

fn gauge(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Encodes one scrape: the host's sample and its VMs' counters.
pub fn encode_scrape(host: &str, sample: &HostSample, vms: &[VmMetrics]) -> String {
    let mut r = Registry::with_prefix("hostd");
    let host_labels: Labels = vec![("host", host.to_owned())];

    let g: Gauges = family(&mut r, "host_cpus", "Logical CPUs of the host.");
    g.get_or_create(&host_labels).set(i64::from(sample.cpus));
    if let Some(s) = sample.cpu_seconds {
        let c: Counters = family(
            &mut r,
            "host_cpu_seconds",
            "CPU time the host's CPUs spent busy (not idle or waiting for I/O), all CPUs summed.",
        );
        c.get_or_create(&host_labels).inc_by(s);
    }
    for (name, help, value) in [
        (
            "host_memory_total_bytes",
            "The host's memory.",
            sample.memory_total_bytes,
        ),
        (
            "host_memory_used_bytes",
            "The host's memory in use (total less available).",
            sample.memory_used_bytes,
        ),
        (
            "host_memory_assigned_bytes",
            "Memory assigned to the host's running VMs.",
            sample.memory_assigned_bytes,
        ),
        (
            "host_vms",
            "VMs running on the host.",
            u64::from(sample.vms_running),
        ),
        (
            "host_vcpus_assigned",
            "vCPUs of the host's running VMs.",
            u64::from(sample.vcpus_assigned),
        ),
    ] {
        let g: Gauges = family(&mut r, name, help);
        g.get_or_create(&host_labels).set(gauge(value));
    }

    let cpu: Counters = family(
        &mut r,
        "vm_cpu_seconds",
        "Time the VM's vCPUs spent running guest code, all vCPUs summed.",
    );
    let memory: Gauges = family(&mut r, "vm_memory_bytes", "Memory assigned to the VM.");
    let rss: Gauges = family(
        &mut r,
        "vm_resident_bytes",
        "Resident memory of the VM's process, guest memory included.",
    );
    let guest_rss: Gauges = family(
        &mut r,
        "vm_guest_resident_bytes",
        "Guest memory the host has backed with pages.",
    );
    let disk = |r: &mut Registry, name: &str, help: &str| -> Counters { family(r, name, help) };
    let d_read_bytes = disk(
        &mut r,
        "vm_disk_read_bytes",
        "Bytes the guest read from the disk.",
    );
    let d_write_bytes = disk(
        &mut r,
        "vm_disk_write_bytes",
        "Bytes the guest wrote to the disk.",
    );
    let d_reads = disk(
        &mut r,
        "vm_disk_read_requests",
        "Read requests of the disk.",
    );
    let d_writes = disk(
        &mut r,
        "vm_disk_write_requests",
        "Write requests of the disk.",
    );
    let d_flushes = disk(
        &mut r,
        "vm_disk_flush_requests",
        "Flush requests of the disk.",
    );
    let d_discards = disk(
        &mut r,
        "vm_disk_discard_requests",
        "Discard and write-zeroes requests of the disk.",
    );
    let d_read_time = disk(
        &mut r,
        "vm_disk_read_time_seconds",
        "Time the disk's reads took, from the guest's request to its completion.",
    );
    let d_write_time = disk(
        &mut r,
        "vm_disk_write_time_seconds",
        "Time the disk's writes took, from the guest's request to its completion.",
    );
    let d_errors = disk(
        &mut r,
        "vm_disk_errors",
        "Requests of the disk that failed or were malformed.",
    );
    let nic = |r: &mut Registry, name: &str, help: &str| -> Counters { family(r, name, help) };
    let n_rx_bytes = nic(
        &mut r,
        "vm_net_receive_bytes",
        "Bytes of the frames given to the guest.",
    );
    let n_rx_packets = nic(
        &mut r,
        "vm_net_receive_packets",
        "Frames given to the guest.",
    );
    let n_rx_drops = nic(
        &mut r,
        "vm_net_receive_drops",
        "Frames for the guest not given to it (another VLAN's, or no buffer free).",
    );
    let n_tx_bytes = nic(
        &mut r,
        "vm_net_transmit_bytes",
        "Bytes of the frames the guest sent.",
    );
    let n_tx_packets = nic(&mut r, "vm_net_transmit_packets", "Frames the guest sent.");
    let n_tx_drops = nic(
        &mut r,
        "vm_net_transmit_drops",
        "Frames from the guest refused by its interface's policy (spoofed ones included).",
    );

    for vm in vms {
        let labels: Labels = vec![("host", host.to_owned()), ("vm", vm.vm_id.clone())];
        cpu.get_or_create(&labels)
            .inc_by(vm.vcpu_time_ns as f64 / 1e9);
        memory.get_or_create(&labels).set(gauge(vm.memory_bytes));
        rss.get_or_create(&labels).set(gauge(vm.rss_bytes));
        guest_rss
            .get_or_create(&labels)
            .set(gauge(vm.guest_resident_bytes));
        for d in &vm.disks {
            let mut l = labels.clone();
            l.push(("disk", d.disk_id.clone()));
            d_read_bytes.get_or_create(&l).inc_by(d.read_bytes as f64);
            d_write_bytes.get_or_create(&l).inc_by(d.write_bytes as f64);
            d_reads.get_or_create(&l).inc_by(d.read_ops as f64);
            d_writes.get_or_create(&l).inc_by(d.write_ops as f64);
            d_flushes.get_or_create(&l).inc_by(d.flush_ops as f64);
            d_discards.get_or_create(&l).inc_by(d.discard_ops as f64);
            d_read_time
                .get_or_create(&l)
                .inc_by(d.read_time_us as f64 / 1e6);
            d_write_time
                .get_or_create(&l)
                .inc_by(d.write_time_us as f64 / 1e6);
            d_errors.get_or_create(&l).inc_by(d.errors as f64);
        }
        for n in &vm.nics {
            let mut l = labels.clone();
            l.push(("nic", n.nic_id.clone()));
            n_rx_bytes.get_or_create(&l).inc_by(n.rx_bytes as f64);
            n_rx_packets.get_or_create(&l).inc_by(n.rx_packets as f64);
            n_rx_drops.get_or_create(&l).inc_by(n.rx_dropped as f64);
            n_tx_bytes.get_or_create(&l).inc_by(n.tx_bytes as f64);
            n_tx_packets.get_or_create(&l).inc_by(n.tx_packets as f64);
            n_tx_drops.get_or_create(&l).inc_by(n.tx_dropped as f64);
        }
    }
    let mut out = String::new();
    encode(&mut out, &r).expect("writing to a String cannot fail");
    out
}

#[cfg(test)]
mod tests {
    use proto::host::{DiskMetrics, NicMetrics};

    use super::*;

    #[test]
    fn a_vm_scrapes_as_labelled_counters_in_seconds_and_bytes() {
        let vm = VmMetrics {
            vm_id: "vm-1".into(),
            vcpu_time_ns: 2_500_000_000,
            memory_bytes: 64 << 20,
            disks: vec![DiskMetrics {
                disk_id: "vda".into(),
                read_bytes: 4096,
                read_ops: 1,
                read_time_us: 1500,
                ..Default::default()
            }],
            nics: vec![NicMetrics {
                nic_id: "eth0".into(),
                rx_dropped: 3,
                ..Default::default()
            }],
            ..Default::default()
        };
        let sample = HostSample {
            cpu_seconds: Some(12.5),
            vms_running: 1,
            ..Default::default()
        };
        let text = encode_scrape("h1", &sample, &[vm]);
        for line in [
            "# TYPE hostd_vm_cpu_seconds counter",
            r#"hostd_vm_cpu_seconds_total{host="h1",vm="vm-1"} 2.5"#,
            r#"hostd_vm_memory_bytes{host="h1",vm="vm-1"} 67108864"#,
            r#"hostd_vm_disk_read_bytes_total{host="h1",vm="vm-1",disk="vda"} 4096.0"#,
            r#"hostd_vm_disk_read_time_seconds_total{host="h1",vm="vm-1",disk="vda"} 0.0015"#,
            r#"hostd_vm_net_receive_drops_total{host="h1",vm="vm-1",nic="eth0"} 3.0"#,
            r#"hostd_host_cpu_seconds_total{host="h1"} 12.5"#,
            r#"hostd_host_vms{host="h1"} 1"#,
            "# EOF",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing from:\n{text}"
            );
        }
    }
}
