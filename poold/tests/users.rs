//! Users against a real one-member pool: the minimum password length, the login throttle
//! (per user name and per source, over once its window passes), one answer for unknown
//! users and wrong passwords, password change and token revocation (old tokens refused,
//! the user kept; on every member of a three-member pool), who may change whose
//! password, and reads that keep answering through a login flood.

mod common;

use std::time::{Duration, Instant};

use common::*;
use pool_client::{PoolClient, new_request_id};
use proto::coordinator as pb;
use tonic::{Code, Status};

const ADMIN_PW: &str = ADMIN_PASSWORD;

/// A one-member pool, founded with its first user "admin" (pool-admin), and a client
/// logged in as admin.
async fn pool(env: &[(&str, &str)]) -> (Cluster, PoolClient) {
    let cl = Cluster::start_with_env(1, &[], env);
    let admin = cl.client().await;
    (cl, admin)
}

async fn create_user(
    c: &mut PoolClient,
    name: &str,
    password: &str,
    role: pb::Role,
) -> Result<pb::Task, Status> {
    let req = pb::CreateUserRequest {
        request_id: new_request_id(),
        name: name.into(),
        password: password.into(),
        roles: vec![role as i32],
    };
    c.call(|mut p| {
        let req = req.clone();
        async move { p.create_user(req).await }
    })
    .await
    .map(|r| r.task.unwrap_or_default())
}

async fn login(cl: &Cluster, user: &str, password: &str) -> Result<String, Status> {
    let req = pb::LoginRequest {
        user_name: user.into(),
        password: password.into(),
    };
    cl.tls_client()
        .call(|mut p| {
            let req = req.clone();
            async move { p.login(req).await }
        })
        .await
        .map(|r| r.token)
}

fn client_as(cl: &Cluster, token: &str) -> PoolClient {
    let mut c = cl.tls_client();
    c.set_token(token).expect("a header-safe token");
    c
}

/// A read any user may make.
async fn read_as(cl: &Cluster, token: &str) -> Result<(), Status> {
    client_as(cl, token)
        .call(|mut p| async move {
            p.list_hosts(pb::ListHostsRequest {
                page: None,
                state: 0,
            })
            .await
        })
        .await
        .map(|_| ())
}

async fn users(admin: &mut PoolClient) -> Vec<pb::User> {
    admin
        .call(|mut p| async move { p.list_users(pb::ListUsersRequest { page: None }).await })
        .await
        .expect("list users")
        .users
}

async fn user_id(admin: &mut PoolClient, name: &str) -> String {
    users(admin)
        .await
        .into_iter()
        .find(|u| u.name == name)
        .unwrap_or_else(|| panic!("no user {name}"))
        .id
}

async fn change_password(
    c: &mut PoolClient,
    user_id: &str,
    old: &str,
    new: &str,
) -> Result<pb::TaskResponse, Status> {
    let req = pb::ChangePasswordRequest {
        request_id: new_request_id(),
        user_id: user_id.into(),
        old_password: old.into(),
        new_password: new.into(),
    };
    c.call(|mut p| {
        let req = req.clone();
        async move { p.change_password(req).await }
    })
    .await
}

async fn revoke_tokens(c: &mut PoolClient, user_id: &str) -> Result<pb::TaskResponse, Status> {
    let req = pb::RevokeTokensRequest {
        request_id: new_request_id(),
        user_id: user_id.into(),
    };
    c.call(|mut p| {
        let req = req.clone();
        async move { p.revoke_tokens(req).await }
    })
    .await
}

fn code<T: std::fmt::Debug>(r: Result<T, Status>) -> Code {
    r.expect_err("refused").code()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_password_is_refused_on_create_and_change() {
    let _serial = SERIAL.lock().await;
    let (cl, mut admin) = pool(&[]).await;
    let e = create_user(&mut admin, "shorty", "eleven char", pb::Role::ReadOnly)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("at least 12 characters"), "{e:?}");
    assert!(users(&mut admin).await.iter().all(|u| u.name != "shorty"));
    let e = change_password(&mut admin, "", ADMIN_PW, "too short")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("at least 12 characters"), "{e:?}");
    login(&cl, "admin", ADMIN_PW)
        .await
        .expect("the password did not change");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_are_throttled_per_user_and_source_until_the_window_passes() {
    let _serial = SERIAL.lock().await;
    let window = Duration::from_secs(4);
    let env = [
        ("POOLD_LOGIN_FAILURES", "3"),
        ("POOLD_LOGIN_WINDOW_MS", "4000"),
    ];
    let (cl, mut admin) = pool(&env).await;
    create_user(&mut admin, "bob", "bob password 12", pb::Role::ReadOnly)
        .await
        .unwrap();
    create_user(&mut admin, "carol", "carol password", pb::Role::ReadOnly)
        .await
        .unwrap();
    let first_failure = Instant::now();
    for i in 0..3 {
        let e = login(&cl, "bob", "not the password").await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "failure {i}: {e:?}");
    }
    // Even the right password is refused now, and so is anyone from this address.
    let e = login(&cl, "bob", "bob password 12").await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("for this user name"), "{e:?}");
    assert!(e.message().contains("retry after"), "{e:?}");
    let e = login(&cl, "carol", "carol password").await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("from this address"), "{e:?}");
    // The window passes: the right password works again.
    let wait = (first_failure + window + Duration::from_millis(300))
        .saturating_duration_since(Instant::now());
    tokio::time::sleep(wait).await;
    let t = login(&cl, "bob", "bob password 12")
        .await
        .expect("allowed after the window");
    read_as(&cl, &t).await.expect("the token works");
    login(&cl, "carol", "carol password")
        .await
        .expect("the address is allowed again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_user_and_a_wrong_password_look_the_same() {
    let _serial = SERIAL.lock().await;
    let (cl, mut admin) = pool(&[("POOLD_LOGIN_FAILURES", "1000")]).await;
    create_user(&mut admin, "bob", "bob password 12", pb::Role::ReadOnly)
        .await
        .unwrap();
    let mut known = Vec::new();
    let mut unknown = Vec::new();
    for _ in 0..7 {
        let t = Instant::now();
        let a = login(&cl, "bob", "wrong password").await.unwrap_err();
        known.push(t.elapsed());
        let t = Instant::now();
        let b = login(&cl, "nobody", "wrong password").await.unwrap_err();
        unknown.push(t.elapsed());
        assert_eq!((a.code(), a.message()), (b.code(), b.message()));
        assert_eq!(a.code(), Code::Unauthenticated);
    }
    known.sort();
    unknown.sort();
    let (k, u) = (known[3], unknown[3]);
    println!("median failed login: known user {k:?}, unknown user {u:?}");
    // Without the dummy hash an unknown name answers in a fraction of the time.
    assert!(u * 2 >= k, "unknown {u:?} vs known {k:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_change_revokes_old_tokens_and_the_new_password_works() {
    let _serial = SERIAL.lock().await;
    let (cl, mut admin) = pool(&[]).await;
    create_user(&mut admin, "bob", "bob password 12", pb::Role::ReadOnly)
        .await
        .unwrap();
    let t1 = login(&cl, "bob", "bob password 12").await.unwrap();
    read_as(&cl, &t1).await.expect("the first token works");
    let mut bob = client_as(&cl, &t1);
    let new = "bob new password";
    let wrong_old = change_password(&mut bob, "", "not the old one", new).await;
    assert_eq!(code(wrong_old), Code::PermissionDenied);
    assert_eq!(
        code(change_password(&mut bob, "", "", new).await),
        Code::InvalidArgument,
        "one's own password needs the old one"
    );
    read_as(&cl, &t1)
        .await
        .expect("refused changes revoke nothing");
    change_password(&mut bob, "", "bob password 12", new)
        .await
        .expect("bob changes his password");
    assert_eq!(code(read_as(&cl, &t1).await), Code::Unauthenticated);
    assert_eq!(
        code(login(&cl, "bob", "bob password 12").await),
        Code::Unauthenticated
    );
    let t2 = login(&cl, "bob", new)
        .await
        .expect("the new password works");
    read_as(&cl, &t2).await.unwrap();
    // A pool-admin sets it without the old one; that revokes too.
    let bob_id = user_id(&mut admin, "bob").await;
    change_password(&mut admin, &bob_id, "", "set by the admin")
        .await
        .expect("an admin sets bob's password");
    assert_eq!(code(read_as(&cl, &t2).await), Code::Unauthenticated);
    login(&cl, "bob", "set by the admin").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_tokens_fail_while_the_user_stays() {
    let _serial = SERIAL.lock().await;
    let (cl, mut admin) = pool(&[]).await;
    create_user(&mut admin, "bob", "bob password 12", pb::Role::VmAdmin)
        .await
        .unwrap();
    let t1 = login(&cl, "bob", "bob password 12").await.unwrap();
    let t1b = login(&cl, "bob", "bob password 12").await.unwrap();
    revoke_tokens(&mut client_as(&cl, &t1), "")
        .await
        .expect("bob revokes his own tokens");
    for t in [&t1, &t1b] {
        let e = read_as(&cl, t).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
        assert!(e.message().contains("revoked"), "{e:?}");
    }
    let t2 = login(&cl, "bob", "bob password 12")
        .await
        .expect("the password still works");
    read_as(&cl, &t2).await.unwrap();
    let bob_id = user_id(&mut admin, "bob").await;
    revoke_tokens(&mut admin, &bob_id)
        .await
        .expect("an admin revokes bob's tokens");
    assert_eq!(code(read_as(&cl, &t2).await), Code::Unauthenticated);
    let bob = users(&mut admin).await.into_iter().find(|u| u.id == bob_id);
    assert_eq!(
        bob.expect("bob is still a user").roles,
        vec![pb::Role::VmAdmin as i32]
    );
    read_as(&cl, admin_token(&cl).await.as_str())
        .await
        .expect("other users' tokens are untouched");
}

async fn admin_token(cl: &Cluster) -> String {
    login(cl, "admin", ADMIN_PW).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_pool_admin_changes_another_users_password_or_tokens() {
    let _serial = SERIAL.lock().await;
    let (cl, mut admin) = pool(&[]).await;
    create_user(&mut admin, "bob", "bob password 12", pb::Role::PoolOperator)
        .await
        .unwrap();
    create_user(&mut admin, "carol", "carol password", pb::Role::ReadOnly)
        .await
        .unwrap();
    let carol_id = user_id(&mut admin, "carol").await;
    let carol_token = login(&cl, "carol", "carol password").await.unwrap();
    let mut bob = client_as(&cl, &login(&cl, "bob", "bob password 12").await.unwrap());
    let e = change_password(&mut bob, &carol_id, "", "hijacked password")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("pool-admin"), "{e:?}");
    let with_old = change_password(&mut bob, &carol_id, "carol password", "hijacked password");
    assert_eq!(code(with_old.await), Code::PermissionDenied);
    assert_eq!(
        code(revoke_tokens(&mut bob, &carol_id).await),
        Code::PermissionDenied
    );
    login(&cl, "carol", "carol password")
        .await
        .expect("carol's password is hers still");
    read_as(&cl, &carol_token)
        .await
        .expect("carol's token still works");
    // The refusals are in the audit log, with who, what and the result.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let events = admin
            .call(|mut p| async move {
                p.list_audit_events(pb::ListAuditEventsRequest {
                    user_name: "bob".into(),
                    ..Default::default()
                })
                .await
            })
            .await
            .unwrap()
            .events;
        let refused = |m: &str| {
            events
                .iter()
                .any(|e| e.method == m && e.result == "PermissionDenied")
        };
        if refused("ChangePassword") && refused("RevokeTokens") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "refusals not audited: {events:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_keep_answering_through_a_login_flood() {
    let _serial = SERIAL.lock().await;
    let (cl, mut admin) = pool(&[("POOLD_LOGIN_FAILURES", "100000")]).await;
    create_user(&mut admin, "bob", "bob password 12", pb::Role::ReadOnly)
        .await
        .unwrap();
    let token = admin_token(&cl).await;
    const FLOOD: usize = 64;
    let started = Instant::now();
    let flood: Vec<_> = (0..FLOOD)
        .map(|i| {
            let cl_client = cl.tls_client();
            tokio::spawn(async move {
                let mut c = cl_client;
                let req = pb::LoginRequest {
                    user_name: if i % 2 == 0 { "bob" } else { "nobody" }.into(),
                    password: format!("guess {i}"),
                };
                c.call(|mut p| {
                    let req = req.clone();
                    async move { p.login(req).await }
                })
                .await
                .map(|_| ())
            })
        })
        .collect();
    let mut reads = Vec::new();
    while !flood.iter().all(|f| f.is_finished()) {
        let t = Instant::now();
        read_as(&cl, &token).await.expect("a read during the flood");
        reads.push(t.elapsed());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let flood_took = started.elapsed();
    for f in flood {
        let r = f.await.unwrap();
        assert_eq!(code(r), Code::Unauthenticated);
    }
    reads.sort();
    let worst = *reads.last().expect("reads during the flood");
    println!(
        "{FLOOD} failed logins took {flood_took:?}; {} reads meanwhile, median {:?}, worst {worst:?}",
        reads.len(),
        reads[reads.len() / 2]
    );
    assert!(
        worst < Duration::from_millis(1000),
        "a read waited {worst:?} behind password hashing"
    );
    assert!(
        reads.len() >= 3,
        "the flood ended before reads could be timed"
    );
}

/// Calls ListHosts with `token` on member `id` until it answers `want` (a follower
/// applies a commit a moment after the leader answered it).
async fn until_member_answers(cl: &Cluster, id: u64, token: &str, want: Result<(), Code>) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut c = cl.tls_client_of(&[id]);
        c.set_token(token).unwrap();
        let got = c
            .call(|mut p| async move {
                p.list_hosts(pb::ListHostsRequest {
                    page: None,
                    state: 0,
                })
                .await
            })
            .await
            .map(|_| ())
            .map_err(|s| s.code());
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "member {id} answered {got:?}, not {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_through_one_member_holds_on_every_member() {
    let _serial = SERIAL.lock().await;
    let cl = Cluster::start_with_env(3, &[], &[]);
    // The pool was founded with its first admin.
    let mut admin = cl.client().await;
    create_user(&mut admin, "bob", "bob password 12", pb::Role::ReadOnly)
        .await
        .unwrap();
    let old = login(&cl, "bob", "bob password 12").await.unwrap();
    for id in 1..=3 {
        until_member_answers(&cl, id, &old, Ok(())).await;
    }
    // Bob changes his password through member 3 alone: every member refuses the old
    // token, and takes a new one.
    let mut via_3 = cl.tls_client_of(&[3]);
    via_3.set_token(&old).unwrap();
    change_password(&mut via_3, "", "bob password 12", "bob new password")
        .await
        .expect("a change through member 3");
    let new = login(&cl, "bob", "bob new password").await.unwrap();
    for id in 1..=3 {
        until_member_answers(&cl, id, &old, Err(Code::Unauthenticated)).await;
        until_member_answers(&cl, id, &new, Ok(())).await;
    }
    let bob_id = user_id(&mut admin, "bob").await;
    let mut via_1 = cl.tls_client_of(&[1]);
    via_1.set_token(&admin_token(&cl).await).unwrap();
    revoke_tokens(&mut via_1, &bob_id)
        .await
        .expect("a revocation through member 1");
    for id in 1..=3 {
        until_member_answers(&cl, id, &new, Err(Code::Unauthenticated)).await;
    }
}
