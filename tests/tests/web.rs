//! The web console's port of a real member, through curl as a browser would use it:
//! HTTPS with the pool's certificate and no client certificate, the console's files
//! with their security headers, and `PoolService` as gRPC-Web (unary and the change
//! feed's stream), with the same token checks as the gRPC port.

use std::time::Duration;

use e2e_tests::web::{Web, frames, write};
use e2e_tests::{Coordinators, POOL_ID, PoolArg, free_port, poolctl, wait_for};
use prost::Message;
use proto::coordinator as pb;

fn ready(p: &PoolArg) {
    wait_for(Duration::from_secs(30), || {
        poolctl(p, &["member-list"]).status.success().then_some(())
    })
    .expect("a leader within 30 s");
}

#[test]
fn the_console_port_serves_its_files_and_pool_service_as_grpc_web() {
    let dir = tempfile::tempdir().unwrap();
    let mut pool = Coordinators::start(dir.path(), 1);
    let p = pool.pool_arg();
    ready(&p);
    let addr = format!("127.0.0.1:{}", free_port());
    let web = Web {
        base: format!("https://{addr}"),
        ca: p.bundle(),
        dir: dir.path().to_owned(),
    };

    // Without the console's files: the port says how to build them.
    pool.restart_with(1, &["--web-listen", &addr]);
    let (status, _, body) = wait_for(Duration::from_secs(30), || {
        let r = web.get(&[], "/");
        (r.0 != 0).then_some(r)
    })
    .expect("the console's port answers");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("--web-root"), "{body}");

    let root = dir.path().join("dist");
    write(
        &root.join("index.html"),
        "<!doctype html><title>pool console</title>",
    );
    write(&root.join("assets/app-1a2b.js"), "console.log('pool')");
    pool.restart_with(
        1,
        &["--web-listen", &addr, "--web-root", root.to_str().unwrap()],
    );
    ready(&p);
    let (status, head, body) = wait_for(Duration::from_secs(30), || {
        let r = web.get(&[], "/");
        (r.0 == 200).then_some(r)
    })
    .expect("the console's page");
    assert!(body.contains("pool console"), "{body}");
    // HTTP/2 by ALPN, as a browser gets it, with the headers that keep the page to itself.
    assert!(head.starts_with("http/2 200"), "{head}");
    assert!(
        head.contains("content-security-policy: default-src 'self'"),
        "{head}"
    );
    assert!(head.contains("x-content-type-options: nosniff"), "{head}");
    assert!(head.contains("x-frame-options: deny"), "{head}");
    assert!(head.contains("cache-control: no-cache"), "{head}");
    let (status_js, head_js, body_js) = web.get(&["--http1.1"], "/assets/app-1a2b.js");
    assert_eq!((status, status_js), (200, 200), "{head_js}");
    assert_eq!(body_js, "console.log('pool')");
    assert!(
        head_js.contains("content-type: text/javascript"),
        "{head_js}"
    );
    assert!(head_js.contains("immutable"), "{head_js}");
    // The console's own routes load its page; files that are not there are not.
    let (status, _, body) = web.get(&[], "/vms/42");
    assert_eq!(status, 200);
    assert!(body.contains("pool console"), "{body}");
    for missing in [
        "/assets/none.js",
        "/../../etc/passwd",
        "/assets/..%2f..%2fetc/passwd",
    ] {
        let (status, _, body) = web.get(&[], missing);
        assert_eq!(status, 404, "{missing}: {body}");
        assert!(!body.contains("root:"), "{body}");
    }
    let (status, _, _) = web.get(&["-X", "POST"], "/");
    assert_eq!(status, 405);

    // A VM console's websocket opens only from this origin's pages, and with a ticket.
    let bogus = format!("/console/ws?ticket={}", "0f".repeat(32));
    for origin in [None, Some("https://elsewhere.example"), Some("null")] {
        let (status, body) = web.websocket(&bogus, origin);
        assert_eq!(status, 403, "{origin:?}: {body}");
        assert!(body.contains("own pages"), "{origin:?}: {body}");
    }
    let (status, body) = web.websocket(&bogus, Some(&web.base));
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("unknown, used or expired"), "{body}");

    // PoolService as gRPC-Web: a token is needed as on the gRPC port.
    let (msgs, trailers) = web.grpc_web("GetPool", &[], None, Duration::from_secs(10));
    assert!(
        msgs.is_empty() && trailers.contains("grpc-status:16"),
        "{trailers}"
    );
    let token = p.token.clone().expect("the admin's token");
    let (msgs, trailers) = web.grpc_web("GetPool", &[], Some(&token), Duration::from_secs(10));
    assert!(trailers.contains("grpc-status:0"), "{trailers}");
    let got = pb::Pool::decode(&msgs[0][..]).unwrap();
    assert_eq!(got.id, POOL_ID);

    // The change feed streams to a browser: the listing, then a change made meanwhile.
    let req = pb::WatchEventsRequest { after: 0 }.encode_to_vec();
    let (watching, _) = web.call("WatchEvents", &req, Some(&token), Duration::from_secs(8));
    std::thread::sleep(Duration::from_secs(2));
    let o = poolctl(&p, &["host-join", "h1", "127.0.0.1:7001"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = watching.wait_with_output().unwrap();
    let (msgs, _) = frames(&out);
    let msgs: Vec<pb::WatchEventsResponse> = msgs
        .iter()
        .map(|m| pb::WatchEventsResponse::decode(&m[..]).unwrap())
        .collect();
    assert!(msgs.first().is_some_and(|m| m.reset), "{msgs:?}");
    assert_eq!(msgs[0].events[0].kind, "pool");
    let synced = msgs
        .iter()
        .position(|m| m.synced)
        .expect("a synced message");
    let host = msgs[synced + 1..]
        .iter()
        .flat_map(|m| &m.events)
        .find(|e| e.kind == "host")
        .expect("the joined host's event after the listing");
    let Some(pb::pool_event::Object::Host(h)) = &host.object else {
        panic!("{host:?}");
    };
    assert_eq!(h.name, "h1");
    assert!(host.position > msgs[synced].position);
}
