//! A `shoal-vmm --api-sock` process and a minimal HTTP client for its API.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::vmm;

pub struct Vmm {
    pub child: Child,
    pub sock: PathBuf,
}

impl Vmm {
    pub fn start(tag: &str) -> Vmm {
        Vmm::start_in(tag, &std::env::temp_dir())
    }

    /// Starts with `dir` as the working directory (relative paths in requests resolve there).
    pub fn start_in(tag: &str, dir: &Path) -> Vmm {
        Vmm::start_with(tag, dir, &[])
    }

    /// Starts with extra command-line arguments.
    pub fn start_with(tag: &str, dir: &Path, args: &[&str]) -> Vmm {
        let sock = std::env::temp_dir().join(format!("shoal-api-{tag}-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&sock);
        let child = Command::new(vmm())
            .current_dir(dir)
            .arg("--api-sock")
            .arg(&sock)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let start = Instant::now();
        while !sock.exists() {
            assert!(start.elapsed() < Duration::from_secs(10), "API socket never appeared");
            std::thread::sleep(Duration::from_millis(5));
        }
        Vmm { child, sock }
    }

    pub fn connect(&self) -> UnixStream {
        let s = UnixStream::connect(&self.sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s
    }

    pub fn wait(mut self) -> (Option<i32>, String, String) {
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
pub fn call(s: &mut UnixStream, method: &str, path: &str, body: &str) -> (u16, String) {
    let req = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len());
    s.write_all(req.as_bytes()).unwrap();
    read_response(s)
}

pub fn read_response(s: &mut UnixStream) -> (u16, String) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("Content-Length: "))
                .map(|v| v.trim().parse().unwrap())
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                return (status, String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).to_string());
            }
        }
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0, "connection closed before a full response: {}", String::from_utf8_lossy(&buf));
        buf.extend_from_slice(&chunk[..n]);
    }
}

pub fn fault(body: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    v["fault_message"].as_str().unwrap().to_string()
}

/// Lines of the VM's stdout, as they arrive.
pub fn stdout_lines(child: &mut Child) -> std::sync::mpsc::Receiver<String> {
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

pub fn count_of(line: &str) -> Option<u64> {
    line.strip_prefix("count=").and_then(|v| v.parse().ok())
}

/// Waits for a `count=N` line with N >= `at_least`; returns N.
pub fn wait_count(lines: &std::sync::mpsc::Receiver<String>, at_least: u64) -> u64 {
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

/// A guest console captured byte by byte (partial lines included), as it arrives.
#[derive(Clone)]
pub struct Console(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl Console {
    pub fn capture(child: &mut Child) -> Console {
        let mut out = child.stdout.take().unwrap();
        let buf = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let b = buf.clone();
        std::thread::spawn(move || {
            let mut chunk = [0u8; 4096];
            while let Ok(n) = out.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                b.lock().unwrap().extend_from_slice(&chunk[..n]);
            }
        });
        Console(buf)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    /// The highest `count=N` seen in complete lines.
    pub fn last_count(&self) -> Option<u64> {
        let text = self.text();
        let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
        complete.lines().filter_map(count_of).max()
    }

    /// Waits until a complete `count=N` line with N >= `at_least` arrived; returns N.
    pub fn wait_count(&self, at_least: u64) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(n) = self.last_count().filter(|n| *n >= at_least) {
                return n;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("no count >= {at_least} within 30 s; console:\n{}", self.text());
    }

    /// Waits until nothing new has arrived for `quiet`; returns the text.
    pub fn settle(&self, quiet: Duration) -> String {
        let mut len = self.0.lock().unwrap().len();
        loop {
            std::thread::sleep(quiet);
            let now = self.0.lock().unwrap().len();
            if now == len {
                return self.text();
            }
            len = now;
        }
    }
}

/// The counts in a counter probe's console text, checked to go up by exactly one each line
/// (the text may begin with the probe's start line; its vsock lines are skipped).
pub fn consecutive_counts(text: &str) -> Result<Vec<u64>, String> {
    let mut counts = Vec::new();
    for line in text.lines() {
        if line.starts_with("SHOAL-PROBE counter") || line.starts_with("vsock ") {
            continue;
        }
        let Some(n) = count_of(line) else { return Err(format!("unexpected console line {line:?} in:\n{text}")) };
        if let Some(prev) = counts.last() {
            if n != prev + 1 {
                return Err(format!("count went from {prev} to {n} in:\n{text}"));
            }
        }
        counts.push(n);
    }
    Ok(counts)
}
