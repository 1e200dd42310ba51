//! Timer probe: counts interrupts from the PIT (IRQ 0 through the 8259 PIC and LINT0 in ExtINT
//! mode, as the VMM sets it) and from the LAPIC timer (x2APIC, periodic), then, where CPUID
//! offers it, from the LAPIC timer in TSC-deadline mode (armed through MSR 0x6e0 once per
//! tick), then resets.
#![no_std]
#![no_main]

mod common;
mod irq;

use core::sync::atomic::Ordering;

use irq::{LAPIC_TICKS, LAPIC_VECTOR, PIT_TICKS};

const TICKS_WANTED: u64 = 5;

fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: rdtsc only reads the time stamp counter.
    unsafe { core::arch::asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack)) };
    (u64::from(hi) << 32) | u64::from(lo)
}

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
    let periodic = LAPIC_TICKS.load(Ordering::SeqCst);
    say!("timer: lapic_ticks=", periodic);

    let (_, _, ecx, _) = common::cpuid(1, 0);
    if ecx & (1 << 24) == 0 {
        say!("timer: no tsc_deadline");
    } else {
        common::wrmsr(0x832, (2 << 17) | LAPIC_VECTOR as u64); // TSC-deadline mode
        for i in 1..=TICKS_WANTED {
            common::wrmsr(0x6e0, rdtsc() + 1_000_000);
            irq::wait_until(&LAPIC_TICKS, periodic + i);
        }
        common::wrmsr(0x832, 1 << 16);
        say!("timer: tsc_deadline_ticks=", LAPIC_TICKS.load(Ordering::SeqCst) - periodic);
    }
    say!("SHOAL-PROBE timer: ok");
    common::reset()
}
