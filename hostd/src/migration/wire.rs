//! The migration stream's wire format: a pure codec, no I/O.
//!
//! Every frame is an 8-byte header — kind (u8), three reserved zero bytes, payload
//! length (u32, little-endian) — then the payload. [`decode`] takes what has arrived so
//! far and answers `Ok(None)` ("not yet") for an incomplete frame. Integers are
//! little-endian; strings are a u16 length then UTF-8 bytes.
//!
//! The conversation (source → destination unless marked ←):
//!
//! ```text
//! Hello(version, token, vm, memory, vCPUs, guest CPUID)
//!                         ← Accept | Refuse(reason)      (token and CPU checked here)
//! Pages / Zero ...          full pass, then dirty rounds, each pass followed by
//! Sync                      (version 2) catch up
//!                         ← Synced                       (everything before Sync is in)
//! Pages / Zero ...          the last delta (the VM is paused now)
//! State(saved vCPU, irqchip, clock and device state)
//!                         ← Restored | Refuse(reason)    (the VM is built, not running)
//! Go                        the source's point of no return
//!                         ← Resumed
//! ```
//!
//! Kind 0 is never a valid frame, so a stream of zeros is refused at once.

use crate::vmm::CpuidRegs;

/// "HMIG", first bytes of a Hello.
pub const MAGIC: [u8; 4] = *b"HMIG";
/// The version this build speaks.
pub const VERSION: u16 = 2;
/// The oldest version this build accepts (version 1 streams only lack Sync).
pub const MIN_VERSION: u16 = 1;
pub const HEADER_LEN: usize = 8;
/// A frame's payload is at most this long (a run of pages is 1 MiB; the saved state of
/// the largest VM is well under this).
pub const MAX_PAYLOAD: usize = 16 << 20;
/// A Hello's payload is at most this long: two strings of at most 64 KiB and 4096 CPUID
/// entries come to 224 KiB. It arrives before the peer is authenticated, so a connection
/// announcing more is dropped as soon as its header is in.
pub const MAX_HELLO: usize = 256 << 10;
pub const PAGE: usize = 4096;

const KIND_HELLO: u8 = 1;
const KIND_ACCEPT: u8 = 2;
const KIND_REFUSE: u8 = 3;
const KIND_PAGES: u8 = 4;
const KIND_ZERO: u8 = 5;
const KIND_STATE: u8 = 6;
const KIND_RESTORED: u8 = 7;
const KIND_GO: u8 = 8;
const KIND_RESUMED: u8 = 9;
const KIND_SYNC: u8 = 10;
const KIND_SYNCED: u8 = 11;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub version: u16,
    pub token: String,
    pub vm_id: String,
    pub memory_bytes: u64,
    pub vcpus: u32,
    /// The CPUID table the guest sees on the source (vCPU 0).
    pub cpuid: Vec<CpuidRegs>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Hello(Hello),
    Accept,
    Refuse {
        reason: String,
    },
    /// Whole pages starting at guest-physical `gpa`.
    Pages {
        gpa: u64,
        data: Vec<u8>,
    },
    /// `pages` pages of zeros starting at `gpa`.
    Zero {
        gpa: u64,
        pages: u32,
    },
    /// The saved state (see [`super::state`]).
    State(Vec<u8>),
    Restored,
    Go,
    Resumed,
    /// Answer Synced once everything before this frame is in guest memory.
    Sync,
    Synced,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("frame header has non-zero reserved bytes")]
    Reserved,
    #[error("frame of {len} bytes is over the {max}-byte limit")]
    TooLarge { len: usize, max: usize },
    #[error("{kind} frame is malformed: {what}")]
    Malformed { kind: &'static str, what: String },
    #[error("not a migration stream (bad magic)")]
    BadMagic,
    #[error("the first frame must be a Hello, not kind {kind}")]
    NotHello { kind: u8 },
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    let b = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
    out.extend_from_slice(&(b.len() as u16).to_le_bytes());
    out.extend_from_slice(b);
}

/// The header of a frame of `kind` with `len` payload bytes.
pub fn header(kind: u8, len: usize) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0] = kind;
    h[4..].copy_from_slice(&(len as u32).to_le_bytes());
    h
}

/// The header of a Pages frame carrying `data_len` bytes of pages (the connection
/// writes the pages straight after it, without copying them into a frame).
pub fn pages_header(gpa: u64, data_len: usize) -> [u8; HEADER_LEN + 8] {
    let mut h = [0u8; HEADER_LEN + 8];
    h[..HEADER_LEN].copy_from_slice(&header(KIND_PAGES, 8 + data_len));
    h[HEADER_LEN..].copy_from_slice(&gpa.to_le_bytes());
    h
}

pub fn encode(frame: &Frame, out: &mut Vec<u8>) {
    let mut p = Vec::new();
    let kind = match frame {
        Frame::Hello(h) => {
            p.extend_from_slice(&MAGIC);
            p.extend_from_slice(&h.version.to_le_bytes());
            put_str(&mut p, &h.token);
            put_str(&mut p, &h.vm_id);
            p.extend_from_slice(&h.memory_bytes.to_le_bytes());
            p.extend_from_slice(&h.vcpus.to_le_bytes());
            p.extend_from_slice(&(h.cpuid.len() as u32).to_le_bytes());
            for e in &h.cpuid {
                for v in [e.function, e.index, e.eax, e.ebx, e.ecx, e.edx] {
                    p.extend_from_slice(&v.to_le_bytes());
                }
            }
            KIND_HELLO
        }
        Frame::Accept => KIND_ACCEPT,
        Frame::Refuse { reason } => {
            put_str(&mut p, reason);
            KIND_REFUSE
        }
        Frame::Pages { gpa, data } => {
            p.extend_from_slice(&gpa.to_le_bytes());
            p.extend_from_slice(data);
            KIND_PAGES
        }
        Frame::Zero { gpa, pages } => {
            p.extend_from_slice(&gpa.to_le_bytes());
            p.extend_from_slice(&pages.to_le_bytes());
            KIND_ZERO
        }
        Frame::State(s) => {
            p.extend_from_slice(s);
            KIND_STATE
        }
        Frame::Restored => KIND_RESTORED,
        Frame::Go => KIND_GO,
        Frame::Resumed => KIND_RESUMED,
        Frame::Sync => KIND_SYNC,
        Frame::Synced => KIND_SYNCED,
    };
    out.extend_from_slice(&header(kind, p.len()));
    out.extend_from_slice(&p);
}

/// A cursor over a payload that turns running short into a `Malformed` error.
struct Reader<'a> {
    kind: &'static str,
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.buf.len() < n {
            return Err(WireError::Malformed {
                kind: self.kind,
                what: format!("{} bytes left, {n} needed", self.buf.len()),
            });
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }
    fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2")))
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
    fn string(&mut self) -> Result<String, WireError> {
        let n = self.u16()? as usize;
        let kind = self.kind;
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| WireError::Malformed {
            kind,
            what: "a string is not UTF-8".into(),
        })
    }
    fn end(&self) -> Result<(), WireError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(WireError::Malformed {
                kind: self.kind,
                what: format!("{} bytes after the end", self.buf.len()),
            })
        }
    }
}

/// Decodes the first frame of a connection, which must be a Hello of at most
/// [`MAX_HELLO`] bytes: `Ok(None)` while it has not all arrived, an error as soon as the
/// header shows another kind or a longer payload (so an unauthenticated peer never makes
/// the destination buffer more than that).
pub fn decode_hello(buf: &[u8]) -> Result<Option<(Hello, usize)>, WireError> {
    let Some(h) = buf.get(..HEADER_LEN) else {
        return Ok(None);
    };
    if h[0] != KIND_HELLO {
        return Err(WireError::NotHello { kind: h[0] });
    }
    let len = u32::from_le_bytes(h[4..8].try_into().expect("4")) as usize;
    if len > MAX_HELLO {
        return Err(WireError::TooLarge {
            len,
            max: MAX_HELLO,
        });
    }
    match decode(buf)? {
        Some((Frame::Hello(hello), n)) => Ok(Some((hello, n))),
        Some(_) => unreachable!("the kind was checked above"),
        None => Ok(None),
    }
}

/// Decodes one frame from the front of `buf`: `Ok(None)` if it has not all arrived,
/// else the frame and how many bytes it took.
pub fn decode(buf: &[u8]) -> Result<Option<(Frame, usize)>, WireError> {
    let Some(h) = buf.get(..HEADER_LEN) else {
        return Ok(None);
    };
    let kind = h[0];
    if !(KIND_HELLO..=KIND_SYNCED).contains(&kind) {
        return Err(WireError::UnknownKind(kind));
    }
    if h[1..4] != [0, 0, 0] {
        return Err(WireError::Reserved);
    }
    let len = u32::from_le_bytes(h[4..8].try_into().expect("4")) as usize;
    if len > MAX_PAYLOAD {
        return Err(WireError::TooLarge {
            len,
            max: MAX_PAYLOAD,
        });
    }
    let Some(payload) = buf.get(HEADER_LEN..HEADER_LEN + len) else {
        return Ok(None);
    };
    let empty = |name: &'static str, f: Frame| {
        if payload.is_empty() {
            Ok(f)
        } else {
            Err(WireError::Malformed {
                kind: name,
                what: "unexpected payload".into(),
            })
        }
    };
    let frame = match kind {
        KIND_HELLO => {
            let mut r = Reader {
                kind: "Hello",
                buf: payload,
            };
            if r.take(4)? != MAGIC {
                return Err(WireError::BadMagic);
            }
            let version = r.u16()?;
            let token = r.string()?;
            let vm_id = r.string()?;
            let memory_bytes = r.u64()?;
            let vcpus = r.u32()?;
            let n = r.u32()? as usize;
            if n > 4096 {
                return Err(WireError::Malformed {
                    kind: "Hello",
                    what: format!("{n} CPUID entries"),
                });
            }
            let mut cpuid = Vec::with_capacity(n);
            for _ in 0..n {
                cpuid.push(CpuidRegs {
                    function: r.u32()?,
                    index: r.u32()?,
                    eax: r.u32()?,
                    ebx: r.u32()?,
                    ecx: r.u32()?,
                    edx: r.u32()?,
                });
            }
            r.end()?;
            Frame::Hello(Hello {
                version,
                token,
                vm_id,
                memory_bytes,
                vcpus,
                cpuid,
            })
        }
        KIND_ACCEPT => empty("Accept", Frame::Accept)?,
        KIND_REFUSE => {
            let mut r = Reader {
                kind: "Refuse",
                buf: payload,
            };
            let reason = r.string()?;
            r.end()?;
            Frame::Refuse { reason }
        }
        KIND_PAGES => {
            let mut r = Reader {
                kind: "Pages",
                buf: payload,
            };
            let gpa = r.u64()?;
            if !gpa.is_multiple_of(PAGE as u64) || !r.buf.len().is_multiple_of(PAGE) {
                return Err(WireError::Malformed {
                    kind: "Pages",
                    what: format!(
                        "address {gpa:#x} or length {} not page-aligned",
                        r.buf.len()
                    ),
                });
            }
            Frame::Pages {
                gpa,
                data: r.buf.to_vec(),
            }
        }
        KIND_ZERO => {
            let mut r = Reader {
                kind: "Zero",
                buf: payload,
            };
            let gpa = r.u64()?;
            let pages = r.u32()?;
            r.end()?;
            if !gpa.is_multiple_of(PAGE as u64) {
                return Err(WireError::Malformed {
                    kind: "Zero",
                    what: format!("address {gpa:#x} not page-aligned"),
                });
            }
            Frame::Zero { gpa, pages }
        }
        KIND_STATE => Frame::State(payload.to_vec()),
        KIND_RESTORED => empty("Restored", Frame::Restored)?,
        KIND_GO => empty("Go", Frame::Go)?,
        KIND_RESUMED => empty("Resumed", Frame::Resumed)?,
        KIND_SYNC => empty("Sync", Frame::Sync)?,
        KIND_SYNCED => empty("Synced", Frame::Synced)?,
        _ => unreachable!("kind checked above"),
    };
    Ok(Some((frame, HEADER_LEN + len)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_frames() -> Vec<Frame> {
        vec![
            Frame::Hello(Hello {
                version: VERSION,
                token: "t0k€n".into(),
                vm_id: "vm-1".into(),
                memory_bytes: 64 << 20,
                vcpus: 2,
                cpuid: vec![CpuidRegs {
                    function: 7,
                    index: 0,
                    eax: 1,
                    ebx: 2,
                    ecx: 3,
                    edx: 4,
                }],
            }),
            Frame::Accept,
            Frame::Refuse {
                reason: "wrong token".into(),
            },
            Frame::Pages {
                gpa: 0x10_0000,
                data: vec![7u8; 2 * PAGE],
            },
            Frame::Zero {
                gpa: 0x2000,
                pages: 300,
            },
            Frame::State(vec![1, 2, 3]),
            Frame::Restored,
            Frame::Go,
            Frame::Resumed,
            Frame::Sync,
            Frame::Synced,
        ]
    }

    #[test]
    fn every_frame_round_trips_and_a_prefix_is_not_yet() {
        for f in all_frames() {
            let mut buf = Vec::new();
            encode(&f, &mut buf);
            for cut in 0..buf.len() {
                assert_eq!(decode(&buf[..cut]), Ok(None), "{f:?} cut at {cut}");
            }
            buf.extend_from_slice(&[9, 9]);
            let (g, n) = decode(&buf).unwrap().unwrap();
            assert_eq!(g, f);
            assert_eq!(n, buf.len() - 2);
        }
    }

    #[test]
    fn the_pages_header_matches_an_encoded_pages_frame() {
        let data = vec![3u8; PAGE];
        let mut buf = Vec::new();
        encode(
            &Frame::Pages {
                gpa: 0x5000,
                data: data.clone(),
            },
            &mut buf,
        );
        assert_eq!(&buf[..16], &pages_header(0x5000, data.len()));
    }

    #[test]
    fn bad_frames_are_refused() {
        assert_eq!(decode(&[0; 8]), Err(WireError::UnknownKind(0)));
        assert_eq!(
            decode(&[42, 0, 0, 0, 0, 0, 0, 0]),
            Err(WireError::UnknownKind(42))
        );
        assert_eq!(
            decode(&[KIND_GO, 1, 0, 0, 0, 0, 0, 0]),
            Err(WireError::Reserved)
        );
        let mut big = header(KIND_STATE, MAX_PAYLOAD + 1).to_vec();
        big.push(0);
        assert!(matches!(decode(&big), Err(WireError::TooLarge { .. })));
        // A Go with a payload, pages that are not whole pages, a Hello of another protocol.
        let mut go = header(KIND_GO, 1).to_vec();
        go.push(1);
        assert!(matches!(decode(&go), Err(WireError::Malformed { .. })));
        let mut pages = header(KIND_PAGES, 8 + 100).to_vec();
        pages.extend_from_slice(&[0u8; 108]);
        assert!(matches!(decode(&pages), Err(WireError::Malformed { .. })));
        let mut hello = header(KIND_HELLO, 4).to_vec();
        hello.extend_from_slice(b"HTTP");
        assert_eq!(decode(&hello), Err(WireError::BadMagic));
    }

    #[test]
    fn a_first_frame_is_a_hello_of_bounded_size_known_from_its_header() {
        let f = all_frames().remove(0);
        let Frame::Hello(want) = f.clone() else {
            unreachable!()
        };
        let mut buf = Vec::new();
        encode(&f, &mut buf);
        for cut in 0..buf.len() {
            assert_eq!(decode_hello(&buf[..cut]), Ok(None), "cut at {cut}");
        }
        assert_eq!(decode_hello(&buf), Ok(Some((want, buf.len()))));
        // Another kind, or a Hello announcing more than MAX_HELLO, is refused from the
        // header alone, before any payload is buffered.
        assert_eq!(
            decode_hello(&header(KIND_PAGES, 8 + PAGE)),
            Err(WireError::NotHello { kind: KIND_PAGES })
        );
        assert_eq!(
            decode_hello(&header(KIND_HELLO, MAX_HELLO + 1)),
            Err(WireError::TooLarge {
                len: MAX_HELLO + 1,
                max: MAX_HELLO
            })
        );
        assert_eq!(decode_hello(&header(KIND_HELLO, MAX_HELLO)), Ok(None));
        // The largest Hello this build can send fits the bound.
        let big = Frame::Hello(Hello {
            version: VERSION,
            token: "t".repeat(u16::MAX as usize),
            vm_id: "v".repeat(u16::MAX as usize),
            memory_bytes: 1,
            vcpus: 1,
            cpuid: vec![CpuidRegs::default(); 4096],
        });
        let mut buf = Vec::new();
        encode(&big, &mut buf);
        assert!(buf.len() - HEADER_LEN <= MAX_HELLO);
        assert!(matches!(decode_hello(&buf), Ok(Some(_))));
    }
}
