//! `iscsi read` and `iscsi write`: a LUN to a file and back, like iscsi-dd, with several
//! transfers in flight.

use std::collections::BTreeMap;

use anyhow::{Context, bail};
use bytes::{Bytes, BytesMut};
use clap::Args;
use iscsi_initiator::Lun;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinSet;

#[derive(Args, Debug, Clone)]
pub struct Range {
    /// First block of the LUN.
    #[arg(long, default_value_t = 0)]
    pub lba: u64,
    /// Blocks to copy (read: to the end of the LUN; write: the whole file).
    #[arg(long)]
    pub blocks: Option<u64>,
    /// Bytes per transfer.
    #[arg(long, default_value_t = 1 << 20)]
    pub chunk: usize,
    /// Transfers in flight.
    #[arg(long, default_value_t = 8)]
    pub qd: usize,
}

fn chunk_blocks(lun: &Lun, r: &Range) -> anyhow::Result<u64> {
    let bs = u64::from(lun.block_size());
    let n = (r.chunk as u64 / bs).max(1);
    if r.qd == 0 {
        bail!("--qd must be at least 1");
    }
    Ok(n)
}

/// Copies blocks of the LUN into `path`, in order, with up to `qd` reads in flight.
pub async fn lun_to_file(lun: &Lun, path: &str, r: &Range) -> anyhow::Result<()> {
    let bs = u64::from(lun.block_size());
    if r.lba > lun.blocks() {
        bail!("--lba {} is past the LUN's {} blocks", r.lba, lun.blocks());
    }
    let total = r.blocks.unwrap_or(lun.blocks() - r.lba);
    let per = chunk_blocks(lun, r)?;
    let mut out: Box<dyn tokio::io::AsyncWrite + Unpin> = if path == "-" {
        Box::new(tokio::io::stdout())
    } else {
        Box::new(
            tokio::fs::File::create(path)
                .await
                .with_context(|| format!("creating {path}"))?,
        )
    };
    let mut inflight = JoinSet::new();
    let mut ready: BTreeMap<u64, BytesMut> = BTreeMap::new();
    let (mut next_issue, mut next_write) = (0u64, 0u64);
    while next_write < total {
        while next_issue < total && inflight.len() < r.qd {
            let n = per.min(total - next_issue);
            let lun = lun.clone();
            let at = next_issue;
            let lba = r.lba + at;
            inflight.spawn(async move {
                let buf = BytesMut::zeroed((n * bs) as usize);
                (at, lun.read_into(lba, buf).await)
            });
            next_issue += n;
        }
        let (at, res) = inflight
            .join_next()
            .await
            .expect("reads in flight")
            .context("read task")?;
        ready.insert(
            at,
            res.with_context(|| format!("reading block {}", r.lba + at))?,
        );
        while let Some(buf) = ready.remove(&next_write) {
            out.write_all(&buf).await.context("writing the file")?;
            next_write += buf.len() as u64 / bs;
        }
    }
    out.flush().await?;
    eprintln!("{} bytes read", total * bs);
    Ok(())
}

/// Copies `path` onto the LUN from `r.lba`, with up to `qd` writes in flight. A file that
/// does not end on a block boundary is padded with zeros.
pub async fn file_to_lun(lun: &Lun, path: &str, r: &Range) -> anyhow::Result<()> {
    let bs = u64::from(lun.block_size());
    let per = chunk_blocks(lun, r)?;
    let mut input: Box<dyn tokio::io::AsyncRead + Unpin> = if path == "-" {
        Box::new(tokio::io::stdin())
    } else {
        Box::new(
            tokio::fs::File::open(path)
                .await
                .with_context(|| format!("opening {path}"))?,
        )
    };
    let limit = r.blocks.map(|b| b * bs);
    let mut inflight = JoinSet::new();
    let mut done = 0u64;
    let mut eof = false;
    while !eof || !inflight.is_empty() {
        while !eof && inflight.len() < r.qd {
            let want = match limit {
                Some(l) => (per * bs).min(l - done) as usize,
                None => (per * bs) as usize,
            };
            if want == 0 {
                eof = true;
                break;
            }
            let mut buf = vec![0u8; want];
            let mut got = 0;
            while got < want {
                let n = input
                    .read(&mut buf[got..])
                    .await
                    .context("reading the file")?;
                if n == 0 {
                    eof = true;
                    break;
                }
                got += n;
            }
            if got == 0 {
                break;
            }
            let padded = (got as u64).div_ceil(bs) * bs;
            buf.truncate(padded as usize);
            let lba = r.lba + done / bs;
            if lba + padded / bs > lun.blocks() {
                bail!(
                    "the file does not fit: block {} is past the LUN's end",
                    lba + padded / bs
                );
            }
            done += padded;
            let lun = lun.clone();
            inflight.spawn(async move { (lba, lun.write(lba, Bytes::from(buf)).await) });
        }
        if let Some(j) = inflight.join_next().await {
            let (lba, res) = j.context("write task")?;
            res.with_context(|| format!("writing at block {lba}"))?;
        }
    }
    eprintln!("{done} bytes written");
    Ok(())
}
