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
//! Pages / Zero / Delta ...  the last dirty pages (the VM is paused now)
//! State(saved vCPU, irqchip, clock and device state)
//!                         ← Restored | Refuse(reason)    (the VM is built, not running)
//! Go                        the source's point of no return
//!                         ← Resumed
//! ```
//!
//! Kind 0 is never a valid frame, so a stream of zeros is refused at once.
//!
//! Version 3 adds Delta frames in dirty rounds: a page sent before is sent again as the
//! runs of bytes that changed since ([`encode_delta`]), which the destination writes over
//! the page it has. The source speaks 3 only to a destination that said it reads it
//! (`PrepareMigrationReceiveResponse.stream_version`), else 2.

use crate::vmm::CpuidRegs;

/// "HMIG", first bytes of a Hello.
pub const MAGIC: [u8; 4] = *b"HMIG";
/// The newest version this build speaks.
pub const VERSION: u16 = 3;
/// The oldest version this build accepts (version 1 streams only lack Sync).
pub const MIN_VERSION: u16 = 1;
/// What a source speaks to a destination that did not say what it reads (a hostd from
/// before version 3 reads 1 and 2), and what a saved state is written in, for any host
/// to read.
pub const FALLBACK_VERSION: u16 = 2;
/// The first version with Delta frames.
pub const DELTA_VERSION: u16 = 3;
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
const KIND_DELTA: u8 = 12;

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
    /// Pages the destination has, each as the runs that changed (version 3): entries of
    /// page address (u64), encoded length (u16) and [`encode_delta`]'s bytes.
    Delta {
        data: Vec<u8>,
    },
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

/// The header of a Delta frame of `data_len` bytes of entries.
pub fn delta_header(data_len: usize) -> [u8; HEADER_LEN] {
    header(KIND_DELTA, data_len)
}

/// The version a source speaks to a destination that reads up to `destination` (0: it
/// did not say).
pub fn speak(destination: u32) -> u16 {
    match destination {
        0 => FALLBACK_VERSION,
        v => v.min(u32::from(VERSION)).max(u32::from(FALLBACK_VERSION)) as u16,
    }
}

/// A delta is sent only if it is at most this long; a longer one goes as the page.
pub const MAX_DELTA: usize = PAGE - PAGE / 8;

/// Appends to `out` one Delta entry taking the page at `gpa` from `old` to `new` (both a
/// page long): the runs of changed bytes, each as the count of unchanged bytes before it
/// and its length (LEB128, at most two bytes each: both are under 4096), then its new
/// bytes. Answers `false`, leaving `out` as it was, when the entry would be longer than
/// [`MAX_DELTA`] (send the page itself), and appends nothing, answering `true`, when the
/// pages are equal.
pub fn encode_delta(gpa: u64, old: &[u8], new: &[u8], out: &mut Vec<u8>) -> bool {
    debug_assert!(old.len() == PAGE && new.len() == PAGE);
    let start = out.len();
    out.extend_from_slice(&gpa.to_le_bytes());
    out.extend_from_slice(&[0, 0]);
    let body = out.len();
    let word = |b: &[u8], i: usize| u64::from_ne_bytes(b[i * 8..i * 8 + 8].try_into().expect("8"));
    let words = PAGE / 8;
    let (mut i, mut pos) = (0, 0);
    while i < words {
        if word(old, i) == word(new, i) {
            i += 1;
            continue;
        }
        let mut j = i + 1;
        while j < words && word(old, j) != word(new, j) {
            j += 1;
        }
        // Trim the run to the bytes that changed in its first and last words.
        let mut from = i * 8;
        while old[from] == new[from] {
            from += 1;
        }
        let mut to = j * 8;
        while old[to - 1] == new[to - 1] {
            to -= 1;
        }
        if out.len() - body + 4 + (to - from) > MAX_DELTA {
            out.truncate(start);
            return false;
        }
        put_leb(out, from - pos);
        put_leb(out, to - from);
        out.extend_from_slice(&new[from..to]);
        pos = to;
        i = j;
    }
    let len = out.len() - body;
    if len == 0 {
        out.truncate(start);
    } else {
        out[body - 2..body].copy_from_slice(&(len as u16).to_le_bytes());
    }
    true
}

fn put_leb(out: &mut Vec<u8>, v: usize) {
    debug_assert!(v < 1 << 14);
    if v < 0x80 {
        out.push(v as u8);
    } else {
        out.extend_from_slice(&[(v as u8) | 0x80, (v >> 7) as u8]);
    }
}

/// One run of a Delta entry: the page's address, the offset in it, the new bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeltaRun<'a> {
    pub gpa: u64,
    pub offset: usize,
    pub bytes: &'a [u8],
}

/// The runs of a Delta frame's entries in order, each checked to lie in its page; an
/// error for the first malformed entry.
pub fn delta_runs(data: &[u8]) -> impl Iterator<Item = Result<DeltaRun<'_>, WireError>> {
    let mut r = Reader {
        kind: "Delta",
        buf: data,
    };
    // The entry being read: its page, its encoded bytes left, the offset reached.
    let mut entry: Option<(u64, Reader<'_>, usize)> = None;
    std::iter::from_fn(move || {
        loop {
            if let Some((gpa, e, pos)) = entry.as_mut() {
                if e.buf.is_empty() {
                    entry = None;
                    continue;
                }
                let run = (|| {
                    let skip = e.leb()?;
                    let len = e.leb()?;
                    let offset = *pos + skip;
                    if len == 0 || offset + len > PAGE {
                        return Err(WireError::Malformed {
                            kind: "Delta",
                            what: format!(
                                "a run of {len} bytes at {offset} in the page at {gpa:#x}"
                            ),
                        });
                    }
                    *pos = offset + len;
                    Ok(DeltaRun {
                        gpa: *gpa,
                        offset,
                        bytes: e.take(len)?,
                    })
                })();
                if run.is_err() {
                    r.buf = &[];
                    entry = None;
                }
                return Some(run);
            }
            if r.buf.is_empty() {
                return None;
            }
            let head = (|| {
                let gpa = r.u64()?;
                let len = r.u16()? as usize;
                if !gpa.is_multiple_of(PAGE as u64) || len == 0 || len > MAX_DELTA {
                    return Err(WireError::Malformed {
                        kind: "Delta",
                        what: format!("an entry of {len} bytes for address {gpa:#x}"),
                    });
                }
                Ok((gpa, r.take(len)?))
            })();
            match head {
                Ok((gpa, body)) => {
                    entry = Some((
                        gpa,
                        Reader {
                            kind: "Delta",
                            buf: body,
                        },
                        0,
                    ))
                }
                Err(e) => {
                    r.buf = &[];
                    return Some(Err(e));
                }
            }
        }
    })
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
        Frame::Delta { data } => {
            p.extend_from_slice(data);
            KIND_DELTA
        }
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
    /// A LEB128 number under 2^14 (at most two bytes).
    fn leb(&mut self) -> Result<usize, WireError> {
        let b = self.take(1)?[0];
        if b < 0x80 {
            return Ok(usize::from(b));
        }
        let c = self.take(1)?[0];
        if c >= 0x80 {
            return Err(WireError::Malformed {
                kind: self.kind,
                what: "a run length of more than two bytes".into(),
            });
        }
        Ok(usize::from(b & 0x7f) | usize::from(c) << 7)
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
    if !(KIND_HELLO..=KIND_DELTA).contains(&kind) {
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
        KIND_DELTA => {
            if let Some(e) = delta_runs(payload).find_map(Result::err) {
                return Err(e);
            }
            Frame::Delta {
                data: payload.to_vec(),
            }
        }
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
            Frame::Delta {
                data: delta_of(&[]),
            },
            Frame::Delta {
                data: delta_of(&[(0x3000, 5, 1), (0x3000, 4000, 90), (0x9000, 0, 1)]),
            },
        ]
    }

    /// Delta entries for pages of zeros changed at (page, offset, length) to 0xAB.
    fn delta_of(changes: &[(u64, usize, usize)]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut pages: Vec<u64> = changes.iter().map(|c| c.0).collect();
        pages.dedup();
        for gpa in pages {
            let mut new = vec![0u8; PAGE];
            for &(_, at, n) in changes.iter().filter(|c| c.0 == gpa) {
                new[at..at + n].fill(0xAB);
            }
            assert!(encode_delta(gpa, &[0u8; PAGE], &new, &mut out));
        }
        out
    }

    /// Writes a Delta's runs over `pages` (page address -> contents).
    fn apply_delta(data: &[u8], pages: &mut std::collections::HashMap<u64, Vec<u8>>) {
        for run in delta_runs(data) {
            let run = run.unwrap();
            let page = pages.get_mut(&run.gpa).unwrap();
            page[run.offset..run.offset + run.bytes.len()].copy_from_slice(run.bytes);
        }
    }

    #[test]
    fn a_delta_takes_the_old_page_to_the_new_one_in_fewer_bytes() {
        // A small deterministic generator: no dependency for a test.
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut rnd = move |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        for case in 0..500 {
            let old: Vec<u8> = (0..PAGE).map(|_| rnd(256) as u8).collect();
            let mut new = old.clone();
            // Changes of one byte to a few hundred, at word edges and inside words.
            for _ in 0..rnd(12) {
                let at = rnd(PAGE as u64) as usize;
                let n = (1 + rnd(300) as usize).min(PAGE - at);
                for b in &mut new[at..at + n] {
                    *b = b.wrapping_add(1 + rnd(255) as u8);
                }
            }
            let gpa = 0x1000 * (case + 1);
            let mut out = vec![7u8];
            assert!(encode_delta(gpa, &old, &new, &mut out), "case {case}");
            let changed = old.iter().zip(&new).filter(|(a, b)| a != b).count();
            if changed == 0 {
                assert_eq!(out, [7], "equal pages add nothing");
                continue;
            }
            // Every run's words hold a changed byte; a run costs at most four bytes more.
            assert!(out.len() - 1 <= 10 + changed * 8 + 4 * 12, "case {case}");
            let mut pages = std::collections::HashMap::from([(gpa, old.clone())]);
            apply_delta(&out[1..], &mut pages);
            assert_eq!(pages[&gpa], new, "case {case}");
            // It decodes as a frame too.
            let mut buf = Vec::new();
            let frame = Frame::Delta {
                data: out[1..].to_vec(),
            };
            encode(&frame, &mut buf);
            assert_eq!(decode(&buf), Ok(Some((frame, buf.len()))));
        }
        // A page that changed everywhere goes whole: nothing appended.
        let new: Vec<u8> = (0..PAGE).map(|i| (i % 251) as u8 + 1).collect();
        let mut out = vec![1, 2];
        assert!(!encode_delta(0x1000, &[0; PAGE], &new, &mut out));
        assert_eq!(out, [1, 2]);
    }

    #[test]
    fn malformed_deltas_are_refused() {
        let frame = |data: Vec<u8>| {
            let mut buf = header(KIND_DELTA, data.len()).to_vec();
            buf.extend_from_slice(&data);
            decode(&buf)
        };
        let entry = |gpa: u64, body: &[u8]| {
            let mut e = gpa.to_le_bytes().to_vec();
            e.extend_from_slice(&(body.len() as u16).to_le_bytes());
            e.extend_from_slice(body);
            e
        };
        assert!(matches!(frame(entry(0x1000, &[0, 1, 9])), Ok(Some(_))));
        let bad = [
            entry(0x1001, &[0, 1, 9]),                      // not page-aligned
            entry(0x1000, &[]),                             // an empty entry
            entry(0x1000, &[0, 0]),                         // a run of no bytes
            entry(0x1000, &[0x80, 0x20, 1, 9]),             // starts past the page
            entry(0x1000, &[0x80, 0x1f, 0xc8, 0x01, 1, 2]), // ends past the page
            entry(0x1000, &[0x80, 0x80, 0x01, 1, 9]),       // a three-byte length
            entry(0x1000, &[0, 5, 1, 2]),                   // shorter than its run
            entry(0x1000, &vec![1; MAX_DELTA + 1]),         // longer than a delta may be
            entry(0x1000, &[0, 1, 9])[..9].to_vec(),        // a cut entry head
        ];
        for (i, data) in bad.into_iter().enumerate() {
            assert!(
                matches!(frame(data), Err(WireError::Malformed { kind: "Delta", .. })),
                "case {i}"
            );
        }
        // Two runs: the second's skip counts from the end of the first.
        let data = entry(0x2000, &[2, 1, 7, 3, 2, 8, 9]);
        let runs: Vec<_> = delta_runs(&data).map(Result::unwrap).collect();
        assert_eq!(
            runs,
            [
                DeltaRun {
                    gpa: 0x2000,
                    offset: 2,
                    bytes: &[7]
                },
                DeltaRun {
                    gpa: 0x2000,
                    offset: 6,
                    bytes: &[8, 9]
                }
            ]
        );
    }

    #[test]
    fn a_source_speaks_what_the_destination_reads() {
        assert_eq!(speak(0), FALLBACK_VERSION);
        assert_eq!(speak(2), 2);
        assert_eq!(speak(3), 3);
        assert_eq!(speak(1), FALLBACK_VERSION, "a source always sends Sync");
        assert_eq!(speak(99), VERSION);
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
