//! Framing: where one PDU ends in a byte stream, and its digests.
//!
//! A PDU on the wire is the 48-byte BHS, the AHS (TotalAHSLength × 4 bytes), a header
//! digest when negotiated, the data segment padded to a multiple of 4, and a data digest
//! when negotiated and the segment is not empty (RFC 7143 §11.2). Digests are CRC32C sent
//! least significant byte first, as every implementation does.
//!
//! [`decode`] takes bytes off the front of a buffer: `Ok(None)` means "not yet" (the frame
//! is incomplete), an error means the stream cannot be trusted any more.

use bytes::{Buf, Bytes, BytesMut};

use crate::PduError;
use crate::bhs::{self, BHS_LEN, Header};

/// Length of a CRC32C digest on the wire.
pub const DIGEST_LEN: usize = 4;

/// Largest DataSegmentLength the field can carry.
pub const MAX_DATA_SEGMENT: usize = (1 << 24) - 1;

/// What the two ends negotiated that changes how PDUs are framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameConfig {
    pub header_digest: bool,
    pub data_digest: bool,
    /// The longest data segment this side accepts (its MaxRecvDataSegmentLength).
    pub max_recv_data_segment: u32,
}

impl Default for FrameConfig {
    /// Login-phase framing: no digests, 8192-byte segments (RFC 7143 §13.12).
    fn default() -> Self {
        Self {
            header_digest: false,
            data_digest: false,
            max_recv_data_segment: 8192,
        }
    }
}

/// One PDU cut from the stream: the raw BHS (parse it with [`Header::parse`]), the AHS
/// and the data segment without padding or digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawPdu {
    pub bhs: [u8; BHS_LEN],
    pub ahs: Bytes,
    pub data: Bytes,
}

impl RawPdu {
    pub fn header(&self) -> Result<Header, PduError> {
        Header::parse(&self.bhs)
    }
}

/// CRC32C as iSCSI uses it.
pub fn crc32c(parts: &[&[u8]]) -> u32 {
    parts.iter().fold(0, |crc, p| crc32c::crc32c_append(crc, p))
}

/// Bytes of padding after a data segment of `len` bytes.
pub fn pad_len(len: usize) -> usize {
    (4 - len % 4) % 4
}

/// The total length of the PDU at the front of `buf`, once its BHS is there.
pub fn frame_len(buf: &[u8], cfg: &FrameConfig) -> Result<Option<usize>, PduError> {
    let Some(bhs) = buf.first_chunk::<BHS_LEN>() else {
        return Ok(None);
    };
    let ahs = bhs::total_ahs_len(bhs);
    let data = bhs::data_segment_len(bhs);
    if data > cfg.max_recv_data_segment as usize {
        return Err(PduError::DataSegmentTooLong {
            len: data,
            max: cfg.max_recv_data_segment,
        });
    }
    let mut len = BHS_LEN + ahs + data + pad_len(data);
    if cfg.header_digest {
        len += DIGEST_LEN;
    }
    if cfg.data_digest && data > 0 {
        len += DIGEST_LEN;
    }
    Ok(Some(len))
}

/// Cuts one PDU off the front of `buf`. `Ok(None)`: incomplete, read more. On error the
/// connection must be closed: the stream is no longer in step.
pub fn decode(buf: &mut BytesMut, cfg: &FrameConfig) -> Result<Option<RawPdu>, PduError> {
    let Some(total) = frame_len(buf, cfg)? else {
        return Ok(None);
    };
    if buf.len() < total {
        return Ok(None);
    }
    let mut frame = buf.split_to(total);
    let mut bhs = [0u8; BHS_LEN];
    bhs.copy_from_slice(&frame[..BHS_LEN]);
    let ahs_len = bhs::total_ahs_len(&bhs);
    let data_len = bhs::data_segment_len(&bhs);
    if cfg.header_digest {
        let at = BHS_LEN + ahs_len;
        let expected = crc32c(&[&frame[..at]]);
        let got = u32::from_le_bytes([frame[at], frame[at + 1], frame[at + 2], frame[at + 3]]);
        if expected != got {
            return Err(PduError::HeaderDigest { expected, got });
        }
    }
    frame.advance(BHS_LEN);
    let ahs = frame.split_to(ahs_len).freeze();
    if cfg.header_digest {
        frame.advance(DIGEST_LEN);
    }
    let padded = data_len + pad_len(data_len);
    if cfg.data_digest && data_len > 0 {
        let expected = crc32c(&[&frame[..padded]]);
        let d = &frame[padded..padded + DIGEST_LEN];
        let got = u32::from_le_bytes([d[0], d[1], d[2], d[3]]);
        if expected != got {
            return Err(PduError::DataDigest {
                itt: bhs::itt_of(&bhs),
                expected,
                got,
            });
        }
    }
    frame.truncate(data_len);
    Ok(Some(RawPdu {
        bhs,
        ahs,
        data: frame.freeze(),
    }))
}

/// The bytes that go before a data segment: BHS, AHS and header digest. Built on the
/// stack so the data itself can be sent without a copy (see [`trailer`]).
#[derive(Clone, Copy)]
pub struct EncodedHeader {
    buf: [u8; BHS_LEN + DIGEST_LEN],
    len: usize,
}

impl EncodedHeader {
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl std::fmt::Debug for EncodedHeader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EncodedHeader")
            .field("len", &self.len)
            .finish()
    }
}

/// Encodes a header with no AHS for a data segment of `data_len` bytes.
pub fn encode_header(header: &Header, data_len: usize, cfg: &FrameConfig) -> EncodedHeader {
    let mut bhs = header.to_bytes();
    bhs::set_lengths(&mut bhs, 0, data_len);
    let mut buf = [0u8; BHS_LEN + DIGEST_LEN];
    buf[..BHS_LEN].copy_from_slice(&bhs);
    let mut len = BHS_LEN;
    if cfg.header_digest {
        let crc = crc32c(&[&bhs]);
        buf[BHS_LEN..].copy_from_slice(&crc.to_le_bytes());
        len += DIGEST_LEN;
    }
    EncodedHeader { buf, len }
}

/// The bytes that go after a data segment: padding and the data digest.
#[derive(Debug, Clone, Copy)]
pub struct Trailer {
    buf: [u8; 3 + DIGEST_LEN],
    len: usize,
}

impl Trailer {
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// Padding and data digest for `data`.
pub fn trailer(data: &[u8], cfg: &FrameConfig) -> Trailer {
    let pad = pad_len(data.len());
    let mut buf = [0u8; 3 + DIGEST_LEN];
    let mut len = pad;
    if cfg.data_digest && !data.is_empty() {
        let crc = crc32c(&[data, &[0u8; 3][..pad]]);
        buf[pad..pad + DIGEST_LEN].copy_from_slice(&crc.to_le_bytes());
        len += DIGEST_LEN;
    }
    Trailer { buf, len }
}

/// Appends a whole PDU (header, optional AHS, data) to `out`. `ahs` must be a multiple of
/// 4 bytes and under 1 KiB; `data` under 16 MiB.
pub fn encode(
    header: &Header,
    ahs: &[u8],
    data: &[u8],
    cfg: &FrameConfig,
    out: &mut Vec<u8>,
) -> Result<(), PduError> {
    if !ahs.len().is_multiple_of(4) || ahs.len() / 4 > 255 {
        return Err(PduError::BadAhs { len: ahs.len() });
    }
    if data.len() > MAX_DATA_SEGMENT {
        return Err(PduError::DataSegmentTooLong {
            len: data.len(),
            max: MAX_DATA_SEGMENT as u32,
        });
    }
    let mut bhs = header.to_bytes();
    bhs::set_lengths(&mut bhs, ahs.len(), data.len());
    out.extend_from_slice(&bhs);
    out.extend_from_slice(ahs);
    if cfg.header_digest {
        out.extend_from_slice(&crc32c(&[&bhs, ahs]).to_le_bytes());
    }
    out.extend_from_slice(data);
    out.extend_from_slice(trailer(data, cfg).as_bytes());
    Ok(())
}

/// AHS types (RFC 7143 §11.2.2).
pub mod ahs_type {
    pub const EXTENDED_CDB: u8 = 1;
    pub const BIDI_READ_LENGTH: u8 = 2;
}

/// One Additional Header Segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ahs {
    pub kind: u8,
    /// The type-specific bytes (after the reserved byte), without padding.
    pub data: Bytes,
}

/// Splits an AHS area into its segments.
pub fn parse_ahs(mut area: Bytes) -> Result<Vec<Ahs>, PduError> {
    let mut out = Vec::new();
    while !area.is_empty() {
        if area.len() < 4 {
            return Err(PduError::BadAhs { len: area.len() });
        }
        // AHSLength counts the type-specific bytes, whose first byte is reserved; the
        // segment is then padded to a multiple of four.
        let len = usize::from(u16::from_be_bytes([area[0], area[1]]));
        let kind = area[2];
        let padded = (3 + len).div_ceil(4) * 4;
        if len == 0 || area.len() < padded {
            return Err(PduError::BadAhs { len: area.len() });
        }
        let data = area.slice(4..3 + len);
        out.push(Ahs { kind, data });
        area.advance(padded);
    }
    Ok(out)
}
