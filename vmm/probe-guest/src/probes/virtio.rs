//! virtio probe: a minimal virtio-mmio (version 2) driver. Maps the virtio window (0xd0000000,
//! in the MMIO gap, above the 1 GiB the boot page tables cover), then drives every device it
//! finds with one 8-entry queue, polling the used ring (no interrupts):
//! - block: reads the serial (GET_ID), writes a pattern to sector 1, reads it back, flushes;
//!   prints `blk id=<id> sectors=<n> write=<status> read=<status> match=<0|1> flush=<status>`;
//! - rng: asks for 64 bytes; prints `rng got=<bytes> nonzero=<count of non-zero bytes>`;
//! - net: sends one frame (ethertype 0x88b5, payload `SHOAL-PROBE-TX`) and prints the payload
//!   of the first frame it receives: `net rx len=<n> payload=<text>`;
//! - vsock: prints its CID (`vsock cid=<n>`), connects to host port 1234, sends
//!   `SHOAL-VSOCK-G2H` and prints the reply (`vsock g2h response=<0|1> reply=<text>`), then
//!   waits for the host to connect to its port 52, answers what it receives with `pong:` and
//!   the same text (`vsock h2g port=<p> data=<text>`).
//! With `virtio.arp` on the command line the net test is an ARP request for 169.254.169.254
//! (MMDS) instead, printing the reply. With `virtio.bench=N` on the command line, the first writable disk then takes N writes of
//! 64 KiB (rate-limit measurements). Then prints `virtio: done devices=<n>` and resets.
#![no_std]
#![no_main]

mod common;

use core::ptr::{addr_of, read_volatile};
use core::sync::atomic::Ordering;

mod virtio_mmio;

use virtio_mmio::*;

/// Payload of the `virtio.bench=N` writes.
static mut BIG: [Bytes; 16] = [const { Bytes([0; 4096]) }; 16];

/// With `virtio.arp` on the command line: an ARP request for 169.254.169.254 (MMDS) from
/// 169.254.0.2, and prints the reply: `net arp op=<op> mac=<sender MAC bytes> ip=<sender IP>`.
fn test_arp(dev: u64, mac: [u8; 6]) {
    let rx = buf() + 0x800;
    let tx = buf() + 0x100;
    let (mut rx_idx, mut tx_idx) = (0u16, 0u16);
    submit_on(dev, 0, &[(rx, 1600, true)], &mut rx_idx, false);
    let mut frame = [0u8; 12 + 60];
    frame[12..18].copy_from_slice(&[0xff; 6]);
    frame[18..24].copy_from_slice(&mac);
    frame[24..26].copy_from_slice(&[0x08, 0x06]);
    frame[26..34].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    frame[34..40].copy_from_slice(&mac);
    frame[40..44].copy_from_slice(&[169, 254, 0, 2]);
    frame[50..54].copy_from_slice(&[169, 254, 169, 254]);
    for (i, b) in frame.iter().enumerate() {
        poke(tx + i as u64, *b);
    }
    submit_on(dev, 1, &[(tx, frame.len() as u32, false)], &mut tx_idx, true);
    match wait_used(0, rx_idx, 400_000_000) {
        Some(len) if len >= 12 + 42 => {
            let arp = rx + 12 + 14;
            let op = u16::from_be_bytes([peek(arp + 6), peek(arp + 7)]);
            let sha: [u8; 6] = core::array::from_fn(|i| peek(arp + 8 + i as u64));
            let spa: [u8; 4] = core::array::from_fn(|i| peek(arp + 14 + i as u64));
            say!(
                "net arp op=", u64::from(op), " mac=", sha[0], ":", sha[1], ":", sha[2], ":", sha[3], ":", sha[4], ":",
                sha[5], " ip=", spa[0], ".", spa[1], ".", spa[2], ".", spa[3]
            );
        }
        Some(len) => say!("net arp short len=", len),
        None => say!("net arp none"),
    }
}

/// virtio-net: posts a receive buffer, sends one frame (ethertype 0x88b5, payload
/// SHOAL-PROBE-TX), then waits for a frame to arrive and prints its payload.
fn test_net(dev: u64) {
    let mut mac = [0u8; 6];
    for (i, m) in mac.iter_mut().enumerate() {
        // SAFETY: config space reads of the mapped window, one byte each.
        *m = unsafe { read_volatile((dev + 0x100 + i as u64) as *const u8) };
    }
    if ARP.load(Ordering::SeqCst) {
        return test_arp(dev, mac);
    }
    let rx = buf() + 0x800;
    let tx = buf() + 0x100;
    let (mut rx_idx, mut tx_idx) = (0u16, 0u16);
    submit_on(dev, 0, &[(rx, 1600, true)], &mut rx_idx, false);
    for i in 0..12u64 {
        poke(tx + i, 0u8);
    }
    for i in 0..6u64 {
        poke(tx + 12 + i, 0xffu8);
        poke(tx + 18 + i, mac[i as usize]);
    }
    poke(tx + 24, 0x88u8);
    poke(tx + 25, 0xb5u8);
    let payload = b"SHOAL-PROBE-TX";
    for i in 0..48u64 {
        poke(tx + 26 + i, payload.get(i as usize).copied().unwrap_or(0));
    }
    let sent = submit_on(dev, 1, &[(tx, 12 + 60, false)], &mut tx_idx, true);
    say!("net mac=", mac[5], " tx=", u8::from(sent.is_some()));
    match wait_used(0, rx_idx, 400_000_000) {
        Some(len) if len >= 12 + 14 => {
            let mut text = [0u8; 32];
            let mut n = 0;
            while n < 32 {
                let b: u8 = peek(rx + 12 + 14 + n as u64);
                if !(0x21..0x7f).contains(&b) {
                    break;
                }
                text[n] = b;
                n += 1;
            }
            say!("net rx len=", len, " payload=", &text[..n]);
        }
        Some(len) => say!("net rx len=", len, " (short)"),
        None => say!("net rx none"),
    }
}

const VSOCK_RX: u64 = 0x800;
const VSOCK_TX: u64 = 0x100;
const VSOCK_HDR: u64 = 44;
const VSOCK_BUF: u32 = 512;

/// Sends one vsock packet (header and payload in one buffer) from `src` to host port `dst`.
fn vsock_send(dev: u64, cid: u64, op: u16, src: u32, dst: u32, payload: &[u8], idx: &mut u16) -> bool {
    let tx = buf() + VSOCK_TX;
    poke(tx, cid);
    poke(tx + 8, 2u64);
    poke(tx + 16, src);
    poke(tx + 20, dst);
    poke(tx + 24, payload.len() as u32);
    poke(tx + 28, 1u16);
    poke(tx + 30, op);
    poke(tx + 32, 0u32);
    poke(tx + 36, VSOCK_BUF);
    poke(tx + 40, 0u32);
    for (i, b) in payload.iter().enumerate() {
        poke(tx + VSOCK_HDR + i as u64, *b);
    }
    submit_on(dev, 1, &[(tx, VSOCK_HDR as u32 + payload.len() as u32, false)], idx, true).is_some()
}

/// Posts a receive buffer and waits for a packet: (op, src_port, dst_port, payload length);
/// the payload is at buf() + VSOCK_RX + 44.
fn vsock_recv(dev: u64, idx: &mut u16, spins: u64) -> Option<(u16, u32, u32, u32)> {
    let rx = buf() + VSOCK_RX;
    submit_on(dev, 0, &[(rx, VSOCK_HDR as u32 + 256, true)], idx, false);
    wait_used(0, *idx, spins)?;
    Some((peek(rx + 30), peek(rx + 16), peek(rx + 20), peek(rx + 24)))
}

/// Up to 32 printable bytes of the last received payload.
fn vsock_text(len: u32, out: &mut [u8; 32]) -> usize {
    let mut n = 0;
    while n < 32 && n < len as usize {
        let b: u8 = peek(buf() + VSOCK_RX + VSOCK_HDR + n as u64);
        if !(0x20..0x7f).contains(&b) {
            break;
        }
        out[n] = b;
        n += 1;
    }
    n
}

fn test_vsock(dev: u64) {
    let cid = u64::from(rd(dev, 0x100)) | (u64::from(rd(dev, 0x104)) << 32);
    say!("vsock cid=", cid);
    let (mut rx, mut tx) = (0u16, 0u16);
    let mut text = [0u8; 32];
    // Guest → host: connect to port 1234 from port 5000 (1 = REQUEST, 2 = RESPONSE, 5 = RW).
    vsock_send(dev, cid, 1, 5000, 1234, b"", &mut tx);
    let response = vsock_recv(dev, &mut rx, 400_000_000).is_some_and(|(op, src, dst, _)| op == 2 && src == 1234 && dst == 5000);
    let mut n = 0;
    if response {
        vsock_send(dev, cid, 5, 5000, 1234, b"SHOAL-VSOCK-G2H", &mut tx);
        if let Some((5, _, _, len)) = vsock_recv(dev, &mut rx, 400_000_000) {
            n = vsock_text(len, &mut text);
        }
        vsock_send(dev, cid, 3, 5000, 1234, b"", &mut tx);
    }
    say!("vsock g2h response=", u8::from(response), " reply=", &text[..n]);
    // Host → guest: wait for a REQUEST to port 52, accept, echo what comes with "pong:".
    let Some((1, host_port, 52, _)) = vsock_recv(dev, &mut rx, 2_000_000_000) else {
        say!("vsock h2g none");
        return;
    };
    vsock_send(dev, cid, 2, 52, host_port, b"", &mut tx);
    let mut n = 0;
    loop {
        match vsock_recv(dev, &mut rx, 400_000_000) {
            Some((5, _, _, len)) => {
                n = vsock_text(len, &mut text);
                break;
            }
            // Credit updates and the like.
            Some(_) => continue,
            None => break,
        }
    }
    let mut reply = [0u8; 37];
    reply[..5].copy_from_slice(b"pong:");
    reply[5..5 + n].copy_from_slice(&text[..n]);
    vsock_send(dev, cid, 5, 52, host_port, &reply[..5 + n], &mut tx);
    say!("vsock h2g port=", host_port, " data=", &text[..n]);
}

fn block_request(dev: u64, kind: u32, sector: u64, data: Option<(u32, bool)>, idx: &mut u16) -> u8 {
    let hdr = buf();
    let status = buf() + 0x20;
    let payload = buf() + 0x200;
    poke(hdr, kind);
    poke(hdr + 4, 0u32);
    poke(hdr + 8, sector);
    poke(status, 0xffu8);
    let ok = match data {
        Some((len, writable)) => submit(dev, &[(hdr, 16, false), (payload, len, writable), (status, 1, true)], idx),
        None => submit(dev, &[(hdr, 16, false), (status, 1, true)], idx),
    };
    if ok.is_none() {
        return 0xee;
    }
    peek(status)
}

fn test_block(dev: u64) {
    let mut idx = 0u16;
    let payload = buf() + 0x200;
    // SAFETY: config space reads of the mapped window (capacity, a 64-bit little-endian field).
    let sectors = u64::from(rd(dev, 0x100)) | (u64::from(rd(dev, 0x104)) << 32);
    for i in 0..20u64 {
        poke(payload + i, 0u8);
    }
    let id_status = block_request(dev, 8, 0, Some((20, true)), &mut idx);
    let mut id = [0u8; 20];
    let mut n = 0;
    while n < 20 {
        let b: u8 = peek(payload + n as u64);
        if b == 0 {
            break;
        }
        id[n] = b;
        n += 1;
    }
    for i in 0..512u64 {
        poke(payload + i, (i as u8).wrapping_mul(7).wrapping_add(0x5a));
    }
    let write = block_request(dev, 1, 1, Some((512, false)), &mut idx);
    for i in 0..512u64 {
        poke(payload + i, 0u8);
    }
    let read = block_request(dev, 0, 1, Some((512, true)), &mut idx);
    let mut matches = 1u8;
    for i in 0..512u64 {
        if peek::<u8>(payload + i) != (i as u8).wrapping_mul(7).wrapping_add(0x5a) {
            matches = 0;
        }
    }
    let flush = block_request(dev, 4, 0, None, &mut idx);
    say!("blk id=", &id[..n], " id_status=", id_status, " sectors=", sectors, " write=", write, " read=", read, " match=", matches, " flush=", flush);
    if BENCH_WRITES.load(Ordering::SeqCst) > 0 && write == 0 {
        bench(dev, sectors, &mut idx);
    }
}

/// `virtio.arp` on the command line: the net test asks ARP for the MMDS address instead.
static ARP: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);
static BENCH_WRITES: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

/// `virtio.bench=N`: N writes of 64 KiB, cycling over the disk; prints the count at the end.
fn bench(dev: u64, sectors: u64, idx: &mut u16) {
    let n = BENCH_WRITES.load(Ordering::SeqCst);
    // SAFETY: only the address is taken.
    let big = unsafe { addr_of!(BIG) as u64 };
    let hdr = buf();
    let status = buf() + 0x20;
    let span = (sectors / 128).max(1);
    say!("bench start writes=", n, " bytes_each=65536");
    let mut failed = 0u64;
    for i in 0..n {
        poke(hdr, 1u32);
        poke(hdr + 4, 0u32);
        poke(hdr + 8, (i % span) * 128);
        poke(status, 0xffu8);
        if submit(dev, &[(hdr, 16, false), (big, 65536, false), (status, 1, true)], idx).is_none() || peek::<u8>(status) != 0 {
            failed += 1;
        }
    }
    say!("bench done writes=", n, " failed=", failed);
}

/// Reads `virtio.bench=N` from the command line.
fn parse_bench(cmdline: &[u8]) -> u64 {
    let key = b"virtio.bench=";
    let Some(at) = cmdline.windows(key.len()).position(|w| w == key) else { return 0 };
    let mut n = 0u64;
    for &b in &cmdline[at + key.len()..] {
        if !b.is_ascii_digit() {
            break;
        }
        n = n.saturating_mul(10).saturating_add(u64::from(b - b'0'));
    }
    n
}

fn test_rng(dev: u64) {
    let mut idx = 0u16;
    let out = buf() + 0x400;
    for i in 0..64u64 {
        poke(out + i, 0u8);
    }
    let got = submit(dev, &[(out, 64, true)], &mut idx).unwrap_or(0);
    let mut nonzero = 0u32;
    for i in 0..64u64 {
        if peek::<u8>(out + i) != 0 {
            nonzero += 1;
        }
    }
    say!("rng got=", got, " nonzero=", nonzero);
}

#[no_mangle]
pub extern "C" fn probe_main(boot_params: u64) -> ! {
    say!("SHOAL-PROBE virtio: start");
    let cmdline = common::cmdline(boot_params);
    BENCH_WRITES.store(parse_bench(cmdline), Ordering::SeqCst);
    ARP.store(cmdline.windows(10).any(|w| w == b"virtio.arp"), Ordering::SeqCst);
    map_mmio_window();
    let mut devices = 0u32;
    for i in 0..19u64 {
        let dev = BASE + i * WINDOW;
        if rd(dev, 0) != 0x7472_6976 {
            break;
        }
        devices += 1;
        let kind = rd(dev, 8);
        let queues = match kind {
            1 => 2,
            19 => 3,
            _ => 1,
        };
        if !init(dev, queues) {
            say!("virtio device ", i, " type ", kind, ": init failed");
            continue;
        }
        match kind {
            2 => test_block(dev),
            4 => test_rng(dev),
            1 => test_net(dev),
            19 => test_vsock(dev),
            other => say!("virtio device ", i, " type ", other, ": no test"),
        }
    }
    say!("virtio: done devices=", devices);
    common::reset()
}
