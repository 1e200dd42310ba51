//! The control API over its Unix socket, driven like a Firecracker client: requests copied from
//! Firecracker's getting-started guide (with our kernel path) configure and start the boot
//! probe; bad requests get a 4xx with a fault_message and leave the VMM serving.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{kvm_available, probe, text, vmm};

struct Vmm {
    child: Child,
    sock: PathBuf,
}

impl Vmm {
    fn start(tag: &str) -> Vmm {
        let sock = std::env::temp_dir().join(format!("shoal-api-{tag}-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&sock);
        let child = Command::new(vmm()).arg("--api-sock").arg(&sock).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        let start = Instant::now();
        while !sock.exists() {
            assert!(start.elapsed() < Duration::from_secs(10), "API socket never appeared");
            std::thread::sleep(Duration::from_millis(5));
        }
        Vmm { child, sock }
    }

    fn connect(&self) -> UnixStream {
        let s = UnixStream::connect(&self.sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s
    }

    fn wait(mut self) -> (Option<i32>, String, String) {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                let mut out = String::new();
                let mut err = String::new();
                self.child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
                self.child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
                return (status.code(), out, err);
            }
            assert!(start.elapsed() < Duration::from_secs(60), "shoal-vmm did not exit");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.sock);
    }
}

/// Sends one request on `s` and reads one response: (status, body).
fn call(s: &mut UnixStream, method: &str, path: &str, body: &str) -> (u16, String) {
    let req = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len());
    s.write_all(req.as_bytes()).unwrap();
    read_response(s)
}

fn read_response(s: &mut UnixStream) -> (u16, String) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
            let len: usize = head.lines().find_map(|l| l.strip_prefix("Content-Length: ")).map(|v| v.trim().parse().unwrap()).unwrap_or(0);
            if buf.len() >= end + 4 + len {
                return (status, String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).to_string());
            }
        }
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0, "connection closed before a full response: {}", String::from_utf8_lossy(&buf));
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn fault(body: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    v["fault_message"].as_str().unwrap().to_string()
}

#[test]
fn firecracker_style_client_configures_and_starts_the_boot_probe() {
    if !kvm_available() {
        return;
    }
    let vm = Vmm::start("start");
    let mut s = vm.connect();
    let (st, body) = call(&mut s, "GET", "/", "");
    assert_eq!(st, 200);
    let info: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(info["state"], "Not started");
    // The requests of Firecracker's getting-started guide, kernel path aside.
    let kernel = probe("boot").display().to_string();
    let boot = format!(r#"{{"kernel_image_path": "{kernel}", "boot_args": "console=ttyS0 reboot=k panic=1 pci=off"}}"#);
    assert_eq!(call(&mut s, "PUT", "/boot-source", &boot), (204, String::new()));
    assert_eq!(call(&mut s, "PUT", "/machine-config", r#"{"vcpu_count": 2, "mem_size_mib": 1024}"#).0, 204);
    let (st, body) = call(&mut s, "GET", "/machine-config", "");
    assert_eq!(st, 200);
    assert!(body.contains("\"vcpu_count\":2") && body.contains("\"mem_size_mib\":1024"), "{body}");
    assert_eq!(call(&mut s, "PUT", "/actions", r#"{"action_type": "InstanceStart"}"#), (204, String::new()));
    let (code, out, err) = vm.wait();
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.lines().any(|l| l == "cmdline: console=ttyS0 reboot=k panic=1 pci=off"), "{out}");
    assert!(out.contains(&format!("ram_kib={}", 639 + 1023 * 1024)), "1024 MiB guest: {out}");
}

#[test]
fn bad_requests_get_4xx_and_the_vmm_keeps_serving() {
    let vm = Vmm::start("bad");
    let mut s = vm.connect();
    for (method, path, body, status) in [
        ("PUT", "/machine-config", "{\"vcpu_count\": ", 400),
        ("PUT", "/machine-config", r#"{"vcpu_count": 2, "mem_size_mib": 64, "cpu_count": 1}"#, 400),
        ("PUT", "/machine-config", r#"{"vcpu_count": 0, "mem_size_mib": 64}"#, 400),
        ("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#, 400),
        ("PATCH", "/boot-source", "{}", 400),
        ("GET", "/no-such-resource", "", 400),
    ] {
        let (st, b) = call(&mut s, method, path, body);
        assert_eq!(st, status, "{method} {path} {body}: {b}");
        assert!(!fault(&b).is_empty());
    }
    // A start that fails in the VMM (no such kernel) is a 400 and nothing starts.
    let (st, b) = call(&mut s, "PUT", "/boot-source", r#"{"kernel_image_path": "/nonexistent/vmlinux"}"#);
    assert_eq!(st, 204, "{b}");
    let (st, b) = call(&mut s, "PUT", "/actions", r#"{"action_type": "InstanceStart"}"#);
    assert_eq!(st, 400);
    assert!(fault(&b).contains("cannot open kernel /nonexistent/vmlinux"), "{b}");

    // Oversized body: 413 and the connection is closed.
    let mut big = vm.connect();
    let req = format!("PUT /machine-config HTTP/1.1\r\nContent-Length: {}\r\n\r\n", 1 << 20);
    big.write_all(req.as_bytes()).unwrap();
    assert_eq!(read_response(&mut big).0, 413);
    // A client that sends half a request and goes away.
    {
        let mut half = vm.connect();
        half.write_all(b"PUT /machine-config HTTP/1.1\r\nContent-Length: 50\r\n\r\n{\"vcpu").unwrap();
    }
    // Garbage that is not HTTP.
    let mut junk = vm.connect();
    junk.write_all(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n").unwrap();
    assert_eq!(read_response(&mut junk).0, 400);

    let mut again = vm.connect();
    let (st, body) = call(&mut again, "GET", "/", "");
    assert_eq!(st, 200, "still serving: {body}");
    assert!(body.contains("Not started"));
}

#[test]
fn an_existing_socket_path_is_refused() {
    let path = std::env::temp_dir().join(format!("shoal-api-exists-{}.sock", std::process::id()));
    std::fs::write(&path, b"").unwrap();
    let out = Command::new(vmm()).arg("--api-sock").arg(&path).output().unwrap();
    std::fs::remove_file(&path).unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("already exists"), "{}", text(&out.stderr));
}

/// Lines of the VM's stdout, as they arrive.
fn stdout_lines(child: &mut Child) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead;
    let out = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn count_of(line: &str) -> Option<u64> {
    line.strip_prefix("count=").and_then(|v| v.parse().ok())
}

/// Waits for a `count=N` line with N >= `at_least`; returns N.
fn wait_count(lines: &std::sync::mpsc::Receiver<String>, at_least: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(line) = lines.recv_timeout(Duration::from_millis(100)) {
            if let Some(n) = count_of(&line).filter(|n| *n >= at_least) {
                return n;
            }
        }
    }
    panic!("no count >= {at_least} within 30 s");
}

#[test]
fn pause_stops_the_guest_and_resume_continues_it() {
    if !kvm_available() {
        return;
    }
    let mut vm = Vmm::start("pause");
    let lines = stdout_lines(&mut vm.child);
    let mut s = vm.connect();
    let boot = format!(r#"{{"kernel_image_path": "{}"}}"#, probe("counter").display());
    assert_eq!(call(&mut s, "PUT", "/boot-source", &boot).0, 204);
    // Two vCPUs: the second never gets a SIPI from this probe and must still acknowledge.
    assert_eq!(call(&mut s, "PUT", "/machine-config", r#"{"vcpu_count": 2, "mem_size_mib": 64}"#).0, 204);
    assert_eq!(call(&mut s, "PUT", "/actions", r#"{"action_type": "InstanceStart"}"#).0, 204);
    assert!(call(&mut s, "GET", "/", "").1.contains("\"state\":\"Running\""));
    wait_count(&lines, 2);

    assert_eq!(call(&mut s, "PATCH", "/vm", r#"{"state": "Paused"}"#), (204, String::new()));
    assert!(call(&mut s, "GET", "/", "").1.contains("\"state\":\"Paused\""));
    // Whatever was printed before the pause took effect drains; then nothing may arrive.
    let mut last = 0;
    while let Ok(line) = lines.recv_timeout(Duration::from_millis(300)) {
        last = count_of(&line).unwrap_or(last);
    }
    std::thread::sleep(Duration::from_millis(700));
    let during: Vec<String> = lines.try_iter().collect();
    assert!(during.is_empty(), "the paused guest printed {during:?}");

    assert_eq!(call(&mut s, "PATCH", "/vm", r#"{"state": "Resumed"}"#), (204, String::new()));
    assert!(call(&mut s, "GET", "/", "").1.contains("\"state\":\"Running\""));
    let next = wait_count(&lines, last + 1);
    assert!(next > last);
    // Pausing twice or resuming a running VM is harmless.
    assert_eq!(call(&mut s, "PATCH", "/vm", r#"{"state": "Resumed"}"#).0, 204);
    assert_eq!(call(&mut s, "PATCH", "/vm", r#"{"state": "Paused"}"#).0, 204);
    assert_eq!(call(&mut s, "PATCH", "/vm", r#"{"state": "Paused"}"#).0, 204);
    assert_eq!(call(&mut s, "PATCH", "/vm", r#"{"state": "Resumed"}"#).0, 204);
    wait_count(&lines, next + 1);
}
