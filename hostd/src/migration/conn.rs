//! A migration connection: owns the TCP socket and the receive buffer, sends and
//! receives [`Frame`]s. Blocking, with a timeout on every read and write, so a peer that
//! stops answering ends the migration instead of hanging it.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use super::MigrationError;
use super::wire::{self, Frame};

pub struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    pos: usize,
    out: Vec<u8>,
    /// Payload bytes written so far.
    pub sent: u64,
}

impl Conn {
    pub fn new(stream: TcpStream, timeout: Duration) -> Result<Self, MigrationError> {
        stream
            .set_read_timeout(Some(timeout))
            .and_then(|()| stream.set_write_timeout(Some(timeout)))
            .and_then(|()| stream.set_nodelay(true))
            .map_err(|source| MigrationError::Io {
                what: "setting up the socket",
                source,
            })?;
        Ok(Self {
            stream,
            buf: Vec::with_capacity(2 << 20),
            pos: 0,
            out: Vec::new(),
            sent: 0,
        })
    }

    pub fn set_timeout(&self, timeout: Duration) {
        let _ = self.stream.set_read_timeout(Some(timeout));
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
            if let Some((frame, n)) = wire::decode(&self.buf[self.pos..])? {
                self.pos += n;
                if self.pos == self.buf.len() {
                    self.buf.clear();
                    self.pos = 0;
                }
                return Ok(frame);
            }
            if self.pos > 0 {
                self.buf.drain(..self.pos);
                self.pos = 0;
            }
            let have = self.buf.len();
            self.buf.resize(have + (1 << 20), 0);
            let n = match self.stream.read(&mut self.buf[have..]) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {
                    self.buf.truncate(have);
                    continue;
                }
                Err(source) => {
                    self.buf.truncate(have);
                    return Err(MigrationError::Io {
                        what: "receiving",
                        source,
                    });
                }
            };
            self.buf.truncate(have + n);
            if n == 0 {
                return Err(MigrationError::Closed);
            }
        }
    }
}
