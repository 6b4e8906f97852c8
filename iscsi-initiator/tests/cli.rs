//! The `iscsi` tool against both targets: discover, ls, inq, capacity, a file copied to
//! a LUN and back, and a short bench run.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{Peer, PeerOptions, run_limited};

fn iscsi(args: &[&str]) -> String {
    let out = run_limited(
        Command::new(env!("CARGO_BIN_EXE_iscsi")).args(args),
        Duration::from_secs(60),
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "iscsi {args:?} failed: {text}");
    text
}

fn tool(p: Peer) {
    let url = p.url();
    let portal = p.portal();
    let out = iscsi(&["discover", &portal]);
    assert!(out.contains(p.iqn()), "{out}");
    let out = iscsi(&["ls", &portal]);
    assert!(
        out.contains(&format!("Lun:{}", p.lun())) && out.contains("64.0 MiB"),
        "{out}"
    );
    let out = iscsi(&["inq", &url]);
    assert!(out.contains("Vendor:") && out.contains("Serial:"), "{out}");
    let out = iscsi(&["capacity", &url]);
    assert!(
        out.contains("67108864 bytes") && out.contains("131072 blocks of 512"),
        "{out}"
    );

    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.bin");
    let dst = dir.path().join("dst.bin");
    // Not a whole number of chunks, nor of blocks: the tail is padded with zeros.
    let data = common::pattern(1, 1, (3 << 20) + 1000);
    std::fs::write(&src, &data).unwrap();
    iscsi(&[
        "write",
        &url,
        "--in",
        src.to_str().unwrap(),
        "--lba",
        "2048",
        "--chunk",
        "262144",
        "--flush",
        "--data-digest",
    ]);
    let blocks = data.len().div_ceil(512).to_string();
    iscsi(&[
        "read",
        &url,
        "--out",
        dst.to_str().unwrap(),
        "--lba",
        "2048",
        "--blocks",
        &blocks,
        "--header-digest",
    ]);
    let back = std::fs::read(&dst).unwrap();
    assert_eq!(back.len(), blocks.parse::<usize>().unwrap() * 512);
    assert!(back[..data.len()] == data[..], "the copy differs");
    assert!(back[data.len()..].iter().all(|&b| b == 0));
    // The copy reached the backing file itself.
    let file = std::fs::read(p.lun_path()).unwrap();
    assert!(file[2048 * 512..2048 * 512 + data.len()] == data[..]);

    for args in [
        vec![
            "bench",
            &url,
            "--op",
            "read",
            "--random",
            "--qd",
            "8",
            "--seconds",
            "0.5",
        ],
        vec![
            "bench",
            &url,
            "--op",
            "write",
            "--bs",
            "65536",
            "--qd",
            "4",
            "--seconds",
            "0.5",
        ],
    ] {
        let out = iscsi(&args);
        let iops: f64 = out
            .lines()
            .find_map(|l| l.strip_prefix("iops="))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no iops= line: {out}"));
        assert!(iops > 0.0, "{out}");
    }

    // Bad input: a clear error and a failure status.
    let out = run_limited(
        Command::new(env!("CARGO_BIN_EXE_iscsi")).args(["capacity", "iscsi://host/no-lun"]),
        Duration::from_secs(10),
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("iscsi: ") && err.contains("iscsi://HOST[:PORT]/TARGET/LUN"),
        "{err}"
    );
    assert!(!err.contains("backtrace"), "{err}");
}
against_both!(tool, PeerOptions::default(), tool);
