//! The guest-facing network side of MMDS: a small Ethernet/ARP/IPv4/TCP endpoint inside the
//! VMM (Firecracker's "dumbo" plays this part). Frames the guest sends on an MMDS interface
//! pass through `intercept` first: an ARP request for the MMDS address is answered with
//! `MMDS_MAC`, anything else for the MMDS address is taken (TCP to port 80 is served, the
//! rest dropped) and never reaches the host's tap; other frames go on to the tap unchanged.
//! Answers wait in a bounded queue that the device's receive path empties into the guest's
//! buffers before frames from the tap.
//!
//! The TCP side is a server for one request/response protocol on a lossless link (the only
//! network between it and the guest is the guest's own receive queue): it answers SYNs,
//! acknowledges every segment, takes in-order data (a retransmitted or out-of-order segment
//! is acknowledged again and dropped), sends answers within the guest's window and MSS, and
//! closes on FIN or after `Connection: close`. It keeps at most `MAX_CONNS` connections (the
//! least recently active goes) and at most `MAX_QUEUED` frames; it never retransmits, as no
//! frame it queued is lost before the guest's driver has it. Every field of a frame comes from
//! the guest and is checked; a malformed frame is dropped.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::store::{parse_request, response, MmdsStore};
use crate::devices::virtio::net::tap::VNET_HDR_LEN;

/// The MAC the MMDS address answers ARP with (a locally administered unicast address).
pub const MMDS_MAC: [u8; 6] = [0x06, 0x01, 0x23, 0x45, 0x67, 0x01];
const PORT: u16 = 80;
const MAX_CONNS: usize = 32;
const MAX_QUEUED: usize = 512;
/// What we advertise: more than a request can be (`MAX_REQUEST`), unscaled.
const OUR_WINDOW: u16 = 32768;
const OUR_MSS: u16 = 1460;
const DEFAULT_MSS: u16 = 536;

const ETH_ARP: u16 = 0x0806;
const ETH_IPV4: u16 = 0x0800;
const FIN: u8 = 0x01;
const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const PSH: u8 = 0x08;
const ACK: u8 = 0x10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    SynReceived,
    Established,
    /// We sent our FIN; the guest has not closed yet.
    FinSent,
    /// Both sides closed; waiting for the ACK of our FIN.
    LastAck,
}

#[derive(Debug)]
struct Conn {
    guest_mac: [u8; 6],
    state: State,
    iss: u32,
    rcv_nxt: u32,
    snd_una: u32,
    snd_nxt: u32,
    window: u32,
    mss: u16,
    request: Vec<u8>,
    unsent: VecDeque<u8>,
    close_after: bool,
    peer_closed: bool,
    last: Instant,
}

/// Counters for what the endpoint did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct MmdsCounters {
    pub arp_replies: u64,
    pub requests: u64,
    pub dropped: u64,
}

/// The endpoint of one network interface.
pub struct MmdsStack {
    ip: [u8; 4],
    store: Arc<Mutex<MmdsStore>>,
    conns: HashMap<([u8; 4], u16), Conn>,
    out: VecDeque<Vec<u8>>,
    ip_id: u16,
    isn: u32,
    pub counters: MmdsCounters,
}

impl std::fmt::Debug for MmdsStack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmdsStack").field("ip", &self.ip).field("conns", &self.conns.len()).finish()
    }
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// The Internet checksum of `parts` concatenated.
fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum = 0u32;
    let mut odd: Option<u8> = None;
    for part in parts {
        for &b in *part {
            match odd.take() {
                Some(hi) => sum += u32::from(u16::from_be_bytes([hi, b])),
                None => odd = Some(b),
            }
        }
    }
    if let Some(hi) = odd {
        sum += u32::from(u16::from_be_bytes([hi, 0]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A TCP segment to send, before framing.
struct Segment<'a> {
    dst_mac: [u8; 6],
    dst_ip: [u8; 4],
    dst_port: u16,
    seq: u32,
    ack: u32,
    flags: u8,
    payload: &'a [u8],
}

impl<'a> Segment<'a> {
    /// The connection's next segment: at our next sequence number, acknowledging all received.
    fn next(c: &Conn, key: ([u8; 4], u16), flags: u8, payload: &'a [u8]) -> Segment<'a> {
        Segment { dst_mac: c.guest_mac, dst_ip: key.0, dst_port: key.1, seq: c.snd_nxt, ack: c.rcv_nxt, flags, payload }
    }
}

impl MmdsStack {
    pub fn new(ip: [u8; 4], store: Arc<Mutex<MmdsStore>>) -> MmdsStack {
        use crate::devices::virtio::rng::{Entropy, HostEntropy};
        let mut seed = [0u8; 4];
        // A failure leaves zeros: sequence numbers are then predictable, not wrong.
        let _ = HostEntropy.fill(&mut seed);
        MmdsStack {
            ip,
            store,
            conns: HashMap::new(),
            out: VecDeque::new(),
            ip_id: 0,
            isn: u32::from_ne_bytes(seed),
            counters: MmdsCounters::default(),
        }
    }

    /// Takes the frame (with its virtio-net header) if it is for MMDS; false lets it go on.
    pub fn intercept(&mut self, frame: &[u8]) -> bool {
        let Some(eth) = frame.get(VNET_HDR_LEN..) else { return false };
        if eth.len() < 14 {
            return false;
        }
        let mut src_mac = [0u8; 6];
        src_mac.copy_from_slice(&eth[6..12]);
        match be16(eth, 12) {
            ETH_ARP => self.arp(src_mac, &eth[14..]),
            ETH_IPV4 => self.ipv4(src_mac, &eth[14..]),
            _ => false,
        }
    }

    /// A frame for the guest (virtio-net header included), oldest first.
    pub fn next_frame(&mut self) -> Option<Vec<u8>> {
        self.out.pop_front()
    }

    pub fn has_frames(&self) -> bool {
        !self.out.is_empty()
    }

    fn queue(&mut self, eth: Vec<u8>) {
        if self.out.len() >= MAX_QUEUED {
            self.counters.dropped += 1;
            return;
        }
        let mut frame = vec![0u8; VNET_HDR_LEN];
        frame.extend_from_slice(&eth);
        self.out.push_back(frame);
    }

    fn arp(&mut self, src_mac: [u8; 6], arp: &[u8]) -> bool {
        // Ethernet/IPv4 ARP only: htype 1, ptype 0x0800, hlen 6, plen 4.
        if arp.len() < 28 || be16(arp, 0) != 1 || be16(arp, 2) != ETH_IPV4 || arp[4] != 6 || arp[5] != 4 {
            return false;
        }
        if arp[24..28] != self.ip {
            return false;
        }
        if be16(arp, 6) != 1 {
            return true; // a reply or announcement about the MMDS address: not the host's business
        }
        let mut eth = Vec::with_capacity(42);
        eth.extend_from_slice(&arp[8..14]);
        eth.extend_from_slice(&MMDS_MAC);
        eth.extend_from_slice(&ETH_ARP.to_be_bytes());
        eth.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 2]);
        eth.extend_from_slice(&MMDS_MAC);
        eth.extend_from_slice(&self.ip);
        eth.extend_from_slice(&arp[8..18]);
        let _ = src_mac;
        self.counters.arp_replies += 1;
        self.queue(eth);
        true
    }

    fn ipv4(&mut self, src_mac: [u8; 6], ip: &[u8]) -> bool {
        if ip.len() < 20 || ip[0] >> 4 != 4 || ip[16..20] != self.ip {
            return false;
        }
        // From here on the packet is MMDS's: taken whatever becomes of it.
        let ihl = usize::from(ip[0] & 0x0f) * 4;
        let total = usize::from(be16(ip, 2));
        let fragmented = be16(ip, 6) & 0x3fff != 0;
        if ihl < 20 || total < ihl || total > ip.len() || ip[9] != 6 || fragmented {
            self.counters.dropped += 1;
            return true;
        }
        let mut src_ip = [0u8; 4];
        src_ip.copy_from_slice(&ip[12..16]);
        self.tcp(src_mac, src_ip, &ip[ihl..total]);
        true
    }

    fn tcp(&mut self, guest_mac: [u8; 6], guest_ip: [u8; 4], seg: &[u8]) {
        if seg.len() < 20 {
            self.counters.dropped += 1;
            return;
        }
        let (sport, dport) = (be16(seg, 0), be16(seg, 2));
        let (seq, ack) = (be32(seg, 4), be32(seg, 8));
        let off = usize::from(seg[12] >> 4) * 4;
        let flags = seg[13];
        let window = u32::from(be16(seg, 14));
        if off < 20 || off > seg.len() {
            self.counters.dropped += 1;
            return;
        }
        let payload = &seg[off..];
        let now = Instant::now();
        let key = (guest_ip, sport);
        if flags & RST != 0 {
            self.conns.remove(&key);
            return;
        }
        let reset = |this: &mut Self| {
            let (rseq, rflags) = if flags & ACK != 0 { (ack, RST) } else { (0, RST | ACK) };
            let rack = seq.wrapping_add(payload.len() as u32).wrapping_add(u32::from(flags & (SYN | FIN) != 0));
            this.send(&Segment {
                dst_mac: guest_mac,
                dst_ip: guest_ip,
                dst_port: sport,
                seq: rseq,
                ack: rack,
                flags: rflags,
                payload: &[],
            });
        };
        if dport != PORT {
            reset(self);
            return;
        }
        if !self.conns.contains_key(&key) {
            if flags & SYN == 0 || flags & ACK != 0 {
                reset(self);
                return;
            }
            if self.conns.len() >= MAX_CONNS {
                if let Some(oldest) = self.conns.iter().min_by_key(|(_, c)| c.last).map(|(k, _)| *k) {
                    self.conns.remove(&oldest);
                }
            }
            self.isn = self.isn.wrapping_add(0x0101_3f71);
            let iss = self.isn;
            let conn = Conn {
                guest_mac,
                state: State::SynReceived,
                iss,
                rcv_nxt: seq.wrapping_add(1),
                snd_una: iss,
                snd_nxt: iss.wrapping_add(1),
                window,
                mss: mss_option(&seg[20..off]).unwrap_or(DEFAULT_MSS).clamp(64, OUR_MSS),
                request: Vec::new(),
                unsent: VecDeque::new(),
                close_after: false,
                peer_closed: false,
                last: now,
            };
            self.send_syn_ack(key, &conn);
            self.conns.insert(key, conn);
            return;
        }
        let Some(mut c) = self.conns.remove(&key) else { return };
        c.last = now;
        if flags & SYN != 0 {
            // A retransmitted SYN: our SYN-ACK again.
            if c.state == State::SynReceived && seq.wrapping_add(1) == c.rcv_nxt {
                self.send_syn_ack(key, &c);
            }
            self.conns.insert(key, c);
            return;
        }
        if flags & ACK != 0 {
            let acked = ack.wrapping_sub(c.snd_una);
            let in_flight = c.snd_nxt.wrapping_sub(c.snd_una);
            if acked <= in_flight {
                c.snd_una = ack;
                if c.state == State::SynReceived && ack == c.iss.wrapping_add(1) {
                    c.state = State::Established;
                }
            }
            c.window = window;
        }
        let mut need_ack = false;
        if !payload.is_empty() {
            need_ack = true;
            if seq == c.rcv_nxt && !c.peer_closed {
                c.rcv_nxt = c.rcv_nxt.wrapping_add(payload.len() as u32);
                c.request.extend_from_slice(payload);
            }
        }
        if flags & FIN != 0 && seq.wrapping_add(payload.len() as u32) == c.rcv_nxt && !c.peer_closed {
            c.rcv_nxt = c.rcv_nxt.wrapping_add(1);
            c.peer_closed = true;
            need_ack = true;
        }
        // Answer every complete request in order.
        if !c.close_after {
            loop {
                match parse_request(&c.request) {
                    Ok(Some((req, used))) => {
                        c.request.drain(..used);
                        self.counters.requests += 1;
                        let answer = self.store.lock().unwrap_or_else(|p| p.into_inner()).answer(&req, now);
                        c.unsent.extend(answer);
                        if req.close {
                            c.close_after = true;
                            break;
                        }
                    }
                    Ok(None) => break,
                    Err(why) => {
                        c.unsent.extend(response(400, "text/plain", why, true));
                        c.request.clear();
                        c.close_after = true;
                        break;
                    }
                }
            }
        }
        let done = match c.state {
            State::LastAck => c.snd_una == c.snd_nxt,
            State::FinSent if c.peer_closed => {
                // Both FINs: acknowledge theirs and forget the connection.
                self.flush(key, &mut c, true);
                true
            }
            _ => false,
        };
        if !done {
            self.flush(key, &mut c, need_ack);
            self.conns.insert(key, c);
        }
    }

    fn send_syn_ack(&mut self, key: ([u8; 4], u16), c: &Conn) {
        let mut options = [0u8; 4];
        options[..2].copy_from_slice(&[2, 4]);
        options[2..].copy_from_slice(&OUR_MSS.to_be_bytes());
        self.send_with_options(
            &Segment {
                dst_mac: c.guest_mac,
                dst_ip: key.0,
                dst_port: key.1,
                seq: c.iss,
                ack: c.rcv_nxt,
                flags: SYN | ACK,
                payload: &[],
            },
            &options,
        );
    }

    /// Sends what the guest's window allows, then our FIN once everything is out and the
    /// connection is to close, or a bare ACK if nothing else acknowledged what came in.
    fn flush(&mut self, key: ([u8; 4], u16), c: &mut Conn, mut need_ack: bool) {
        if c.state == State::SynReceived {
            return;
        }
        let mut chunk = Vec::with_capacity(usize::from(c.mss));
        while !c.unsent.is_empty() && self.out.len() < MAX_QUEUED {
            let in_flight = c.snd_nxt.wrapping_sub(c.snd_una);
            let room = c.window.saturating_sub(in_flight) as usize;
            let n = c.unsent.len().min(usize::from(c.mss)).min(room);
            if n == 0 {
                break;
            }
            chunk.clear();
            chunk.extend(c.unsent.drain(..n));
            self.send(&Segment::next(c, key, ACK | PSH, &chunk));
            c.snd_nxt = c.snd_nxt.wrapping_add(n as u32);
            need_ack = false;
        }
        let closing = c.close_after || c.peer_closed;
        if c.unsent.is_empty() && closing && matches!(c.state, State::Established) {
            self.send(&Segment::next(c, key, FIN | ACK, &[]));
            c.snd_nxt = c.snd_nxt.wrapping_add(1);
            c.state = if c.peer_closed { State::LastAck } else { State::FinSent };
            need_ack = false;
        }
        if need_ack {
            self.send(&Segment::next(c, key, ACK, &[]));
        }
    }

    fn send(&mut self, s: &Segment) {
        self.send_with_options(s, &[]);
    }

    fn send_with_options(&mut self, s: &Segment, options: &[u8]) {
        let tcp_len = 20 + options.len() + s.payload.len();
        let mut tcp = Vec::with_capacity(tcp_len);
        tcp.extend_from_slice(&PORT.to_be_bytes());
        tcp.extend_from_slice(&s.dst_port.to_be_bytes());
        tcp.extend_from_slice(&s.seq.to_be_bytes());
        tcp.extend_from_slice(&s.ack.to_be_bytes());
        tcp.push((((20 + options.len()) / 4) as u8) << 4);
        tcp.push(s.flags);
        tcp.extend_from_slice(&OUR_WINDOW.to_be_bytes());
        tcp.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
        tcp.extend_from_slice(options);
        tcp.extend_from_slice(s.payload);
        let mut pseudo = [0u8; 12];
        pseudo[..4].copy_from_slice(&self.ip);
        pseudo[4..8].copy_from_slice(&s.dst_ip);
        pseudo[9] = 6;
        pseudo[10..12].copy_from_slice(&(tcp_len as u16).to_be_bytes());
        let sum = checksum(&[&pseudo, &tcp]);
        tcp[16..18].copy_from_slice(&sum.to_be_bytes());

        self.ip_id = self.ip_id.wrapping_add(1);
        let mut ip = Vec::with_capacity(20);
        ip.extend_from_slice(&[0x45, 0]);
        ip.extend_from_slice(&((20 + tcp_len) as u16).to_be_bytes());
        ip.extend_from_slice(&self.ip_id.to_be_bytes());
        ip.extend_from_slice(&[0x40, 0, 64, 6, 0, 0]); // DF, TTL 64, TCP, checksum
        ip.extend_from_slice(&self.ip);
        ip.extend_from_slice(&s.dst_ip);
        let sum = checksum(&[&ip]);
        ip[10..12].copy_from_slice(&sum.to_be_bytes());

        let mut eth = Vec::with_capacity(14 + 20 + tcp_len);
        eth.extend_from_slice(&s.dst_mac);
        eth.extend_from_slice(&MMDS_MAC);
        eth.extend_from_slice(&ETH_IPV4.to_be_bytes());
        eth.extend_from_slice(&ip);
        eth.extend_from_slice(&tcp);
        self.queue(eth);
    }
}

/// The MSS option of a SYN's options, if there is one.
fn mss_option(mut options: &[u8]) -> Option<u16> {
    while let Some(&kind) = options.first() {
        match kind {
            0 => return None,
            1 => options = &options[1..],
            _ => {
                let len = usize::from(*options.get(1)?);
                if len < 2 || len > options.len() {
                    return None;
                }
                if kind == 2 && len == 4 {
                    return Some(be16(options, 2));
                }
                options = &options[len..];
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::net::mmds::store::DEFAULT_SIZE_LIMIT;

    const GUEST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 9];
    const GUEST_IP: [u8; 4] = [169, 254, 0, 2];
    const MMDS_IP: [u8; 4] = [169, 254, 169, 254];

    fn stack() -> MmdsStack {
        let mut store = MmdsStore::new(DEFAULT_SIZE_LIMIT);
        store.put(serde_json::json!({"latest": {"meta-data": {"instance-id": "i-42"}}})).unwrap();
        MmdsStack::new(MMDS_IP, Arc::new(Mutex::new(store)))
    }

    fn eth(ethertype: u16, body: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; VNET_HDR_LEN];
        f.extend_from_slice(&[0xff; 6]);
        f.extend_from_slice(&GUEST_MAC);
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(body);
        f
    }

    fn tcp_frame(seq: u32, ack: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
        let mut tcp = Vec::new();
        tcp.extend_from_slice(&40000u16.to_be_bytes());
        tcp.extend_from_slice(&PORT.to_be_bytes());
        tcp.extend_from_slice(&seq.to_be_bytes());
        tcp.extend_from_slice(&ack.to_be_bytes());
        tcp.extend_from_slice(&[0x50, flags, 0x10, 0, 0, 0, 0, 0]);
        tcp.extend_from_slice(payload);
        let mut ip = vec![0x45, 0];
        ip.extend_from_slice(&((20 + tcp.len()) as u16).to_be_bytes());
        ip.extend_from_slice(&[0, 1, 0x40, 0, 64, 6, 0, 0]);
        ip.extend_from_slice(&GUEST_IP);
        ip.extend_from_slice(&MMDS_IP);
        ip.extend_from_slice(&tcp);
        eth(ETH_IPV4, &ip)
    }

    /// (flags, seq, ack, payload) of each TCP frame queued for the guest; checks checksums.
    fn drain(s: &mut MmdsStack) -> Vec<(u8, u32, u32, Vec<u8>)> {
        let mut out = Vec::new();
        while let Some(f) = s.next_frame() {
            let ip = &f[VNET_HDR_LEN + 14..];
            assert_eq!(checksum(&[&ip[..20]]), 0, "IP checksum");
            let tcp = &ip[20..usize::from(be16(ip, 2))];
            let mut pseudo = [0u8; 12];
            pseudo[..4].copy_from_slice(&ip[12..16]);
            pseudo[4..8].copy_from_slice(&ip[16..20]);
            pseudo[9] = 6;
            pseudo[10..12].copy_from_slice(&(tcp.len() as u16).to_be_bytes());
            assert_eq!(checksum(&[&pseudo, tcp]), 0, "TCP checksum");
            let off = usize::from(tcp[12] >> 4) * 4;
            out.push((tcp[13], be32(tcp, 4), be32(tcp, 8), tcp[off..].to_vec()));
        }
        out
    }

    #[test]
    fn arp_for_the_mmds_address_is_answered_and_other_frames_pass() {
        let mut s = stack();
        let mut arp = vec![0, 1, 8, 0, 6, 4, 0, 1];
        arp.extend_from_slice(&GUEST_MAC);
        arp.extend_from_slice(&GUEST_IP);
        arp.extend_from_slice(&[0; 6]);
        arp.extend_from_slice(&MMDS_IP);
        assert!(s.intercept(&eth(ETH_ARP, &arp)));
        let reply = s.next_frame().unwrap();
        let r = &reply[VNET_HDR_LEN..];
        assert_eq!((&r[..6], &r[6..12], be16(r, 20)), (&GUEST_MAC[..], &MMDS_MAC[..], 2));
        assert_eq!((&r[22..28], &r[28..32], &r[38..42]), (&MMDS_MAC[..], &MMDS_IP[..], &GUEST_IP[..]));
        // ARP for another address, IPv6, a runt: the tap's.
        arp[24..28].copy_from_slice(&[10, 0, 0, 1]);
        assert!(!s.intercept(&eth(ETH_ARP, &arp)));
        assert!(!s.intercept(&eth(0x86dd, &[0; 40])));
        assert!(!s.intercept(&[0; 8]));
        assert!(!s.has_frames());
    }

    #[test]
    fn a_tcp_request_gets_its_answer_and_the_connection_closes() {
        let mut s = stack();
        assert!(s.intercept(&tcp_frame(1000, 0, SYN, &[])));
        let synack = drain(&mut s);
        assert_eq!((synack.len(), synack[0].0, synack[0].2), (1, SYN | ACK, 1001));
        let iss = synack[0].1;
        assert!(s.intercept(&tcp_frame(1001, iss + 1, ACK, &[])));
        assert!(drain(&mut s).is_empty(), "a bare ACK needs no answer");
        let req = b"GET /latest/meta-data/instance-id HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
        // Split in two segments; a retransmitted first half is acknowledged and dropped.
        assert!(s.intercept(&tcp_frame(1001, iss + 1, ACK, &req[..10])));
        assert_eq!(drain(&mut s)[0].2, 1011);
        assert!(s.intercept(&tcp_frame(1001, iss + 1, ACK, &req[..10])));
        assert_eq!(drain(&mut s)[0].2, 1011);
        assert!(s.intercept(&tcp_frame(1011, iss + 1, ACK | PSH, &req[10..])));
        let answer = drain(&mut s);
        let body: Vec<u8> = answer.iter().flat_map(|a| a.3.clone()).collect();
        let text = String::from_utf8(body).unwrap();
        assert!(text.starts_with("HTTP/1.1 200 OK") && text.ends_with("\r\n\r\ni-42"), "{text}");
        let fin = answer.last().unwrap();
        assert_eq!(fin.0 & FIN, FIN, "Connection: close ends with our FIN");
        // The guest closes too, and acknowledges our FIN: the connection is gone.
        let end = 1001 + req.len() as u32;
        assert!(s.intercept(&tcp_frame(end, fin.1 + 1, ACK | FIN, &[])));
        assert_eq!(drain(&mut s).len(), 1);
        assert!(s.conns.is_empty());
    }

    #[test]
    fn strays_get_resets_and_hostile_packets_are_dropped() {
        let mut s = stack();
        // Data without a connection, and a SYN to another port: RST.
        assert!(s.intercept(&tcp_frame(5, 9, ACK, b"x")));
        assert_eq!(drain(&mut s)[0].0 & RST, RST);
        let mut other = tcp_frame(5, 0, SYN, &[]);
        other[VNET_HDR_LEN + 14 + 22..VNET_HDR_LEN + 14 + 24].copy_from_slice(&81u16.to_be_bytes());
        assert!(s.intercept(&other));
        assert_eq!(drain(&mut s)[0].0 & RST, RST);
        // Truncated and lying headers: taken (they are for MMDS) and dropped.
        let good = tcp_frame(5, 0, SYN, &[]);
        for cut in [VNET_HDR_LEN + 14 + 20, VNET_HDR_LEN + 14 + 30] {
            assert!(s.intercept(&good[..cut]));
        }
        let mut bad_len = good.clone();
        bad_len[VNET_HDR_LEN + 14 + 2..VNET_HDR_LEN + 14 + 4].copy_from_slice(&9999u16.to_be_bytes());
        assert!(s.intercept(&bad_len));
        let mut bad_off = good.clone();
        bad_off[VNET_HDR_LEN + 14 + 20 + 12] = 0xf0;
        assert!(s.intercept(&bad_off));
        assert!(drain(&mut s).is_empty());
        assert!(s.counters.dropped >= 4);
        // Many connections: the table stays bounded.
        for port in 0..200u16 {
            let mut syn = tcp_frame(1, 0, SYN, &[]);
            syn[VNET_HDR_LEN + 14 + 20..VNET_HDR_LEN + 14 + 22].copy_from_slice(&port.to_be_bytes());
            s.intercept(&syn);
        }
        assert!(s.conns.len() <= MAX_CONNS);
        // A request that never ends is cut off with an error, not buffered for ever.
        let mut s = stack();
        s.intercept(&tcp_frame(1000, 0, SYN, &[]));
        let iss = drain(&mut s)[0].1;
        let junk = vec![b'a'; 1400];
        let mut seq = 1001;
        for _ in 0..8 {
            s.intercept(&tcp_frame(seq, iss + 1, ACK, &junk));
            seq += junk.len() as u32;
        }
        let all: Vec<u8> = drain(&mut s).iter().flat_map(|a| a.3.clone()).collect();
        assert!(String::from_utf8_lossy(&all).starts_with("HTTP/1.1 400"), "{}", String::from_utf8_lossy(&all));
    }
}
