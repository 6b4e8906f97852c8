//! Builds the test guest (`../guest/`) from source into `$OUT_DIR/guest.elf` with the
//! system's gcc and ld, so every build of hostd carries a guest it can boot: no download,
//! no prebuilt binary in the tree. `HOSTD_GUEST_CC` and `HOSTD_GUEST_LD` override the tools.

use std::path::PathBuf;
use std::process::Command;

const SOURCES: [&str; 6] = [
    "start.S",
    "lib.c",
    "main.c",
    "dirty.c",
    "virtio_blk.c",
    "virtio_net.c",
];
const OTHER_INPUTS: [&str; 2] = ["guest.h", "linker.ld"];

const CFLAGS: &[&str] = &[
    "-m64",
    "-O2",
    "-std=gnu11",
    "-ffreestanding",
    "-fno-builtin",
    "-fno-tree-loop-distribute-patterns",
    "-nostdlib",
    "-fno-pic",
    "-fno-pie",
    "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables",
    "-mno-red-zone",
    "-mgeneral-regs-only",
    "-Wall",
    "-Wextra",
    "-Werror",
];

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let guest = manifest.join("../guest");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets it"));
    for f in SOURCES.iter().chain(OTHER_INPUTS.iter()) {
        println!("cargo:rerun-if-changed={}", guest.join(f).display());
    }
    println!("cargo:rerun-if-env-changed=HOSTD_GUEST_CC");
    println!("cargo:rerun-if-env-changed=HOSTD_GUEST_LD");
    let cc = std::env::var("HOSTD_GUEST_CC").unwrap_or_else(|_| "gcc".into());
    let ld = std::env::var("HOSTD_GUEST_LD").unwrap_or_else(|_| "ld".into());

    let mut objects = Vec::new();
    for src in SOURCES {
        let obj = out.join(format!("guest-{src}.o"));
        run(
            Command::new(&cc)
                .args(CFLAGS)
                .arg("-c")
                .arg(guest.join(src))
                .arg("-o")
                .arg(&obj),
            &cc,
        );
        objects.push(obj);
    }
    let elf = out.join("guest.elf");
    run(
        Command::new(&ld)
            .args(["-nostdlib", "-static", "-no-pie", "-z", "noexecstack"])
            .args(["-z", "max-page-size=4096", "--no-warn-rwx-segments"])
            .arg("-T")
            .arg(guest.join("linker.ld"))
            .arg("-o")
            .arg(&elf)
            .args(&objects),
        &ld,
    );
    println!("cargo:rustc-env=HOSTD_GUEST_ELF={}", elf.display());
}

fn run(cmd: &mut Command, tool: &str) {
    let status = cmd.status().unwrap_or_else(|e| {
        panic!(
            "building the test guest needs `{tool}` (gcc and binutils for x86-64; set \
             HOSTD_GUEST_CC / HOSTD_GUEST_LD to use others): {e}"
        )
    });
    if !status.success() {
        panic!("building the test guest failed: {cmd:?} exited with {status}");
    }
}
