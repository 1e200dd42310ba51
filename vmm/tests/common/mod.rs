//! Helpers for tests that run the `shoal-vmm` binary.
#![allow(dead_code)]

pub mod api;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

pub fn vmm() -> &'static str {
    env!("CARGO_BIN_EXE_shoal-vmm")
}

pub fn probe(name: &str) -> &'static Path {
    shoal_probe_guest::path(name).expect("known probe")
}

/// KVM tests need /dev/kvm. Without it they fail, unless SHOAL_SKIP_KVM_TESTS=1 says that is
/// expected on this machine (then they return false and the caller returns early).
pub fn kvm_available() -> bool {
    if Path::new("/dev/kvm").exists() {
        return true;
    }
    assert!(
        std::env::var_os("SHOAL_SKIP_KVM_TESTS").is_some(),
        "/dev/kvm is missing (set SHOAL_SKIP_KVM_TESTS=1 to skip KVM tests)"
    );
    false
}

/// The guest kernel directory from `make guest-kernel` (SHOAL_GUEST_DIR, or target/guest).
pub fn guest_file(name: &str) -> PathBuf {
    let dir = std::env::var_os("SHOAL_GUEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/guest"));
    let path = dir.join(name);
    assert!(path.exists(), "{} is missing: run `make guest-kernel` first", path.display());
    path
}

/// Runs shoal-vmm to completion, killing it after `limit`.
pub fn run_vmm(args: &[&str], limit: Duration) -> Output {
    let mut child = Command::new(vmm())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn shoal-vmm");
    let start = Instant::now();
    loop {
        if child.try_wait().expect("wait").is_some() {
            break;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().expect("collect output");
            panic!(
                "shoal-vmm {:?} did not finish within {:?}\nstdout:\n{}\nstderr:\n{}",
                args,
                limit,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().expect("collect output")
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A running shoal-vmm whose stdout lines arrive on a channel.
pub struct Running {
    pub child: Child,
    pub lines: Receiver<String>,
}

pub fn spawn_vmm(args: &[&str]) -> Running {
    let mut child = Command::new(vmm())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn shoal-vmm");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    Running { child, lines: rx }
}

impl Running {
    /// Collects lines until `done` says so or `limit` passes; returns every line seen.
    pub fn wait_for(&self, limit: Duration, mut done: impl FnMut(&[String]) -> bool) -> (bool, Vec<String>) {
        let deadline = Instant::now() + limit;
        let mut seen = Vec::new();
        while Instant::now() < deadline {
            match self.lines.recv_timeout(Duration::from_millis(100)) {
                Ok(line) => {
                    seen.push(line);
                    if done(&seen) {
                        return (true, seen);
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        let ok = done(&seen);
        (ok, seen)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
