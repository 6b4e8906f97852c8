//! Rolling the pool's CA while it runs (`poolctl pool-rotate-ca`): a new CA, cross-signed
//! by the old one, signs from the start of the roll; every daemon (members, a host,
//! storaged) renews onto it by itself within seconds; the old CA is dropped once all
//! have. Throughout, the VM keeps running and the pool keeps reaching its host and its
//! storage; a poolctl that pinned the old CA follows the roll; afterwards a certificate of
//! the old CA opens nothing.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use e2e_tests::pool::{Pool, console_line, guest_elf, guest_vm};
use e2e_tests::{binary, poolctl, poolctl_ok, text, wait_for};
use pool_trust::{CaBundle, DaemonTls, Identity};
use proto::coordinator as pb;
use proto::coordinator::pool_service_client::PoolServiceClient;

/// `GetTrust` on `addr`, presenting `tls`'s certificate (no user token).
fn get_trust_as(tls: &DaemonTls, addr: &str) -> Result<pb::Trust, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let config = tls.coordinators_client().map_err(|e| e.to_string())?;
        let channel = tonic::transport::Endpoint::from_shared(format!("https://{addr}"))
            .and_then(|e| e.tls_config(config))
            .map_err(|e| e.to_string())?
            .connect_timeout(Duration::from_secs(3))
            .connect()
            .await
            .map_err(|e| format!("connect: {e:?}"))?;
        PoolServiceClient::new(channel)
            .get_trust(pb::GetTrustRequest {})
            .await
            .map(|r| r.into_inner())
            .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
    })
}

/// poolctl with no `--ca`, pinning in its own `home` (as a user's first contact does).
fn pinned(home: &Path, addrs: &str, token: &str, args: &[&str]) -> Output {
    Command::new(binary("poolctl"))
        .args(["--pool", addrs])
        .args(args)
        .env("HOME", home)
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("POOLCTL_TRUST_NEW_POOL")
        .env("POOLCTL_TOKEN", token)
        .output()
        .expect("run poolctl")
}

fn fingerprints(b: &CaBundle) -> Vec<String> {
    b.certs()
        .iter()
        .map(|c| c.fingerprint().to_string())
        .collect()
}

#[test]
fn the_pool_rolls_its_ca_while_a_vm_runs_and_the_old_ca_opens_nothing_after() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let pool = Pool::start(dir, 1);
    let p = pool.p.clone();
    let token = p.token.clone().expect("the admin's token");
    pool.wait_hosts_enabled();
    pool.create_sr(dir, "sr1", "256M");
    pool.ctl(&["vdi-create", "d1", "--sr", "sr1", "--size", "16M"]);
    let elf = guest_elf(dir);
    pool.ctl(&guest_vm(
        "demo",
        "d1",
        &elf,
        "seed=7 blk=rw mode=heartbeat hb_ms=200",
        &["--start"],
    ));
    pool.wait_vm("demo", "\"power\": \"running\"", Duration::from_secs(60));

    // Before the roll: one CA; poolctl pins it on first contact; a daemon certificate of
    // that CA is let in.
    let old = CaBundle::from_pem(&poolctl_ok(&p, &["pool-ca"])).unwrap();
    assert_eq!(old.certs().len(), 1);
    let home = dir.join("home");
    std::fs::create_dir_all(&home).unwrap();
    let o = pinned(
        &home,
        &p.addrs,
        &token,
        &["--trust-new-pool", "member-list"],
    );
    assert!(o.status.success(), "{}", text(&o));
    let stale = p
        .ca()
        .issue(&Identity::Host("h1".into()), &[], &dir.join("stale"))
        .unwrap();
    get_trust_as(&stale, &pool.coordinators.addrs[0]).expect("a certificate of the pool");

    // Start the roll: both CAs trusted, the new one signs.
    let start = poolctl(&p, &["--no-wait", "pool-rotate-ca"]);
    assert!(start.status.success(), "{}", text(&start));
    let both = CaBundle::from_pem(&poolctl_ok(&p, &["pool-ca"])).unwrap();
    assert_eq!(both.certs().len(), 2, "{:?}", fingerprints(&both));
    assert!(both.contains(&old.certs()[0].fingerprint()));
    let new_fp = fingerprints(&both)
        .into_iter()
        .find(|f| *f != old.certs()[0].fingerprint().to_string())
        .unwrap();
    // A poolctl given a --ca file without the new CA will not finish the roll (it could not
    // reach the members after); the operator updates it (`poolctl pool-ca > FILE`).
    let early = poolctl(&p, &["pool-rotate-ca", "--finish"]);
    assert!(
        !early.status.success() && text(&early).contains("does not hold the new CA"),
        "{}",
        text(&early)
    );
    std::fs::write(p.bundle(), both.to_pem()).unwrap();

    // The pinned poolctl meets a member renewed onto the new CA and follows the roll:
    // the new CA is signed by the one it pinned.
    wait_for(Duration::from_secs(30), || {
        let status = poolctl_ok(&p, &["pool-rotate-ca", "--status", "--json"]);
        status
            .lines()
            .any(|l| l.contains("\"identity\": \"member/1\"") && l.contains("\"current\": true"))
            .then_some(())
    })
    .expect("member 1 renewed onto the new CA");
    let o = pinned(&home, &p.addrs, &token, &["member-list"]);
    assert!(o.status.success(), "{}", text(&o));

    // Finish: waits for every daemon, then drops the old CA.
    let finish = poolctl(&p, &["pool-rotate-ca", "--timeout", "60"]);
    assert!(
        finish.status.success(),
        "{}\n{}",
        text(&finish),
        pool.logs()
    );
    let status = poolctl_ok(&p, &["pool-rotate-ca", "--status", "--json"]);
    for who in [
        "member/1",
        "member/2",
        "member/3",
        "host/h1",
        "storage/storaged",
    ] {
        assert!(
            status
                .lines()
                .any(|l| l.contains(&format!("\"identity\": \"{who}\""))
                    && l.contains("\"current\": true")),
            "{who}: {status}"
        );
    }
    let new = CaBundle::from_pem(&poolctl_ok(&p, &["pool-ca"])).unwrap();
    assert_eq!(fingerprints(&new), vec![new_fp.clone()]);
    std::fs::write(p.bundle(), new.to_pem()).unwrap();

    // Every daemon's TLS directory holds the new CA alone and a certificate it signed.
    let subject = new.certs()[0].info().subject.clone();
    for who in [
        "member-1",
        "member-2",
        "member-3",
        "host-h1",
        "storage-storaged",
    ] {
        let tls = wait_for(Duration::from_secs(20), || {
            let t = DaemonTls::load(&p.pki.join(who)).ok()?;
            (fingerprints(&t.bundle) == vec![new_fp.clone()]).then_some(t)
        })
        .unwrap_or_else(|| panic!("{who} still trusts the old CA\n{}", pool.logs()));
        assert_eq!(tls.creds.info().issuer, subject, "{who}");
    }

    // The pool still works end to end: the host heartbeats, the VM's console comes
    // through the pool from its host, storage answers the members.
    pool.wait_hosts_enabled();
    let hb = console_line(&p, "demo", "HB seq=", Duration::from_secs(30))
        .unwrap_or_else(|| panic!("the guest's console after the roll\n{}", pool.logs()));
    assert!(hb.contains("bad=0"), "{hb}");
    pool.ctl(&["vdi-create", "d2", "--sr", "sr1", "--size", "16M"]);
    let o = pinned(&home, &p.addrs, &token, &["member-list"]);
    assert!(o.status.success(), "{}", text(&o));
    let known = std::fs::read_to_string(home.join(".config/poolctl/known_pools")).unwrap();
    assert!(known.contains(&new_fp), "{known}");
    assert!(
        !known.contains(&old.certs()[0].fingerprint().to_string()),
        "the retired CA is still pinned: {known}"
    );

    // A certificate of the old CA is refused now.
    let stale = DaemonTls {
        bundle: new.clone(),
        creds: stale.creds,
    };
    let refused = get_trust_as(&stale, &pool.coordinators.addrs[0]);
    assert!(refused.is_err(), "{refused:?}");
    drop(pool);
}
