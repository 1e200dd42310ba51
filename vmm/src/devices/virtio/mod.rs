//! virtio devices over the virtio-mmio transport (version 2, "modern").
//!
//! `mmio` holds the transport: the register window a driver programs, the queues it sets up,
//! and the device status state machine. Each device (`block`, `rng`, ...) implements
//! `VirtioDevice`: its features, its config space, and what to do with a queue once the driver
//! has notified it. Queue logic works on guest memory and an I/O backend trait and does no
//! event-loop or KVM work, so it is tested with plain memory. The event loop (runner) only
//! reads the queue eventfds KVM signals (ioeventfd) and calls `process_queue`.
//!
//! Everything a guest writes (register values, descriptor addresses and lengths) is checked:
//! bad chains are answered with an error status or dropped, and counted; nothing panics.

pub mod balloon;
pub mod block;
pub mod mmio;
pub mod net;
pub mod rng;
#[cfg(test)]
pub mod testing;
pub mod vsock;

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::vstate::memory::GuestMemoryMmap;
use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

/// Device IDs (virtio 1.2, 5).
pub const TYPE_NET: u32 = 1;
pub const TYPE_BLOCK: u32 = 2;
pub const TYPE_RNG: u32 = 4;
pub const TYPE_VSOCK: u32 = 19;

/// The device conforms to virtio 1.x (required by the modern transport).
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// Interrupt status bits.
pub const INT_USED_RING: u32 = 1;
pub const INT_CONFIG: u32 = 2;

/// A device's interrupt: the InterruptStatus register and the irqfd KVM injects from.
#[derive(Debug)]
pub struct IrqLine {
    status: AtomicU32,
    evt: EventFd,
    /// Interrupt injections that failed (eventfd write errors).
    pub errors: AtomicU64,
}

impl IrqLine {
    pub fn new(evt: EventFd) -> IrqLine {
        IrqLine { status: AtomicU32::new(0), evt, errors: AtomicU64::new(0) }
    }

    /// Tells the driver a used ring has new entries.
    pub fn signal_used(&self) {
        self.signal(INT_USED_RING);
    }

    /// Tells the driver the configuration (or the device status) changed.
    pub fn signal_config(&self) {
        self.signal(INT_CONFIG);
    }

    fn signal(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
        if self.evt.write(1).is_err() {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// Sets status bits without injecting (snapshot restore).
    pub fn set(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
    }

    /// Injects the interrupt again if any status bit is set (after a snapshot restore).
    pub fn resignal(&self) {
        if self.status() != 0 && self.evt.write(1).is_err() {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    pub fn reset(&self) {
        self.status.store(0, Ordering::SeqCst);
    }
}

/// Why a device could not be activated.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("queue {0} is not set up correctly")]
    BadQueue(usize),
    #[error("the driver did not accept VIRTIO_F_VERSION_1")]
    NotModern,
    #[error("{0}")]
    Device(String),
}

/// What a multi-queue device holds once the driver has activated it.
#[derive(Debug)]
pub struct ActiveQueues {
    pub mem: GuestMemoryMmap,
    pub queues: Vec<Queue>,
    pub irq: std::sync::Arc<IrqLine>,
}

/// Counters every device keeps; guest mistakes show up here rather than in logs.
#[derive(Debug, Default)]
pub struct DeviceCounters {
    /// Descriptor chains processed.
    pub requests: AtomicU64,
    /// Payload bytes moved between guest and backend.
    pub bytes: AtomicU64,
    /// Chains that were malformed (bad addresses, wrong layout) or failed in the backend.
    pub errors: AtomicU64,
    /// Queue notifications before activation or for queues that do not exist.
    pub spurious: AtomicU64,
    /// Times the rate limiter held requests back.
    pub throttled: AtomicU64,
}

/// A virtio device behind the transport.
pub trait VirtioDevice: Send {
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the count is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Features offered (VIRTIO_F_VERSION_1 included).
    fn features(&self) -> u64;
    /// Reads the device config space at `offset`; bytes beyond it read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes to config space; ignored unless the device has writable fields.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// The driver set DRIVER_OK: the device takes its queues and starts working.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        irq: std::sync::Arc<IrqLine>,
        acked_features: u64,
    ) -> Result<(), ActivateError>;
    /// Queue `index` was notified: process what the driver made available.
    fn process_queue(&mut self, index: usize);
    /// The driver reset the device: drop the queues and whatever the device holds for the
    /// guest (vsock closes its streams).
    fn reset(&mut self);
    fn counters(&self) -> &DeviceCounters;
    /// The queues the device works on once active (empty before activation), for snapshots.
    fn active_queues(&self) -> &[Queue] {
        &[]
    }
    /// A host descriptor the event loop watches for the device (a tap), edge-triggered.
    fn backend_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }
    /// `backend_fd` became readable.
    fn process_backend(&mut self) {}
    /// If the device's rate limiter is holding requests back, how long until it has room
    /// (the event loop then calls `process_queue` again).
    fn throttled_for(&self) -> Option<std::time::Duration> {
        None
    }
    /// Applies a change the VMM's operator asked for while the guest runs (`PATCH /drives`,
    /// `PATCH /network-interfaces`); returns whether the config space changed (the transport
    /// then tells the driver). A device that takes no such change refuses it.
    fn update(&mut self, update: DeviceUpdate) -> Result<bool, String> {
        let _ = update;
        Err("this device takes no updates".into())
    }
    /// The device stopped before its queues were empty so as not to hold the event loop
    /// (virtio-blk moves a bounded amount per round): the loop serves its other events, then
    /// calls `process_queue` again.
    fn has_more_work(&self) -> bool {
        false
    }
    /// How long until the device wants `process_queue` called again for work of its own
    /// (the balloon's statistics requests); the event loop arms the device's timer.
    fn wakeup_in(&self) -> Option<std::time::Duration> {
        None
    }
    /// The balloon's state, for the API (None for every other device).
    fn balloon_status(&self) -> Option<balloon::BalloonStatus> {
        None
    }
    /// The device was activated again from a snapshot (after `activate`).
    fn restored(&mut self) {}
}

/// A rate limiter change: `None` keeps the current limiter, `Some(None)` removes it,
/// `Some(Some(c))` replaces it with a fresh one of configuration `c`.
pub type LimiterUpdate = Option<Option<crate::devices::rate_limiter::RateLimitConfig>>;

/// A change to a running device.
pub enum DeviceUpdate {
    /// virtio-blk: another backing file (the guest sees the new capacity) and/or limiter.
    Block { disk: Option<Box<dyn block::handler::DiskBackend>>, limiter: LimiterUpdate },
    /// virtio-net: the receive and/or transmit limiter.
    Net { rx: LimiterUpdate, tx: LimiterUpdate },
    /// virtio-balloon: a new target size and/or statistics interval.
    Balloon { amount_mib: Option<u32>, stats_polling_interval_s: Option<u16> },
}

impl std::fmt::Debug for DeviceUpdate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceUpdate::Block { disk, limiter } => f
                .debug_struct("Block")
                .field("disk_len", &disk.as_ref().map(|d| d.len()))
                .field("limiter", limiter)
                .finish(),
            DeviceUpdate::Net { rx, tx } => f.debug_struct("Net").field("rx", rx).field("tx", tx).finish(),
            DeviceUpdate::Balloon { amount_mib, stats_polling_interval_s } => f
                .debug_struct("Balloon")
                .field("amount_mib", amount_mib)
                .field("stats_polling_interval_s", stats_polling_interval_s)
                .finish(),
        }
    }
}

/// Reads `data.len()` bytes of a config struct held as bytes; out of range reads give zeros.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else { return };
    if let Some(src) = config.get(start..) {
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }
}
