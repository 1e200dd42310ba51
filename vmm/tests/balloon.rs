//! virtio-balloon on KVM with the balloon probe (a minimal balloon driver): the guest touches
//! 32 MiB, the host sets a 32 MiB target through Firecracker's PATCH /balloon, the guest hands
//! those pages over, and the VMM's resident memory drops by them; the guest's statistics reach
//! GET /balloon/statistics, and the device asks for new ones every polling interval.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod common;

use std::time::{Duration, Instant};

use common::api::{call, fault, Console, Vmm};
use common::{kvm_available, probe};

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn wait_for(console: &Console, text: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !console.text().contains(text) {
        assert!(Instant::now() < deadline, "no `{text}` within 60 s; console:\n{}", console.text());
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn stats(vm: &Vmm) -> serde_json::Value {
    let (st, body) = call(&mut vm.connect(), "GET", "/balloon/statistics", "");
    assert_eq!(st, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

#[test]
fn an_inflated_balloon_gives_the_guests_pages_back_to_the_host_and_statistics_arrive() {
    if !kvm_available() {
        return;
    }
    let mut vm = Vmm::start("balloon");
    let console = Console::capture(&mut vm.child);
    let mut s = vm.connect();
    assert_eq!(call(&mut s, "PUT", "/machine-config", r#"{"vcpu_count": 1, "mem_size_mib": 128}"#).0, 204);
    let boot = format!(r#"{{"kernel_image_path": "{}"}}"#, probe("balloon").display());
    assert_eq!(call(&mut s, "PUT", "/boot-source", &boot).0, 204);
    let (st, body) = call(&mut s, "PUT", "/balloon", r#"{"amount_mib": 512, "deflate_on_oom": false}"#);
    assert!(st == 400 && fault(&body).contains("too large"), "{body}");
    let balloon = r#"{"amount_mib": 0, "deflate_on_oom": true, "stats_polling_interval_s": 1}"#;
    assert_eq!(call(&mut s, "PUT", "/balloon", balloon).0, 204);
    assert_eq!(call(&mut s, "GET", "/balloon/statistics", "").0, 400, "no statistics before the start");
    assert_eq!(call(&mut s, "PUT", "/actions", r#"{"action_type": "InstanceStart"}"#).0, 204);

    wait_for(&console, "balloon stats round=1\n");
    let before = rss_kib(vm.child.id());
    let first = stats(&vm);
    assert_eq!((first["free_memory"].as_u64(), first["total_memory"].as_u64()), (Some(111_000_000), Some(128 << 20)));
    assert_eq!((first["target_pages"].as_u64(), first["actual_pages"].as_u64()), (Some(0), Some(0)));

    assert_eq!(call(&mut s, "PATCH", "/balloon", r#"{"amount_mib": 32}"#), (204, String::new()));
    wait_for(&console, "balloon inflated pages=8192 zero=1\n");
    let after = rss_kib(vm.child.id());
    assert!(before.saturating_sub(after) >= 24 << 10, "the VMM's RSS went from {before} KiB to {after} KiB");
    let now = stats(&vm);
    assert_eq!((now["target_mib"].as_u64(), now["actual_mib"].as_u64()), (Some(32), Some(32)));
    assert_eq!(now["actual_pages"].as_u64(), Some(8192));

    // One interval later the device hands the buffer back and the driver reports again.
    wait_for(&console, "balloon stats round=2\n");
    let deadline = Instant::now() + Duration::from_secs(10);
    while stats(&vm)["free_memory"].as_u64() != Some(222_000_000) {
        assert!(Instant::now() < deadline, "the second statistics never arrived: {}", stats(&vm));
        std::thread::sleep(Duration::from_millis(50));
    }
    let (st, config) = call(&mut s, "GET", "/balloon", "");
    assert!(st == 200 && config.contains("\"amount_mib\":32"), "{config}");
    let (st, body) = call(&mut s, "PATCH", "/balloon/statistics", r#"{"stats_polling_interval_s": 0}"#);
    assert!(st == 400 && fault(&body).contains("cannot be turned on or off"), "{body}");
    assert_eq!(call(&mut s, "PATCH", "/balloon/statistics", r#"{"stats_polling_interval_s": 2}"#).0, 204);
    let (st, body) = call(&mut s, "PATCH", "/balloon", r#"{"amount_mib": 4096}"#);
    assert!(st == 400 && fault(&body).contains("too large"), "{body}");
    println!("balloon_rss_before_kib={before} balloon_rss_after_kib={after}");
}
