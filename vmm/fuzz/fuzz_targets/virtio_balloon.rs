//! virtio-balloon queue processing on guest memory and rings taken from the fuzz input: every
//! chain is tried on the inflate queue (PFNs given back to the host), the deflate queue and
//! the statistics queue. Nothing may panic; PFNs outside guest memory are refused.
#![no_main]

#[path = "common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use shoal_vmm::devices::virtio::balloon::{BalloonConfig, VirtioBalloon};
use shoal_vmm::devices::virtio::VirtioDevice;

fuzz_target!(|data: &[u8]| {
    let mem = common::memory();
    common::load(mem, data);
    let config = BalloonConfig { amount_mib: 1, deflate_on_oom: true, stats_polling_interval_s: 1 };
    let mut dev = VirtioBalloon::new(config);
    let features = dev.features();
    if dev.activate(mem.clone(), vec![common::queue(), common::queue(), common::queue()], common::irq(), features).is_err() {
        return;
    }
    dev.process_queue(2);
    dev.process_queue(0);
    dev.restored();
    dev.process_queue(1);
    dev.process_queue(2);
});
