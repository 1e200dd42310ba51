//! The virtio-mmio transport's register window driven by a hostile driver: the input is a
//! sequence of 7-byte operations (register reads and writes of any width at any offset of the
//! window and the config space behind it, deferred work run, queue notifies, save and
//! restore) against a block or rng device, with guest memory (and so the rings the driver
//! points at) taken from the same input. Nothing may panic.
#![no_main]

#[path = "common.rs"]
#[allow(dead_code)] // the rings are the driver's to set up here
mod common;

use libfuzzer_sys::fuzz_target;
use shoal_vmm::devices::bus::BusDevice;
use shoal_vmm::devices::virtio::block::handler::MemDisk;
use shoal_vmm::devices::virtio::block::VirtioBlock;
use shoal_vmm::devices::virtio::mmio::MmioTransport;
use shoal_vmm::devices::virtio::rng::{Entropy, VirtioRng};
use shoal_vmm::devices::virtio::VirtioDevice;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

struct Pattern;

impl Entropy for Pattern {
    fn fill(&mut self, buf: &mut [u8]) -> std::io::Result<()> {
        buf.fill(0xa5);
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, ops)) = data.split_first() else { return };
    let mem = common::memory();
    common::load(mem, data);
    let device: Box<dyn VirtioDevice> = if pick & 1 == 0 {
        let disk = MemDisk { data: vec![0; 64 << 10], flushes: 0 };
        Box::new(VirtioBlock::new(Box::new(disk), pick & 2 != 0, "fuzz", None))
    } else {
        Box::new(VirtioRng::with_entropy(Box::new(Pattern)))
    };
    let Ok(wake) = EventFd::new(EFD_NONBLOCK) else { return };
    let mut t = MmioTransport::new(device, mem.clone(), common::irq()).with_wake(wake);
    for op in ops.chunks_exact(7) {
        let offset = u64::from(u16::from_le_bytes([op[1], op[2]]) & 0x1ff);
        let width = [1usize, 2, 4, 8][usize::from((op[0] >> 4) & 3)];
        let mut value = [0u8; 8];
        value[..4].copy_from_slice(&op[3..7]);
        match op[0] & 0xf {
            0..=7 => t.write(offset, &value[..width]),
            8..=11 => t.read(offset, &mut value[..width]),
            12 => t.run_deferred(),
            13 => t.notify(usize::from(op[1] & 3)),
            14 => {
                let saved = t.save();
                let _ = t.restore(&saved);
            }
            _ => t.resume_after_restore(),
        }
    }
    t.run_deferred();
});
