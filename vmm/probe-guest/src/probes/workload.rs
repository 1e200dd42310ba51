//! Workload probe: the guest the cluster tests deploy. It behaves like a small service: prints
//! a start line with its command line (so a test sees which template it was booted from), then
//! `tick=N` every half second (PIT at 100 Hz), and shuts down cleanly when the host presses
//! Ctrl+Alt+Del (the i8042 keyboard delivers Ctrl, Alt, then Del as the extended set-2 make code
//! `e0 71`): it prints `SHOAL-PROBE workload: stopping` and resets, so the VMM exits 0, as a
//! Linux guest with the AT keyboard driver reboots. Lines typed on its serial console are
//! echoed back as `typed: <line>` (a test types through `shoalctl attach`). With `ip=` on its
//! command line and a virtio-net device it answers ARP and ping at that address (and pings
//! `ping=<addr>` once a second): see net.rs.
#![no_std]
#![no_main]

mod common;
mod irq;
mod net;
mod virtio_mmio;

use core::sync::atomic::Ordering;

use irq::PIT_TICKS;

#[no_mangle]
pub extern "C" fn probe_main(boot_params: u64) -> ! {
    say!("SHOAL-PROBE workload: start cmdline=", common::cmdline(boot_params));
    let mut net = net::Net::start(common::cmdline(boot_params));
    irq::setup_idt();
    irq::start_pit_100hz();
    let mut tick = 0u64;
    let mut extended = false;
    let mut line = [0u8; 128];
    let mut len = 0usize;
    let mut ticks = 0u64;
    loop {
        // The network every 10 ms, the rest every half second.
        irq::wait_until(&PIT_TICKS, PIT_TICKS.load(Ordering::SeqCst) + 1);
        ticks += 1;
        if let Some(n) = net.as_mut() {
            n.poll();
            if ticks % 100 == 0 {
                n.ping();
            }
        }
        if ticks % 50 != 0 {
            continue;
        }
        tick += 1;
        say!("tick=", tick);
        // The UART's receive buffer (LSR bit 0: data ready), polled.
        while common::inb(0x3fd) & 1 != 0 {
            let b = common::inb(0x3f8);
            if b == b'\r' || b == b'\n' {
                if len > 0 {
                    say!("typed: ", &line[..len]);
                    len = 0;
                }
            } else if len < line.len() {
                line[len] = b;
                len += 1;
            }
        }
        while common::inb(0x64) & 1 != 0 {
            let code = common::inb(0x60);
            if extended && code == 0x71 {
                say!("SHOAL-PROBE workload: stopping");
                common::reset();
            }
            extended = code == 0xe0;
        }
    }
}
