//! `make bench-net` (as root): netstack's figures, printed as `name=value` lines.
//! - Time to wire one instance: its node's reconcile (tap, bridge port, host route, nf_tables)
//!   plus the other node's (the FDB entry for its MAC), p50 and p99 over 40 instances.
//! - TCP throughput between two instances' network namespaces on two nodes through the
//!   tenant's overlay, against the same two nodes over their underlay directly (one stream,
//!   3 s each), and the ratio.
//! - DHCP time to a lease from a real dnsmasq, p50 over 5 leases.

#![allow(clippy::unwrap_used)] // a benchmark fails loudly by design

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use shoal_netstack::dhcp::{Client, Config, Event};
use shoal_netstack::ipam::{mac_for, Ipv4Cidr};
use shoal_netstack::netlink::Netlink;
use shoal_netstack::node::{reconcile, InstanceNet, NodeNet, TenantNet};
use support::{block_on, ip, Netns};

const VNI: u32 = 4096;

fn underlay_ip(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(192, 168, 78, n)
}

fn uid(node: u8, i: u32) -> String {
    format!("{node:02x}{i:014x}")
}

/// Node `node`'s network with `mine` (index -> address) and the other node's `theirs` MACs.
fn spec(node: u8, mine: &BTreeMap<String, Ipv4Addr>, theirs: &[String]) -> NodeNet {
    let mut t = TenantNet::default();
    for (u, a) in mine {
        t.instances.insert(u.clone(), InstanceNet { ip: *a, mac: mac_for(u), owner: (0, 0), egress: true });
    }
    if !theirs.is_empty() {
        t.remotes.insert(underlay_ip(3 - node), theirs.iter().map(|u| mac_for(u)).collect());
    }
    NodeNet {
        underlay_dev: "eth0".into(),
        underlay_ip: underlay_ip(node),
        underlay_mtu: 1500,
        cluster: "10.241.0.0/16".parse().unwrap(),
        subnet: Some(Ipv4Cidr::new(Ipv4Addr::new(10, 241, node - 1, 0), 24).unwrap()),
        tenants: [(VNI, t)].into_iter().collect(),
        peers: vec![underlay_ip(3 - node)],
        published: Vec::new(),
    }
}

fn apply(ns: &Netns, want: NodeNet) -> Duration {
    ns.run(move || {
        block_on(async move {
            let nl = Netlink::connect().unwrap();
            let t = Instant::now();
            reconcile(&nl, &want).await.unwrap_or_else(|e| panic!("reconcile: {e}"));
            t.elapsed()
        })
    })
}

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// Bytes per second of one TCP stream from namespace `from` to `to_ip` in namespace `to`.
fn tcp_throughput(from: &Netns, to: &Netns, to_ip: Ipv4Addr) -> f64 {
    let server = to.spawn_with(move || {
        let l = TcpListener::bind((to_ip, 5201)).unwrap();
        let (mut s, _) = l.accept().unwrap();
        let mut buf = vec![0u8; 1 << 16];
        let mut total = 0u64;
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => return total,
                Ok(n) => total += n as u64,
            }
        }
    });
    std::thread::sleep(Duration::from_millis(200));
    let secs = from.run(move || {
        let mut s = TcpStream::connect((to_ip, 5201)).unwrap();
        let buf = vec![0x5au8; 1 << 16];
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(3) {
            s.write_all(&buf).unwrap();
        }
        t.elapsed().as_secs_f64()
    });
    let bytes = server.join().unwrap();
    bytes as f64 / secs
}

fn main() {
    if !support::root_or_skip() {
        return;
    }
    let under = Netns::new("shoal-bn-u");
    let n1 = Netns::new("shoal-bn-1");
    let n2 = Netns::new("shoal-bn-2");
    ip(&format!("-n {} link add ub0 type bridge", under.name));
    ip(&format!("-n {} link set ub0 up", under.name));
    for (n, ns) in [(1u8, &n1), (2, &n2)] {
        ip(&format!("link add eth0 netns {} type veth peer name p{n} netns {}", ns.name, under.name));
        ip(&format!("-n {} link set p{n} master ub0 up", under.name));
        ip(&format!("-n {} addr add {}/24 dev eth0", ns.name, underlay_ip(n)));
        ip(&format!("-n {} link set eth0 up", ns.name));
    }

    // Wiring: one instance at a time on node 1, its MAC on node 2.
    let base1: BTreeMap<String, Ipv4Addr> = [(uid(1, 0), Ipv4Addr::new(10, 241, 0, 2))].into_iter().collect();
    let base2: BTreeMap<String, Ipv4Addr> = [(uid(2, 0), Ipv4Addr::new(10, 241, 1, 2))].into_iter().collect();
    apply(&n1, spec(1, &base1, &[uid(2, 0)]));
    apply(&n2, spec(2, &base2, &[uid(1, 0)]));
    let mut wire = Vec::new();
    for i in 1..=40u32 {
        let mut mine = base1.clone();
        mine.insert(uid(1, i), Ipv4Addr::new(10, 241, 0, 2 + i as u8));
        let here = apply(&n1, spec(1, &mine, &[uid(2, 0)]));
        let there = apply(&n2, spec(2, &base2, &[uid(1, 0), uid(1, i)]));
        wire.push(here + there);
        apply(&n1, spec(1, &base1, &[uid(2, 0)]));
        apply(&n2, spec(2, &base2, &[uid(1, 0)]));
    }
    println!("net_wire_instance_p50_ms={:.2}", percentile(&mut wire, 0.5).as_secs_f64() * 1e3);
    println!("net_wire_instance_p99_ms={:.2}", percentile(&mut wire, 0.99).as_secs_f64() * 1e3);

    // Throughput: each node's first instance as a namespace on a veth port of the tenant bridge
    // (what a guest's virtio-net is to its tap), with the instance's address and MAC.
    let guests: Vec<Netns> = [(1u8, &n1, &base1), (2, &n2, &base2)]
        .into_iter()
        .map(|(n, node, base)| {
            let (u, addr) = base.iter().next().unwrap();
            let g = Netns::new(&format!("shoal-bn-g{n}"));
            ip(&format!("-n {} link add gv{n} type veth peer name eth0 netns {}", node.name, g.name));
            ip(&format!("-n {} link set gv{n} mtu 1450 master shb001000 up", node.name));
            let mac = mac_for(u).iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":");
            ip(&format!("-n {} link set eth0 address {mac} mtu 1450 up", g.name));
            ip(&format!("-n {} addr add {addr}/16 dev eth0", g.name));
            g
        })
        .collect();
    let overlay = tcp_throughput(&guests[0], &guests[1], *base2.values().next().unwrap());
    let direct = tcp_throughput(&n1, &n2, underlay_ip(2));
    println!("net_tcp_overlay_gbit_s={:.2}", overlay * 8.0 / 1e9);
    println!("net_tcp_underlay_gbit_s={:.2}", direct * 8.0 / 1e9);
    println!("net_tcp_overlay_ratio={:.2}", overlay / direct);
    drop(guests);
    apply(&n1, NodeNet { tenants: BTreeMap::new(), ..spec(1, &base1, &[]) });
    apply(&n2, NodeNet { tenants: BTreeMap::new(), ..spec(2, &base2, &[]) });

    // DHCP: n1's underlay gets leases from dnsmasq on the underlay bridge's namespace.
    ip(&format!("-n {} addr add 192.168.78.100/24 dev ub0", under.name));
    ip(&format!("-n {} addr flush dev eth0", n1.name));
    let dir = std::env::temp_dir().join(format!("shoal-bench-net-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut dnsmasq = Command::new("ip")
        .args(["netns", "exec", &under.name, "dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--port=0"])
        .args(["--interface=ub0", "--bind-interfaces", "--dhcp-authoritative"])
        .arg("--dhcp-range=192.168.78.150,192.168.78.199,255.255.255.0,2m")
        .arg(format!("--dhcp-leasefile={}", dir.join("leases").display()))
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("run dnsmasq (package dnsmasq-base)");
    std::thread::sleep(Duration::from_millis(300));
    let mut leases = Vec::new();
    for _ in 0..5 {
        leases.push(n1.run(|| {
            block_on(async {
                let nl = Netlink::connect().unwrap();
                let mut c = Client::new(nl, Config::new("eth0")).await.unwrap();
                let t = Instant::now();
                let (tx, rx) = tokio::sync::oneshot::channel::<()>();
                let mut tx = Some(tx);
                let mut took = None;
                // Stops (and releases) as soon as it is bound.
                c.run(
                    async {
                        let _ = rx.await;
                    },
                    |e| {
                        if let Event::Bound(_) = e {
                            took.get_or_insert(t.elapsed());
                            if let Some(tx) = tx.take() {
                                let _ = tx.send(());
                            }
                        }
                    },
                )
                .await
                .unwrap();
                took.unwrap()
            })
        }));
    }
    let _ = dnsmasq.kill();
    let _ = dnsmasq.wait();
    let _ = std::fs::remove_dir_all(&dir);
    println!("net_dhcp_lease_p50_ms={:.1}", percentile(&mut leases, 0.5).as_secs_f64() * 1e3);
}
