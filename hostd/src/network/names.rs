//! The names this module gives host devices, the VXLAN VNI of a network, and the checks
//! on names that come from outside (network names, NIC names, VM ids).
//!
//! Every device name is a fixed 15 characters (the kernel's `IFNAMSIZ` less its NUL): a
//! three-letter prefix and lowercase hex. A name is derived from the network name or the
//! VM id alone, so every host and every restart of `hostd` computes the same one, and
//! `parse` recognises this module's devices among all of a host's without any state.

use super::NetworkError;

/// A bridge: `pnb` + 12 hex digits of the hash of the network name (private and internal
/// networks) or of the host NIC (external networks, which share their NIC's bridge).
pub const BRIDGE_PREFIX: &str = "pnb";
/// The VXLAN device of a private network: `pnx` + the same 12 hex digits as its bridge.
pub const VXLAN_PREFIX: &str = "pnx";
/// A VIF's tap: `pnt` + 10 hex digits of the VM id's hash + 2 hex digits of the VIF index.
pub const TAP_PREFIX: &str = "pnt";
/// The longest interface name the kernel takes (`IFNAMSIZ` is 16 with the NUL).
pub const MAX_IFNAME: usize = 15;
/// The highest VIF index a tap name has room for.
pub const MAX_VIF_INDEX: u16 = 0xff;
/// The longest network name, in bytes.
pub const MAX_NETWORK_NAME: usize = 64;
/// The longest VM id, in bytes.
pub const MAX_VM_ID: usize = 128;

const NETWORK_HASH_BITS: u32 = 48;
const VM_HASH_BITS: u32 = 40;

/// FNV-1a, 64 bits: stable across Rust releases and hosts, unlike `DefaultHasher`. The tag
/// keeps the hashes used for different purposes independent.
fn fnv1a(tag: &[u8], data: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in tag.iter().chain([0u8].iter()).chain(data) {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

fn low_bits(value: u64, bits: u32) -> u64 {
    value & ((1u64 << bits) - 1)
}

/// The 48-bit hash that names a network's devices.
pub fn network_hash(network: &str) -> u64 {
    low_bits(fnv1a(b"network", network.as_bytes()), NETWORK_HASH_BITS)
}

/// The 48-bit hash that names a host NIC's bridge.
pub fn nic_hash(nic: &str) -> u64 {
    low_bits(fnv1a(b"nic", nic.as_bytes()), NETWORK_HASH_BITS)
}

/// The 40-bit hash that names a VM's taps.
pub fn vm_hash(vm_id: &str) -> u64 {
    low_bits(fnv1a(b"vm", vm_id.as_bytes()), VM_HASH_BITS)
}

/// The bridge that carries the private or internal network `network` on every host.
pub fn bridge_name(network: &str) -> String {
    format!("{BRIDGE_PREFIX}{:012x}", network_hash(network))
}

/// The bridge that every external network over the host NIC `nic` shares: a NIC can be
/// the port of one bridge only, and networks that differ by VLAN tag share their NIC (the
/// VIF backends tag and filter).
pub fn nic_bridge_name(nic: &str) -> String {
    format!("{BRIDGE_PREFIX}{:012x}", nic_hash(nic))
}

/// The VXLAN device of the private network `network`.
pub fn vxlan_name(network: &str) -> String {
    format!("{VXLAN_PREFIX}{:012x}", network_hash(network))
}

/// The tap of a VM's VIF number `vif_index` (checked by the caller against
/// [`MAX_VIF_INDEX`]).
pub fn tap_name(vm_id: &str, vif_index: u8) -> String {
    format!("{TAP_PREFIX}{:010x}{vif_index:02x}", vm_hash(vm_id))
}

/// The VXLAN network identifier of a private network: 1 to 2^24 - 1, the same on every
/// host. Two networks whose names hash to the same VNI cannot both exist on a host; the
/// kernel refuses the second VXLAN device and `ensure_network` reports it.
pub fn vni(network: &str) -> u32 {
    const VNI_COUNT: u64 = (1 << 24) - 1;
    // Fits: the remainder is below 2^24.
    (fnv1a(b"vni", network.as_bytes()) % VNI_COUNT) as u32 + 1
}

/// A device this module created, recognised by its name alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owned {
    /// A network's bridge, with the network's hash.
    Bridge(u64),
    /// A private network's VXLAN device, with the network's hash.
    Vxlan(u64),
    /// A VIF's tap, with the VM's hash and the VIF index.
    Tap { vm: u64, vif: u8 },
}

/// Which of this module's devices `name` is, or `None` for any other device. Strict: the
/// whole name must be one this module would generate.
pub fn parse(name: &str) -> Option<Owned> {
    if name.len() != MAX_IFNAME {
        return None;
    }
    let (prefix, digits) = name.split_at(3);
    if !digits
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    let hex = |s: &str| u64::from_str_radix(s, 16).ok();
    match prefix {
        BRIDGE_PREFIX => hex(digits).map(Owned::Bridge),
        VXLAN_PREFIX => hex(digits).map(Owned::Vxlan),
        TAP_PREFIX => {
            let vm = hex(&digits[..10])?;
            let vif = u8::try_from(hex(&digits[10..])?).ok()?;
            Some(Owned::Tap { vm, vif })
        }
        _ => None,
    }
}

/// A network name: 1 to [`MAX_NETWORK_NAME`] bytes of printable characters.
pub fn check_network_name(name: &str) -> Result<(), NetworkError> {
    let reason = if name.is_empty() {
        "it is empty"
    } else if name.len() > MAX_NETWORK_NAME {
        "it is longer than 64 bytes"
    } else if name.chars().any(char::is_control) {
        "it holds a control character"
    } else {
        return Ok(());
    };
    Err(NetworkError::InvalidName {
        what: "network name",
        name: name.to_owned(),
        reason,
    })
}

/// A VM id: 1 to [`MAX_VM_ID`] bytes of printable characters.
pub fn check_vm_id(vm_id: &str) -> Result<(), NetworkError> {
    let reason = if vm_id.is_empty() {
        "it is empty"
    } else if vm_id.len() > MAX_VM_ID {
        "it is longer than 128 bytes"
    } else if vm_id.chars().any(char::is_control) {
        "it holds a control character"
    } else {
        return Ok(());
    };
    Err(NetworkError::InvalidName {
        what: "VM id",
        name: vm_id.to_owned(),
        reason,
    })
}

/// A host NIC's name: what the kernel accepts as an interface name (`dev_valid_name`),
/// and not one of this module's own devices.
pub fn check_nic_name(nic: &str) -> Result<(), NetworkError> {
    let reason = if nic.is_empty() {
        "it is empty"
    } else if nic.len() > MAX_IFNAME {
        "it is longer than the kernel's 15 bytes (IFNAMSIZ)"
    } else if nic == "." || nic == ".." {
        "it is . or .."
    } else if nic
        .chars()
        .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
    {
        "it holds '/', ':', a space or a control character"
    } else if parse(nic).is_some() {
        "it is a device of a pool network, not a host NIC"
    } else {
        return Ok(());
    };
    Err(NetworkError::InvalidName {
        what: "host NIC name",
        name: nic.to_owned(),
        reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_ifnamsiz_and_parse_back() {
        for network in ["lan", "a much longer network name with spaces", "é"] {
            let bridge = bridge_name(network);
            let vxlan = vxlan_name(network);
            assert_eq!(bridge.len(), MAX_IFNAME);
            assert_eq!(vxlan.len(), MAX_IFNAME);
            assert_eq!(parse(&bridge), Some(Owned::Bridge(network_hash(network))));
            assert_eq!(parse(&vxlan), Some(Owned::Vxlan(network_hash(network))));
        }
        let vm = "6f1c2a9e-1b7d-4c1e-9a43-0d2f3b4c5d6e";
        for vif in [0u8, 7, 255] {
            let tap = tap_name(vm, vif);
            assert_eq!(tap.len(), MAX_IFNAME);
            assert_eq!(
                parse(&tap),
                Some(Owned::Tap {
                    vm: vm_hash(vm),
                    vif
                })
            );
        }
    }

    #[test]
    fn names_are_stable_and_distinct() {
        // Pinned: every host and every release must compute the same names and VNIs.
        assert_eq!(bridge_name("lan"), bridge_name("lan"));
        assert_ne!(bridge_name("lan"), bridge_name("lan2"));
        assert_ne!(bridge_name("eth1"), nic_bridge_name("eth1"));
        assert_eq!(nic_bridge_name("eth1").len(), MAX_IFNAME);
        assert_ne!(tap_name("vm-a", 0), tap_name("vm-b", 0));
        assert_ne!(tap_name("vm-a", 0), tap_name("vm-a", 1));
        assert_eq!(fnv1a(b"", b""), 0xaf63_bd4c_8601_b7df);
        let known = bridge_name("lan");
        assert_eq!(
            known,
            format!("pnb{:012x}", low_bits(fnv1a(b"network", b"lan"), 48))
        );
    }

    #[test]
    fn vni_is_in_range() {
        for i in 0..10_000 {
            let v = vni(&format!("net{i}"));
            assert!((1..1 << 24).contains(&v), "{v}");
        }
        assert_ne!(vni("red"), vni("blue"));
    }

    #[test]
    fn parse_refuses_foreign_names() {
        for name in [
            "eth0",
            "pnb",
            "pnb00000000000",   // 14 characters
            "pnb0000000000000", // 16 characters
            "pnb00000000000G",  // not hex
            "pnbABCDEF000000",  // uppercase
            "pnq000000000000",  // unknown prefix
            "xnb000000000000",
        ] {
            assert_eq!(parse(name), None, "{name}");
        }
        assert_eq!(parse("pnb0000000000ff"), Some(Owned::Bridge(0xff)));
    }

    #[test]
    fn name_checks() {
        assert!(check_network_name("lan").is_ok());
        assert!(check_network_name("").is_err());
        assert!(check_network_name(&"x".repeat(65)).is_err());
        assert!(check_network_name("a\nb").is_err());
        assert!(check_nic_name("eth0").is_ok());
        assert!(check_nic_name("enp0s31f6.100").is_ok());
        for bad in [
            "",
            "a-name-too-long0",
            ".",
            "..",
            "a/b",
            "a:b",
            "a b",
            "pnb0000000000ff",
        ] {
            assert!(check_nic_name(bad).is_err(), "{bad:?}");
        }
        assert!(check_vm_id("vm").is_ok());
        assert!(check_vm_id("").is_err());
        assert!(check_vm_id(&"v".repeat(129)).is_err());
    }
}
