//! Creating a persistent tap through `/dev/net/tun`: the kernel's tun driver refuses to
//! create taps over rtnetlink ("tun/tap creation via rtnetlink is not supported"), so this
//! one step is two ioctls; everything else about the tap (MTU, bridge, up, removal) is
//! netlink.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

/// The flags a tap is created with, and the ones its VIF backend must open it with:
/// a tap (Ethernet frames), no packet-information prefix, a virtio-net header on every
/// frame (for checksum and segmentation offloads). Single queue: a backend that opens it
/// with `IFF_MULTI_QUEUE` is refused by the kernel.
pub const TAP_FLAGS: libc::c_int = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;

/// Creates the persistent tap `name` in the network namespace of the calling thread and
/// leaves it down and unattached: it outlives this call and the process, until deleted.
pub fn create_persistent(name: &str) -> io::Result<()> {
    let mut request = ifreq(name)?;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/net/tun")?;
    // Fits: the three flags are in the low 16 bits.
    request.ifr_ifru.ifru_flags = TAP_FLAGS as libc::c_short;
    // SAFETY: the descriptor is an open /dev/net/tun; TUNSETIFF reads and writes one
    // `struct ifreq`, and `request` is a whole, initialised one that lives across the call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut request) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: TUNSETPERSIST takes its argument by value (an integer, 1 = persist) and
    // touches no memory of ours; the descriptor is attached to the tap just made.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETPERSIST, 1 as libc::c_ulong) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn ifreq(name: &str) -> io::Result<libc::ifreq> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('\0') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "bad interface name",
        ));
    }
    // SAFETY: `ifreq` is plain data (a byte array and a union of integers, arrays and
    // pointers), for which all zero bytes are a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, byte) in request.ifr_name.iter_mut().zip(name.bytes()) {
        *slot = byte as libc::c_char;
    }
    Ok(request)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ifreq_refuses_names_the_kernel_would_truncate() {
        assert!(ifreq("").is_err());
        assert!(ifreq("sixteen-chars-xx").is_err());
        assert!(ifreq("a\0b").is_err());
        let request = ifreq("pnt0123456789ab").unwrap();
        assert_eq!(request.ifr_name[14], b'b' as libc::c_char);
        assert_eq!(request.ifr_name[15], 0);
    }
}
