//! REPORT SUPPORTED OPERATION CODES: every command we serve, with its CDB usage map.

use iscsi_pdu::{be16, be32};

use super::sense::Sense;
use super::{CmdResult, Ctx, truncate};

/// One supported command: opcode, service action, and the CDB usage map (SPC-4
/// §6.35.3): byte 0 is the opcode, every other byte the bits the command looks at.
struct Supported {
    opcode: u8,
    sa: Option<u16>,
    usage: &'static [u8],
}

const fn cmd(opcode: u8, sa: Option<u16>, usage: &'static [u8]) -> Supported {
    Supported { opcode, sa, usage }
}

const F: u8 = 0xff;
const C: u8 = 0x07; // CONTROL byte: NACA and the obsolete bits

static COMMANDS: &[Supported] = &[
    cmd(0x00, None, &[0x00, 0, 0, 0, 0, C]),
    cmd(0x03, None, &[0x03, 0x01, 0, 0, F, C]),
    cmd(0x08, None, &[0x08, 0x1f, F, F, F, C]),
    cmd(0x0a, None, &[0x0a, 0x1f, F, F, F, C]),
    cmd(0x12, None, &[0x12, 0x01, F, F, F, C]),
    cmd(0x15, None, &[0x15, 0x11, 0, 0, F, C]),
    cmd(0x16, None, &[0x16, 0, 0, 0, 0, C]),
    cmd(0x17, None, &[0x17, 0, 0, 0, 0, C]),
    cmd(0x1a, None, &[0x1a, 0x08, F, F, F, C]),
    cmd(0x1b, None, &[0x1b, 0x01, 0, 0x0f, 0xf7, C]),
    cmd(0x1e, None, &[0x1e, 0, 0, 0, 0x03, C]),
    cmd(0x25, None, &[0x25, 0, F, F, F, F, 0, 0, 0x01, C]),
    cmd(0x28, None, &[0x28, 0xfa, F, F, F, F, 0x1f, F, F, C]),
    cmd(0x2a, None, &[0x2a, 0xfa, F, F, F, F, 0x1f, F, F, C]),
    cmd(0x2e, None, &[0x2e, 0xf2, F, F, F, F, 0x1f, F, F, C]),
    cmd(0x2f, None, &[0x2f, 0xf6, F, F, F, F, 0x1f, F, F, C]),
    cmd(0x34, None, &[0x34, 0x02, F, F, F, F, 0x1f, F, F, C]),
    cmd(0x35, None, &[0x35, 0x02, F, F, F, F, 0x1f, F, F, C]),
    cmd(0x37, None, &[0x37, 0, 0x1f, 0, 0, 0, 0, F, F, C]),
    cmd(0x41, None, &[0x41, 0xf8, F, F, F, F, 0x1f, F, F, C]),
    cmd(0x42, None, &[0x42, 0x01, 0, 0, 0, 0, 0x1f, F, F, C]),
    cmd(0x55, None, &[0x55, 0x11, 0, 0, 0, 0, 0, F, F, C]),
    cmd(0x5a, None, &[0x5a, 0x18, F, F, 0, 0, 0, F, F, C]),
    cmd(0x5e, Some(0), &[0x5e, 0x1f, 0, 0, 0, 0, 0, F, F, C]),
    cmd(0x5e, Some(1), &[0x5e, 0x1f, 0, 0, 0, 0, 0, F, F, C]),
    cmd(0x5e, Some(2), &[0x5e, 0x1f, 0, 0, 0, 0, 0, F, F, C]),
    cmd(0x5e, Some(3), &[0x5e, 0x1f, 0, 0, 0, 0, 0, F, F, C]),
    cmd(0x5f, Some(0), &[0x5f, 0x1f, F, 0, 0, F, F, F, F, C]),
    cmd(0x5f, Some(1), &[0x5f, 0x1f, F, 0, 0, F, F, F, F, C]),
    cmd(0x5f, Some(2), &[0x5f, 0x1f, F, 0, 0, F, F, F, F, C]),
    cmd(0x5f, Some(3), &[0x5f, 0x1f, F, 0, 0, F, F, F, F, C]),
    cmd(0x5f, Some(4), &[0x5f, 0x1f, F, 0, 0, F, F, F, F, C]),
    cmd(0x5f, Some(5), &[0x5f, 0x1f, F, 0, 0, F, F, F, F, C]),
    cmd(0x5f, Some(6), &[0x5f, 0x1f, F, 0, 0, F, F, F, F, C]),
    cmd(
        0x83,
        Some(0),
        &[0x83, 0x1f, 0, 0, 0, 0, 0, 0, 0, 0, F, F, F, F, 0, C],
    ),
    cmd(
        0x84,
        Some(0),
        &[0x84, 0x1f, F, 0, 0, 0, 0, 0, 0, 0, F, F, F, F, 0, C],
    ),
    cmd(
        0x84,
        Some(3),
        &[0x84, 0x1f, 0, 0, 0, 0, 0, 0, 0, 0, F, F, F, F, 0, C],
    ),
    cmd(
        0x88,
        None,
        &[0x88, 0xfa, F, F, F, F, F, F, F, F, F, F, F, F, 0x1f, C],
    ),
    cmd(
        0x89,
        None,
        &[0x89, 0xf8, F, F, F, F, F, F, F, F, 0, 0, 0, F, 0x1f, C],
    ),
    cmd(
        0x8b,
        None,
        &[0x8b, 0xf8, F, F, F, F, F, F, F, F, F, F, F, F, 0x1f, C],
    ),
    cmd(
        0x8a,
        None,
        &[0x8a, 0xfa, F, F, F, F, F, F, F, F, F, F, F, F, 0x1f, C],
    ),
    cmd(
        0x8e,
        None,
        &[0x8e, 0xf2, F, F, F, F, F, F, F, F, F, F, F, F, 0x1f, C],
    ),
    cmd(
        0x8f,
        None,
        &[0x8f, 0xf6, F, F, F, F, F, F, F, F, F, F, F, F, 0x1f, C],
    ),
    cmd(
        0x90,
        None,
        &[0x90, 0x02, F, F, F, F, F, F, F, F, F, F, F, F, 0x1f, C],
    ),
    cmd(
        0x91,
        None,
        &[0x91, 0x02, F, F, F, F, F, F, F, F, F, F, F, F, 0x1f, C],
    ),
    cmd(
        0x93,
        None,
        &[0x93, 0xf9, F, F, F, F, F, F, F, F, F, F, F, F, 0x1f, C],
    ),
    cmd(
        0x9e,
        Some(0x10),
        &[0x9e, 0x1f, 0, 0, 0, 0, 0, 0, 0, 0, F, F, F, F, 0, C],
    ),
    cmd(
        0x9e,
        Some(0x12),
        &[0x9e, 0x1f, F, F, F, F, F, F, F, F, F, F, F, F, 0, C],
    ),
    cmd(0xa0, None, &[0xa0, 0, F, 0, 0, 0, F, F, F, F, 0, C]),
    cmd(
        0xa3,
        Some(0x0c),
        &[0xa3, 0x1f, 0x87, F, F, F, F, F, F, F, 0, C],
    ),
    cmd(0xa8, None, &[0xa8, 0xfa, F, F, F, F, F, F, F, F, 0x1f, C]),
    cmd(0xaa, None, &[0xaa, 0xfa, F, F, F, F, F, F, F, F, 0x1f, C]),
    cmd(0xae, None, &[0xae, 0xf2, F, F, F, F, F, F, F, F, 0x1f, C]),
    cmd(0xaf, None, &[0xaf, 0xf6, F, F, F, F, F, F, F, F, 0x1f, C]),
    cmd(0xb7, None, &[0xb7, 0x1f, F, F, F, F, F, F, F, F, 0, C]),
];

/// Command timeouts descriptor (SPC-4 §6.35.4): no timeouts known (zeros).
fn timeouts() -> [u8; 12] {
    let mut t = [0u8; 12];
    t[1] = 0x0a;
    t
}

fn has_service_actions(opcode: u8) -> bool {
    COMMANDS
        .iter()
        .any(|c| c.opcode == opcode && c.sa.is_some())
}

pub fn report_supported_opcodes(_ctx: &Ctx<'_>, cdb: &[u8]) -> CmdResult {
    let rctd = cdb[2] & 0x80 != 0;
    let options = cdb[2] & 0x07;
    let opcode = cdb[3];
    let sa = be16(cdb, 4);
    let alloc = be32(cdb, 6) as usize;
    let mut d = Vec::new();
    match options {
        0 => {
            d.extend_from_slice(&[0; 4]);
            for c in COMMANDS {
                d.push(c.opcode);
                d.push(0);
                d.extend_from_slice(&c.sa.unwrap_or(0).to_be_bytes());
                d.push(0);
                d.push(if rctd { 0x02 } else { 0 } | u8::from(c.sa.is_some()));
                d.extend_from_slice(&(c.usage.len() as u16).to_be_bytes());
                if rctd {
                    d.extend_from_slice(&timeouts());
                }
            }
            let len = (d.len() - 4) as u32;
            d[..4].copy_from_slice(&len.to_be_bytes());
        }
        1..=3 => {
            let found = match options {
                1 if has_service_actions(opcode) => {
                    return Err(Sense::invalid_cdb_field(2, Some(2)).into());
                }
                1 => COMMANDS
                    .iter()
                    .find(|c| c.opcode == opcode && c.sa.is_none()),
                2 if !has_service_actions(opcode)
                    && COMMANDS.iter().any(|c| c.opcode == opcode) =>
                {
                    return Err(Sense::invalid_cdb_field(2, Some(2)).into());
                }
                2 => COMMANDS
                    .iter()
                    .find(|c| c.opcode == opcode && c.sa == Some(sa)),
                _ => COMMANDS
                    .iter()
                    .find(|c| c.opcode == opcode && (c.sa.is_none() || c.sa == Some(sa))),
            };
            match found {
                Some(c) => {
                    d.push(0);
                    d.push(if rctd { 0x80 } else { 0 } | 0x03);
                    d.extend_from_slice(&(c.usage.len() as u16).to_be_bytes());
                    d.extend_from_slice(c.usage);
                    if rctd {
                        d.extend_from_slice(&timeouts());
                    }
                }
                None => d.extend_from_slice(&[0, 0x01, 0, 0]),
            }
        }
        _ => return Err(Sense::invalid_cdb_field(2, Some(2)).into()),
    }
    Ok(truncate(d, alloc))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_maps_start_with_the_opcode_and_match_the_cdb_length() {
        for c in COMMANDS {
            assert_eq!(c.usage[0], c.opcode);
            assert_eq!(Some(c.usage.len()), super::super::cdb_len(c.opcode));
        }
    }
}
