//! What callers hand the session's engine and what comes back: a request with its
//! reply channel, and for SCSI commands the [`Command`] (kept whole so that it can be sent
//! again after a reconnect) and its [`Outcome`].

use bytes::{Bytes, BytesMut};
use tokio::sync::oneshot;

use crate::error::Error;

/// Task attributes (SAM-5 §8.9).
pub mod attr {
    pub const SIMPLE: u8 = 1;
    pub const ORDERED: u8 = 2;
    pub const HEAD_OF_QUEUE: u8 = 3;
}

/// A SCSI command as the engine sends it. Everything it needs to be sent again is here:
/// write data stays until the command completes.
#[derive(Debug)]
pub struct Command {
    /// The encoded LUN field.
    pub lun: u64,
    /// The CDB, zero-padded to 16 bytes.
    pub cdb: [u8; 16],
    pub attr: u8,
    /// Data to the target (empty for none).
    pub data_out: Bytes,
    /// Buffer for data from the target; its length is the expected read length (empty
    /// for none). Returned in the [`Outcome`].
    pub data_in: BytesMut,
}

impl Command {
    pub fn new(lun: u64, cdb: &[u8]) -> Self {
        let mut c = [0u8; 16];
        let n = cdb.len().min(16);
        c[..n].copy_from_slice(&cdb[..n]);
        Self {
            lun,
            cdb: c,
            attr: attr::SIMPLE,
            data_out: Bytes::new(),
            data_in: BytesMut::new(),
        }
    }

    pub fn with_data_out(mut self, data: Bytes) -> Self {
        self.data_out = data;
        self
    }

    /// Expects up to `len` bytes back, into `buf` (resized to `len`).
    pub fn with_data_in(mut self, mut buf: BytesMut, len: usize) -> Self {
        buf.resize(len, 0);
        self.data_in = buf;
        self
    }
}

/// How a SCSI command ended at the target.
#[derive(Debug)]
pub struct Outcome {
    /// The command, with `data_in` holding what was read.
    pub command: Command,
    /// Bytes of `data_in` the target filled.
    pub received: usize,
    /// The iSCSI response code: 0 when the target completed the command.
    pub response: u8,
    pub status: u8,
    /// Raw sense data (without the 2-byte length) of a CHECK CONDITION.
    pub sense: Option<Bytes>,
    /// A successful flush that must still be reported as failed: writes acknowledged
    /// earlier may have been lost by a target restart (see the journal).
    pub writes_lost: bool,
}

/// What a request asks of the engine.
#[derive(Debug)]
pub(crate) enum Op {
    Scsi(Command),
    /// A task management function on a LUN (the referenced task is internal).
    TaskManagement {
        function: u8,
        lun: u64,
    },
    /// A NOP-Out ping, answered by a NOP-In.
    Ping,
    /// Log the session out once the commands in flight have finished.
    Logout,
}

/// The engine's answer.
#[derive(Debug)]
pub(crate) enum Done {
    Scsi(Outcome),
    TaskManagement { response: u8 },
    Ping,
    Logout,
}

/// One request from a caller, and where its answer goes.
#[derive(Debug)]
pub(crate) struct Request {
    pub op: Op,
    /// For logs and errors.
    pub name: &'static str,
    pub reply: oneshot::Sender<Result<Done, Error>>,
    /// How many attempts of this request have timed out.
    pub timeouts: u32,
}

impl Request {
    pub fn new(op: Op, name: &'static str) -> (Self, oneshot::Receiver<Result<Done, Error>>) {
        let (reply, rx) = oneshot::channel();
        (
            Self {
                op,
                name,
                reply,
                timeouts: 0,
            },
            rx,
        )
    }

    pub fn finish(self, result: Result<Done, Error>) {
        // The caller may have stopped waiting; nothing to do then.
        let _ = self.reply.send(result);
    }

    /// Whether the caller stopped waiting (dropped its future): no need to send it.
    pub fn abandoned(&self) -> bool {
        self.reply.is_closed()
    }

    pub fn is_scsi(&self) -> bool {
        matches!(self.op, Op::Scsi(_))
    }

    pub fn command(&self) -> Option<&Command> {
        match &self.op {
            Op::Scsi(c) => Some(c),
            _ => None,
        }
    }
}
