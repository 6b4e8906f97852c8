//! An RFC 7143 iSCSI initiator: discovery, login (CHAP, mutual CHAP, digests), a
//! pipelined full feature phase and recovery. `hostd` reaches guest disks through it.
//!
//! A [`Session`] is one login to one target, shared by every task that uses it: each
//! call is a SCSI command with its own task tag, many in flight at once within the
//! target's CmdSN window. A [`Lun`] is the block API on top (read, write, flush, unmap,
//! write same, compare and write, persistent reservations, inquiry, capacity). When the
//! connection drops or the target restarts, the session logs in again with the same ISID
//! and sends every unfinished command again; callers see an error only when the session
//! stays down past its replacement timeout. Every wait is bounded.
//!
//! # Guarantees
//!
//! - Every wait is bounded: a command attempt by [`Timeouts::command`] (then ABORT TASK,
//!   then a new connection), a session outage by [`Timeouts::replacement`] (then
//!   [`Error::SessionFailed`]), logins, pings and task management by their own limits.
//! - A command is answered exactly once: with its outcome, or with an error once the
//!   session gives up on it. Commands cut off by a lost connection are sent again, in
//!   CmdSN order, on the next one.
//! - An acknowledged write is not silently lost: until a SYNCHRONIZE CACHE covers it,
//!   the session keeps it and writes it again on every new connection (see [`journal`]),
//!   so even a target that lost its cache when it restarted ends up with the data, or the
//!   next flush fails with [`Error::WritesLost`].
//! - Reservations survive reconnects: the session logs in again with the same ISID, so
//!   the I_T nexus (and with it every registration and reservation) stays the same.
//! - UNIT ATTENTION, BUSY, TASK SET FULL and ABORTED COMMAND are retried a bounded
//!   number of times; every other outcome is a typed [`Error`].
//!
//! # Layout
//! - [`config`]: what a session is opened with (names, CHAP, digests, limits,
//!   timeouts) and what login negotiated.
//! - [`connection`]: a TCP connection before the full feature phase, PDU by PDU.
//! - [`login`]: the login state machine (security and operational negotiation).
//! - [`discovery`]: SendTargets discovery.
//! - `engine`: the full feature phase on one connection: tags, CmdSN window, R2T and
//!   Data-Out, Data-In placement, NOP keepalive, aborts, logout.
//! - [`session`]: the shared handle and the task that reconnects and retries.
//! - [`lun`] and [`scsi`]: the block API, one file per command, and sense decoding.
//! - [`journal`]: acknowledged writes kept until a flush, replayed after a reconnect.
//! - [`error`]: the typed errors callers match on.
//! - [`blocking`]: a synchronous adapter for threads outside the runtime.
//!
//! ```no_run
//! use bytes::Bytes;
//! use iscsi_initiator::{Session, SessionConfig};
//!
//! # async fn demo() -> Result<(), iscsi_initiator::Error> {
//! let cfg = SessionConfig::new(
//!     "192.0.2.10:3260",
//!     "iqn.2024-01.org.pool:vol1",
//!     "iqn.2024-01.org.pool:host1",
//! );
//! let session = Session::connect(cfg).await?;
//! let lun = session.lun(0).await?;
//! lun.write(0, Bytes::from(vec![7u8; 4096])).await?;
//! lun.flush().await?;
//! assert_eq!(&lun.read(0, 8).await?[..], &[7u8; 4096][..]);
//! session.logout().await?;
//! # Ok(()) }
//! ```

pub mod blocking;
pub mod config;
pub mod connection;
pub mod discovery;
mod engine;
pub mod error;
pub mod journal;
pub mod login;
pub mod lun;
pub mod scsi;
pub mod session;
pub mod task;

pub use config::{Chap, Limits, Negotiated, SessionConfig, Timeouts};
pub use discovery::{DiscoveredTarget, Portal, discover};
pub use error::Error;
pub use lun::Lun;
pub use scsi::persistent::{PrIn, PrInData, PrOut, PrType};
pub use session::{Session, SessionState, Stats};
