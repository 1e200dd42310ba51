//! Test helpers: split virtqueues laid out in plain guest memory by hand, so tests can build
//! well-formed and hostile descriptor chains exactly.

use std::cell::Cell;

use crate::vstate::memory::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress};

pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;

/// 16 MiB of guest memory.
pub fn memory() -> GuestMemoryMmap {
    crate::vstate::memory::create_guest_memory(16 << 20).expect("guest memory")
}

/// A split queue of `size` entries at `base`: descriptor table, then avail ring, then used ring.
#[derive(Debug)]
pub struct TestQueue {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    next_desc: Cell<u16>,
    avail_idx: Cell<u16>,
}

impl TestQueue {
    pub fn new(mem: &GuestMemoryMmap, base: u64, size: u16) -> TestQueue {
        let desc = base;
        let avail = desc + 16 * u64::from(size);
        let used = (avail + 6 + 2 * u64::from(size)).next_multiple_of(4);
        let end = used + 6 + 8 * u64::from(size);
        mem.write_slice(&vec![0u8; (end - base) as usize], GuestAddress(base)).expect("queue in memory");
        TestQueue { size, desc, avail, used, next_desc: Cell::new(0), avail_idx: Cell::new(0) }
    }

    /// Writes descriptor `index` as is (any flags and next, for hostile chains).
    pub fn write_desc(&self, mem: &GuestMemoryMmap, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = GuestAddress(self.desc + 16 * u64::from(index));
        mem.write_obj(addr, at).unwrap();
        mem.write_obj(len, GuestAddress(at.0 + 8)).unwrap();
        mem.write_obj(flags, GuestAddress(at.0 + 12)).unwrap();
        mem.write_obj(next, GuestAddress(at.0 + 14)).unwrap();
    }

    /// Makes descriptor `head` available.
    pub fn publish(&self, mem: &GuestMemoryMmap, head: u16) {
        let idx = self.avail_idx.get();
        mem.write_obj(head, GuestAddress(self.avail + 4 + 2 * u64::from(idx % self.size))).unwrap();
        self.avail_idx.set(idx.wrapping_add(1));
        mem.write_obj(self.avail_idx.get(), GuestAddress(self.avail + 2)).unwrap();
    }

    /// Adds a well-formed chain of (address, length, device-writable) buffers; returns its head.
    pub fn add_chain(&self, mem: &GuestMemoryMmap, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc.get();
        for (i, &(addr, len, writable)) in bufs.iter().enumerate() {
            let index = (head + i as u16) % self.size;
            let last = i + 1 == bufs.len();
            let flags = if writable { F_WRITE } else { 0 } | if last { 0 } else { F_NEXT };
            self.write_desc(mem, index, addr, len, flags, (index + 1) % self.size);
        }
        self.next_desc.set((head + bufs.len() as u16) % self.size);
        self.publish(mem, head);
        head
    }

    /// A ready virtio-queue `Queue` (of at most `max` entries) over these rings, as a driver
    /// would have set it up.
    pub fn queue(&self, max: u16) -> virtio_queue::Queue {
        use virtio_queue::QueueT;
        let mut queue = virtio_queue::Queue::new(max).expect("queue");
        queue.set_size(self.size);
        queue.set_desc_table_address(Some(self.desc as u32), Some((self.desc >> 32) as u32));
        queue.set_avail_ring_address(Some(self.avail as u32), Some((self.avail >> 32) as u32));
        queue.set_used_ring_address(Some(self.used as u32), Some((self.used >> 32) as u32));
        queue.set_ready(true);
        queue
    }

    pub fn used_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        mem.read_obj(GuestAddress(self.used + 2)).unwrap()
    }

    /// Used ring entry `i`: (chain head, bytes written).
    pub fn used_elem(&self, mem: &GuestMemoryMmap, i: u16) -> (u32, u32) {
        let at = self.used + 4 + 8 * u64::from(i % self.size);
        (mem.read_obj(GuestAddress(at)).unwrap(), mem.read_obj(GuestAddress(at + 4)).unwrap())
    }
}
