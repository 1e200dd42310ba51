//! The README's walk-through, run as written: the `sh` blocks between its walk-through marks are
//! one bash script, run from the repository root as root, in a network namespace of its own (so
//! its 127.0.0.x addresses and ports are its own), with `/tmp/shoal` moved to a temporary
//! directory and the binaries' directory pointed at this build's. The `make build probes` it
//! asks for first is what `make test` has done before the tests. Needs root and /dev/kvm.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod support;

use std::path::Path;
use std::process::{Command, Stdio};

/// The walk-through's shell commands, in order.
fn walkthrough(readme: &str) -> String {
    let start = readme.find("<!-- walkthrough").expect("the README marks its walk-through");
    let end = readme.find("<!-- end of walkthrough -->").expect("the README marks the end of its walk-through");
    let mut script = String::new();
    let mut inside = false;
    for line in readme[start..end].lines() {
        match line.trim() {
            "```sh" => inside = true,
            "```" => inside = false,
            _ if inside => {
                script.push_str(line);
                script.push('\n');
            }
            _ => {}
        }
    }
    script
}

#[test]
fn the_readme_walkthrough_runs_as_written() {
    if !support::can_run_vms() {
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf();
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let script = walkthrough(&readme);
    assert!(script.contains("shoalctl apply -f examples/web.yaml"), "{script}");
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_shoal-node")).parent().unwrap();
    for b in ["shoal-node", "shoalctl"] {
        assert!(bin_dir.join(b).is_file(), "{} is missing: build it (make build)", bin_dir.join(b).display());
    }
    let vmm = support::vmm_binary();
    // The probe the example deploys (make probes puts it there).
    let probe = root.join("target/probes/workload.elf");
    if !probe.exists() {
        std::fs::create_dir_all(probe.parent().unwrap()).unwrap();
        std::fs::copy(shoal_probe_guest::path("workload").unwrap(), &probe).unwrap();
    }
    let tmp = tempfile::tempdir().unwrap();
    let shoal_dir = tmp.path().join("shoal");
    let script = script
        .replace("$PWD/target/x86_64-unknown-linux-gnu/release", bin_dir.to_str().unwrap())
        .replace("/tmp/shoal", shoal_dir.to_str().unwrap());

    // A namespace with only a loopback interface (setns alone: see support::Node::start).
    let ns = format!("shrd{}", std::process::id() % 100_000);
    let _ = Command::new("ip").args(["netns", "del", &ns]).stderr(Stdio::null()).status();
    assert!(Command::new("ip").args(["netns", "add", &ns]).status().unwrap().success());
    assert!(Command::new("ip").args(["-n", &ns, "link", "set", "lo", "up"]).status().unwrap().success());
    let mut cmd = Command::new("bash");
    cmd.args(["-euo", "pipefail", "-c", &script])
        .current_dir(&root)
        .env("SHOAL_CONFIG", tmp.path().join("config"))
        .env("HOME", tmp.path())
        // The agents' shoal-vmm (by default the one beside them).
        .env("SHOAL_VMM", &vmm)
        .stdin(Stdio::null());
    let _netns = support::in_netns(&mut cmd, &ns);
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    // Whatever the script left running goes with the namespace.
    for pid in support::ns_pids(&ns) {
        // SAFETY: signalling processes of the test's own namespace.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let _ = Command::new("ip").args(["netns", "del", &ns]).status();
    support::remove_empty_jail_cgroups();
    let logs: String = ["n0.log", "m1.log", "m2.log", "m3.log"]
        .iter()
        .map(|f| format!("--- {f}:\n{}", std::fs::read_to_string(shoal_dir.join(f)).unwrap_or_default()))
        .collect();
    assert!(out.status.success(), "the walk-through failed\nstdout:\n{stdout}\nstderr:\n{stderr}\n{logs}");
    assert_eq!(stdout.matches("deployment/web rolled out").count(), 3, "{stdout}");
    assert!(stdout.contains("SHOAL-PROBE workload: start cmdline=app=web"), "{stdout}");
    assert!(stdout.contains("deployment/web scaled to 6"), "{stdout}");
    assert!(stdout.contains("tenant/demo deleted"), "{stdout}");
    // The instance tables: two running on the one node, then six on the three.
    let running = stdout.lines().filter(|l| l.starts_with("web-") && l.contains(" running ")).count();
    assert_eq!(running, 2 + 6, "{stdout}");
}
