//! The virtio-mmio transport, version 2 (virtio 1.2, 4.2.2): a 4 KiB register window per
//! device. The driver reads the device's identity and features, acknowledges features, sets up
//! each queue's size and ring addresses, and sets DRIVER_OK; the transport then hands the
//! queues to the device. Queue notifications normally bypass this window (KVM turns a write to
//! QueueNotify into an eventfd signal); a write that does reach it is passed on the same way.
//!
//! Register accesses run on the vCPU thread that trapped them, but what they set off in the
//! device (activation, reset, queue work) is deferred to the VMM thread: the transport records
//! it and signals its wake eventfd, and the event loop calls `run_deferred` (every other entry
//! point from the VMM thread runs it first, so the device never sees operations out of order).
//! A vCPU thread's seccomp filter allows only what running a vCPU needs, while a device's
//! activation and reset open, close and poll host descriptors (taps, vsock streams). The
//! driver sees its register writes take effect at once; a device that then fails to activate
//! sets NEEDS_RESET and raises a configuration interrupt.
//!
//! Register accesses must be 32-bit and aligned, except in the config space; anything else
//! reads as zero and is ignored, as are writes to read-only registers.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::vstate::memory::GuestMemoryMmap;
use virtio_queue::{Queue, QueueT};

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use super::{IrqLine, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::devices::bus::BusDevice;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR: u32 = 0x5348_4f4c; // "SHOL"

pub const REG_QUEUE_NOTIFY: u64 = 0x50;
const CONFIG_START: u64 = 0x100;

/// Device status bits.
pub const STATUS_ACKNOWLEDGE: u32 = 1;
pub const STATUS_DRIVER: u32 = 2;
pub const STATUS_DRIVER_OK: u32 = 4;
pub const STATUS_FEATURES_OK: u32 = 8;
pub const STATUS_NEEDS_RESET: u32 = 64;
pub const STATUS_FAILED: u32 = 128;

/// A queue as a snapshot keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSaved {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub event_idx: bool,
    pub next_avail: u16,
    pub next_used: u16,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

impl QueueSaved {
    pub(crate) fn of(q: &Queue) -> QueueSaved {
        let s = q.state();
        QueueSaved {
            max_size: s.max_size,
            size: s.size,
            ready: s.ready,
            event_idx: s.event_idx_enabled,
            next_avail: s.next_avail,
            next_used: s.next_used,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
        }
    }

    pub(crate) fn to_queue(&self) -> Result<Queue, String> {
        let state = virtio_queue::QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: self.event_idx,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        };
        Queue::try_from(state).map_err(|e| format!("invalid queue in snapshot: {e:?}"))
    }
}

/// The transport's registers and queues, as a snapshot keeps them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportSaved {
    pub queue_select: u32,
    pub device_features_select: u32,
    pub driver_features_select: u32,
    pub acked_features: u64,
    pub status: u32,
    pub config_generation: u32,
    pub activated: bool,
    pub interrupt_status: u32,
    pub queues: Vec<QueueSaved>,
}

/// Device side effects the driver's register writes asked for, not yet done. At most one reset
/// followed by at most one activation: a reset cancels an activation the device has not seen.
#[derive(Default)]
struct Deferred {
    /// The driver reset the device after the device was activated.
    reset: bool,
    /// The driver set DRIVER_OK: the queues and features to activate the device with.
    activate: Option<(Vec<Queue>, u64)>,
    /// Queues notified through the register window, a bit each.
    notify: u64,
}

/// One device behind its register window.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    irq: Arc<IrqLine>,
    queues: Vec<Queue>,
    queue_select: u32,
    device_features_select: u32,
    driver_features_select: u32,
    acked_features: u64,
    status: u32,
    config_generation: u32,
    /// The driver activated the device (the device itself may not have been told yet).
    activated: bool,
    deferred: Deferred,
    /// Signalled when something is deferred; the event loop then calls `run_deferred`.
    wake: Option<EventFd>,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport").field("type", &self.device.device_type()).field("status", &self.status).finish()
    }
}

impl MmioTransport {
    pub fn new(device: Box<dyn VirtioDevice>, mem: GuestMemoryMmap, irq: Arc<IrqLine>) -> MmioTransport {
        let queues = Self::fresh_queues(device.as_ref());
        MmioTransport {
            device,
            mem,
            irq,
            queues,
            queue_select: 0,
            device_features_select: 0,
            driver_features_select: 0,
            acked_features: 0,
            status: 0,
            config_generation: 0,
            activated: false,
            deferred: Deferred::default(),
            wake: None,
        }
    }

    /// Signals `wake` whenever device work is deferred (without one, whoever drives the
    /// transport calls `run_deferred` itself, as the unit tests do).
    pub fn with_wake(mut self, wake: EventFd) -> MmioTransport {
        self.wake = Some(wake);
        self
    }

    fn defer(&mut self) {
        if let Some(wake) = &self.wake {
            if wake.write(1).is_err() {
                self.device.counters().errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Does what the driver's register writes asked of the device, in order: a reset, an
    /// activation, then the queues notified through the register window. Runs on the VMM
    /// thread.
    pub fn run_deferred(&mut self) {
        let Deferred { reset, activate, notify } = std::mem::take(&mut self.deferred);
        if reset {
            self.device.reset();
        }
        if let Some((queues, features)) = activate {
            if let Err(e) = self.device.activate(self.mem.clone(), queues, self.irq.clone(), features) {
                crate::guest_warn!(error = %e, device = self.device.device_type(), "virtio device activation failed");
                self.activated = false;
                self.status |= STATUS_NEEDS_RESET;
                self.irq.signal_config();
            }
        }
        (0..64).filter(|q| notify & (1 << q) != 0).for_each(|q| self.serve(q));
    }

    fn fresh_queues(device: &dyn VirtioDevice) -> Vec<Queue> {
        // Queue::new only fails for a zero or non-power-of-two size, which devices never offer.
        device.queue_max_sizes().iter().filter_map(|&max| Queue::new(max).ok()).collect()
    }

    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    /// Applies an operator's change to the running device (on the VMM thread). A changed
    /// config space gets a new generation and a config interrupt; every queue is served again
    /// afterwards (through the deferred work, so the event loop re-arms a limiter's timer),
    /// as requests held back by the old limiter may go now.
    pub fn update_device(&mut self, update: super::DeviceUpdate) -> Result<(), String> {
        self.run_deferred();
        if self.device.update(update)? {
            self.config_generation = self.config_generation.wrapping_add(1);
            if self.activated {
                self.irq.signal_config();
            }
        }
        if self.activated {
            let queues = self.device.queue_max_sizes().len().min(64);
            self.deferred.notify |= if queues == 64 { u64::MAX } else { (1u64 << queues) - 1 };
            self.defer();
        }
        Ok(())
    }

    /// The transport's state for a snapshot (the device must be quiet: vCPUs paused).
    pub fn save(&mut self) -> TransportSaved {
        self.run_deferred();
        let queues = if self.activated { self.device.active_queues() } else { &self.queues };
        TransportSaved {
            queue_select: self.queue_select,
            device_features_select: self.device_features_select,
            driver_features_select: self.driver_features_select,
            acked_features: self.acked_features,
            status: self.status,
            config_generation: self.config_generation,
            activated: self.activated,
            interrupt_status: self.irq.status(),
            queues: queues.iter().map(QueueSaved::of).collect(),
        }
    }

    /// Puts a fresh transport back in the saved state; an active device is activated again
    /// with its queues where they were. Every value is checked as if the guest had written it.
    pub fn restore(&mut self, saved: &TransportSaved) -> Result<(), String> {
        if saved.queues.len() != self.device.queue_max_sizes().len() {
            return Err(format!(
                "{} queues saved for a device with {}",
                saved.queues.len(),
                self.device.queue_max_sizes().len()
            ));
        }
        let mut queues = Vec::with_capacity(saved.queues.len());
        for (q, &max) in saved.queues.iter().zip(self.device.queue_max_sizes()) {
            if q.max_size != max {
                return Err(format!("queue of {} entries saved for one of {max}", q.max_size));
            }
            queues.push(q.to_queue()?);
        }
        if saved.acked_features & !self.device.features() != 0 {
            return Err("acknowledged features the device does not offer".into());
        }
        self.queue_select = saved.queue_select;
        self.device_features_select = saved.device_features_select;
        self.driver_features_select = saved.driver_features_select;
        self.acked_features = saved.acked_features;
        self.status = saved.status;
        self.config_generation = saved.config_generation;
        self.irq.reset();
        self.irq.set(saved.interrupt_status);
        if saved.activated {
            if queues.iter().any(|q| !q.is_valid(&self.mem)) {
                return Err("a saved queue lies outside guest memory".into());
            }
            self.device
                .activate(self.mem.clone(), queues, self.irq.clone(), self.acked_features)
                .map_err(|e| e.to_string())?;
            self.activated = true;
        } else {
            self.queues = queues;
        }
        Ok(())
    }

    pub fn status(&self) -> u32 {
        self.status
    }

    /// The device's backend descriptor became readable.
    pub fn backend_ready(&mut self) {
        self.run_deferred();
        self.device.process_backend();
    }

    /// Called when queue `index` is notified (ioeventfd or a QueueNotify write).
    /// After a restore, once the vCPUs exist: tells the device it was restored (vsock sends
    /// its reset event), serves what the guest made available just before the pause, and
    /// raises the interrupt again if the guest had not acknowledged it. KVM injects an irqfd
    /// interrupt asynchronously, so one signalled just before the pause may be in neither the
    /// saved IOAPIC nor the saved LAPIC; a second one is harmless (the driver reads a zero
    /// status and ignores it). Does nothing for a device the driver never activated.
    pub fn resume_after_restore(&mut self) {
        self.run_deferred();
        if !self.activated {
            return;
        }
        self.device.restored();
        (0..self.device.queue_max_sizes().len()).for_each(|q| self.notify(q));
        self.irq.resignal();
    }

    pub fn notify(&mut self, index: usize) {
        self.run_deferred();
        self.serve(index);
    }

    fn serve(&mut self, index: usize) {
        if self.activated && index < self.device.queue_max_sizes().len() {
            self.device.process_queue(index);
        } else {
            self.device.counters().spurious.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A QueueNotify write that reached the window (one KVM did not turn into an eventfd
    /// signal), on the vCPU thread.
    fn notify_from_guest(&mut self, index: usize) {
        if self.activated && index < self.device.queue_max_sizes().len() && index < 64 {
            self.deferred.notify |= 1 << index;
            self.defer();
        } else {
            self.device.counters().spurious.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        if self.activated || self.status & STATUS_FEATURES_OK == 0 {
            // Queues are set up between FEATURES_OK and DRIVER_OK only.
            return None;
        }
        self.queues.get_mut(self.queue_select as usize)
    }

    fn reset(&mut self) {
        if self.activated {
            // An activation the device has not seen yet is simply dropped.
            if self.deferred.activate.take().is_none() {
                self.deferred.reset = true;
            }
            self.deferred.notify = 0;
            self.defer();
        }
        self.activated = false;
        self.queues = Self::fresh_queues(self.device.as_ref());
        self.queue_select = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.acked_features = 0;
        self.status = 0;
        self.irq.reset();
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // Status bits only accumulate, in order (virtio 1.2, 3.1.1).
        let added = value & !self.status;
        if value & self.status != self.status {
            return;
        }
        if added & STATUS_FEATURES_OK != 0 && self.acked_features & VIRTIO_F_VERSION_1 == 0 {
            // Refuse FEATURES_OK: the driver reads it back and gives up.
            self.status = value & !STATUS_FEATURES_OK;
            return;
        }
        self.status = value;
        if added & STATUS_DRIVER_OK != 0 && self.status & STATUS_FEATURES_OK != 0 {
            self.activate();
        }
    }

    fn activate(&mut self) {
        for (i, q) in self.queues.iter().enumerate() {
            if !q.ready() || !q.is_valid(&self.mem) {
                crate::guest_warn!(
                    queue = i,
                    device = self.device.device_type(),
                    "virtio queue not valid at DRIVER_OK"
                );
                self.status |= STATUS_NEEDS_RESET;
                return;
            }
        }
        self.deferred.activate = Some((std::mem::take(&mut self.queues), self.acked_features));
        self.activated = true;
        self.defer();
    }

    fn read_reg(&mut self, offset: u64) -> u32 {
        let features = self.device.features();
        match offset {
            0x00 => MAGIC,
            0x04 => VERSION,
            0x08 => self.device.device_type(),
            0x0c => VENDOR,
            0x10 => match self.device_features_select {
                0 => features as u32,
                1 => (features >> 32) as u32,
                _ => 0,
            },
            0x34 => self.queues.get(self.queue_select as usize).map_or(0, |q| u32::from(q.max_size())),
            0x44 => self.queues.get(self.queue_select as usize).map_or(0, |q| u32::from(q.ready())),
            0x60 => self.irq.status(),
            0x70 => self.status,
            0xfc => self.config_generation,
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        match offset {
            0x14 => self.device_features_select = v,
            0x20 if self.status & STATUS_FEATURES_OK == 0 && self.status & STATUS_DRIVER != 0 => {
                let offered = self.device.features();
                match self.driver_features_select {
                    // Features the device does not offer are dropped.
                    0 => {
                        self.acked_features =
                            (self.acked_features & !0xffff_ffff) | (u64::from(v) & offered & 0xffff_ffff)
                    }
                    1 => self.acked_features = (self.acked_features & 0xffff_ffff) | ((u64::from(v) << 32) & offered),
                    _ => {}
                }
            }
            0x24 => self.driver_features_select = v,
            0x30 => self.queue_select = v,
            0x38 => {
                if let Some(q) = self.selected_queue() {
                    q.set_size(v.min(u32::from(u16::MAX)) as u16);
                }
            }
            0x44 => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(v == 1);
                }
            }
            REG_QUEUE_NOTIFY => self.notify_from_guest(v as usize),
            0x64 => self.irq.ack(v),
            0x70 => self.set_status(v),
            0x80 | 0x84 | 0x90 | 0x94 | 0xa0 | 0xa4 => {
                let (low, high) = if offset & 4 == 0 { (Some(v), None) } else { (None, Some(v)) };
                if let Some(q) = self.selected_queue() {
                    match offset & !4 {
                        0x80 => q.set_desc_table_address(low, high),
                        0x90 => q.set_avail_ring_address(low, high),
                        _ => q.set_used_ring_address(low, high),
                    }
                }
            }
            _ => {}
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_START {
            self.device.read_config(offset - CONFIG_START, data);
            return;
        }
        if data.len() != 4 || offset % 4 != 0 {
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_START {
            self.device.write_config(offset - CONFIG_START, data);
            self.config_generation = self.config_generation.wrapping_add(1);
            return;
        }
        if data.len() != 4 || offset % 4 != 0 {
            return;
        }
        self.write_reg(offset, u32::from_le_bytes([data[0], data[1], data[2], data[3]]));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::rng::VirtioRng;
    use crate::devices::virtio::testing::{memory, TestQueue};
    use crate::devices::virtio::INT_USED_RING;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    fn rd(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn wr(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    fn transport() -> (MmioTransport, EventFd) {
        let mem = memory();
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let irq = Arc::new(IrqLine::new(evt.try_clone().unwrap()));
        (MmioTransport::new(Box::new(VirtioRng::new()), mem, irq), evt)
    }

    /// The Linux driver's sequence up to DRIVER_OK, with one queue at `q`.
    fn bring_up(t: &mut MmioTransport, q: &TestQueue, features_hi: u32) {
        wr(t, 0x70, 0);
        wr(t, 0x70, STATUS_ACKNOWLEDGE);
        wr(t, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        wr(t, 0x24, 1);
        wr(t, 0x20, features_hi);
        wr(t, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
        wr(t, 0x30, 0);
        wr(t, 0x38, u32::from(q.size));
        for (reg, addr) in [(0x80, q.desc), (0x90, q.avail), (0xa0, q.used)] {
            wr(t, reg, addr as u32);
            wr(t, reg + 4, (addr >> 32) as u32);
        }
        wr(t, 0x44, 1);
        wr(t, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
    }

    #[test]
    fn identity_registers_read_as_the_spec_says() {
        let (mut t, _) = transport();
        assert_eq!(rd(&mut t, 0), MAGIC);
        assert_eq!(rd(&mut t, 4), 2);
        assert_eq!(rd(&mut t, 8), super::super::TYPE_RNG);
        wr(&mut t, 0x14, 1);
        assert_eq!(rd(&mut t, 0x10), 1, "VERSION_1 is bit 32");
        // Unaligned or narrow register accesses read zero and change nothing.
        let mut b = [0xffu8; 2];
        t.read(0, &mut b);
        assert_eq!(b, [0, 0]);
        t.write(0x70, &[1]);
        assert_eq!(rd(&mut t, 0x70), 0);
    }

    #[test]
    fn a_driver_brings_the_device_up_and_a_notify_is_served() {
        let (mut t, evt) = transport();
        let mem = t.mem.clone();
        let q = TestQueue::new(&mem, 0x10000, 8);
        bring_up(&mut t, &q, 1);
        assert_eq!(rd(&mut t, 0x70) & STATUS_NEEDS_RESET, 0);
        q.add_chain(&mem, &[(0x20000, 16, true)]);
        wr(&mut t, REG_QUEUE_NOTIFY, 0);
        assert_eq!(q.used_idx(&mem), 0, "a register write on the vCPU thread does no device work");
        assert!(evt.read().is_err());
        t.run_deferred();
        assert_eq!(q.used_idx(&mem), 1, "the VMM thread serves it");
        assert_eq!(q.used_elem(&mem, 0), (0, 16));
        assert_eq!(evt.read().unwrap(), 1);
        assert_eq!(rd(&mut t, 0x60), 1);
        wr(&mut t, 0x64, 1);
        assert_eq!(rd(&mut t, 0x60), 0);
    }

    #[test]
    fn a_driver_without_version_1_cannot_set_features_ok() {
        let (mut t, _) = transport();
        let mem = t.mem.clone();
        let q = TestQueue::new(&mem, 0x10000, 8);
        bring_up(&mut t, &q, 0);
        assert_eq!(rd(&mut t, 0x70) & STATUS_FEATURES_OK, 0);
        q.add_chain(&mem, &[(0x20000, 16, true)]);
        wr(&mut t, REG_QUEUE_NOTIFY, 0);
        assert_eq!(q.used_idx(&mem), 0, "not activated");
        assert_eq!(t.device().counters().spurious.load(Ordering::Relaxed), 1);
    }

    /// A transport brought up with one queue that has served one request (signalled, not yet
    /// acknowledged), its queue, and a fresh transport on the same memory to restore into.
    fn served_one_and_a_fresh_one() -> (MmioTransport, TestQueue, MmioTransport, EventFd) {
        let (mut t, _) = transport();
        let mem = t.mem.clone();
        let q = TestQueue::new(&mem, 0x10000, 8);
        bring_up(&mut t, &q, 1);
        q.add_chain(&mem, &[(0x20000, 16, true)]);
        t.notify(0);
        let (mut back, evt) = transport();
        back.mem = mem;
        (t, q, back, evt)
    }

    #[test]
    fn an_active_transport_saved_and_restored_keeps_serving_its_queue() {
        let (mut t, q, mut back, _) = served_one_and_a_fresh_one();
        let mem = t.mem.clone();
        let saved = t.save();
        assert!(saved.activated && saved.queues[0].next_used == 1);
        back.restore(&saved).unwrap();
        assert_eq!(back.save(), saved);
        q.add_chain(&mem, &[(0x20000, 16, true)]);
        back.notify(0);
        assert_eq!(q.used_idx(&mem), 2, "the restored device carries on where it was");
        // A saved state that does not fit the device is refused.
        let (mut other, _) = transport();
        let mut bad = saved.clone();
        bad.queues[0].max_size = 4;
        assert!(other.restore(&bad).is_err());
        let mut bad = saved;
        bad.acked_features |= 1 << 40;
        assert!(other.restore(&bad).is_err());
    }

    #[test]
    fn a_restored_transport_interrupts_and_serves_pending_requests_only_once_resumed() {
        // One request served and signalled but not yet acknowledged by the driver, and one made
        // available when the pause came, before its notify.
        let (mut t, q, mut back, evt) = served_one_and_a_fresh_one();
        let mem = t.mem.clone();
        q.add_chain(&mem, &[(0x20000, 16, true)]);
        let saved = t.save();
        assert_eq!(saved.interrupt_status, INT_USED_RING);
        back.restore(&saved).unwrap();
        assert_eq!(q.used_idx(&mem), 1, "nothing is served before the vCPUs are restored");
        assert!(evt.read().is_err(), "no interrupt before the vCPUs are restored");
        back.resume_after_restore();
        assert_eq!(q.used_idx(&mem), 2, "the pending request is served");
        assert!(evt.read().is_ok(), "the unacknowledged interrupt is raised again");
        assert_eq!(rd(&mut back, 0x60), INT_USED_RING);
    }

    /// A device that records what the transport asks of it, and may refuse to activate.
    struct Recorder {
        log: Arc<std::sync::Mutex<Vec<&'static str>>>,
        refuse: bool,
        counters: crate::devices::virtio::DeviceCounters,
    }

    impl VirtioDevice for Recorder {
        fn device_type(&self) -> u32 {
            super::super::TYPE_RNG
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[8]
        }
        fn features(&self) -> u64 {
            VIRTIO_F_VERSION_1
        }
        fn read_config(&self, _offset: u64, data: &mut [u8]) {
            data.fill(0);
        }
        fn activate(
            &mut self,
            _mem: GuestMemoryMmap,
            _queues: Vec<Queue>,
            _irq: Arc<IrqLine>,
            _acked_features: u64,
        ) -> Result<(), super::super::ActivateError> {
            self.log.lock().unwrap().push("activate");
            if self.refuse {
                return Err(super::super::ActivateError::Device("refused".into()));
            }
            Ok(())
        }
        fn process_queue(&mut self, _index: usize) {
            self.log.lock().unwrap().push("queue");
        }
        fn reset(&mut self) {
            self.log.lock().unwrap().push("reset");
        }
        fn counters(&self) -> &crate::devices::virtio::DeviceCounters {
            &self.counters
        }
    }

    fn recorded(refuse: bool) -> (MmioTransport, Arc<std::sync::Mutex<Vec<&'static str>>>, EventFd, EventFd) {
        let log = Arc::new(std::sync::Mutex::new(Vec::new()));
        let dev = Recorder { log: log.clone(), refuse, counters: Default::default() };
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let wake = EventFd::new(EFD_NONBLOCK).unwrap();
        let t = MmioTransport::new(Box::new(dev), memory(), Arc::new(IrqLine::new(irq.try_clone().unwrap())))
            .with_wake(wake.try_clone().unwrap());
        (t, log, irq, wake)
    }

    #[test]
    fn activation_and_reset_wait_for_the_vmm_thread_and_keep_their_order() {
        let (mut t, log, _, wake) = recorded(false);
        let mem = t.mem.clone();
        let q = TestQueue::new(&mem, 0x10000, 8);
        bring_up(&mut t, &q, 1);
        assert!(log.lock().unwrap().is_empty(), "DRIVER_OK on the vCPU thread touches no device");
        assert_eq!(rd(&mut t, 0x70) & STATUS_DRIVER_OK, STATUS_DRIVER_OK, "the driver sees it at once");
        assert_eq!(wake.read().unwrap(), 1, "the VMM thread is woken");
        t.run_deferred();
        assert_eq!(*log.lock().unwrap(), ["activate"]);
        // Reset, bring up, reset and bring up again before the VMM thread runs: the device is
        // reset once and activated once; the activation it never saw is dropped.
        wr(&mut t, 0x70, 0);
        assert_eq!(rd(&mut t, 0x70), 0, "the driver reads the reset back at once");
        bring_up(&mut t, &q, 1);
        bring_up(&mut t, &q, 1);
        wr(&mut t, REG_QUEUE_NOTIFY, 0);
        t.run_deferred();
        assert_eq!(*log.lock().unwrap(), ["activate", "reset", "activate", "queue"]);
        // A reset drops notifications not yet served; nothing is left to run.
        wr(&mut t, REG_QUEUE_NOTIFY, 0);
        wr(&mut t, 0x70, 0);
        t.run_deferred();
        t.run_deferred();
        assert_eq!(*log.lock().unwrap(), ["activate", "reset", "activate", "queue", "reset"]);
    }

    #[test]
    fn a_device_that_fails_to_activate_later_asks_the_driver_for_a_reset() {
        let (mut t, log, irq, _) = recorded(true);
        let mem = t.mem.clone();
        let q = TestQueue::new(&mem, 0x10000, 8);
        bring_up(&mut t, &q, 1);
        assert_eq!(rd(&mut t, 0x70) & STATUS_NEEDS_RESET, 0);
        t.run_deferred();
        assert_eq!(*log.lock().unwrap(), ["activate"]);
        assert_ne!(rd(&mut t, 0x70) & STATUS_NEEDS_RESET, 0);
        assert_eq!(rd(&mut t, 0x60), crate::devices::virtio::INT_CONFIG, "a configuration interrupt");
        assert_eq!(irq.read().unwrap(), 1);
        // Queue work for a device that is not active is counted, not done.
        t.notify(0);
        assert_eq!(*log.lock().unwrap(), ["activate"]);
        assert_eq!(t.device().counters().spurious.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn queues_outside_memory_are_refused_at_driver_ok() {
        let (mut t, _) = transport();
        let mem = t.mem.clone();
        let mut q = TestQueue::new(&mem, 0x10000, 8);
        q.desc = 1 << 40;
        bring_up(&mut t, &q, 1);
        assert_ne!(rd(&mut t, 0x70) & STATUS_NEEDS_RESET, 0);
        // Reset makes it usable again.
        let good = TestQueue::new(&mem, 0x10000, 8);
        bring_up(&mut t, &good, 1);
        assert_eq!(rd(&mut t, 0x70) & STATUS_NEEDS_RESET, 0);
    }
}
