//! This host, as the pool sees it: CPU, memory, KVM, and the resource use of processes.

use std::collections::HashMap;
use std::path::Path;

use proto::host::{CpuInfo, CpuidEntry};

/// Total and available memory, from /proc/meminfo.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemInfo {
    pub total_bytes: u64,
    pub available_bytes: u64,
}

pub fn meminfo() -> MemInfo {
    parse_meminfo(&std::fs::read_to_string("/proc/meminfo").unwrap_or_default())
}

fn parse_meminfo(text: &str) -> MemInfo {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .map(|kib| kib * 1024)
            .unwrap_or(0)
    };
    MemInfo {
        total_bytes: field("MemTotal"),
        available_bytes: field("MemAvailable"),
    }
}

/// Resident memory of a process, from `/proc/<pid>/status`.
pub fn process_rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map(|kib| kib * 1024)
}

pub fn logical_cpus() -> u32 {
    std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1)
}

/// Busy and total jiffies of all CPUs, from the first line of /proc/stat.
fn cpu_jiffies(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

/// Busy time of all CPUs since boot, in seconds: /proc/stat counts in USER_HZ, which
/// the kernel fixes at 100 whatever its own tick rate.
pub fn cpu_busy_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    cpu_jiffies(&stat).map(|(busy, _)| busy as f64 / 100.0)
}

/// Host CPU use between two calls, as a percentage of one CPU times the CPU count.
#[derive(Debug, Default)]
pub struct CpuSampler {
    last: Option<(u64, u64)>,
}

impl CpuSampler {
    pub fn sample(&mut self) -> f64 {
        let now = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| cpu_jiffies(&s));
        let pct = match (self.last, now) {
            (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => {
                (b1 - b0) as f64 / (t1 - t0) as f64 * 100.0 * f64::from(logical_cpus())
            }
            _ => 0.0,
        };
        if now.is_some() {
            self.last = now;
        }
        pct
    }
}

/// Whether KVM can be used here, and notes for people about what it is.
pub fn kvm_status() -> (bool, Vec<String>) {
    let mut notes = Vec::new();
    let usable = match kvm_ioctls::Kvm::new() {
        Ok(_) => true,
        Err(e) => {
            notes.push(format!("/dev/kvm cannot be opened: {e}"));
            false
        }
    };
    if Path::new("/sys/module/kvm_pvm").exists() {
        notes.push(
            "KVM here is PVM (kvm_pvm): guest CPL 0 is emulated one instruction at a time, so \
             stock Linux guests do not boot; guests that work at CPL 3 (guest/) run natively"
                .into(),
        );
    }
    (usable, notes)
}

/// The CPU as /proc/cpuinfo and KVM describe it.
pub fn cpu_info() -> CpuInfo {
    let text = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let first: HashMap<&str, &str> = text
        .split("\n\n")
        .next()
        .unwrap_or("")
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            Some((k.trim(), v.trim()))
        })
        .collect();
    let num = |k: &str| first.get(k).and_then(|v| v.parse().ok()).unwrap_or(0);
    let cpuid = kvm_ioctls::Kvm::new()
        .ok()
        .and_then(|kvm| crate::vmm::cpuid::supported(&kvm).ok())
        .map(|entries| {
            entries
                .iter()
                .map(|e| CpuidEntry {
                    function: e.function,
                    index: e.index,
                    eax: e.eax,
                    ebx: e.ebx,
                    ecx: e.ecx,
                    edx: e.edx,
                })
                .collect()
        })
        .unwrap_or_default();
    CpuInfo {
        vendor: first.get("vendor_id").unwrap_or(&"").to_string(),
        model_name: first.get("model name").unwrap_or(&"").to_string(),
        family: num("cpu family"),
        model: num("model"),
        stepping: num("stepping"),
        features: first
            .get("flags")
            .map(|f| f.split_whitespace().map(str::to_owned).collect())
            .unwrap_or_default(),
        cpuid,
    }
}

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_fields_are_bytes() {
        let m = parse_meminfo(
            "MemTotal:       24000000 kB\nMemFree: 1 kB\nMemAvailable:   12000000 kB\n",
        );
        assert_eq!(m.total_bytes, 24_000_000 * 1024);
        assert_eq!(m.available_bytes, 12_000_000 * 1024);
        assert_eq!(parse_meminfo(""), MemInfo::default());
    }

    #[test]
    fn cpu_busy_excludes_idle_and_iowait() {
        let (busy, total) = cpu_jiffies("cpu  10 0 5 80 5 0 0 0 0 0\ncpu0 ...").unwrap();
        assert_eq!((busy, total), (15, 100));
    }

    #[test]
    fn this_process_has_a_resident_size() {
        assert!(process_rss_bytes(std::process::id()).unwrap() > 0);
        assert!(logical_cpus() >= 1);
        assert!(meminfo().total_bytes > 0);
        assert!(!cpu_info().features.is_empty());
    }
}
