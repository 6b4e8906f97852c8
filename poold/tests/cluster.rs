//! Pools of real `poold` processes on loopback: elections, failover, restarts, partitions,
//! catch-up by snapshot and membership changes.

mod common;

use std::time::Duration;

use common::*;
use proto::coordinator as pb;

const ELECTION: Duration = Duration::from_secs(15);

async fn failover(n: u64) {
    let _serial = SERIAL.lock().await;
    let mut cl = Cluster::start(n, &[]);
    let leader = cl.leader(ELECTION).await;
    let mut c = cl.client().await;
    for i in 0..10 {
        join_host(&mut c, &format!("10.0.0.{i}:7000"))
            .await
            .expect("write");
    }
    cl.kill(leader);
    let alive = cl.alive();
    let new_leader = cl.leader_among(&alive, ELECTION).await;
    assert_ne!(new_leader, leader);
    for i in 10..20 {
        join_host(&mut c, &format!("10.0.0.{i}:7000"))
            .await
            .expect("write after failover");
    }
    let hosts = list_hosts(&mut c).await;
    assert_eq!(
        hosts.len(),
        20,
        "every acknowledged write survives the failover"
    );
    // The old leader comes back as a follower and catches up.
    cl.spawn(leader);
    let st = cl.status(new_leader).await.unwrap();
    let back = cl.wait_applied(leader, st.commit_index, ELECTION).await;
    assert_ne!(back.role, "leader");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_members_fail_over_when_the_leader_dies() {
    failover(3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_members_fail_over_when_the_leader_dies() {
    failover(5).await;
}

/// Many writes in flight at once: each caller must get its own command's answer, whether
/// the members serve gRPC on one thread (the default, where a pass's answers are handed
/// over together) or on several.
async fn concurrent_writes_answer_their_own_callers(extra: &[&str]) {
    let _serial = SERIAL.lock().await;
    let cl = Cluster::start(3, extra);
    cl.leader(ELECTION).await;
    let c = cl.client().await;
    let writers: Vec<_> = (0..48)
        .map(|i| {
            let mut c = c.clone();
            tokio::spawn(async move {
                let address = format!("10.1.{}.{}:7000", i / 8, i % 8);
                let task = join_host(&mut c, &address).await.expect("write");
                (address, task)
            })
        })
        .collect();
    let mut answers = Vec::new();
    for w in writers {
        answers.push(w.await.expect("writer task"));
    }
    let mut c = cl.client().await;
    let hosts = list_hosts(&mut c).await;
    assert_eq!(hosts.len(), 48);
    for (address, task) in answers {
        let host = hosts
            .iter()
            .find(|h| h.address == address)
            .unwrap_or_else(|| panic!("no host with address {address}"));
        assert_eq!(
            task.target_id, host.id,
            "the answer to the join of {address} names another host"
        );
        assert_eq!(task.state, pb::TaskState::Succeeded as i32);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_on_one_api_thread() {
    concurrent_writes_answer_their_own_callers(&[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_on_several_api_threads() {
    concurrent_writes_answer_their_own_callers(&["--api-threads", "3"]).await;
}

#[test]
fn api_threads_out_of_range_is_refused_before_starting() {
    let dir = tempfile::tempdir().unwrap();
    for bad in ["0", "257", "x"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_poold"))
            .args([
                "--member-id",
                "1",
                "--listen",
                "127.0.0.1:1",
                "--api-threads",
                bad,
            ])
            .arg("--data-dir")
            .arg(dir.path())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "--api-threads {bad}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("--api-threads"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // A valid TLS directory, so the setting is what is refused.
    let pool = pool_trust::PoolId::parse(TEST_POOL_ID).unwrap();
    let tls = dir.path().join("m1-tls");
    pool_trust::LocalCa::open_or_create(&dir.path().join("pki"), &pool)
        .unwrap()
        .issue(&pool_trust::Identity::Member(1), &["127.0.0.1"], &tls)
        .unwrap();
    let cfg = dir.path().join("poold.toml");
    std::fs::write(&cfg, "api_threads = 0\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_poold"))
        .args(["--member-id", "1", "--listen", "127.0.0.1:1", "--config"])
        .arg(&cfg)
        .arg("--tls-dir")
        .arg(&tls)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("api_threads must be 1..=256"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !dir.path().join("data").exists(),
        "nothing is created when the settings are refused"
    );
}

async fn set_name(c: &mut pool_client::PoolClient, name: &str) -> Result<(), tonic::Status> {
    let req = pb::UpdatePoolSettingsRequest {
        request_id: pool_client::new_request_id(),
        settings: Some(pb::PoolSettings {
            name: name.to_owned(),
            placement: pb::PlacementStrategy::Spread as i32,
            cpu_overcommit_percent: 400,
            memory_overcommit_percent: 100,
            host_heartbeat_timeout_seconds: 30,
            migration_downtime_budget_ms: 300,
            schedules: Vec::new(),
        }),
    };
    c.call(|mut p| {
        let req = req.clone();
        async move { p.update_pool_settings(req).await }
    })
    .await
    .map(|_| ())
}

async fn get_name(c: &mut pool_client::PoolClient) -> Result<String, tonic::Status> {
    c.call(|mut p| async move { p.get_pool(pb::GetPoolRequest {}).await })
        .await
        .map(|p| p.settings.unwrap_or_default().name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_every_member_keeps_the_state() {
    let _serial = SERIAL.lock().await;
    let mut cl = Cluster::start(3, &[]);
    cl.leader(ELECTION).await;
    let mut c = cl.client().await;
    for i in 0..30 {
        join_host(&mut c, &format!("10.1.0.{i}:7000"))
            .await
            .expect("write");
    }
    set_name(&mut c, "before-restart").await.unwrap();
    let before = list_hosts(&mut c).await;
    for id in 1..=3 {
        cl.kill(id);
    }
    for id in 1..=3 {
        cl.spawn(id);
    }
    cl.leader(ELECTION).await;
    let mut c = cl.client().await;
    let after = list_hosts(&mut c).await;
    assert_eq!(after, before, "hosts survive a restart of every member");
    assert_eq!(get_name(&mut c).await.unwrap(), "before-restart");
    // And the pool still takes writes.
    join_host(&mut c, "10.1.1.1:7000")
        .await
        .expect("write after restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minority_partition_cannot_commit() {
    let _serial = SERIAL.lock().await;
    let cl = Cluster::start(3, &[]);
    let old = cl.leader(ELECTION).await;
    let mut c = cl.client().await;
    set_name(&mut c, "agreed").await.unwrap();
    cl.isolate(old).await;
    // The cut-off leader cannot commit: the write fails (it never waits forever).
    let mut minority = cl.client_of(&[old]).await;
    minority.deadline = Duration::from_secs(4);
    minority.attempt_timeout = Duration::from_secs(2);
    let r = set_name(&mut minority, "minority-write").await;
    assert!(
        r.is_err(),
        "a write on the minority side must not be acknowledged"
    );
    // Reads there fail too rather than serve possibly stale state.
    assert!(get_name(&mut minority).await.is_err());
    // The majority elects a new leader and goes on.
    let majority: Vec<u64> = cl.alive().into_iter().filter(|m| *m != old).collect();
    let new = cl.leader_among(&majority, ELECTION).await;
    assert_ne!(new, old);
    let mut maj = cl.client_of(&majority).await;
    set_name(&mut maj, "majority-write").await.unwrap();
    cl.heal().await;
    let st = cl.status(new).await.unwrap();
    cl.wait_applied(old, st.commit_index, ELECTION).await;
    let mut all = cl.client().await;
    assert_eq!(get_name(&mut all).await.unwrap(), "majority-write");
    let mut back = cl.client_of(&[old]).await;
    assert_eq!(
        get_name(&mut back).await.unwrap(),
        "majority-write",
        "the old leader's uncommitted write was discarded"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_down_for_10k_entries_catches_up_by_snapshot() {
    let _serial = SERIAL.lock().await;
    let mut cl = Cluster::start(
        3,
        &[
            "--snapshot-interval",
            "1000",
            "--snapshot-keep-entries",
            "200",
        ],
    );
    let leader = cl.leader(ELECTION).await;
    let lagging = if leader == 3 { 2 } else { 3 };
    let mut c = cl.client().await;
    set_name(&mut c, "start").await.unwrap();
    let at_kill = cl.status(leader).await.unwrap().commit_index;
    cl.kill(lagging);
    let alive = cl.alive();
    cl.leader_among(&alive, ELECTION).await;
    // 10,000 writes from 32 concurrent writers.
    let mut tasks = Vec::new();
    for w in 0..32 {
        let mut c = cl.client_of(&alive).await;
        c.find_leader().await;
        tasks.push(tokio::spawn(async move {
            for i in 0..(10_000 / 32 + 1) {
                set_name(&mut c, &format!("w{w}-{i}")).await.expect("write");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    set_name(&mut c, "final").await.unwrap();
    let leader = cl.leader_among(&alive, ELECTION).await;
    let lst = cl.status(leader).await.unwrap();
    assert!(lst.commit_index >= at_kill + 10_000);
    assert!(
        lst.first_log_index > at_kill + 1,
        "the leader compacted past what the lagging member has: {lst:?}"
    );
    cl.spawn(lagging);
    let st = cl
        .wait_applied(lagging, lst.commit_index, Duration::from_secs(60))
        .await;
    assert!(
        st.snapshots_installed >= 1,
        "caught up through a snapshot: {st:?}"
    );
    let mut only = cl.client_of(&[lagging]).await;
    assert_eq!(get_name(&mut only).await.unwrap(), "final");
}

async fn add_member(
    c: &mut pool_client::PoolClient,
    id: u64,
    address: &str,
    role: pb::MemberRole,
    replaces: u64,
) -> Result<(), tonic::Status> {
    let req = pb::AddMemberRequest {
        request_id: pool_client::new_request_id(),
        member_id: id,
        address: address.to_owned(),
        role: role as i32,
        replaces_member_id: replaces,
    };
    c.call(|mut p| {
        let req = req.clone();
        async move { p.add_member(req).await }
    })
    .await
    .map(|_| ())
}

async fn voters(cl: &Cluster, id: u64, want: &[u64]) {
    let deadline = std::time::Instant::now() + ELECTION;
    loop {
        let st = cl.status(id).await;
        if let Some(st) = &st {
            let mut v = st.voters.clone();
            v.sort_unstable();
            if v == want && st.voters_outgoing.is_empty() {
                return;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "voters never became {want:?}: {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn transfer_leadership(
    c: &mut pool_client::PoolClient,
    to: u64,
) -> pb::TransferLeadershipResponse {
    c.call(|mut p| async move {
        p.transfer_leadership(pb::TransferLeadershipRequest { member_id: to })
            .await
    })
    .await
    .unwrap_or_else(|e| panic!("leadership to member {to}: {e}"))
}

/// A member that stalled (here SIGSTOP; in life a slow disk) is silent, not dead: a change
/// that needs it waits for a heartbeat round instead of being refused on stale news.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_membership_change_waits_for_a_stalled_member_to_answer() {
    let _serial = SERIAL.lock().await;
    let mut cl = Cluster::start(3, &[]);
    let leader = cl.leader(ELECTION).await;
    let mut c = cl.client_of(&[leader]).await;
    join_host(&mut c, "10.3.0.1:7000").await.unwrap();
    let a4 = cl.spawn_joiner(4);
    add_member(&mut c, 4, &a4, pb::MemberRole::Learner, 0)
        .await
        .unwrap();
    let lst = cl.status(leader).await.unwrap();
    cl.wait_applied(4, lst.commit_index, ELECTION).await;
    // Voters {1,2,3,4} need three caught-up members answering; with a follower and the
    // learner frozen past the election timeout, the leader has heard from neither lately.
    let follower = (1..=3).find(|m| *m != leader).unwrap();
    cl.freeze(follower, true);
    cl.freeze(4, true);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let promote = {
        let mut c = c.clone();
        let a4 = a4.clone();
        tokio::spawn(async move { add_member(&mut c, 4, &a4, pb::MemberRole::Voter, 0).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    cl.freeze(follower, false);
    cl.freeze(4, false);
    promote
        .await
        .unwrap()
        .expect("the change goes through once both answer");
    voters(&cl, leader, &[1, 2, 3, 4]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_are_added_replaced_and_removed_through_the_api() {
    let _serial = SERIAL.lock().await;
    let mut cl = Cluster::start(3, &[]);
    cl.leader(ELECTION).await;
    let mut c = cl.client().await;
    // Member 1 leads, so replacing it below also moves leadership.
    assert_eq!(transfer_leadership(&mut c, 1).await.leader_id, 1);
    join_host(&mut c, "10.2.0.1:7000").await.unwrap();
    // Add member 4 as a learner, then promote it.
    let a4 = cl.spawn_joiner(4);
    add_member(&mut c, 4, &a4, pb::MemberRole::Learner, 0)
        .await
        .unwrap();
    let lst = cl.status(cl.leader(ELECTION).await).await.unwrap();
    let st4 = cl.wait_applied(4, lst.commit_index, ELECTION).await;
    assert_eq!(st4.learners, vec![4]);
    add_member(&mut c, 4, &a4, pb::MemberRole::Voter, 0)
        .await
        .unwrap();
    voters(&cl, 1, &[1, 2, 3, 4]).await;
    // Replace member 1 by member 5 in one joint-consensus change. Member 1 never talks to
    // member 5, so 5 is still empty when 1 goes.
    cl.peer(1)
        .set_faults(pb::SetFaultsRequest {
            isolate_from: vec![5],
        })
        .await
        .unwrap();
    let a5 = cl.spawn_joiner(5);
    add_member(&mut c, 5, &a5, pb::MemberRole::Voter, 1)
        .await
        .unwrap();
    voters(&cl, 2, &[2, 3, 4, 5]).await;
    // Once it answers (a loaded machine may still be starting it): still empty.
    assert_eq!(cl.wait_applied(5, 0, ELECTION).await.applied_index, 0);
    // Member 4 takes over: it joined late itself (its log starts at a snapshot, so it must
    // send 5 one), and 5 was started knowing only members 1-3, so it must answer a leader
    // whose address it learns from the leader's own messages.
    let moved = transfer_leadership(&mut c, 4).await;
    assert_eq!(moved.leader_id, 4);
    cl.kill(1);
    let mut c = cl.client().await;
    let hosts = list_hosts(&mut c).await;
    assert_eq!(hosts.len(), 1, "member 5 got the state");
    let lst = cl.status(4).await.unwrap();
    let st5 = cl.wait_applied(5, lst.commit_index, ELECTION).await;
    assert_eq!(st5.leader_id, 4);
    assert!(st5.snapshots_installed >= 1, "{st5:?}");
    let mut only5 = cl.client_of(&[5]).await;
    assert_eq!(list_hosts(&mut only5).await.len(), 1);
    // A transfer to a member that is not a voter is refused, and nothing moves.
    let err = c
        .call(|mut p| async move {
            p.transfer_leadership(pb::TransferLeadershipRequest { member_id: 9 })
                .await
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");
    assert!(err.message().contains("not a voter"), "{err}");
    assert_eq!(cl.status(4).await.unwrap().leader_id, 4);
    // Remove member 5 → voters 2,3,4.
    let req = pb::RemoveMemberRequest {
        request_id: pool_client::new_request_id(),
        member_id: 5,
    };
    c.call(|mut p| {
        let req = req.clone();
        async move { p.remove_member(req).await }
    })
    .await
    .unwrap();
    voters(&cl, 2, &[2, 3, 4]).await;
    cl.kill(5);
    // With member 4 down, removing 3 would leave {2, 4} with one live voter: refused.
    cl.kill(4);
    // Long enough for the leader to stop counting member 4 as recently heard from.
    tokio::time::sleep(Duration::from_secs(3)).await;
    cl.leader_among(&[2, 3], ELECTION).await;
    let mut c = cl.client_of(&[2, 3]).await;
    let req = pb::RemoveMemberRequest {
        request_id: pool_client::new_request_id(),
        member_id: 3,
    };
    let err = c
        .call(|mut p| {
            let req = req.clone();
            async move { p.remove_member(req).await }
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");
    assert!(err.message().contains("reachable"), "{err}");
    voters(&cl, 2, &[2, 3, 4]).await;
    join_host(&mut c, "10.2.0.2:7000")
        .await
        .expect("the pool still commits");
}
