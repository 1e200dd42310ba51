//! Guest memory whose first 64 KiB come from the fuzz input, and a queue over it: descriptor
//! table at 0x0 (16 entries), avail ring at 0x100, used ring at 0x200. Descriptors, ring
//! indexes, and buffer contents are all attacker-chosen.

use shoal_vmm::vstate::memory::GuestMemoryMmap;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

pub const QUEUE_SIZE: u16 = 16;

pub fn memory() -> &'static GuestMemoryMmap {
    static MEM: std::sync::OnceLock<GuestMemoryMmap> = std::sync::OnceLock::new();
    MEM.get_or_init(|| shoal_vmm::vstate::memory::create_guest_memory(1 << 20).expect("guest memory"))
}

pub fn load(mem: &GuestMemoryMmap, data: &[u8]) {
    let mut page = vec![0u8; 64 << 10];
    let n = data.len().min(page.len());
    page[..n].copy_from_slice(&data[..n]);
    mem.write_slice(&page, GuestAddress(0)).expect("write guest memory");
}

pub fn queue() -> Queue {
    let mut q = Queue::new(QUEUE_SIZE).expect("queue");
    q.set_size(QUEUE_SIZE);
    q.set_desc_table_address(Some(0), Some(0));
    q.set_avail_ring_address(Some(0x100), Some(0));
    q.set_used_ring_address(Some(0x200), Some(0));
    q.set_ready(true);
    q
}

pub fn irq() -> std::sync::Arc<shoal_vmm::devices::virtio::IrqLine> {
    let evt = vmm_sys_util::eventfd::EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).expect("eventfd");
    std::sync::Arc::new(shoal_vmm::devices::virtio::IrqLine::new(evt))
}
