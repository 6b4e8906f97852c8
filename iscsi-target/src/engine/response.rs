//! What a finished command sends: its data as Data-In PDUs split at
//! MaxXmitDataSegmentLength and MaxBurstLength, its status collapsed into the last one or
//! in a SCSI Response with the sense data, and the residual counts.

use bytes::Bytes;
use iscsi_pdu::bhs::{DataIn, Header, RESERVED_TAG, ScsiCommand, ScsiResponse};

use super::Engine;
use crate::scsi;
use crate::scsi::sense::{Sense, status};

impl Engine {
    pub(super) fn respond(&mut self, c: &ScsiCommand, reply: scsi::Reply) {
        let pdus = build_response(
            c,
            reply,
            self.params.max_xmit_data_segment,
            self.params.max_burst,
        );
        self.out.extend(pdus);
    }

    /// Answers GOOD with `data` as Data-In.
    pub(super) fn respond_data(&mut self, c: &ScsiCommand, data: Vec<u8>) {
        let reply = scsi::Reply {
            status: status::GOOD,
            data_in: data,
            ..Default::default()
        };
        self.respond(c, reply);
    }

    pub(super) fn respond_status(&mut self, c: &ScsiCommand, status: u8, sense: Option<Sense>) {
        let reply = scsi::Reply {
            status,
            sense: sense.map(|s| s.to_fixed().to_vec()).unwrap_or_default(),
            ..Default::default()
        };
        self.respond(c, reply);
    }
}

/// Turns a finished command into PDUs: Data-In carrying the data (the last with status
/// when there is no sense: phase collapse), or Data-In then a SCSI Response.
pub(super) fn build_response(
    c: &ScsiCommand,
    reply: scsi::Reply,
    max_seg: u32,
    max_burst: u32,
) -> Vec<(Header, Bytes)> {
    let edtl = c.expected_data_len;
    let mut data = reply.data_in;
    let produced = reply.data_in_len.unwrap_or(data.len() as u64);
    // Residuals compare what the command moved with what the initiator expected.
    let moved = if c.write && !c.read {
        u64::from(reply.data_out_len)
    } else {
        produced
    };
    let (overflow, underflow, residual) = match moved.cmp(&u64::from(edtl)) {
        std::cmp::Ordering::Greater => (true, false, (moved - u64::from(edtl)) as u32),
        std::cmp::Ordering::Less => (false, true, (u64::from(edtl) - moved) as u32),
        std::cmp::Ordering::Equal => (false, false, 0),
    };
    if !c.read {
        data.clear();
    }
    data.truncate(edtl as usize);
    let data = Bytes::from(data);
    let mut pdus = Vec::new();
    let collapse = reply.status == status::GOOD && reply.sense.is_empty() && !data.is_empty();
    let max_seg = max_seg.max(512) as usize;
    let max_burst = max_burst.max(512) as usize;
    let mut offset = 0usize;
    let mut data_sn = 0u32;
    while offset < data.len() {
        // A Data-In sequence ends (F) at every MaxBurstLength boundary.
        let burst_end = (offset / max_burst + 1) * max_burst;
        let end = (offset + max_seg).min(data.len()).min(burst_end);
        let last = end == data.len();
        let mut d = DataIn {
            final_: last || end == burst_end,
            lun: 0,
            itt: c.itt,
            ttt: RESERVED_TAG,
            data_sn,
            buffer_offset: offset as u32,
            ..Default::default()
        };
        if last && collapse {
            d.has_status = true;
            d.status = reply.status;
            d.overflow = overflow;
            d.underflow = underflow;
            d.residual = residual;
        }
        pdus.push((Header::DataIn(d), data.slice(offset..end)));
        data_sn += 1;
        offset = end;
    }
    if !collapse {
        let mut payload = Vec::new();
        if !reply.sense.is_empty() {
            payload.extend_from_slice(&(reply.sense.len() as u16).to_be_bytes());
            payload.extend_from_slice(&reply.sense);
        }
        let r = ScsiResponse {
            overflow,
            underflow,
            response: 0,
            status: reply.status,
            itt: c.itt,
            exp_data_sn: data_sn,
            residual,
            ..Default::default()
        };
        pdus.push((Header::ScsiResponse(r), Bytes::from(payload)));
    }
    pdus
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(read: bool, write: bool, edtl: u32) -> ScsiCommand {
        ScsiCommand {
            immediate: false,
            final_: true,
            read,
            write,
            attr: 1,
            lun: 0,
            itt: 9,
            expected_data_len: edtl,
            cmd_sn: 0,
            exp_stat_sn: 0,
            cdb: [0; 16],
        }
    }

    #[test]
    fn read_data_is_split_by_segment_and_burst_with_status_on_the_last() {
        let reply = scsi::Reply {
            status: status::GOOD,
            data_in: vec![1u8; 10_000],
            ..Default::default()
        };
        let pdus = build_response(&cmd(true, false, 10_000), reply, 4096, 8192);
        assert_eq!(pdus.len(), 3);
        let offsets: Vec<(u32, usize, bool, bool)> = pdus
            .iter()
            .map(|(h, d)| match h {
                Header::DataIn(x) => (x.buffer_offset, d.len(), x.final_, x.has_status),
                _ => panic!("not Data-In"),
            })
            .collect();
        assert_eq!(
            offsets,
            vec![
                (0, 4096, false, false),
                (4096, 4096, true, false),
                (8192, 1808, true, true)
            ]
        );
    }

    #[test]
    fn residuals_for_short_and_long_transfers() {
        let reply = scsi::Reply {
            status: status::GOOD,
            data_in: vec![0u8; 512],
            ..Default::default()
        };
        let pdus = build_response(&cmd(true, false, 200), reply, 8192, 8192);
        match &pdus[0].0 {
            Header::DataIn(d) => assert!(d.overflow && d.residual == 312 && d.has_status),
            _ => panic!(),
        }
        assert_eq!(pdus[0].1.len(), 200);
        let reply = scsi::Reply {
            status: status::GOOD,
            data_out_len: 512,
            ..Default::default()
        };
        let pdus = build_response(&cmd(false, true, 10_000), reply, 8192, 8192);
        match &pdus[0].0 {
            Header::ScsiResponse(r) => assert!(r.underflow && r.residual == 10_000 - 512),
            _ => panic!(),
        }
    }

    #[test]
    fn check_condition_carries_sense_in_a_response_pdu() {
        let reply = scsi::Reply {
            status: status::CHECK_CONDITION,
            sense: Sense::LBA_OUT_OF_RANGE.to_fixed().to_vec(),
            ..Default::default()
        };
        let pdus = build_response(&cmd(true, false, 512), reply, 8192, 8192);
        assert_eq!(pdus.len(), 1);
        assert_eq!(&pdus[0].1[..2], &18u16.to_be_bytes());
    }
}
