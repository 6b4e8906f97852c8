//! The web console as its users get it: `poolctl lab` builds the pages from web/ and every
//! member serves them; Debian's Chromium (driven by web/e2e/console.mjs) logs in, follows
//! the pool live, finds and drives a VM (migrate, force off, start) and logs out.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use e2e_tests::{binary, lab, text};

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
            "#!/bin/sh\nset -e\nenv -u POOLCTL_TOKEN '{}' --config '{}' vdi-create console-e2e \
             --sr lab-sr --size 16M >&2\necho console-e2e\n",
            binary("poolctl").display(),
            dir.join("client.toml").display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&change, std::fs::Permissions::from_mode(0o700)).unwrap();

    let out = Command::new("node")
        .arg("e2e/console.mjs")
        .current_dir(&web)
        .env("CONSOLE_URL", "https://127.0.0.1:7141/")
        .env("CONSOLE_CERT", dir.join("pki/member-1/cert.pem"))
        .env("CONSOLE_PASSWORD_FILE", dir.join("pki/admin-password"))
        .env("CONSOLE_CHANGE", &change)
        .env("CHROMIUM", &chromium)
        .output()
        .expect("running node (Node.js 20 or later)");
    let said = text(&out);
    println!("{said}");
    lab::stop(pool);
    assert!(
        out.status.success() && said.contains("CONSOLE E2E OK"),
        "the browser test failed:\n{said}"
    );
}
