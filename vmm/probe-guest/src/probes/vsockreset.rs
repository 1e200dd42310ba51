//! Vsock reset probe: what a guest does when it unbinds its vsock driver while a stream is
//! open. It sets up the vsock device (the first virtio device), connects to the host (CID 2)
//! port 5000, waits for the device's RESPONSE, then resets the device (status 0), which must
//! close the host's side of the stream and leave the VMM running, and finally resets the
//! machine (the VMM exits 0).
#![no_std]
#![no_main]

mod common;
mod virtio_mmio;

const HDR: u32 = 44;
const HOST_PORT: u32 = 5000;

#[no_mangle]
pub extern "C" fn probe_main(_boot_params: u64) -> ! {
    use virtio_mmio::*;
    map_mmio_window();
    let dev = BASE;
    if rd(dev, 0) != 0x7472_6976 || rd(dev, 8) != 19 || !init(dev, 3) {
        say!("SHOAL-PROBE vsockreset: no vsock device");
        common::reset();
    }
    let cid = u64::from(rd(dev, 0x100)) | (u64::from(rd(dev, 0x104)) << 32);
    say!("SHOAL-PROBE vsockreset: cid=", cid);
    // A receive buffer for the device's answer.
    let rx = buf() + 0x100;
    let mut rx_avail = 0u16;
    submit_on(dev, 0, &[(rx, HDR + 64, true)], &mut rx_avail, false);
    // OP_REQUEST to the host's port 5000, from our port 1234.
    let tx = buf();
    poke(tx, cid); // src_cid
    poke(tx + 8, 2u64); // dst_cid: the host
    poke(tx + 16, 1234u32); // src_port
    poke(tx + 20, HOST_PORT); // dst_port
    poke(tx + 24, 0u32); // len
    poke(tx + 28, 1u16); // type: stream
    poke(tx + 30, 1u16); // op: request
    poke(tx + 32, 0u32); // flags
    poke(tx + 36, 65536u32); // buf_alloc
    poke(tx + 40, 0u32); // fwd_cnt
    let mut tx_avail = 0u16;
    if submit_on(dev, 1, &[(tx, HDR, false)], &mut tx_avail, true).is_none() {
        say!("SHOAL-PROBE vsockreset: request not taken");
        common::reset();
    }
    if wait_used(0, rx_avail, 200_000_000).is_none() {
        say!("SHOAL-PROBE vsockreset: no answer");
        common::reset();
    }
    let op: u16 = peek(rx + 30);
    say!("SHOAL-PROBE vsockreset: connected op=", u64::from(op));
    // The driver goes away with the stream open.
    wr(dev, 0x70, 0);
    say!("SHOAL-PROBE vsockreset: device reset, status=", rd(dev, 0x70));
    common::reset()
}
