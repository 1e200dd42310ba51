//! The MMDS endpoint with frames from a hostile guest: the input is cut into frames (a
//! two-byte length before each), every frame goes through `intercept` as the guest's
//! transmit path sends it, and the answers are drained. Nothing may panic, and the queue of
//! answers stays bounded.
#![no_main]

use std::sync::{Arc, Mutex};

use libfuzzer_sys::fuzz_target;
use shoal_vmm::devices::virtio::net::mmds::stack::MmdsStack;
use shoal_vmm::devices::virtio::net::mmds::store::{MmdsStore, MmdsVersion, DEFAULT_SIZE_LIMIT};

fuzz_target!(|data: &[u8]| {
    let mut store = MmdsStore::new(DEFAULT_SIZE_LIMIT);
    let _ = store.put(serde_json::json!({"latest": {"meta-data": {"id": "i-1"}}, "n": 5}));
    if data.first().is_some_and(|b| b & 1 == 1) {
        store.set_version(MmdsVersion::V2);
    }
    let mut stack = MmdsStack::new([169, 254, 169, 254], Arc::new(Mutex::new(store)));
    let mut rest = data.get(1..).unwrap_or(&[]);
    while rest.len() >= 2 {
        let len = usize::from(u16::from_le_bytes([rest[0], rest[1]])).min(rest.len() - 2);
        stack.intercept(&rest[2..2 + len]);
        rest = &rest[2 + len..];
        let mut n = 0;
        while stack.next_frame().is_some() {
            n += 1;
        }
        assert!(n <= 1024);
    }
});
