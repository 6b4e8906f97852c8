//! Frames between the guest and the tap: descriptor chains parsed into typed values, the
//! offload header, and the VIF's policy on each frame (its own source MAC only, and when
//! locked only ARP and IPv4 from its own addresses; a VLAN access port: tagged toward the
//! network, untagged toward the guest).
//!
//! Everything here is guest or network input. A malformed chain or header is refused
//! with an error the worker counts; nothing here panics on what it is given.

use std::net::Ipv4Addr;

use vm_memory::{Bytes, GuestAddress};

use super::NicError;
use super::device::{VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6};
use crate::devices::virtio::block::request::Desc;
use crate::vmm::GuestRam;

/// `struct virtio_net_hdr_v1`: what precedes every frame, in guest buffers and on the
/// tap alike (the tap is told this size with TUNSETVNETHDRSZ).
pub const VNET_HDR_LEN: usize = 12;
pub const ETH_HLEN: usize = 14;
pub const VLAN_HLEN: usize = 4;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;
pub const ETH_P_RARP: u16 = 0x8035;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_IP: u16 = 0x0800;
/// Largest frame either side may hand over: a 64 KiB TSO segment with its headers.
pub const MAX_FRAME: usize = 65535 + ETH_HLEN + VLAN_HLEN;

pub const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
pub const VIRTIO_NET_HDR_F_DATA_VALID: u8 = 2;
pub const VIRTIO_NET_HDR_GSO_NONE: u8 = 0;
pub const VIRTIO_NET_HDR_GSO_TCPV4: u8 = 1;
pub const VIRTIO_NET_HDR_GSO_UDP: u8 = 3;
pub const VIRTIO_NET_HDR_GSO_TCPV6: u8 = 4;
pub const VIRTIO_NET_HDR_GSO_UDP_L4: u8 = 5;
pub const VIRTIO_NET_HDR_GSO_ECN: u8 = 0x80;

/// A MAC address. Parsed from `aa:bb:cc:dd:ee:ff`; a VIF's must be unicast and not zero.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    pub const BROADCAST: MacAddr = MacAddr([0xff; 6]);

    pub fn is_unicast(&self) -> bool {
        self.0[0] & 1 == 0 && self.0 != [0; 6]
    }
}

impl std::str::FromStr for MacAddr {
    type Err = NicError;

    fn from_str(s: &str) -> Result<Self, NicError> {
        let bad = || NicError::BadMac { mac: s.to_owned() };
        let mut mac = [0u8; 6];
        let mut parts = s.split(':');
        for b in mac.iter_mut() {
            let p = parts.next().filter(|p| p.len() == 2).ok_or_else(bad)?;
            *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        let mac = MacAddr(mac);
        if parts.next().is_some() || !mac.is_unicast() {
            return Err(bad());
        }
        Ok(mac)
    }
}

impl std::fmt::Display for MacAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = &self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// An 802.1Q VLAN id, 1 to 4094.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Vlan(u16);

impl Vlan {
    pub fn new(tag: u32) -> Result<Vlan, NicError> {
        match u16::try_from(tag) {
            Ok(t) if (1..=4094).contains(&t) => Ok(Vlan(t)),
            _ => Err(NicError::BadVlan { tag }),
        }
    }

    pub fn id(self) -> u16 {
        self.0
    }

    /// The four bytes of the tag (priority 0).
    pub fn tag_bytes(self) -> [u8; VLAN_HLEN] {
        let [p0, p1] = ETH_P_8021Q.to_be_bytes();
        let [v0, v1] = self.0.to_be_bytes();
        [p0, p1, v0, v1]
    }
}

/// The offload header of one frame.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
pub struct VnetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
    pub num_buffers: u16,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HdrError {
    #[error("segmentation type {gso_type:#x} was not negotiated")]
    Gso { gso_type: u8 },
    #[error("segmentation without a partial checksum")]
    GsoWithoutCsum,
    #[error("checksum offload was not negotiated")]
    Csum,
    #[error("checksum at {start}+{offset} lies outside the {len}-byte frame")]
    CsumRange { start: u16, offset: u16, len: usize },
}

impl VnetHdr {
    pub fn from_bytes(b: &[u8; VNET_HDR_LEN]) -> Self {
        let u = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Self {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u(2),
            gso_size: u(4),
            csum_start: u(6),
            csum_offset: u(8),
            num_buffers: u(10),
        }
    }

    pub fn to_bytes(&self) -> [u8; VNET_HDR_LEN] {
        let mut b = [0u8; VNET_HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        b[10..12].copy_from_slice(&self.num_buffers.to_le_bytes());
        b
    }

    /// Checks a header the guest sent against the features it acked, for a frame of
    /// `len` bytes; what is only meaningful toward the guest is cleared.
    pub fn check_tx(mut self, acked: u64, len: usize) -> Result<VnetHdr, HdrError> {
        self.num_buffers = 0;
        self.flags &= !VIRTIO_NET_HDR_F_DATA_VALID;
        let needed = match self.gso_type {
            VIRTIO_NET_HDR_GSO_NONE => 0,
            VIRTIO_NET_HDR_GSO_TCPV4 => VIRTIO_NET_F_HOST_TSO4,
            VIRTIO_NET_HDR_GSO_TCPV6 => VIRTIO_NET_F_HOST_TSO6,
            // UDP fragmentation offload and ECN are not offered.
            gso_type => return Err(HdrError::Gso { gso_type }),
        };
        if acked & needed != needed {
            return Err(HdrError::Gso {
                gso_type: self.gso_type,
            });
        }
        let csum = self.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0;
        if self.gso_type != VIRTIO_NET_HDR_GSO_NONE && !csum {
            return Err(HdrError::GsoWithoutCsum);
        }
        if csum {
            if acked & VIRTIO_NET_F_CSUM == 0 {
                return Err(HdrError::Csum);
            }
            let end = usize::from(self.csum_start) + usize::from(self.csum_offset) + 2;
            // A checksum written into the Ethernet header would rewrite the source MAC
            // after it was checked.
            if end > len || usize::from(self.csum_start) < ETH_HLEN {
                return Err(HdrError::CsumRange {
                    start: self.csum_start,
                    offset: self.csum_offset,
                    len,
                });
            }
        }
        Ok(self)
    }

    /// The same header for the frame with `delta` bytes inserted (+) or removed (-)
    /// before its network header.
    fn shifted(mut self, delta: i32) -> Self {
        let shift = |v: u16| (i32::from(v) + delta).clamp(0, i32::from(u16::MAX)) as u16;
        if self.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 {
            self.csum_start = shift(self.csum_start);
        }
        if self.hdr_len != 0 {
            self.hdr_len = shift(self.hdr_len);
        }
        self
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChainError {
    #[error("descriptor chain is empty")]
    Empty,
    #[error("descriptor {index} points the wrong way for this queue")]
    Direction { index: usize },
    #[error("a chain of {len} bytes is shorter than {min}")]
    TooShort { len: u64, min: u64 },
    #[error("a chain of {len} bytes is longer than {max}")]
    TooLong { len: u64, max: u64 },
    #[error("guest address {addr:#x} is outside guest memory")]
    GuestMemory { addr: u64 },
    #[error("a {len}-byte frame does not fit a {room}-byte buffer")]
    NoRoom { len: usize, room: u64 },
}

/// A descriptor chain checked for its queue: the buffers, in order, and their length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    pub segs: Vec<(GuestAddress, u32)>,
    pub len: u64,
}

impl Chain {
    fn parse(descs: &[Desc], writable: bool, min: u64, max: u64) -> Result<Chain, ChainError> {
        if descs.is_empty() {
            return Err(ChainError::Empty);
        }
        if let Some(index) = descs.iter().position(|d| d.writable != writable) {
            return Err(ChainError::Direction { index });
        }
        let len: u64 = descs.iter().map(|d| u64::from(d.len)).sum();
        if len < min {
            return Err(ChainError::TooShort { len, min });
        }
        if len > max {
            return Err(ChainError::TooLong { len, max });
        }
        Ok(Chain {
            segs: descs.iter().map(|d| (d.addr, d.len)).collect(),
            len,
        })
    }

    /// A frame the guest sends: device-readable buffers holding a header and at least
    /// an Ethernet header, at most a header and [`MAX_FRAME`].
    pub fn tx(descs: &[Desc]) -> Result<Chain, ChainError> {
        let min = (VNET_HDR_LEN + ETH_HLEN) as u64;
        Self::parse(descs, false, min, (VNET_HDR_LEN + MAX_FRAME) as u64)
    }

    /// A buffer the guest posts for a frame: device-writable, room for a header and an
    /// Ethernet header at least.
    pub fn rx(descs: &[Desc]) -> Result<Chain, ChainError> {
        Self::parse(descs, true, (VNET_HDR_LEN + ETH_HLEN) as u64, u64::MAX)
    }

    /// Copies the chain's bytes into `buf`.
    pub fn gather(&self, mem: &GuestRam, buf: &mut Vec<u8>) -> Result<(), ChainError> {
        buf.resize(self.len as usize, 0);
        let mut at = 0usize;
        for &(addr, l) in &self.segs {
            let l = l as usize;
            mem.read_slice(&mut buf[at..at + l], addr)
                .map_err(|_| ChainError::GuestMemory { addr: addr.0 })?;
            at += l;
        }
        Ok(())
    }

    /// Writes `parts`, one after the other, into the chain's buffers; returns how many
    /// bytes were written.
    pub fn scatter(&self, mem: &GuestRam, parts: &[&[u8]]) -> Result<u32, ChainError> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        if len as u64 > self.len {
            return Err(ChainError::NoRoom {
                len,
                room: self.len,
            });
        }
        let mut segs = self.segs.iter().copied();
        let (mut addr, mut room) = (GuestAddress(0), 0usize);
        for part in parts {
            let mut part = *part;
            while !part.is_empty() {
                if room == 0 {
                    // The length check above leaves a buffer for every byte.
                    let Some((a, l)) = segs.next() else {
                        return Err(ChainError::NoRoom {
                            len,
                            room: self.len,
                        });
                    };
                    (addr, room) = (a, l as usize);
                    continue;
                }
                let n = room.min(part.len());
                mem.write_slice(&part[..n], addr)
                    .map_err(|_| ChainError::GuestMemory { addr: addr.0 })?;
                addr = GuestAddress(addr.0 + n as u64);
                room -= n;
                part = &part[n..];
            }
        }
        Ok(len as u32)
    }
}

/// Why a frame does not go where it was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The guest sent a frame with another source MAC.
    Spoofed { src: MacAddr },
    /// The guest sent an 802.1Q/802.1ad-tagged frame: an access port carries none.
    TaggedFromGuest,
    /// A frame from the network on another VLAN (or tagged, on a VIF without one).
    OtherVlan,
    /// An untagged frame from the network on a VIF with a VLAN.
    Untagged,
    /// Shorter than an Ethernet header (or, on a VIF locked to its addresses, than the
    /// ARP or IPv4 header it must check).
    Runt,
    /// From a VIF locked to its addresses: ARP or IPv4 from another address.
    ForeignAddress { src: Ipv4Addr },
    /// From a VIF locked to its addresses: neither ARP nor IPv4 (the lock names IPv4
    /// addresses only, so nothing else can be vouched for), or a malformed IPv4 header.
    NotIpv4 { ethertype: u16 },
    /// From a VIF locked to its addresses: an offload that would write where the lock
    /// looked (a checksum inside the IPv4 header, or any on ARP), after the check.
    OffloadIntoHeader,
}

fn ethertype(frame: &[u8]) -> u16 {
    u16::from_be_bytes([frame[12], frame[13]])
}

/// The VIF's policy on a frame the guest sends (behind `hdr`, checked by
/// [`VnetHdr::check_tx`]): its own source MAC, untagged, and, when `lock` lists the VIF's
/// IPv4 addresses, only ARP and IPv4 from one of them.
pub fn check_egress(
    frame: &[u8],
    hdr: &VnetHdr,
    mac: MacAddr,
    lock: Option<&[Ipv4Addr]>,
) -> Result<(), Refused> {
    if frame.len() < ETH_HLEN {
        return Err(Refused::Runt);
    }
    let src = MacAddr(frame[6..12].try_into().expect("six bytes"));
    if src != mac {
        return Err(Refused::Spoofed { src });
    }
    let ty = ethertype(frame);
    if matches!(ty, ETH_P_8021Q | ETH_P_8021AD) {
        return Err(Refused::TaggedFromGuest);
    }
    match lock {
        None => Ok(()),
        Some(own) => check_addresses(&frame[ETH_HLEN..], ty, hdr, mac, own),
    }
}

fn ipv4_at(b: &[u8], at: usize) -> Ipv4Addr {
    Ipv4Addr::new(b[at], b[at + 1], b[at + 2], b[at + 3])
}

/// A locked VIF's ARP and IPv4: sent from one of `own`. Also let through: an ARP probe
/// (sender 0.0.0.0, RFC 5227) and a DHCP client's request before it has an address
/// (UDP from 0.0.0.0 to port 67, unfragmented). What the kernel writes for an offload
/// (a checksum at `csum_start`) must land past the headers checked here.
fn check_addresses(
    payload: &[u8],
    ty: u16,
    hdr: &VnetHdr,
    mac: MacAddr,
    own: &[Ipv4Addr],
) -> Result<(), Refused> {
    let allowed = |a: Ipv4Addr| own.contains(&a);
    let csum = hdr.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0;
    match ty {
        ETH_P_ARP => {
            if csum || hdr.gso_type != VIRTIO_NET_HDR_GSO_NONE {
                return Err(Refused::OffloadIntoHeader);
            }
            // Ethernet/IPv4 ARP: 8 bytes of header, then sender MAC and address.
            if payload.len() < 28 {
                return Err(Refused::Runt);
            }
            if payload[..6] != [0, 1, 8, 0, 6, 4] {
                return Err(Refused::NotIpv4 { ethertype: ty });
            }
            let sha = MacAddr(payload[8..14].try_into().expect("six bytes"));
            if sha != mac {
                return Err(Refused::Spoofed { src: sha });
            }
            let spa = ipv4_at(payload, 14);
            if spa.is_unspecified() || allowed(spa) {
                Ok(())
            } else {
                Err(Refused::ForeignAddress { src: spa })
            }
        }
        ETH_P_IP => {
            if payload.len() < 20 {
                return Err(Refused::Runt);
            }
            let src = ipv4_at(payload, 12);
            let ihl = usize::from(payload[0] & 0x0f) * 4;
            if payload[0] >> 4 != 4 || ihl < 20 || payload.len() < ihl {
                return Err(Refused::NotIpv4 { ethertype: ty });
            }
            if csum && usize::from(hdr.csum_start) < ETH_HLEN + ihl {
                return Err(Refused::OffloadIntoHeader);
            }
            if allowed(src) {
                return Ok(());
            }
            let unfragmented = u16::from_be_bytes([payload[6], payload[7]]) & 0x3fff == 0;
            let dhcp = src.is_unspecified()
                && unfragmented
                && payload[9] == 17
                && payload
                    .get(ihl + 2..ihl + 4)
                    .is_some_and(|port| port == [0, 67]);
            if dhcp {
                Ok(())
            } else {
                Err(Refused::ForeignAddress { src })
            }
        }
        other => Err(Refused::NotIpv4 { ethertype: other }),
    }
}

/// A frame on its way to the network, in pieces: header, addresses, the VLAN tag (none
/// without a VLAN), the rest.
pub struct Egress<'a> {
    pub hdr: VnetHdr,
    pub head: &'a [u8],
    pub tag: [u8; VLAN_HLEN],
    pub tag_len: usize,
    pub tail: &'a [u8],
}

impl<'a> Egress<'a> {
    pub fn new(hdr: VnetHdr, frame: &'a [u8], vlan: Option<Vlan>) -> Self {
        let (head, tail) = frame.split_at(frame.len().min(12));
        match vlan {
            Some(v) => Egress {
                hdr: hdr.shifted(VLAN_HLEN as i32),
                head,
                tag: v.tag_bytes(),
                tag_len: VLAN_HLEN,
                tail,
            },
            None => Egress {
                hdr,
                head,
                tag: [0; VLAN_HLEN],
                tag_len: 0,
                tail,
            },
        }
    }
}

/// A frame from the network on its way to the guest: header, then the frame in two
/// pieces around the VLAN tag it was stripped of.
#[derive(Debug)]
pub struct Ingress<'a> {
    pub hdr: VnetHdr,
    pub head: &'a [u8],
    pub tail: &'a [u8],
}

impl Ingress<'_> {
    /// Bytes the guest's buffer takes: header and frame.
    pub fn buffer_len(&self) -> usize {
        VNET_HDR_LEN + self.head.len() + self.tail.len()
    }
}

/// The VIF's policy on a frame from the network (`frame` without its header): with a
/// VLAN, only frames tagged with it, untagged; without, only untagged frames.
pub fn ingress(hdr: VnetHdr, frame: &[u8], vlan: Option<Vlan>) -> Result<Ingress<'_>, Refused> {
    if frame.len() < ETH_HLEN {
        return Err(Refused::Runt);
    }
    // One buffer per frame: the driver reads num_buffers (always there in VERSION_1).
    let hdr = VnetHdr {
        num_buffers: 1,
        ..hdr
    };
    let tagged = matches!(ethertype(frame), ETH_P_8021Q | ETH_P_8021AD);
    match vlan {
        None if tagged => Err(Refused::OtherVlan),
        None => Ok(Ingress {
            hdr,
            head: frame,
            tail: &[],
        }),
        Some(_) if !tagged => Err(Refused::Untagged),
        Some(v) => {
            let tci = u16::from_be_bytes([frame[14], frame[15]]);
            if ethertype(frame) != ETH_P_8021Q
                || tci & 0x0fff != v.id()
                || frame.len() < ETH_HLEN + VLAN_HLEN
            {
                return Err(Refused::OtherVlan);
            }
            Ok(Ingress {
                hdr: hdr.shifted(-(VLAN_HLEN as i32)),
                head: &frame[..12],
                tail: &frame[12 + VLAN_HLEN..],
            })
        }
    }
}

/// A gratuitous RARP for `mac` (what QEMU's announce sends): a broadcast reverse
/// request whose sender and target are the VIF itself, padded to the Ethernet minimum.
pub fn rarp(mac: MacAddr) -> [u8; 60] {
    let mut f = [0u8; 60];
    f[0..6].copy_from_slice(&MacAddr::BROADCAST.0);
    f[6..12].copy_from_slice(&mac.0);
    f[12..14].copy_from_slice(&ETH_P_RARP.to_be_bytes());
    f[14..16].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
    f[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    f[18] = 6;
    f[19] = 4;
    f[20..22].copy_from_slice(&3u16.to_be_bytes()); // reverse request
    f[22..28].copy_from_slice(&mac.0);
    f[32..38].copy_from_slice(&mac.0);
    f
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::net::device::FEATURES;
    use crate::devices::virtio::net::test_utils::mem;

    const MAC: MacAddr = MacAddr([0x02, 0, 0, 0, 0, 1]);

    fn desc(addr: u64, len: u32, writable: bool) -> Desc {
        Desc {
            addr: GuestAddress(addr),
            len,
            writable,
        }
    }

    /// An Ethernet frame from `src` with ethertype `ty` and `payload` bytes of 0xab.
    fn eth(src: MacAddr, ty: u16, payload: usize) -> Vec<u8> {
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&src.0);
        f.extend_from_slice(&ty.to_be_bytes());
        f.resize(ETH_HLEN + payload, 0xab);
        f
    }

    #[test]
    fn macs_and_vlans_are_checked_when_parsed() {
        let mac: MacAddr = "02:00:5e:10:ff:0a".parse().unwrap();
        assert_eq!(mac.0, [2, 0, 0x5e, 0x10, 0xff, 0x0a]);
        assert_eq!(mac.to_string(), "02:00:5e:10:ff:0a");
        for bad in [
            "",
            "02:00:5e:10:ff",
            "02:00:5e:10:ff:0a:01",
            "2:00:5e:10:ff:0a",
            "02:00:5e:10:ff:zz",
            "01:00:5e:00:00:01",
            "00:00:00:00:00:00",
            "ff:ff:ff:ff:ff:ff",
        ] {
            assert_eq!(
                bad.parse::<MacAddr>(),
                Err(NicError::BadMac { mac: bad.into() })
            );
        }
        assert_eq!(Vlan::new(1).unwrap().id(), 1);
        assert_eq!(Vlan::new(4094).unwrap().tag_bytes(), [0x81, 0, 0x0f, 0xfe]);
        for bad in [0, 4095, 65536 + 5] {
            assert_eq!(Vlan::new(bad), Err(NicError::BadVlan { tag: bad }));
        }
    }

    #[test]
    fn malformed_tx_and_rx_chains_are_refused() {
        assert_eq!(Chain::tx(&[]), Err(ChainError::Empty));
        assert_eq!(
            Chain::tx(&[desc(0x1000, 12, false), desc(0x2000, 60, true)]),
            Err(ChainError::Direction { index: 1 })
        );
        // A header and a half Ethernet header.
        assert_eq!(
            Chain::tx(&[desc(0x1000, 12, false), desc(0x2000, 7, false)]),
            Err(ChainError::TooShort { len: 19, min: 26 })
        );
        let huge = Chain::tx(&[
            desc(0x1000, 0x8000_0000, false),
            desc(0, 0x8000_0000, false),
        ]);
        assert!(matches!(huge, Err(ChainError::TooLong { .. })), "{huge:?}");
        let c = Chain::tx(&[desc(0x1000, 12, false), desc(0x2000, 60, false)]).unwrap();
        assert_eq!(c.len, 72);
        assert_eq!(
            Chain::rx(&[desc(0x1000, 1526, false)]),
            Err(ChainError::Direction { index: 0 })
        );
        assert_eq!(
            Chain::rx(&[desc(0x1000, 12, true)]),
            Err(ChainError::TooShort { len: 12, min: 26 })
        );
        // Buffers outside guest memory are found when copied.
        let m = mem();
        let out = Chain::tx(&[desc(0x1000, 12, false), desc(0x1000_0000, 60, false)]).unwrap();
        assert_eq!(
            out.gather(&m, &mut Vec::new()),
            Err(ChainError::GuestMemory { addr: 0x1000_0000 })
        );
    }

    #[test]
    fn scatter_fills_buffers_in_order_and_refuses_what_does_not_fit() {
        let m = mem();
        let c = Chain::rx(&[desc(0x1000, 20, true), desc(0x3000, 100, true)]).unwrap();
        let a = [1u8; 12];
        let b: Vec<u8> = (0..30).collect();
        assert_eq!(c.scatter(&m, &[&a, &b]), Ok(42));
        let mut first = [0u8; 20];
        m.read_slice(&mut first, GuestAddress(0x1000)).unwrap();
        assert_eq!(&first[..12], &a);
        assert_eq!(&first[12..], &b[..8]);
        let mut second = [0u8; 22];
        m.read_slice(&mut second, GuestAddress(0x3000)).unwrap();
        assert_eq!(&second[..], &b[8..]);
        let big = vec![0u8; 121];
        assert_eq!(
            c.scatter(&m, &[&big]),
            Err(ChainError::NoRoom {
                len: 121,
                room: 120
            })
        );
        let mut back = Vec::new();
        c.gather(&m, &mut back).unwrap();
        assert_eq!(back.len(), 120);
        assert_eq!(&back[..12], &a);
    }

    #[test]
    fn headers_round_trip_and_offloads_must_have_been_negotiated() {
        let h = VnetHdr {
            flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
            gso_type: VIRTIO_NET_HDR_GSO_TCPV4,
            hdr_len: 54,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
            num_buffers: 1,
        };
        assert_eq!(VnetHdr::from_bytes(&h.to_bytes()), h);
        let ok = h.check_tx(FEATURES, 9000).unwrap();
        assert_eq!(ok.num_buffers, 0);
        let no_tso = FEATURES & !VIRTIO_NET_F_HOST_TSO4;
        assert_eq!(h.check_tx(no_tso, 9000), Err(HdrError::Gso { gso_type: 1 }));
        for gso_type in [
            VIRTIO_NET_HDR_GSO_UDP,
            VIRTIO_NET_HDR_GSO_TCPV4 | VIRTIO_NET_HDR_GSO_ECN,
            9,
        ] {
            let bad = VnetHdr { gso_type, ..h };
            assert_eq!(
                bad.check_tx(FEATURES, 9000),
                Err(HdrError::Gso { gso_type })
            );
        }
        let no_csum = VnetHdr { flags: 0, ..h };
        assert_eq!(
            no_csum.check_tx(FEATURES, 9000),
            Err(HdrError::GsoWithoutCsum)
        );
        let plain = VnetHdr {
            gso_type: 0,
            gso_size: 0,
            hdr_len: 0,
            ..h
        };
        assert_eq!(
            plain.check_tx(FEATURES & !VIRTIO_NET_F_CSUM, 9000),
            Err(HdrError::Csum)
        );
        // The checksum field must lie inside the frame.
        assert!(plain.check_tx(FEATURES, 52).is_ok());
        assert_eq!(
            plain.check_tx(FEATURES, 51),
            Err(HdrError::CsumRange {
                start: 34,
                offset: 16,
                len: 51
            })
        );
        // DATA_VALID means nothing from the guest: cleared, not refused.
        let dv = VnetHdr {
            flags: VIRTIO_NET_HDR_F_DATA_VALID,
            ..VnetHdr::default()
        };
        assert_eq!(dv.check_tx(0, 60).unwrap().flags, 0);
    }

    #[test]
    fn only_the_vifs_own_untagged_frames_leave_it() {
        assert_eq!(
            check_egress(&eth(MAC, 0x0800, 46), &NO_OFFLOAD, MAC, None),
            Ok(())
        );
        let other = MacAddr([0x02, 0, 0, 0, 0, 2]);
        assert_eq!(
            check_egress(&eth(other, 0x0800, 46), &NO_OFFLOAD, MAC, None),
            Err(Refused::Spoofed { src: other })
        );
        assert_eq!(
            check_egress(&eth(MAC, ETH_P_8021Q, 46), &NO_OFFLOAD, MAC, None),
            Err(Refused::TaggedFromGuest)
        );
        assert_eq!(
            check_egress(&eth(MAC, ETH_P_8021AD, 46), &NO_OFFLOAD, MAC, None),
            Err(Refused::TaggedFromGuest)
        );
        assert_eq!(
            check_egress(&[0; 13], &NO_OFFLOAD, MAC, None),
            Err(Refused::Runt)
        );
    }

    const NO_OFFLOAD: VnetHdr = VnetHdr {
        flags: 0,
        gso_type: VIRTIO_NET_HDR_GSO_NONE,
        hdr_len: 0,
        gso_size: 0,
        csum_start: 0,
        csum_offset: 0,
        num_buffers: 0,
    };

    /// An Ethernet/IPv4 ARP frame from the VIF, its sender `sha` and `spa`.
    fn arp(sha: MacAddr, spa: [u8; 4]) -> Vec<u8> {
        let mut f = eth(MAC, ETH_P_ARP, 0);
        f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
        f.extend_from_slice(&sha.0);
        f.extend_from_slice(&spa);
        f.extend_from_slice(&[0; 6]);
        f.extend_from_slice(&[10, 0, 0, 9]);
        f
    }

    /// An IPv4/UDP frame from the VIF, from `src` to UDP port `dport`.
    fn ipv4(src: [u8; 4], dport: u16) -> Vec<u8> {
        let mut f = eth(MAC, ETH_P_IP, 0);
        f.extend_from_slice(&[0x45, 0, 0, 28, 0, 0, 0x40, 0, 64, 17, 0, 0]);
        f.extend_from_slice(&src);
        f.extend_from_slice(&[10, 0, 0, 9]);
        f.extend_from_slice(&[0x30, 0x39]);
        f.extend_from_slice(&dport.to_be_bytes());
        f.extend_from_slice(&[0, 8, 0, 0]);
        f
    }

    #[test]
    fn a_locked_vif_sends_arp_and_ipv4_only_from_its_own_addresses() {
        let own = [Ipv4Addr::new(10, 0, 0, 2), Ipv4Addr::new(10, 0, 0, 3)];
        let lock = Some(&own[..]);
        let other = MacAddr([0x02, 0, 0, 0, 0, 2]);
        for spa in [[10, 0, 0, 2], [10, 0, 0, 3], [0, 0, 0, 0]] {
            assert_eq!(
                check_egress(&arp(MAC, spa), &NO_OFFLOAD, MAC, lock),
                Ok(()),
                "{spa:?}"
            );
        }
        assert_eq!(
            check_egress(&arp(MAC, [10, 0, 0, 4]), &NO_OFFLOAD, MAC, lock),
            Err(Refused::ForeignAddress {
                src: Ipv4Addr::new(10, 0, 0, 4)
            })
        );
        assert_eq!(
            check_egress(&arp(other, [10, 0, 0, 2]), &NO_OFFLOAD, MAC, lock),
            Err(Refused::Spoofed { src: other }),
            "the ARP sender's MAC is the VIF's too"
        );
        assert_eq!(
            check_egress(&ipv4([10, 0, 0, 3], 7), &NO_OFFLOAD, MAC, lock),
            Ok(())
        );
        assert_eq!(
            check_egress(&ipv4([10, 0, 0, 5], 7), &NO_OFFLOAD, MAC, lock),
            Err(Refused::ForeignAddress {
                src: Ipv4Addr::new(10, 0, 0, 5)
            })
        );
        // A DHCP client before it has an address; nothing else from 0.0.0.0.
        assert_eq!(
            check_egress(&ipv4([0; 4], 67), &NO_OFFLOAD, MAC, lock),
            Ok(())
        );
        assert_eq!(
            check_egress(&ipv4([0; 4], 68), &NO_OFFLOAD, MAC, lock),
            Err(Refused::ForeignAddress {
                src: Ipv4Addr::UNSPECIFIED
            })
        );
        // Nothing the lock cannot vouch for: IPv6, other protocols, cut-short headers.
        assert_eq!(
            check_egress(&eth(MAC, 0x86dd, 60), &NO_OFFLOAD, MAC, lock),
            Err(Refused::NotIpv4 { ethertype: 0x86dd })
        );
        assert_eq!(
            check_egress(
                &ipv4([10, 0, 0, 2], 7)[..ETH_HLEN + 19],
                &NO_OFFLOAD,
                MAC,
                lock
            ),
            Err(Refused::Runt)
        );
        assert_eq!(
            check_egress(
                &arp(MAC, [10, 0, 0, 2])[..ETH_HLEN + 27],
                &NO_OFFLOAD,
                MAC,
                lock
            ),
            Err(Refused::Runt)
        );
        // Locked to nothing: only probes and DHCP; unlocked: anything from its MAC.
        assert_eq!(
            check_egress(&ipv4([10, 0, 0, 2], 7), &NO_OFFLOAD, MAC, Some(&[])),
            Err(Refused::ForeignAddress {
                src: Ipv4Addr::new(10, 0, 0, 2)
            })
        );
        assert_eq!(
            check_egress(&arp(MAC, [0; 4]), &NO_OFFLOAD, MAC, Some(&[])),
            Ok(())
        );
        assert_eq!(
            check_egress(&ipv4([10, 9, 9, 9], 7), &NO_OFFLOAD, MAC, None),
            Ok(())
        );
        assert_eq!(
            check_egress(&eth(MAC, 0x86dd, 60), &NO_OFFLOAD, MAC, None),
            Ok(())
        );
    }

    #[test]
    fn a_locked_vif_refuses_offloads_that_would_write_where_it_looked() {
        let own = [Ipv4Addr::new(10, 0, 0, 2)];
        let lock = Some(&own[..]);
        let csum_at = |start: u16, offset: u16| VnetHdr {
            flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
            csum_start: start,
            csum_offset: offset,
            ..NO_OFFLOAD
        };
        let udp = ipv4([10, 0, 0, 2], 7);
        // The UDP checksum (past the 20-byte IPv4 header) is fine; one whose start lies
        // in the IPv4 header could overwrite the source address the lock checked.
        assert_eq!(check_egress(&udp, &csum_at(34, 6), MAC, lock), Ok(()));
        assert_eq!(
            check_egress(&udp, &csum_at(26, 0), MAC, lock),
            Err(Refused::OffloadIntoHeader)
        );
        assert_eq!(
            check_egress(&arp(MAC, [10, 0, 0, 2]), &csum_at(34, 0), MAC, lock),
            Err(Refused::OffloadIntoHeader)
        );
        // An IHL below 5 is no IPv4 header, and a DHCP request comes in one piece.
        let mut short_ihl = udp.clone();
        short_ihl[ETH_HLEN] = 0x44;
        assert_eq!(
            check_egress(&short_ihl, &NO_OFFLOAD, MAC, lock),
            Err(Refused::NotIpv4 {
                ethertype: ETH_P_IP
            })
        );
        let mut fragment = ipv4([0; 4], 67);
        fragment[ETH_HLEN + 7] = 1;
        assert_eq!(
            check_egress(&fragment, &NO_OFFLOAD, MAC, lock),
            Err(Refused::ForeignAddress {
                src: Ipv4Addr::UNSPECIFIED
            })
        );
        // No VIF takes a checksum into its Ethernet header (where its MAC was checked).
        assert_eq!(
            csum_at(6, 0).check_tx(FEATURES, 60),
            Err(HdrError::CsumRange {
                start: 6,
                offset: 0,
                len: 60
            })
        );
    }

    fn joined(e: &Egress) -> Vec<u8> {
        [e.head, &e.tag[..e.tag_len], e.tail].concat()
    }

    #[test]
    fn a_vlan_tag_is_added_toward_the_network_and_the_checksum_offset_follows() {
        let f = eth(MAC, 0x0800, 46);
        let h = VnetHdr {
            flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
            csum_start: 34,
            csum_offset: 6,
            ..VnetHdr::default()
        };
        let plain = Egress::new(h, &f, None);
        assert_eq!(joined(&plain), f);
        assert_eq!(plain.hdr, h);
        let tagged = Egress::new(h, &f, Some(Vlan::new(100).unwrap()));
        let out = joined(&tagged);
        assert_eq!(out.len(), f.len() + 4);
        assert_eq!(&out[..12], &f[..12]);
        assert_eq!(&out[12..16], &[0x81, 0x00, 0x00, 100]);
        assert_eq!(&out[16..], &f[12..]);
        assert_eq!(tagged.hdr.csum_start, 38);
        // Without a partial checksum there is no offset to move.
        let none = Egress::new(VnetHdr::default(), &f, Some(Vlan::new(100).unwrap()));
        assert_eq!(none.hdr, VnetHdr::default());
    }

    #[test]
    fn toward_the_guest_only_its_vlan_passes_and_loses_its_tag() {
        let v = Vlan::new(100).unwrap();
        let plain = eth(MAC, 0x0800, 46);
        let mut tagged = plain[..12].to_vec();
        tagged.extend_from_slice(&v.tag_bytes());
        tagged.extend_from_slice(&plain[12..]);
        let h = VnetHdr {
            flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
            csum_start: 38,
            csum_offset: 6,
            ..VnetHdr::default()
        };
        let i = ingress(h, &tagged, Some(v)).unwrap();
        assert_eq!([i.head, i.tail].concat(), plain);
        assert_eq!(i.hdr.csum_start, 34);
        assert_eq!(i.hdr.num_buffers, 1);
        assert_eq!(i.buffer_len(), 12 + plain.len());
        // Priority bits do not matter; another id, an untagged frame or a runt does.
        tagged[14] |= 0xe0;
        assert!(ingress(h, &tagged, Some(v)).is_ok());
        assert_eq!(
            ingress(h, &tagged, Some(Vlan::new(101).unwrap())).unwrap_err(),
            Refused::OtherVlan
        );
        assert_eq!(ingress(h, &plain, Some(v)).unwrap_err(), Refused::Untagged);
        assert_eq!(
            ingress(h, &tagged[..16], Some(v)).unwrap_err(),
            Refused::OtherVlan
        );
        assert_eq!(ingress(h, &plain[..13], None).unwrap_err(), Refused::Runt);
        // A VIF without a VLAN takes untagged frames only.
        assert_eq!(ingress(h, &tagged, None).unwrap_err(), Refused::OtherVlan);
        let i = ingress(h, &plain, None).unwrap();
        assert_eq!(i.head, &plain[..]);
        assert_eq!(i.hdr.csum_start, 38);
    }

    #[test]
    fn the_announcement_is_a_broadcast_rarp_for_the_mac() {
        let f = rarp(MAC);
        assert_eq!(&f[0..6], &[0xff; 6]);
        assert_eq!(&f[6..12], &MAC.0);
        assert_eq!(&f[12..14], &[0x80, 0x35]);
        assert_eq!(&f[20..22], &[0, 3]);
        assert_eq!(&f[22..28], &MAC.0);
        assert_eq!(&f[28..32], &[0; 4]);
        assert_eq!(&f[32..38], &MAC.0);
        assert_eq!(check_egress(&f, &NO_OFFLOAD, MAC, None), Ok(()));
    }
}
