//! Run control shared by a VM's owner, its vCPU threads and its devices: the target state
//! (run, pause, stop), the first reason the VM stopped, and the kick that pulls a vCPU
//! out of `KVM_RUN`.
//!
//! Kicking: the owner sets the target, then sends each vCPU thread a real-time signal.
//! The signal handler sets `immediate_exit` in that thread's `kvm_run`, so the kick works
//! whether it lands while the thread is inside `KVM_RUN` (which returns `EINTR`) or just
//! before it enters (which then returns at once). The thread then sees the new target.

use std::cell::Cell;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once};
use std::time::{Duration, Instant};

use kvm_bindings::kvm_run;

use super::persist::VcpuRequest;
use crate::devices::idle::IdleWake;

/// Why a VM stopped running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmExit {
    /// The guest powered off (debug-exit port with its status, or a system event).
    Poweroff { status: Option<u8> },
    /// The guest reset the machine (i8042 command 0xfe, or a system event).
    Reset,
    /// A vCPU hit a triple fault (KVM_EXIT_SHUTDOWN).
    TripleFault { vcpu: u32 },
    /// A vCPU could not go on: a KVM internal error, a failed entry, an exit the VMM does
    /// not handle. `detail` says which, for people.
    Crash { vcpu: u32, detail: String },
    /// The VMM's owner stopped it.
    Stopped,
}

impl std::fmt::Display for VmExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmExit::Poweroff { status: Some(s) } => write!(f, "guest powered off (status {s})"),
            VmExit::Poweroff { status: None } => write!(f, "guest powered off"),
            VmExit::Reset => write!(f, "guest reset"),
            VmExit::TripleFault { vcpu } => write!(f, "triple fault on vCPU {vcpu}"),
            VmExit::Crash { vcpu, detail } => write!(f, "vCPU {vcpu} crashed: {detail}"),
            VmExit::Stopped => write!(f, "stopped by the VMM"),
        }
    }
}

const TARGET_RUN: u8 = 0;
const TARGET_PAUSE: u8 = 1;
const TARGET_STOP: u8 = 2;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RunError {
    #[error("the VM has stopped ({0})")]
    Stopped(VmExit),
    #[error("the VM is not paused")]
    NotPaused,
    #[error("{parked} of {running} vCPUs paused within {timeout:?}")]
    PauseTimeout {
        parked: usize,
        running: usize,
        timeout: Duration,
    },
}

struct Inner {
    exit: Option<VmExit>,
    /// vCPU threads alive, and how many of them are parked by a pause.
    running: usize,
    parked: usize,
    /// pthread of each vCPU thread while it runs, for kicks, and its kernel thread id,
    /// for CPU accounting.
    threads: Vec<Option<libc::pthread_t>>,
    tids: Vec<Option<libc::pid_t>>,
    /// Work for each parked vCPU thread.
    requests: Vec<Option<VcpuRequest>>,
    /// CPU time of vCPU threads that have finished.
    finished_cpu_ns: u64,
}

pub struct RunControl {
    target: AtomicU8,
    inner: Mutex<Inner>,
    cv: Condvar,
    /// Where vCPUs idle on the idle port; the interrupt lines and every kick wake them.
    pub idle: Arc<IdleWake>,
}

/// What a vCPU thread is asked to do at the gate.
pub(crate) enum Gate {
    /// It is about to park.
    Parking,
    /// Work for it while parked.
    Request(VcpuRequest),
}

/// What devices hold to stop the VM (power off, reset).
#[derive(Clone)]
pub struct ExitHandle(Arc<RunControl>);

impl ExitHandle {
    pub fn request(&self, exit: VmExit) {
        self.0.request_exit(exit);
    }
}

thread_local! {
    /// The `kvm_run` of the vCPU this thread runs, for the kick signal handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Only touches a const-initialised thread local and one byte of this thread's own
    // kvm_run mapping, which is async-signal-safe.
    let run = KVM_RUN.with(|p| p.get());
    if !run.is_null() {
        // SAFETY: the pointer is set by this very thread to its vCPU's kvm_run mapping,
        // which stays mapped until the thread clears the pointer (before the VcpuFd drops).
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
    std::sync::atomic::fence(Ordering::SeqCst);
}

/// The signal that kicks vCPU threads.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN() + 4
}

fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if let Err(e) = vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler)
        {
            tracing::error!(error = %e, "cannot install the vCPU kick handler; pause and stop will wait for guest exits");
        }
    });
}

impl RunControl {
    pub fn new() -> Arc<Self> {
        install_kick_handler();
        Arc::new(Self {
            target: AtomicU8::new(TARGET_RUN),
            inner: Mutex::new(Inner {
                exit: None,
                running: 0,
                parked: 0,
                threads: Vec::new(),
                tids: Vec::new(),
                requests: Vec::new(),
                finished_cpu_ns: 0,
            }),
            cv: Condvar::new(),
            idle: Arc::new(IdleWake::default()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn exit_handle(self: &Arc<Self>) -> ExitHandle {
        ExitHandle(self.clone())
    }

    /// The first reason the VM stopped, once it has.
    pub fn exit_reason(&self) -> Option<VmExit> {
        self.lock().exit.clone()
    }

    pub fn is_paused(&self) -> bool {
        self.target.load(Ordering::Acquire) == TARGET_PAUSE
    }

    fn kick_all(&self, inner: &Inner) {
        self.idle.wake();
        for tid in inner.threads.iter().flatten() {
            // SAFETY: the pthread is alive: a vCPU thread clears its slot under this lock
            // before it exits, and we hold the lock.
            unsafe { libc::pthread_kill(*tid, kick_signal()) };
        }
    }

    /// Stops the VM for `exit` (the first reason given wins) and kicks every vCPU.
    pub fn request_exit(&self, exit: VmExit) {
        let mut inner = self.lock();
        if inner.exit.is_none() {
            tracing::info!(reason = %exit, "VM stopping");
            inner.exit = Some(exit);
        }
        self.target.store(TARGET_STOP, Ordering::Release);
        self.kick_all(&inner);
        self.cv.notify_all();
    }

    /// Parks every vCPU outside `KVM_RUN`; returns once all are parked.
    pub fn pause(&self, timeout: Duration) -> Result<(), RunError> {
        let deadline = Instant::now() + timeout;
        let mut inner = self.lock();
        if let Some(exit) = &inner.exit {
            return Err(RunError::Stopped(exit.clone()));
        }
        self.target.store(TARGET_PAUSE, Ordering::Release);
        self.kick_all(&inner);
        while inner.parked < inner.running && inner.exit.is_none() {
            let now = Instant::now();
            if now >= deadline {
                let err = RunError::PauseTimeout {
                    parked: inner.parked,
                    running: inner.running,
                    timeout,
                };
                self.target.store(TARGET_RUN, Ordering::Release);
                self.cv.notify_all();
                return Err(err);
            }
            inner = self
                .cv
                .wait_timeout(inner, (deadline - now).min(Duration::from_millis(20)))
                .unwrap_or_else(|p| p.into_inner())
                .0;
            // A kick can be lost if it landed between a thread's check and its park;
            // resending is harmless.
            self.kick_all(&inner);
        }
        match &inner.exit {
            Some(exit) => Err(RunError::Stopped(exit.clone())),
            None => Ok(()),
        }
    }

    pub fn resume(&self) -> Result<(), RunError> {
        let inner = self.lock();
        if let Some(exit) = &inner.exit {
            return Err(RunError::Stopped(exit.clone()));
        }
        self.target.store(TARGET_RUN, Ordering::Release);
        self.cv.notify_all();
        Ok(())
    }

    /// Waits for the VM to stop; `None` if it still runs after `timeout`.
    pub fn wait_exit(&self, timeout: Option<Duration>) -> Option<VmExit> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut inner = self.lock();
        loop {
            if let Some(exit) = &inner.exit {
                return Some(exit.clone());
            }
            inner = match deadline {
                None => self.cv.wait(inner).unwrap_or_else(|p| p.into_inner()),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return None;
                    }
                    self.cv
                        .wait_timeout(inner, d - now)
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
            };
        }
    }

    /// CPU time the vCPU threads have used (guest code and exit handling), summed.
    pub fn vcpu_cpu_ns(&self) -> u64 {
        let inner = self.lock();
        let live: u64 = inner
            .tids
            .iter()
            .flatten()
            .map(|tid| {
                std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat"))
                    .ok()
                    .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
                    .unwrap_or(0)
            })
            .sum();
        inner.finished_cpu_ns + live
    }

    // ---- the vCPU side ----

    /// Called before `count` vCPU threads are spawned, so that a pause that comes before
    /// they run waits for them too.
    pub(crate) fn vcpus_starting(&self, count: usize) {
        let mut inner = self.lock();
        inner.running += count;
        inner.threads.resize(count, None);
        inner.tids.resize(count, None);
        inner.requests.resize_with(count, || None);
    }

    /// Takes back the count of vCPU threads that could not be spawned.
    pub(crate) fn vcpus_not_started(&self, count: usize) {
        let mut inner = self.lock();
        inner.running -= count;
        self.cv.notify_all();
    }

    /// Called by vCPU thread `index` when it starts; `run` is its `kvm_run`.
    pub(crate) fn vcpu_enter(&self, index: usize, run: *mut kvm_run) {
        KVM_RUN.with(|p| p.set(run));
        let mut inner = self.lock();
        // SAFETY: pthread_self and gettid have no preconditions.
        inner.threads[index] = Some(unsafe { libc::pthread_self() });
        // SAFETY: as above.
        inner.tids[index] = Some(unsafe { libc::gettid() });
    }

    /// Called by vCPU thread `index` before it returns.
    pub(crate) fn vcpu_leave(&self, index: usize) {
        KVM_RUN.with(|p| p.set(std::ptr::null_mut()));
        let spent = thread_cpu_ns();
        let mut inner = self.lock();
        inner.finished_cpu_ns += spent;
        inner.threads[index] = None;
        inner.tids[index] = None;
        inner.running -= 1;
        self.cv.notify_all();
    }

    /// Hands a parked vCPU thread some work (saving its state); the VM must be paused.
    pub fn send_request(&self, index: usize, req: VcpuRequest) -> Result<(), RunError> {
        let mut inner = self.lock();
        if let Some(exit) = &inner.exit {
            return Err(RunError::Stopped(exit.clone()));
        }
        if self.target.load(Ordering::Acquire) != TARGET_PAUSE || index >= inner.requests.len() {
            return Err(RunError::NotPaused);
        }
        inner.requests[index] = Some(req);
        self.cv.notify_all();
        Ok(())
    }

    /// Called by vCPU thread `index` before every `KVM_RUN`: parks while paused, doing
    /// the work sent to it meanwhile; false when the vCPU must stop. `work` first gets
    /// [`Gate::Parking`], before the thread counts as parked, so whatever it finishes then
    /// (a port or MMIO access KVM completes only on re-entry) is in any state saved while
    /// the VM is paused; then each request.
    pub(crate) fn vcpu_gate(&self, index: usize, mut work: impl FnMut(Gate)) -> bool {
        match self.target.load(Ordering::Acquire) {
            TARGET_RUN => return true,
            TARGET_STOP => return false,
            _ => {}
        }
        work(Gate::Parking);
        let mut inner = self.lock();
        inner.parked += 1;
        self.cv.notify_all();
        while self.target.load(Ordering::Acquire) == TARGET_PAUSE {
            if let Some(req) = inner.requests.get_mut(index).and_then(Option::take) {
                drop(inner);
                work(Gate::Request(req));
                inner = self.lock();
                continue;
            }
            inner = self.cv.wait(inner).unwrap_or_else(|p| p.into_inner());
        }
        inner.parked -= 1;
        self.target.load(Ordering::Acquire) == TARGET_RUN
    }
}

fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for the kernel to fill.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if r != 0 {
        return 0;
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_exit_reason_wins() {
        let ctl = RunControl::new();
        assert_eq!(ctl.wait_exit(Some(Duration::from_millis(1))), None);
        ctl.exit_handle().request(VmExit::Reset);
        ctl.request_exit(VmExit::Stopped);
        assert_eq!(ctl.exit_reason(), Some(VmExit::Reset));
        assert_eq!(ctl.wait_exit(None), Some(VmExit::Reset));
        assert_eq!(
            ctl.pause(Duration::from_millis(10)),
            Err(RunError::Stopped(VmExit::Reset))
        );
        assert!(ctl.resume().is_err());
    }

    #[test]
    fn pause_waits_for_every_running_vcpu_to_park() {
        let ctl = RunControl::new();
        ctl.vcpus_starting(2);
        let spins = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let threads: Vec<_> = (0..2)
            .map(|i| {
                let ctl = ctl.clone();
                let spins = spins.clone();
                std::thread::spawn(move || {
                    ctl.vcpu_enter(i, std::ptr::null_mut());
                    while ctl.vcpu_gate(i, |_| {}) {
                        spins.fetch_add(1, Ordering::Relaxed);
                        std::thread::sleep(Duration::from_micros(50));
                    }
                    ctl.vcpu_leave(i);
                })
            })
            .collect();
        while spins.load(Ordering::Relaxed) < 10 {
            std::thread::yield_now();
        }
        ctl.pause(Duration::from_secs(5)).unwrap();
        let frozen = spins.load(Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(spins.load(Ordering::Relaxed), frozen, "paused vCPUs ran");
        ctl.resume().unwrap();
        while spins.load(Ordering::Relaxed) < frozen + 10 {
            std::thread::yield_now();
        }
        ctl.request_exit(VmExit::Stopped);
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(ctl.lock().running, 0);
    }
}
