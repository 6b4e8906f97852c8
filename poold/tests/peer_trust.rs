//! The members' trust boundary on a running 3-member pool: the peer service answers only
//! callers with a member certificate of the pool's CA, a member speaks in Raft only as
//! itself, and nothing is served in clear. Each refused call leaves the pool as it was.

mod common;

use std::time::Duration;

use common::*;
use pool_trust::{Identity, LocalCa, PoolId};
use poold::state::command::{Command, JoinHost, Op};
use prost::Message as _;
use proto::coordinator as pb;
use proto::coordinator::coordinator_peer_service_client::CoordinatorPeerServiceClient;
use proto::coordinator::pool_service_client::PoolServiceClient;
use protobuf::Message as _;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

const ELECTION: Duration = Duration::from_secs(15);

/// A write that would add a host named "intruder" if a member took it.
fn forged_join(pool: &str) -> pb::ProposeRequest {
    let cmd = Command {
        request_id: pool_client::new_request_id(),
        at_ms: proto::unix_ms(),
        task_id: pool_client::random_uuid().to_string(),
        op: Some(Op::JoinHost(JoinHost {
            host_id: pool_client::random_uuid().to_string(),
            name: "intruder".into(),
            address: "10.9.0.1:7000".into(),
        })),
        ..Default::default()
    };
    pb::ProposeRequest {
        pool_id: pool.into(),
        command: cmd.encode_to_vec(),
        from_member_id: 2,
    }
}

async fn members(cl: &Cluster) -> Vec<(u64, String)> {
    let mut c = cl.client().await;
    c.call(|mut p| async move { p.list_members(pb::ListMembersRequest {}).await })
        .await
        .expect("list members")
        .members
        .into_iter()
        .map(|m| (m.id, m.address))
        .collect()
}

async fn host_names(cl: &Cluster) -> Vec<String> {
    list_hosts(&mut cl.client().await)
        .await
        .into_iter()
        .map(|h| h.name)
        .collect()
}

fn peer_with(ch: Channel) -> CoordinatorPeerServiceClient<Channel> {
    CoordinatorPeerServiceClient::new(ch)
}

/// A bounded call: a refused handshake must end in an error, not hang.
async fn within<T>(
    f: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, tonic::Status> {
    tokio::time::timeout(Duration::from_secs(10), f)
        .await
        .expect("the call ends")
        .map(|r| r.into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_peer_service_answers_members_of_this_pool_only() {
    let _serial = SERIAL.lock().await;
    let cl = Cluster::start(3, &[]);
    let leader = cl.leader(ELECTION).await;
    let bundle = cl.pki().ca().bundle();
    let before = members(&cl).await;
    assert_eq!(before.len(), 3);
    let target = Identity::Member(leader);

    // No client certificate: the handshake passes (people call PoolService on this port),
    // the peer service refuses.
    let cfg = pool_trust::tls::client_tls(&bundle, None, Some(&target)).unwrap();
    let mut anon = peer_with(cl.channel(leader, cfg));
    let e = within(anon.get_member_status(pb::MemberStatusRequest {}))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e}");
    let e = within(anon.propose(forged_join(TEST_POOL_ID)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e}");
    let e = within(anon.set_faults(pb::SetFaultsRequest {
        isolate_from: vec![1, 2, 3],
    }))
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e}");

    // A host certificate of the same CA: a known caller, but not a member.
    let host = cl.issue(&Identity::Host("h1".into()), "host-h1");
    let mut as_host = peer_with(cl.channel(leader, host.client(&target).unwrap()));
    let e = within(as_host.get_member_status(pb::MemberStatusRequest {}))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    let e = within(as_host.propose(forged_join(TEST_POOL_ID)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");

    // A member certificate from another CA of the same pool name: the handshake fails.
    let other = tempfile::tempdir().unwrap();
    let pool = PoolId::parse(TEST_POOL_ID).unwrap();
    let foreign = LocalCa::open_or_create(other.path(), &pool)
        .unwrap()
        .issue(
            &Identity::Member(2),
            &["127.0.0.1"],
            &other.path().join("m2"),
        )
        .unwrap();
    let cfg = pool_trust::tls::client_tls(&bundle, Some(&foreign.creds), Some(&target)).unwrap();
    let mut stranger = peer_with(cl.channel(leader, cfg));
    for e in [
        within(stranger.get_member_status(pb::MemberStatusRequest {}))
            .await
            .unwrap_err(),
        within(stranger.propose(forged_join(TEST_POOL_ID)))
            .await
            .unwrap_err(),
    ] {
        // The server's alert reaches a TLS 1.3 client after its handshake: the
        // connection closes under the call (Cancelled) or before it (Unavailable).
        assert!(
            matches!(
                e.code(),
                Code::Unavailable | Code::Unknown | Code::Cancelled
            ),
            "a foreign certificate fails the handshake: {e}"
        );
    }

    // Nothing in clear: neither the pool's API nor the peer service.
    let clear = Endpoint::from_shared(format!("http://{}", cl.addr(leader)))
        .unwrap()
        .connect_timeout(Duration::from_millis(500))
        .connect_lazy();
    let e = within(PoolServiceClient::new(clear.clone()).list_members(pb::ListMembersRequest {}))
        .await
        .unwrap_err();
    assert_ne!(e.code(), Code::Ok, "{e}");
    within(peer_with(clear).get_member_status(pb::MemberStatusRequest {}))
        .await
        .unwrap_err();

    // The pool is as it was: same members, same leader, no host, and it still commits.
    assert_eq!(members(&cl).await, before);
    assert_eq!(cl.leader(ELECTION).await, leader);
    assert!(host_names(&cl).await.is_empty());
    join_named_host(&mut cl.client().await, "h1", "10.9.0.2:7000")
        .await
        .expect("the pool still commits");
    assert_eq!(host_names(&cl).await, vec!["h1".to_owned()]);

    // The control: the same forged write from a member's own certificate goes through,
    // so the refusals above are what kept it out.
    let member2 = pool_trust::DaemonTls::load(&cl.member_tls_dir(2)).unwrap();
    let mut as_member = peer_with(cl.channel(leader, member2.client(&target).unwrap()));
    within(as_member.propose(forged_join(TEST_POOL_ID)))
        .await
        .expect("a member may propose");
    let mut names = host_names(&cl).await;
    names.sort();
    assert_eq!(names, vec!["h1".to_owned(), "intruder".to_owned()]);
}

/// One envelope from `from` (as the envelope says) carrying a heartbeat from `msg_from`
/// to `to` at `term`.
fn envelope(from: u64, msg_from: u64, to: u64, term: u64) -> pb::RaftEnvelope {
    let mut m = raft::eraftpb::Message::default();
    m.set_msg_type(raft::eraftpb::MessageType::MsgHeartbeat);
    m.from = msg_from;
    m.to = to;
    m.term = term;
    pb::RaftEnvelope {
        pool_id: TEST_POOL_ID.into(),
        from_member_id: from,
        message: m.write_to_bytes().unwrap(),
        from_address: String::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_sends_raft_messages_only_as_itself() {
    let _serial = SERIAL.lock().await;
    let cl = Cluster::start(3, &[]);
    let leader = cl.leader(ELECTION).await;
    // Member 2 writes to member 1 pretending to be member 3, with a term far ahead: taken,
    // it would depose the leader and make member 3 look like one.
    let target = 1;
    let term = cl.status(target).await.unwrap().term;
    let forged_term = term + 100;
    let member2 = pool_trust::DaemonTls::load(&cl.member_tls_dir(2)).unwrap();
    let cfg = member2.client(&Identity::Member(target)).unwrap();
    for (from, msg_from) in [(3, 3), (2, 3), (3, 2)] {
        let mut p = peer_with(cl.channel(target, cfg.clone()));
        let e = within(
            p.send_messages(tonic::codegen::tokio_stream::iter(vec![envelope(
                from,
                msg_from,
                target,
                forged_term,
            )])),
        )
        .await
        .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{from}/{msg_from}: {e}");
        assert!(e.message().contains("sent a message as member"), "{e}");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for id in 1..=3 {
        let s = cl.status(id).await.unwrap();
        assert!(
            s.term < forged_term,
            "member {id} took the forged term: {s:?}"
        );
    }
    assert_eq!(cl.leader(ELECTION).await, leader);
}
