//! virtio-net on a host tap: queue 0 receives (frames from the tap into the guest's buffers),
//! queue 1 transmits (the guest's frames out to the tap). Frames keep their virtio-net header
//! both ways. No offloads are offered yet, so every frame is a whole Ethernet frame with its
//! checksums done. A frame that does not fit the guest's buffer, or a chain that is malformed,
//! is dropped and counted; a frame that arrives while the guest has no buffer waits for one.
//! Optional rate limiters (Firecracker's rx_rate_limiter and tx_rate_limiter) hold frames
//! back in each direction.

pub mod mmds;
pub mod tap;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::vstate::memory::GuestMemoryMmap;
use virtio_queue::{Queue, QueueT};

use crate::devices::rate_limiter::RateLimiter;

use super::{
    read_config_bytes, ActivateError, ActiveQueues, DeviceCounters, IrqLine, VirtioDevice, TYPE_NET, VIRTIO_F_VERSION_1,
};
use tap::{NetBackend, VNET_HDR_LEN};

const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;
const F_MAC: u64 = 1 << 5;
/// The device reports the largest frame payload it takes (the host tap's MTU), which Linux
/// makes the interface's MTU and its maximum: a tap on a VXLAN overlay has 50 bytes less than
/// Ethernet's 1500, and a guest sending 1500 would have its full-size packets dropped.
const F_MTU: u64 = 1 << 3;
/// What the guest is told when the backend does not say.
const DEFAULT_MTU: u16 = 1500;
/// The device takes frames with a partial checksum (the host completes it).
const F_CSUM: u64 = 1 << 0;
/// The driver takes frames with a partial checksum.
const F_GUEST_CSUM: u64 = 1 << 1;
const F_GUEST_TSO4: u64 = 1 << 7;
const F_GUEST_TSO6: u64 = 1 << 8;
/// The device takes TCP segmentation offload frames (the tap segments them).
const F_HOST_TSO4: u64 = 1 << 11;
const F_HOST_TSO6: u64 = 1 << 12;
/// The offloads offered: Linux negotiates all of them, and the tap carries them both ways in the
/// virtio-net header.
const OFFLOADS: u64 = F_CSUM | F_GUEST_CSUM | F_GUEST_TSO4 | F_GUEST_TSO6 | F_HOST_TSO4 | F_HOST_TSO6;

/// What the tap may hand the guest, from the offloads the driver acknowledged (TUNSETOFFLOAD).
pub fn tap_offloads(acked: u64) -> u32 {
    let mut flags = 0;
    if acked & F_GUEST_CSUM != 0 {
        flags |= tap::TUN_F_CSUM;
        if acked & F_GUEST_TSO4 != 0 {
            flags |= tap::TUN_F_TSO4;
        }
        if acked & F_GUEST_TSO6 != 0 {
            flags |= tap::TUN_F_TSO6;
        }
    }
    flags
}
/// Largest frame with its header: 64 KiB IP datagram plus Ethernet and VLAN headers.
pub const MAX_FRAME: usize = VNET_HDR_LEN + 65550;

/// A network device.
pub struct VirtioNet {
    backend: Box<dyn NetBackend>,
    mac: [u8; 6],
    active: Option<ActiveQueues>,
    /// A frame read from the backend that no guest buffer has taken yet.
    pending: Option<Vec<u8>>,
    buf: Vec<u8>,
    counters: DeviceCounters,
    /// Limits on frames into the guest and out of it (bytes and frames).
    rx_limiter: Option<RateLimiter>,
    tx_limiter: Option<RateLimiter>,
}

impl std::fmt::Debug for VirtioNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioNet").field("mac", &self.mac).field("counters", &self.counters).finish()
    }
}

pub use shoal_vmm_config::parse_mac;

impl VirtioNet {
    pub fn new(backend: Box<dyn NetBackend>, mac: [u8; 6]) -> VirtioNet {
        VirtioNet {
            backend,
            mac,
            active: None,
            pending: None,
            buf: vec![0; MAX_FRAME],
            counters: DeviceCounters::default(),
            rx_limiter: None,
            tx_limiter: None,
        }
    }

    /// Holds frames to the limiters' rates: `rx` into the guest, `tx` out of it.
    pub fn with_limiters(mut self, rx: Option<RateLimiter>, tx: Option<RateLimiter>) -> VirtioNet {
        self.rx_limiter = rx;
        self.tx_limiter = tx;
        self
    }

    fn limited(limiter: &mut Option<RateLimiter>, counters: &DeviceCounters) -> bool {
        if limiter.as_mut().is_some_and(|l| !l.has_room()) {
            counters.throttled.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        false
    }

    fn process_tx(&mut self) {
        let Some(a) = self.active.as_mut() else { return };
        let mut used_any = false;
        loop {
            if Self::limited(&mut self.tx_limiter, &self.counters) {
                break;
            }
            let Some(chain) = a.queues[TX].pop_descriptor_chain(&a.mem) else { break };
            let head = chain.head_index();
            let sent = match chain.reader(&a.mem) {
                Ok(mut reader) if (VNET_HDR_LEN..=MAX_FRAME).contains(&reader.available_bytes()) => {
                    let n = reader.available_bytes();
                    use std::io::Read;
                    match reader.read_exact(&mut self.buf[..n]).map(|_| self.backend.write_frame(&self.buf[..n])) {
                        Ok(Ok(())) => Some(n),
                        Ok(Err(e)) => {
                            // Counted per frame; logged once per power of two so a guest cannot flood the log.
                            let errors = self.counters.errors.load(Ordering::Relaxed) + 1;
                            if errors.is_power_of_two() {
                                tracing::warn!(error = %e, len = n, errors, "tap refused a frame from the guest");
                            }
                            None
                        }
                        Err(_) => None,
                    }
                }
                _ => None,
            };
            if let Some(l) = self.tx_limiter.as_mut() {
                l.consume(1, sent.unwrap_or(0) as u64);
            }
            if let Some(n) = sent {
                self.counters.bytes.fetch_add(n as u64, Ordering::Relaxed);
            } else {
                self.counters.errors.fetch_add(1, Ordering::Relaxed);
            }
            self.counters.requests.fetch_add(1, Ordering::Relaxed);
            if a.queues[TX].add_used(&a.mem, head, 0).is_err() {
                self.counters.errors.fetch_add(1, Ordering::Relaxed);
            }
            used_any = true;
        }
        if used_any && a.queues[TX].needs_notification(&a.mem).unwrap_or(true) {
            a.irq.signal_used();
        }
        if self.backend.has_local_frames() {
            self.process_rx();
        }
    }

    /// Moves frames from the backend into guest buffers until one side runs out.
    fn process_rx(&mut self) {
        let mut used_any = false;
        loop {
            let frame = match self.pending.take() {
                Some(f) => f,
                None => match self.backend.read_frame(&mut self.buf) {
                    Ok(n) if n >= VNET_HDR_LEN => {
                        let mut f = self.buf[..n].to_vec();
                        // Without mergeable buffers every frame is one buffer.
                        f[10..12].copy_from_slice(&1u16.to_le_bytes());
                        f
                    }
                    Ok(_) => {
                        self.counters.errors.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(_) => break, // WouldBlock, or the tap went away
                },
            };
            let Some(a) = self.active.as_mut() else {
                // The guest's driver is not up: the frame has nowhere to go.
                self.counters.errors.fetch_add(1, Ordering::Relaxed);
                continue;
            };
            if Self::limited(&mut self.rx_limiter, &self.counters) {
                self.pending = Some(frame);
                break;
            }
            let Some(chain) = a.queues[RX].pop_descriptor_chain(&a.mem) else {
                self.pending = Some(frame);
                break;
            };
            let head = chain.head_index();
            let written = match chain.writer(&a.mem) {
                Ok(mut w) if w.available_bytes() >= frame.len() => {
                    use std::io::Write;
                    w.write_all(&frame).is_ok()
                }
                _ => false,
            };
            let len = if written { frame.len() as u32 } else { 0 };
            if let Some(l) = self.rx_limiter.as_mut() {
                l.consume(1, u64::from(len));
            }
            if written {
                self.counters.bytes.fetch_add(frame.len() as u64, Ordering::Relaxed);
            } else {
                self.counters.errors.fetch_add(1, Ordering::Relaxed);
            }
            self.counters.requests.fetch_add(1, Ordering::Relaxed);
            if a.queues[RX].add_used(&a.mem, head, len).is_err() {
                self.counters.errors.fetch_add(1, Ordering::Relaxed);
            }
            used_any = true;
        }
        if let Some(a) = self.active.as_mut() {
            if used_any && a.queues[RX].needs_notification(&a.mem).unwrap_or(true) {
                a.irq.signal_used();
            }
        }
    }
}

impl VirtioDevice for VirtioNet {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        // F_MTU always (1500 on an ordinary tap), so the features offered never depend on the
        // tap: a snapshot's acknowledged features stay a subset on any tap it is restored on.
        VIRTIO_F_VERSION_1 | F_MAC | F_MTU | OFFLOADS
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // mac[6], status (unused: no F_STATUS), max_virtqueue_pairs = 1, mtu.
        let mut config = [0u8; 12];
        config[..6].copy_from_slice(&self.mac);
        config[8..10].copy_from_slice(&1u16.to_le_bytes());
        config[10..12].copy_from_slice(&self.backend.mtu().unwrap_or(DEFAULT_MTU).to_le_bytes());
        read_config_bytes(&config, offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        irq: Arc<IrqLine>,
        acked: u64,
    ) -> Result<(), ActivateError> {
        if queues.len() != 2 {
            return Err(ActivateError::BadQueue(queues.len()));
        }
        // Only hand the guest what it said it can take: a tap with TSO on delivers 64 KiB
        // frames a driver without GUEST_TSO would drop.
        if let Err(e) = self.backend.set_offloads(tap_offloads(acked)) {
            tracing::warn!(error = %e, "cannot set the tap's offloads; large or partially checksummed frames may be dropped");
            self.counters.errors.fetch_add(1, Ordering::Relaxed);
        }
        self.active = Some(ActiveQueues { mem, queues, irq });
        // Frames that arrived before the driver was up can go in now.
        self.process_rx();
        Ok(())
    }

    fn process_queue(&mut self, index: usize) {
        match (index, self.active.is_some()) {
            (RX, true) => self.process_rx(),
            (TX, true) => self.process_tx(),
            _ => {
                self.counters.spurious.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn reset(&mut self) {
        self.active = None;
        self.pending = None;
    }

    fn counters(&self) -> &DeviceCounters {
        &self.counters
    }

    fn active_queues(&self) -> &[Queue] {
        self.active.as_ref().map_or(&[], |a| &a.queues)
    }

    fn backend_fd(&self) -> Option<std::os::fd::RawFd> {
        self.backend.raw_fd()
    }

    fn process_backend(&mut self) {
        self.process_rx();
    }

    fn throttled_for(&self) -> Option<std::time::Duration> {
        self.rx_limiter.iter().chain(self.tx_limiter.iter()).filter_map(RateLimiter::blocked_for).min()
    }

    fn update(&mut self, update: super::DeviceUpdate) -> Result<bool, String> {
        let super::DeviceUpdate::Net { rx, tx } = update else {
            return Err("not a network interface update".into());
        };
        if let Some(rx) = rx {
            self.rx_limiter = rx.as_ref().map(RateLimiter::new);
        }
        if let Some(tx) = tx {
            self.tx_limiter = tx.as_ref().map(RateLimiter::new);
        }
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::testing::{memory, TestQueue};
    use std::collections::VecDeque;
    use std::sync::Mutex;
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    #[derive(Clone, Default)]
    struct Wire {
        to_guest: Arc<Mutex<VecDeque<Vec<u8>>>>,
        from_guest: Arc<Mutex<Vec<Vec<u8>>>>,
        offloads: Arc<Mutex<Option<u32>>>,
        mtu: Option<u16>,
    }

    impl NetBackend for Wire {
        fn read_frame(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let f = self.to_guest.lock().unwrap().pop_front().ok_or(std::io::ErrorKind::WouldBlock)?;
            buf[..f.len()].copy_from_slice(&f);
            Ok(f.len())
        }
        fn write_frame(&mut self, frame: &[u8]) -> std::io::Result<()> {
            self.from_guest.lock().unwrap().push(frame.to_vec());
            Ok(())
        }
        fn raw_fd(&self) -> Option<std::os::fd::RawFd> {
            None
        }
        fn set_offloads(&mut self, flags: u32) -> std::io::Result<()> {
            *self.offloads.lock().unwrap() = Some(flags);
            Ok(())
        }
        fn mtu(&self) -> Option<u16> {
            self.mtu
        }
    }

    #[test]
    fn the_guest_is_told_the_tap_s_mtu_and_ethernet_s_when_the_backend_does_not_say() {
        let mtu_of = |dev: &VirtioNet| {
            let mut b = [0u8; 2];
            dev.read_config(10, &mut b);
            u16::from_le_bytes(b)
        };
        let overlay = VirtioNet::new(Box::new(Wire { mtu: Some(1450), ..Wire::default() }), [2, 0, 0, 0, 0, 1]);
        assert_ne!(overlay.features() & F_MTU, 0);
        assert_eq!(mtu_of(&overlay), 1450);
        let plain = VirtioNet::new(Box::new(Wire::default()), [2, 0, 0, 0, 0, 1]);
        assert_eq!(plain.features(), overlay.features(), "the same features on any tap");
        assert_eq!(mtu_of(&plain), 1500);
        let mut mac = [0u8; 6];
        plain.read_config(0, &mut mac);
        assert_eq!(mac, [2, 0, 0, 0, 0, 1]);
    }

    #[test]
    fn the_tap_gets_exactly_the_offloads_the_driver_acknowledged() {
        let dev = VirtioNet::new(Box::new(Wire::default()), [2, 0, 0, 0, 0, 1]);
        assert_eq!(dev.features() & OFFLOADS, OFFLOADS, "csum and TSO are offered");
        assert_eq!(tap_offloads(VIRTIO_F_VERSION_1), 0);
        assert_eq!(tap_offloads(F_GUEST_TSO4 | F_GUEST_TSO6), 0, "TSO frames need checksum offload too");
        assert_eq!(tap_offloads(F_GUEST_CSUM), tap::TUN_F_CSUM);
        assert_eq!(tap_offloads(F_GUEST_CSUM | F_GUEST_TSO4 | F_HOST_TSO6), tap::TUN_F_CSUM | tap::TUN_F_TSO4);
        assert_eq!(tap_offloads(OFFLOADS), tap::TUN_F_CSUM | tap::TUN_F_TSO4 | tap::TUN_F_TSO6);
        // Activation applies them to the backend.
        let mem = memory();
        let wire = Wire::default();
        let mut dev = VirtioNet::new(Box::new(wire.clone()), [2, 0, 0, 0, 0, 1]);
        let (rxq, txq) = (TestQueue::new(&mem, 0x1000, 16), TestQueue::new(&mem, 0x4000, 16));
        let irq = Arc::new(IrqLine::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        dev.activate(
            mem.clone(),
            vec![queue(&rxq), queue(&txq)],
            irq,
            VIRTIO_F_VERSION_1 | F_GUEST_CSUM | F_GUEST_TSO4,
        )
        .unwrap();
        assert_eq!(*wire.offloads.lock().unwrap(), Some(tap::TUN_F_CSUM | tap::TUN_F_TSO4));
    }

    fn queue(q: &TestQueue) -> Queue {
        q.queue(QUEUE_SIZE)
    }

    fn frame(payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; VNET_HDR_LEN];
        f.extend_from_slice(&[0xff; 6]);
        f.extend_from_slice(&[2, 0, 0, 0, 0, 1]);
        f.extend_from_slice(&[0x88, 0xb5]);
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn frames_go_out_and_come_in_and_wait_for_a_buffer() {
        let mem = memory();
        let (rxq, txq) = (TestQueue::new(&mem, 0x1000, 16), TestQueue::new(&mem, 0x4000, 16));
        let wire = Wire::default();
        let mut dev = VirtioNet::new(Box::new(wire.clone()), [2, 0, 0, 0, 0, 1]);
        let irq = Arc::new(IrqLine::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        // A frame arrives before any rx buffer: it waits.
        wire.to_guest.lock().unwrap().push_back(frame(b"to-guest"));
        dev.activate(mem.clone(), vec![queue(&rxq), queue(&txq)], irq, VIRTIO_F_VERSION_1).unwrap();
        assert!(dev.pending.is_some());
        rxq.add_chain(&mem, &[(0x10000, 2048, true)]);
        dev.process_queue(RX);
        let f = frame(b"to-guest");
        assert_eq!(rxq.used_elem(&mem, 0), (0, f.len() as u32));
        let mut got = vec![0u8; f.len()];
        mem.read_slice(&mut got, GuestAddress(0x10000)).unwrap();
        assert_eq!(&got[VNET_HDR_LEN..], &f[VNET_HDR_LEN..]);
        assert_eq!(&got[10..12], &1u16.to_le_bytes(), "num_buffers");
        // Transmit: header and frame reach the wire unchanged.
        let out = frame(b"from-guest");
        mem.write_slice(&out, GuestAddress(0x20000)).unwrap();
        txq.add_chain(
            &mem,
            &[
                (0x20000, VNET_HDR_LEN as u32, false),
                (0x20000 + VNET_HDR_LEN as u64, (out.len() - VNET_HDR_LEN) as u32, false),
            ],
        );
        dev.process_queue(TX);
        assert_eq!(wire.from_guest.lock().unwrap().as_slice(), &[out]);
    }

    #[test]
    fn rate_limiters_hold_frames_back_in_each_direction() {
        use crate::devices::rate_limiter::{BucketConfig, RateLimitConfig};
        // 10 bytes per minute each way: the first frame overdraws the bucket, the next waits.
        let one = RateLimitConfig {
            bandwidth: Some(BucketConfig { size: 10, one_time_burst: 0, refill_time: 60_000 }),
            ops: None,
        };
        let mem = memory();
        let (rxq, txq) = (TestQueue::new(&mem, 0x1000, 16), TestQueue::new(&mem, 0x4000, 16));
        let wire = Wire::default();
        let mut dev = VirtioNet::new(Box::new(wire.clone()), [2, 0, 0, 0, 0, 1])
            .with_limiters(Some(RateLimiter::new(&one)), Some(RateLimiter::new(&one)));
        let irq = Arc::new(IrqLine::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        dev.activate(mem.clone(), vec![queue(&rxq), queue(&txq)], irq, VIRTIO_F_VERSION_1).unwrap();
        let out = frame(b"out");
        mem.write_slice(&out, GuestAddress(0x20000)).unwrap();
        txq.add_chain(&mem, &[(0x20000, out.len() as u32, false)]);
        txq.add_chain(&mem, &[(0x20000, out.len() as u32, false)]);
        dev.process_queue(TX);
        assert_eq!(wire.from_guest.lock().unwrap().len(), 1, "the second frame waits");
        assert_eq!(txq.used_idx(&mem), 1);
        wire.to_guest.lock().unwrap().push_back(frame(b"in-1"));
        wire.to_guest.lock().unwrap().push_back(frame(b"in-2"));
        rxq.add_chain(&mem, &[(0x10000, 2048, true)]);
        rxq.add_chain(&mem, &[(0x11000, 2048, true)]);
        dev.process_queue(RX);
        assert_eq!(rxq.used_idx(&mem), 1, "the second frame waits");
        assert!(dev.pending.is_some());
        assert_eq!(dev.counters().throttled.load(Ordering::Relaxed), 2);
        assert!(dev.throttled_for().is_some_and(|d| d > std::time::Duration::from_secs(50)));
    }

    #[test]
    fn bad_chains_and_oversized_frames_are_dropped_and_counted() {
        let mem = memory();
        let (rxq, txq) = (TestQueue::new(&mem, 0x1000, 16), TestQueue::new(&mem, 0x4000, 16));
        let wire = Wire::default();
        let mut dev = VirtioNet::new(Box::new(wire.clone()), [2, 0, 0, 0, 0, 1]);
        let irq = Arc::new(IrqLine::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        dev.activate(mem.clone(), vec![queue(&rxq), queue(&txq)], irq, VIRTIO_F_VERSION_1).unwrap();
        // tx: shorter than a header, past the end of memory, read-only... and far too long.
        txq.add_chain(&mem, &[(0x20000, 4, false)]);
        txq.add_chain(&mem, &[((16 << 20) - 8, 64, false)]);
        txq.add_chain(&mem, &[(0x20000, 60000, false), (0x30000, 60000, false)]);
        dev.process_queue(TX);
        assert_eq!(txq.used_idx(&mem), 3);
        assert!(wire.from_guest.lock().unwrap().is_empty());
        // rx: a buffer too small for the frame, and one outside memory: both dropped.
        wire.to_guest.lock().unwrap().push_back(frame(&[7u8; 1000]));
        wire.to_guest.lock().unwrap().push_back(frame(&[8u8; 100]));
        rxq.add_chain(&mem, &[(0x10000, 64, true)]);
        rxq.add_chain(&mem, &[((16 << 20) - 8, 2048, true)]);
        dev.process_queue(RX);
        assert_eq!(rxq.used_idx(&mem), 2);
        assert_eq!((rxq.used_elem(&mem, 0).1, rxq.used_elem(&mem, 1).1), (0, 0));
        assert_eq!(dev.counters().errors.load(Ordering::Relaxed), 5);
        assert_eq!(parse_mac("02:00:00:00:00:01"), Ok([2, 0, 0, 0, 0, 1]));
        for bad in ["02:00:00:00:00", "01:00:00:00:00:01", "zz:00:00:00:00:01", "2:0:0:0:0:1"] {
            assert!(parse_mac(bad).is_err(), "{bad}");
        }
    }
}
