//! MMDS's guest-facing endpoint against a real Linux TCP/IP stack: a tap whose other end is a
//! network namespace, where the kernel plays the guest and curl is the guest's program. The
//! test process runs the endpoint on the tap's frames (what the VMM does with a guest's
//! frames on an MMDS interface), so ARP, TCP (handshake, segments, windows, FIN), HTTP, the
//! IMDS and JSON formats and V2 session tokens are all checked by the client everyone uses.
//! Root is needed for the namespace (as for the other namespace tests).

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use shoal_vmm::devices::virtio::net::mmds::stack::MmdsStack;
use shoal_vmm::devices::virtio::net::mmds::store::{MmdsStore, MmdsVersion, DEFAULT_SIZE_LIMIT};
use shoal_vmm::devices::virtio::net::tap::{NetBackend, Tap};

struct Guest {
    ns: String,
    stop: Arc<AtomicBool>,
    pump: Option<std::thread::JoinHandle<()>>,
}

impl Guest {
    /// A namespace at 169.254.0.2/16 behind a tap served by an MMDS endpoint on `store`.
    fn start(store: Arc<Mutex<MmdsStore>>) -> Option<Guest> {
        let pid = std::process::id();
        let (ns, tap) = (format!("shoal-mmds-{pid}"), format!("shmmds{}", pid % 100_000));
        let ip = |args: &[&str]| Command::new("ip").args(args).status().map(|s| s.success()).unwrap_or(false);
        let _ = Command::new("ip").args(["netns", "del", &ns]).stderr(Stdio::null()).status();
        if !ip(&["netns", "add", &ns]) {
            assert!(
                std::env::var_os("SHOAL_SKIP_NETNS_TESTS").is_some(),
                "cannot create a network namespace (run as root, or set SHOAL_SKIP_NETNS_TESTS=1)"
            );
            return None;
        }
        assert!(ip(&["tuntap", "add", "dev", &tap, "mode", "tap"]));
        let mut dev = Tap::open(&tap).unwrap();
        // The open descriptor stays the tap's after it moves into the namespace.
        assert!(ip(&["link", "set", &tap, "netns", &ns]));
        let _ = Command::new("ip")
            .args(["netns", "exec", &ns, "sh", "-c", "echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6"])
            .status();
        assert!(ip(&["-n", &ns, "link", "set", "lo", "up"]));
        assert!(ip(&["-n", &ns, "addr", "add", "169.254.0.2/16", "dev", &tap]));
        assert!(ip(&["-n", &ns, "link", "set", &tap, "up"]));
        let stop = Arc::new(AtomicBool::new(false));
        let halt = stop.clone();
        let pump = std::thread::spawn(move || {
            let mut stack = MmdsStack::new([169, 254, 169, 254], store);
            let mut buf = vec![0u8; 70000];
            while !halt.load(Ordering::Relaxed) {
                let mut fds = [libc::pollfd { fd: dev.raw_fd().unwrap(), events: libc::POLLIN, revents: 0 }];
                // SAFETY: one valid pollfd, for 20 ms.
                unsafe { libc::poll(fds.as_mut_ptr(), 1, 20) };
                while let Ok(n) = dev.read_frame(&mut buf) {
                    stack.intercept(&buf[..n]);
                }
                while let Some(frame) = stack.next_frame() {
                    dev.write_frame(&frame).unwrap();
                }
            }
        });
        Some(Guest { ns, stop, pump: Some(pump) })
    }

    /// curl in the namespace: (HTTP status, body).
    fn curl(&self, args: &[&str]) -> (u16, String) {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns, "curl", "-s", "-m", "20", "-w", "\n%{http_code}"])
            .args(args)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().parse().unwrap_or(0), body.to_string())
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(p) = self.pump.take() {
            let _ = p.join();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

const BASE: &str = "http://169.254.169.254";

#[test]
fn curl_in_a_linux_guest_reads_its_metadata_with_v1_and_v2() {
    let mut store = MmdsStore::new(DEFAULT_SIZE_LIMIT);
    let big = "x".repeat(40_000);
    store
        .put(
            serde_json::json!({"latest": {"meta-data": {"instance-id": "i-42", "local-ipv4": "10.0.0.2"}}, "big": big}),
        )
        .unwrap();
    let store = Arc::new(Mutex::new(store));
    let Some(guest) = Guest::start(store.clone()) else { return };

    assert_eq!(guest.curl(&[&format!("{BASE}/latest/meta-data/instance-id")]), (200, "i-42".into()));
    assert_eq!(guest.curl(&[&format!("{BASE}/latest/meta-data/")]), (200, "instance-id\nlocal-ipv4".into()));
    let (st, json) = guest.curl(&["-H", "Accept: application/json", &format!("{BASE}/latest")]);
    assert_eq!(st, 200);
    assert_eq!(serde_json::from_str::<serde_json::Value>(&json).unwrap()["meta-data"]["local-ipv4"], "10.0.0.2");
    assert_eq!(guest.curl(&[&format!("{BASE}/latest/nothing")]).0, 404);
    // 40 KB: many segments, more than one window of the guest's.
    assert_eq!(guest.curl(&[&format!("{BASE}/big")]), (200, big.clone()));
    // Two requests on one keep-alive connection: the second makes no new connection.
    let out = Command::new("ip")
        .args(["netns", "exec", &guest.ns, "curl", "-s", "-m", "20", "-w", " connects=%{num_connects}\n"])
        .args([format!("{BASE}/latest/meta-data/instance-id"), format!("{BASE}/latest/meta-data/local-ipv4")])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "i-42 connects=1\n10.0.0.2 connects=0\n");
    // The operator's PATCH shows at once.
    store.lock().unwrap().patch(&serde_json::json!({"latest": {"meta-data": {"instance-id": "i-43"}}})).unwrap();
    assert_eq!(guest.curl(&[&format!("{BASE}/latest/meta-data/instance-id")]), (200, "i-43".into()));

    // V2: no token, a forged one: 401. A session token opens it.
    store.lock().unwrap().set_version(MmdsVersion::V2);
    assert_eq!(guest.curl(&[&format!("{BASE}/latest/meta-data/instance-id")]).0, 401);
    assert_eq!(guest.curl(&["-H", "X-metadata-token: forged", &format!("{BASE}/latest/meta-data/instance-id")]).0, 401);
    let (st, token) =
        guest.curl(&["-X", "PUT", "-H", "X-metadata-token-ttl-seconds: 60", &format!("{BASE}/latest/api/token")]);
    assert_eq!((st, token.len()), (200, 48), "{token}");
    let auth = format!("X-metadata-token: {token}");
    assert_eq!(guest.curl(&["-H", &auth, &format!("{BASE}/latest/meta-data/instance-id")]), (200, "i-43".into()));
}
