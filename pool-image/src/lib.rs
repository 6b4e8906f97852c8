//! VM packages, disk images and backup chains as both `poolctl` (to and from files) and
//! `poold` (the web console's downloads, scheduled backups) make them. qemu does the format work; the bytes travel over
//! our own iSCSI initiator.
//!
//! # Layout
//! - `backup/`: VM backup chains: the directory format, writing a point, pruning.
//! - `volume.rs`: a pool volume read over iSCSI into a sparse raw file.
//! - `qemu.rs`: `qemu-img info`/`map`/`convert` and `qemu-nbd`; which images are accepted;
//!   private scratch directories.
//! - `tar.rs`, `ovf.rs`, `ova.rs`: an OVA's archive, its descriptor, its manifest.
//! - `package.rs`: a VM's spec and disks as an OVA, written in order.
//! - `progress.rs`: how far a download being prepared has got (the web console's).

pub mod backup;
pub mod ova;
pub mod ovf;
pub mod package;
pub mod progress;
pub mod qemu;
pub mod tar;
pub mod volume;
