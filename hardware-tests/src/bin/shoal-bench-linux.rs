//! `shoal-bench-linux SHOAL_VMM GUEST_DIR [RUNS]`: in the emulated server (or directly on a
//! VMX/SVM host), boots the Linux guest (vmlinux, 1 vCPU, 128 MiB, busybox initramfs) RUNS
//! times (default 7, at least 5) and prints the median time from spawning shoal-vmm to the
//! guest's /init marker, plus every run's figure. Timings in the emulated server are emulated:
//! compare them only with another VMM measured the same way.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use shoal_hardware_tests::{run, Job, Mode};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(vmm), Some(guest)) = (args.first(), args.get(1)) else {
        eprintln!("usage: shoal-bench-linux SHOAL_VMM GUEST_DIR [RUNS]");
        return ExitCode::from(2);
    };
    let runs: usize = args.get(2).and_then(|r| r.parse().ok()).unwrap_or(7).max(5);
    let guest = PathBuf::from(guest);
    let timer = std::env::current_exe().ok().and_then(|p| p.parent().map(|d| d.join("shoal-boot-timer")));
    let Some(timer) = timer.filter(|t| t.exists()) else {
        eprintln!("shoal-bench-linux: shoal-boot-timer not found beside this binary");
        return ExitCode::from(1);
    };
    let cmdline = "console=ttyS0 quiet reboot=k panic=1 shoal.test=1";
    let script = format!(
        "i=0; while [ $i -lt {runs} ]; do i=$((i+1)); run_case boot-$i ./shoal-boot-timer SHOAL-GUEST-INIT -- ./shoal-vmm --kernel vmlinux --initrd initramfs.cpio --cmdline '{cmdline}'; done"
    );
    let job = Job {
        script,
        files: vec![
            (PathBuf::from(vmm), "shoal-vmm".into()),
            (timer, "shoal-boot-timer".into()),
            (guest.join("vmlinux"), "vmlinux".into()),
            (guest.join("initramfs.cpio"), "initramfs.cpio".into()),
        ],
        limit: Duration::from_secs(60 * 60),
        interactive: false,
    };
    let mode = Mode::detect();
    let result = match run(&job, mode) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("shoal-bench-linux: {e}");
            return ExitCode::from(1);
        }
    };
    let mut ms: Vec<f64> = Vec::new();
    for i in 1..=runs {
        let case = result.case(&format!("boot-{i}"));
        let marker = case
            .output
            .iter()
            .find_map(|l| l.strip_prefix("boot_timer marker_ms=").and_then(|v| v.parse::<f64>().ok()));
        match marker {
            Some(v) if case.has("boot_timer exit=0") => ms.push(v),
            _ => {
                eprintln!("shoal-bench-linux: run {i} failed:\n{}", result.text());
                return ExitCode::from(1);
            }
        }
    }
    let mut sorted = ms.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    let where_ = if mode == Mode::Emulated { "emulated" } else { "direct" };
    println!(
        "linux boot (vmlinux, 1 vCPU, 128 MiB) spawn to /init marker, {runs} runs ({where_}): {}",
        ms.iter().map(|v| format!("{v:.0}")).collect::<Vec<_>>().join(" ")
    );
    println!("linux_boot_ms_median_{where_}={median:.0}");
    ExitCode::SUCCESS
}
