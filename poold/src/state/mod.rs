//! The replicated pool state: the commands the log carries ([`command`]), the state
//! machine that applies them ([`machine`], with long operations in [`jobs`] and users, audit and storage figures in [`users`]) and its versioned snapshot format
//! ([`snapshot`]).

pub mod command;
pub mod jobs;
pub mod machine;
pub mod snapshot;
pub mod users;

pub use machine::PoolState;
