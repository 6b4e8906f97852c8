//! Certificates renew themselves: a host whose certificate is about to expire asks the
//! pool for a new one (RenewCertificate, over mutual TLS with the old one) at two thirds
//! of its validity, serves it to new connections without a restart, and heartbeats on
//! past the old one's expiry; the renewal is audited.

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

/// The certificate `addr` presents to a new connection (as coordinator member 1).
fn served_cert(member: &DaemonTls, host: &str, addr: &str) -> Vec<u8> {
    use rustls::pki_types::ServerName;
    let config = pool_trust::serve::client_config(&member.bundle, Some(&member.creds)).unwrap();
    let name =
        ServerName::try_from(Identity::Host(host.into()).dns_name(member.pool_id())).unwrap();
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
    // h1's certificate lives 15 s: due for renewal 10 s after it was made.
    let ca = p.ca();
    let tls_dir = p.tls_dir(Identity::Host("h1".into()), &["127.0.0.1"]);
    let short = Validity::starting(now_ms(), Duration::from_secs(15));
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
        served_cert(&member, "h1", &host.addr),
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
        let c = served_cert(&member, "h1", &host.addr);
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
