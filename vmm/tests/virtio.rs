//! virtio devices on KVM with the virtio probe (a minimal virtio-mmio driver): a disk takes a
//! write and reads it back, and the host file holds it; a read-only disk refuses the write and
//! its file is unchanged; the rng hands out random bytes; a rate-limited disk is held to its
//! rate; bad --disk options are refused with a clear error; vsock streams run both ways
//! between the guest and host programs on Unix sockets (Firecracker's CONNECT protocol).

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{kvm_available, probe, run_vmm, spawn_vmm, text, vmm};

fn image(name: &str, size: u64) -> PathBuf {
    let p = std::env::temp_dir().join(format!("shoal-virtio-{name}-{}.img", std::process::id()));
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(size).unwrap();
    p
}

/// The byte pattern the probe writes to sector 1.
fn pattern() -> Vec<u8> {
    (0..512u32).map(|i| (i as u8).wrapping_mul(7).wrapping_add(0x5a)).collect()
}

#[test]
fn disks_and_rng_work_from_inside_the_guest() {
    if !kvm_available() {
        return;
    }
    let rw = image("rw", 1 << 20);
    let ro = image("ro", 1 << 20);
    std::fs::write(&ro, vec![0x11u8; 1 << 20]).unwrap();
    let out = run_vmm(
        &[
            "--kernel",
            probe("virtio").to_str().unwrap(),
            "--disk",
            &format!("path={},id=rootdisk", rw.display()),
            "--disk",
            &format!("path={},ro", ro.display()),
            "--rng",
        ],
        Duration::from_secs(60),
    );
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines.contains(&"blk id=rootdisk id_status=0 sectors=2048 write=0 read=0 match=1 flush=0"), "{stdout}");
    // The read-only disk: the write fails with VIRTIO_BLK_S_IOERR, the read returns its data.
    assert!(lines.contains(&"blk id=disk1 id_status=0 sectors=2048 write=1 read=0 match=0 flush=0"), "{stdout}");
    let rng = lines.iter().find_map(|l| l.strip_prefix("rng got=64 nonzero=")).unwrap_or_else(|| panic!("{stdout}"));
    assert!(rng.parse::<u32>().unwrap() >= 48, "64 random bytes have few zeros: {rng}");
    assert!(lines.contains(&"virtio: done devices=3"));

    let written = std::fs::read(&rw).unwrap();
    assert_eq!(&written[512..1024], pattern().as_slice(), "the host file holds what the guest wrote");
    assert!(std::fs::read(&ro).unwrap().iter().all(|&b| b == 0x11), "the read-only file is unchanged");
    std::fs::remove_file(&rw).unwrap();
    std::fs::remove_file(&ro).unwrap();
}

#[test]
fn a_rate_limited_disk_does_not_go_faster_than_its_limit() {
    if !kvm_available() {
        return;
    }
    // 4 MiB/s in 10 ms refills (so the initial bucket is small), 64 writes of 64 KiB.
    let disk = image("rate", 8 << 20);
    let mut child = Command::new(vmm())
        .args(["--kernel", probe("virtio").to_str().unwrap(), "--cmdline", "virtio.bench=64"])
        .arg("--disk")
        .arg(format!("path={},rate=bw=41943/10", disk.display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (mut start, mut done) = (None, None);
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        if line.starts_with("bench start") {
            start = Some(Instant::now());
        }
        if line.starts_with("bench done") {
            assert_eq!(line, "bench done writes=64 failed=0");
            done = Some(Instant::now());
        }
    }
    assert_eq!(child.wait().unwrap().code(), Some(0));
    let elapsed = done.unwrap() - start.unwrap();
    // 4 MiB at 4 MiB/s: about a second (less the first 41943-byte bucket). Faster means the
    // limiter does not hold; the upper side is measured by `make bench-devices`, not here.
    assert!(elapsed >= Duration::from_millis(900), "4 MiB took {elapsed:?}");
    std::fs::remove_file(&disk).unwrap();
}

#[test]
fn bad_disk_options_are_refused_with_clear_errors() {
    let boot = probe("boot").to_str().unwrap();
    for (spec, want) in [
        ("path=/nonexistent/disk.img", "cannot open disk /nonexistent/disk.img"),
        ("ro", "path=FILE is required"),
        ("path=x,bogus", "unknown part `bogus`"),
        ("path=x,rate=bw=0/100", "above zero"),
        ("path=x,id=123456789012345678901", "longer than 20 bytes"),
    ] {
        let out = Command::new(vmm()).args(["--kernel", boot, "--disk", spec]).output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{spec}");
        assert!(text(&out.stderr).contains(want), "{spec}: {}", text(&out.stderr));
    }
}

/// A network namespace holding one tap, removed when dropped.
struct NetNs {
    name: String,
}

impl NetNs {
    /// None (and the test returns) only when SHOAL_SKIP_NETNS_TESTS says this machine cannot
    /// make namespaces; otherwise failing to make one fails the test.
    fn with_tap(tag: &str) -> Option<NetNs> {
        let name = format!("shoal-{tag}-{}", std::process::id());
        let ip = |args: &[&str]| Command::new("ip").args(args).status().map(|s| s.success()).unwrap_or(false);
        let _ = Command::new("ip").args(["netns", "del", &name]).stderr(Stdio::null()).status();
        if !ip(&["netns", "add", &name]) {
            assert!(
                std::env::var_os("SHOAL_SKIP_NETNS_TESTS").is_some(),
                "cannot create a network namespace (run as root, or set SHOAL_SKIP_NETNS_TESTS=1)"
            );
            return None;
        }
        let ns = NetNs { name };
        // No IPv6 on the tap: the kernel's own router solicitations and MLD reports would reach
        // the guest before (or instead of) the test's frame.
        let _ = ns.exec("sh").args(["-c", "echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6; echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6"]).stderr(Stdio::null()).status();
        assert!(ip(&["-n", &ns.name, "tuntap", "add", "dev", "tap0", "mode", "tap"]));
        assert!(ip(&["-n", &ns.name, "link", "set", "tap0", "up"]));
        Some(ns)
    }

    fn exec(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// Watches the tap for ARP requests for the MMDS address until killed; prints one line each.
const ARP_SNIFFER: &str = r#"
import socket
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806))
s.bind(("tap0", 0x0806))
s.settimeout(30)
print("ready", flush=True)
while True:
    f = s.recv(2048)
    if f[38:42] == bytes([169, 254, 169, 254]):
        print("tap saw arp for mmds", flush=True)
"#;

#[test]
fn the_guest_finds_mmds_by_arp_inside_the_vmm_and_nothing_for_it_reaches_the_tap() {
    if !kvm_available() {
        return;
    }
    let Some(ns) = NetNs::with_tap("mmds") else { return };
    let dir = std::env::temp_dir().join(format!("shoal-virtio-mmds-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let run = |mmds: bool| {
        let mut config = serde_json::json!({
            "boot-source": {"kernel_image_path": probe("virtio"), "boot_args": "console=ttyS0 virtio.arp"},
            "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "02:00:00:00:00:07"}],
        });
        if mmds {
            config["mmds-config"] = serde_json::json!({"version": "V2", "network_interfaces": ["eth0"]});
        }
        let path = dir.join("vm.json");
        std::fs::write(&path, config.to_string()).unwrap();
        let mut sniffer = ns.exec("python3").args(["-c", ARP_SNIFFER]).stdout(Stdio::piped()).spawn().unwrap();
        let mut lines = BufReader::new(sniffer.stdout.take().unwrap()).lines();
        assert_eq!(lines.next().unwrap().unwrap(), "ready");
        let mut vm = ns.exec(vmm()).arg("--config").arg(&path).stdout(Stdio::piped()).spawn().unwrap();
        let console = BufReader::new(vm.stdout.take().unwrap()).lines().map_while(Result::ok);
        let arp = if mmds {
            // The answer comes from the VMM; then the sniffer has had its chance.
            let arp = console.into_iter().find(|l| l.starts_with("net arp")).unwrap_or_default();
            std::thread::sleep(Duration::from_millis(300));
            arp
        } else {
            // Nobody answers: wait for the request to show on the tap instead.
            String::new()
        };
        let seen = if mmds {
            let _ = sniffer.kill();
            lines.map_while(Result::ok).collect::<Vec<String>>()
        } else {
            let first = lines.next().and_then(Result::ok).into_iter().collect();
            let _ = sniffer.kill();
            first
        };
        let _ = sniffer.wait();
        let _ = vm.kill();
        let _ = vm.wait();
        (arp, seen)
    };
    // MMDS on eth0: the VMM answers with MMDS's MAC (06:01:23:45:67:01) and the host never
    // sees the request.
    let (arp, seen) = run(true);
    assert_eq!(arp, "net arp op=2 mac=6:1:35:69:103:1 ip=169.254.169.254");
    assert!(seen.is_empty(), "the request leaked to the tap: {seen:?}");
    // Without MMDS the same request goes out on the tap (and nobody answers).
    let (_, seen) = run(false);
    assert_eq!(seen.first().map(String::as_str), Some("tap saw arp for mmds"));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The host end of the tap: waits for the guest's frame (ethertype 0x88b5), reports its source
/// MAC, and answers with a frame of its own.
const PEER: &str = r#"
import socket
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x88b5))
s.bind(("tap0", 0x88b5))
s.settimeout(60)
print("ready", flush=True)
while True:
    f = s.recv(2048)
    if b"SHOAL-PROBE-TX" in f:
        break
print("host got frame from " + f[6:12].hex(":"), flush=True)
reply = f[6:12] + bytes.fromhex("020000000099") + b"\x88\xb5" + b"SHOAL-HOST-RX"
s.send(reply + b"\0" * (60 - len(reply)))
print("host sent reply", flush=True)
"#;

#[test]
fn a_frame_from_the_guest_reaches_the_tap_and_one_written_to_the_tap_reaches_the_guest() {
    if !kvm_available() {
        return;
    }
    let Some(ns) = NetNs::with_tap("net") else { return };
    let mut peer = ns.exec("python3").args(["-c", PEER]).stdout(Stdio::piped()).spawn().unwrap();
    let mut peer_out = BufReader::new(peer.stdout.take().unwrap()).lines();
    assert_eq!(peer_out.next().unwrap().unwrap(), "ready");
    let out = ns
        .exec(vmm())
        .args(["--kernel", probe("virtio").to_str().unwrap(), "--net", "tap=tap0,mac=02:00:00:00:00:07"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    let peer_lines: Vec<String> = peer_out.map_while(Result::ok).collect();
    let _ = peer.wait();
    assert_eq!(peer_lines, ["host got frame from 02:00:00:00:00:07", "host sent reply"], "guest console:\n{stdout}");
    assert!(stdout.lines().any(|l| l == "net rx len=72 payload=SHOAL-HOST-RX"), "{stdout}");

    // A tap that does not exist is an error: shoal-vmm never creates one.
    let out =
        ns.exec(vmm()).args(["--kernel", probe("boot").to_str().unwrap(), "--net", "tap=nosuchtap"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("tap nosuchtap does not exist"), "{}", text(&out.stderr));
}

#[test]
fn vsock_streams_go_both_ways_between_guest_and_host_programs() {
    use std::io::{Read, Write};
    use std::os::unix::net::{UnixListener, UnixStream};
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("v.sock");
    // A host program listening for guest connections to host port 1234.
    let listener = UnixListener::bind(dir.path().join("v.sock_1234")).unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut got = [0u8; 15];
        s.read_exact(&mut got).unwrap();
        s.write_all(b"host-reply").unwrap();
        got
    });
    let vm =
        spawn_vmm(&["--kernel", probe("virtio").to_str().unwrap(), "--vsock", &format!("cid=7,uds={}", uds.display())]);
    let (ok, lines) = vm.wait_for(Duration::from_secs(60), |l| l.iter().any(|l| l.starts_with("vsock g2h")));
    assert!(ok, "{lines:?}");
    assert_eq!(&server.join().unwrap(), b"SHOAL-VSOCK-G2H", "the guest's bytes reached the host program");
    assert!(lines.contains(&"vsock cid=7".to_string()), "{lines:?}");
    assert!(lines.contains(&"vsock g2h response=1 reply=host-reply".to_string()), "{lines:?}");

    // A host program connects to the guest's port 52 through uds_path.
    let mut host = UnixStream::connect(&uds).unwrap();
    host.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    host.write_all(b"CONNECT 52\n").unwrap();
    let mut ok_line = Vec::new();
    let mut byte = [0u8; 1];
    while byte[0] != b'\n' {
        host.read_exact(&mut byte).unwrap();
        ok_line.push(byte[0]);
    }
    let ok_line = String::from_utf8(ok_line).unwrap();
    let port: u32 =
        ok_line.strip_prefix("OK ").and_then(|p| p.trim_end().parse().ok()).unwrap_or_else(|| panic!("{ok_line:?}"));
    host.write_all(b"ping-from-host").unwrap();
    let mut reply = [0u8; 19];
    host.read_exact(&mut reply).unwrap();
    assert_eq!(&reply, b"pong:ping-from-host");
    let (ok, more) = vm.wait_for(Duration::from_secs(60), |l| l.iter().any(|l| l.starts_with("virtio: done")));
    assert!(ok, "{more:?}");
    assert!(more.contains(&format!("vsock h2g port={port} data=ping-from-host")), "{more:?}");
    // The probe resets; the VMM exits 0 and removes its socket.
    let mut vm = vm;
    assert_eq!(vm.child.wait().unwrap().code(), Some(0));
    assert!(!uds.exists(), "uds_path removed at exit");
}

#[test]
fn a_guest_resetting_its_vsock_device_with_a_stream_open_closes_the_stream_and_keeps_the_vmm() {
    use std::io::Read;
    use std::os::unix::net::UnixListener;
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("v.sock");
    let listener = UnixListener::bind(dir.path().join("v.sock_5000")).unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        // The device reset must close the host's end: read returns 0 (EOF), not a timeout.
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).map(|_| rest.len())
    });
    let mut vm = spawn_vmm(&[
        "--kernel",
        probe("vsockreset").to_str().unwrap(),
        "--vsock",
        &format!("cid=9,uds={}", uds.display()),
    ]);
    let (ok, lines) = vm.wait_for(Duration::from_secs(60), |l| l.iter().any(|l| l.contains("device reset")));
    assert!(ok, "{lines:?}");
    assert!(lines.contains(&"SHOAL-PROBE vsockreset: connected op=2".to_string()), "{lines:?}");
    assert!(lines.contains(&"SHOAL-PROBE vsockreset: device reset, status=0".to_string()), "{lines:?}");
    let status = vm.child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "the VMM survives the reset and exits 0 at the guest's reboot: {status:?}");
    assert_eq!(server.join().unwrap().unwrap(), 0, "the host's end of the stream saw EOF");
}
