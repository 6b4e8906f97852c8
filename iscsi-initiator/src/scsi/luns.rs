//! REPORT LUNS (SPC-4 §6.33): the LUNs a target has, asked of LUN 0.

use bytes::BytesMut;
use iscsi_pdu::bhs::decode_lun;
use iscsi_pdu::scsi::opcode::REPORT_LUNS;
use iscsi_pdu::{be32, be64};

use super::sense::CommandInfo;
use crate::error::Error;
use crate::session::Session;
use crate::task::Command;

/// Parses REPORT LUNS data into LUN numbers (entries in other address methods skipped).
pub fn parse(d: &[u8]) -> Vec<u16> {
    if d.len() < 8 {
        return Vec::new();
    }
    let len = (be32(d, 0) as usize).min(d.len() - 8);
    d[8..8 + len - len % 8]
        .chunks_exact(8)
        .filter_map(|e| decode_lun(be64(e, 0)))
        .collect()
}

pub(crate) async fn report_luns(session: &Session) -> Result<Vec<u16>, Error> {
    let alloc: u32 = 16 * 1024;
    let mut cdb = [0u8; 12];
    cdb[0] = REPORT_LUNS;
    cdb[6..10].copy_from_slice(&alloc.to_be_bytes());
    let cmd = Command::new(0, &cdb).with_data_in(BytesMut::new(), alloc as usize);
    let out = session
        .execute(cmd, CommandInfo::named("REPORT LUNS"))
        .await?;
    let mut luns = parse(&out.command.data_in[..out.received]);
    luns.sort_unstable();
    Ok(luns)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_peripheral_and_flat_luns() {
        let mut d = vec![0, 0, 0, 24, 0, 0, 0, 0];
        d.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0]);
        d.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]);
        d.extend_from_slice(&[0x41, 0x00, 0, 0, 0, 0, 0, 0]);
        assert_eq!(parse(&d), vec![0, 1, 256]);
        assert!(parse(&[0; 3]).is_empty());
    }
}
