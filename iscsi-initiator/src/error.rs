//! The errors callers of a [`crate::Session`] or [`crate::Lun`] see: transport and
//! session failures, and SCSI outcomes decoded from status and sense data into variants a
//! caller can act on (out of range, reservation conflict, space exhausted...).

use std::sync::Arc;
use std::time::Duration;

use crate::connection::ConnError;
use crate::login::LoginError;
use crate::scsi::sense::Sense;

/// What a session or LUN call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The first login of [`crate::Session::connect`] (later logins are retried).
    #[error("cannot log in to {target} at {portal}")]
    Login {
        target: String,
        portal: String,
        #[source]
        source: LoginError,
    },
    /// The session was down longer than its replacement timeout; `last` says why the
    /// last attempt to bring it back failed (or why it went down).
    #[error(
        "the session to {target} has been down longer than its replacement timeout ({timeout:?})"
    )]
    SessionFailed {
        target: String,
        timeout: Duration,
        #[source]
        last: Arc<SessionDown>,
    },
    /// A command timed out on every one of its attempts.
    #[error("{command} timed out {attempts} times ({each:?} each)")]
    Timeout {
        command: &'static str,
        attempts: u32,
        each: Duration,
    },
    /// Logged out, or the session was shut down.
    #[error("the session is closed")]
    Closed,
    #[error("invalid argument: {reason}")]
    InvalidArgument { reason: String },
    /// A task management function the target did not perform.
    #[error("task management function {function} answered {response}")]
    TaskManagement { function: u8, response: u8 },
    /// The target rejected a PDU of this command (RFC 7143 §11.17).
    #[error("{command}: the target rejected the request (reason {reason:#04x})")]
    Rejected { command: &'static str, reason: u8 },

    // SCSI outcomes.
    #[error("{command}: blocks {lba}..+{blocks} are outside the LUN")]
    OutOfRange {
        command: &'static str,
        lba: u64,
        blocks: u64,
    },
    #[error("{command}: reservation conflict")]
    ReservationConflict { command: &'static str },
    /// A thin LUN whose pool is full (DATA PROTECT, SPACE ALLOCATION FAILED WRITE PROTECT).
    #[error("{command}: no space left to allocate blocks {lba}..+{blocks}")]
    SpaceExhausted {
        command: &'static str,
        lba: u64,
        blocks: u64,
    },
    #[error("{command}: the LUN is write-protected")]
    WriteProtected { command: &'static str },
    #[error("{command}: the LUN is not ready ({asc:#04x}/{ascq:#04x})")]
    NotReady {
        command: &'static str,
        asc: u8,
        ascq: u8,
    },
    #[error("{command}: medium error ({asc:#04x}/{ascq:#04x}){}", lba.map(|l| format!(" at block {l}")).unwrap_or_default())]
    MediumError {
        command: &'static str,
        lba: Option<u64>,
        asc: u8,
        ascq: u8,
    },
    #[error("{command}: hardware error ({asc:#04x}/{ascq:#04x})")]
    HardwareError {
        command: &'static str,
        asc: u8,
        ascq: u8,
    },
    /// COMPARE AND WRITE found other data; `offset` is the first differing byte from the
    /// start of the compared range, when the target says.
    #[error("{command}: miscompare{}", offset.map(|o| format!(" at byte {o}")).unwrap_or_default())]
    Miscompare {
        command: &'static str,
        offset: Option<u64>,
    },
    /// The target does not implement the command or a field of it.
    #[error("{command}: not supported by the target ({asc:#04x}/{ascq:#04x})")]
    Unsupported {
        command: &'static str,
        asc: u8,
        ascq: u8,
    },
    /// CHECK CONDITION with sense data none of the variants above covers.
    #[error("{command}: check condition: {sense}")]
    CheckCondition { command: &'static str, sense: Sense },
    /// A status other than GOOD, CHECK CONDITION or RESERVATION CONFLICT that retries did
    /// not clear.
    #[error("{command}: SCSI status {status:#04x}")]
    Status { command: &'static str, status: u8 },
    #[error("{command}: the target failed the command (iSCSI response {response:#04x})")]
    TargetFailure { command: &'static str, response: u8 },
    /// A flush succeeded, but writes acknowledged before it may not be on the target: it
    /// restarted before they were flushed, and they could not all be written again (the
    /// journal had overflowed, or the target refused a replay).
    #[error("{command}: writes acknowledged earlier may have been lost by a target restart")]
    WritesLost { command: &'static str },
    /// The target returned less data than the command needs.
    #[error("{command}: {got} of {expected} bytes returned")]
    ShortData {
        command: &'static str,
        expected: usize,
        got: usize,
    },
    /// A response whose payload cannot be decoded.
    #[error("{command}: malformed response: {reason}")]
    BadResponse {
        command: &'static str,
        reason: String,
    },
}

/// Why a session was down: the connection failure, or the last failed login.
#[derive(Debug, thiserror::Error)]
pub enum SessionDown {
    #[error("the connection failed")]
    Connection(#[source] ConnError),
    #[error("logging in again failed")]
    Login(#[source] LoginError),
    #[error("the target asked the session to log out")]
    TargetLogout,
}

impl Error {
    /// Whether the error is about the session's reachability rather than the command.
    pub fn is_transport(&self) -> bool {
        matches!(
            self,
            Self::Login { .. } | Self::SessionFailed { .. } | Self::Closed | Self::Timeout { .. }
        )
    }
}
