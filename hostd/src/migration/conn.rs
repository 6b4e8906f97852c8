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

    fn sent(&self) -> u64 {
        self.sent
    }
}

/// Room the receive buffer keeps for one read.
const READ_ROOM: usize = 1 << 20;

pub struct Conn {
    stream: Tls,
    /// Received bytes are `buf[pos..end]`; the rest is room for the next read (zeroed
    /// once when the buffer grows, not on every read).
    buf: Vec<u8>,
    pos: usize,
    end: usize,
    out: Vec<u8>,
    /// Payload bytes written so far.
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
            out: Vec::new(),
            sent: 0,
        })
    }

    pub fn set_timeout(&self, timeout: Duration) {
        let _ = self.stream.sock().set_read_timeout(Some(timeout));
    }

    pub fn send(&mut self, frame: &Frame) -> Result<(), MigrationError> {
        self.out.clear();
        wire::encode(frame, &mut self.out);
        let out = std::mem::take(&mut self.out);
        let r = self.write(&out);
        self.out = out;
        r
    }

    /// A Pages frame straight from `data`, without building it in a buffer first.
    pub fn send_pages(&mut self, gpa: u64, data: &[u8]) -> Result<(), MigrationError> {
        self.write(&wire::pages_header(gpa, data.len()))?;
        self.write(data)
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), MigrationError> {
        self.stream
            .write_all(bytes)
            .and_then(|()| self.stream.flush())
            .map_err(|source| MigrationError::Io {
                what: "sending",
                source,
            })?;
        self.sent += bytes.len() as u64;
        Ok(())
    }

    /// The next frame; an error if the peer closes, stops sending for the timeout, or
    /// sends something that does not decode.
    pub fn recv(&mut self) -> Result<Frame, MigrationError> {
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
