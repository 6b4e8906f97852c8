//! A VM exported from the web console's port as a browser does it, against a real pool
//! (three `poold`, one `hostd`, one `storaged`): log in over gRPC-Web, ask for a ticket
//! with the token (`POST /export/ticket`), download the OVA with the ticket alone, of a
//! VM that runs meanwhile. The package's layout and digests are checked with `tar` and
//! `sha256sum`, it is imported again with `poolctl vm-import` and boots on a disk with
//! the same bytes. Refused: another origin, no token, a read-only user, a used or
//! unknown ticket; and nothing stays behind (no snapshot, grant, volume or file).

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

/// The bytes of a disk, exported raw by poolctl.
fn disk_bytes(pool: &Pool, dir: &Path, vdi: &str) -> Vec<u8> {
    let file = dir.join(format!("{vdi}.raw"));
    let _ = std::fs::remove_file(&file);
    pool.ctl(&["vdi-export", vdi, &s(&file)]);
    std::fs::read(&file).unwrap()
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

/// `POST /export/ticket?vm=` as the console's page sends it (from its own origin, with
/// `token` in a header file: a token is a secret): status and body.
fn ask_ticket(web: &Web, vm_id: &str, token: Option<&str>, origin: Option<&str>) -> (u16, String) {
    // HTTP/2 as a browser's fetch goes: the host is in `:authority`, not `Host`.
    let mut args: Vec<String> = vec!["--http2".into(), "-X".into(), "POST".into()];
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
    let (status, _, body) = web.get(&args, &format!("/export/ticket?vm={vm_id}"));
    (status, body.trim().to_owned())
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
    let source = disk_bytes(&pool, d, "src");
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

    // Refusals before any work: another site's page, no token, a read-only user, and a
    // VM that is not there.
    let origin = web.base.clone();
    let (code, body) = ask_ticket(
        &web,
        &vm_id,
        Some(&admin),
        Some("https://elsewhere.example"),
    );
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("own pages"), "{body}");
    let (code, body) = ask_ticket(&web, &vm_id, None, Some(&origin));
    assert_eq!(code, 401, "{body}");
    assert!(body.contains("requires a login"), "{body}");
    let viewer_pw = "viewer-password-1";
    let pw_file = secret_file(d, "viewer-password", viewer_pw);
    pool.ctl(&[
        "user-add",
        "viewer",
        "--password-file",
        &pw_file,
        "--role",
        "read-only",
    ]);
    let viewer = web_login(&web, "viewer", viewer_pw);
    let (code, body) = ask_ticket(&web, &vm_id, Some(&viewer), Some(&origin));
    assert_eq!(code, 403, "{body}");
    assert!(
        body.contains("\"viewer\" may not call SnapshotVm"),
        "{body}"
    );
    let (code, body) = ask_ticket(&web, "no-such-vm", Some(&admin), Some(&origin));
    assert_eq!(code, 404, "{body}");

    // The admin's download, while the VM runs.
    let (code, path) = ask_ticket(&web, &vm_id, Some(&admin), Some(&origin));
    assert_eq!(code, 200, "{path}");
    assert!(path.starts_with("/export/download?ticket="), "{path}");
    let ova = d.join("downloaded.ova");
    let (code, head) = download(&web, &path, &ova);
    assert_eq!(code, 200, "{head}\n{}", pool.logs());
    assert!(
        head.contains("content-disposition: attachment; filename=\"web_vm.ova\""),
        "{head}"
    );
    let len = std::fs::metadata(&ova).unwrap().len();
    assert!(head.contains(&format!("content-length: {len}")), "{head}");
    pool.wait_vm("web vm", "\"power\": \"running\"", Duration::from_secs(30));

    // A ticket opens once; an unknown one not at all.
    for p in [
        path.clone(),
        format!("/export/download?ticket={}", "0f".repeat(32)),
    ] {
        let (code, head) = download(&web, &p, &d.join("again.ova"));
        assert_eq!(code, 403, "{head}");
        let body = std::fs::read_to_string(d.join("again.ova")).unwrap();
        assert!(body.contains("unknown, used or expired"), "{body}");
    }

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

    // Nothing stays: the export's snapshot is deleted, its grants revoked, its volumes
    // and files gone.
    let after = wait_for(Duration::from_secs(30), || {
        let now = leftovers(&pool, &vm_id, &src_id);
        (now == before && empty(&scratch)).then_some(now)
    });
    assert!(
        after.is_some(),
        "left behind: {:?} (was {before:?}), {:?}",
        leftovers(&pool, &vm_id, &src_id),
        std::fs::read_dir(&scratch).unwrap().collect::<Vec<_>>()
    );

    // Imported again by poolctl: the same bytes, and the guest finds its pattern.
    pool.ctl(&["vm-shutdown", "web vm", "--force"]);
    pool.ctl(&["vm-import", &s(&ova), "--name", "back", "--sr", "sr1"]);
    assert!(
        disk_bytes(&pool, d, "back-vda") == source,
        "the downloaded OVA's disk differs"
    );
    pool.ctl(&["vm-start", "back"]);
    let blk = console_line(&pool.p, "back", "BLK done", Duration::from_secs(60))
        .unwrap_or_else(|| panic!("the disk check of the imported VM\n{}", pool.logs()));
    assert!(blk.contains("result=ok"), "{blk}");
}
