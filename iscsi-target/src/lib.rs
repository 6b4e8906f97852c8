//! An RFC 7143 iSCSI target and the SCSI command set (SPC-4/SBC-3) over a block-device
//! trait. It knows nothing of thin pools: `storaged` plugs its volumes in.
//!
//! # Layout
//! - [`block`]: the [`BlockDevice`] trait a LUN is served from, and a file-backed device.
//! - [`server`]: [`TargetServer`], the management API (targets, LUNs, grants, revokes,
//!   sessions) and `run(listener, shutdown)`.
//! - [`config`]: what the management API takes.
//! - `login`: the login state machine (security and operational negotiation, CHAP).
//! - `connection`: one TCP connection: login and discovery, then hands a normal session
//!   to `engine`, the full feature phase on a blocking thread of its own.
//! - [`session`]: negotiated parameters and live sessions.
//! - [`lun`]: a LUN's run-time state shared by all sessions.
//! - [`pr`]: persistent reservations and the [`pr::PrStore`] that keeps them.
//! - [`scsi`]: the command set, one file per command family.
//!
//! ```no_run
//! use std::sync::Arc;
//! use iscsi_target::{FileBlockDevice, InitiatorAccess, LunConfig, ServerOptions,
//!     TargetConfig, TargetServer, naa_from_serial};
//!
//! # async fn demo() -> anyhow::Result<()> {
//! let dev = FileBlockDevice::open("/tmp/lun0".as_ref(), Some(1 << 30), 512, false)?;
//! let server = TargetServer::in_memory(ServerOptions::default());
//! server.add_target(TargetConfig {
//!     iqn: "iqn.2024-01.org.example:vol1".into(),
//!     alias: None,
//!     luns: vec![LunConfig { id: 0, device: Arc::new(dev), serial: "vol1".into(),
//!         naa: naa_from_serial("vol1") }],
//!     initiators: vec![InitiatorAccess::open("iqn.2024-01.org.example:host1")],
//!     allow_any_initiator: false,
//! })?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:3260").await?;
//! server.run(listener, async { let _ = tokio::signal::ctrl_c().await; }).await?;
//! # Ok(()) }
//! ```

pub mod block;
pub mod config;
mod connection;
mod engine;
mod login;
pub mod lun;
pub mod pr;
pub mod scsi;
pub mod server;
pub mod session;

pub use block::{BlockDevice, BlockError, Extent, FileBlockDevice, Provisioning};
pub use config::{ChapCredentials, InitiatorAccess, ServerOptions, TargetConfig};
pub use lun::{LunConfig, naa_from_serial};
pub use pr::{FilePrStore, MemoryPrStore, PrState, PrStore, PrStoreError};
pub use server::{ConfigError, TargetServer};
pub use session::SessionInfo;
