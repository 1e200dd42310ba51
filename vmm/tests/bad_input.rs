//! Bad input never panics: shoal-vmm exits 1 with exactly one line on stderr saying what is
//! wrong. These run the real binary; the KVM-dependent checks (vCPU limit) need /dev/kvm.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{probe, run_vmm, text};

struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let d = std::env::temp_dir().join(format!("shoal-bad-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        Scratch(d)
    }
    fn file(&self, name: &str, bytes: &[u8]) -> String {
        let p = self.0.join(name);
        std::fs::write(&p, bytes).unwrap();
        p.to_str().unwrap().to_string()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs shoal-vmm and checks: exit 1, one stderr line starting "shoal-vmm: " that contains
/// `expect`, no panic, no guest output.
fn refused(args: &[&str], expect: &str) {
    let out = run_vmm(args, Duration::from_secs(30));
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "args {args:?}\nstderr:\n{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "args {args:?}: want one line, got:\n{stderr}");
    assert!(lines[0].starts_with("shoal-vmm: "), "{stderr}");
    assert!(lines[0].contains(expect), "args {args:?}: {:?} lacks {expect:?}", lines[0]);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(out.stdout.is_empty(), "the guest must not have run: {}", text(&out.stdout));
}

#[test]
fn missing_kernel() {
    refused(
        &["--kernel", "/nonexistent/vmlinux"],
        "cannot open kernel /nonexistent/vmlinux: No such file or directory",
    );
}

#[test]
fn text_file_as_kernel() {
    let s = Scratch::new("text");
    let k = s.file("README.txt", b"this is not a kernel\n");
    refused(&["--kernel", &k], &format!("kernel {k} is neither an ELF vmlinux nor a bzImage"));
}

#[test]
fn truncated_elf_kernel() {
    let s = Scratch::new("trunc");
    let whole = std::fs::read(probe("boot")).unwrap();
    let k = s.file("truncated.elf", &whole[..200]);
    refused(&["--kernel", &k], &format!("cannot load kernel {k}"));
}

#[test]
fn truncated_bzimage_kernel() {
    let s = Scratch::new("bz");
    let mut bz = vec![0u8; 0x280];
    bz[0x202..0x206].copy_from_slice(b"HdrS");
    bz[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    bz[0x1f1] = 200; // claims 200 setup sectors, far more than the file holds
    bz[0x211] = 1; // loadflags: LOADED_HIGH
    let k = s.file("bzImage", &bz);
    refused(&["--kernel", &k], &format!("cannot load kernel {k}"));
}

#[test]
fn initrd_larger_than_memory() {
    let s = Scratch::new("initrd");
    let initrd = s.0.join("big.img");
    let f = std::fs::File::create(&initrd).unwrap();
    f.set_len(48 << 20).unwrap(); // sparse: costs no disk
    let kernel = probe("boot").to_str().unwrap();
    refused(
        &["--kernel", kernel, "--initrd", initrd.to_str().unwrap(), "--mem-mib", "32"],
        "initrd of 50331648 bytes does not fit in guest memory",
    );
}

#[test]
fn missing_initrd() {
    refused(
        &["--kernel", probe("boot").to_str().unwrap(), "--initrd", "/nonexistent/initrd"],
        "cannot open initrd /nonexistent/initrd",
    );
}

#[test]
fn zero_vcpus() {
    refused(&["--kernel", probe("boot").to_str().unwrap(), "--vcpus", "0"], "vcpus must be at least 1");
}

#[test]
fn too_many_vcpus() {
    refused(&["--kernel", probe("boot").to_str().unwrap(), "--vcpus", "100000"], "vcpus 100000 is over the limit of");
}

#[test]
fn vcpus_over_kvms_own_limit() {
    if !common::kvm_available() {
        return;
    }
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let max = kvm.get_max_vcpus();
    if max >= 254 {
        // KVM allows more than the MP table does: the MP table's limit is the one users meet.
        refused(&["--kernel", probe("boot").to_str().unwrap(), "--vcpus", "255"], "vcpus 255 is over the limit of 254");
    } else {
        let n = (max + 1).to_string();
        refused(
            &["--kernel", probe("boot").to_str().unwrap(), "--vcpus", &n],
            &format!("vcpus {n} is over the limit of {max} on this host"),
        );
    }
}

#[test]
fn zero_memory() {
    refused(&["--kernel", probe("boot").to_str().unwrap(), "--mem-mib", "0"], "mem_mib must be at least 1");
}

#[test]
fn memory_too_small_for_the_kernel() {
    // The probe loads at 16 MiB.
    refused(&["--kernel", probe("boot").to_str().unwrap(), "--mem-mib", "8"], "cannot load kernel");
}

#[test]
fn command_line_over_the_limit() {
    let long = "x".repeat(3000);
    refused(
        &["--kernel", probe("boot").to_str().unwrap(), "--cmdline", &long],
        "command line is 3000 bytes; at most 2047 are allowed",
    );
}

#[test]
fn unknown_config_field() {
    let s = Scratch::new("cfg");
    let kernel = probe("boot").to_str().unwrap().to_string();
    let cfg = s.file("vm.json", serde_json::json!({"kernel": kernel, "vcpu_count": 2}).to_string().as_bytes());
    refused(&["--config", &cfg], "unknown field `vcpu_count`");
}

#[test]
fn malformed_config() {
    let s = Scratch::new("cfg2");
    let cfg = s.file("vm.json", b"{\"kernel\": ");
    refused(&["--config", &cfg], &format!("invalid config file {cfg}"));
}

#[test]
fn unknown_flag_and_bad_number() {
    refused(&["--kernel", "k", "--vcpu", "2"], "unexpected argument '--vcpu'");
    refused(&["--kernel", "k", "--vcpus", "two"], "invalid value 'two' for '--vcpus <N>'");
}

#[test]
fn config_file_with_flags_is_refused_rather_than_half_applied() {
    let s = Scratch::new("cfg3");
    let kernel = probe("boot").to_str().unwrap().to_string();
    let cfg = s.file("vm.json", serde_json::json!({"kernel": kernel}).to_string().as_bytes());
    refused(
        &["--config", &cfg, "--vcpus", "4"],
        "the argument '--config <FILE.json>' cannot be used with '--vcpus <N>'",
    );
}
