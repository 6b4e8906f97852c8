//! The virtio-net device: what it offers the driver, its config space (MAC, link status,
//! MTU), and activation: the tap is told which offloads the guest takes, and a worker
//! thread ([`super::event_handler`]) serves the queue pair.

use std::thread::JoinHandle;

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use super::Nic;
use super::event_handler::Handler;
use crate::devices::virtio::{
    ActivateContext, ActivateError, VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_RING_INDIRECT_DESC,
    VIRTIO_F_VERSION_1, VIRTIO_ID_NET, VirtioDevice,
};

pub const VIRTIO_NET_F_CSUM: u64 = 1 << 0;
pub const VIRTIO_NET_F_GUEST_CSUM: u64 = 1 << 1;
pub const VIRTIO_NET_F_MTU: u64 = 1 << 3;
pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
pub const VIRTIO_NET_F_GUEST_TSO4: u64 = 1 << 7;
pub const VIRTIO_NET_F_GUEST_TSO6: u64 = 1 << 8;
pub const VIRTIO_NET_F_HOST_TSO4: u64 = 1 << 11;
pub const VIRTIO_NET_F_HOST_TSO6: u64 = 1 << 12;
pub const VIRTIO_NET_F_STATUS: u64 = 1 << 16;
pub const VIRTIO_NET_S_LINK_UP: u16 = 1;

pub const QUEUE_SIZE: u16 = 256;
pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
/// `struct virtio_net_config` up to `mtu`: mac[6], status, max_virtqueue_pairs, mtu.
const CONFIG_LEN: usize = 12;

/// Everything this device offers.
pub const FEATURES: u64 = VIRTIO_F_VERSION_1
    | VIRTIO_F_RING_EVENT_IDX
    | VIRTIO_F_RING_INDIRECT_DESC
    | VIRTIO_NET_F_CSUM
    | VIRTIO_NET_F_GUEST_CSUM
    | VIRTIO_NET_F_MTU
    | VIRTIO_NET_F_MAC
    | VIRTIO_NET_F_GUEST_TSO4
    | VIRTIO_NET_F_GUEST_TSO6
    | VIRTIO_NET_F_HOST_TSO4
    | VIRTIO_NET_F_HOST_TSO6
    | VIRTIO_NET_F_STATUS;

/// The offloads (`TUN_F_*`) the tap may leave to the guest: those it acked. Without a
/// checksum offload the kernel completes checksums and segments before handing frames
/// over.
pub fn tap_offload(acked: u64) -> u32 {
    if acked & VIRTIO_NET_F_GUEST_CSUM == 0 {
        return 0;
    }
    let mut f = libc::TUN_F_CSUM;
    if acked & VIRTIO_NET_F_GUEST_TSO4 != 0 {
        f |= libc::TUN_F_TSO4;
    }
    if acked & VIRTIO_NET_F_GUEST_TSO6 != 0 {
        f |= libc::TUN_F_TSO6;
    }
    f
}

struct Worker {
    thread: JoinHandle<Vec<Queue>>,
    stop: EventFd,
}

pub struct Net {
    nic: Nic,
    config: [u8; CONFIG_LEN],
    queue_sizes: [u16; 2],
    worker: Option<Worker>,
}

impl Net {
    pub fn new(nic: Nic) -> Self {
        let mut config = [0u8; CONFIG_LEN];
        config[0..6].copy_from_slice(&nic.mac.0);
        config[6..8].copy_from_slice(&VIRTIO_NET_S_LINK_UP.to_le_bytes());
        config[8..10].copy_from_slice(&1u16.to_le_bytes());
        config[10..12].copy_from_slice(&nic.mtu.to_le_bytes());
        Self {
            nic,
            config,
            queue_sizes: [QUEUE_SIZE; 2],
            worker: None,
        }
    }

    pub fn nic(&self) -> &Nic {
        &self.nic
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        FEATURES
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let start = offset as usize;
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.config.get(start + i).copied().unwrap_or(0);
        }
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        self.reset();
        let [rx, tx]: [Queue; 2] = ctx
            .queues
            .try_into()
            .map_err(|_| ActivateError::BadQueue { index: TX_QUEUE })?;
        let [rx_kick, tx_kick]: [EventFd; 2] = ctx
            .kicks
            .try_into()
            .map_err(|_| ActivateError::BadQueue { index: TX_QUEUE })?;
        self.nic
            .tap
            .set_offload(tap_offload(ctx.acked_features))
            .map_err(|e| ActivateError::Worker(std::io::Error::other(e)))?;
        let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(ActivateError::Worker)?;
        let worker_stop = stop.try_clone().map_err(ActivateError::Worker)?;
        let handler = Handler::new(
            ctx.mem,
            [rx, tx],
            ctx.interrupt,
            self.nic.clone(),
            ctx.acked_features,
        )
        .map_err(ActivateError::Worker)?;
        let thread = std::thread::Builder::new()
            .name(format!("net-{}", self.nic.id))
            .spawn(move || handler.run(rx_kick, tx_kick, worker_stop))
            .map_err(ActivateError::Worker)?;
        self.worker = Some(Worker { thread, stop });
        Ok(())
    }

    fn reset(&mut self) {
        self.quiesce();
    }

    fn quiesce(&mut self) -> Vec<Queue> {
        let Some(w) = self.worker.take() else {
            return Vec::new();
        };
        let _ = w.stop.write(1);
        match w.thread.join() {
            Ok(queues) => queues,
            Err(_) => {
                tracing::error!(nic = %self.nic.id, "virtio-net worker panicked");
                Vec::new()
            }
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.reset();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use virtio_queue::QueueT;
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::devices::IrqLine;
    use crate::devices::virtio::net::frame::{ETH_HLEN, MacAddr, VNET_HDR_LEN, Vlan, VnetHdr};
    use crate::devices::virtio::net::test_utils::{DriverQueue, TestTap, mem};
    use crate::devices::virtio::net::{DEFAULT_BUSY_POLL, DEFAULT_MTU, MAX_BUSY_POLL, RateLimit};
    use crate::devices::virtio::{INT_VRING, VirtioInterrupt};
    use crate::vmm::GuestRam;

    const MAC: MacAddr = MacAddr([0x02, 0x50, 0, 0, 0, 7]);
    const PEER: MacAddr = MacAddr([0x02, 0x50, 0, 0, 0, 8]);
    /// Where frames the test queues for TX are written, 32 slots of 64 KiB.
    const TX_DATA: u64 = 0x10_0000;
    const RX_DATA: u64 = 0x30_0000;

    /// A device activated on a test tap with the driver's side of its queues.
    struct Rig {
        mem: GuestRam,
        rx: DriverQueue,
        tx: DriverQueue,
        kicks: [EventFd; 2],
        interrupt: Arc<VirtioInterrupt>,
        net: Net,
        nic: Nic,
        net_side: TestTap,
        slot: u64,
    }

    impl Rig {
        fn new(acked: u64, rate: RateLimit, vlan: Option<Vlan>) -> Rig {
            Self::polling(acked, rate, vlan, DEFAULT_BUSY_POLL)
        }

        /// A rig whose VIF watches after traffic for at most `busy_poll`.
        fn polling(acked: u64, rate: RateLimit, vlan: Option<Vlan>, busy_poll: Duration) -> Rig {
            Self::with(acked, rate, vlan, |nic| nic.busy_poll = busy_poll)
        }

        /// A rig whose VIF `adjust` set up further.
        fn with(
            acked: u64,
            rate: RateLimit,
            vlan: Option<Vlan>,
            adjust: impl FnOnce(&mut Nic),
        ) -> Rig {
            let net_side = TestTap::new();
            let mut nic =
                Nic::new("eth0", net_side.tap.clone(), MAC, DEFAULT_MTU, rate, vlan).unwrap();
            adjust(&mut nic);
            let mem = mem();
            let (rx, tx) = (DriverQueue::new(16, 0x1000), DriverQueue::new(64, 0x2000));
            let kicks = [0, 1].map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap());
            let interrupt = Arc::new(VirtioInterrupt::new(IrqLine::new(5).unwrap()));
            let mut net = Net::new(nic.clone());
            net.activate(ActivateContext {
                mem: mem.clone(),
                queues: vec![rx.queue(), tx.queue()],
                kicks: kicks.iter().map(|k| k.try_clone().unwrap()).collect(),
                interrupt: interrupt.clone(),
                acked_features: acked,
            })
            .unwrap();
            Rig {
                mem,
                rx,
                tx,
                kicks,
                interrupt,
                net,
                nic,
                net_side,
                slot: 0,
            }
        }

        /// Queues `frame` for TX behind `hdr`, header and frame in two descriptors.
        fn send(&mut self, hdr: VnetHdr, frame: &[u8]) {
            self.queue_tx(hdr, frame);
            self.kicks[TX_QUEUE].write(1).unwrap();
        }

        /// Queues `frame` for TX as [`Rig::send`] does, without telling the device.
        fn queue_tx(&mut self, hdr: VnetHdr, frame: &[u8]) {
            let at = TX_DATA + self.slot * 0x1_0000;
            self.slot = (self.slot + 1) % 32;
            self.mem
                .write_slice(&hdr.to_bytes(), GuestAddress(at))
                .unwrap();
            self.mem
                .write_slice(frame, GuestAddress(at + 0x100))
                .unwrap();
            self.tx.add(
                &self.mem,
                &[
                    (at, VNET_HDR_LEN as u32, false),
                    (at + 0x100, frame.len() as u32, false),
                ],
            );
        }

        /// Whether a TX chain comes back within `limit`, looked for without sleeping (a
        /// sleep would be longer than the windows under test).
        fn tx_used_within(&mut self, limit: Duration) -> bool {
            let deadline = Instant::now() + limit;
            while Instant::now() < deadline {
                if !self.tx.used(&self.mem).is_empty() {
                    return true;
                }
                std::hint::spin_loop();
            }
            false
        }

        /// Posts RX buffer `i` of 2 KiB and tells the device.
        fn post_rx(&mut self, i: u64) {
            let at = RX_DATA + i * 0x800;
            self.rx.add(&self.mem, &[(at, 0x800, true)]);
            self.kicks[RX_QUEUE].write(1).unwrap();
        }

        /// The offload header and frame of RX buffer `i`, `len` bytes of it.
        fn rx_buffer(&self, i: u64, len: u32) -> (VnetHdr, Vec<u8>) {
            let mut b = vec![0u8; len as usize];
            self.mem
                .read_slice(&mut b, GuestAddress(RX_DATA + i * 0x800))
                .unwrap();
            let hdr = VnetHdr::from_bytes(b[..VNET_HDR_LEN].try_into().unwrap());
            (hdr, b[VNET_HDR_LEN..].to_vec())
        }
    }

    /// An IPv4/UDP frame from `src` carrying `payload` (checksums left zero).
    fn udp(src: MacAddr, payload: &[u8]) -> Vec<u8> {
        let mut f = PEER.0.to_vec();
        f.extend_from_slice(&src.0);
        f.extend_from_slice(&[0x08, 0x00]);
        let total = (20 + 8 + payload.len()) as u16;
        f.extend_from_slice(&[
            0x45,
            0,
            (total >> 8) as u8,
            total as u8,
            0,
            0,
            0x40,
            0,
            64,
            17,
        ]);
        f.extend_from_slice(&[0, 0, 10, 0, 0, 1, 10, 0, 0, 2]);
        let udp_len = (8 + payload.len()) as u16;
        f.extend_from_slice(&[
            0x30,
            0x39,
            0x30,
            0x3a,
            (udp_len >> 8) as u8,
            udp_len as u8,
            0,
            0,
        ]);
        f.extend_from_slice(payload);
        f
    }

    fn plain() -> VnetHdr {
        VnetHdr::default()
    }

    const ACKED: u64 = FEATURES & !VIRTIO_F_RING_EVENT_IDX & !VIRTIO_F_RING_INDIRECT_DESC;

    #[test]
    fn frames_cross_a_real_tap_both_ways_and_forged_ones_stay_behind() {
        let mut r = Rig::new(ACKED, RateLimit::default(), None);
        // TX: a plain frame, a forged one, then one asking for a partial checksum.
        let first = udp(MAC, b"hello from the guest");
        r.send(plain(), &first);
        r.send(plain(), &udp(PEER, b"forged"));
        let csum = VnetHdr {
            flags: crate::devices::virtio::net::frame::VIRTIO_NET_HDR_F_NEEDS_CSUM,
            csum_start: 34,
            csum_offset: 6,
            ..plain()
        };
        let third = udp(MAC, b"checksum this");
        r.send(csum, &third);
        let seen = r.net_side.recv().expect("the first frame on the tap");
        assert_eq!(seen.frame, first);
        assert_eq!(seen.vlan, None);
        let seen = r.net_side.recv().expect("the third frame on the tap");
        assert_eq!(seen.frame, third, "the forged frame never reached the tap");
        // The kernel kept the checksum partial, where the guest said it goes.
        assert_eq!(seen.hdr[0], 1, "NEEDS_CSUM");
        assert_eq!(u16::from_le_bytes([seen.hdr[6], seen.hdr[7]]), 34);
        assert_eq!(u16::from_le_bytes([seen.hdr[8], seen.hdr[9]]), 6);
        let used = r.tx.wait_used(&r.mem, 3);
        assert_eq!(used, vec![(0, 0), (2, 0), (4, 0)]);
        assert_ne!(r.interrupt.status() & INT_VRING, 0);
        // RX: a frame the network sends arrives whole behind a one-buffer header.
        r.post_rx(0);
        let inbound = udp(PEER, b"hello from the network");
        r.net_side.send([0; 10], &inbound);
        let used = r.rx.wait_used(&r.mem, 1);
        assert_eq!(used, vec![(0, (VNET_HDR_LEN + inbound.len()) as u32)]);
        let (hdr, frame) = r.rx_buffer(0, used[0].1);
        assert_eq!(frame, inbound);
        assert_eq!(hdr.num_buffers, 1);
        let s = r.nic.metrics.snapshot();
        assert_eq!((s.tx_packets, s.tx_spoofed, s.tx_dropped), (2, 1, 1));
        assert_eq!(s.tx_bytes, (first.len() + third.len()) as u64);
        assert_eq!((s.rx_packets, s.rx_bytes), (1, inbound.len() as u64));
        assert_eq!((s.invalid, s.rx_dropped, s.tx_errors), (0, 0, 0));
    }

    #[test]
    fn a_frame_waits_for_a_buffer_and_offloads_follow_what_the_guest_acked() {
        // Without GUEST_CSUM the kernel completes a partial checksum before we see it.
        let mut r = Rig::new(ACKED & !VIRTIO_NET_F_GUEST_CSUM, RateLimit::default(), None);
        let partial = [1, 0, 0, 0, 0, 0, 34, 0, 6, 0];
        let inbound = udp(PEER, b"no buffer yet");
        r.net_side.send(partial, &inbound);
        std::thread::sleep(Duration::from_millis(50));
        assert!(r.rx.used(&r.mem).is_empty());
        r.post_rx(1);
        let used = r.rx.wait_used(&r.mem, 1);
        assert_eq!(used.len(), 1, "the frame waited for the buffer");
        let (hdr, frame) = r.rx_buffer(1, used[0].1);
        assert_eq!(hdr.flags & 1, 0, "no partial checksum for this guest");
        assert_ne!(
            &frame[40..42],
            &[0, 0],
            "the kernel filled in the UDP checksum"
        );
        drop(r);
        // With it the checksum is left to the guest, and the header says where.
        let mut r = Rig::new(ACKED, RateLimit::default(), None);
        r.post_rx(0);
        r.net_side.send(partial, &inbound);
        let used = r.rx.wait_used(&r.mem, 1);
        let (hdr, frame) = r.rx_buffer(0, used[0].1);
        assert_eq!((hdr.flags & 1, hdr.csum_start, hdr.csum_offset), (1, 34, 6));
        assert_eq!(frame, inbound);
    }

    #[test]
    fn a_vlan_vif_tags_what_it_sends_and_takes_only_its_own_tag() {
        let v = Vlan::new(42).unwrap();
        let mut r = Rig::new(ACKED, RateLimit::default(), Some(v));
        let out = udp(MAC, b"tag me");
        r.send(plain(), &out);
        let seen = r.net_side.recv().expect("the frame on the tap");
        assert_eq!((seen.frame, seen.vlan), (out, Some(42)));
        r.nic.announce().unwrap();
        let seen = r.net_side.recv().expect("the announcement");
        assert_eq!(&seen.frame[12..14], &[0x80, 0x35]);
        assert_eq!(seen.vlan, Some(42));
        r.post_rx(0);
        let inbound = udp(PEER, b"for vlan 42");
        let tagged = |id: u16| {
            let mut f = inbound[..12].to_vec();
            f.extend_from_slice(&Vlan::new(u32::from(id)).unwrap().tag_bytes());
            f.extend_from_slice(&inbound[12..]);
            f
        };
        r.net_side.send([0; 10], &tagged(43));
        r.net_side.send([0; 10], &inbound);
        r.net_side.send([0; 10], &tagged(42));
        let used = r.rx.wait_used(&r.mem, 1);
        let (_, frame) = r.rx_buffer(0, used[0].1);
        assert_eq!(frame, inbound, "delivered untagged");
        let s = r.nic.metrics.snapshot();
        assert_eq!((s.rx_packets, s.rx_dropped, s.announces), (1, 2, 1));
    }

    #[test]
    fn a_frame_queued_without_a_kick_goes_only_while_the_worker_watches() {
        // Never watching: such a frame waits for the next kick.
        let mut r = Rig::polling(ACKED, RateLimit::default(), None, Duration::ZERO);
        r.send(plain(), &udp(MAC, b"kicked"));
        assert!(r.tx_used_within(Duration::from_secs(2)));
        // (Until the worker has looked at the ring once more with kicks on, a frame
        // queued now would rightly still go.)
        std::thread::sleep(Duration::from_millis(50));
        r.queue_tx(plain(), &udp(MAC, b"quiet"));
        std::thread::sleep(Duration::from_millis(50));
        assert!(r.tx.used(&r.mem).is_empty(), "taken with no kick");
        r.kicks[TX_QUEUE].write(1).unwrap();
        assert!(r.tx_used_within(Duration::from_secs(2)));

        // Watching up to 1 ms: kicked frames 100 µs apart grow the window past their gap,
        // and then one queued 100 µs after the last goes without a kick. Tried again when
        // a loaded machine stretched the gaps past the ceiling (which shrinks the window).
        let mut r = Rig::polling(ACKED, RateLimit::default(), None, MAX_BUSY_POLL);
        let gap = Duration::from_micros(100);
        let taken = (0..50).any(|_| {
            for _ in 0..10 {
                r.send(plain(), &udp(MAC, b"kicked"));
                assert!(r.tx_used_within(Duration::from_secs(2)));
                std::thread::sleep(gap);
            }
            r.queue_tx(plain(), &udp(MAC, b"quiet"));
            let taken = r.tx_used_within(Duration::from_millis(5));
            if !taken {
                r.kicks[TX_QUEUE].write(1).unwrap();
                assert!(r.tx_used_within(Duration::from_secs(2)));
            }
            taken
        });
        assert!(taken, "a watching worker never took a frame without a kick");
        let sent = r.nic.metrics.snapshot().tx_packets;
        let mut seen = 0;
        while r.net_side.recv().is_some() {
            seen += 1;
        }
        assert_eq!(seen, sent, "every frame taken reached the tap");
    }

    #[test]
    fn wakes_that_move_no_frame_open_no_window() {
        // RX buffers refilled 100 µs apart, 20 times, no traffic: a window grown by those
        // wakes would take a frame queued right after one without its kick.
        let mut r = Rig::polling(ACKED, RateLimit::default(), None, MAX_BUSY_POLL);
        for i in 0..20 {
            r.post_rx(i);
            std::thread::sleep(Duration::from_micros(100));
        }
        r.post_rx(20);
        r.queue_tx(plain(), &udp(MAC, b"quiet"));
        assert!(
            !r.tx_used_within(Duration::from_millis(20)),
            "a frame went without a kick: the worker watched after wakes with no traffic"
        );
        r.kicks[TX_QUEUE].write(1).unwrap();
        assert!(r.tx_used_within(Duration::from_secs(2)));
    }

    /// Datagrams of one flow queued together leave in one write, one USO frame, and the
    /// host's kernel hands its socket each of them as the guest sent it, in order; a
    /// frame of another kind between them ends the batch and keeps its place.
    #[test]
    fn a_flows_datagrams_go_in_one_write_and_arrive_one_by_one() {
        use std::net::{Ipv4Addr, UdpSocket};

        use crate::devices::virtio::net::coalesce::{PARTIAL, offloaded_udp};

        let mut r = Rig::polling(ACKED, RateLimit::default(), None, Duration::ZERO);
        // RFC 2544's benchmarking range, a /30 for this test's process alone.
        let third = (std::process::id() % 256) as u8;
        let (host, guest) = ([198, 18, third, 1], [198, 18, third, 2]);
        let tap_mac = r.net_side.host_address(Ipv4Addr::from(host));
        let sock = UdpSocket::bind((Ipv4Addr::from(host), 0)).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let port = sock.local_addr().unwrap().port();
        let datagram = |i: u16, payload: &[u8]| {
            offloaded_udp(
                [tap_mac, MAC.0],
                [guest, host],
                [4000, port],
                i,
                true,
                payload,
            )
        };
        let payloads: Vec<Vec<u8>> = (0..25u8)
            .map(|i| vec![i; if i == 9 || i == 24 { 20 } else { 64 }])
            .collect();
        let between = udp(MAC, b"between");
        for (i, p) in payloads.iter().enumerate() {
            r.queue_tx(PARTIAL, &datagram(i as u16, p));
            if i == 15 {
                // Not the flow's: the batch so far goes first, then this, then the rest.
                r.queue_tx(plain(), &between);
            }
        }
        r.kicks[TX_QUEUE].write(1).unwrap();
        r.tx.wait_used(&r.mem, 26);
        let mut buf = [0u8; 2048];
        for (i, p) in payloads.iter().enumerate() {
            let n = sock
                .recv(&mut buf)
                .unwrap_or_else(|e| panic!("datagram {i}: {e}"));
            assert_eq!(&buf[..n], &p[..], "datagram {i}");
        }
        // Batches: 0-9 (the shorter 9 ends one), 10-15, the other frame, 16-24. (Counted
        // once the write returned, which may be after the socket had the datagrams.)
        let counted = Instant::now();
        let s = loop {
            let s = r.nic.metrics.snapshot();
            if s.tx_packets == 26 || counted.elapsed() > Duration::from_secs(2) {
                break s;
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        assert_eq!((s.tx_packets, s.tx_batched, s.tx_errors), (26, 25, 0));
        let mut seen = Vec::new();
        while let Some(f) = r.net_side.recv() {
            seen.push((
                f.hdr[1],
                u16::from_le_bytes([f.hdr[4], f.hdr[5]]),
                f.frame.len(),
            ));
        }
        let uso = |n: usize, last: usize| (5, 64, 42 + 64 * (n - 1) + last);
        let alone = (0, 0, between.len());
        assert_eq!(seen, vec![uso(10, 20), uso(6, 64), alone, uso(9, 20)]);
    }

    #[test]
    fn frames_of_another_vlan_open_no_window() {
        // Another VLAN's frames on the bridge, 100 µs apart, 20 times: dropped on the way
        // in, they are no traffic of this VIF's, and a window grown by them would take a
        // frame queued right after without its kick.
        let v = Vlan::new(42).unwrap();
        let mut r = Rig::polling(ACKED, RateLimit::default(), Some(v), MAX_BUSY_POLL);
        r.post_rx(0);
        let inbound = udp(PEER, b"for vlan 43");
        let mut other = inbound[..12].to_vec();
        other.extend_from_slice(&Vlan::new(43).unwrap().tag_bytes());
        other.extend_from_slice(&inbound[12..]);
        for _ in 0..20 {
            r.net_side.send([0; 10], &other);
            std::thread::sleep(Duration::from_micros(100));
        }
        let dropped = Instant::now();
        while r.nic.metrics.snapshot().rx_dropped < 20 {
            assert!(
                dropped.elapsed() < Duration::from_secs(2),
                "frames not read"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        r.queue_tx(plain(), &udp(MAC, b"quiet"));
        assert!(
            !r.tx_used_within(Duration::from_millis(20)),
            "a frame went without a kick: the worker watched after another VLAN's frames"
        );
        r.kicks[TX_QUEUE].write(1).unwrap();
        assert!(r.tx_used_within(Duration::from_secs(2)));
    }

    #[test]
    fn a_deleted_tap_is_reported_once_and_leaves_the_worker_asleep() {
        // Its own id, so that its worker's thread is found by name ("net-gone-tap").
        let mut r = Rig::with(ACKED, RateLimit::default(), None, |n| {
            n.id = "gone-tap".into()
        });
        r.post_rx(0);
        let name = r.net_side.tap.name().to_owned();
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(async {
                let nl = crate::network::netlink::Netlink::open().unwrap();
                let dev = nl.device(&name).await.unwrap().expect("the rig's tap");
                nl.delete(dev.index, &name).await.unwrap();
            });
        // Each RX kick wakes the worker; a broken tap is read no more.
        for i in 1..20 {
            std::thread::sleep(Duration::from_millis(5));
            r.post_rx(i);
        }
        std::thread::sleep(Duration::from_millis(100));
        let errors = r.nic.metrics.snapshot().rx_errors;
        assert!(
            errors <= 1,
            "{errors} tap read errors: the worker kept reading a deleted tap"
        );
        // The worker's CPU time (user + system, in clock ticks of 10 ms).
        let busy = || -> u64 {
            let tasks = std::fs::read_dir("/proc/self/task").unwrap();
            tasks
                .flatten()
                .find(|t| {
                    std::fs::read_to_string(t.path().join("comm"))
                        .is_ok_and(|c| c.trim() == "net-gone-tap")
                })
                .map(|t| {
                    let stat = std::fs::read_to_string(t.path().join("stat")).unwrap();
                    let after_comm = &stat[stat.rfind(')').unwrap() + 2..];
                    let f: Vec<&str> = after_comm.split(' ').collect();
                    // Fields 14 and 15 of stat, 12 and 13 after the state.
                    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
                })
                .expect("the worker thread")
        };
        let before = busy();
        std::thread::sleep(Duration::from_millis(300));
        let ticks = busy() - before;
        assert!(
            ticks < 10,
            "the worker spent {ticks}0 ms of 300 on a deleted tap"
        );
    }

    #[test]
    fn a_watching_worker_reports_a_broken_tx_ring_and_stops_watching_it() {
        let mut r = Rig::polling(ACKED, RateLimit::default(), None, MAX_BUSY_POLL);
        // Traffic 100 µs apart opens a window; then the ring's index runs past its size.
        for _ in 0..20 {
            r.send(plain(), &udp(MAC, b"kicked"));
            assert!(r.tx_used_within(Duration::from_secs(2)));
            std::thread::sleep(Duration::from_micros(100));
        }
        r.tx.publish_bogus_index(&r.mem, 64 + 5);
        r.kicks[TX_QUEUE].write(1).unwrap();
        let deadline = Instant::now() + Duration::from_secs(2);
        while r.nic.metrics.snapshot().invalid == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(
            r.nic.metrics.snapshot().invalid >= 1,
            "the broken ring was never reported (the worker kept watching it)"
        );
    }

    #[test]
    fn a_locked_vif_sends_only_from_its_addresses_and_counts_the_rest() {
        // `udp` frames come from 10.0.0.1.
        let own: std::sync::Arc<[std::net::Ipv4Addr]> = [[10, 0, 0, 1].into()].into();
        let mut r = Rig::with(ACKED, RateLimit::default(), None, |n| {
            n.ipv4_lock = Some(own)
        });
        let mut foreign = udp(MAC, b"from 10.0.0.9");
        foreign[ETH_HLEN + 15] = 9;
        r.send(plain(), &foreign);
        r.send(plain(), &udp(MAC, b"from 10.0.0.1"));
        assert_eq!(r.tx.wait_used(&r.mem, 2).len(), 2, "both chains given back");
        let seen = r.net_side.recv().expect("the VIF's own frame");
        assert_eq!(seen.frame, udp(MAC, b"from 10.0.0.1"));
        assert!(
            r.net_side.recv().is_none(),
            "nothing else reached the network"
        );
        let m = r.nic.metrics.snapshot();
        assert_eq!((m.tx_packets, m.tx_spoofed, m.tx_dropped), (1, 1, 1));
    }

    #[test]
    fn the_rate_limit_delays_frames_and_drops_none() {
        // 200 packets/s: a 20-packet burst, then one every 5 ms.
        let rate = RateLimit::new(None, Some(200)).unwrap();
        let mut r = Rig::new(ACKED, rate, None);
        let started = Instant::now();
        for i in 0..30u8 {
            r.send(plain(), &udp(MAC, &[i; 20]));
        }
        for i in 0..30u8 {
            let seen = r.net_side.recv().expect("every frame arrives");
            assert_eq!(&seen.frame[42..], &[i; 20], "in order");
        }
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(45), "{took:?}");
        assert_eq!(r.tx.wait_used(&r.mem, 30).len(), 30);
        let s = r.nic.metrics.snapshot();
        assert_eq!((s.tx_packets, s.tx_dropped), (30, 0));
        assert!(s.tx_throttled >= 1);
    }

    #[test]
    fn malformed_chains_are_counted_and_returned_and_the_worker_goes_on() {
        let mut r = Rig::new(ACKED, RateLimit::default(), None);
        // A TX chain with a device-writable buffer, one too short, one outside memory,
        // and a header asking for segmentation with ECN, which is not offered.
        r.tx.add(&r.mem, &[(TX_DATA, 12, false), (TX_DATA + 0x100, 60, true)]);
        r.tx.add(&r.mem, &[(TX_DATA, 20, false)]);
        r.tx.add(&r.mem, &[(TX_DATA, 12, false), (0x1000_0000, 60, false)]);
        let gso = VnetHdr {
            flags: 1,
            gso_type: 0x81,
            gso_size: 1000,
            csum_start: 34,
            csum_offset: 16,
            ..plain()
        };
        r.send(gso, &udp(MAC, &[0; 100]));
        r.kicks[TX_QUEUE].write(1).unwrap();
        assert_eq!(r.tx.wait_used(&r.mem, 4).len(), 4);
        // An RX buffer the device may not write is handed back empty; the frame takes
        // the next one.
        r.rx.add(&r.mem, &[(RX_DATA, 0x800, false)]);
        r.post_rx(1);
        let inbound = udp(PEER, b"after a bad buffer");
        r.net_side.send([0; 10], &inbound);
        let used = r.rx.wait_used(&r.mem, 2);
        assert_eq!(used[0], (0, 0));
        let (_, frame) = r.rx_buffer(1, used[1].1);
        assert_eq!(frame, inbound);
        let s = r.nic.metrics.snapshot();
        assert_eq!((s.invalid, s.tx_packets, s.rx_packets), (5, 0, 1));
        // Still serving: a good frame goes out.
        let good = udp(MAC, b"still here");
        r.send(plain(), &good);
        assert_eq!(r.net_side.recv().unwrap().frame, good);
        // A driver whose available index runs past its ring: counted, and the worker
        // waits for the next kick instead of spinning (it still stops when told).
        let avail_idx = GuestAddress(0x2000 + 16 * 64 + 2);
        r.mem.write_obj(1000u16, avail_idx).unwrap();
        r.kicks[TX_QUEUE].write(1).unwrap();
        let deadline = Instant::now() + Duration::from_secs(2);
        while r.nic.metrics.snapshot().invalid == 5 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        // Counted once per wake-up (the kick; a tap event may wake the worker once
        // more), and then no more: a spinning worker would count on and on.
        let counted = r.nic.metrics.snapshot().invalid;
        assert!(counted >= 6, "the bad index was counted: {counted}");
        std::thread::sleep(Duration::from_millis(200));
        let settled = r.nic.metrics.snapshot().invalid;
        assert!(settled <= 7, "the worker spins on the bad index: {settled}");
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(
            r.nic.metrics.snapshot().invalid,
            settled,
            "the worker spins"
        );
        // The queues come back where the device left them.
        let queues = r.net.quiesce();
        assert_eq!(queues.len(), 2);
        assert_eq!(queues[TX_QUEUE].next_avail(), 5);
        assert_eq!(queues[RX_QUEUE].next_avail(), 2);
    }
}
