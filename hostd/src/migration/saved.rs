//! A VM saved into a volume: suspend, quick migration (suspend here, restore on another
//! host) and checkpoints (save and run on). The volume holds the frames a live migration
//! sends ([`super::wire`]): a Hello (empty token) with the VM's shape and guest CPUID,
//! one full pass of Pages and Zero frames taken with the vCPUs paused, and the State.
//! Restoring reads them back through the same [`Apply`] a migration's destination uses,
//! after the same checks, into a VM built the same way.
//!
//! # Format (version 1, little-endian)
//!
//! | offset | bytes | field |
//! |---|---|---|
//! | 0 | 8 | magic `HSAVEDVM` |
//! | 8 | 2 | version |
//! | 10 | 6 | reserved, zero |
//! | 16 | 8 | stream length in bytes |
//! | 24 | 8 | saved at, ms since the Unix epoch |
//! | 32 | 32 | SHA-256 of the stream |
//! | 64 | 4032 | reserved, zero |
//! | 4096 | length | the stream |
//!
//! A save zeroes the header block first, writes the stream, flushes, then writes the
//! header and flushes again: a save that stops half way leaves no header, and a header
//! only ever stands over a whole stream. Restore refuses a volume without the magic, of
//! another version, whose stream does not fit it, does not decode, ends before the State
//! or goes on after it, or whose digest differs, before the VM runs.

use std::sync::atomic::AtomicBool;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};

use super::conn::FrameSink;
use super::receive::{Applied, Apply, local_cpuid};
use super::wire::{self, Frame, Hello, WireError};
use super::{MigrationError, cpu};
use crate::console::ConsoleOut;
use crate::devices::virtio::block::BlockBackend;
use crate::devices::virtio::block::backend::BackendError;
use crate::vmm::{Vm, VmError, VmSpec, new_guest_ram};

pub const MAGIC: [u8; 8] = *b"HSAVEDVM";
/// The version this build writes.
pub const VERSION: u16 = 1;
/// The oldest version this build reads.
pub const MIN_VERSION: u16 = 1;
/// The header block; the stream starts after it.
pub const HEADER_LEN: usize = 4096;
/// The stream is written and read in pieces of this size.
const CHUNK: usize = 1 << 20;
/// Writes in flight at once (each on a thread of its own: the iSCSI session pipelines
/// them).
const WRITERS: usize = 4;

/// The smallest state volume for a VM of `memory_bytes`: the rule lives in `proto`, so
/// `poold` sizes the volumes it makes by the same one (the test below ties its figures to
/// this stream's).
pub use proto::saved_state::volume_bytes_for;

#[derive(Debug, thiserror::Error)]
pub enum SavedError {
    #[error(
        "the state volume holds no saved VM (no header: empty, a save that never finished, \
         or not a state volume)"
    )]
    NoHeader,
    #[error("saved state version {version} is not in {MIN_VERSION}..={VERSION}")]
    Version { version: u16 },
    #[error("the saved state's header is malformed: {what}")]
    Header { what: &'static str },
    #[error("the saved stream of {len} bytes does not fit the {size}-byte state volume")]
    TooLong { len: u64, size: u64 },
    #[error(
        "the state volume has {size} bytes; a VM of {memory} bytes needs one of at least {need}"
    )]
    TooSmall { size: u64, memory: u64, need: u64 },
    #[error("the saved stream's SHA-256 differs from its header's: the volume is torn or changed")]
    Digest,
    #[error("the saved stream ends before the VM's state")]
    Truncated,
    #[error("{extra} bytes follow the VM's state in the saved stream")]
    Trailing { extra: u64 },
    #[error("the saved stream does not start with the VM's description (a Hello)")]
    NoHello,
    #[error("the state volume holds VM {saved}, not {want}")]
    OtherVm { saved: String, want: String },
    #[error(
        "the VM has {memory} bytes and {vcpus} vCPUs here, {saved_memory} and {saved_vcpus} \
         in the saved state"
    )]
    Shape {
        memory: u64,
        vcpus: u32,
        saved_memory: u64,
        saved_vcpus: u32,
    },
    #[error("this host's CPU lacks what the saved guest uses: {missing}")]
    Cpu { missing: String },
    #[error("state volume: {what}")]
    Io {
        what: &'static str,
        #[source]
        source: BackendError,
    },
    #[error("the saved stream")]
    Wire(#[from] WireError),
    #[error("the saved stream")]
    Frames(#[from] MigrationError),
    #[error(transparent)]
    Vm(#[from] VmError),
}

/// The header block, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub version: u16,
    pub stream_len: u64,
    pub saved_at_unix_ms: u64,
    pub sha256: [u8; 32],
}

impl Header {
    pub fn write_to(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[..8].copy_from_slice(&MAGIC);
        b[8..10].copy_from_slice(&self.version.to_le_bytes());
        b[16..24].copy_from_slice(&self.stream_len.to_le_bytes());
        b[24..32].copy_from_slice(&self.saved_at_unix_ms.to_le_bytes());
        b[32..64].copy_from_slice(&self.sha256);
        b
    }

    /// Parses a header block read from a volume of `size` bytes.
    pub fn read_from(b: &[u8], size: u64) -> Result<Header, SavedError> {
        let b = b.get(..HEADER_LEN).ok_or(SavedError::Header {
            what: "shorter than a header block",
        })?;
        if b[..8] != MAGIC {
            return Err(SavedError::NoHeader);
        }
        let version = u16::from_le_bytes([b[8], b[9]]);
        if !(MIN_VERSION..=VERSION).contains(&version) {
            return Err(SavedError::Version { version });
        }
        if b[10..16].iter().chain(&b[64..]).any(|&x| x != 0) {
            return Err(SavedError::Header {
                what: "reserved bytes are not zero",
            });
        }
        let u64_at = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"));
        let stream_len = u64_at(16);
        if stream_len > size.saturating_sub(HEADER_LEN as u64) {
            return Err(SavedError::TooLong {
                len: stream_len,
                size,
            });
        }
        Ok(Header {
            version,
            stream_len,
            saved_at_unix_ms: u64_at(24),
            sha256: b[32..64].try_into().expect("32 bytes"),
        })
    }
}

fn io(what: &'static str) -> impl FnOnce(BackendError) -> SavedError {
    move |source| SavedError::Io { what, source }
}

/// Readies `vol` for a save of a VM of `memory_bytes`, before the VM is paused: checks
/// its size and zeroes its header, so that a save that does not finish leaves none.
pub fn prepare(vol: &dyn BlockBackend, memory_bytes: u64) -> Result<(), SavedError> {
    let need = volume_bytes_for(memory_bytes);
    if vol.size() < need {
        return Err(SavedError::TooSmall {
            size: vol.size(),
            memory: memory_bytes,
            need,
        });
    }
    vol.write_at(0, &[0u8; HEADER_LEN])
        .map_err(io("clearing the header"))?;
    vol.flush().map_err(io("flushing"))
}

/// Writes paused `vm`'s memory and state into `vol` (readied by [`prepare`]) and makes
/// it durable; the VM stays paused. Returns the stream's length.
pub fn save(vm: &Vm, vm_id: &str, vol: Arc<dyn BlockBackend>) -> Result<u64, SavedError> {
    let snapshot = vm.save_state()?;
    let mut sink = VolumeSink::new(vol.clone());
    sink.send(&Frame::Hello(Hello {
        // A full pass has no deltas; any host may restore it.
        version: wire::FALLBACK_VERSION,
        token: String::new(),
        vm_id: vm_id.to_owned(),
        memory_bytes: vm.memory_bytes(),
        vcpus: vm.vcpu_count(),
        cpuid: vm.guest_cpuid().to_vec(),
    }))?;
    let never = AtomicBool::new(false);
    let sink = super::send::write_paused(vm, sink, &snapshot, &never)?;
    let (stream_len, sha256) = sink.finish()?;
    let header = Header {
        version: VERSION,
        stream_len,
        saved_at_unix_ms: proto::unix_ms(),
        sha256,
    };
    vol.write_at(0, &header.write_to())
        .map_err(io("writing the header"))?;
    vol.flush().map_err(io("flushing the header"))?;
    Ok(stream_len)
}

/// Reads the header of `vol`.
pub fn read_header(vol: &dyn BlockBackend) -> Result<Header, SavedError> {
    if vol.size() < HEADER_LEN as u64 {
        return Err(SavedError::NoHeader);
    }
    let mut b = vec![0u8; HEADER_LEN];
    vol.read_at(0, &mut b).map_err(io("reading the header"))?;
    Header::read_from(&b, vol.size())
}

/// Builds VM `vm_id` with `spec` from the state saved in `vol`, ready to start (not
/// running): the header, the Hello (the VM, its shape, this host's CPU), every frame into
/// fresh memory, the digest, then the state applied. Any failure drops what was built.
pub fn restore(
    vol: &dyn BlockBackend,
    vm_id: &str,
    spec: &VmSpec,
    console: Arc<dyn ConsoleOut>,
) -> Result<Vm, SavedError> {
    let header = read_header(vol)?;
    let mut stream = StreamReader::new(vol, header.stream_len);
    let Frame::Hello(hello) = stream.next()? else {
        return Err(SavedError::NoHello);
    };
    check_hello(&hello, vm_id, spec)?;
    let shell = new_guest_ram(spec.memory_bytes).and_then(|m| Vm::prepare(spec, m))?;
    let memory = shell.memory().clone();
    let mut apply = Apply::new(&memory, hello.version);
    let snapshot = loop {
        match apply.frame(stream.next()?)? {
            Applied::Memory | Applied::Sync => {}
            Applied::State(s) => break s,
        }
    };
    stream.finish(&header.sha256)?;
    Ok(Vm::restore_into(spec, console, &snapshot, shell)?)
}

fn check_hello(h: &Hello, vm_id: &str, spec: &VmSpec) -> Result<(), SavedError> {
    if !(wire::MIN_VERSION..=wire::VERSION).contains(&h.version) {
        return Err(WireError::Malformed {
            kind: "Hello",
            what: format!("stream version {}", h.version),
        }
        .into());
    }
    if h.vm_id != vm_id {
        return Err(SavedError::OtherVm {
            saved: h.vm_id.clone(),
            want: vm_id.to_owned(),
        });
    }
    if h.memory_bytes != spec.memory_bytes || h.vcpus != spec.vcpus {
        return Err(SavedError::Shape {
            memory: spec.memory_bytes,
            vcpus: spec.vcpus,
            saved_memory: h.memory_bytes,
            saved_vcpus: h.vcpus,
        });
    }
    let missing = cpu::missing(&h.cpuid, &local_cpuid(spec)?);
    if !missing.is_empty() {
        return Err(SavedError::Cpu {
            missing: missing.join(", "),
        });
    }
    Ok(())
}

/// The stream into the volume after the header: buffered into [`CHUNK`]s written by a
/// few threads at once, hashed as it goes.
struct VolumeSink {
    buf: Vec<u8>,
    /// Stream offset of `buf[0]`.
    at: u64,
    room: u64,
    sha: Sha256,
    tx: Option<SyncSender<(u64, Vec<u8>)>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    failed: Arc<Mutex<Option<BackendError>>>,
}

impl VolumeSink {
    fn new(vol: Arc<dyn BlockBackend>) -> Self {
        let (tx, rx) = sync_channel::<(u64, Vec<u8>)>(WRITERS);
        let rx = Arc::new(Mutex::new(rx));
        let failed = Arc::new(Mutex::new(None));
        let threads = (0..WRITERS)
            .filter_map(|i| {
                let (vol, rx, failed) = (vol.clone(), rx.clone(), failed.clone());
                std::thread::Builder::new()
                    .name(format!("save-{i}"))
                    .spawn(move || write_chunks(&*vol, &rx, &failed))
                    .ok()
            })
            .collect();
        Self {
            buf: Vec::with_capacity(2 * CHUNK),
            at: 0,
            room: vol.size().saturating_sub(HEADER_LEN as u64),
            sha: Sha256::new(),
            tx: Some(tx),
            threads,
            failed,
        }
    }

    fn failure(&self) -> Option<BackendError> {
        self.failed.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    fn push(&mut self, bytes: &[u8]) -> Result<(), MigrationError> {
        let len = self.at + (self.buf.len() + bytes.len()) as u64;
        if len > self.room {
            return Err(MigrationError::Io {
                what: "saving: the state volume is full",
                source: std::io::Error::from(std::io::ErrorKind::StorageFull),
            });
        }
        self.sha.update(bytes);
        self.buf.extend_from_slice(bytes);
        while self.buf.len() >= CHUNK {
            let rest = self.buf.split_off(CHUNK);
            let chunk = std::mem::replace(&mut self.buf, rest);
            self.dispatch(chunk)?;
        }
        Ok(())
    }

    fn dispatch(&mut self, chunk: Vec<u8>) -> Result<(), MigrationError> {
        let at = HEADER_LEN as u64 + self.at;
        self.at += chunk.len() as u64;
        let sent = self
            .tx
            .as_ref()
            .is_some_and(|tx| tx.send((at, chunk)).is_ok());
        match self.failure() {
            Some(e) => Err(written(e)),
            None if !sent => Err(MigrationError::Io {
                what: "saving: the writers stopped",
                source: std::io::Error::other("no writer thread"),
            }),
            None => Ok(()),
        }
    }

    /// Writes the rest (padded to a whole block), waits for every write, and answers the
    /// stream's length and digest. The caller flushes.
    fn finish(mut self) -> Result<(u64, [u8; 32]), SavedError> {
        let len = self.at + self.buf.len() as u64;
        let mut last = std::mem::take(&mut self.buf);
        if !last.is_empty() {
            last.resize(last.len().next_multiple_of(HEADER_LEN), 0);
            self.dispatch(last)?;
        }
        self.tx = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        if let Some(e) = self.failure() {
            return Err(SavedError::Io {
                what: "writing the stream",
                source: e,
            });
        }
        let sha = std::mem::take(&mut self.sha).finalize();
        Ok((len, sha.into()))
    }
}

fn written(e: BackendError) -> MigrationError {
    MigrationError::Io {
        what: "saving into the state volume",
        source: std::io::Error::other(e),
    }
}

/// A writer thread: chunks until the channel closes or one write fails.
fn write_chunks(
    vol: &dyn BlockBackend,
    rx: &Mutex<Receiver<(u64, Vec<u8>)>>,
    failed: &Mutex<Option<BackendError>>,
) {
    loop {
        let next = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
        let Ok((at, chunk)) = next else { return };
        if let Err(e) = vol.write_at(at, &chunk) {
            failed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get_or_insert(e);
            return;
        }
    }
}

impl Drop for VolumeSink {
    fn drop(&mut self) {
        self.tx = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl FrameSink for VolumeSink {
    fn send(&mut self, frame: &Frame) -> Result<(), MigrationError> {
        let mut out = Vec::new();
        wire::encode(frame, &mut out);
        self.push(&out)
    }

    fn send_pages(&mut self, gpa: u64, data: &[u8]) -> Result<(), MigrationError> {
        self.push(&wire::pages_header(gpa, data.len()))?;
        self.push(data)
    }

    fn sent(&self) -> u64 {
        self.at + self.buf.len() as u64
    }
}

/// The stream read back from the volume, frame by frame, hashed as it goes.
struct StreamReader<'a> {
    vol: &'a dyn BlockBackend,
    /// Stream bytes not yet read from the volume.
    left: u64,
    /// Stream offset of the next read.
    at: u64,
    buf: Vec<u8>,
    pos: usize,
    sha: Sha256,
}

impl<'a> StreamReader<'a> {
    fn new(vol: &'a dyn BlockBackend, len: u64) -> Self {
        Self {
            vol,
            left: len,
            at: 0,
            buf: Vec::new(),
            pos: 0,
            sha: Sha256::new(),
        }
    }

    fn next(&mut self) -> Result<Frame, SavedError> {
        loop {
            if let Some((frame, n)) = wire::decode(&self.buf[self.pos..])? {
                self.pos += n;
                return Ok(frame);
            }
            if self.left == 0 {
                return Err(SavedError::Truncated);
            }
            self.buf.drain(..self.pos);
            self.pos = 0;
            let want = (CHUNK as u64).min(self.left) as usize;
            let mut chunk = vec![0u8; want.next_multiple_of(HEADER_LEN)];
            self.vol
                .read_at(HEADER_LEN as u64 + self.at, &mut chunk)
                .map_err(io("reading the stream"))?;
            chunk.truncate(want);
            self.sha.update(&chunk);
            self.buf.extend_from_slice(&chunk);
            self.at += want as u64;
            self.left -= want as u64;
        }
    }

    /// After the State: nothing may follow it, and the digest must be the header's.
    fn finish(self, sha256: &[u8; 32]) -> Result<(), SavedError> {
        let extra = (self.buf.len() - self.pos) as u64 + self.left;
        if extra > 0 {
            return Err(SavedError::Trailing { extra });
        }
        if self.sha.finalize().as_slice() != sha256 {
            return Err(SavedError::Digest);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::block::FileBackend;

    fn header() -> Header {
        Header {
            version: VERSION,
            stream_len: 12345,
            saved_at_unix_ms: 1_800_000_000_000,
            sha256: [7; 32],
        }
    }

    #[test]
    fn a_header_round_trips_and_every_bad_one_is_a_typed_error() {
        let size = 1 << 20;
        let h = header();
        assert_eq!(Header::read_from(&h.write_to(), size).unwrap(), h);
        assert!(matches!(
            Header::read_from(&[0u8; HEADER_LEN], size),
            Err(SavedError::NoHeader)
        ));
        let mut b = h.write_to();
        b[8] = 2;
        assert!(matches!(
            Header::read_from(&b, size),
            Err(SavedError::Version { version: 2 })
        ));
        let mut b = h.write_to();
        b[100] = 1;
        assert!(matches!(
            Header::read_from(&b, size),
            Err(SavedError::Header { .. })
        ));
        let long = Header {
            stream_len: size,
            ..header()
        };
        assert!(matches!(
            Header::read_from(&long.write_to(), size),
            Err(SavedError::TooLong { .. })
        ));
        assert!(matches!(
            Header::read_from(&b[..10], size),
            Err(SavedError::Header { .. })
        ));
    }

    fn volume(dir: &tempfile::TempDir, bytes: u64) -> Arc<dyn BlockBackend> {
        let path = dir.path().join("state.img");
        std::fs::File::create(&path)
            .unwrap()
            .set_len(bytes)
            .unwrap();
        Arc::new(FileBackend::open(&path, false).unwrap())
    }

    /// Frames written through the sink read back the same, digest and all; a stream cut
    /// short, one with bytes after it, and one whose digest differs are refused.
    #[test]
    fn a_stream_reads_back_whole_and_a_changed_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let vol = volume(&dir, 8 << 20);
        let frames = vec![
            Frame::Zero { gpa: 0, pages: 3 },
            Frame::Pages {
                gpa: 4096,
                data: vec![5; 3 * CHUNK / 2],
            },
            Frame::State(vec![1, 2, 3]),
        ];
        let mut sink = VolumeSink::new(vol.clone());
        for f in &frames {
            sink.send(f).unwrap();
        }
        let (len, sha) = sink.finish().unwrap();
        let mut r = StreamReader::new(&*vol, len);
        for f in &frames {
            assert_eq!(&r.next().unwrap(), f);
        }
        assert!(matches!(r.next(), Err(SavedError::Truncated)));
        let mut r = StreamReader::new(&*vol, len);
        for _ in &frames {
            r.next().unwrap();
        }
        r.finish(&sha).unwrap();
        // The digest of something else.
        let mut r = StreamReader::new(&*vol, len);
        for _ in &frames {
            r.next().unwrap();
        }
        assert!(matches!(r.finish(&[0; 32]), Err(SavedError::Digest)));
        // Read as if it were longer: what follows the State is counted.
        let mut r = StreamReader::new(&*vol, len + 100);
        for _ in &frames {
            r.next().unwrap();
        }
        assert!(matches!(
            r.finish(&sha),
            Err(SavedError::Trailing { extra: 100 })
        ));
        // A byte changed inside a page: the frames still decode, the digest does not match.
        let mut page = vec![0u8; 4096];
        vol.read_at(HEADER_LEN as u64 + 4096, &mut page).unwrap();
        page[17] ^= 1;
        vol.write_at(HEADER_LEN as u64 + 4096, &page).unwrap();
        let mut r = StreamReader::new(&*vol, len);
        for _ in &frames {
            r.next().unwrap();
        }
        assert!(matches!(r.finish(&sha), Err(SavedError::Digest)));
    }

    #[test]
    fn a_full_volume_is_an_error_not_a_write_past_its_end() {
        let dir = tempfile::tempdir().unwrap();
        let vol = volume(&dir, HEADER_LEN as u64 + CHUNK as u64);
        let mut sink = VolumeSink::new(vol);
        sink.send_pages(0, &vec![1; CHUNK - 4096]).unwrap();
        assert!(matches!(
            sink.send_pages(0, &[1; 8192]),
            Err(MigrationError::Io { .. })
        ));
        assert!(matches!(
            prepare(&*volume(&dir, 1 << 20), 64 << 20),
            Err(SavedError::TooSmall { .. })
        ));
        assert!(volume_bytes_for(64 << 20) >= (64 << 20) + HEADER_LEN as u64);
    }

    /// The shared size rule's figures are this stream's own.
    #[test]
    fn the_shared_size_rule_matches_the_stream_format() {
        use proto::saved_state as rule;
        assert_eq!(rule::HEADER_LEN, HEADER_LEN as u64);
        assert_eq!(rule::PAGE, wire::PAGE as u64);
        assert_eq!(rule::FRAME_HEADER_LEN, wire::HEADER_LEN as u64);
        assert!(rule::PAGE_FRAME_OVERHEAD >= 2 * wire::HEADER_LEN as u64);
        assert_eq!(rule::MAX_STATE, wire::MAX_PAYLOAD as u64);
        assert_eq!(rule::MAX_HELLO, wire::MAX_HELLO as u64);
    }
}
