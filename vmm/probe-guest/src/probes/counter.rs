//! Counter probe: counts PIT ticks (100 Hz through the PIC) forever and prints `count=N` every
//! 10 ticks. Tests pause and resume the VM and check the count stops and continues (and, with
//! snapshots, that it carries on after a restore).
#![no_std]
#![no_main]

mod common;
mod irq;

use core::sync::atomic::Ordering;

use irq::PIT_TICKS;

#[no_mangle]
pub extern "C" fn probe_main(_boot_params: u64) -> ! {
    say!("SHOAL-PROBE counter: start");
    irq::setup_idt();
    irq::start_pit_100hz();
    let mut count = 0u64;
    loop {
        irq::wait_until(&PIT_TICKS, PIT_TICKS.load(Ordering::SeqCst) + 10);
        count += 1;
        say!("count=", count);
    }
}
