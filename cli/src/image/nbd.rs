//! The reading half of an NBD client (the NBD protocol, fixed newstyle negotiation),
//! enough to read the raw disk that `qemu-nbd` makes of an image: one export, simple
//! replies, one request at a time.

use std::path::Path;

use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943; // "NBDMAGIC"
const IHAVEOPT: u64 = 0x4948_4156_454f_5054; // "IHAVEOPT"
const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;
const OPT_EXPORT_NAME: u32 = 1;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const CMD_READ: u16 = 0;
const CMD_DISC: u16 = 2;

#[derive(Debug, Error)]
pub enum NbdError {
    #[error("NBD connection")]
    Io(#[from] std::io::Error),
    #[error("the NBD server does not speak fixed newstyle (magic {magic:#x}, flags {flags:#x})")]
    Handshake { magic: u64, flags: u16 },
    #[error("NBD reply with magic {magic:#x} or handle {handle} (expected {expected})")]
    Reply {
        magic: u32,
        handle: u64,
        expected: u64,
    },
    #[error("NBD read of {len} bytes at {offset} failed with error {errno}")]
    Read { offset: u64, len: u32, errno: u32 },
}

pub struct Client {
    stream: UnixStream,
    pub size: u64,
    handle: u64,
}

impl Client {
    pub async fn connect(socket: &Path) -> Result<Client, NbdError> {
        let mut stream = UnixStream::connect(socket).await?;
        let magic = stream.read_u64().await?;
        let opt = stream.read_u64().await?;
        let flags = stream.read_u16().await?;
        if magic != NBDMAGIC || opt != IHAVEOPT || flags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(NbdError::Handshake { magic, flags });
        }
        let no_zeroes = flags & FLAG_NO_ZEROES != 0;
        let client_flags = u32::from(FLAG_FIXED_NEWSTYLE | (flags & FLAG_NO_ZEROES));
        let mut hello = Vec::with_capacity(20);
        hello.extend_from_slice(&client_flags.to_be_bytes());
        // The default export (qemu-nbd's is named "").
        hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
        hello.extend_from_slice(&OPT_EXPORT_NAME.to_be_bytes());
        hello.extend_from_slice(&0u32.to_be_bytes());
        stream.write_all(&hello).await?;
        let size = stream.read_u64().await?;
        let _transmission_flags = stream.read_u16().await?;
        if !no_zeroes {
            let mut zeroes = [0u8; 124];
            stream.read_exact(&mut zeroes).await?;
        }
        Ok(Client {
            stream,
            size,
            handle: 0,
        })
    }

    fn request(&mut self, kind: u16, offset: u64, len: u32) -> [u8; 28] {
        self.handle += 1;
        let mut r = [0u8; 28];
        r[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        r[6..8].copy_from_slice(&kind.to_be_bytes());
        r[8..16].copy_from_slice(&self.handle.to_be_bytes());
        r[16..24].copy_from_slice(&offset.to_be_bytes());
        r[24..28].copy_from_slice(&len.to_be_bytes());
        r
    }

    /// Fills `buf` from the disk at `offset`.
    pub async fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), NbdError> {
        let len = buf.len() as u32;
        let req = self.request(CMD_READ, offset, len);
        self.stream.write_all(&req).await?;
        let magic = self.stream.read_u32().await?;
        let errno = self.stream.read_u32().await?;
        let handle = self.stream.read_u64().await?;
        if magic != SIMPLE_REPLY_MAGIC || handle != self.handle {
            return Err(NbdError::Reply {
                magic,
                handle,
                expected: self.handle,
            });
        }
        if errno != 0 {
            return Err(NbdError::Read { offset, len, errno });
        }
        self.stream.read_exact(buf).await?;
        Ok(())
    }

    /// Says goodbye (the server then closes).
    pub async fn close(mut self) {
        let req = self.request(CMD_DISC, 0, 0);
        let _ = self.stream.write_all(&req).await;
    }
}
