//! Balloon probe: a minimal virtio-balloon driver (the first virtio device), accepting the
//! statistics queue. It touches 32 MiB of its memory (64-96 MiB) so the VMM's RSS holds them,
//! posts its first statistics (free 111000000, total 128 MiB), then waits for the host to
//! set a target (`num_pages` in config space) of at least those 8192 pages, hands exactly
//! them to the inflate queue (256 PFNs per buffer), sets `actual`, and checks that the pages
//! read back as zeros. When the device returns the statistics buffer (its request for new
//! statistics, one interval later) it posts the second round (free 222000000) and idles.
//! Lines: `balloon touched pages=N`, `balloon stats round=R`, `balloon inflated pages=N
//! zero=<0|1>`.
#![no_std]
#![no_main]

mod common;
mod virtio_mmio;

use virtio_mmio::*;

const TOUCH_BASE: u64 = 64 << 20;
const TOUCH_PAGES: u64 = 8192;
const F_STATS_VQ: u32 = 1 << 1;

fn post_stats(dev: u64, free: u64, idx: &mut u16) {
    let at = buf() + 0x800;
    for (i, (tag, value)) in [(4u16, free), (5u16, 128u64 << 20)].into_iter().enumerate() {
        let e = at + 10 * i as u64;
        poke(e, tag);
        for b in 0..8 {
            poke(e + 2 + b, (value >> (8 * b)) as u8);
        }
    }
    submit_on(dev, 2, &[(at, 20, false)], idx, false);
}

#[no_mangle]
pub extern "C" fn probe_main(_boot_params: u64) -> ! {
    map_mmio_window();
    let dev = BASE;
    if rd(dev, 0) != 0x7472_6976 || rd(dev, 8) != 5 || !init_with(dev, 3, F_STATS_VQ) {
        say!("SHOAL-PROBE balloon: no balloon device with statistics");
        common::reset();
    }
    for p in 0..TOUCH_PAGES {
        poke(TOUCH_BASE + p * 4096, p | 1);
    }
    say!("balloon touched pages=", TOUCH_PAGES);
    let mut stats_idx = 0u16;
    post_stats(dev, 111_000_000, &mut stats_idx);
    say!("balloon stats round=", 1u64);
    let mut spins = 0u64;
    while u64::from(rd(dev, 0x100)) < TOUCH_PAGES {
        spins += 1;
        if spins > 50_000_000 {
            say!("balloon no target");
            common::reset();
        }
        core::hint::spin_loop();
    }
    let mut inflate_idx = 0u16;
    let mut given = 0u64;
    while given < TOUCH_PAGES {
        let n = (TOUCH_PAGES - given).min(256);
        for i in 0..n {
            poke(buf() + 4 * i, ((TOUCH_BASE >> 12) + given + i) as u32);
        }
        if submit_on(dev, 0, &[(buf(), (4 * n) as u32, false)], &mut inflate_idx, true).is_none() {
            say!("balloon inflate not taken");
            common::reset();
        }
        given += n;
    }
    wr(dev, 0x104, given as u32);
    let zero = (0..TOUCH_PAGES).all(|p| peek::<u64>(TOUCH_BASE + p * 4096) == 0);
    say!("balloon inflated pages=", given, " zero=", u8::from(zero));
    if wait_used(2, stats_idx, 2_000_000_000).is_some() {
        post_stats(dev, 222_000_000, &mut stats_idx);
        say!("balloon stats round=", 2u64);
    } else {
        say!("balloon no statistics request");
    }
    loop {
        core::hint::spin_loop();
    }
}
