//! The virtio-net device: what it offers the driver, its config space (MAC, link status,
//! MTU), and activation: the tap is told which offloads the guest takes, and a worker
//! thread ([`super::event_handler`]) serves the queue pair.

use std::thread::JoinHandle;

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use super::Nic;
use super::event_handler::Handler;
use crate::devices::virtio::{
    ActivateContext, ActivateError, VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_RING_INDIRECT_DESC,
    VIRTIO_F_VERSION_1, VIRTIO_ID_NET, VirtioDevice,
};

pub const VIRTIO_NET_F_CSUM: u64 = 1 << 0;
pub const VIRTIO_NET_F_GUEST_CSUM: u64 = 1 << 1;
pub const VIRTIO_NET_F_MTU: u64 = 1 << 3;
pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
pub const VIRTIO_NET_F_GUEST_TSO4: u64 = 1 << 7;
pub const VIRTIO_NET_F_GUEST_TSO6: u64 = 1 << 8;
pub const VIRTIO_NET_F_HOST_TSO4: u64 = 1 << 11;
pub const VIRTIO_NET_F_HOST_TSO6: u64 = 1 << 12;
pub const VIRTIO_NET_F_STATUS: u64 = 1 << 16;
pub const VIRTIO_NET_S_LINK_UP: u16 = 1;

pub const QUEUE_SIZE: u16 = 256;
pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
/// `struct virtio_net_config` up to `mtu`: mac[6], status, max_virtqueue_pairs, mtu.
const CONFIG_LEN: usize = 12;

/// Everything this device offers.
pub const FEATURES: u64 = VIRTIO_F_VERSION_1
    | VIRTIO_F_RING_EVENT_IDX
    | VIRTIO_F_RING_INDIRECT_DESC
    | VIRTIO_NET_F_CSUM
    | VIRTIO_NET_F_GUEST_CSUM
    | VIRTIO_NET_F_MTU
    | VIRTIO_NET_F_MAC
    | VIRTIO_NET_F_GUEST_TSO4
    | VIRTIO_NET_F_GUEST_TSO6
    | VIRTIO_NET_F_HOST_TSO4
    | VIRTIO_NET_F_HOST_TSO6
    | VIRTIO_NET_F_STATUS;

/// The offloads (`TUN_F_*`) the tap may leave to the guest: those it acked. Without a
/// checksum offload the kernel completes checksums and segments before handing frames
/// over.
pub fn tap_offload(acked: u64) -> u32 {
    if acked & VIRTIO_NET_F_GUEST_CSUM == 0 {
        return 0;
    }
    let mut f = libc::TUN_F_CSUM;
    if acked & VIRTIO_NET_F_GUEST_TSO4 != 0 {
        f |= libc::TUN_F_TSO4;
    }
    if acked & VIRTIO_NET_F_GUEST_TSO6 != 0 {
        f |= libc::TUN_F_TSO6;
    }
    f
}

struct Worker {
    thread: JoinHandle<Vec<Queue>>,
    stop: EventFd,
}

pub struct Net {
    nic: Nic,
    config: [u8; CONFIG_LEN],
    queue_sizes: [u16; 2],
    worker: Option<Worker>,
}

impl Net {
    pub fn new(nic: Nic) -> Self {
        let mut config = [0u8; CONFIG_LEN];
        config[0..6].copy_from_slice(&nic.mac.0);
        config[6..8].copy_from_slice(&VIRTIO_NET_S_LINK_UP.to_le_bytes());
        config[8..10].copy_from_slice(&1u16.to_le_bytes());
        config[10..12].copy_from_slice(&nic.mtu.to_le_bytes());
        Self {
            nic,
            config,
            queue_sizes: [QUEUE_SIZE; 2],
            worker: None,
        }
    }

    pub fn nic(&self) -> &Nic {
        &self.nic
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        FEATURES
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let start = offset as usize;
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.config.get(start + i).copied().unwrap_or(0);
        }
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        self.reset();
        let [rx, tx]: [Queue; 2] = ctx
            .queues
            .try_into()
            .map_err(|_| ActivateError::BadQueue { index: TX_QUEUE })?;
        let [rx_kick, tx_kick]: [EventFd; 2] = ctx
            .kicks
            .try_into()
            .map_err(|_| ActivateError::BadQueue { index: TX_QUEUE })?;
        self.nic
            .tap
            .set_offload(tap_offload(ctx.acked_features))
            .map_err(|e| ActivateError::Worker(std::io::Error::other(e)))?;
        let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(ActivateError::Worker)?;
        let worker_stop = stop.try_clone().map_err(ActivateError::Worker)?;
        let handler = Handler::new(
            ctx.mem,
            [rx, tx],
            ctx.interrupt,
            self.nic.clone(),
            ctx.acked_features,
        )
        .map_err(ActivateError::Worker)?;
        let thread = std::thread::Builder::new()
            .name(format!("net-{}", self.nic.id))
            .spawn(move || handler.run(rx_kick, tx_kick, worker_stop))
            .map_err(ActivateError::Worker)?;
        self.worker = Some(Worker { thread, stop });
        Ok(())
    }

    fn reset(&mut self) {
        self.quiesce();
    }

    fn quiesce(&mut self) -> Vec<Queue> {
        let Some(w) = self.worker.take() else {
            return Vec::new();
        };
        let _ = w.stop.write(1);
        match w.thread.join() {
            Ok(queues) => queues,
            Err(_) => {
                tracing::error!(nic = %self.nic.id, "virtio-net worker panicked");
                Vec::new()
            }
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.reset();
    }
}
