//! A VM as an OVA package: the descriptor made from the pool's spec of it, each disk
//! read raw and made a stream-optimized VMDK, and the archive in its order (descriptor,
//! disks, manifest). `poolctl vm-export` writes it to a file, `poold` to a download.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use proto::coordinator as pb;
use proto::host as hpb;

use crate::ova;
use crate::ovf::{Boot, Descriptor, Disk};
use crate::qemu::{self, Format};

/// A name for files in the package: the VM's name with anything but letters, digits,
/// `.`, `_` and `-` replaced, at most 64 bytes.
pub fn file_stem(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    if s.is_empty() || s.starts_with('.') {
        format!("vm{s}")
    } else {
        s
    }
}

pub fn protocol_name(p: i32) -> &'static str {
    match hpb::BootProtocol::try_from(p) {
        Ok(hpb::BootProtocol::Linux64) => "linux64",
        Ok(hpb::BootProtocol::Pvh) => "pvh",
        _ => "auto",
    }
}

pub fn protocol_value(name: &str) -> i32 {
    (match name {
        "linux64" => hpb::BootProtocol::Linux64,
        "pvh" => hpb::BootProtocol::Pvh,
        _ => hpb::BootProtocol::Auto,
    }) as i32
}

/// A package being made: add each disk of the spec in order, then write it.
pub struct Package {
    pub stem: String,
    pub descriptor: Descriptor,
    vmdks: Vec<PathBuf>,
}

impl Package {
    /// For the VM (or VM snapshot) `spec`, whose interfaces are on networks `nics` (by
    /// name, in device order).
    pub fn new(spec: &pb::VmSpec, nics: Vec<String>) -> Package {
        Package {
            stem: file_stem(&spec.name),
            descriptor: Descriptor {
                name: spec.name.clone(),
                vcpus: spec.vcpus,
                memory_bytes: spec.memory_bytes,
                disks: Vec::new(),
                nics,
                boot: spec.boot.as_ref().map(|b| Boot {
                    kernel: b.kernel_path.clone(),
                    initrd: b.initrd_path.clone(),
                    cmdline: b.command_line.clone(),
                    protocol: protocol_name(b.protocol).into(),
                }),
            },
            vmdks: Vec::new(),
        }
    }

    /// The package's file name.
    pub fn file_name(&self) -> String {
        format!("{}.ova", self.stem)
    }

    /// Adds disk `disk_id` from `raw`, its volume's bytes: made a VMDK in `scratch` (a
    /// private directory), the raw file removed.
    pub async fn add_raw_disk(
        &mut self,
        disk_id: &str,
        raw: &Path,
        scratch: &Path,
    ) -> anyhow::Result<()> {
        let capacity_bytes = std::fs::metadata(raw)
            .with_context(|| format!("reading {}", raw.display()))?
            .len();
        let vmdk = scratch.join(format!("{}.vmdk", self.vmdks.len()));
        qemu::convert_from_raw(raw, Format::Vmdk, &vmdk).await?;
        std::fs::remove_file(raw)?;
        self.descriptor.disks.push(Disk {
            disk_id: disk_id.to_owned(),
            href: format!("{}-{}.vmdk", self.stem, file_stem(disk_id)),
            capacity_bytes,
        });
        self.vmdks.push(vmdk);
        Ok(())
    }

    /// How many bytes [`Package::write`] writes (a download's length, told first).
    pub fn size(&self) -> anyhow::Result<u64> {
        let files = self.files()?;
        let entry = |len: u64| crate::tar::BLOCK + len + crate::tar::padding(len) as u64;
        let digests: Vec<(String, String)> = files
            .iter()
            .map(|(n, _)| (n.clone(), "0".repeat(64)))
            .collect();
        let mf = ova::manifest(&digests).len() as u64;
        // The archive ends with two zero blocks.
        Ok(files.iter().map(|(_, l)| entry(*l)).sum::<u64>() + entry(mf) + 2 * crate::tar::BLOCK)
    }

    /// Each file before the manifest and its size.
    fn files(&self) -> anyhow::Result<Vec<(String, u64)>> {
        let mut out = vec![(format!("{}.ovf", self.stem), self.xml()?.len() as u64)];
        for (d, p) in self.descriptor.disks.iter().zip(&self.vmdks) {
            out.push((d.href.clone(), std::fs::metadata(p)?.len()));
        }
        Ok(out)
    }

    fn xml(&self) -> anyhow::Result<String> {
        let sizes = self
            .vmdks
            .iter()
            .map(|p| std::fs::metadata(p).map(|m| m.len()))
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(self.descriptor.to_xml(&sizes))
    }

    /// Writes the archive: descriptor, disks, manifest. Blocking I/O.
    pub fn write<W: Write>(&self, out: W) -> anyhow::Result<W> {
        let mut w = ova::Writer::new(out);
        w.add_bytes(&format!("{}.ovf", self.stem), self.xml()?.as_bytes())?;
        for (d, p) in self.descriptor.disks.iter().zip(&self.vmdks) {
            w.add_file(&d.href, p)?;
        }
        w.finish(&format!("{}.mf", self.stem))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn package_file_names_keep_only_plain_characters() {
        assert_eq!(file_stem("web/01 prod"), "web_01_prod");
        assert_eq!(file_stem(".."), "vm..");
        assert_eq!(file_stem(&"x".repeat(100)).len(), 64);
        for p in ["auto", "linux64", "pvh"] {
            assert_eq!(protocol_name(protocol_value(p)), p);
        }
    }

    #[test]
    fn the_size_told_is_the_size_written() {
        let dir = tempfile::tempdir().unwrap();
        let spec = pb::VmSpec {
            name: "a b".into(),
            vcpus: 1,
            memory_bytes: 64 << 20,
            ..Default::default()
        };
        let mut p = Package::new(&spec, vec!["lan".into()]);
        // A disk without qemu: its VMDK put in place as add_raw_disk would.
        let vmdk = dir.path().join("0.vmdk");
        std::fs::write(&vmdk, vec![1u8; 1000]).unwrap();
        p.descriptor.disks.push(Disk {
            disk_id: "vda".into(),
            href: "a_b-vda.vmdk".into(),
            capacity_bytes: 1 << 20,
        });
        p.vmdks.push(vmdk);
        let out = p.write(Vec::new()).unwrap();
        assert_eq!(out.len() as u64, p.size().unwrap());
        assert_eq!(p.file_name(), "a_b.ova");
        let names: Vec<String> =
            crate::tar::list(&mut std::io::Cursor::new(&out), out.len() as u64)
                .unwrap()
                .into_iter()
                .map(|e| e.name)
                .collect();
        assert_eq!(names, ["a_b.ovf", "a_b-vda.vmdk", "a_b.mf"]);
    }
}
