//! Timer probe: counts interrupts from the PIT (IRQ 0 through the 8259 PIC and LINT0 in ExtINT
//! mode, as the VMM sets it) and from the LAPIC timer (x2APIC, periodic), then resets.
#![no_std]
#![no_main]

mod common;
mod irq;

use core::sync::atomic::Ordering;

use irq::{LAPIC_TICKS, LAPIC_VECTOR, PIT_TICKS};

const TICKS_WANTED: u64 = 5;

#[no_mangle]
pub extern "C" fn probe_main(_boot_params: u64) -> ! {
    say!("SHOAL-PROBE timer: start");
    irq::setup_idt();
    irq::start_pit_100hz();
    irq::wait_until(&PIT_TICKS, TICKS_WANTED);
    common::outb(0x21, 0xff);
    say!("timer: pit_ticks=", PIT_TICKS.load(Ordering::SeqCst));

    if !common::enable_x2apic() {
        say!("timer: no x2apic");
        common::reset();
    }
    common::wrmsr(0x83e, 0xb); // divide by 1
    common::wrmsr(0x832, (1 << 17) | LAPIC_VECTOR as u64); // periodic
    common::wrmsr(0x838, 10_000_000);
    irq::wait_until(&LAPIC_TICKS, TICKS_WANTED);
    common::wrmsr(0x832, 1 << 16); // mask
    say!("timer: lapic_ticks=", LAPIC_TICKS.load(Ordering::SeqCst));
    say!("SHOAL-PROBE timer: ok");
    common::reset()
}
