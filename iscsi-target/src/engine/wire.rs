//! The connection's socket: the sending side shared by the engine and the blocking pool
//! (StatSN assigned in send order under one lock, each batch written with as few `writev`
//! calls as the payloads allow), and the engine's reads.

use std::net::TcpStream;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

use bytes::{Bytes, BytesMut};
use iscsi_pdu::Header;
use iscsi_pdu::frame::FrameConfig;
use iscsi_pdu::tx::TxBatch;

/// Sequence numbers the engine and the blocking pool share.
pub(super) struct Sn {
    pub(super) exp_cmd_sn: AtomicU32,
    pub(super) window: u32,
}

impl Sn {
    pub(super) fn exp(&self) -> u32 {
        self.exp_cmd_sn.load(Ordering::Acquire)
    }

    pub(super) fn max(&self) -> u32 {
        self.exp().wrapping_add(self.window - 1)
    }

    /// Takes the next CmdSN in order. Only the engine thread calls this.
    pub(super) fn advance(&self) {
        self.exp_cmd_sn
            .store(self.exp().wrapping_add(1), Ordering::Release);
    }
}

/// The sending side of the socket: whoever holds the lock assigns StatSN and writes.
pub(super) struct Wire {
    pub(super) stream: TcpStream,
    cfg: FrameConfig,
    stat_sn: u32,
    tx: TxBatch,
}

impl Wire {
    pub(super) fn new(stream: TcpStream, cfg: FrameConfig, stat_sn: u32) -> Self {
        Self {
            stream,
            cfg,
            stat_sn,
            tx: TxBatch::with_capacity(64 * 1024),
        }
    }

    /// Numbers and writes `pdus`: the socket blocks, so this returns once all are sent.
    pub(super) fn send(&mut self, pdus: Vec<(Header, Bytes)>, sn: &Sn) -> std::io::Result<()> {
        if pdus.is_empty() {
            return Ok(());
        }
        let exp = sn.exp();
        let max = exp.wrapping_add(sn.window - 1);
        for (mut h, data) in pdus {
            h.set_sequence_numbers(&mut self.stat_sn, exp, max);
            self.tx.push_pdu(&h, data, &self.cfg);
        }
        let result = match self.tx.write_to(&mut &self.stream) {
            Ok(true) => Ok(()),
            Ok(false) => Err(std::io::ErrorKind::WouldBlock.into()),
            Err(e) => Err(e),
        };
        if result.is_err() {
            self.tx.clear();
        }
        result
    }
}

/// Sends through the shared wire; a failed write means the connection is going away,
/// which the engine's read will notice.
pub(super) fn send_shared(wire: &Mutex<Wire>, sn: &Sn, pdus: Vec<(Header, Bytes)>) {
    let mut w = wire.lock().expect("wire lock poisoned");
    if let Err(e) = w.send(pdus, sn) {
        tracing::debug!(error = %e, "send failed");
        let _ = w.stream.shutdown(std::net::Shutdown::Both);
    }
}

/// Reads into the spare capacity of `buf` with one `recv`.
pub(super) fn read_into(stream: &TcpStream, buf: &mut BytesMut) -> std::io::Result<usize> {
    use std::os::fd::AsRawFd;
    let spare = buf.spare_capacity_mut();
    // SAFETY: `spare` is writable memory of `spare.len()` bytes owned by `buf`; recv
    // writes at most that many bytes into it and the descriptor belongs to `stream`,
    // which outlives the call.
    let n = unsafe {
        libc::recv(
            stream.as_raw_fd(),
            spare.as_mut_ptr().cast(),
            spare.len(),
            0,
        )
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let n = n as usize;
    // SAFETY: recv initialised the first `n` bytes of the spare capacity.
    unsafe { buf.set_len(buf.len() + n) };
    Ok(n)
}
