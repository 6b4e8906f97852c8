//! The guest network benchmark behind `bench/net.sh`: the test guest's virtio-net driver
//! under hostd (`hostd run --net tap=..`) against QEMU's userspace virtio-net
//! (`virtio-net-device` on `-M microvm,acpi=off`, `-netdev tap,vhost=off`), the same guest
//! ELF, command line, memory and vCPU, one VM at a time, taking turns. Each VMM runs in a
//! network namespace of its own made here, whose end of the tap is addressed like
//! hostd/tests/guest_net.rs does; every namespace goes on every exit (a drop guard; ones a
//! killed run left are removed at the next start).
//!
//! - guest → host UDP: the guest's `udp_send` at 64- and 1,448-byte payloads as fast as
//!   its ring allows; a socket in the namespace counts the datagrams and their payload,
//!   timed by the kernel's receive timestamps from the first to the last one
//!   (`(received - 1) / span`), median of RUNS boots each way;
//! - host → guest → host UDP echo round trips (`udp_echo`), sequential, 64-byte payloads,
//!   RTT_WARMUP unmeasured then RTT_EACH measured per boot, RUNS boots each way; p50, p99;
//!   also of hostd with busy polling off (`poll_us=0`), a reference row for all three
//!   figures: what the VIF's watching window (on by default, as any VIF of hostd's) is
//!   worth to a round trip, and whether its spinning costs a stream anything on a host
//!   with no idle CPU;
//! - echoes lost at 1,000 pps over one live migration: two VMs of one VMM in one
//!   namespace, their taps on one bridge carrying the namespace's address; one echo
//!   request a millisecond from 1 s before the migration to 1 s after it. Ours: this
//!   process's VMs over the real migration stream (common::migrate_hop_then), the
//!   destination on a second tap with the same MAC, announcing the MAC as the VM process
//!   does once it runs; QEMU: `-incoming tcp:` on the second tap, QMP `migrate`, its own
//!   self-announce.
//!
//! The guest waits for frames by polling 200 µs, then parking on hostd's idle port; QEMU
//! has no such port, so there the guest spins (its default command line, the same for both).
//! QEMU's microvm gets an i8042 so the guest's shutdown check is one port read there too.
//!
//! `net_bench HOSTD RUNS` prints the table, `RESULT <who> pps=.. mb_s=..
//! rtt_p50_us=.. rtt_p99_us=.. lost=..` lines (hostd-nopoll's with `lost=none`) and a
//! `REFERENCE hostd-nopoll rtt_p50_us=.. rtt_p99_us=..` line (`lost=none` when the migration could not
//! be measured, with a `MIGRATION <who> failed: ..` line saying why).

mod common;

use std::collections::BTreeSet;
use std::fs::File;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hostd::console::Console;
use hostd::testguest;
use hostd::vmm::{BootProtocol, BootSpec, Vm, VmSpec};

use common::{QemuVm, free_port, hosts, median, migrate_hop_then, percentile};

const HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 1);
const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 2);
const MAC: &str = "02:00:00:4e:00:02";
const TAP: &str = "nbt0";
const BRIDGE: &str = "nbbr0";
const SINK_PORT: u16 = 9000;
const ECHO_PORT: u16 = 7;
const MIB: u64 = 64;
const WAIT: Duration = Duration::from_secs(30);
/// Datagrams per guest → host run: long enough (about a second or more at either size
/// on this machine) that start-up does not count.
const SMALL_COUNT: u64 = 300_000;
const LARGE_COUNT: u64 = 150_000;
const RTT_WARMUP: usize = 100;
const RTT_EACH: usize = 400;
const ECHO_PPS: u64 = 1000;
/// Echo traffic before and after the migration.
const MIGRATION_MARGIN: Duration = Duration::from_secs(1);
const NS_PREFIX: &str = "nbench";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Vmm {
    Hostd,
    Qemu,
    /// hostd with its VIF's busy polling off (`poll_us=0`): the round trip's reference.
    HostdNoPoll,
}

impl Vmm {
    fn name(self) -> &'static str {
        match self {
            Vmm::Hostd => "hostd",
            Vmm::Qemu => "qemu",
            Vmm::HostdNoPoll => "hostd-nopoll",
        }
    }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("running ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace of this run; deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn new(tag: &str) -> Netns {
        let name = format!("{NS_PREFIX}{}-{tag}", std::process::id());
        ip(&["netns", "add", &name]);
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        ip(&all);
    }

    fn has_link(&self, dev: &str) -> bool {
        Command::new("ip")
            .args(["-n", &self.name, "link", "show", dev])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Waits until `dev` exists (or, with `present` false, is gone).
    fn wait_link(&self, dev: &str, present: bool) {
        let deadline = Instant::now() + WAIT;
        while self.has_link(dev) != present {
            assert!(
                Instant::now() < deadline,
                "{dev} in {}: still {}",
                self.name,
                if present { "missing" } else { "there" }
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `program` started inside the namespace (`ip netns exec` execs it: same pid).
    fn exec(&self, program: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Runs `f` on a thread moved into the namespace; sockets it opens live there.
    fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let ns = File::open(format!("/run/netns/{}", self.name)).unwrap();
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    // SAFETY: a namespace descriptor we hold open; setns moves only this
                    // thread, which ends when `f` returns.
                    let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
                    f()
                })
                .join()
                .unwrap()
        })
    }

    /// A bridge carrying `HOST_IP`, for the two taps of a migration.
    fn bridge(&self) {
        self.ip(&["link", "add", BRIDGE, "type", "bridge"]);
        self.ip(&["addr", "add", &format!("{HOST_IP}/24"), "dev", BRIDGE]);
        self.ip(&["link", "set", BRIDGE, "up"]);
    }

    fn enslave(&self, tap: &str) {
        self.wait_link(tap, true);
        self.ip(&["link", "set", tap, "master", BRIDGE, "up"]);
    }

    /// The namespace's end of a VM's only tap gets `HOST_IP`.
    fn address(&self, tap: &str) {
        self.wait_link(tap, true);
        self.ip(&["addr", "add", &format!("{HOST_IP}/24"), "dev", tap]);
        self.ip(&["link", "set", tap, "up"]);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Removes the namespaces a killed earlier run of this benchmark left (its pid is gone).
fn remove_stale_namespaces() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(pid) = name
            .strip_prefix(NS_PREFIX)
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = Command::new("ip").args(["netns", "del", name]).status();
        }
    }
}

struct Bench {
    hostd: PathBuf,
    dir: tempfile::TempDir,
    boots: usize,
}

/// A booted guest: `hostd run` or a QEMU, its console in a file.
struct Guest {
    hostd: Option<Child>,
    qemu: Option<QemuVm>,
    log: PathBuf,
    err: PathBuf,
}

impl Bench {
    /// Boots the test guest with `cmdline` on `tap` inside `ns` (a QEMU destination
    /// waits for a migration on `incoming`).
    fn boot(
        &mut self,
        vmm: Vmm,
        ns: &Netns,
        tap: &str,
        cmdline: &str,
        incoming: Option<u16>,
    ) -> Guest {
        self.boots += 1;
        let n = self.boots;
        let err = self.dir.path().join(format!("{n}.err"));
        let stderr = File::create(&err).unwrap();
        match vmm {
            Vmm::Hostd | Vmm::HostdNoPoll => {
                let log = self.dir.path().join(format!("{n}.log"));
                let poll = if vmm == Vmm::HostdNoPoll {
                    ",poll_us=0"
                } else {
                    ""
                };
                let child = ns
                    .exec(&self.hostd)
                    .args(["--log", "error", "run", "--kernel", testguest::ELF_PATH])
                    .args(["--memory-mib", &MIB.to_string(), "--cmdline", cmdline])
                    .args(["--net", &format!("tap={tap},mac={MAC}{poll}")])
                    .stdin(Stdio::null())
                    .stdout(File::create(&log).unwrap())
                    .stderr(stderr)
                    .spawn()
                    .expect("starting hostd run");
                Guest {
                    hostd: Some(child),
                    qemu: None,
                    log,
                    err,
                }
            }
            Vmm::Qemu => {
                let mut c = ns.exec(Path::new("qemu-system-x86_64"));
                c.args(["-M", "microvm,acpi=off", "-enable-kvm", "-cpu", "qemu64"])
                    .args(["-smp", "1", "-m", &MIB.to_string()])
                    .args(["-nodefaults", "-no-user-config", "-display", "none"])
                    .args(["-no-reboot", "-global", "virtio-mmio.force-legacy=false"])
                    .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"])
                    .args(["-device", "i8042", "-netdev"])
                    .arg(format!(
                        "tap,id=n0,ifname={tap},script=no,downscript=no,vhost=off"
                    ))
                    .arg("-device")
                    .arg(format!("virtio-net-device,netdev=n0,mac={MAC}"))
                    .args(["-kernel", testguest::ELF_PATH, "-append", cmdline])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(stderr);
                if let Some(port) = incoming {
                    c.arg("-incoming").arg(format!("tcp:127.0.0.1:{port}"));
                }
                let q = QemuVm::start(c, self.dir.path(), n);
                Guest {
                    log: q.serial.clone(),
                    hostd: None,
                    qemu: Some(q),
                    err,
                }
            }
        }
    }
}

impl Guest {
    fn text(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.log).unwrap_or_default()).into_owned()
    }

    fn exited(&mut self) -> bool {
        let child = match (&mut self.hostd, &mut self.qemu) {
            (Some(c), _) => c,
            (None, Some(q)) => &mut q.child,
            (None, None) => return true,
        };
        child.try_wait().ok().flatten().is_some()
    }

    /// The first console line starting with `prefix`, within `limit`.
    fn wait_line(&mut self, prefix: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let text = self.text();
            // Whole lines only: the console may be read halfway through one.
            let whole = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
            if let Some(line) = whole.lines().find(|l| l.starts_with(prefix)) {
                return line.to_owned();
            }
            let why = if self.exited() {
                "the VMM exited"
            } else if Instant::now() > deadline {
                "timed out"
            } else {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            };
            let err = std::fs::read_to_string(&self.err).unwrap_or_default();
            panic!("no console line {prefix:?} ({why}); console:\n{text}\nstderr:\n{err}");
        }
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.hostd.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(mut q) = self.qemu.take() {
            q.quit();
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.stop();
    }
}

fn counter(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))?
        .parse()
        .ok()
}

// ---------------------------------------------------------------------------------------
// Guest → host.

/// What a sink socket got: datagrams, payload bytes, and the kernel's receive times of
/// the first and last (seconds, CLOCK_REALTIME).
#[derive(Default, Debug)]
struct Received {
    packets: u64,
    bytes: u64,
    first: f64,
    last: f64,
}

/// A UDP socket on `SINK_PORT` in `ns`, with a receive buffer that holds a whole run
/// and kernel receive timestamps.
fn sink_socket(ns: &Netns) -> UdpSocket {
    ns.run(|| {
        let s = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, SINK_PORT)).unwrap();
        let fd = s.as_raw_fd();
        let set = |opt: libc::c_int, v: libc::c_int| {
            // SAFETY: an int option of our own socket; `v` lives across the call.
            let rc = unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    opt,
                    (&v as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            assert_eq!(
                rc,
                0,
                "setsockopt {opt}: {}",
                std::io::Error::last_os_error()
            );
        };
        set(libc::SO_RCVBUFFORCE, 256 << 20);
        set(libc::SO_TIMESTAMPNS, 1);
        s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        s
    })
}

/// Reads datagrams of `size` bytes until `done` is set and the socket has been quiet
/// for its read timeout; batches of 64 (recvmmsg) so the reader keeps up.
fn drain(sock: UdpSocket, size: usize, done: &AtomicBool) -> Received {
    const BATCH: usize = 64;
    let mut bufs = vec![[0u8; 2048]; BATCH];
    let mut ctl = vec![[0u64; 8]; BATCH];
    // SAFETY: plain C structs; zero is a valid value, the pointers are set before use.
    let (iov, msg) = unsafe {
        (
            std::mem::zeroed::<libc::iovec>(),
            std::mem::zeroed::<libc::mmsghdr>(),
        )
    };
    let mut iov = vec![iov; BATCH];
    let mut msgs = vec![msg; BATCH];
    let mut r = Received::default();
    loop {
        for i in 0..BATCH {
            iov[i].iov_base = bufs[i].as_mut_ptr().cast();
            iov[i].iov_len = bufs[i].len();
            let h = &mut msgs[i].msg_hdr;
            h.msg_iov = &mut iov[i];
            h.msg_iovlen = 1;
            h.msg_control = ctl[i].as_mut_ptr().cast();
            h.msg_controllen = std::mem::size_of_val(&ctl[i]);
            h.msg_name = std::ptr::null_mut();
            h.msg_namelen = 0;
        }
        // SAFETY: every header points at buffers of ours that outlive the call, with
        // their lengths.
        let n = unsafe {
            libc::recvmmsg(
                sock.as_raw_fd(),
                msgs.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            match e.kind() {
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                    if done.load(Ordering::Acquire) {
                        return r;
                    }
                    continue;
                }
                std::io::ErrorKind::Interrupted => continue,
                _ => panic!("recvmmsg: {e}"),
            }
        }
        for m in &msgs[..n as usize] {
            assert_eq!(m.msg_len as usize, size, "a datagram of another size");
            let t = timestamp(&m.msg_hdr).expect("no receive timestamp");
            if r.packets == 0 {
                r.first = t;
            }
            r.last = t;
            r.packets += 1;
            r.bytes += size as u64;
        }
    }
}

/// The SCM_TIMESTAMPNS of a received message, in seconds.
fn timestamp(h: &libc::msghdr) -> Option<f64> {
    // SAFETY: `h` is a header recvmmsg filled in; the CMSG macros stay within its
    // control buffer's returned length.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(h);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_TIMESTAMPNS {
                let ts = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::timespec>());
                return Some(ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9);
            }
            c = libc::CMSG_NXTHDR(h, c);
        }
    }
    None
}

/// One boot sending `count` datagrams of `size` bytes to the namespace as fast as it
/// can: (datagrams/s, payload bytes/s) as received.
fn stream(b: &mut Bench, vmm: Vmm, ns: &Netns, size: usize, count: u64) -> (f64, f64) {
    let sock = sink_socket(ns);
    let done = Arc::new(AtomicBool::new(false));
    let reader = {
        let done = done.clone();
        std::thread::spawn(move || drain(sock, size, &done))
    };
    let cmdline = format!(
        "ip={GUEST_IP}/24 udp_send={HOST_IP}:{SINK_PORT},size={size},count={count} udp_echo=0"
    );
    let mut g = b.boot(vmm, ns, TAP, &cmdline, None);
    ns.address(TAP);
    let line = g.wait_line("NET send", Duration::from_secs(120));
    done.store(true, Ordering::Release);
    let got = reader.join().unwrap();
    g.stop();
    ns.wait_link(TAP, false);
    assert!(!line.contains("error"), "{} guest: {line}", vmm.name());
    assert_eq!(counter(&line, "packets"), Some(count), "{line}");
    assert!(
        got.packets > count / 2,
        "{}: only {got:?} of {count} arrived",
        vmm.name()
    );
    let span = got.last - got.first;
    let pps = (got.packets - 1) as f64 / span;
    eprintln!(
        "{} {size} B: received {} of {count} in {:.3} s: {pps:.0} pps, {:.1} MB/s (guest: {line})",
        vmm.name(),
        got.packets,
        span,
        pps * size as f64 / 1e6,
    );
    (pps, pps * size as f64)
}

// ---------------------------------------------------------------------------------------
// Round trips.

/// Microseconds of `n` sequential 64-byte echo round trips after `warmup` unmeasured.
fn round_trips(b: &mut Bench, vmm: Vmm, ns: &Netns, warmup: usize, n: usize) -> Vec<f64> {
    let mut g = b.boot(
        vmm,
        ns,
        TAP,
        &format!("ip={GUEST_IP}/24 udp_echo={ECHO_PORT}"),
        None,
    );
    ns.address(TAP);
    g.wait_line("GUEST net up", WAIT);
    let rtts = ns.run(|| {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.connect(SocketAddrV4::new(GUEST_IP, ECHO_PORT)).unwrap();
        let mut buf = [0u8; 2048];
        let mut out = Vec::with_capacity(n);
        let (mut lost, mut seq) = (0usize, 0u64);
        while out.len() < n {
            seq += 1;
            let mut msg = [0u8; 64];
            msg[..8].copy_from_slice(&seq.to_le_bytes());
            // The first one waits for the namespace's ARP.
            let limit = if seq == 1 { 5000 } else { 200 };
            s.set_read_timeout(Some(Duration::from_millis(limit)))
                .unwrap();
            let t = Instant::now();
            s.send(&msg).unwrap();
            let answered = loop {
                match s.recv(&mut buf) {
                    Ok(len) if buf[..len] == msg => break true,
                    Ok(_) => continue, // a late answer to an earlier one
                    Err(_) => break false,
                }
            };
            let us = t.elapsed().as_secs_f64() * 1e6;
            if !answered {
                lost += 1;
                assert!(lost <= 10, "{}: echoes unanswered", vmm.name());
            } else if seq as usize > warmup {
                out.push(us);
            }
        }
        if lost > 0 {
            eprintln!("{}: {lost} echoes unanswered (not counted)", vmm.name());
        }
        out
    });
    g.stop();
    ns.wait_link(TAP, false);
    rtts
}

// ---------------------------------------------------------------------------------------
// Migration.

/// Echo requests at `ECHO_PPS` to the guest from `ns`, replies counted.
struct Echoes {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    sender: std::thread::JoinHandle<()>,
    receiver: std::thread::JoinHandle<(BTreeSet<u64>, f64)>,
}

/// A few synchronous echoes first, so the namespace's ARP entry is there; panics if the
/// guest does not answer.
fn echo_socket(ns: &Netns) -> UdpSocket {
    ns.run(|| {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        s.connect(SocketAddrV4::new(GUEST_IP, ECHO_PORT)).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let mut buf = [0u8; 64];
        let answered = (0..10)
            .filter(|_| s.send(&[0u8; 16]).is_ok() && s.recv(&mut buf).is_ok())
            .count();
        assert!(answered >= 5, "the guest answers {answered} of 10 echoes");
        s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        s
    })
}

impl Echoes {
    fn start(ns: &Netns) -> Echoes {
        let sock = echo_socket(ns);
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let tx = sock.try_clone().unwrap();
        let sender = {
            let (stop, sent) = (stop.clone(), sent.clone());
            std::thread::spawn(move || {
                let start = Instant::now();
                let mut seq = 0u64;
                while !stop.load(Ordering::Acquire) {
                    let due = start + Duration::from_micros(seq * 1_000_000 / ECHO_PPS);
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    let mut msg = [0u8; 64];
                    msg[..8].copy_from_slice(&(seq + 1).to_le_bytes());
                    tx.send(&msg).unwrap();
                    seq += 1;
                    sent.store(seq, Ordering::Release);
                }
            })
        };
        let receiver = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut got = BTreeSet::new();
                let (mut last, mut gap) = (None::<Instant>, 0f64);
                let mut quiet_since = None;
                let mut buf = [0u8; 64];
                loop {
                    match sock.recv(&mut buf) {
                        Ok(64) => {
                            let seq = u64::from_le_bytes(buf[..8].try_into().unwrap());
                            if seq > 0 {
                                got.insert(seq);
                                let now = Instant::now();
                                if let Some(l) = last {
                                    gap = f64::max(gap, (now - l).as_secs_f64() * 1000.0);
                                }
                                last = Some(now);
                            }
                        }
                        Ok(_) => {}
                        Err(_) if stop.load(Ordering::Acquire) => {
                            // Stragglers: half a second of quiet after the sender stopped.
                            let q = *quiet_since.get_or_insert_with(Instant::now);
                            if q.elapsed() > Duration::from_millis(500) {
                                return (got, gap);
                            }
                        }
                        Err(_) => {}
                    }
                }
            })
        };
        Echoes {
            stop,
            sent,
            sender,
            receiver,
        }
    }

    /// Stops sending; (requests sent, replies missing, longest gap between replies in ms).
    fn finish(self) -> (u64, u64, f64) {
        self.stop.store(true, Ordering::Release);
        self.sender.join().unwrap();
        let (got, gap) = self.receiver.join().unwrap();
        let sent = self.sent.load(Ordering::Acquire);
        (sent, sent - got.range(1..=sent).count() as u64, gap)
    }
}

fn net_config(tap: &str) -> proto::host::NetConfig {
    proto::host::NetConfig {
        id: "eth0".into(),
        tap: tap.into(),
        mac: MAC.into(),
        ..Default::default()
    }
}

fn spec_with(nic: hostd::devices::virtio::net::Nic) -> VmSpec {
    VmSpec {
        vcpus: 1,
        memory_bytes: MIB << 20,
        boot: BootSpec {
            kernel: testguest::elf_path().to_owned(),
            initrd: None,
            cmdline: format!("ip={GUEST_IP}/24 udp_echo={ECHO_PORT}"),
            protocol: BootProtocol::Auto,
        },
        disks: vec![],
        nets: vec![nic],
        cpuid_mask: vec![],
    }
}

/// Ours: (echoes lost, sent, longest gap ms, downtime ms).
fn migration_hostd() -> Result<(u64, u64, f64, f64), String> {
    let ns = Netns::new("hm");
    ns.bridge();
    let open = |tap: &str| {
        let nic = ns
            .run(|| hostd::supervisor::spec::open_net(&net_config(tap), None))
            .map_err(|e| format!("opening {tap}: {}", proto::error_chain(&e)))?;
        ns.enslave(tap);
        Ok::<_, String>(nic)
    };
    let console = Console::new(4 << 20, None).unwrap();
    let mut vm = Vm::new(&spec_with(open("nbta")?), console.clone())
        .map_err(|e| format!("building the source VM: {}", proto::error_chain(&e)))?;
    vm.start()
        .map_err(|e| format!("starting the source VM: {}", proto::error_chain(&e)))?;
    let deadline = Instant::now() + WAIT;
    while !console.text().contains("GUEST net up") {
        if Instant::now() > deadline {
            return Err(format!(
                "the guest's network never came up: {}",
                console.text()
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let dest_spec = spec_with(open("nbtb")?);
    let echoes = Echoes::start(&ns);
    std::thread::sleep(MIGRATION_MARGIN);
    let tls = hosts();
    let migrated = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        migrate_hop_then(&vm, &tls, 0, dest_spec, Duration::from_secs(60), |vm| {
            if let Err(e) = hostd::devices::virtio::net::announce_in_background(vm.nets().to_vec())
            {
                eprintln!("announcing the MAC: {e}");
            }
        })
    }));
    let (sent, dest, _console) = match migrated {
        Ok(m) => m,
        Err(p) => {
            echoes.finish();
            let why = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            return Err(format!("the migration failed: {why}"));
        }
    };
    std::thread::sleep(MIGRATION_MARGIN);
    let (requests, lost, gap) = echoes.finish();
    dest.stop();
    drop(vm);
    Ok((lost, requests, gap, sent.downtime.as_secs_f64() * 1000.0))
}

/// QEMU's: (echoes lost, sent, longest gap ms, downtime ms).
fn migration_qemu(b: &mut Bench) -> (u64, u64, f64, f64) {
    let ns = Netns::new("qm");
    ns.bridge();
    let cmdline = format!("ip={GUEST_IP}/24 udp_echo={ECHO_PORT}");
    let mut src = b.boot(Vmm::Qemu, &ns, "nbta", &cmdline, None);
    ns.enslave("nbta");
    src.wait_line("GUEST net up", WAIT);
    let port = free_port();
    let mut dest = b.boot(Vmm::Qemu, &ns, "nbtb", &cmdline, Some(port));
    ns.enslave("nbtb");
    let echoes = Echoes::start(&ns);
    std::thread::sleep(MIGRATION_MARGIN);
    let (downtime, _total) = src.qemu.as_mut().unwrap().migrate(port, false);
    std::thread::sleep(MIGRATION_MARGIN);
    let (requests, lost, gap) = echoes.finish();
    src.stop();
    dest.stop();
    (lost, requests, gap, downtime)
}

// ---------------------------------------------------------------------------------------

#[derive(Default)]
struct Figures {
    pps: Vec<f64>,
    bytes_s: Vec<f64>,
    rtt_us: Vec<f64>,
}

fn main() {
    let mut args = std::env::args().skip(1);
    let hostd = PathBuf::from(args.next().expect("usage: net_bench HOSTD [RUNS]"));
    let runs: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(5);
    let started = Instant::now();
    remove_stale_namespaces();
    let mut b = Bench {
        hostd,
        dir: tempfile::tempdir().unwrap(),
        boots: 0,
    };
    let namespaces = [Netns::new("h"), Netns::new("q"), Netns::new("n")];
    // The reference streams too: on a host whose CPUs are all busy (the guest, the
    // receiver, the kernel's tap path), a spinning worker may take time from the others.
    let whos = [Vmm::Hostd, Vmm::Qemu, Vmm::HostdNoPoll];
    let streamed = &whos[..];
    let mut figs = [Figures::default(), Figures::default(), Figures::default()];
    for run in 0..runs {
        for (i, &who) in streamed.iter().enumerate() {
            let (pps, _) = stream(&mut b, who, &namespaces[i], 64, SMALL_COUNT);
            figs[i].pps.push(pps);
        }
        for (i, &who) in streamed.iter().enumerate() {
            let (_, bytes) = stream(&mut b, who, &namespaces[i], 1448, LARGE_COUNT);
            figs[i].bytes_s.push(bytes);
        }
        for (i, &who) in whos.iter().enumerate() {
            let rtts = round_trips(&mut b, who, &namespaces[i], RTT_WARMUP, RTT_EACH);
            eprintln!(
                "{} run {run}: RTT p50 {:.1} µs, p99 {:.1} µs",
                who.name(),
                percentile(&rtts, 0.5),
                percentile(&rtts, 0.99)
            );
            figs[i].rtt_us.extend(rtts);
        }
    }
    drop(namespaces);
    let ours = migration_hostd();
    match &ours {
        Ok((lost, sent, gap, downtime)) => eprintln!(
            "hostd migration: {lost} of {sent} echoes lost, longest gap {gap:.1} ms, downtime {downtime:.1} ms"
        ),
        Err(e) => println!("MIGRATION hostd failed: {e}"),
    }
    let theirs = migration_qemu(&mut b);
    eprintln!(
        "qemu migration: {} of {} echoes lost, longest gap {:.1} ms, downtime {:.1} ms",
        theirs.0, theirs.1, theirs.2, theirs.3
    );
    let lost = [ours.as_ref().ok().copied(), Some(theirs), None];

    println!(
        "{:<12} {:>12} {:>14} {:>13} {:>13} {:>22}",
        "VMM", "64 B pps", "1448 B MB/s", "RTT p50 µs", "RTT p99 µs", "migration lost/sent"
    );
    for (i, who) in whos.iter().enumerate() {
        let f = &figs[i];
        let mig = match lost[i] {
            Some((l, s, gap, _)) => format!("{l}/{s} ({gap:.0} ms gap)"),
            None => "not measured".into(),
        };
        let stream = |v: &[f64], scale: f64| match v {
            [] => "-".to_string(),
            v => format!("{:.1}", median(v.to_vec()) / scale),
        };
        println!(
            "{:<12} {:>12} {:>14} {:>13.1} {:>13.1} {:>22}",
            who.name(),
            stream(&f.pps, 1.0),
            stream(&f.bytes_s, 1e6),
            percentile(&f.rtt_us, 0.5),
            percentile(&f.rtt_us, 0.99),
            mig
        );
    }
    println!(
        "REFERENCE {} rtt_p50_us={:.2} rtt_p99_us={:.2}",
        Vmm::HostdNoPoll.name(),
        percentile(&figs[2].rtt_us, 0.5),
        percentile(&figs[2].rtt_us, 0.99)
    );
    for (i, who) in streamed.iter().enumerate() {
        let f = &figs[i];
        println!(
            "RESULT {} pps={:.0} mb_s={:.2} rtt_p50_us={:.2} rtt_p99_us={:.2} lost={}",
            who.name(),
            median(f.pps.clone()),
            median(f.bytes_s.clone()) / 1e6,
            percentile(&f.rtt_us, 0.5),
            percentile(&f.rtt_us, 0.99),
            lost[i].map_or("none".into(), |l| l.0.to_string())
        );
    }
    eprintln!("net_bench took {:.0} s", started.elapsed().as_secs_f64());
}
