//! UDP datagrams a guest sends back to back on one flow, written to the tap as one UDP
//! segmentation offload (USO) frame that the kernel splits into those datagrams again:
//! one write and one pass through the host's stack (IP receive, netfilter, routing, the
//! bridge) for up to [`MAX_SEGMENTS`] datagrams instead of one each. Linux takes USO from
//! a tap writer since 6.2; a kernel that refuses it (EINVAL, before it injects anything)
//! gets the datagrams one by one, rebuilt byte for byte, and no more batches.
//!
//! Only datagrams the kernel splits back into what the guest sent are taken: Ethernet,
//! IPv4 without options and with a valid header checksum, not a fragment, no padding, UDP
//! with the checksum left to the device (exactly `NEEDS_CSUM` at the UDP checksum, holding
//! the pseudo-header sum, as Linux's drivers leave it), and IP ids the kernel gives again:
//! consecutive ones, or, with don't-fragment set, any (the kernel numbers the segments
//! from the first one's id; RFC 6864 gives an atomic datagram's id no meaning, and a Linux
//! guest's unconnected socket sends them all 0). A batch holds one flow (the same Ethernet
//! header, addresses, ports, TOS, TTL and flags), payloads of one size but for a shorter
//! last one, at most 64 KiB: what the kernel's USO takes.

use super::frame::{
    ETH_HLEN, ETH_P_IP, VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_NONE,
    VIRTIO_NET_HDR_GSO_UDP_L4, VnetHdr,
};

/// Datagrams in one batch: the kernel's USO limit (`UDP_MAX_SEGMENTS`) on kernels before
/// 6.11 raised it to 128.
pub const MAX_SEGMENTS: usize = 64;
const IP_AT: usize = ETH_HLEN;
const UDP_AT: usize = IP_AT + 20;
/// Ethernet, IPv4 (no options) and UDP headers.
pub const HEADERS: usize = UDP_AT + 8;
const IP_PROTO_UDP: u8 = 17;
const IP_DF: u16 = 0x4000;
const IP_MAX: usize = 65_535;

/// What a batched datagram had that the batch's headers do not keep: enough to rebuild it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Kept {
    id: u16,
    ip_check: u16,
    udp_check: u16,
    payload: usize,
}

/// The datagrams of one flow waiting to be written, as one frame: the first datagram's
/// headers, then every payload.
#[derive(Debug)]
pub struct Batch {
    /// The first datagram's headers as it sent them, then the payloads.
    buf: Vec<u8>,
    kept: Vec<Kept>,
    /// The first payload's size: every other is as long, the last may be shorter.
    gso_size: usize,
    /// A shorter datagram came: the batch takes no more.
    closed: bool,
}

/// What to write for a batch.
pub enum Out<'a> {
    /// One datagram, as it came.
    One(VnetHdr, &'a [u8]),
    /// Several, as one USO frame.
    Many(VnetHdr, &'a [u8]),
}

impl Default for Batch {
    fn default() -> Self {
        Self {
            buf: Vec::with_capacity(ETH_HLEN + IP_MAX),
            kept: Vec::with_capacity(MAX_SEGMENTS),
            gso_size: 0,
            closed: false,
        }
    }
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

/// The ones'-complement sum of `b`'s big-endian 16-bit words, added to `sum`.
fn sum16(b: &[u8], mut sum: u32) -> u32 {
    let mut words = b.chunks_exact(2);
    for w in &mut words {
        sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = words.remainder() {
        sum += u32::from(*last) << 8;
    }
    sum
}

/// `sum` folded to 16 bits (not complemented).
fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The UDP pseudo-header's sum for a datagram of `udp_len` bytes, folded: what a driver
/// leaves in the checksum field for the device to complete.
fn pseudo(frame: &[u8], udp_len: usize) -> u16 {
    let addrs = &frame[IP_AT + 12..IP_AT + 20];
    fold(sum16(addrs, u32::from(IP_PROTO_UDP) + udp_len as u32))
}

/// Ones'-complement equality: 0 and 0xffff are both zero.
fn same_sum(a: u16, b: u16) -> bool {
    a == b || ((a | b) == 0xffff && (a == 0 || b == 0))
}

/// The IPv4 header checksum `ip` (20 bytes) should hold.
fn ip_check(ip: &[u8]) -> u16 {
    let sum = sum16(&ip[..10], 0) + sum16(&ip[12..20], 0);
    !fold(sum)
}

/// `frame`'s payload length when a batch may take it (see the module's rules).
fn datagram(hdr: &VnetHdr, frame: &[u8]) -> Option<usize> {
    // The whole header, so that a datagram the batch gives back alone (`each`) goes with
    // the header it came with.
    if *hdr != PARTIAL || frame.len() <= HEADERS || be16(frame, 12) != ETH_P_IP {
        return None;
    }
    let ip = &frame[IP_AT..];
    let total = usize::from(be16(ip, 2));
    // Version 4 without options, UDP, no padding, not a fragment (nor the evil bit).
    if ip[0] != 0x45 || ip[9] != IP_PROTO_UDP || total != frame.len() - IP_AT {
        return None;
    }
    if be16(ip, 6) & !IP_DF != 0 || be16(ip, 10) != ip_check(ip) {
        return None;
    }
    let udp_len = usize::from(be16(frame, UDP_AT + 4));
    if udp_len != total - 20 || !same_sum(be16(frame, UDP_AT + 6), pseudo(frame, udp_len)) {
        return None;
    }
    Some(udp_len - 8)
}

/// Whether `a` and `b` (datagrams) are of one flow: the same Ethernet header, TOS, flags,
/// TTL, addresses and ports.
fn same_flow(a: &[u8], b: &[u8]) -> bool {
    a[..IP_AT + 2] == b[..IP_AT + 2]
        && a[IP_AT + 6..IP_AT + 10] == b[IP_AT + 6..IP_AT + 10]
        && a[IP_AT + 12..UDP_AT + 4] == b[IP_AT + 12..UDP_AT + 4]
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.kept.is_empty()
    }

    /// Datagrams in the batch.
    pub fn len(&self) -> usize {
        self.kept.len()
    }

    /// Takes `frame` (the guest's, checked, behind `hdr`) into the batch; false when it
    /// cannot join this batch. An empty batch starts with any datagram it may take.
    pub fn add(&mut self, hdr: &VnetHdr, frame: &[u8]) -> bool {
        let Some(payload) = datagram(hdr, frame) else {
            return false;
        };
        let ip = &frame[IP_AT..];
        let kept = Kept {
            id: be16(ip, 4),
            ip_check: be16(ip, 10),
            udp_check: be16(frame, UDP_AT + 6),
            payload,
        };
        if self.kept.is_empty() {
            self.buf.clear();
            self.buf.extend_from_slice(frame);
            self.gso_size = payload;
            self.closed = false;
            self.kept.push(kept);
            return true;
        }
        let first = &self.buf[..HEADERS];
        let df = be16(first, IP_AT + 6) & IP_DF != 0;
        let next_id = self.kept[0].id.wrapping_add(self.kept.len() as u16);
        let fits = self.buf.len() + payload <= ETH_HLEN + IP_MAX;
        if self.closed
            || self.kept.len() == MAX_SEGMENTS
            || payload > self.gso_size
            || !fits
            || !(df || kept.id == next_id)
            || !same_flow(first, frame)
        {
            return false;
        }
        self.closed = payload < self.gso_size;
        self.buf.extend_from_slice(&frame[HEADERS..]);
        self.kept.push(kept);
        true
    }

    /// What to write for the batch (which stays as it is until [`Batch::clear`]): its
    /// one datagram, or a USO frame whose headers cover every payload (lengths and IP
    /// checksum for the whole, the pseudo-header sum of the whole UDP length, which the
    /// kernel adjusts for each segment).
    pub fn out(&mut self) -> Option<Out<'_>> {
        match self.kept.len() {
            0 => None,
            1 => Some(Out::One(PARTIAL, &self.buf)),
            _ => {
                let total = self.buf.len() - IP_AT;
                let udp_len = total - 20;
                put16(&mut self.buf, IP_AT + 2, total as u16);
                let check = ip_check(&self.buf[IP_AT..]);
                put16(&mut self.buf, IP_AT + 10, check);
                put16(&mut self.buf, UDP_AT + 4, udp_len as u16);
                let sum = pseudo(&self.buf, udp_len);
                put16(&mut self.buf, UDP_AT + 6, sum);
                let hdr = VnetHdr {
                    flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
                    gso_type: VIRTIO_NET_HDR_GSO_UDP_L4,
                    hdr_len: HEADERS as u16,
                    gso_size: self.gso_size as u16,
                    csum_start: UDP_AT as u16,
                    csum_offset: 6,
                    num_buffers: 0,
                };
                Some(Out::Many(hdr, &self.buf))
            }
        }
    }

    /// Each datagram of the batch as the guest sent it, with its offload header (for a
    /// kernel that refused the USO frame), one after another into `scratch`.
    pub fn each(&self, scratch: &mut Vec<u8>, mut f: impl FnMut(VnetHdr, &[u8])) {
        let mut at = HEADERS;
        for k in &self.kept {
            scratch.clear();
            scratch.extend_from_slice(&self.buf[..HEADERS]);
            let total = 28 + k.payload;
            put16(scratch, IP_AT + 2, total as u16);
            put16(scratch, IP_AT + 4, k.id);
            put16(scratch, IP_AT + 10, k.ip_check);
            put16(scratch, UDP_AT + 4, (total - 20) as u16);
            put16(scratch, UDP_AT + 6, k.udp_check);
            scratch.extend_from_slice(&self.buf[at..at + k.payload]);
            at += k.payload;
            f(PARTIAL, scratch);
        }
    }

    /// The frame length of each datagram (for the counters).
    pub fn lens(&self) -> impl Iterator<Item = u64> + '_ {
        self.kept.iter().map(|k| (HEADERS + k.payload) as u64)
    }

    pub fn clear(&mut self) {
        self.kept.clear();
        self.buf.clear();
    }
}

/// A datagram as a Linux guest sends it with checksum offload (behind [`PARTIAL`]):
/// Ethernet to `macs[0]` from `macs[1]`, IPv4 from `ips[0]` to `ips[1]` with id `id` and
/// don't-fragment when `df`, UDP from port `ports[0]` to `ports[1]`, its checksum field
/// the pseudo-header's sum.
#[cfg(test)]
pub(super) fn offloaded_udp(
    macs: [[u8; 6]; 2],
    ips: [[u8; 4]; 2],
    ports: [u16; 2],
    id: u16,
    df: bool,
    payload: &[u8],
) -> Vec<u8> {
    let mut f = vec![0u8; HEADERS];
    f[..6].copy_from_slice(&macs[0]);
    f[6..12].copy_from_slice(&macs[1]);
    put16(&mut f, 12, ETH_P_IP);
    let total = 28 + payload.len();
    f[IP_AT] = 0x45;
    put16(&mut f, IP_AT + 2, total as u16);
    put16(&mut f, IP_AT + 4, id);
    put16(&mut f, IP_AT + 6, if df { IP_DF } else { 0 });
    f[IP_AT + 8] = 64;
    f[IP_AT + 9] = IP_PROTO_UDP;
    f[IP_AT + 12..IP_AT + 16].copy_from_slice(&ips[0]);
    f[IP_AT + 16..IP_AT + 20].copy_from_slice(&ips[1]);
    let check = ip_check(&f[IP_AT..]);
    put16(&mut f, IP_AT + 10, check);
    put16(&mut f, UDP_AT, ports[0]);
    put16(&mut f, UDP_AT + 2, ports[1]);
    put16(&mut f, UDP_AT + 4, (total - 20) as u16);
    let sum = pseudo(&f, total - 20);
    put16(&mut f, UDP_AT + 6, sum);
    f.extend_from_slice(payload);
    f
}

/// The offload header of a datagram whose UDP checksum the device completes, as Linux's
/// driver writes it; the only one a batch takes.
pub const PARTIAL: VnetHdr = VnetHdr {
    flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
    gso_type: VIRTIO_NET_HDR_GSO_NONE,
    hdr_len: 0,
    gso_size: 0,
    csum_start: UDP_AT as u16,
    csum_offset: 6,
    num_buffers: 0,
};

#[cfg(test)]
mod tests {
    use super::*;

    /// From 10.0.0.2:1024 to 10.0.0.1:`dport`.
    fn udp(dport: u16, id: u16, df: bool, payload: &[u8]) -> Vec<u8> {
        let macs = [[0x02, 0, 0, 0, 0, 1], [0x02, 0, 0, 0, 0, 2]];
        let ips = [[10, 0, 0, 2], [10, 0, 0, 1]];
        offloaded_udp(macs, ips, [1024, dport], id, df, payload)
    }

    /// The finished checksum of a datagram whose field holds the pseudo-header sum, as
    /// the kernel completes it.
    fn finished(f: &[u8]) -> u16 {
        let c = !fold(sum16(&f[UDP_AT..], 0));
        if c == 0 { 0xffff } else { c }
    }

    /// Splits a USO frame as the kernel's `__udp_gso_segment` does: each segment the
    /// headers with its own lengths, the ids counting up, and the checksum finished.
    fn split(hdr: &VnetHdr, f: &[u8]) -> Vec<Vec<u8>> {
        assert_eq!(hdr.gso_type, VIRTIO_NET_HDR_GSO_UDP_L4);
        let size = usize::from(hdr.gso_size);
        let id = be16(f, IP_AT + 4);
        let sum = be16(f, UDP_AT + 6);
        let whole = be16(f, UDP_AT + 4);
        assert_eq!(
            usize::from(whole),
            f.len() - UDP_AT,
            "UDP length of the whole"
        );
        assert_eq!(
            sum,
            pseudo(f, f.len() - UDP_AT),
            "pseudo-header sum of the whole"
        );
        f[HEADERS..]
            .chunks(size)
            .enumerate()
            .map(|(i, p)| {
                let mut s = f[..HEADERS].to_vec();
                put16(&mut s, IP_AT + 2, (28 + p.len()) as u16);
                put16(&mut s, IP_AT + 4, id.wrapping_add(i as u16));
                let check = ip_check(&s[IP_AT..]);
                put16(&mut s, IP_AT + 10, check);
                put16(&mut s, UDP_AT + 4, (8 + p.len()) as u16);
                let sum = pseudo(&s, 8 + p.len());
                put16(&mut s, UDP_AT + 6, sum);
                s.extend_from_slice(p);
                let done = finished(&s);
                put16(&mut s, UDP_AT + 6, done);
                s
            })
            .collect()
    }

    /// `f` with its checksum finished, as the kernel sends it.
    fn as_sent(f: &[u8]) -> Vec<u8> {
        let mut s = f.to_vec();
        let done = finished(&s);
        put16(&mut s, UDP_AT + 6, done);
        s
    }

    #[test]
    fn one_flows_datagrams_become_one_frame_the_kernel_splits_back() {
        let sent: Vec<Vec<u8>> = (0..5u16)
            .map(|i| {
                let len = if i == 4 { 40 } else { 64 };
                udp(7, 100 + i, false, &vec![i as u8; len])
            })
            .collect();
        let mut b = Batch::default();
        for f in &sent {
            assert!(b.add(&PARTIAL, f));
        }
        assert_eq!(b.lens().collect::<Vec<_>>(), [106, 106, 106, 106, 82]);
        let Some(Out::Many(hdr, frame)) = b.out() else {
            panic!("not one USO frame");
        };
        assert_eq!(
            (hdr.gso_size, hdr.hdr_len, hdr.csum_start, hdr.csum_offset),
            (64, 42, 34, 6)
        );
        assert_eq!(frame.len(), HEADERS + 4 * 64 + 40);
        assert_eq!(ip_check(&frame[IP_AT..]), be16(frame, IP_AT + 10));
        let split = split(&hdr, frame);
        let want: Vec<Vec<u8>> = sent.iter().map(|f| as_sent(f)).collect();
        assert_eq!(split, want);

        // And rebuilt one by one as they came (a kernel without USO).
        let mut each = Vec::new();
        b.each(&mut Vec::new(), |h, f| each.push((h, f.to_vec())));
        assert_eq!(
            each,
            sent.iter()
                .map(|f| (PARTIAL, f.clone()))
                .collect::<Vec<_>>()
        );
        b.clear();
        assert!(b.is_empty() && b.out().is_none());
    }

    #[test]
    fn atomic_datagrams_come_back_numbered_from_the_first_id() {
        // A Linux guest's unconnected socket: don't-fragment, every id 0.
        let sent: Vec<Vec<u8>> = (0..3u8).map(|i| udp(7, 0, true, &[i; 64])).collect();
        let mut b = Batch::default();
        for f in &sent {
            assert!(b.add(&PARTIAL, f));
        }
        let Some(Out::Many(hdr, frame)) = b.out() else {
            panic!("not one USO frame");
        };
        let split = split(&hdr, frame);
        for (i, (got, f)) in split.iter().zip(&sent).enumerate() {
            let mut want = udp(7, i as u16, true, &f[HEADERS..]);
            want = as_sent(&want);
            assert_eq!(got, &want, "datagram {i}: all but the id as sent");
        }
    }

    #[test]
    fn a_lone_datagram_goes_as_it_came() {
        let f = udp(7, 1, true, b"hello");
        let mut b = Batch::default();
        assert!(b.add(&PARTIAL, &f));
        let Some(Out::One(hdr, frame)) = b.out() else {
            panic!("not the datagram itself");
        };
        assert_eq!((hdr, frame), (PARTIAL, &f[..]));
    }

    #[test]
    fn only_what_the_kernel_gives_back_unchanged_is_taken() {
        let ok = udp(7, 1, false, &[1; 64]);
        let refused = |hdr: &VnetHdr, f: &[u8]| !Batch::default().add(hdr, f);
        let with = |edit: fn(&mut Vec<u8>)| {
            let mut f = ok.clone();
            edit(&mut f);
            f
        };
        // The checksum left to the device, at the UDP checksum, and nothing else asked.
        let full = VnetHdr::default();
        assert!(refused(&full, &ok), "a finished (or absent) checksum");
        let elsewhere = VnetHdr {
            csum_offset: 16,
            ..PARTIAL
        };
        assert!(refused(&elsewhere, &ok));
        let gso = VnetHdr {
            gso_type: super::super::frame::VIRTIO_NET_HDR_GSO_TCPV4,
            ..PARTIAL
        };
        assert!(refused(&gso, &ok));
        let valid = VnetHdr {
            flags: VIRTIO_NET_HDR_F_NEEDS_CSUM | super::super::frame::VIRTIO_NET_HDR_F_DATA_VALID,
            ..PARTIAL
        };
        assert!(refused(&valid, &ok));
        let hinted = VnetHdr {
            hdr_len: 42,
            ..PARTIAL
        };
        assert!(refused(&hinted, &ok), "a header length it would not keep");
        // Not IPv4 and UDP as the kernel splits it.
        assert!(refused(&PARTIAL, &with(|f| put16(f, 12, 0x86dd))));
        assert!(refused(&PARTIAL, &with(|f| f[IP_AT] = 0x46)), "IP options");
        assert!(refused(&PARTIAL, &with(|f| f[IP_AT + 9] = 6)), "TCP");
        assert!(refused(&PARTIAL, &with(|f| f.push(0))), "padding");
        assert!(
            refused(&PARTIAL, &with(|f| f.truncate(HEADERS))),
            "no payload"
        );
        assert!(
            refused(&PARTIAL, &with(|f| put16(f, IP_AT + 6, 0x2000))),
            "a fragment"
        );
        assert!(
            refused(&PARTIAL, &with(|f| put16(f, IP_AT + 6, 0x8000))),
            "evil bit"
        );
        assert!(
            refused(&PARTIAL, &with(|f| f[IP_AT + 10] ^= 1)),
            "bad IP checksum"
        );
        assert!(
            refused(&PARTIAL, &with(|f| put16(f, UDP_AT + 4, 70))),
            "UDP length"
        );
        assert!(
            refused(&PARTIAL, &with(|f| f[UDP_AT + 6] ^= 1)),
            "not the pseudo sum"
        );
        assert!(!refused(&PARTIAL, &ok));
    }

    #[test]
    fn a_batch_holds_one_flow_in_order_within_the_kernels_limits() {
        let mut b = Batch::default();
        let add = |b: &mut Batch, f: &[u8]| b.add(&PARTIAL, f);
        assert!(add(&mut b, &udp(7, 1, false, &[0; 64])));
        assert!(!add(&mut b, &udp(8, 2, false, &[0; 64])), "another port");
        assert!(
            !add(&mut b, &udp(7, 5, false, &[0; 64])),
            "an id the kernel would not give"
        );
        assert!(!add(&mut b, &udp(7, 2, true, &[0; 64])), "other flags");
        assert!(
            !add(&mut b, &udp(7, 2, false, &[0; 65])),
            "a longer payload"
        );
        let mut ttl = udp(7, 2, false, &[0; 64]);
        ttl[IP_AT + 8] = 1;
        let check = ip_check(&ttl[IP_AT..]);
        put16(&mut ttl, IP_AT + 10, check);
        assert!(!add(&mut b, &ttl), "another TTL");
        assert!(add(&mut b, &udp(7, 2, false, &[0; 32])));
        assert!(
            !add(&mut b, &udp(7, 3, false, &[0; 32])),
            "after a shorter one"
        );
        assert_eq!(b.len(), 2);

        // Don't-fragment: any ids; at most MAX_SEGMENTS datagrams and 64 KiB.
        let mut b = Batch::default();
        for i in 0..MAX_SEGMENTS {
            assert!(add(&mut b, &udp(7, (i * 7) as u16, true, &[0; 16])), "{i}");
        }
        assert!(!add(&mut b, &udp(7, 0, true, &[0; 16])));
        let mut b = Batch::default();
        let big = vec![0; 1448 * 4];
        let fit = (IP_MAX - 28) / big.len();
        for _ in 0..fit {
            assert!(add(&mut b, &udp(7, 0, true, &big)));
        }
        assert!(!add(&mut b, &udp(7, 0, true, &big)), "past 64 KiB");
        let Some(Out::Many(_, f)) = b.out() else {
            panic!()
        };
        assert!(f.len() - ETH_HLEN <= IP_MAX);
    }
}
