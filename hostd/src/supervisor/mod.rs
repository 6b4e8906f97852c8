//! One process per VM.
//!
//! `hostd` (the daemon) keeps the table of VMs and runs each running VM in its own
//! `hostd vmm` process: a guest that crashes the VMM's device code, a VMM bug, or a VM
//! that has to be killed takes only that process with it, never the daemon or other
//! VMs; the kernel accounts each VM's memory and CPU to its own process; and VMs keep
//! running while the daemon restarts.
//!
//! - [`manager`]: the daemon's side (table of VMs, spawning, lifecycle, state), one file
//!   per concern: `entry`, `process`, `lifecycle`, `status`, `console`, `disks`,
//!   `migration`.
//! - [`child`]: the VM process (runs the [`crate::vmm::Vm`], reboots it, reports):
//!   `control` (the socket), `runner` (the boot loop), `migrate`.
//! - [`protocol`] and [`frame`]: the control channel between the two.
//! - [`spec`]: checking a `VmConfig` and turning it into a `VmSpec`.

pub mod child;
pub mod frame;
pub mod manager;
pub mod protocol;
pub mod spec;
