//! Three servers booted from the host image, as a rack would boot them: on one bridge with a
//! DHCP and TFTP server (dnsmasq), each PXE-booting the same iPXE script with the same command
//! line, which names no seed. They find each other on the LAN and form one cluster with no
//! step in between; a deployment posted to one of them from the host runs its Linux microVMs
//! (a real KVM inside each emulated server) on the nodes the scheduler chose, their consoles
//! read through the API; a server rebooted from its console hands its microVM to the server
//! with room before it goes down and comes back with its identity (its data disk); cutting one
//! server's power moves its microVM to the server left.
//! Needs root (the bridge and taps), QEMU, dnsmasq.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use shoal_hardware_tests::guest_file;
use shoal_hardware_tests::server::{build_image, Server};

const SECRET: &str = "rack-test-secret";
const LAN: &str = "10.89.0";
const SERVERS: usize = 3;
/// Each step's limit: three emulated servers share this machine's cores.
const STEP: Duration = Duration::from_secs(420);
/// How long the leader waits before it takes a silent server's instances elsewhere.
const GRACE_S: u64 = 10;

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip (iproute2) is installed by `make test`");
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// The rack's LAN: a bridge in a namespace of this host's, one tap per server, and dnsmasq
/// giving leases (fixed by MAC) and the boot files over TFTP. Removed when dropped.
struct Rack {
    ns: String,
    dnsmasq: Child,
    dir: PathBuf,
}

impl Rack {
    fn new(dir: &Path) -> Rack {
        let ns = format!("shoal-rack{}", std::process::id() % 100_000);
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        ip(&["netns", "add", &ns]);
        ip(&["-n", &ns, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &ns, "addr", "add", &format!("{LAN}.1/24"), "dev", "br0"]);
        ip(&["-n", &ns, "link", "set", "br0", "up"]);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        for n in 0..SERVERS {
            let tap = format!("rack{n}");
            ip(&["-n", &ns, "tuntap", "add", &tap, "mode", "tap"]);
            ip(&["-n", &ns, "link", "set", &tap, "master", "br0", "up"]);
        }
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &ns, "dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--port=0"])
            .args(["--interface=br0", "--bind-interfaces", "--dhcp-authoritative", "--log-dhcp"])
            .arg(format!("--dhcp-range={LAN}.100,{LAN}.150,255.255.255.0,1h"))
            .arg(format!("--dhcp-leasefile={}", dir.join("leases").display()))
            .args(["--enable-tftp", &format!("--tftp-root={}", dir.display()), "--dhcp-boot=rack.ipxe"]);
        for n in 0..SERVERS {
            c.arg(format!("--dhcp-host={},{}", mac(n), address(n)));
        }
        let log = std::fs::File::create(dir.join("dnsmasq.log")).unwrap();
        let dnsmasq = c.stdout(Stdio::null()).stderr(log).spawn().expect("run dnsmasq (package dnsmasq-base)");
        Rack { ns, dnsmasq, dir: dir.to_path_buf() }
    }

    /// Powers on server `n`: PXE from the bridge, one vCPU (so a 1-vCPU microVM fills it), and
    /// a data disk, blank until the server's first boot formats it.
    fn power_on(&self, n: usize) -> Server {
        let disk = self.dir.join(format!("disk{n}.raw"));
        if !disk.exists() {
            std::fs::File::create(&disk).unwrap().set_len(512 << 20).unwrap();
        }
        let args: Vec<String> = [
            "-drive",
            &format!("file={},format=raw,if=virtio", disk.display()),
            "-boot",
            "n",
            "-netdev",
            &format!("tap,id=n0,ifname=rack{n},script=no,downscript=no"),
            "-device",
            &format!("virtio-net-pci,netdev=n0,mac={}", mac(n)),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        Server::start(&args, &format!("rack{n}"), Some(&self.ns), 1, 1536)
    }

    /// A request to a server's API from the LAN; the status and the JSON (or text) answer.
    fn api(&self, n: usize, method: &str, path: &str, body: Option<Body>) -> Option<(u16, String)> {
        let token = shoal_node::cluster::secret::ClusterSecret::new(SECRET).default_api_token();
        let mut c = Command::new("ip");
        // The test has no copy of the cluster CA (it lives on the servers): -k.
        c.args(["netns", "exec", &self.ns, "curl", "-sk", "--max-time", "60", "-w", "\n%{http_code}", "-X", method])
            .arg("-H")
            .arg(format!("Authorization: Bearer {token}"))
            .arg(format!("https://{}:7400{path}", address(n)));
        match body {
            Some(Body::Json(v)) => {
                c.args(["-H", "Content-Type: application/json", "--data"]).arg(v.to_string());
            }
            Some(Body::Text(t)) => {
                c.arg("--data").arg(t);
            }
            Some(Body::File(f)) => {
                c.args(["-H", "Content-Type: application/octet-stream", "--data-binary"])
                    .arg(format!("@{}", f.display()));
            }
            None => {}
        }
        let out = c.output().ok()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n')?;
        Some((code.trim().parse().ok()?, body.to_string()))
    }

    fn json(&self, n: usize, path: &str) -> Option<Value> {
        let (code, body) = self.api(n, "GET", path, None)?;
        (code == 200).then(|| serde_json::from_str(&body).ok()).flatten()
    }
}

impl Drop for Rack {
    fn drop(&mut self) {
        let _ = self.dnsmasq.kill();
        let _ = self.dnsmasq.wait();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

enum Body {
    Json(Value),
    Text(String),
    File(PathBuf),
}

fn mac(n: usize) -> String {
    format!("52:54:00:5a:00:{:02x}", n + 1)
}

fn address(n: usize) -> String {
    format!("{LAN}.{}", 11 + n)
}

fn consoles(servers: &[Option<Server>]) -> String {
    let mut out = String::new();
    for (n, s) in servers.iter().enumerate() {
        if let Some(s) = s {
            out += &format!("\n===== server {n} ({}) =====\n{}\n", address(n), s.console());
        }
    }
    out
}

fn wait<T>(what: &str, servers: &[Option<Server>], mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + STEP;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}; the consoles:{}", consoles(servers));
        std::thread::sleep(Duration::from_secs(2));
    }
}

/// The demo deployment's running instances: id → the node (its index) running it, once each
/// has printed the guest's marker on its console (read through server `via`'s API).
fn running(rack: &Rack, via: usize, ids: &BTreeMap<String, usize>) -> Option<BTreeMap<String, usize>> {
    let list = rack.json(via, "/v1/tenants/demo/instances?deployment=linux")?;
    let mut out = BTreeMap::new();
    for i in list["instances"].as_array()? {
        if i["state"] != "running" {
            continue;
        }
        let id = i["id"].as_str()?.to_string();
        let node = ids.get(i["node"].as_str()?).copied()?;
        let (code, text) = rack.api(via, "GET", &format!("/v1/tenants/demo/instances/{id}/console"), None)?;
        if code == 200 && text.contains("SHOAL-GUEST-INIT ok") {
            out.insert(id, node);
        }
    }
    Some(out)
}

#[test]
fn three_servers_booted_alike_form_one_cluster_run_microvms_and_move_them_off_a_rebooting_and_a_dead_server() {
    let dir = std::env::temp_dir().join(format!("shoal-rack-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let image = dir.join("image");
    build_image(&image, "");
    // One iPXE script for every server; no seed and no per-server setting in it.
    for f in ["vmlinuz", "initramfs.img"] {
        std::fs::copy(image.join(f), dir.join(f)).unwrap();
    }
    std::fs::write(
        dir.join("rack.ipxe"),
        format!(
            "#!ipxe\nkernel vmlinuz initrd=initramfs.img console=ttyS0,115200 panic=-1 quiet shoal.secret={SECRET} shoal.data=/dev/vda\ninitrd initramfs.img\nboot\n"
        ),
    )
    .unwrap();
    let rack = Rack::new(&dir);

    let powered = Instant::now();
    let mut servers: Vec<Option<Server>> = (0..SERVERS).map(|n| Some(rack.power_on(n))).collect();
    // One cluster: every server answers with the same cluster id, leader and three voters.
    let status = wait("three servers to form one cluster", &servers, || {
        let all: Vec<Value> = (0..SERVERS).map(|n| rack.json(n, "/v1/cluster/status")).collect::<Option<_>>()?;
        let first = &all[0];
        let agreed = all.iter().all(|s| {
            s["cluster_id"] == first["cluster_id"] && s["leader_id"] == first["leader_id"] && s["leader_id"].is_string()
        });
        (agreed && first["voters"].as_array().map(Vec::len) == Some(SERVERS)).then(|| first.clone())
    });
    println!("rack_power_on_to_one_cluster_s={:.1}", powered.elapsed().as_secs_f64());
    for (n, s) in servers.iter().enumerate() {
        let s = s.as_ref().unwrap();
        assert!(s.count("rack.ipxe") >= 1, "server {n} did not PXE-boot the rack's script:\n{}", s.console());
    }
    // Node ids → server index.
    let ids: BTreeMap<String, usize> = (0..SERVERS)
        .map(|n| (rack.json(n, "/v1/cluster/status").unwrap()["node_id"].as_str().unwrap().to_string(), n))
        .collect();
    assert_eq!(ids.len(), SERVERS);
    assert!(status["members"].as_array().unwrap().iter().all(|m| m["state"] == "alive"), "{status}");

    // The host posts a deployment of the project's Linux guest to one server.
    let (code, body) =
        rack.api(1, "PUT", "/v1/cluster/settings/node_grace_seconds", Some(Body::Text(GRACE_S.to_string()))).unwrap();
    assert_eq!(code, 200, "{body}");
    let digest = |f: &str| {
        let (code, body) = rack.api(1, "POST", "/v1/images", Some(Body::File(guest_file(f)))).unwrap();
        assert!(code == 200 || code == 201, "uploading {f}: {code} {body}");
        serde_json::from_str::<Value>(&body).unwrap()["digest"].as_str().unwrap().to_string()
    };
    let (kernel, initrd) = (digest("vmlinux"), digest("initramfs.cpio"));
    let (code, body) = rack.api(2, "PUT", "/v1/tenants/demo", Some(Body::Json(json!({})))).unwrap();
    assert!(code == 200 || code == 201, "{code} {body}");
    let deployment = json!({"replicas": 2, "template": {
        "kernel": kernel, "initrd": initrd, "cmdline": "console=ttyS0 quiet reboot=k panic=1",
        "vcpus": 1, "mem_mib": 128, "restart": "always"}});
    let deployed = Instant::now();
    let (code, body) = rack.api(2, "PUT", "/v1/tenants/demo/deployments/linux", Some(Body::Json(deployment))).unwrap();
    assert!(code == 200 || code == 201, "{code} {body}");
    // Two microVMs, one per server the scheduler chose (each server has room for one).
    let first = wait("the deployment's two microVMs to run and print on their consoles", &servers, || {
        running(&rack, 0, &ids).filter(|r| r.len() == 2)
    });
    println!("rack_deploy_to_two_guests_running_s={:.1}", deployed.elapsed().as_secs_f64());
    let used: BTreeSet<usize> = first.values().copied().collect();
    assert_eq!(used.len(), 2, "two replicas on one server: {first:?}");

    // An ordered reboot, typed on the console of a server that runs one (the leader if it
    // does): before it goes down, its microVM starts on the server that had room, with no
    // grace period to wait out; it comes back with its identity and rejoins.
    let now = rack.json(0, "/v1/cluster/status").unwrap();
    let leader = now["leader_id"].as_str().and_then(|l| ids.get(l)).copied();
    let rebooted = leader.filter(|l| used.contains(l)).unwrap_or(*used.iter().next().unwrap());
    let via = (0..SERVERS).find(|n| *n != rebooted).unwrap();
    // No grace would run out while it reboots: only the hand-over can move its microVM.
    let (code, body) =
        rack.api(via, "PUT", "/v1/cluster/settings/node_grace_seconds", Some(Body::Text("600".into()))).unwrap();
    assert_eq!(code, 200, "{body}");
    let asked = Instant::now();
    {
        let s = servers[rebooted].as_ref().unwrap();
        s.type_line("reboot");
        s.type_line("yes");
    }
    let moved = wait("the rebooting server's microVM to run elsewhere", &servers, || {
        running(&rack, via, &ids).filter(|r| r.len() == 2 && r.values().all(|n| *n != rebooted))
    });
    println!("rack_ordered_reboot_to_microvm_running_elsewhere_s={:.1}", asked.elapsed().as_secs_f64());
    let s = servers[rebooted].as_ref().unwrap();
    assert!(s.count("phase stopping: rebooting: moving this node's microVMs") >= 1, "{}", s.console());
    // The API keeps answering during the hand-over: wait for the second boot first.
    servers[rebooted].as_ref().unwrap().wait_console("phase init:", 2);
    let back = wait("the rebooted server to rejoin with its identity", &servers, || {
        let st = rack.json(rebooted, "/v1/cluster/status")?;
        let alive = st["members"].as_array()?.iter().all(|m| m["state"] == "alive");
        let voters = st["voters"].as_array().map(Vec::len) == Some(SERVERS);
        (alive && voters && st["leader_id"].is_string()).then_some(st)
    });
    assert_eq!(ids.get(back["node_id"].as_str().unwrap()), Some(&rebooted), "a new identity after the reboot: {back}");
    let used: BTreeSet<usize> = moved.values().copied().collect();
    let first = moved;
    let (code, body) =
        rack.api(via, "PUT", "/v1/cluster/settings/node_grace_seconds", Some(Body::Text(GRACE_S.to_string()))).unwrap();
    assert_eq!(code, 200, "{body}");

    // Cut the power of a server that runs one (not the one the test asks).
    let victim = *used.iter().find(|&&n| n != 0).unwrap_or(&0);
    let via = (0..SERVERS).find(|n| *n != victim).unwrap();
    let moved_id = first.iter().find(|(_, n)| **n == victim).map(|(id, _)| id.clone()).unwrap();
    servers[victim].as_mut().unwrap().power_cut();
    servers[victim] = None;
    let cut = Instant::now();
    let after = wait("the dead server's microVM to run elsewhere", &servers, || {
        running(&rack, via, &ids).filter(|r| r.len() == 2 && r.values().all(|n| *n != victim))
    });
    println!(
        "rack_power_cut_to_microvm_running_elsewhere_s={:.1} node_grace_seconds={GRACE_S}",
        cut.elapsed().as_secs_f64()
    );
    let nodes: BTreeSet<usize> = after.values().copied().collect();
    assert_eq!(nodes.len(), 2, "both replicas on one server after the cut: {after:?}");
    let lost = rack.json(via, "/v1/tenants/demo/instances?deployment=linux").unwrap();
    let was = lost["instances"].as_array().unwrap().iter().find(|i| i["id"] == moved_id.as_str()).cloned();
    if let Some(i) = was {
        assert_ne!(i["state"], "running", "the dead server's instance still shows running: {i}");
    }
}
