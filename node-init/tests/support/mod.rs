//! Real `shoal-node` processes in network namespaces joined by a bridge. The bridge lives in a hub
//! namespace that the test's own threads enter (setns), so tests reach every node's API without
//! touching the host's network. Partitions take a node's link down on the bridge.
#![allow(dead_code)]

pub mod linearizability;
pub mod openapi;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;

pub const SECRET: &str = "test-cluster-secret";
const PORT: u16 = 7400;

/// Cluster tests share two cores; running them one at a time keeps elections honest.
static SERIAL: Mutex<()> = Mutex::new(());

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Network namespaces need root; without it the tests fail unless SHOAL_SKIP_NETNS_TESTS=1.
pub fn can_run() -> bool {
    if std::env::var_os("SHOAL_SKIP_NETNS_TESTS").is_some() && !is_root() {
        eprintln!("skipped: the cluster tests need root for network namespaces");
        return false;
    }
    assert!(is_root(), "the cluster tests need root for network namespaces (make test runs as root)");
    true
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip (iproute2) runs");
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

/// Tests that run microVMs also need /dev/kvm (and a shoal-vmm to run them with); without KVM
/// they fail unless SHOAL_SKIP_KVM_TESTS=1.
pub fn can_run_vms() -> bool {
    if !can_run() {
        return false;
    }
    if !std::path::Path::new("/dev/kvm").exists() {
        assert!(
            std::env::var_os("SHOAL_SKIP_KVM_TESTS").is_some(),
            "/dev/kvm is missing (set SHOAL_SKIP_KVM_TESTS=1 to skip KVM tests)"
        );
        return false;
    }
    let vmm = vmm_binary();
    assert!(std::path::Path::new(&vmm).is_file(), "{vmm} is missing: build shoal-vmm (make build) or set SHOAL_VMM");
    true
}

/// A test's network: a hub namespace with the bridge, one namespace per node.
pub struct Net {
    pub prefix: String,
    _serial: std::sync::MutexGuard<'static, ()>,
    pub dir: tempfile::TempDir,
    namespaces: Vec<String>,
}

impl Net {
    pub fn new(tag: &str) -> Net {
        let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let prefix = format!("sh{}{}", std::process::id() % 100_000, tag);
        let hub = format!("{prefix}-hub");
        let _ = Command::new("ip").args(["netns", "del", &hub]).stderr(Stdio::null()).status();
        ip(&["netns", "add", &hub]);
        ip(&["-n", &hub, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &hub, "addr", "add", "10.88.0.254/24", "dev", "br0"]);
        ip(&["-n", &hub, "link", "set", "br0", "up"]);
        ip(&["-n", &hub, "link", "set", "lo", "up"]);
        let net = Net { prefix, _serial: serial, dir: tempfile::tempdir().unwrap(), namespaces: vec![hub] };
        net.enter();
        net
    }

    pub fn hub(&self) -> &str {
        &self.namespaces[0]
    }

    /// Moves the calling thread into the hub namespace.
    pub fn enter(&self) {
        enter_netns(self.hub());
    }

    fn node_ns(&mut self, i: usize) -> String {
        let ns = format!("{}-{i}", self.prefix);
        if !self.namespaces.contains(&ns) {
            let _ = Command::new("ip").args(["netns", "del", &ns]).stderr(Stdio::null()).status();
            ip(&["netns", "add", &ns]);
            let veth = format!("v{i}");
            ip(&["-n", self.hub(), "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns]);
            ip(&["-n", self.hub(), "link", "set", &veth, "master", "br0", "up"]);
            ip(&["-n", &ns, "addr", "add", &format!("10.88.0.{}/24", i + 1), "dev", "eth0"]);
            ip(&["-n", &ns, "link", "set", "eth0", "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            self.namespaces.push(ns.clone());
        }
        ns
    }

    /// Starts node `i` (address 10.88.0.<i+1>) seeded with node 0.
    pub fn node(&mut self, i: usize, extra: &[&str]) -> Node {
        self.node_with_secret(i, SECRET, extra)
    }

    pub fn node_with_secret(&mut self, i: usize, secret: &str, extra: &[&str]) -> Node {
        let seed = format!("10.88.0.1:{PORT}");
        self.node_seeded(i, secret, &["--seed", &seed], extra)
    }

    /// Starts node `i` with no seed: it finds the others by LAN discovery (`--discover`).
    pub fn node_discovering(&mut self, i: usize, secret: &str, extra: &[&str]) -> Node {
        self.node_seeded(i, secret, &["--discover"], extra)
    }

    fn node_seeded(&mut self, i: usize, secret: &str, seeding: &[&str], extra: &[&str]) -> Node {
        let ns = self.node_ns(i);
        let data_dir = self.dir.path().join(format!("n{i}"));
        std::fs::create_dir_all(&data_dir).unwrap();
        let secret_file = data_dir.join("test-secret");
        std::fs::write(&secret_file, secret).unwrap();
        let mut args: Vec<String> = [
            "agent",
            "--data-dir",
            data_dir.to_str().unwrap(),
            "--listen",
            &format!("10.88.0.{}:{PORT}", i + 1),
            "--secret-file",
            secret_file.to_str().unwrap(),
            "--dead-voter-timeout",
            "3",
            "--vmm",
            &vmm_binary(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(seeding.iter().chain(extra).map(|s| s.to_string()));
        let mut node = Node { i, ns, data_dir, args, child: None, token: String::new() };
        node.start();
        node
    }

    /// Cuts node `i` off the bridge (or reconnects it): nobody, clients included, reaches it.
    pub fn set_link(&self, i: usize, up: bool) {
        ip(&["-n", self.hub(), "link", "set", &format!("v{i}"), if up { "up" } else { "down" }]);
    }

    /// Separates node `i` from the nodes in `others` (blackhole routes on both sides) while
    /// clients in the hub still reach everyone; `false` heals.
    pub fn partition(&self, i: usize, others: &[usize], cut: bool) {
        let verb = if cut { "add" } else { "del" };
        for &j in others {
            for (from, to) in [(i, j), (j, i)] {
                let ns = format!("{}-{from}", self.prefix);
                ip(&["-n", &ns, "route", verb, "blackhole", &format!("10.88.0.{}/32", to + 1)]);
            }
        }
    }
}

impl Net {
    /// Drops every packet node `from` sends to node `to` (a blackhole route on `from`'s side
    /// only): `to` hears nothing from `from`, and `from` still receives what `to` sends, though
    /// TCP, whose acknowledgements are lost, gets nowhere. `false` heals.
    pub fn cut_one_way(&self, from: usize, to: usize, cut: bool) {
        let ns = format!("{}-{from}", self.prefix);
        ip(&["-n", &ns, "route", if cut { "add" } else { "del" }, "blackhole", &format!("10.88.0.{}/32", to + 1)]);
    }
}

/// An HTTPS client for `node` that opens a new connection (and TLS handshake) per request.
pub fn agent_without_reuse(node: &Node) -> ureq::Agent {
    let tls = trust(node.data_dir.parent().unwrap()).expect("a CA to trust");
    ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(5))
        .max_idle_connections(0)
        .tls_config(std::sync::Arc::new(tls))
        .build()
}

/// A TLS client configuration trusting every CA certificate the nodes under `dir` wrote.
pub fn trust(dir: &std::path::Path) -> Option<rustls::ClientConfig> {
    let mut pem = String::new();
    for node in std::fs::read_dir(dir).ok()?.flatten() {
        for f in ["tls/ca.crt", "tls/provisional-ca.crt"] {
            pem.push_str(&std::fs::read_to_string(node.path().join(f)).unwrap_or_default());
        }
    }
    shoal_node::cluster::tls::client_trusting(&pem).ok()
}

/// Moves the calling thread into the named network namespace (each client thread calls this:
/// a namespace is per thread).
pub fn enter_netns(name: &str) {
    let f = std::fs::File::open(format!("/run/netns/{name}")).unwrap();
    use std::os::fd::AsRawFd;
    // SAFETY: setns on a valid namespace fd only changes this thread's network namespace.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in &self.namespaces {
            // MicroVMs outlive their agents by design: end everything left in the namespace
            // (SIGTERM first, so jailed VMMs remove their cgroups), then the namespace goes.
            end_namespace(ns);
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        remove_empty_jail_cgroups();
    }
}

/// Makes `cmd` start in the named network namespace; keep the returned file until it is spawned.
/// Only the network namespace changes: `ip netns exec` would also mount a sysfs of its own,
/// hiding the host's cgroup hierarchy from the jails a node starts.
pub fn in_netns(cmd: &mut Command, ns: &str) -> std::fs::File {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let netns = std::fs::File::open(format!("/run/netns/{ns}")).unwrap();
    let fd = netns.as_raw_fd();
    // SAFETY: between fork and exec the child only calls setns, which is async-signal-safe, on
    // a descriptor it inherited.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    netns
}

/// The pids of every process in a network namespace.
pub fn ns_pids(ns: &str) -> Vec<i32> {
    let out = Command::new("ip").args(["netns", "pids", ns]).output().map(|o| o.stdout).unwrap_or_default();
    String::from_utf8_lossy(&out).split_whitespace().filter_map(|p| p.parse().ok()).collect()
}

fn signal_all(ns: &str, sig: i32) -> usize {
    // Not this process, which may have entered the namespace itself (a bench's main thread).
    let me = std::process::id() as i32;
    let pids: Vec<i32> = ns_pids(ns).into_iter().filter(|p| *p != me).collect();
    for p in &pids {
        // SAFETY: signalling processes of the test's own namespace.
        unsafe { libc::kill(*p, sig) };
    }
    pids.len()
}

fn end_namespace(ns: &str) {
    let me = std::process::id() as i32;
    if signal_all(ns, libc::SIGTERM) > 0 {
        let deadline = Instant::now() + Duration::from_secs(3);
        while ns_pids(ns).iter().any(|p| *p != me) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        signal_all(ns, libc::SIGKILL);
    }
}

/// Jails killed with SIGKILL cannot remove their cgroups: the tests do, once they are empty.
pub fn remove_empty_jail_cgroups() {
    for root in [
        "/sys/fs/cgroup",
        "/sys/fs/cgroup/unified",
        "/sys/fs/cgroup/cpu",
        "/sys/fs/cgroup/memory",
        "/sys/fs/cgroup/pids",
    ] {
        let Ok(rd) = std::fs::read_dir(format!("{root}/shoal-vmm")) else { continue };
        for e in rd.filter_map(|e| e.ok()) {
            let name = e.file_name().to_string_lossy().to_string();
            let empty = std::fs::read_to_string(e.path().join("cgroup.procs")).is_ok_and(|p| p.trim().is_empty());
            if name.starts_with("shoal-") && empty {
                let _ = std::fs::remove_dir(e.path());
            }
        }
    }
}

/// The command line of a process, with NULs as spaces.
pub fn cmdline(pid: i32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .unwrap_or_default()
}

fn uid_of(pid: i32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|u| u.parse().ok())
}

/// The shoal-vmm binary the nodes run: $SHOAL_VMM, else the one built beside shoal-node.
pub fn vmm_binary() -> String {
    std::env::var("SHOAL_VMM").unwrap_or_else(|_| {
        let node = std::path::Path::new(env!("CARGO_BIN_EXE_shoal-node"));
        node.with_file_name("shoal-vmm").to_string_lossy().to_string()
    })
}

pub struct Node {
    pub i: usize,
    pub ns: String,
    pub data_dir: PathBuf,
    args: Vec<String>,
    child: Option<Child>,
    token: String,
}

impl Node {
    pub fn addr(&self) -> String {
        format!("10.88.0.{}:{PORT}", self.i + 1)
    }

    pub fn start(&mut self) {
        assert!(self.child.is_none());
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.data_dir.join("agent.log")).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_shoal-node"));
        cmd.args(&self.args).stdin(Stdio::null()).stdout(log.try_clone().unwrap()).stderr(log);
        let netns = in_netns(&mut cmd, &self.ns);
        let child = cmd.spawn().expect("shoal-node starts");
        drop(netns);
        self.child = Some(child);
        let token_file = self.data_dir.join("api-token");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !token_file.exists() {
            assert!(Instant::now() < deadline, "node {} wrote no api-token; log:\n{}", self.i, self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(20));
        self.token = std::fs::read_to_string(token_file).unwrap().trim().to_string();
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The whole node dies at once: its agent and every microVM it runs (kill -9 of every
    /// process in its namespace), as when a server loses power.
    pub fn kill_node(&mut self) {
        signal_all(&self.ns, libc::SIGKILL);
        self.kill9();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !ns_pids(&self.ns).is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The pids of the jailed VMM processes (the unprivileged side of each jail: one per
    /// microVM running on this node).
    pub fn vm_pids(&self) -> Vec<i32> {
        let mut pids: Vec<i32> = ns_pids(&self.ns)
            .into_iter()
            .filter(|p| cmdline(*p).contains("shoal-vmm") && uid_of(*p).is_some_and(|u| u != 0))
            .collect();
        pids.sort();
        pids
    }

    /// The agent's own pid.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// POST a file's bytes to /v1/images; returns the digest.
    pub fn upload(&self, path: &std::path::Path) -> String {
        let bytes = std::fs::read(path).unwrap();
        let res = self
            .agent()
            .post(&self.url("/v1/images"))
            .set("Authorization", &format!("Bearer {}", self.token))
            .send_bytes(&bytes)
            .unwrap_or_else(|e| panic!("image upload to node {}: {e}", self.i));
        let v: Value = res.into_json().unwrap();
        v["digest"].as_str().unwrap().to_string()
    }

    /// A request with a JSON body, retried while the cluster answers 503 (an election).
    pub fn send(&self, method: &str, path: &str, body: &Value) -> (u16, Value) {
        let text = body.to_string();
        wait_for(Duration::from_secs(20), &format!("{method} {path} to be answered"), || {
            match self.call(method, path, Some(&text)) {
                Ok((503, _)) | Err(_) => None,
                Ok(r) => Some(r),
            }
        })
    }

    /// GET, retried while the cluster answers 503.
    pub fn get_ok(&self, path: &str) -> Value {
        wait_for(Duration::from_secs(20), &format!("GET {path}"), || match self.get(path) {
            Ok((200, v)) => Some(v),
            _ => None,
        })
    }

    /// GET as text (a console), with this node's token.
    pub fn get_text(&self, path: &str) -> Result<(u16, String), String> {
        let req = self.agent().get(&self.url(path)).set("Authorization", &format!("Bearer {}", self.token));
        match req.call() {
            Ok(r) => Ok((r.status(), r.into_string().unwrap_or_default())),
            Err(ureq::Error::Status(code, r)) => Ok((code, r.into_string().unwrap_or_default())),
            Err(e) => Err(e.to_string()),
        }
    }

    /// SIGTERM and wait: an orderly stop.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: signalling our own child by pid.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
    }

    /// The agent's exit status once it has ended by itself (`Some(None)`: killed by a signal).
    pub fn try_wait(&mut self) -> Option<Option<i32>> {
        let status = self.child.as_mut()?.try_wait().ok()??;
        self.child = None;
        Some(status.code())
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data_dir.join("agent.log")).unwrap_or_default()
    }

    pub fn id(&self) -> String {
        std::fs::read_to_string(self.data_dir.join("node-id")).unwrap_or_default().trim().to_string()
    }

    pub fn token(&self) -> &str {
        &self.token
    }

    /// An HTTPS client that trusts the CAs this test's nodes wrote (the cluster CA, and each
    /// unjoined node's provisional one), as a user's client trusts `DATA_DIR/tls/ca.crt`.
    pub fn agent(&self) -> ureq::Agent {
        let mut b = ureq::AgentBuilder::new().timeout(Duration::from_secs(5));
        if let Some(tls) = trust(self.data_dir.parent().unwrap()) {
            b = b.tls_config(std::sync::Arc::new(tls));
        }
        b.build()
    }

    pub fn url(&self, path: &str) -> String {
        format!("https://{}{path}", self.addr())
    }

    /// The cluster CA file this node wrote once it joined.
    pub fn ca_file(&self) -> PathBuf {
        self.data_dir.join("tls/ca.crt")
    }

    /// GET with this node's token: (status, body as JSON or null).
    pub fn get(&self, path: &str) -> Result<(u16, Value), String> {
        self.call("GET", path, None)
    }

    pub fn call(&self, method: &str, path: &str, body: Option<&str>) -> Result<(u16, Value), String> {
        let req = self.agent().request(method, &self.url(path)).set("Authorization", &format!("Bearer {}", self.token));
        let res = match body {
            Some(b) => req.send_string(b),
            None => req.call(),
        };
        match res {
            Ok(r) => {
                let code = r.status();
                Ok((code, r.into_json().unwrap_or(Value::Null)))
            }
            Err(ureq::Error::Status(code, r)) => Ok((code, r.into_json().unwrap_or(Value::Null))),
            Err(e) => Err(e.to_string()),
        }
    }

    pub fn status(&self) -> Option<Value> {
        match self.get("/v1/cluster/status") {
            Ok((200, v)) => Some(v),
            _ => None,
        }
    }

    /// Writes a key; Ok(revision) or Err((status, body)).
    pub fn put(&self, key: &str, value: &str) -> Result<u64, (u16, Value)> {
        match self.call("PUT", &format!("/v1/kv/{key}"), Some(value)) {
            Ok((200, v)) => Ok(v["revision"].as_u64().unwrap_or(0)),
            Ok((code, v)) => Err((code, v)),
            Err(e) => Err((0, Value::String(e))),
        }
    }

    /// Reads a key (linearizable): Ok(Some(value)), Ok(None) when absent, Err otherwise.
    pub fn read(&self, key: &str) -> Result<Option<String>, (u16, Value)> {
        match self.get(&format!("/v1/kv/{key}")) {
            Ok((200, v)) => Ok(v["kv"]["value"].as_str().map(str::to_string)),
            Ok((404, _)) => Ok(None),
            Ok((code, v)) => Err((code, v)),
            Err(e) => Err((0, Value::String(e))),
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Polls `f` until it returns Some, or panics after `timeout` with `what`.
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The status every given running node agrees on: one leader, the same voters and learners.
pub fn agreed_status(nodes: &[&Node]) -> Option<Value> {
    let statuses: Vec<Value> = nodes.iter().map(|n| n.status()).collect::<Option<_>>()?;
    let first = &statuses[0];
    if first["leader_id"].is_null() || first["cluster_id"].as_str().unwrap_or("").is_empty() {
        return None;
    }
    let same = statuses.iter().all(|s| {
        s["leader_id"] == first["leader_id"]
            && s["cluster_id"] == first["cluster_id"]
            && sorted(&s["voters"]) == sorted(&first["voters"])
            && sorted(&s["learners"]) == sorted(&first["learners"])
    });
    same.then(|| first.clone())
}

pub fn sorted(v: &Value) -> Vec<String> {
    let mut out: Vec<String> =
        v.as_array().map(|a| a.iter().filter_map(|x| x.as_str().map(str::to_string)).collect()).unwrap_or_default();
    out.sort();
    out
}

/// Dumps every node's log tail, for failure messages.
pub fn logs(nodes: &[&Node]) -> String {
    nodes
        .iter()
        .map(|n| {
            let log = n.log();
            let tail: Vec<&str> = log.lines().rev().take(25).collect::<Vec<_>>().into_iter().rev().collect();
            format!("--- node {} ({}):\n{}", n.i, n.id(), tail.join("\n"))
        })
        .collect::<Vec<_>>()
        .join("\n")
}
