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
    /// Whether the offsets `qemu-img map` gives lie in this file: not for VMDK (its
    /// extent files) or a qcow2 with an external data file.
    pub offsets_in_file: bool,
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
#[derive(Debug, Clone, Deserialize)]
struct MapEntry {
    start: u64,
    length: u64,
    data: bool,
    zero: bool,
    /// Backing files below the image the range is read from (0: the image itself).
    #[serde(default)]
    depth: u32,
    /// Where the range's bytes lie in the file, as stored: absent for compressed or
    /// encrypted clusters.
    offset: Option<u64>,
}

/// A stretch of the virtual disk stored as is at `offset` in the image file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub start: u64,
    pub length: u64,
    pub offset: u64,
}

/// Where an image's data is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Map {
    /// The ranges of the virtual disk that hold data (the rest reads zeros), merged.
    pub data: Vec<std::ops::Range<u64>>,
    /// When every data range is stored as is in the image file itself (no backing file,
    /// compression or encryption under it): where, so the bytes can be read straight
    /// from the file rather than through `qemu-nbd`.
    pub in_file: Option<Vec<Extent>>,
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
            let data_file = i
                .specific
                .as_ref()
                .is_some_and(|s| s.kind == "qcow2" && s.data.get("data-file").is_some());
            image = Some(Image {
                path: top.clone(),
                format: f,
                virtual_size: i.virtual_size,
                offsets_in_file: f != Format::Vmdk && !data_file,
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

/// Where the image's data is (`qemu-img map`).
pub async fn map(img: &Image) -> Result<Map, ImageError> {
    let args: Vec<&OsStr> = vec![
        OsStr::new("map"),
        OsStr::new("--output=json"),
        OsStr::new("-f"),
        OsStr::new(img.format.qemu_name()),
        img.path.as_os_str(),
    ];
    let out = run("qemu-img", &args, &img.path).await?;
    let entries: Vec<MapEntry> =
        serde_json::from_slice(&out).map_err(|source| ImageError::Output {
            tool: "qemu-img map",
            path: img.path.clone(),
            source,
        })?;
    Ok(map_of(img, &entries))
}

fn map_of(img: &Image, entries: &[MapEntry]) -> Map {
    let mut data: Vec<std::ops::Range<u64>> = Vec::new();
    let mut in_file = img.offsets_in_file.then(Vec::new);
    for e in entries {
        if e.data && !e.zero {
            match data.last_mut() {
                Some(r) if r.end == e.start => r.end += e.length,
                _ => data.push(e.start..e.start + e.length),
            }
        }
        let Some(extents) = &mut in_file else {
            continue;
        };
        match e.offset {
            // A zero range reads zeros wherever it is stored.
            _ if e.zero => {}
            Some(offset) if e.data && e.depth == 0 => extents.push(Extent {
                start: e.start,
                length: e.length,
                offset,
            }),
            // Unallocated with nothing below reads zeros; anything else only qemu reads.
            None if !e.data && e.depth == 0 => {}
            _ => in_file = None,
        }
    }
    Map { data, in_file }
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

    fn entries(json: &str) -> Vec<MapEntry> {
        serde_json::from_str(json).unwrap()
    }

    fn image(format: Format, offsets_in_file: bool) -> Image {
        Image {
            path: PathBuf::from("/x"),
            format,
            virtual_size: 8 << 20,
            offsets_in_file,
        }
    }

    #[test]
    fn data_is_read_from_the_file_only_where_qemu_says_it_is_stored_as_is() {
        // As qemu-img 7.2 maps a qcow2: data at an offset, then an unallocated tail.
        let plain = entries(
            r#"[{"start": 0, "length": 3145728, "depth": 0, "present": true, "zero": false, "data": true, "offset": 327680},
                {"start": 3145728, "length": 1048576, "depth": 0, "present": true, "zero": true, "data": false, "offset": 9999},
                {"start": 4194304, "length": 1048576, "depth": 0, "present": false, "zero": false, "data": false},
                {"start": 5242880, "length": 1048576, "depth": 0, "present": true, "zero": false, "data": true, "offset": 65536}]"#,
        );
        let m = map_of(&image(Format::Qcow2, true), &plain);
        assert_eq!(m.data, vec![0..3 << 20, 5 << 20..6 << 20]);
        let extent = |start, length, offset| Extent {
            start,
            length,
            offset,
        };
        assert_eq!(
            m.in_file,
            Some(vec![
                extent(0, 3 << 20, 327680),
                extent(5 << 20, 1 << 20, 65536)
            ])
        );
        // VMDK's offsets are in its extent files.
        assert_eq!(map_of(&image(Format::Vmdk, false), &plain).in_file, None);

        // Compressed (no offset) or in a backing file: only qemu reads those.
        for other in [
            r#"{"start": 6291456, "length": 65536, "depth": 0, "present": true, "zero": false, "data": true}"#,
            r#"{"start": 6291456, "length": 65536, "depth": 1, "present": true, "zero": false, "data": true, "offset": 0}"#,
            r#"{"start": 6291456, "length": 65536, "depth": 1, "present": false, "zero": false, "data": false}"#,
        ] {
            let mut e = plain.clone();
            e.extend(entries(&format!("[{other}]")));
            let m = map_of(&image(Format::Qcow2, true), &e);
            assert_eq!(m.in_file, None, "{other}");
            assert_eq!(m.data[0], 0..3 << 20);
        }
    }
}
