//! The replicated pool state: the commands the log carries ([`command`]), the state
//! machine that applies them ([`machine`]) and its versioned snapshot format
//! ([`snapshot`]).

pub mod command;
pub mod machine;
pub mod snapshot;

pub use machine::PoolState;
