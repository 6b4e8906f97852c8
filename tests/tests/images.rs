//! Standard image formats in and out against a real pool (three `poold`, one `hostd`,
//! one `storaged`), through `poolctl` as a person would, with images made by Debian's
//! `qemu-img`: a disk the test guest wrote its pattern on, exported raw, made a qcow2,
//! imported, booted (the guest verifies the pattern) and exported again as raw and qcow2
//! byte for byte; the raw itself and it made a VMDK, a VHD and a VHDX, each imported and
//! compared;
//! the VM exported as an OVA, re-imported and booted; a VM's interfaces carried by network
//! name; then the refusals, each leaving the pool without a new disk or VM.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use e2e_tests::pool::{Api, Pool, console_line, field, guest_elf, guest_vm};
use e2e_tests::{poolctl, text};
use proto::coordinator as pb;

const DISK: &str = "16M";
/// The guest's pattern region: 1 MiB at the start of the disk.
const PATTERN_KIB: &str = "1024";

fn qemu_img(args: &[&str]) -> String {
    let o = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img (Debian's qemu-utils)");
    assert!(o.status.success(), "qemu-img {args:?}: {}", text(&o));
    text(&o)
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

fn volume_id(pool: &Pool, name: &str) -> String {
    let vdis = pool.ctl(&["vdi-list", "--json"]);
    vdis.lines()
        .find(|l| l.contains(&format!("\"name\": \"{name}\"")))
        .map(|l| field(l, "id"))
        .unwrap_or_else(|| panic!("{name} in {vdis}"))
}

fn allocated(pool: &Pool, name: &str) -> u64 {
    let api = Api::connect(&pool.p);
    let r = pb::GetVolumeRequest {
        volume_id: volume_id(pool, name),
    };
    api.call(r, |mut c, r| async move { c.get_volume(r).await })
        .unwrap()
        .allocated_bytes
}

/// The names of every disk and VM, to see that a refusal made none.
fn inventory(pool: &Pool) -> (usize, usize) {
    let vdis = pool.ctl(&["vdi-list", "--json"]).lines().count();
    let vms = pool.ctl(&["vm-list", "--json"]).lines().count();
    (vdis, vms)
}

/// `poolctl args` must fail with a message containing each of `want`, and leave every
/// disk and VM as they were.
fn refused(pool: &Pool, args: &[&str], want: &[&str]) {
    let before = inventory(pool);
    let o = poolctl(&pool.p, args);
    let out = text(&o);
    assert!(!o.status.success(), "{args:?} succeeded: {out}");
    for w in want {
        assert!(out.contains(w), "{args:?}: {w:?} not in {out}");
    }
    assert_eq!(inventory(pool), before, "{args:?} left something behind");
}

/// Boots VM `name` and returns its disk check line once the guest printed it.
fn boot_and_check(pool: &Pool, name: &str) -> String {
    pool.ctl(&["vm-start", name]);
    let blk = console_line(&pool.p, name, "BLK done", Duration::from_secs(60))
        .unwrap_or_else(|| panic!("the disk check of {name}\n{}", pool.logs()));
    pool.ctl(&["vm-shutdown", name, "--force"]);
    pool.wait_vm(name, "\"power\": \"stopped\"", Duration::from_secs(60));
    blk
}

#[test]
fn images_and_ova_packages_in_and_out_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pool = Pool::start(d, 1);
    pool.wait_hosts_enabled();
    pool.create_sr(d, "sr1", "256M");
    let elf = guest_elf(d);

    // A raw image of a disk the test guest wrote its pattern on.
    pool.ctl(&["vdi-create", "src", "--sr", "sr1", "--size", DISK]);
    let write = format!("seed=5 blk=write blk_kib={PATTERN_KIB} mode=once");
    pool.ctl(&guest_vm("writer", "src", &elf, &write, &[]));
    pool.ctl(&["vm-start", "writer"]);
    pool.wait_vm("writer", "\"power\": \"stopped\"", Duration::from_secs(60));
    let raw = d.join("guest.raw");
    let source = pool.disk_bytes(d, "src");
    std::fs::write(&raw, &source).unwrap();
    assert!(source[..1 << 20].iter().any(|&b| b != 0));

    // qcow2 in: the same bytes, the disk thin (the pattern's chunks only), and the guest
    // finds its pattern on it.
    let qcow2 = d.join("guest.qcow2");
    qemu_img(&["convert", "-f", "raw", "-O", "qcow2", &s(&raw), &s(&qcow2)]);
    let out = pool.ctl(&["vdi-import", &s(&qcow2), "q-disk", "--sr", "sr1"]);
    assert!(
        pool.disk_bytes(d, "q-disk") == source,
        "qcow2 import differs: {out}"
    );
    let used = allocated(&pool, "q-disk");
    assert!(
        used <= 2 << 20,
        "a 16 MiB disk with 1 MiB of data holds {used} bytes"
    );
    let verify = format!("seed=5 blk=verify blk_kib={PATTERN_KIB} mode=heartbeat hb_ms=200");
    pool.ctl(&guest_vm("q", "q-disk", &elf, &verify, &[]));
    let blk = boot_and_check(&pool, "q");
    assert!(blk.contains("result=ok"), "{blk}");

    // qcow2 out: qemu-img reads back the same bytes.
    let out_qcow2 = d.join("q-out.qcow2");
    pool.ctl(&["vdi-export", "q-disk", &s(&out_qcow2), "--format", "qcow2"]);
    assert!(qemu_img(&["info", &s(&out_qcow2)]).contains("file format: qcow2"));
    let back = d.join("q-out.raw");
    qemu_img(&[
        "convert",
        "-f",
        "qcow2",
        "-O",
        "raw",
        &s(&out_qcow2),
        &s(&back),
    ]);
    assert!(
        std::fs::read(&back).unwrap() == source,
        "qcow2 export differs"
    );

    // Raw, VMDK, VHD and VHDX in.
    pool.ctl(&["vdi-import", &s(&raw), "raw-disk", "--sr", "sr1"]);
    assert!(
        pool.disk_bytes(d, "raw-disk") == source,
        "raw import differs"
    );
    for (fmt, opts, name) in [
        ("vmdk", "", "vmdk-disk"),
        ("vmdk", "subformat=streamOptimized", "vmdk-stream-disk"),
        ("vpc", "force_size=on", "vhd-disk"),
        ("vhdx", "", "vhdx-disk"),
    ] {
        let img = d.join(format!("{name}.{fmt}"));
        let mut args = vec!["convert", "-f", "raw", "-O", fmt];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        let (r, i) = (s(&raw), s(&img));
        args.extend([r.as_str(), i.as_str()]);
        qemu_img(&args);
        pool.ctl(&["vdi-import", &i, name, "--sr", "sr1"]);
        assert!(
            pool.disk_bytes(d, name) == source,
            "{name} differs from the raw source"
        );
    }

    // The VM as an OVA: descriptor first, then the disk, then the manifest; re-imported
    // as a new VM that boots on a new disk with the same bytes.
    let ova = d.join("q.ova");
    pool.ctl(&["vm-export", "q", &s(&ova)]);
    let listing = Command::new("tar").arg("tf").arg(&ova).output().unwrap();
    let names: Vec<String> = text(&listing).lines().map(str::to_owned).collect();
    assert_eq!(names, ["q.ovf", "q-vda.vmdk", "q.mf"], "{names:?}");
    let id = pool.ctl(&["vm-import", &s(&ova), "--name", "q2", "--sr", "sr1"]);
    assert!(pool.vm("q2").is_some(), "{id}");
    assert!(
        pool.disk_bytes(d, "q2-vda") == source,
        "the OVA's disk differs"
    );
    let blk = boot_and_check(&pool, "q2");
    assert!(blk.contains("result=ok"), "{blk}");
    // A running VM is exported from one of its snapshots.
    pool.ctl(&["vm-start", "q2"]);
    refused(
        &pool,
        &["vm-export", "q2", &s(&d.join("r.ova"))],
        &["not stopped"],
    );
    pool.ctl(&["vm-snapshot", "q2", "s1"]);
    pool.ctl(&["vm-export", "q2", &s(&d.join("s1.ova")), "--snapshot", "s1"]);
    pool.ctl(&[
        "vm-import",
        &s(&d.join("s1.ova")),
        "--name",
        "q3",
        "--sr",
        "sr1",
    ]);
    assert!(
        pool.disk_bytes(d, "q3-vda") == source,
        "the snapshot's OVA differs"
    );

    // Interfaces travel by their network's name: on the pool's network of that name
    // when it has one, left out (with a warning) when not.
    pool.ctl(&["network-create", "lan", "--kind", "private"]);
    pool.ctl(&["network-create", "dmz", "--kind", "private"]);
    pool.ctl(&["vdi-create", "n-disk", "--sr", "sr1", "--size", "1M"]);
    pool.ctl(&guest_vm(
        "n",
        "n-disk",
        &elf,
        "mode=once",
        &["--network", "lan", "--network", "dmz"],
    ));
    let n_ova = d.join("n.ova");
    pool.ctl(&["vm-export", "n", &s(&n_ova)]);
    pool.ctl(&["vm-destroy", "n"]);
    pool.ctl(&["network-destroy", "dmz"]);
    let o = poolctl(
        &pool.p,
        &["vm-import", &s(&n_ova), "--name", "n2", "--sr", "sr1"],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("no network \"dmz\""), "{}", text(&o));
    let n2 = pool.ctl(&["vm-list", "--json"]);
    let n2 = n2
        .lines()
        .find(|l| l.contains("\"name\": \"n2\""))
        .unwrap_or_else(|| panic!("n2 in {n2}"));
    let vifs = field(n2, "vifs");
    assert!(vifs.starts_with("lan=") && !vifs.contains(','), "{n2}");

    // Refusals, each leaving no disk or VM behind.
    pool.create_sr(d, "tiny", "8M");
    let big = d.join("big.qcow2");
    qemu_img(&["create", "-f", "qcow2", &s(&big), "1T"]);
    refused(
        &pool,
        &["vdi-import", &s(&big), "big", "--sr", "sr1"],
        &["virtual size", "free", "nothing was created"],
    );
    refused(
        &pool,
        &["vm-import", &s(&ova), "--name", "q4", "--sr", "tiny"],
        &["virtual size", "free"],
    );
    let vdi = d.join("virtualbox.vdi");
    qemu_img(&["create", "-f", "vdi", &s(&vdi), "1M"]);
    refused(
        &pool,
        &["vdi-import", &s(&vdi), "vb", "--sr", "sr1"],
        &["vdi image, a format not imported"],
    );
    let outside = d.join("outside.qcow2");
    qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "/etc/passwd",
        "-F",
        "raw",
        &s(&outside),
        "1M",
    ]);
    refused(
        &pool,
        &["vdi-import", &s(&outside), "leak", "--sr", "sr1"],
        &["/etc/passwd", "outside"],
    );
    let elsewhere = tempfile::tempdir().unwrap();
    let data_file = elsewhere.path().join("data.raw");
    let external = d.join("external.qcow2");
    let opts = format!("data_file={},data_file_raw=on", s(&data_file));
    qemu_img(&["create", "-f", "qcow2", "-o", &opts, &s(&external), "1M"]);
    refused(
        &pool,
        &["vdi-import", &s(&external), "leak2", "--sr", "sr1"],
        &["data file", "outside"],
    );

    // An OVA without its manifest, and one whose disk changed after it was written.
    let parts = d.join("parts");
    std::fs::create_dir(&parts).unwrap();
    let untar = Command::new("tar")
        .arg("xf")
        .arg(&ova)
        .arg("-C")
        .arg(&parts)
        .status()
        .unwrap();
    assert!(untar.success());
    let no_mf = d.join("no-mf.ova");
    let tar = Command::new("tar")
        .arg("cf")
        .arg(&no_mf)
        .arg("-C")
        .arg(&parts)
        .args(["q.ovf", "q-vda.vmdk"])
        .status()
        .unwrap();
    assert!(tar.success());
    refused(
        &pool,
        &["vm-import", &s(&no_mf), "--name", "q5"],
        &["no manifest"],
    );
    let mut bytes = std::fs::read(&ova).unwrap();
    let header = bytes
        .windows(11)
        .position(|w| w == b"q-vda.vmdk\0")
        .expect("the disk's tar header");
    bytes[header + 512 + 4096] ^= 0x20;
    let altered = d.join("altered.ova");
    std::fs::write(&altered, &bytes).unwrap();
    refused(
        &pool,
        &["vm-import", &s(&altered), "--name", "q6", "--sr", "sr1"],
        &["q-vda.vmdk", "SHA-256"],
    );
}

/// Figures, not a check: a 2 GiB qcow2 image whose every cluster holds data, imported
/// with `vdi-import` (volume creation and grant included), and written by `qemu-img
/// convert` (its own iSCSI initiator, `-n --target-is-zero`) to new volumes of the same
/// repository through the same kind of grant; ROUNDS rounds taking turns (each round
/// starting with the next variant), each volume deleted after its round.
///
/// vdi-import says done only when the disk is durable (SYNCHRONIZE CACHE answered).
/// qemu-img convert's own default cache mode for its output is `unsafe`: it never asks
/// the target to flush, so it exits with the volume's data still in storaged's page
/// cache, and the revoke after it pays the write-back. The ratio is therefore taken
/// against qemu-img with `-t writeback` (it flushes before it exits), as it comes and
/// with `-W -m 16`, the better of the two medians; qemu-img's default is printed too,
/// for reference. Prints `BENCH import_vs_qemu_img <that median / ours> ratio`. Run with
/// `cargo test -p e2e-tests --test images -- --ignored --nocapture` (about 9 GB of
/// disk).
#[test]
#[ignore]
fn import_vs_qemu_img() {
    const SIZE: usize = 2 << 30;
    // As many rounds as variants: each starts one round, and follows each other once.
    const ROUNDS: usize = 4;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pool = Pool::start(d, 1);
    pool.wait_hosts_enabled();
    pool.create_sr(d, "sr1", "8G");
    let raw = d.join("big.raw");
    {
        use std::io::Write;
        let mut f = std::io::BufWriter::new(std::fs::File::create(&raw).unwrap());
        for m in 0..SIZE >> 20 {
            let block: Vec<u8> = (0..1 << 20).map(|i| ((i + m) % 251) as u8 | 1).collect();
            f.write_all(&block).unwrap();
        }
    }
    let qcow2 = d.join("big.qcow2");
    qemu_img(&["convert", "-f", "raw", "-O", "qcow2", &s(&raw), &s(&qcow2)]);
    std::fs::remove_file(&raw).unwrap();

    // Ours; qemu-img flushing before it exits (eight coroutines, writes in order; then
    // out of order with sixteen); qemu-img as it comes (no flush).
    let variants: [(&str, &[&str]); 4] = [
        ("vdi-import", &[]),
        ("qemu-img -t writeback", &["-t", "writeback"]),
        (
            "qemu-img -t writeback -W -m 16",
            &["-t", "writeback", "-W", "-m", "16"],
        ),
        ("qemu-img as it comes (no flush)", &[]),
    ];
    let mut times: [Vec<f64>; 4] = Default::default();
    for round in 0..ROUNDS {
        for k in 0..variants.len() {
            let which = (round + k) % variants.len();
            let name = format!("v{which}-{round}");
            let took = if which == 0 {
                let start = Instant::now();
                pool.ctl(&["vdi-import", &s(&qcow2), &name, "--sr", "sr1"]);
                start.elapsed().as_secs_f64()
            } else {
                qemu_img_to_new_volume(&pool, d, &qcow2, &name, variants[which].1)
            };
            times[which].push(took);
            pool.ctl(&["vdi-destroy", &name]);
        }
    }
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        (v[(n - 1) / 2] + v[n / 2]) / 2.0
    };
    let medians = times.each_ref().map(|t| median(t));
    let mib = (SIZE >> 20) as f64;
    for (i, (what, _)) in variants.iter().enumerate() {
        println!("runs (s): {what} {:.2?}", times[i]);
    }
    let line: Vec<String> = variants
        .iter()
        .zip(medians)
        .map(|((what, _), t)| format!("{what} {t:.2} s ({:.0} MiB/s)", mib / t))
        .collect();
    println!(
        "qcow2 import of 2 GiB to iscsi://, medians of {ROUNDS}: {}",
        line.join("; ")
    );
    let theirs = medians[1].min(medians[2]);
    println!("BENCH import_vs_qemu_img {:.2} ratio", theirs / medians[0]);
}

/// Seconds `qemu-img convert` (with `extra` options) takes to write `image` to a new 2 GiB
/// volume `name` through its own iSCSI initiator, granted as poolctl is.
fn qemu_img_to_new_volume(pool: &Pool, d: &Path, image: &Path, name: &str, extra: &[&str]) -> f64 {
    pool.ctl(&["vdi-create", name, "--sr", "sr1", "--size", "2G"]);
    let api = Api::connect(&pool.p);
    let initiator = format!("iqn.2026-11.org.pool.bench:qemu-img-{name}");
    let req = pb::VolumeAccessRequest {
        volume_id: volume_id(pool, name),
        initiator_iqn: initiator.clone(),
    };
    let access = api
        .call(req.clone(), |mut c, r| async move {
            c.open_volume_access(r).await
        })
        .unwrap();
    // The CHAP secret goes to qemu-img in a 0600 file (without a newline, which qemu
    // would take as part of it), never on its command line.
    let secret = s(&d.join(format!("chap-{name}")));
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&secret)
            .unwrap();
        f.write_all(access.chap_secret.as_bytes()).unwrap();
    }
    let target = format!(
        "driver=raw,file.driver=iscsi,file.transport=tcp,file.portal={},file.target={},\
         file.lun={},file.user={},file.password-secret=chap0,file.initiator-name={initiator}",
        access.portal, access.target_iqn, access.lun, access.chap_username
    );
    let object = format!("secret,id=chap0,file={secret}");
    let src = s(image);
    let mut args = vec!["convert", "-n", "--target-is-zero", "--object", &object];
    args.extend_from_slice(extra);
    args.extend(["-f", "qcow2", &src, "--target-image-opts", &target]);
    let start = Instant::now();
    qemu_img(&args);
    let took = start.elapsed().as_secs_f64();
    api.call(
        req,
        |mut c, r| async move { c.close_volume_access(r).await },
    )
    .unwrap();
    took
}
