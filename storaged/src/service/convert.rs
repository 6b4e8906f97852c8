//! The service's conversions: pool and export models to protobuf messages and back,
//! pool and export errors to status codes a client can act on, and paging.

use std::collections::{BTreeMap, HashMap};

use proto::storage as pb;
use tonic::Status;
use uuid::Uuid;

use crate::backing::BackingError;
use crate::export::{Chap, ExportError, Grant};
use crate::pool::{PoolError, ThinPool, Usage, VolumeInfo};
use crate::{BackingKind, VolumeKind};

/// Page size when the client asks for none, and the most a page holds.
const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 1000;

pub fn status(e: PoolError) -> Status {
    let msg = proto::error_chain(&e);
    match e {
        PoolError::NoVolume(_) => Status::not_found(msg),
        PoolError::NameTaken(_) | PoolError::AlreadyPool { .. } => Status::already_exists(msg),
        PoolError::InvalidArgument(_)
        | PoolError::NotSameLineage { .. }
        | PoolError::OutOfRange { .. }
        | PoolError::Misaligned { .. } => Status::invalid_argument(msg),
        PoolError::NoSpace => Status::resource_exhausted(msg),
        PoolError::ReadOnly { .. }
        | PoolError::ShrinkNeedsForce { .. }
        | PoolError::NotSnapshotOf { .. }
        | PoolError::NotEmpty { .. }
        | PoolError::Superblock { .. }
        | PoolError::MetaMismatch { .. }
        | PoolError::UnexpectedPool { .. }
        | PoolError::Corrupt { .. } => Status::failed_precondition(msg),
        PoolError::Backing(BackingError::InUse { .. }) => Status::failed_precondition(msg),
        PoolError::Backing(BackingError::Open { .. })
        | PoolError::Backing(BackingError::WrongKind { .. }) => Status::invalid_argument(msg),
        PoolError::Meta(crate::meta::MetaError::NotEmpty { .. })
        | PoolError::Meta(crate::meta::MetaError::Missing { .. })
        | PoolError::Meta(crate::meta::MetaError::Version { .. }) => {
            Status::failed_precondition(msg)
        }
        PoolError::Failed => Status::unavailable(msg),
        PoolError::Backing(_) | PoolError::Meta(_) => Status::internal(msg),
    }
}

pub(super) fn parse_id(field: &str, s: &str) -> Result<Uuid, Status> {
    s.parse()
        .map_err(|_| Status::invalid_argument(format!("{field} {s:?} is not a UUID")))
}

/// The contract's time for seconds since the epoch, as storaged's records keep them.
pub(super) fn timestamp(secs: u64) -> Option<prost_types::Timestamp> {
    Some(proto::timestamp(secs.saturating_mul(1000)))
}

/// A page of `items`, with the offset-based token of the next page.
pub(super) fn page<T>(
    items: Vec<T>,
    page_size: u32,
    token: &str,
) -> Result<(Vec<T>, String), Status> {
    let start: usize = if token.is_empty() {
        0
    } else {
        token.parse().map_err(|_| {
            Status::invalid_argument(format!(
                "page_token {token:?} is not one this server issued"
            ))
        })?
    };
    let size = match page_size as usize {
        0 => DEFAULT_PAGE,
        n => n.min(MAX_PAGE),
    };
    let total = items.len();
    let out: Vec<T> = items.into_iter().skip(start).take(size).collect();
    let next = if start + out.len() < total {
        (start + out.len()).to_string()
    } else {
        String::new()
    };
    Ok((out, next))
}

pub(super) fn pb_usage(u: &Usage) -> pb::PoolUsage {
    pb::PoolUsage {
        total_chunks: u.total_chunks,
        used_chunks: u.used_chunks,
        free_chunks: u.free_chunks,
        total_bytes: u.total_bytes(),
        used_bytes: u.used_bytes(),
        free_bytes: u.free_bytes(),
        provisioned_bytes: u.provisioned_bytes,
        warning_threshold_percent: u.warning_threshold_percent,
        warning: u.warning,
        metadata_bytes: u.metadata_bytes,
        volume_count: u.volume_count,
        snapshot_count: u.snapshot_count,
    }
}

pub(super) fn pb_pool(p: &ThinPool) -> pb::ThinPool {
    let u = p.usage();
    let state = if u.free_chunks == 0 {
        pb::PoolState::Full
    } else if u.warning {
        pb::PoolState::LowSpace
    } else {
        pb::PoolState::Online
    };
    pb::ThinPool {
        id: p.id().to_string(),
        name: p.name().to_owned(),
        backing_kind: match p.backing_kind() {
            BackingKind::File => pb::BackingKind::File,
            BackingKind::BlockDevice => pb::BackingKind::BlockDevice,
        } as i32,
        backing_path: p.backing_path().display().to_string(),
        chunk_size_bytes: p.chunk_size(),
        data_size_bytes: u.total_bytes(),
        device_size_bytes: u.total_bytes() + crate::superblock::DATA_OFFSET,
        usage: Some(pb_usage(&u)),
        created_at: None,
        state: state as i32,
    }
}

pub(super) fn pb_kind(k: VolumeKind) -> pb::VolumeKind {
    match k {
        VolumeKind::Volume => pb::VolumeKind::Volume,
        VolumeKind::Snapshot => pb::VolumeKind::Snapshot,
        VolumeKind::Clone => pb::VolumeKind::Clone,
    }
}

pub fn pb_volume(pool: &ThinPool, v: &VolumeInfo) -> pb::Volume {
    pb::Volume {
        id: v.id.to_string(),
        pool_id: pool.id().to_string(),
        name: v.name.clone(),
        kind: pb_kind(v.kind) as i32,
        origin_id: v.origin.map(|o| o.to_string()).unwrap_or_default(),
        virtual_size_bytes: v.size,
        allocated_bytes: v.allocated_bytes,
        exclusive_bytes: v.exclusive_bytes,
        shared_bytes: v.shared_bytes,
        read_only: v.read_only(),
        block_size_bytes: v.block_size,
        created_at: timestamp(v.created_at),
        labels: v.labels.clone().into_iter().collect(),
    }
}

pub(super) fn labels(map: HashMap<String, String>) -> BTreeMap<String, String> {
    map.into_iter().collect()
}

pub(super) fn backing_kind(k: i32) -> Result<BackingKind, Status> {
    match pb::BackingKind::try_from(k) {
        Ok(pb::BackingKind::File) => Ok(BackingKind::File),
        Ok(pb::BackingKind::BlockDevice) => Ok(BackingKind::BlockDevice),
        _ => Err(Status::invalid_argument(
            "backing_kind must be BACKING_KIND_FILE or BACKING_KIND_BLOCK_DEVICE",
        )),
    }
}

pub(super) fn volume_id(field: &str, s: &str) -> Result<Uuid, Status> {
    parse_id(field, s)
}

pub(super) fn chap_field(
    field: &str,
    c: Option<pb::ChapCredentials>,
) -> Result<Option<Chap>, Status> {
    match c {
        None => Ok(None),
        Some(c) if c.username.is_empty() && c.secret.is_empty() => Ok(None),
        Some(c) => {
            if c.username.is_empty() {
                return Err(Status::invalid_argument(format!(
                    "{field}.username is required"
                )));
            }
            // RFC 7143 section 12.1.3: secrets of at least 12 bytes (96 bits).
            if c.secret.len() < 12 || c.secret.len() > 255 {
                return Err(Status::invalid_argument(format!(
                    "{field}.secret must be 12 to 255 bytes"
                )));
            }
            Ok(Some(Chap {
                user: c.username,
                secret: c.secret,
            }))
        }
    }
}

pub(super) fn pb_grant(export: &Uuid, g: &Grant) -> pb::AccessGrant {
    // Secrets are write-only: the user name says which credentials are set.
    let creds = |c: &Option<Chap>| {
        c.as_ref().map(|c| pb::ChapCredentials {
            username: c.user.clone(),
            secret: String::new(),
        })
    };
    pb::AccessGrant {
        export_id: export.to_string(),
        initiator_iqn: g.initiator.clone(),
        chap: creds(&g.chap),
        mutual_chap: creds(&g.mutual_chap),
        granted_at: timestamp(g.granted_at),
    }
}

pub fn export_status(e: ExportError) -> Status {
    let msg = proto::error_chain(&e);
    match e {
        ExportError::NoExport(_) | ExportError::NoGrant { .. } => Status::not_found(msg),
        ExportError::AlreadyExported { .. } | ExportError::LunTaken { .. } => {
            Status::already_exists(msg)
        }
        ExportError::BadLun(_) => Status::invalid_argument(msg),
        ExportError::Pool(p) => status(p),
        ExportError::Target(_) => Status::failed_precondition(msg),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_walk_the_whole_list() {
        let items: Vec<u32> = (0..250).collect();
        let (a, t) = page(items.clone(), 100, "").unwrap();
        assert_eq!(a.len(), 100);
        let (b, t) = page(items.clone(), 100, &t).unwrap();
        assert_eq!(b[0], 100);
        let (c, t) = page(items.clone(), 100, &t).unwrap();
        assert_eq!((c.len(), t.as_str()), (50, ""));
        assert!(page(items, 10, "zz").is_err());
    }

    #[test]
    fn record_seconds_become_whole_second_timestamps() {
        let t = timestamp(1_763_000_000).unwrap();
        assert_eq!((t.seconds, t.nanos), (1_763_000_000, 0));
    }

    #[test]
    fn errors_map_to_actionable_codes() {
        assert_eq!(
            status(PoolError::NoSpace).code(),
            tonic::Code::ResourceExhausted
        );
        assert_eq!(
            status(PoolError::NoVolume(Uuid::nil())).code(),
            tonic::Code::NotFound
        );
        assert_eq!(
            status(PoolError::NameTaken("a".into())).code(),
            tonic::Code::AlreadyExists
        );
        assert_eq!(status(PoolError::Failed).code(), tonic::Code::Unavailable);
    }
}
