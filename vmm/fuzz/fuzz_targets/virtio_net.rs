//! virtio-net queue processing on guest memory and rings taken from the fuzz input: transmit on
//! queue 1 (descriptor table at 0x0), and frames from a fake tap received into queue 0 buffers.
#![no_main]

#[path = "common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use shoal_vmm::devices::virtio::net::tap::NetBackend;
use shoal_vmm::devices::virtio::net::VirtioNet;
use shoal_vmm::devices::virtio::{VirtioDevice, VIRTIO_F_VERSION_1};

/// Hands out one frame cut from the input, and swallows what the guest sends.
struct Wire(Vec<u8>);

impl NetBackend for Wire {
    fn read_frame(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.0.is_empty() {
            return Err(std::io::ErrorKind::WouldBlock.into());
        }
        let n = self.0.len().min(buf.len());
        buf[..n].copy_from_slice(&self.0[..n]);
        self.0.clear();
        Ok(n)
    }
    fn write_frame(&mut self, frame: &[u8]) -> std::io::Result<()> {
        assert!(frame.len() <= shoal_vmm::devices::virtio::net::MAX_FRAME);
        Ok(())
    }
    fn raw_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }
}

fuzz_target!(|data: &[u8]| {
    let mem = common::memory();
    common::load(mem, data);
    let frame = data.get(..data.len().min(1600)).unwrap_or(&[]).to_vec();
    let mut dev = VirtioNet::new(Box::new(Wire(frame)), [2, 0, 0, 0, 0, 1]);
    // Both queues over the same rings: every chain is tried as rx and as tx.
    if dev.activate(mem.clone(), vec![common::queue(), common::queue()], common::irq(), VIRTIO_F_VERSION_1).is_err() {
        return;
    }
    dev.process_queue(1);
    dev.process_backend();
    dev.process_queue(0);
});
