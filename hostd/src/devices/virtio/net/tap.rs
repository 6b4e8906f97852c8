//! The tap backend: a tap interface opened by name through `/dev/net/tun`, each read or
//! write one frame behind a [`VNET_HDR_LEN`]-byte offload header.

use std::fs::File;
use std::io;
use std::os::unix::io::{AsRawFd, FromRawFd, RawFd};

use super::frame::VNET_HDR_LEN;

const TUN_PATH: &[u8] = b"/dev/net/tun\0";

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("tap name {name:?} must be 1 to 15 characters, none of them '/', ':' or blank")]
    BadName { name: String },
    #[error("cannot open /dev/net/tun")]
    Open(#[source] io::Error),
    #[error("cannot attach to tap {name:?} (is it a tap, and not in use?)")]
    Attach {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("tap {name:?}: {op} failed")]
    Ioctl {
        name: String,
        op: &'static str,
        #[source]
        source: io::Error,
    },
}

/// An open tap, non-blocking. Frames may be written from any thread (a write is one
/// frame), and are read by the VIF's worker only.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

/// Whether `name` can be an interface name (IFNAMSIZ, and what the kernel refuses).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':')
}

fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain data (a name and a union of integers and addresses); all
    // zeroes is a valid value of it.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    req
}

impl Tap {
    /// Attaches to the tap `name` (created by the host's network plumbing; a name that
    /// does not exist makes a tap that lives as long as this one) with an offload
    /// header on every frame and no offloads toward us until [`Tap::set_offload`].
    pub fn open(name: &str) -> Result<Tap, TapError> {
        if !valid_name(name) {
            return Err(TapError::BadName { name: name.into() });
        }
        // SAFETY: TUN_PATH is NUL-terminated; the result is checked.
        let fd = unsafe {
            libc::open(
                TUN_PATH.as_ptr().cast(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(TapError::Open(io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just opened and is owned by nothing else.
        let file = unsafe { File::from_raw_fd(fd) };
        let mut req = ifreq(name);
        req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16;
        // SAFETY: TUNSETIFF reads and writes an ifreq; `req` outlives the call.
        if unsafe { libc::ioctl(fd, libc::TUNSETIFF, &mut req) } < 0 {
            return Err(TapError::Attach {
                name: name.into(),
                source: io::Error::last_os_error(),
            });
        }
        let tap = Tap {
            file,
            name: name.into(),
        };
        let size = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int; `size` outlives the call.
        let r = unsafe { libc::ioctl(fd, libc::TUNSETVNETHDRSZ, &size) };
        tap.check(r, "TUNSETVNETHDRSZ")?;
        tap.set_offload(0)?;
        Ok(tap)
    }

    fn check(&self, r: libc::c_int, op: &'static str) -> Result<(), TapError> {
        if r < 0 {
            return Err(TapError::Ioctl {
                name: self.name.clone(),
                op,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Which offloads (`TUN_F_*`) frames toward the guest may keep: what it acked.
    pub fn set_offload(&self, flags: u32) -> Result<(), TapError> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        let r = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                flags as libc::c_ulong,
            )
        };
        self.check(r, "TUNSETOFFLOAD")
    }

    /// Reads one frame (header first); `WouldBlock` when there is none.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: `buf` is valid for writes of its length for the whole call.
        let n = unsafe { libc::read(self.file.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Writes one frame given in pieces (header first).
    pub fn write_parts(&self, parts: &[&[u8]]) -> io::Result<usize> {
        let iov: Vec<libc::iovec> = parts
            .iter()
            .filter(|p| !p.is_empty())
            .map(|p| libc::iovec {
                iov_base: p.as_ptr() as *mut libc::c_void,
                iov_len: p.len(),
            })
            .collect();
        // SAFETY: every iovec points into a slice borrowed for the whole call; the
        // kernel only reads them.
        let n = unsafe {
            libc::writev(
                self.file.as_raw_fd(),
                iov.as_ptr(),
                iov.len() as libc::c_int,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_kernel_would_refuse_are_refused_before_opening() {
        for bad in ["", ".", "..", "a/b", "a:b", "has space", "sixteen-chars-xx"] {
            assert!(
                matches!(Tap::open(bad), Err(TapError::BadName { .. })),
                "{bad:?}"
            );
        }
        assert!(valid_name("vif-3f2a.0"));
        assert!(valid_name("fifteen-chars-x"));
    }
}
