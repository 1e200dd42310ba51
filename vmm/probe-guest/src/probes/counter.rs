//! Counter probe: counts PIT ticks (100 Hz through the PIC) forever and prints `count=N` every
//! 10 ticks. Tests pause and resume the VM and check the count stops and continues, and that
//! it carries on after a snapshot restore. The count lives in guest memory (not a register),
//! so a restore with stale memory shows as a count that goes back.
//!
//! Bytes from the i8042 keyboard (polled; its interrupt stays masked at the PIC) are printed as
//! `key=N`, so a test can press Ctrl+Alt+Del through the API and see the scan codes arrive.
//!
//! If the first virtio device is vsock, the probe prints its CID (`vsock cid=N`) and keeps an
//! event buffer posted; when the device sends TRANSPORT_RESET (it does after a restore) the
//! probe reads the CID again and prints `vsock reset cid=N`, as a Linux driver would.
#![no_std]
#![no_main]

mod common;
mod irq;
mod virtio_mmio;

use core::sync::atomic::{AtomicU64, Ordering};

use irq::PIT_TICKS;

static COUNT: AtomicU64 = AtomicU64::new(0);

#[no_mangle]
pub extern "C" fn probe_main(_boot_params: u64) -> ! {
    say!("SHOAL-PROBE counter: start");
    irq::setup_idt();
    irq::start_pit_100hz();
    let mut vsock = vsock_setup();
    loop {
        irq::wait_until(&PIT_TICKS, PIT_TICKS.load(Ordering::SeqCst) + 10);
        let count = COUNT.load(Ordering::SeqCst) + 1;
        COUNT.store(count, Ordering::SeqCst);
        say!("count=", count);
        while common::inb(0x64) & 1 != 0 {
            say!("key=", u64::from(common::inb(0x60)));
        }
        if let Some(v) = vsock.as_mut() {
            v.check_events();
        }
    }
}

/// The vsock device's event queue (queue 2), with one buffer posted.
struct VsockEvents {
    dev: u64,
    avail: u16,
}

fn cid(dev: u64) -> u64 {
    u64::from(virtio_mmio::rd(dev, 0x100)) | (u64::from(virtio_mmio::rd(dev, 0x104)) << 32)
}

fn vsock_setup() -> Option<VsockEvents> {
    use virtio_mmio::*;
    map_mmio_window();
    let dev = BASE;
    if rd(dev, 0) != 0x7472_6976 || rd(dev, 8) != 19 || !init(dev, 3) {
        return None;
    }
    say!("vsock cid=", cid(dev));
    let mut v = VsockEvents { dev, avail: 0 };
    v.post();
    Some(v)
}

impl VsockEvents {
    fn post(&mut self) {
        let event = virtio_mmio::buf();
        virtio_mmio::poke(event, 0xffff_ffffu32);
        virtio_mmio::submit_on(self.dev, 2, &[(event, 4, true)], &mut self.avail, false);
    }

    fn check_events(&mut self) {
        let used: u16 = virtio_mmio::peek(virtio_mmio::qbase(2) + virtio_mmio::USED + 2);
        if used == self.avail {
            let id: u32 = virtio_mmio::peek(virtio_mmio::buf());
            say!("vsock reset event=", id, " cid=", cid(self.dev));
            self.post();
        }
    }
}
