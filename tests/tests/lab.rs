//! README's first command, `poolctl lab`: the whole pool on this machine, ready to use
//! with the client configuration it writes, resumed by running it again. Its CA can be
//! rolled like any pool's, and the lab resumed after the roll still works: its daemons
//! keep the certificates they renewed and poolctl follows member 1's CA bundle.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use e2e_tests::lab::{ctl, ctl_ok};
use e2e_tests::text;
use pool_trust::CaBundle;

const LAB: [&str; 3] = ["--hosts", "1", "--no-demo"];

/// Every member's console port serves the web console's pages (built by the lab from
/// web/) over HTTPS under the CA member 1 trusts.
fn console_answers(dir: &Path) {
    let bundle = dir.join("pki/member-1").join(pool_trust::BUNDLE_FILE);
    for port in 7141..=7143 {
        let o = Command::new("curl")
            .args(["-sS", "-i", "--cacert"])
            .arg(&bundle)
            .arg(format!("https://127.0.0.1:{port}/"))
            .output()
            .expect("running curl");
        let out = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(out.starts_with("HTTP/2 200"), "{port}: {out}");
        assert!(out.contains("<title>Pool console</title>"), "{port}: {out}");
    }
}

/// Every target of the `prometheus.yml` the lab wrote answers `/metrics` to the lab's
/// monitor certificate, as that file configures it.
fn prometheus_scrapes(dir: &Path) {
    let config = std::fs::read_to_string(dir.join("prometheus.yml")).expect("prometheus.yml");
    let path = |key: &str| {
        let line = config
            .lines()
            .find_map(|l| l.trim().strip_prefix(key))
            .unwrap_or_else(|| panic!("{key} in {config}"));
        line.trim().trim_matches('"').to_owned()
    };
    let (ca, cert, key) = (path("ca_file:"), path("cert_file:"), path("key_file:"));
    let targets: Vec<String> = config
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- targets: ["))
        .flat_map(|l| l.trim_end_matches(']').split(", "))
        .map(|t| t.trim_matches('"').to_owned())
        .collect();
    // Three members, the host and the storage.
    assert_eq!(targets.len(), 5, "{config}");
    for t in targets {
        let o = Command::new("curl")
            .args([
                "-sS", "--fail", "--cacert", &ca, "--cert", &cert, "--key", &key,
            ])
            .arg(format!("https://{t}/metrics"))
            .output()
            .expect("running curl");
        assert!(o.status.success(), "{t}: {}", text(&o));
        assert!(
            String::from_utf8_lossy(&o.stdout).contains("# EOF"),
            "{t}: {}",
            text(&o)
        );
    }
}

#[test]
fn the_lab_runs_rolls_its_ca_and_resumes_after_the_roll() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("lab");
    let lab = e2e_tests::lab::start(&dir, &LAB);
    let hosts = ctl_ok(&dir, &["host-list", "--json"]);
    assert!(hosts.contains("\"name\": \"h1\""), "{hosts}");
    console_answers(&dir);
    prometheus_scrapes(&dir);
    let before = CaBundle::from_pem(&ctl_ok(&dir, &["pool-ca"])).unwrap();
    assert_eq!(before.certs().len(), 1);

    // The lab's poolctl trusts member 1's bundle, which follows the roll by itself.
    let roll = ctl(&dir, &["pool-rotate-ca", "--timeout", "60"]);
    assert!(roll.status.success(), "{}", text(&roll));
    let after = CaBundle::from_pem(&ctl_ok(&dir, &["pool-ca"])).unwrap();
    assert_eq!(after.certs().len(), 1);
    assert_ne!(
        after.certs()[0].fingerprint(),
        before.certs()[0].fingerprint()
    );
    e2e_tests::lab::stop(lab);

    // Resumed: the daemons come back with the certificates of the new CA.
    let lab = e2e_tests::lab::start(&dir, &LAB);
    let enabled = e2e_tests::wait_for(Duration::from_secs(30), || {
        let hosts = ctl_ok(&dir, &["host-list", "--json"]);
        hosts.contains("\"state\": \"enabled\"").then_some(())
    });
    assert!(
        enabled.is_some(),
        "{}",
        ctl_ok(&dir, &["host-list", "--json"])
    );
    let now = CaBundle::from_pem(&ctl_ok(&dir, &["pool-ca"])).unwrap();
    assert_eq!(now.certs()[0].fingerprint(), after.certs()[0].fingerprint());
    // The console ports serve certificates of the new CA too.
    console_answers(&dir);
    ctl_ok(
        &dir,
        &[
            "vdi-create",
            "after-roll",
            "--sr",
            "lab-sr",
            "--size",
            "16M",
        ],
    );
    e2e_tests::lab::stop(lab);
}
