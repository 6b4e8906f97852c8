//! What the Linux tests take from Debian's packages: kernels and busybox fetched with
//! `apt-get download` and unpacked with `dpkg-deb -x` (never installed), the modules a
//! scenario needs with their dependencies and a `modules.dep`, the vmlinux inside an LZ4
//! bzImage, and newc cpio archives for initramfs images.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Downloads a Debian package into `dir/dl` and unpacks it into `dir/PACKAGE.d`, once.
pub fn fetch_deb(dir: &Path, package: &str) -> Result<PathBuf, String> {
    let unpacked = dir.join(format!("{package}.d"));
    if unpacked.exists() {
        return Ok(unpacked);
    }
    // Tests in parallel (threads or processes) fetch the same packages: one at a time.
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let _held = lock(&dir.join(".fetch.lock"))?;
    if unpacked.exists() {
        return Ok(unpacked);
    }
    let dl = dir.join("dl");
    std::fs::create_dir_all(&dl).map_err(|e| e.to_string())?;
    let deb_of = |dl: &Path| {
        std::fs::read_dir(dl).ok()?.find_map(|e| {
            let p = e.ok()?.path();
            let n = p.file_name()?.to_str()?;
            (n.starts_with(&format!("{package}_")) && n.ends_with(".deb")).then_some(p)
        })
    };
    if deb_of(&dl).is_none() {
        let status = Command::new("apt-get")
            .args(["download", "-qq", "-o", "APT::Sandbox::User=root", package])
            .current_dir(&dl)
            .status()
            .map_err(|e| format!("apt-get: {e}"))?;
        if !status.success() {
            return Err(format!("apt-get download {package} failed ({status})"));
        }
    }
    let deb = deb_of(&dl).ok_or_else(|| format!("no .deb for {package}"))?;
    let tmp = dir.join(format!("{package}.tmp"));
    let _ = std::fs::remove_dir_all(&tmp);
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

/// An exclusive `flock` on `path`, held while the file lives.
pub fn lock(path: &Path) -> Result<std::fs::File, String> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
    // SAFETY: flock on a descriptor this function owns; blocks until it is ours.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(format!(
            "flock {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        ));
    }
    Ok(f)
}

/// The versioned package a metapackage (`linux-image-amd64`) stands for today.
pub fn depends_of(meta: &str) -> Result<String, String> {
    let out = Command::new("apt-cache")
        .args(["depends", meta])
        .output()
        .map_err(|e| format!("apt-cache: {e}"))?;
    let prefix = meta.split('-').take(2).collect::<Vec<_>>().join("-");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("Depends: ")
                .filter(|p| p.starts_with(&prefix))
                .map(str::to_owned)
        })
        .ok_or_else(|| format!("apt-cache knows no {meta}"))
}

/// An unpacked Debian kernel package.
#[derive(Clone, Debug)]
pub struct Kernel {
    /// Where the package is unpacked.
    pub root: PathBuf,
    /// `uname -r`, e.g. `6.1.0-57-cloud-amd64`.
    pub release: String,
}

impl Kernel {
    /// The kernel a metapackage (`linux-image-amd64`, `linux-image-cloud-amd64`) names,
    /// fetched into `cache` once.
    pub fn fetch(cache: &Path, meta: &str) -> Result<Kernel, String> {
        let root = fetch_deb(cache, &depends_of(meta)?)?;
        let release = std::fs::read_dir(root.join("lib/modules"))
            .map_err(|e| format!("{}: {e}", root.display()))?
            .find_map(|e| e.ok()?.file_name().into_string().ok())
            .ok_or("the kernel package has no lib/modules")?;
        Ok(Kernel { root, release })
    }

    /// The bzImage.
    pub fn bzimage(&self) -> PathBuf {
        self.root.join(format!("boot/vmlinuz-{}", self.release))
    }

    fn modules_dir(&self) -> PathBuf {
        self.root.join("lib/modules").join(&self.release)
    }

    /// Adds modules `names` (as `modprobe` names them; `-` and `_` alike) and every module
    /// they depend on to `out` under `lib/modules/RELEASE/kernel/…`, with the `modules.dep`
    /// and `modules.alias` that busybox `depmod` writes, so an init can `modprobe` them by
    /// name or by a device's modalias as a distribution's initramfs does.
    pub fn add_modules(&self, names: &[&str], out: &mut Cpio) -> Result<(), String> {
        let all = index_modules(&self.modules_dir().join("kernel"))?;
        let stage = tempfile::tempdir().map_err(|e| e.to_string())?;
        let mut todo: Vec<String> = names.iter().map(|n| n.replace('-', "_")).collect();
        let mut done = std::collections::BTreeSet::new();
        while let Some(name) = todo.pop() {
            if !done.insert(name.clone()) {
                continue;
            }
            let (rel, path) = all
                .get(&name)
                .ok_or_else(|| format!("{} has no module {name}", self.release))?;
            let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
            todo.extend(modinfo(&bytes, "depends").into_iter().flat_map(|d| {
                d.split(',')
                    .filter(|s| !s.is_empty())
                    .map(|s| s.replace('-', "_"))
                    .collect::<Vec<_>>()
            }));
            let at = stage
                .path()
                .join("lib/modules")
                .join(&self.release)
                .join(rel);
            std::fs::create_dir_all(at.parent().expect("a module's folder"))
                .map_err(|e| e.to_string())?;
            std::fs::write(&at, &bytes).map_err(|e| e.to_string())?;
        }
        let status = Command::new(busybox_for_host()?)
            .arg("depmod")
            .arg("-b")
            .arg(stage.path())
            .arg(&self.release)
            .status()
            .map_err(|e| format!("busybox depmod: {e}"))?;
        if !status.success() {
            return Err(format!("busybox depmod failed ({status})"));
        }
        out.add_tree(stage.path(), "")
    }
}

/// The static busybox of Debian's `busybox-static`, fetched into `cache`.
pub fn busybox(cache: &Path) -> Result<PathBuf, String> {
    Ok(fetch_deb(cache, "busybox-static")?.join("bin/busybox"))
}

/// A busybox that runs here, for `depmod` and friends: the system's or Debian's.
fn busybox_for_host() -> Result<PathBuf, String> {
    for p in ["/usr/bin/busybox", "/bin/busybox"] {
        if Path::new(p).exists() {
            return Ok(p.into());
        }
    }
    busybox(&crate::emuhost::cache_dir().join("debian"))
}

/// Every `NAME.ko` under `dir`: name (with `_`) → (path relative to `lib/modules/RELEASE`,
/// absolute path).
fn index_modules(
    dir: &Path,
) -> Result<std::collections::HashMap<String, (PathBuf, PathBuf)>, String> {
    let base = dir.parent().expect("lib/modules/RELEASE").to_owned();
    let mut out = std::collections::HashMap::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).map_err(|e| format!("{}: {e}", d.display()))? {
            let p = e.map_err(|e| e.to_string())?.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Some(stem) = p
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".ko"))
            {
                let rel = p.strip_prefix(&base).expect("under base").to_owned();
                out.insert(stem.replace('-', "_"), (rel, p));
            }
        }
    }
    Ok(out)
}

/// A `key=value` string of a module's `.modinfo` (found by its NUL-delimited form).
fn modinfo(module: &[u8], key: &str) -> Option<String> {
    let needle = format!("\0{key}=");
    let at = module
        .windows(needle.len())
        .position(|w| w == needle.as_bytes())?
        + needle.len();
    let end = module[at..].iter().position(|&b| b == 0)?;
    Some(String::from_utf8_lossy(&module[at..at + end]).into_owned())
}

/// A newc ("070701") cpio archive, as the kernel unpacks into an initramfs.
#[derive(Default)]
pub struct Cpio {
    out: Vec<u8>,
    inodes: u32,
}

impl Cpio {
    pub fn new() -> Cpio {
        Cpio::default()
    }

    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        self.inodes += 1;
        let fields = [
            self.inodes,
            mode,
            0,
            0,
            1,
            0,
            data.len() as u32,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0,
        ];
        self.out.extend_from_slice(b"070701");
        for f in fields {
            self.out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    /// A folder; parents are not created implicitly.
    pub fn dir(&mut self, name: &str) -> &mut Self {
        self.entry(name, 0o40755, (0, 0), &[]);
        self
    }

    pub fn file(&mut self, name: &str, mode: u32, data: &[u8]) -> &mut Self {
        self.entry(name, 0o100000 | mode, (0, 0), data);
        self
    }

    /// A character device node (the console an init needs before devtmpfs).
    pub fn char_dev(&mut self, name: &str, major: u32, minor: u32) -> &mut Self {
        self.entry(name, 0o20600, (major, minor), &[]);
        self
    }

    pub fn symlink(&mut self, name: &str, target: &str) -> &mut Self {
        self.entry(name, 0o120777, (0, 0), target.as_bytes());
        self
    }

    /// Every folder and file under `dir`, below `prefix` in the archive (folders first).
    pub fn add_tree(&mut self, dir: &Path, prefix: &str) -> Result<(), String> {
        let mut stack = vec![(dir.to_owned(), prefix.trim_end_matches('/').to_owned())];
        while let Some((d, name)) = stack.pop() {
            if !name.is_empty() {
                self.dir(&name);
            }
            let mut entries: Vec<_> = std::fs::read_dir(&d)
                .map_err(|e| format!("{}: {e}", d.display()))?
                .filter_map(Result::ok)
                .collect();
            entries.sort_by_key(|e| e.file_name());
            for e in entries {
                let n = e.file_name().to_string_lossy().into_owned();
                let path = if name.is_empty() {
                    n
                } else {
                    format!("{name}/{n}")
                };
                if e.path().is_dir() {
                    stack.push((e.path(), path));
                } else {
                    use std::os::unix::fs::PermissionsExt;
                    let meta = std::fs::metadata(e.path()).map_err(|e| e.to_string())?;
                    let data = std::fs::read(e.path()).map_err(|e| e.to_string())?;
                    self.file(&path, meta.permissions().mode() & 0o777, &data);
                }
            }
        }
        Ok(())
    }

    /// The archive with its trailer.
    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.out
    }
}

/// The uncompressed vmlinux ELF inside a bzImage whose payload is LZ4-compressed (Debian's
/// cloud kernel).
pub fn extract_vmlinux(bzimage: &[u8]) -> Option<Vec<u8>> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpio_entries_are_aligned_and_end_with_the_trailer() {
        let mut c = Cpio::new();
        c.dir("bin")
            .file("bin/x", 0o755, b"abc")
            .symlink("sh", "bin/x");
        let a = c.finish();
        assert_eq!(a.len() % 4, 0);
        assert!(a.starts_with(b"070701"));
        let text = String::from_utf8_lossy(&a);
        assert!(text.contains("bin/x\0"));
        assert!(text.contains("TRAILER!!!\0"));
        // The file's mode field (second field) says a regular file, 0755.
        let at = text.find("bin/x\0").unwrap();
        let header = &text[at - 110..at];
        assert_eq!(&header[14..22], "000081ed");
    }

    #[test]
    fn modinfo_reads_a_key_between_nuls() {
        let m = b"junk\0license=GPL\0depends=virtio,virtio_ring\0name=virtio_blk\0";
        assert_eq!(modinfo(m, "depends").as_deref(), Some("virtio,virtio_ring"));
        assert_eq!(modinfo(m, "alias"), None);
    }

    #[test]
    fn lz4_block_copies_literals_and_matches() {
        // "abcabcabc": literals "abc", then a match of 6 at offset 3.
        let block = [0x32, b'a', b'b', b'c', 3, 0];
        let mut out = Vec::new();
        lz4_block(&block, &mut out).unwrap();
        assert_eq!(out, b"abcabcabc");
        // An offset before the start is refused, not a panic.
        assert!(lz4_block(&[0x10, b'a', 9, 0], &mut Vec::new()).is_none());
    }
}
