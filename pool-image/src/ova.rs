//! OVA packages: a tar archive of the OVF descriptor first, then the disks (stream-
//! optimized VMDK), then a manifest, `<name>.mf`, one line `SHA256(<file>)= <hex>` for
//! each other file (what VMware's tools check). A package is read only after every file's
//! digest matched its manifest line.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use sha2::{Digest, Sha256};

use crate::ovf::Descriptor;
use crate::tar;

/// The manifest's text for these files and their SHA-256s (hex).
pub fn manifest(digests: &[(String, String)]) -> String {
    digests
        .iter()
        .map(|(name, d)| format!("SHA256({name})= {d}\n"))
        .collect()
}

/// A manifest's lines as file → lowercase hex digest; SHA-256 only.
pub fn parse_manifest(text: &str) -> anyhow::Result<HashMap<String, String>> {
    let mut out = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let bad = || {
            anyhow::anyhow!(
                "manifest line {}: {line:?} is not `SHA256(file)= hex`",
                i + 1
            )
        };
        let (algo, rest) = line.split_once('(').ok_or_else(bad)?;
        let (name, digest) = rest.rsplit_once(")=").ok_or_else(bad)?;
        if algo.trim() != "SHA256" {
            bail!(
                "manifest line {}: {} digests are not accepted, only SHA256",
                i + 1,
                algo.trim()
            );
        }
        let digest = digest.trim().to_ascii_lowercase();
        if digest.len() != 64 || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        out.insert(name.to_owned(), digest);
    }
    Ok(out)
}

/// Writes an OVA into `W` (a file, or a download as it goes out): `add` each file in
/// order, then `finish` with the manifest.
pub struct Writer<W: Write> {
    out: W,
    digests: Vec<(String, String)>,
    mtime: u64,
}

/// A new package file at `path`, which must not exist: created 0600 (it holds a VM's
/// disks).
pub fn create_file(path: &Path) -> anyhow::Result<BufWriter<File>> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {} (it must not exist)", path.display()))?;
    Ok(BufWriter::with_capacity(1 << 20, f))
}

/// Flushes and syncs a package written to a file.
pub fn sync(out: BufWriter<File>) -> anyhow::Result<()> {
    let f = out.into_inner().map_err(|e| e.into_error())?;
    f.sync_all()?;
    Ok(())
}

impl<W: Write> Writer<W> {
    pub fn new(out: W) -> Writer<W> {
        Writer {
            out,
            digests: Vec::new(),
            mtime: proto::unix_ms() / 1000,
        }
    }

    fn entry(&mut self, name: &str, size: u64, data: &mut impl Read) -> anyhow::Result<()> {
        self.out.write_all(&tar::header(name, size, self.mtime)?)?;
        let mut hash = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut left = size;
        while left > 0 {
            let want = left.min(buf.len() as u64) as usize;
            let n = data.read(&mut buf[..want])?;
            if n == 0 {
                bail!("{name} ended {left} bytes early");
            }
            hash.update(&buf[..n]);
            self.out.write_all(&buf[..n])?;
            left -= n as u64;
        }
        self.out.write_all(&vec![0u8; tar::padding(size)])?;
        self.digests
            .push((name.to_owned(), format!("{:x}", hash.finalize())));
        Ok(())
    }

    pub fn add_bytes(&mut self, name: &str, data: &[u8]) -> anyhow::Result<()> {
        self.entry(name, data.len() as u64, &mut &data[..])
    }

    pub fn add_file(&mut self, name: &str, path: &Path) -> anyhow::Result<()> {
        let mut f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let size = f.metadata()?.len();
        self.entry(name, size, &mut f)
    }

    /// Adds `<mf_name>` with every digest so far and ends the archive; the output back,
    /// flushed.
    pub fn finish(mut self, mf_name: &str) -> anyhow::Result<W> {
        let mf = manifest(&self.digests);
        self.entry(mf_name, mf.len() as u64, &mut mf.as_bytes())?;
        tar::finish(&mut self.out)?;
        self.out.flush()?;
        Ok(self.out)
    }
}

/// A package whose every file matched its manifest: the descriptor, and each disk of it
/// copied out into `scratch` (in the descriptor's order).
pub struct Verified {
    pub descriptor: Descriptor,
    pub disks: Vec<PathBuf>,
}

/// Checks every file of the OVA at `path` against its manifest, parses the descriptor and
/// copies each disk into `scratch`. Refused: no manifest, a digest that differs (the file
/// named), a file the manifest does not list or a listed one missing, a descriptor that is
/// not first or does not parse.
pub fn open_verified(path: &Path, scratch: &Path) -> anyhow::Result<Verified> {
    let mut f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let len = f.metadata()?.len();
    let entries = tar::list(&mut f, len)
        .with_context(|| format!("{} is not an OVA (a tar archive)", path.display()))?;
    let Some(first) = entries.first().filter(|e| e.name.ends_with(".ovf")) else {
        bail!(
            "{} does not start with an OVF descriptor (.ovf), as an OVA must",
            path.display()
        );
    };
    let mfs: Vec<&tar::Entry> = entries.iter().filter(|e| e.name.ends_with(".mf")).collect();
    let mf = match mfs.as_slice() {
        [one] => *one,
        [] => bail!(
            "{} has no manifest (.mf): its files cannot be checked, so it is refused; nothing was created",
            path.display()
        ),
        _ => bail!(
            "{} has {} manifests (.mf); one is expected",
            path.display(),
            mfs.len()
        ),
    };
    let text = read_entry(&mut f, mf, 1 << 20)?;
    let listed = parse_manifest(&String::from_utf8_lossy(&text))
        .with_context(|| format!("{} in {}", mf.name, path.display()))?;
    for e in &entries {
        if e.name != mf.name && !e.name.ends_with(".cert") && !listed.contains_key(&e.name) {
            bail!(
                "{} in {} is not in its manifest: refused",
                e.name,
                path.display()
            );
        }
    }
    for name in listed.keys() {
        if !entries.iter().any(|e| &e.name == name) {
            bail!(
                "the manifest of {} lists {name}, which the package lacks",
                path.display()
            );
        }
    }
    let check = |e: &tar::Entry, got: String| -> anyhow::Result<()> {
        let want = &listed[&e.name];
        if got != *want {
            bail!(
                "{} in {}: its SHA-256 is {}, its manifest says {want}: the package is damaged \
                 or altered; nothing was created",
                e.name,
                path.display(),
                got
            );
        }
        Ok(())
    };
    let ovf_bytes = read_entry(&mut f, first, 16 << 20)?;
    check(first, format!("{:x}", Sha256::digest(&ovf_bytes)))?;
    let xml = std::str::from_utf8(&ovf_bytes)
        .with_context(|| format!("{} in {} is not UTF-8", first.name, path.display()))?;
    let descriptor = Descriptor::parse(xml)
        .with_context(|| format!("reading {} in {}", first.name, path.display()))?;
    let mut disks = vec![PathBuf::new(); descriptor.disks.len()];
    for e in entries.iter().skip(1).filter(|e| e.name != mf.name) {
        let at = descriptor.disks.iter().position(|d| d.href == e.name);
        let out = at.map(|i| scratch.join(format!("disk-{i}")));
        let got = copy_entry(&mut f, e, out.as_deref())
            .with_context(|| format!("reading {} in {}", e.name, path.display()))?;
        check(e, got)?;
        if let (Some(i), Some(p)) = (at, out) {
            disks[i] = p;
        }
    }
    for (d, p) in descriptor.disks.iter().zip(&disks) {
        if p.as_os_str().is_empty() {
            bail!(
                "disk {} of {} is file {}, which the package lacks",
                d.disk_id,
                path.display(),
                d.href
            );
        }
    }
    Ok(Verified { descriptor, disks })
}

fn read_entry(f: &mut File, e: &tar::Entry, max: u64) -> anyhow::Result<Vec<u8>> {
    if e.size > max {
        bail!("{} is {} bytes, more than {max} expected", e.name, e.size);
    }
    f.seek(SeekFrom::Start(e.offset))?;
    let mut buf = vec![0u8; e.size as usize];
    f.read_exact(&mut buf)?;
    Ok(buf)
}

/// Hashes an entry, copying it to `out` (0600) when given.
fn copy_entry(f: &mut File, e: &tar::Entry, out: Option<&Path>) -> anyhow::Result<String> {
    use std::os::unix::fs::OpenOptionsExt;
    f.seek(SeekFrom::Start(e.offset))?;
    let mut w = match out {
        Some(p) => Some(BufWriter::with_capacity(
            1 << 20,
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(p)
                .with_context(|| format!("creating {}", p.display()))?,
        )),
        None => None,
    };
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut left = e.size;
    while left > 0 {
        let want = left.min(buf.len() as u64) as usize;
        let n = f.read(&mut buf[..want])?;
        if n == 0 {
            bail!("the archive ends inside {}", e.name);
        }
        hash.update(&buf[..n]);
        if let Some(w) = &mut w {
            w.write_all(&buf[..n])?;
        }
        left -= n as u64;
    }
    if let Some(w) = w {
        w.into_inner().map_err(|e| e.into_error())?;
    }
    Ok(format!("{:x}", hash.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ovf::Disk;

    fn package(dir: &Path, with_mf: bool) -> PathBuf {
        let disk = dir.join("d.bin");
        std::fs::write(&disk, vec![5u8; 3000]).unwrap();
        let d = Descriptor {
            name: "t".into(),
            vcpus: 1,
            memory_bytes: 64 << 20,
            disks: vec![Disk {
                disk_id: "vda".into(),
                href: "t-vda.vmdk".into(),
                capacity_bytes: 1 << 20,
            }],
            ..Default::default()
        };
        let path = dir.join(if with_mf { "t.ova" } else { "nomf.ova" });
        let mut w = Writer::new(create_file(&path).unwrap());
        w.add_bytes("t.ovf", d.to_xml(&[3000]).as_bytes()).unwrap();
        w.add_file("t-vda.vmdk", &disk).unwrap();
        if with_mf {
            sync(w.finish("t.mf").unwrap()).unwrap();
        } else {
            tar::finish(&mut w.out).unwrap();
            w.out.flush().unwrap();
        }
        path
    }

    #[test]
    fn a_package_written_verifies_and_a_changed_byte_names_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = package(dir.path(), true);
        let scratch = dir.path().join("s1");
        std::fs::create_dir(&scratch).unwrap();
        let v = open_verified(&path, &scratch).unwrap();
        assert_eq!(v.descriptor.name, "t");
        assert_eq!(std::fs::read(&v.disks[0]).unwrap(), vec![5u8; 3000]);

        // One byte of the disk changed.
        let mut bytes = std::fs::read(&path).unwrap();
        let at = bytes
            .windows(3000)
            .position(|w| w.iter().all(|&b| b == 5))
            .unwrap();
        bytes[at + 100] = 6;
        std::fs::write(&path, &bytes).unwrap();
        let scratch = dir.path().join("s2");
        std::fs::create_dir(&scratch).unwrap();
        let err = format!("{:#}", open_verified(&path, &scratch).err().unwrap());
        assert!(
            err.contains("t-vda.vmdk") && err.contains("SHA-256"),
            "{err}"
        );
    }

    #[test]
    fn a_package_without_a_manifest_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = package(dir.path(), false);
        let err = format!("{:#}", open_verified(&path, dir.path()).err().unwrap());
        assert!(err.contains("no manifest"), "{err}");
    }

    #[test]
    fn manifests_round_trip_and_other_digests_are_refused() {
        let m = manifest(&[
            ("a.ovf".into(), "ab".repeat(32)),
            ("b c.vmdk".into(), "01".repeat(32)),
        ]);
        let parsed = parse_manifest(&m).unwrap();
        assert_eq!(parsed["a.ovf"], "ab".repeat(32));
        assert_eq!(parsed["b c.vmdk"], "01".repeat(32));
        assert!(parse_manifest("SHA1(a.ovf)= 00").is_err());
        assert!(parse_manifest("garbage").is_err());
    }
}
