//! A minimal virtio-mmio (version 2) driver shared by the probes: maps the virtio window
//! (0xd0000000, in the MMIO gap, above the 1 GiB the boot page tables cover), sets up queues
//! of 8 entries in one static area, submits chains and polls used rings (no interrupts).
#![allow(dead_code)] // each probe uses part of it

use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};
use core::sync::atomic::{compiler_fence, Ordering};

pub const BASE: u64 = 0xd000_0000;
pub const WINDOW: u64 = 0x1000;
pub const QSIZE: u16 = 8;

#[repr(C, align(4096))]
pub struct Page(pub [u64; 512]);

#[repr(C, align(4096))]
pub struct Bytes(pub [u8; 4096]);

pub static mut MMIO_PD: Page = Page([0; 512]);
/// Queue rings: queue q at q * QSTRIDE (up to 4 queues).
pub static mut RING: [Bytes; 2] = [const { Bytes([0; 4096]) }; 2];
pub static mut BUF: Bytes = Bytes([0; 4096]);

pub fn reg(dev: u64, off: u64) -> *mut u32 {
    (dev + off) as *mut u32
}

pub fn rd(dev: u64, off: u64) -> u32 {
    // SAFETY: dev is a mapped virtio-mmio window; registers are 32-bit and aligned.
    unsafe { read_volatile(reg(dev, off)) }
}

pub fn wr(dev: u64, off: u64, v: u32) {
    // SAFETY: as in rd.
    unsafe { write_volatile(reg(dev, off), v) }
}

/// Maps 0xd0000000..+2 MiB uncached through a new page directory for the 3-4 GiB range.
pub fn map_mmio_window() {
    let cr3: u64;
    // SAFETY: reading CR3 has no side effects.
    unsafe { core::arch::asm!("mov {}, cr3", out(reg) cr3, options(nomem, nostack)) };
    let pml4 = (cr3 & !0xfff) as *mut u64;
    // SAFETY: the VMM's identity page tables: PML4[0] points at the PDPT, both in low RAM that
    // is identity-mapped; MMIO_PD is ours, page-aligned, and identity-mapped too.
    unsafe {
        let pdpt = (read_volatile(pml4) & 0x000f_ffff_ffff_f000) as *mut u64;
        let pd = addr_of_mut!(MMIO_PD.0) as *mut u64;
        // 2 MiB page, present, writable, cache-disabled, write-through.
        write_volatile(pd.add(((BASE >> 21) & 511) as usize), BASE | 0x9b);
        write_volatile(pdpt.add(3), pd as u64 | 3);
        core::arch::asm!("mov {0}, cr3", "mov cr3, {0}", out(reg) _, options(nostack));
    }
}

pub fn ring() -> u64 {
    // SAFETY: only the address is taken.
    unsafe { addr_of!(RING) as u64 }
}

pub fn buf() -> u64 {
    // SAFETY: only the address is taken.
    unsafe { addr_of!(BUF) as u64 }
}

pub fn poke<T>(addr: u64, v: T) {
    // SAFETY: addr lies in RING or BUF, identity-mapped statics the device shares with us.
    unsafe { write_volatile(addr as *mut T, v) }
}

pub fn peek<T: Copy>(addr: u64) -> T {
    // SAFETY: as in poke.
    unsafe { read_volatile(addr as *const T) }
}

// Queue layout inside RING: queue q at q * 0x800: descriptors at +0, avail ring at +0x100,
// used ring at +0x200.
pub const DESC: u64 = 0;
pub const AVAIL: u64 = 0x100;
pub const USED: u64 = 0x200;
pub const QSTRIDE: u64 = 0x800;

pub fn qbase(q: u64) -> u64 {
    ring() + q * QSTRIDE
}

/// Resets the device, negotiates VERSION_1 only, and sets up queues 0..nq. Returns false on
/// failure.
pub fn init(dev: u64, nq: u64) -> bool {
    init_with(dev, nq, 0)
}

/// `init`, also accepting the device features in `low` (bits 0-31) that the device offers.
pub fn init_with(dev: u64, nq: u64, low: u32) -> bool {
    wr(dev, 0x70, 0);
    wr(dev, 0x70, 1);
    wr(dev, 0x70, 3);
    wr(dev, 0x14, 0);
    let offered = rd(dev, 0x10);
    wr(dev, 0x14, 1);
    if rd(dev, 0x10) & 1 == 0 {
        return false;
    }
    wr(dev, 0x24, 0);
    wr(dev, 0x20, offered & low);
    wr(dev, 0x24, 1);
    wr(dev, 0x20, 1);
    wr(dev, 0x70, 0xb);
    if rd(dev, 0x70) & 8 == 0 {
        return false;
    }
    for i in 0..8192u64 {
        poke(ring() + i, 0u8);
    }
    for q in 0..nq {
        wr(dev, 0x30, q as u32);
        if rd(dev, 0x34) < u32::from(QSIZE) {
            return false;
        }
        wr(dev, 0x38, u32::from(QSIZE));
        for (off, addr) in [(0x80, qbase(q) + DESC), (0x90, qbase(q) + AVAIL), (0xa0, qbase(q) + USED)] {
            wr(dev, off, addr as u32);
            wr(dev, off + 4, (addr >> 32) as u32);
        }
        wr(dev, 0x44, 1);
    }
    wr(dev, 0x70, 0xf);
    rd(dev, 0x70) & 0x40 == 0
}

/// Submits a chain of (address, length, device-writable) buffers and waits for it to be used;
/// returns the length the device reports, or None on timeout.
pub fn submit(dev: u64, bufs: &[(u64, u32, bool)], avail_idx: &mut u16) -> Option<u32> {
    submit_on(dev, 0, bufs, avail_idx, true)
}

/// Makes a chain available on queue `q` (descriptors from 0) and, if `wait`, waits for it.
pub fn submit_on(dev: u64, q: u64, bufs: &[(u64, u32, bool)], avail_idx: &mut u16, wait: bool) -> Option<u32> {
    let base = qbase(q);
    for (i, &(addr, len, writable)) in bufs.iter().enumerate() {
        let d = base + DESC + 16 * i as u64;
        let last = i + 1 == bufs.len();
        poke(d, addr);
        poke(d + 8, len);
        poke(d + 12, (if writable { 2u16 } else { 0 }) | if last { 0 } else { 1 });
        poke(d + 14, (i + 1) as u16);
    }
    poke(base + AVAIL + 4 + 2 * u64::from(*avail_idx % QSIZE), 0u16);
    compiler_fence(Ordering::SeqCst);
    *avail_idx = avail_idx.wrapping_add(1);
    poke(base + AVAIL + 2, *avail_idx);
    compiler_fence(Ordering::SeqCst);
    wr(dev, 0x50, q as u32);
    if !wait {
        return Some(0);
    }
    wait_used(q, *avail_idx, 50_000_000)
}

/// Polls queue `q`'s used ring until its index reaches `idx`; returns the last entry's length.
pub fn wait_used(q: u64, idx: u16, spins: u64) -> Option<u32> {
    let base = qbase(q);
    for _ in 0..spins {
        let used: u16 = peek(base + USED + 2);
        if used == idx {
            compiler_fence(Ordering::SeqCst);
            let slot = base + USED + 4 + 8 * u64::from((used.wrapping_sub(1)) % QSIZE);
            return Some(peek::<u32>(slot + 4));
        }
        core::hint::spin_loop();
    }
    None
}
