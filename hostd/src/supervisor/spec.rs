//! From a `proto::host::VmConfig` (what clients ask for) to a [`VmSpec`] (what the VMM
//! builds), with every check that can be made before a VM process exists.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use std::net::IpAddr;

use proto::host::{
    AttachmentKind, BootProtocol as ProtoBoot, DiskConfig, IscsiDisk, NetConfig, NetworkAttachment,
    VmConfig, disk_config,
};

use crate::devices::virtio::block::backend::OpenError;
use crate::devices::virtio::block::iscsi::{self, IscsiBackend, IscsiError, IscsiTarget};
use crate::devices::virtio::block::{Disk, FileBackend};
use crate::devices::virtio::net::{
    DEFAULT_MTU, MacAddr, Nic, NicError, RateLimit, Tap, TapError, Vlan, busy_poll_from_us,
    ipv4_lock, tap,
};
use crate::network::{NetworkError, NetworkKind, NetworkSpec};
use crate::vmm::{BootProtocol, BootSpec, CpuidRegs, MAX_VCPUS, MIN_MEMORY_BYTES, VmSpec, layout};

/// Largest console history a client may ask for.
pub const MAX_CONSOLE_BUFFER: u64 = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("the VM has no boot source (boot.kernel_path)")]
    NoKernel,
    #[error("kernel {path} cannot be read")]
    KernelMissing {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("initrd {path} cannot be read")]
    InitrdMissing {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("unknown boot protocol {0}")]
    BadProtocol(i32),
    #[error("vcpus must be 1 to {max}, not {requested}")]
    Vcpus { requested: u32, max: u32 },
    #[error("memory_bytes must be a multiple of 4096 and at least {min}, not {requested}")]
    Memory { requested: u64, min: u64 },
    #[error("console_buffer_bytes must be at most {max}, not {requested}")]
    ConsoleBuffer { requested: u64, max: u64 },
    #[error("a VM has at most {max} disks and network interfaces, not {count}")]
    TooManyDisks { count: usize, max: usize },
    #[error("network interface {id:?}")]
    Net {
        id: String,
        #[source]
        source: NicError,
    },
    #[error("network interface {id:?}: tap name {tap:?} is not an interface name")]
    TapName { id: String, tap: String },
    #[error("network interface {id:?}")]
    Tap {
        id: String,
        #[source]
        source: TapError,
    },
    #[error(
        "network interface {id:?} has neither a tap nor a network (an empty tap needs the \
         network for this host to plug it onto)"
    )]
    NoTap { id: String },
    #[error(
        "network interface {id:?} names both tap {tap:?} and a network: either the caller \
         made the tap, or this host plugs one onto the network"
    )]
    TapAndNetwork { id: String, tap: String },
    #[error("network interface {id:?}: network {network:?} has no kind {kind}")]
    AttachmentKind {
        id: String,
        network: String,
        kind: i32,
    },
    #[error("network interface {id:?}: network {network:?}: peer {peer:?} is not an IP address")]
    AttachmentPeer {
        id: String,
        network: String,
        peer: String,
    },
    #[error("network interface {id:?}")]
    Attachment {
        id: String,
        #[source]
        source: Box<NetworkError>,
    },
    #[error("network interface id {id:?} is used twice")]
    DuplicateNet { id: String },
    #[error("MAC address {mac} is given to two network interfaces")]
    DuplicateMac { mac: String },
    #[error("disk id {id:?} must be 1 to 20 printable ASCII characters")]
    DiskId { id: String },
    #[error("disk id {id:?} is used twice")]
    DuplicateDisk { id: String },
    #[error("disk {id:?} has no backend (file_path or iscsi)")]
    NoBackend { id: String },
    #[error("disk {id:?}: cannot use its image")]
    DiskImage {
        id: String,
        #[source]
        source: OpenError,
    },
    #[error("disk {id:?}: {reason}")]
    IscsiConfig { id: String, reason: String },
    #[error(
        "disk {id:?} is an iSCSI volume but this host has no initiator name (set initiator_iqn \
         in hostd's configuration)"
    )]
    NoInitiatorName { id: String },
    #[error(
        "{what} {path} is outside this host's image directories ({dirs}); a VM's kernels, \
         initrds and file disks must be under one of them"
    )]
    OutsideImages {
        what: &'static str,
        path: PathBuf,
        dirs: String,
    },
    #[error("disk {id:?}")]
    Iscsi {
        id: String,
        #[source]
        source: IscsiError,
    },
}

impl SpecError {
    /// Whether the problem is a missing file (as opposed to a malformed request).
    pub fn is_not_found(&self) -> bool {
        match self {
            SpecError::KernelMissing { source, .. } | SpecError::InitrdMissing { source, .. } => {
                source.kind() == std::io::ErrorKind::NotFound
            }
            SpecError::DiskImage {
                source: OpenError::Open { source, .. },
                ..
            } => source.kind() == std::io::ErrorKind::NotFound,
            _ => false,
        }
    }
}

fn readable(path: &Path) -> std::io::Result<()> {
    std::fs::File::open(path).map(|_| ())
}

/// Where a VM's kernels, initrds and file disks may come from: the host's image
/// directories. A client (even the pool) naming any other host path, e.g. `/dev/sda` or
/// `/etc/shadow`, is refused: the daemon opens these as root.
#[derive(Clone, Debug, Default)]
pub struct ImageDirs(Vec<PathBuf>);

impl ImageDirs {
    /// The directories, resolved (they must exist).
    pub fn new(dirs: &[PathBuf]) -> std::io::Result<ImageDirs> {
        dirs.iter()
            .map(|d| {
                std::fs::canonicalize(d).map_err(|e| {
                    std::io::Error::new(e.kind(), format!("image directory {}: {e}", d.display()))
                })
            })
            .collect::<Result<_, _>>()
            .map(ImageDirs)
    }

    /// Checks that `path` resolves, links and `..` followed, to a place inside one of the
    /// directories. A path that does not exist passes here: opening it says so.
    fn check(&self, what: &'static str, path: &Path) -> Result<(), SpecError> {
        let outside = || SpecError::OutsideImages {
            what,
            path: path.to_owned(),
            dirs: self
                .0
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        };
        let real = match std::fs::canonicalize(path) {
            Ok(real) => real,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(_) => return Err(outside()),
        };
        if self.0.iter().any(|d| real.starts_with(d)) {
            Ok(())
        } else {
            Err(outside())
        }
    }
}

fn disk_id_ok(id: &str) -> bool {
    !id.is_empty() && id.len() <= 20 && id.bytes().all(|b| b.is_ascii_graphic())
}

/// Checks a configuration a client sent, without logging in to targets or touching KVM:
/// every field, and every host path it names against the image directories.
pub fn validate(
    config: &VmConfig,
    initiator_iqn: &str,
    images: &ImageDirs,
) -> Result<(), SpecError> {
    // The paths first: nothing outside the image directories is even opened.
    if let Some(boot) = &config.boot {
        images.check("kernel", Path::new(&boot.kernel_path))?;
        if !boot.initrd_path.is_empty() {
            images.check("initrd", Path::new(&boot.initrd_path))?;
        }
    }
    for d in &config.disks {
        if let Some(disk_config::Backend::FilePath(path)) = &d.backend {
            images.check("disk image", Path::new(path))?;
        }
    }
    // A client names a tap or the network this host plugs one onto; the VM process's
    // record then has both.
    for n in &config.nets {
        match &n.network {
            Some(_) if !n.tap.is_empty() => {
                return Err(SpecError::TapAndNetwork {
                    id: n.id.clone(),
                    tap: n.tap.clone(),
                });
            }
            Some(a) => {
                attachment(&n.id, a)?;
            }
            None => {}
        }
    }
    check(config, initiator_iqn)
}

/// Every field of a configuration (the paths it names exist and can be opened).
fn check(config: &VmConfig, initiator_iqn: &str) -> Result<(), SpecError> {
    let boot = config.boot.as_ref().ok_or(SpecError::NoKernel)?;
    if boot.kernel_path.is_empty() {
        return Err(SpecError::NoKernel);
    }
    protocol(boot.protocol)?;
    readable(Path::new(&boot.kernel_path)).map_err(|source| SpecError::KernelMissing {
        path: boot.kernel_path.clone().into(),
        source,
    })?;
    if !boot.initrd_path.is_empty() {
        readable(Path::new(&boot.initrd_path)).map_err(|source| SpecError::InitrdMissing {
            path: boot.initrd_path.clone().into(),
            source,
        })?;
    }
    if config.vcpus == 0 || config.vcpus > MAX_VCPUS {
        return Err(SpecError::Vcpus {
            requested: config.vcpus,
            max: MAX_VCPUS,
        });
    }
    if config.memory_bytes < MIN_MEMORY_BYTES || !config.memory_bytes.is_multiple_of(4096) {
        return Err(SpecError::Memory {
            requested: config.memory_bytes,
            min: MIN_MEMORY_BYTES,
        });
    }
    if config.console_buffer_bytes > MAX_CONSOLE_BUFFER {
        return Err(SpecError::ConsoleBuffer {
            requested: config.console_buffer_bytes,
            max: MAX_CONSOLE_BUFFER,
        });
    }
    let devices = config.disks.len() + config.nets.len();
    if devices > layout::MAX_VIRTIO_DEVICES {
        return Err(SpecError::TooManyDisks {
            count: devices,
            max: layout::MAX_VIRTIO_DEVICES,
        });
    }
    let mut macs = Vec::with_capacity(config.nets.len());
    for (i, n) in config.nets.iter().enumerate() {
        let mac = check_net(n, false)?.mac;
        if n.tap.is_empty() && n.network.is_none() {
            return Err(SpecError::NoTap { id: n.id.clone() });
        }
        if config.nets[..i].iter().any(|o| o.id == n.id) {
            return Err(SpecError::DuplicateNet { id: n.id.clone() });
        }
        if macs.contains(&mac) {
            return Err(SpecError::DuplicateMac {
                mac: mac.to_string(),
            });
        }
        macs.push(mac);
    }
    for (i, d) in config.disks.iter().enumerate() {
        check_disk(d, initiator_iqn)?;
        if config.disks[..i].iter().any(|o| o.id == d.id) {
            return Err(SpecError::DuplicateDisk { id: d.id.clone() });
        }
    }
    Ok(())
}

/// Checks one disk: its id, and that its backend can be used. A file is opened, with the
/// access it will need, and closed again; an iSCSI disk's settings are checked (the login
/// itself happens in the VM process that will use the session).
pub fn validate_disk(
    d: &DiskConfig,
    initiator_iqn: &str,
    images: &ImageDirs,
) -> Result<(), SpecError> {
    if let Some(disk_config::Backend::FilePath(path)) = &d.backend {
        images.check("disk image", Path::new(path))?;
    }
    check_disk(d, initiator_iqn)
}

fn check_disk(d: &DiskConfig, initiator_iqn: &str) -> Result<(), SpecError> {
    if !disk_id_ok(&d.id) {
        return Err(SpecError::DiskId { id: d.id.clone() });
    }
    match &d.backend {
        Some(disk_config::Backend::Iscsi(_)) => iscsi_target(d, initiator_iqn).map(|_| ()),
        _ => open_file_disk(d).map(|_| ()),
    }
}

fn iscsi_target(d: &DiskConfig, initiator_iqn: &str) -> Result<IscsiTarget, SpecError> {
    let Some(disk_config::Backend::Iscsi(i)) = &d.backend else {
        return Err(SpecError::NoBackend { id: d.id.clone() });
    };
    let bad = |reason: &str| SpecError::IscsiConfig {
        id: d.id.clone(),
        reason: reason.into(),
    };
    if i.portal.is_empty() {
        return Err(bad("the portal (host:port) is empty"));
    }
    if i.target_iqn.is_empty() {
        return Err(bad("the target name is empty"));
    }
    let lun = u16::try_from(i.lun)
        .ok()
        .filter(|l| *l < 16384)
        .ok_or_else(|| bad("the LUN must be below 16384"))?;
    let pair =
        |user: &str, secret: &str, what: &str| -> Result<Option<(String, String)>, SpecError> {
            match (user.is_empty(), secret.is_empty()) {
                (true, true) => Ok(None),
                (false, false) => Ok(Some((user.to_owned(), secret.to_owned()))),
                _ => Err(bad(&format!("{what} needs both a user name and a secret"))),
            }
        };
    let chap = pair(&i.chap_username, &i.chap_secret, "CHAP")?;
    let mutual_chap = pair(
        &i.mutual_chap_username,
        &i.mutual_chap_secret,
        "mutual CHAP",
    )?;
    if mutual_chap.is_some() && chap.is_none() {
        return Err(bad("mutual CHAP needs CHAP as well"));
    }
    if initiator_iqn.is_empty() {
        return Err(SpecError::NoInitiatorName { id: d.id.clone() });
    }
    Ok(IscsiTarget {
        portal: i.portal.clone(),
        target_iqn: i.target_iqn.clone(),
        lun,
        initiator_iqn: initiator_iqn.to_owned(),
        chap,
        mutual_chap,
    })
}

/// The host side of a network interface `id` that this host plugs: the network, checked
/// as [`crate::network`] needs it, and for a private network the peers' addresses.
pub fn attachment(
    id: &str,
    a: &NetworkAttachment,
) -> Result<(NetworkSpec, Vec<IpAddr>), SpecError> {
    let kind = match AttachmentKind::try_from(a.kind) {
        Ok(AttachmentKind::External) => NetworkKind::External { nic: a.nic.clone() },
        Ok(AttachmentKind::Private) => NetworkKind::Private,
        Ok(AttachmentKind::Internal) => NetworkKind::Internal,
        Ok(AttachmentKind::Unspecified) | Err(_) => {
            return Err(SpecError::AttachmentKind {
                id: id.into(),
                network: a.name.clone(),
                kind: a.kind,
            });
        }
    };
    let spec = NetworkSpec {
        name: a.name.clone(),
        kind,
        // Out of u16 is out of 1..=4094 too: validate says so.
        vlan: (a.vlan != 0).then(|| u16::try_from(a.vlan).unwrap_or(u16::MAX)),
        mtu: if a.mtu == 0 {
            u32::from(DEFAULT_MTU)
        } else {
            a.mtu
        },
    };
    spec.validate().map_err(|source| SpecError::Attachment {
        id: id.into(),
        source: Box::new(source),
    })?;
    let peers = a
        .peers
        .iter()
        .map(|p| {
            p.parse::<IpAddr>().map_err(|_| SpecError::AttachmentPeer {
                id: id.into(),
                network: a.name.clone(),
                peer: p.clone(),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((spec, peers))
}

/// A network interface's settings, checked: its MAC, MTU, rate limit and VLAN, and its
/// tap's name when `need_tap` (an empty one is for the host to plug).
/// A network interface's settings as [`check_net`] found them.
struct NetSettings {
    mac: MacAddr,
    mtu: u16,
    rate: RateLimit,
    vlan: Option<Vlan>,
    busy_poll: Option<std::time::Duration>,
    lock: Option<Arc<[std::net::Ipv4Addr]>>,
}

fn check_net(n: &NetConfig, need_tap: bool) -> Result<NetSettings, SpecError> {
    let err = |source| SpecError::Net {
        id: n.id.clone(),
        source,
    };
    if (need_tap || !n.tap.is_empty()) && !tap::valid_name(&n.tap) {
        return Err(SpecError::TapName {
            id: n.id.clone(),
            tap: n.tap.clone(),
        });
    }
    let mac: MacAddr = n.mac.parse().map_err(err)?;
    let mtu = match n.mtu {
        0 => DEFAULT_MTU,
        mtu => u16::try_from(mtu).map_err(|_| err(NicError::BadMtu { mtu }))?,
    };
    let rate = RateLimit::new(n.rate_bytes_per_sec, n.rate_packets_per_sec).map_err(err)?;
    let vlan = n.vlan.map(Vlan::new).transpose().map_err(err)?;
    let busy_poll = n
        .busy_poll_us
        .map(|us| busy_poll_from_us(u64::from(us)))
        .transpose()
        .map_err(err)?;
    let lock = n
        .lock
        .as_ref()
        .map(|l| ipv4_lock(&l.ipv4))
        .transpose()
        .map_err(err)?;
    Nic::check(&n.id, mtu).map_err(err)?;
    Ok(NetSettings {
        mac,
        mtu,
        rate,
        vlan,
        busy_poll,
        lock,
    })
}

/// Opens a network interface's tap (the host's plumbing made it) and makes the VIF;
/// `busy_poll_us` is the host's ceiling for an interface whose config gives none.
pub fn open_net(n: &NetConfig, busy_poll_us: Option<u32>) -> Result<Nic, SpecError> {
    let s = check_net(n, true)?;
    let tap = Tap::open(&n.tap).map_err(|source| SpecError::Tap {
        id: n.id.clone(),
        source,
    })?;
    let err = |source| SpecError::Net {
        id: n.id.clone(),
        source,
    };
    let mut nic =
        Nic::new(n.id.clone(), Arc::new(tap), s.mac, s.mtu, s.rate, s.vlan).map_err(err)?;
    if let Some(ceiling) = s.busy_poll {
        nic.busy_poll = ceiling;
    } else if let Some(us) = busy_poll_us {
        nic = nic.with_busy_poll_us(u64::from(us)).map_err(err)?;
    }
    nic.ipv4_lock = s.lock;
    Ok(nic)
}

fn protocol(p: i32) -> Result<BootProtocol, SpecError> {
    match ProtoBoot::try_from(p) {
        Ok(ProtoBoot::Unspecified | ProtoBoot::Auto) => Ok(BootProtocol::Auto),
        Ok(ProtoBoot::Linux64) => Ok(BootProtocol::Linux64),
        Ok(ProtoBoot::Pvh) => Ok(BootProtocol::Pvh),
        Err(_) => Err(SpecError::BadProtocol(p)),
    }
}

fn open_file_disk(d: &DiskConfig) -> Result<Disk, SpecError> {
    match &d.backend {
        Some(disk_config::Backend::FilePath(path)) => {
            let backend = FileBackend::open(Path::new(path), d.read_only).map_err(|source| {
                SpecError::DiskImage {
                    id: d.id.clone(),
                    source,
                }
            })?;
            Ok(Disk::new(d.id.clone(), Arc::new(backend), d.read_only))
        }
        _ => Err(SpecError::NoBackend { id: d.id.clone() }),
    }
}

/// Opens disks, logging in to iSCSI targets on a runtime made for the first one.
struct Opener<'a> {
    initiator_iqn: &'a str,
    rt: Option<Arc<tokio::runtime::Runtime>>,
}

impl Opener<'_> {
    fn open(&mut self, d: &DiskConfig) -> Result<Disk, SpecError> {
        if !matches!(d.backend, Some(disk_config::Backend::Iscsi(_))) {
            return open_file_disk(d);
        }
        let target = iscsi_target(d, self.initiator_iqn)?;
        let err = |source| SpecError::Iscsi {
            id: d.id.clone(),
            source,
        };
        let rt = match &self.rt {
            Some(rt) => rt.clone(),
            None => {
                let rt = iscsi::runtime().map_err(err)?;
                self.rt = Some(rt.clone());
                rt
            }
        };
        let backend = IscsiBackend::open(rt, &target).map_err(err)?;
        Ok(Disk::new(d.id.clone(), Arc::new(backend), d.read_only))
    }
}

/// What a state volume (SaveVm, RestoreVm) is called in errors.
const STATE_VOLUME: &str = "state volume";

fn state_volume_disk(v: &IscsiDisk) -> DiskConfig {
    DiskConfig {
        id: STATE_VOLUME.into(),
        backend: Some(disk_config::Backend::Iscsi(v.clone())),
        read_only: false,
    }
}

/// Checks a state volume's settings as a disk's are checked, without logging in.
pub fn validate_state_volume(v: &IscsiDisk, initiator_iqn: &str) -> Result<(), SpecError> {
    iscsi_target(&state_volume_disk(v), initiator_iqn).map(|_| ())
}

/// Logs in to a state volume (in the VM process), on a runtime of its own.
pub fn open_state_volume(
    v: &IscsiDisk,
    initiator_iqn: &str,
) -> Result<Arc<dyn crate::devices::virtio::block::BlockBackend>, SpecError> {
    let target = iscsi_target(&state_volume_disk(v), initiator_iqn)?;
    let err = |source| SpecError::Iscsi {
        id: STATE_VOLUME.into(),
        source,
    };
    let rt = iscsi::runtime().map_err(err)?;
    Ok(Arc::new(IscsiBackend::open(rt, &target).map_err(err)?))
}

/// Builds the VMM's spec, opening every disk (logging in to iSCSI targets).
/// The daemon has held the configuration to its image directories ([`validate`]) before
/// the VM process that calls this was started.
pub fn to_spec(
    config: &VmConfig,
    initiator_iqn: &str,
    vif_busy_poll_us: Option<u32>,
) -> Result<VmSpec, SpecError> {
    check(config, initiator_iqn)?;
    let mut opener = Opener {
        initiator_iqn,
        rt: None,
    };
    let boot = config.boot.as_ref().ok_or(SpecError::NoKernel)?;
    Ok(VmSpec {
        vcpus: config.vcpus,
        memory_bytes: config.memory_bytes,
        boot: BootSpec {
            kernel: boot.kernel_path.clone().into(),
            initrd: (!boot.initrd_path.is_empty()).then(|| boot.initrd_path.clone().into()),
            cmdline: boot.command_line.clone(),
            protocol: protocol(boot.protocol)?,
        },
        disks: config
            .disks
            .iter()
            .map(|d| opener.open(d))
            .collect::<Result<_, _>>()?,
        nets: config
            .nets
            .iter()
            .map(|n| open_net(n, vif_busy_poll_us))
            .collect::<Result<_, _>>()?,
        cpuid_mask: config
            .cpuid_mask
            .iter()
            .map(|e| CpuidRegs {
                function: e.function,
                index: e.index,
                eax: e.eax,
                ebx: e.ebx,
                ecx: e.ecx,
                edx: e.edx,
            })
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::host::{BootSource, IscsiDisk};

    fn config(kernel: &str) -> VmConfig {
        VmConfig {
            name: "t".into(),
            vcpus: 1,
            memory_bytes: 64 << 20,
            boot: Some(BootSource {
                kernel_path: kernel.into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn file_disk(id: &str, path: &Path) -> DiskConfig {
        DiskConfig {
            id: id.into(),
            backend: Some(disk_config::Backend::FilePath(path.display().to_string())),
            read_only: false,
        }
    }

    #[test]
    fn a_good_config_becomes_a_spec_with_open_disks() {
        let img = tempfile::NamedTempFile::new().unwrap();
        img.as_file().set_len(1 << 20).unwrap();
        let mut c = config(crate::testguest::ELF_PATH);
        c.disks.push(file_disk("vda", img.path()));
        let spec = to_spec(&c, "", None).unwrap();
        assert_eq!(spec.disks[0].backend.size(), 1 << 20);
        assert_eq!(spec.boot.protocol, BootProtocol::Auto);
    }

    /// Image directories holding everything these tests use.
    fn anywhere() -> ImageDirs {
        ImageDirs::new(&["/".into()]).unwrap()
    }

    #[test]
    fn host_paths_outside_the_image_directories_are_refused() {
        let images_dir = tempfile::tempdir().unwrap();
        let images = ImageDirs::new(&[images_dir.path().to_owned()]).unwrap();
        let kernel = images_dir.path().join("guest.elf");
        std::fs::copy(crate::testguest::ELF_PATH, &kernel).unwrap();
        let disk = images_dir.path().join("d.img");
        std::fs::write(&disk, vec![0u8; 4096]).unwrap();
        let mut c = config(kernel.to_str().unwrap());
        c.disks.push(file_disk("vda", &disk));
        validate(&c, "", &images).unwrap();
        // A host device, a file elsewhere, and a way out by `..` or a link: refused.
        let outside = |e: SpecError| matches!(e, SpecError::OutsideImages { .. });
        let mut bad = c.clone();
        bad.disks[0] = file_disk("vda", Path::new("/dev/null"));
        assert!(outside(validate(&bad, "", &images).unwrap_err()));
        let escape = images_dir
            .path()
            .join("../")
            .join(images_dir.path().file_name().unwrap());
        assert!(
            validate(
                &config(escape.join("guest.elf").to_str().unwrap()),
                "",
                &images
            )
            .is_ok()
        );
        let elsewhere = config(crate::testguest::ELF_PATH);
        assert!(outside(validate(&elsewhere, "", &images).unwrap_err()));
        let link = images_dir.path().join("passwd");
        std::os::unix::fs::symlink("/etc/passwd", &link).unwrap();
        let mut bad = c.clone();
        bad.boot.as_mut().unwrap().initrd_path = link.display().to_string();
        let e = validate(&bad, "", &images).unwrap_err();
        assert!(
            outside(e),
            "a link out of the directory is followed and refused"
        );
        let mut bad = c.clone();
        bad.disks[0] = file_disk("vda", &images_dir.path().join("../../etc/hostname"));
        if std::path::Path::new("/etc/hostname").exists() {
            assert!(outside(validate(&bad, "", &images).unwrap_err()));
        }
    }

    fn net(id: &str, tap: &str, mac: &str) -> NetConfig {
        NetConfig {
            id: id.into(),
            tap: tap.into(),
            mac: mac.into(),
            ..Default::default()
        }
    }

    /// An interface with an empty tap is the daemon's to plug onto its network: its
    /// network is checked as the host plumbing needs it; a VM process never gets one.
    #[test]
    fn an_interface_names_its_tap_or_its_network_and_the_vm_process_needs_the_tap() {
        let mut c = config(crate::testguest::ELF_PATH);
        let lan = NetworkAttachment {
            name: "lan".into(),
            kind: AttachmentKind::Private as i32,
            peers: vec!["10.0.0.2".into()],
            ..Default::default()
        };
        c.nets.push(NetConfig {
            network: Some(lan.clone()),
            ..net("eth0", "", "02:00:00:00:00:01")
        });
        validate(&c, "", &anywhere()).unwrap();
        let (spec, peers) = attachment("eth0", &lan).unwrap();
        assert_eq!(
            (spec.kind, spec.mtu, spec.vlan),
            (NetworkKind::Private, 1500, None)
        );
        assert_eq!(peers, ["10.0.0.2".parse::<IpAddr>().unwrap()]);
        assert!(matches!(
            to_spec(&c, "", None),
            Err(SpecError::TapName { ref tap, .. }) if tap.is_empty()
        ));
        let bad = |f: &dyn Fn(&mut NetConfig)| {
            let mut c = c.clone();
            f(&mut c.nets[0]);
            validate(&c, "", &anywhere()).unwrap_err()
        };
        assert!(matches!(
            bad(&|n| n.tap = "tap0".into()),
            SpecError::TapAndNetwork { .. }
        ));
        assert!(matches!(
            bad(&|n| n.network = None),
            SpecError::NoTap { .. }
        ));
        let bad_on = |f: &dyn Fn(&mut NetworkAttachment)| {
            bad(&|n: &mut NetConfig| f(n.network.as_mut().unwrap()))
        };
        assert!(matches!(
            bad_on(&|a| a.kind = 0),
            SpecError::AttachmentKind { kind: 0, .. }
        ));
        assert!(matches!(
            bad_on(&|a| a.peers = vec!["host-b".into()]),
            SpecError::AttachmentPeer { .. }
        ));
        let fields: [&dyn Fn(&mut NetworkAttachment); 5] = [
            &|a| a.vlan = 4095,
            &|a| a.vlan = 70_000,
            &|a| a.mtu = 9001,
            &|a| a.name = String::new(),
            &|a| {
                a.kind = AttachmentKind::External as i32;
                a.nic = "a-much-too-long-nic".into();
            },
        ];
        for f in fields {
            let e = bad_on(f);
            assert!(matches!(e, SpecError::Attachment { .. }), "{e:?}");
        }
    }

    #[test]
    fn network_interfaces_are_checked_then_opened_on_their_taps() {
        let tap = format!("tspec{}", std::process::id() % 100_000);
        let mut c = config(crate::testguest::ELF_PATH);
        c.nets.push(NetConfig {
            mtu: 9000,
            rate_packets_per_sec: Some(1000),
            vlan: Some(7),
            busy_poll_us: Some(0),
            lock: Some(proto::host::AddressLock {
                ipv4: vec!["10.0.0.2".into()],
            }),
            ..net("eth0", &tap, "02:00:00:00:00:01")
        });
        let spec = to_spec(&c, "", Some(20)).unwrap();
        let nic = &spec.nets[0];
        assert_eq!(nic.tap.name(), tap);
        assert_eq!(nic.mac.to_string(), "02:00:00:00:00:01");
        assert_eq!((nic.mtu, nic.vlan.map(|v| v.id())), (9000, Some(7)));
        assert_eq!(nic.rate.packets_per_s.map(|r| r.get()), Some(1000));
        assert_eq!(nic.rate.bytes_per_s, None);
        assert_eq!(
            nic.busy_poll,
            std::time::Duration::ZERO,
            "busy polling off as asked"
        );
        assert_eq!(
            nic.ipv4_lock.as_deref(),
            Some(&[std::net::Ipv4Addr::new(10, 0, 0, 2)][..])
        );
        drop(spec);
        // The host's ceiling is for interfaces that give none.
        let mut quiet = c.clone();
        quiet.nets[0].busy_poll_us = None;
        let spec = to_spec(&quiet, "", Some(20)).unwrap();
        assert_eq!(spec.nets[0].busy_poll, std::time::Duration::from_micros(20));
        drop(spec);
        let bad = |f: &dyn Fn(&mut NetConfig)| {
            let mut c = c.clone();
            f(&mut c.nets[0]);
            validate(&c, "", &anywhere()).unwrap_err()
        };
        let nic_error = |e: SpecError| match e {
            SpecError::Net { source, .. } => source,
            other => panic!("{other}"),
        };
        assert_eq!(
            nic_error(bad(&|n| n.rate_bytes_per_sec = Some(0))),
            NicError::ZeroRate { unit: "bytes" }
        );
        assert_eq!(
            nic_error(bad(&|n| n.vlan = Some(4095))),
            NicError::BadVlan { tag: 4095 }
        );
        assert_eq!(
            nic_error(bad(&|n| n.busy_poll_us = Some(1001))),
            NicError::BadBusyPoll { us: 1001 }
        );
        assert_eq!(
            nic_error(bad(&|n| n
                .lock
                .as_mut()
                .unwrap()
                .ipv4
                .push("10.0.0.256".into()))),
            NicError::BadAddress {
                addr: "10.0.0.256".into()
            }
        );
        assert_eq!(
            nic_error(bad(&|n| n.mac = "01:00:00:00:00:01".into())),
            NicError::BadMac {
                mac: "01:00:00:00:00:01".into()
            }
        );
        assert_eq!(
            nic_error(bad(&|n| n.mtu = 9001)),
            NicError::BadMtu { mtu: 9001 }
        );
        assert_eq!(
            nic_error(bad(&|n| n.id = String::new())),
            NicError::BadId { id: String::new() }
        );
        assert!(matches!(
            bad(&|n| n.tap = "../x".into()),
            SpecError::TapName { .. }
        ));
        let mut two = c.clone();
        two.nets.push(net("eth0", &tap, "02:00:00:00:00:02"));
        assert!(matches!(
            validate(&two, "", &anywhere()),
            Err(SpecError::DuplicateNet { .. })
        ));
        two.nets[1].id = "eth1".into();
        two.nets[1].mac = "02:00:00:00:00:01".into();
        assert!(matches!(
            validate(&two, "", &anywhere()),
            Err(SpecError::DuplicateMac { .. })
        ));
        two.nets[1].mac = "02:00:00:00:00:02".into();
        validate(&two, "", &anywhere()).unwrap();
    }

    #[test]
    fn each_bad_field_gets_its_own_error() {
        let kernel = crate::testguest::ELF_PATH;
        assert!(matches!(
            validate(&VmConfig::default(), "", &anywhere()),
            Err(SpecError::NoKernel)
        ));
        let e = validate(&config("/nonexistent/k"), "", &anywhere()).unwrap_err();
        assert!(matches!(e, SpecError::KernelMissing { .. }) && e.is_not_found());
        let mut c = config(kernel);
        c.vcpus = 0;
        assert!(matches!(
            validate(&c, "", &anywhere()),
            Err(SpecError::Vcpus { .. })
        ));
        let mut c = config(kernel);
        c.memory_bytes = 4096;
        assert!(matches!(
            validate(&c, "", &anywhere()),
            Err(SpecError::Memory { .. })
        ));
        let mut c = config(kernel);
        c.boot.as_mut().unwrap().protocol = 42;
        assert!(matches!(
            validate(&c, "", &anywhere()),
            Err(SpecError::BadProtocol(42))
        ));
        let mut c = config(kernel);
        c.disks.push(DiskConfig {
            id: "vda".into(),
            ..Default::default()
        });
        assert!(matches!(
            validate(&c, "", &anywhere()),
            Err(SpecError::NoBackend { .. })
        ));
        let mut c = config(kernel);
        c.disks.push(file_disk("has space", Path::new("/x")));
        assert!(matches!(
            validate(&c, "", &anywhere()),
            Err(SpecError::DiskId { .. })
        ));
        let mut c = config(kernel);
        c.disks
            .push(file_disk("vda", Path::new("/nonexistent/disk")));
        let e = validate(&c, "", &anywhere()).unwrap_err();
        assert!(e.is_not_found(), "{e}");
        let mut c = config(kernel);
        c.disks.push(DiskConfig {
            id: "vda".into(),
            backend: Some(disk_config::Backend::Iscsi(IscsiDisk {
                portal: "127.0.0.1:3260".into(),
                target_iqn: "iqn.x".into(),
                ..Default::default()
            })),
            read_only: false,
        });
        let e = validate(&c, "", &anywhere()).unwrap_err();
        assert!(matches!(e, SpecError::NoInitiatorName { .. }), "{e}");
        validate(&c, "iqn.2026-11.lab:host1", &anywhere()).unwrap();
        if let Some(disk_config::Backend::Iscsi(i)) = &mut c.disks[0].backend {
            i.chap_username = "u".into();
        }
        let e = validate(&c, "iqn.2026-11.lab:host1", &anywhere()).unwrap_err();
        assert!(e.to_string().contains("CHAP needs both"), "{e}");
    }
}
