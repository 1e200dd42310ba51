//! x86_64 boot support: memory map, Linux and PVH boot protocols, page tables and GDT, CPUID,
//! MSRs, LAPIC set-up and the MP table. Everything here writes guest memory or builds KVM
//! structures; nothing here touches a vCPU or the VM file descriptor directly, so it is all
//! testable without KVM.

pub mod acpi;
pub mod boot;
pub mod cpuid;
pub mod layout;
pub mod mptable;
pub mod msr;
pub mod regs;

use vm_memory::GuestAddress;

use layout::{EBDA_START, HIMEM_START, MMIO_GAP_END, MMIO_GAP_START};

/// E820 memory types (only those we emit).
pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

/// One entry of the guest's physical memory map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// Guest RAM as (start, size) ranges for `mem_size` bytes: one range below the 32-bit MMIO
/// gap and, for guests larger than the gap start, a second one from 4 GiB.
pub fn memory_regions(mem_size: u64) -> Vec<(GuestAddress, u64)> {
    if mem_size <= MMIO_GAP_START {
        vec![(GuestAddress(0), mem_size)]
    } else {
        vec![(GuestAddress(0), MMIO_GAP_START), (GuestAddress(MMIO_GAP_END), mem_size - MMIO_GAP_START)]
    }
}

/// The E820 map a guest of `mem_size` bytes sees: conventional memory up to the EBDA (where
/// the MP table lives), then RAM from 1 MiB, split around the MMIO gap.
pub fn e820_map(mem_size: u64) -> Vec<E820Entry> {
    let mut map = vec![E820Entry { addr: 0, size: EBDA_START, kind: E820_RAM }];
    let low_end = mem_size.min(MMIO_GAP_START);
    if low_end > HIMEM_START {
        map.push(E820Entry { addr: HIMEM_START, size: low_end - HIMEM_START, kind: E820_RAM });
    }
    if mem_size > MMIO_GAP_START {
        map.push(E820Entry { addr: MMIO_GAP_END, size: mem_size - MMIO_GAP_START, kind: E820_RAM });
    }
    map
}

/// End (exclusive) of the RAM below the MMIO gap: the ceiling for the initrd.
pub fn low_memory_end(mem_size: u64) -> u64 {
    mem_size.min(MMIO_GAP_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_has_one_region_and_two_ram_entries() {
        let mib128 = 128 << 20;
        assert_eq!(memory_regions(mib128), vec![(GuestAddress(0), mib128)]);
        let map = e820_map(mib128);
        assert_eq!(map.len(), 2);
        assert_eq!(map[0], E820Entry { addr: 0, size: EBDA_START, kind: E820_RAM });
        assert_eq!(map[1], E820Entry { addr: HIMEM_START, size: mib128 - HIMEM_START, kind: E820_RAM });
    }

    #[test]
    fn large_guest_is_split_around_the_mmio_gap() {
        let gib4 = 4u64 << 30;
        let regions = memory_regions(gib4);
        assert_eq!(
            regions,
            vec![(GuestAddress(0), MMIO_GAP_START), (GuestAddress(MMIO_GAP_END), gib4 - MMIO_GAP_START)]
        );
        let total: u64 = regions.iter().map(|r| r.1).sum();
        assert_eq!(total, gib4, "no guest RAM is lost to the gap");
        let map = e820_map(gib4);
        assert_eq!(map.len(), 3);
        assert_eq!(map[1].addr + map[1].size, MMIO_GAP_START);
        assert_eq!(map[2], E820Entry { addr: MMIO_GAP_END, size: gib4 - MMIO_GAP_START, kind: E820_RAM });
        // Nothing the guest may use overlaps the gap.
        for e in &map {
            assert!(e.addr + e.size <= MMIO_GAP_START || e.addr >= MMIO_GAP_END);
        }
    }

    #[test]
    fn low_memory_end_stops_at_the_gap() {
        assert_eq!(low_memory_end(64 << 20), 64 << 20);
        assert_eq!(low_memory_end(8 << 30), MMIO_GAP_START);
    }
}
