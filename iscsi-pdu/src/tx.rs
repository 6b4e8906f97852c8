//! Batches encoded PDUs for vectored writes: headers, digests, padding and short data
//! segments are copied together into one arena; long data segments stay in their own
//! buffers. [`TxBatch::write_to`] sends it all with as few `writev` calls as the writer
//! takes, keeping whatever a short or would-block write left for the next call.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Write};

use bytes::Bytes;

use crate::bhs::Header;
use crate::frame::{self, FrameConfig};

/// Data segments shorter than this are copied next to their header; longer ones are sent
/// from their own buffer. The kernel copies every byte into the socket anyway, so a copy
/// here is a second pass over the data; it pays only while it costs less than one more
/// iovec entry (and its share of [`MAX_IOV`]), which at memcpy speeds is up to a couple
/// of KiB.
pub const COPY_BELOW: usize = 2048;

/// Written arena bytes kept before [`TxBatch`] moves the unwritten rest to the front: small
/// enough to bound a busy batch's memory, large enough that the move is rare.
const COMPACT_AT: usize = 64 * 1024;

/// Most buffers one `writev` is given: Linux's `UIO_MAXIOV`, past which it fails with
/// EINVAL.
pub const MAX_IOV: usize = 1024;

/// One contiguous run of bytes to send.
#[derive(Debug)]
enum Piece {
    /// `arena[start..end]`.
    Arena { start: usize, end: usize },
    /// A long data segment, sent from its own buffer.
    Data(Bytes),
}

/// Encoded PDUs waiting to be written, in order.
#[derive(Debug, Default)]
pub struct TxBatch {
    arena: Vec<u8>,
    pieces: VecDeque<Piece>,
    /// Bytes of the first piece already written.
    front_written: usize,
    /// Bytes queued and not yet written.
    len: usize,
}

impl TxBatch {
    /// A batch whose arena starts with room for `arena` bytes; it keeps its capacity
    /// from one batch to the next.
    pub fn with_capacity(arena: usize) -> Self {
        Self {
            arena: Vec::with_capacity(arena),
            ..Self::default()
        }
    }

    /// Queues one PDU: its header (with digest), its data segment, then padding and data
    /// digest.
    pub fn push_pdu(&mut self, header: &Header, data: Bytes, cfg: &FrameConfig) {
        self.push_copied(frame::encode_header(header, data.len(), cfg).as_bytes());
        let trailer = frame::trailer(&data, cfg);
        self.push_data(data);
        self.push_copied(trailer.as_bytes());
    }

    /// Queues bytes by copying them into the arena.
    pub fn push_copied(&mut self, b: &[u8]) {
        if b.is_empty() {
            return;
        }
        let start = self.arena.len();
        self.arena.extend_from_slice(b);
        let end = self.arena.len();
        self.len += b.len();
        match self.pieces.back_mut() {
            Some(Piece::Arena { end: last, .. }) if *last == start => *last = end,
            _ => self.pieces.push_back(Piece::Arena { start, end }),
        }
    }

    /// Queues a data segment: copied when shorter than [`COPY_BELOW`], otherwise kept as
    /// its own buffer.
    pub fn push_data(&mut self, data: Bytes) {
        if data.len() < COPY_BELOW {
            self.push_copied(&data);
        } else {
            self.len += data.len();
            self.pieces.push_back(Piece::Data(data));
        }
    }

    /// Bytes queued and not yet written.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Drops everything queued (after a failed write, whose connection is going away).
    pub fn clear(&mut self) {
        self.pieces.clear();
        self.arena.clear();
        self.front_written = 0;
        self.len = 0;
    }

    /// Writes until the batch is empty (`Ok(true)`) or the writer would block
    /// (`Ok(false)`: the rest stays queued, and more may be pushed behind it). Short
    /// writes continue where they stopped; interrupted ones are retried. A writer that
    /// takes nothing is a `WriteZero` error.
    pub fn write_to(&mut self, w: &mut impl Write) -> io::Result<bool> {
        while !self.pieces.is_empty() {
            let mut iov = [IoSlice::new(&[]); MAX_IOV];
            let mut count = 0;
            for (slot, piece) in iov.iter_mut().zip(&self.pieces) {
                let bytes = match piece {
                    Piece::Arena { start, end } => &self.arena[*start..*end],
                    Piece::Data(d) => &d[..],
                };
                let skip = if count == 0 { self.front_written } else { 0 };
                *slot = IoSlice::new(&bytes[skip..]);
                count += 1;
            }
            let mut slices = &mut iov[..count];
            let mut written = 0;
            let outcome = loop {
                if slices.is_empty() {
                    break Ok(());
                }
                match w.write_vectored(slices) {
                    Ok(0) => break Err(io::Error::from(io::ErrorKind::WriteZero)),
                    Ok(n) => {
                        written += n;
                        IoSlice::advance_slices(&mut slices, n);
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => break Err(e),
                }
            };
            self.consume(written);
            match outcome {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// Forgets the first `n` queued bytes, which were written.
    fn consume(&mut self, mut n: usize) {
        self.len -= n;
        while n > 0 {
            let front = self.pieces.front().expect("written bytes were queued");
            let left = match front {
                Piece::Arena { start, end } => end - start,
                Piece::Data(d) => d.len(),
            } - self.front_written;
            if n < left {
                self.front_written += n;
                break;
            }
            n -= left;
            self.front_written = 0;
            self.pieces.pop_front();
        }
        if self.pieces.is_empty() {
            // Everything went: the arena starts over, keeping its capacity.
            self.arena.clear();
        } else {
            self.compact();
        }
    }

    /// Drops the arena's written prefix once it is most of the arena, so a batch that is
    /// never quite empty (a writer that keeps it queued under load) does not grow
    /// without bound. Arena pieces are in arena order, so the first one marks the prefix
    /// (with what of it went, when it is the front piece).
    fn compact(&mut self) {
        let first = self.pieces.iter().enumerate().find_map(|(i, p)| match p {
            Piece::Arena { start, .. } => Some((i, *start)),
            Piece::Data(_) => None,
        });
        let dead = match first {
            Some((0, start)) => start + self.front_written,
            Some((_, start)) => start,
            None => {
                self.arena.clear();
                return;
            }
        };
        if dead < COMPACT_AT || dead < self.arena.len() / 2 {
            return;
        }
        self.arena.drain(..dead);
        if first.is_some_and(|(i, _)| i == 0) {
            self.front_written = 0;
        }
        for (i, p) in self.pieces.iter_mut().enumerate() {
            if let Piece::Arena { start, end } = p {
                // The front piece's written part is gone with the prefix.
                *start = if i == 0 { 0 } else { *start - dead };
                *end -= dead;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bhs::{DataIn, NopIn};

    /// A writer that takes at most `per_call` bytes a call, then `WouldBlock` once
    /// `budget` bytes went, recording what it got and how many buffers each call had.
    struct Short {
        got: Vec<u8>,
        per_call: usize,
        budget: usize,
        interrupt_first: bool,
        most_bufs: usize,
    }

    impl Short {
        fn new(per_call: usize) -> Self {
            Self {
                got: Vec::new(),
                per_call,
                budget: usize::MAX,
                interrupt_first: false,
                most_bufs: 0,
            }
        }
    }

    impl Write for Short {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.write_vectored(&[IoSlice::new(buf)])
        }

        fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
            if std::mem::take(&mut self.interrupt_first) {
                return Err(io::ErrorKind::Interrupted.into());
            }
            if self.budget == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            self.most_bufs = self.most_bufs.max(bufs.len());
            let mut room = self.per_call.min(self.budget);
            let mut n = 0;
            for b in bufs {
                let take = b.len().min(room);
                self.got.extend_from_slice(&b[..take]);
                room -= take;
                n += take;
                if room == 0 {
                    break;
                }
            }
            self.budget -= n;
            Ok(n)
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn cfg() -> FrameConfig {
        FrameConfig {
            header_digest: true,
            data_digest: true,
            ..FrameConfig::default()
        }
    }

    fn data_in(itt: u32) -> Header {
        Header::DataIn(DataIn {
            itt,
            ..Default::default()
        })
    }

    /// A batch of PDUs with short and long data, and the bytes `frame::encode` makes.
    fn batch() -> (TxBatch, Vec<u8>) {
        let mut tx = TxBatch::default();
        let mut wire = Vec::new();
        for (i, len) in [0usize, 5, 100, COPY_BELOW - 1, COPY_BELOW, 9000, 3]
            .into_iter()
            .enumerate()
        {
            let data: Vec<u8> = (0..len).map(|b| (b * 7 + i) as u8).collect();
            let h = data_in(i as u32);
            frame::encode(&h, &[], &data, &cfg(), &mut wire).unwrap();
            tx.push_pdu(&h, Bytes::from(data), &cfg());
        }
        (tx, wire)
    }

    #[test]
    fn writes_exactly_what_frame_encode_makes() {
        let (mut tx, wire) = batch();
        assert_eq!(tx.len(), wire.len());
        let mut w = Short::new(usize::MAX);
        assert!(tx.write_to(&mut w).unwrap());
        assert_eq!(w.got, wire);
        assert!(tx.is_empty());
    }

    #[test]
    fn short_writes_resume_where_they_stopped() {
        for per_call in [1, 3, 47, 48, 52, 2047, 5000] {
            let (mut tx, wire) = batch();
            let mut w = Short::new(per_call);
            w.interrupt_first = true;
            assert!(tx.write_to(&mut w).unwrap());
            assert_eq!(w.got, wire, "{per_call} bytes a call");
            assert_eq!(tx.len(), 0);
        }
    }

    #[test]
    fn would_block_keeps_the_rest_and_takes_more_behind_it() {
        let (mut tx, mut wire) = batch();
        let mut w = Short::new(100);
        w.budget = 1234;
        assert!(!tx.write_to(&mut w).unwrap());
        assert_eq!(tx.len(), wire.len() - 1234);
        let ping = Header::NopIn(NopIn {
            itt: 77,
            ..Default::default()
        });
        frame::encode(&ping, &[], b"later", &cfg(), &mut wire).unwrap();
        tx.push_pdu(&ping, Bytes::from_static(b"later"), &cfg());
        w.budget = usize::MAX;
        assert!(tx.write_to(&mut w).unwrap());
        assert_eq!(w.got, wire);
        assert!(tx.is_empty());
    }

    #[test]
    fn a_batch_that_never_empties_keeps_its_arena_bounded() {
        let mut tx = TxBatch::default();
        let mut wire = Vec::new();
        let mut w = Short::new(usize::MAX);
        // Each round queues two PDUs (256 bytes each with digests) and writes as much,
        // but the first round wrote 100 bytes less: the batch is never empty, and without
        // dropping what went its arena would grow by 512 bytes a round.
        for i in 0..20_000u32 {
            for itt in [2 * i, 2 * i + 1] {
                let data = vec![itt as u8; 200];
                frame::encode(&data_in(itt), &[], &data, &cfg(), &mut wire).unwrap();
                tx.push_pdu(&data_in(itt), Bytes::from(data), &cfg());
            }
            w.budget = if i == 0 { 412 } else { 512 };
            assert!(!tx.write_to(&mut w).unwrap());
            assert_eq!(tx.len(), 100);
            assert!(tx.arena.len() <= 2 * COMPACT_AT, "arena {}", tx.arena.len());
        }
        w.budget = usize::MAX;
        assert!(tx.write_to(&mut w).unwrap());
        assert_eq!(w.got, wire);
    }

    #[test]
    fn short_pieces_share_the_arena_and_long_data_stays_apart() {
        let mut tx = TxBatch::default();
        tx.push_copied(&[1; 48]);
        tx.push_data(Bytes::from(vec![2u8; 100]));
        tx.push_data(Bytes::from(vec![3u8; 8192]));
        tx.push_copied(&[4; 4]);
        tx.push_data(Bytes::new());
        assert_eq!(tx.len(), 48 + 100 + 8192 + 4);
        let lens: Vec<(bool, usize)> = tx
            .pieces
            .iter()
            .map(|p| match p {
                Piece::Arena { start, end } => (true, end - start),
                Piece::Data(d) => (false, d.len()),
            })
            .collect();
        assert_eq!(lens, vec![(true, 148), (false, 8192), (true, 4)]);
    }

    #[test]
    fn never_passes_more_than_max_iov_buffers() {
        let mut tx = TxBatch::default();
        let mut wire = Vec::new();
        for i in 0..MAX_IOV as u32 {
            let data = vec![i as u8; COPY_BELOW];
            frame::encode(&data_in(i), &[], &data, &cfg(), &mut wire).unwrap();
            tx.push_pdu(&data_in(i), Bytes::from(data), &cfg());
        }
        let mut w = Short::new(usize::MAX);
        assert!(tx.write_to(&mut w).unwrap());
        assert_eq!(w.most_bufs, MAX_IOV);
        assert_eq!(w.got, wire);
    }

    #[test]
    fn a_writer_that_takes_nothing_is_an_error_and_clear_drops_the_rest() {
        struct Full;
        impl Write for Full {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Ok(0)
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let (mut tx, _) = batch();
        let err = tx.write_to(&mut Full).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WriteZero);
        assert!(!tx.is_empty());
        tx.clear();
        assert!(tx.is_empty());
        assert!(tx.write_to(&mut Full).unwrap());
    }
}
