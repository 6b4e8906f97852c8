//! Linux guests for the tests: Debian's kernels, busybox initramfs images that load the
//! kernel's own modules, and ext4 root file systems.

use std::path::PathBuf;
use std::process::Command;

use crate::debian::{self, Cpio, Kernel};

/// Where the Debian packages are cached (`target/emuhost/debian`).
pub fn cache() -> PathBuf {
    crate::emuhost::cache_dir().join("debian")
}

/// The kernel a metapackage names (`linux-image-amd64`, `linux-image-cloud-amd64`).
pub fn kernel(meta: &str) -> Kernel {
    Kernel::fetch(&cache(), meta).unwrap_or_else(|e| panic!("fetching {meta}: {e}"))
}

/// Debian's static busybox.
pub fn busybox() -> Vec<u8> {
    let path = debian::busybox(&cache()).expect("busybox-static");
    std::fs::read(path).expect("busybox readable")
}

/// The modules a guest loads: its disks' transport and driver, the ACPI power button, and
/// evdev, which gives the button its `/dev/input/event*` (distributions load it by name).
pub const MODULES: &[&str] = &["virtio_mmio", "virtio_blk", "button", "evdev"];

/// A busybox initramfs whose `/init` is `init`, with `modules` of `k` (and what they
/// need) under `/lib/modules`.
pub fn initramfs(k: &Kernel, init: &str, modules: &[&str]) -> Vec<u8> {
    let mut c = Cpio::new();
    for d in ["bin", "dev", "proc", "sys", "lib", "root"] {
        c.dir(d);
    }
    c.char_dev("dev/console", 5, 1)
        .file("bin/busybox", 0o755, &busybox())
        .file("init", 0o755, init.as_bytes());
    k.add_modules(modules, &mut c).expect("the guest's modules");
    c.finish()
}

/// The shell lines an init runs to load modules as udev does: one for every device's
/// modalias, in rounds, for the devices the first modules create (virtio_mmio finds
/// virtio devices, which want virtio_blk).
pub const COLDPLUG: &str = r#"modprobe evdev
for round in 1 2 3; do
  for a in $(cat /sys/bus/*/devices/*/modalias 2>/dev/null | sort -u); do modprobe -q "$a" 2>/dev/null; done
done"#;

/// An ext4 image of `size_mib` holding busybox as `/bin/busybox`, `init` as `/sbin/init`,
/// and empty `/dev /proc /sys /data /var /tmp`.
pub fn ext4_root(init: &str, size_mib: u64) -> Vec<u8> {
    use std::os::unix::fs::PermissionsExt;
    let stage = tempfile::tempdir().expect("a temporary folder");
    let root = stage.path().join("root");
    for d in ["bin", "sbin", "dev", "proc", "sys", "data", "var", "tmp"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    for (path, data) in [
        ("bin/busybox", busybox()),
        ("sbin/init", init.as_bytes().to_vec()),
    ] {
        std::fs::write(root.join(path), data).unwrap();
        std::fs::set_permissions(root.join(path), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let image = stage.path().join("root.img");
    let o = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "root", "-d"])
        .arg(&root)
        .arg(&image)
        .arg(format!("{size_mib}M"))
        .output()
        .expect("mkfs.ext4 (Debian: e2fsprogs)");
    assert!(o.status.success(), "mkfs.ext4: {}", crate::text(&o));
    std::fs::read(image).unwrap()
}
