//! `qemu-img` and `qemu-nbd`: what an image file is, which of its ranges hold data, and
//! its bytes as a raw disk. No image format is parsed here: qemu does that.
//!
//! An image is looked at before it is opened for its data: `qemu-img info` (which does
//! not open backing files) names its format, virtual size, backing file and, for VMDK,
//! extent files, for qcow2 an external data file. A chain is followed link by link, and each link must stay in the image's
//! own directory: a crafted header naming `/etc/shadow` or a `json:`/`nbd:` URL as its
//! backing file, extent or data file would otherwise copy someone else's bytes into the
//! new disk.
//! A backing file must declare its format, so qemu never probes one.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde::Deserialize;
use thiserror::Error;

/// The formats imported and exported, as qemu names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Raw,
    Qcow2,
    Vmdk,
    /// VHD (Virtual PC, Hyper-V's first format).
    Vpc,
    Vhdx,
}

impl Format {
    pub fn qemu_name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
            Format::Vmdk => "vmdk",
            Format::Vpc => "vpc",
            Format::Vhdx => "vhdx",
        }
    }

    /// qemu's name, or `vhd` for VHD.
    pub fn parse(name: &str) -> Option<Format> {
        Some(match name {
            "raw" => Format::Raw,
            "qcow2" => Format::Qcow2,
            "vmdk" => Format::Vmdk,
            "vpc" | "vhd" => Format::Vpc,
            "vhdx" => Format::Vhdx,
            _ => return None,
        })
    }
}

/// `--format` on the command line.
pub fn format_arg(s: &str) -> Result<Format, String> {
    Format::parse(s).ok_or_else(|| format!("{s:?}: one of {KNOWN}"))
}

const KNOWN: &str = "raw, qcow2, vmdk, vhd (vpc), vhdx";
/// Links of a backing chain followed at most.
const MAX_CHAIN: usize = 16;

#[derive(Debug, Error)]
pub enum ImageError {
    #[error("{tool} is missing: install Debian's qemu-utils and qemu-block-extra")]
    Missing {
        tool: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{tool} failed on {path}: {stderr}")]
    Qemu {
        tool: &'static str,
        path: PathBuf,
        stderr: String,
    },
    #[error("{tool} on {path} said something that is not what it documents")]
    Output {
        tool: &'static str,
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path} is a {format} image, a format not imported (known: {KNOWN})")]
    UnknownFormat { path: PathBuf, format: String },
    #[error(
        "{path} refers to {what} {target:?}, outside {dir}: refused (a chain must stay in \
         the image's own directory)"
    )]
    Outside {
        path: PathBuf,
        what: &'static str,
        target: String,
        dir: PathBuf,
    },
    #[error(
        "{path} has backing file {backing:?} without its format: refused (qemu would guess it)"
    )]
    BackingWithoutFormat { path: PathBuf, backing: String },
    #[error("{path}'s backing chain is longer than {MAX_CHAIN} files")]
    ChainTooLong { path: PathBuf },
    #[error("reading {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// An image file, looked at and found acceptable.
#[derive(Debug, Clone)]
pub struct Image {
    /// Absolute: qemu never reads a protocol prefix (`nbd:`, `json:`) from it.
    pub path: PathBuf,
    pub format: Format,
    pub virtual_size: u64,
}

#[derive(Debug, Deserialize)]
struct InfoJson {
    #[serde(rename = "virtual-size")]
    virtual_size: u64,
    format: String,
    #[serde(rename = "backing-filename")]
    backing: Option<String>,
    #[serde(rename = "backing-filename-format")]
    backing_format: Option<String>,
    #[serde(rename = "format-specific")]
    specific: Option<Specific>,
}

#[derive(Debug, Deserialize)]
struct Specific {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    data: serde_json::Value,
}

/// One entry of `qemu-img map --output=json`.
#[derive(Debug, Deserialize)]
struct MapEntry {
    start: u64,
    length: u64,
    data: bool,
    zero: bool,
}

async fn run(tool: &'static str, args: &[&OsStr], path: &Path) -> Result<Vec<u8>, ImageError> {
    let out = tokio::process::Command::new(tool)
        .args(args)
        .stdin(Stdio::null())
        // A cancelled export drops the call: qemu must not write on into a directory
        // being removed.
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|source| ImageError::Missing { tool, source })?;
    if !out.status.success() {
        return Err(ImageError::Qemu {
            tool,
            path: path.to_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(out.stdout)
}

async fn info(path: &Path, format: Option<Format>) -> Result<InfoJson, ImageError> {
    let mut args: Vec<&OsStr> = vec![OsStr::new("info"), OsStr::new("--output=json")];
    if let Some(f) = format {
        args.extend([OsStr::new("-f"), OsStr::new(f.qemu_name())]);
    }
    args.push(path.as_os_str());
    let out = run("qemu-img", &args, path).await?;
    serde_json::from_slice(&out).map_err(|source| ImageError::Output {
        tool: "qemu-img info",
        path: path.to_owned(),
        source,
    })
}

/// Whether qemu would read `name` as a protocol (`nbd:...`, `json:{...}`) rather than a
/// file: a colon before any slash.
fn has_protocol(name: &str) -> bool {
    name.find(':')
        .is_some_and(|c| name.find('/').is_none_or(|s| c < s))
}

/// `name` as referred to from `from` (relative to its directory), which must lie in `dir`.
fn inside(from: &Path, name: &str, what: &'static str, dir: &Path) -> Result<PathBuf, ImageError> {
    let outside = || ImageError::Outside {
        path: from.to_owned(),
        what,
        target: name.to_owned(),
        dir: dir.to_owned(),
    };
    if has_protocol(name) {
        return Err(outside());
    }
    let joined = from.parent().unwrap_or(dir).join(name);
    let real = std::fs::canonicalize(&joined).map_err(|source| ImageError::Io {
        path: joined.clone(),
        source,
    })?;
    if !real.starts_with(dir) {
        return Err(outside());
    }
    Ok(real)
}

/// Looks at the image at `path` (its format probed unless given) and every file it
/// refers to; refuses a format not imported and any link that leaves its directory.
pub async fn inspect(path: &Path, format: Option<Format>) -> Result<Image, ImageError> {
    let top = std::fs::canonicalize(path).map_err(|source| ImageError::Io {
        path: path.to_owned(),
        source,
    })?;
    let dir = top.parent().unwrap_or(Path::new("/")).to_owned();
    let mut image = None;
    let (mut at, mut fmt) = (top.clone(), format);
    for _ in 0..MAX_CHAIN {
        let i = info(&at, fmt).await?;
        let f = Format::parse(&i.format).ok_or_else(|| ImageError::UnknownFormat {
            path: at.clone(),
            format: i.format.clone(),
        })?;
        if image.is_none() {
            image = Some(Image {
                path: top.clone(),
                format: f,
                virtual_size: i.virtual_size,
            });
        }
        if let Some(s) = i.specific.as_ref().filter(|s| s.kind == "vmdk") {
            let extents = s.data.get("extents").and_then(|e| e.as_array());
            for e in extents.into_iter().flatten() {
                if let Some(name) = e.get("filename").and_then(|n| n.as_str()) {
                    inside(&at, name, "extent file", &dir)?;
                }
            }
        }
        // A qcow2 whose clusters live in an external data file reads them from there.
        if let Some(s) = i.specific.as_ref().filter(|s| s.kind == "qcow2")
            && let Some(name) = s.data.get("data-file").and_then(|n| n.as_str())
        {
            inside(&at, name, "data file", &dir)?;
        }
        let Some(backing) = i.backing else {
            return Ok(image.expect("set on the first link"));
        };
        let Some(bf) = i.backing_format.as_deref() else {
            return Err(ImageError::BackingWithoutFormat { path: at, backing });
        };
        let bf = Format::parse(bf).ok_or_else(|| ImageError::UnknownFormat {
            path: PathBuf::from(&backing),
            format: bf.to_owned(),
        })?;
        // qemu resolves a relative name against the referring image's directory, as
        // `inside` does.
        at = inside(&at, &backing, "backing file", &dir)?;
        fmt = Some(bf);
    }
    Err(ImageError::ChainTooLong { path: top })
}

/// The ranges of the image's virtual disk that hold data (the rest reads zeros), merged.
pub async fn data_ranges(img: &Image) -> Result<Vec<std::ops::Range<u64>>, ImageError> {
    let args: Vec<&OsStr> = vec![
        OsStr::new("map"),
        OsStr::new("--output=json"),
        OsStr::new("-f"),
        OsStr::new(img.format.qemu_name()),
        img.path.as_os_str(),
    ];
    let out = run("qemu-img", &args, &img.path).await?;
    let map: Vec<MapEntry> = serde_json::from_slice(&out).map_err(|source| ImageError::Output {
        tool: "qemu-img map",
        path: img.path.clone(),
        source,
    })?;
    let mut ranges: Vec<std::ops::Range<u64>> = Vec::new();
    for e in map.into_iter().filter(|e| e.data && !e.zero) {
        match ranges.last_mut() {
            Some(r) if r.end == e.start => r.end += e.length,
            _ => ranges.push(e.start..e.start + e.length),
        }
    }
    Ok(ranges)
}

/// A private directory (0700) for sockets and intermediate files, removed when dropped.
pub struct ScratchDir(tempfile::TempDir);

impl ScratchDir {
    /// In `near` (the destination's directory, so an intermediate file is on its file
    /// system) or else the temporary directory.
    pub fn new(near: Option<&Path>) -> std::io::Result<ScratchDir> {
        use std::os::unix::fs::PermissionsExt;
        let base = near
            .filter(|p| !p.as_os_str().is_empty())
            .map_or_else(std::env::temp_dir, Path::to_owned);
        tempfile::Builder::new()
            .prefix(SCRATCH_PREFIX)
            .permissions(std::fs::Permissions::from_mode(0o700))
            .tempdir_in(base)
            .map(ScratchDir)
    }

    pub fn path(&self) -> &Path {
        self.0.path()
    }
}

/// How a scratch directory's name starts (what a check for leftovers looks for).
pub const SCRATCH_PREFIX: &str = ".pool-image-";

/// `qemu-nbd` serving the image's virtual disk, read only, on a Unix socket in a private
/// directory, for one client (it exits when that client leaves).
pub struct NbdServer {
    child: tokio::process::Child,
    pub socket: PathBuf,
    _dir: ScratchDir,
}

impl NbdServer {
    pub async fn start(img: &Image) -> anyhow::Result<NbdServer> {
        let dir = ScratchDir::new(None)?;
        let socket = dir.path().join("nbd.sock");
        let mut child = tokio::process::Command::new("qemu-nbd")
            .arg("--read-only")
            .arg(format!("--format={}", img.format.qemu_name()))
            .arg("--socket")
            .arg(&socket)
            .arg("--shared=1")
            .arg(&img.path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| ImageError::Missing {
                tool: "qemu-nbd",
                source,
            })?;
        let start = Instant::now();
        while !socket.exists() {
            if let Some(status) = child.try_wait()? {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    use tokio::io::AsyncReadExt;
                    let _ = e.read_to_string(&mut err).await;
                }
                anyhow::bail!(
                    "qemu-nbd could not serve {} ({status}): {}",
                    img.path.display(),
                    err.trim()
                );
            }
            if start.elapsed() > Duration::from_secs(30) {
                anyhow::bail!(
                    "qemu-nbd did not listen within 30 s for {}",
                    img.path.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(NbdServer {
            child,
            socket,
            _dir: dir,
        })
    }

    pub async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }
}

/// `qemu-img convert` of a raw file into `format` at `to` (which must not exist).
pub async fn convert_from_raw(raw: &Path, format: Format, to: &Path) -> Result<(), ImageError> {
    let mut args: Vec<&OsStr> = vec![
        OsStr::new("convert"),
        OsStr::new("-f"),
        OsStr::new("raw"),
        OsStr::new("-O"),
        OsStr::new(format.qemu_name()),
    ];
    if format == Format::Vmdk {
        // What VMware's tools expect inside an OVA.
        args.extend([OsStr::new("-o"), OsStr::new("subformat=streamOptimized")]);
    }
    args.extend([raw.as_os_str(), to.as_os_str()]);
    run("qemu-img", &args, to).await.map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_with_a_protocol_are_told_from_files() {
        assert!(has_protocol("nbd:127.0.0.1:10809"));
        assert!(has_protocol("json:{\"file\":1}"));
        assert!(!has_protocol("/tmp/a:b"));
        assert!(!has_protocol("base.qcow2"));
        assert!(!has_protocol("dir/a:b"));
    }

    #[test]
    fn formats_parse_by_qemu_name_and_vhd() {
        for f in [
            Format::Raw,
            Format::Qcow2,
            Format::Vmdk,
            Format::Vpc,
            Format::Vhdx,
        ] {
            assert_eq!(Format::parse(f.qemu_name()), Some(f));
        }
        assert_eq!(Format::parse("vhd"), Some(Format::Vpc));
        assert_eq!(Format::parse("vdi"), None);
    }
}
