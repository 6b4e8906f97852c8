//! Downloads from the web console's port as a browser makes them, against a real pool
//! (three `poold`, one `hostd`, one `storaged`): log in over gRPC-Web, start an export
//! with the token (`POST /export/prepare`), follow its status until it is ready, ask for
//! a one-shot ticket and download the file with the ticket alone.
//! - A running VM as an OVA: its progress reaches `ready` through the reading of its
//!   disk; the package's layout and digests are checked with `tar` and `sha256sum`, it is
//!   imported again with `poolctl vm-import` and boots on a disk with the same bytes.
//! - A disk snapshot as qcow2 (the same bytes once qemu-img reads it back); the disk of a
//!   running VM fails after its start, with the pool's words in the status.
//! - Refused: another origin, no token, a read-only user, another user's export, an
//!   unknown id, a used ticket, a third export at once; cancelled and downloaded exports
//!   leave nothing behind (no snapshot, grant, volume or file).
//! - With the repository's storaged stopped, a disk download fails after its start and
//!   says why in its status.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use e2e_tests::pool::{Api, Pool, console_line, field, guest_elf, guest_vm};
use e2e_tests::web::Web;
use e2e_tests::{ADMIN_PASSWORD, free_port, secret_file, text, wait_for};
use prost::Message;
use proto::coordinator as pb;

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// Logs in as the console's login page does: `Login` as gRPC-Web.
fn web_login(web: &Web, user: &str, password: &str) -> String {
    let req = pb::LoginRequest {
        user_name: user.into(),
        password: password.into(),
    };
    let (msgs, status) = web.grpc_web("Login", &req.encode_to_vec(), None, Duration::from_secs(10));
    let r = msgs
        .first()
        .map(|m| pb::LoginResponse::decode(&m[..]).unwrap())
        .unwrap_or_else(|| panic!("{user} logs in: {status}"));
    r.token
}

/// A call on an export route as the console's page makes it (from its own origin, with
/// `token` in a header file: a token is a secret): status and body.
fn call(
    web: &Web,
    method: &str,
    path: &str,
    token: Option<&str>,
    origin: Option<&str>,
) -> (u16, String) {
    // HTTP/2 as a browser's fetch goes: the host is in `:authority`, not `Host`.
    let mut args: Vec<String> = vec!["--http2".into(), "-X".into(), method.into()];
    if let Some(o) = origin {
        args.extend(["-H".into(), format!("Origin: {o}")]);
    }
    if let Some(t) = token {
        let n = free_port();
        let h = secret_file(
            &web.dir,
            &format!("auth-{n}"),
            &format!("authorization: Bearer {t}"),
        );
        args.extend(["-H".into(), format!("@{h}")]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (status, _, body) = web.get(&args, path);
    (status, body.trim().to_owned())
}

/// The value of `key` in poold's compact JSON (`"key":"text"` or `"key":12`).
fn json(body: &str, key: &str) -> String {
    let pat = format!("\"{key}\":");
    let at = body
        .find(&pat)
        .map(|i| i + pat.len())
        .unwrap_or_else(|| panic!("no {key} in {body}"));
    let rest = &body[at..];
    match rest.strip_prefix('"') {
        Some(text) => text.split('"').next().unwrap_or_default().to_owned(),
        None => rest.split([',', '}']).next().unwrap_or_default().to_owned(),
    }
}

/// Starts an export of `what` (`vm=<id>`, `volume=<id>&format=`) as `token`'s user.
fn prepare(web: &Web, what: &str, token: &str) -> String {
    let (code, body) = call(
        web,
        "POST",
        &format!("/export/prepare?{what}"),
        Some(token),
        Some(&web.base),
    );
    assert_eq!(code, 200, "{body}");
    json(&body, "id")
}

/// Reads export `id`'s status until it has ended: every status read, in order.
fn follow(web: &Web, id: &str, token: &str) -> Vec<String> {
    let mut seen = Vec::new();
    let start = std::time::Instant::now();
    loop {
        let (code, body) = call(
            web,
            "GET",
            &format!("/export/status?id={id}"),
            Some(token),
            None,
        );
        assert_eq!(code, 200, "{body}");
        let phase = json(&body, "phase");
        seen.push(body);
        if phase == "ready" || phase == "failed" {
            return seen;
        }
        assert!(start.elapsed() < Duration::from_secs(300), "{seen:?}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Asks for export `id`'s ticket and downloads it into `to`: status and headers.
fn fetch(web: &Web, id: &str, token: &str, to: &Path) -> (u16, String) {
    let (code, path) = call(
        web,
        "POST",
        &format!("/export/ticket?id={id}"),
        Some(token),
        Some(&web.base),
    );
    assert_eq!(code, 200, "{path}");
    assert!(path.starts_with("/export/download?ticket="), "{path}");
    download(web, &path, to)
}

/// Downloads `path` (its ticket in a curl config file, not the command line) into `to`:
/// the status and the lower-case headers.
fn download(web: &Web, path: &str, to: &Path) -> (u16, String) {
    let n = free_port();
    let config = secret_file(
        &web.dir,
        &format!("dl-{n}.curl"),
        &format!("url = \"{}{path}\"\n", web.base),
    );
    let head = web.dir.join(format!("dl-{n}.head"));
    let o = web
        .curl()
        .args(["--max-time", "300", "-o"])
        .arg(to)
        .arg("--dump-header")
        .arg(&head)
        .arg("-K")
        .arg(&config)
        .output()
        .expect("running curl");
    assert!(o.status.success(), "curl: {}", text(&o));
    let head = std::fs::read_to_string(&head).unwrap().to_lowercase();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, head)
}

/// Snapshots of every VM, export grants and volumes: what an export must leave as it was.
fn leftovers(pool: &Pool, vm_id: &str, volume_id: &str) -> (String, Vec<String>, usize) {
    let snaps = pool.ctl(&["vm-snapshot-list", vm_id]);
    let api = Api::connect(&pool.p);
    let r = pb::ListVolumeExportsRequest {
        volume_id: volume_id.into(),
    };
    let grants = api
        .call(r, |mut c, r| async move { c.list_volume_exports(r).await })
        .unwrap()
        .exports
        .into_iter()
        .flat_map(|e| e.grants.into_iter().map(|g| g.initiator_iqn))
        .collect();
    let vdis = pool.ctl(&["vdi-list", "--json"]).lines().count();
    (snaps, grants, vdis)
}

#[test]
fn a_running_vm_downloads_as_an_ova_from_the_console_port_and_boots_again() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut pool = Pool::start(d, 1);
    pool.wait_hosts_enabled();
    pool.create_sr(d, "sr1", "256M");
    let elf = guest_elf(d);

    // A disk the test guest wrote its pattern on, and a VM that checks it and runs on.
    pool.ctl(&["vdi-create", "src", "--sr", "sr1", "--size", "16M"]);
    pool.ctl(&guest_vm(
        "writer",
        "src",
        &elf,
        "seed=5 blk=write blk_kib=1024 mode=once",
        &[],
    ));
    pool.ctl(&["vm-start", "writer"]);
    pool.wait_vm("writer", "\"power\": \"stopped\"", Duration::from_secs(60));
    pool.ctl(&["vm-destroy", "writer"]);
    let source = pool.disk_bytes(d, "src");
    assert!(source[..1 << 20].iter().any(|&b| b != 0));
    let verify = "seed=5 blk=verify blk_kib=1024 mode=heartbeat hb_ms=200";
    pool.ctl(&guest_vm("web vm", "src", &elf, verify, &[]));
    pool.ctl(&["vm-start", "web vm"]);
    let line = pool.wait_vm("web vm", "\"power\": \"running\"", Duration::from_secs(60));
    let vm_id = field(&line, "id");
    let src_id = pool
        .ctl(&["vdi-list", "--json"])
        .lines()
        .find(|l| l.contains("\"name\": \"src\""))
        .map(|l| field(l, "id"))
        .unwrap();

    // Member 1 serves the console.
    let addr = format!("127.0.0.1:{}", free_port());
    pool.coordinators.restart_with(1, &["--web-listen", &addr]);
    let web = Web {
        base: format!("https://{addr}"),
        ca: pool.p.bundle(),
        dir: d.to_owned(),
    };
    let admin = wait_for(Duration::from_secs(60), || {
        let req = pb::LoginRequest {
            user_name: "admin".into(),
            password: ADMIN_PASSWORD.into(),
        };
        let (msgs, _) = web.grpc_web("Login", &req.encode_to_vec(), None, Duration::from_secs(5));
        msgs.first()
            .map(|m| pb::LoginResponse::decode(&m[..]).unwrap().token)
    })
    .unwrap_or_else(|| panic!("the console port logs the admin in\n{}", pool.logs()));
    let before = leftovers(&pool, &vm_id, &src_id);
    let scratch = d.join("poold-1/exports");
    let empty = |p: &Path| std::fs::read_dir(p).unwrap().count() == 0;
    assert!(
        empty(&scratch),
        "the member's export directory is there, empty"
    );

    // Refusals before any work: another site's page, no token, a read-only user, a VM
    // that is not there, a request that names nothing.
    let origin = web.base.clone();
    let vm_q = format!("/export/prepare?vm={vm_id}");
    let (code, body) = call(
        &web,
        "POST",
        &vm_q,
        Some(&admin),
        Some("https://elsewhere.example"),
    );
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("own pages"), "{body}");
    let (code, body) = call(&web, "POST", &vm_q, None, Some(&origin));
    assert_eq!(code, 401, "{body}");
    assert!(body.contains("requires a login"), "{body}");
    let add_user = |name: &str, role: &str| {
        let pw = format!("{name}-password-1");
        let pw_file = secret_file(d, &format!("{name}-password"), &pw);
        pool.ctl(&[
            "user-add",
            name,
            "--password-file",
            &pw_file,
            "--role",
            role,
        ]);
        web_login(&web, name, &pw)
    };
    let viewer = add_user("viewer", "read-only");
    let (code, body) = call(&web, "POST", &vm_q, Some(&viewer), Some(&origin));
    assert_eq!(code, 403, "{body}");
    assert!(
        body.contains("\"viewer\" may not call SnapshotVm"),
        "{body}"
    );
    let no_vm = "/export/prepare?vm=no-such-vm";
    let (code, body) = call(&web, "POST", no_vm, Some(&admin), Some(&origin));
    assert_eq!(code, 404, "{body}");
    let (code, body) = call(&web, "POST", "/export/prepare", Some(&admin), Some(&origin));
    assert_eq!(code, 400, "{body}");

    // The admin's export, while the VM runs: it is followed from the snapshot through
    // the reading of its disk to ready.
    let t0 = std::time::Instant::now();
    let id = prepare(&web, &format!("vm={vm_id}"), &admin);
    let seen = follow(&web, &id, &admin);
    let last = seen.last().unwrap();
    assert_eq!(json(last, "phase"), "ready", "{seen:?}\n{}", pool.logs());
    assert_eq!(json(last, "file"), "web_vm.ova", "{last}");
    // The answer came before the work was done, and the whole 16 MiB disk was read.
    assert_ne!(json(&seen[0], "phase"), "ready", "{seen:?}");
    let mib16 = (16u64 << 20).to_string();
    assert_eq!(
        (json(last, "read"), json(last, "total")),
        (mib16.clone(), mib16),
        "{last}"
    );
    eprintln!(
        "export prepared in {:?}, {} status reads",
        t0.elapsed(),
        seen.len()
    );

    // Another vm-admin may not see, cancel or download it; an unknown id is not found.
    let other = add_user("other", "vm-admin");
    let status_q = format!("/export/status?id={id}");
    let (code, body) = call(&web, "GET", &status_q, Some(&other), None);
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("another user's"), "{body}");
    let (code, body) = call(&web, "DELETE", &status_q, Some(&other), Some(&origin));
    assert_eq!(code, 403, "{body}");
    let ticket_q = format!("/export/ticket?id={id}");
    let (code, body) = call(&web, "POST", &ticket_q, Some(&other), Some(&origin));
    assert_eq!(code, 403, "{body}");
    let unknown = format!("/export/status?id={}", "0f".repeat(16));
    let (code, body) = call(&web, "GET", &unknown, Some(&admin), None);
    assert_eq!(code, 404, "{body}");
    assert!(body.contains("no export"), "{body}");

    let ova = d.join("downloaded.ova");
    let (code, path) = call(&web, "POST", &ticket_q, Some(&admin), Some(&origin));
    assert_eq!(code, 200, "{path}");
    let (code, head) = download(&web, &path, &ova);
    assert_eq!(code, 200, "{head}\n{}", pool.logs());
    assert!(
        head.contains("content-disposition: attachment; filename=\"web_vm.ova\""),
        "{head}"
    );
    let len = std::fs::metadata(&ova).unwrap().len();
    assert!(head.contains(&format!("content-length: {len}")), "{head}");
    assert_eq!(json(last, "size"), len.to_string());
    pool.wait_vm("web vm", "\"power\": \"running\"", Duration::from_secs(30));

    // A ticket opens once; an unknown one not at all; a downloaded export is gone.
    for p in [
        path.clone(),
        format!("/export/download?ticket={}", "0f".repeat(32)),
    ] {
        let (code, head) = download(&web, &p, &d.join("again.ova"));
        assert_eq!(code, 403, "{head}");
        let body = std::fs::read_to_string(d.join("again.ova")).unwrap();
        assert!(body.contains("unknown, used or expired"), "{body}");
    }
    let (code, body) = call(&web, "GET", &status_q, Some(&admin), None);
    assert_eq!(code, 404, "{body}");

    // Cancelled while it is being prepared: gone at once, and what it took goes back.
    let id2 = prepare(&web, &format!("vm={vm_id}"), &admin);
    let q2 = format!("/export/status?id={id2}");
    let (code, body) = call(&web, "DELETE", &q2, Some(&admin), Some(&origin));
    assert_eq!(code, 200, "{body}");
    let (code, body) = call(&web, "GET", &q2, Some(&admin), None);
    assert_eq!(code, 404, "{body}");

    // Nothing stays: the exports' snapshots are deleted, their grants revoked, their
    // volumes and files gone.
    let after = wait_for(Duration::from_secs(60), || {
        let now = leftovers(&pool, &vm_id, &src_id);
        (now == before && empty(&scratch)).then_some(now)
    });
    assert!(
        after.is_some(),
        "left behind: {:?} (was {before:?}), {:?}",
        leftovers(&pool, &vm_id, &src_id),
        std::fs::read_dir(&scratch).unwrap().collect::<Vec<_>>()
    );

    // A disk: the running VM's own disk fails once started, with the pool's words; its
    // snapshot downloads as qcow2 with the disk's bytes.
    let id3 = prepare(&web, &format!("volume={src_id}&format=qcow2"), &admin);
    let seen = follow(&web, &id3, &admin);
    let last = seen.last().unwrap();
    assert_eq!(json(last, "phase"), "failed", "{seen:?}");
    assert!(
        json(last, "error").contains("which is not stopped"),
        "{last}"
    );
    pool.ctl(&["vdi-snapshot", "src", "src-snap"]);
    let snap_id = pool
        .ctl(&["vdi-list", "--json"])
        .lines()
        .find(|l| l.contains("\"name\": \"src-snap\""))
        .map(|l| field(l, "id"))
        .unwrap();
    let id4 = prepare(&web, &format!("volume={snap_id}&format=qcow2"), &admin);
    let seen = follow(&web, &id4, &admin);
    assert_eq!(json(seen.last().unwrap(), "phase"), "ready", "{seen:?}");
    let qcow2 = d.join("src-snap.qcow2");
    let (code, head) = fetch(&web, &id4, &admin, &qcow2);
    assert_eq!(code, 200, "{head}");
    assert!(head.contains("filename=\"src-snap.qcow2\""), "{head}");
    let back = d.join("src-snap.raw");
    let o = Command::new("qemu-img")
        .args(["convert", "-f", "qcow2", "-O", "raw"])
        .arg(&qcow2)
        .arg(&back)
        .output()
        .unwrap();
    assert!(o.status.success(), "the download is a qcow2: {}", text(&o));
    assert!(
        std::fs::read(&back).unwrap() == source,
        "the snapshot's download differs from the disk"
    );

    // Two exports at once per member; a third waits for one to go.
    let q = format!("volume={snap_id}&format=raw");
    let held = [prepare(&web, &q, &admin), prepare(&web, &q, &admin)];
    let (code, body) = call(
        &web,
        "POST",
        &format!("/export/prepare?{q}"),
        Some(&admin),
        Some(&origin),
    );
    assert_eq!(code, 429, "{body}");
    for id in &held {
        let p = format!("/export/status?id={id}");
        let (code, body) = call(&web, "DELETE", &p, Some(&admin), Some(&origin));
        assert_eq!(code, 200, "{body}");
    }
    assert!(
        wait_for(Duration::from_secs(30), || empty(&scratch).then_some(())).is_some(),
        "cancelled exports leave no file"
    );
    pool.ctl(&["vdi-destroy", "src-snap"]);

    // Descriptor first, then the disk, then the manifest, whose digests match.
    let listing = Command::new("tar").arg("tf").arg(&ova).output().unwrap();
    let names: Vec<String> = text(&listing).lines().map(str::to_owned).collect();
    assert_eq!(
        names,
        ["web_vm.ovf", "web_vm-vda.vmdk", "web_vm.mf"],
        "{names:?}"
    );
    let unpacked = d.join("unpacked");
    std::fs::create_dir(&unpacked).unwrap();
    let o = Command::new("tar")
        .arg("xf")
        .arg(&ova)
        .arg("-C")
        .arg(&unpacked)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let mf = std::fs::read_to_string(unpacked.join("web_vm.mf")).unwrap();
    for name in &names[..2] {
        let o = Command::new("sha256sum")
            .arg(unpacked.join(name))
            .output()
            .unwrap();
        let digest = text(&o).split_whitespace().next().unwrap().to_owned();
        assert!(
            mf.contains(&format!("SHA256({name})= {digest}\n")),
            "{name}: {digest} not in {mf}"
        );
    }
    let ovf = std::fs::read_to_string(unpacked.join("web_vm.ovf")).unwrap();
    assert!(ovf.contains("web vm") && ovf.contains(verify), "{ovf}");

    // Imported again by poolctl: the same bytes, and the guest finds its pattern.
    pool.ctl(&["vm-shutdown", "web vm", "--force"]);
    pool.ctl(&["vm-import", &s(&ova), "--name", "back", "--sr", "sr1"]);
    assert!(
        pool.disk_bytes(d, "back-vda") == source,
        "the downloaded OVA's disk differs"
    );
    pool.ctl(&["vm-start", "back"]);
    let blk = console_line(&pool.p, "back", "BLK done", Duration::from_secs(60))
        .unwrap_or_else(|| panic!("the disk check of the imported VM\n{}", pool.logs()));
    assert!(blk.contains("result=ok"), "{blk}");

    // With the repository's storaged stopped, a VM export's status says what its
    // snapshot job waits on (the job retries a storaged that is away) and it is cancelled;
    // a download of the (stopped) disk fails after its start and says why.
    pool.storaged.kill();
    let id6 = prepare(&web, &format!("vm={vm_id}"), &admin);
    let q6 = format!("/export/status?id={id6}");
    let waiting = wait_for(Duration::from_secs(30), || {
        let (code, body) = call(&web, "GET", &q6, Some(&admin), None);
        assert_eq!(code, 200, "{body}");
        (json(&body, "phase") == "snapshot" && json(&body, "note").starts_with("waiting: "))
            .then_some(body)
    });
    let waiting = waiting.unwrap_or_else(|| panic!("no note of the wait\n{}", pool.logs()));
    eprintln!("a VM export with storaged stopped: {waiting}");
    let (code, body) = call(&web, "DELETE", &q6, Some(&admin), Some(&origin));
    assert_eq!(code, 200, "{body}");
    let id5 = prepare(&web, &format!("volume={src_id}&format=raw"), &admin);
    let seen = follow(&web, &id5, &admin);
    let last = seen.last().unwrap();
    assert_eq!(json(last, "phase"), "failed", "{seen:?}");
    assert!(json(last, "error").contains(&src_id), "{last}");
    eprintln!("with storaged stopped: {}", json(last, "error"));
    // The cancelled one lets go of its directory at its next look (its job goes on).
    assert!(
        wait_for(Duration::from_secs(10), || empty(&scratch).then_some(())).is_some(),
        "failed and cancelled exports leave no file"
    );
}
