//! A tiny IPv4 host on the first virtio-net device, for the workload probe: it takes its
//! address from the kernel command line's `ip=<addr>:...` (what the agent gives Linux guests),
//! answers ARP requests for that address and ICMP echo requests sent to it, and with
//! `ping=<addr>` asks ARP for that address and pings it once a second, printing
//! `net: reply from=<addr> seq=<n>` for each answer. Polled from the probe's timer loop: eight
//! receive buffers stay posted, frames are sent one at a time. Frames that are not for it, too
//! short or malformed are dropped.
#![allow(dead_code)]

use core::ptr::addr_of;

use crate::virtio_mmio::*;

/// virtio_net_hdr (version 1, no mergeable buffers): 12 bytes before every frame.
const HDR: u64 = 12;
const SLOT: u64 = 2048;
const RX_SLOTS: u64 = QSIZE as u64;
/// Frames handled here fit in one slot; larger ones are not ours to answer.
const MAX_FRAME: usize = (SLOT - HDR) as usize;
const PING_ID: u16 = 0x5348;

#[repr(C, align(4096))]
struct Pool([u8; ((RX_SLOTS + 1) * SLOT) as usize]);

/// Receive slots 0..8, then the transmit slot.
static mut POOL: Pool = Pool([0; ((RX_SLOTS + 1) * SLOT) as usize]);
/// The frame being looked at or built.
static mut FRAME: [u8; MAX_FRAME] = [0; MAX_FRAME];

fn pool() -> u64 {
    // SAFETY: only the address is taken.
    unsafe { addr_of!(POOL) as u64 }
}

fn frame() -> &'static mut [u8; MAX_FRAME] {
    // SAFETY: the probe is single-threaded and FRAME is only used within one call at a time.
    unsafe { &mut *core::ptr::addr_of_mut!(FRAME) }
}

pub struct Net {
    dev: u64,
    pub mac: [u8; 6],
    pub ip: [u8; 4],
    peer: Option<[u8; 4]>,
    peer_mac: Option<[u8; 6]>,
    used_seen: u16,
    rx_avail: u16,
    tx_idx: u16,
    seq: u16,
    pub replies: u64,
    pub answered: u64,
}

/// The dotted quad at the start of `s`.
fn parse_ip(s: &[u8]) -> Option<[u8; 4]> {
    let mut out = [0u8; 4];
    let mut part = 0usize;
    let mut digits = 0u32;
    let mut value = 0u32;
    for &b in s {
        match b {
            b'0'..=b'9' => {
                value = value * 10 + u32::from(b - b'0');
                digits += 1;
                if value > 255 || digits > 3 {
                    return None;
                }
            }
            b'.' if digits > 0 && part < 3 => {
                out[part] = value as u8;
                part += 1;
                (digits, value) = (0, 0);
            }
            _ => break,
        }
    }
    if part != 3 || digits == 0 {
        return None;
    }
    out[3] = value as u8;
    Some(out)
}

/// The address after `key` on the command line (the key at the start or after a space).
fn arg_ip(cmdline: &[u8], key: &[u8]) -> Option<[u8; 4]> {
    let mut i = 0;
    while i + key.len() <= cmdline.len() {
        if (i == 0 || cmdline[i - 1] == b' ') && &cmdline[i..i + key.len()] == key {
            return parse_ip(&cmdline[i + key.len()..]);
        }
        i += 1;
    }
    None
}

fn checksum(bytes: &[u8]) -> u16 {
    let mut sum = 0u32;
    for pair in bytes.chunks(2) {
        let hi = u32::from(pair[0]) << 8;
        sum += hi | pair.get(1).map_or(0, |&b| u32::from(b));
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn say_ip(prefix: &str, ip: [u8; 4], rest: &str, n: u64) {
    crate::say!(prefix, ip[0], ".", ip[1], ".", ip[2], ".", ip[3], rest, n);
}

impl Net {
    /// The first virtio-net device, set up with its receive buffers posted, if the command line
    /// gives an address (`ip=`) and there is such a device.
    pub fn start(cmdline: &[u8]) -> Option<Net> {
        let ip = arg_ip(cmdline, b"ip=")?;
        map_mmio_window();
        let dev = (0..19u64).map(|i| BASE + i * WINDOW).take_while(|&d| rd(d, 0) == 0x7472_6976).find(|&d| rd(d, 8) == 1)?;
        // VIRTIO_NET_F_MAC: the MAC the agent chose is in the config space.
        if !init_with(dev, 2, 1 << 5) {
            crate::say!("net: virtio-net init failed");
            return None;
        }
        let mac: [u8; 6] = core::array::from_fn(|i| peek::<u8>(dev + 0x100 + i as u64));
        let q = qbase(0);
        for i in 0..RX_SLOTS {
            let d = q + DESC + 16 * i;
            poke(d, pool() + i * SLOT);
            poke(d + 8, SLOT as u32);
            poke(d + 12, 2u16);
            poke(d + 14, 0u16);
            poke(q + AVAIL + 4 + 2 * i, i as u16);
        }
        core::sync::atomic::compiler_fence(core::sync::atomic::Ordering::SeqCst);
        poke(q + AVAIL + 2, RX_SLOTS as u16);
        core::sync::atomic::compiler_fence(core::sync::atomic::Ordering::SeqCst);
        wr(dev, 0x50, 0);
        let peer = arg_ip(cmdline, b"ping=");
        let net = Net {
            dev,
            mac,
            ip,
            peer,
            peer_mac: None,
            used_seen: 0,
            rx_avail: RX_SLOTS as u16,
            tx_idx: 0,
            seq: 0,
            replies: 0,
            answered: 0,
        };
        say_ip("net: up ip=", ip, " mac_last=", u64::from(mac[5]));
        Some(net)
    }

    /// Handles every frame received since the last call and posts its buffer again.
    pub fn poll(&mut self) {
        let q = qbase(0);
        let mut reposted = false;
        loop {
            let used: u16 = peek(q + USED + 2);
            if used == self.used_seen {
                break;
            }
            core::sync::atomic::compiler_fence(core::sync::atomic::Ordering::SeqCst);
            let elem = q + USED + 4 + 8 * u64::from(self.used_seen % QSIZE);
            let id = u64::from(peek::<u32>(elem)) % RX_SLOTS;
            let len = u64::from(peek::<u32>(elem + 4)).min(SLOT);
            self.used_seen = self.used_seen.wrapping_add(1);
            if len > HDR {
                let n = ((len - HDR) as usize).min(MAX_FRAME);
                let f = frame();
                for (i, b) in f[..n].iter_mut().enumerate() {
                    *b = peek(pool() + id * SLOT + HDR + i as u64);
                }
                self.handle(n);
            }
            poke(q + AVAIL + 4 + 2 * u64::from(self.rx_avail % QSIZE), id as u16);
            core::sync::atomic::compiler_fence(core::sync::atomic::Ordering::SeqCst);
            self.rx_avail = self.rx_avail.wrapping_add(1);
            poke(q + AVAIL + 2, self.rx_avail);
            reposted = true;
        }
        if reposted {
            core::sync::atomic::compiler_fence(core::sync::atomic::Ordering::SeqCst);
            wr(self.dev, 0x50, 0);
        }
    }

    /// Once a second: an ARP request for the peer until it answers, then an echo request.
    pub fn ping(&mut self) {
        let Some(peer) = self.peer else { return };
        let f = frame();
        f[..60].fill(0);
        f[6..12].copy_from_slice(&self.mac);
        match self.peer_mac {
            None => {
                f[..6].fill(0xff);
                f[12..14].copy_from_slice(&[0x08, 0x06]);
                f[14..22].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
                f[22..28].copy_from_slice(&self.mac);
                f[28..32].copy_from_slice(&self.ip);
                f[38..42].copy_from_slice(&peer);
                self.send(60);
            }
            Some(mac) => {
                self.seq = self.seq.wrapping_add(1);
                f[..6].copy_from_slice(&mac);
                f[12..14].copy_from_slice(&[0x08, 0x00]);
                let total = 20 + 8 + 16u16;
                f[14..34].copy_from_slice(&[0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
                f[16..18].copy_from_slice(&total.to_be_bytes());
                f[26..30].copy_from_slice(&self.ip);
                f[30..34].copy_from_slice(&peer);
                let c = checksum(&f[14..34]);
                f[24..26].copy_from_slice(&c.to_be_bytes());
                f[34..38].copy_from_slice(&[8, 0, 0, 0]);
                f[38..40].copy_from_slice(&PING_ID.to_be_bytes());
                f[40..42].copy_from_slice(&self.seq.to_be_bytes());
                f[42..58].copy_from_slice(b"SHOAL-PROBE-PING");
                let c = checksum(&f[34..58]);
                f[36..38].copy_from_slice(&c.to_be_bytes());
                self.send(60);
            }
        }
    }

    /// Answers the frame in FRAME[..n] if it is an ARP request or echo request for us; learns
    /// the peer's MAC and counts its echo replies.
    fn handle(&mut self, n: usize) {
        let f = frame();
        if n < 42 {
            return;
        }
        match [f[12], f[13]] {
            [0x08, 0x06] => {
                if f[14..20] != [0, 1, 8, 0, 6, 4] {
                    return;
                }
                let (sha, spa, tpa): ([u8; 6], [u8; 4], [u8; 4]) =
                    (core::array::from_fn(|i| f[22 + i]), core::array::from_fn(|i| f[28 + i]), core::array::from_fn(|i| f[38 + i]));
                if Some(spa) == self.peer {
                    self.peer_mac = Some(sha);
                }
                if f[20..22] == [0, 1] && tpa == self.ip {
                    f[..6].copy_from_slice(&sha);
                    f[6..12].copy_from_slice(&self.mac);
                    f[21] = 2;
                    f[22..28].copy_from_slice(&self.mac);
                    f[28..32].copy_from_slice(&self.ip);
                    f[32..38].copy_from_slice(&sha);
                    f[38..42].copy_from_slice(&spa);
                    f[42..60].fill(0);
                    self.answered += 1;
                    self.send(60);
                }
            }
            [0x08, 0x00] => {
                let ihl = usize::from(f[14] & 0xf) * 4;
                let total = usize::from(u16::from_be_bytes([f[16], f[17]]));
                if f[14] >> 4 != 4 || ihl < 20 || total < ihl + 8 || 14 + total > n || f[23] != 1 || f[30..34] != self.ip {
                    return;
                }
                let icmp = 14 + ihl;
                let src: [u8; 4] = core::array::from_fn(|i| f[26 + i]);
                match f[icmp] {
                    8 => {
                        let from: [u8; 6] = core::array::from_fn(|i| f[6 + i]);
                        f[..6].copy_from_slice(&from);
                        f[6..12].copy_from_slice(&self.mac);
                        f[30..34].copy_from_slice(&src);
                        f[26..30].copy_from_slice(&self.ip);
                        f[22] = 64;
                        f[24..26].fill(0);
                        let c = checksum(&f[14..icmp]);
                        f[24..26].copy_from_slice(&c.to_be_bytes());
                        f[icmp] = 0;
                        f[icmp + 2..icmp + 4].fill(0);
                        let c = checksum(&f[icmp..14 + total]);
                        f[icmp + 2..icmp + 4].copy_from_slice(&c.to_be_bytes());
                        if 14 + total < 60 {
                            f[14 + total..60].fill(0);
                        }
                        self.answered += 1;
                        self.send((14 + total).max(60));
                    }
                    0 if Some(src) == self.peer && f[icmp + 4..icmp + 6] == PING_ID.to_be_bytes() => {
                        self.replies += 1;
                        let seq = u16::from_be_bytes([f[icmp + 6], f[icmp + 7]]);
                        say_ip("net: reply from=", src, " seq=", u64::from(seq));
                    }
                    _ => {}
                }
            }
            _ => {}
        }
    }

    /// Sends FRAME[..n] and waits for the device to take it.
    fn send(&mut self, n: usize) {
        let tx = pool() + RX_SLOTS * SLOT;
        for i in 0..HDR {
            poke(tx + i, 0u8);
        }
        for (i, b) in frame()[..n].iter().enumerate() {
            poke(tx + HDR + i as u64, *b);
        }
        submit_on(self.dev, 1, &[(tx, (HDR as usize + n) as u32, false)], &mut self.tx_idx, true);
    }
}
