//! What a session is opened with: who we are, which target, credentials, our side of
//! every negotiation, and the timeouts that bound every wait. Also [`Negotiated`], what
//! the login settled on.

use std::time::Duration;

/// A CHAP identity: the name sent as CHAP_N and the shared secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Chap {
    pub user: String,
    pub secret: Vec<u8>,
}

impl Chap {
    pub fn new(user: impl Into<String>, secret: impl Into<Vec<u8>>) -> Self {
        Self {
            user: user.into(),
            secret: secret.into(),
        }
    }
}

impl std::fmt::Debug for Chap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never log a secret.
        f.debug_struct("Chap")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

/// Every bounded wait of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP connect.
    pub connect: Duration,
    /// From the first Login Request to full feature phase (or a refusal).
    pub login: Duration,
    /// How long one attempt of a command may go unanswered on a live connection. Past it
    /// the command is aborted (ABORT TASK) and retried; when the abort is not answered
    /// either, the connection is presumed dead and recovery takes over.
    pub command: Duration,
    /// How long a task management request or a logout may take.
    pub task_management: Duration,
    /// Idle time after which we ping the target with a NOP-Out; `None`: no pings.
    pub nop_interval: Option<Duration>,
    /// How long our ping may go unanswered before the connection is presumed dead.
    pub nop_timeout: Duration,
    /// How long the session may stay down (from losing its connection to the next
    /// successful login) before the commands waiting for it fail. Within it, callers see
    /// nothing but latency.
    pub replacement: Duration,
    /// Longest pause between two reconnect attempts (the backoff doubles up to it).
    pub max_backoff: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(5),
            login: Duration::from_secs(15),
            command: Duration::from_secs(30),
            task_management: Duration::from_secs(10),
            nop_interval: Some(Duration::from_secs(5)),
            nop_timeout: Duration::from_secs(10),
            replacement: Duration::from_secs(120),
            max_backoff: Duration::from_secs(2),
        }
    }
}

/// Our side of the operational negotiation (RFC 7143 §13).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The largest data segment we accept (MaxRecvDataSegmentLength we declare).
    pub max_recv_data_segment: u32,
    /// MaxBurstLength we offer: the most data in one Data-In or solicited Data-Out sequence.
    pub max_burst: u32,
    /// FirstBurstLength we offer: the most unsolicited (immediate + Data-Out) data.
    pub first_burst: u32,
    /// ImmediateData we offer.
    pub immediate_data: bool,
    /// InitialR2T we offer (false: unsolicited Data-Out allowed).
    pub initial_r2t: bool,
    /// MaxOutstandingR2T we offer.
    pub max_outstanding_r2t: u32,
    /// Most commands we keep in flight, whatever the CmdSN window allows.
    pub queue_depth: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            // Long segments: a 1 MiB read is one Data-In, placed straight into the
            // caller's buffer, and the target sends one PDU instead of four.
            max_recv_data_segment: 1024 * 1024,
            max_burst: 1024 * 1024,
            first_burst: 256 * 1024,
            immediate_data: true,
            initial_r2t: false,
            max_outstanding_r2t: 8,
            queue_depth: 256,
        }
    }
}

/// Everything a session is opened with.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// `host:port` of the portal (port 3260 when left out).
    pub portal: String,
    /// The target's iSCSI name.
    pub target: String,
    /// Our iSCSI name.
    pub initiator: String,
    pub initiator_alias: Option<String>,
    /// The ISID of the session: with the initiator name it names the I_T nexus, which
    /// persistent reservations are bound to. Random when left out; the same ISID is used
    /// for every reconnect of the session.
    pub isid: Option<[u8; 6]>,
    /// Authenticate to the target with CHAP as this identity.
    pub chap: Option<Chap>,
    /// Demand the target authenticate itself (mutual CHAP) as this identity.
    pub mutual_chap: Option<Chap>,
    /// Offer CRC32C header digests (and require them).
    pub header_digest: bool,
    /// Offer CRC32C data digests (and require them).
    pub data_digest: bool,
    pub limits: Limits,
    pub timeouts: Timeouts,
    /// How many times a command that gets a UNIT ATTENTION, BUSY, TASK SET FULL or
    /// ABORTED COMMAND, or that times out, is retried before its caller sees the error.
    pub max_retries: u32,
    /// Bytes of acknowledged, not yet flushed writes the session keeps to replay after
    /// a reconnect (see [`crate::journal`]); past it the session flushes by itself.
    /// 0 turns the journal off. The default (32 MiB) is the most memory a session holds
    /// for it; a guest that flushes every few seconds rarely gets near it.
    pub journal_limit: usize,
}

impl SessionConfig {
    /// A session with default limits and timeouts, no authentication and no digests.
    pub fn new(
        portal: impl Into<String>,
        target: impl Into<String>,
        initiator: impl Into<String>,
    ) -> Self {
        Self {
            portal: portal.into(),
            target: target.into(),
            initiator: initiator.into(),
            initiator_alias: None,
            isid: None,
            chap: None,
            mutual_chap: None,
            header_digest: false,
            data_digest: false,
            limits: Limits::default(),
            timeouts: Timeouts::default(),
            max_retries: 8,
            journal_limit: 32 << 20,
        }
    }

    /// The portal with the default port added when it has none.
    pub fn portal_addr(&self) -> String {
        with_default_port(&self.portal)
    }
}

/// `host` → `host:3260`; `[v6]` → `[v6]:3260`; anything with a port is kept.
pub fn with_default_port(portal: &str) -> String {
    let has_port = if let Some(rest) = portal.strip_prefix('[') {
        rest.contains("]:")
    } else {
        portal.matches(':').count() == 1
    };
    if has_port {
        portal.to_owned()
    } else if portal.contains(':') && !portal.starts_with('[') {
        format!("[{portal}]:3260")
    } else {
        format!("{portal}:3260")
    }
}

/// A random ISID of the "random" type (RFC 7143 §11.12.5: T = 10b).
pub fn random_isid() -> [u8; 6] {
    let r: [u8; 6] = rand::random();
    [0x80, r[1], r[2], r[3], r[4], r[5]]
}

/// What the login settled on; the full feature phase runs by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    pub header_digest: bool,
    pub data_digest: bool,
    /// The largest data segment we accept (what we declared).
    pub max_recv_data_segment: u32,
    /// The largest data segment we may send (what the target declared).
    pub max_xmit_data_segment: u32,
    pub max_burst: u32,
    pub first_burst: u32,
    pub immediate_data: bool,
    pub initial_r2t: bool,
    pub max_outstanding_r2t: u32,
    pub default_time2wait: u16,
    pub default_time2retain: u16,
    /// The session's TSIH, given by the target.
    pub tsih: u16,
    pub target_portal_group: Option<u16>,
}

impl Default for Negotiated {
    /// RFC 7143 defaults: what holds for a key never negotiated.
    fn default() -> Self {
        Self {
            header_digest: false,
            data_digest: false,
            max_recv_data_segment: 8192,
            max_xmit_data_segment: 8192,
            max_burst: 262_144,
            first_burst: 65_536,
            immediate_data: true,
            initial_r2t: true,
            max_outstanding_r2t: 1,
            default_time2wait: 2,
            default_time2retain: 20,
            tsih: 0,
            target_portal_group: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_port_is_added_only_when_missing() {
        assert_eq!(with_default_port("10.0.0.1"), "10.0.0.1:3260");
        assert_eq!(with_default_port("10.0.0.1:3261"), "10.0.0.1:3261");
        assert_eq!(with_default_port("host.example"), "host.example:3260");
        assert_eq!(with_default_port("[::1]"), "[::1]:3260");
        assert_eq!(with_default_port("[::1]:3262"), "[::1]:3262");
        assert_eq!(with_default_port("::1"), "[::1]:3260");
    }

    #[test]
    fn random_isids_have_the_random_type() {
        let a = random_isid();
        assert_eq!(a[0] >> 6, 0b10);
        assert_ne!(a, random_isid());
    }
}
