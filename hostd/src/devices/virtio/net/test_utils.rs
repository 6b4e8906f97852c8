//! Test fixtures: the driver's side of a split virtqueue in guest memory, and a tap of
//! the test's own with a packet socket on it, which plays the network.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::Tap;
use crate::vmm::GuestRam;

pub fn mem() -> GuestRam {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap()
}

const VIRTQ_DESC_F_NEXT: u16 = 1;
const VIRTQ_DESC_F_WRITE: u16 = 2;

/// What a driver does with one split virtqueue: descriptors, the available ring and
/// reading the used ring.
pub struct DriverQueue {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    next_desc: u16,
    avail_idx: u16,
    used_seen: u16,
}

impl DriverQueue {
    /// A queue of `size` entries whose rings start at `base` (a page is plenty for 16).
    pub fn new(size: u16, base: u64) -> Self {
        let desc = base;
        let avail = desc + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size)).next_multiple_of(4);
        Self {
            size,
            desc,
            avail,
            used,
            next_desc: 0,
            avail_idx: 0,
            used_seen: 0,
        }
    }

    /// The device's side of the same queue, as the transport would hand it over.
    pub fn queue(&self) -> Queue {
        let mut q = Queue::new(self.size).unwrap();
        q.set_size(self.size);
        q.set_desc_table_address(Some(self.desc as u32), Some((self.desc >> 32) as u32));
        q.set_avail_ring_address(Some(self.avail as u32), Some((self.avail >> 32) as u32));
        q.set_used_ring_address(Some(self.used as u32), Some((self.used >> 32) as u32));
        q.set_ready(true);
        q
    }

    /// Makes `bufs` (address, length, device-writable) one chain and offers it.
    pub fn add(&mut self, mem: &GuestRam, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, writable)) in bufs.iter().enumerate() {
            let index = self.next_desc;
            self.next_desc = (self.next_desc + 1) % self.size;
            let mut flags = if writable { VIRTQ_DESC_F_WRITE } else { 0 };
            if i + 1 < bufs.len() {
                flags |= VIRTQ_DESC_F_NEXT;
            }
            let at = GuestAddress(self.desc + 16 * u64::from(index));
            mem.write_obj(addr, at).unwrap();
            mem.write_obj(len, GuestAddress(at.0 + 8)).unwrap();
            mem.write_obj(flags, GuestAddress(at.0 + 12)).unwrap();
            mem.write_obj(self.next_desc, GuestAddress(at.0 + 14))
                .unwrap();
        }
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2))
            .unwrap();
        head
    }

    /// Publishes an available index `ahead` entries past what the ring holds (a broken
    /// driver's).
    pub fn publish_bogus_index(&mut self, mem: &GuestRam, ahead: u16) {
        let bogus = self.avail_idx.wrapping_add(ahead);
        mem.write_obj(bogus, GuestAddress(self.avail + 2)).unwrap();
    }

    /// Chains the device has returned since the last call: (head, bytes written).
    pub fn used(&mut self, mem: &GuestRam) -> Vec<(u32, u32)> {
        let idx: u16 = mem.read_obj(GuestAddress(self.used + 2)).unwrap();
        let mut out = Vec::new();
        while self.used_seen != idx {
            let at = self.used + 4 + 8 * u64::from(self.used_seen % self.size);
            let id: u32 = mem.read_obj(GuestAddress(at)).unwrap();
            let len: u32 = mem.read_obj(GuestAddress(at + 4)).unwrap();
            out.push((id, len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }

    /// Waits up to two seconds for `n` chains to come back.
    pub fn wait_used(&mut self, mem: &GuestRam, n: usize) -> Vec<(u32, u32)> {
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut out = Vec::new();
        while out.len() < n && Instant::now() < deadline {
            out.extend(self.used(mem));
            std::thread::sleep(Duration::from_millis(1));
        }
        out
    }
}

/// A tap with a unique name, up and with IPv6 off (so the kernel sends nothing on its
/// own), and a packet socket bound to it that sees what the VIF sends and sends what the
/// VIF receives, each behind a 10-byte `virtio_net_hdr`. The tap goes when the last of
/// its file descriptors closes.
pub struct TestTap {
    pub tap: Arc<Tap>,
    pub sock: OwnedFd,
}

/// A frame the packet socket saw: its offload header, bytes, and VLAN id (the kernel
/// takes a tag off into the frame's metadata before packet sockets see it).
#[derive(Debug)]
pub struct Seen {
    pub hdr: [u8; 10],
    pub frame: Vec<u8>,
    pub vlan: Option<u16>,
}

fn check(r: libc::c_int, what: &str) {
    assert!(r >= 0, "{what}: {}", std::io::Error::last_os_error());
}

impl Default for TestTap {
    fn default() -> Self {
        Self::new()
    }
}

impl TestTap {
    pub fn new() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "tn{}x{}",
            std::process::id() % 100_000,
            N.fetch_add(1, Ordering::Relaxed)
        );
        let tap = Arc::new(Tap::open(&name).unwrap());
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
        // SAFETY: plain socket calls with valid arguments; results are checked.
        let sock = unsafe {
            let ctl = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
            check(ctl, "control socket");
            let ctl = OwnedFd::from_raw_fd(ctl);
            let mut req: libc::ifreq = std::mem::zeroed();
            for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
                *d = s as libc::c_char;
            }
            check(
                libc::ioctl(ctl.as_raw_fd(), libc::SIOCGIFINDEX, &mut req),
                "SIOCGIFINDEX",
            );
            let ifindex = req.ifr_ifru.ifru_ifindex;
            req.ifr_ifru.ifru_flags = libc::IFF_UP as i16;
            check(
                libc::ioctl(ctl.as_raw_fd(), libc::SIOCSIFFLAGS, &req),
                "SIOCSIFFLAGS",
            );
            let proto = (libc::ETH_P_ALL as u16).to_be();
            let s = libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                i32::from(proto),
            );
            check(s, "packet socket");
            let sock = OwnedFd::from_raw_fd(s);
            let one: libc::c_int = 1;
            for opt in [libc::PACKET_VNET_HDR, libc::PACKET_AUXDATA] {
                check(
                    libc::setsockopt(
                        s,
                        libc::SOL_PACKET,
                        opt,
                        (&one as *const libc::c_int).cast(),
                        4,
                    ),
                    "packet socket option",
                );
            }
            let mut sll: libc::sockaddr_ll = std::mem::zeroed();
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = proto;
            sll.sll_ifindex = ifindex;
            check(
                libc::bind(
                    s,
                    (&sll as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                ),
                "bind packet socket",
            );
            let tv = libc::timeval {
                tv_sec: 0,
                tv_usec: 200_000,
            };
            check(
                libc::setsockopt(
                    s,
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&tv as *const libc::timeval).cast(),
                    std::mem::size_of::<libc::timeval>() as u32,
                ),
                "SO_RCVTIMEO",
            );
            sock
        };
        Self { tap, sock }
    }

    /// Gives the host's end of the tap IPv4 address `ip`/30, so frames the VIF sends to
    /// it reach the host's sockets; the tap's MAC, the destination they need.
    pub fn host_address(&self, ip: std::net::Ipv4Addr) -> [u8; 6] {
        // SAFETY: plain socket and ioctl calls on a zeroed ifreq naming the tap; every
        // result is checked.
        unsafe {
            let ctl = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
            check(ctl, "control socket");
            let ctl = OwnedFd::from_raw_fd(ctl);
            let mut req: libc::ifreq = std::mem::zeroed();
            for (d, s) in req.ifr_name.iter_mut().zip(self.tap.name().bytes()) {
                *d = s as libc::c_char;
            }
            let set = |req: &mut libc::ifreq, addr: std::net::Ipv4Addr, op, what: &str| {
                let sin = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: 0,
                    sin_addr: libc::in_addr {
                        s_addr: u32::from(addr).to_be(),
                    },
                    sin_zero: [0; 8],
                };
                std::ptr::write_unaligned(
                    (&mut req.ifr_ifru as *mut libc::__c_anonymous_ifr_ifru).cast(),
                    sin,
                );
                check(
                    libc::ioctl(ctl.as_raw_fd(), op, req as *mut libc::ifreq),
                    what,
                );
            };
            set(&mut req, ip, libc::SIOCSIFADDR, "SIOCSIFADDR");
            let mask = std::net::Ipv4Addr::new(255, 255, 255, 252);
            set(&mut req, mask, libc::SIOCSIFNETMASK, "SIOCSIFNETMASK");
            check(
                libc::ioctl(ctl.as_raw_fd(), libc::SIOCGIFHWADDR, &mut req),
                "SIOCGIFHWADDR",
            );
            let mac = req.ifr_ifru.ifru_hwaddr.sa_data;
            std::array::from_fn(|i| mac[i] as u8)
        }
    }

    /// Sends `frame` into the tap (toward the VIF) with offload header `hdr`.
    pub fn send(&self, hdr: [u8; 10], frame: &[u8]) {
        let mut buf = hdr.to_vec();
        buf.extend_from_slice(frame);
        // SAFETY: `buf` is valid for reads of its length.
        let n = unsafe { libc::send(self.sock.as_raw_fd(), buf.as_ptr().cast(), buf.len(), 0) };
        assert_eq!(n, buf.len() as isize, "{}", std::io::Error::last_os_error());
    }

    /// The next frame the VIF sent, or None within 200 ms (frames this socket sent
    /// itself are skipped).
    pub fn recv(&self) -> Option<Seen> {
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            let mut buf = vec![0u8; 70_000];
            let mut cmsg = [0u64; 16];
            // SAFETY: sockaddr_ll is plain data.
            let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut iov = libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            };
            // SAFETY: msghdr is plain data; the fields set below point at live buffers.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_name = (&mut from as *mut libc::sockaddr_ll).cast();
            msg.msg_namelen = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = cmsg.as_mut_ptr().cast();
            msg.msg_controllen = std::mem::size_of_val(&cmsg);
            // SAFETY: every pointer in `msg` refers to a buffer alive for the call.
            let n = unsafe { libc::recvmsg(self.sock.as_raw_fd(), &mut msg, 0) };
            if n < 0 {
                return None;
            }
            if from.sll_pkttype == libc::PACKET_OUTGOING {
                continue;
            }
            let mut vlan = None;
            // SAFETY: the kernel filled `msg`'s control buffer; the CMSG macros walk it
            // within msg_controllen.
            unsafe {
                let mut c = libc::CMSG_FIRSTHDR(&msg);
                while !c.is_null() {
                    if (*c).cmsg_level == libc::SOL_PACKET && (*c).cmsg_type == libc::PACKET_AUXDATA
                    {
                        let aux: libc::tpacket_auxdata =
                            std::ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                        if aux.tp_status & libc::TP_STATUS_VLAN_VALID != 0 {
                            vlan = Some(aux.tp_vlan_tci & 0x0fff);
                        }
                    }
                    c = libc::CMSG_NXTHDR(&msg, c);
                }
            }
            let n = n as usize;
            return Some(Seen {
                hdr: buf[..10].try_into().unwrap(),
                frame: buf[10..n].to_vec(),
                vlan,
            });
        }
        None
    }
}
