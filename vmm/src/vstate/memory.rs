//! Guest memory: anonymous, lazily populated mappings, each with an inaccessible guard page on
//! both sides so that a VMM bug that runs off a region faults instead of touching other data.
//! Regions start 2 MiB-aligned and ask for transparent huge pages: KVM can then map the guest
//! with 2 MiB pages, and a guest touching its memory takes one nested page fault per 2 MiB
//! instead of one per 4 KiB (that difference is large when KVM itself runs nested).

use std::num::NonZeroUsize;

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::GuestAddress;

/// Guest memory with a dirty-page bitmap that every write through vm-memory marks: devices
/// write guest memory behind KVM's back, so a diff snapshot takes the union of KVM's dirty log
/// (vCPU writes) and this bitmap (device writes).
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<AtomicBitmap>;
type GuestRegionMmap = vm_memory::GuestRegionMmap<AtomicBitmap>;

use crate::arch::x86_64::memory_regions;

/// Errors creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest memory of {0} MiB is too large for this host's address space")]
    TooLarge(u64),
    #[error("cannot map {size} bytes of guest memory")]
    Mmap {
        size: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot describe guest memory region")]
    Region(#[source] vm_memory::mmap::MmapRegionError),
    #[error("guest memory regions are invalid")]
    Collection(#[source] vm_memory::GuestRegionCollectionError),
}

fn page_size() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(v).unwrap_or(4096)
}

const HUGE_PAGE: usize = 2 << 20;

/// Where guest memory comes from.
#[derive(Debug)]
pub enum MemoryBacking {
    /// Anonymous memory: pages never touched are zero.
    Anonymous,
    /// A snapshot's memory file mapped private (copy-on-write): pages the guest has not written
    /// are the file's.
    File { path: std::path::PathBuf, file: std::fs::File },
}

/// Maps `size` bytes at a 2 MiB-aligned address with at least one PROT_NONE guard page before
/// and after: anonymous memory, or `file` from `offset` mapped private (reads come from the
/// file lazily, writes stay in this process). The mapping lives as long as the process (the
/// microVM), so it is deliberately never unmapped.
fn map_guarded(size: usize, file: Option<(std::os::fd::RawFd, u64)>) -> Result<*mut u8, MemoryError> {
    let page = page_size();
    // Room to slide the region up to the next 2 MiB boundary while keeping a guard page below.
    let total = size.checked_add(HUGE_PAGE + 2 * page).ok_or(MemoryError::TooLarge((size >> 20) as u64))?;
    // SAFETY: a fresh anonymous reservation; no existing mapping is affected.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            total,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(MemoryError::Mmap { size: size as u64, source: std::io::Error::last_os_error() });
    }
    let start = (base as usize + page).next_multiple_of(HUGE_PAGE);
    let offset = start - base as usize;
    // Offset <= 2 MiB + page and offset + size + page <= total: a guard page stays on each side.
    let (flags, fd, file_offset) = match file {
        None => (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED, -1, 0),
        Some((fd, off)) => {
            let off = libc::off_t::try_from(off).map_err(|_| MemoryError::TooLarge((size >> 20) as u64))?;
            (libc::MAP_PRIVATE | libc::MAP_NORESERVE | libc::MAP_FIXED, fd, off)
        }
    };
    // SAFETY: MAP_FIXED replaces only part of the reservation just made, known to nobody else.
    let mem = unsafe {
        libc::mmap(
            base.cast::<u8>().add(offset).cast(),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            fd,
            file_offset,
        )
    };
    if mem == libc::MAP_FAILED {
        let err = std::io::Error::last_os_error();
        // The reservation made above is referenced by nothing.
        // SAFETY: unmapping exactly that reservation.
        unsafe { libc::munmap(base, total) };
        return Err(MemoryError::Mmap { size: size as u64, source: err });
    }
    if file.is_none() {
        // SAFETY: advice on the mapping just made; failure (THP disabled) only loses the speed-up.
        unsafe { libc::madvise(mem, size, libc::MADV_HUGEPAGE) };
    }
    Ok(mem.cast())
}

/// Creates guest RAM of `mem_size` bytes laid out for x86_64 (split around the MMIO gap).
pub fn create_guest_memory(mem_size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    map_layout(mem_size, None)
}

/// Guest RAM of `mem_size` bytes mapped private from `file`, whose bytes are the regions of
/// `memory_regions(mem_size)` one after the other (the snapshot memory file layout). Nothing
/// is read now: the guest faults pages in from the file as it touches them.
pub fn map_guest_memory_file(mem_size: u64, file: &std::fs::File) -> Result<GuestMemoryMmap, MemoryError> {
    use std::os::fd::AsRawFd;
    map_layout(mem_size, Some(file.as_raw_fd()))
}

/// Total bytes of guest RAM in `mem`.
pub fn total_size(mem: &GuestMemoryMmap) -> u64 {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    mem.iter().map(|r| r.len()).sum()
}

fn map_layout(mem_size: u64, file: Option<std::os::fd::RawFd>) -> Result<GuestMemoryMmap, MemoryError> {
    let mut regions = Vec::new();
    let mut file_offset = 0u64;
    for (addr, size) in memory_regions(mem_size) {
        let len = size;
        let size = usize::try_from(size).map_err(|_| MemoryError::TooLarge(mem_size >> 20))?;
        let ptr = map_guarded(size, file.map(|fd| (fd, file_offset)))?;
        file_offset += len;
        let page = NonZeroUsize::new(page_size()).unwrap_or(NonZeroUsize::MIN);
        let bitmap = AtomicBitmap::new(size, page);
        // SAFETY: `ptr` points to `size` bytes mapped read-write above that stay mapped for the
        // life of the process.
        let region = unsafe { MmapRegionBuilder::new_with_bitmap(size, bitmap).with_raw_mmap_pointer(ptr) }
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE)
            .build()
            .map_err(MemoryError::Region)?;
        regions.push(GuestRegionMmap::new(region, addr).ok_or(MemoryError::TooLarge(mem_size >> 20))?);
    }
    GuestMemoryMmap::from_regions(regions).map_err(MemoryError::Collection)
}

/// Takes (and clears) the pages devices wrote since the last call, one bitmap per region in KVM's
/// dirty-log layout (bit n of the region's words = its page n).
pub fn take_device_dirty(mem: &GuestMemoryMmap) -> Vec<Vec<u64>> {
    use vm_memory::GuestMemoryBackend;
    mem.iter()
        .map(|r| {
            let mapping: &vm_memory::MmapRegion<AtomicBitmap> = r;
            mapping.bitmap().get_and_reset()
        })
        .collect()
}

/// Guest address of the first byte after the highest region.
pub fn guest_end(mem: &GuestMemoryMmap) -> GuestAddress {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    mem.iter().map(|r| r.last_addr().0 + 1).max().map(GuestAddress).unwrap_or(GuestAddress(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

    #[test]
    fn writes_through_vm_memory_are_marked_dirty_and_taking_them_clears_them() {
        use vm_memory::Bytes;
        let mem = create_guest_memory(64 << 20).unwrap();
        let _ = take_device_dirty(&mem);
        mem.write_obj(0xabu8, GuestAddress(0x5000)).unwrap();
        mem.write_slice(&[1u8; 8192], GuestAddress(0x10_0ff8)).unwrap();
        let dirty = take_device_dirty(&mem);
        let pages: Vec<u64> = (0..64 * 64)
            .filter(|p| dirty[0].get((p / 64) as usize).is_some_and(|w| w & (1 << (p % 64)) != 0))
            .collect();
        assert_eq!(pages, vec![5, 0x100, 0x101, 0x102]);
        assert!(take_device_dirty(&mem).iter().flatten().all(|w| *w == 0), "taken means cleared");
    }

    #[test]
    fn regions_start_on_2_mib_boundaries() {
        let mem = create_guest_memory(64 << 20).unwrap();
        for region in mem.iter() {
            let host = mem.get_host_address(region.start_addr()).unwrap() as usize;
            assert_eq!(host % HUGE_PAGE, 0);
        }
    }

    #[test]
    fn memory_is_usable_and_split_at_the_gap() {
        let mem = create_guest_memory(64 << 20).unwrap();
        mem.write_obj(0xdead_beefu32, GuestAddress(0x1000)).unwrap();
        assert_eq!(mem.read_obj::<u32>(GuestAddress(0x1000)).unwrap(), 0xdead_beef);
        assert!(mem.write_obj(1u8, GuestAddress(64 << 20)).is_err(), "past the end is an error, not a fault");
        let big = create_guest_memory(4 << 30).unwrap();
        assert_eq!(big.num_regions(), 2);
        assert_eq!(guest_end(&big), GuestAddress((4u64 << 30) + (1 << 30)));
    }
}
