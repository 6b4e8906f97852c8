//! The replicated pool state: the commands the log carries ([`command`]), the state
//! machine that applies them and its versioned snapshot format ([`snapshot`]).
//!
//! [`machine`] holds the state and the apply loop (request ids, tasks, audit of each
//! command); each kind of object has its part of the apply in a file of its own:
//! [`hosts`], [`storage`] (repositories and volumes), [`vms`] (VMs and templates),
//! [`jobs`] (long operations), [`suspend`] (suspended VMs), [`undo`] (undo disks' overlays), [`schedules`] (scheduled snapshots), [`users`] (users, roles, audit log), [`trust`] (the pool's
//! CA and join tokens), [`networks`] (guest networks, VIFs, MACs), [`alerts`] (raised and cleared as the state
//! changes); [`placement`] is what
//! the scheduler sees of the state. [`changes`] turns what a command changed into the
//! events of the pool's change feed, which each member keeps in a [`feed`].

pub mod alerts;
pub mod changes;
pub mod command;
pub mod feed;
pub mod hosts;
pub mod jobs;
pub mod machine;
pub mod networks;
pub mod placement;
pub mod schedules;
pub mod snapshot;
pub mod storage;
pub mod suspend;
pub mod trust;
pub mod undo;
pub mod users;
pub mod vms;

pub use machine::PoolState;
