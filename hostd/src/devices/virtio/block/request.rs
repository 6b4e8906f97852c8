//! One virtio-blk request: parsed from a descriptor chain into a typed value, checked
//! against the disk, then executed against the backend.
//!
//! Everything here is guest input. A malformed chain is refused (and counted), never a
//! panic; a request whose status byte can be located is completed with IOERR or UNSUPP so
//! the guest driver does not hang waiting for it.

use std::time::Instant;

use vm_memory::{Bytes, GuestAddress};

use super::backend::{AsyncBlockIo, BlockBackend};
use super::metrics::BlockMetrics;
use crate::vmm::GuestRam;

pub const SECTOR_SIZE: u64 = 512;
pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
pub const VIRTIO_BLK_T_DISCARD: u32 = 11;
pub const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;
pub const VIRTIO_BLK_S_OK: u8 = 0;
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;
/// Length of the disk id GET_ID returns.
pub const VIRTIO_BLK_ID_BYTES: usize = 20;
/// `flags` bit of a write-zeroes segment: the device may deallocate the range.
const WRITE_ZEROES_FLAG_UNMAP: u32 = 1;
const SEGMENT_BYTES: u32 = 16;
const HEADER_BYTES: u32 = 16;
/// Largest data transfer in one request; larger ones are refused rather than buffered.
pub const MAX_REQUEST_BYTES: u64 = 16 << 20;
/// Most discard / write-zeroes segments in one request (the device advertises 1).
pub const MAX_SEGMENTS: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestType {
    In,
    Out,
    Flush,
    GetId,
    Discard,
    WriteZeroes,
    Unsupported(u32),
}

impl RequestType {
    fn from_raw(t: u32) -> Self {
        match t {
            VIRTIO_BLK_T_IN => Self::In,
            VIRTIO_BLK_T_OUT => Self::Out,
            VIRTIO_BLK_T_FLUSH => Self::Flush,
            VIRTIO_BLK_T_GET_ID => Self::GetId,
            VIRTIO_BLK_T_DISCARD => Self::Discard,
            VIRTIO_BLK_T_WRITE_ZEROES => Self::WriteZeroes,
            other => Self::Unsupported(other),
        }
    }

    /// Whether the data descriptors are written by the device.
    fn device_writes_data(self) -> bool {
        matches!(self, Self::In | Self::GetId)
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("descriptor chain is empty")]
    Empty,
    #[error("request header descriptor is {len} bytes (device-writable: {writable})")]
    BadHeader { len: u32, writable: bool },
    #[error("guest address {addr:#x} is outside guest memory")]
    GuestMemory { addr: u64 },
    #[error("the last descriptor is not a device-writable status byte")]
    BadStatus,
    #[error("data descriptor {index} of a {kind:?} request points the wrong way")]
    Direction { index: usize, kind: RequestType },
    #[error("{len} data bytes is not a whole number of sectors")]
    Unaligned { len: u64 },
    #[error("bytes {offset}+{len} are not aligned to the disk's {block_size}-byte blocks")]
    Misaligned {
        offset: u64,
        len: u64,
        block_size: u32,
    },
    #[error("sectors {sector}+{count} lie past the end of the disk ({capacity} sectors)")]
    OutOfRange {
        sector: u64,
        count: u64,
        capacity: u64,
    },
    #[error("request of {len} bytes is over the {max}-byte limit")]
    TooLarge { len: u64, max: u64 },
    #[error("{len} bytes is not 1 to {max} discard/write-zeroes segments")]
    BadSegments { len: u64, max: u32 },
}

/// A parsed request: what to do, where the data is, where the status goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub kind: RequestType,
    pub sector: u64,
    pub data: Vec<(GuestAddress, u32)>,
    pub status: GuestAddress,
}

/// A descriptor, as the parser needs it.
#[derive(Debug, Clone, Copy)]
pub struct Desc {
    pub addr: GuestAddress,
    pub len: u32,
    pub writable: bool,
}

impl From<virtio_queue::desc::split::Descriptor> for Desc {
    /// A descriptor of a chain popped off the queue, as [`Request::parse`] takes it.
    fn from(d: virtio_queue::desc::split::Descriptor) -> Self {
        Self {
            addr: d.addr(),
            len: d.len(),
            writable: d.is_write_only(),
        }
    }
}

/// What to tell the queue once a request is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// Bytes the device wrote into the chain (data read plus the status byte).
    pub used_len: u32,
    pub status: Option<u8>,
}

impl Request {
    /// Parses the chain's shape: a readable header, data, and a writable status byte.
    /// On error, also returns the status address when there is one.
    pub fn parse(
        descs: &[Desc],
        mem: &GuestRam,
    ) -> Result<Request, (ParseError, Option<GuestAddress>)> {
        let (first, rest) = descs.split_first().ok_or((ParseError::Empty, None))?;
        let status = match rest.last() {
            Some(d) if d.writable && d.len >= 1 => Some(d.addr),
            _ => None,
        };
        if first.writable || first.len < HEADER_BYTES {
            return Err((
                ParseError::BadHeader {
                    len: first.len,
                    writable: first.writable,
                },
                status,
            ));
        }
        let status_addr = status.ok_or((ParseError::BadStatus, None))?;
        let mut header = [0u8; HEADER_BYTES as usize];
        mem.read_slice(&mut header, first.addr)
            .map_err(|_| (ParseError::GuestMemory { addr: first.addr.0 }, status))?;
        let kind = RequestType::from_raw(u32::from_le_bytes(header[0..4].try_into().unwrap()));
        let sector = u64::from_le_bytes(header[8..16].try_into().unwrap());
        let middle = &rest[..rest.len() - 1];
        if !matches!(kind, RequestType::Flush | RequestType::Unsupported(_)) {
            let want_writable = kind.device_writes_data();
            if let Some(index) = middle.iter().position(|d| d.writable != want_writable) {
                return Err((ParseError::Direction { index, kind }, status));
            }
        }
        Ok(Request {
            kind,
            sector,
            data: middle.iter().map(|d| (d.addr, d.len)).collect(),
            status: status_addr,
        })
    }

    fn data_len(&self) -> u64 {
        self.data.iter().map(|(_, l)| u64::from(*l)).sum()
    }

    /// Checks a read or write against the disk's size and block size.
    fn check_rw(&self, capacity: u64, block_size: u32) -> Result<u64, ParseError> {
        let len = self.data_len();
        if len > MAX_REQUEST_BYTES {
            return Err(ParseError::TooLarge {
                len,
                max: MAX_REQUEST_BYTES,
            });
        }
        if !len.is_multiple_of(SECTOR_SIZE) {
            return Err(ParseError::Unaligned { len });
        }
        check_range(self.sector, len / SECTOR_SIZE, capacity)?;
        check_aligned(self.sector * SECTOR_SIZE, len, block_size)?;
        Ok(len)
    }

    /// Executes the request and writes its status byte.
    pub fn execute(&self, mem: &GuestRam, disk: &DiskContext, bounce: &mut Vec<u8>) -> Completion {
        let (status, data_written) = match self.kind {
            RequestType::In => self.read(mem, disk, bounce),
            RequestType::Out => self.write(mem, disk, bounce),
            RequestType::Flush => {
                disk.metrics.flush();
                match disk.backend.flush() {
                    Ok(()) => (VIRTIO_BLK_S_OK, 0),
                    Err(e) => backend_error(disk, &e),
                }
            }
            RequestType::GetId => self.get_id(mem, disk),
            RequestType::Discard | RequestType::WriteZeroes => self.segments(mem, disk),
            RequestType::Unsupported(t) => {
                tracing::debug!(disk = %disk.id_str(), request_type = t, "unsupported virtio-blk request");
                disk.metrics.invalid();
                (VIRTIO_BLK_S_UNSUPP, 0)
            }
        };
        complete(mem, self.status, status, data_written)
    }

    /// Whether this request can go through a backend's [`AsyncBlockIo`].
    pub fn is_async_kind(&self) -> bool {
        matches!(
            self.kind,
            RequestType::In | RequestType::Out | RequestType::Flush
        )
    }

    /// Starts a read, write or flush on `io`; `done` gets the completion once the backend
    /// has finished (on the backend's thread). A request refused before it reaches the
    /// backend is completed at once and returned instead.
    pub fn start_async(
        self,
        mem: &GuestRam,
        disk: &DiskContext,
        io: &dyn AsyncBlockIo,
        done: impl FnOnce(Completion) + Send + 'static,
    ) -> Option<Completion> {
        let started = Instant::now();
        let (mem2, disk2) = (mem.clone(), disk.clone());
        match self.kind {
            RequestType::In => {
                let len = match self.check_rw(disk.capacity, disk.block_size) {
                    Ok(len) => len,
                    Err(e) => {
                        let (st, n) = invalid(disk, &e);
                        return Some(complete(mem, self.status, st, n));
                    }
                };
                io.read(
                    self.sector * SECTOR_SIZE,
                    len as usize,
                    Box::new(move |r| {
                        let (st, n) = match r {
                            Ok(data) => {
                                disk2.metrics.read(len, started.elapsed());
                                self.scatter(&mem2, &disk2, &data)
                            }
                            Err(e) => backend_error(&disk2, &e),
                        };
                        done(complete(&mem2, self.status, st, n));
                    }),
                );
                None
            }
            RequestType::Out => {
                let mut data = Vec::new();
                let len = match self.gather(mem, disk, &mut data) {
                    Ok(len) => len,
                    Err(c) => return Some(complete(mem, self.status, c.0, c.1)),
                };
                io.write(
                    self.sector * SECTOR_SIZE,
                    data,
                    Box::new(move |r| {
                        let st = match r {
                            Ok(()) => {
                                disk2.metrics.write(len, started.elapsed());
                                VIRTIO_BLK_S_OK
                            }
                            Err(e) => backend_error(&disk2, &e).0,
                        };
                        done(complete(&mem2, self.status, st, 0));
                    }),
                );
                None
            }
            RequestType::Flush => {
                disk.metrics.flush();
                io.flush(Box::new(move |r| {
                    let st = match r {
                        Ok(()) => VIRTIO_BLK_S_OK,
                        Err(e) => backend_error(&disk2, &e).0,
                    };
                    done(complete(&mem2, self.status, st, 0));
                }));
                None
            }
            _ => Some(self.execute(mem, disk, &mut Vec::new())),
        }
    }

    /// Copies what was read into the request's buffers.
    fn scatter(&self, mem: &GuestRam, disk: &DiskContext, data: &[u8]) -> (u8, u32) {
        let mut at = 0usize;
        for (addr, l) in &self.data {
            let l = *l as usize;
            if mem.write_slice(&data[at..at + l], *addr).is_err() {
                return invalid(disk, &ParseError::GuestMemory { addr: addr.0 });
            }
            at += l;
        }
        (VIRTIO_BLK_S_OK, at as u32)
    }

    /// Checks a write and copies its data out of guest memory into `buf`.
    fn gather(
        &self,
        mem: &GuestRam,
        disk: &DiskContext,
        buf: &mut Vec<u8>,
    ) -> Result<u64, (u8, u32)> {
        if disk.read_only {
            disk.metrics.error();
            return Err((VIRTIO_BLK_S_IOERR, 0));
        }
        let len = self
            .check_rw(disk.capacity, disk.block_size)
            .map_err(|e| invalid(disk, &e))?;
        buf.resize(len as usize, 0);
        let mut at = 0usize;
        for (addr, l) in &self.data {
            let l = *l as usize;
            if mem.read_slice(&mut buf[at..at + l], *addr).is_err() {
                return Err(invalid(disk, &ParseError::GuestMemory { addr: addr.0 }));
            }
            at += l;
        }
        Ok(len)
    }

    fn read(&self, mem: &GuestRam, disk: &DiskContext, bounce: &mut Vec<u8>) -> (u8, u32) {
        let len = match self.check_rw(disk.capacity, disk.block_size) {
            Ok(len) => len,
            Err(e) => return invalid(disk, &e),
        };
        bounce.resize(len as usize, 0);
        let start = Instant::now();
        if let Err(e) = disk.backend.read_at(self.sector * SECTOR_SIZE, bounce) {
            return backend_error(disk, &e);
        }
        disk.metrics.read(len, start.elapsed());
        self.scatter(mem, disk, bounce)
    }

    fn write(&self, mem: &GuestRam, disk: &DiskContext, bounce: &mut Vec<u8>) -> (u8, u32) {
        let len = match self.gather(mem, disk, bounce) {
            Ok(len) => len,
            Err(c) => return c,
        };
        let start = Instant::now();
        if let Err(e) = disk.backend.write_at(self.sector * SECTOR_SIZE, bounce) {
            return backend_error(disk, &e);
        }
        disk.metrics.write(len, start.elapsed());
        (VIRTIO_BLK_S_OK, 0)
    }

    fn get_id(&self, mem: &GuestRam, disk: &DiskContext) -> (u8, u32) {
        let Some((addr, len)) = self.data.first() else {
            return invalid(disk, &ParseError::Unaligned { len: 0 });
        };
        let n = (*len as usize).min(VIRTIO_BLK_ID_BYTES);
        match mem.write_slice(&disk.id[..n], *addr) {
            Ok(()) => (VIRTIO_BLK_S_OK, n as u32),
            Err(_) => invalid(disk, &ParseError::GuestMemory { addr: addr.0 }),
        }
    }

    fn segments(&self, mem: &GuestRam, disk: &DiskContext) -> (u8, u32) {
        let discard = self.kind == RequestType::Discard;
        if disk.read_only {
            disk.metrics.error();
            return (VIRTIO_BLK_S_IOERR, 0);
        }
        if discard && !disk.backend.supports_discard() {
            disk.metrics.invalid();
            return (VIRTIO_BLK_S_UNSUPP, 0);
        }
        let len = self.data_len();
        let count = len / u64::from(SEGMENT_BYTES);
        if !len.is_multiple_of(u64::from(SEGMENT_BYTES))
            || count == 0
            || count > u64::from(MAX_SEGMENTS)
        {
            return invalid(
                disk,
                &ParseError::BadSegments {
                    len,
                    max: MAX_SEGMENTS,
                },
            );
        }
        let mut raw = vec![0u8; len as usize];
        let mut at = 0usize;
        for (addr, l) in &self.data {
            if mem
                .read_slice(&mut raw[at..at + *l as usize], *addr)
                .is_err()
            {
                return invalid(disk, &ParseError::GuestMemory { addr: addr.0 });
            }
            at += *l as usize;
        }
        for seg in raw.chunks_exact(SEGMENT_BYTES as usize) {
            let sector = u64::from_le_bytes(seg[0..8].try_into().unwrap());
            let sectors = u64::from(u32::from_le_bytes(seg[8..12].try_into().unwrap()));
            let flags = u32::from_le_bytes(seg[12..16].try_into().unwrap());
            // Discard defines no flags; write-zeroes only "unmap".
            let allowed = if discard { 0 } else { WRITE_ZEROES_FLAG_UNMAP };
            if flags & !allowed != 0 {
                disk.metrics.invalid();
                return (VIRTIO_BLK_S_UNSUPP, 0);
            }
            if let Err(e) = check_range(sector, sectors, disk.capacity).and_then(|()| {
                check_aligned(sector * SECTOR_SIZE, sectors * SECTOR_SIZE, disk.block_size)
            }) {
                return invalid(disk, &e);
            }
            let (off, bytes) = (sector * SECTOR_SIZE, sectors * SECTOR_SIZE);
            let res = if discard {
                disk.metrics.discard();
                disk.backend.discard(off, bytes)
            } else {
                disk.metrics.write_zeroes();
                disk.backend.write_zeroes(off, bytes)
            };
            if let Err(e) = res {
                return backend_error(disk, &e);
            }
        }
        (VIRTIO_BLK_S_OK, 0)
    }
}

fn check_range(sector: u64, count: u64, capacity: u64) -> Result<(), ParseError> {
    match sector.checked_add(count) {
        Some(end) if end <= capacity => Ok(()),
        _ => Err(ParseError::OutOfRange {
            sector,
            count,
            capacity,
        }),
    }
}

fn check_aligned(offset: u64, len: u64, block_size: u32) -> Result<(), ParseError> {
    let bs = u64::from(block_size);
    if offset.is_multiple_of(bs) && len.is_multiple_of(bs) {
        Ok(())
    } else {
        Err(ParseError::Misaligned {
            offset,
            len,
            block_size,
        })
    }
}

fn invalid(disk: &DiskContext, e: &ParseError) -> (u8, u32) {
    disk.metrics.invalid();
    tracing::debug!(disk = %disk.id_str(), error = %e, "invalid virtio-blk request");
    (VIRTIO_BLK_S_IOERR, 0)
}

fn backend_error(disk: &DiskContext, e: &super::backend::BackendError) -> (u8, u32) {
    disk.metrics.error();
    tracing::warn!(disk = %disk.id_str(), error = %e, "disk I/O failed");
    (VIRTIO_BLK_S_IOERR, 0)
}

/// Writes the status byte; the used length counts it when it could be written.
pub fn complete(
    mem: &GuestRam,
    status_addr: GuestAddress,
    status: u8,
    data_written: u32,
) -> Completion {
    match mem.write_obj(status, status_addr) {
        Ok(()) => Completion {
            used_len: data_written + 1,
            status: Some(status),
        },
        Err(_) => Completion {
            used_len: data_written,
            status: None,
        },
    }
}

/// What a request needs to know about its disk.
#[derive(Clone)]
pub struct DiskContext {
    pub backend: std::sync::Arc<dyn BlockBackend>,
    pub read_only: bool,
    /// Capacity in sectors.
    pub capacity: u64,
    /// The backend's block size; requests must be aligned to it.
    pub block_size: u32,
    /// The id GET_ID returns: the disk's name, zero-padded.
    pub id: [u8; VIRTIO_BLK_ID_BYTES],
    pub metrics: std::sync::Arc<BlockMetrics>,
}

impl DiskContext {
    pub fn id_str(&self) -> String {
        String::from_utf8_lossy(&self.id)
            .trim_end_matches('\0')
            .to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::block::backend::FileBackend;
    use std::sync::Arc;
    use vm_memory::GuestMemoryMmap;

    const HDR: u64 = 0x1000;
    const DATA: u64 = 0x2000;
    const STATUS: u64 = 0x9000;

    fn mem() -> GuestRam {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn disk(read_only: bool) -> (DiskContext, tempfile::NamedTempFile) {
        let img = tempfile::NamedTempFile::new().unwrap();
        img.as_file().set_len(64 * 512).unwrap();
        let backend = FileBackend::open(img.path(), read_only).unwrap();
        let mut id = [0u8; VIRTIO_BLK_ID_BYTES];
        id[..3].copy_from_slice(b"vda");
        (
            DiskContext {
                backend: Arc::new(backend),
                read_only,
                capacity: 64,
                block_size: 512,
                id,
                metrics: Arc::new(BlockMetrics::default()),
            },
            img,
        )
    }

    fn header(m: &GuestRam, kind: u32, sector: u64) {
        m.write_obj(kind, GuestAddress(HDR)).unwrap();
        m.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
        m.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
    }

    fn chain(data: &[(u64, u32, bool)]) -> Vec<Desc> {
        let mut v = vec![Desc {
            addr: GuestAddress(HDR),
            len: 16,
            writable: false,
        }];
        v.extend(data.iter().map(|&(a, l, w)| Desc {
            addr: GuestAddress(a),
            len: l,
            writable: w,
        }));
        v.push(Desc {
            addr: GuestAddress(STATUS),
            len: 1,
            writable: true,
        });
        v
    }

    fn run(m: &GuestRam, d: &DiskContext, descs: &[Desc]) -> Completion {
        let req = Request::parse(descs, m).expect("parses");
        req.execute(m, d, &mut Vec::new())
    }

    #[test]
    fn write_then_read_across_two_data_descriptors() {
        let (m, (d, _img)) = (mem(), disk(false));
        m.write_slice(&[0x5a; 1024], GuestAddress(DATA)).unwrap();
        header(&m, VIRTIO_BLK_T_OUT, 3);
        let c = run(
            &m,
            &d,
            &chain(&[(DATA, 512, false), (DATA + 512, 512, false)]),
        );
        assert_eq!(
            c,
            Completion {
                used_len: 1,
                status: Some(VIRTIO_BLK_S_OK)
            }
        );
        m.write_slice(&[0; 1024], GuestAddress(DATA)).unwrap();
        header(&m, VIRTIO_BLK_T_IN, 3);
        let c = run(&m, &d, &chain(&[(DATA, 1024, true)]));
        assert_eq!(
            c,
            Completion {
                used_len: 1025,
                status: Some(VIRTIO_BLK_S_OK)
            }
        );
        let mut back = [0u8; 1024];
        m.read_slice(&mut back, GuestAddress(DATA)).unwrap();
        assert!(back.iter().all(|&b| b == 0x5a));
        let s = d.metrics.snapshot();
        assert_eq!(
            (s.read_ops, s.write_ops, s.read_bytes, s.write_bytes),
            (1, 1, 1024, 1024)
        );
    }

    #[test]
    fn out_of_range_unaligned_and_read_only_requests_fail_with_ioerr() {
        let (m, (d, _img)) = (mem(), disk(false));
        header(&m, VIRTIO_BLK_T_IN, 64);
        assert_eq!(
            run(&m, &d, &chain(&[(DATA, 512, true)])).status,
            Some(VIRTIO_BLK_S_IOERR)
        );
        header(&m, VIRTIO_BLK_T_IN, u64::MAX);
        assert_eq!(
            run(&m, &d, &chain(&[(DATA, 512, true)])).status,
            Some(VIRTIO_BLK_S_IOERR)
        );
        header(&m, VIRTIO_BLK_T_OUT, 0);
        assert_eq!(
            run(&m, &d, &chain(&[(DATA, 100, false)])).status,
            Some(VIRTIO_BLK_S_IOERR)
        );
        assert_eq!(d.metrics.snapshot().invalid, 3);

        let (ro, _img2) = disk(true);
        header(&m, VIRTIO_BLK_T_OUT, 0);
        assert_eq!(
            run(&m, &ro, &chain(&[(DATA, 512, false)])).status,
            Some(VIRTIO_BLK_S_IOERR)
        );
        header(&m, VIRTIO_BLK_T_IN, 0);
        assert_eq!(
            run(&m, &ro, &chain(&[(DATA, 512, true)])).status,
            Some(VIRTIO_BLK_S_OK)
        );
        header(&m, VIRTIO_BLK_T_FLUSH, 0);
        assert_eq!(run(&m, &ro, &chain(&[])).status, Some(VIRTIO_BLK_S_OK));
    }

    #[test]
    fn malformed_chains_are_refused_with_the_status_when_known() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_IN, 0);
        assert_eq!(Request::parse(&[], &m).unwrap_err().0, ParseError::Empty);
        // Read request whose data buffer is device-readable: status still reachable.
        let (e, status) = Request::parse(&chain(&[(DATA, 512, false)]), &m).unwrap_err();
        assert!(matches!(e, ParseError::Direction { index: 0, .. }));
        assert_eq!(status, Some(GuestAddress(STATUS)));
        // No writable status at the end.
        let mut c = chain(&[(DATA, 512, true)]);
        c.last_mut().unwrap().writable = false;
        assert_eq!(
            Request::parse(&c, &m).unwrap_err(),
            (ParseError::BadStatus, None)
        );
        // A header that the device would have to write.
        let mut c = chain(&[]);
        c[0].writable = true;
        assert!(matches!(
            Request::parse(&c, &m).unwrap_err().0,
            ParseError::BadHeader { .. }
        ));
        // A header outside guest memory.
        let mut c = chain(&[]);
        c[0].addr = GuestAddress(0x1000_0000);
        assert!(matches!(
            Request::parse(&c, &m).unwrap_err().0,
            ParseError::GuestMemory { .. }
        ));
    }

    /// An asynchronous face that completes each operation on a thread of its own.
    struct ThreadIo(Arc<FileBackend>);

    impl AsyncBlockIo for ThreadIo {
        fn read(&self, offset: u64, len: usize, done: super::super::backend::Done<Vec<u8>>) {
            let b = self.0.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; len];
                done(b.read_at(offset, &mut buf).map(|()| buf));
            });
        }
        fn write(&self, offset: u64, data: Vec<u8>, done: super::super::backend::Done<()>) {
            let b = self.0.clone();
            std::thread::spawn(move || done(b.write_at(offset, &data)));
        }
        fn flush(&self, done: super::super::backend::Done<()>) {
            let b = self.0.clone();
            std::thread::spawn(move || done(b.flush()));
        }
    }

    #[test]
    fn asynchronous_requests_complete_from_the_backend_thread() {
        let (m, (d, img)) = (mem(), disk(false));
        let io = ThreadIo(Arc::new(FileBackend::open(img.path(), false).unwrap()));
        let (tx, rx) = std::sync::mpsc::channel();
        m.write_slice(&[0x77; 1024], GuestAddress(DATA)).unwrap();
        header(&m, VIRTIO_BLK_T_OUT, 2);
        let req = Request::parse(&chain(&[(DATA, 1024, false)]), &m).unwrap();
        let t = tx.clone();
        assert!(
            req.start_async(&m, &d, &io, move |c| t.send(c).unwrap())
                .is_none()
        );
        let c = rx.recv_timeout(std::time::Duration::from_secs(5)).unwrap();
        assert_eq!(
            c,
            Completion {
                used_len: 1,
                status: Some(VIRTIO_BLK_S_OK)
            }
        );
        m.write_slice(&[0; 1024], GuestAddress(DATA)).unwrap();
        header(&m, VIRTIO_BLK_T_IN, 2);
        let req =
            Request::parse(&chain(&[(DATA, 512, true), (DATA + 512, 512, true)]), &m).unwrap();
        let t = tx.clone();
        assert!(
            req.start_async(&m, &d, &io, move |c| t.send(c).unwrap())
                .is_none()
        );
        let c = rx.recv_timeout(std::time::Duration::from_secs(5)).unwrap();
        assert_eq!(
            c,
            Completion {
                used_len: 1025,
                status: Some(VIRTIO_BLK_S_OK)
            }
        );
        let mut back = [0u8; 1024];
        m.read_slice(&mut back, GuestAddress(DATA)).unwrap();
        assert!(back.iter().all(|&b| b == 0x77));
        // Refused before the backend: completed at once, never by the backend.
        header(&m, VIRTIO_BLK_T_IN, 64);
        let req = Request::parse(&chain(&[(DATA, 512, true)]), &m).unwrap();
        let now = req.start_async(&m, &d, &io, move |c| tx.send(c).unwrap());
        assert_eq!(now.unwrap().status, Some(VIRTIO_BLK_S_IOERR));
        assert!(
            rx.recv_timeout(std::time::Duration::from_millis(100))
                .is_err()
        );
        let s = d.metrics.snapshot();
        assert_eq!((s.read_ops, s.write_ops, s.invalid), (1, 1, 1));
    }

    #[test]
    fn requests_not_aligned_to_a_4k_disk_are_refused() {
        let (m, (mut d, _img)) = (mem(), disk(false));
        d.block_size = 4096;
        header(&m, VIRTIO_BLK_T_IN, 1);
        assert_eq!(
            run(&m, &d, &chain(&[(DATA, 4096, true)])).status,
            Some(VIRTIO_BLK_S_IOERR)
        );
        header(&m, VIRTIO_BLK_T_IN, 8);
        assert_eq!(
            run(&m, &d, &chain(&[(DATA, 512, true)])).status,
            Some(VIRTIO_BLK_S_IOERR)
        );
        header(&m, VIRTIO_BLK_T_IN, 8);
        assert_eq!(
            run(&m, &d, &chain(&[(DATA, 4096, true)])).status,
            Some(VIRTIO_BLK_S_OK)
        );
    }

    #[test]
    fn unknown_types_are_unsupported_and_get_id_returns_the_name() {
        let (m, (d, _img)) = (mem(), disk(false));
        header(&m, 99, 0);
        assert_eq!(run(&m, &d, &chain(&[])).status, Some(VIRTIO_BLK_S_UNSUPP));
        header(&m, VIRTIO_BLK_T_GET_ID, 0);
        let c = run(&m, &d, &chain(&[(DATA, 20, true)]));
        assert_eq!(c.status, Some(VIRTIO_BLK_S_OK));
        let mut id = [0u8; 20];
        m.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id[..4], b"vda\0");
    }

    #[test]
    fn discard_and_write_zeroes_check_segments_and_flags() {
        let (m, (d, img)) = (mem(), disk(false));
        std::fs::write(img.path(), vec![0xffu8; 64 * 512]).unwrap();
        let seg = |sector: u64, n: u32, flags: u32| {
            m.write_obj(sector, GuestAddress(DATA)).unwrap();
            m.write_obj(n, GuestAddress(DATA + 8)).unwrap();
            m.write_obj(flags, GuestAddress(DATA + 12)).unwrap();
        };
        seg(8, 8, 1);
        header(&m, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        assert_eq!(
            run(&m, &d, &chain(&[(DATA, 16, false)])).status,
            Some(VIRTIO_BLK_S_OK)
        );
        let file = std::fs::read(img.path()).unwrap();
        assert!(file[8 * 512..16 * 512].iter().all(|&b| b == 0));
        assert!(file[..8 * 512].iter().all(|&b| b == 0xff));
        seg(0, 8, 1);
        header(&m, VIRTIO_BLK_T_DISCARD, 0);
        assert_eq!(
            run(&m, &d, &chain(&[(DATA, 16, false)])).status,
            Some(VIRTIO_BLK_S_UNSUPP)
        );
        seg(60, 8, 0);
        assert_eq!(
            run(&m, &d, &chain(&[(DATA, 16, false)])).status,
            Some(VIRTIO_BLK_S_IOERR)
        );
        header(&m, VIRTIO_BLK_T_DISCARD, 0);
        assert_eq!(
            run(&m, &d, &chain(&[(DATA, 8, false)])).status,
            Some(VIRTIO_BLK_S_IOERR)
        );
        seg(0, 8, 0);
        assert_eq!(
            run(&m, &d, &chain(&[(DATA, 16, false)])).status,
            Some(VIRTIO_BLK_S_OK)
        );
        let s = d.metrics.snapshot();
        assert_eq!((s.discard_ops, s.write_zeroes_ops), (1, 1));
    }
}
