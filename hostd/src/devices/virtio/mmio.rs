//! The virtio-mmio transport (virtio 1.2 section 4.2, version 2 register layout): the
//! registers a driver programs to negotiate features, set up queues and drive the device
//! status, in front of a [`VirtioDevice`].

use std::sync::Arc;

use virtio_queue::{Queue, QueueState, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::devices::bus::BusDevice;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x4c4f_4f50; // "POOL"

const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
/// Offset of the QueueNotify register, where KVM ioeventfds are placed.
pub const REG_QUEUE_NOTIFY: u64 = 0x050;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const REG_CONFIG_GENERATION: u64 = 0x0fc;
const REG_CONFIG: u64 = 0x100;

/// A transport's saved state: the registers the driver programmed and each queue's
/// configuration and ring positions.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MmioState {
    pub queue_select: u32,
    pub device_features_select: u32,
    pub driver_features_select: u32,
    pub acked_features: u64,
    pub status: u32,
    pub config_generation: u32,
    pub interrupt_status: u32,
    pub active: bool,
    pub queues: Vec<QueueState>,
}

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("saved queue {index} is not valid")]
    Queue {
        index: usize,
        #[source]
        source: virtio_queue::Error,
    },
    #[error("the saved transport has {have} queues, the device {want}")]
    QueueCount { have: usize, want: usize },
    #[error("cannot set up the transport")]
    Io(#[source] std::io::Error),
}

pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestRam,
    interrupt: Arc<VirtioInterrupt>,
    kicks: Vec<EventFd>,
    queues: Vec<Queue>,
    queue_select: u32,
    device_features_select: u32,
    driver_features_select: u32,
    acked_features: u64,
    status: u32,
    config_generation: u32,
    active: bool,
    /// The queues of a running device that [`MmioTransport::save`] stopped: it stays
    /// stopped until [`MmioTransport::wake`], so nothing it does after the save (a frame
    /// received into guest memory, a disk request the guest queued) happens here as well
    /// as where the saved state is restored.
    parked: Option<Vec<Queue>>,
}

fn new_queues(device: &dyn VirtioDevice) -> Vec<Queue> {
    device
        .queue_max_sizes()
        .iter()
        .map(|&max| Queue::new(max).expect("device queue sizes are powers of two"))
        .collect()
}

impl MmioTransport {
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestRam,
        interrupt: Arc<VirtioInterrupt>,
    ) -> std::io::Result<Self> {
        let queues = new_queues(device.as_ref());
        let kicks = queues
            .iter()
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(Self {
            device,
            mem,
            interrupt,
            kicks,
            queues,
            queue_select: 0,
            device_features_select: 0,
            driver_features_select: 0,
            acked_features: 0,
            status: 0,
            config_generation: 0,
            active: false,
            parked: None,
        })
    }

    /// The notification eventfd of each queue, to register as KVM ioeventfds.
    pub fn kicks(&self) -> &[EventFd] {
        &self.kicks
    }

    pub fn interrupt(&self) -> &Arc<VirtioInterrupt> {
        &self.interrupt
    }

    pub fn is_active(&self) -> bool {
        self.active
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        if self.active {
            // Queue registers are frozen once the device runs.
            return None;
        }
        self.queues.get_mut(self.queue_select as usize)
    }

    fn reset(&mut self) {
        self.parked = None;
        if self.active {
            self.device.reset();
            self.active = false;
        }
        self.queues = new_queues(self.device.as_ref());
        self.queue_select = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.acked_features = 0;
        self.status = 0;
        self.interrupt.ack(u32::MAX);
    }

    fn features_acceptable(&self) -> bool {
        let offered = self.device.avail_features();
        self.acked_features & !offered == 0 && self.acked_features & VIRTIO_F_VERSION_1 != 0
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let mut value = value;
        let newly = value & !self.status;
        if newly & DEVICE_STATUS_FEATURES_OK != 0 && !self.features_acceptable() {
            tracing::debug!(
                acked = self.acked_features,
                "virtio driver acked features we did not offer"
            );
            value &= !DEVICE_STATUS_FEATURES_OK;
        }
        self.status = value;
        if newly & DEVICE_STATUS_DRIVER_OK != 0
            && value & DEVICE_STATUS_FEATURES_OK != 0
            && !self.active
        {
            self.activate();
        }
    }

    fn activate(&mut self) {
        for (index, q) in self.queues.iter().enumerate() {
            if q.ready() && !q.is_valid(&self.mem) {
                return self.needs_reset(ActivateError::BadQueue { index });
            }
        }
        let mut queues = std::mem::take(&mut self.queues);
        for q in queues.iter_mut() {
            q.set_event_idx(self.acked_features & VIRTIO_F_RING_EVENT_IDX != 0);
        }
        self.start_device(queues);
    }

    /// Hands the device its queues and starts it.
    fn start_device(&mut self, queues: Vec<Queue>) {
        let kicks = match self
            .kicks
            .iter()
            .map(EventFd::try_clone)
            .collect::<std::io::Result<Vec<_>>>()
        {
            Ok(k) => k,
            Err(e) => return self.needs_reset(ActivateError::Worker(e)),
        };
        let ctx = ActivateContext {
            mem: self.mem.clone(),
            queues,
            kicks,
            interrupt: self.interrupt.clone(),
            acked_features: self.acked_features,
        };
        match self.device.activate(ctx) {
            Ok(()) => self.active = true,
            Err(e) => {
                self.queues = new_queues(self.device.as_ref());
                self.needs_reset(e);
            }
        }
    }

    /// Saves the transport. A running device is stopped to read its queues, and stays
    /// stopped until [`MmioTransport::wake`] (the VM resumes here): the state saved is
    /// the last thing it did on this host unless the VM runs on here.
    pub fn save(&mut self) -> MmioState {
        let queues = if self.active {
            let device = &mut self.device;
            let parked = self.parked.get_or_insert_with(|| device.quiesce());
            parked.iter().map(Queue::state).collect()
        } else {
            self.queues.iter().map(Queue::state).collect()
        };
        MmioState {
            queue_select: self.queue_select,
            device_features_select: self.device_features_select,
            driver_features_select: self.driver_features_select,
            acked_features: self.acked_features,
            status: self.status,
            config_generation: self.config_generation,
            interrupt_status: self.interrupt.status(),
            active: self.active,
            queues,
        }
    }

    /// Starts a device that [`MmioTransport::save`] stopped again, with its queues as they
    /// were; nothing for a device that was not stopped that way.
    pub fn wake(&mut self) {
        if let Some(queues) = self.parked.take() {
            self.start_device(queues);
        }
    }

    /// A transport in a saved state; a device that was running is started again.
    pub fn restore(
        device: Box<dyn VirtioDevice>,
        mem: GuestRam,
        interrupt: Arc<VirtioInterrupt>,
        state: &MmioState,
    ) -> Result<Self, RestoreError> {
        let mut t = Self::new(device, mem, interrupt).map_err(RestoreError::Io)?;
        if state.queues.len() != t.queues.len() {
            return Err(RestoreError::QueueCount {
                have: state.queues.len(),
                want: t.queues.len(),
            });
        }
        let queues = state
            .queues
            .iter()
            .enumerate()
            .map(|(index, q)| {
                Queue::try_from(*q).map_err(|source| RestoreError::Queue { index, source })
            })
            .collect::<Result<Vec<_>, _>>()?;
        t.queue_select = state.queue_select;
        t.device_features_select = state.device_features_select;
        t.driver_features_select = state.driver_features_select;
        t.acked_features = state.acked_features;
        t.status = state.status;
        t.config_generation = state.config_generation;
        t.interrupt.restore_status(state.interrupt_status);
        if state.active {
            t.start_device(queues);
        } else {
            t.queues = queues;
        }
        Ok(t)
    }

    fn needs_reset(&mut self, e: ActivateError) {
        tracing::warn!(error = %e, "virtio device cannot start; it needs a reset");
        self.status |= DEVICE_STATUS_NEEDS_RESET;
        self.interrupt.signal(INT_CONFIG);
    }

    fn read_reg(&mut self, offset: u64) -> u32 {
        match offset {
            REG_MAGIC => MAGIC,
            REG_VERSION => VERSION,
            REG_DEVICE_ID => self.device.device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => match self.device_features_select {
                0 => self.device.avail_features() as u32,
                1 => (self.device.avail_features() >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => self
                .device
                .queue_max_sizes()
                .get(self.queue_select as usize)
                .map_or(0, |&m| u32::from(m)),
            REG_QUEUE_READY => {
                if self.active {
                    u32::from((self.queue_select as usize) < self.device.queue_max_sizes().len())
                } else {
                    self.queues
                        .get(self.queue_select as usize)
                        .map_or(0, |q| u32::from(q.ready()))
                }
            }
            REG_INTERRUPT_STATUS => self.interrupt.status(),
            REG_STATUS => self.status,
            REG_CONFIG_GENERATION => self.config_generation,
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_select = v,
            REG_DRIVER_FEATURES_SEL => self.driver_features_select = v,
            REG_DRIVER_FEATURES => {
                let negotiable = self.status & DEVICE_STATUS_DRIVER != 0
                    && self.status & DEVICE_STATUS_FEATURES_OK == 0;
                if negotiable {
                    match self.driver_features_select {
                        0 => {
                            self.acked_features =
                                (self.acked_features & !0xffff_ffff) | u64::from(v)
                        }
                        1 => {
                            self.acked_features =
                                (self.acked_features & 0xffff_ffff) | (u64::from(v) << 32)
                        }
                        _ => {}
                    }
                }
            }
            REG_QUEUE_SEL => self.queue_select = v,
            REG_QUEUE_NUM => {
                if let Some(q) = self.selected_queue() {
                    q.set_size(v as u16);
                }
            }
            REG_QUEUE_READY => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(v == 1);
                }
            }
            REG_QUEUE_NOTIFY => {
                // Normally caught by the ioeventfd in KVM; this is the path without one.
                if let Some(k) = self.kicks.get(v as usize) {
                    let _ = k.write(1);
                }
            }
            REG_INTERRUPT_ACK => self.interrupt.ack(v),
            REG_STATUS => self.set_status(v),
            REG_QUEUE_DESC_LOW => {
                if let Some(q) = self.selected_queue() {
                    q.set_desc_table_address(Some(v), None);
                }
            }
            REG_QUEUE_DESC_HIGH => {
                if let Some(q) = self.selected_queue() {
                    q.set_desc_table_address(None, Some(v));
                }
            }
            REG_QUEUE_DRIVER_LOW => {
                if let Some(q) = self.selected_queue() {
                    q.set_avail_ring_address(Some(v), None);
                }
            }
            REG_QUEUE_DRIVER_HIGH => {
                if let Some(q) = self.selected_queue() {
                    q.set_avail_ring_address(None, Some(v));
                }
            }
            REG_QUEUE_DEVICE_LOW => {
                if let Some(q) = self.selected_queue() {
                    q.set_used_ring_address(Some(v), None);
                }
            }
            REG_QUEUE_DEVICE_HIGH => {
                if let Some(q) = self.selected_queue() {
                    q.set_used_ring_address(None, Some(v));
                }
            }
            _ => tracing::trace!(
                offset,
                value = v,
                "write to a read-only virtio-mmio register"
            ),
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= REG_CONFIG {
            self.device.read_config(offset - REG_CONFIG, data);
        } else if data.len() == 4 && offset.is_multiple_of(4) {
            data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
        } else {
            data.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= REG_CONFIG {
            self.device.write_config(offset - REG_CONFIG, data);
            self.config_generation = self.config_generation.wrapping_add(1);
        } else if data.len() == 4 && offset.is_multiple_of(4) {
            self.write_reg(offset, u32::from_le_bytes(data.try_into().unwrap()));
        }
    }
}

impl Drop for MmioTransport {
    fn drop(&mut self) {
        if self.active {
            self.device.reset();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use vm_memory::{GuestAddress, GuestMemoryMmap};

    #[derive(Default)]
    struct Probe {
        activated: Option<(u64, Vec<u16>)>,
        activations: usize,
        quiesces: usize,
        resets: usize,
    }

    struct Fake(Arc<Mutex<Probe>>);

    impl VirtioDevice for Fake {
        fn device_type(&self) -> u32 {
            VIRTIO_ID_BLOCK
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16]
        }
        fn avail_features(&self) -> u64 {
            VIRTIO_F_VERSION_1 | 0b101
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8 + 1);
        }
        fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
            self.0.lock().unwrap().activations += 1;
            self.0.lock().unwrap().activated = Some((
                ctx.acked_features,
                ctx.queues.iter().map(|q| q.size()).collect(),
            ));
            Ok(())
        }
        fn reset(&mut self) {
            self.0.lock().unwrap().resets += 1;
        }
        fn quiesce(&mut self) -> Vec<Queue> {
            self.0.lock().unwrap().quiesces += 1;
            let sizes = self
                .0
                .lock()
                .unwrap()
                .activated
                .clone()
                .map(|a| a.1)
                .unwrap_or_default();
            sizes
                .iter()
                .map(|&s| {
                    let mut q = Queue::new(16).unwrap();
                    q.set_size(s);
                    q.set_next_avail(3);
                    q
                })
                .collect()
        }
    }

    fn transport() -> (MmioTransport, Arc<Mutex<Probe>>) {
        let probe = Arc::new(Mutex::new(Probe::default()));
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let irq = Arc::new(VirtioInterrupt::new(IrqLine::new(5).unwrap()));
        (
            MmioTransport::new(Box::new(Fake(probe.clone())), mem, irq).unwrap(),
            probe,
        )
    }

    fn rd(t: &mut MmioTransport, off: u64) -> u32 {
        let mut d = [0u8; 4];
        t.read(off, &mut d);
        u32::from_le_bytes(d)
    }

    fn wr(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    fn negotiate(t: &mut MmioTransport, low: u32, high: u32) {
        wr(
            t,
            REG_STATUS,
            DEVICE_STATUS_ACKNOWLEDGE | DEVICE_STATUS_DRIVER,
        );
        wr(t, REG_DRIVER_FEATURES_SEL, 0);
        wr(t, REG_DRIVER_FEATURES, low);
        wr(t, REG_DRIVER_FEATURES_SEL, 1);
        wr(t, REG_DRIVER_FEATURES, high);
        wr(
            t,
            REG_STATUS,
            DEVICE_STATUS_ACKNOWLEDGE | DEVICE_STATUS_DRIVER | DEVICE_STATUS_FEATURES_OK,
        );
    }

    fn setup_queue(t: &mut MmioTransport) {
        wr(t, REG_QUEUE_SEL, 0);
        wr(t, REG_QUEUE_NUM, 8);
        wr(t, REG_QUEUE_DESC_LOW, 0x1000);
        wr(t, REG_QUEUE_DRIVER_LOW, 0x2000);
        wr(t, REG_QUEUE_DEVICE_LOW, 0x3000);
        wr(t, REG_QUEUE_READY, 1);
    }

    #[test]
    fn identifies_itself_and_offers_features_in_halves() {
        let (mut t, _) = transport();
        assert_eq!(rd(&mut t, REG_MAGIC), MAGIC);
        assert_eq!(rd(&mut t, REG_VERSION), 2);
        assert_eq!(rd(&mut t, REG_DEVICE_ID), VIRTIO_ID_BLOCK);
        assert_eq!(rd(&mut t, REG_DEVICE_FEATURES), 0b101);
        wr(&mut t, REG_DEVICE_FEATURES_SEL, 1);
        assert_eq!(rd(&mut t, REG_DEVICE_FEATURES), 1);
        assert_eq!(rd(&mut t, REG_QUEUE_NUM_MAX), 16);
        wr(&mut t, REG_QUEUE_SEL, 1);
        assert_eq!(rd(&mut t, REG_QUEUE_NUM_MAX), 0);
        let mut cfg = [0u8; 2];
        t.read(REG_CONFIG + 4, &mut cfg);
        assert_eq!(cfg, [5, 5]);
    }

    #[test]
    fn full_handshake_activates_the_device_with_the_acked_features() {
        let (mut t, probe) = transport();
        negotiate(&mut t, 0b100, 1);
        assert_ne!(rd(&mut t, REG_STATUS) & DEVICE_STATUS_FEATURES_OK, 0);
        setup_queue(&mut t);
        wr(&mut t, REG_STATUS, 0xf);
        assert!(t.is_active());
        assert_eq!(
            probe.lock().unwrap().activated,
            Some((VIRTIO_F_VERSION_1 | 0b100, vec![8]))
        );
        // Queue registers are frozen while running; reset unfreezes and tells the device.
        wr(&mut t, REG_QUEUE_NUM, 4);
        wr(&mut t, REG_STATUS, 0);
        assert!(!t.is_active());
        assert_eq!(probe.lock().unwrap().resets, 1);
        assert_eq!(rd(&mut t, REG_STATUS), 0);
        assert_eq!(rd(&mut t, REG_QUEUE_READY), 0);
    }

    #[test]
    fn a_saved_running_transport_restores_running_with_its_ring_positions() {
        let (mut t, probe) = transport();
        negotiate(&mut t, 0b100, 1);
        setup_queue(&mut t);
        wr(&mut t, REG_STATUS, 0xf);
        let state = t.save();
        assert!(state.active);
        assert_eq!(
            state.queues[0].next_avail, 3,
            "the device's queue, not a fresh one"
        );
        assert_eq!(state.acked_features, VIRTIO_F_VERSION_1 | 0b100);
        let probe2 = Arc::new(Mutex::new(Probe::default()));
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let irq = Arc::new(VirtioInterrupt::new(IrqLine::new(5).unwrap()));
        let mut r =
            MmioTransport::restore(Box::new(Fake(probe2.clone())), mem, irq, &state).unwrap();
        assert!(r.is_active());
        assert_eq!(rd(&mut r, REG_STATUS), 0xf);
        assert_eq!(
            probe2.lock().unwrap().activated,
            Some((VIRTIO_F_VERSION_1 | 0b100, vec![8]))
        );
        // The source stays stopped after the save (a second save reads the same queues)
        // until the VM resumes here.
        assert_eq!(t.save().queues, state.queues);
        let counts = |p: &Mutex<Probe>| {
            let p = p.lock().unwrap();
            (p.activations, p.quiesces)
        };
        assert_eq!(counts(&probe), (1, 1));
        t.wake();
        assert_eq!(probe.lock().unwrap().activations, 2);
        assert_eq!(probe.lock().unwrap().activated.as_ref().unwrap().1, vec![8]);
        t.wake();
        assert_eq!(probe.lock().unwrap().activations, 2, "woken once");
    }

    #[test]
    fn features_we_did_not_offer_or_a_legacy_driver_are_refused() {
        let (mut t, probe) = transport();
        negotiate(&mut t, 0b010, 1);
        assert_eq!(rd(&mut t, REG_STATUS) & DEVICE_STATUS_FEATURES_OK, 0);
        wr(&mut t, REG_STATUS, 0);
        negotiate(&mut t, 0b001, 0);
        assert_eq!(rd(&mut t, REG_STATUS) & DEVICE_STATUS_FEATURES_OK, 0);
        setup_queue(&mut t);
        wr(&mut t, REG_STATUS, 0x7);
        assert!(!t.is_active());
        assert!(probe.lock().unwrap().activated.is_none());
    }

    #[test]
    fn a_queue_outside_guest_memory_needs_a_reset_instead_of_activating() {
        let (mut t, probe) = transport();
        negotiate(&mut t, 0, 1);
        setup_queue(&mut t);
        wr(&mut t, REG_QUEUE_SEL, 0);
        wr(&mut t, REG_QUEUE_READY, 0);
        wr(&mut t, REG_QUEUE_DESC_HIGH, 0x10);
        wr(&mut t, REG_QUEUE_READY, 1);
        wr(&mut t, REG_STATUS, 0xf);
        assert!(!t.is_active());
        assert_ne!(rd(&mut t, REG_STATUS) & DEVICE_STATUS_NEEDS_RESET, 0);
        assert_ne!(rd(&mut t, REG_INTERRUPT_STATUS) & INT_CONFIG, 0);
        wr(&mut t, REG_INTERRUPT_ACK, INT_CONFIG);
        assert_eq!(rd(&mut t, REG_INTERRUPT_STATUS), 0);
        assert!(probe.lock().unwrap().activated.is_none());
    }

    #[test]
    fn notify_without_an_ioeventfd_still_kicks_the_queue() {
        let (mut t, _) = transport();
        wr(&mut t, REG_QUEUE_NOTIFY, 0);
        assert_eq!(t.kicks()[0].read().unwrap(), 1);
        // An out-of-range queue index is ignored.
        wr(&mut t, REG_QUEUE_NOTIFY, 7);
    }
}
