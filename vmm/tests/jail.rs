//! The jail, seen from outside as an operator would check it: a jailed VMM runs its guest as
//! an unprivileged uid, with no_new_privs and seccomp, in its own mount, PID, IPC and UTS
//! namespaces, in its cgroup with the asked limits; its root holds only what was put in the
//! jail directory (the host filesystem is not visible: a kernel given by its host path is not
//! found); SIGTERM ends it and its cgroup is removed. Needs root (make test runs as root).

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{kvm_available, probe, run_vmm, spawn_vmm, text};

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
}

/// The jail needs KVM and root; without them the test fails unless SHOAL_SKIP_KVM_TESTS=1
/// says that is expected here.
fn jail_possible() -> bool {
    if !kvm_available() {
        return false;
    }
    assert!(
        is_root() || std::env::var_os("SHOAL_SKIP_KVM_TESTS").is_some(),
        "the jail tests need root (make test runs as root)"
    );
    is_root()
}

fn jail_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("shoal-jail-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn status_field(pid: u32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")).map(|v| v.split_whitespace().collect::<Vec<_>>().join(" ")))
        .unwrap_or_default()
}

fn ns(pid: &str, kind: &str) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).unwrap()
}

/// The cgroup directory of `controller` (v1) or the v2 one, for the jail `id`.
fn cgroup_dirs(id: &str) -> Vec<PathBuf> {
    let root = Path::new("/sys/fs/cgroup");
    [
        root.join("shoal-vmm").join(id),
        root.join("unified/shoal-vmm").join(id),
        root.join("memory/shoal-vmm").join(id),
        root.join("pids/shoal-vmm").join(id),
        root.join("cpu/shoal-vmm").join(id),
    ]
    .into_iter()
    .filter(|d| d.exists())
    .collect()
}

#[test]
fn a_jailed_vmm_runs_its_guest_unprivileged_in_its_own_namespaces_and_cgroup() {
    if !jail_possible() {
        return;
    }
    let dir = jail_dir("run");
    std::fs::copy(probe("counter"), dir.join("counter.elf")).unwrap();
    let id = format!("jail-test-{}", std::process::id());
    let vm = spawn_vmm(&[
        "--jail",
        dir.to_str().unwrap(),
        "--uid",
        "65534",
        "--gid",
        "65534",
        "--jail-id",
        &id,
        "--cgroup",
        "cpus=1,mem-mib=512,pids=64",
        "--kernel",
        "/counter.elf",
    ]);
    let (ok, lines) = vm.wait_for(Duration::from_secs(30), |l| l.iter().any(|l| l == "count=2"));
    assert!(ok, "the jailed guest runs: {lines:?}");

    // The jailed process is the parent's only child.
    let parent = vm.child.id();
    let children = std::fs::read_to_string(format!("/proc/{parent}/task/{parent}/children")).unwrap();
    let child: u32 = children.split_whitespace().next().unwrap().parse().unwrap();
    assert_eq!(status_field(child, "Uid"), "65534 65534 65534 65534");
    assert_eq!(status_field(child, "Gid"), "65534 65534 65534 65534");
    assert_eq!(status_field(child, "Groups"), "65534");
    assert_eq!(status_field(child, "NoNewPrivs"), "1");
    assert_eq!(status_field(child, "Seccomp"), "2", "seccomp filters on");
    assert_eq!(status_field(child, "NSpid").split(' ').nth(1), Some("1"), "PID 1 of its own PID namespace");
    for kind in ["mnt", "pid", "ipc", "uts"] {
        assert_ne!(ns(&child.to_string(), kind), ns("self", kind), "{kind} namespace");
    }
    // Its whole filesystem: the jail directory's file, /dev with kvm and net/tun, /proc.
    let mut root: Vec<String> = std::fs::read_dir(format!("/proc/{child}/root"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    root.sort();
    assert_eq!(root, ["counter.elf", "dev", "proc"]);
    let mut devs: Vec<String> = std::fs::read_dir(format!("/proc/{child}/root/dev"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    devs.sort();
    assert_eq!(devs, ["kvm", "net"]);
    assert!(!Path::new(&format!("/proc/{child}/root/etc")).exists());
    // Its cgroup, with the limits asked for.
    let cgroup = std::fs::read_to_string(format!("/proc/{child}/cgroup")).unwrap();
    assert!(cgroup.contains(&format!("shoal-vmm/{id}")), "{cgroup}");
    let dirs = cgroup_dirs(&id);
    assert!(!dirs.is_empty());
    let read =
        |file: &str| dirs.iter().find_map(|d| std::fs::read_to_string(d.join(file)).ok()).map(|v| v.trim().to_string());
    assert_eq!(read("memory.max").or_else(|| read("memory.limit_in_bytes")).as_deref(), Some("536870912"));
    assert_eq!(read("pids.max").as_deref(), Some("64"));
    assert!(
        read("cpu.max").as_deref() == Some("100000 100000") || read("cpu.cfs_quota_us").as_deref() == Some("100000")
    );

    // SIGTERM to the VMM reaches the jailed child; the cgroup goes away with it.
    // SAFETY: signalling our own child process.
    unsafe { libc::kill(parent as i32, libc::SIGTERM) };
    let mut vm = vm;
    let status = vm.child.wait().unwrap();
    assert_eq!(status.code(), Some(128 + libc::SIGTERM));
    let start = Instant::now();
    while Path::new(&format!("/proc/{child}")).exists() && start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!Path::new(&format!("/proc/{child}")).exists(), "the jailed child is gone");
    assert!(cgroup_dirs(&id).is_empty(), "cgroup removed");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_host_filesystem_is_not_visible_from_the_jail() {
    if !jail_possible() {
        return;
    }
    let dir = jail_dir("hidden");
    // The kernel exists on the host, at this absolute path, but not inside the jail.
    let host_kernel = probe("boot");
    let out = run_vmm(
        &[
            "--jail",
            dir.to_str().unwrap(),
            "--uid",
            "65534",
            "--gid",
            "65534",
            "--kernel",
            host_kernel.to_str().unwrap(),
        ],
        Duration::from_secs(30),
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("No such file or directory"), "{}", text(&out.stderr));
    // Put inside the jail, the same kernel boots.
    std::fs::copy(host_kernel, dir.join("boot.elf")).unwrap();
    let out = run_vmm(
        &["--jail", dir.to_str().unwrap(), "--uid", "65534", "--gid", "65534", "--kernel", "/boot.elf"],
        Duration::from_secs(30),
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("SHOAL-PROBE boot: ok"));
    // Bad jail options are refused with a clear error.
    let out = run_vmm(
        &[
            "--jail",
            dir.to_str().unwrap(),
            "--uid",
            "65534",
            "--gid",
            "65534",
            "--jail-id",
            "../escape",
            "--kernel",
            "/boot.elf",
        ],
        Duration::from_secs(30),
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("jail id `../escape` must be"), "{}", text(&out.stderr));
    let out = run_vmm(&["--jail", dir.to_str().unwrap(), "--kernel", "/boot.elf"], Duration::from_secs(30));
    assert_ne!(out.status.code(), Some(0));
    assert!(text(&out.stderr).contains("--uid"), "{}", text(&out.stderr));
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `--netns` puts the jailed VMM in an existing network namespace: a tap that exists only there
/// (owned by the jail's uid, as netstack will create them) is opened by the jailed VMM, and the
/// child's network namespace is that one.
#[test]
fn a_jailed_vmm_joins_the_network_namespace_it_is_given_and_opens_its_tap_there() {
    if !jail_possible() {
        return;
    }
    let netns = format!("shoal-jail-{}", std::process::id());
    let ip =
        |args: &[&str]| assert!(std::process::Command::new("ip").args(args).status().unwrap().success(), "ip {args:?}");
    let _ = std::process::Command::new("ip").args(["netns", "del", &netns]).status();
    ip(&["netns", "add", &netns]);
    ip(&["-n", &netns, "tuntap", "add", "dev", "jtap0", "mode", "tap", "user", "65534", "group", "65534"]);
    let dir = jail_dir("netns");
    std::fs::copy(probe("counter"), dir.join("counter.elf")).unwrap();
    let ns_path = format!("/run/netns/{netns}");
    let vm = spawn_vmm(&[
        "--jail",
        dir.to_str().unwrap(),
        "--uid",
        "65534",
        "--gid",
        "65534",
        "--netns",
        &ns_path,
        "--net",
        "tap=jtap0",
        "--kernel",
        "/counter.elf",
    ]);
    let (ok, lines) = vm.wait_for(Duration::from_secs(30), |l| l.iter().any(|l| l == "count=2"));
    let parent = vm.child.id();
    let children = std::fs::read_to_string(format!("/proc/{parent}/task/{parent}/children")).unwrap_or_default();
    let child = children.split_whitespace().next().map(str::to_string);
    let child_net = child.as_deref().map(|c| ns(c, "net"));
    use std::os::unix::fs::MetadataExt;
    let want = std::fs::metadata(&ns_path).unwrap().ino();
    drop(vm);
    let _ = std::process::Command::new("ip").args(["netns", "del", &netns]).status();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(ok, "the jailed guest runs with a tap from the namespace: {lines:?}");
    assert_eq!(
        child_net.map(|p| p.to_string_lossy().into_owned()),
        Some(format!("net:[{want}]")),
        "the jailed VMM's network namespace"
    );
    assert_ne!(ns("self", "net").to_string_lossy(), format!("net:[{want}]"));
}
