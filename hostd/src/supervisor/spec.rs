//! From a `proto::host::VmConfig` (what clients ask for) to a [`VmSpec`] (what the VMM
//! builds), with every check that can be made before a VM process exists.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use proto::host::{BootProtocol as ProtoBoot, DiskConfig, VmConfig, disk_config};

use crate::devices::virtio::block::backend::OpenError;
use crate::devices::virtio::block::{Disk, FileBackend};
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
    #[error("a VM has at most {max} disks, not {count}")]
    TooManyDisks { count: usize, max: usize },
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
    #[error(
        "disk {id:?} is an iSCSI volume ({target}); this hostd has no iSCSI initiator yet \
         (the iscsi-initiator crate has not landed), so only file-backed disks can be attached"
    )]
    IscsiUnavailable { id: String, target: String },
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

fn disk_id_ok(id: &str) -> bool {
    !id.is_empty() && id.len() <= 20 && id.bytes().all(|b| b.is_ascii_graphic())
}

/// Checks a configuration without opening disks for writing or touching KVM.
pub fn validate(config: &VmConfig) -> Result<(), SpecError> {
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
    if config.disks.len() > layout::MAX_VIRTIO_DEVICES {
        return Err(SpecError::TooManyDisks {
            count: config.disks.len(),
            max: layout::MAX_VIRTIO_DEVICES,
        });
    }
    for (i, d) in config.disks.iter().enumerate() {
        validate_disk(d)?;
        if config.disks[..i].iter().any(|o| o.id == d.id) {
            return Err(SpecError::DuplicateDisk { id: d.id.clone() });
        }
    }
    Ok(())
}

/// Checks one disk: its id, and that its backend can be used (a file is opened, with the
/// access it will need, and closed again).
pub fn validate_disk(d: &DiskConfig) -> Result<(), SpecError> {
    if !disk_id_ok(&d.id) {
        return Err(SpecError::DiskId { id: d.id.clone() });
    }
    open_disk(d).map(|_| ())
}

fn protocol(p: i32) -> Result<BootProtocol, SpecError> {
    match ProtoBoot::try_from(p) {
        Ok(ProtoBoot::Unspecified | ProtoBoot::Auto) => Ok(BootProtocol::Auto),
        Ok(ProtoBoot::Linux64) => Ok(BootProtocol::Linux64),
        Ok(ProtoBoot::Pvh) => Ok(BootProtocol::Pvh),
        Err(_) => Err(SpecError::BadProtocol(p)),
    }
}

fn open_disk(d: &DiskConfig) -> Result<Disk, SpecError> {
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
        Some(disk_config::Backend::Iscsi(i)) => Err(SpecError::IscsiUnavailable {
            id: d.id.clone(),
            target: format!("{} lun {} at {}", i.target_iqn, i.lun, i.portal),
        }),
        None => Err(SpecError::NoBackend { id: d.id.clone() }),
    }
}

/// Builds the VMM's spec, opening every disk.
pub fn to_spec(config: &VmConfig) -> Result<VmSpec, SpecError> {
    validate(config)?;
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
            .map(open_disk)
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
        let spec = to_spec(&c).unwrap();
        assert_eq!(spec.disks[0].backend.size(), 1 << 20);
        assert_eq!(spec.boot.protocol, BootProtocol::Auto);
    }

    #[test]
    fn each_bad_field_gets_its_own_error() {
        let kernel = crate::testguest::ELF_PATH;
        assert!(matches!(
            validate(&VmConfig::default()),
            Err(SpecError::NoKernel)
        ));
        let e = validate(&config("/nonexistent/k")).unwrap_err();
        assert!(matches!(e, SpecError::KernelMissing { .. }) && e.is_not_found());
        let mut c = config(kernel);
        c.vcpus = 0;
        assert!(matches!(validate(&c), Err(SpecError::Vcpus { .. })));
        let mut c = config(kernel);
        c.memory_bytes = 4096;
        assert!(matches!(validate(&c), Err(SpecError::Memory { .. })));
        let mut c = config(kernel);
        c.boot.as_mut().unwrap().protocol = 42;
        assert!(matches!(validate(&c), Err(SpecError::BadProtocol(42))));
        let mut c = config(kernel);
        c.disks.push(DiskConfig {
            id: "vda".into(),
            ..Default::default()
        });
        assert!(matches!(validate(&c), Err(SpecError::NoBackend { .. })));
        let mut c = config(kernel);
        c.disks.push(file_disk("has space", Path::new("/x")));
        assert!(matches!(validate(&c), Err(SpecError::DiskId { .. })));
        let mut c = config(kernel);
        c.disks
            .push(file_disk("vda", Path::new("/nonexistent/disk")));
        let e = validate(&c).unwrap_err();
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
        let e = validate(&c).unwrap_err();
        assert!(e.to_string().contains("no iSCSI initiator"), "{e}");
    }
}
