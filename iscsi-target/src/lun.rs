//! A logical unit at run time: its device and identity, and the state SCSI commands share
//! across every session that reaches it (reservations, unit attentions, mode pages, the
//! write range lock, EXTENDED COPY results).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use crate::block::BlockDevice;
use crate::pr::{PrState, PrStore};
use crate::scsi::sense::Sense;

/// What the caller gives to export a device as a LUN.
#[derive(Clone)]
pub struct LunConfig {
    /// LUN number (0..16384).
    pub id: u16,
    pub device: Arc<dyn BlockDevice>,
    /// Unit serial number (VPD 0x80), stable across restarts; also names the persistent
    /// reservation record.
    pub serial: String,
    /// NAA IEEE Registered Extended designator (VPD 0x83), 16 bytes, first nibble 6.
    pub naa: [u8; 16],
}

impl std::fmt::Debug for LunConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LunConfig")
            .field("id", &self.id)
            .field("serial", &self.serial)
            .field("size", &self.device.size())
            .finish()
    }
}

/// A stable NAA-6 designator derived from a serial, for callers that have no identifier
/// of their own: a locally administered company id and 100 bits of a hash of the serial.
pub fn naa_from_serial(serial: &str) -> [u8; 16] {
    // FNV-1a, twice with different seeds: stable across builds and platforms.
    let fnv = |seed: u64| {
        serial.bytes().fold(seed, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        })
    };
    let (a, b) = (fnv(0xcbf2_9ce4_8422_2325), fnv(0x8422_2325_cbf2_9ce4));
    let mut naa = [0u8; 16];
    naa[..8].copy_from_slice(&a.to_be_bytes());
    naa[8..].copy_from_slice(&b.to_be_bytes());
    // NAA 6, IEEE company id 0x0000_0000 would be invalid; use a fixed locally chosen one.
    naa[0] = 0x60;
    naa[1] = 0x01;
    naa[2] = 0x40;
    naa[3] = (naa[3] & 0x0f) | 0x50;
    naa
}

/// Mode page settings that MODE SELECT may change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModeState {
    /// Caching page: write cache enabled (writes are durable only after a flush).
    pub wce: bool,
    /// Control page: descriptor-format sense data.
    pub d_sense: bool,
    /// Control page: software write protect.
    pub swp: bool,
}

/// The result of one EXTENDED COPY, for RECEIVE COPY RESULTS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyResult {
    /// 0 = completed OK, 1 = failed (SPC-4 §6.18.3 COPY MANAGER STATUS).
    pub status: u8,
    pub segments_processed: u16,
    pub transfer_count_blocks: u64,
}

/// State every nexus shares.
#[derive(Debug)]
pub struct LunState {
    pub pr: PrState,
    /// SPC-2 RESERVE(6) holder.
    pub reserve6: Option<String>,
    /// Pending unit attentions per initiator port.
    pub unit_attentions: HashMap<String, VecDeque<Sense>>,
    pub mode: ModeState,
    /// Nexuses that sent PREVENT ALLOW MEDIUM REMOVAL with PREVENT set.
    pub prevent_removal: HashSet<String>,
    /// RECEIVE COPY RESULTS data: (initiator port, list id) → result.
    pub copy_results: BTreeMap<(String, u8), CopyResult>,
    /// START STOP UNIT: stopped units answer NOT READY to media commands.
    pub stopped: bool,
}

/// A byte range taken by a writer; released on drop.
pub struct RangeGuard<'a> {
    lock: &'a RangeLock,
    id: u64,
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut held = self.lock.held.lock().expect("range lock poisoned");
        held.retain(|(id, _, _)| *id != self.id);
        drop(held);
        self.lock.released.notify_all();
    }
}

/// Serialises writes that overlap, so COMPARE AND WRITE's read-compare-write is atomic
/// with respect to every other write to its range. Non-overlapping writes run in parallel.
#[derive(Default)]
pub struct RangeLock {
    held: Mutex<Vec<(u64, u64, u64)>>,
    released: Condvar,
    next: std::sync::atomic::AtomicU64,
}

impl RangeLock {
    /// Blocks until `offset..offset+len` overlaps no held range, then takes it.
    pub fn lock(&self, offset: u64, len: u64) -> RangeGuard<'_> {
        let end = offset.saturating_add(len.max(1));
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut held = self.held.lock().expect("range lock poisoned");
        while held.iter().any(|&(_, s, e)| s < end && offset < e) {
            held = self.released.wait(held).expect("range lock poisoned");
        }
        held.push((id, offset, end));
        RangeGuard { lock: self, id }
    }
}

/// A LUN as the target serves it.
pub struct Lun {
    pub id: u16,
    pub device: Arc<dyn BlockDevice>,
    pub serial: String,
    pub naa: [u8; 16],
    pub writes: RangeLock,
    state: Mutex<LunState>,
    store: Arc<dyn PrStore>,
}

impl std::fmt::Debug for Lun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lun")
            .field("id", &self.id)
            .field("serial", &self.serial)
            .finish()
    }
}

impl Lun {
    /// Builds the LUN, loading its saved reservations from `store`.
    pub fn new(cfg: LunConfig, store: Arc<dyn PrStore>) -> Result<Self, crate::pr::PrStoreError> {
        let pr = store.load(&cfg.serial)?.unwrap_or_default();
        Ok(Self {
            id: cfg.id,
            device: cfg.device,
            serial: cfg.serial,
            naa: cfg.naa,
            writes: RangeLock::default(),
            state: Mutex::new(LunState {
                pr,
                reserve6: None,
                unit_attentions: HashMap::new(),
                mode: ModeState {
                    wce: true,
                    d_sense: false,
                    swp: false,
                },
                prevent_removal: HashSet::new(),
                copy_results: BTreeMap::new(),
                stopped: false,
            }),
            store,
        })
    }

    pub fn state(&self) -> MutexGuard<'_, LunState> {
        self.state.lock().expect("LUN state lock poisoned")
    }

    pub fn store(&self) -> &dyn PrStore {
        &*self.store
    }

    pub fn block_size(&self) -> u32 {
        self.device.block_size()
    }

    pub fn blocks(&self) -> u64 {
        self.device.size() / u64::from(self.device.block_size())
    }

    /// Queues a unit attention for every nexus except `except`.
    pub fn unit_attention_all(&self, sense: Sense, except: Option<&str>, nexuses: &[String]) {
        let mut st = self.state();
        for n in nexuses {
            if Some(n.as_str()) != except {
                push_ua(&mut st, n, sense);
            }
        }
    }
}

/// Adds a unit attention for `nexus`, skipping duplicates.
pub fn push_ua(st: &mut LunState, nexus: &str, sense: Sense) {
    let q = st.unit_attentions.entry(nexus.to_owned()).or_default();
    if !q.contains(&sense) && q.len() < 16 {
        q.push_back(sense);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    #[test]
    fn overlapping_ranges_wait_and_disjoint_ones_do_not() {
        let lock = Arc::new(RangeLock::default());
        let g = lock.lock(0, 4096);
        let _other = lock.lock(4096, 4096); // disjoint: no wait
        let done = Arc::new(AtomicBool::new(false));
        let t = {
            let (lock, done) = (lock.clone(), done.clone());
            std::thread::spawn(move || {
                let _g = lock.lock(2048, 10);
                done.store(true, Ordering::SeqCst);
            })
        };
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!done.load(Ordering::SeqCst), "overlapping lock must wait");
        drop(g);
        t.join().unwrap();
        assert!(done.load(Ordering::SeqCst));
    }

    #[test]
    fn naa_is_stable_and_type_6() {
        let a = naa_from_serial("vol-1");
        assert_eq!(a, naa_from_serial("vol-1"));
        assert_ne!(a, naa_from_serial("vol-2"));
        assert_eq!(a[0] >> 4, 6);
    }
}
