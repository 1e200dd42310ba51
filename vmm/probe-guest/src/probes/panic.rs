//! Panic probe: prints the line a panicking Linux prints, then resets as `panic=1` would. The
//! VMM must report a guest panic (exit 2), not a clean reboot.
#![no_std]
#![no_main]

mod common;

#[no_mangle]
pub extern "C" fn probe_main(_boot_params: u64) -> ! {
    say!("[    1.234567] Kernel panic - not syncing: probe panic");
    common::reset()
}
