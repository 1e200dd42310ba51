//! Fault probe: loads an empty IDT and divides by zero. The #DE cannot be delivered, nor the #GP
//! and #DF that follow, so the CPU triple-faults: the VMM must stop with an error, not exit 0.
#![no_std]
#![no_main]

mod common;

#[no_mangle]
pub extern "C" fn probe_main(_boot_params: u64) -> ! {
    say!("SHOAL-PROBE fault: faulting");
    let empty_idt: [u16; 5] = [0; 5];
    // SAFETY: deliberately makes every exception undeliverable, then raises one; the VMM ends
    // the VM on the resulting triple fault.
    unsafe {
        core::arch::asm!(
            "lidt [{idt}]",
            "xor ecx, ecx",
            "div ecx",
            idt = in(reg) empty_idt.as_ptr(),
            out("eax") _, out("edx") _, out("ecx") _,
            options(nostack),
        );
    }
    say!("SHOAL-PROBE fault: still running");
    common::reset()
}
