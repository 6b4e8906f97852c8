//! Certificates renew themselves: a host whose certificate is about to expire asks the
//! pool for a new one (RenewCertificate, over mutual TLS with the old one) at two thirds
//! of its validity, serves it to new connections without a restart, and heartbeats on
//! past the old one's expiry; the renewal is audited. Coordinator members do the same,
//! and connect to each other with what they renewed.

use std::io::Write;
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use e2e_tests::{Coordinators, Hostd, poolctl_ok, wait_for};
use pool_trust::{AltName, CertInfo, DaemonTls, Identity, Validity};

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// The certificate `server` at `addr` presents to a new connection from `client`.
fn served_cert(client: &DaemonTls, server: &Identity, addr: &str) -> Vec<u8> {
    use rustls::pki_types::ServerName;
    let config = pool_trust::serve::client_config(&client.bundle, Some(&client.creds)).unwrap();
    let name = ServerName::try_from(server.dns_name(client.pool_id())).unwrap();
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let mut sock = TcpStream::connect(addr).unwrap();
    while conn.is_handshaking() {
        conn.complete_io(&mut sock).unwrap();
    }
    let _ = sock.flush();
    conn.peer_certificates().unwrap()[0].to_vec()
}

#[test]
fn a_host_renews_its_certificate_before_it_expires_and_serves_it_without_a_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let pool = Coordinators::start(dir, 1);
    let p = pool.pool.clone();
    // h1's certificate lives 15 s.
    let ca = p.ca();
    let tls_dir = p.tls_dir(Identity::Host("h1".into()), &["127.0.0.1"]);
    // Not backdated (as `Validity::starting` does for clock skew): two thirds of it, the
    // renewal, is 10 s away, after the first look at what the host serves.
    let now = now_ms();
    let short = Validity {
        not_before_ms: now,
        not_after_ms: now + 15_000,
    };
    let creds = ca
        .ca()
        .issue(
            &Identity::Host("h1".into()),
            &[AltName::parse("127.0.0.1").unwrap()],
            short,
        )
        .unwrap();
    let first = DaemonTls {
        bundle: ca.ca().bundle(),
        creds,
    };
    first.save(&tls_dir).unwrap();
    let old_expiry = first.creds.not_after_ms();
    let host = Hostd::start_with_tls(dir, "h1", "127.0.0.1", &p, &tls_dir);
    let member = p
        .ca()
        .issue(&Identity::Member(1), &[], &dir.join("m1"))
        .unwrap();
    assert_eq!(
        served_cert(&member, &Identity::Host("h1".into()), &host.addr),
        first.creds.cert_der()
    );

    // Renewed in place: a new key and a certificate for months, the same identity.
    let renewed = wait_for(Duration::from_secs(30), || {
        let now = DaemonTls::load(&tls_dir).ok()?;
        (now.creds.cert_der() != first.creds.cert_der()).then_some(now)
    })
    .unwrap_or_else(|| {
        panic!(
            "no renewal\n{}",
            std::fs::read_to_string(dir.join("h1.log")).unwrap_or_default()
        )
    });
    assert_eq!(renewed.identity(), &Identity::Host("h1".into()));
    assert!(renewed.creds.not_after_ms() > now_ms() + 30 * 24 * 3600 * 1000);
    assert_ne!(renewed.creds.key_pem(), first.creds.key_pem());
    let info = CertInfo::parse(renewed.creds.cert_der()).unwrap();
    assert!(
        info.ips.contains(&"127.0.0.1".parse().unwrap()),
        "{:?}",
        info.ips
    );
    // New connections get it, no restart.
    let served = wait_for(Duration::from_secs(5), || {
        let c = served_cert(&member, &Identity::Host("h1".into()), &host.addr);
        (c == renewed.creds.cert_der()).then_some(c)
    });
    assert!(
        served.is_some(),
        "the listener still serves the old certificate"
    );

    // Past the old certificate's end the host still heartbeats (its calls present the
    // new one) and the pool still reaches it.
    while now_ms() < old_expiry + 2_000 {
        std::thread::sleep(Duration::from_millis(200));
    }
    let fresh = wait_for(Duration::from_secs(10), || {
        let list = poolctl_ok(&p, &["host-list", "--json"]);
        let line = list
            .lines()
            .find(|l| l.contains("\"name\": \"h1\""))?
            .to_owned();
        (line.contains("\"state\": \"enabled\"")).then_some(line)
    });
    assert!(
        fresh.is_some(),
        "{}",
        poolctl_ok(&p, &["host-list", "--json"])
    );
    let log = std::fs::read_to_string(dir.join("h1.log")).unwrap_or_default();
    let after: Vec<&str> = log
        .lines()
        .skip_while(|l| !l.contains("certificate renewed"))
        .filter(|l| l.contains("heartbeat failed"))
        .collect();
    assert!(
        after.is_empty(),
        "heartbeats failed after the renewal:\n{log}"
    );

    // The pool's audit log says who renewed.
    let audit = poolctl_ok(&p, &["audit-log", "--json"]);
    assert!(
        audit
            .lines()
            .any(|l| l.contains("host/h1") && l.contains("RenewCertificate")),
        "{audit}"
    );
    drop(host);
}

#[test]
fn coordinator_members_renew_and_keep_the_pool_running_past_their_first_certificates() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // Every member's certificate lives 15 s (backdated for clock skew, so it is due for
    // renewal at once).
    let mut pool = Coordinators::start_with_member_validity(dir, 3, Duration::from_secs(15));
    let old_expiry = now_ms() + 15_000;
    let p = pool.pool.clone();
    let member_dir = |id: u64| p.pki.join(format!("member-{id}"));
    let logs = || {
        (1..=3)
            .map(|id| {
                std::fs::read_to_string(dir.join(format!("poold-{id}.log"))).unwrap_or_default()
            })
            .collect::<Vec<_>>()
            .join("\n---\n")
    };
    let renewed: Vec<DaemonTls> = (1..=3u64)
        .map(|id| {
            wait_for(Duration::from_secs(40), || {
                let now = DaemonTls::load(&member_dir(id)).ok()?;
                (now.creds.not_after_ms() > old_expiry + 3600 * 1000).then_some(now)
            })
            .unwrap_or_else(|| panic!("member {id} did not renew\n{}", logs()))
        })
        .collect();
    for (id, t) in (1..=3u64).zip(&renewed) {
        assert_eq!(t.identity(), &Identity::Member(id));
        assert!(t.creds.not_after_ms() > now_ms() + 30 * 24 * 3600 * 1000);
    }
    // Member 1 serves its renewed certificate to new connections, no restart.
    let client = p
        .ca()
        .issue(&Identity::Host("probe".into()), &[], &dir.join("probe"))
        .unwrap();
    let served = wait_for(Duration::from_secs(5), || {
        let c = served_cert(&client, &Identity::Member(1), &pool.addrs[0]);
        (c == renewed[0].creds.cert_der()).then_some(c)
    });
    assert!(
        served.is_some(),
        "member 1 still serves its first certificate"
    );

    // Past the first certificates' end, member 3 stopped and member 2 restarted: a write
    // commits only if member 1 reaches member 2 (and is let in) with what it renewed.
    while now_ms() < old_expiry + 2_000 {
        std::thread::sleep(Duration::from_millis(200));
    }
    pool.procs[2].kill();
    pool.restart(2);
    let committed = wait_for(Duration::from_secs(30), || {
        let o = e2e_tests::poolctl(&p, &["pool-set", "--downtime-ms", "777"]);
        o.status.success().then_some(())
    });
    assert!(
        committed.is_some(),
        "no write after the renewal\n{}",
        logs()
    );
    let audit = poolctl_ok(&p, &["audit-log", "--json"]);
    for id in 1..=3 {
        assert!(
            audit
                .lines()
                .any(|l| l.contains(&format!("member/{id}")) && l.contains("RenewCertificate")),
            "member {id}: {audit}"
        );
    }
}
