//! Two nodes (network namespaces on one underlay bridge) wired by netstack's reconciler: a
//! tenant's instances reach each other across the nodes over its VXLAN network, another
//! tenant's cannot be reached at all, a second reconcile changes nothing, one after a crash
//! cleans up what is stale, and a node that leaves is gone from every FDB. Egress is
//! masqueraded (or refused), and a published port on any node, even one with no instances,
//! reaches the deployment's instances on all of them.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod support;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use shoal_netstack::ipam::{mac_for, Ipv4Cidr};
use shoal_netstack::names;
use shoal_netstack::netlink::Netlink;
use shoal_netstack::nft::Published;
use shoal_netstack::node::{reconcile, InstanceNet, NodeNet, Report, TenantNet};
use support::{block_on, ip, ip_out, Guest, Netns};

const A: u32 = 4096;
const B: u32 = 4097;

struct Inst {
    uid: &'static str,
    vni: u32,
    ip: Ipv4Addr,
    /// Tenant A's instances may reach outside the cluster network, B's may not.
    egress: bool,
}

const A1: Inst = Inst { uid: "a1a1a1a1a1a1a1a1", vni: A, ip: Ipv4Addr::new(10, 240, 0, 2), egress: true };
const B1: Inst = Inst { uid: "b1b1b1b1b1b1b1b1", vni: B, ip: Ipv4Addr::new(10, 240, 0, 3), egress: false };
const A2: Inst = Inst { uid: "a2a2a2a2a2a2a2a2", vni: A, ip: Ipv4Addr::new(10, 240, 1, 2), egress: true };
const B2: Inst = Inst { uid: "b2b2b2b2b2b2b2b2", vni: B, ip: Ipv4Addr::new(10, 240, 1, 3), egress: false };

fn underlay_ip(node: u8) -> Ipv4Addr {
    Ipv4Addr::new(192, 168, 77, node)
}

/// Node `node`'s desired network: `mine` run here, `theirs` on the other node.
fn spec(node: u8, mine: &[&Inst], theirs: &[(u8, &Inst)]) -> NodeNet {
    let mut tenants: BTreeMap<u32, TenantNet> = BTreeMap::new();
    for i in mine {
        tenants.entry(i.vni).or_default().instances.insert(
            i.uid.to_string(),
            InstanceNet { ip: i.ip, mac: mac_for(i.uid), owner: (123, 123), egress: i.egress },
        );
    }
    for (n, i) in theirs {
        // Only tenants that have instances here need the others' entries.
        if let Some(t) = tenants.get_mut(&i.vni) {
            t.remotes.entry(underlay_ip(*n)).or_default().insert(mac_for(i.uid));
        }
    }
    NodeNet {
        underlay_dev: "eth0".into(),
        underlay_ip: underlay_ip(node),
        underlay_mtu: 1500,
        cluster: "10.240.0.0/16".parse().unwrap(),
        subnet: Some(Ipv4Cidr::new(Ipv4Addr::new(10, 240, node - 1, 0), 24).unwrap()),
        tenants,
        peers: (1..=3).filter(|n| *n != node).map(underlay_ip).collect(),
        // Tenant A's deployment publishes UDP port 7 as 30007 on every node.
        published: vec![Published {
            tcp: false,
            node_port: 30007,
            port: 7,
            local: mine.iter().filter(|i| i.vni == A).map(|i| i.ip).collect(),
            remote: theirs.iter().filter(|(_, i)| i.vni == A).map(|(n, _)| underlay_ip(*n)).collect(),
        }],
    }
}

fn apply(ns: &Netns, want: NodeNet) -> Report {
    ns.run(move || {
        block_on(async move {
            let nl = Netlink::connect().unwrap();
            reconcile(&nl, &want).await.unwrap_or_else(|e| panic!("reconcile: {e}"))
        })
    })
}

/// Starts the stand-in guest of `i` answering on its tap; stops when the flag is set.
fn serve(ns: &Netns, i: &Inst, stop: &Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    let (tap, mac, ip, stop) = (names::tap(i.uid).unwrap(), mac_for(i.uid), i.ip, stop.clone());
    ns.spawn(move || Guest::attach(&tap, mac, ip).serve(stop))
}

fn with_guest<T: Send + 'static>(ns: &Netns, i: &Inst, f: impl FnOnce(&mut Guest) -> T + Send + 'static) -> T {
    let (tap, mac, ip) = (names::tap(i.uid).unwrap(), mac_for(i.uid), i.ip);
    ns.run(move || f(&mut Guest::attach(&tap, mac, ip)))
}

#[test]
fn tenants_reach_their_own_instances_across_nodes_and_never_another_tenants() {
    if !support::root_or_skip() {
        return;
    }
    let tag = std::process::id() % 10_000;
    let under = Netns::new(&format!("shoal-ovl{tag}-u"));
    let n1 = Netns::new(&format!("shoal-ovl{tag}-1"));
    let n2 = Netns::new(&format!("shoal-ovl{tag}-2"));
    ip(&format!("-n {} link add ub0 type bridge", under.name));
    ip(&format!("-n {} link set ub0 up", under.name));
    let outside = Netns::new(&format!("shoal-ovl{tag}-o"));
    ip(&format!("link add eth0 netns {} type veth peer name p9 netns {}", outside.name, under.name));
    ip(&format!("-n {} link set p9 master ub0 up", under.name));
    ip(&format!("-n {} addr add 192.168.77.100/24 dev eth0", outside.name));
    ip(&format!("-n {} link set eth0 up", outside.name));
    // Node 3 runs no instances (the cluster gave it no subnet) and still serves the port.
    let n3 = Netns::new(&format!("shoal-ovl{tag}-3"));
    for (n, ns) in [(1u8, &n1), (2, &n2), (3, &n3)] {
        ip(&format!("link add eth0 netns {} type veth peer name p{n} netns {}", ns.name, under.name));
        ip(&format!("-n {} link set p{n} master ub0 up", under.name));
        ip(&format!("-n {} addr add {}/24 dev eth0", ns.name, underlay_ip(n)));
        ip(&format!("-n {} link set eth0 up", ns.name));
    }

    let want1 = spec(1, &[&A1, &B1], &[(2, &A2), (2, &B2)]);
    let want2 = spec(2, &[&A2, &B2], &[(1, &A1), (1, &B1)]);
    let first = apply(&n1, want1.clone());
    assert!(first.changes.iter().any(|c| c == "created shb001000"), "{first:?}");
    apply(&n2, want2.clone());
    let want3 = NodeNet {
        subnet: None,
        tenants: BTreeMap::new(),
        peers: vec![underlay_ip(1), underlay_ip(2)],
        ..spec(3, &[], &[(1, &A1), (2, &A2)])
    };
    let third = apply(&n3, want3.clone());
    assert!(third.changes.iter().any(|c| c.contains("1 published ports")), "{third:?}");
    // Re-running it changes nothing.
    assert_eq!(apply(&n1, want1.clone()), Report::default());
    assert_eq!(apply(&n2, want2.clone()), Report::default());
    assert_eq!(apply(&n3, want3), Report::default());
    // The taps belong to the jail's uid, so a jailed VMM can open them.
    let tap_a1 = names::tap(A1.uid).unwrap();
    let details = ip_out(&format!("-n {} -d link show {tap_a1}", n1.name));
    assert!(details.contains("user 123") && details.contains("group 123"), "{details}");

    let stop = Arc::new(AtomicBool::new(false));
    let servers = [serve(&n2, &A2, &stop), serve(&n2, &B2, &stop), serve(&n1, &B1, &stop)];
    std::thread::sleep(Duration::from_millis(200));

    // A tenant's instances reach each other across the nodes, by address.
    let (mac, reply) = with_guest(&n1, &A1, |g| {
        let mac = g.arp(A2.ip, Duration::from_secs(3));
        let reply = mac.and_then(|m| g.ping(m, A2.ip, Duration::from_secs(3)));
        (mac, reply)
    });
    assert_eq!(mac, Some(mac_for(A2.uid)), "a1 did not find a2 over the overlay");
    assert!(matches!(reply, Some(support::Frame::EchoReply { src, .. }) if src == A2.ip), "{reply:?}");

    // The other tenant's instances are not there at all: not on A's network, not through the
    // gateway (the node answers for its own address, and refuses to route to B: B1 runs on
    // this very node, behind a host route of its own).
    let gateway = Ipv4Addr::new(10, 240, 0, 1);
    let (arp_b, to_gw, via_gw) = with_guest(&n1, &A1, move |g| {
        let arp_b = g.arp(B2.ip, Duration::from_secs(2)).or_else(|| g.arp(B1.ip, Duration::from_secs(1)));
        let gw = g.arp(gateway, Duration::from_secs(2)).expect("the gateway did not answer ARP");
        let to_gw = g.ping(gw, gateway, Duration::from_secs(2));
        let via_gw = g.ping(gw, B1.ip, Duration::from_secs(2));
        (arp_b, to_gw, via_gw)
    });
    assert_eq!(arp_b, None, "tenant A's instance found tenant B's");
    assert!(matches!(to_gw, Some(support::Frame::EchoReply { src, .. }) if src == gateway), "{to_gw:?}");
    assert!(
        matches!(via_gw, Some(support::Frame::Unreachable { code: 13, .. })),
        "tenant A's packet to tenant B was not refused by the node: {via_gw:?}"
    );
    // Tenant B reaches its own across nodes too.
    stop.store(true, Ordering::Relaxed);
    for s in servers {
        s.join().unwrap();
    }
    let stop = Arc::new(AtomicBool::new(false));
    let server = serve(&n2, &B2, &stop);
    let b = with_guest(&n1, &B1, |g| g.arp(B2.ip, Duration::from_secs(3)));
    assert_eq!(b, Some(mac_for(B2.uid)));
    stop.store(true, Ordering::Relaxed);
    server.join().unwrap();

    // Egress: a host outside the cluster network (on the underlay, with no route back to it)
    // answers a1, whose packets leave masqueraded as node 1; b1's never leave the node.
    let outside_host = Ipv4Addr::new(192, 168, 77, 100);
    let through_gateway = move |g: &mut Guest| {
        let gw = g.arp(gateway, Duration::from_secs(2)).expect("the gateway did not answer ARP");
        g.ping(gw, outside_host, Duration::from_secs(3))
    };
    let out_a = with_guest(&n1, &A1, through_gateway);
    assert!(matches!(out_a, Some(support::Frame::EchoReply { src, .. }) if src == outside_host), "{out_a:?}");
    // A published port: the outside host's datagrams to any node's port 30007 reach both of
    // tenant A's instances (each node spreads over its own and the others'; node 3 has none
    // and hands every one on), and the answers come back from the address they were sent to.
    let stop = Arc::new(AtomicBool::new(false));
    let servers = [serve(&n1, &A1, &stop), serve(&n2, &A2, &stop)];
    std::thread::sleep(Duration::from_millis(200));
    for node in [1u8, 2, 3] {
        let seen = outside.run(move || {
            let mut seen = std::collections::BTreeSet::new();
            for i in 0..40 {
                // A new socket each time: a new connection to spread.
                let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
                s.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
                let to = std::net::SocketAddr::from((underlay_ip(node), 30007));
                s.send_to(format!("hello {i}").as_bytes(), to).unwrap();
                let mut buf = [0u8; 256];
                if let Ok((n, from)) = s.recv_from(&mut buf) {
                    assert_eq!(from, to, "the answer comes from where it was sent");
                    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                    assert!(text.starts_with(&format!("hello {i} from ")), "{text}");
                    seen.insert(text.rsplit(' ').next().unwrap().to_string());
                }
            }
            seen
        });
        let want: std::collections::BTreeSet<String> = [A1.ip, A2.ip].iter().map(|a| a.to_string()).collect();
        assert_eq!(seen, want, "node {node}'s port 30007 reached {seen:?}");
    }
    stop.store(true, Ordering::Relaxed);
    for s in servers {
        s.join().unwrap();
    }

    // The outside host can route back to the cluster network now: only node 1's rule keeps
    // b1's ping from getting an answer.
    ip(&format!("-n {} route add 10.240.0.0/16 via {}", outside.name, underlay_ip(1)));
    let out_b = with_guest(&n1, &B1, through_gateway);
    assert!(!matches!(out_b, Some(support::Frame::EchoReply { .. })), "an instance without egress got out: {out_b:?}");

    // A crash mid-way left a tap of an instance that is gone and a tenant bridge nobody wants;
    // a1 stopped meanwhile. The reconcile after the restart removes all three and their
    // routes, and again changes nothing the second time.
    ip(&format!("-n {} tuntap add sht0123456789ab mode tap", n1.name));
    ip(&format!("-n {} link add shb00abcd type bridge", n1.name));
    let after = spec(1, &[&B1], &[(2, &A2), (2, &B2)]);
    let report = apply(&n1, after.clone());
    for gone in [
        "deleted sht0123456789ab",
        "deleted shb00abcd",
        &format!("deleted {tap_a1}"),
        "deleted shb001000",
        "deleted shx001000",
    ] {
        assert!(report.changes.iter().any(|c| c == gone), "{gone:?} not in {report:?}");
    }
    assert_eq!(apply(&n1, after), Report::default());
    let links = ip_out(&format!("-n {} -o link show", n1.name));
    assert!(!links.contains(&tap_a1) && !links.contains("sht0123456789ab") && !links.contains("shb001000"), "{links}");
    let routes = ip_out(&format!("-n {} route show proto 83", n1.name));
    assert!(!routes.contains("10.240.0.2") && routes.contains("10.240.0.3"), "{routes}");

    // Node 1 leaves: node 2's FDBs no longer send anything there.
    let alone = spec(2, &[&A2, &B2], &[]);
    let report = apply(&n2, alone.clone());
    assert!(report.changes.iter().any(|c| c.contains("removed 00:00:00:00:00:00 -> 192.168.77.1")), "{report:?}");
    let fdb = std::process::Command::new("ip")
        .args(["netns", "exec", &n2.name, "bridge", "fdb", "show"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    assert!(!fdb.contains("192.168.77.1"), "{fdb}");
}
