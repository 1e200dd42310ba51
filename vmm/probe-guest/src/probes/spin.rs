//! Spin probe: prints `spin=N` in a tight loop, forever. A guest that is always printing makes
//! "time to the first byte after a restore" a measure of the restore alone (the counter probe
//! would add up to 100 ms of waiting for its next tick).
#![no_std]
#![no_main]

mod common;

use core::sync::atomic::{AtomicU64, Ordering};

static SPINS: AtomicU64 = AtomicU64::new(0);

#[no_mangle]
pub extern "C" fn probe_main(_boot_params: u64) -> ! {
    say!("SHOAL-PROBE spin: start");
    loop {
        let n = SPINS.fetch_add(1, Ordering::SeqCst) + 1;
        say!("spin=", n);
    }
}
