//! What the engine sends: SCSI commands with their immediate and unsolicited data,
//! Data-Out for R2Ts, task management and pings, batched for vectored writes.

use std::io::{self, IoSlice, Write};
use std::sync::atomic::Ordering;

use bytes::Bytes;
use iscsi_pdu::bhs::{DataOut, Header, NopOut, RESERVED_TAG, ScsiCommand, TaskMgmtRequest};
use tokio::net::TcpStream;

use super::Engine;
use super::slots::Owner;
use crate::connection::ConnError;
use crate::journal;

/// The socket as a [`Write`] for [`iscsi_pdu::tx::TxBatch`]: writes go through tokio's
/// `try_write*`, which say `WouldBlock` (and clear the write readiness the event loop
/// waits on) when the socket is full.
struct NonBlocking<'a>(&'a TcpStream);

impl Write for NonBlocking<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.try_write(buf)
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.0.try_write_vectored(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Engine<'_> {
    pub(super) fn flush(&mut self) -> Result<(), ConnError> {
        if self.tx.is_empty() {
            return Ok(());
        }
        self.counters.sends.fetch_add(1, Ordering::Relaxed);
        self.tx
            .write_to(&mut NonBlocking(&self.stream))
            .map(|_| ())
            .map_err(ConnError::Io)
    }

    pub(super) fn push_pdu(&mut self, h: &Header, data: Bytes) {
        self.tx.push_pdu(h, data, &self.tx_cfg);
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
