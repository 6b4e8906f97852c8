//! `bench/metrics.sh`: how long a full `GET /metrics` of a host running many VMs takes.
//! The daemon serves on loopback as `hostd` does (mutual TLS, `service::serve`), each VM
//! the test guest in its own `hostd vmm` process with a file disk it writes, and curl
//! scrapes with a monitor's certificate. Not through a pool: its scheduler would hold a
//! two-CPU host to 20 vCPUs.

use std::time::Duration;

mod common;

use common::*;
use pool_trust::Identity;
use proto::host::*;

/// `METRICS_VMS` VMs (default 50; 16 MiB and a 4 MiB disk each), then `METRICS_SCRAPES`
/// scrapes (default 11), as curl times them (connection and TLS handshake included): one
/// line per scrape, then `BENCH metrics_scrape_ms <median> ms`.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "a benchmark: run by bench/metrics.sh"]
async fn bench_a_scrape_of_a_host_running_many_vms() {
    let vms: usize = std::env::var("METRICS_VMS").map_or(50, |v| v.parse().unwrap());
    let scrapes: usize = std::env::var("METRICS_SCRAPES").map_or(11, |v| v.parse().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path()).await;
    let mut c = d.client().await;
    for i in 0..vms {
        let img = dir.path().join(format!("vm{i}.img"));
        std::fs::File::create(&img)
            .unwrap()
            .set_len(4 << 20)
            .unwrap();
        let mut cfg = config("seed=5 blk=rw blk_kib=256 mode=heartbeat hb_ms=1000");
        cfg.memory_bytes = 16 << 20;
        cfg.disks = vec![DiskConfig {
            id: "vda".into(),
            backend: Some(disk_config::Backend::FilePath(img.display().to_string())),
            read_only: false,
        }];
        create(&mut c, &format!("vm{i}"), cfg, true).await;
    }
    for i in 0..vms {
        wait_state(&mut c, &format!("vm{i}"), PowerState::Running).await;
    }
    let monitor = Identity::Monitor("bench".into());
    d.pki.issue(&monitor, &[]);
    let tls = d.pki.dir_of(&monitor);
    let url = format!("https://{}/metrics", d.addr);
    let curl = |out: &str, format: &str| {
        let mut cmd = tokio::process::Command::new("curl");
        cmd.args([
            "-sS",
            "--max-time",
            "30",
            "-o",
            out,
            "-w",
            format,
            "--cacert",
        ])
        .arg(tls.join("ca.pem"))
        .arg("--cert")
        .arg(tls.join("cert.pem"))
        .arg("--key")
        .arg(tls.join("key.pem"))
        .arg(&url);
        cmd
    };
    // The guests' first writes done, so every VM has its disk's counters.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut ms = Vec::new();
    for i in 0..scrapes {
        let out = curl("/dev/null", "%{http_code} %{time_total} %{size_download}")
            .output()
            .await
            .expect("running curl");
        let w = String::from_utf8_lossy(&out.stdout).into_owned();
        let [code, seconds, bytes] = w.split(' ').collect::<Vec<_>>()[..] else {
            panic!("curl said {w:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        assert_eq!(code, "200", "scrape {i}");
        let t = seconds.parse::<f64>().unwrap() * 1000.0;
        println!("scrape {i}: {t:.1} ms, {bytes} bytes");
        ms.push(t);
    }
    // Every VM in the scrape, or the figure is not the one asked for.
    let body = dir.path().join("scrape.txt");
    let out = curl(body.to_str().unwrap(), "%{http_code}")
        .output()
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200");
    let text = std::fs::read_to_string(&body).unwrap();
    let counted = text
        .lines()
        .filter(|l| l.starts_with("hostd_vm_disk_write_bytes_total{"))
        .count();
    assert_eq!(counted, vms, "VMs with a disk in the scrape");
    assert!(
        text.contains(&format!("hostd_host_vms{{host=\"{HOST}\"}} {vms}")),
        "{text}"
    );
    ms.sort_by(f64::total_cmp);
    println!("BENCH metrics_scrape_ms {:.1} ms", ms[ms.len() / 2]);
}
