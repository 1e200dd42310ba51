//! virtio-balloon (virtio 1.2, 5.5), as Firecracker offers it: the host sets a target size
//! (`num_pages` in config space, from `amount_mib`), the driver inflates the balloon by handing
//! pages over on the inflate queue, and the VMM gives their memory back to the host
//! (`MADV_DONTNEED`: the VMM's RSS drops; a page the guest touches again reads as zeros, or as
//! the snapshot's data for a VM restored from a memory file; the guest gave it up, so either
//! does). Dropped pages are not in KVM's dirty log: a diff snapshot keeps their old data. The
//! deflate queue only acknowledges: a page comes back when the guest touches it. With
//! `deflate_on_oom` the driver may take pages back under memory pressure
//! (VIRTIO_BALLOON_F_DEFLATE_ON_OOM); with a statistics interval the device offers the stats
//! queue and asks the driver for new statistics every interval by returning its buffer.
//!
//! Every PFN comes from the guest and is checked against guest memory; a chain carries at
//! most `MAX_PFNS_PER_CHAIN` of them, so one request costs bounded work.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use std::io::Read;
use virtio_queue::{Queue, QueueT};

use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use super::{ActivateError, DeviceCounters, DeviceUpdate, IrqLine, VirtioDevice, VIRTIO_F_VERSION_1};
use crate::vstate::memory::GuestMemoryMmap;

pub const TYPE_BALLOON: u32 = 5;
const F_STATS_VQ: u64 = 1 << 1;
const F_DEFLATE_ON_OOM: u64 = 1 << 2;
const QUEUE_SIZE: u16 = 256;
const INFLATE: usize = 0;
const DEFLATE: usize = 1;
const STATS: usize = 2;
/// Balloon pages are 4 KiB whatever the guest's page size (the spec's PFN unit).
pub const PAGE: u64 = 4096;
/// Linux hands over 256 PFNs per buffer; more than 4096 in one chain is a hostile driver's.
const MAX_PFNS_PER_CHAIN: usize = 4096;
/// Most statistics entries read from one buffer (the spec defines 10 tags).
const MAX_STATS: usize = 32;

pub use shoal_vmm_config::BalloonConfig;

/// The guest's memory statistics (virtio 1.2, 5.5.6.3), with Firecracker's names.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestStats {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub swap_in: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub swap_out: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub major_faults: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub minor_faults: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub free_memory: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total_memory: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub available_memory: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk_caches: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hugetlb_allocations: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hugetlb_failures: Option<u64>,
}

impl GuestStats {
    fn set(&mut self, tag: u16, value: u64) -> bool {
        let field = match tag {
            0 => &mut self.swap_in,
            1 => &mut self.swap_out,
            2 => &mut self.major_faults,
            3 => &mut self.minor_faults,
            4 => &mut self.free_memory,
            5 => &mut self.total_memory,
            6 => &mut self.available_memory,
            7 => &mut self.disk_caches,
            8 => &mut self.hugetlb_allocations,
            9 => &mut self.hugetlb_failures,
            _ => return false,
        };
        *field = Some(value);
        true
    }
}

/// What the balloon has done, for `GET /balloon/statistics` and the counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BalloonStatus {
    pub target_pages: u32,
    pub actual_pages: u32,
    /// Pages given back to the host since the device started.
    pub inflated_pages: u64,
    pub deflated_pages: u64,
    /// The latest statistics the driver reported, if statistics are on and it has.
    pub stats: Option<GuestStats>,
}

struct Active {
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    irq: Arc<IrqLine>,
}

/// The balloon device.
pub struct VirtioBalloon {
    config: BalloonConfig,
    target_pages: u32,
    /// The driver's `actual` field: pages it says the balloon holds.
    actual_pages: u32,
    queue_sizes: Vec<u16>,
    active: Option<Active>,
    counters: DeviceCounters,
    inflated: u64,
    deflated: u64,
    /// The statistics buffer the driver posted, held until the next request for statistics.
    stats_head: Option<u16>,
    stats_due: Option<Instant>,
    stats: Option<GuestStats>,
}

impl std::fmt::Debug for VirtioBalloon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioBalloon").field("config", &self.config).field("actual", &self.actual_pages).finish()
    }
}

/// Pages in `mib` MiB.
pub fn pages_of(mib: u32) -> u32 {
    mib.saturating_mul((1 << 20) / PAGE as u32)
}

impl VirtioBalloon {
    pub fn new(config: BalloonConfig) -> VirtioBalloon {
        let queues = if config.stats_polling_interval_s > 0 { 3 } else { 2 };
        VirtioBalloon {
            config,
            target_pages: pages_of(config.amount_mib),
            actual_pages: 0,
            queue_sizes: vec![QUEUE_SIZE; queues],
            active: None,
            counters: DeviceCounters::default(),
            inflated: 0,
            deflated: 0,
            stats_head: None,
            stats_due: None,
            stats: None,
        }
    }

    pub fn status(&self) -> BalloonStatus {
        BalloonStatus {
            target_pages: self.target_pages,
            actual_pages: self.actual_pages,
            inflated_pages: self.inflated,
            deflated_pages: self.deflated,
            stats: self.stats,
        }
    }

    fn interval(&self) -> Option<Duration> {
        (self.config.stats_polling_interval_s > 0)
            .then(|| Duration::from_secs(self.config.stats_polling_interval_s.into()))
    }

    /// Reads the PFNs of one chain (at most MAX_PFNS_PER_CHAIN) into `pfns`.
    fn read_pfns(
        mem: &GuestMemoryMmap,
        chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>,
        pfns: &mut Vec<u32>,
    ) -> bool {
        pfns.clear();
        let Ok(mut reader) = chain.reader(mem) else { return false };
        let total = reader.available_bytes() / 4;
        for _ in 0..total.min(MAX_PFNS_PER_CHAIN) {
            match reader.read_obj::<u32>() {
                Ok(pfn) => pfns.push(pfn),
                Err(_) => return false,
            }
        }
        total <= MAX_PFNS_PER_CHAIN
    }

    /// Gives the pages back to the host, coalescing runs of consecutive PFNs into one
    /// madvise each. Returns the pages given back; PFNs outside guest memory are skipped.
    fn discard(mem: &GuestMemoryMmap, pfns: &mut [u32]) -> (u64, u64) {
        pfns.sort_unstable();
        let (mut done, mut bad) = (0u64, 0u64);
        let mut i = 0;
        while i < pfns.len() {
            let start = pfns[i];
            let mut end = i + 1;
            while end < pfns.len() && pfns[end] <= pfns[end - 1].saturating_add(1) {
                end += 1;
            }
            let pages = u64::from(pfns[end - 1] - start) + 1;
            let gpa = GuestAddress(u64::from(start) * PAGE);
            let len = pages * PAGE;
            // The whole run must be one mapped region of guest memory.
            match mem.get_slice(gpa, len as usize) {
                Ok(slice) => {
                    let host = slice.ptr_guard_mut().as_ptr();
                    // The range is guest RAM the driver gave up; dropping it only zeroes
                    // pages the guest may no longer rely on.
                    // SAFETY: madvise on a range inside one mapping of our own guest memory;
                    // no Rust reference to that memory is held across the call.
                    let r = unsafe { libc::madvise(host.cast(), len as usize, libc::MADV_DONTNEED) };
                    if r == 0 {
                        done += pages;
                    } else {
                        bad += pages;
                    }
                }
                Err(_) => bad += pages,
            }
            i = end;
        }
        (done, bad)
    }

    fn process_pages(&mut self, index: usize) {
        let Some(a) = self.active.as_mut() else { return };
        let mut pfns = Vec::new();
        let mut used_any = false;
        while let Some(chain) = a.queues[index].pop_descriptor_chain(&a.mem) {
            let head = chain.head_index();
            let whole = Self::read_pfns(&a.mem, chain, &mut pfns);
            if !whole {
                self.counters.errors.fetch_add(1, Ordering::Relaxed);
            }
            self.counters.requests.fetch_add(1, Ordering::Relaxed);
            if index == INFLATE {
                let (done, bad) = Self::discard(&a.mem, &mut pfns);
                self.inflated += done;
                if bad > 0 {
                    self.counters.errors.fetch_add(1, Ordering::Relaxed);
                }
                self.counters.bytes.fetch_add(done * PAGE, Ordering::Relaxed);
            } else {
                self.deflated += pfns.len() as u64;
            }
            if a.queues[index].add_used(&a.mem, head, 0).is_err() {
                self.counters.errors.fetch_add(1, Ordering::Relaxed);
            }
            used_any = true;
        }
        if used_any && a.queues[index].needs_notification(&a.mem).unwrap_or(true) {
            a.irq.signal_used();
        }
    }

    /// The stats queue: a newly posted buffer carries the driver's statistics and is held;
    /// once the interval has passed, the held buffer is returned, which asks for new ones.
    fn process_stats(&mut self) {
        let interval = self.interval();
        let Some(a) = self.active.as_mut() else { return };
        let Some(q) = a.queues.get_mut(STATS) else { return };
        if let (Some(head), Some(due)) = (self.stats_head, self.stats_due) {
            if Instant::now() >= due {
                self.stats_head = None;
                self.stats_due = None;
                if q.add_used(&a.mem, head, 0).is_err() {
                    self.counters.errors.fetch_add(1, Ordering::Relaxed);
                }
                if q.needs_notification(&a.mem).unwrap_or(true) {
                    a.irq.signal_used();
                }
            }
        }
        while let Some(chain) = q.pop_descriptor_chain(&a.mem) {
            let head = chain.head_index();
            let mut stats = self.stats.unwrap_or_default();
            if let Ok(mut reader) = chain.reader(&a.mem) {
                let entries = (reader.available_bytes() / 10).min(MAX_STATS);
                for _ in 0..entries {
                    let mut e = [0u8; 10];
                    if reader.read_exact(&mut e).is_err() {
                        break;
                    }
                    let tag = u16::from_le_bytes([e[0], e[1]]);
                    let value = u64::from_le_bytes([e[2], e[3], e[4], e[5], e[6], e[7], e[8], e[9]]);
                    if !stats.set(tag, value) {
                        self.counters.errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            } else {
                self.counters.errors.fetch_add(1, Ordering::Relaxed);
            }
            self.stats = Some(stats);
            self.counters.requests.fetch_add(1, Ordering::Relaxed);
            // A driver that posts a second buffer while one is held gets the older back.
            if let Some(old) = self.stats_head.replace(head) {
                let _ = q.add_used(&a.mem, old, 0);
                a.irq.signal_used();
            }
            self.stats_due = interval.map(|i| Instant::now() + i);
        }
    }
}

impl VirtioDevice for VirtioBalloon {
    fn device_type(&self) -> u32 {
        TYPE_BALLOON
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        let mut f = VIRTIO_F_VERSION_1;
        if self.config.deflate_on_oom {
            f |= F_DEFLATE_ON_OOM;
        }
        if self.config.stats_polling_interval_s > 0 {
            f |= F_STATS_VQ;
        }
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut c = [0u8; 8];
        c[..4].copy_from_slice(&self.target_pages.to_le_bytes());
        c[4..].copy_from_slice(&self.actual_pages.to_le_bytes());
        super::read_config_bytes(&c, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `actual` (bytes 4..8) is the driver's to write, and only whole.
        if offset == 4 && data.len() == 4 {
            self.actual_pages = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        } else {
            self.counters.errors.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        irq: Arc<IrqLine>,
        _acked: u64,
    ) -> Result<(), ActivateError> {
        if queues.len() != self.queue_sizes.len() {
            return Err(ActivateError::BadQueue(queues.len()));
        }
        // A driver that declined statistics leaves the third queue unready: it yields nothing.
        self.active = Some(Active { mem, queues, irq });
        self.stats_head = None;
        self.stats_due = None;
        Ok(())
    }

    fn process_queue(&mut self, index: usize) {
        if self.active.is_none() || index >= self.queue_sizes.len() {
            self.counters.spurious.fetch_add(1, Ordering::Relaxed);
            return;
        }
        match index {
            INFLATE | DEFLATE => self.process_pages(index),
            _ => self.process_stats(),
        }
    }

    fn reset(&mut self) {
        self.active = None;
        self.stats_head = None;
        self.stats_due = None;
        self.actual_pages = 0;
    }

    fn counters(&self) -> &DeviceCounters {
        &self.counters
    }

    fn active_queues(&self) -> &[Queue] {
        self.active.as_ref().map_or(&[], |a| &a.queues)
    }

    fn wakeup_in(&self) -> Option<Duration> {
        let due = self.stats_due?;
        self.stats_head?;
        Some(due.saturating_duration_since(Instant::now()).max(Duration::from_millis(1)))
    }

    fn restored(&mut self) {
        // The statistics buffer the driver posted before the snapshot is still the device's:
        // the one avail entry not yet used. Hold it again and ask for new statistics soon.
        let Some(a) = self.active.as_ref() else { return };
        let Some(q) = a.queues.get(STATS) else { return };
        if q.next_avail() == q.next_used() || q.size() == 0 {
            return;
        }
        let slot = q.next_avail().wrapping_sub(1) % q.size();
        let at = GuestAddress(q.avail_ring()).checked_add(4 + 2 * u64::from(slot));
        if let Some(head) = at.and_then(|at| a.mem.read_obj::<u16>(at).ok()) {
            self.stats_head = Some(head);
            self.stats_due = self.interval().map(|i| Instant::now() + i);
        }
    }

    fn update(&mut self, update: DeviceUpdate) -> Result<bool, String> {
        let DeviceUpdate::Balloon { amount_mib, stats_polling_interval_s } = update else {
            return Err("not a balloon update".into());
        };
        if let Some(s) = stats_polling_interval_s {
            if (s == 0) != (self.config.stats_polling_interval_s == 0) {
                return Err("Statistics cannot be turned on or off after the start.".into());
            }
            self.config.stats_polling_interval_s = s;
            if self.stats_head.is_some() {
                self.stats_due = self.interval().map(|i| Instant::now() + i);
            }
        }
        let Some(mib) = amount_mib else { return Ok(false) };
        self.config.amount_mib = mib;
        let pages = pages_of(mib);
        let changed = pages != self.target_pages;
        self.target_pages = pages;
        Ok(changed)
    }

    fn balloon_status(&self) -> Option<BalloonStatus> {
        Some(self.status())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::testing::{memory, TestQueue};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    fn active(config: BalloonConfig, mem: &GuestMemoryMmap, qs: &[&TestQueue]) -> VirtioBalloon {
        let mut dev = VirtioBalloon::new(config);
        let queues = qs.iter().map(|q| q.queue(QUEUE_SIZE)).collect();
        let irq = Arc::new(IrqLine::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        dev.activate(mem.clone(), queues, irq, dev.features()).unwrap();
        dev
    }

    /// How many of the pages of guest range [gpa, gpa + len) are resident in host RAM.
    fn resident_pages(mem: &GuestMemoryMmap, gpa: u64, len: usize) -> usize {
        let host = mem.get_slice(GuestAddress(gpa), len).unwrap().ptr_guard_mut().as_ptr();
        let mut vec = vec![0u8; len / PAGE as usize];
        // SAFETY: mincore reads the page tables of a range of our own mapping into `vec`,
        // one byte per page, of the length given.
        assert_eq!(unsafe { libc::mincore(host.cast(), len, vec.as_mut_ptr()) }, 0);
        vec.iter().filter(|&&b| b & 1 != 0).count()
    }

    #[test]
    fn inflated_pages_go_back_to_the_host_and_read_as_zeros() {
        let mem = memory();
        let (qi, qd) = (TestQueue::new(&mem, 0x1000, 16), TestQueue::new(&mem, 0x8000, 16));
        let config = BalloonConfig { amount_mib: 4, deflate_on_oom: true, stats_polling_interval_s: 0 };
        let mut dev = active(config, &mem, &[&qi, &qd]);
        assert_eq!(dev.queue_max_sizes().len(), 2);
        assert_ne!(dev.features() & F_DEFLATE_ON_OOM, 0);
        let mut cfg = [0u8; 4];
        dev.read_config(0, &mut cfg);
        assert_eq!(u32::from_le_bytes(cfg), 1024, "4 MiB is 1024 pages");
        // Touch 4 MiB at 8 MiB, then hand those pages over (plus two PFNs beyond memory).
        let base = 8u64 << 20;
        mem.write_slice(&vec![0xabu8; 4 << 20], GuestAddress(base)).unwrap();
        assert_eq!(resident_pages(&mem, base, 4 << 20), 1024);
        let pfns: Vec<u32> = (0..1024).map(|i| (base / PAGE) as u32 + i).chain([u32::MAX, 1 << 30]).collect();
        let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
        mem.write_slice(&bytes, GuestAddress(0x20000)).unwrap();
        qi.add_chain(&mem, &[(0x20000, bytes.len() as u32, false)]);
        dev.process_queue(INFLATE);
        assert_eq!(qi.used_idx(&mem), 1);
        assert_eq!(dev.status().inflated_pages, 1024);
        assert!(dev.counters().errors.load(Ordering::Relaxed) >= 1, "the PFNs outside memory are counted");
        assert_eq!(resident_pages(&mem, base, 4 << 20), 0, "the host got every page back");
        assert_eq!(mem.read_obj::<u64>(GuestAddress(base + 4096 * 7)).unwrap(), 0);
        // The driver reports what it holds; a deflate is acknowledged.
        dev.write_config(4, &1024u32.to_le_bytes());
        assert_eq!(dev.status().actual_pages, 1024);
        qd.add_chain(&mem, &[(0x20000, 64, false)]);
        dev.process_queue(DEFLATE);
        assert_eq!((qd.used_idx(&mem), dev.status().deflated_pages), (1, 16));
        // A new target is a config change.
        let patch = DeviceUpdate::Balloon { amount_mib: Some(1), stats_polling_interval_s: None };
        assert_eq!(dev.update(patch), Ok(true));
        dev.read_config(0, &mut cfg);
        assert_eq!(u32::from_le_bytes(cfg), 256);
    }

    #[test]
    fn statistics_are_read_and_the_buffer_is_returned_each_interval() {
        let mem = memory();
        let qs: Vec<TestQueue> = (0..3).map(|i| TestQueue::new(&mem, 0x1000 + i * 0x4000, 16)).collect();
        let config = BalloonConfig { amount_mib: 0, deflate_on_oom: false, stats_polling_interval_s: 1 };
        let mut dev = active(config, &mem, &[&qs[0], &qs[1], &qs[2]]);
        assert_ne!(dev.features() & F_STATS_VQ, 0);
        let mut entries = Vec::new();
        for (tag, value) in [(4u16, 1000u64), (5, 4096), (77, 1)] {
            entries.extend_from_slice(&tag.to_le_bytes());
            entries.extend_from_slice(&value.to_le_bytes());
        }
        mem.write_slice(&entries, GuestAddress(0x20000)).unwrap();
        qs[2].add_chain(&mem, &[(0x20000, entries.len() as u32, false)]);
        dev.process_queue(STATS);
        let stats = dev.status().stats.unwrap();
        assert_eq!((stats.free_memory, stats.total_memory, stats.swap_in), (Some(1000), Some(4096), None));
        assert_eq!(qs[2].used_idx(&mem), 0, "the buffer is held until the interval passes");
        assert!(dev.wakeup_in().is_some_and(|d| d <= Duration::from_secs(1)));
        dev.process_queue(STATS);
        assert_eq!(qs[2].used_idx(&mem), 0);
        std::thread::sleep(dev.wakeup_in().unwrap() + Duration::from_millis(5));
        dev.process_queue(STATS);
        assert_eq!(qs[2].used_idx(&mem), 1, "returned: the driver is asked for new statistics");
        assert!(dev.wakeup_in().is_none());
        assert!(dev.update(DeviceUpdate::Balloon { amount_mib: None, stats_polling_interval_s: Some(0) }).is_err());

        // A snapshot taken while the device holds the driver's buffer: the restored device
        // finds it again in the ring and returns it one interval later.
        qs[2].add_chain(&mem, &[(0x20000, entries.len() as u32, false)]);
        dev.process_queue(STATS);
        use crate::devices::virtio::mmio::QueueSaved;
        let saved: Vec<Queue> = dev.active_queues().iter().map(|q| QueueSaved::of(q).to_queue().unwrap()).collect();
        let mut restored = VirtioBalloon::new(config);
        let irq = Arc::new(IrqLine::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        restored.activate(mem.clone(), saved, irq, restored.features()).unwrap();
        restored.restored();
        assert!(restored.wakeup_in().is_some(), "the held buffer was found again");
        std::thread::sleep(restored.wakeup_in().unwrap() + Duration::from_millis(5));
        restored.process_queue(STATS);
        assert_eq!(qs[2].used_idx(&mem), 2);
    }
}
