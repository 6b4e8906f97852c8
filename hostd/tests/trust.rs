//! HostService's trust boundary: over mutual TLS it answers the pool's coordinator
//! members only, and the `hostd` binary will not start without a TLS directory that is
//! its own and kept private.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::*;
use pool_trust::tls::client_tls;
use pool_trust::{DaemonTls, Identity};
use proto::host::ListVmsRequest;
use tonic::transport::{ClientTlsConfig, Endpoint};
use tonic::{Code, Status};

/// ListVms at `addr` over `tls`: the number of VMs, or why not (a refused connection
/// reads as `Unavailable` with the transport error).
async fn list_vms(addr: &str, tls: ClientTlsConfig) -> Result<usize, Status> {
    let call = async {
        let mut c = connect_tls(addr, tls)
            .await
            .map_err(|e| Status::unavailable(format!("connecting: {e:?}")))?;
        let vms = c.list_vms(ListVmsRequest::default()).await?;
        Ok(vms.into_inner().vms.len())
    };
    tokio::time::timeout(WAIT, call)
        .await
        .expect("the call ends either way")
}

/// A failure before the service saw the call: the connection failed in the transport (a
/// refused TLS handshake; no gRPC status from the server's interceptor, which would say
/// Unauthenticated or PermissionDenied). The client sees the server's alert or, when its
/// request was already on the way, a closed stream or a cancelled call; a refusal of
/// the client's own always names `why`.
fn assert_handshake_refused(what: &str, r: Result<usize, Status>, why: Option<&str>) {
    let err = r.expect_err(what);
    let text = format!("{err:?}");
    assert!(
        !matches!(err.code(), Code::PermissionDenied | Code::Unauthenticated)
            && text.contains("tonic::transport::Error(Transport"),
        "{what}: {err:?}"
    );
    if let Some(why) = why {
        assert!(text.contains(why), "{what}: {err:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn host_service_answers_pool_members_and_nobody_else() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path()).await;
    let addr = d.addr.to_string();
    let host = Identity::Host(HOST.into());
    let bundle = &d.member.bundle;

    // No client certificate: rustls on the server ends the handshake.
    let anonymous = client_tls(bundle, None, Some(&host)).unwrap();
    let r = list_vms(&addr, anonymous).await;
    assert_handshake_refused("no client certificate", r, None);

    // A member certificate from another CA that calls itself the same pool.
    let forger = Pki::new();
    let forged = forger.issue(&Identity::Member(1), &[]);
    let cfg = client_tls(bundle, Some(&forged.creds), Some(&host)).unwrap();
    let r = list_vms(&addr, cfg).await;
    assert_handshake_refused("another CA's member", r, None);
    // A client trusting only that other CA refuses the daemon's certificate.
    let cfg = forged.client(&host).unwrap();
    let r = list_vms(&addr, cfg).await;
    assert_handshake_refused("the daemon to another CA", r, Some("UnknownIssuer"));

    // In clear, nothing is answered either.
    let plain = async {
        let channel = Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .map_err(|e| Status::unavailable(format!("{e:?}")))?;
        let mut c = proto::host::host_service_client::HostServiceClient::new(channel);
        let vms = c.list_vms(ListVmsRequest::default()).await?;
        Ok::<_, Status>(vms.into_inner().vms.len())
    };
    let r = tokio::time::timeout(WAIT, plain).await.unwrap();
    assert!(r.is_err(), "a clear-text call was answered: {r:?}");

    // Valid certificates of this pool that are not members: refused by role.
    // The daemon's own certificate is one of them: a host does not call hosts.
    let mut others = vec![DaemonTls::load(&d.pki.dir_of(&host)).unwrap()];
    for other in [
        Identity::Host("other-host".into()),
        Identity::Storage("s1".into()),
        Identity::Client("alice".into()),
    ] {
        others.push(d.pki.issue(&other, &[]));
    }
    for tls in others {
        let who = tls.identity().clone();
        let err = list_vms(&addr, tls.client(&host).unwrap())
            .await
            .expect_err("only members may call");
        assert_eq!(err.code(), Code::PermissionDenied, "{who}: {err:?}");
        assert!(err.message().contains("may not call"), "{who}: {err:?}");
    }

    // Members are answered, and the refusals above left the server serving.
    let m2 = d.pki.issue(&Identity::Member(2), &[]);
    for tls in [&d.member, &m2] {
        let n = list_vms(&addr, tls.client(&host).unwrap()).await;
        assert_eq!(n.unwrap(), 0, "{}", tls.identity());
    }
}

/// Runs the hostd binary as host [`HOST`] with the given TLS directory (if any),
/// expecting it to refuse to start: its stderr. The run directory it is given stays
/// uncreated.
fn refused_start(tls_dir: Option<&Path>) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let run_dir = tmp.path().join("run");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hostd"));
    cmd.args([
        "--listen",
        "127.0.0.1:0",
        "--host-id",
        HOST,
        "--log",
        "warn",
    ])
    .arg("--run-dir")
    .arg(&run_dir)
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    if let Some(dir) = tls_dir {
        cmd.arg("--tls-dir").arg(dir);
    }
    let mut child = cmd.spawn().unwrap();
    let deadline = Instant::now() + WAIT;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("hostd started with TLS directory {tls_dir:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{stderr}");
    assert!(
        !run_dir.exists(),
        "a refused start made its run directory: {stderr}"
    );
    stderr
}

#[test]
fn the_daemon_binary_refuses_to_start_without_its_own_private_tls_directory() {
    let err = refused_start(None);
    assert!(err.contains("a TLS directory is required"), "{err}");

    let pki = Pki::new();
    let other = Identity::Host("other-host".into());
    pki.issue(&other, &["127.0.0.1"]);
    let err = refused_start(Some(&pki.dir_of(&other)));
    assert!(
        err.contains(&format!("is for {other}, but this daemon runs as")),
        "{err}"
    );

    let member = Identity::Member(1);
    pki.issue(&member, &["127.0.0.1"]);
    let err = refused_start(Some(&pki.dir_of(&member)));
    assert!(err.contains("but this daemon runs as"), "{err}");

    let host = Identity::Host(HOST.into());
    pki.issue(&host, &["127.0.0.1"]);
    let dir = pki.dir_of(&host);
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let err = refused_start(Some(&dir));
    assert!(err.contains("has mode 0755"), "{err}");
    assert!(err.contains("must be 0700"), "{err}");

    let err = refused_start(Some(&pki.dir_of(&Identity::Host("never-issued".into()))));
    assert!(err.contains("loading the TLS directory"), "{err}");
}

/// A VM may take its kernel, initrd and file disks only from the host's image
/// directories: a member naming a host device or a system file is refused, and nothing
/// is created.
#[tokio::test(flavor = "multi_thread")]
async fn host_paths_outside_the_image_directories_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path()).await;
    let mut c = daemon.client().await;
    for (what, cfg) in [
        ("a host device as a disk", {
            let mut cfg = config("then=spin");
            cfg.disks.push(proto::host::DiskConfig {
                id: "vda".into(),
                backend: Some(proto::host::disk_config::Backend::FilePath(
                    "/dev/null".into(),
                )),
                read_only: false,
            });
            cfg
        }),
        ("a system file as the initrd", {
            let mut cfg = config("then=spin");
            cfg.boot.as_mut().unwrap().initrd_path = "/etc/passwd".into();
            cfg
        }),
    ] {
        let e = c
            .create_vm(proto::host::CreateVmRequest {
                vm_id: "intruder".into(),
                config: Some(cfg),
                start: true,
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{what}: {e:?}");
        assert!(e.message().contains("image directories"), "{what}: {e:?}");
    }
    let vms = c.list_vms(ListVmsRequest::default()).await.unwrap();
    assert!(vms.into_inner().vms.is_empty(), "nothing was created");
}
