//! The OVF descriptor of a VM (DMTF DSP0243, version 1.x envelope): its name, vCPUs,
//! memory, disks and the networks of its interfaces; our boot source in a section of our
//! own (`ovf:required="false"`, so other readers skip it). Written from and parsed into
//! [`Descriptor`]; other tools' descriptors parse too, taking what this pool can use.

use thiserror::Error;

const OVF_NS: &str = "http://schemas.dmtf.org/ovf/envelope/1";
const RASD_NS: &str =
    "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData";
const VSSD_NS: &str =
    "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData";
/// Our own section's namespace.
const POOL_NS: &str = "urn:poolctl:ovf:boot:1";
/// What a disk's file is, as VMware names its stream-optimized VMDK.
pub const VMDK_STREAM: &str =
    "http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized";

// CIM resource types (DSP1041).
const RT_CPU: &str = "3";
const RT_MEMORY: &str = "4";
const RT_ETHERNET: &str = "10";
const RT_OTHER_STORAGE: &str = "20";
const RT_DISK: &str = "17";

#[derive(Debug, Error)]
pub enum OvfError {
    #[error("the descriptor is not XML")]
    Xml(#[from] roxmltree::Error),
    #[error("the descriptor is not an OVF envelope (root <{0}>)")]
    NotOvf(String),
    #[error("the descriptor lacks {0}")]
    Missing(&'static str),
    #[error("the descriptor's {what} {value:?} does not parse")]
    Bad { what: &'static str, value: String },
    #[error("file {file:?} of the package comes with {what}, which is not supported")]
    Unsupported { file: String, what: String },
    #[error("disk {disk:?} refers to file {file:?}, which References does not list")]
    NoFile { disk: String, file: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Boot {
    pub kernel: String,
    pub initrd: String,
    pub cmdline: String,
    /// `auto`, `linux64` or `pvh`.
    pub protocol: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// `vda`, ... for ours; whatever another tool named it otherwise.
    pub disk_id: String,
    /// The file in the package.
    pub href: String,
    pub capacity_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Descriptor {
    pub name: String,
    pub vcpus: u32,
    pub memory_bytes: u64,
    /// In the VM's device order.
    pub disks: Vec<Disk>,
    /// Each interface's network, by name, in device order.
    pub nics: Vec<String>,
    pub boot: Option<Boot>,
}

fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&apos;"),
            c => o.push(c),
        }
    }
    o
}

impl Descriptor {
    /// The descriptor; `file_sizes` gives each disk's file size (References wants it).
    pub fn to_xml(&self, file_sizes: &[u64]) -> String {
        let mut x = String::new();
        x += "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n";
        x += &format!(
            "<Envelope xmlns=\"{OVF_NS}\" xmlns:ovf=\"{OVF_NS}\" xmlns:rasd=\"{RASD_NS}\" \
             xmlns:vssd=\"{VSSD_NS}\" xmlns:pool=\"{POOL_NS}\">\n"
        );
        x += "  <References>\n";
        for (i, d) in self.disks.iter().enumerate() {
            let size = file_sizes.get(i).copied().unwrap_or(0);
            x += &format!(
                "    <File ovf:id=\"file{}\" ovf:href=\"{}\" ovf:size=\"{size}\"/>\n",
                i + 1,
                esc(&d.href)
            );
        }
        x += "  </References>\n  <DiskSection>\n    <Info>The VM's virtual disks</Info>\n";
        for (i, d) in self.disks.iter().enumerate() {
            x += &format!(
                "    <Disk ovf:diskId=\"{}\" ovf:fileRef=\"file{}\" ovf:capacity=\"{}\" \
                 ovf:capacityAllocationUnits=\"byte\" ovf:format=\"{VMDK_STREAM}\"/>\n",
                esc(&d.disk_id),
                i + 1,
                d.capacity_bytes
            );
        }
        x += "  </DiskSection>\n";
        let mut networks: Vec<&String> = self.nics.iter().collect();
        networks.sort();
        networks.dedup();
        if !networks.is_empty() {
            x += "  <NetworkSection>\n    <Info>The networks the VM's interfaces are on</Info>\n";
            for n in networks {
                x += &format!(
                    "    <Network ovf:name=\"{0}\">\n      <Description>{0}</Description>\n    </Network>\n",
                    esc(n)
                );
            }
            x += "  </NetworkSection>\n";
        }
        let name = esc(&self.name);
        x += &format!(
            "  <VirtualSystem ovf:id=\"{name}\">\n    <Info>A VM exported by poolctl</Info>\n    \
             <Name>{name}</Name>\n"
        );
        x += "    <VirtualHardwareSection>\n      <Info>Virtual hardware requirements</Info>\n";
        x += &format!(
            "      <System>\n        <vssd:ElementName>Virtual Hardware Family</vssd:ElementName>\n        \
             <vssd:InstanceID>0</vssd:InstanceID>\n        <vssd:VirtualSystemIdentifier>{name}</vssd:VirtualSystemIdentifier>\n        \
             <vssd:VirtualSystemType>pool-kvm-1</vssd:VirtualSystemType>\n      </System>\n"
        );
        let mut id = 0;
        let mut item = |fields: &[(&str, String)]| {
            id += 1;
            let mut s = String::from("      <Item>\n");
            let mut all: Vec<(&str, String)> = fields.to_vec();
            all.push(("InstanceID", id.to_string()));
            // rasd's elements in alphabetical order, as the schema's sequence has them.
            all.sort_by(|a, b| a.0.cmp(b.0));
            for (k, v) in all {
                s += &format!("        <rasd:{k}>{}</rasd:{k}>\n", esc(&v));
            }
            s += "      </Item>\n";
            (id, s)
        };
        let (_, s) = item(&[
            ("AllocationUnits", "hertz * 10^6".into()),
            ("Description", "Number of virtual CPUs".into()),
            ("ElementName", format!("{} virtual CPU(s)", self.vcpus)),
            ("ResourceType", RT_CPU.into()),
            ("VirtualQuantity", self.vcpus.to_string()),
        ]);
        x += &s;
        let (_, s) = item(&[
            ("AllocationUnits", "byte * 2^20".into()),
            ("Description", "Memory Size".into()),
            (
                "ElementName",
                format!("{} MB of memory", self.memory_bytes >> 20),
            ),
            ("ResourceType", RT_MEMORY.into()),
            ("VirtualQuantity", (self.memory_bytes >> 20).to_string()),
        ]);
        x += &s;
        if !self.disks.is_empty() {
            let (controller, s) = item(&[
                ("Description", "virtio-blk".into()),
                ("ElementName", "virtio-blk".into()),
                ("ResourceSubType", "virtio".into()),
                ("ResourceType", RT_OTHER_STORAGE.into()),
            ]);
            x += &s;
            for (i, d) in self.disks.iter().enumerate() {
                let (_, s) = item(&[
                    ("AddressOnParent", i.to_string()),
                    ("ElementName", d.disk_id.clone()),
                    ("HostResource", format!("ovf:/disk/{}", d.disk_id)),
                    ("Parent", controller.to_string()),
                    ("ResourceType", RT_DISK.into()),
                ]);
                x += &s;
            }
        }
        for (i, n) in self.nics.iter().enumerate() {
            let (_, s) = item(&[
                ("AddressOnParent", i.to_string()),
                ("AutomaticAllocation", "true".into()),
                ("Connection", n.clone()),
                ("ElementName", format!("eth{i}")),
                ("ResourceSubType", "virtio-net".into()),
                ("ResourceType", RT_ETHERNET.into()),
            ]);
            x += &s;
        }
        x += "    </VirtualHardwareSection>\n";
        if let Some(b) = &self.boot {
            x += &format!(
                "    <pool:BootSection ovf:required=\"false\">\n      <Info>How this pool boots the VM (a kernel on its hosts)</Info>\n      \
                 <pool:Kernel>{}</pool:Kernel>\n      <pool:Initrd>{}</pool:Initrd>\n      \
                 <pool:CommandLine>{}</pool:CommandLine>\n      <pool:Protocol>{}</pool:Protocol>\n    </pool:BootSection>\n",
                esc(&b.kernel),
                esc(&b.initrd),
                esc(&b.cmdline),
                esc(&b.protocol)
            );
        }
        x += "  </VirtualSystem>\n</Envelope>\n";
        x
    }

    pub fn parse(xml: &str) -> Result<Descriptor, OvfError> {
        let doc = roxmltree::Document::parse(xml)?;
        let root = doc.root_element();
        if root.tag_name().name() != "Envelope" {
            return Err(OvfError::NotOvf(root.tag_name().name().to_owned()));
        }
        let ovf_attr = |n: roxmltree::Node<'_, '_>, name: &str| {
            n.attribute((OVF_NS, name))
                .or_else(|| n.attribute(name))
                .map(str::to_owned)
        };
        let mut files = std::collections::HashMap::new();
        if let Some(refs) = child(root, "References") {
            for f in refs.children().filter(|c| c.tag_name().name() == "File") {
                if let (Some(id), Some(href)) = (ovf_attr(f, "id"), ovf_attr(f, "href")) {
                    // A gzipped or split file would reach qemu as something else.
                    if let Some(c) = ovf_attr(f, "compression").filter(|c| c != "identity") {
                        return Err(OvfError::Unsupported {
                            file: href,
                            what: format!("compression {c:?}"),
                        });
                    }
                    if ovf_attr(f, "chunkSize").is_some() {
                        return Err(OvfError::Unsupported {
                            file: href,
                            what: "chunks (a split file)".into(),
                        });
                    }
                    files.insert(id, href);
                }
            }
        }
        let mut disks_by_id = std::collections::HashMap::new();
        if let Some(section) = child(root, "DiskSection") {
            for d in section.children().filter(|c| c.tag_name().name() == "Disk") {
                let id = ovf_attr(d, "diskId").ok_or(OvfError::Missing("a Disk's diskId"))?;
                let file = ovf_attr(d, "fileRef").ok_or(OvfError::Missing("a Disk's fileRef"))?;
                let href = files.get(&file).cloned().ok_or_else(|| OvfError::NoFile {
                    disk: id.clone(),
                    file: file.clone(),
                })?;
                let cap = ovf_attr(d, "capacity").ok_or(OvfError::Missing("a Disk's capacity"))?;
                let units = ovf_attr(d, "capacityAllocationUnits").unwrap_or_else(|| "byte".into());
                let capacity_bytes = number(&cap, "disk capacity")?
                    .checked_mul(unit_bytes(&units)?)
                    .ok_or(OvfError::Bad {
                        what: "disk capacity",
                        value: cap.clone(),
                    })?;
                disks_by_id.insert(
                    id.clone(),
                    Disk {
                        disk_id: id,
                        href,
                        capacity_bytes,
                    },
                );
            }
        }
        let vs = root
            .descendants()
            .find(|n| n.tag_name().name() == "VirtualSystem")
            .ok_or(OvfError::Missing("a VirtualSystem"))?;
        let name = child(vs, "Name")
            .and_then(|n| n.text())
            .map(str::to_owned)
            .or_else(|| ovf_attr(vs, "id"))
            .ok_or(OvfError::Missing("the VM's name"))?;
        let hw = child(vs, "VirtualHardwareSection")
            .ok_or(OvfError::Missing("a VirtualHardwareSection"))?;
        let mut d = Descriptor {
            name,
            vcpus: 1,
            memory_bytes: 512 << 20,
            ..Default::default()
        };
        for it in hw.children().filter(|c| c.tag_name().name() == "Item") {
            let field = |k: &str| {
                it.children()
                    .find(|c| c.tag_name().name() == k)
                    .and_then(|c| c.text())
                    .map(|t| t.trim().to_owned())
            };
            match field("ResourceType").as_deref() {
                Some(RT_CPU) => {
                    let q = field("VirtualQuantity").ok_or(OvfError::Missing("the vCPU count"))?;
                    d.vcpus = number(&q, "vCPU count")? as u32;
                }
                Some(RT_MEMORY) => {
                    let q = field("VirtualQuantity").ok_or(OvfError::Missing("the memory size"))?;
                    let units = field("AllocationUnits").unwrap_or_else(|| "byte * 2^20".into());
                    d.memory_bytes = number(&q, "memory size")?
                        .checked_mul(unit_bytes(&units)?)
                        .ok_or(OvfError::Bad {
                            what: "memory size",
                            value: q,
                        })?;
                }
                Some(RT_DISK) => {
                    let res = field("HostResource").unwrap_or_default();
                    let id = res
                        .strip_prefix("ovf:/disk/")
                        .or_else(|| res.strip_prefix("/disk/"))
                        .unwrap_or(&res);
                    if let Some(disk) = disks_by_id.remove(id) {
                        d.disks.push(disk);
                    }
                }
                Some(RT_ETHERNET) => {
                    d.nics.push(field("Connection").unwrap_or_default());
                }
                _ => {}
            }
        }
        if let Some(b) = vs.children().find(|c| {
            c.tag_name().name() == "BootSection" && c.tag_name().namespace() == Some(POOL_NS)
        }) {
            let text = |k: &str| {
                b.children()
                    .find(|c| c.tag_name().name() == k)
                    .and_then(|c| c.text())
                    .unwrap_or_default()
                    .to_owned()
            };
            d.boot = Some(Boot {
                kernel: text("Kernel"),
                initrd: text("Initrd"),
                cmdline: text("CommandLine"),
                protocol: text("Protocol"),
            });
        }
        Ok(d)
    }
}

/// The first child element of `n` named `name` (any namespace).
fn child<'a, 'i>(n: roxmltree::Node<'a, 'i>, name: &str) -> Option<roxmltree::Node<'a, 'i>> {
    n.children()
        .find(|c| c.is_element() && c.tag_name().name() == name)
}

fn number(s: &str, what: &'static str) -> Result<u64, OvfError> {
    s.trim().parse().map_err(|_| OvfError::Bad {
        what,
        value: s.to_owned(),
    })
}

/// Bytes in one unit of an OVF allocation unit: `byte`, `byte * 2^20`, `KB`, `MB`, `GB`.
fn unit_bytes(units: &str) -> Result<u64, OvfError> {
    let u: String = units.chars().filter(|c| !c.is_whitespace()).collect();
    let bad = || OvfError::Bad {
        what: "allocation unit",
        value: units.to_owned(),
    };
    Ok(match u.as_str() {
        "byte" | "bytes" => 1,
        "KB" | "KiB" | "kilobytes" => 1 << 10,
        "MB" | "MiB" | "megabytes" | "MegaBytes" => 1 << 20,
        "GB" | "GiB" | "gigabytes" | "GigaBytes" => 1 << 30,
        _ => {
            let exp = u.strip_prefix("byte*2^").ok_or_else(bad)?;
            let e: u32 = exp.parse().map_err(|_| bad())?;
            1u64.checked_shl(e).filter(|_| e < 63).ok_or_else(bad)?
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Descriptor {
        Descriptor {
            name: "web <1> & co".into(),
            vcpus: 2,
            memory_bytes: 96 << 20,
            disks: vec![
                Disk {
                    disk_id: "vda".into(),
                    href: "web-vda.vmdk".into(),
                    capacity_bytes: 16 << 20,
                },
                Disk {
                    disk_id: "vdb".into(),
                    href: "web-vdb.vmdk".into(),
                    capacity_bytes: 1 << 30,
                },
            ],
            nics: vec!["lan".into(), "dmz".into(), "lan".into()],
            boot: Some(Boot {
                kernel: "/srv/guest.elf".into(),
                initrd: String::new(),
                cmdline: "seed=3 blk=verify".into(),
                protocol: "auto".into(),
            }),
        }
    }

    #[test]
    fn a_descriptor_round_trips_through_its_xml() {
        let d = sample();
        let xml = d.to_xml(&[100, 200]);
        assert!(xml.contains("ovf:size=\"200\""), "{xml}");
        assert_eq!(Descriptor::parse(&xml).unwrap(), d);
        let plain = Descriptor {
            boot: None,
            nics: vec![],
            ..d
        };
        assert_eq!(Descriptor::parse(&plain.to_xml(&[1, 2])).unwrap(), plain);
    }

    #[test]
    fn another_tools_descriptor_gives_what_the_pool_can_use() {
        let xml = r#"<?xml version="1.0"?>
<Envelope xmlns="http://schemas.dmtf.org/ovf/envelope/1" xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1"
  xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData">
  <References><File ovf:href="disk1.vmdk" ovf:id="f1"/></References>
  <DiskSection><Info>x</Info>
    <Disk ovf:capacity="2" ovf:capacityAllocationUnits="byte * 2^30" ovf:diskId="vmdisk1" ovf:fileRef="f1"/>
  </DiskSection>
  <VirtualSystem ovf:id="appliance"><Info>x</Info>
    <VirtualHardwareSection><Info>x</Info>
      <Item><rasd:ResourceType>3</rasd:ResourceType><rasd:VirtualQuantity>4</rasd:VirtualQuantity></Item>
      <Item><rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits><rasd:ResourceType>4</rasd:ResourceType><rasd:VirtualQuantity>2048</rasd:VirtualQuantity></Item>
      <Item><rasd:HostResource>ovf:/disk/vmdisk1</rasd:HostResource><rasd:ResourceType>17</rasd:ResourceType></Item>
      <Item><rasd:Connection>VM Network</rasd:Connection><rasd:ResourceType>10</rasd:ResourceType></Item>
    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>"#;
        let d = Descriptor::parse(xml).unwrap();
        assert_eq!(d.name, "appliance");
        assert_eq!((d.vcpus, d.memory_bytes), (4, 2 << 30));
        assert_eq!(
            d.disks,
            [Disk {
                disk_id: "vmdisk1".into(),
                href: "disk1.vmdk".into(),
                capacity_bytes: 2 << 30
            }]
        );
        assert_eq!(d.nics, ["VM Network"]);
        assert_eq!(d.boot, None);
    }

    #[test]
    fn a_disk_without_its_file_a_compressed_file_and_a_foreign_root_are_refused() {
        assert!(matches!(
            Descriptor::parse("<html/>"),
            Err(OvfError::NotOvf(r)) if r == "html"
        ));
        let xml = sample()
            .to_xml(&[1, 2])
            .replace("ovf:id=\"file2\"", "ovf:id=\"other\"");
        assert!(matches!(
            Descriptor::parse(&xml),
            Err(OvfError::NoFile { disk, .. }) if disk == "vdb"
        ));
        assert!(unit_bytes("byte * 2^99").is_err());
        let gz = sample()
            .to_xml(&[1, 2])
            .replace("ovf:size=\"1\"", "ovf:size=\"1\" ovf:compression=\"gzip\"");
        assert!(matches!(
            Descriptor::parse(&gz),
            Err(OvfError::Unsupported { file, .. }) if file == "web-vda.vmdk"
        ));
    }
}
