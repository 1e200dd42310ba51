//! Snapshot state from arbitrary bytes, three ways: as a whole file (the envelope's checks),
//! as a payload sealed in a valid envelope (what anyone who can write a state file can do:
//! the CRC is no defence), and straight into the payload decoder. Each gives a state or an
//! error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoal_vmm::snapshot::{format, SnapshotState};

fuzz_target!(|data: &[u8]| {
    let _ = format::decode::<SnapshotState>(data);
    let _ = format::decode::<SnapshotState>(&format::seal(data));
    let _ = format::decode_payload::<SnapshotState>(data);
});
