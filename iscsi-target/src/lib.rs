//! An RFC 7143 iSCSI target and the SCSI command set (SPC-4/SBC-3) over a block-device
//! trait. It knows nothing of thin pools: `storaged` plugs its volumes in.
//!
//! # Layout
//! - [`block`]: the [`BlockDevice`] trait a LUN is served from, and a file-backed device.

pub mod block;

pub use block::{BlockDevice, BlockError, Extent, FileBlockDevice, Provisioning};
