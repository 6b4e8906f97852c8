//! The web console as its users get it: `poolctl lab` builds the pages from web/ and every
//! member serves them; Debian's Chromium (driven by web/e2e/console.mjs) logs in, follows
//! the pool live, finds and drives a VM (its serial console, migrate, force off, start,
//! typing and sending text to the guest; export with its progress shown, suspend and
//! resume; a checkpoint, and a revert to it on a host named in the page, checked through
//! the API; a schedule keeping one snapshot, run twice from its page, then deleted, its
//! snapshot kept, checked through the API; guest networks made in the networks page's form,
//! a bad subnet refused in the pool's words, a VIF added to a stopped VM with an address
//! the pool hands out from the network's range (checked through the API), an address
//! outside the range refused, readdressed, the network's ranges narrowed past it refused
//! then cleared in its panel, its destruction refused while the VIF is on it, then done),
//! downloads a disk as qcow2 and logs out; a read-only user is offered no action.
//! Screenshots of each view are kept in target/tmp/console-shots.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use e2e_tests::pool::field;
use e2e_tests::web::Web;
use e2e_tests::{binary, lab, secret_file, text};
use prost::Message;
use proto::coordinator as pb;

#[test]
fn the_console_logs_in_follows_the_pool_live_and_drives_a_vm() {
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        Path::new(&chromium).exists(),
        "the console's browser test needs Chromium at {chromium} (Debian: apt-get install chromium)"
    );
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("lab");
    let web = Path::new(env!("CARGO_MANIFEST_DIR")).join("../web");
    // Two hosts, so the browser can migrate the demo VM.
    let pool = lab::start(&dir, &["--hosts", "2"]);
    assert!(
        web.join("dist/index.html").is_file(),
        "the lab built the console's pages: {}",
        std::fs::read_to_string(dir.join("logs/console-build.log")).unwrap_or_default()
    );

    // What changes the pool behind the browser's back: poolctl, with the lab's config.
    let change = tmp.path().join("change.sh");
    std::fs::write(
        &change,
        format!(
            "#!/bin/sh\nset -e\n\
             pc() {{ env -u POOLCTL_TOKEN '{}' --config '{}' \"$@\"; }}\n\
             ctl() {{ pc \"$@\" >&2; }}\n\
             case \"$1\" in\n\
             disk) ctl vdi-create console-e2e --sr lab-sr --size 16M; echo console-e2e ;;\n\
             echo) ctl vm-set demo --cmdline 'seed=1 then=echo' ;;\n\
             heartbeat) ctl pool-set --heartbeat-timeout 2 ;;\n\
             kill-host) kill -KILL $(pgrep -f -- \"--host-id $2 \") ;;\n\
             vm) pc vm-show \"$2\" --json ;;\n\
             snapshots) pc vm-snapshot-list \"$2\" --json ;;\n\
             vifs) pc vif-list --vm \"$2\" --json ;;\n\
             *) echo \"unknown change $1\" >&2; exit 2 ;;\n\
             esac\n",
            binary("poolctl").display(),
            dir.join("client.toml").display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&change, std::fs::Permissions::from_mode(0o700)).unwrap();
    // A read-only user, for the browser to find no action offered.
    let viewer_pw = secret_file(tmp.path(), "viewer-password", "viewer-secret");
    lab::ctl_ok(
        &dir,
        &[
            "user-add",
            "viewer",
            "--password-file",
            &viewer_pw,
            "--role",
            "read-only",
        ],
    );
    let shots = Path::new(env!("CARGO_TARGET_TMPDIR")).join("console-shots");
    let _ = std::fs::remove_dir_all(&shots);

    let out = Command::new("node")
        .arg("e2e/console.mjs")
        .current_dir(&web)
        .env("CONSOLE_URL", "https://127.0.0.1:7141/")
        .env("CONSOLE_CERT", dir.join("pki/member-1/cert.pem"))
        .env("CONSOLE_PASSWORD_FILE", dir.join("pki/admin-password"))
        .env("CONSOLE_CHANGE", &change)
        .env("CHROMIUM", &chromium)
        .env("CONSOLE_SHOTS", &shots)
        .env("CONSOLE_VIEWER_PASSWORD_FILE", &viewer_pw)
        .output()
        .expect("running node (Node.js 20 or later)");
    let said = text(&out);
    println!("{said}");
    if !(out.status.success() && said.contains("CONSOLE E2E OK")) {
        lab::stop(pool);
        panic!("the browser test failed:\n{said}");
    }
    console_tickets(tmp.path(), &dir);
    lab::stop(pool);
}

/// What the browser test cannot see: a console ticket opens one websocket, only for a
/// caller allowed the console (not `viewer`, read-only), and not once its token is revoked.
fn console_tickets(tmp: &Path, dir: &Path) {
    let web = Web {
        base: "https://127.0.0.1:7141".into(),
        ca: dir.join("pki/member-1").join(pool_trust::BUNDLE_FILE),
        dir: tmp.to_owned(),
    };
    let admin = std::fs::read_to_string(dir.join("client.toml"))
        .unwrap()
        .lines()
        .find_map(|l| {
            Some(
                l.strip_prefix("token = \"")?
                    .trim_end_matches('"')
                    .to_owned(),
            )
        })
        .expect("the lab's token in client.toml");
    let vms = lab::ctl_ok(dir, &["vm-list", "--json"]);
    let demo = vms
        .lines()
        .find(|l| l.contains("\"name\": \"demo\""))
        .map(|l| field(l, "id"))
        .expect("the demo VM");
    let ticket = |token: &str| {
        let req = pb::CreateConsoleTicketRequest {
            vm_id: demo.clone(),
        };
        let (msgs, status) = web.grpc_web(
            "CreateConsoleTicket",
            &req.encode_to_vec(),
            Some(token),
            Duration::from_secs(10),
        );
        let t = msgs
            .first()
            .map(|m| pb::ConsoleTicket::decode(&m[..]).unwrap());
        (t, status)
    };

    let (t, status) = ticket(&admin);
    let t = t.unwrap_or_else(|| panic!("a ticket for the admin: {status}"));
    assert_eq!(t.path, "/console/ws");
    let path = format!("{}?ticket={}", t.path, t.ticket);
    let (code, body) = web.websocket(&path, Some(&web.base));
    assert_eq!(code, 101, "{body}");
    let (code, body) = web.websocket(&path, Some(&web.base));
    assert_eq!(code, 403, "a ticket opens once: {body}");
    assert!(body.contains("used"), "{body}");

    // A read-only user may watch the pool but not reach a console.
    let pw = tmp.join("viewer-password");
    let pw = pw.to_str().unwrap();
    let viewer = lab::ctl_ok(dir, &["login", "viewer", "--password-file", pw]);
    let (t, status) = ticket(viewer.lines().next().unwrap().trim());
    assert!(
        t.is_none() && status.contains("grpc-status:7"),
        "read-only: {status}"
    );

    // A ticket whose holder's tokens are revoked before it is used opens nothing.
    let (t, status) = ticket(&admin);
    let t = t.unwrap_or_else(|| panic!("{status}"));
    lab::ctl_ok(dir, &["user-revoke-tokens", "admin"]);
    let (code, body) = web.websocket(&format!("{}?ticket={}", t.path, t.ticket), Some(&web.base));
    assert_eq!(code, 403, "{body}");
}
