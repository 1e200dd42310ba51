//! The uplink's DHCP client against a real dnsmasq: two network namespaces joined by a veth
//! pair, dnsmasq serving one end, netstack's client on the other. One run walks a lease's
//! life: the lease applied (address, prefix, default route, MTU, DNS servers), renewed at T1,
//! kept while the server is gone and rebound when it comes back, refused by a NAK when the server
//! no longer has the address (and a new one leased), asked for again after the carrier went and
//! came back, hostile packets ignored, and given back on stop. Needs root and dnsmasq.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod support;

use std::net::{Ipv4Addr, UdpSocket};
use std::process::{Child, Command};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use shoal_netstack::dhcp::{Client, Config, Event};
use shoal_netstack::netlink::Netlink;
use support::{block_on, ip, ip_out, Netns};

struct Dnsmasq {
    child: Child,
}

impl Dnsmasq {
    fn start(ns: &str, range: &str, leases: &std::path::Path) -> Dnsmasq {
        let child = Command::new("ip")
            .args(["netns", "exec", ns, "dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--port=0"])
            .args(["--interface=dhs", "--bind-interfaces", "--dhcp-authoritative", "--log-dhcp"])
            .arg(format!("--dhcp-range={range},255.255.255.0,2m"))
            .arg(format!("--dhcp-leasefile={}", leases.display()))
            .args(["--dhcp-option=option:router,10.77.0.1", "--dhcp-option=option:dns-server,10.77.0.53"])
            .args(["--dhcp-option=option:mtu,1400", "--dhcp-option=option:T1,3", "--dhcp-option=option:T2,6"])
            .stderr(std::fs::OpenOptions::new().create(true).append(true).open(leases.with_extension("log")).unwrap())
            .spawn()
            .expect("run dnsmasq (package dnsmasq-base)");
        // Bound to its port before the client asks.
        std::thread::sleep(Duration::from_millis(300));
        Dnsmasq { child }
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The client's next event; on a timeout, fails with what dnsmasq logged.
fn next_event(rx: &mpsc::Receiver<Event>, within: Duration, what: &str) -> Event {
    rx.recv_timeout(within).unwrap_or_else(|e| {
        let log = std::fs::read_to_string(log_path()).unwrap_or_default();
        panic!("no event ({e}) while waiting for {what}; dnsmasq's log:\n{log}")
    })
}

fn log_path() -> std::path::PathBuf {
    std::env::temp_dir().join(format!("shoal-dhcp-{}", std::process::id())).join("leases.log")
}

fn addresses(ns: &str) -> String {
    ip_out(&format!("-n {ns} -4 -o addr show dev dhc"))
}

#[test]
fn a_lease_is_applied_renewed_rebound_refused_and_released_against_dnsmasq() {
    if !support::root_or_skip() {
        return;
    }
    let srv = Netns::new("shoal-dh-srv");
    let cli = Netns::new("shoal-dh-cli");
    let _ = Command::new("ip").args(["link", "del", "dhs"]).output();
    ip("link add dhs type veth peer name dhc");
    ip(&format!("link set dhs netns {}", srv.name));
    ip(&format!("link set dhc netns {}", cli.name));
    ip(&format!("-n {} addr add 10.77.0.1/24 dev dhs", srv.name));
    ip(&format!("-n {} link set dhs up", srv.name));
    let dir = log_path().parent().unwrap().to_path_buf();
    std::fs::create_dir_all(&dir).unwrap();
    let leases = dir.join("leases");
    let mut server = Some(Dnsmasq::start(&srv.name, "10.77.0.50,10.77.0.59", &leases));

    let (tx, rx) = mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let started = Instant::now();
    let client = cli.spawn_with(move || {
        block_on(async move {
            let nl = Netlink::connect().unwrap();
            let mut cfg = Config::new("dhc");
            cfg.retry = Duration::from_millis(500);
            cfg.max_retry = Duration::from_secs(2);
            let mut c = Client::new(nl, cfg).await.unwrap();
            c.run(
                async {
                    let _ = stop_rx.await;
                },
                |e| {
                    let _ = tx.send(e.clone());
                },
            )
            .await
            .unwrap();
            c.ignored
        })
    });

    // The lease: applied with its prefix, route, MTU; DNS servers reported.
    let Event::Bound(lease) = next_event(&rx, Duration::from_secs(20), "a lease") else { panic!("not bound") };
    eprintln!("dhcp_time_to_lease_ms={}", started.elapsed().as_millis());
    let addr = lease.address;
    assert!(addr.octets()[..3] == [10, 77, 0] && (50..=59).contains(&addr.octets()[3]), "{lease:?}");
    assert_eq!((lease.prefix, lease.mtu, lease.server), (24, Some(1400), Ipv4Addr::new(10, 77, 0, 1)));
    assert_eq!(lease.dns, vec![Ipv4Addr::new(10, 77, 0, 53)]);
    assert_eq!((lease.t1, lease.t2), (Duration::from_secs(3), Duration::from_secs(6)));
    assert!(lease.resolv_conf().contains("nameserver 10.77.0.53"));
    assert!(addresses(&cli.name).contains(&format!("inet {addr}/24")), "{}", addresses(&cli.name));
    let route = ip_out(&format!("-n {} route show default", cli.name));
    assert!(route.contains("via 10.77.0.1 dev dhc proto dhcp"), "{route}");
    assert!(ip_out(&format!("-n {} link show dhc", cli.name)).contains("mtu 1400"));

    // Renewed at T1 with the same address.
    match next_event(&rx, Duration::from_secs(10), "the renewal at T1") {
        Event::Renewed(l) => assert_eq!(l.address, addr),
        other => panic!("{other:?}"),
    }

    // Hostile and foreign packets on the client's port change nothing.
    srv.run(|| {
        let s = UdpSocket::bind("10.77.0.1:0").unwrap();
        s.set_broadcast(true).unwrap();
        let mut x = 7u32;
        for i in 0..200 {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            let len = if i % 2 == 0 { 300 } else { (x % 600) as usize };
            let mut b: Vec<u8> = (0..len).map(|j| (x >> (j % 24)) as u8).collect();
            if let Some(op) = b.first_mut() {
                *op = 2; // BOOTREPLY, so it is parsed at all
            }
            s.send_to(&b, "10.77.0.255:68").unwrap();
        }
    });

    // The server goes away: the address stays through RENEWING and REBINDING; the server
    // comes back and the lease is rebound, never having been removed.
    drop(server.take());
    std::thread::sleep(Duration::from_secs(8));
    assert!(rx.try_recv().is_err(), "no event while the server is away");
    assert!(addresses(&cli.name).contains(&format!("inet {addr}/24")));
    server = Some(Dnsmasq::start(&srv.name, "10.77.0.50,10.77.0.59", &leases));
    match next_event(&rx, Duration::from_secs(15), "the rebinding") {
        Event::Renewed(l) => assert_eq!(l.address, addr),
        other => panic!("{other:?}"),
    }

    // The carrier goes and comes back: the client asks for its address again and keeps it.
    ip(&format!("-n {} link set dhs down", srv.name));
    assert_eq!(next_event(&rx, Duration::from_secs(10), "the carrier loss"), Event::LinkDown);
    ip(&format!("-n {} link set dhs up", srv.name));
    assert_eq!(next_event(&rx, Duration::from_secs(10), "the carrier"), Event::LinkUp);
    match next_event(&rx, Duration::from_secs(10), "the INIT-REBOOT answer") {
        Event::Renewed(l) | Event::Bound(l) => assert_eq!(l.address, addr),
        other => panic!("{other:?}"),
    }
    let route = ip_out(&format!("-n {} route show default", cli.name));
    assert!(route.contains("via 10.77.0.1 dev dhc proto dhcp"), "{route}");

    // The server now serves other addresses: the renewal is refused, the address removed and
    // a new one leased.
    drop(server.take());
    let _ = std::fs::remove_file(&leases);
    server = Some(Dnsmasq::start(&srv.name, "10.77.0.100,10.77.0.109", &leases));
    match next_event(&rx, Duration::from_secs(15), "the NAK") {
        Event::Nak { address, .. } => assert_eq!(address, Some(addr)),
        other => panic!("{other:?}"),
    }
    let Event::Bound(second) = next_event(&rx, Duration::from_secs(20), "a new lease") else { panic!("not bound") };
    assert!((100..=109).contains(&second.address.octets()[3]), "{second:?}");
    let now = addresses(&cli.name);
    assert!(now.contains(&format!("inet {}/24", second.address)) && !now.contains(&format!("inet {addr}/")), "{now}");

    // Stopped: the lease is given back and everything it applied removed.
    stop_tx.send(()).unwrap();
    match next_event(&rx, Duration::from_secs(10), "the release") {
        Event::Released(l) => assert_eq!(l.address, second.address),
        other => panic!("{other:?}"),
    }
    let ignored = client.join().unwrap();
    assert!(ignored >= 100, "hostile packets counted as ignored: {ignored}");
    assert!(!addresses(&cli.name).contains("inet 10.77."), "{}", addresses(&cli.name));
    assert!(ip_out(&format!("-n {} route show default", cli.name)).is_empty());
    std::thread::sleep(Duration::from_millis(500));
    let held = std::fs::read_to_string(&leases).unwrap_or_default();
    assert!(!held.contains(&second.address.to_string()), "dnsmasq still holds the lease: {held}");
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}
