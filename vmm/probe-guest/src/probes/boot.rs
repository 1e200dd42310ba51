//! Boot probe: proves the 64-bit boot path. Prints a marker, the command line it reads from
//! boot_params and the RAM in the E820 map, then resets.
#![no_std]
#![no_main]

mod common;

#[no_mangle]
pub extern "C" fn probe_main(boot_params: u64) -> ! {
    say!("SHOAL-PROBE boot: ok");
    say!("cmdline: ", common::cmdline(boot_params));
    let (entries, kib) = common::e820_ram_kib(boot_params);
    say!("e820: entries=", entries, " ram_kib=", kib);
    common::reset()
}
