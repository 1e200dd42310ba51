//! Instances' networks between real servers: two emulated servers (QEMU TCG, a KVM inside
//! each) on one bridge, each running `shoal-node` as one cluster, run Linux microVMs placed by
//! the cluster. A tenant's microVMs fetch a 16 KiB page over TCP from the tenant's web
//! instances on both servers (one of them across the VXLAN overlay, in full-size segments that
//! fit its MTU only because the VMM tells the guest the tap's), reach an HTTP server outside the
//! cluster network through NAT (it sees the servers' addresses), and the web deployment's
//! published port answers on both servers' addresses; another tenant's microVM reaches none
//! of the web instances. Needs root (the bridge and taps) and QEMU.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shoal_hardware_tests::{guest_file, repo_root, Boot, BootOptions, Job, Nic, PowerCutServer};

/// The servers' underlay (a bridge in a namespace of this host's) and the host outside the
/// cluster network on it.
const UNDERLAY: &str = "192.168.50";
const OUTSIDE: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 100);
const OUTSIDE_PORT: u16 = 8000;
const NODE_PORT: u16 = 30080;

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip (iproute2) is installed by `make test`");
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// The bridge's namespace, removed (with the taps) when dropped.
struct Underlay(String);

impl Underlay {
    fn new() -> Underlay {
        let name = format!("shoal-hwnet{}", std::process::id() % 100_000);
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name]);
        let u = Underlay(name);
        ip(&["-n", &u.0, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &u.0, "addr", "add", &format!("{OUTSIDE}/24"), "dev", "br0"]);
        ip(&["-n", &u.0, "link", "set", "br0", "up"]);
        for n in 1..=2 {
            let tap = format!("hwt{n}");
            ip(&["-n", &u.0, "tuntap", "add", &tap, "mode", "tap"]);
            ip(&["-n", &u.0, "link", "set", &tap, "master", "br0", "up"]);
        }
        u
    }

    fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.0))
    }

    /// Runs `f` on a thread inside the namespace.
    fn spawn<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> std::thread::JoinHandle<T> {
        let ns = std::fs::File::open(self.path()).unwrap();
        std::thread::spawn(move || {
            // SAFETY: setns on a namespace descriptor we hold; it moves only this thread.
            let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
    }
}

impl Drop for Underlay {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// The first line of a web instance's page.
fn hello(a: Ipv4Addr) -> String {
    format!("hello from {a}")
}

/// Its length as the guests' shell counts it (the last newline dropped): the first line and
/// 16 KiB more, so that full-size TCP segments carry it (they must fit the overlay's MTU).
fn page_len(a: Ipv4Addr) -> usize {
    hello(a).len() + 1 + 16384
}

/// One HTTP/1.0 GET of `/` at `to`: the body, if an answer came.
fn get(to: SocketAddr) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(5)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    s.write_all(b"GET / HTTP/1.0\r\nHost: shoal\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    text.split_once("\r\n\r\n").map(|(_, body)| body.trim().to_string())
}

/// The host outside: answers every GET with "outside saw <the client's address>" and notes
/// who asked.
fn serve_outside(underlay: &Underlay, seen: Arc<Mutex<BTreeSet<Ipv4Addr>>>) {
    let listener = underlay.spawn(|| TcpListener::bind((OUTSIDE, OUTSIDE_PORT)).unwrap()).join().unwrap();
    std::thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            let Ok(SocketAddr::V4(peer)) = s.peer_addr() else { continue };
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf);
            seen.lock().unwrap().insert(*peer.ip());
            let body = format!("outside saw {}\n", peer.ip());
            let _ = s.write_all(format!("HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len()).as_bytes());
        }
    });
}

fn job() -> String {
    format!(
        r#"set -u
n=$(sed -n 's/.*shoal\.node=\([0-9]\).*/\1/p' /proc/cmdline)
load_network_modules
# The jail needs cgroups (v2), the console a pseudo-terminal.
if [ -z "$(ls -A /sys/fs/cgroup 2>/dev/null)" ]; then mkdir -p /sys/fs/cgroup; mount -t cgroup2 none /sys/fs/cgroup; fi
mkdir -p /dev/pts; mount -t devpts devpts /dev/pts 2>/dev/null
ip link set lo up
ip addr add {UNDERLAY}.$n/24 dev eth0 && ip link set eth0 up || echo "SHOAL-H no eth0"
mkdir -p /tmp/node
./shoal-node agent --data-dir /tmp/node --listen {UNDERLAY}.$n:7400 --seed {UNDERLAY}.1:7400 --secret-file secret \
  --min-voters 2 --capacity vcpus=8,mem-mib=1024 --vmm "$(pwd)/shoal-vmm" 2>/tmp/node.log &
echo "SHOAL-H node $n started"
# What a failure needs looked at: the host's links and their counters, neighbours, routes, rules,
# the agent's log.
diagnose() {{
  sed "s/^/[server $n] /" /proc/net/dev; ip neigh | sed "s/^/[server $n] /"; ip route | sed "s/^/[server $n] /"
  ip rule | sed "s/^/[server $n] /"; brctl showmacs shb001000 2>/dev/null | sed "s/^/[server $n] /"
  tail -n 40 /tmp/node.log | sed "s/^/[server $n agent] /"
}}
if [ "$n" != 1 ]; then sleep 240; diagnose; while true; do sleep 60; done; fi
fail() {{ echo "SHOAL-H failed: $*"; ./shoalctl get instances -t acme; ./shoalctl get instances -t other; sleep 5; exit 1; }}
export SHOAL_CONFIG=/tmp/shoalctl.config
i=0; while [ ! -s /tmp/node/tls/ca.crt ] && [ $i -lt 600 ]; do sleep 0.5; i=$((i+1)); done
./shoalctl config set-context t --endpoint {UNDERLAY}.1:7400 --token-file /tmp/node/api-token --ca /tmp/node/tls/ca.crt --tenant acme >/dev/null || fail "no context"
i=0; while [ "$(./shoalctl get nodes -o name 2>/dev/null | wc -l)" -lt 2 ]; do i=$((i+1)); [ $i -lt 300 ] || fail "the servers formed no cluster"; sleep 1; done
echo "SHOAL-H cluster of 2"
./shoalctl apply -f web.yaml || fail "apply web"
./shoalctl rollout status web --timeout 900 || fail "web did not roll out"
./shoalctl get instances
web=$(./shoalctl get instances -d web | awk 'NR > 1 {{print $5}}' | tr '\n' ',' | sed 's/,$//')
echo "SHOAL-H web $web"
sed "s/WEB/$web/g" clients.yaml > clients-now.yaml
./shoalctl apply -f clients-now.yaml || fail "apply clients"
./shoalctl rollout status probe --timeout 900 || fail "probe did not roll out"
./shoalctl rollout status snoop -t other --timeout 900 || fail "snoop did not roll out"
for t in acme other; do
  ./shoalctl get instances -t $t | awk 'NR > 1 && $2 != "web" {{print $1, $3}}' | while read -r id node; do
    i=0; while ! ./shoalctl logs -t $t "$id" | tr -d '\r' | grep -q '^net: done'; do i=$((i+1)); [ $i -lt 300 ] || break; sleep 2; done
    ./shoalctl logs -t $t "$id" | tr -d '\r' | grep '^net: ' | sed "s/^/SHOAL-H $t $id $node /"
  done
done
diagnose
for t in acme other; do
  ./shoalctl get instances -t $t | awk 'NR > 1 {{print $1}}' | while read -r id; do
    ./shoalctl logs -t $t "$id" | tr -d '\r' | tail -n 30 | sed "s/^/[$id] /"
  done
done
echo "SHOAL-H clients done"
# The test sends to the published port now, then powers the servers off.
sleep 900
"#
    )
}

const WEB: &str = "kind: Tenant\nname: acme\n---\nkind: Tenant\nname: other\n---\nkind: Deployment\ntenant: acme\nname: web\nreplicas: 2\nports:\n  - port: 80\n    node_port: 30080\ntemplate:\n  kernel: vmlinux\n  initrd: initramfs.cpio\n  cmdline: \"console=ttyS0 quiet reboot=k panic=1 shoal.test=net\"\n  vcpus: 1\n  mem_mib: 128\n";

fn clients() -> String {
    let template = |cmdline: &str| {
        format!("template:\n  kernel: vmlinux\n  initrd: initramfs.cpio\n  cmdline: \"console=ttyS0 quiet reboot=k panic=1 shoal.test=net {cmdline}\"\n  vcpus: 1\n  mem_mib: 128\n")
    };
    format!(
        "kind: Deployment\ntenant: acme\nname: probe\nreplicas: 2\n{}---\nkind: Deployment\ntenant: other\nname: snoop\nreplicas: 1\n{}",
        template(&format!("shoal.tcp=WEB shoal.out={OUTSIDE}:{OUTSIDE_PORT}")),
        template("shoal.tcp=WEB shoal.tries=15")
    )
}

fn binary(name: &str) -> PathBuf {
    let p = repo_root().join("target/x86_64-unknown-linux-gnu/release").join(name);
    assert!(p.exists(), "{} is missing: run `make test` (it builds the workspace first)", p.display());
    p
}

/// Reads both servers' consoles until server 1 says `until` (or ends); returns server 1's
/// lines.
fn read_until(servers: &mut [Boot; 2], until: &str, limit: Duration) -> Vec<String> {
    let start = Instant::now();
    let mut lines = Vec::new();
    while start.elapsed() < limit {
        // Server 2's console is read so its pipe never fills; it is kept for the failure text.
        while servers[1].next_line(Duration::from_millis(10)).is_some() {}
        match servers[0].next_line(Duration::from_secs(1)) {
            Some(l) => {
                let done = l.contains(until) || l.contains("SHOAL-H failed");
                lines.push(l);
                if done {
                    break;
                }
            }
            None if servers[0].stalled() => break,
            None => {}
        }
    }
    lines
}

fn consoles(servers: &[Boot; 2]) -> String {
    format!("--- server 1:\n{}\n--- server 2:\n{}", servers[0].text(), servers[1].text())
}

#[test]
fn microvms_on_two_servers_reach_each_other_over_the_overlay_reach_out_and_are_reached() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || Command::new("qemu-system-x86_64").arg("--version").output().is_err() {
        eprintln!("skipped: needs root (a bridge and taps) and qemu-system-x86_64 (`make test` installs it)");
        return;
    }
    let underlay = Underlay::new();
    let outside_saw = Arc::new(Mutex::new(BTreeSet::new()));
    serve_outside(&underlay, outside_saw.clone());

    let scratch = std::env::temp_dir().join(format!("shoal-hwnet-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).unwrap();
    std::fs::write(scratch.join("secret"), "instance-network-test-secret-0123456789").unwrap();
    std::fs::write(scratch.join("web.yaml"), WEB).unwrap();
    std::fs::write(scratch.join("clients.yaml"), clients()).unwrap();
    let mut files = vec![
        (binary("shoal-node"), "shoal-node".to_string()),
        (binary("shoalctl"), "shoalctl".to_string()),
        (binary("shoal-vmm"), "shoal-vmm".to_string()),
        (guest_file("vmlinux"), "vmlinux".to_string()),
        (guest_file("initramfs.cpio"), "initramfs.cpio".to_string()),
    ];
    for f in ["secret", "web.yaml", "clients.yaml"] {
        files.push((scratch.join(f), f.to_string()));
    }
    let job = Job { script: job(), files, limit: Duration::from_secs(1800), interactive: false };
    let server = PowerCutServer::new(&job, 0, 0).expect("prepare the emulated servers");
    let _ = std::fs::remove_dir_all(&scratch);
    let boot = |n: u8| {
        // One CPU each: microVMs run inside (see `run` on QEMU's AMD-V emulation).
        let nic = Nic { netns: underlay.path(), tap: format!("hwt{n}"), mac: [0x52, 0x54, 0, 0x50, 0, n] };
        server.boot_with(&format!("shoal.node={n}"), &BootOptions { cpus: 1, nic: Some(nic) }).unwrap()
    };
    let mut servers = [boot(1), boot(2)];

    let lines = read_until(&mut servers, "SHOAL-H clients done", Duration::from_secs(1500));
    assert!(lines.iter().any(|l| l.contains("SHOAL-H clients done")), "the job did not finish\n{}", consoles(&servers));
    let web: Vec<Ipv4Addr> = lines
        .iter()
        .find_map(|l| l.split_once("SHOAL-H web ").map(|(_, a)| a.trim().to_string()))
        .unwrap()
        .split(',')
        .filter_map(|a| a.parse().ok())
        .collect();
    let subnets: BTreeSet<[u8; 3]> = web.iter().map(|a| [a.octets()[0], a.octets()[1], a.octets()[2]]).collect();
    assert!(web.len() == 2 && subnets.len() == 2, "one web instance on each server: {web:?}\n{}", consoles(&servers));

    // What each client microVM printed: "SHOAL-H <tenant> <id> <node> net: ...".
    let said = |tenant: &str| -> Vec<(String, String, String)> {
        lines
            .iter()
            .filter_map(|l| l.split_once(&format!("SHOAL-H {tenant} ")).map(|(_, r)| r.to_string()))
            .filter_map(|r| {
                let mut f = r.splitn(3, ' ');
                Some((f.next()?.to_string(), f.next()?.to_string(), f.next()?.to_string()))
            })
            .collect()
    };
    let probes = said("acme");
    let probe_ids: BTreeSet<&str> = probes.iter().map(|(id, _, _)| id.as_str()).collect();
    let probe_nodes: BTreeSet<&str> = probes.iter().map(|(_, node, _)| node.as_str()).collect();
    assert!(
        probe_ids.len() == 2 && probe_nodes.len() == 2,
        "a probe on each server: {probes:#?}\n{}",
        consoles(&servers)
    );
    for id in &probe_ids {
        let of: Vec<&str> = probes.iter().filter(|(i, _, _)| i == id).map(|(_, _, l)| l.as_str()).collect();
        // Both web instances, so one across the overlay from wherever the probe runs.
        for a in &web {
            let want = format!("net: tcp {a}: {} ({} bytes)", hello(*a), page_len(*a));
            assert!(of.contains(&want.as_str()), "probe {id} did not get {want:?}: {of:#?}\n{}", consoles(&servers));
        }
        // Out through NAT: the outside host saw a server's address, not the instance's.
        let out =
            of.iter().find_map(|l| l.strip_prefix(&format!("net: out {OUTSIDE}:{OUTSIDE_PORT}: "))).unwrap_or("-");
        assert!(out.starts_with(&format!("outside saw {UNDERLAY}.")), "probe {id}: {out}\n{}", consoles(&servers));
    }
    let saw: BTreeSet<Ipv4Addr> = outside_saw.lock().unwrap().clone();
    let servers_ips: BTreeSet<Ipv4Addr> = [1, 2].iter().map(|n| format!("{UNDERLAY}.{n}").parse().unwrap()).collect();
    assert_eq!(saw, servers_ips, "the outside host saw the servers' addresses, one per probe");

    // The other tenant's microVM reaches neither web instance.
    let snoop = said("other");
    for a in &web {
        let want = format!("net: tcp {a}: failed");
        assert!(
            snoop.iter().any(|(_, _, l)| *l == want),
            "another tenant's microVM: {snoop:#?} (wanted {want:?})\n{}",
            consoles(&servers)
        );
    }

    // The published port on each server's address reaches the web instances (spread over
    // both, wherever it arrives).
    let answers = underlay
        .spawn(move || {
            let mut answers = Vec::new();
            for n in [1u8, 2] {
                for _ in 0..16 {
                    let to = SocketAddr::from((Ipv4Addr::new(192, 168, 50, n), NODE_PORT));
                    answers.push((n, get(to)));
                }
            }
            answers
        })
        .join()
        .unwrap();
    for n in [1u8, 2] {
        let from: BTreeSet<(String, usize)> = answers
            .iter()
            .filter(|(m, _)| *m == n)
            .filter_map(|(_, a)| a.as_ref())
            .map(|body| (body.lines().next().unwrap_or_default().to_string(), body.len()))
            .collect();
        let want: BTreeSet<(String, usize)> = web.iter().map(|a| (hello(*a), page_len(*a))).collect();
        assert_eq!(from, want, "server {n}'s port {NODE_PORT}: {answers:?}\n{}", consoles(&servers));
    }
    eprintln!(
        "instance networks between two emulated servers: web at {web:?}; probes fetched from both over the overlay, \
         the outside host saw {saw:?}; the other tenant reached neither; port {NODE_PORT} answered on both servers"
    );
}
