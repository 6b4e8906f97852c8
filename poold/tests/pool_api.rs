//! PoolService and HostAgentService against a real 3-member pool: idempotent creates,
//! placement through Raft with reasons when nothing fits, heartbeats that mark a silent
//! host unreachable (and forwarding from followers), metrics history on every member.

mod common;

use std::time::{Duration, Instant};

use common::*;
use proto::coordinator as pb;
use proto::coordinator::host_agent_service_client::HostAgentServiceClient;
use proto::host as hpb;

const ELECTION: Duration = Duration::from_secs(15);

fn host_info(gib: u64, cpus: u32, features: &[&str]) -> hpb::HostInfo {
    hpb::HostInfo {
        memory_total_bytes: gib << 30,
        memory_available_bytes: gib << 30,
        logical_cpus: cpus,
        cpu: Some(hpb::CpuInfo {
            features: features.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A heartbeat to `member` from the host named `host` (with that host's certificate)
/// reporting as host `host_id`.
async fn heartbeat(
    cl: &Cluster,
    member: u64,
    host: &str,
    host_id: &str,
    info: &hpb::HostInfo,
    seq: u64,
) -> Result<pb::HeartbeatResponse, tonic::Status> {
    let req = pb::HeartbeatRequest {
        host_id: host_id.into(),
        info: Some(info.clone()),
        metrics: None,
        vms: vec![],
        sequence: seq,
        ..Default::default()
    };
    send_heartbeat(cl, member, host, req).await
}

/// `req` sent to `member` with the certificate of the host named `host`.
async fn send_heartbeat(
    cl: &Cluster,
    member: u64,
    host: &str,
    req: pb::HeartbeatRequest,
) -> Result<pb::HeartbeatResponse, tonic::Status> {
    let tls = cl.issue(
        &pool_trust::Identity::Host(host.into()),
        &format!("host-{host}"),
    );
    let cfg = tls
        .client(&pool_trust::Identity::Member(member))
        .expect("host TLS config");
    HostAgentServiceClient::new(cl.channel(member, cfg))
        .heartbeat(req)
        .await
        .map(|r| r.into_inner())
}

async fn get_host(c: &mut pool_client::PoolClient, id: &str) -> pb::Host {
    let id = id.to_owned();
    c.call(|mut p| {
        let id = id.clone();
        async move { p.get_host(pb::GetHostRequest { host_id: id }).await }
    })
    .await
    .expect("get host")
}

fn spec(name: &str, vcpus: u32, gib: u64) -> pb::VmSpec {
    pb::VmSpec {
        name: name.into(),
        vcpus,
        memory_bytes: gib << 30,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_is_idempotent_placement_commits_and_explains() {
    let _serial = SERIAL.lock().await;
    let cl = Cluster::start(3, &[]);
    let leader = cl.leader(ELECTION).await;
    let follower = cl.alive().into_iter().find(|m| *m != leader).unwrap();
    let mut c = cl.client().await;
    let mut ids = Vec::new();
    for (i, gib) in [(0, 8u64), (1, 16)] {
        let name = format!("h{i}");
        let t = join_named_host(&mut c, &name, &format!("10.3.0.{i}:7000"))
            .await
            .unwrap();
        ids.push(t.target_id.clone());
        // Heartbeats go to a follower, which forwards them to the leader.
        heartbeat(
            &cl,
            follower,
            &name,
            &t.target_id,
            &host_info(gib, 4, &["avx2"]),
            1,
        )
        .await
        .expect("heartbeat through a follower");
    }
    // A retried create with the same request id makes one VM, even through another member.
    let req = pb::CreateVmRequest {
        request_id: "create-web-1".into(),
        spec: Some(spec("web", 2, 4)),
        source: None,
        sr_id: String::new(),
        start: true,
        host_id: String::new(),
        networks: vec![],
    };
    let mut first = cl.client_of(&[leader]).await;
    let t1 = first
        .call(|mut p| {
            let req = req.clone();
            async move { p.create_vm(req).await }
        })
        .await
        .unwrap()
        .task
        .unwrap();
    let mut second = cl.client_of(&[follower]).await;
    let t2 = second
        .call(|mut p| {
            let req = req.clone();
            async move { p.create_vm(req).await }
        })
        .await
        .unwrap()
        .task
        .unwrap();
    assert_eq!(t1.id, t2.id);
    assert_eq!(t1.target_id, t2.target_id);
    let vms = c
        .call(|mut p| async move {
            p.list_vms(pb::ListVmsRequest {
                page: None,
                host_id: String::new(),
            })
            .await
        })
        .await
        .unwrap()
        .vms;
    assert_eq!(vms.len(), 1, "one VM for one request id");
    // Spread put it on the emptier, larger host, and the host's allocation says so.
    assert_eq!(vms[0].host_id, ids[1]);
    let h = get_host(&mut c, &ids[1]).await;
    assert_eq!(h.memory_allocated_bytes, 4 << 30);
    assert_eq!(h.vm_ids, vec![vms[0].id.clone()]);
    // A VM larger than any host: a clear error, nothing written.
    let big = pb::CreateVmRequest {
        request_id: "create-big".into(),
        spec: Some(spec("big", 2, 64)),
        source: None,
        sr_id: String::new(),
        start: true,
        host_id: String::new(),
        networks: vec![],
    };
    let err = c
        .call(|mut p| {
            let big = big.clone();
            async move { p.create_vm(big).await }
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err}");
    assert!(err.message().contains("memory"), "{err}");
    let why = c
        .call(|mut p| async move {
            p.explain_placement(pb::ExplainPlacementRequest {
                vm_id: String::new(),
                spec: Some(pb::VmSpec {
                    required_cpu_features: vec!["avx512f".into()],
                    ..spec("needs-avx512", 1, 1)
                }),
            })
            .await
        })
        .await
        .unwrap();
    assert!(why.chosen_host_id.is_empty());
    assert_eq!(why.hosts.len(), 2);
    assert!(
        why.hosts
            .iter()
            .all(|h| !h.eligible && h.reasons[0].contains("avx512f"))
    );
    // Unknown ids are NOT_FOUND.
    let err = c
        .call(|mut p| async move {
            p.start_vm(pb::VmPowerRequest {
                request_id: "s".into(),
                vm_id: "no-such-vm".into(),
                force: false,
                host_id: String::new(),
            })
            .await
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_that_stops_heartbeating_becomes_unreachable_and_comes_back() {
    let _serial = SERIAL.lock().await;
    let cl = Cluster::start(3, &[]);
    let leader = cl.leader(ELECTION).await;
    let mut c = cl.client().await;
    let req = pb::UpdatePoolSettingsRequest {
        request_id: pool_client::new_request_id(),
        settings: Some(pb::PoolSettings {
            name: "hb".into(),
            placement: pb::PlacementStrategy::Pack as i32,
            cpu_overcommit_percent: 100,
            memory_overcommit_percent: 100,
            host_heartbeat_timeout_seconds: 2,
            migration_downtime_budget_ms: 300,
            schedules: Vec::new(),
        }),
    };
    c.call(|mut p| {
        let req = req.clone();
        async move { p.update_pool_settings(req).await }
    })
    .await
    .unwrap();
    let id = join_named_host(&mut c, "hb1", "10.4.0.1:7000")
        .await
        .unwrap()
        .target_id;
    let info = host_info(8, 4, &[]);
    let mut seq = 0;
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        seq += 1;
        let r = heartbeat(&cl, leader, "hb1", &id, &info, seq)
            .await
            .unwrap();
        assert_eq!(r.state, pb::HostState::Enabled as i32);
        assert!(r.next_heartbeat_ms > 0);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(get_host(&mut c, &id).await.state(), pb::HostState::Enabled);
    // Silence: past the 2 s timeout the leader marks it unreachable.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if get_host(&mut c, &id).await.state() == pb::HostState::Unreachable {
            break;
        }
        assert!(Instant::now() < deadline, "host never marked unreachable");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The next heartbeat brings it back.
    // Another host cannot speak for it, and the host stays unreachable.
    let err = heartbeat(&cl, leader, "hb2", &id, &info, seq + 1)
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    assert_eq!(
        get_host(&mut c, &id).await.state(),
        pb::HostState::Unreachable
    );
    let r = heartbeat(&cl, leader, "hb1", &id, &info, seq + 1)
        .await
        .unwrap();
    assert_eq!(r.state, pb::HostState::Enabled as i32);
    assert_eq!(get_host(&mut c, &id).await.state(), pb::HostState::Enabled);
    // A host that never joined is told so.
    let err = heartbeat(&cl, leader, "stranger", "stranger", &info, 1)
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
}

/// `member`'s buckets of host `id`'s CPU at `step` seconds: (seconds after `t0`, average,
/// maximum).
async fn cpu_buckets(
    cl: &Cluster,
    member: u64,
    id: &str,
    t0: u64,
    step: u32,
) -> Vec<(u64, f64, f64)> {
    let mut c = cl.client_of(&[member]).await;
    let req = pb::QueryMetricsRequest {
        target_id: id.into(),
        metric: "cpu_percent".into(),
        step_seconds: step,
        ..Default::default()
    };
    let r = c
        .call(|mut p| {
            let req = req.clone();
            async move { p.query_metrics(req).await }
        })
        .await
        .unwrap();
    r.samples
        .iter()
        .map(|s| (s.at.unwrap().seconds as u64 - t0, s.value, s.max))
        .collect()
}

/// Every member keeps the history of the host reports it applies: QueryMetrics with a step
/// answers the same buckets from each, and without one the latest sample as before. A
/// member restarted answers them still, from the file it saved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_member_keeps_the_metrics_history_of_the_reports_it_applies() {
    let _serial = SERIAL.lock().await;
    // A snapshot at every entry and no log kept behind it: a member restarted after the
    // reports applies none of them again, so its history can only come from its file.
    let mut cl = Cluster::start(
        3,
        &["--snapshot-interval", "1", "--snapshot-keep-entries", "0"],
    );
    let leader = cl.leader(ELECTION).await;
    let mut c = cl.client().await;
    let id = join_named_host(&mut c, "mh1", "10.5.0.1:7000")
        .await
        .unwrap()
        .target_id;
    // On a whole hour, so that every tier's bucket starts there.
    let t0: u64 = 1_700_002_800;
    for (i, (t, cpu)) in [(0, 10.0), (1, 30.0), (5, 50.0)].into_iter().enumerate() {
        let mut info = host_info(8, 4, &[]);
        // A changed info is committed at once.
        info.memory_available_bytes -= i as u64;
        let req = pb::HeartbeatRequest {
            host_id: id.clone(),
            info: Some(info),
            metrics: Some(hpb::HostMetrics {
                at: Some(proto::timestamp((t0 + t) * 1000)),
                cpu_percent: cpu,
                ..Default::default()
            }),
            sequence: i as u64 + 1,
            ..Default::default()
        };
        send_heartbeat(&cl, leader, "mh1", req).await.unwrap();
    }
    let check = async |cl: &Cluster, m: u64| {
        assert_eq!(
            cpu_buckets(cl, m, &id, t0, 5).await,
            [(0, 20.0, 30.0), (5, 50.0, 50.0)],
            "member {m}"
        );
        assert_eq!(
            cpu_buckets(cl, m, &id, t0, 60).await,
            [(0, 30.0, 50.0)],
            "member {m}"
        );
        assert_eq!(
            cpu_buckets(cl, m, &id, t0, 0).await,
            [(5, 50.0, 50.0)],
            "member {m}"
        );
    };
    for m in cl.alive() {
        check(&cl, m).await;
    }
    let m = cl.alive().into_iter().find(|m| *m != leader).unwrap();
    let applied = cl.status(leader).await.unwrap().applied_index;
    let deadline = Instant::now() + Duration::from_secs(20);
    while cl
        .status(m)
        .await
        .is_none_or(|s| s.snapshot_index < applied)
    {
        assert!(
            Instant::now() < deadline,
            "member {m} took no snapshot past {applied}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cl.stop(m);
    let file = cl.data_dir(m).join(poold::history::FILE);
    let (saved, err) = poold::history::History::load(&file);
    assert!(err.is_none() && !saved.is_empty(), "{err:?}");
    cl.spawn(m);
    check(&cl, m).await;
}
