//! Standard image formats in and out: qcow2, VMDK, VHD/VHDX and raw disks
//! (`vdi-import`, `vdi-export --format`) and OVA packages (`vm-export`, `vm-import`).
//! qemu does all the format work; the bytes still travel over poolctl's own iSCSI
//! initiator (`crate::transfer`), zero ranges skipped, so thin volumes stay thin.
//!
//! # Layout
//! - `pool_image` (shared with `poold`): qemu-img and qemu-nbd, the OVA's archive,
//!   descriptor and manifest, a VM's package.
//! - `nbd.rs`: the reading half of an NBD client, for the disk `qemu-nbd` serves.
//! - `disk.rs`: one image into a new disk, a disk out as qcow2 or VMDK.
//! - `vm.rs`: `vm-export` and `vm-import`.

pub mod disk;
mod nbd;
pub mod vm;

pub use pool_image::{ova, qemu};

use std::os::unix::fs::FileExt;
use std::sync::Arc;

use anyhow::Context;

use self::qemu::{Format, Image, NbdServer};

/// An image's virtual disk read as raw bytes: from its own file where the bytes lie
/// there as they are, else through `qemu-nbd`.
pub enum Reader {
    Direct(Direct),
    /// Boxed: a child process and a socket are large beside a file.
    Nbd(Box<(nbd::Client, NbdServer)>),
}

/// An image file read directly; clones share it (reads on blocking threads).
#[derive(Clone)]
pub struct Direct {
    file: Arc<std::fs::File>,
    /// None: a raw file, the virtual disk itself. Some: another format's file, whose data
    /// qemu says is stored as is at these places (an uncompressed qcow2, VHD, VHDX).
    extents: Option<Arc<[qemu::Extent]>>,
}

impl Direct {
    /// Fills `buf` from the virtual disk at `offset`; past its end reads zeros.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let Some(extents) = &self.extents else {
            return read_full(&self.file, buf, offset);
        };
        buf.fill(0);
        let end = offset + buf.len() as u64;
        let first = extents.partition_point(|e| e.start + e.length <= offset);
        for e in extents[first..].iter().take_while(|e| e.start < end) {
            let from = e.start.max(offset);
            let to = (e.start + e.length).min(end);
            let at = (from - offset) as usize..(to - offset) as usize;
            read_full(&self.file, &mut buf[at], e.offset + (from - e.start))?;
        }
        Ok(())
    }
}

impl Reader {
    pub async fn open(img: &Image, map: &qemu::Map) -> anyhow::Result<Reader> {
        let direct = |extents| -> anyhow::Result<Reader> {
            let file = std::fs::File::open(&img.path)
                .with_context(|| format!("opening {}", img.path.display()))?;
            Ok(Reader::Direct(Direct {
                file: Arc::new(file),
                extents,
            }))
        };
        if img.format == Format::Raw {
            return direct(None);
        }
        if let Some(extents) = &map.in_file {
            return direct(Some(extents.as_slice().into()));
        }
        let server = NbdServer::start(img).await?;
        // The socket exists from its bind; qemu-nbd listens a moment later.
        let mut tries = 0;
        let client = loop {
            match nbd::Client::connect(&server.socket).await {
                Ok(c) => break c,
                Err(nbd::NbdError::Io(e))
                    if e.kind() == std::io::ErrorKind::ConnectionRefused && tries < 100 =>
                {
                    tries += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
                Err(e) => {
                    server.stop().await;
                    return Err(e).with_context(|| {
                        format!("reading {} through qemu-nbd", img.path.display())
                    });
                }
            }
        };
        Ok(Reader::Nbd(Box::new((client, server))))
    }

    /// Fills `buf` from the virtual disk at `offset`; past its end reads zeros.
    pub async fn read_at(&mut self, buf: &mut [u8], offset: u64) -> anyhow::Result<()> {
        match self {
            Reader::Direct(d) => d.read_at(buf, offset)?,
            Reader::Nbd(nbd) => {
                let client = &mut nbd.0;
                let have = client.size.saturating_sub(offset).min(buf.len() as u64) as usize;
                buf[have..].fill(0);
                if have > 0 {
                    client.read_at(&mut buf[..have], offset).await?;
                }
            }
        }
        Ok(())
    }

    /// The file itself, when the bytes are read from it.
    pub fn direct(&self) -> Option<Direct> {
        match self {
            Reader::Direct(d) => Some(d.clone()),
            Reader::Nbd(_) => None,
        }
    }

    pub async fn close(self) {
        if let Reader::Nbd(nbd) = self {
            let (client, server) = *nbd;
            client.close().await;
            server.stop().await;
        }
    }
}

/// Fills `buf` from `f` at `offset`; past the file's end reads zeros.
fn read_full(f: &std::fs::File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let n = f.read_at(&mut buf[done..], offset + done as u64)?;
        if n == 0 {
            buf[done..].fill(0);
            break;
        }
        done += n;
    }
    Ok(())
}
