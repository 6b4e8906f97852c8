//! What the management API takes: targets, their LUNs and who may log in to them, and the
//! server-wide settings the target negotiates from.

use std::net::SocketAddr;
use std::time::Duration;

use crate::lun::LunConfig;

/// A CHAP identity: the name sent as CHAP_N and the shared secret.
#[derive(Clone, PartialEq, Eq)]
pub struct ChapCredentials {
    pub user: String,
    pub secret: Vec<u8>,
}

impl std::fmt::Debug for ChapCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never log a secret.
        f.debug_struct("ChapCredentials")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

/// One initiator allowed to log in to a target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitiatorAccess {
    /// The initiator's iSCSI name (InitiatorName).
    pub name: String,
    /// When set, the initiator must authenticate with CHAP as this identity.
    pub chap: Option<ChapCredentials>,
    /// When set (with `chap`), the target answers the initiator's mutual CHAP challenge
    /// as this identity.
    pub mutual_chap: Option<ChapCredentials>,
}

impl InitiatorAccess {
    /// Access without authentication.
    pub fn open(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            chap: None,
            mutual_chap: None,
        }
    }
}

/// A target to create.
#[derive(Debug, Clone)]
pub struct TargetConfig {
    /// The target's iSCSI qualified name.
    pub iqn: String,
    pub alias: Option<String>,
    pub luns: Vec<LunConfig>,
    /// Initiators granted at creation; more with `TargetServer::grant`.
    pub initiators: Vec<InitiatorAccess>,
    /// Lets any initiator log in without authentication (labs, tests). Grants are still
    /// honoured for CHAP; a revoke refuses that initiator even so.
    pub allow_any_initiator: bool,
}

/// Server-wide settings: our side of every negotiation.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// MaxRecvDataSegmentLength we declare: the largest data segment we accept.
    pub max_recv_data_segment: u32,
    /// MaxBurstLength we offer.
    pub max_burst: u32,
    /// FirstBurstLength we offer.
    pub first_burst: u32,
    /// MaxOutstandingR2T we offer.
    pub max_outstanding_r2t: u32,
    /// Whether we allow unsolicited data (InitialR2T=No) and immediate data.
    pub initial_r2t: bool,
    pub immediate_data: bool,
    /// Commands an initiator may have queued per session (MaxCmdSN - ExpCmdSN + 1).
    pub command_window: u32,
    /// Target portal group tag of our one portal group.
    pub portal_group: u16,
    /// The address SendTargets reports; by default the address the connection arrived on.
    pub advertised_portal: Option<SocketAddr>,
    /// Idle time after which the target sends a NOP-In ping; `None` disables pings.
    pub nop_interval: Option<Duration>,
    /// How long a ping may go unanswered before the connection is dropped.
    pub nop_timeout: Duration,
    /// How long a login may take from the first PDU to full feature phase.
    pub login_timeout: Duration,
    /// Solicited write data (R2T) one connection may have outstanding, in bytes.
    pub max_r2t_bytes_per_connection: u64,
    /// A discovery session that sends nothing for this long is closed.
    pub discovery_idle_timeout: Duration,
    /// Sessions (normal and discovery, each one connection) one initiator name may have
    /// at once, over all targets; the login past it is refused with "out of resources".
    /// A host has one session per attached volume, so this is generous by default.
    pub max_connections_per_initiator: usize,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            max_recv_data_segment: 256 * 1024,
            max_burst: 1024 * 1024,
            first_burst: 256 * 1024,
            max_outstanding_r2t: 8,
            initial_r2t: false,
            immediate_data: true,
            command_window: 128,
            portal_group: 1,
            advertised_portal: None,
            nop_interval: Some(Duration::from_secs(30)),
            nop_timeout: Duration::from_secs(30),
            login_timeout: Duration::from_secs(30),
            max_r2t_bytes_per_connection: 64 << 20,
            discovery_idle_timeout: Duration::from_secs(30),
            max_connections_per_initiator: 1024,
        }
    }
}
