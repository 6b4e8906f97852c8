//! A migration connection: owns the TLS session over the TCP socket and the receive
//! buffer, sends and receives [`Frame`]s. Blocking, with a timeout on every read and
//! write, so a peer that stops answering ends the migration instead of hanging it.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use rustls::{ClientConnection, ServerConnection, StreamOwned};

use super::MigrationError;
use super::wire::{self, Frame};

/// The TLS session of either end.
pub enum Tls {
    /// The source's.
    Client(StreamOwned<ClientConnection, TcpStream>),
    /// The destination's.
    Server(StreamOwned<ServerConnection, TcpStream>),
}

impl Tls {
    fn sock(&self) -> &TcpStream {
        match self {
            Tls::Client(s) => &s.sock,
            Tls::Server(s) => &s.sock,
        }
    }
}

impl Read for Tls {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Tls::Client(s) => s.read(buf),
            Tls::Server(s) => s.read(buf),
        }
    }
}

impl Write for Tls {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Tls::Client(s) => s.write(buf),
            Tls::Server(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Tls::Client(s) => s.flush(),
            Tls::Server(s) => s.flush(),
        }
    }
}

/// Where frames go: the migration connection, or a saved-state volume
/// (`super::saved`).
pub trait FrameSink {
    fn send(&mut self, frame: &Frame) -> Result<(), MigrationError>;
    /// A Pages frame straight from `data`, without building it in a buffer first.
    fn send_pages(&mut self, gpa: u64, data: &[u8]) -> Result<(), MigrationError>;
    /// A Delta frame of `data`'s entries.
    fn send_delta(&mut self, data: &[u8]) -> Result<(), MigrationError> {
        self.send(&Frame::Delta {
            data: data.to_vec(),
        })
    }
    /// Bytes sent so far.
    fn sent(&self) -> u64;
}

impl FrameSink for Conn {
    fn send(&mut self, frame: &Frame) -> Result<(), MigrationError> {
        Conn::send(self, frame)
    }

    fn send_pages(&mut self, gpa: u64, data: &[u8]) -> Result<(), MigrationError> {
        Conn::send_pages(self, gpa, data)
    }

    fn send_delta(&mut self, data: &[u8]) -> Result<(), MigrationError> {
        self.queue(&wire::delta_header(data.len()))?;
        self.queue(data)
    }

    fn sent(&self) -> u64 {
        self.sent
    }
}

/// Room the receive buffer keeps for one read.
const READ_ROOM: usize = 1 << 20;
/// Queued memory frames go out once they reach this many bytes.
const QUEUE: usize = 256 << 10;

pub struct Conn {
    stream: Tls,
    /// Received bytes are `buf[pos..end]`; the rest is room for the next read (zeroed
    /// once when the buffer grows, not on every read).
    buf: Vec<u8>,
    pos: usize,
    end: usize,
    /// Memory frames queued to go out together (at most [`QUEUE`] bytes).
    out: Vec<u8>,
    /// Where a frame is encoded.
    frame: Vec<u8>,
    /// Bytes sent (or queued) so far.
    pub sent: u64,
}

impl Conn {
    pub fn new(stream: Tls, timeout: Duration) -> Result<Self, MigrationError> {
        Self::with_buffered(stream, timeout, &[])
    }

    /// A connection whose first `received` bytes were already read off the session (the
    /// destination reads the Hello before it makes the connection).
    pub fn with_buffered(
        stream: Tls,
        timeout: Duration,
        received: &[u8],
    ) -> Result<Self, MigrationError> {
        let sock = stream.sock();
        sock.set_read_timeout(Some(timeout))
            .and_then(|()| sock.set_write_timeout(Some(timeout)))
            .and_then(|()| sock.set_nodelay(true))
            .map_err(|source| MigrationError::Io {
                what: "setting up the socket",
                source,
            })?;
        let mut buf = vec![0; (2 * READ_ROOM).max(received.len() + READ_ROOM)];
        buf[..received.len()].copy_from_slice(received);
        Ok(Self {
            stream,
            buf,
            pos: 0,
            end: received.len(),
            out: Vec::with_capacity(QUEUE),
            frame: Vec::new(),
            sent: 0,
        })
    }

    pub fn set_timeout(&self, timeout: Duration) {
        let _ = self.stream.sock().set_read_timeout(Some(timeout));
    }

    /// Sends `frame`. Memory frames (Pages, Zero, Delta) are queued with the ones before them
    /// and go out in large writes; any other frame, and every [`Conn::recv`], sends what
    /// is queued first.
    pub fn send(&mut self, frame: &Frame) -> Result<(), MigrationError> {
        self.frame.clear();
        wire::encode(frame, &mut self.frame);
        let bytes = std::mem::take(&mut self.frame);
        let r = self.queue(&bytes);
        self.frame = bytes;
        r?;
        if matches!(
            frame,
            Frame::Pages { .. } | Frame::Zero { .. } | Frame::Delta { .. }
        ) {
            Ok(())
        } else {
            self.flush()
        }
    }

    /// A Pages frame straight from `data`, without building it in a buffer first.
    pub fn send_pages(&mut self, gpa: u64, data: &[u8]) -> Result<(), MigrationError> {
        self.queue(&wire::pages_header(gpa, data.len()))?;
        self.queue(data)
    }

    /// Adds `bytes` to what goes out next. Every write is a TLS record and a system call
    /// of its own: written one by one, a dirty round of scattered single pages cost two
    /// of each per page (the header, then the page).
    fn queue(&mut self, bytes: &[u8]) -> Result<(), MigrationError> {
        self.sent += bytes.len() as u64;
        if self.out.len() + bytes.len() > QUEUE {
            self.write_out()?;
        }
        if bytes.len() >= QUEUE {
            return self.write(bytes);
        }
        self.out.extend_from_slice(bytes);
        Ok(())
    }

    fn write_out(&mut self) -> Result<(), MigrationError> {
        if self.out.is_empty() {
            return Ok(());
        }
        let out = std::mem::take(&mut self.out);
        let r = self.write(&out);
        self.out = out;
        self.out.clear();
        r
    }

    /// Sends everything queued.
    pub fn flush(&mut self) -> Result<(), MigrationError> {
        self.write_out()?;
        self.stream.flush().map_err(|source| MigrationError::Io {
            what: "sending",
            source,
        })
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), MigrationError> {
        self.stream
            .write_all(bytes)
            .map_err(|source| MigrationError::Io {
                what: "sending",
                source,
            })
    }

    /// The next frame; an error if the peer closes, stops sending for the timeout, or
    /// sends something that does not decode.
    pub fn recv(&mut self) -> Result<Frame, MigrationError> {
        self.flush()?;
        loop {
            if let Some((frame, n)) = wire::decode(&self.buf[self.pos..self.end])? {
                self.pos += n;
                if self.pos == self.end {
                    (self.pos, self.end) = (0, 0);
                }
                return Ok(frame);
            }
            if self.buf.len() - self.end < READ_ROOM {
                // Move the partial frame to the front; grow only for a frame larger
                // than the buffer (decode bounds it by MAX_PAYLOAD).
                self.buf.copy_within(self.pos..self.end, 0);
                (self.pos, self.end) = (0, self.end - self.pos);
                if self.buf.len() - self.end < READ_ROOM {
                    self.buf.resize(self.end + READ_ROOM, 0);
                }
            }
            let n = match self.stream.read(&mut self.buf[self.end..]) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(MigrationError::Io {
                        what: "receiving",
                        source,
                    });
                }
            };
            if n == 0 {
                return Err(MigrationError::Closed);
            }
            self.end += n;
        }
    }
}
