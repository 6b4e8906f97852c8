//! Receiving: bytes from the socket cut into PDUs, except that a long Data-In segment is
//! read straight into its command's buffer ("direct placement") instead of through the
//! receive buffer.

use std::sync::atomic::Ordering;

use bytes::Buf;
use iscsi_pdu::bhs::{self, BHS_LEN, DataIn, Header, Opcode};
use iscsi_pdu::frame::{self, DIGEST_LEN};
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::Engine;
use crate::connection::ConnError;

/// Room reserved in the receive buffer before each read.
const RX_CHUNK: usize = 256 * 1024;
/// Data-In segments at least this long are placed straight into the command's buffer.
const DIRECT_MIN: usize = 16 * 1024;
/// Reads per wake-up before the engine looks at its other work.
const READS_PER_WAKE: usize = 32;

/// What one read from the socket gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Read {
    /// `n` bytes (0: the peer closed); `drained` when fewer came than there was room
    /// for, so the socket is empty for now.
    Data { n: usize, drained: bool },
    /// Nothing to read.
    Empty,
}

/// One read through `read`, which returns at most `want` bytes. A short read means the
/// socket is drained: its readiness is cleared at once (tokio keeps it if an event came
/// in meanwhile), which spares the read that would only have said EAGAIN.
fn read_once(
    stream: &TcpStream,
    want: usize,
    read: impl FnOnce() -> std::io::Result<usize>,
) -> std::io::Result<Read> {
    let mut short = None;
    let r = stream.try_io(Interest::READABLE, || {
        let n = read()?;
        if n > 0 && n < want {
            short = Some(n);
            return Err(std::io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    match r {
        Ok(n) => Ok(Read::Data { n, drained: false }),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(match short {
            Some(n) => Read::Data { n, drained: true },
            None => Read::Empty,
        }),
        Err(e) => Err(e),
    }
}

/// A long Data-In segment being read straight into its command's buffer.
#[derive(Debug)]
pub(super) struct Direct {
    header: DataIn,
    /// Where the segment starts in the command's buffer, and its length.
    seg_start: usize,
    seg_len: usize,
    /// Next byte to read, and how many are left.
    at: usize,
    remaining: usize,
    /// Padding and data digest after the segment.
    trailer: usize,
    /// The task went away (aborted): read the bytes and throw them away.
    discard: bool,
}

impl Engine<'_> {
    /// Reads and handles what the socket has. Returns whether the socket was drained
    /// (false when it stopped after [`READS_PER_WAKE`] reads with more to come).
    pub(super) fn on_readable(&mut self) -> Result<bool, ConnError> {
        for _ in 0..READS_PER_WAKE {
            if self.exit.is_some() {
                return Ok(true);
            }
            let read = if let Some(d) = self.direct.as_mut().filter(|d| d.remaining > 0) {
                let buf: &mut [u8] =
                    match self.slots.get_mut(d.header.itt).and_then(|t| t.command()) {
                        Some(cmd) if !d.discard => &mut cmd.data_in[d.at..d.at + d.remaining],
                        _ => {
                            d.discard = true;
                            let n = d.remaining.min(self.scratch.len());
                            &mut self.scratch[..n]
                        }
                    };
                let want = buf.len();
                let stream = &self.stream;
                let read = read_once(stream, want, || stream.try_read(buf));
                if let Ok(Read::Data { n, .. }) = read {
                    d.at += n;
                    d.remaining -= n;
                    if d.remaining == 0 {
                        // Read just the trailer and the next header: if that is another
                        // long Data-In, its segment goes straight to its buffer too
                        // instead of through the receive buffer.
                        let hd = if self.rx_cfg.header_digest {
                            DIGEST_LEN
                        } else {
                            0
                        };
                        self.small_read = d.trailer + BHS_LEN + hd;
                    }
                }
                read
            } else if self.small_read > 0 {
                let mut head = [0u8; BHS_LEN + 2 * DIGEST_LEN + 3];
                let want = self.small_read.min(head.len());
                let stream = &self.stream;
                let read = read_once(stream, want, || stream.try_read(&mut head[..want]));
                if let Ok(Read::Data { n, .. }) = read {
                    self.small_read -= n;
                    self.rx.extend_from_slice(&head[..n]);
                }
                read
            } else {
                self.rx.reserve(RX_CHUNK);
                let want = self.rx.capacity() - self.rx.len();
                let (stream, rx) = (&self.stream, &mut self.rx);
                read_once(stream, want, || stream.try_read_buf(rx))
            };
            match read {
                Ok(Read::Data { n: 0, .. }) => return Err(ConnError::Closed),
                Ok(Read::Data { drained, .. }) => {
                    self.last_rx = Instant::now();
                    self.process_rx()?;
                    if drained {
                        return Ok(true);
                    }
                }
                Ok(Read::Empty) => return Ok(true),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(ConnError::Io(e)),
            }
        }
        Ok(false)
    }

    /// Handles every whole PDU in the receive buffer, and starts direct placement of a
    /// long Data-In segment whose header is there.
    pub(super) fn process_rx(&mut self) -> Result<(), ConnError> {
        loop {
            if let Some(d) = &self.direct {
                if d.remaining > 0 || self.rx.len() < d.trailer {
                    return Ok(());
                }
                let d = self.direct.take().expect("checked");
                self.finish_direct(d)?;
                continue;
            }
            let Some(total) = frame::frame_len(&self.rx, &self.rx_cfg).map_err(ConnError::Pdu)?
            else {
                return Ok(());
            };
            if self.rx.len() >= total {
                let pdu = frame::decode(&mut self.rx, &self.rx_cfg)
                    .map_err(ConnError::Pdu)?
                    .expect("a whole frame is buffered");
                self.handle(pdu)?;
                continue;
            }
            if !self.start_direct()? {
                return Ok(());
            }
        }
    }

    /// Starts direct placement when the buffer holds the header of a long Data-In whose
    /// segment has not all arrived. Returns whether it did.
    fn start_direct(&mut self) -> Result<bool, ConnError> {
        let Some(bhs) = self.rx.first_chunk::<BHS_LEN>() else {
            return Ok(false);
        };
        if Opcode::from_byte(bhs[0]).ok() != Some(Opcode::DataIn) {
            return Ok(false);
        }
        let ahs = bhs::total_ahs_len(bhs);
        let data_len = bhs::data_segment_len(bhs);
        let hd = if self.rx_cfg.header_digest {
            DIGEST_LEN
        } else {
            0
        };
        let head = BHS_LEN + ahs + hd;
        if data_len < DIRECT_MIN || self.rx.len() < head {
            return Ok(false);
        }
        if hd > 0 {
            let expected = frame::crc32c(&[&self.rx[..BHS_LEN + ahs]]);
            let d = &self.rx[BHS_LEN + ahs..head];
            let got = u32::from_le_bytes([d[0], d[1], d[2], d[3]]);
            if expected != got {
                return Err(ConnError::Pdu(iscsi_pdu::PduError::HeaderDigest {
                    expected,
                    got,
                }));
            }
        }
        let Header::DataIn(h) = Header::parse(bhs).map_err(ConnError::Pdu)? else {
            return Ok(false);
        };
        let offset = h.buffer_offset as usize;
        let Some(task) = self.slots.get_mut(h.itt) else {
            // Unknown task: let the whole frame arrive and be dropped as usual.
            return Ok(false);
        };
        let expected_sn = task.next_data_sn;
        let Some(cmd) = task.command() else {
            return Ok(false);
        };
        if h.data_sn != expected_sn || offset + data_len > cmd.data_in.len() {
            // Invalid: the whole-frame path reports it.
            return Ok(false);
        }
        self.rx.advance(head);
        let have = self.rx.len().min(data_len);
        cmd.data_in[offset..offset + have].copy_from_slice(&self.rx[..have]);
        self.rx.advance(have);
        let trailer = frame::pad_len(data_len)
            + if self.rx_cfg.data_digest {
                DIGEST_LEN
            } else {
                0
            };
        self.counters
            .direct_bytes
            .fetch_add(data_len as u64, Ordering::Relaxed);
        self.direct = Some(Direct {
            header: h,
            seg_start: offset,
            seg_len: data_len,
            at: offset + have,
            remaining: data_len - have,
            trailer,
            discard: false,
        });
        Ok(true)
    }

    /// The segment of a direct placement is in: check padding and digest, then account
    /// for the Data-In as if it had come whole.
    fn finish_direct(&mut self, d: Direct) -> Result<(), ConnError> {
        let pad = frame::pad_len(d.seg_len);
        if self.rx_cfg.data_digest && !d.discard {
            let digest = &self.rx[pad..pad + DIGEST_LEN];
            let got = u32::from_le_bytes([digest[0], digest[1], digest[2], digest[3]]);
            let cmd = self
                .slots
                .get_mut(d.header.itt)
                .and_then(|t| t.command())
                .ok_or_else(|| ConnError::protocol("direct placement lost its task"))?;
            let seg = &cmd.data_in[d.seg_start..d.seg_start + d.seg_len];
            let expected = frame::crc32c(&[seg, &self.rx[..pad]]);
            if expected != got {
                return Err(ConnError::Pdu(iscsi_pdu::PduError::DataDigest {
                    itt: d.header.itt,
                    expected,
                    got,
                }));
            }
        }
        self.rx.advance(d.trailer);
        self.note_numbers(&Header::DataIn(d.header));
        if d.discard {
            return Ok(());
        }
        self.data_in_placed(d.header, d.seg_len)
    }
}
