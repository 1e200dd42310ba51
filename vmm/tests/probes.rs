//! KVM tests with probe guests: what a user sees when shoal-vmm boots a kernel.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{kvm_available, probe, run_vmm, text};

const LIMIT: Duration = Duration::from_secs(60);

fn field(stdout: &str, line_prefix: &str, key: &str) -> Option<u64> {
    let line = stdout.lines().find(|l| l.starts_with(line_prefix))?;
    let v = line.split_whitespace().find_map(|w| w.strip_prefix(key))?;
    v.parse().ok()
}

#[test]
fn boot_probe_prints_marker_and_command_line_then_exits_0() {
    if !kvm_available() {
        return;
    }
    let out = run_vmm(&["--kernel", probe("boot").to_str().unwrap(), "--cmdline", "hello shoal"], LIMIT);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "stdout:\n{stdout}\nstderr:\n{}", text(&out.stderr));
    assert!(stdout.contains("SHOAL-PROBE boot: ok"), "{stdout}");
    assert!(stdout.lines().any(|l| l == "cmdline: hello shoal"), "{stdout}");
}

#[test]
fn guest_sees_the_memory_it_was_given() {
    if !kvm_available() {
        return;
    }
    let boot = probe("boot").to_str().unwrap();
    // 64 MiB: conventional memory below the EBDA (639 KiB) plus 1 MiB..64 MiB.
    let out = run_vmm(&["--kernel", boot, "--mem-mib", "64"], LIMIT);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert_eq!(field(&stdout, "e820:", "entries="), Some(2));
    assert_eq!(field(&stdout, "e820:", "ram_kib="), Some(639 + 63 * 1024));
    // 3.5 GiB: RAM is split around the 3..4 GiB MMIO gap, none of it lost.
    let out = run_vmm(&["--kernel", boot, "--mem-mib", "3584"], LIMIT);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert_eq!(field(&stdout, "e820:", "entries="), Some(3));
    assert_eq!(field(&stdout, "e820:", "ram_kib="), Some(639 + (3072 - 1) * 1024 + 512 * 1024));
}

#[test]
fn json_config_boots_like_the_flags() {
    if !kvm_available() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("shoal-config-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("vm.json");
    let json = serde_json::json!({"kernel": probe("boot"), "cmdline": "from json", "vcpus": 2, "mem_mib": 32});
    std::fs::write(&cfg, json.to_string()).unwrap();
    let out = run_vmm(&["--config", cfg.to_str().unwrap()], LIMIT);
    std::fs::remove_dir_all(&dir).unwrap();
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    assert!(stdout.lines().any(|l| l == "cmdline: from json"), "{stdout}");
    assert_eq!(field(&stdout, "e820:", "ram_kib="), Some(639 + 31 * 1024));
}

fn apic_ids(stdout: &str) -> Vec<u64> {
    stdout
        .lines()
        .filter(|l| l.starts_with("ap: ") || l.starts_with("cpu: "))
        .filter_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("apic_id=")).and_then(|v| v.parse().ok()))
        .collect()
}

#[test]
fn smp_probe_starts_every_vcpu_with_its_own_apic_id() {
    if !kvm_available() {
        return;
    }
    let smp = probe("smp").to_str().unwrap();
    for vcpus in [1u64, 2, 4] {
        let out = run_vmm(&["--kernel", smp, "--vcpus", &vcpus.to_string()], LIMIT);
        let stdout = text(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
        let ids = apic_ids(&stdout);
        let distinct: BTreeSet<u64> = ids.iter().copied().collect();
        assert_eq!(ids.len() as u64, vcpus, "{stdout}");
        assert_eq!(distinct, (0..vcpus).collect(), "{stdout}");
        assert!(stdout.contains(&format!("smp: {vcpus} of {vcpus} cpus online")), "{stdout}");
    }
}

#[test]
fn timer_interrupts_are_delivered_from_pit_and_lapic() {
    if !kvm_available() {
        return;
    }
    let out = run_vmm(&["--kernel", probe("timer").to_str().unwrap()], LIMIT);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    assert!(stdout.contains("timer: pit_ticks=5"), "{stdout}");
    assert!(stdout.contains("timer: lapic_ticks=5"), "{stdout}");
    // The TSC-deadline timer is offered (KVM emulates it), and it fires.
    assert!(stdout.contains("timer: tsc_deadline_ticks=5"), "{stdout}");
    assert!(stdout.contains("SHOAL-PROBE timer: ok"), "{stdout}");
}

#[test]
fn guest_triple_fault_exits_2_with_a_message() {
    if !kvm_available() {
        return;
    }
    let out = run_vmm(&["--kernel", probe("fault").to_str().unwrap()], LIMIT);
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    assert!(stdout.contains("SHOAL-PROBE fault: faulting"), "{stdout}");
    assert_eq!(out.status.code(), Some(2), "{stdout}{stderr}");
    assert!(stderr.lines().any(|l| l.starts_with("shoal-vmm: guest triple fault")), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn guest_kernel_panic_then_reset_exits_2() {
    if !kvm_available() {
        return;
    }
    let out = run_vmm(&["--kernel", probe("panic").to_str().unwrap()], LIMIT);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{}{stderr}", text(&out.stdout));
    assert!(stderr.contains("shoal-vmm: guest kernel panicked"), "{stderr}");
}

#[test]
fn firecracker_config_file_boots_unchanged() {
    if !kvm_available() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("shoal-fc-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("vm_config.json");
    let json = serde_json::json!({
        "boot-source": {"kernel_image_path": probe("boot"), "boot_args": "console=ttyS0 reboot=k panic=1 pci=off", "initrd_path": null},
        "drives": [],
        "machine-config": {"vcpu_count": 2, "mem_size_mib": 256, "smt": false},
        "network-interfaces": []
    });
    std::fs::write(&cfg, json.to_string()).unwrap();
    let out = run_vmm(&["--config", cfg.to_str().unwrap()], LIMIT);
    std::fs::remove_dir_all(&dir).unwrap();
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    assert!(stdout.lines().any(|l| l == "cmdline: console=ttyS0 reboot=k panic=1 pci=off"), "{stdout}");
    assert_eq!(field(&stdout, "e820:", "ram_kib="), Some(639 + 255 * 1024));
}
