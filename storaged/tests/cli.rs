//! The offline tools as a person uses them, and a pool on a real block device (a loop
//! device, where this machine lets the test make one).

use std::path::Path;
use std::process::{Command, Output};

fn storaged(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_storaged"))
        .args(args)
        .output()
        .expect("run storaged")
}

fn ok(args: &[&str]) -> String {
    let out = storaged(args);
    assert!(
        out.status.success(),
        "storaged {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn fails(args: &[&str]) -> String {
    let out = storaged(args);
    assert!(!out.status.success(), "storaged {args:?} should fail");
    String::from_utf8(out.stderr).unwrap()
}

#[test]
fn pool_and_volume_commands() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("sr.img");
    let f = img.to_str().unwrap();
    let out = ok(&[
        "pool", "create", "--file", f, "--size", "64M", "--name", "lab",
    ]);
    assert!(
        out.contains("lab") && out.contains("chunk size  64.0 KiB"),
        "{out}"
    );
    let err = fails(&["pool", "create", "--file", f, "--size", "64M"]);
    assert!(err.contains("already holds pool"), "{err}");
    ok(&[
        "volume", "create", "--file", f, "--name", "disk", "--size", "1G",
    ]);
    let err = fails(&[
        "volume", "create", "--file", f, "--name", "disk", "--size", "1G",
    ]);
    assert!(err.contains("already used"), "{err}");
    ok(&["volume", "snapshot", "--file", f, "disk", "--name", "snap1"]);
    ok(&["volume", "clone", "--file", f, "snap1", "--name", "copy"]);
    let list = ok(&["volume", "list", "--file", f]);
    for name in ["disk", "snap1", "copy"] {
        assert!(list.contains(name), "{list}");
    }
    let err = fails(&["volume", "resize", "--file", f, "disk", "--size", "512M"]);
    assert!(err.contains("pass force"), "{err}");
    ok(&[
        "volume", "resize", "--file", f, "disk", "--size", "512M", "--force",
    ]);
    ok(&["volume", "delete", "--file", f, "snap1"]);
    let usage = ok(&["pool", "usage", "--file", f]);
    assert!(
        usage.contains("provisioned 1.5 GiB in 2 volumes, 0 snapshots"),
        "{usage}"
    );
    ok(&["pool", "extend", "--file", f, "--size", "128M"]);
    assert!(ok(&["fsck", "--file", f]).contains("clean"));
    let err = fails(&[
        "pool",
        "usage",
        "--file",
        dir.path().join("missing").to_str().unwrap(),
    ]);
    assert!(err.contains("cannot open"), "{err}");
}

/// A loop device over a file, detached when dropped.
struct Loop(String);

impl Loop {
    fn attach(file: &Path) -> Result<Loop, String> {
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(file)
            .output()
            .map_err(|e| format!("losetup: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_owned());
        }
        Ok(Loop(String::from_utf8_lossy(&out.stdout).trim().to_owned()))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

#[test]
fn pool_on_a_block_device() {
    let dir = tempfile::tempdir().unwrap();
    let backing = dir.path().join("disk.raw");
    // A device full of old data: new chunks must still read zeros where unwritten.
    std::fs::write(&backing, vec![0xdd; 48 << 20]).unwrap();
    let dev = match Loop::attach(&backing) {
        Ok(d) => d,
        Err(e) => {
            println!(
                "SKIPPED: cannot make a loop device here ({e}); the block-device path is untested on this machine"
            );
            return;
        }
    };
    let meta = dir.path().join("meta");
    let m = meta.to_str().unwrap();
    let err = fails(&["pool", "create", "--device", &dev.0]);
    assert!(err.contains("metadata directory"), "{err}");
    ok(&[
        "pool",
        "create",
        "--device",
        &dev.0,
        "--meta-dir",
        m,
        "--name",
        "blk",
    ]);
    let pool = storaged::ThinPool::import(&storaged::ImportOptions {
        kind: storaged::BackingKind::BlockDevice,
        path: dev.0.clone().into(),
        meta_dir: None,
        expected_id: None,
    })
    .unwrap();
    assert_eq!(pool.usage().total_chunks, (47 << 20) / (64 << 10));
    let vol = pool
        .create_volume("v", 8 << 20, 512, Default::default())
        .unwrap()
        .id;
    pool.write(vol, 4096, &[7; 512]).unwrap();
    let mut buf = vec![1u8; 64 << 10];
    pool.read(vol, 0, &mut buf).unwrap();
    assert!(
        buf[..4096].iter().all(|&b| b == 0),
        "unwritten part of a new chunk reads zeros"
    );
    assert!(buf[4096..4608].iter().all(|&b| b == 7));
    assert!(buf[4608..].iter().all(|&b| b == 0));
    pool.flush().unwrap();
    drop(pool);
    assert!(ok(&["fsck", "--device", &dev.0]).contains("clean"));
    let err = fails(&[
        "pool",
        "create",
        "--device",
        &dev.0,
        "--meta-dir",
        dir.path().join("m2").to_str().unwrap(),
    ]);
    assert!(err.contains("already holds pool"), "{err}");
}
