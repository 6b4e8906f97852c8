//! The pool's trust boundary, tried as an intruder on its network would: each attempt is
//! refused (by the TLS handshake, or with the right gRPC code), and the pool's state is
//! the same afterwards. The pool is a real one (three members, storaged, two hosts), every
//! link mutual TLS under its own CA.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;

use e2e_tests::PoolArg;
use e2e_tests::pool::{Pool, field, guest_elf};
use hostd::migration::wire::{self, Frame, Hello};
use pool_trust::{Identity, PoolCa, PoolId, Validity};
use proto::coordinator as pb;
use proto::coordinator::coordinator_peer_service_client::CoordinatorPeerServiceClient;
use proto::coordinator::host_agent_service_client::HostAgentServiceClient;
use proto::coordinator::pool_service_client::PoolServiceClient;
use proto::host::host_service_client::HostServiceClient;
use proto::storage::storage_service_client::StorageServiceClient;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Whom an intruder speaks as.
enum As {
    /// No client certificate.
    Nobody,
    /// A certificate of the pool's own CA.
    Pool(Identity),
    /// A certificate of another CA, of a pool with the same id.
    OtherCa(Identity),
    /// A certificate of the pool's CA whose validity ended an hour ago.
    Expired(Identity),
}

/// Which daemon a channel is for: the name its certificate must carry.
enum To {
    /// Any coordinator member.
    Member,
    /// A host or the storage box, by the IP it is dialled at.
    Daemon,
}

/// A channel to `addr` over TLS, trusting the pool's CA, presenting what `who` has.
async fn channel(pool: &PoolArg, addr: &str, to: To, who: &As) -> Result<Channel, String> {
    let bundle = pool.ca().ca().bundle();
    let creds = credentials(pool, who);
    let tls = pool_trust::tls::client_tls(&bundle, creds.as_ref(), None)
        .map_err(|e| e.to_string())?
        .domain_name(match to {
            To::Member => pool_trust::coordinators_name(bundle.pool_id()),
            To::Daemon => addr.split(':').next().unwrap_or_default().to_owned(),
        });
    Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| proto::error_chain(&e))
}

/// The credentials `who` presents, made for the attempt.
fn credentials(pool: &PoolArg, who: &As) -> Option<pool_trust::Credentials> {
    let ca = pool.ca();
    let validity = |start: u64| Validity::starting(start, Duration::from_secs(3600));
    match who {
        As::Nobody => None,
        As::Pool(id) => Some(ca.ca().issue(id, &[], validity(now_ms())).unwrap()),
        As::OtherCa(id) => {
            let other =
                PoolCa::create(PoolId::parse(&pool.pool_id).unwrap(), validity(now_ms())).unwrap();
            Some(other.issue(id, &[], validity(now_ms())).unwrap())
        }
        As::Expired(id) => {
            let two_hours_ago = now_ms() - 2 * 3600 * 1000;
            Some(ca.ca().issue(id, &[], validity(two_hours_ago)).unwrap())
        }
    }
}

/// Connects to a prepared migration destination on host `host` at `addr` as `who` and
/// sends a Hello with `token`: "tls (..)" when the handshake fails or the stream is
/// dropped unanswered, "destination refused: <reason>" when it answers Refuse, "ok"
/// when it accepts.
fn migration_stream(pool: &PoolArg, host: &str, addr: &str, who: &As, token: &str) -> String {
    use rustls::pki_types::ServerName;

    let bundle = pool.ca().ca().bundle();
    let config =
        pool_trust::serve::client_config(&bundle, credentials(pool, who).as_ref()).unwrap();
    let name =
        ServerName::try_from(Identity::Host(host.into()).dns_name(bundle.pool_id())).unwrap();
    let tls = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let attempt = || -> std::io::Result<Frame> {
        let sock = TcpStream::connect(addr)?;
        sock.set_read_timeout(Some(Duration::from_secs(15)))?;
        let mut s = rustls::StreamOwned::new(tls, sock);
        let mut out = Vec::new();
        wire::encode(
            &Frame::Hello(Hello {
                version: wire::VERSION,
                token: token.into(),
                vm_id: "bait".into(),
                memory_bytes: 64 << 20,
                vcpus: 1,
                cpuid: vec![],
            }),
            &mut out,
        );
        s.write_all(&out)?;
        s.flush()?;
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            if let Some((frame, _)) = wire::decode(&buf).map_err(std::io::Error::other)? {
                return Ok(frame);
            }
            match s.read(&mut chunk)? {
                0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                n => buf.extend_from_slice(&chunk[..n]),
            }
        }
    };
    match attempt() {
        Err(e) => format!("tls ({e})"),
        Ok(Frame::Refuse { reason }) => format!("destination refused: {reason}"),
        Ok(other) => format!("ok ({other:?})"),
    }
}

/// An attempt's outcome: the gRPC code it was refused with, or "tls" when the connection
/// itself was refused, or "ok".
fn outcome<T>(r: Result<Result<T, tonic::Status>, String>) -> String {
    match r {
        Err(e) => format!("tls ({e})"),
        // A server refusing the client's certificate closes the connection after the
        // handshake; the client sees the call fail in transport, never a handler's code.
        Ok(Err(s))
            if matches!(
                s.code(),
                Code::Unavailable | Code::Unknown | Code::Cancelled | Code::Internal
            ) =>
        {
            format!("tls ({:?}: {})", s.code(), s.message())
        }
        Ok(Err(s)) => format!("{:?}", s.code()),
        Ok(Ok(_)) => "ok".into(),
    }
}

struct Tally {
    attempts: u32,
    refused: u32,
    log: Vec<String>,
}

impl Tally {
    /// Records an attempt that must be refused with `want` ("tls" matches any refusal
    /// of the connection).
    fn refused(&mut self, what: &str, got: String, want: &str) {
        self.attempts += 1;
        let ok = if want == "tls" || want.starts_with("destination refused") {
            got.starts_with(want)
        } else {
            got == want
        };
        if ok {
            self.refused += 1;
        }
        self.log.push(format!(
            "{} {what}: {got} (want {want})",
            if ok { "refused" } else { "NOT REFUSED" }
        ));
    }
}

#[test]
fn an_intruder_is_refused_everywhere_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let pool = Pool::start(dir.path(), 2);
    let hosts_before = pool.wait_hosts_enabled();
    // Reachability is each member's view of its peers, soft state that settles after
    // start: the comparison at the end is of a settled list.
    let members_before = e2e_tests::wait_for(Duration::from_secs(30), || {
        let m = pool.ctl(&["member-list", "--json"]);
        (!m.contains("\"reachable\": false")).then_some(m)
    })
    .expect("every member reachable within 30 s");
    let p = pool.p.clone();
    let h1 = hosts_before
        .lines()
        .find(|l| l.contains("\"name\": \"h1\""))
        .map(|l| field(l, "id"))
        .expect("h1 listed");
    let member = pool.coordinators.addrs[0].clone();
    let h1_addr = pool.hosts[0].addr.clone();
    let storage = pool.storaged.addr.clone();

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut t = Tally {
        attempts: 0,
        refused: 0,
        log: Vec::new(),
    };
    rt.block_on(async {
        // PoolService in clear: a member speaks only TLS.
        let clear = async {
            let ch = Endpoint::from_shared(format!("http://{member}"))
                .unwrap()
                .connect()
                .await
                .map_err(|e| e.to_string())?;
            Ok(PoolServiceClient::new(ch)
                .list_hosts(pb::ListHostsRequest::default())
                .await)
        };
        t.refused("PoolService in clear", outcome(clear.await), "tls");

        // The members' own service: Raft messages and proposals.
        let peer = |who: As| {
            let p = p.clone();
            let member = member.clone();
            async move {
                let ch = channel(&p, &member, To::Member, &who).await?;
                let mut c = CoordinatorPeerServiceClient::new(ch);
                Ok(c.propose(pb::ProposeRequest {
                    pool_id: p.pool_id.clone(),
                    command: vec![1, 2, 3],
                    from_member_id: 2,
                })
                .await)
            }
        };
        t.refused(
            "Propose without a certificate",
            outcome(peer(As::Nobody).await),
            "Unauthenticated",
        );
        t.refused(
            "Propose as a host",
            outcome(peer(As::Pool(Identity::Host("h1".into()))).await),
            "PermissionDenied",
        );
        t.refused(
            "Propose as a client",
            outcome(peer(As::Pool(Identity::Client("mallory".into()))).await),
            "PermissionDenied",
        );
        t.refused(
            "Propose as a member of another CA",
            outcome(peer(As::OtherCa(Identity::Member(2))).await),
            "tls",
        );
        t.refused(
            "Propose with an expired member certificate",
            outcome(peer(As::Expired(Identity::Member(2))).await),
            "tls",
        );

        // Heartbeats: host h2 reporting as h1 (to take over its initiator name).
        let forged = async {
            let ch = channel(
                &p,
                &member,
                To::Member,
                &As::Pool(Identity::Host("h2".into())),
            )
            .await?;
            Ok(HostAgentServiceClient::new(ch)
                .heartbeat(pb::HeartbeatRequest {
                    host_id: h1.clone(),
                    info: Some(proto::host::HostInfo {
                        host_id: h1.clone(),
                        initiator_iqn: "iqn.2026-12.evil:forged".into(),
                        ..Default::default()
                    }),
                    sequence: 1,
                    ..Default::default()
                })
                .await)
        };
        t.refused(
            "h2 heartbeating as h1",
            outcome(forged.await),
            "PermissionDenied",
        );
        let storage_heartbeat = async {
            let ch = channel(
                &p,
                &member,
                To::Member,
                &As::Pool(Identity::Storage("storaged".into())),
            )
            .await?;
            Ok(HostAgentServiceClient::new(ch)
                .heartbeat(pb::HeartbeatRequest {
                    host_id: h1.clone(),
                    ..Default::default()
                })
                .await)
        };
        t.refused(
            "a storage certificate heartbeating",
            outcome(storage_heartbeat.await),
            "PermissionDenied",
        );

        // A join token spends once: the daemon it was made for joins, a replay of it and
        // a token made up are refused.
        let file = dir.path().join("h9.join");
        pool.ctl(&["host-join", "h9", "--out", file.to_str().unwrap()]);
        let text = std::fs::read_to_string(&file).unwrap();
        let token = text
            .lines()
            .find_map(|l| l.strip_prefix("token = \""))
            .and_then(|l| l.strip_suffix('"'))
            .expect("a token in the join file")
            .to_owned();
        let join = |token: String| {
            let p = p.clone();
            let member = member.clone();
            async move {
                let ch = channel(&p, &member, To::Member, &As::Nobody).await?;
                let pool_id = PoolId::parse(&p.pool_id).unwrap();
                let csr = pool_trust::LeafKey::generate()
                    .unwrap()
                    .csr_pem(&pool_id, &Identity::Host("h9".into()), &[])
                    .unwrap();
                Ok(PoolServiceClient::new(ch)
                    .join(pb::JoinRequest {
                        token,
                        csr_pem: csr,
                    })
                    .await)
            }
        };
        assert_eq!(
            outcome(join(token.clone()).await),
            "ok",
            "the first use joins"
        );
        t.refused(
            "a join token used a second time",
            outcome(join(token.clone()).await),
            "FailedPrecondition",
        );
        let forged = format!("{}{}", &token[..token.len() - 4], "beef");
        t.refused(
            "a join token with a guessed secret",
            outcome(join(forged).await),
            "PermissionDenied",
        );

        // Certificate renewal: only for the caller's own identity, one the pool knows.
        let renew = |who: As, for_whom: Identity| {
            let p = p.clone();
            let member = member.clone();
            async move {
                let ch = channel(&p, &member, To::Member, &who).await?;
                let pool_id = PoolId::parse(&p.pool_id).unwrap();
                let csr = pool_trust::LeafKey::generate()
                    .unwrap()
                    .csr_pem(&pool_id, &for_whom, &[])
                    .unwrap();
                Ok(PoolServiceClient::new(ch)
                    .renew_certificate(pb::RenewCertificateRequest { csr_pem: csr })
                    .await)
            }
        };
        t.refused(
            "RenewCertificate without a certificate",
            outcome(renew(As::Nobody, Identity::Host("h1".into())).await),
            "Unauthenticated",
        );
        t.refused(
            "h2 renewing a certificate for h1",
            outcome(
                renew(
                    As::Pool(Identity::Host("h2".into())),
                    Identity::Host("h1".into()),
                )
                .await,
            ),
            "PermissionDenied",
        );
        t.refused(
            "a host the pool does not know renewing its certificate",
            outcome(
                renew(
                    As::Pool(Identity::Host("mallory".into())),
                    Identity::Host("mallory".into()),
                )
                .await,
            ),
            "PermissionDenied",
        );

        // A host's control API: the coordinator members only.
        let host = |who: As| {
            let p = p.clone();
            let addr = h1_addr.clone();
            async move {
                let ch = channel(&p, &addr, To::Daemon, &who).await?;
                Ok(HostServiceClient::new(ch)
                    .list_vms(proto::host::ListVmsRequest::default())
                    .await)
            }
        };
        t.refused(
            "HostService without a certificate",
            outcome(host(As::Nobody).await),
            "tls",
        );
        t.refused(
            "HostService as another host",
            outcome(host(As::Pool(Identity::Host("h2".into()))).await),
            "PermissionDenied",
        );
        t.refused(
            "HostService as a member of another CA",
            outcome(host(As::OtherCa(Identity::Member(1))).await),
            "tls",
        );

        // Rolling the CA is a pool-admin's call: a daemon's certificate is not a user, and
        // what the pool trusts is not told to strangers.
        let rotate = |who: As| {
            let p = p.clone();
            let member = member.clone();
            async move {
                let ch = channel(&p, &member, To::Member, &who).await?;
                Ok(PoolServiceClient::new(ch)
                    .rotate_ca(pb::RotateCaRequest {
                        step: pb::RotateCaStep::Start as i32,
                        ..Default::default()
                    })
                    .await)
            }
        };
        t.refused(
            "RotateCa as a member certificate without a user",
            outcome(rotate(As::Pool(Identity::Member(2))).await),
            "Unauthenticated",
        );
        let trust = async {
            let ch = channel(&p, &member, To::Member, &As::Nobody).await?;
            Ok(PoolServiceClient::new(ch)
                .get_trust(pb::GetTrustRequest {})
                .await)
        };
        t.refused(
            "GetTrust without a certificate or a user",
            outcome(trust.await),
            "Unauthenticated",
        );

        // The storage box's API: the coordinator members only.
        let store = |who: As| {
            let p = p.clone();
            let addr = storage.clone();
            async move {
                let ch = channel(&p, &addr, To::Daemon, &who).await?;
                Ok(StorageServiceClient::new(ch)
                    .list_pools(proto::storage::ListPoolsRequest::default())
                    .await)
            }
        };
        t.refused(
            "StorageService without a certificate",
            outcome(store(As::Nobody).await),
            "tls",
        );
        t.refused(
            "StorageService as a host",
            outcome(store(As::Pool(Identity::Host("h1".into()))).await),
            "PermissionDenied",
        );
        t.refused(
            "StorageService as a member of another CA",
            outcome(store(As::OtherCa(Identity::Member(1))).await),
            "tls",
        );

        // And the real thing still works: a member certificate reads the host.
        let ok = host(As::Pool(Identity::Member(1))).await;
        assert_eq!(outcome(ok), "ok", "a member may call HostService");
    });

    // The migration stream: h1 prepared (by a member, as the coordinator does) to take VM
    // "bait" from h2 with a token; strangers and the wrong host or token try it.
    const TOKEN: &str = "the-coordinators-token";
    let kernel = guest_elf(dir.path());
    let as_member = |p: &PoolArg| {
        let p = p.clone();
        let addr = h1_addr.clone();
        async move {
            HostServiceClient::new(
                channel(&p, &addr, To::Daemon, &As::Pool(Identity::Member(1)))
                    .await
                    .unwrap(),
            )
        }
    };
    let stream_addr = rt.block_on(async {
        as_member(&p)
            .await
            .prepare_migration_receive(proto::host::PrepareMigrationReceiveRequest {
                vm_id: "bait".into(),
                config: Some(proto::host::VmConfig {
                    name: "bait".into(),
                    vcpus: 1,
                    memory_bytes: 64 << 20,
                    boot: Some(proto::host::BootSource {
                        kernel_path: kernel.clone(),
                        command_line: "mode=heartbeat".into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                token: TOKEN.into(),
                source_host: "h2".into(),
            })
            .await
            .expect("a member prepares a receive")
            .into_inner()
            .address
    });
    let stream = |who: As, token: &str| migration_stream(&p, "h1", &stream_addr, &who, token);
    t.refused(
        "migration stream without a certificate",
        stream(As::Nobody, TOKEN),
        "tls",
    );
    t.refused(
        "migration stream as h2 of another CA",
        stream(As::OtherCa(Identity::Host("h2".into())), TOKEN),
        "tls",
    );
    t.refused(
        "migration stream with an expired h2 certificate",
        stream(As::Expired(Identity::Host("h2".into())), TOKEN),
        "tls",
    );
    t.refused(
        "migration stream from a host the coordinator did not name",
        stream(As::Pool(Identity::Host("mallory".into())), TOKEN),
        "destination refused: this destination takes the VM from host h2, not from host mallory",
    );
    t.refused(
        "migration stream from h2 with a wrong token",
        stream(As::Pool(Identity::Host("h2".into())), "a-guessed-token"),
        "destination refused: wrong migration token",
    );
    // The prepared receive survives them all, still waiting for the real source.
    rt.block_on(async {
        let mut c = as_member(&p).await;
        let vm = c
            .get_vm(proto::host::VmRequest {
                vm_id: "bait".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            vm.power_state,
            proto::host::PowerState::Migrating as i32,
            "{vm:?}"
        );
        c.destroy_vm(proto::host::VmRequest {
            vm_id: "bait".into(),
        })
        .await
        .unwrap();
    });

    // poolctl given another pool's CA refuses to talk to this one.
    let stranger = tempfile::tempdir().unwrap();
    let other = PoolArg {
        addrs: p.addrs.clone(),
        pki: stranger.path().to_owned(),
        pool_id: p.pool_id.clone(),
        token: p.token.clone(),
    };
    let _ = other.ca();
    let o = e2e_tests::poolctl(&other, &["host-list"]);
    t.attempts += 1;
    if !o.status.success() && e2e_tests::text(&o).contains("not signed by the CA poolctl trusts") {
        t.refused += 1;
    }
    t.log.push(format!(
        "poolctl trusting another CA: {}",
        e2e_tests::text(&o).lines().next().unwrap_or("")
    ));

    let report = t.log.join("\n");
    println!(
        "{report}\nINTRUDER attempts={} refused={}",
        t.attempts, t.refused
    );
    assert_eq!(t.refused, t.attempts, "{report}\n{}", pool.logs());

    // Nothing the intruder tried changed the pool.
    let hosts_after = pool.ctl(&["host-list", "--json"]);
    assert!(!hosts_after.contains("evil"), "{hosts_after}");
    for name in ["h1", "h2"] {
        let line = |s: &str| {
            s.lines()
                .find(|l| l.contains(&format!("\"name\": \"{name}\"")))
                .map(|l| (field(l, "id"), field(l, "address"), field(l, "state")))
        };
        assert_eq!(line(&hosts_before), line(&hosts_after), "{name}");
    }
    assert_eq!(members_before, pool.ctl(&["member-list", "--json"]));
    let roll = pool.ctl(&["pool-rotate-ca", "--status", "--json"]);
    assert!(
        !roll.is_empty() && pool.ctl(&["pool-ca"]).matches("BEGIN CERTIFICATE").count() == 1,
        "no roll was started: {roll}"
    );
}
