//! The iSCSI wire format (RFC 7143), shared by `iscsi-target` and `iscsi-initiator`: a pure
//! codec that does no I/O.
//!
//! # Layout
//! - [`bhs`]: the 48-byte Basic Header Segment, one typed struct per opcode, parse and write;
//!   one file per PDU family.
//! - [`frame`]: where a PDU ends in a byte stream (AHS, padding, CRC32C digests); an
//!   incomplete frame is "not yet", never an error.
//! - [`text`]: `key=value` text parameters and the negotiation rules of every RFC 7143 key.
//! - [`chap`]: CHAP (MD5) responses and the `0x`/`0b` binary encodings.
//! - [`serial`]: serial-number comparisons for CmdSN, StatSN, DataSN.
//! - [`scsi`]: what both ends say about SCSI: operation codes, status bytes, sense data.
//! - [`tx`]: batches encoded PDUs for vectored writes (small pieces copied together, long
//!   data segments sent from their own buffers).
//! - [`be`]: big-endian fields at byte offsets ([`be32`] and friends, re-exported here).
//!
//! ```
//! use bytes::BytesMut;
//! use iscsi_pdu::bhs::{Header, NopOut};
//! use iscsi_pdu::frame::{self, FrameConfig};
//!
//! let cfg = FrameConfig { header_digest: true, ..FrameConfig::default() };
//! let nop = Header::NopOut(NopOut { itt: 7, ttt: 0xffff_ffff, ..Default::default() });
//! let mut wire = Vec::new();
//! frame::encode(&nop, &[], b"ping", &cfg, &mut wire).unwrap();
//! let mut buf = BytesMut::from(&wire[..10]);
//! assert!(frame::decode(&mut buf, &cfg).unwrap().is_none()); // not yet
//! let mut buf = BytesMut::from(&wire[..]);
//! let pdu = frame::decode(&mut buf, &cfg).unwrap().unwrap();
//! assert_eq!(pdu.header().unwrap(), nop);
//! assert_eq!(&pdu.data[..], b"ping");
//! ```

pub mod be;
pub mod bhs;
pub mod chap;
pub mod frame;
pub mod scsi;
pub mod serial;
pub mod text;
pub mod tx;

pub use be::{be16, be24, be32, be64};
pub use bhs::{BHS_LEN, Header, Opcode};
pub use frame::{FrameConfig, RawPdu};

/// Why bytes could not be decoded. None of these is a panic: every malformed input ends here.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PduError {
    #[error("unknown opcode {opcode:#04x}")]
    UnknownOpcode { opcode: u8 },
    #[error("data segment of {len} bytes exceeds the negotiated maximum {max}")]
    DataSegmentTooLong { len: usize, max: u32 },
    #[error("header digest mismatch: expected {expected:#010x}, got {got:#010x}")]
    HeaderDigest { expected: u32, got: u32 },
    #[error("data digest mismatch on task {itt:#x}: expected {expected:#010x}, got {got:#010x}")]
    DataDigest { itt: u32, expected: u32, got: u32 },
    #[error("malformed additional header segment ({len} bytes left)")]
    BadAhs { len: usize },
    #[error("malformed text parameters: {reason}")]
    BadText { reason: &'static str },
    #[error("not a number: {value:?}")]
    BadNumber { value: String },
    #[error("not Yes or No: {value:?}")]
    BadBoolean { value: String },
    #[error("{key}={value} is outside {min}..={max}")]
    OutOfRange {
        key: &'static str,
        value: u64,
        min: u64,
        max: u64,
    },
    #[error("malformed binary value: {reason}")]
    BadBinary { reason: &'static str },
}
