//! Snapshots on KVM with the counter probe (its count lives in guest memory): a restored guest
//! carries on counting from the snapshot in a new process; a diff snapshot merged into its
//! base carries the later writes; ten clones of one snapshot run side by side, each with its
//! own vsock CID (the guest is told to read it again); a guest with ACPI gets a new VM
//! generation ID on every load; damaged or
//! foreign snapshots are refused with an error that says what is wrong.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::api::{call, consecutive_counts, Console, Vmm};
use common::{kvm_available, probe, text, vmm};
use shoal_vmm::builder::{DeviceSpec, RngSpec};
use shoal_vmm::devices::virtio::mmio::TransportSaved;
use shoal_vmm::snapshot::{format, SnapshotState};

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("shoal-snapshot-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A counter guest under API control.
struct Counter {
    vm: Vmm,
    console: Console,
}

impl Counter {
    fn boot(tag: &str, track_dirty: bool) -> Counter {
        Counter::boot_with(tag, track_dirty, None)
    }

    /// Boots the counter probe, with a vsock device (guest CID 3 on `vsock_uds`) if given.
    fn boot_with(tag: &str, track_dirty: bool, vsock_uds: Option<&Path>) -> Counter {
        Counter::boot_machine(tag, &format!(r#""track_dirty_pages": {track_dirty}"#), vsock_uds)
    }

    /// Boots the counter probe with `extra` fields in its machine config.
    fn boot_machine(tag: &str, extra: &str, vsock_uds: Option<&Path>) -> Counter {
        let mut vm = Vmm::start(tag);
        let console = Console::capture(&mut vm.child);
        let mut s = vm.connect();
        let machine = format!(r#"{{"vcpu_count": 1, "mem_size_mib": 64, {extra}}}"#);
        assert_eq!(call(&mut s, "PUT", "/machine-config", &machine).0, 204);
        let boot = format!(r#"{{"kernel_image_path": "{}"}}"#, probe("counter").display());
        assert_eq!(call(&mut s, "PUT", "/boot-source", &boot).0, 204);
        if let Some(uds) = vsock_uds {
            let vsock = format!(r#"{{"guest_cid": 3, "uds_path": "{}"}}"#, uds.display());
            assert_eq!(call(&mut s, "PUT", "/vsock", &vsock).0, 204);
        }
        assert_eq!(call(&mut s, "PUT", "/actions", r#"{"action_type": "InstanceStart"}"#).0, 204);
        Counter { vm, console }
    }

    fn request(&self, method: &str, path: &str, body: &str) -> (u16, String) {
        call(&mut self.vm.connect(), method, path, body)
    }

    /// Pauses, snapshots into `dir` (files `state` and `memory`), and returns the console text
    /// up to the snapshot. The guest stays paused.
    fn snapshot(&self, kind: &str, dir: &Path) -> String {
        assert_eq!(self.request("PATCH", "/vm", r#"{"state": "Paused"}"#).0, 204);
        let text = self.console.settle(Duration::from_millis(400));
        let body = format!(
            r#"{{"snapshot_type": "{kind}", "snapshot_path": "{}", "mem_file_path": "{}"}}"#,
            dir.join("state").display(),
            dir.join("memory").display()
        );
        assert_eq!(self.request("PUT", "/snapshot/create", &body), (204, String::new()));
        text
    }
}

/// A `shoal-vmm --restore` process, killed when dropped (a failing test leaves none behind).
struct Restored {
    child: std::process::Child,
    console: Console,
}

impl Drop for Restored {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn restore(dir: &Path) -> Restored {
    restore_with(dir, &[])
}

fn restore_with(dir: &Path, args: &[&str]) -> Restored {
    let mut child = Command::new(vmm())
        .arg("--restore")
        .arg(dir)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let console = Console::capture(&mut child);
    Restored { child, console }
}

fn complete_lines(text: &str) -> &str {
    &text[..text.rfind('\n').map_or(0, |i| i + 1)]
}

#[test]
fn a_restored_guest_counts_on_from_the_snapshot() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("full");
    let guest = Counter::boot("snap-full", false);
    guest.console.wait_count(3);
    let before = guest.snapshot("Full", &dir);
    let last = *consecutive_counts(complete_lines(&before)).unwrap().last().unwrap();
    drop(guest); // kill the original

    let restored = restore(&dir);
    let console = restored.console.clone();
    console.wait_count(last + 3);
    drop(restored);
    // No reset, no skip: the original's output up to the snapshot and the clone's continue
    // each other (a line cut by the pause is completed by the restored guest).
    let joined = format!("{before}{}", console.text());
    let counts = consecutive_counts(complete_lines(&joined)).unwrap();
    assert!(counts.contains(&(last + 1)) && counts.contains(&(last + 3)), "{joined}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_diff_merged_into_its_base_restores_the_later_state() {
    if !kvm_available() {
        return;
    }
    let (base, diff) = (scratch("base"), scratch("diff"));
    // With a virtio device (vsock): its writes to guest memory are tracked too, so diffs of VMs
    // with devices are taken rather than refused.
    let uds = std::env::temp_dir().join(format!("shoal-diff-vsock-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&uds);
    let guest = Counter::boot_with("snap-diff", true, Some(&uds));
    guest.console.wait_count(2);
    guest.snapshot("Full", &base);
    assert_eq!(guest.request("PATCH", "/vm", r#"{"state": "Resumed"}"#).0, 204);
    let resumed_at = guest.console.last_count().unwrap();
    guest.console.wait_count(resumed_at + 5);
    let before = guest.snapshot("Diff", &diff);
    let last = *consecutive_counts(complete_lines(&before)).unwrap().last().unwrap();
    drop(guest);

    // The diff memory file holds only the pages written since the base: far less than 64 MiB.
    use std::os::unix::fs::MetadataExt;
    let allocated = std::fs::metadata(diff.join("memory")).unwrap().blocks() * 512;
    assert!(allocated < 8 << 20, "diff allocates {allocated} bytes");

    // An unmerged diff is refused rather than restored with missing pages.
    let out = Command::new(vmm()).arg("--restore").arg(&diff).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("is a diff snapshot: merge it into its base first"), "{}", text(&out.stderr));

    let out = Command::new(vmm()).arg("--merge").arg(&diff).arg("--into").arg(&base).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let restored = restore(&base);
    let console = restored.console.clone();
    console.wait_count(last + 2);
    drop(restored);
    let joined = format!("{before}{}", console.text());
    let counts = consecutive_counts(complete_lines(&joined)).unwrap();
    assert!(counts.contains(&(last + 2)), "{joined}");
    assert!(console.text().contains("vsock reset event=0 cid=3"), "the restored device works: {}", console.text());
    std::fs::remove_dir_all(&base).unwrap();
    std::fs::remove_dir_all(&diff).unwrap();
    let _ = std::fs::remove_file(&uds);
}

#[test]
fn ten_clones_of_one_snapshot_run_at_once() {
    if !kvm_available() {
        return;
    }
    let dir = scratch("clones");
    let guest = Counter::boot_with("snap-clones", false, Some(&dir.join("original.sock")));
    guest.console.wait_count(2);
    let before = guest.snapshot("Full", &dir);
    assert!(before.contains("vsock cid=3\n"), "{before}");
    let last = *consecutive_counts(complete_lines(&before)).unwrap().last().unwrap();
    drop(guest);

    // Each clone gets its own vsock CID and socket; the guest is told to read its CID again.
    let socks: Vec<PathBuf> = (0..10).map(|i| dir.join(format!("clone-{i}.sock"))).collect();
    let clones: Vec<_> = socks
        .iter()
        .enumerate()
        .map(|(i, sock)| restore_with(&dir, &["--vsock", &format!("cid={},uds={}", 100 + i, sock.display())]))
        .collect();
    for (i, clone) in clones.iter().enumerate() {
        let n = clone.console.wait_count(last + 2);
        assert!(n >= last + 2, "clone {i}");
        let text = clone.console.text();
        assert!(text.contains(&format!("vsock reset event=0 cid={}\n", 100 + i)), "clone {i}: {text}");
        assert!(socks[i].exists(), "clone {i} listens on its own socket");
    }
    // Every clone still runs, each with its own copy of guest memory.
    for (i, mut clone) in clones.into_iter().enumerate() {
        assert!(clone.child.try_wait().unwrap().is_none(), "clone {i} exited: {}", clone.console.text());
    }

    // The same through the API: PUT /snapshot/load with vsock_override.
    let mut vm = Vmm::start("snap-clone-api");
    let console = Console::capture(&mut vm.child);
    let body = format!(
        r#"{{"snapshot_path": "{}", "mem_backend": {{"backend_type": "File", "backend_path": "{}"}}, "resume_vm": true, "vsock_override": {{"guest_cid": 77, "uds_path": "{}"}}}}"#,
        dir.join("state").display(),
        dir.join("memory").display(),
        dir.join("api-clone.sock").display()
    );
    assert_eq!(call(&mut vm.connect(), "PUT", "/snapshot/load", &body), (204, String::new()));
    console.wait_count(last + 2);
    assert!(console.text().contains("vsock reset event=0 cid=77\n"), "{}", console.text());
    // GET /vm/config shows what was restored (with its override), though no PUT assembled it.
    let (status, config) = call(&mut vm.connect(), "GET", "/vm/config", "");
    assert_eq!(status, 200, "{config}");
    let config: serde_json::Value = serde_json::from_str(&config).unwrap();
    assert_eq!(config["vsock"]["guest_cid"], 77, "{config}");
    assert_eq!(config["vsock"]["uds_path"], dir.join("api-clone.sock").display().to_string(), "{config}");
    assert_eq!(config["machine-config"]["vcpu_count"], 1, "{config}");
    // A CID the guest cannot have is refused before anything is built.
    let bad = format!(
        r#"{{"snapshot_path": "{}", "mem_file_path": "{}", "vsock_override": {{"guest_cid": 2}}}}"#,
        dir.join("state").display(),
        dir.join("memory").display()
    );
    let other = Vmm::start("snap-clone-bad");
    let (status, body) = call(&mut other.connect(), "PUT", "/snapshot/load", &bad);
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("guest CID 2 is reserved"), "{body}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `len` bytes at guest physical `addr` of a snapshot's memory file (guest memory starts at 0).
fn guest_bytes(memory: &Path, addr: u64, len: usize) -> Vec<u8> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(memory).unwrap();
    f.seek(SeekFrom::Start(addr)).unwrap();
    let mut b = vec![0u8; len];
    f.read_exact(&mut b).unwrap();
    b
}

#[test]
fn an_acpi_guest_has_tables_and_every_load_gives_it_a_new_generation_id() {
    use shoal_vmm::arch::x86_64::acpi::{RSDP_ADDR, VMGENID_ADDR, VMGENID_LEN};
    if !kvm_available() {
        return;
    }
    let dir = scratch("vmgenid");
    let guest = Counter::boot_machine("snap-vmgenid", r#""acpi": true"#, None);
    guest.console.wait_count(1);
    let first = dir.join("boot");
    std::fs::create_dir_all(&first).unwrap();
    guest.snapshot("Full", &first);
    drop(guest);
    assert_eq!(guest_bytes(&first.join("memory"), RSDP_ADDR, 8), b"RSD PTR ");
    let mut ids = vec![guest_bytes(&first.join("memory"), VMGENID_ADDR, VMGENID_LEN)];
    assert_ne!(ids[0], vec![0; VMGENID_LEN], "the boot wrote no generation ID");

    // Each load (through the API, not resumed) has a new ID, seen in a snapshot taken of it.
    for n in 1..=2 {
        let vm = Vmm::start(&format!("snap-vmgenid-{n}"));
        let load = format!(r#"{{"snapshot_path": "{0}/state", "mem_file_path": "{0}/memory"}}"#, first.display());
        assert_eq!(call(&mut vm.connect(), "PUT", "/snapshot/load", &load), (204, String::new()));
        let again = dir.join(format!("load-{n}"));
        std::fs::create_dir_all(&again).unwrap();
        let create = format!(
            r#"{{"snapshot_type": "Full", "snapshot_path": "{0}/state", "mem_file_path": "{0}/memory"}}"#,
            again.display()
        );
        assert_eq!(call(&mut vm.connect(), "PUT", "/snapshot/create", &create), (204, String::new()));
        let id = guest_bytes(&again.join("memory"), VMGENID_ADDR, VMGENID_LEN);
        assert!(!ids.contains(&id), "load {n} kept generation ID {id:02x?}");
        ids.push(id);
    }

    // Without ACPI the guest's memory there is left alone: no tables, no ID.
    let plain = Counter::boot("snap-no-acpi", false);
    plain.console.wait_count(1);
    let none = dir.join("plain");
    std::fs::create_dir_all(&none).unwrap();
    plain.snapshot("Full", &none);
    drop(plain);
    assert_eq!(guest_bytes(&none.join("memory"), RSDP_ADDR, 8), vec![0; 8]);
    assert_eq!(guest_bytes(&none.join("memory"), VMGENID_ADDR, VMGENID_LEN), vec![0; VMGENID_LEN]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn damaged_and_foreign_snapshots_are_refused_with_clear_errors() {
    if !kvm_available() {
        return;
    }
    let good = scratch("good");
    let guest = Counter::boot("snap-bad", false);
    guest.console.wait_count(1);
    guest.snapshot("Full", &good);
    drop(guest);
    let state = std::fs::read(good.join("state")).unwrap();
    let bad = scratch("bad");
    let try_restore = |state_bytes: &[u8], memory: Option<u64>| -> String {
        std::fs::write(bad.join("state"), state_bytes).unwrap();
        let _ = std::fs::remove_file(bad.join("memory"));
        match memory {
            Some(len) => {
                let f = std::fs::File::create(bad.join("memory")).unwrap();
                f.set_len(len).unwrap();
            }
            None => {
                std::fs::copy(good.join("memory"), bad.join("memory")).unwrap();
            }
        }
        let out = Command::new(vmm()).arg("--restore").arg(&bad).output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
        text(&out.stderr)
    };

    let mut flipped = state.clone();
    flipped[state.len() / 2] ^= 0x01;
    assert!(try_restore(&flipped, None).contains("checksum mismatch"));
    assert!(try_restore(&state[..state.len() - 100], None).contains("truncated"));
    let mut version = state.clone();
    version[8] = 99;
    assert!(try_restore(&version, None).contains("format version 99 is not supported"));
    assert!(try_restore(b"#!/bin/sh\n", None).contains("not a shoal snapshot state file"));
    assert!(try_restore(&state, Some(32 << 20)).contains("bytes but the snapshot's guest has 67108864 bytes"));

    // A snapshot taken on another CPU model, re-sealed with a valid checksum.
    let mut decoded: SnapshotState = format::decode(&state).unwrap();
    decoded.cpu.vendor = "OtherVendor!".into();
    let foreign = format::encode(&decoded).unwrap();
    let err = try_restore(&foreign, None);
    assert!(err.contains("snapshot was taken on a OtherVendor!"), "{err}");

    // Reserved header bytes set: refused, not ignored.
    let mut reserved = state.clone();
    reserved[10] = 1;
    let err = try_restore(&reserved, None);
    assert!(err.contains("reserved header bytes set"), "{err}");

    // More virtio devices than there are interrupt lines, re-sealed with a valid checksum.
    let mut crowded: SnapshotState = format::decode(&state).unwrap();
    let rng = (DeviceSpec::Rng(RngSpec { rate_limiter: None }), TransportSaved::default());
    crowded.devices = vec![rng; 19];
    let err = try_restore(&format::encode(&crowded).unwrap(), None);
    assert!(err.contains("19 virtio devices, more than the 18 interrupt lines"), "{err}");

    // Not regular files: a directory as the state file, a character device as the memory.
    let odd = scratch("odd");
    std::fs::create_dir_all(odd.join("state")).unwrap();
    std::os::unix::fs::symlink("/dev/zero", odd.join("memory")).unwrap();
    let out = Command::new(vmm()).arg("--restore").arg(&odd).output().unwrap();
    assert!(text(&out.stderr).contains("is not a regular file"), "{}", text(&out.stderr));
    std::fs::remove_dir(odd.join("state")).unwrap();
    std::fs::write(odd.join("state"), &state).unwrap();
    let out = Command::new(vmm()).arg("--restore").arg(&odd).output().unwrap();
    let err = text(&out.stderr);
    assert!(out.status.code() == Some(1) && err.contains("memory") && err.contains("is not a regular file"), "{err}");
    std::fs::remove_dir_all(&odd).unwrap();

    // Hostile payloads behind a valid checksum reach the decoder and the consistency checks:
    // each is refused with an error (or, if it still describes this machine, loads), never a
    // panic. In process for the many; one through the binary.
    let payload = &state[20..state.len() - 4];
    let probe_file = bad.join("resealed");
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut refused = 0usize;
    for round in 0..3000 {
        let mut p = payload.to_vec();
        for _ in 0..1 + round % 4 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let at = (seed as usize) % p.len();
            p[at] = (seed >> 40) as u8;
        }
        if round % 7 == 0 {
            p.truncate((seed as usize >> 8) % p.len());
        }
        std::fs::write(&probe_file, format::seal(&p)).unwrap();
        if let Err(e) = shoal_vmm::snapshot::read_state(&probe_file) {
            let e = e.to_string();
            assert!(!e.contains("checksum"), "round {round}: the envelope stopped it: {e}");
            refused += usize::from(e.contains("does not decode") || e.contains("inconsistent"));
        }
    }
    // Most bytes are register values any of which decodes; the rest must be caught there.
    assert!(refused > 300, "only {refused} of 3000 altered payloads reached a refusal in the decoder");
    let mut p = payload.to_vec();
    p.truncate(p.len() / 2);
    let err = try_restore(&format::seal(&p), None);
    assert!(err.contains("does not decode"), "{err}");

    // The same through the API: a 400 with the reason, and the VMM keeps serving.
    std::fs::write(bad.join("state"), &foreign).unwrap();
    let api = Vmm::start("snap-load-bad");
    let body = format!(
        r#"{{"snapshot_path": "{}", "mem_backend": {{"backend_type": "File", "backend_path": "{}"}}}}"#,
        bad.join("state").display(),
        bad.join("memory").display()
    );
    let (st, reply) = call(&mut api.connect(), "PUT", "/snapshot/load", &body);
    assert_eq!(st, 400);
    assert!(reply.contains("snapshot was taken on a OtherVendor!"), "{reply}");
    assert!(call(&mut api.connect(), "GET", "/", "").1.contains("Not started"));
    let missing = r#"{"snapshot_path": "/nonexistent/state", "mem_file_path": "/nonexistent/mem"}"#;
    let (st, reply) = call(&mut api.connect(), "PUT", "/snapshot/load", missing);
    assert_eq!(st, 400);
    assert!(reply.contains("cannot read snapshot state file /nonexistent/state"), "{reply}");
    std::fs::remove_dir_all(&good).unwrap();
    std::fs::remove_dir_all(&bad).unwrap();
}
