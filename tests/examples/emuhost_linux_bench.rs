//! Runs hostd's `linux_bench` where KVM runs Linux (inside the emulated KVM host on a PVM
//! machine) with this machine's QEMU beside it, and prints its `RESULT` lines.
//!
//! `emuhost_linux_bench LINUX_BENCH RUNS HOPS`: LINUX_BENCH is the built example
//! (`target/release/examples/linux_bench`); hostd comes from this profile's target folder.
//! The guest is Debian's cloud kernel with a busybox initramfs (bench/linux.sh).

use std::path::Path;
use std::process::Command;

use e2e_tests::emuhost::{self, Scenario};
use e2e_tests::guest;

/// The guest's init: its first line, then a power-off or a tick every 0.1 s.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
echo BENCH-INIT
case "$(/bin/busybox cat /proc/cmdline)" in
  *bench=tick*) i=0; while :; do i=$((i+1)); echo "BENCH-TICK $i"; /bin/busybox usleep 100000; done ;;
  *) /bin/busybox poweroff -f ;;
esac
"#;

/// Runs QEMU from the scenario's folder: its own loader and libraries, its firmware.
const QEMU_WRAPPER: &str = r#"#!/bin/sh
d=$(dirname "$0")
exec "$d/lib/ld-linux-x86-64.so.2" --library-path "$d/lib" "$d/qemu-system-x86_64" -L "$d/share" "$@"
"#;

/// The firmware files `-M microvm` with `-kernel` reads.
const QEMU_FIRMWARE: &[&str] = &["bios-microvm.bin", "qboot.rom", "linuxboot_dma.bin"];

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// QEMU and what it loads, as scenario files under `qemu/`.
fn with_qemu(mut s: Scenario) -> Scenario {
    let qemu = Path::new("/usr/bin/qemu-system-x86_64");
    if !qemu.exists() {
        panic!(
            "qemu-system-x86_64 missing: apt-get install qemu-system-x86 qemu-utils qemu-block-extra"
        );
    }
    s = s.file("qemu/qemu-system-x86_64", 0o755, read(qemu)).file(
        "qemu/qemu",
        0o755,
        QEMU_WRAPPER.as_bytes().to_vec(),
    );
    let ldd = Command::new("ldd").arg(qemu).output().expect("ldd");
    for lib in String::from_utf8_lossy(&ldd.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with('/')))
    {
        let name = Path::new(lib).file_name().unwrap().to_string_lossy();
        s = s.file(&format!("qemu/lib/{name}"), 0o755, read(Path::new(lib)));
    }
    for f in QEMU_FIRMWARE {
        s = s.file(
            &format!("qemu/share/{f}"),
            0o644,
            read(&Path::new("/usr/share/qemu").join(f)),
        );
    }
    s
}

/// QEMU's TLS migration credentials, in the names `tls-creds-x509` reads, under
/// `qemu-x509/`: a CA made for the run, and a server and a client certificate naming
/// 127.0.0.1 (one directory for both ends: every VM is a destination, then a source).
fn with_qemu_tls(mut s: Scenario) -> Scenario {
    let pki = tempfile::tempdir().expect("a temporary folder");
    let pool = pool_trust::PoolId::parse("qemu").expect("a valid pool id");
    let ca = pool_trust::LocalCa::open_or_create(&pki.path().join("ca"), &pool)
        .unwrap_or_else(|e| panic!("a CA for QEMU: {e}"));
    for end in ["server", "client"] {
        let dir = pki.path().join(end);
        ca.issue(
            &pool_trust::Identity::Host(format!("qemu-{end}")),
            &["127.0.0.1"],
            &dir,
        )
        .unwrap_or_else(|e| panic!("QEMU's {end} certificate: {e}"));
        if end == "server" {
            s = s.file("qemu-x509/ca-cert.pem", 0o644, read(&dir.join("ca.pem")));
        }
        s = s
            .file(
                &format!("qemu-x509/{end}-cert.pem"),
                0o644,
                read(&dir.join("cert.pem")),
            )
            .file(
                &format!("qemu-x509/{end}-key.pem"),
                0o600,
                read(&dir.join("key.pem")),
            );
    }
    s
}

fn main() {
    let a: Vec<String> = std::env::args().skip(1).collect();
    let [bench, runs, hops] = &a[..] else {
        eprintln!("usage: emuhost_linux_bench LINUX_BENCH RUNS HOPS");
        std::process::exit(2);
    };
    let cloud = guest::kernel("linux-image-cloud-amd64");
    let script = format!(
        "#!/bin/sh\nchmod 700 $S/qemu-x509\nQEMU_TLS_DIR=$S/qemu-x509 $S/linux_bench \"$(command -v hostd)\" $S/qemu/qemu $S/images/bzimage \
         $S/images/initramfs {runs} {hops} 2>&1\necho \"BENCH-END rc=$?\"\n"
    );
    let mut s = Scenario::new("linux-bench", &script)
        .file("linux_bench", 0o755, read(Path::new(bench)))
        .file(
            "images/bzimage",
            0o644,
            std::fs::read(cloud.bzimage()).unwrap(),
        )
        .file(
            "images/initramfs",
            0o644,
            guest::initramfs(&cloud, INIT, guest::MODULES),
        );
    s = with_qemu(s);
    s = with_qemu_tls(s);
    s.fail_on.push("BENCH-PANIC".into());
    s.total = std::time::Duration::from_secs(3000);
    // Each boot or hop shows a line well within a minute, even emulated.
    s = s
        .expect("RESULT qemu boot_ms=", 1500)
        .expect("RESULT hostd downtime_ms=", 900)
        .expect("RESULT qemu downtime_ms=", 900)
        .expect("RESULT qemu_tls downtime_ms=", 900)
        .expect("BENCH-END rc=0", 60);
    match emuhost::run(&s) {
        Ok(report) => {
            println!("ran {}", report.way);
            for l in report.all("RESULT ") {
                println!("{}", &l[l.find("RESULT ").unwrap()..]);
            }
        }
        Err(e) => {
            eprintln!("the Linux benchmark failed: {e}");
            std::process::exit(1);
        }
    }
}
