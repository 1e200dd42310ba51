//! virtio-blk queue processing on guest memory and rings taken from the fuzz input, against an
//! in-memory disk (read-only or not, from the first byte). Nothing may panic, and the disk
//! keeps its size.
#![no_main]

#[path = "common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use shoal_vmm::devices::virtio::block::handler::{DiskBackend, MemDisk};
use shoal_vmm::devices::virtio::block::VirtioBlock;
use shoal_vmm::devices::virtio::{VirtioDevice, VIRTIO_F_VERSION_1};

struct Shared(std::sync::Arc<std::sync::Mutex<MemDisk>>);

impl DiskBackend for Shared {
    fn len(&self) -> u64 {
        self.0.lock().unwrap().len()
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.0.lock().unwrap().read_at(buf, offset)
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.0.lock().unwrap().write_at(buf, offset)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.lock().unwrap().flush()
    }
    fn discard(&mut self, offset: u64, len: u64) -> std::io::Result<()> {
        self.0.lock().unwrap().discard(offset, len)
    }
    fn write_zeroes(&mut self, offset: u64, len: u64) -> std::io::Result<()> {
        self.0.lock().unwrap().write_zeroes(offset, len)
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else { return };
    let mem = common::memory();
    common::load(mem, rest);
    let disk = std::sync::Arc::new(std::sync::Mutex::new(MemDisk { data: vec![0; 64 * 512], flushes: 0 }));
    let mut dev = VirtioBlock::new(Box::new(Shared(disk.clone())), flags & 1 == 1, "fuzz", None);
    if dev.activate(mem.clone(), vec![common::queue()], common::irq(), VIRTIO_F_VERSION_1).is_err() {
        return;
    }
    dev.process_queue(0);
    dev.process_queue(usize::from(flags >> 4));
    assert_eq!(disk.lock().unwrap().data.len(), 64 * 512);
});
