//! Live migration: the authenticated TCP stream that moves a running VM between hosts
//! (pre-copy rounds over the dirty log, then switchover with the saved state).
//!
//! Both ends run inside the VM processes: the source's `hostd-vmm` owns the guest memory
//! and the KVM dirty log, the destination's has the disks open and builds the VM. The
//! daemons only start them (over the control channel) and report progress over gRPC.
//!
//! # Layout
//! - [`wire`]: the frames, a pure codec.
//! - [`tls`]: TLS 1.3 with the hosts' pool certificates, and who the peer is.
//! - [`conn`]: a connection (TLS session and buffer), frames in and out with timeouts.
//! - [`state`]: the saved vCPU, irqchip, clock and device state as bytes.
//! - [`cpu`]: may the guest's CPU features move to this host?
//! - [`send`](mod@send): the source: full pass, dirty rounds, auto-converge, switchover.
//! - [`receive`](mod@receive): the destination: token, checks, pages, restore, resume.
//! - [`saved`]: the same frames into and out of a volume (suspend, resume, checkpoints).
//!
//! # Guarantees
//! The stream is TLS between the two hosts' certificates: the source talks only to the
//! destination host the coordinator chose, and the destination takes a VM only from the
//! source host it was prepared for, presenting the token it was prepared with.
//! Nothing is read into a VM before the peer, the token and the CPU check pass. Until the source
//! sends Go, any failure leaves the VM running on the source and the destination drops
//! what it built; Go is sent only after the destination has built the VM from the state
//! (everything that can fail there has), and after Go the source never runs the guest
//! again, so two copies never write the shared disks.

pub mod conn;
pub mod cpu;
pub mod receive;
pub mod saved;
pub mod send;
pub mod state;
pub mod tls;
pub mod wire;

use std::time::Duration;

pub use receive::{Handshake, Incoming, receive, receive_with};
pub use send::{SendOptions, Sent, Switchover, send};
pub use tls::{StreamTls, TlsSetupError};

/// Default downtime budget.
pub const DEFAULT_DOWNTIME: Duration = Duration::from_millis(300);
/// Default limit on dirty rounds.
pub const DEFAULT_MAX_ROUNDS: u32 = 30;
/// Default limit on a whole migration.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error("migration stream: {what}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot connect to the destination {addr}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS handshake with host {host} at {addr}")]
    Handshake {
        addr: String,
        host: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] TlsSetupError),
    #[error("the peer closed the migration stream")]
    Closed,
    #[error(transparent)]
    Wire(#[from] wire::WireError),
    #[error("the saved state does not decode")]
    State(#[from] state::StateError),
    #[error("the destination refused: {reason}")]
    Refused { reason: String },
    #[error("the source is refused: {reason}")]
    Rejected { reason: String },
    #[error("expected {want}, got {got}")]
    Unexpected { want: &'static str, got: String },
    #[error("cancelled")]
    Cancelled,
    #[error(
        "did not converge: after {rounds} rounds {dirty_bytes} bytes are dirty, {expected_ms} ms of downtime expected against a budget of {budget_ms} ms"
    )]
    NoConvergence {
        rounds: u32,
        dirty_bytes: u64,
        expected_ms: u64,
        budget_ms: u64,
    },
    #[error("took longer than {secs} s")]
    Timeout { secs: u64 },
    #[error("guest memory")]
    Memory(#[source] vm_memory::GuestMemoryError),
    /// A Pages or Zero frame for a range that is not all guest RAM (or whose end does
    /// not fit in 64 bits): the source is broken or hostile, and the migration ends.
    #[error("{frame} frame for {pages} pages at {gpa:#x} reaches outside guest memory")]
    OutsideMemory {
        frame: &'static str,
        gpa: u64,
        pages: u64,
    },
    #[error(transparent)]
    Vm(#[from] crate::vmm::VmError),
}

impl MigrationError {
    /// A frame the conversation did not expect at this point.
    fn unexpected(want: &'static str, got: &wire::Frame) -> Self {
        let got = match got {
            wire::Frame::Refuse { reason } => {
                return MigrationError::Refused {
                    reason: reason.clone(),
                };
            }
            wire::Frame::Pages { gpa, data } => format!("Pages({gpa:#x}, {} bytes)", data.len()),
            wire::Frame::State(s) => format!("State({} bytes)", s.len()),
            other => format!("{other:?}"),
        };
        MigrationError::Unexpected { want, got }
    }
}

/// Compares two tokens in time that does not depend on where they differ.
pub fn token_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let mut diff = a.len() ^ b.len();
    for i in 0..a.len().max(b.len()) {
        diff |= usize::from(a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0));
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_whole() {
        assert!(token_eq("abc", "abc"));
        assert!(!token_eq("abc", "abd"));
        assert!(!token_eq("abc", "abcd"));
        assert!(!token_eq("", "a"));
        assert!(token_eq("", ""));
    }
}
