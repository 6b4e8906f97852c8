//! The destination side: waits for the source on a listener, checks who it is (its TLS
//! certificate must name the source host the coordinator said), the token and the VM's
//! shape and CPU features before anything else, takes the pages into fresh guest memory
//! of a VM made ready beforehand, applies the state, and runs it once the source says Go.
//!
//! A connection that fails before it is accepted (no certificate of the pool, another
//! host, wrong token, not a migration stream, a VM of another shape) is answered and
//! dropped, and the listener waits for the next: a stranger cannot end a prepared
//! migration. Connections do their TLS handshake and wait for their Hello side by side
//! ([`Handshake`]): each must deliver a whole Hello within a deadline of being accepted,
//! and only so many may wait at once, so one that sends nothing or trickles bytes
//! neither holds up the real source nor lives on. After Accept, any failure discards
//! what was received and ends the receive with an error.

use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use kvm_ioctls::Kvm;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use rustls::ServerConnection;

use super::conn::{Conn, Tls};
use super::tls::StreamTls;
use super::wire::{self, Frame, PAGE};
use super::{MigrationError, cpu, state, token_eq};
use crate::console::ConsoleOut;
use crate::vmm::{CpuidRegs, GuestRam, Vm, VmError, VmSnapshot, VmSpec, cpuid, new_guest_ram};

const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the source may take to send Hello once connected, and to take our answer.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
const ACCEPT_POLL: Duration = Duration::from_millis(10);

/// Limits on connections that have not yet presented a Hello: nobody is authenticated
/// before it, so these bound what a stranger can hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Handshake {
    /// From accept to a whole Hello; a connection still without one is closed.
    pub deadline: Duration,
    /// Connections waiting for their Hello at once; one more is closed on accept.
    pub max_pending: usize,
}

impl Default for Handshake {
    fn default() -> Self {
        Self {
            deadline: HELLO_TIMEOUT,
            max_pending: 16,
        }
    }
}

/// What the destination was prepared for.
pub struct Incoming {
    pub vm_id: String,
    pub token: String,
    /// The only host whose certificate may send the VM.
    pub source_host: String,
    /// This host's credentials.
    pub tls: StreamTls,
    pub spec: VmSpec,
}

/// The CPUID table a guest with `spec` would get here (vCPU 0).
pub fn local_cpuid(spec: &VmSpec) -> Result<Vec<CpuidRegs>, VmError> {
    let kvm = Kvm::new().map_err(VmError::KvmUnavailable)?;
    let supported = cpuid::supported(&kvm)?;
    let table = cpuid::for_vcpu(&supported, 0, spec.vcpus, None, &spec.cpuid_mask)?;
    Ok(table.as_slice().iter().map(CpuidRegs::from).collect())
}

enum Failed {
    /// Before Accept: answer, drop the connection, keep listening.
    Refused(MigrationError),
    /// After Accept: the migration is over.
    Fatal(MigrationError),
}

/// Waits for the source and receives the VM; returns it running. `abort` (checked while
/// waiting and between frames) and `deadline` end the wait with an error. `on_accept`
/// is called once a source is accepted. Connections are held to [`Handshake::default`].
pub fn receive(
    listener: &TcpListener,
    inc: &Incoming,
    console: Arc<dyn ConsoleOut>,
    abort: &AtomicBool,
    deadline: Instant,
    on_accept: &mut dyn FnMut(),
) -> Result<Vm, MigrationError> {
    receive_with(
        listener,
        inc,
        Handshake::default(),
        console,
        abort,
        deadline,
        on_accept,
    )
}

/// [`receive`] with the given limits on connections that have not sent their Hello.
pub fn receive_with(
    listener: &TcpListener,
    inc: &Incoming,
    limits: Handshake,
    console: Arc<dyn ConsoleOut>,
    abort: &AtomicBool,
    deadline: Instant,
    on_accept: &mut dyn FnMut(),
) -> Result<Vm, MigrationError> {
    let local = local_cpuid(&inc.spec)?;
    let mut gate = Gate::new(listener, &inc.tls, limits)?;
    loop {
        if abort.load(Ordering::Acquire) {
            return Err(MigrationError::Cancelled);
        }
        if Instant::now() >= deadline {
            return Err(MigrationError::Timeout {
                secs: deadline.saturating_duration_since(Instant::now()).as_secs(),
            });
        }
        let Some(arrived) = gate.poll() else {
            std::thread::sleep(ACCEPT_POLL);
            continue;
        };
        let peer = arrived.peer;
        match serve(arrived, inc, &local, console.clone(), abort, on_accept) {
            Ok(vm) => return Ok(vm),
            Err(Failed::Refused(e)) => {
                tracing::warn!(%peer, error = %proto::error_chain(&e), "migration connection refused");
            }
            Err(Failed::Fatal(e)) => return Err(e),
        }
    }
}

/// A connection whose Hello has arrived whole.
struct Arrived {
    stream: TcpStream,
    tls: ServerConnection,
    /// The host its certificate names (`None`: not a host's).
    host: Option<String>,
    peer: SocketAddr,
    hello: wire::Hello,
    /// Bytes read after the Hello.
    rest: Vec<u8>,
}

/// A connection accepted and still waiting for its Hello.
struct Pending {
    stream: TcpStream,
    tls: ServerConnection,
    peer: SocketAddr,
    since: Instant,
    buf: Vec<u8>,
}

enum Progress {
    Waiting,
    Hello(wire::Hello, usize),
    Failed(MigrationError),
}

impl Pending {
    /// Moves the TLS handshake on with what has arrived (the socket does not block),
    /// and looks for a whole Hello in what the session decrypted.
    fn progress(&mut self) -> Progress {
        let mut chunk = [0u8; 16 << 10];
        loop {
            match wire::decode_hello(&self.buf) {
                Ok(Some((hello, n))) => return Progress::Hello(hello, n),
                Ok(None) => {}
                Err(e) => return Progress::Failed(e.into()),
            }
            if let Err(source) = self.flush() {
                return Progress::Failed(MigrationError::Io {
                    what: "the TLS handshake",
                    source,
                });
            }
            match self.tls.reader().read(&mut chunk) {
                Ok(0) => return Progress::Failed(MigrationError::Closed),
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    continue;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(source) => {
                    return Progress::Failed(MigrationError::Io {
                        what: "receiving the Hello",
                        source,
                    });
                }
            }
            match self.tls.read_tls(&mut self.stream) {
                Ok(0) => return Progress::Failed(MigrationError::Closed),
                Ok(_) => {
                    if let Err(e) = self.tls.process_new_packets() {
                        // Tell the peer why (a bad certificate, say) before closing.
                        let _ = self.flush();
                        return Progress::Failed(MigrationError::Io {
                            what: "the TLS handshake",
                            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
                        });
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Progress::Waiting,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Progress::Failed(MigrationError::Io {
                        what: "receiving the Hello",
                        source,
                    });
                }
            }
        }
    }

    /// Writes what the session has for the peer, as far as the socket takes it now.
    fn flush(&mut self) -> std::io::Result<()> {
        while self.tls.wants_write() {
            match self.tls.write_tls(&mut self.stream) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// The listener and the connections waiting for their Hello, side by side.
struct Gate<'a> {
    listener: &'a TcpListener,
    tls: &'a StreamTls,
    limits: Handshake,
    pending: Vec<Pending>,
}

impl<'a> Gate<'a> {
    fn new(
        listener: &'a TcpListener,
        tls: &'a StreamTls,
        limits: Handshake,
    ) -> Result<Self, MigrationError> {
        listener
            .set_nonblocking(true)
            .map_err(|source| MigrationError::Io {
                what: "listening",
                source,
            })?;
        Ok(Self {
            listener,
            tls,
            limits,
            pending: Vec::new(),
        })
    }

    /// Accepts the connections waiting on the listener, reads what the pending ones sent,
    /// and closes those that sent something else or are past the deadline. Returns one
    /// whose Hello is whole, if any; the others keep waiting for the next call.
    fn poll(&mut self) -> Option<Arrived> {
        self.accept();
        let now = Instant::now();
        let mut i = 0;
        while i < self.pending.len() {
            let p = &mut self.pending[i];
            match p.progress() {
                Progress::Waiting if now.duration_since(p.since) < self.limits.deadline => i += 1,
                Progress::Waiting => {
                    let p = self.pending.swap_remove(i);
                    tracing::warn!(peer = %p.peer, bytes = p.buf.len(), deadline = ?self.limits.deadline, "no Hello within the deadline: migration connection closed");
                }
                Progress::Failed(e) => {
                    let p = self.pending.swap_remove(i);
                    tracing::warn!(peer = %p.peer, error = %proto::error_chain(&e), "migration connection dropped before its Hello");
                }
                Progress::Hello(hello, n) => {
                    let mut p = self.pending.swap_remove(i);
                    let rest = p.buf.split_off(n);
                    return Some(Arrived {
                        host: self.tls.peer_host(&p.tls),
                        stream: p.stream,
                        tls: p.tls,
                        peer: p.peer,
                        hello,
                        rest,
                    });
                }
            }
        }
        None
    }

    fn accept(&mut self) {
        loop {
            let (stream, peer) = match self.listener.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a migration connection");
                    return;
                }
            };
            if self.pending.len() >= self.limits.max_pending {
                tracing::warn!(%peer, max = self.limits.max_pending, "too many migration connections waiting for their Hello: closed");
                continue;
            }
            if let Err(e) = stream.set_nonblocking(true) {
                tracing::warn!(%peer, error = %e, "migration connection");
                continue;
            }
            let tls = match self.tls.accept() {
                Ok(t) => t,
                Err(e) => {
                    tracing::warn!(%peer, error = %proto::error_chain(&e), "migration connection");
                    continue;
                }
            };
            self.pending.push(Pending {
                stream,
                tls,
                peer,
                since: Instant::now(),
                buf: Vec::new(),
            });
        }
    }

    /// Connections waiting for their Hello now.
    #[cfg(test)]
    fn pending(&self) -> usize {
        self.pending.len()
    }
}

fn serve(
    arrived: Arrived,
    inc: &Incoming,
    local: &[CpuidRegs],
    console: Arc<dyn ConsoleOut>,
    abort: &AtomicBool,
    on_accept: &mut dyn FnMut(),
) -> Result<Vm, Failed> {
    let Arrived {
        stream,
        tls,
        host,
        hello,
        rest,
        ..
    } = arrived;
    let refused = |source| {
        Failed::Refused(MigrationError::Io {
            what: "setting up the socket",
            source,
        })
    };
    stream.set_nonblocking(false).map_err(refused)?;
    let stream = Tls::Server(rustls::StreamOwned::new(tls, stream));
    let mut conn = Conn::with_buffered(stream, HELLO_TIMEOUT, &rest).map_err(Failed::Refused)?;
    if let Err(reason) = check_hello(&hello, host.as_deref(), inc, local) {
        let _ = conn.send(&Frame::Refuse {
            reason: reason.clone(),
        });
        return Err(Failed::Refused(MigrationError::Rejected { reason }));
    }
    // The KVM VM, its memory slots and vCPUs are made now, while pre-copy runs, so the
    // switchover only applies state. A host that cannot make them refuses the stream.
    let shell = match new_guest_ram(inc.spec.memory_bytes).and_then(|m| Vm::prepare(&inc.spec, m)) {
        Ok(shell) => shell,
        Err(e) => {
            let reason = format!("cannot make the VM here: {}", proto::error_chain(&e));
            let _ = conn.send(&Frame::Refuse {
                reason: reason.clone(),
            });
            return Err(Failed::Fatal(MigrationError::Rejected { reason }));
        }
    };
    let memory = shell.memory().clone();
    let fatal = Failed::Fatal;
    conn.send(&Frame::Accept).map_err(fatal)?;
    on_accept();
    conn.set_timeout(IO_TIMEOUT);
    let mut apply = Apply::new(&memory, hello.version);
    let snapshot = loop {
        if abort.load(Ordering::Acquire) {
            return Err(fatal(MigrationError::Cancelled));
        }
        match apply.frame(conn.recv().map_err(fatal)?).map_err(fatal)? {
            Applied::Memory => {}
            Applied::Sync => conn.send(&Frame::Synced).map_err(fatal)?,
            Applied::State(snapshot) => break snapshot,
        }
    };
    // The source has paused: what the taps queued until now reached it too.
    for nic in &inc.spec.nets {
        let n = nic.discard_queued();
        if n > 0 {
            tracing::debug!(nic = %nic.id, frames = n, "dropped frames queued before the switchover");
        }
    }
    let mut vm = match Vm::restore_into(&inc.spec, console, &snapshot, shell) {
        Ok(vm) => vm,
        Err(e) => {
            let _ = conn.send(&Frame::Refuse {
                reason: format!("cannot build the VM: {}", proto::error_chain(&e)),
            });
            return Err(fatal(e.into()));
        }
    };
    conn.send(&Frame::Restored).map_err(fatal)?;
    match conn.recv().map_err(fatal)? {
        Frame::Go => {}
        other => return Err(fatal(MigrationError::unexpected("Go", &other))),
    }
    vm.start().map_err(|e| fatal(e.into()))?;
    if let Err(e) = conn.send(&Frame::Resumed) {
        // The guest runs here now whatever the source heard.
        tracing::warn!(error = %e, "could not tell the source the VM resumed");
    }
    Ok(vm)
}

fn check_hello(
    h: &wire::Hello,
    host: Option<&str>,
    inc: &Incoming,
    local: &[CpuidRegs],
) -> Result<(), String> {
    if host != Some(inc.source_host.as_str()) {
        return Err(match host {
            Some(h) => format!(
                "this destination takes the VM from host {}, not from host {h}",
                inc.source_host
            ),
            None => "the certificate is not a host's".into(),
        });
    }
    if !(wire::MIN_VERSION..=wire::VERSION).contains(&h.version) {
        return Err(format!(
            "stream version {} is not in {}..={}",
            h.version,
            wire::MIN_VERSION,
            wire::VERSION
        ));
    }
    if !token_eq(&h.token, &inc.token) {
        return Err("wrong migration token".into());
    }
    if h.vm_id != inc.vm_id {
        return Err(format!(
            "this destination waits for VM {}, not {}",
            inc.vm_id, h.vm_id
        ));
    }
    if h.memory_bytes != inc.spec.memory_bytes || h.vcpus != inc.spec.vcpus {
        return Err(format!(
            "the VM has {} bytes and {} vCPUs here, {} and {} on the source",
            inc.spec.memory_bytes, inc.spec.vcpus, h.memory_bytes, h.vcpus
        ));
    }
    let missing = cpu::missing(&h.cpuid, local);
    if !missing.is_empty() {
        return Err(format!(
            "this host's CPU lacks what the guest uses: {}",
            missing.join(", ")
        ));
    }
    Ok(())
}

/// What a frame after Accept did.
pub enum Applied {
    /// Pages or zeros are in guest memory.
    Memory,
    /// Sync: everything before it is in guest memory; the source waits for Synced.
    Sync,
    /// The saved state: pre-copy is over.
    State(Box<VmSnapshot>),
}

impl std::fmt::Debug for Applied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Applied::Memory => "Memory",
            Applied::Sync => "Sync",
            Applied::State(_) => "State",
        })
    }
}

/// The frames between Accept and the saved state, taken into the fresh guest memory of
/// the VM being received. Every page address and run length comes from the source, so
/// a range is checked to lie all in RAM, in arithmetic that cannot wrap, before any byte
/// changes. Public only so the `migration_apply` fuzz target (hostd/fuzz) can drive it
/// without a socket.
#[doc(hidden)]
pub struct Apply<'a> {
    memory: &'a GuestRam,
    /// Fresh memory is zero already, so a Zero frame only clears pages an earlier Pages
    /// frame filled (touching the others would allocate them).
    written: Written,
    /// The stream's version: Delta frames only from [`wire::DELTA_VERSION`] on.
    version: u16,
}

impl<'a> Apply<'a> {
    /// `memory` must be fresh (all zero), as the VM made for the receive is; `version`
    /// is the stream's (its Hello's).
    pub fn new(memory: &'a GuestRam, version: u16) -> Self {
        Self {
            memory,
            written: Written::new(memory),
            version,
        }
    }

    /// Applies one frame. An error ends the receive: nothing of that frame was written.
    pub fn frame(&mut self, frame: Frame) -> Result<Applied, MigrationError> {
        match frame {
            Frame::Pages { gpa, data } => {
                let pages = (data.len() / PAGE) as u64;
                check_in_ram(self.memory, "Pages", gpa, pages)?;
                self.memory
                    .write_slice(&data, GuestAddress(gpa))
                    .map_err(MigrationError::Memory)?;
                self.written.mark(gpa, pages);
                Ok(Applied::Memory)
            }
            Frame::Zero { gpa, pages } => {
                write_zeros(self.memory, &mut self.written, gpa, pages)?;
                Ok(Applied::Memory)
            }
            Frame::Delta { data } if self.version >= wire::DELTA_VERSION => {
                // Every page in RAM before any byte changes.
                for run in wire::delta_runs(&data) {
                    check_in_ram(self.memory, "Delta", run?.gpa, 1)?;
                }
                for run in wire::delta_runs(&data) {
                    let run = run?;
                    self.memory
                        .write_slice(run.bytes, GuestAddress(run.gpa + run.offset as u64))
                        .map_err(MigrationError::Memory)?;
                    self.written.mark(run.gpa, 1);
                }
                Ok(Applied::Memory)
            }
            Frame::Sync => Ok(Applied::Sync),
            Frame::State(bytes) => Ok(Applied::State(Box::new(state::decode(&bytes)?))),
            other => Err(MigrationError::unexpected("Pages or State", &other)),
        }
    }
}

/// One bit per guest-physical page up to the end of RAM.
struct Written(Vec<u64>);

impl Written {
    fn new(memory: &GuestRam) -> Self {
        use vm_memory::GuestMemoryRegion;
        let end = memory
            .iter()
            .map(|r| r.start_addr().0 + r.len())
            .max()
            .unwrap_or(0);
        Self(vec![0; (end / PAGE as u64).div_ceil(64) as usize])
    }

    fn mark(&mut self, gpa: u64, pages: u64) {
        for p in gpa / PAGE as u64..gpa / PAGE as u64 + pages {
            if let Some(w) = self.0.get_mut((p / 64) as usize) {
                *w |= 1 << (p % 64);
            }
        }
    }

    /// Whether the page was written, and forgets it (it is zero again).
    fn take(&mut self, page: u64) -> bool {
        match self.0.get_mut((page / 64) as usize) {
            Some(w) => {
                let set = *w & (1 << (page % 64)) != 0;
                *w &= !(1 << (page % 64));
                set
            }
            None => true,
        }
    }
}

/// Checks that `pages` pages from `gpa` are all guest RAM, in arithmetic that cannot
/// wrap: the numbers come from the source.
fn check_in_ram(
    memory: &GuestRam,
    frame: &'static str,
    gpa: u64,
    pages: u64,
) -> Result<(), MigrationError> {
    let outside = || MigrationError::OutsideMemory { frame, gpa, pages };
    let len = pages.checked_mul(PAGE as u64).ok_or_else(outside)?;
    gpa.checked_add(len).ok_or_else(outside)?;
    let len = usize::try_from(len).map_err(|_| outside())?;
    if len > 0 && !memory.check_range(GuestAddress(gpa), len) {
        return Err(outside());
    }
    Ok(())
}

/// A run of zero pages: refused whole, before any page changes, unless it lies in RAM.
fn write_zeros(
    memory: &GuestRam,
    written: &mut Written,
    gpa: u64,
    pages: u32,
) -> Result<(), MigrationError> {
    static ZERO: [u8; PAGE] = [0; PAGE];
    check_in_ram(memory, "Zero", gpa, u64::from(pages))?;
    let first = gpa / PAGE as u64;
    for page in first..first + u64::from(pages) {
        if written.take(page) {
            memory
                .write_slice(&ZERO, GuestAddress(page * PAGE as u64))
                .map_err(MigrationError::Memory)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    const MIB: usize = 1 << 20;

    /// 1 MiB of RAM, then a hole, then 1 MiB more at 2 MiB.
    fn ram() -> GuestRam {
        GuestRam::from_ranges(&[(GuestAddress(0), MIB), (GuestAddress(2 * MIB as u64), MIB)])
            .unwrap()
    }

    #[test]
    fn a_zero_run_that_wraps_or_leaves_ram_is_a_typed_error_and_changes_nothing() {
        let mem = ram();
        let mut written = Written::new(&mem);
        mem.write_slice(&[7u8; PAGE], GuestAddress(0xff000))
            .unwrap();
        written.mark(0xff000, 1);
        let hostile = [
            // count × page size + address overflows 64 bits
            (!(PAGE as u64 - 1), u32::MAX),
            (u64::MAX - (PAGE as u64 - 1), 1),
            // starts in RAM, runs past its end into the hole
            (0xff000, 2),
            // the whole hole, and past the last region
            (MIB as u64, 1),
            (3 * MIB as u64 - PAGE as u64, 2),
            (0, u32::MAX),
        ];
        for (gpa, pages) in hostile {
            let err = write_zeros(&mem, &mut written, gpa, pages).unwrap_err();
            assert!(
                matches!(err, MigrationError::OutsideMemory { frame: "Zero", gpa: g, pages: p } if g == gpa && p == u64::from(pages)),
                "{gpa:#x}+{pages}: {err:?}"
            );
        }
        // Refused whole: the page a run starting there would have cleared is intact.
        let mut page = [0u8; PAGE];
        mem.read_slice(&mut page, GuestAddress(0xff000)).unwrap();
        assert_eq!(page, [7u8; PAGE]);
        // A run inside RAM clears what was written, up to the very last page.
        write_zeros(&mem, &mut written, 0xff000, 1).unwrap();
        mem.read_slice(&mut page, GuestAddress(0xff000)).unwrap();
        assert_eq!(page, [0u8; PAGE]);
        write_zeros(&mem, &mut written, 3 * MIB as u64 - PAGE as u64, 1).unwrap();
        write_zeros(&mem, &mut written, 0, 0).unwrap();
    }

    #[test]
    fn a_pages_range_outside_ram_is_refused_before_writing() {
        let mem = ram();
        assert!(check_in_ram(&mem, "Pages", 0, 256).is_ok());
        for (gpa, pages) in [(0xff000, 2), (!(PAGE as u64 - 1), 1), (0, u64::MAX)] {
            assert!(matches!(
                check_in_ram(&mem, "Pages", gpa, pages),
                Err(MigrationError::OutsideMemory { frame: "Pages", .. })
            ));
        }
        assert!(mem.last_addr().0 < 3 * MIB as u64);
    }

    #[test]
    fn a_delta_writes_its_runs_only_in_a_version_3_stream_and_is_refused_whole_outside_ram() {
        let mem = ram();
        let at = 2 * MIB as u64;
        let old = [5u8; PAGE];
        let mut new = old;
        new[10..13].copy_from_slice(&[1, 2, 3]);
        new[4000] = 9;
        let mut data = Vec::new();
        assert!(wire::encode_delta(at, &old, &new, &mut data));
        let delta = Frame::Delta { data: data.clone() };
        // A version 2 stream has no deltas.
        let mut v2 = Apply::new(&mem, wire::FALLBACK_VERSION);
        assert!(matches!(
            v2.frame(delta.clone()),
            Err(MigrationError::Unexpected { .. })
        ));
        let mut apply = Apply::new(&mem, wire::VERSION);
        let pages = Frame::Pages {
            gpa: at,
            data: old.to_vec(),
        };
        assert!(matches!(apply.frame(pages), Ok(Applied::Memory)));
        assert!(matches!(apply.frame(delta), Ok(Applied::Memory)));
        let mut page = [0u8; PAGE];
        mem.read_slice(&mut page, GuestAddress(at)).unwrap();
        assert_eq!(page, new);
        // A zero run clears a page a delta wrote.
        assert!(matches!(
            apply.frame(Frame::Zero { gpa: at, pages: 1 }),
            Ok(Applied::Memory)
        ));
        mem.read_slice(&mut page, GuestAddress(at)).unwrap();
        assert_eq!(page, [0u8; PAGE]);
        // Two entries, the second in the hole: refused, and the first page unchanged.
        let mut small = [0u8; PAGE];
        small[100] = 1;
        let mut two = Vec::new();
        assert!(wire::encode_delta(at, &[0; PAGE], &small, &mut two));
        assert!(wire::encode_delta(MIB as u64, &[0; PAGE], &small, &mut two));
        assert!(matches!(
            apply.frame(Frame::Delta { data: two }),
            Err(MigrationError::OutsideMemory { frame: "Delta", .. })
        ));
        mem.read_slice(&mut page, GuestAddress(at)).unwrap();
        assert_eq!(page, [0u8; PAGE]);
    }

    #[test]
    fn apply_takes_pages_zeros_and_sync_and_refuses_the_rest_whole() {
        let mem = ram();
        let mut apply = Apply::new(&mem, wire::FALLBACK_VERSION);
        let at = 2 * MIB as u64;
        let data = [[1u8; PAGE], [2u8; PAGE]].concat();
        let pages = |gpa, data: &[u8]| Frame::Pages {
            gpa,
            data: data.to_vec(),
        };
        assert!(matches!(apply.frame(pages(at, &data)), Ok(Applied::Memory)));
        assert!(matches!(apply.frame(Frame::Sync), Ok(Applied::Sync)));
        // Two pages whose second lies in the hole: refused, and the first is not written.
        let refused = apply.frame(pages(MIB as u64 - PAGE as u64, &data));
        assert!(matches!(
            refused,
            Err(MigrationError::OutsideMemory {
                frame: "Pages",
                pages: 2,
                ..
            })
        ));
        let mut page = [9u8; PAGE];
        mem.read_slice(&mut page, GuestAddress(MIB as u64 - PAGE as u64))
            .unwrap();
        assert_eq!(page, [0u8; PAGE]);
        // A zero run over what was written clears it; the second page is intact.
        assert!(matches!(
            apply.frame(Frame::Zero { gpa: at, pages: 1 }),
            Ok(Applied::Memory)
        ));
        let mut two = vec![9u8; 2 * PAGE];
        mem.read_slice(&mut two, GuestAddress(at)).unwrap();
        assert_eq!(two, [[0u8; PAGE], [2u8; PAGE]].concat());
        // Other frames end the receive; so does a State that does not decode.
        assert!(matches!(
            apply.frame(Frame::Go),
            Err(MigrationError::Unexpected {
                want: "Pages or State",
                ..
            })
        ));
        assert!(matches!(
            apply.frame(Frame::State(vec![1])),
            Err(MigrationError::State(_))
        ));
    }

    fn hello() -> wire::Hello {
        wire::Hello {
            version: wire::VERSION,
            token: "t".into(),
            vm_id: "vm".into(),
            memory_bytes: 1,
            vcpus: 1,
            cpuid: vec![],
        }
    }

    fn hello_bytes() -> Vec<u8> {
        let mut out = Vec::new();
        wire::encode(&Frame::Hello(hello()), &mut out);
        out
    }

    type Client = std::thread::JoinHandle<std::io::Result<TcpStream>>;

    /// From a thread: a TLS client of `addr` as `tls` for host `dst`, writing each part
    /// with a pause after it; ends with its socket (still open) or the error it met.
    fn client(addr: SocketAddr, tls: &StreamTls, parts: Vec<Vec<u8>>, pause: Duration) -> Client {
        let conn = tls.connect("dst").unwrap();
        std::thread::spawn(move || {
            let sock = TcpStream::connect(addr)?;
            sock.set_read_timeout(Some(Duration::from_secs(10)))?;
            let mut s = rustls::StreamOwned::new(conn, sock);
            while s.conn.is_handshaking() {
                s.conn.complete_io(&mut s.sock)?;
            }
            for p in parts {
                s.write_all(&p)?;
                s.flush()?;
                std::thread::sleep(pause);
            }
            Ok(s.sock)
        })
    }

    /// Whether the other end closed `s` within `limit` (whatever it said first).
    fn closed_within(s: &mut TcpStream, limit: Duration) -> bool {
        let until = Instant::now() + limit;
        let mut b = [0u8; 256];
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            s.set_read_timeout(Some(left)).unwrap();
            match s.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e) => return e.kind() == std::io::ErrorKind::ConnectionReset,
            }
        }
    }

    /// Polls until a Hello arrives or `limit` passes.
    fn poll_for(gate: &mut Gate, limit: Duration) -> Option<Arrived> {
        let until = Instant::now() + limit;
        while Instant::now() < until {
            if let Some(a) = gate.poll() {
                return Some(a);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        None
    }

    /// Polls until `client` is done (its handshake needs the gate to move).
    fn drive(gate: &mut Gate, client: Client) -> std::io::Result<TcpStream> {
        let until = Instant::now() + Duration::from_secs(10);
        while !client.is_finished() {
            assert!(Instant::now() < until, "the client is stuck");
            assert!(gate.poll().is_none(), "no Hello expected yet");
            std::thread::sleep(Duration::from_millis(2));
        }
        client.join().unwrap()
    }

    #[test]
    fn silent_and_trickling_connections_are_closed_at_the_deadline_while_a_hello_gets_through() {
        let (hosts, _) = super::super::tls::test_hosts(&["dst", "src"]);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let deadline = Duration::from_secs(2);
        let mut gate = Gate::new(
            &listener,
            &hosts[0],
            Handshake {
                deadline,
                max_pending: 3,
            },
        )
        .unwrap();
        let started = Instant::now();
        // Silent: not even a TLS hello. Trickling: a handshake and one byte of a Hello.
        let mut silent = TcpStream::connect(addr).unwrap();
        let trickle = client(
            addr,
            &hosts[1],
            vec![hello_bytes()[..1].to_vec()],
            Duration::ZERO,
        );
        let mut trickle = drive(&mut gate, trickle).unwrap();
        // While those two wait, a real Hello (sent in two pieces) is handed over.
        let hello = hello_bytes();
        let real = client(
            addr,
            &hosts[1],
            vec![hello[..5].to_vec(), [&hello[5..], b"next"].concat()],
            Duration::from_millis(100),
        );
        let got = poll_for(&mut gate, Duration::from_secs(5)).expect("the Hello");
        assert_eq!(got.hello.token, "t");
        assert_eq!(got.rest, b"next");
        assert_eq!(got.host.as_deref(), Some("src"), "the verified source host");
        assert!(started.elapsed() < deadline, "served before the deadline");
        real.join().unwrap().unwrap();
        // The other two are closed once the deadline passes, not before.
        assert_eq!(gate.pending(), 2);
        assert!(!closed_within(&mut silent, Duration::from_millis(10)));
        while gate.pending() > 0 {
            assert!(started.elapsed() < Duration::from_secs(8));
            gate.poll();
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(started.elapsed() >= deadline);
        assert!(closed_within(&mut silent, Duration::from_secs(5)));
        assert!(closed_within(&mut trickle, Duration::from_secs(5)));
    }

    #[test]
    fn past_the_cap_a_connection_is_closed_on_accept_and_bad_first_frames_at_once() {
        let (hosts, _) = super::super::tls::test_hosts(&["dst", "src"]);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let mut gate = Gate::new(
            &listener,
            &hosts[0],
            Handshake {
                deadline: Duration::from_secs(60),
                max_pending: 2,
            },
        )
        .unwrap();
        let a = TcpStream::connect(addr).unwrap();
        let b = TcpStream::connect(addr).unwrap();
        let until = Instant::now() + Duration::from_secs(10);
        while gate.pending() < 2 {
            assert!(Instant::now() < until);
            gate.poll();
        }
        let mut c = TcpStream::connect(addr).unwrap();
        while !closed_within(&mut c, Duration::from_millis(20)) {
            assert!(Instant::now() < until, "the third is closed");
            gate.poll();
        }
        assert_eq!(gate.pending(), 2);
        drop((a, b));
        while gate.pending() > 0 {
            assert!(Instant::now() < until, "closed peers leave the pending set");
            gate.poll();
        }
        // Not TLS at all, another kind first, or a Hello announcing a huge payload:
        // closed at once.
        let mut plain = TcpStream::connect(addr).unwrap();
        plain.write_all(&hello_bytes()).unwrap();
        let pages = client(
            addr,
            &hosts[1],
            vec![wire::pages_header(0, PAGE).to_vec()],
            Duration::ZERO,
        );
        let mut h = hello_bytes()[..wire::HEADER_LEN].to_vec();
        h[4..8].copy_from_slice(&(wire::MAX_HELLO as u32 + 1).to_le_bytes());
        let huge = client(addr, &hosts[1], vec![h], Duration::ZERO);
        let mut socks = vec![plain];
        for c in [pages, huge] {
            let until = Instant::now() + Duration::from_secs(10);
            while !c.is_finished() {
                assert!(Instant::now() < until);
                gate.poll();
            }
            socks.push(c.join().unwrap().unwrap());
        }
        for s in &mut socks {
            while !closed_within(s, Duration::from_millis(20)) {
                assert!(Instant::now() < until, "closed before the deadline");
                gate.poll();
            }
        }
        assert_eq!(gate.pending(), 0);
    }

    #[test]
    fn a_certificate_of_another_pool_fails_the_handshake_and_leaves_the_gate_waiting() {
        let (hosts, strangers) = super::super::tls::test_hosts(&["dst", "src"]);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let mut gate = Gate::new(&listener, &hosts[0], Handshake::default()).unwrap();
        let stranger = client(addr, &strangers[1], vec![hello_bytes()], Duration::ZERO);
        let err = drive(&mut gate, stranger).unwrap_err();
        assert!(
            err.to_string().contains("certificate") || err.kind() != std::io::ErrorKind::Other,
            "{err}"
        );
        let until = Instant::now() + Duration::from_secs(5);
        while gate.pending() > 0 {
            assert!(Instant::now() < until, "the stranger is dropped");
            gate.poll();
        }
        // The source also refuses a destination of another pool before sending a byte of
        // its own.
        let theirs = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut their_gate = Gate::new(&theirs, &strangers[0], Handshake::default()).unwrap();
        let ours = client(
            theirs.local_addr().unwrap(),
            &hosts[1],
            vec![hello_bytes()],
            Duration::ZERO,
        );
        assert!(drive(&mut their_gate, ours).is_err());
        // And the real source still gets through to ours.
        let real = client(addr, &hosts[1], vec![hello_bytes()], Duration::ZERO);
        let got = poll_for(&mut gate, Duration::from_secs(5)).expect("the Hello");
        assert_eq!(got.host.as_deref(), Some("src"));
        real.join().unwrap().unwrap();
    }

    #[test]
    fn a_hello_from_a_host_other_than_the_prepared_source_is_refused() {
        let (hosts, _) = super::super::tls::test_hosts(&["dst", "src"]);
        let inc = Incoming {
            vm_id: "vm".into(),
            token: "t".into(),
            source_host: "src".into(),
            tls: hosts[0].clone(),
            spec: VmSpec {
                vcpus: 1,
                memory_bytes: 1,
                boot: crate::vmm::BootSpec {
                    kernel: "/nonexistent".into(),
                    initrd: None,
                    cmdline: String::new(),
                    protocol: crate::vmm::BootProtocol::Auto,
                },
                disks: vec![],
                nets: vec![],
                cpuid_mask: vec![],
            },
        };
        let hello = hello();
        assert_eq!(check_hello(&hello, Some("src"), &inc, &[]), Ok(()));
        let other = check_hello(&hello, Some("dst"), &inc, &[]).unwrap_err();
        assert!(
            other.contains("from host src, not from host dst"),
            "{other}"
        );
        assert!(check_hello(&hello, None, &inc, &[]).is_err());
        let wrong = wire::Hello {
            token: "u".into(),
            ..hello
        };
        assert_eq!(
            check_hello(&wrong, Some("src"), &inc, &[]),
            Err("wrong migration token".into())
        );
    }
}
