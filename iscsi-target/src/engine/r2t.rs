//! Write data: unsolicited Data-Out and immediate data, the R2Ts that solicit the rest
//! within MaxOutstandingR2T and the connection's budget of solicited bytes, and the
//! Data-Out that answers them, until the write has all its data and runs.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use iscsi_pdu::bhs::{DataOut, Header, R2t, RESERVED_TAG, ScsiCommand};
use tokio::sync::OwnedSemaphorePermit;

use super::{Engine, next_tag};
use crate::connection::ConnError;
use crate::lun::Lun;

/// Why a Data-Out PDU was refused (the connection ends: RFC 7143 leaves a target no
/// better answer at ErrorRecoveryLevel 0). Offsets and lengths are the initiator's, so
/// every sum here is taken in 64 bits.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum DataOutError {
    #[error(
        "unsolicited Data-Out of {len} bytes at {offset} (DataSN {data_sn}) does not continue {received} of {unsolicited} unsolicited bytes"
    )]
    Unsolicited {
        offset: u32,
        len: usize,
        data_sn: u32,
        received: u32,
        unsolicited: u32,
    },
    #[error("Data-Out for an unknown R2T (TTT {ttt:#x})")]
    UnknownR2t { ttt: u32 },
    #[error(
        "Data-Out of {len} bytes at {offset} (DataSN {data_sn}) does not continue its R2T of {r2t_len} bytes at {r2t_offset}, {received} received"
    )]
    Solicited {
        offset: u32,
        len: usize,
        data_sn: u32,
        r2t_offset: u32,
        r2t_len: u32,
        received: u32,
    },
    #[error("R2T sequence of {r2t_len} bytes ended after {received}")]
    ShortSequence { r2t_len: u32, received: u32 },
}

/// Whether `len` bytes at `offset` end at or before `limit`, in arithmetic that cannot
/// wrap whatever the initiator sent.
fn fits(offset: u32, len: usize, limit: u32) -> bool {
    u64::try_from(len)
        .ok()
        .and_then(|len| u64::from(offset).checked_add(len))
        .is_some_and(|end| end <= u64::from(limit))
}

/// A write command collecting its data.
pub(super) struct PendingWrite {
    permit: Option<OwnedSemaphorePermit>,
    cmd: ScsiCommand,
    pub(super) lun: Arc<Lun>,
    cdb: Bytes,
    buf: Vec<u8>,
    /// Bytes received so far.
    received: u32,
    /// Bytes of unsolicited data (immediate plus Data-Out without R2T) expected.
    unsolicited: u32,
    unsolicited_data_sn: u32,
    /// Whether the unsolicited sequence is over.
    unsolicited_done: bool,
    /// Outstanding R2Ts by target transfer tag.
    r2ts: BTreeMap<u32, R2tState>,
    next_r2t_offset: u32,
    r2t_sn: u32,
}

pub(super) struct R2tState {
    offset: u32,
    len: u32,
    received: u32,
    data_sn: u32,
}

impl Engine {
    /// Starts collecting a write's data after its immediate part: unsolicited Data-Out
    /// first (when InitialR2T=No), then R2Ts for the rest.
    pub(super) fn collect_write(
        &mut self,
        c: ScsiCommand,
        lun: Arc<Lun>,
        cdb: Bytes,
        immediate: Bytes,
        permit: Option<OwnedSemaphorePermit>,
    ) {
        let edtl = c.expected_data_len;
        let unsolicited = if !self.params.initial_r2t && !c.final_ {
            self.params.first_burst.min(edtl)
        } else {
            immediate.len() as u32
        };
        let mut buf = Vec::with_capacity(edtl as usize);
        buf.extend_from_slice(&immediate);
        let w = PendingWrite {
            permit,
            cmd: c,
            lun,
            cdb,
            buf,
            received: immediate.len() as u32,
            unsolicited,
            unsolicited_data_sn: 0,
            unsolicited_done: immediate.len() as u32 >= unsolicited,
            r2ts: BTreeMap::new(),
            next_r2t_offset: unsolicited,
            r2t_sn: 0,
        };
        let ready = w.unsolicited_done;
        self.pending.insert(c.itt, w);
        if ready {
            self.pump_r2t(c.itt);
        }
    }

    /// Issues R2Ts for a write while it is under MaxOutstandingR2T and the connection's
    /// budget of solicited bytes.
    pub(super) fn pump_r2t(&mut self, itt: u32) {
        let budget = self.inner.options.max_r2t_bytes_per_connection;
        let max_outstanding = self.params.max_outstanding_r2t.max(1) as usize;
        let max_burst = self.params.max_burst;
        let mut r2ts = Vec::new();
        let mut waiting = false;
        {
            let Some(w) = self.pending.get_mut(&itt) else {
                return;
            };
            let edtl = w.cmd.expected_data_len;
            while w.r2ts.len() < max_outstanding && w.next_r2t_offset < edtl {
                let len = max_burst.min(edtl - w.next_r2t_offset);
                let over = self
                    .r2t_bytes
                    .checked_add(u64::from(len))
                    .is_none_or(|total| total > budget);
                if self.r2t_bytes > 0 && over {
                    waiting = true;
                    break;
                }
                let ttt = next_tag(&mut self.next_ttt);
                w.r2ts.insert(
                    ttt,
                    R2tState {
                        offset: w.next_r2t_offset,
                        len,
                        received: 0,
                        data_sn: 0,
                    },
                );
                r2ts.push(R2t {
                    lun: w.cmd.lun,
                    itt,
                    ttt,
                    r2t_sn: w.r2t_sn,
                    buffer_offset: w.next_r2t_offset,
                    desired_len: len,
                    ..Default::default()
                });
                w.r2t_sn = w.r2t_sn.wrapping_add(1);
                w.next_r2t_offset += len;
                self.r2t_bytes += u64::from(len);
            }
        }
        if waiting && !self.r2t_waiting.contains(&itt) {
            self.r2t_waiting.push_back(itt);
        }
        for r in r2ts {
            self.push(Header::R2t(r), Bytes::new());
        }
    }

    pub(super) fn release_r2t_budget(&mut self, bytes: u64) {
        self.r2t_bytes = self.r2t_bytes.saturating_sub(bytes);
        let waiting: Vec<u32> = self.r2t_waiting.drain(..).collect();
        for itt in waiting {
            self.pump_r2t(itt);
        }
    }

    pub(super) fn drop_pending(&mut self, itt: u32) -> bool {
        match self.pending.remove(&itt) {
            Some(w) => {
                let outstanding: u64 = w.r2ts.values().map(|s| u64::from(s.len)).sum();
                self.release_r2t_budget(outstanding);
                true
            }
            None => false,
        }
    }

    pub(super) fn data_out(&mut self, d: DataOut, data: Bytes) -> Result<(), ConnError> {
        let Some(w) = self.pending.get_mut(&d.itt) else {
            // Data for a task that already ended (refused early or aborted): discard.
            return Ok(());
        };
        let edtl = w.cmd.expected_data_len;
        let mut freed = 0u64;
        if d.ttt == RESERVED_TAG {
            if w.unsolicited_done
                || d.data_sn != w.unsolicited_data_sn
                || d.buffer_offset != w.received
                || !fits(d.buffer_offset, data.len(), w.unsolicited)
            {
                return Err(DataOutError::Unsolicited {
                    offset: d.buffer_offset,
                    len: data.len(),
                    data_sn: d.data_sn,
                    received: w.received,
                    unsolicited: w.unsolicited,
                }
                .into());
            }
            // Fits within `unsolicited`, a u32.
            let len = data.len() as u32;
            w.unsolicited_data_sn = w.unsolicited_data_sn.wrapping_add(1);
            w.buf.extend_from_slice(&data);
            w.received += len;
            if d.final_ || w.received >= w.unsolicited {
                w.unsolicited_done = true;
            }
        } else {
            let Some(r) = w.r2ts.get_mut(&d.ttt) else {
                return Err(DataOutError::UnknownR2t { ttt: d.ttt }.into());
            };
            if d.data_sn != r.data_sn
                || u64::from(d.buffer_offset) != u64::from(r.offset) + u64::from(r.received)
                || !fits(r.received, data.len(), r.len)
            {
                return Err(DataOutError::Solicited {
                    offset: d.buffer_offset,
                    len: data.len(),
                    data_sn: d.data_sn,
                    r2t_offset: r.offset,
                    r2t_len: r.len,
                    received: r.received,
                }
                .into());
            }
            // Fits within the R2T's length, a u32, which lies within the write's.
            let len = data.len() as u32;
            r.data_sn = r.data_sn.wrapping_add(1);
            r.received += len;
            let at = d.buffer_offset as usize;
            if w.buf.len() == at {
                w.buf.extend_from_slice(&data);
            } else {
                if w.buf.len() < at + data.len() {
                    w.buf.resize(at + data.len(), 0);
                }
                w.buf[at..at + data.len()].copy_from_slice(&data);
            }
            w.received += len;
            if r.received == r.len {
                freed = u64::from(r.len);
                w.r2ts.remove(&d.ttt);
            } else if d.final_ {
                return Err(DataOutError::ShortSequence {
                    r2t_len: r.len,
                    received: r.received,
                }
                .into());
            }
        }
        let complete = w.received >= edtl;
        let unsolicited_done = w.unsolicited_done;
        if complete {
            let w = self.pending.remove(&d.itt).expect("present above");
            self.execute(w.cmd, w.lun, w.cdb, Bytes::from(w.buf), w.permit);
        } else if unsolicited_done {
            self.pump_r2t(d.itt);
        }
        if freed > 0 {
            self.release_r2t_budget(freed);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_out_ranges_that_wrap_or_pass_the_limit_do_not_fit() {
        assert!(fits(0, 8192, 8192));
        assert!(fits(4096, 4096, 8192));
        assert!(!fits(4096, 4097, 8192));
        // Offset and length whose 32-bit sum wraps to something small.
        assert!(!fits(u32::MAX, 1, u32::MAX));
        assert!(!fits(u32::MAX - 10, 4096, 100));
        assert!(!fits(0, usize::MAX, u32::MAX));
        assert!(fits(u32::MAX, 0, u32::MAX));
    }

    #[test]
    fn a_refused_data_out_says_what_it_carried() {
        let e = DataOutError::Solicited {
            offset: u32::MAX,
            len: 4096,
            data_sn: 0,
            r2t_offset: 0,
            r2t_len: 8192,
            received: 0,
        };
        assert_eq!(
            e.to_string(),
            "Data-Out of 4096 bytes at 4294967295 (DataSN 0) does not continue its R2T of 8192 bytes at 0, 0 received"
        );
    }
}
