//! The web console's pages for the lab: `--web-root`, or the workspace's `web/dist`,
//! built with npm when missing or older than its sources. A machine without Node.js (or
//! a build that fails) gets a clear message and a pool without the pages: every member's
//! console port then says how to install them, and PoolService still answers there.

use std::path::{Path, PathBuf};
use std::process::{Command as Proc, Stdio};
use std::time::SystemTime;

use anyhow::{Context, bail};

/// The directory the members serve, or None (with the reason printed) for none.
pub fn root(given: Option<&Path>, logs: &Path) -> anyhow::Result<Option<PathBuf>> {
    if let Some(dir) = given {
        if !dir.join("index.html").is_file() {
            bail!(
                "--web-root {}: no index.html there (build the console with `npm run build` in web/)",
                dir.display()
            );
        }
        return Ok(Some(dir.to_owned()));
    }
    let web = Path::new(env!("CARGO_MANIFEST_DIR")).join("../web");
    let Ok(web) = web.canonicalize() else {
        eprintln!(
            "the web console's sources are not beside this poolctl; the pool runs without \
             its pages (--web-root names built ones)"
        );
        return Ok(None);
    };
    let dist = web.join("dist");
    let built = modified(&dist.join("index.html"));
    if built.is_some() && built >= newest(&web)? {
        return Ok(Some(dist));
    }
    if Proc::new("npm")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_err()
    {
        eprintln!(
            "the web console needs Node.js and npm to build ({}); the pool runs without its \
             pages. Install them (Debian: apt-get install nodejs npm) and run the lab again.",
            web.display()
        );
        return Ok(None);
    }
    let log = logs.join("console-build.log");
    eprintln!(
        "building the web console (npm; output in {})",
        log.display()
    );
    let installed = modified(&web.join("node_modules/.package-lock.json"));
    let mut steps: Vec<&[&str]> = Vec::new();
    if installed.is_none() || installed < modified(&web.join("package-lock.json")) {
        steps.push(&["ci", "--no-audit", "--no-fund"]);
    }
    steps.push(&["run", "build"]);
    for step in steps {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("{}", log.display()))?;
        let ok = Proc::new("npm")
            .args(step)
            .current_dir(&web)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!(
                "`npm {}` in {} failed (see {}); the pool runs without the console's pages",
                step.join(" "),
                web.display(),
                log.display()
            );
            return Ok(None);
        }
    }
    Ok(Some(dist))
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// The newest change to the console's sources (and to the protocol it is generated from).
fn newest(web: &Path) -> anyhow::Result<Option<SystemTime>> {
    let mut newest = None;
    let mut dirs = vec![web.join("src"), web.join("../proto/proto")];
    for f in ["index.html", "package-lock.json", "vite.config.ts"] {
        newest = newest.max(modified(&web.join(f)));
    }
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).with_context(|| format!("{}", dir.display()))? {
            let entry = entry?;
            let path = entry.path();
            // What the build generates is not a source.
            if path.ends_with("src/gen") {
                continue;
            }
            if entry.file_type()?.is_dir() {
                dirs.push(path);
            } else {
                newest = newest.max(modified(&path));
            }
        }
    }
    Ok(newest)
}
