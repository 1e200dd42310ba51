//! The userfaultfd experiment the snapshot issue asks for: does loading a snapshot's memory
//! through userfaultfd, with the pages the guest touched first after the previous restore
//! prefetched, beat mapping the memory file MAP_PRIVATE (what `--restore` does)?
//!
//! A restored guest's start-up cost is the faults on its first working set. This measures the
//! host side of that directly, without KVM (whose nested shadow paging here would drown the
//! difference): a memory file with a scattered working set, then the time from "restore starts"
//! to "every working-set page has been touched once" for
//!   - `map_private`: mmap the file MAP_PRIVATE, touch the pages (minor faults on the page cache);
//!   - `map_private_random`: the same with MADV_RANDOM (no readahead around each fault);
//!   - `uffd_on_demand`: anonymous memory registered with userfaultfd, a handler thread answering
//!     each fault with UFFDIO_COPY from the file;
//!   - `uffd_prefetch`: the same, with the recorded working set copied in before the first
//!     touch (what a restore would do before resuming the vCPUs).
//!
//! Each with the memory file in the page cache (hot) and evicted from it (cold). Prints
//! `name=value` lines (medians of 20 runs, milliseconds). Needs userfaultfd (root).
#![allow(clippy::unwrap_used)] // a bench fails loudly by design

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::time::Instant;

const PAGE: usize = 4096;
const UFFDIO_API: u64 = 0xc018_aa3f;
const UFFDIO_REGISTER: u64 = 0xc020_aa00;
const UFFDIO_COPY: u64 = 0xc028_aa03;
const UFFD_API: u64 = 0xaa;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}
#[repr(C)]
struct UffdioRegister {
    start: u64,
    len: u64,
    mode: u64,
    ioctls: u64,
}
#[repr(C)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

fn map(len: usize, file: Option<&File>) -> *mut u8 {
    let (flags, fd) = match file {
        Some(f) => (libc::MAP_PRIVATE, f.as_raw_fd()),
        None => (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1),
    };
    // SAFETY: a fresh mapping at an address of the kernel's choosing.
    let p = unsafe {
        libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, flags | libc::MAP_NORESERVE, fd, 0)
    };
    assert_ne!(p, libc::MAP_FAILED);
    p.cast()
}

fn unmap(p: *mut u8, len: usize) {
    // SAFETY: p/len come from `map`.
    unsafe { libc::munmap(p.cast(), len) };
}

fn touch(base: *mut u8, pages: &[usize]) {
    for &p in pages {
        // SAFETY: every page index is inside the mapping.
        unsafe {
            std::ptr::write_volatile(base.add(p * PAGE), std::ptr::read_volatile(base.add(p * PAGE)).wrapping_add(1))
        };
    }
}

fn evict(file: &File) {
    // SAFETY: advisory call on our own descriptor.
    unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
}

fn copy_page(uffd: i32, dst: usize, src: *const u8) {
    let mut c = UffdioCopy { dst: dst as u64, src: src as u64, len: PAGE as u64, mode: 0, copy: 0 };
    // SAFETY: UFFDIO_COPY reads the struct and PAGE bytes at src; dst is a registered page.
    unsafe { libc::ioctl(uffd, UFFDIO_COPY as _, &mut c) };
}

/// Anonymous memory behind userfaultfd; a thread fills faulting pages from `file`.
fn uffd_run(file: &File, len: usize, pages: &[usize], prefetch: bool) -> f64 {
    let t = Instant::now();
    let base = map(len, None);
    // SAFETY: plain syscall; the result is checked.
    let uffd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) } as i32;
    assert!(uffd >= 0, "userfaultfd: {}", std::io::Error::last_os_error());
    let mut api = UffdioApi { api: UFFD_API, features: 0, ioctls: 0 };
    // SAFETY: UFFDIO_API reads and writes the struct.
    assert_eq!(unsafe { libc::ioctl(uffd, UFFDIO_API as _, &mut api) }, 0);
    let mut reg = UffdioRegister { start: base as u64, len: len as u64, mode: 1, ioctls: 0 };
    // SAFETY: UFFDIO_REGISTER reads and writes the struct; the range is our mapping.
    assert_eq!(unsafe { libc::ioctl(uffd, UFFDIO_REGISTER as _, &mut reg) }, 0);
    let fd = file.as_raw_fd();
    let base_addr = base as usize;
    let mut page = vec![0u8; PAGE];
    if prefetch {
        for &p in pages {
            // SAFETY: reads one page of the file into our buffer.
            unsafe { libc::pread(fd, page.as_mut_ptr().cast(), PAGE, (p * PAGE) as i64) };
            copy_page(uffd, base_addr + p * PAGE, page.as_ptr());
        }
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let handler = std::thread::spawn(move || {
        let mut page = vec![0u8; PAGE];
        let mut msg = [0u8; 32];
        loop {
            let mut pfd = libc::pollfd { fd: uffd, events: libc::POLLIN, revents: 0 };
            // SAFETY: polls one descriptor we own.
            if unsafe { libc::poll(&mut pfd, 1, 5) } <= 0 {
                if stop2.load(std::sync::atomic::Ordering::Relaxed) {
                    return;
                }
                continue;
            }
            // SAFETY: reads one uffd_msg into a 32-byte buffer.
            let n = unsafe { libc::read(uffd, msg.as_mut_ptr().cast(), 32) };
            if n != 32 {
                continue;
            }
            if msg[0] != UFFD_EVENT_PAGEFAULT {
                continue;
            }
            let addr = u64::from_ne_bytes(msg[16..24].try_into().unwrap()) as usize & !(PAGE - 1);
            // SAFETY: reads one page of the file into our buffer.
            unsafe { libc::pread(fd, page.as_mut_ptr().cast(), PAGE, (addr - base_addr) as i64) };
            copy_page(uffd, addr, page.as_ptr());
        }
    });
    touch(base, pages);
    let elapsed = t.elapsed().as_secs_f64() * 1000.0;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = handler.join();
    unmap(base, len);
    // SAFETY: the handler has stopped; nothing else uses the descriptor.
    unsafe { libc::close(uffd) };
    elapsed
}

fn private_run(file: &File, len: usize, pages: &[usize], random: bool) -> f64 {
    let t = Instant::now();
    let base = map(len, Some(file));
    if random {
        // SAFETY: advice on our own mapping.
        unsafe { libc::madvise(base.cast(), len, libc::MADV_RANDOM) };
    }
    touch(base, pages);
    let elapsed = t.elapsed().as_secs_f64() * 1000.0;
    unmap(base, len);
    elapsed
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    for (mib, ws) in [(128usize, 512usize), (128, 8192), (2048, 512), (2048, 8192)] {
        let len = mib << 20;
        let path = std::env::temp_dir().join(format!("shoal-uffd-{}.mem", std::process::id()));
        let mut f = File::create(&path).unwrap();
        let chunk = vec![0x5au8; 1 << 20];
        for _ in 0..mib {
            f.write_all(&chunk).unwrap();
        }
        drop(f);
        let file = File::open(&path).unwrap();
        // A scattered working set, the same every run (a recorded one, as after a previous restore).
        let total = len / PAGE;
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut pages: Vec<usize> = (0..ws)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x as usize) % total
            })
            .collect();
        pages.sort_unstable();
        pages.dedup();
        for (cache, cold) in [("hot", false), ("cold", true)] {
            let run = |f: &dyn Fn() -> f64| {
                median(
                    (0..20)
                        .map(|_| {
                            if cold {
                                evict(&file);
                            }
                            f()
                        })
                        .collect(),
                )
            };
            let tag = format!("{mib}mib_{}pages_{cache}", pages.len());
            println!("map_private_ms_{tag}={:.2}", run(&|| private_run(&file, len, &pages, false)));
            println!("map_private_random_ms_{tag}={:.2}", run(&|| private_run(&file, len, &pages, true)));
            println!("uffd_on_demand_ms_{tag}={:.2}", run(&|| uffd_run(&file, len, &pages, false)));
            println!("uffd_prefetch_ms_{tag}={:.2}", run(&|| uffd_run(&file, len, &pages, true)));
        }
        let _ = std::fs::remove_file(&path);
    }
}
