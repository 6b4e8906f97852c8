//! The iSCSI wire format (RFC 7143), shared by `iscsi-target` and `iscsi-initiator`: a pure
//! codec that does no I/O.
