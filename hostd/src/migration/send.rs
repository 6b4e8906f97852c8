//! The source side: from a running VM to a running VM on the destination.
//!
//! 1. Connect over TLS (only the destination host's certificate is accepted), Hello
//!    (token, VM shape, guest CPUID), wait for Accept.
//! 2. Turn on dirty logging; send every page (zero pages as a count).
//! 3. Rounds: take the dirty pages (KVM's log ORed with the VMM's own writes), estimate
//!    how long sending them with the VM paused would take at the link rate measured so
//!    far; if that fits the downtime budget, switch over, else send them and go again.
//!    With auto-converge, a guest that dirties faster than half the link rate is
//!    throttled: 20 % of its vCPU time, then 10 % more each round, up to 99 %.
//! 4. Switchover: pause, save the state (devices finish in-flight disk requests first),
//!    send the last dirty pages and the state, wait until the destination has built the
//!    VM, send Go, wait for Resumed.
//!
//! Any error before Go resumes the VM here and turns dirty logging off again.

use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use proto::host::{MigrationPhase, MigrationProgress};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::conn::{Conn, FrameSink, Tls};
use super::tls::StreamTls;
use super::wire::{self, Frame, Hello, PAGE};
use super::{MigrationError, state};
use crate::vmm::{DirtyRegion, GuestRam, RunControl, Vm};

/// Pages per Pages frame.
const RUN_PAGES: usize = 256;
const IO_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the destination may take to build the VM from the state.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(30);
const PAUSE_TIMEOUT: Duration = Duration::from_secs(10);
/// Auto-converge takes this share of vCPU time first, then this much more each round
/// that still does not converge, up to the maximum (QEMU's steps).
const THROTTLE_FIRST: u32 = 20;
const THROTTLE_STEP: u32 = 10;
const THROTTLE_MAX: u32 = 99;
const THROTTLE_PERIOD: Duration = Duration::from_millis(50);
const REPORT_EVERY: Duration = Duration::from_millis(200);
/// A last round this small is sent paused however fast the dirty set shrinks.
const SMALL_ROUND: u64 = 256 << 10;
/// The copies of pages sent in dirty rounds (the base of their deltas) take at most this
/// much memory, and at most an eighth of the guest's.
const CACHE_MAX: u64 = 64 << 20;

#[derive(Debug, Clone)]
pub struct SendOptions {
    pub vm_id: String,
    pub token: String,
    /// host:port of the destination's migration listener.
    pub destination: String,
    /// The destination host: its certificate must name it.
    pub destination_host: String,
    /// This host's credentials.
    pub tls: StreamTls,
    /// The pause the guest may see at switchover; zero never fits (pre-copy runs to
    /// `max_rounds` and fails: a way to probe a guest without moving it).
    pub downtime_budget: Duration,
    pub max_rounds: u32,
    pub timeout: Duration,
    pub auto_converge: bool,
    /// Bytes per second; 0: no limit.
    pub bandwidth_limit: u64,
    /// The stream version to speak: [`wire::speak`] of what the destination reads.
    pub stream_version: u16,
}

/// How a completed migration went.
#[derive(Debug, Clone)]
pub struct Sent {
    /// From pausing here to the destination's Resumed.
    pub downtime: Duration,
    pub total: Duration,
    pub rounds: u32,
    pub bytes_sent: u64,
    /// Resumed arrived. If not, Go was sent but the destination's answer was lost: the
    /// VM must still not run here again.
    pub confirmed: bool,
    pub throttle_percent: u32,
    /// Pages sent as deltas, and pages of dirty sets not sent (unchanged), in all.
    pub delta_pages: u64,
    pub same_pages: u64,
    /// Where the downtime went.
    pub switchover: Switchover,
}

/// The steps of the downtime, each from the end of the one before.
#[derive(Debug, Clone, Default)]
pub struct Switchover {
    /// Until every vCPU was out of the guest.
    pub pause: Duration,
    /// Saving vCPU and device state and sending the last dirty pages and the state.
    pub last_delta: Duration,
    /// Until the destination had applied the state to its prepared VM (Restored).
    pub restore: Duration,
    /// Go until the destination's vCPUs ran (Resumed).
    pub resume: Duration,
    /// Guest bytes sent while paused (the last dirty set).
    pub last_delta_bytes: u64,
    /// Guest bytes of each dirty round sent while the guest ran, in order.
    pub round_bytes: Vec<u64>,
    /// Of the last dirty set: pages sent as deltas, and pages not sent at all (written
    /// with what they held).
    pub last_delta_pages: u64,
    pub last_same_pages: u64,
}

/// What was sent last of pages that went in dirty rounds, as the destination has them:
/// the base of their next delta. Bounded, as QEMU's XBZRLE cache, but a map rather than
/// direct-mapped (a guest rewriting whole pages would push out the hot pages that change
/// a few words). It must keep those hot pages while a round's other pages stream past:
/// - a page put again (dirty in another round) is marked, and a full cache evicts by
///   CLOCK: the hand passes over marked pages once, clearing the mark, and takes the
///   first unmarked one;
/// - a round takes in at most half the cache as new pages (the rest go whole, not kept),
///   so one round's scan of once-written pages cannot sweep the whole cache and the
///   hand visits a slot at most about once a round: a page dirty every round is marked
///   again before the hand comes back to it;
/// - a page left out for that in one round and dirty again in the next is taken in then,
///   whatever the round has taken: it is hot, wherever it lies behind the scan.
struct PageCache {
    /// Frame number to slot.
    slots: std::collections::HashMap<u64, usize>,
    /// Frame number + 1 of the page in each slot; 0: empty.
    owners: Vec<u64>,
    /// Put again since the hand last passed.
    marked: Vec<bool>,
    data: Vec<u8>,
    /// The CLOCK hand: the slot looked at next for a new page.
    hand: usize,
    /// New pages taken in this round.
    taken: usize,
    /// Pages left out in the last round, and in this one (at most `LEFT_OUT_MAX`).
    left_out: [std::collections::HashSet<u64>; 2],
}

/// How many left-out pages a round remembers, in cache sizes.
const LEFT_OUT_MAX: usize = 4;

impl PageCache {
    fn new(memory_bytes: u64) -> Self {
        let slots = (memory_bytes / 8).min(CACHE_MAX).max(PAGE as u64) as usize / PAGE;
        // Zeroed allocations are mapped lazily: only slots used take memory.
        Self {
            slots: std::collections::HashMap::new(),
            owners: vec![0; slots],
            marked: vec![false; slots],
            data: vec![0; slots * PAGE],
            hand: 0,
            taken: 0,
            left_out: Default::default(),
        }
    }

    /// A new dirty round: it may take in new pages again.
    fn new_round(&mut self) {
        self.taken = 0;
        self.left_out.swap(0, 1);
        self.left_out[1].clear();
    }

    fn get(&self, pfn: u64) -> Option<&[u8]> {
        let i = *self.slots.get(&pfn)?;
        Some(&self.data[i * PAGE..(i + 1) * PAGE])
    }

    /// Keeps `page` as what the destination has of frame `pfn`: always when the frame is
    /// kept already (its copy must stay what was sent), and while the round may take
    /// another page otherwise.
    fn put(&mut self, pfn: u64, page: &[u8]) {
        let i = match self.slots.get(&pfn) {
            Some(&i) => {
                self.marked[i] = true;
                i
            }
            None => {
                if self.taken >= self.owners.len().div_ceil(2) && !self.left_out[0].contains(&pfn) {
                    if self.left_out[1].len() < LEFT_OUT_MAX * self.owners.len() {
                        self.left_out[1].insert(pfn);
                    }
                    return;
                }
                self.taken += 1;
                let i = self.victim();
                if let Some(old) = self.owners[i].checked_sub(1) {
                    self.slots.remove(&old);
                }
                self.owners[i] = pfn + 1;
                self.marked[i] = false;
                self.slots.insert(pfn, i);
                i
            }
        };
        self.data[i * PAGE..(i + 1) * PAGE].copy_from_slice(page);
    }

    /// The slot a new page takes: the first empty or unmarked one from the hand on,
    /// clearing the marks it passes (one turn clears them all, so it ends).
    fn victim(&mut self) -> usize {
        loop {
            let i = self.hand;
            self.hand = (i + 1) % self.owners.len();
            if self.owners[i] != 0 && self.marked[i] {
                self.marked[i] = false;
                continue;
            }
            return i;
        }
    }
}

/// How a page of a dirty round goes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum PageKind {
    Zero,
    Whole,
    /// In the Delta frame being built, or not at all (unchanged).
    Delta,
}

/// Pauses the vCPUs for `percent` of every period, on a thread of its own.
struct Throttle {
    percent: Arc<AtomicU32>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Throttle {
    fn new(ctl: Arc<RunControl>) -> Self {
        let percent = Arc::new(AtomicU32::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (percent.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("mig-throttle".into())
            .spawn(move || {
                while !s.load(Ordering::Acquire) {
                    let pct = p.load(Ordering::Acquire).min(THROTTLE_MAX);
                    let off = THROTTLE_PERIOD * pct / 100;
                    if pct > 0 && ctl.pause(PAUSE_TIMEOUT).is_ok() {
                        std::thread::sleep(off);
                        let _ = ctl.resume();
                    }
                    std::thread::sleep(THROTTLE_PERIOD - off);
                }
            })
            .ok();
        Self {
            percent,
            stop,
            thread,
        }
    }

    fn step_up(&self) -> u32 {
        let now = match self.percent.load(Ordering::Acquire) {
            0 => THROTTLE_FIRST,
            p => (p + THROTTLE_STEP).min(THROTTLE_MAX),
        };
        self.percent.store(now, Ordering::Release);
        now
    }

    fn get(&self) -> u32 {
        self.percent.load(Ordering::Acquire)
    }

    /// Stops throttling; the vCPUs run freely when this returns.
    fn finish(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        self.finish();
    }
}

/// What bounds a pass over memory, from [`SendOptions`] (or a save's own).
#[derive(Debug, Clone, Copy)]
struct Limits {
    timeout: Duration,
    bandwidth_limit: u64,
    downtime_budget: Duration,
    max_rounds: u32,
}

/// Memory and state out into `conn`: the migration stream, or a saved-state volume.
struct Sender<'a, C = Conn> {
    vm: &'a Vm,
    mem: GuestRam,
    conn: C,
    limits: Limits,
    cancel: &'a AtomicBool,
    started: Instant,
    buf: Vec<u8>,
    /// Pages sent in dirty rounds, when the stream has Delta frames.
    cache: Option<PageCache>,
    /// Whether pages sent go into the cache (not for the last dirty set: nothing follows).
    keep: bool,
    /// The Delta frame being built.
    delta: Vec<u8>,
    kinds: Vec<PageKind>,
    /// Pages sent as deltas, and pages not sent (unchanged), so far.
    delta_pages: u64,
    same_pages: u64,
    progress: MigrationProgress,
    report: &'a mut dyn FnMut(&MigrationProgress),
    last_report: Instant,
}

fn is_zero(page: &[u8]) -> bool {
    page.chunks_exact(8).all(|w| w == [0u8; 8])
}

impl<'a, C: FrameSink> Sender<'a, C> {
    fn new(
        vm: &'a Vm,
        conn: C,
        limits: Limits,
        cancel: &'a AtomicBool,
        started: Instant,
        progress: MigrationProgress,
        report: &'a mut dyn FnMut(&MigrationProgress),
    ) -> Self {
        Self {
            vm,
            mem: vm.memory().clone(),
            conn,
            limits,
            cancel,
            started,
            buf: Vec::with_capacity(RUN_PAGES * PAGE),
            cache: None,
            keep: false,
            delta: Vec::new(),
            kinds: Vec::with_capacity(RUN_PAGES),
            delta_pages: 0,
            same_pages: 0,
            progress,
            report,
            last_report: Instant::now(),
        }
    }

    fn check(&self) -> Result<(), MigrationError> {
        if self.cancel.load(Ordering::Acquire) {
            return Err(MigrationError::Cancelled);
        }
        if self.started.elapsed() > self.limits.timeout {
            return Err(MigrationError::Timeout {
                secs: self.limits.timeout.as_secs(),
            });
        }
        Ok(())
    }

    fn report(&mut self, force: bool) {
        if force || self.last_report.elapsed() >= REPORT_EVERY {
            self.last_report = Instant::now();
            self.progress.bytes_sent = self.conn.sent();
            self.progress.total_time_ms = self.started.elapsed().as_millis() as u32;
            (self.report)(&self.progress);
        }
    }

    /// Sends `pages` pages from `gpa`: runs of zero pages as Zero frames, pages the
    /// destination has (in the cache) as a Delta frame of what changed, the others as
    /// Pages frames.
    fn send_run(&mut self, gpa: u64, pages: usize) -> Result<(), MigrationError> {
        let len = pages * PAGE;
        self.buf.resize(len, 0);
        self.mem
            .read_slice(&mut self.buf[..len], GuestAddress(gpa))
            .map_err(MigrationError::Memory)?;
        let buf = std::mem::take(&mut self.buf);
        let mut kinds = std::mem::take(&mut self.kinds);
        kinds.clear();
        for (i, page) in buf[..len].chunks_exact(PAGE).enumerate() {
            let kind = self.classify(gpa + (i * PAGE) as u64, page);
            kinds.push(kind);
        }
        let r: Result<(), MigrationError> = (|| {
            let mut i = 0;
            while i < pages {
                let kind = kinds[i];
                let mut j = i + 1;
                while j < pages && kinds[j] == kind {
                    j += 1;
                }
                let at = gpa + (i * PAGE) as u64;
                match kind {
                    PageKind::Zero => self.conn.send(&Frame::Zero {
                        gpa: at,
                        pages: (j - i) as u32,
                    })?,
                    PageKind::Whole => self.conn.send_pages(at, &buf[i * PAGE..j * PAGE])?,
                    PageKind::Delta => {}
                }
                i = j;
            }
            if !self.delta.is_empty() {
                self.conn.send_delta(&self.delta)?;
                self.delta.clear();
            }
            Ok(())
        })();
        self.buf = buf;
        self.kinds = kinds;
        r?;
        self.limit_bandwidth();
        Ok(())
    }

    /// How the page at `gpa` goes, given what the destination has of it; a delta is
    /// added to the frame being built.
    fn classify(&mut self, gpa: u64, page: &[u8]) -> PageKind {
        let zero = is_zero(page);
        let Some(cache) = self.cache.as_mut() else {
            return if zero {
                PageKind::Zero
            } else {
                PageKind::Whole
            };
        };
        let pfn = gpa / PAGE as u64;
        let before = self.delta.len();
        let delta = !zero
            && cache
                .get(pfn)
                .is_some_and(|old| wire::encode_delta(gpa, old, page, &mut self.delta));
        if delta {
            if self.delta.len() == before {
                self.same_pages += 1;
            } else {
                self.delta_pages += 1;
            }
        }
        if self.keep {
            cache.put(pfn, page);
        }
        match (delta, zero) {
            (true, _) => PageKind::Delta,
            (false, true) => PageKind::Zero,
            (false, false) => PageKind::Whole,
        }
    }

    fn limit_bandwidth(&self) {
        let limit = self.limits.bandwidth_limit;
        if limit == 0 {
            return;
        }
        let due = Duration::from_secs_f64(self.conn.sent() as f64 / limit as f64);
        let spent = self.started.elapsed();
        if due > spent {
            std::thread::sleep(due - spent);
        }
    }

    fn full_pass(&mut self) -> Result<(), MigrationError> {
        let regions: Vec<(u64, u64)> = self
            .mem
            .iter()
            .map(|r| (r.start_addr().0, r.len()))
            .collect();
        let pagemap = std::fs::File::open("/proc/self/pagemap").ok();
        let mut entries = vec![0u8; RUN_PAGES * 8];
        for (start, len) in regions {
            let pages = (len as usize) / PAGE;
            let mut p = 0;
            while p < pages {
                self.check()?;
                let n = RUN_PAGES.min(pages - p);
                let gpa = start + (p * PAGE) as u64;
                if untouched(pagemap.as_ref(), &self.mem, gpa, n, &mut entries) {
                    self.conn.send(&Frame::Zero {
                        gpa,
                        pages: n as u32,
                    })?;
                } else {
                    self.send_run(gpa, n)?;
                }
                p += n;
                self.report(false);
            }
        }
        Ok(())
    }

    /// Sends every page set in `dirty`.
    fn send_dirty(&mut self, dirty: &[DirtyRegion]) -> Result<(), MigrationError> {
        for region in dirty {
            let pages = (region.len as usize) / PAGE;
            let bit = |p: usize| region.bits[p / 64] & (1 << (p % 64)) != 0;
            let mut p = 0;
            while p < pages {
                if region.bits[p / 64] == 0 {
                    p = (p / 64 + 1) * 64;
                    continue;
                }
                if !bit(p) {
                    p += 1;
                    continue;
                }
                let mut q = p + 1;
                while q < pages && q - p < RUN_PAGES && bit(q) {
                    q += 1;
                }
                self.send_run(region.start + (p * PAGE) as u64, q - p)?;
                p = q;
            }
            self.check()?;
        }
        Ok(())
    }
}

/// Whether none of the `n` pages at `gpa` was ever touched: the guest RAM is a private
/// anonymous mapping, so a page that is neither present nor swapped reads as zeros and
/// need not be read (most of an idle guest's memory; reading it would also make the
/// host back it). Asks /proc/self/pagemap; false whenever it cannot tell.
fn untouched(
    pagemap: Option<&std::fs::File>,
    mem: &GuestRam,
    gpa: u64,
    n: usize,
    entries: &mut [u8],
) -> bool {
    use std::os::unix::fs::FileExt;
    const PRESENT: u64 = 1 << 63;
    const SWAPPED: u64 = 1 << 62;
    let (Some(f), Ok(host)) = (pagemap, mem.get_host_address(GuestAddress(gpa))) else {
        return false;
    };
    let offset = (host as usize / PAGE) as u64 * 8;
    let buf = &mut entries[..n * 8];
    if f.read_exact_at(buf, offset).is_err() {
        return false;
    }
    buf.chunks_exact(8)
        .all(|e| u64::from_le_bytes(e.try_into().expect("8 bytes")) & (PRESENT | SWAPPED) == 0)
}

fn merge(into: &mut [DirtyRegion], more: Vec<DirtyRegion>) {
    for (a, b) in into.iter_mut().zip(more) {
        for (x, y) in a.bits.iter_mut().zip(b.bits) {
            *x |= y;
        }
    }
}

fn dirty_bytes(d: &[DirtyRegion]) -> u64 {
    d.iter().map(DirtyRegion::count).sum::<u64>() * PAGE as u64
}

/// Completes the TLS handshake, so a destination that is not the host named is refused
/// before the Hello (and its token) is sent.
fn handshake(mut stream: TcpStream, opts: &SendOptions) -> Result<Tls, MigrationError> {
    let failed = |source| MigrationError::Handshake {
        addr: opts.destination.clone(),
        host: opts.destination_host.clone(),
        source,
    };
    stream
        .set_read_timeout(Some(CONNECT_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(CONNECT_TIMEOUT)))
        .map_err(failed)?;
    let mut tls = opts.tls.connect(&opts.destination_host)?;
    while tls.is_handshaking() {
        tls.complete_io(&mut stream).map_err(failed)?;
    }
    Ok(Tls::Client(rustls::StreamOwned::new(tls, stream)))
}

/// Moves `vm` (running) to the destination. On success the VM here is paused and must
/// be stopped, never resumed; on error it runs here as before. `base` carries the ids
/// for progress reports, which go to `report`.
pub fn send(
    vm: &Vm,
    opts: &SendOptions,
    cancel: &AtomicBool,
    base: MigrationProgress,
    report: &mut dyn FnMut(&MigrationProgress),
) -> Result<Sent, MigrationError> {
    let started = Instant::now();
    let mut progress = base;
    progress.memory_total_bytes = vm.memory_bytes();
    progress.phase = MigrationPhase::CheckingCpu as i32;
    report(&progress);
    let addr = opts
        .destination
        .to_socket_addrs()
        .map_err(|source| MigrationError::Connect {
            addr: opts.destination.clone(),
            source,
        })?
        .next()
        .ok_or_else(|| MigrationError::Connect {
            addr: opts.destination.clone(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no address"),
        })?;
    let stream = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT).map_err(|source| {
        MigrationError::Connect {
            addr: opts.destination.clone(),
            source,
        }
    })?;
    let mut conn = Conn::new(handshake(stream, opts)?, IO_TIMEOUT)?;
    conn.send(&Frame::Hello(Hello {
        version: opts.stream_version,
        token: opts.token.clone(),
        vm_id: opts.vm_id.clone(),
        memory_bytes: vm.memory_bytes(),
        vcpus: vm.vcpu_count(),
        cpuid: vm.guest_cpuid().to_vec(),
    }))?;
    match conn.recv()? {
        Frame::Accept => {}
        other => return Err(MigrationError::unexpected("Accept", &other)),
    }

    vm.set_dirty_logging(true)?;
    let limits = Limits {
        timeout: opts.timeout,
        bandwidth_limit: opts.bandwidth_limit,
        downtime_budget: opts.downtime_budget,
        max_rounds: opts.max_rounds,
    };
    let mut s = Sender::new(vm, conn, limits, cancel, started, progress, report);
    let mut throttle = opts.auto_converge.then(|| Throttle::new(vm.run_control()));
    let mut paused = false;
    let result = run(&mut s, &mut throttle, &mut paused, opts.stream_version);
    if let Some(t) = throttle.as_mut() {
        t.finish();
    }
    match result {
        Ok(sent) => Ok(sent),
        Err(e) => {
            // Not committed: the VM goes on here.
            if paused && let Err(r) = vm.resume() {
                tracing::error!(error = %r, "cannot resume the VM after a failed migration");
            }
            if let Err(d) = vm.set_dirty_logging(false) {
                tracing::warn!(error = %d, "cannot turn dirty logging off");
            }
            Err(e)
        }
    }
}

impl Sender<'_, Conn> {
    /// Waits until the destination has applied everything sent so far.
    fn sync(&mut self) -> Result<(), MigrationError> {
        self.conn.send(&Frame::Sync)?;
        match self.conn.recv()? {
            Frame::Synced => Ok(()),
            other => Err(MigrationError::unexpected("Synced", &other)),
        }
    }
}

fn run(
    s: &mut Sender<Conn>,
    throttle: &mut Option<Throttle>,
    paused: &mut bool,
    version: u16,
) -> Result<Sent, MigrationError> {
    s.progress.phase = MigrationPhase::FullCopy as i32;
    s.report(true);
    let mut last_take = Instant::now();
    let pass_start = Instant::now();
    let sent_before = s.conn.sent;
    s.full_pass()?;
    // Every pass ends with the destination caught up (Sync): the next dirty set then holds
    // everything the guest wrote while the pass really took, and the last one is taken
    // right before the pause. (Synced only before the pause, the guest wrote on while the
    // destination drained its socket buffers, and all of that went paused: 0.6 MB of a
    // 1.4 MB last delta for a Linux guest in the emulated host.)
    s.sync()?;
    if version >= wire::DELTA_VERSION {
        // From now on a page sent is kept, so that sent again it goes as a delta: a
        // guest's hot pages change a few words between rounds.
        s.cache = Some(PageCache::new(s.vm.memory_bytes()));
        s.keep = true;
    }
    // Link rate: bytes on the wire per second, from the last pass that moved enough to
    // measure, until the destination had them. (Zero pages cost almost nothing to send, so
    // pages per second would promise far more than a round of dirty pages, which are
    // rarely zero, gets.)
    let mut link_rate =
        ((s.conn.sent - sent_before) as f64 / pass_start.elapsed().as_secs_f64().max(1e-3)) as u64;
    let budget_us = s.limits.downtime_budget.as_micros() as u64;
    // Guest bytes the last pass covered (the full pass: all of RAM).
    let mut last_sent = s.vm.memory_bytes();
    let mut round = 0u32;
    let mut round_bytes = Vec::new();
    let pending = loop {
        s.check()?;
        let dirty = s.vm.take_dirty_pages()?;
        if let Some(c) = s.cache.as_mut() {
            c.new_round();
        }
        let interval = last_take.elapsed();
        last_take = Instant::now();
        let bytes = dirty_bytes(&dirty);
        let dirty_rate = (bytes as f64 / interval.as_secs_f64().max(1e-3)) as u64;
        let expected_us = bytes * 1_000_000 / link_rate.max(1);
        let expected_ms = expected_us.div_ceil(1000);
        s.progress.phase = MigrationPhase::DirtyRounds as i32;
        s.progress.round = round;
        s.progress.dirty_bytes_last_round = bytes;
        s.progress.dirty_rate_bytes_per_second = dirty_rate;
        s.progress.link_bytes_per_second = link_rate;
        s.progress.expected_downtime_ms = expected_ms as u32;
        s.progress.throttle_percent = throttle.as_ref().map_or(0, Throttle::get);
        s.report(true);
        // A zero budget never fits: pre-copy runs to the round limit (for probing a
        // guest's dirty rate; the RPC turns 0 into the default budget).
        let fits = budget_us > 0 && expected_us <= budget_us;
        // While the dirty set still shrinks, one more round sent with the guest running
        // costs less than sending this one paused: go on until it is small or shrinks by
        // less than a third. (Each such round is at most two thirds of the one before,
        // so there are few.)
        let shrinking =
            bytes > SMALL_ROUND && bytes.saturating_mul(3) <= last_sent.saturating_mul(2);
        if fits && (!shrinking || round >= s.limits.max_rounds) {
            break dirty;
        }
        if round >= s.limits.max_rounds {
            return Err(MigrationError::NoConvergence {
                rounds: round,
                dirty_bytes: bytes,
                expected_ms,
                budget_ms: budget_us / 1000,
            });
        }
        if let Some(t) = throttle.as_ref()
            && round >= 1
            && dirty_rate > link_rate / 2
        {
            let pct = t.step_up();
            tracing::info!(
                round,
                dirty_rate,
                link_rate,
                throttle = pct,
                "auto-converge"
            );
        }
        let (t0, sent0) = (Instant::now(), s.conn.sent);
        s.send_dirty(&dirty)?;
        s.sync()?;
        round_bytes.push(bytes);
        let took = t0.elapsed().as_secs_f64();
        let wire = s.conn.sent - sent0;
        last_sent = bytes;
        if wire >= (4 << 20) && took > 0.0 {
            link_rate = (wire as f64 / took) as u64;
        }
        round += 1;
    };

    // Switchover.
    if let Some(t) = throttle.as_mut() {
        t.finish();
    }
    s.progress.phase = MigrationPhase::Switchover as i32;
    s.report(true);
    let paused_at = Instant::now();
    let mut steps = Switchover::default();
    let mut step = paused_at;
    let mut lap = |d: &mut Duration| {
        *d = step.elapsed();
        step = Instant::now();
    };
    s.vm.pause(PAUSE_TIMEOUT)?;
    *paused = true;
    lap(&mut steps.pause);
    let mut pending = pending;
    let snapshot = s.vm.save_state()?;
    merge(&mut pending, s.vm.take_dirty_pages()?);
    steps.last_delta_bytes = dirty_bytes(&pending);
    steps.round_bytes = round_bytes;
    s.keep = false;
    let (deltas, same) = (s.delta_pages, s.same_pages);
    s.send_dirty(&pending)?;
    steps.last_delta_pages = s.delta_pages - deltas;
    steps.last_same_pages = s.same_pages - same;
    s.conn.send(&Frame::State(state::encode(&snapshot)))?;
    lap(&mut steps.last_delta);
    s.conn.set_timeout(RESTORE_TIMEOUT);
    match s.conn.recv()? {
        Frame::Restored => {}
        other => return Err(MigrationError::unexpected("Restored", &other)),
    }
    lap(&mut steps.restore);
    if s.cancel.load(Ordering::Acquire) {
        return Err(MigrationError::Cancelled);
    }
    // The point of no return: from here the guest runs only on the destination.
    s.conn.send(&Frame::Go)?;
    let confirmed = match s.conn.recv() {
        Ok(Frame::Resumed) => true,
        Ok(other) => {
            tracing::error!(frame = ?other, "after Go the destination answered something else");
            false
        }
        Err(e) => {
            tracing::error!(error = %e, "after Go the destination's Resumed was lost");
            false
        }
    };
    lap(&mut steps.resume);
    let downtime = paused_at.elapsed();
    Ok(Sent {
        switchover: steps,
        downtime,
        total: s.started.elapsed(),
        rounds: round,
        bytes_sent: s.conn.sent,
        confirmed,
        throttle_percent: throttle.as_ref().map_or(0, Throttle::get),
        delta_pages: s.delta_pages,
        same_pages: s.same_pages,
    })
}

/// Writes the memory of `vm`, which must be paused, as one full pass of Pages and Zero
/// frames, then `snapshot` as the State frame, into `sink`; gives the sink back. What a
/// save to a volume writes (`super::saved`): the frames a migration's destination
/// applies, with no dirty rounds, since nothing changes while the vCPUs are paused.
pub(super) fn write_paused<C: FrameSink>(
    vm: &Vm,
    sink: C,
    snapshot: &crate::vmm::VmSnapshot,
    cancel: &AtomicBool,
) -> Result<C, MigrationError> {
    let mut report = |_: &MigrationProgress| {};
    let limits = Limits {
        timeout: super::DEFAULT_TIMEOUT,
        bandwidth_limit: 0,
        downtime_budget: Duration::ZERO,
        max_rounds: 0,
    };
    let progress = MigrationProgress::default();
    let mut s = Sender::new(
        vm,
        sink,
        limits,
        cancel,
        Instant::now(),
        progress,
        &mut report,
    );
    s.full_pass()?;
    s.conn.send(&Frame::State(state::encode(snapshot)))?;
    Ok(s.conn)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hot_pages_stay_cached_while_rounds_of_once_written_pages_stream_past() {
        let mut c = PageCache::new(64 * 8 * PAGE as u64);
        assert_eq!(c.owners.len(), 64);
        // One hot page before each round's scan of 200 once-written pages, one after it.
        let (before, after) = (3u64, 1_000_000u64);
        let mut cold = 10_000u64;
        for round in 0..12u8 {
            c.new_round();
            c.put(before, &[round; PAGE]);
            for _ in 0..200 {
                c.put(cold, &[0xcc; PAGE]);
                cold += 1;
            }
            c.put(after, &[round; PAGE]);
            // Kept from the round it came in (the one after the scan, left out once,
            // from the next), and always as put last.
            assert_eq!(c.get(before).map(|p| p[0]), Some(round), "round {round}");
            if round >= 1 {
                assert_eq!(c.get(after).map(|p| p[0]), Some(round), "round {round}");
            }
            assert!(c.slots.len() <= 64);
            assert!(c.left_out[1].len() <= LEFT_OUT_MAX * 64);
        }
        // Every slot the map names holds that page.
        for (&pfn, &i) in &c.slots {
            assert_eq!(c.owners[i], pfn + 1);
        }
    }
}
