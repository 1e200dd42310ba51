//! `make run`: the whole product on one machine. It boots the host image (the image's kernel and
//! initramfs, `shoal-node` as PID 1) in QEMU, with KVM where this CPU has vmx/svm and under TCG
//! with an AMD CPU model elsewhere (a real KVM then runs inside), waits for the node's one-node
//! cluster, deploys the project's Linux guest through `shoalctl` against the forwarded API port,
//! and attaches this terminal to the microVM's console (`shoalctl attach`): the guest's shell is
//! here; `poweroff` in it ends the microVM (its restart policy is `never`), Ctrl+] detaches. The
//! server keeps running until Enter is pressed, for `shoalctl` to try; its own serial console
//! (the management console) is written to a file. Without a terminal on stdin the guest boots,
//! prints its /init lines and reboots at once, and the run ends.
//!
//! Usage: shoal-run-image IMAGE_DIR GUEST_DIR (shoalctl is taken from beside this program).

use std::io::{BufRead, IsTerminal};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};

use shoal_hardware_tests::Mode;

/// The deployment `make run` applies (paths are the staged files beside it).
fn manifest(cmdline: &str) -> String {
    format!(
        "kind: Tenant\nname: run\n---\nkind: Deployment\ntenant: run\nname: linux\nreplicas: 1\ntemplate:\n  kernel: vmlinux\n  initrd: initramfs.cpio\n  cmdline: \"{cmdline}\"\n  vcpus: 1\n  mem_mib: 128\n  restart: never\n"
    )
}

/// A free port on 127.0.0.1 for the API's forward.
fn free_port() -> Option<u16> {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).ok()
}

/// The server, powered off (killed: it runs from RAM) when dropped.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn fail(msg: &str) -> ExitCode {
    eprintln!("make run: {msg}");
    ExitCode::from(1)
}

fn main() -> ExitCode {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let [image, guest_dir] = args.as_slice() else {
        eprintln!("usage: shoal-run-image IMAGE_DIR GUEST_DIR");
        return ExitCode::from(2);
    };
    // The staged files link to these from elsewhere.
    let (Ok(image), Ok(guest_dir)) = (std::fs::canonicalize(image), std::fs::canonicalize(guest_dir)) else {
        return fail("the image or guest directory does not exist (make image, make guest-kernel)");
    };
    let shoalctl = std::env::current_exe().ok().and_then(|e| e.parent().map(|d| d.join("shoalctl")));
    let Some(shoalctl) = shoalctl.filter(|p| p.is_file()) else {
        return fail("shoalctl is missing beside this program: build it first (make build)");
    };
    for f in [image.join("vmlinuz"), image.join("initramfs.img"), guest_dir.join("vmlinux")] {
        if !f.is_file() {
            return fail(&format!("{} is missing (make image, make guest-kernel)", f.display()));
        }
    }
    let interactive = std::io::stdin().is_terminal();
    let mode = Mode::detect();
    let (accel, how) = match mode {
        Mode::Direct => (["-accel", "kvm", "-cpu", "host"], "with KVM (this CPU has vmx/svm)"),
        Mode::Emulated => (
            ["-accel", "tcg,thread=multi", "-cpu", "EPYC"],
            "under TCG with an AMD CPU model (this CPU has no vmx/svm; a KVM runs inside the server)",
        ),
    };
    println!("make run: booting the Shoal host image in QEMU {how}: shoal-node is its PID 1");
    let staged = std::env::temp_dir().join(format!("shoal-run-{}", std::process::id()));
    let secret: String = {
        let mut b = [0u8; 16];
        let _ = std::fs::File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b));
        b.iter().map(|x| format!("{x:02x}")).collect()
    };
    let guest_cmdline = if interactive {
        "console=ttyS0 quiet reboot=k panic=1"
    } else {
        "console=ttyS0 quiet reboot=k panic=1 shoal.test=1"
    };
    // The run's secret is the cluster's admin key: the staging directory is ours alone.
    let staging = std::fs::create_dir_all(&staged)
        .and_then(|_| std::fs::set_permissions(&staged, std::os::unix::fs::PermissionsExt::from_mode(0o700)))
        .and_then(|_| std::fs::write(staged.join("linux.yaml"), manifest(guest_cmdline)))
        .and_then(|_| std::fs::write(staged.join("secret"), &secret))
        .and_then(|_| std::os::unix::fs::symlink(guest_dir.join("vmlinux"), staged.join("vmlinux")))
        .and_then(|_| std::os::unix::fs::symlink(guest_dir.join("initramfs.cpio"), staged.join("initramfs.cpio")));
    if let Err(e) = staging {
        return fail(&format!("cannot stage the run in {}: {e}", staged.display()));
    }
    let code = run(&image, &staged, &shoalctl, &secret, accel, interactive);
    let _ = std::fs::remove_dir_all(&staged);
    code
}

fn run(image: &Path, staged: &Path, shoalctl: &Path, secret: &str, accel: [&str; 4], interactive: bool) -> ExitCode {
    let Some(port) = free_port() else { return fail("no free port on 127.0.0.1 for the API") };
    let console = staged.join("server-console.log");
    let server = Command::new("qemu-system-x86_64")
        .args(["-machine", "q35"])
        .args(accel)
        .args(["-smp", "2", "-m", "2048", "-nodefaults", "-display", "none"])
        .arg("-kernel")
        .arg(image.join("vmlinuz"))
        .arg("-initrd")
        .arg(image.join("initramfs.img"))
        .arg("-append")
        .arg(format!("console=ttyS0,115200 panic=-1 quiet shoal.min_voters=1 shoal.data=ram shoal.secret={secret}"))
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .args([
            "-netdev",
            &format!("user,id=n0,hostfwd=tcp:127.0.0.1:{port}-:7400"),
            "-device",
            "virtio-net-pci,netdev=n0",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        // TCG's notes on the CPU features it cannot emulate, and any error: kept for a failure.
        .stderr(std::fs::File::create(staged.join("qemu.log")).map(Stdio::from).unwrap_or_else(|_| Stdio::null()))
        .spawn();
    let _server = match server {
        Ok(c) => Server(c),
        Err(e) => return fail(&format!("cannot start qemu-system-x86_64: {e}")),
    };
    println!("make run: the server's own console (its status screen) is written to {}", console.display());
    let config = staged.join("shoalctl.config");
    let ctl = |args: &[&str]| {
        let mut c = Command::new(shoalctl);
        c.args(args).current_dir(staged).env("SHOAL_CONFIG", &config).env_remove("SHOAL_TOKEN");
        c
    };
    let ok = |c: &mut Command| c.status().map(|s| s.success()).unwrap_or(false);
    println!("make run: waiting for the node's API on 127.0.0.1:{port} (it trusts the node once it proves the secret)");
    let endpoint = format!("127.0.0.1:{port}");
    let secret_file = staged.join("secret");
    let set = ctl(&["config", "set-context", "run", "--endpoint", &endpoint, "--tenant", "run", "--secret-file"])
        .arg(&secret_file)
        .stdout(Stdio::null())
        .status();
    if !set.map(|s| s.success()).unwrap_or(false) {
        let shown = std::fs::read_to_string(&console).unwrap_or_default();
        let qemu = std::fs::read_to_string(staged.join("qemu.log")).unwrap_or_default();
        return fail(&format!("the node did not come up; QEMU said:\n{qemu}\nthe server's console:\n{shown}"));
    }
    println!("make run: node up; deploying the Linux guest (shoalctl apply -f linux.yaml)");
    if !ok(ctl(&["apply", "-f", "linux.yaml"]).stdout(Stdio::null()))
        || !ok(ctl(&["rollout", "status", "linux", "--timeout", "600"]).stdout(Stdio::null()))
    {
        return fail("the deployment did not start");
    }
    let instance = ctl(&["get", "instances", "-o", "name"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).lines().next().unwrap_or("").to_string())
        .unwrap_or_default();
    let _ = ctl(&["get", "instances"]).status();
    let _ = ctl(&["attach", &instance]).status();
    let state = ctl(&["get", "instances", &instance, "-o", "json"])
        .output()
        .map(|o| {
            let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
            v["state"].as_str().unwrap_or("unknown").to_string()
        })
        .unwrap_or_default();
    println!("make run: the microVM {instance} is {state:?}");
    if interactive {
        println!("make run: the node still runs. In another terminal:");
        println!("  SHOAL_CONFIG={} {} get nodes", config.display(), shoalctl.display());
        println!("  (get instances, apply -f, logs, attach ...; the API is https://{endpoint})");
        println!("make run: press Enter to power the server off");
        let mut line = String::new();
        let _ = std::io::stdin().lock().read_line(&mut line);
    }
    ExitCode::SUCCESS
}
