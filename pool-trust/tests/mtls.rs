//! Real mutual TLS over loopback: a tonic server of `CoordinatorPeerService` configured by
//! `pool_trust::tls`, and clients with good, missing, foreign, expired and rolled-CA
//! certificates. The handler authorizes members only and answers with the member id it
//! read from the caller's certificate.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pool_trust::serve::ServerTls;
use pool_trust::tls::{ClientAuth, client_tls, require_role, server_tls};
use pool_trust::{
    AltName, CaBundle, Credentials, DaemonTls, Identity, PoolCa, PoolId, Role, Validity,
};
use proto::coordinator::coordinator_peer_service_client::CoordinatorPeerServiceClient;
use proto::coordinator::coordinator_peer_service_server::{
    CoordinatorPeerService, CoordinatorPeerServiceServer,
};
use proto::coordinator::{
    MemberStatus, MemberStatusRequest, ProposeRequest, ProposeResponse, RaftAck, RaftEnvelope,
    SetFaultsRequest, SetFaultsResponse,
};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint, Server};
use tonic::{Code, Request, Response, Status, Streaming};

const HOUR: Duration = Duration::from_secs(3600);

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn validity() -> Validity {
    Validity::starting(now_ms(), HOUR)
}

fn new_ca(pool: &PoolId) -> PoolCa {
    PoolCa::create(pool.clone(), Validity::starting(now_ms(), 24 * HOUR)).unwrap()
}

/// A member's credentials with the loopback address as a name, as a server needs.
fn member(ca: &PoolCa, n: u64) -> Credentials {
    let names = [AltName::parse("127.0.0.1").unwrap()];
    ca.issue(&Identity::Member(n), &names, validity()).unwrap()
}

/// Members only; answers with the caller's member id.
struct Peer {
    pool: PoolId,
}

#[tonic::async_trait]
impl CoordinatorPeerService for Peer {
    async fn send_messages(
        &self,
        _: Request<Streaming<RaftEnvelope>>,
    ) -> Result<Response<RaftAck>, Status> {
        Err(Status::unimplemented("test service"))
    }

    async fn propose(
        &self,
        _: Request<ProposeRequest>,
    ) -> Result<Response<ProposeResponse>, Status> {
        Err(Status::unimplemented("test service"))
    }

    async fn get_member_status(
        &self,
        request: Request<MemberStatusRequest>,
    ) -> Result<Response<MemberStatus>, Status> {
        let Identity::Member(id) = require_role(&request, &self.pool, &[Role::Member])? else {
            return Err(Status::internal("require_role let another role through"));
        };
        Ok(Response::new(MemberStatus {
            member_id: id,
            ..Default::default()
        }))
    }

    async fn set_faults(
        &self,
        _: Request<SetFaultsRequest>,
    ) -> Result<Response<SetFaultsResponse>, Status> {
        Err(Status::unimplemented("test service"))
    }
}

/// Serves the test service on 127.0.0.1:0 with `creds`, trusting `bundle`.
async fn serve(creds: &Credentials, bundle: &CaBundle, auth: ClientAuth) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let tls = server_tls(creds, bundle, auth).unwrap();
    let server = Server::builder()
        .tls_config(tls)
        .unwrap()
        .add_service(CoordinatorPeerServiceServer::new(Peer {
            pool: bundle.pool_id().clone(),
        }))
        .serve_with_incoming(TcpListenerStream::new(listener));
    tokio::spawn(server);
    addr
}

/// Calls `GetMemberStatus`: the member id the server saw, or why the call failed.
async fn call(addr: SocketAddr, tls: ClientTlsConfig) -> Result<u64, Status> {
    let endpoint = Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(5));
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| Status::unavailable(format!("connect: {e:?}")))?;
    CoordinatorPeerServiceClient::new(channel)
        .get_member_status(MemberStatusRequest {})
        .await
        .map(|r| r.into_inner().member_id)
}

/// Asserts a call was refused in the TLS handshake for `reason` (a rustls alert or
/// verifier error, as it appears in the error's debug text), not for something else.
#[track_caller]
fn assert_refused(result: Result<u64, Status>, reason: &str) {
    match result {
        Ok(id) => panic!("accepted as member {id}; expected a refusal for {reason}"),
        Err(status) => {
            let text = format!("{status:?}");
            assert!(
                text.contains(reason),
                "refused, but not for {reason}: {text}"
            );
        }
    }
}

#[tokio::test]
async fn a_member_certificate_is_accepted_and_named() {
    let pool = PoolId::generate();
    let ca = new_ca(&pool);
    let bundle = ca.bundle();
    let addr = serve(&member(&ca, 1), &bundle, ClientAuth::Required).await;
    let client = member(&ca, 3);

    // Checking the server by the address dialled...
    let seen = call(addr, client_tls(&bundle, Some(&client), None).unwrap()).await;
    assert_eq!(seen.unwrap(), 3);
    // ...or by the identity expected there.
    let tls = client_tls(&bundle, Some(&client), Some(&Identity::Member(1))).unwrap();
    assert_eq!(call(addr, tls).await.unwrap(), 3);
    // A server that is not the member expected is refused by the client.
    let tls = client_tls(&bundle, Some(&client), Some(&Identity::Member(9))).unwrap();
    assert_refused(call(addr, tls).await, "NotValidForName");
}

#[tokio::test]
async fn a_certificate_of_another_role_is_denied_by_the_handler() {
    let pool = PoolId::generate();
    let ca = new_ca(&pool);
    let bundle = ca.bundle();
    let addr = serve(&member(&ca, 1), &bundle, ClientAuth::Required).await;
    let host = ca
        .issue(&Identity::Host(uuid_like(7)), &[], validity())
        .unwrap();
    let err = call(addr, client_tls(&bundle, Some(&host), None).unwrap())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
}

#[tokio::test]
async fn no_client_certificate_is_refused() {
    let pool = PoolId::generate();
    let ca = new_ca(&pool);
    let bundle = ca.bundle();
    let addr = serve(&member(&ca, 1), &bundle, ClientAuth::Required).await;
    assert_refused(
        call(addr, client_tls(&bundle, None, None).unwrap()).await,
        "CertificateRequired",
    );
    // The server is fine: a member still gets through.
    let good = client_tls(&bundle, Some(&member(&ca, 2)), None).unwrap();
    assert_eq!(call(addr, good).await.unwrap(), 2);

    // Where client certificates are optional (poold's shared port), the handshake lets
    // the anonymous client in and the member-only handler refuses it.
    let addr = serve(&member(&ca, 1), &bundle, ClientAuth::Optional).await;
    let err = call(addr, client_tls(&bundle, None, None).unwrap())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    let good = client_tls(&bundle, Some(&member(&ca, 2)), None).unwrap();
    assert_eq!(call(addr, good).await.unwrap(), 2);
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused() {
    let pool = PoolId::generate();
    let ca = new_ca(&pool);
    let bundle = ca.bundle();
    for auth in [ClientAuth::Required, ClientAuth::Optional] {
        let addr = serve(&member(&ca, 1), &bundle, auth).await;
        // An impostor CA claiming the same pool id, and a CA of another pool.
        for other in [new_ca(&pool), new_ca(&PoolId::generate())] {
            let forged = member(&other, 2);
            // Even a client that trusts our CA for the server cannot present it.
            let mut tls = client_tls(&bundle, None, None).unwrap();
            tls = tls.identity(tonic::transport::Identity::from_pem(
                forged.cert_pem(),
                forged.key_pem(),
            ));
            assert_refused(call(addr, tls).await, "UnknownCA");
        }
        let good = client_tls(&bundle, Some(&member(&ca, 2)), None).unwrap();
        assert_eq!(call(addr, good).await.unwrap(), 2);
    }
    // And a client does not accept a server certified by another CA.
    let impostor_ca = new_ca(&pool);
    let impostor = serve(
        &member(&impostor_ca, 1),
        &impostor_ca.bundle(),
        ClientAuth::Required,
    )
    .await;
    let tls = client_tls(&bundle, Some(&member(&ca, 2)), None).unwrap();
    assert_refused(call(impostor, tls).await, "UnknownIssuer");
}

#[tokio::test]
async fn an_expired_certificate_is_refused() {
    let pool = PoolId::generate();
    let ca = new_ca(&pool);
    let bundle = ca.bundle();
    let addr = serve(&member(&ca, 1), &bundle, ClientAuth::Required).await;
    let now = now_ms();
    let expired = ca
        .issue(
            &Identity::Member(2),
            &[],
            Validity {
                not_before_ms: now - 2 * 3_600_000,
                not_after_ms: now - 3_600_000,
            },
        )
        .unwrap();
    assert!(expired.should_renew(now));
    let result = call(addr, client_tls(&bundle, Some(&expired), None).unwrap()).await;
    assert_refused(result, "CertificateExpired");
    // Not yet valid either.
    let early = ca
        .issue(
            &Identity::Member(2),
            &[],
            Validity {
                not_before_ms: now + 3_600_000,
                not_after_ms: now + 2 * 3_600_000,
            },
        )
        .unwrap();
    assert_refused(
        call(addr, client_tls(&bundle, Some(&early), None).unwrap()).await,
        // rustls answers a not-yet-valid certificate with this alert too.
        "CertificateExpired",
    );
    let good = client_tls(&bundle, Some(&member(&ca, 2)), None).unwrap();
    assert_eq!(call(addr, good).await.unwrap(), 2);
}

#[tokio::test]
async fn during_a_ca_roll_both_cas_are_trusted() {
    let pool = PoolId::generate();
    let old = new_ca(&pool);
    let new = old.roll(Validity::starting(now_ms(), 24 * HOUR)).unwrap();
    let rolling = old.bundle().with(new.cert().clone()).unwrap();

    // A server still on the old CA's certificate, and one already renewed onto the new.
    for server_ca in [&old, &new] {
        let addr = serve(&member(server_ca, 1), &rolling, ClientAuth::Required).await;
        for (client_ca, id) in [(&old, 2), (&new, 3)] {
            let tls = client_tls(&rolling, Some(&member(client_ca, id)), None).unwrap();
            assert_eq!(call(addr, tls).await.unwrap(), id);
        }
    }

    // After the roll the old CA's certificates are refused.
    let done = rolling.without(&old.cert().fingerprint()).unwrap();
    let addr = serve(&member(&new, 1), &done, ClientAuth::Required).await;
    let stale = client_tls(&rolling, Some(&member(&old, 2)), None).unwrap();
    assert_refused(call(addr, stale).await, "UnknownCA");
    let fresh = client_tls(&done, Some(&member(&new, 3)), None).unwrap();
    assert_eq!(call(addr, fresh).await.unwrap(), 3);
}

fn uuid_like(n: u8) -> String {
    format!("00000000-0000-4000-8000-0000000000{n:02x}")
}

/// Serves the test service through a reloadable listener ([`ServerTls`]) with `tls`.
async fn serve_reloadable(tls: &DaemonTls, auth: ClientAuth) -> (SocketAddr, ServerTls) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server_tls = ServerTls::new(tls, auth).unwrap();
    let server = Server::builder()
        .add_service(CoordinatorPeerServiceServer::new(Peer {
            pool: tls.pool_id().clone(),
        }))
        .serve_with_incoming(server_tls.incoming(listener));
    tokio::spawn(server);
    (addr, server_tls)
}

/// A connected client, to call again later on the same connection.
async fn connect(addr: SocketAddr, tls: ClientTlsConfig) -> CoordinatorPeerServiceClient<Channel> {
    let channel = Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    CoordinatorPeerServiceClient::new(channel)
}

#[tokio::test]
async fn a_reloaded_listener_serves_the_renewed_certificate_and_the_new_ca_to_new_connections() {
    let pool = PoolId::generate();
    let ca = new_ca(&pool);
    let first = DaemonTls {
        bundle: ca.bundle(),
        creds: member(&ca, 1),
    };
    let (addr, server) = serve_reloadable(&first, ClientAuth::Required).await;
    let client = member(&ca, 3);
    let mut old = connect(addr, client_tls(&ca.bundle(), Some(&client), None).unwrap()).await;
    let status = old.get_member_status(MemberStatusRequest {}).await.unwrap();
    assert_eq!(
        status.into_inner().member_id,
        3,
        "the caller's identity reaches the handler"
    );

    // A roll: the new CA joins the bundle and member 1 gets a certificate of it.
    let rolled = ca.roll(Validity::starting(now_ms(), 24 * HOUR)).unwrap();
    let both = ca.bundle().with(rolled.cert().clone()).unwrap();
    let renewed = DaemonTls {
        bundle: both.clone(),
        creds: member(&rolled, 1),
    };
    // A client trusting only the new CA is refused by the old server certificate...
    let new_only = member(&rolled, 4);
    assert_refused(
        call(
            addr,
            client_tls(&rolled.bundle(), Some(&new_only), None).unwrap(),
        )
        .await,
        "UnknownIssuer",
    );
    server.reload(&renewed).unwrap();
    // ...and accepted once the server has reloaded (its certificate and its trust).
    let tls = client_tls(&rolled.bundle(), Some(&new_only), None).unwrap();
    assert_eq!(call(addr, tls).await.unwrap(), 4);
    // Clients of the old CA still get in during the roll, and the connection made
    // before the reload goes on.
    let tls = client_tls(&both, Some(&member(&ca, 5)), None).unwrap();
    assert_eq!(call(addr, tls).await.unwrap(), 5);
    let status = old.get_member_status(MemberStatusRequest {}).await.unwrap();
    assert_eq!(status.into_inner().member_id, 3);

    // Something that cannot be served (credentials of another pool) changes nothing.
    let stranger = new_ca(&PoolId::generate());
    let bad = DaemonTls {
        bundle: both.clone(),
        creds: member(&stranger, 1),
    };
    assert!(server.reload(&bad).is_err());
    assert_eq!(call(addr, tls_of(&rolled, 6)).await.unwrap(), 6);
}

fn tls_of(ca: &PoolCa, n: u64) -> ClientTlsConfig {
    client_tls(&ca.bundle(), Some(&member(ca, n)), None).unwrap()
}

#[tokio::test]
async fn a_stalled_handshake_does_not_hold_up_others_on_a_reloadable_listener() {
    let pool = PoolId::generate();
    let ca = new_ca(&pool);
    let tls = DaemonTls {
        bundle: ca.bundle(),
        creds: member(&ca, 1),
    };
    let (addr, _server) = serve_reloadable(&tls, ClientAuth::Optional).await;
    // Connected, never says a word.
    let _silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    let started = std::time::Instant::now();
    assert_eq!(call(addr, tls_of(&ca, 2)).await.unwrap(), 2);
    assert!(started.elapsed() < Duration::from_secs(5));
    // Optional client certificates: an anonymous caller reaches the handler, which refuses.
    let err = call(addr, client_tls(&ca.bundle(), None, None).unwrap())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
}
