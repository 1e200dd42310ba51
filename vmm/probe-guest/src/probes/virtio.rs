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
//! With `virtio.bench=N` on the command line, the first writable disk then takes N writes of
//! 64 KiB (rate-limit measurements). Then prints `virtio: done devices=<n>` and resets.
#![no_std]
#![no_main]

mod common;

use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};
use core::sync::atomic::{compiler_fence, Ordering};

const BASE: u64 = 0xd000_0000;
const WINDOW: u64 = 0x1000;
const QSIZE: u16 = 8;

#[repr(C, align(4096))]
struct Page([u64; 512]);

#[repr(C, align(4096))]
struct Bytes([u8; 4096]);

static mut MMIO_PD: Page = Page([0; 512]);
/// Queue rings: queue q at q * QSTRIDE (up to 4 queues).
static mut RING: [Bytes; 2] = [const { Bytes([0; 4096]) }; 2];
static mut BUF: Bytes = Bytes([0; 4096]);
/// Payload of the `virtio.bench=N` writes.
static mut BIG: [Bytes; 16] = [const { Bytes([0; 4096]) }; 16];

fn reg(dev: u64, off: u64) -> *mut u32 {
    (dev + off) as *mut u32
}

fn rd(dev: u64, off: u64) -> u32 {
    // SAFETY: dev is a mapped virtio-mmio window; registers are 32-bit and aligned.
    unsafe { read_volatile(reg(dev, off)) }
}

fn wr(dev: u64, off: u64, v: u32) {
    // SAFETY: as in rd.
    unsafe { write_volatile(reg(dev, off), v) }
}

/// Maps 0xd0000000..+2 MiB uncached through a new page directory for the 3-4 GiB range.
fn map_mmio_window() {
    let cr3: u64;
    // SAFETY: reading CR3 has no side effects.
    unsafe { core::arch::asm!("mov {}, cr3", out(reg) cr3, options(nomem, nostack)) };
    let pml4 = (cr3 & !0xfff) as *mut u64;
    // SAFETY: the VMM's identity page tables: PML4[0] points at the PDPT, both in low RAM that
    // is identity-mapped; MMIO_PD is ours, page-aligned, and identity-mapped too.
    unsafe {
        let pdpt = (read_volatile(pml4) & 0x000f_ffff_ffff_f000) as *mut u64;
        let pd = addr_of_mut!(MMIO_PD.0) as *mut u64;
        // 2 MiB page, present, writable, cache-disabled, write-through.
        write_volatile(pd.add(((BASE >> 21) & 511) as usize), BASE | 0x9b);
        write_volatile(pdpt.add(3), pd as u64 | 3);
        core::arch::asm!("mov {0}, cr3", "mov cr3, {0}", out(reg) _, options(nostack));
    }
}

fn ring() -> u64 {
    // SAFETY: only the address is taken.
    unsafe { addr_of!(RING) as u64 }
}

fn buf() -> u64 {
    // SAFETY: only the address is taken.
    unsafe { addr_of!(BUF) as u64 }
}

fn poke<T>(addr: u64, v: T) {
    // SAFETY: addr lies in RING or BUF, identity-mapped statics the device shares with us.
    unsafe { write_volatile(addr as *mut T, v) }
}

fn peek<T: Copy>(addr: u64) -> T {
    // SAFETY: as in poke.
    unsafe { read_volatile(addr as *const T) }
}

// Queue layout inside RING: queue q at q * 0x800: descriptors at +0, avail ring at +0x100,
// used ring at +0x200.
const DESC: u64 = 0;
const AVAIL: u64 = 0x100;
const USED: u64 = 0x200;
const QSTRIDE: u64 = 0x800;

fn qbase(q: u64) -> u64 {
    ring() + q * QSTRIDE
}

/// Resets the device, negotiates VERSION_1 only, and sets up queues 0..nq. Returns false on
/// failure.
fn init(dev: u64, nq: u64) -> bool {
    wr(dev, 0x70, 0);
    wr(dev, 0x70, 1);
    wr(dev, 0x70, 3);
    wr(dev, 0x14, 1);
    if rd(dev, 0x10) & 1 == 0 {
        return false;
    }
    wr(dev, 0x24, 0);
    wr(dev, 0x20, 0);
    wr(dev, 0x24, 1);
    wr(dev, 0x20, 1);
    wr(dev, 0x70, 0xb);
    if rd(dev, 0x70) & 8 == 0 {
        return false;
    }
    for i in 0..8192u64 {
        poke(ring() + i, 0u8);
    }
    for q in 0..nq {
        wr(dev, 0x30, q as u32);
        if rd(dev, 0x34) < u32::from(QSIZE) {
            return false;
        }
        wr(dev, 0x38, u32::from(QSIZE));
        for (off, addr) in [(0x80, qbase(q) + DESC), (0x90, qbase(q) + AVAIL), (0xa0, qbase(q) + USED)] {
            wr(dev, off, addr as u32);
            wr(dev, off + 4, (addr >> 32) as u32);
        }
        wr(dev, 0x44, 1);
    }
    wr(dev, 0x70, 0xf);
    rd(dev, 0x70) & 0x40 == 0
}

/// Submits a chain of (address, length, device-writable) buffers and waits for it to be used;
/// returns the length the device reports, or None on timeout.
fn submit(dev: u64, bufs: &[(u64, u32, bool)], avail_idx: &mut u16) -> Option<u32> {
    submit_on(dev, 0, bufs, avail_idx, true)
}

/// Makes a chain available on queue `q` (descriptors from 0) and, if `wait`, waits for it.
fn submit_on(dev: u64, q: u64, bufs: &[(u64, u32, bool)], avail_idx: &mut u16, wait: bool) -> Option<u32> {
    let base = qbase(q);
    for (i, &(addr, len, writable)) in bufs.iter().enumerate() {
        let d = base + DESC + 16 * i as u64;
        let last = i + 1 == bufs.len();
        poke(d, addr);
        poke(d + 8, len);
        poke(d + 12, (if writable { 2u16 } else { 0 }) | if last { 0 } else { 1 });
        poke(d + 14, (i + 1) as u16);
    }
    poke(base + AVAIL + 4 + 2 * u64::from(*avail_idx % QSIZE), 0u16);
    compiler_fence(Ordering::SeqCst);
    *avail_idx = avail_idx.wrapping_add(1);
    poke(base + AVAIL + 2, *avail_idx);
    compiler_fence(Ordering::SeqCst);
    wr(dev, 0x50, q as u32);
    if !wait {
        return Some(0);
    }
    wait_used(q, *avail_idx, 50_000_000)
}

/// Polls queue `q`'s used ring until its index reaches `idx`; returns the last entry's length.
fn wait_used(q: u64, idx: u16, spins: u64) -> Option<u32> {
    let base = qbase(q);
    for _ in 0..spins {
        let used: u16 = peek(base + USED + 2);
        if used == idx {
            compiler_fence(Ordering::SeqCst);
            let slot = base + USED + 4 + 8 * u64::from((used.wrapping_sub(1)) % QSIZE);
            return Some(peek::<u32>(slot + 4));
        }
        core::hint::spin_loop();
    }
    None
}

/// virtio-net: posts a receive buffer, sends one frame (ethertype 0x88b5, payload
/// SHOAL-PROBE-TX), then waits for a frame to arrive and prints its payload.
fn test_net(dev: u64) {
    let mut mac = [0u8; 6];
    for (i, m) in mac.iter_mut().enumerate() {
        // SAFETY: config space reads of the mapped window, one byte each.
        *m = unsafe { read_volatile((dev + 0x100 + i as u64) as *const u8) };
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
    BENCH_WRITES.store(parse_bench(common::cmdline(boot_params)), Ordering::SeqCst);
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
