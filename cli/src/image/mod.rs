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

use anyhow::Context;

use self::qemu::{Format, Image, NbdServer};

/// An image's virtual disk read as raw bytes: a raw file directly, any other format
/// through `qemu-nbd`.
pub enum Reader {
    File(std::fs::File),
    /// An image whose data qemu says is stored as is in the file (an uncompressed qcow2,
    /// VHD, VHDX): read there, without `qemu-nbd` between.
    Extents(std::fs::File, Vec<qemu::Extent>),
    /// Boxed: a child process and a socket are large beside a file.
    Nbd(Box<(nbd::Client, NbdServer)>),
}

impl Reader {
    pub async fn open(img: &Image, map: &qemu::Map) -> anyhow::Result<Reader> {
        let file = || {
            std::fs::File::open(&img.path)
                .with_context(|| format!("opening {}", img.path.display()))
        };
        if img.format == Format::Raw {
            return Ok(Reader::File(file()?));
        }
        if let Some(extents) = &map.in_file {
            return Ok(Reader::Extents(file()?, extents.clone()));
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
            Reader::File(f) => read_full(f, buf, offset)?,
            Reader::Extents(f, extents) => {
                buf.fill(0);
                let end = offset + buf.len() as u64;
                let first = extents.partition_point(|e| e.start + e.length <= offset);
                for e in extents[first..].iter().take_while(|e| e.start < end) {
                    let from = e.start.max(offset);
                    let to = (e.start + e.length).min(end);
                    let at = (from - offset) as usize..(to - offset) as usize;
                    read_full(f, &mut buf[at], e.offset + (from - e.start))?;
                }
            }
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
