//! `vdi-import` and `vdi-export`: disk images in and out of the pool's volumes.
//!
//! The data does not pass through the coordinator: it grants this client's own initiator
//! name access to the volume (OpenVolumeAccess) and poolctl reads or writes the blocks
//! over iSCSI straight from storaged, several requests in flight, then revokes the grant.
//! An import reads the image as a raw disk (`crate::image::Reader`: a raw file itself,
//! another format's file where `qemu-img map` says its data is stored as is, or else
//! through `qemu-nbd`), only the ranges qemu maps as data. Zero blocks are
//! neither written (a fresh thin volume reads zeros) nor stored in the exported file
//! (they stay holes). Backups (`crate::backup`) read and restore chunks
//! through the same grant ([`open`], [`Access`]).

use std::collections::VecDeque;
use std::ops::Range;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, bail};
use iscsi_initiator::Session;
use pool_client::{PoolClient, new_request_id};
use pool_image::volume::{IN_FLIGHT, zeros};
use proto::coordinator as pb;
use tokio::task::JoinSet;

use crate::image::Reader;
use crate::output::Progress;

/// An open grant, revoked on every way out.
pub(crate) struct Access {
    volume_id: String,
    initiator: String,
    session: Option<Session>,
    pub(crate) lun: iscsi_initiator::Lun,
}

pub(crate) async fn open(client: &mut PoolClient, volume_id: &str) -> anyhow::Result<Access> {
    let initiator = format!("iqn.2026-11.org.pool.poolctl:{}", new_request_id());
    let req = pb::VolumeAccessRequest {
        volume_id: volume_id.to_owned(),
        initiator_iqn: initiator.clone(),
    };
    let access = client
        .call(|mut p| {
            let req = req.clone();
            async move { p.open_volume_access(req).await }
        })
        .await
        .map_err(crate::ctl::explain)?;
    let opened = pool_image::volume::connect(&access, &initiator).await;
    match opened {
        Ok((session, lun)) => Ok(Access {
            volume_id: volume_id.to_owned(),
            initiator,
            session: Some(session),
            lun,
        }),
        Err(e) => {
            close_grant(client, volume_id, &initiator).await;
            Err(e)
        }
    }
}

async fn close_grant(client: &mut PoolClient, volume_id: &str, initiator: &str) {
    let req = pb::VolumeAccessRequest {
        volume_id: volume_id.to_owned(),
        initiator_iqn: initiator.to_owned(),
    };
    if let Err(e) = client
        .call(|mut p| {
            let req = req.clone();
            async move { p.close_volume_access(req).await }
        })
        .await
    {
        eprintln!("warning: the grant of {initiator} on volume {volume_id} stays: {e}");
    }
}

impl Access {
    pub(crate) async fn close(mut self, client: &mut PoolClient) {
        if let Some(s) = self.session.take() {
            let _ = s.logout().await;
        }
        close_grant(client, &self.volume_id, &self.initiator).await;
    }

    /// The largest request to send: a whole number of blocks.
    pub(crate) fn chunk(&self) -> usize {
        pool_image::volume::chunk(&self.lun)
    }
}

/// Pieces read ahead of the writes when the image file is read directly.
const READ_AHEAD: usize = 4;

/// A piece's length, and that padded with zeros to a whole block (the last piece's may
/// not be).
fn padded(p: &Range<u64>, bs: u64) -> (usize, usize) {
    let n = p.end - p.start;
    (n as usize, (n.div_ceil(bs) * bs) as usize)
}

/// Redraws the bar: `done` of `total` bytes moved since `start`.
fn show_progress(bar: &mut Progress, done: u64, total: u64, start: Instant) {
    let secs = start.elapsed().as_secs_f64().max(1e-6);
    bar.show(
        (done * 100 / total.max(1)) as u32,
        &format!(
            "{} of {} MiB, {:.0} MiB/s",
            done >> 20,
            total >> 20,
            done as f64 / secs / (1 << 20) as f64
        ),
    );
}

/// Writes the image `src` reads (`len` bytes of virtual disk, data only in `data`, the
/// rest zeros) into volume `volume_id`, which must be at least as large.
pub(crate) async fn import(
    client: &mut PoolClient,
    volume_id: &str,
    src: &mut Reader,
    len: u64,
    data: &[Range<u64>],
) -> anyhow::Result<()> {
    let access = open(client, volume_id).await?;
    let r = copy_in(&access, src, len, data).await;
    access.close(client).await;
    r
}

/// The pieces of `chunk` bytes (a grid from 0) that hold any of `data`, cut at `len`.
fn pieces(data: &[Range<u64>], len: u64, chunk: u64) -> Vec<Range<u64>> {
    let mut out: Vec<Range<u64>> = Vec::new();
    for r in data {
        let end = r.end.min(len);
        if r.start >= end {
            continue;
        }
        let mut c = r.start / chunk;
        while c * chunk < end {
            let piece = c * chunk..((c + 1) * chunk).min(len);
            if out.last() != Some(&piece) {
                out.push(piece);
            }
            c += 1;
        }
    }
    out
}

async fn copy_in(
    a: &Access,
    src: &mut Reader,
    len: u64,
    data: &[Range<u64>],
) -> anyhow::Result<()> {
    if len > a.lun.size() {
        bail!("the image has {len} bytes, the disk only {}", a.lun.size());
    }
    let bs = u64::from(a.lun.block_size());
    let pieces = pieces(data, len, a.chunk() as u64);
    let total: u64 = pieces.iter().map(|p| p.end - p.start).sum();
    let mut bar = Progress::new();
    let start = Instant::now();
    let mut tasks = JoinSet::new();
    let mut done = 0u64;
    // A file read directly is read ahead on blocking threads, leaving this runtime's one
    // thread to the writes in flight; qemu-nbd's socket is read here, a piece at a time.
    let direct = src.direct();
    let mut ahead = VecDeque::new();
    let mut pieces = pieces.into_iter();
    loop {
        let (p, buf) = match &direct {
            Some(d) => {
                while ahead.len() < READ_AHEAD
                    && let Some(p) = pieces.next()
                {
                    let (d, start) = (d.clone(), p.start);
                    let (n, padded) = padded(&p, bs);
                    let read = tokio::task::spawn_blocking(move || {
                        let mut buf = vec![0u8; padded];
                        d.read_at(&mut buf[..n], start).map(|()| buf)
                    });
                    ahead.push_back((p, read));
                }
                let Some((p, read)) = ahead.pop_front() else {
                    break;
                };
                let buf = read.await?.context("reading the image")?;
                (p, buf)
            }
            None => {
                let Some(p) = pieces.next() else {
                    break;
                };
                let (n, padded) = padded(&p, bs);
                let mut buf = vec![0u8; padded];
                src.read_at(&mut buf[..n], p.start).await?;
                (p, buf)
            }
        };
        // A fresh thin volume reads zeros: zero pieces are not written, so it stays thin.
        if !zeros(&buf) {
            if tasks.len() >= IN_FLIGHT {
                tasks.join_next().await.expect("a task")??;
            }
            let lun = a.lun.clone();
            let lba = p.start / bs;
            tasks.spawn(async move { lun.write(lba, buf.into()).await });
        }
        done += p.end - p.start;
        show_progress(&mut bar, done, total, start);
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    a.lun.flush().await.context("flushing the disk")?;
    bar.done();
    Ok(())
}

/// Reads volume `volume_id` into `file` (created, 0600; zero blocks left as holes).
pub async fn export(client: &mut PoolClient, volume_id: &str, file: &Path) -> anyhow::Result<()> {
    let access = open(client, volume_id).await?;
    let r = copy_out(&access, file).await;
    access.close(client).await;
    r
}

async fn copy_out(a: &Access, file: &Path) -> anyhow::Result<()> {
    let len = a.lun.size();
    let mut bar = Progress::new();
    let start = Instant::now();
    pool_image::volume::read_to_file(&a.lun, file, |done| {
        show_progress(&mut bar, done, len, start)
    })
    .await?;
    bar.done();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_cover_each_data_range_once_on_the_chunk_grid() {
        let mib = 1u64 << 20;
        // Two ranges in one chunk, one across a boundary, one past the end.
        let data = [10..20, 30..40, 2 * mib - 5..2 * mib + 5, 9 * mib..10 * mib];
        assert_eq!(
            pieces(&data, 3 * mib - 7, mib),
            [0..mib, mib..2 * mib, 2 * mib..3 * mib - 7]
        );
        assert!(pieces(&[], 4 * mib, mib).is_empty());
    }
}
