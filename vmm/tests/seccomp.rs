//! seccomp is in force on every thread kind: with the test-only hook
//! (SHOAL_VMM_SECCOMP_SELFTEST=<kind>), a thread of that kind makes one system call outside its
//! list right after installing its filter, and the whole process dies of SIGSYS. The rest of
//! the suite runs with the filters on, so the lists are also shown to be sufficient.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod common;

use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{kvm_available, probe, vmm};

fn killed_by_sigsys(kind: &str, args: &[&str]) {
    let mut child = Command::new(vmm())
        .args(args)
        .env("SHOAL_VMM_SECCOMP_SELFTEST", kind)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            panic!("{kind}: shoal-vmm was not killed");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(status.signal(), Some(libc::SIGSYS), "{kind}: {status:?}");
}

#[test]
fn a_forbidden_syscall_on_any_thread_kills_the_process() {
    if !kvm_available() {
        return;
    }
    let boot = probe("boot").to_str().unwrap();
    killed_by_sigsys("vcpu", &["--kernel", boot]);
    killed_by_sigsys("vmm", &["--kernel", boot]);
    let sock = std::env::temp_dir().join(format!("shoal-seccomp-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&sock);
    killed_by_sigsys("api", &["--api-sock", sock.to_str().unwrap()]);
    let _ = std::fs::remove_file(&sock);
}

#[test]
fn without_the_hook_the_same_runs_end_normally_and_no_seccomp_turns_filters_off() {
    if !kvm_available() {
        return;
    }
    let boot = probe("boot").to_str().unwrap();
    let out = Command::new(vmm()).args(["--kernel", boot]).output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let out = Command::new(vmm())
        .args(["--kernel", boot, "--no-seccomp"])
        .env("SHOAL_VMM_SECCOMP_SELFTEST", "vcpu")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "no filter, so the hook's call is harmless");
}
