//! Snapshot memory files. A memory file holds the guest's RAM regions one after the other (the
//! layout of `arch::x86_64::memory_regions`), as a sparse file: pages never written are holes.
//!
//! - Full: every page that may be non-zero. For anonymous memory those are the pages the
//!   process has (present or swapped, from /proc/self/pagemap); for memory restored from a
//!   file, the file's data plus the pages the guest has since written (private copies).
//! - Diff: only the pages KVM's dirty log reports written since the previous snapshot; the
//!   state file lists them, and `merge_diff` copies them into the base memory file.
//!
//! Files are written under a temporary name and renamed into place, so a failed snapshot never
//! leaves a half-written file under the requested name (and overwriting the very file a
//! restored guest is mapped from is safe: the mapping keeps the old one).
//! Pages written by the VMM rather than the guest are not in KVM's dirty log: devices that
//! write guest memory must mark what they write (none does yet).

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::vstate::memory::GuestMemoryMmap;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::vstate::memory::{total_size, MemoryBacking};

pub const PAGE: u64 = 4096;
/// pagemap entry bits (Documentation/admin-guide/mm/pagemap.rst).
const PM_PRESENT: u64 = 1 << 63;
const PM_SWAPPED: u64 = 1 << 62;
const PM_FILE: u64 = 1 << 61;
/// pagemap entries read per call.
const PAGEMAP_BATCH: usize = 8192;

/// Errors writing or merging memory files.
#[derive(Debug, thiserror::Error)]
pub enum MemFileError {
    #[error("cannot write memory file {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read this process's page map")]
    Pagemap(#[source] std::io::Error),
    #[error("memory files differ in size: {base} is {base_len} bytes, {diff} is {diff_len}")]
    SizeMismatch { base: PathBuf, base_len: u64, diff: PathBuf, diff_len: u64 },
    #[error("guest memory region at {0:#x} has no host mapping")]
    Unmapped(u64),
    #[error("dirty range {offset:#x}+{len:#x} lies outside the {size}-byte memory file")]
    RangeOutside { offset: u64, len: u64, size: u64 },
}

/// A byte range of a memory file.
pub type Range = (u64, u64);

/// The host address, length and file offset of each guest region, in file order. A region
/// without a host mapping is an error, never a null pointer handed to pwrite or pagemap.
fn regions(mem: &GuestMemoryMmap) -> Result<Vec<(*const u8, u64, u64)>, MemFileError> {
    let mut offset = 0;
    let mut out = Vec::new();
    for region in mem.iter() {
        let host =
            mem.get_host_address(region.start_addr()).map_err(|_| MemFileError::Unmapped(region.start_addr().0))?;
        out.push((host as *const u8, region.len(), offset));
        offset += region.len();
    }
    Ok(out)
}

/// A temporary file next to `path`, renamed onto it by `commit`.
struct Staged {
    tmp: PathBuf,
    path: PathBuf,
    file: File,
}

impl Staged {
    fn create(path: &Path, size: u64) -> Result<Staged, MemFileError> {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
        let err = |source| MemFileError::Write { path: path.to_owned(), source };
        let file = OpenOptions::new().write(true).read(true).create(true).truncate(true).open(&tmp).map_err(err)?;
        file.set_len(size).map_err(err)?;
        Ok(Staged { tmp, path: path.to_owned(), file })
    }

    fn err(&self, source: std::io::Error) -> MemFileError {
        MemFileError::Write { path: self.path.clone(), source }
    }

    /// Writes `len` bytes of guest memory at `host` to file offset `offset`.
    fn write_guest(&self, host: *const u8, len: u64, offset: u64) -> Result<(), MemFileError> {
        let mut done = 0u64;
        while done < len {
            let chunk = (len - done).min(1 << 30) as usize;
            // The vCPUs are paused, and [host, host+len) lies inside one mapped guest region.
            // SAFETY: pwrite only reads that range of our own mapping.
            let n = unsafe {
                libc::pwrite(
                    self.file.as_raw_fd(),
                    host.add(done as usize).cast(),
                    chunk,
                    (offset + done) as libc::off_t,
                )
            };
            if n <= 0 {
                let e = if n == 0 {
                    std::io::Error::from(std::io::ErrorKind::WriteZero)
                } else {
                    std::io::Error::last_os_error()
                };
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(self.err(e));
            }
            done += n as u64;
        }
        Ok(())
    }

    fn commit(self) -> Result<(), MemFileError> {
        std::fs::rename(&self.tmp, &self.path).map_err(|e| self.err(e))
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        // After a commit the temporary name is gone and this fails harmlessly.
        let _ = std::fs::remove_file(&self.tmp);
    }
}

/// Calls `f(first_page, count)` for each run of pages of [host, host+len) whose pagemap entry
/// satisfies `keep`.
fn pagemap_runs(
    pagemap: &File,
    host: *const u8,
    len: u64,
    keep: impl Fn(u64) -> bool,
    mut f: impl FnMut(u64, u64) -> Result<(), MemFileError>,
) -> Result<(), MemFileError> {
    let pages = len / PAGE;
    let first = host as u64 / PAGE;
    let mut buf = vec![0u8; PAGEMAP_BATCH * 8];
    let mut run: Option<(u64, u64)> = None;
    let mut page = 0;
    while page < pages {
        let n = (pages - page).min(PAGEMAP_BATCH as u64) as usize;
        pagemap.read_exact_at(&mut buf[..n * 8], (first + page) * 8).map_err(MemFileError::Pagemap)?;
        for i in 0..n {
            let mut e = [0u8; 8];
            e.copy_from_slice(&buf[i * 8..i * 8 + 8]);
            let p = page + i as u64;
            if keep(u64::from_le_bytes(e)) {
                run = match run {
                    Some((start, count)) if start + count == p => Some((start, count + 1)),
                    Some(r) => {
                        f(r.0, r.1)?;
                        Some((p, 1))
                    }
                    None => Some((p, 1)),
                };
            }
        }
        page += n as u64;
    }
    if let Some(r) = run {
        f(r.0, r.1)?;
    }
    Ok(())
}

/// For anonymous guest memory: the page may hold data (in RAM or in swap); the rest were
/// never touched and read as zeros.
fn anonymous_page_in_use(entry: u64) -> bool {
    entry & (PM_PRESENT | PM_SWAPPED) != 0
}

/// For memory mapped privately from a file: the page is the guest's own copy (written since
/// the restore), in RAM or pushed out to swap, rather than the file's page. A swapped copy
/// must be written too: the file still holds the stale data. (A page cache page under
/// migration shows as swapped with PM_FILE: the file's data, skipped.)
fn private_copy(entry: u64) -> bool {
    entry & (PM_PRESENT | PM_SWAPPED) != 0 && entry & PM_FILE == 0
}

/// Copies the data (not the holes) of `src` into `dst` at the same offsets.
fn copy_data_extents(src: &File, src_path: &Path, dst: &Staged, size: u64) -> Result<(), MemFileError> {
    let rerr = |source| MemFileError::Read { path: src_path.to_owned(), source };
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    while pos < size {
        // SAFETY: lseek on a file we own; no memory is involved.
        let data = unsafe { libc::lseek(src.as_raw_fd(), pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // no data after pos
            }
            return Err(rerr(e));
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(src.as_raw_fd(), data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(rerr(std::io::Error::last_os_error()));
        }
        let (mut at, end) = (data as u64, (hole as u64).min(size));
        while at < end {
            let n = (end - at).min(buf.len() as u64) as usize;
            src.read_exact_at(&mut buf[..n], at).map_err(rerr)?;
            dst.file.write_all_at(&buf[..n], at).map_err(|e| dst.err(e))?;
            at += n as u64;
        }
        pos = end.max(pos + 1);
    }
    Ok(())
}

/// Writes a full memory file of `mem` to `path`. The vCPUs must be paused.
pub fn write_full(mem: &GuestMemoryMmap, backing: &MemoryBacking, path: &Path) -> Result<(), MemFileError> {
    let size = total_size(mem);
    let staged = Staged::create(path, size)?;
    let pagemap = File::open("/proc/self/pagemap").map_err(MemFileError::Pagemap)?;
    let keep: fn(u64) -> bool = match backing {
        MemoryBacking::Anonymous => anonymous_page_in_use,
        MemoryBacking::File { path: src_path, file } => {
            copy_data_extents(file, src_path, &staged, size)?;
            private_copy
        }
    };
    for (host, len, offset) in regions(mem)? {
        pagemap_runs(&pagemap, host, len, keep, |page, count| {
            // page + count <= len / PAGE, so the range stays inside the region.
            staged.write_guest(host.wrapping_add((page * PAGE) as usize), count * PAGE, offset + page * PAGE)
        })?;
    }
    staged.commit()
}

/// Writes the pages `dirty` marks (KVM dirty bitmaps, one per region in order) to a sparse
/// memory file at `path`; returns the byte ranges written.
pub fn write_diff(mem: &GuestMemoryMmap, dirty: &[Vec<u64>], path: &Path) -> Result<Vec<Range>, MemFileError> {
    let size = total_size(mem);
    let staged = Staged::create(path, size)?;
    let mut ranges: Vec<Range> = Vec::new();
    for ((host, len, offset), bitmap) in regions(mem)?.into_iter().zip(dirty) {
        let pages = len / PAGE;
        let mut p = 0;
        while p < pages {
            let set = |p: u64| bitmap.get((p / 64) as usize).is_some_and(|w| w & (1 << (p % 64)) != 0);
            if !set(p) {
                p += 1;
                continue;
            }
            let start = p;
            while p < pages && set(p) {
                p += 1;
            }
            let (at, n) = (offset + start * PAGE, (p - start) * PAGE);
            staged.write_guest(host.wrapping_add((start * PAGE) as usize), n, at)?;
            ranges.push((at, n));
        }
    }
    staged.commit()?;
    Ok(ranges)
}

/// Copies `ranges` of the diff memory file into the base memory file, in place. After this the
/// base memory file goes with the diff's state file.
pub fn merge_diff(base: &Path, diff: &Path, ranges: &[Range]) -> Result<(), MemFileError> {
    let base_file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(base)
        .map_err(|source| MemFileError::Read { path: base.to_owned(), source })?;
    let diff_file = File::open(diff).map_err(|source| MemFileError::Read { path: diff.to_owned(), source })?;
    let base_len = base_file.metadata().map_err(|source| MemFileError::Read { path: base.to_owned(), source })?.len();
    let diff_len = diff_file.metadata().map_err(|source| MemFileError::Read { path: diff.to_owned(), source })?.len();
    if base_len != diff_len {
        return Err(MemFileError::SizeMismatch { base: base.to_owned(), base_len, diff: diff.to_owned(), diff_len });
    }
    // Check every range before changing anything.
    for &(offset, len) in ranges {
        if offset.checked_add(len).is_none_or(|end| end > base_len) {
            return Err(MemFileError::RangeOutside { offset, len, size: base_len });
        }
    }
    let mut buf = vec![0u8; 1 << 20];
    for &(offset, len) in ranges {
        let mut at = offset;
        while at < offset + len {
            let n = (offset + len - at).min(buf.len() as u64) as usize;
            diff_file
                .read_exact_at(&mut buf[..n], at)
                .map_err(|source| MemFileError::Read { path: diff.to_owned(), source })?;
            base_file
                .write_all_at(&buf[..n], at)
                .map_err(|source| MemFileError::Write { path: base.to_owned(), source })?;
            at += n as u64;
        }
    }
    base_file.sync_all().map_err(|source| MemFileError::Write { path: base.to_owned(), source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::memory::{create_guest_memory, map_guest_memory_file};
    use vm_memory::{Bytes, GuestAddress};

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("shoal-memfile-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn pages_in_swap_are_saved_whatever_the_backing() {
        const PFN: u64 = 0x1234;
        const SWAP_ENTRY: u64 = 0x56 << 5 | 3;
        let present_anon = PM_PRESENT | PFN;
        let present_file = PM_PRESENT | PM_FILE | PFN;
        let swapped_anon = PM_SWAPPED | SWAP_ENTRY;
        let migrating_file = PM_SWAPPED | PM_FILE | SWAP_ENTRY;
        let untouched = 0;
        for (entry, anon, file) in [
            (present_anon, true, true),
            // A restored guest's written page that the kernel pushed to swap: losing it would
            // put the file's stale bytes in the snapshot.
            (swapped_anon, true, true),
            (present_file, true, false),
            (migrating_file, true, false),
            (untouched, false, false),
        ] {
            assert_eq!(anonymous_page_in_use(entry), anon, "anonymous memory, entry {entry:#x}");
            assert_eq!(private_copy(entry), file, "file-backed memory, entry {entry:#x}");
        }
    }

    #[test]
    fn a_full_file_holds_what_the_guest_wrote_and_holes_elsewhere() {
        let d = dir("full");
        let mem = create_guest_memory(64 << 20).unwrap();
        mem.write_obj(0x1122_3344u32, GuestAddress(0x5000)).unwrap();
        mem.write_obj(0x5566_7788u32, GuestAddress((64 << 20) - 8)).unwrap();
        let path = d.join("mem");
        write_full(&mem, &MemoryBacking::Anonymous, &path).unwrap();
        let f = File::open(&path).unwrap();
        assert_eq!(f.metadata().unwrap().len(), 64 << 20);
        // Restored from the file, the guest sees the same bytes.
        let back = map_guest_memory_file(64 << 20, &f).unwrap();
        assert_eq!(back.read_obj::<u32>(GuestAddress(0x5000)).unwrap(), 0x1122_3344);
        assert_eq!(back.read_obj::<u32>(GuestAddress((64 << 20) - 8)).unwrap(), 0x5566_7788);
        assert_eq!(back.read_obj::<u32>(GuestAddress(32 << 20)).unwrap(), 0);
        // The file stays sparse: far less than 64 MiB of blocks (THP may round writes up to 2 MiB).
        use std::os::unix::fs::MetadataExt;
        assert!(
            f.metadata().unwrap().blocks() * 512 <= 8 << 20,
            "{} bytes allocated",
            f.metadata().unwrap().blocks() * 512
        );

        // A restored guest writes more; a full snapshot of it has the file's pages and the new ones.
        back.write_obj(0xaabb_ccddu32, GuestAddress(0x9000)).unwrap();
        let again = d.join("mem2");
        write_full(&back, &MemoryBacking::File { path: path.clone(), file: File::open(&path).unwrap() }, &again)
            .unwrap();
        let third = map_guest_memory_file(64 << 20, &File::open(&again).unwrap()).unwrap();
        assert_eq!(third.read_obj::<u32>(GuestAddress(0x5000)).unwrap(), 0x1122_3344);
        assert_eq!(third.read_obj::<u32>(GuestAddress(0x9000)).unwrap(), 0xaabb_ccdd);
        // Writing over the file a guest is mapped from does not change what that guest sees.
        write_full(&third, &MemoryBacking::File { path: again.clone(), file: File::open(&again).unwrap() }, &again)
            .unwrap();
        assert_eq!(third.read_obj::<u32>(GuestAddress(0x9000)).unwrap(), 0xaabb_ccdd);
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 2, "no temporary files left behind");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_diff_holds_only_dirty_pages_and_merges_into_its_base() {
        let d = dir("diff");
        let mem = create_guest_memory(16 << 20).unwrap();
        mem.write_obj(1u64, GuestAddress(0x1000)).unwrap();
        let base = d.join("base");
        write_full(&mem, &MemoryBacking::Anonymous, &base).unwrap();
        mem.write_obj(2u64, GuestAddress(0x1000)).unwrap();
        mem.write_obj(3u64, GuestAddress(0x3000)).unwrap();
        mem.write_obj(4u64, GuestAddress(0x4000)).unwrap();
        // Pages 1, 3 and 4 dirty (as KVM would report them).
        let mut bitmap = vec![0u64; (16 << 20) / PAGE as usize / 64];
        bitmap[0] = 0b11010;
        let diff = d.join("diff");
        let ranges = write_diff(&mem, &[bitmap], &diff).unwrap();
        assert_eq!(ranges, vec![(0x1000, 0x1000), (0x3000, 0x2000)]);
        merge_diff(&base, &diff, &ranges).unwrap();
        let merged = map_guest_memory_file(16 << 20, &File::open(&base).unwrap()).unwrap();
        for (addr, v) in [(0x1000, 2u64), (0x3000, 3), (0x4000, 4)] {
            assert_eq!(merged.read_obj::<u64>(GuestAddress(addr)).unwrap(), v);
        }
        // Ranges outside the file, or files of different sizes, change nothing.
        assert!(matches!(merge_diff(&base, &diff, &[(u64::MAX - 10, 4096)]), Err(MemFileError::RangeOutside { .. })));
        let small = d.join("small");
        std::fs::write(&small, b"x").unwrap();
        assert!(matches!(merge_diff(&base, &small, &ranges), Err(MemFileError::SizeMismatch { .. })));
        std::fs::remove_dir_all(&d).unwrap();
    }
}
