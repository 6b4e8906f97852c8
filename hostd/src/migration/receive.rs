//! The destination side: waits for the source on a listener, checks the token and the
//! VM's shape and CPU features before anything else, takes the pages into fresh guest
//! memory of a VM made ready beforehand, applies the state, and runs it once the source
//! says Go.
//!
//! A connection that fails before it is accepted (wrong token, not a migration stream,
//! a VM of another shape) is answered and dropped, and the listener waits for the next:
//! a stranger cannot end a prepared migration. After Accept, any failure discards what
//! was received and ends the receive with an error.

use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use kvm_ioctls::Kvm;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::conn::Conn;
use super::wire::{self, Frame, PAGE};
use super::{MigrationError, cpu, state, token_eq};
use crate::console::ConsoleOut;
use crate::vmm::{CpuidRegs, GuestRam, Vm, VmError, VmSpec, cpuid, new_guest_ram};

const IO_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the source may take to send Hello once connected.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
const ACCEPT_POLL: Duration = Duration::from_millis(10);

/// What the destination was prepared for.
pub struct Incoming {
    pub vm_id: String,
    pub token: String,
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
/// is called once a source is accepted.
pub fn receive(
    listener: &TcpListener,
    inc: &Incoming,
    console: Arc<dyn ConsoleOut>,
    abort: &AtomicBool,
    deadline: Instant,
    on_accept: &mut dyn FnMut(),
) -> Result<Vm, MigrationError> {
    let local = local_cpuid(&inc.spec)?;
    listener
        .set_nonblocking(true)
        .map_err(|source| MigrationError::Io {
            what: "listening",
            source,
        })?;
    loop {
        if abort.load(Ordering::Acquire) {
            return Err(MigrationError::Cancelled);
        }
        if Instant::now() >= deadline {
            return Err(MigrationError::Timeout {
                secs: deadline.saturating_duration_since(Instant::now()).as_secs(),
            });
        }
        let (stream, peer) = match listener.accept() {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(ACCEPT_POLL);
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "accepting a migration connection");
                std::thread::sleep(ACCEPT_POLL);
                continue;
            }
        };
        let _ = stream.set_nonblocking(false);
        let conn = match Conn::new(stream, HELLO_TIMEOUT) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(%peer, error = %e, "migration connection");
                continue;
            }
        };
        match serve(conn, inc, &local, console.clone(), abort, on_accept) {
            Ok(vm) => return Ok(vm),
            Err(Failed::Refused(e)) => {
                tracing::warn!(%peer, error = %proto::error_chain(&e), "migration connection refused");
            }
            Err(Failed::Fatal(e)) => return Err(e),
        }
    }
}

fn serve(
    mut conn: Conn,
    inc: &Incoming,
    local: &[CpuidRegs],
    console: Arc<dyn ConsoleOut>,
    abort: &AtomicBool,
    on_accept: &mut dyn FnMut(),
) -> Result<Vm, Failed> {
    let hello = match conn.recv().map_err(Failed::Refused)? {
        Frame::Hello(h) => h,
        other => {
            return Err(Failed::Refused(MigrationError::unexpected("Hello", &other)));
        }
    };
    if let Err(reason) = check_hello(&hello, inc, local) {
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
    // Pages written so far: fresh memory is zero already, so a Zero frame only needs
    // to clear pages an earlier Pages frame filled (and touching the others would
    // allocate them).
    let mut written = Written::new(&memory);
    let snapshot = loop {
        if abort.load(Ordering::Acquire) {
            return Err(fatal(MigrationError::Cancelled));
        }
        match conn.recv().map_err(fatal)? {
            Frame::Pages { gpa, data } => {
                memory
                    .write_slice(&data, GuestAddress(gpa))
                    .map_err(|e| fatal(MigrationError::Memory(e)))?;
                written.mark(gpa, (data.len() / PAGE) as u64);
            }
            Frame::Zero { gpa, pages } => {
                write_zeros(&memory, &mut written, gpa, pages).map_err(fatal)?
            }
            Frame::Sync => conn.send(&Frame::Synced).map_err(fatal)?,
            Frame::State(bytes) => break state::decode(&bytes).map_err(|e| fatal(e.into()))?,
            other => return Err(fatal(MigrationError::unexpected("Pages or State", &other))),
        }
    };
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

fn check_hello(h: &wire::Hello, inc: &Incoming, local: &[CpuidRegs]) -> Result<(), String> {
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

fn write_zeros(
    memory: &GuestRam,
    written: &mut Written,
    gpa: u64,
    pages: u32,
) -> Result<(), MigrationError> {
    static ZERO: [u8; PAGE] = [0; PAGE];
    for i in 0..u64::from(pages) {
        let at = gpa + i * PAGE as u64;
        if written.take(at / PAGE as u64) {
            memory
                .write_slice(&ZERO, GuestAddress(at))
                .map_err(MigrationError::Memory)?;
        }
    }
    // A range outside RAM is refused like a Pages frame there would be.
    if pages > 0 {
        let last = gpa + (u64::from(pages) - 1) * PAGE as u64;
        memory
            .get_slice(GuestAddress(last), PAGE)
            .map_err(MigrationError::Memory)?;
    }
    Ok(())
}
