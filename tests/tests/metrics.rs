//! `GET /metrics` of every daemon of a real pool running a VM, through curl over the
//! same TLS as the daemons' other endpoints, parsed as Prometheus text: the names
//! `docs/metrics.md` lists, with values that follow what the pool did. And who is
//! refused: `hostd` and `storaged` take a member's or a monitor's certificate only (no
//! certificate: no handshake), and a monitor may call none of their gRPC methods; `poold`'s
//! web port takes the bearer token of a user who may read the pool.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use e2e_tests::pool::{Pool, field, guest_elf, guest_vm};
use e2e_tests::{free_port, secret_file, wait_for};
use pool_trust::Identity;
use prometheus_parse::{Sample, Scrape, Value};

/// How curl authenticates a scrape.
enum Auth<'a> {
    Nothing,
    Certificate(&'a Path),
    Bearer(&'a str),
}

/// The HTTP status (0 when no answer came, e.g. a refused handshake) and body of
/// `GET url`, trusting only the pool's CA.
fn scrape(url: &str, ca: &Path, auth: Auth) -> (u16, String) {
    scrape_with(url, ca, auth, &[])
}

/// As [`scrape`], with more of curl's arguments.
fn scrape_with(url: &str, ca: &Path, auth: Auth, extra: &[&str]) -> (u16, String) {
    let mut curl = Command::new("curl");
    curl.args(extra);
    curl.args([
        "-sS",
        "-w",
        "\n%{http_code}",
        "--max-time",
        "20",
        "--cacert",
    ])
    .arg(ca);
    match auth {
        Auth::Nothing => {}
        Auth::Certificate(dir) => {
            curl.arg("--cert")
                .arg(dir.join("cert.pem"))
                .arg("--key")
                .arg(dir.join("key.pem"));
        }
        Auth::Bearer(token) => {
            curl.args(["-H", &format!("Authorization: Bearer {token}")]);
        }
    }
    let out = curl.arg(url).output().expect("running curl");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let (body, code) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

fn parse(body: &str) -> Scrape {
    Scrape::parse(body.lines().map(|l| Ok(l.to_owned()))).expect("Prometheus text")
}

/// The value of the one sample of `name` whose labels include `labels`.
fn value(s: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    let found: Vec<&Sample> = s
        .samples
        .iter()
        .filter(|x| x.metric == name && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .collect();
    assert_eq!(found.len(), 1, "one {name} {labels:?} in {:?}", s.samples);
    match &found[0].value {
        Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
        other => panic!("{name} is not a number: {other:?}"),
    }
}

/// The sum of every sample of `name` whose labels include `labels`.
fn total(s: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    s.samples
        .iter()
        .filter(|x| x.metric == name && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .map(|x| match &x.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
            other => panic!("{name} is not a number: {other:?}"),
        })
        .sum()
}

fn has_histogram(s: &Scrape, name: &str) -> bool {
    s.samples
        .iter()
        .any(|x| x.metric == name && matches!(&x.value, Value::Histogram(b) if !b.is_empty()))
}

#[test]
fn every_daemon_serves_its_metrics_to_those_it_trusts_and_no_one_else() {
    let dir = tempfile::tempdir().unwrap();
    let mut pool = Pool::start(dir.path(), 1);
    pool.wait_hosts_enabled();
    let web = format!("127.0.0.1:{}", free_port());
    pool.coordinators.restart_with(1, &["--web-listen", &web]);
    let sr = pool.create_sr(dir.path(), "sr1", "256M");
    pool.ctl(&["vdi-create", "m-disk", "--sr", "sr1", "--size", "16M"]);
    let elf = guest_elf(dir.path());
    pool.ctl(&guest_vm(
        "m1",
        "m-disk",
        &elf,
        "seed=3 blk=rw mode=heartbeat hb_ms=200",
        &["--start"],
    ));
    let line = pool.wait_vm("m1", "\"power\": \"running\"", Duration::from_secs(60));
    let vm = field(&line, "id");
    let ca = pool.p.bundle();
    let monitor = pool.p.tls_dir(Identity::Monitor("prom".into()), &[]);

    // hostd: the VM's counters, once its guest has run and touched its disk.
    let host = &pool.hosts[0];
    let host_url = format!("https://{}/metrics", host.addr);
    let s = wait_for(Duration::from_secs(30), || {
        let (code, body) = scrape(&host_url, &ca, Auth::Certificate(&monitor));
        assert_eq!(code, 200, "{body}");
        let s = parse(&body);
        let vm = [("vm", vm.as_str())];
        (value(&s, "hostd_vm_cpu_seconds_total", &vm) > 0.0
            && total(&s, "hostd_vm_disk_write_bytes_total", &vm) > 0.0)
            .then_some(s)
    })
    .unwrap_or_else(|| panic!("the VM ran and wrote\n{}", pool.logs()));
    let on_host = [("host", "h1"), ("vm", vm.as_str())];
    assert_eq!(
        value(&s, "hostd_vm_memory_bytes", &on_host),
        64.0 * 1024.0 * 1024.0
    );
    assert!(value(&s, "hostd_vm_resident_bytes", &on_host) > 0.0);
    assert!(total(&s, "hostd_vm_disk_read_bytes_total", &on_host) > 0.0);
    assert!(total(&s, "hostd_vm_disk_write_requests_total", &on_host) > 0.0);
    assert!(total(&s, "hostd_vm_disk_write_time_seconds_total", &on_host) > 0.0);
    let h1 = [("host", "h1")];
    assert_eq!(value(&s, "hostd_host_vms", &h1), 1.0);
    assert!(value(&s, "hostd_host_cpu_seconds_total", &h1) > 0.0);
    assert!(
        value(&s, "hostd_host_memory_total_bytes", &h1)
            > value(&s, "hostd_host_memory_used_bytes", &h1)
    );
    assert_eq!(
        value(&s, "hostd_host_memory_assigned_bytes", &h1),
        64.0 * 1024.0 * 1024.0
    );
    // A member's certificate reads them too: the coordinators may scrape.
    let member = pool.p.tls_dir(Identity::Member(99), &[]);
    assert_eq!(scrape(&host_url, &ca, Auth::Certificate(&member)).0, 200);
    // And over HTTP/1.1, for scrapers that do not speak HTTP/2.
    let (code, body) = scrape_with(&host_url, &ca, Auth::Certificate(&monitor), &["--http1.1"]);
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("hostd_vm_cpu_seconds_total"), "{body}");

    // storaged: the pool's space, the VM's session and its LUN's commands.
    let storage_url = format!("https://{}/metrics", pool.storaged.addr);
    let (code, body) = scrape(&storage_url, &ca, Auth::Certificate(&monitor));
    assert_eq!(code, 200, "{body}");
    let s = parse(&body);
    let sr_id = s
        .samples
        .iter()
        .find(|x| x.metric == "storaged_pool_used_bytes")
        .and_then(|x| x.labels.get("sr").map(str::to_owned))
        .unwrap_or_else(|| panic!("a pool in {body} (sr-create said {sr})"));
    let sr = [("sr", sr_id.as_str())];
    let used = value(&s, "storaged_pool_used_bytes", &sr);
    assert!(used > 0.0);
    // The backing file less what the pool keeps for itself.
    let size = value(&s, "storaged_pool_size_bytes", &sr);
    assert!(size > used && size <= 256.0 * 1024.0 * 1024.0, "{size}");
    assert!(value(&s, "storaged_pool_provisioned_bytes", &sr) >= 16.0 * 1024.0 * 1024.0);
    assert!(value(&s, "storaged_pool_volumes", &sr) >= 1.0);
    assert!(value(&s, "storaged_pool_iscsi_sessions", &sr) >= 1.0);
    assert!(
        total(
            &s,
            "storaged_lun_requests_total",
            &[("sr", &sr_id), ("op", "write")]
        ) > 0.0
    );
    assert!(
        total(
            &s,
            "storaged_lun_bytes_total",
            &[("sr", &sr_id), ("op", "read")]
        ) > 0.0
    );
    assert!(has_histogram(&s, "storaged_lun_latency_seconds"), "{body}");

    // poold: this member's Raft, to a token that may read the pool.
    let poold_url = format!("https://{web}/metrics");
    let admin = pool.p.token.clone().expect("the admin's token");
    let (code, body) = wait_for(Duration::from_secs(30), || {
        let r = scrape(&poold_url, &ca, Auth::Bearer(&admin));
        (r.0 != 0).then_some(r)
    })
    .expect("the web port answers");
    assert_eq!(code, 200, "{body}");
    let viewer_pw = secret_file(dir.path(), "viewer-password", "viewer-password-1");
    pool.ctl(&[
        "user-add",
        "viewer",
        "--password-file",
        &viewer_pw,
        "--role",
        "read-only",
    ]);
    let viewer = pool.p.login("viewer", Path::new(&viewer_pw));
    let (code, body) = scrape(&poold_url, &ca, Auth::Bearer(&viewer));
    assert_eq!(code, 200, "{body}");
    let s = parse(&body);
    let m1 = [("member", "1")];
    assert!(value(&s, "poold_raft_term", &m1) >= 1.0);
    let applied = value(&s, "poold_raft_applied_index", &m1);
    assert!(applied > 0.0);
    assert!(value(&s, "poold_raft_commit_index", &m1) >= applied);
    assert!(value(&s, "poold_raft_leader_id", &m1) >= 1.0);
    assert!(value(&s, "poold_raft_leader_changes_total", &m1) >= 1.0);
    assert_eq!(value(&s, "poold_raft_voters", &m1), 3.0);
    assert!(value(&s, "poold_raft_apply_duration_seconds_count", &m1) > 0.0);
    assert!(
        has_histogram(&s, "poold_raft_apply_duration_seconds"),
        "{body}"
    );
    assert!(
        has_histogram(&s, "poold_raft_proposal_duration_seconds"),
        "{body}"
    );
    value(&s, "poold_raft_snapshot_bytes", &m1);
    // The same on a member's own port, to a monitor's certificate (as hostd and storaged
    // serve theirs), over HTTP/2 and HTTP/1.1.
    let member_url = format!("https://{}/metrics", pool.coordinators.addrs[0]);
    for extra in [&[][..], &["--http1.1"][..]] {
        let (code, body) = scrape_with(&member_url, &ca, Auth::Certificate(&monitor), extra);
        assert_eq!(code, 200, "{body}");
        assert!(
            value(&parse(&body), "poold_raft_term", &m1) >= 1.0,
            "{body}"
        );
    }

    // Refused: no certificate (no handshake), a certificate of another role, no token, a
    // token that is not one.
    for url in [&host_url, &storage_url, &member_url] {
        let (code, body) = scrape(url, &ca, Auth::Nothing);
        // A member's port takes calls without a certificate (PoolService with a token),
        // but not a scrape.
        let want = if url == &member_url { 401 } else { 0 };
        assert_eq!(code, want, "{url} without a certificate: {body}");
        let client = pool.p.tls_dir(Identity::Client("alice".into()), &[]);
        let (code, body) = scrape(url, &ca, Auth::Certificate(&client));
        assert_eq!(code, 403, "{url} as a client: {body}");
        assert!(!body.contains("_total"), "{body}");
    }
    let (code, body) = scrape(&poold_url, &ca, Auth::Nothing);
    assert_eq!(code, 401, "{body}");
    let (code, body) = scrape(&poold_url, &ca, Auth::Bearer("not-a-token"));
    assert_eq!(code, 401, "{body}");
    assert!(!body.contains("poold_raft"), "{body}");

    // A monitor may read the metrics and nothing else.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let tls = pool_trust::DaemonTls::load(&monitor).expect("the monitor's TLS directory");
    let channel = |addr: &str| {
        let ip = addr.split(':').next().unwrap_or_default().to_owned();
        let config = pool_trust::tls::client_tls(&tls.bundle, Some(&tls.creds), None)
            .expect("TLS")
            .domain_name(ip);
        let url = format!("https://{addr}");
        async move {
            tonic::transport::Endpoint::from_shared(url)
                .unwrap()
                .tls_config(config)
                .unwrap()
                .connect()
                .await
                .expect("the handshake takes a monitor's certificate")
        }
    };
    rt.block_on(async {
        let host =
            proto::host::host_service_client::HostServiceClient::new(channel(&host.addr).await)
                .list_vms(proto::host::ListVmsRequest::default())
                .await
                .expect_err("a monitor lists no VMs");
        assert_eq!(host.code(), tonic::Code::PermissionDenied, "{host}");
        let storage = proto::storage::storage_service_client::StorageServiceClient::new(
            channel(&pool.storaged.addr).await,
        )
        .list_pools(proto::storage::ListPoolsRequest::default())
        .await
        .expect_err("a monitor lists no pools");
        assert_eq!(storage.code(), tonic::Code::PermissionDenied, "{storage}");
    });

    // History: a heartbeat sample in every 5 s bucket, though reports that change nothing
    // are committed only every 30 s (they carry the samples kept meanwhile).
    let buckets = wait_for(Duration::from_secs(90), || {
        let o = pool.ctl(&["host-stats", "h1", "--since", "60s", "--json"]);
        let n = o.lines().filter(|l| l.contains("\"avg\"")).count();
        (n >= 9).then_some(n)
    });
    assert!(
        buckets.is_some(),
        "the 5 s tier is full: {}",
        pool.ctl(&["host-stats", "h1", "--since", "60s"])
    );
}
