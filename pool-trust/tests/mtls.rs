//! Real mutual TLS over loopback: a tonic server of `CoordinatorPeerService` configured by
//! `pool_trust::tls` (or the reloadable `ServerTls`), and clients with good, missing,
//! foreign, expired and rolled-CA certificates, including a roll's cross certificate (a
//! new CA's leaf reaching daemons that trust the old CA only, and not without it). The handler authorizes members only and answers with the member id it
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

/// A CA roll from `a` to a new CA of its pool: the new CA and the cross certificate.
fn roll(a: &PoolCa) -> (PoolCa, pool_trust::CaCert) {
    let b = a.roll(Validity::starting(now_ms(), 48 * HOUR)).unwrap();
    let x = a.cross_sign(&b).unwrap();
    (b, x)
}

/// A member of `ca` presenting `intermediates` after its certificate.
fn chained(ca: &PoolCa, n: u64, intermediates: &[pool_trust::CaCert]) -> Credentials {
    member(ca, n).with_intermediates(intermediates).unwrap()
}

/// Serves `creds` trusting `bundle` through the reloadable listener, client
/// certificates required.
async fn daemon(creds: Credentials, bundle: &CaBundle) -> SocketAddr {
    let tls = DaemonTls {
        bundle: bundle.clone(),
        creds,
    };
    serve_reloadable(&tls, ClientAuth::Required).await.0
}

#[tokio::test]
async fn mid_roll_a_new_ca_leaf_with_the_cross_certificate_meets_daemons_trusting_the_old_ca_only()
{
    let pool = PoolId::generate();
    let a = new_ca(&pool);
    let (b, x) = roll(&a);
    let rolling = a.bundle().with(b.cert().clone()).unwrap();
    let renewed = |n| chained(&b, n, std::slice::from_ref(&x));

    // A daemon not yet renewed (A's certificate, bundle {A}) accepts a renewed client
    // (B's certificate and X, bundle {A, B}), by leaf -> X -> A...
    let old_server = daemon(member(&a, 1), &a.bundle()).await;
    let tls = client_tls(&rolling, Some(&renewed(2)), None).unwrap();
    assert_eq!(call(old_server, tls).await.unwrap(), 2);
    // ...also through tonic's own TLS configuration.
    let old_tonic = serve(&member(&a, 1), &a.bundle(), ClientAuth::Required).await;
    let tls = client_tls(&rolling, Some(&renewed(2)), None).unwrap();
    assert_eq!(call(old_tonic, tls).await.unwrap(), 2);

    // A renewed daemon (B + X, bundle {A, B}) is accepted by a client trusting A only,
    // and accepts that client's A certificate by its bundle.
    let new_server = daemon(renewed(1), &rolling).await;
    let tls = client_tls(&a.bundle(), Some(&member(&a, 3)), None).unwrap();
    assert_eq!(call(new_server, tls).await.unwrap(), 3);
    let tls = client_tls(
        &a.bundle(),
        Some(&member(&a, 3)),
        Some(&Identity::Member(1)),
    )
    .unwrap();
    assert_eq!(call(new_server, tls).await.unwrap(), 3);
    // And renewed daemons talk to each other.
    let tls = client_tls(&rolling, Some(&renewed(4)), None).unwrap();
    assert_eq!(call(new_server, tls).await.unwrap(), 4);
}

#[tokio::test]
async fn after_the_roll_new_ca_daemons_talk_with_or_without_the_cross_certificate() {
    let pool = PoolId::generate();
    let a = new_ca(&pool);
    let (b, x) = roll(&a);
    let done = b.bundle();
    let with_x = |n| chained(&b, n, std::slice::from_ref(&x));
    for server in [member(&b, 1), with_x(1)] {
        let addr = daemon(server, &done).await;
        for (client, n) in [(member(&b, 2), 2), (with_x(3), 3)] {
            let tls = client_tls(&done, Some(&client), Some(&Identity::Member(1))).unwrap();
            assert_eq!(call(addr, tls).await.unwrap(), n);
        }
        // The old CA is no longer trusted: its certificates are refused.
        let tls = client_tls(&done, Some(&member(&a, 5)), None).unwrap();
        assert_refused(call(addr, tls).await, "UnknownCA");
    }
}

#[tokio::test]
async fn without_the_cross_certificate_a_new_ca_leaf_is_refused_by_old_ca_daemons() {
    let pool = PoolId::generate();
    let a = new_ca(&pool);
    let (b, _x) = roll(&a);
    let rolling = a.bundle().with(b.cert().clone()).unwrap();
    // A client of B without X: an A-only server does not know B.
    let old_server = daemon(member(&a, 1), &a.bundle()).await;
    let tls = client_tls(&rolling, Some(&member(&b, 2)), None).unwrap();
    assert_refused(call(old_server, tls).await, "UnknownCA");
    // A server of B without X: an A-only client does not know B.
    let new_server = daemon(member(&b, 1), &rolling).await;
    let tls = client_tls(&a.bundle(), Some(&member(&a, 3)), None).unwrap();
    assert_refused(call(new_server, tls).await, "UnknownIssuer");
    // The same old server still takes its own CA's members.
    assert_eq!(call(old_server, tls_of(&a, 4)).await.unwrap(), 4);
}

#[tokio::test]
async fn a_cross_certificate_from_another_ca_does_not_carry_the_roll() {
    let pool = PoolId::generate();
    let a = new_ca(&pool);
    let (b, _x) = roll(&a);
    // B's name and key signed by a CA claiming the same pool, that A-only peers never
    // trusted.
    let impostor = new_ca(&pool);
    let forged = impostor.cross_sign(&b).unwrap();
    let rolling = a.bundle().with(b.cert().clone()).unwrap();
    let old_server = daemon(member(&a, 1), &a.bundle()).await;
    let client = chained(&b, 2, std::slice::from_ref(&forged));
    let tls = client_tls(&rolling, Some(&client), None).unwrap();
    assert_refused(call(old_server, tls).await, "UnknownCA");
    // Nor does a server presenting it convince an A-only client.
    let new_server = daemon(chained(&b, 1, std::slice::from_ref(&forged)), &rolling).await;
    let tls = client_tls(&a.bundle(), Some(&member(&a, 3)), None).unwrap();
    assert_refused(call(new_server, tls).await, "UnknownIssuer");
}

/// Opens a raw TLS stream (`serve::client_config`, as the migration stream's clients do)
/// to the gRPC listener at `addr`, sends the HTTP/2 preface and reads the server's first
/// bytes: true if the server took the client's certificate.
async fn raw_accepted(addr: SocketAddr, bundle: &CaBundle, creds: &Credentials) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let config = pool_trust::serve::client_config(bundle, Some(creds)).unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let Ok(mut tls) = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(name, tcp)
        .await
    else {
        return false;
    };
    if tls
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .is_err()
    {
        return false;
    }
    let mut first = [0u8; 9];
    matches!(
        tokio::time::timeout(Duration::from_secs(5), tls.read(&mut first)).await,
        Ok(Ok(n)) if n > 0
    )
}

#[tokio::test]
async fn a_raw_stream_client_presents_its_cross_certificate_too() {
    let pool = PoolId::generate();
    let a = new_ca(&pool);
    let (b, x) = roll(&a);
    let rolling = a.bundle().with(b.cert().clone()).unwrap();
    let old_server = daemon(member(&a, 1), &a.bundle()).await;
    let renewed = chained(&b, 2, std::slice::from_ref(&x));
    assert!(raw_accepted(old_server, &rolling, &renewed).await);
    assert!(!raw_accepted(old_server, &rolling, &member(&b, 3)).await);
}
