//! An RFC 7143 iSCSI initiator: discovery, login, full feature phase and recovery, used by
//! `hostd` for guest disks.
//!
//! Not built yet: see the iscsi-initiator issue.
