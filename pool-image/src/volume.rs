//! A pool volume read over iSCSI, as `OpenVolumeAccess` grants it: logged in with CHAP
//! both ways (the target proves itself too), several reads in flight, zero blocks left
//! as holes in the file written.

use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

use anyhow::Context;
use iscsi_initiator::{Chap, SessionConfig};
/// What [`connect`] answers, for callers that hold on to them.
pub use iscsi_initiator::{Lun, Session};
use proto::coordinator as pb;
use tokio::task::JoinSet;

/// Requests of this size at most (the LUN's limit may lower it), this many in flight.
const CHUNK: usize = 1 << 20;
pub const IN_FLIGHT: usize = 8;

/// Logs `initiator` in to the volume `access` describes; its LUN.
pub async fn connect(access: &pb::VolumeAccess, initiator: &str) -> anyhow::Result<(Session, Lun)> {
    let mut cfg = SessionConfig::new(
        access.portal.clone(),
        access.target_iqn.clone(),
        initiator.to_owned(),
    );
    if !access.chap_username.is_empty() {
        cfg.chap = Some(Chap::new(
            access.chap_username.clone(),
            access.chap_secret.clone().into_bytes(),
        ));
    }
    if !access.mutual_chap_username.is_empty() {
        cfg.mutual_chap = Some(Chap::new(
            access.mutual_chap_username.clone(),
            access.mutual_chap_secret.clone().into_bytes(),
        ));
    }
    let session = Session::connect(cfg)
        .await
        .with_context(|| format!("logging in to {}", access.portal))?;
    match session.lun(access.lun as u16).await {
        Ok(lun) => Ok((session, lun)),
        Err(e) => {
            let _ = session.logout().await;
            Err(e.into())
        }
    }
}

/// The largest request to send to `lun`: a whole number of blocks.
pub fn chunk(lun: &Lun) -> usize {
    let bs = lun.block_size() as usize;
    let max = lun.max_transfer().max(bs);
    (CHUNK.min(max) / bs) * bs
}

pub fn zeros(b: &[u8]) -> bool {
    // An OR over each block vectorises; the first block with a bit set ends the look.
    b.chunks(512).all(|c| c.iter().fold(0, |a, &x| a | x) == 0)
}

/// Reads the whole LUN into `file` (created 0600, it must not exist; zero blocks left as
/// holes), telling `progress` the bytes read so far.
pub async fn read_to_file(
    lun: &Lun,
    file: &Path,
    mut progress: impl FnMut(u64),
) -> anyhow::Result<()> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(file)
        .with_context(|| format!("creating {} (it must not exist)", file.display()))?;
    let len = lun.size();
    f.set_len(len)?;
    let bs = u64::from(lun.block_size());
    let chunk = chunk(lun) as u64;
    let mut tasks = JoinSet::new();
    let mut offset = 0u64;
    let mut done = 0u64;
    while offset < len || !tasks.is_empty() {
        if offset < len && tasks.len() < IN_FLIGHT {
            let n = chunk.min(len - offset);
            let lun = lun.clone();
            let at = offset;
            tasks.spawn(async move { lun.read(at / bs, (n / bs) as u32).await.map(|d| (at, d)) });
            offset += n;
            continue;
        }
        let (at, data) = tasks.join_next().await.expect("a task")??;
        done += data.len() as u64;
        if !zeros(&data) {
            f.write_all_at(&data, at)?;
        }
        progress(done);
    }
    f.sync_all()?;
    Ok(())
}
