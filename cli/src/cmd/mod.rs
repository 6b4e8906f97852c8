//! The verbs, one module per noun: each owns its clap arguments (a `Subcommand` enum that
//! the top-level command flattens, so verbs stay `noun-verb`) and their handler.

pub mod alert;
pub mod backup;
pub mod events;
pub mod host;
pub mod join;
pub mod member;
pub mod net;
pub mod pool;
pub mod schedule;
pub mod sr;
pub mod stats;
pub mod task;
pub mod template;
pub mod user;
pub mod vdi;
pub mod vm;
