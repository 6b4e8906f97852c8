//! The Linux boot path: Debian's cloud kernel (a bzImage) with a busybox initramfs, booted
//! through the 64-bit entry with a zero page, e820 map, command line and initrd.
//!
//! The kernel and busybox come from `apt-get download` into the test's target directory
//! (or from `HOSTD_LINUX_KERNEL` and `HOSTD_BUSYBOX`). Without them the tests say so and
//! pass without booting.
//!
//! Three ways in: the bzImage (64-bit entry), the vmlinux ELF inside it (64-bit entry), and
//! the same vmlinux through its PVH note. Where KVM can run Linux each must reach the
//! init's output. On a PVM host (guest CPL 0 emulated an instruction at a time) a stock
//! kernel crawls or stops on an emulation failure; there the test makes one bounded
//! attempt, detects the failure and prints why the rest is skipped, and a separate test
//! checks what such a host can show: the kernel's first messages, which print the
//! command line and e820 map it read from our zero page.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use hostd::console::Console;
use hostd::vmm::{BootProtocol, BootSpec, Vm, VmExit, VmSpec};

const MARKER: &str = "LINUX-INIT-OK";

/// One file in a newc cpio archive.
struct Entry<'a> {
    name: &'a str,
    mode: u32,
    rdev: (u32, u32),
    data: &'a [u8],
}

fn cpio_newc(entries: &[Entry]) -> Vec<u8> {
    fn pad(out: &mut Vec<u8>) {
        while !out.len().is_multiple_of(4) {
            out.push(0);
        }
    }
    let mut out = Vec::new();
    let trailer = Entry {
        name: "TRAILER!!!",
        mode: 0,
        rdev: (0, 0),
        data: &[],
    };
    for (ino, e) in entries.iter().chain(std::iter::once(&trailer)).enumerate() {
        let fields = [
            ino as u32 + 1,
            e.mode,
            0,
            0,
            1,
            0,
            e.data.len() as u32,
            0,
            0,
            e.rdev.0,
            e.rdev.1,
            e.name.len() as u32 + 1,
            0,
        ];
        out.extend_from_slice(b"070701");
        for f in fields {
            out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        out.extend_from_slice(e.name.as_bytes());
        out.push(0);
        pad(&mut out);
        out.extend_from_slice(e.data);
        pad(&mut out);
    }
    out
}

/// Decompresses LZ4's legacy frame format (what the kernel build uses for
/// CONFIG_KERNEL_LZ4): a magic number, then blocks each preceded by their compressed size.
fn lz4_legacy(input: &[u8]) -> Option<Vec<u8>> {
    const MAGIC: u32 = 0x184c_2102;
    let u32_at = |i: usize| Some(u32::from_le_bytes(input.get(i..i + 4)?.try_into().ok()?));
    if u32_at(0)? != MAGIC {
        return None;
    }
    let mut out = Vec::new();
    let mut at = 4;
    while let Some(size) = u32_at(at) {
        if size == MAGIC {
            at += 4;
            continue;
        }
        let size = size as usize;
        let Some(block) = input.get(at + 4..at + 4 + size) else {
            break; // the trailing uncompressed-size word
        };
        lz4_block(block, &mut out)?;
        at += 4 + size;
    }
    Some(out)
}

fn lz4_block(b: &[u8], out: &mut Vec<u8>) -> Option<()> {
    let mut i = 0;
    let len_ext = |i: &mut usize, mut n: usize| -> Option<usize> {
        if n == 15 {
            loop {
                let x = *b.get(*i)?;
                *i += 1;
                n += x as usize;
                if x != 255 {
                    break;
                }
            }
        }
        Some(n)
    };
    while i < b.len() {
        let token = b[i];
        i += 1;
        let lit = len_ext(&mut i, (token >> 4) as usize)?;
        out.extend_from_slice(b.get(i..i + lit)?);
        i += lit;
        if i >= b.len() {
            break;
        }
        let offset = u16::from_le_bytes(b.get(i..i + 2)?.try_into().ok()?) as usize;
        i += 2;
        let n = len_ext(&mut i, (token & 15) as usize)? + 4;
        let start = out.len().checked_sub(offset).filter(|_| offset > 0)?;
        for k in 0..n {
            out.push(out[start + k]);
        }
    }
    Some(())
}

/// The uncompressed vmlinux ELF inside a bzImage whose payload is LZ4-compressed.
fn extract_vmlinux(bzimage: &[u8]) -> Option<Vec<u8>> {
    let setup_sects = match bzimage.get(0x1f1)? {
        0 => 4,
        n => *n as usize,
    };
    let word =
        |at: usize| Some(u32::from_le_bytes(bzimage.get(at..at + 4)?.try_into().ok()?) as usize);
    let start = (setup_sects + 1) * 512 + word(0x248)?;
    let payload = bzimage.get(start..start + word(0x24c)?)?;
    lz4_legacy(payload).filter(|elf| elf.starts_with(b"\x7fELF"))
}

/// Downloads a Debian package and unpacks it; None (with the reason) when it cannot.
fn fetch_deb(dir: &Path, package: &str) -> Result<PathBuf, String> {
    let unpacked = dir.join(format!("{package}.d"));
    if unpacked.exists() {
        return Ok(unpacked);
    }
    let dl = dir.join("dl");
    std::fs::create_dir_all(&dl).map_err(|e| e.to_string())?;
    let status = Command::new("apt-get")
        .args(["download", "-qq", "-o", "APT::Sandbox::User=root", package])
        .current_dir(&dl)
        .status()
        .map_err(|e| format!("apt-get: {e}"))?;
    if !status.success() {
        return Err(format!("apt-get download {package} failed ({status})"));
    }
    let deb = std::fs::read_dir(&dl)
        .map_err(|e| e.to_string())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("{package}_")) && n.ends_with(".deb"))
        })
        .ok_or_else(|| format!("no .deb for {package}"))?;
    let tmp = dir.join(format!("{package}.tmp"));
    let status = Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(&tmp)
        .status()
        .map_err(|e| format!("dpkg-deb: {e}"))?;
    if !status.success() {
        return Err(format!("dpkg-deb -x {} failed", deb.display()));
    }
    std::fs::rename(&tmp, &unpacked).map_err(|e| e.to_string())?;
    Ok(unpacked)
}

/// The kernel's package name, from the metapackage's dependency.
fn kernel_package() -> Result<String, String> {
    let out = Command::new("apt-cache")
        .args(["depends", "linux-image-cloud-amd64"])
        .output()
        .map_err(|e| format!("apt-cache: {e}"))?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("Depends: ")
                .filter(|p| p.starts_with("linux-image-"))
                .map(str::to_owned)
        })
        .ok_or_else(|| "apt-cache knows no linux-image-cloud-amd64".into())
}

fn assets() -> Result<(PathBuf, PathBuf), String> {
    // Both tests fetch into one directory; one at a time.
    static FETCH: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = FETCH.lock().unwrap_or_else(|p| p.into_inner());
    if let (Some(k), Some(b)) = (
        std::env::var_os("HOSTD_LINUX_KERNEL"),
        std::env::var_os("HOSTD_BUSYBOX"),
    ) {
        return Ok((k.into(), b.into()));
    }
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("linux-boot");
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let kdir = fetch_deb(&dir, &kernel_package()?)?;
    let kernel = std::fs::read_dir(kdir.join("boot"))
        .map_err(|e| e.to_string())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .ok_or("the kernel package has no vmlinuz")?;
    let busybox = fetch_deb(&dir, "busybox-static")?.join("bin/busybox");
    Ok((kernel, busybox))
}

/// Whether /dev/kvm is PVM, the paravirtual KVM that emulates guest CPL 0.
fn host_is_pvm() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// The vmlinux inside the bzImage, cached next to it.
fn vmlinux(kernel: &Path) -> PathBuf {
    static EXTRACT: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = EXTRACT.lock().unwrap_or_else(|p| p.into_inner());
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("linux-boot/vmlinux");
    if !out.exists() {
        let elf = extract_vmlinux(&std::fs::read(kernel).unwrap())
            .expect("the bzImage holds an LZ4-compressed vmlinux");
        let tmp = out.with_extension("tmp");
        std::fs::create_dir_all(out.parent().unwrap()).unwrap();
        std::fs::write(&tmp, elf).unwrap();
        std::fs::rename(&tmp, &out).unwrap();
    }
    out
}

fn initramfs(busybox: &Path) -> tempfile::NamedTempFile {
    let busybox = std::fs::read(busybox).expect("busybox readable");
    let init = format!(
        "#!/bin/busybox sh\n/bin/busybox echo {MARKER} $(/bin/busybox uname -r) cpus=$(/bin/busybox nproc)\n/bin/busybox reboot -f\n"
    );
    let file = tempfile::NamedTempFile::new().unwrap();
    let dir = |name| Entry {
        name,
        mode: 0o40755,
        rdev: (0, 0),
        data: &[],
    };
    std::fs::write(
        file.path(),
        cpio_newc(&[
            dir("dev"),
            Entry {
                name: "dev/console",
                mode: 0o20600,
                rdev: (5, 1),
                data: &[],
            },
            dir("bin"),
            Entry {
                name: "bin/busybox",
                mode: 0o100755,
                rdev: (0, 0),
                data: &busybox,
            },
            Entry {
                name: "init",
                mode: 0o100755,
                rdev: (0, 0),
                data: init.as_bytes(),
            },
        ]),
    )
    .unwrap();
    file
}

fn linux_spec(kernel: &Path, initrd: Option<&Path>, protocol: BootProtocol) -> VmSpec {
    VmSpec {
        vcpus: 2,
        memory_bytes: 256 << 20,
        boot: BootSpec {
            kernel: kernel.to_owned(),
            initrd: initrd.map(Path::to_owned),
            cmdline: "console=ttyS0 reboot=k panic=-1 i8042.noaux".into(),
            protocol,
        },
        disks: vec![],
        cpuid_mask: vec![],
    }
}

enum Outcome {
    ReachedInit(String),
    /// The kernel did not get there: how the VM stopped (None: still running at the
    /// deadline) and what it printed.
    Stuck(Option<VmExit>, String),
}

fn boot(spec: &VmSpec, deadline: Duration) -> Outcome {
    let console = Console::new(1 << 20, None).unwrap();
    let mut vm = Vm::new(spec, console.clone()).expect("the Linux VM builds");
    vm.start().unwrap();
    let start = std::time::Instant::now();
    let mut exit = None;
    while start.elapsed() < deadline {
        exit = vm.wait_exit(Some(Duration::from_millis(200)));
        if exit.is_some() || console.text().contains(MARKER) {
            break;
        }
    }
    let text = console.text();
    if text.contains(MARKER) {
        let exit = vm.wait_exit(Some(Duration::from_secs(30)));
        assert_eq!(
            exit,
            Some(VmExit::Reset),
            "init's reboot resets the VM\n{text}"
        );
        return Outcome::ReachedInit(
            text.lines()
                .find(|l| l.contains(MARKER))
                .unwrap()
                .to_owned(),
        );
    }
    Outcome::Stuck(exit, text)
}

#[test]
fn linux_boots_to_a_busybox_init() {
    let (kernel, busybox) = match assets() {
        Ok(a) => a,
        Err(why) => return println!("SKIPPED linux boot: nothing to boot ({why})"),
    };
    let initrd = initramfs(&busybox);
    let vmlinux = vmlinux(&kernel);
    let pvm = host_is_pvm();
    let ways = [
        ("bzImage, 64-bit entry", &kernel, BootProtocol::Auto),
        ("vmlinux ELF, 64-bit entry", &vmlinux, BootProtocol::Linux64),
        ("vmlinux ELF, PVH entry", &vmlinux, BootProtocol::Pvh),
    ];
    for (name, image, protocol) in ways {
        let deadline = if pvm {
            Duration::from_secs(20)
        } else {
            Duration::from_secs(120)
        };
        match boot(&linux_spec(image, Some(initrd.path()), protocol), deadline) {
            Outcome::ReachedInit(line) => println!("{name}: {line}"),
            Outcome::Stuck(exit, text) if pvm => {
                let how = match exit {
                    Some(VmExit::Crash { detail, .. }) => format!("it stopped with `{detail}`"),
                    Some(other) => format!("it stopped: {other}"),
                    None => format!("it was still in early boot after {deadline:?}"),
                };
                println!(
                    "SKIPPED linux boot to init ({name} and the other ways in): this host's /dev/kvm \
                     is PVM, which emulates guest CPL 0 one instruction at a time, so a stock \
                     kernel cannot boot here; {how} after {} bytes of console output. \
                     linux_early_boot_reads_the_zero_page checks the boot structures instead.",
                    text.len()
                );
                return;
            }
            Outcome::Stuck(exit, text) => {
                panic!("{name}: Linux did not reach init: exit {exit:?}\nconsole:\n{text}")
            }
        }
    }
}

#[test]
fn linux_early_boot_reads_the_zero_page() {
    let (kernel, _) = match assets() {
        Ok(a) => a,
        Err(why) => return println!("SKIPPED linux early boot: nothing to boot ({why})"),
    };
    let vmlinux = vmlinux(&kernel);
    let mut spec = linux_spec(&vmlinux, None, BootProtocol::Linux64);
    // The early console prints before the kernel has done much at all.
    spec.boot.cmdline.push_str(" earlyprintk=serial,ttyS0");
    let console = Console::new(1 << 20, None).unwrap();
    let mut vm = Vm::new(&spec, console.clone()).expect("the Linux VM builds");
    vm.start().unwrap();
    // What the kernel read from our zero page: the command line and our e820 map.
    let wanted = [
        "Command line: console=ttyS0 reboot=k panic=-1 i8042.noaux earlyprintk=serial,ttyS0",
        "BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable",
        "BIOS-e820: [mem 0x000000000009fc00-0x00000000000fffff] reserved",
        "BIOS-e820: [mem 0x0000000000100000-0x000000000fffffff] usable",
    ];
    for w in wanted {
        assert!(
            console.wait_for(w, Duration::from_secs(60)),
            "kernel never printed {w:?}; exit {:?}\nconsole:\n{}",
            vm.exit_reason(),
            console.text()
        );
    }
    vm.stop();
}
