//! How the store's records are laid out in sled: the keys of each tree, log records (a
//! group of entries), the truncation point. Pure encoding, no I/O.

use protobuf::Message as _;
use raft::eraftpb::Entry;

/// `meta`: the format version, u32 BE.
pub(super) const K_FORMAT: &[u8] = b"format";
/// `meta`: the member id the directory belongs to, u64 BE.
pub(super) const K_MEMBER: &[u8] = b"member";
/// `meta`: the encoded `eraftpb.HardState`.
pub(super) const K_HARD: &[u8] = b"hard";
/// `meta`: the last entry removed from the log, see [`trunc_bytes`].
pub(super) const K_TRUNC: &[u8] = b"trunc";
/// `snap`: the encoded `eraftpb.SnapshotMetadata` of the stored snapshot.
pub(super) const K_SNAPMETA: &[u8] = b"meta";
/// `snap`: the stored snapshot's data.
pub(super) const K_SNAPDATA: &[u8] = b"data";

/// The `log` tree's key of the record whose first entry is `index`: big-endian, so that
/// sled's key order is the log's order.
pub(super) fn log_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

pub(super) fn be_u64(b: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(b.try_into().ok()?))
}

/// A log record: each entry as u32 BE length ‖ `eraftpb.Entry`.
pub(super) fn encode_group(entries: &[Entry]) -> Result<Vec<u8>, protobuf::ProtobufError> {
    let mut out = Vec::new();
    for e in entries {
        let b = e.write_to_bytes()?;
        out.extend_from_slice(&(b.len() as u32).to_be_bytes());
        out.extend_from_slice(&b);
    }
    Ok(out)
}

/// The entries of one log record; `None` when it is damaged.
pub(super) fn decode_group(mut v: &[u8]) -> Option<Vec<Entry>> {
    let mut out = Vec::new();
    while !v.is_empty() {
        let len = u32::from_be_bytes(v.get(..4)?.try_into().ok()?) as usize;
        let body = v.get(4..4 + len)?;
        out.push(Entry::parse_from_bytes(body).ok()?);
        v = &v[4 + len..];
    }
    Some(out)
}

/// The truncation point: u64 BE index ‖ u64 BE term of the last entry removed.
pub(super) fn trunc_bytes((index, term): (u64, u64)) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&index.to_be_bytes());
    b[8..].copy_from_slice(&term.to_be_bytes());
    b
}

/// The truncation point [`trunc_bytes`] wrote; `None` when the value has another size.
pub(super) fn parse_trunc(b: &[u8]) -> Option<(u64, u64)> {
    if b.len() != 16 {
        return None;
    }
    Some((be_u64(&b[..8])?, be_u64(&b[8..])?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, term: u64, data: &[u8]) -> Entry {
        let mut e = Entry::default();
        e.index = index;
        e.term = term;
        e.data = data.to_vec().into();
        e
    }

    #[test]
    fn a_log_record_round_trips_and_a_damaged_one_does_not_decode() {
        let entries = vec![entry(7, 2, b"a"), entry(8, 2, b""), entry(9, 3, &[5; 300])];
        let record = encode_group(&entries).unwrap();
        assert_eq!(decode_group(&record).unwrap(), entries);
        assert_eq!(decode_group(&[]).unwrap(), Vec::<Entry>::new());
        // Cut short inside the last entry, or inside a length.
        assert!(decode_group(&record[..record.len() - 1]).is_none());
        assert!(decode_group(&record[..2]).is_none());
    }

    #[test]
    fn the_truncation_point_round_trips_and_keys_sort_as_indexes() {
        let t = (u64::MAX - 1, 42);
        assert_eq!(parse_trunc(&trunc_bytes(t)), Some(t));
        assert_eq!(parse_trunc(&trunc_bytes(t)[..15]), None);
        assert!(log_key(255) < log_key(256));
        assert_eq!(be_u64(&log_key(300)), Some(300));
        assert_eq!(be_u64(&[1, 2, 3]), None);
    }
}
