//! `deploy/systemd/`: the units as systemd itself reads them. Each must be valid, run the
//! daemon with its TLS directory, and keep its exposure (systemd-analyze security, offline)
//! under a bound: poold and storaged as an unprivileged user with no capabilities to speak
//! of, hostd as root with only what KVM guests need.

use std::path::{Path, PathBuf};
use std::process::Command;

fn unit(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../deploy/systemd/{name}.service"))
}

/// `systemd-analyze security`'s overall exposure of a unit file (0 safest, 10 worst).
fn exposure(name: &str) -> f64 {
    let o = Command::new("systemd-analyze")
        .args(["security", "--offline=true"])
        .arg(unit(name))
        .output()
        .expect("systemd-analyze (Debian's systemd package) runs here");
    let out = String::from_utf8_lossy(&o.stdout);
    let line = out
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no exposure level for {name}: {out}"));
    line.split(':')
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unreadable exposure: {line}"))
}

#[test]
fn the_systemd_units_are_hardened_and_run_on_tls() {
    for (name, user, limit) in [
        ("poold", true, 2.0),
        ("storaged", true, 3.0),
        ("hostd", false, 6.0),
    ] {
        let text = std::fs::read_to_string(unit(name)).unwrap();
        let o = Command::new("systemd-analyze")
            .arg("verify")
            .arg(unit(name))
            .output()
            .expect("systemd-analyze verify");
        let complaints = String::from_utf8_lossy(&o.stderr);
        // The binaries are not installed here; anything else is a real complaint.
        for line in complaints.lines() {
            assert!(
                line.contains("/usr/local/bin/") || line.trim().is_empty(),
                "{name}: {line}"
            );
        }
        assert!(
            text.contains("tls"),
            "{name} runs without its TLS directory"
        );
        assert_eq!(text.contains("\nUser=pool\n"), user, "{name}: User=");
        for key in [
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "ProtectHome=yes",
            "PrivateTmp=yes",
            "CapabilityBoundingSet=",
        ] {
            assert!(text.contains(key), "{name} lacks {key}");
        }
        let e = exposure(name);
        assert!(e <= limit, "{name}: exposure {e} over {limit}");
    }
}
