//! virtio-vsock queue processing on guest memory and rings taken from the fuzz input: every
//! chain is tried as a transmitted packet (queue 1), as a receive buffer (queue 0) and as an
//! event buffer (queue 2). A host program connects to the device's socket and sends the
//! input's first bytes as its CONNECT line, so the host-side parser and the streams it opens
//! are exercised too.
#![no_main]

#[path = "common.rs"]
mod common;

use std::io::Write;
use std::os::unix::net::UnixStream;

use libfuzzer_sys::fuzz_target;
use shoal_vmm::devices::virtio::vsock::VirtioVsock;
use shoal_vmm::devices::virtio::{VirtioDevice, VIRTIO_F_VERSION_1};

fuzz_target!(|data: &[u8]| {
    let mem = common::memory();
    common::load(mem, data);
    let path = std::env::temp_dir().join(format!("shoal-fuzz-vsock-{}.sock", std::process::id()));
    let Ok(mut dev) = VirtioVsock::new(3, &path) else { return };
    if dev
        .activate(
            mem.clone(),
            vec![common::queue(), common::queue(), common::queue()],
            common::irq(),
            VIRTIO_F_VERSION_1,
        )
        .is_err()
    {
        return;
    }
    let mut host = UnixStream::connect(&path).ok();
    if let Some(h) = host.as_mut() {
        let line = &data[..data.len().min(24)];
        let _ = h.write_all(line);
        let _ = h.write_all(b"\n");
    }
    dev.process_backend();
    dev.process_queue(1);
    dev.process_queue(0);
    dev.restored();
    dev.process_queue(2);
    dev.process_backend();
    dev.process_queue(1);
});
