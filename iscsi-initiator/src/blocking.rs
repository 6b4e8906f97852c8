//! A synchronous face of a [`Lun`] for code that runs on plain threads (a virtio-blk
//! queue worker, say): byte offsets, caller-owned buffers, each call a `block_on` on the
//! runtime the session lives in. Calls from many threads pipeline on the one session.
//!
//! Never call these from a thread of that runtime: `block_on` there would stall it.

use bytes::{Bytes, BytesMut};
use tokio::runtime::Handle;

use crate::error::Error;
use crate::lun::Lun;

/// A LUN driven from threads outside the runtime.
#[derive(Clone, Debug)]
pub struct BlockingLun {
    lun: Lun,
    handle: Handle,
}

impl BlockingLun {
    pub fn new(lun: Lun, handle: Handle) -> Self {
        Self { lun, handle }
    }

    pub fn lun(&self) -> &Lun {
        &self.lun
    }

    pub fn size(&self) -> u64 {
        self.lun.size()
    }

    fn lba(&self, offset: u64, len: usize) -> Result<u64, Error> {
        let bs = u64::from(self.lun.block_size());
        if !offset.is_multiple_of(bs) || !(len as u64).is_multiple_of(bs) {
            return Err(Error::InvalidArgument {
                reason: format!("offset {offset} and length {len} must be multiples of {bs}"),
            });
        }
        Ok(offset / bs)
    }

    /// Fills `buf` from byte `offset`.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), Error> {
        let lba = self.lba(offset, buf.len())?;
        let data = self
            .handle
            .block_on(self.lun.read_into(lba, BytesMut::zeroed(buf.len())))?;
        buf.copy_from_slice(&data);
        Ok(())
    }

    /// Writes `data` at byte `offset`.
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), Error> {
        let lba = self.lba(offset, data.len())?;
        self.handle
            .block_on(self.lun.write(lba, Bytes::copy_from_slice(data)))
    }

    pub fn flush(&self) -> Result<(), Error> {
        self.handle.block_on(self.lun.flush())
    }

    /// Unmaps a byte range (whole blocks).
    pub fn discard(&self, offset: u64, len: u64) -> Result<(), Error> {
        let lba = self.lba(offset, len as usize)?;
        let bs = u64::from(self.lun.block_size());
        let mut ranges = Vec::new();
        let (mut at, end) = (lba, lba + len / bs);
        while at < end {
            let n = (end - at).min(u64::from(u32::MAX));
            ranges.push((at, n as u32));
            at += n;
        }
        self.handle.block_on(self.lun.unmap(&ranges))
    }

    /// Makes a byte range read as zeros.
    pub fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<(), Error> {
        let lba = self.lba(offset, len as usize)?;
        let bs = u64::from(self.lun.block_size());
        let (mut at, end) = (lba, lba + len / bs);
        while at < end {
            let n = (end - at).min(1 << 16);
            self.handle
                .block_on(self.lun.write_zeroes(at, n as u32, unmap))?;
            at += n;
        }
        Ok(())
    }
}
