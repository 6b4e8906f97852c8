//! What the engine sends: SCSI commands with their immediate and unsolicited data,
//! Data-Out for R2Ts, task management and pings, all gathered into one vectored write.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::sync::atomic::Ordering;

use bytes::{Buf, Bytes, BytesMut};
use iscsi_pdu::bhs::{DataOut, Header, NopOut, RESERVED_TAG, ScsiCommand, TaskMgmtRequest};
use iscsi_pdu::frame;
use tokio::net::TcpStream;

use super::Engine;
use super::slots::Owner;
use crate::connection::ConnError;
use crate::journal;

/// Buffers one `writev` takes at most.
const MAX_IOV: usize = 64;
/// Pieces of write data shorter than this are copied into the header buffer.
const COPY_BELOW: usize = 2048;

/// Outgoing bytes: small pieces (headers, digests, short data) gathered in one buffer,
/// long data segments kept as they are, all sent with `writev`.
#[derive(Debug, Default)]
pub(super) struct TxQueue {
    segs: VecDeque<Bytes>,
    small: BytesMut,
    len: usize,
}

impl TxQueue {
    fn push_small(&mut self, b: &[u8]) {
        self.small.extend_from_slice(b);
        self.len += b.len();
    }

    fn push_data(&mut self, d: Bytes) {
        if d.len() < COPY_BELOW {
            self.push_small(&d);
            return;
        }
        self.seal();
        self.len += d.len();
        self.segs.push_back(d);
    }

    fn seal(&mut self) {
        if !self.small.is_empty() {
            self.segs.push_back(self.small.split().freeze());
        }
    }

    pub(super) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes queued and not yet written.
    pub(super) fn len(&self) -> usize {
        self.len
    }

    /// Writes what the socket takes now. `Ok(true)` when everything went.
    pub(super) fn flush(&mut self, stream: &TcpStream) -> std::io::Result<bool> {
        self.seal();
        while !self.segs.is_empty() {
            let mut iov = [IoSlice::new(&[]); MAX_IOV];
            let n = self.segs.len().min(MAX_IOV);
            for (slot, seg) in iov.iter_mut().zip(self.segs.iter()) {
                *slot = IoSlice::new(seg);
            }
            match stream.try_write_vectored(&iov[..n]) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(mut written) => {
                    self.len -= written;
                    while written > 0 {
                        let front = self.segs.front_mut().expect("written bytes were queued");
                        if written >= front.len() {
                            written -= front.len();
                            self.segs.pop_front();
                        } else {
                            front.advance(written);
                            written = 0;
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }
}

impl Engine<'_> {
    pub(super) fn flush(&mut self) -> Result<(), ConnError> {
        if self.tx.is_empty() {
            return Ok(());
        }
        self.counters.sends.fetch_add(1, Ordering::Relaxed);
        self.tx
            .flush(&self.stream)
            .map(|_| ())
            .map_err(ConnError::Io)
    }

    pub(super) fn push_pdu(&mut self, h: &Header, data: Bytes) {
        let eh = frame::encode_header(h, data.len(), &self.tx_cfg);
        self.tx.push_small(eh.as_bytes());
        if !data.is_empty() {
            let tr = frame::trailer(&data, &self.tx_cfg);
            self.tx.push_data(data);
            self.tx.push_small(tr.as_bytes());
        }
    }

    /// Sends a SCSI command (a caller's, a replay, or our own flush) with the next CmdSN:
    /// the command PDU with any immediate data, then any unsolicited Data-Out.
    pub(super) fn send_command(&mut self, owner: Owner) {
        let cmd_sn = self.cmd_sn;
        let itt = self.new_task(owner, cmd_sn, self.cfg.timeouts.command);
        let mark = self.journal.mark();
        let task = self.slots.get_mut(itt).expect("just inserted");
        let cmd = task.command().expect("only commands are sent here");
        let (lun, cdb, attr) = (cmd.lun, cmd.cdb, cmd.attr);
        let data_out = cmd.data_out.clone();
        let read_len = cmd.data_in.len();
        if journal::kind(&cdb) == journal::Kind::Flush {
            task.flush_mark = mark;
        }
        let write_len = data_out.len();
        self.cmd_sn = self.cmd_sn.wrapping_add(1);
        self.scsi_in_flight += 1;
        let in_flight = self.scsi_in_flight as u64;
        self.counters.commands.fetch_add(1, Ordering::Relaxed);
        self.counters.in_flight.store(in_flight, Ordering::Relaxed);
        self.counters
            .max_in_flight
            .fetch_max(in_flight, Ordering::Relaxed);
        let p = self.params;
        let max_seg = p.max_xmit_data_segment as usize;
        let first_burst = p.first_burst as usize;
        let immediate = if p.immediate_data {
            write_len.min(first_burst).min(max_seg)
        } else {
            0
        };
        let unsolicited = if p.initial_r2t {
            immediate
        } else {
            write_len.min(first_burst)
        };
        let h = ScsiCommand {
            immediate: false,
            final_: unsolicited <= immediate,
            read: read_len > 0,
            write: write_len > 0,
            attr,
            lun,
            itt,
            expected_data_len: if write_len > 0 { write_len } else { read_len } as u32,
            cmd_sn,
            exp_stat_sn: self.exp_stat_sn,
            cdb,
        };
        self.push_pdu(&Header::ScsiCommand(h), data_out.slice(..immediate));
        if unsolicited > immediate {
            self.send_data_out(
                lun,
                itt,
                RESERVED_TAG,
                &data_out,
                immediate,
                unsolicited - immediate,
            );
        }
    }

    /// Data-Out PDUs for `len` bytes from `offset`: one sequence (DataSN from 0, F on
    /// the last), each PDU within the target's MaxRecvDataSegmentLength.
    pub(super) fn send_data_out(
        &mut self,
        lun: u64,
        itt: u32,
        ttt: u32,
        data: &Bytes,
        offset: usize,
        len: usize,
    ) {
        let max_seg = (self.params.max_xmit_data_segment as usize).max(512);
        let end = offset + len;
        let mut at = offset;
        let mut data_sn = 0u32;
        while at < end {
            let n = max_seg.min(end - at);
            let h = DataOut {
                final_: at + n == end,
                lun,
                itt,
                ttt,
                exp_stat_sn: self.exp_stat_sn,
                data_sn,
                buffer_offset: at as u32,
            };
            self.push_pdu(&Header::DataOut(h), data.slice(at..at + n));
            at += n;
            data_sn = data_sn.wrapping_add(1);
        }
    }

    pub(super) fn push_tmf(
        &mut self,
        function: u8,
        lun: u64,
        itt: u32,
        referenced: u32,
        ref_cmd_sn: u32,
    ) {
        let h = TaskMgmtRequest {
            immediate: true,
            function,
            lun,
            itt,
            referenced_task_tag: referenced,
            cmd_sn: self.cmd_sn,
            exp_stat_sn: self.exp_stat_sn,
            ref_cmd_sn,
            exp_data_sn: 0,
        };
        self.push_pdu(&Header::TaskMgmtRequest(h), Bytes::new());
    }

    pub(super) fn push_ping(&mut self, itt: u32) {
        let h = NopOut {
            immediate: true,
            lun: 0,
            itt,
            ttt: RESERVED_TAG,
            cmd_sn: self.cmd_sn,
            exp_stat_sn: self.exp_stat_sn,
        };
        self.counters.pings.fetch_add(1, Ordering::Relaxed);
        self.push_pdu(&Header::NopOut(h), Bytes::new());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tx_queue_keeps_long_data_apart_and_counts_bytes() {
        let mut q = TxQueue::default();
        q.push_small(&[1; 48]);
        q.push_data(Bytes::from(vec![2u8; 100]));
        q.push_data(Bytes::from(vec![3u8; 8192]));
        q.push_small(&[4; 4]);
        q.seal();
        assert_eq!(q.len, 48 + 100 + 8192 + 4);
        // Small pieces merged around the long segment.
        assert_eq!(q.segs.len(), 3);
        assert_eq!(q.segs[0].len(), 148);
        assert_eq!(q.segs[1].len(), 8192);
    }
}
