//! `make run`: boots the project's Linux guest (vmlinux + busybox initramfs) under shoal-vmm to
//! an interactive shell on this terminal. Directly where the host CPU has vmx/svm and /dev/kvm;
//! otherwise inside the emulated server, which it starts. `poweroff` in the guest ends it.
//! Without a terminal on stdin the guest boots, prints its /init lines and reboots at once.
//!
//! Usage: shoal-run-linux SHOAL_VMM GUEST_DIR

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::time::Duration;

use shoal_hardware_tests::{run, Job, Mode};

fn main() -> ExitCode {
    let args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let [vmm, guest_dir] = args.as_slice() else {
        eprintln!("usage: shoal-run-linux SHOAL_VMM GUEST_DIR");
        return ExitCode::from(2);
    };
    let interactive = std::io::stdin().is_terminal();
    let mut cmdline = String::from("console=ttyS0 quiet reboot=k panic=1");
    if !interactive {
        cmdline.push_str(" shoal.test=1");
    }
    let mode = Mode::detect();
    let how = match mode {
        Mode::Direct => "directly on this host's KVM (the CPU has vmx/svm)",
        Mode::Emulated => {
            "inside the emulated server (QEMU TCG with a KVM inside: this CPU has no vmx/svm); the server boots first"
        }
    };
    let what = if interactive {
        "to a shell; `poweroff` ends it"
    } else {
        "(no terminal: it prints its /init lines and reboots)"
    };
    println!("make run: booting a Linux microVM {how}, {what}");

    let vmm_args = ["--kernel", "vmlinux", "--initrd", "initramfs.cpio", "--cmdline", &cmdline];
    if mode == Mode::Direct {
        let status = Command::new(vmm).args(vmm_args).current_dir(guest_dir).status();
        return match status {
            Ok(s) if s.success() => ExitCode::SUCCESS,
            Ok(s) => ExitCode::from(s.code().unwrap_or(1) as u8),
            Err(e) => {
                eprintln!("shoal-run-linux: cannot run {}: {e}", vmm.display());
                ExitCode::from(1)
            }
        };
    }
    let job = Job {
        script: format!(
            "./shoal-vmm --kernel vmlinux --initrd initramfs.cpio --cmdline '{cmdline}'; echo \"shoal-vmm exited $?\""
        ),
        files: vec![
            (vmm.clone(), "shoal-vmm".into()),
            (guest_dir.join("vmlinux"), "vmlinux".into()),
            (guest_dir.join("initramfs.cpio"), "initramfs.cpio".into()),
        ],
        limit: Duration::from_secs(24 * 3600),
        interactive: true,
    };
    match run(&job, mode) {
        Ok(r) if r.finished => ExitCode::SUCCESS,
        Ok(_) => ExitCode::from(1),
        Err(e) => {
            eprintln!("shoal-run-linux: {e}");
            ExitCode::from(1)
        }
    }
}
