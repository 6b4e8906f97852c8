//! A guest's virtio-blk queue: the descriptor table, the available ring and the buffers
//! come from the input, the device walks them as it does (virtio-queue), parses each
//! chain with `Request::parse` and executes it against a small in-memory disk. Never a
//! panic (the disk below panics on any access the request checks should have refused),
//! and a completion never claims more bytes than the chain offered the device.
#![no_main]

use std::sync::{Arc, Mutex};

use hostd::devices::virtio::block::BlockMetrics;
use hostd::devices::virtio::block::backend::{BackendError, BlockBackend};
use hostd::devices::virtio::block::request::{
    Desc, DiskContext, Request, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, complete,
};
use hostd::vmm::GuestRam;
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

/// Guest memory: the queue's rings in the first pages, buffers after them.
const MEM: usize = 64 << 10;
const DESC_TABLE: u32 = 0;
const AVAIL: u32 = 0x1000;
const USED: u32 = 0x2000;
const BUFFERS: u64 = 0x3000;
const QUEUE_SIZE: u16 = 16;
const SECTORS: u64 = 64;
/// Most chains one input may pop (the available index is the guest's to choose).
const MAX_CHAINS: usize = 64;

/// A disk that trusts nothing: an access outside it is a bug in the request checks.
struct MemDisk(Mutex<Vec<u8>>);

impl MemDisk {
    fn range(&self, offset: u64, len: u64) -> std::ops::Range<usize> {
        let end = offset.checked_add(len).expect("range wraps");
        assert!(end <= self.size(), "{offset}+{len} is past the disk");
        offset as usize..end as usize
    }
}

impl BlockBackend for MemDisk {
    fn size(&self) -> u64 {
        SECTORS * 512
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        let r = self.range(offset, buf.len() as u64);
        buf.copy_from_slice(&self.0.lock().unwrap()[r]);
        Ok(())
    }
    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<(), BackendError> {
        let r = self.range(offset, buf.len() as u64);
        self.0.lock().unwrap()[r].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> Result<(), BackendError> {
        Ok(())
    }
    fn supports_discard(&self) -> bool {
        true
    }
    fn discard(&self, offset: u64, len: u64) -> Result<(), BackendError> {
        let r = self.range(offset, len);
        self.0.lock().unwrap()[r].fill(0);
        Ok(())
    }
    fn describe(&self) -> String {
        "fuzz disk".into()
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, data)) = data.split_first() else {
        return;
    };
    let mem = GuestRam::from_ranges(&[(GuestAddress(0), MEM)]).expect("guest memory");
    // The descriptor table, then the available ring, then buffer contents.
    let table_len = usize::from(QUEUE_SIZE) * 16;
    let avail_len = 4 + 2 * usize::from(QUEUE_SIZE) + 2;
    let (table, data) = data.split_at(data.len().min(table_len));
    let (avail, buffers) = data.split_at(data.len().min(avail_len));
    let buffers = &buffers[..buffers.len().min(MEM - BUFFERS as usize)];
    mem.write_slice(table, GuestAddress(u64::from(DESC_TABLE)))
        .unwrap();
    mem.write_slice(avail, GuestAddress(u64::from(AVAIL)))
        .unwrap();
    mem.write_slice(buffers, GuestAddress(BUFFERS)).unwrap();

    let mut q = Queue::new(QUEUE_SIZE).expect("queue");
    q.set_size(QUEUE_SIZE);
    q.set_desc_table_address(Some(DESC_TABLE), Some(0));
    q.set_avail_ring_address(Some(AVAIL), Some(0));
    q.set_used_ring_address(Some(USED), Some(0));
    q.set_event_idx(flags & 1 != 0);
    q.set_ready(true);
    if !q.is_valid(&mem) {
        return;
    }
    let mut id = [0u8; VIRTIO_BLK_ID_BYTES];
    id[..3].copy_from_slice(b"vda");
    let disk = DiskContext {
        backend: Arc::new(MemDisk(Mutex::new(vec![0; (SECTORS * 512) as usize]))),
        read_only: flags & 2 != 0,
        capacity: SECTORS,
        block_size: if flags & 4 != 0 { 4096 } else { 512 },
        id,
        metrics: Arc::new(BlockMetrics::default()),
    };
    let mut bounce = Vec::new();
    for _ in 0..MAX_CHAINS {
        let Some(chain) = q.pop_descriptor_chain(&mem) else {
            break;
        };
        let head = chain.head_index();
        let descs: Vec<Desc> = chain.map(Desc::from).collect();
        let used = match Request::parse(&descs, &mem) {
            Ok(req) => req.execute(&mem, &disk, &mut bounce).used_len,
            Err((_, status)) => {
                status.map_or(0, |s| complete(&mem, s, VIRTIO_BLK_S_IOERR, 0).used_len)
            }
        };
        let offered: u64 = descs
            .iter()
            .filter(|d| d.writable)
            .map(|d| u64::from(d.len))
            .sum();
        assert!(
            u64::from(used) <= offered,
            "{used} bytes used of {offered} writable: {descs:?}"
        );
        if q.add_used(&mem, head, used).is_err() {
            break;
        }
    }
});
