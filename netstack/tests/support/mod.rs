//! Network namespaces as nodes on one underlay bridge, and a stand-in guest: something that
//! holds an instance's tap as the VMM would and answers ARP and ICMP echo at its address (what
//! the probe guest does on its virtio-net interface), or sends them.
#![allow(dead_code)]

use std::fs::File;
use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Whether root tests may run; asserts root unless told to skip them.
pub fn root_or_skip() -> bool {
    if std::env::var_os("SHOAL_SKIP_NETNS_TESTS").is_some() && !is_root() {
        eprintln!("SHOAL_SKIP_NETNS_TESTS set and not root: skipped");
        return false;
    }
    assert!(is_root(), "the netstack tests need root for network namespaces (make test runs as root)");
    true
}

pub fn ip(args: &str) {
    let out = Command::new("ip").args(args.split_whitespace()).output().expect("run ip (package iproute2)");
    assert!(out.status.success(), "ip {args}: {}", String::from_utf8_lossy(&out.stderr));
}

pub fn ip_out(args: &str) -> String {
    let out = Command::new("ip").args(args.split_whitespace()).output().expect("run ip (package iproute2)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace, deleted (with everything in it) when dropped.
#[derive(Debug)]
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: &str) -> Netns {
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        ip(&format!("netns add {name}"));
        ip(&format!("-n {name} link set lo up"));
        Netns { name: name.to_string() }
    }

    /// Runs `f` on a thread inside the namespace, with a tokio runtime of its own there (so the
    /// netlink sockets and taps it opens are the namespace's).
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            enter(&path);
            f()
        })
        .join()
        .expect("the thread in the namespace panicked")
    }

    /// Runs `f` on a thread inside the namespace without waiting for it.
    pub fn spawn_with<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> std::thread::JoinHandle<T> {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            enter(&path);
            f()
        })
    }

    pub fn spawn(&self, f: impl FnOnce() + Send + 'static) -> std::thread::JoinHandle<()> {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            enter(&path);
            f()
        })
    }
}

fn enter(path: &str) {
    let f = File::open(path).expect("open the namespace");
    // SAFETY: setns on a namespace file; it changes only this thread's network namespace.
    let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(r, 0, "setns {path}: {}", std::io::Error::last_os_error());
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}

/// Runs an async block on a current-thread runtime (inside `Netns::run`).
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a tokio runtime").block_on(f)
}

/// The stand-in guest on an instance's tap.
#[derive(Debug)]
pub struct Guest {
    tap: File,
    pub mac: [u8; 6],
    pub ip: Ipv4Addr,
}

const ETH_ARP: u16 = 0x0806;
const ETH_IP: u16 = 0x0800;

fn checksum(b: &[u8]) -> u16 {
    let mut sum = 0u32;
    for c in b.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn eth(dst: [u8; 6], src: [u8; 6], kind: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&kind.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn arp(op: u16, sha: [u8; 6], spa: Ipv4Addr, tha: [u8; 6], tpa: Ipv4Addr) -> Vec<u8> {
    let mut a = vec![0, 1, 8, 0, 6, 4];
    a.extend_from_slice(&op.to_be_bytes());
    a.extend_from_slice(&sha);
    a.extend_from_slice(&spa.octets());
    a.extend_from_slice(&tha);
    a.extend_from_slice(&tpa.octets());
    a
}

fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, payload: &[u8]) -> Vec<u8> {
    let len = (20 + payload.len()) as u16;
    let mut h = vec![0x45, 0];
    h.extend_from_slice(&len.to_be_bytes());
    h.extend_from_slice(&[0, 0, 0x40, 0, 64, proto, 0, 0]);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    let c = checksum(&h);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h.extend_from_slice(payload);
    h
}

fn icmp(kind: u8, id: u16, seq: u16, data: &[u8]) -> Vec<u8> {
    let mut m = vec![kind, 0, 0, 0];
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(data);
    let c = checksum(&m);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    m
}

/// What a frame is, as far as the guest cares.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    ArpRequest {
        sha: [u8; 6],
        spa: Ipv4Addr,
        tpa: Ipv4Addr,
    },
    ArpReply {
        sha: [u8; 6],
        spa: Ipv4Addr,
    },
    EchoRequest {
        src_mac: [u8; 6],
        src: Ipv4Addr,
        dst: Ipv4Addr,
        id: u16,
        seq: u16,
        data: Vec<u8>,
    },
    EchoReply {
        src: Ipv4Addr,
        id: u16,
        seq: u16,
    },
    Udp {
        src_mac: [u8; 6],
        src: Ipv4Addr,
        dst: Ipv4Addr,
        sport: u16,
        dport: u16,
        data: Vec<u8>,
    },
    /// ICMP destination unreachable, with its code.
    Unreachable {
        src: Ipv4Addr,
        code: u8,
    },
    Other,
}

pub fn parse(f: &[u8]) -> Frame {
    if f.len() < 14 {
        return Frame::Other;
    }
    let src_mac: [u8; 6] = f[6..12].try_into().unwrap_or_default();
    let kind = u16::from_be_bytes([f[12], f[13]]);
    let p = &f[14..];
    let ip4 = |b: &[u8]| Ipv4Addr::new(b[0], b[1], b[2], b[3]);
    match kind {
        ETH_ARP if p.len() >= 28 => {
            let sha: [u8; 6] = p[8..14].try_into().unwrap_or_default();
            match u16::from_be_bytes([p[6], p[7]]) {
                1 => Frame::ArpRequest { sha, spa: ip4(&p[14..18]), tpa: ip4(&p[24..28]) },
                2 => Frame::ArpReply { sha, spa: ip4(&p[14..18]) },
                _ => Frame::Other,
            }
        }
        ETH_IP if p.len() >= 28 && p[9] == 17 => {
            let ihl = usize::from(p[0] & 0xf) * 4;
            let total = usize::from(u16::from_be_bytes([p[2], p[3]])).min(p.len());
            if total < ihl + 8 {
                return Frame::Other;
            }
            let u = &p[ihl..total];
            Frame::Udp {
                src_mac,
                src: ip4(&p[12..16]),
                dst: ip4(&p[16..20]),
                sport: u16::from_be_bytes([u[0], u[1]]),
                dport: u16::from_be_bytes([u[2], u[3]]),
                data: u[8..].to_vec(),
            }
        }
        ETH_IP if p.len() >= 28 && p[9] == 1 => {
            let ihl = usize::from(p[0] & 0xf) * 4;
            let (src, dst) = (ip4(&p[12..16]), ip4(&p[16..20]));
            let total = usize::from(u16::from_be_bytes([p[2], p[3]])).min(p.len());
            if total < ihl + 8 {
                return Frame::Other;
            }
            let m = &p[ihl..total];
            let (id, seq) = (u16::from_be_bytes([m[4], m[5]]), u16::from_be_bytes([m[6], m[7]]));
            match m[0] {
                8 => Frame::EchoRequest { src_mac, src, dst, id, seq, data: m[8..].to_vec() },
                0 => Frame::EchoReply { src, id, seq },
                3 => Frame::Unreachable { src, code: m[1] },
                _ => Frame::Other,
            }
        }
        _ => Frame::Other,
    }
}

impl Guest {
    /// Takes the tap `name` (inside the namespace the tap is in).
    pub fn attach(name: &str, mac: [u8; 6], ip: Ipv4Addr) -> Guest {
        let tap = shoal_netstack::tap::open(name).expect("open the instance's tap");
        Guest { tap, mac, ip }
    }

    fn send(&mut self, frame: &[u8]) {
        self.tap.write_all(frame).expect("write to the tap");
    }

    /// The next frame within `timeout`.
    pub fn recv(&mut self, timeout: Duration) -> Option<Vec<u8>> {
        let mut pfd = libc::pollfd { fd: self.tap.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: poll on one pollfd that lives across the call.
        let n = unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as i32) };
        if n <= 0 {
            return None;
        }
        let mut buf = vec![0u8; 65536];
        let n = self.tap.read(&mut buf).ok()?;
        buf.truncate(n);
        Some(buf)
    }

    /// Answers ARP for its address, ICMP echo and UDP (with what it got, then ` from <its
    /// address>`) to it until `stop`.
    pub fn serve(mut self, stop: Arc<AtomicBool>) {
        while !stop.load(Ordering::Relaxed) {
            let Some(f) = self.recv(Duration::from_millis(100)) else { continue };
            match parse(&f) {
                Frame::ArpRequest { sha, spa, tpa } if tpa == self.ip => {
                    let reply = eth(sha, self.mac, ETH_ARP, &arp(2, self.mac, self.ip, sha, spa));
                    self.send(&reply);
                }
                Frame::EchoRequest { src_mac, src, dst, id, seq, data } if dst == self.ip => {
                    let reply = eth(src_mac, self.mac, ETH_IP, &ipv4(self.ip, src, 1, &icmp(0, id, seq, &data)));
                    self.send(&reply);
                }
                Frame::Udp { src_mac, src, dst, sport, dport, mut data } if dst == self.ip => {
                    data.extend_from_slice(format!(" from {}", self.ip).as_bytes());
                    let mut u = Vec::with_capacity(8 + data.len());
                    u.extend_from_slice(&dport.to_be_bytes());
                    u.extend_from_slice(&sport.to_be_bytes());
                    u.extend_from_slice(&((8 + data.len()) as u16).to_be_bytes());
                    u.extend_from_slice(&[0, 0]); // no checksum (IPv4 allows it)
                    u.extend_from_slice(&data);
                    let reply = eth(src_mac, self.mac, ETH_IP, &ipv4(self.ip, src, 17, &u));
                    self.send(&reply);
                }
                _ => {}
            }
        }
    }

    /// ARPs for `target`: its MAC if it answers within `timeout`.
    pub fn arp(&mut self, target: Ipv4Addr, timeout: Duration) -> Option<[u8; 6]> {
        let deadline = Instant::now() + timeout;
        let mut next_send = Instant::now();
        while Instant::now() < deadline {
            if Instant::now() >= next_send {
                let req = eth([0xff; 6], self.mac, ETH_ARP, &arp(1, self.mac, self.ip, [0; 6], target));
                self.send(&req);
                next_send = Instant::now() + Duration::from_millis(300);
            }
            if let Some(f) = self.recv(Duration::from_millis(50)) {
                match parse(&f) {
                    Frame::ArpReply { sha, spa } if spa == target => return Some(sha),
                    Frame::ArpRequest { sha, spa, tpa } if tpa == self.ip => {
                        // The other side checks us back.
                        let reply = eth(sha, self.mac, ETH_ARP, &arp(2, self.mac, self.ip, sha, spa));
                        self.send(&reply);
                    }
                    _ => {}
                }
            }
        }
        None
    }

    /// Sends ICMP echo requests to `dst` through `next_hop` (its MAC, or the gateway's) until a
    /// reply or `timeout`; what came back.
    pub fn ping(&mut self, next_hop: [u8; 6], dst: Ipv4Addr, timeout: Duration) -> Option<Frame> {
        let deadline = Instant::now() + timeout;
        let mut seq = 0u16;
        let mut next_send = Instant::now();
        while Instant::now() < deadline {
            if Instant::now() >= next_send {
                seq += 1;
                let req = eth(next_hop, self.mac, ETH_IP, &ipv4(self.ip, dst, 1, &icmp(8, 0x5348, seq, b"shoal")));
                self.send(&req);
                next_send = Instant::now() + Duration::from_millis(300);
            }
            if let Some(f) = self.recv(Duration::from_millis(50)) {
                match parse(&f) {
                    r @ Frame::EchoReply { id: 0x5348, .. } => return Some(r),
                    r @ Frame::Unreachable { .. } => return Some(r),
                    Frame::ArpRequest { sha, spa, tpa } if tpa == self.ip => {
                        let reply = eth(sha, self.mac, ETH_ARP, &arp(2, self.mac, self.ip, sha, spa));
                        self.send(&reply);
                    }
                    _ => {}
                }
            }
        }
        None
    }
}
