//! virtio-blk: a raw disk image file as the guest's block device. Read-only disks advertise
//! VIRTIO_BLK_F_RO and fail writes; FLUSH syncs the file; DISCARD and WRITE_ZEROES punch
//! holes where the filesystem can; GET_ID returns the configured serial. Requests are served
//! on the VMM's event-loop thread (not the vCPU's), one queue, each bounded by the size_max
//! and seg_max the device offers, and at most `ROUND_BYTES` / `ROUND_REQUESTS` per turn of
//! the loop so the other devices and the API are never starved.

pub mod handler;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::vstate::memory::GuestMemoryMmap;
use virtio_queue::{Queue, QueueT};

use super::{read_config_bytes, ActivateError, DeviceCounters, IrqLine, VirtioDevice, TYPE_BLOCK, VIRTIO_F_VERSION_1};
use crate::devices::rate_limiter::RateLimiter;
use handler::{DiskBackend, DiskInfo, Outcome, ID_LEN, MAX_DISCARD_SEGMENTS, SECTOR_SIZE, SEG_MAX, SIZE_MAX};

const QUEUE_SIZE: u16 = 256;
/// After moving this many bytes in one turn the device yields to the event loop.
const ROUND_BYTES: u64 = 16 << 20;
/// After this many requests (flushes cost an fsync each) the device yields as well.
const ROUND_REQUESTS: u32 = 64;
const F_SIZE_MAX: u64 = 1 << 1;
const F_SEG_MAX: u64 = 1 << 2;
const F_RO: u64 = 1 << 5;
const F_BLK_SIZE: u64 = 1 << 6;
const F_FLUSH: u64 = 1 << 9;
const F_DISCARD: u64 = 1 << 13;
const F_WRITE_ZEROES: u64 = 1 << 14;

struct Active {
    mem: GuestMemoryMmap,
    queue: Queue,
    irq: Arc<IrqLine>,
}

/// A block device.
pub struct VirtioBlock {
    disk: Box<dyn DiskBackend>,
    info: DiskInfo,
    config: Vec<u8>,
    active: Option<Active>,
    counters: DeviceCounters,
    limiter: Option<RateLimiter>,
    /// The last turn stopped at its budget with requests possibly still available.
    more: bool,
}

impl std::fmt::Debug for VirtioBlock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioBlock")
            .field("read_only", &self.info.read_only)
            .field("counters", &self.counters)
            .finish()
    }
}

impl VirtioBlock {
    /// A device over `disk`; `id` is the serial (at most 20 bytes are used).
    pub fn new(disk: Box<dyn DiskBackend>, read_only: bool, id: &str, limiter: Option<RateLimiter>) -> VirtioBlock {
        let mut serial = [0u8; ID_LEN];
        let n = id.len().min(ID_LEN);
        serial[..n].copy_from_slice(&id.as_bytes()[..n]);
        let mut c = Vec::with_capacity(60);
        c.extend_from_slice(&(disk.len() / SECTOR_SIZE).to_le_bytes()); // capacity
        c.extend_from_slice(&SIZE_MAX.to_le_bytes()); // size_max
        c.extend_from_slice(&SEG_MAX.to_le_bytes()); // seg_max
        c.extend_from_slice(&[0; 4]); // geometry
        c.extend_from_slice(&(SECTOR_SIZE as u32).to_le_bytes()); // blk_size
        c.extend_from_slice(&[0; 8]); // topology
        c.extend_from_slice(&[0, 0]); // writeback, unused
        c.extend_from_slice(&1u16.to_le_bytes()); // num_queues
        c.extend_from_slice(&u32::MAX.to_le_bytes()); // max_discard_sectors
        c.extend_from_slice(&MAX_DISCARD_SEGMENTS.to_le_bytes()); // max_discard_seg
        c.extend_from_slice(&8u32.to_le_bytes()); // discard_sector_alignment (4 KiB)
        c.extend_from_slice(&u32::MAX.to_le_bytes()); // max_write_zeroes_sectors
        c.extend_from_slice(&MAX_DISCARD_SEGMENTS.to_le_bytes()); // max_write_zeroes_seg
        c.extend_from_slice(&[1, 0, 0, 0]); // write_zeroes_may_unmap
        VirtioBlock {
            disk,
            info: DiskInfo { read_only, id: serial },
            config: c,
            active: None,
            counters: DeviceCounters::default(),
            limiter,
            more: false,
        }
    }

    /// When the rate limiter holds requests back: how long until it has room again.
    pub fn throttled_for(&self) -> Option<std::time::Duration> {
        self.limiter.as_ref().and_then(|l| l.blocked_for())
    }
}

impl VirtioDevice for VirtioBlock {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let base = VIRTIO_F_VERSION_1 | F_SIZE_MAX | F_SEG_MAX | F_BLK_SIZE | F_FLUSH;
        if self.info.read_only {
            base | F_RO
        } else {
            base | F_DISCARD | F_WRITE_ZEROES
        }
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
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
        let (mut round_bytes, mut round_requests) = (0u64, 0u32);
        self.more = false;
        loop {
            if round_bytes >= ROUND_BYTES || round_requests >= ROUND_REQUESTS {
                self.more = true;
                break;
            }
            if let Some(l) = self.limiter.as_mut() {
                if !l.has_room() {
                    self.counters.throttled.fetch_add(1, Ordering::Relaxed);
                    break;
                }
            }
            let Some(chain) = a.queue.pop_descriptor_chain(&a.mem) else { break };
            let head = chain.head_index();
            let Outcome { used_len, status, bytes } =
                handler::handle_chain(&a.mem, chain, self.disk.as_mut(), &self.info);
            if let Some(l) = self.limiter.as_mut() {
                l.consume(1, bytes);
            }
            round_bytes += bytes;
            round_requests += 1;
            self.counters.requests.fetch_add(1, Ordering::Relaxed);
            self.counters.bytes.fetch_add(bytes, Ordering::Relaxed);
            if status != Some(handler::S_OK) {
                self.counters.errors.fetch_add(1, Ordering::Relaxed);
            }
            if a.queue.add_used(&a.mem, head, used_len).is_err() {
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
        self.more = false;
    }

    fn has_more_work(&self) -> bool {
        self.more && self.active.is_some()
    }

    fn update(&mut self, update: super::DeviceUpdate) -> Result<bool, String> {
        let super::DeviceUpdate::Block { disk, limiter } = update else {
            return Err("not a block device update".into());
        };
        if let Some(l) = limiter {
            self.limiter = l.as_ref().map(RateLimiter::new);
        }
        let Some(disk) = disk else { return Ok(false) };
        // Requests already taken finished on the old file (they run to completion on this
        // thread); the next ones go to the new file, whose capacity the driver re-reads.
        self.config[..8].copy_from_slice(&(disk.len() / SECTOR_SIZE).to_le_bytes());
        self.disk = disk;
        Ok(true)
    }

    fn counters(&self) -> &DeviceCounters {
        &self.counters
    }

    fn active_queues(&self) -> &[Queue] {
        self.active.as_ref().map_or(&[], |a| std::slice::from_ref(&a.queue))
    }

    fn throttled_for(&self) -> Option<std::time::Duration> {
        VirtioBlock::throttled_for(self)
    }
}

#[cfg(test)]
mod tests {
    use super::handler::*;
    use super::*;
    use crate::devices::virtio::testing::{memory, TestQueue, F_NEXT, F_WRITE};
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    const HDR: u64 = 0x10000;
    const DATA: u64 = 0x20000;
    const STATUS: u64 = 0x30000;

    fn device(mem: &GuestMemoryMmap, q: &TestQueue, disk: MemDisk, ro: bool) -> VirtioBlock {
        let mut dev = VirtioBlock::new(Box::new(disk), ro, "shoal-disk-0", None);
        let queue = q.queue(QUEUE_SIZE);
        let irq = Arc::new(IrqLine::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        dev.activate(mem.clone(), vec![queue], irq, VIRTIO_F_VERSION_1).unwrap();
        dev
    }

    fn header(mem: &GuestMemoryMmap, kind: u32, sector: u64) {
        mem.write_obj(kind, GuestAddress(HDR)).unwrap();
        mem.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
        mem.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
        mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    }

    fn status(mem: &GuestMemoryMmap) -> u8 {
        mem.read_obj(GuestAddress(STATUS)).unwrap()
    }

    fn disk() -> MemDisk {
        MemDisk { data: vec![0; 64 * 512], flushes: 0 }
    }

    #[test]
    fn write_then_read_back_a_pattern() {
        let mem = memory();
        let q = TestQueue::new(&mem, 0x1000, 16);
        let mut dev = device(&mem, &q, disk(), false);
        let pattern: Vec<u8> = (0..1024).map(|i| (i * 7 % 251) as u8).collect();
        mem.write_slice(&pattern, GuestAddress(DATA)).unwrap();
        header(&mem, T_OUT, 3);
        q.add_chain(&mem, &[(HDR, 16, false), (DATA, 1024, false), (STATUS, 1, true)]);
        dev.process_queue(0);
        assert_eq!((status(&mem), q.used_elem(&mem, 0).1), (S_OK, 1));

        mem.write_slice(&[0u8; 1024], GuestAddress(DATA)).unwrap();
        header(&mem, T_IN, 3);
        q.add_chain(&mem, &[(HDR, 16, false), (DATA, 512, true), (DATA + 512, 512, true), (STATUS, 1, true)]);
        dev.process_queue(0);
        assert_eq!((status(&mem), q.used_elem(&mem, 1).1), (S_OK, 1025));
        let mut back = vec![0u8; 1024];
        mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
        assert_eq!(back, pattern);
        assert_eq!(dev.counters().bytes.load(Ordering::Relaxed), 2048);
    }

    #[test]
    fn flush_get_id_discard_and_unknown_types() {
        let mem = memory();
        let q = TestQueue::new(&mem, 0x1000, 16);
        let mut d = disk();
        d.data.fill(0xee);
        let mut dev = device(&mem, &q, d, false);
        header(&mem, T_FLUSH, 0);
        q.add_chain(&mem, &[(HDR, 16, false), (STATUS, 1, true)]);
        dev.process_queue(0);
        assert_eq!(status(&mem), S_OK);
        header(&mem, T_GET_ID, 0);
        q.add_chain(&mem, &[(HDR, 16, false), (DATA, 20, true), (STATUS, 1, true)]);
        dev.process_queue(0);
        let mut id = [0u8; 20];
        mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id[..12], b"shoal-disk-0");
        // Discard sectors 2..4, then read them back as zeros.
        header(&mem, T_DISCARD, 0);
        mem.write_obj(2u64, GuestAddress(DATA)).unwrap();
        mem.write_obj(2u32, GuestAddress(DATA + 8)).unwrap();
        mem.write_obj(0u32, GuestAddress(DATA + 12)).unwrap();
        q.add_chain(&mem, &[(HDR, 16, false), (DATA, 16, false), (STATUS, 1, true)]);
        dev.process_queue(0);
        assert_eq!(status(&mem), S_OK);
        header(&mem, T_IN, 1);
        q.add_chain(&mem, &[(HDR, 16, false), (DATA, 4 * 512, true), (STATUS, 1, true)]);
        dev.process_queue(0);
        let mut b = vec![0u8; 4 * 512];
        mem.read_slice(&mut b, GuestAddress(DATA)).unwrap();
        assert!(
            b[..512].iter().all(|&x| x == 0xee)
                && b[512..1536].iter().all(|&x| x == 0)
                && b[1536..].iter().all(|&x| x == 0xee)
        );
        header(&mem, 99, 0);
        q.add_chain(&mem, &[(HDR, 16, false), (STATUS, 1, true)]);
        dev.process_queue(0);
        assert_eq!(status(&mem), S_UNSUPP);
    }

    #[test]
    fn a_read_only_disk_refuses_writes_and_keeps_its_data() {
        let mem = memory();
        let q = TestQueue::new(&mem, 0x1000, 16);
        let mut dev = device(&mem, &q, disk(), true);
        assert_ne!(dev.features() & F_RO, 0);
        mem.write_slice(&[0x55u8; 512], GuestAddress(DATA)).unwrap();
        for kind in [T_OUT, T_DISCARD, T_WRITE_ZEROES] {
            header(&mem, kind, 0);
            q.add_chain(&mem, &[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)]);
            dev.process_queue(0);
            assert_eq!(status(&mem), S_IOERR, "type {kind}");
        }
        header(&mem, T_IN, 0);
        q.add_chain(&mem, &[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)]);
        dev.process_queue(0);
        let mut b = [0x55u8; 512];
        mem.read_slice(&mut b, GuestAddress(DATA)).unwrap();
        assert_eq!(b, [0u8; 512], "the disk still reads zeros");
    }

    #[test]
    fn hostile_chains_get_an_error_status_or_are_dropped_and_counted() {
        let mem = memory();
        let q = TestQueue::new(&mem, 0x1000, 16);
        let mut dev = device(&mem, &q, disk(), false);
        let end = 16u64 << 20;
        // 1. Read past the end of the disk.
        header(&mem, T_IN, 63);
        q.add_chain(&mem, &[(HDR, 16, false), (DATA, 1024, true), (STATUS, 1, true)]);
        // 2. Sector number that overflows when turned into bytes.
        header(&mem, T_OUT, u64::MAX / 2);
        q.add_chain(&mem, &[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)]);
        dev.process_queue(0);
        assert_eq!(q.used_idx(&mem), 2);
        assert_eq!(status(&mem), S_IOERR);
        // 3. Data buffer outside guest memory: dropped (no status can be trusted).
        header(&mem, T_IN, 0);
        q.add_chain(&mem, &[(HDR, 16, false), (end - 256, 512, true), (STATUS, 1, true)]);
        // 4. No writable status byte at all.
        q.add_chain(&mem, &[(HDR, 16, false)]);
        // 5. Header too short.
        q.add_chain(&mem, &[(HDR, 8, false), (STATUS, 1, true)]);
        // 6. A loop in the chain.
        q.write_desc(&mem, 12, HDR, 16, F_NEXT, 13);
        q.write_desc(&mem, 13, DATA, 512, F_NEXT | F_WRITE, 12);
        q.publish(&mem, 12);
        // 7. Descriptor index beyond the table.
        q.write_desc(&mem, 14, HDR, 16, F_NEXT, 200);
        q.publish(&mem, 14);
        // 8. Length that does not fit: 4 GiB - 1 claimed.
        header(&mem, T_IN, 0);
        q.add_chain(&mem, &[(HDR, 16, false), (DATA, u32::MAX, true), (STATUS, 1, true)]);
        dev.process_queue(0);
        assert_eq!(q.used_idx(&mem), 8, "every chain is returned");
        for i in 2..8 {
            assert!(q.used_elem(&mem, i).1 <= 1, "chain {i} wrote {} bytes", q.used_elem(&mem, i).1);
        }
        assert!(dev.counters().errors.load(Ordering::Relaxed) >= 7);
        // The device still works.
        header(&mem, T_FLUSH, 0);
        q.add_chain(&mem, &[(HDR, 16, false), (STATUS, 1, true)]);
        dev.process_queue(0);
        assert_eq!(status(&mem), S_OK);
    }

    #[test]
    fn a_request_beyond_size_max_times_seg_max_is_refused_and_changes_nothing() {
        let mem = memory();
        let q = TestQueue::new(&mem, 0x1000, QUEUE_SIZE);
        let big = MemDisk { data: vec![0; 16 << 20], flushes: 0 };
        let mut dev = device(&mem, &q, big, false);
        mem.write_slice(&[0x5au8; 1 << 20], GuestAddress(DATA)).unwrap();
        // 9 MiB in nine descriptors: more than seg_max × size_max (7.9 MiB) allows.
        header(&mem, T_OUT, 0);
        let mut bufs = vec![(HDR, 16, false)];
        bufs.extend((0..9).map(|_| (DATA, 1 << 20, false)));
        bufs.push((STATUS, 1, true));
        q.add_chain(&mem, &bufs);
        dev.process_queue(0);
        assert_eq!((status(&mem), dev.counters().bytes.load(Ordering::Relaxed)), (S_IOERR, 0));
        // (A chain longer than seg_max + 2 cannot be built: the queue holds 256 descriptors
        // and no indirect tables are offered.)
        // The largest request the device offers works.
        header(&mem, T_IN, 0);
        let mut bufs = vec![(HDR, 16, false)];
        bufs.extend((0..SEG_MAX).map(|i| (DATA + u64::from(i) * u64::from(SIZE_MAX), SIZE_MAX, true)));
        bufs.push((STATUS, 1, true));
        q.add_chain(&mem, &bufs);
        dev.process_queue(0);
        assert_eq!((status(&mem), q.used_elem(&mem, 1).1), (S_OK, SEG_MAX * SIZE_MAX + 1));
        let mut back = [0xffu8; 4096];
        mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
        assert_eq!(back, [0u8; 4096], "the refused write changed nothing");
    }

    #[test]
    fn one_turn_moves_a_bounded_amount_and_asks_to_be_called_again() {
        let mem = memory();
        let q = TestQueue::new(&mem, 0x1000, QUEUE_SIZE);
        let big = MemDisk { data: vec![0; 16 << 20], flushes: 0 };
        let mut dev = device(&mem, &q, big, false);
        // 60 reads of 2 MiB each (two 1 MiB segments): 120 MiB queued at once.
        header(&mem, T_IN, 0);
        for _ in 0..60 {
            let mut bufs = vec![(HDR, 16, false)];
            bufs.extend((0..2).map(|i| (DATA + i * (1 << 20), 1 << 20, true)));
            bufs.push((STATUS, 1, true));
            q.add_chain(&mem, &bufs);
        }
        let mut turns = 0;
        loop {
            dev.process_queue(0);
            turns += 1;
            if !dev.has_more_work() {
                break;
            }
            assert!(u64::from(q.used_idx(&mem)) * (2 << 20) <= turns * ROUND_BYTES, "turn {turns}");
        }
        assert_eq!((q.used_idx(&mem), turns), (60, 8));
        assert_eq!(dev.counters().bytes.load(Ordering::Relaxed), 120 << 20);
    }

    #[test]
    fn a_new_backing_file_serves_the_next_requests_and_reports_its_capacity() {
        let mem = memory();
        let q = TestQueue::new(&mem, 0x1000, 16);
        let mut dev = device(&mem, &q, disk(), false);
        let mut bigger = MemDisk { data: vec![0x77; 128 * 512], flushes: 0 };
        bigger.data[512..1024].fill(0x42);
        let update = crate::devices::virtio::DeviceUpdate::Block { disk: Some(Box::new(bigger)), limiter: None };
        assert_eq!(dev.update(update), Ok(true));
        let mut c = [0u8; 8];
        dev.read_config(0, &mut c);
        assert_eq!(u64::from_le_bytes(c), 128);
        header(&mem, T_IN, 1);
        q.add_chain(&mem, &[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)]);
        dev.process_queue(0);
        let mut b = [0u8; 512];
        mem.read_slice(&mut b, GuestAddress(DATA)).unwrap();
        assert_eq!((status(&mem), b), (S_OK, [0x42; 512]));
        // A limiter set and removed again; a net update is refused.
        let bw = crate::devices::rate_limiter::RateLimitConfig {
            bandwidth: Some(crate::devices::rate_limiter::BucketConfig {
                size: 1,
                one_time_burst: 0,
                refill_time: 1000,
            }),
            ops: None,
        };
        let set = crate::devices::virtio::DeviceUpdate::Block { disk: None, limiter: Some(Some(bw)) };
        assert_eq!(dev.update(set), Ok(false));
        dev.limiter.as_mut().unwrap().consume(1, 512);
        assert!(dev.throttled_for().is_some());
        let clear = crate::devices::virtio::DeviceUpdate::Block { disk: None, limiter: Some(None) };
        assert_eq!(dev.update(clear), Ok(false));
        assert!(dev.throttled_for().is_none());
        assert!(dev.update(crate::devices::virtio::DeviceUpdate::Net { rx: None, tx: None }).is_err());
    }

    #[test]
    fn config_space_reports_capacity() {
        let dev = VirtioBlock::new(Box::new(disk()), false, "x", None);
        assert_ne!(dev.features() & (F_SIZE_MAX | F_SEG_MAX), 0);
        let mut c = [0u8; 8];
        dev.read_config(0, &mut c);
        assert_eq!(u64::from_le_bytes(c), 64);
        let mut limits = [0u8; 8];
        dev.read_config(8, &mut limits);
        assert_eq!(limits, [SIZE_MAX.to_le_bytes(), SEG_MAX.to_le_bytes()].concat()[..]);
        let mut far = [0xffu8; 4];
        dev.read_config(4096, &mut far);
        assert_eq!(far, [0; 4]);
    }
}
