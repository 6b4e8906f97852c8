//! `storaged`: thin pools and thin volumes (LVM-thin-like) on a file or block device,
//! exported as iSCSI LUNs and managed through the `StorageService` of `proto/`.
