//! virtio-rng (entropy device): one queue of device-writable buffers, filled from the host's
//! getrandom. A chain with no writable space, or with buffers outside guest memory, is
//! returned with zero bytes written and counted as an error. An optional rate limiter holds
//! requests back (bytes handed out and requests), as Firecracker's entropy device does.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::vstate::memory::GuestMemoryMmap;
use virtio_queue::{Queue, QueueT};
use vm_memory::Bytes;

use crate::devices::rate_limiter::RateLimiter;

use super::{ActivateError, DeviceCounters, IrqLine, VirtioDevice, TYPE_RNG, VIRTIO_F_VERSION_1};

const QUEUE_SIZE: u16 = 256;
/// Most bytes handed out per chain, so one request cannot keep the loop busy for long.
const MAX_PER_CHAIN: usize = 64 << 10;

/// The source of random bytes (getrandom in the VMM; a fixed pattern in tests).
pub trait Entropy: Send {
    fn fill(&mut self, buf: &mut [u8]) -> std::io::Result<()>;
}

/// The host's getrandom(2).
#[derive(Debug, Default)]
pub struct HostEntropy;

impl Entropy for HostEntropy {
    fn fill(&mut self, buf: &mut [u8]) -> std::io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            // SAFETY: getrandom writes at most the given length into the buffer slice.
            let n = unsafe { libc::getrandom(buf[done..].as_mut_ptr().cast(), buf.len() - done, 0) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
                continue;
            }
            done += n as usize;
        }
        Ok(())
    }
}

struct Active {
    mem: GuestMemoryMmap,
    queue: Queue,
    irq: Arc<IrqLine>,
}

/// The entropy device.
pub struct VirtioRng {
    entropy: Box<dyn Entropy>,
    active: Option<Active>,
    counters: DeviceCounters,
    limiter: Option<RateLimiter>,
}

impl std::fmt::Debug for VirtioRng {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioRng").field("counters", &self.counters).finish()
    }
}

impl Default for VirtioRng {
    fn default() -> Self {
        Self::new()
    }
}

impl VirtioRng {
    pub fn new() -> VirtioRng {
        Self::with_entropy(Box::new(HostEntropy))
    }

    pub fn with_entropy(entropy: Box<dyn Entropy>) -> VirtioRng {
        VirtioRng { entropy, active: None, counters: DeviceCounters::default(), limiter: None }
    }

    /// Holds requests to `limiter`'s rate (bytes handed out, requests).
    pub fn with_limiter(mut self, limiter: Option<RateLimiter>) -> VirtioRng {
        self.limiter = limiter;
        self
    }
}

impl VirtioDevice for VirtioRng {
    fn device_type(&self) -> u32 {
        TYPE_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        mut queues: Vec<Queue>,
        irq: Arc<IrqLine>,
        _acked: u64,
    ) -> Result<(), ActivateError> {
        let queue = queues.pop().ok_or(ActivateError::BadQueue(0))?;
        self.active = Some(Active { mem, queue, irq });
        Ok(())
    }

    fn process_queue(&mut self, index: usize) {
        let Some(a) = self.active.as_mut() else {
            self.counters.spurious.fetch_add(1, Ordering::Relaxed);
            return;
        };
        if index != 0 {
            self.counters.spurious.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let mut used_any = false;
        let mut buf = Vec::new();
        loop {
            if self.limiter.as_mut().is_some_and(|l| !l.has_room()) {
                self.counters.throttled.fetch_add(1, Ordering::Relaxed);
                break;
            }
            let Some(chain) = a.queue.pop_descriptor_chain(&a.mem) else { break };
            let head = chain.head_index();
            let mut written = 0u32;
            let mut bad = false;
            for desc in chain.writable() {
                let room = MAX_PER_CHAIN - written as usize;
                let len = (desc.len() as usize).min(room);
                if len == 0 {
                    break;
                }
                buf.resize(len, 0);
                if self.entropy.fill(&mut buf).is_err() || a.mem.write_slice(&buf, desc.addr()).is_err() {
                    bad = true;
                    break;
                }
                written += len as u32;
            }
            if bad || written == 0 {
                self.counters.errors.fetch_add(1, Ordering::Relaxed);
                written = 0;
            }
            if let Some(l) = self.limiter.as_mut() {
                l.consume(1, u64::from(written));
            }
            self.counters.requests.fetch_add(1, Ordering::Relaxed);
            self.counters.bytes.fetch_add(u64::from(written), Ordering::Relaxed);
            if a.queue.add_used(&a.mem, head, written).is_err() {
                self.counters.errors.fetch_add(1, Ordering::Relaxed);
            }
            used_any = true;
        }
        if used_any && a.queue.needs_notification(&a.mem).unwrap_or(true) {
            a.irq.signal_used();
        }
    }

    fn reset(&mut self) {
        self.active = None;
    }

    fn counters(&self) -> &DeviceCounters {
        &self.counters
    }

    fn active_queues(&self) -> &[Queue] {
        self.active.as_ref().map_or(&[], |a| std::slice::from_ref(&a.queue))
    }

    fn throttled_for(&self) -> Option<std::time::Duration> {
        self.limiter.as_ref().and_then(RateLimiter::blocked_for)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::testing::{memory, TestQueue, F_WRITE};
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    struct Pattern;
    impl Entropy for Pattern {
        fn fill(&mut self, buf: &mut [u8]) -> std::io::Result<()> {
            buf.fill(0xa5);
            Ok(())
        }
    }

    fn active(mem: &GuestMemoryMmap, q: &TestQueue) -> VirtioRng {
        let mut dev = VirtioRng::with_entropy(Box::new(Pattern));
        let queue = q.queue(QUEUE_SIZE);
        let irq = Arc::new(IrqLine::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        dev.activate(mem.clone(), vec![queue], irq, VIRTIO_F_VERSION_1).unwrap();
        dev
    }

    #[test]
    fn writable_buffers_are_filled() {
        let mem = memory();
        let q = TestQueue::new(&mem, 0x1000, 16);
        let mut dev = active(&mem, &q);
        q.add_chain(&mem, &[(0x8000, 32, true), (0x9000, 8, true)]);
        dev.process_queue(0);
        assert_eq!(q.used_elem(&mem, 0), (0, 40));
        let mut b = [0u8; 32];
        mem.read_slice(&mut b, GuestAddress(0x8000)).unwrap();
        assert_eq!(b, [0xa5; 32]);
        // The host source works too.
        let mut h = [0u8; 64];
        HostEntropy.fill(&mut h).unwrap();
        assert_ne!(h, [0u8; 64]);
    }

    #[test]
    fn a_rate_limited_rng_hands_out_no_more_than_its_bucket() {
        use crate::devices::rate_limiter::{BucketConfig, RateLimitConfig};
        let mem = memory();
        let q = TestQueue::new(&mem, 0x1000, 16);
        // 32 bytes per minute: the first request overdraws the bucket, the next waits.
        let limit = RateLimitConfig {
            bandwidth: Some(BucketConfig { size: 32, one_time_burst: 0, refill_time: 60_000 }),
            ops: None,
        };
        let mut dev = VirtioRng::with_entropy(Box::new(Pattern)).with_limiter(Some(RateLimiter::new(&limit)));
        let irq = Arc::new(IrqLine::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        dev.activate(mem.clone(), vec![q.queue(QUEUE_SIZE)], irq, VIRTIO_F_VERSION_1).unwrap();
        q.add_chain(&mem, &[(0x8000, 64, true)]);
        q.add_chain(&mem, &[(0x9000, 64, true)]);
        dev.process_queue(0);
        assert_eq!(q.used_idx(&mem), 1, "the second request waits for the bucket");
        assert_eq!(dev.counters().throttled.load(Ordering::Relaxed), 1);
        assert!(dev.throttled_for().is_some());
    }

    #[test]
    fn hostile_chains_get_zero_bytes_and_are_counted() {
        let mem = memory();
        let q = TestQueue::new(&mem, 0x1000, 16);
        let mut dev = active(&mem, &q);
        // Read-only buffer, a buffer past the end of memory, and a loop of descriptors.
        q.add_chain(&mem, &[(0x8000, 32, false)]);
        q.add_chain(&mem, &[((16 << 20) - 4, 64, true)]);
        q.write_desc(&mem, 10, 0x8000, 16, F_WRITE | 1, 11);
        q.write_desc(&mem, 11, 0x8000, 16, F_WRITE | 1, 10);
        q.publish(&mem, 10);
        q.add_chain(&mem, &[(0x8000, u32::MAX, true)]);
        dev.process_queue(0);
        assert_eq!(q.used_idx(&mem), 4);
        assert_eq!(q.used_elem(&mem, 0).1, 0);
        assert_eq!(q.used_elem(&mem, 1).1, 0);
        // The loop ends after queue-size descriptors; the huge buffer is capped.
        assert!(q.used_elem(&mem, 2).1 <= 16 * 16);
        assert_eq!(q.used_elem(&mem, 3).1, MAX_PER_CHAIN as u32);
        assert!(dev.counters().errors.load(Ordering::Relaxed) >= 2);
        dev.process_queue(3);
        assert_eq!(dev.counters().spurious.load(Ordering::Relaxed), 1);
    }
}
