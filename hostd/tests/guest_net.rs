//! The test guest's virtio-net driver on a real tap: `hostd run` boots the guest with a
//! network interface on a tap inside a network namespace of the test's own, whose side of
//! the tap gets an address. From inside that namespace the test pings the guest (ARP, ICMP
//! echo), makes UDP echo round trips, sends it malformed frames it must drop and count,
//! and checks the counters the guest prints. Needs root (CI is root).

use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

const TAP: &str = "gtap0";
const HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const GUEST_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x77, 0x00, 0x02];
const WAIT: Duration = Duration::from_secs(20);

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("running ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A named network namespace with `hostd run` inside; both go on drop.
struct Lab {
    ns: String,
    child: Option<Child>,
    lines: Receiver<String>,
    /// Every console line seen so far.
    seen: Vec<String>,
}

impl Lab {
    /// Boots the test guest on a tap in a new namespace, with `cmdline`, and gives the
    /// namespace's end of the tap `HOST_IP/24` once `hostd run` has made it.
    fn start(cmdline: &str) -> Lab {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let ns = format!("gnet{}-{n}", std::process::id());
        ip(&["netns", "add", &ns]);
        let (tx, lines) = std::sync::mpsc::channel();
        let mut lab = Lab {
            ns,
            child: None,
            lines,
            seen: Vec::new(),
        };
        ip(&["-n", &lab.ns, "link", "set", "lo", "up"]);
        let mac = GUEST_MAC.map(|b| format!("{b:02x}")).join(":");
        let mut child = Command::new("ip")
            .args(["netns", "exec", &lab.ns, env!("CARGO_BIN_EXE_hostd"), "run"])
            .args(["--kernel", hostd::testguest::ELF_PATH, "--memory-mib", "64"])
            .args(["--cmdline", cmdline])
            .args(["--net", &format!("tap={TAP},mac={mac}")])
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting hostd run");
        let stdout = child.stdout.take().unwrap();
        lab.child = Some(child);
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                eprintln!("guest: {line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        lab
    }

    /// Addresses the namespace's end of the tap (once `hostd run` has made it).
    fn address_tap(&mut self) {
        let deadline = Instant::now() + WAIT;
        loop {
            let out = Command::new("ip")
                .args(["-n", &self.ns, "link", "show", TAP])
                .output()
                .unwrap();
            if out.status.success() {
                break;
            }
            assert!(Instant::now() < deadline, "hostd run never made its tap");
            std::thread::sleep(Duration::from_millis(20));
        }
        ip(&[
            "-n",
            &self.ns,
            "addr",
            "add",
            &format!("{HOST_IP}/24"),
            "dev",
            TAP,
        ]);
        ip(&["-n", &self.ns, "link", "set", TAP, "up"]);
    }

    /// The next console line starting with `prefix` (earlier ones are kept in `seen`).
    fn wait_line(&mut self, prefix: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.starts_with(prefix) {
                        return line;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    panic!("no line {prefix:?} in time; saw {:#?}", self.seen)
                }
                Err(RecvTimeoutError::Disconnected) => {
                    panic!("console closed before {prefix:?}; saw {:#?}", self.seen)
                }
            }
        }
    }

    /// Runs `f` on a thread inside the namespace; sockets it opens live there.
    fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let ns = std::fs::File::open(format!("/run/netns/{}", self.ns)).unwrap();
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    // SAFETY: a network namespace descriptor we hold open; setns moves only
                    // this thread, which ends when `f` returns.
                    let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
                    f()
                })
                .join()
                .unwrap()
        })
    }

    /// Asks the guest to shut down (SIGTERM to `hostd run`) and returns its exit status.
    fn shut_down(&mut self) -> i32 {
        let mut child = self.child.take().unwrap();
        // SAFETY: a plain signal to our own child process.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status.code().unwrap_or(-1);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("hostd run did not exit after SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Sends one ICMP echo request to the guest over a raw socket and waits for its reply;
/// true when the reply came back with our id, sequence and payload.
fn ping(seq: u16) -> bool {
    // SAFETY: socket() takes no pointers; the descriptor is owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP) };
    assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
    // SAFETY: just opened, owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let id = (std::process::id() & 0xffff) as u16;
    let mut msg = vec![8u8, 0, 0, 0];
    msg.extend_from_slice(&id.to_be_bytes());
    msg.extend_from_slice(&seq.to_be_bytes());
    msg.extend((0..56u8).map(|i| i ^ seq as u8));
    let c = checksum(&msg);
    msg[2..4].copy_from_slice(&c.to_be_bytes());
    let to = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(GUEST_IP).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: msg and `to` are live for the call; the lengths are theirs.
    let sent = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            msg.as_ptr().cast(),
            msg.len(),
            0,
            (&to as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    assert_eq!(
        sent,
        msg.len() as isize,
        "{}",
        std::io::Error::last_os_error()
    );
    let deadline = Instant::now() + Duration::from_secs(1);
    let mut buf = [0u8; 1500];
    while Instant::now() < deadline {
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut pfd, 1, 100) } <= 0 {
            continue;
        }
        // SAFETY: buf is writable for its length.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 28 {
            continue;
        }
        let pkt = &buf[..n as usize];
        let ihl = usize::from(pkt[0] & 15) * 4;
        let icmp = &pkt[ihl..];
        if pkt[12..16] == GUEST_IP.octets()
            && icmp[0] == 0
            && icmp[4..6] == id.to_be_bytes()
            && icmp[6..8] == seq.to_be_bytes()
        {
            assert_eq!(checksum(icmp), 0, "the reply's ICMP checksum");
            assert_eq!(&icmp[8..], &msg[8..], "the reply's payload");
            return true;
        }
    }
    false
}

/// Frames the guest must drop as malformed, sent on the tap from inside the namespace.
fn send_malformed() -> usize {
    // SAFETY: socket() takes no pointers; the descriptor is owned below.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
    assert!(
        fd >= 0,
        "packet socket: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: just opened, owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let name = std::ffi::CString::new(TAP).unwrap();
    // SAFETY: a NUL-terminated name.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    assert!(index > 0, "no {TAP}");
    let eth = |ty: u16| {
        let mut f = GUEST_MAC.to_vec();
        f.extend_from_slice(&[0x02, 0, 0, 0x77, 0, 1]);
        f.extend_from_slice(&ty.to_be_bytes());
        f
    };
    let ipv4 = |proto: u8, payload: &[u8]| {
        let mut h = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, proto, 0, 0];
        h[2..4].copy_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
        h.extend_from_slice(&HOST_IP.octets());
        h.extend_from_slice(&GUEST_IP.octets());
        let c = checksum(&h);
        h[10..12].copy_from_slice(&c.to_be_bytes());
        h.extend_from_slice(payload);
        h
    };
    let mut frames = Vec::new();
    // An ARP body cut short.
    frames.push([eth(0x0806), vec![0, 1, 8, 0, 6, 4, 0, 1]].concat());
    // An IPv4 header length below 20 bytes.
    let mut bad_ihl = ipv4(17, &[0; 8]);
    bad_ihl[0] = 0x44;
    frames.push([eth(0x0800), bad_ihl].concat());
    // A wrong header checksum.
    let mut bad_sum = ipv4(17, &[0; 8]);
    bad_sum[10] ^= 0x55;
    frames.push([eth(0x0800), bad_sum].concat());
    // An IPv4 total length past the frame's end.
    let mut long = ipv4(17, &[0; 8]);
    long[2..4].copy_from_slice(&1400u16.to_be_bytes());
    long[10..12].copy_from_slice(&[0, 0]);
    let c = checksum(&long[..20]);
    long[10..12].copy_from_slice(&c.to_be_bytes());
    frames.push([eth(0x0800), long].concat());
    // A UDP length past its datagram (to the echo port, which would answer otherwise).
    frames.push(
        [
            eth(0x0800),
            ipv4(17, &[0x30, 0x39, 0, 7, 0x04, 0, 0, 0, 1, 2]),
        ]
        .concat(),
    );
    // An ICMP echo request with a wrong checksum.
    frames.push([eth(0x0800), ipv4(1, &[8, 0, 0x12, 0x34, 0, 1, 0, 1])].concat());
    for f in &frames {
        // SAFETY: sockaddr_ll is plain data; zeroes are valid and the fields are set below.
        let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        to.sll_family = libc::AF_PACKET as u16;
        to.sll_ifindex = index as i32;
        to.sll_halen = 6;
        to.sll_addr[..6].copy_from_slice(&GUEST_MAC);
        // SAFETY: the frame and the address live across the call, with their lengths.
        let sent = unsafe {
            libc::sendto(
                fd.as_raw_fd(),
                f.as_ptr().cast(),
                f.len(),
                0,
                (&to as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        assert_eq!(
            sent,
            f.len() as isize,
            "{}",
            std::io::Error::last_os_error()
        );
    }
    frames.len()
}

/// `key=value` of a counters line, as a number.
fn counter(line: &str, key: &str) -> u64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("no {key} in {line:?}"))
        .parse()
        .unwrap()
}

#[test]
fn the_guest_answers_arp_ping_and_udp_echo_and_counts_malformed_frames() {
    let mut lab = Lab::start(&format!("ip={GUEST_IP}/24 udp_echo=7"));
    lab.address_tap();
    let up = lab.wait_line("GUEST net up");
    assert!(
        up.contains("mac=02:00:00:77:00:02") && up.contains(&format!("ip={GUEST_IP}/24")),
        "{up}"
    );

    let pings = 3u16;
    let answered = lab.run(|| (1..=pings).filter(|&seq| ping(seq)).count());
    assert_eq!(answered, usize::from(pings), "pings answered");

    let sizes = [1usize, 64, 1000, 1472];
    lab.run(|| {
        let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        for (i, size) in sizes.iter().enumerate() {
            let payload: Vec<u8> = (0..*size).map(|b| (b * 7 + i) as u8).collect();
            let t = Instant::now();
            sock.send_to(&payload, SocketAddrV4::new(GUEST_IP, 7))
                .unwrap();
            let mut buf = [0u8; 2048];
            let (n, from) = sock.recv_from(&mut buf).expect("the UDP echo");
            eprintln!("udp echo of {size} bytes: {:?}", t.elapsed());
            assert_eq!(from, SocketAddrV4::new(GUEST_IP, 7).into());
            assert_eq!(&buf[..n], &payload[..], "echo of {size} bytes");
        }
    });

    let malformed = lab.run(send_malformed);
    // The counters on request: a datagram to the echo port starting with GUEST-STATS.
    lab.run(|| {
        let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        sock.send_to(b"GUEST-STATS", SocketAddrV4::new(GUEST_IP, 7))
            .unwrap();
        let mut buf = [0u8; 64];
        let (n, _) = sock.recv_from(&mut buf).expect("the stats echo");
        assert_eq!(&buf[..n], b"GUEST-STATS");
    });
    let stats = lab.wait_line("GUEST net rx=");
    assert_eq!(counter(&stats, "bad"), malformed as u64, "{stats}");
    assert_eq!(counter(&stats, "icmp"), u64::from(pings), "{stats}");
    // The stats request is counted once its echo went out.
    assert_eq!(counter(&stats, "udp_echo"), sizes.len() as u64, "{stats}");
    assert!(counter(&stats, "arp") >= 1, "{stats}");
    assert_eq!(counter(&stats, "dev_bad"), 0, "{stats}");
    assert_eq!(counter(&stats, "tx_drop"), 0, "{stats}");

    let status = lab.shut_down();
    lab.wait_line("GUEST shutdown requested");
    let last = lab.wait_line("GUEST net rx=");
    assert_eq!(counter(&last, "udp_echo"), sizes.len() as u64 + 1, "{last}");
    let replies = u64::from(pings) + sizes.len() as u64 + 1;
    assert!(
        counter(&last, "tx") >= replies + counter(&last, "arp"),
        "{last}"
    );
    assert!(counter(&last, "rx") >= replies + malformed as u64, "{last}");
    assert_eq!(status, 0, "hostd run's exit status");
}

#[test]
fn the_guest_sends_udp_to_an_address_it_resolves_and_refuses_a_bad_address() {
    // The sink is bound before the tap has an address: the guest retries ARP until then.
    let mut lab = Lab::start(&format!(
        "ip={GUEST_IP}/24 udp_send={HOST_IP}:9000,size=200,count=300,pps=2000 net_s=1"
    ));
    let ns_file = std::fs::File::open(format!("/run/netns/{}", lab.ns)).unwrap();
    let sock = std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: as in Lab::run.
            let rc = unsafe { libc::setns(ns_file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0);
            let sock = UdpSocket::bind("0.0.0.0:9000").unwrap();
            sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            sock
        })
        .join()
        .unwrap()
    });
    // Read while the guest sends: the socket's buffer would not hold them all.
    let receiver = std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        let mut got = 0;
        while got < 300 {
            match sock.recv_from(&mut buf) {
                Ok((n, from)) => {
                    assert_eq!(n, 200);
                    assert_eq!(from, SocketAddrV4::new(GUEST_IP, 1024).into());
                    got += 1;
                }
                Err(_) => break,
            }
        }
        got
    });
    lab.address_tap();
    let sent = lab.wait_line("NET send");
    assert_eq!(counter(&sent, "packets"), 300, "{sent}");
    assert_eq!(receiver.join().unwrap(), 300, "datagrams received");
    lab.wait_line("GUEST done status=0");
    drop(lab);

    let mut lab = Lab::start("ip=10.77.0.300/24");
    let line = lab.wait_line("GUEST error bad-cmdline");
    assert!(line.contains("key=ip"), "{line}");
    let mut child = lab.child.take().unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(3));
}

#[test]
fn the_guest_refuses_a_malformed_forged_source_mac() {
    for bad in [
        "src_mac=02:00:zz:00:00:01",
        "src_mac=02:00:00:00:01",
        "src_mac=02:00:00:00:00:01:02",
        "count=5,src_mac=02:00:00:00:00:01,forged=6",
        "forged=1",
    ] {
        let mut lab = Lab::start(&format!("ip={GUEST_IP}/24 udp_send={HOST_IP}:9000,{bad}"));
        let line = lab.wait_line("GUEST error bad-cmdline");
        assert!(line.contains("key=udp_send"), "{bad}: {line}");
        let mut child = lab.child.take().unwrap();
        assert_eq!(child.wait().unwrap().code(), Some(3), "{bad}");
    }
}
