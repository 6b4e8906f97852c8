//! An RFC 7143 iSCSI target and the SCSI command set (SPC-4/SBC-3) over a block-device
//! trait. It knows nothing of thin pools: `storaged` plugs its volumes in.
//!
//! Not built yet: see the iscsi-target issue.
