//! `make run`: the product on one machine. It starts a one-node Shoal cluster (`shoal-node
//! agent`), deploys the project's Linux guest (vmlinux + busybox initramfs) through `shoalctl`,
//! and attaches this terminal to the microVM's console (`shoalctl attach`): the guest's shell is
//! here, `poweroff` in it ends the microVM (its restart policy is `never`) and with it the run;
//! Ctrl+] detaches instead. Directly where the host CPU has vmx/svm and /dev/kvm (as root: the
//! node jails its microVMs); otherwise inside the emulated server, which it starts. Without a
//! terminal on stdin the guest boots, prints its /init lines and reboots at once.
//!
//! Usage: shoal-run-linux SHOAL_VMM GUEST_DIR (shoal-node and shoalctl are taken from beside
//! SHOAL_VMM).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use shoal_hardware_tests::{run, Job, Mode};

/// The deployment `make run` applies (paths are the staged files beside it).
fn manifest(cmdline: &str) -> String {
    format!(
        "kind: Tenant\nname: run\n---\nkind: Deployment\ntenant: run\nname: linux\nreplicas: 1\ntemplate:\n  kernel: vmlinux\n  initrd: initramfs.cpio\n  cmdline: \"{cmdline}\"\n  vcpus: 1\n  mem_mib: 128\n  restart: never\n"
    )
}

/// The job: a node, the deployment, the console; the same script on the host and in the server.
fn script(port: u16) -> String {
    format!(
        r#"set -e
ip link set lo up 2>/dev/null || true
# The microVM gets an address on its tenant's network: taps, a bridge, nf_tables (job-lib.sh).
load_network_modules
# The jail needs cgroups: the emulated server has none mounted until here (cgroup v2).
if [ -z "$(ls -A /sys/fs/cgroup 2>/dev/null)" ]; then mkdir -p /sys/fs/cgroup; mount -t cgroup2 none /sys/fs/cgroup; fi
# The console's input goes through a pseudo-terminal.
grep -q ' /dev/pts devpts ' /proc/mounts || {{ mkdir -p /dev/pts; mount -t devpts devpts /dev/pts; }}
here=$(pwd)
mkdir -p "$here/node"
export SHOAL_CONFIG="$here/shoalctl.config"
./shoal-node agent --data-dir "$here/node" --listen 127.0.0.1:{port} --min-voters 1 --vmm "$here/shoal-vmm" 2>"$here/node.log" &
agent=$!
ctl() {{ ./shoalctl "$@"; }}
# The API is TLS: the node writes its cluster CA once it has formed its one-node cluster.
for _ in $(seq 600); do [ -f "$here/node/tls/ca.crt" ] && break; sleep 0.2; done
ctl config set-context run --endpoint 127.0.0.1:{port} --token-file "$here/node/api-token" --ca "$here/node/tls/ca.crt" --tenant run >/dev/null
echo "make run: node up; deploying the Linux guest (shoalctl apply -f linux.yaml)"
ctl apply -f linux.yaml 2>/dev/null
ctl rollout status linux --timeout 600 >/dev/null
instance=$(ctl get instances -o name)
ctl get instances
set +e
ctl attach "$instance"
echo "make run: the microVM $instance ended: $(ctl get instances "$instance" -o json | grep -o '"state": *"[a-z]*"')"
ctl delete deployment linux >/dev/null 2>&1
kill $agent 2>/dev/null
wait $agent 2>/dev/null
exit 0
"#
    )
}

/// A free port P on 127.0.0.1 with P+1 free too (the node's Raft port).
fn free_port() -> Option<u16> {
    (0..50).find_map(|_| {
        let l = std::net::TcpListener::bind("127.0.0.1:0").ok()?;
        let p = l.local_addr().ok()?.port();
        let next = p.checked_add(1)?;
        std::net::TcpListener::bind(("127.0.0.1", next)).ok().map(|_| p)
    })
}

fn main() -> ExitCode {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let [vmm, guest_dir] = args.as_slice() else {
        eprintln!("usage: shoal-run-linux SHOAL_VMM GUEST_DIR");
        return ExitCode::from(2);
    };
    let bin_dir = vmm.parent().map(PathBuf::from).unwrap_or_default();
    for b in ["shoal-node", "shoalctl"] {
        if !bin_dir.join(b).is_file() {
            eprintln!("shoal-run-linux: {} is missing: build it first (make build)", bin_dir.join(b).display());
            return ExitCode::from(1);
        }
    }
    let interactive = std::io::stdin().is_terminal();
    let mut cmdline = String::from("console=ttyS0 quiet reboot=k panic=1");
    if !interactive {
        cmdline.push_str(" shoal.test=1");
    }
    let mode = Mode::detect();
    let how = match mode {
        Mode::Direct => "directly on this host (the CPU has vmx/svm)",
        Mode::Emulated => {
            "inside the emulated server (QEMU TCG with a KVM inside: this CPU has no vmx/svm); the server boots first"
        }
    };
    let what = if interactive {
        "to a shell; `poweroff` ends it, Ctrl+] detaches"
    } else {
        "(no terminal: the guest prints its /init lines and reboots)"
    };
    println!(
        "make run: starting a one-node Shoal cluster {how}, deploying a Linux microVM on it and attaching this terminal to its console {what}"
    );
    // SAFETY: geteuid has no preconditions.
    if mode == Mode::Direct && unsafe { libc::geteuid() } != 0 {
        eprintln!("shoal-run-linux: the node jails its microVMs, which needs root: run `sudo make run`");
        return ExitCode::from(1);
    }
    let port = if mode == Mode::Direct { free_port().unwrap_or(7400) } else { 7400 };
    let staged = std::env::temp_dir().join(format!("shoal-run-{}", std::process::id()));
    if let Err(e) =
        std::fs::create_dir_all(&staged).and_then(|_| std::fs::write(staged.join("linux.yaml"), manifest(&cmdline)))
    {
        eprintln!("shoal-run-linux: cannot write the manifest: {e}");
        return ExitCode::from(1);
    }
    let job = Job {
        script: script(port),
        files: vec![
            (vmm.clone(), "shoal-vmm".into()),
            (bin_dir.join("shoal-node"), "shoal-node".into()),
            (bin_dir.join("shoalctl"), "shoalctl".into()),
            (guest_dir.join("vmlinux"), "vmlinux".into()),
            (guest_dir.join("initramfs.cpio"), "initramfs.cpio".into()),
            (staged.join("linux.yaml"), "linux.yaml".into()),
        ],
        limit: Duration::from_secs(24 * 3600),
        interactive: true,
    };
    let result = run(&job, mode);
    let _ = std::fs::remove_dir_all(&staged);
    match result {
        Ok(r) if r.finished => ExitCode::SUCCESS,
        Ok(_) => ExitCode::from(1),
        Err(e) => {
            eprintln!("shoal-run-linux: {e}");
            ExitCode::from(1)
        }
    }
}
