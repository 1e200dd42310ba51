//! Counter probe: counts PIT ticks (100 Hz through the PIC) forever and prints `count=N` every
//! 10 ticks. Tests pause and resume the VM and check the count stops and continues, and that
//! it carries on after a snapshot restore. The count lives in guest memory (not a register),
//! so a restore with stale memory shows as a count that goes back.
#![no_std]
#![no_main]

mod common;
mod irq;

use core::sync::atomic::{AtomicU64, Ordering};

use irq::PIT_TICKS;

static COUNT: AtomicU64 = AtomicU64::new(0);

#[no_mangle]
pub extern "C" fn probe_main(_boot_params: u64) -> ! {
    say!("SHOAL-PROBE counter: start");
    irq::setup_idt();
    irq::start_pit_100hz();
    loop {
        irq::wait_until(&PIT_TICKS, PIT_TICKS.load(Ordering::SeqCst) + 10);
        let count = COUNT.load(Ordering::SeqCst) + 1;
        COUNT.store(count, Ordering::SeqCst);
        say!("count=", count);
    }
}
