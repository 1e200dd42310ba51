//! Run statistics printed by `--stats` as one JSON line on stderr when the VM ends: what the
//! benchmarks need to separate the VMM's own footprint from the guest's memory.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::vstate::memory::GuestMemoryMmap;
use serde::Serialize;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::vstate::vcpu::VcpuCounters;

/// The figures of one run.
#[derive(Debug, Serialize)]
pub struct RunStats {
    /// Peak resident set of the process since its exec (VmHWM), KiB.
    pub peak_rss_kib: u64,
    /// Guest memory pages resident at the end of the run, KiB.
    pub guest_resident_kib: u64,
    /// Exits to user space per vCPU.
    pub vcpu_exits: Vec<u64>,
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(v).unwrap_or(4096)
}

/// Resident guest memory in KiB, counted with mincore over each region's host mapping.
pub fn guest_resident_kib(mem: &GuestMemoryMmap) -> u64 {
    let page = page_size();
    let mut pages = 0u64;
    for region in mem.iter() {
        let Ok(host) = mem.get_host_address(region.start_addr()) else { continue };
        let len = region.len();
        let mut vec = vec![0u8; len.div_ceil(page) as usize];
        // SAFETY: `host..host+len` is one mapping owned by guest memory; `vec` has one byte
        // per page of it, as mincore requires.
        let rc = unsafe { libc::mincore(host.cast(), len as usize, vec.as_mut_ptr()) };
        if rc == 0 {
            pages += vec.iter().filter(|b| **b & 1 != 0).count() as u64;
        }
    }
    pages * page / 1024
}

/// Peak RSS of this process in KiB: VmHWM, the high-water mark of this address space.
/// (getrusage's ru_maxrss is no good here: Linux carries it across execve, so a VMM spawned by
/// a big parent would report the parent's peak.)
pub fn peak_rss_kib() -> u64 {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else { return 0 };
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

pub fn collect(mem: &GuestMemoryMmap, counters: &[Arc<VcpuCounters>]) -> RunStats {
    RunStats {
        peak_rss_kib: peak_rss_kib(),
        guest_resident_kib: guest_resident_kib(mem),
        vcpu_exits: counters.iter().map(|c| c.exits.load(Ordering::Relaxed)).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::memory::create_guest_memory;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn touched_guest_pages_are_counted() {
        let mem = create_guest_memory(16 << 20).unwrap();
        assert_eq!(guest_resident_kib(&mem), 0, "nothing touched yet");
        // One byte in each of 5 separate 2 MiB blocks: each costs a 4 KiB page, or a 2 MiB
        // page where transparent huge pages back guest memory.
        for i in 0..5u64 {
            mem.write_obj(1u8, GuestAddress(i * (2 << 20) + 4096)).unwrap();
        }
        let kib = guest_resident_kib(&mem);
        assert!((5 * 4..=5 * 2048).contains(&kib), "{kib} KiB resident");
        assert!(peak_rss_kib() > 0);
    }
}
