//! Snapshot state files from arbitrary bytes: decoding gives a state or an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_vmm::snapshot::{format, SnapshotState};

fuzz_target!(|data: &[u8]| {
    let _ = format::decode::<SnapshotState>(data);
});
