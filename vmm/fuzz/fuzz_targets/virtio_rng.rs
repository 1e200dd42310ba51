//! virtio-rng queue processing on guest memory and rings taken from the fuzz input.
#![no_main]

#[path = "common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use shoal_vmm::devices::virtio::rng::{Entropy, VirtioRng};
use shoal_vmm::devices::virtio::{VirtioDevice, VIRTIO_F_VERSION_1};

struct Pattern;

impl Entropy for Pattern {
    fn fill(&mut self, buf: &mut [u8]) -> std::io::Result<()> {
        buf.fill(0x5a);
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let mem = common::memory();
    common::load(mem, data);
    let mut dev = VirtioRng::with_entropy(Box::new(Pattern));
    if dev.activate(mem.clone(), vec![common::queue()], common::irq(), VIRTIO_F_VERSION_1).is_err() {
        return;
    }
    dev.process_queue(0);
});
