//! `shoal-bench-linux SHOAL_VMM GUEST_DIR [RUNS]`: in the emulated server (or directly on a
//! VMX/SVM host), boots the Linux guest (vmlinux, 1 vCPU, 128 MiB, busybox initramfs whose
//! /init prints a line and reboots) RUNS times (default 7, at least 5) and prints the median
//! time from spawning the VMM to the guest's /init marker and to the VMM's exit, plus every
//! run's figures. The command line is `console=ttyS0 reboot=k panic=1 pci=off quiet` and
//! `shoal.test=1`, which makes /init reboot at once.
//!
//! With `FIRECRACKER=PATH` in the environment (a static Firecracker built outside the
//! repository, see `ci/bench-boot.sh`), the same guest is booted by it as well, runs of the two
//! interleaved, and the ratio is printed. With `BOOT_TRACE=1`, one more run of each with
//! printk timestamps, whose /init prints the kernel log, shows the guest's own timeline (the lines are
//! printed, the figures unchanged; `BOOT_TRACE=only` runs just those; `BOOT_TRACE_ARGS` adds
//! to their command line, e.g. `initcall_debug`). Timings in the emulated server are emulated: compare them
//! only with another VMM measured the same way.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use shoal_hardware_tests::{run, Case, Job, Mode};

const CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off quiet shoal.test=1";
const TRACE_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off quiet printk.time=1 shoal.test=dmesg";

/// Shell lines that write Firecracker's config file `NAME` for command line `cmdline`.
fn firecracker_config(name: &str, cmdline: &str) -> String {
    format!(
        "cat > {name} <<'EOF'\n{{\"boot-source\": {{\"kernel_image_path\": \"vmlinux\", \"initrd_path\": \"initramfs.cpio\", \"boot_args\": \"{cmdline}\"}}, \"machine-config\": {{\"vcpu_count\": 1, \"mem_size_mib\": 128}}, \"drives\": []}}\nEOF\n"
    )
}

/// The shell that boots the guest once with VMM `vmm` (`shoal` or `fc`); `trace` picks the
/// timestamped command line.
fn boot_command(vmm: &str, trace: bool, trace_cmdline: &str) -> String {
    match (vmm, trace) {
        ("fc", false) => "./shoal-boot-timer SHOAL-GUEST-INIT -- ./firecracker --no-api --config-file fc.json".into(),
        ("fc", true) => {
            "./shoal-boot-timer SHOAL-GUEST-INIT -- ./firecracker --no-api --config-file fc-trace.json".into()
        }
        (_, trace) => format!(
            "./shoal-boot-timer SHOAL-GUEST-INIT -- ./shoal-vmm --kernel vmlinux --initrd initramfs.cpio --cmdline '{}'",
            if trace { trace_cmdline } else { CMDLINE }
        ),
    }
}

/// (spawn to the /init marker, spawn to the VMM's exit) of one case, if it booted and exited 0.
fn figures(case: &Case) -> Option<(f64, f64)> {
    let marker =
        case.output.iter().find_map(|l| l.strip_prefix("boot_timer marker_ms=").and_then(|v| v.parse::<f64>().ok()))?;
    let total = case
        .output
        .iter()
        .find_map(|l| l.strip_prefix("boot_timer exit=0 total_ms=").and_then(|v| v.parse::<f64>().ok()))?;
    Some((marker, total))
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(vmm), Some(guest)) = (args.first(), args.get(1)) else {
        eprintln!("usage: shoal-bench-linux SHOAL_VMM GUEST_DIR [RUNS]");
        return ExitCode::from(2);
    };
    let runs: usize = args.get(2).and_then(|r| r.parse().ok()).unwrap_or(7).max(5);
    let firecracker = std::env::var_os("FIRECRACKER").filter(|f| !f.is_empty()).map(PathBuf::from);
    let trace_env = std::env::var("BOOT_TRACE").unwrap_or_default();
    // e.g. BOOT_TRACE_ARGS=initcall_debug: what each initcall took.
    let trace_cmdline = match std::env::var("BOOT_TRACE_ARGS") {
        Ok(extra) if !extra.is_empty() => format!("{TRACE_CMDLINE} {extra}"),
        _ => TRACE_CMDLINE.to_string(),
    };
    let (trace, trace_only) = (trace_env == "1" || trace_env == "only", trace_env == "only");
    let guest = PathBuf::from(guest);
    let timer = std::env::current_exe().ok().and_then(|p| p.parent().map(|d| d.join("shoal-boot-timer")));
    let Some(timer) = timer.filter(|t| t.exists()) else {
        eprintln!("shoal-bench-linux: shoal-boot-timer not found beside this binary");
        return ExitCode::from(1);
    };
    let mut vmms = vec!["shoal"];
    let mut files = vec![
        (PathBuf::from(vmm), "shoal-vmm".to_string()),
        (timer, "shoal-boot-timer".into()),
        (guest.join("vmlinux"), "vmlinux".into()),
        (guest.join("initramfs.cpio"), "initramfs.cpio".into()),
    ];
    if let Some(fc) = &firecracker {
        if !fc.exists() {
            eprintln!("shoal-bench-linux: FIRECRACKER={} does not exist", fc.display());
            return ExitCode::from(1);
        }
        vmms.push("fc");
        files.push((fc.clone(), "firecracker".into()));
    }
    // A boot takes seconds; a VMM that hangs is a failed run, not a stalled benchmark.
    let mut script = String::from("CASE_TIMEOUT=60\n");
    if firecracker.is_some() {
        script.push_str(&firecracker_config("fc.json", CMDLINE));
        script.push_str(&firecracker_config("fc-trace.json", &trace_cmdline));
    }
    if trace {
        for v in &vmms {
            script.push_str(&format!("run_case trace-{v} {}\n", boot_command(v, true, &trace_cmdline)));
        }
    }
    // Interleaved, so that whatever drifts in the emulator over the run touches both alike.
    let runs = if trace_only { 0 } else { runs };
    for i in 1..=runs {
        for v in &vmms {
            script.push_str(&format!("run_case boot-{v}-{i} {}\n", boot_command(v, false, &trace_cmdline)));
        }
    }
    let job = Job { script, files, limit: Duration::from_secs(60 * 60), interactive: false };
    let mode = Mode::detect();
    let result = match run(&job, mode) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("shoal-bench-linux: {e}");
            return ExitCode::from(1);
        }
    };
    let where_ = if mode == Mode::Emulated { "emulated" } else { "direct" };
    if trace {
        for v in &vmms {
            println!("--- guest boot timeline under {v} (printk.time=1, no quiet):");
            for line in &result.case(&format!("trace-{v}")).output {
                println!("{line}");
            }
        }
    }
    if trace_only {
        return ExitCode::SUCCESS;
    }
    let mut medians = Vec::new();
    for v in &vmms {
        let mut marker = Vec::new();
        let mut exit = Vec::new();
        for i in 1..=runs {
            match figures(&result.case(&format!("boot-{v}-{i}"))) {
                Some((m, t)) => {
                    marker.push(m);
                    exit.push(t);
                }
                None => {
                    eprintln!("shoal-bench-linux: {v} run {i} failed:\n{}", result.text());
                    return ExitCode::from(1);
                }
            }
        }
        let show = |xs: &[f64]| xs.iter().map(|x| format!("{x:.0}")).collect::<Vec<_>>().join(" ");
        println!(
            "linux boot under {v} (vmlinux, 1 vCPU, 128 MiB, `{CMDLINE}`), {runs} runs ({where_}): spawn to /init marker {} ms; spawn to exit {} ms",
            show(&marker),
            show(&exit)
        );
        medians.push((*v, median(&marker), median(&exit)));
    }
    for (v, marker, exit) in &medians {
        let name = if *v == "shoal" { "linux_boot".to_string() } else { format!("{v}_linux_boot") };
        println!("{name}_ms_median_{where_}={marker:.0}");
        println!("{name}_exit_ms_median_{where_}={exit:.0}");
    }
    if let [(_, shoal_marker, shoal_exit), (_, fc_marker, fc_exit)] = medians[..] {
        println!("linux_boot_vs_firecracker_{where_}={:.3}", shoal_marker / fc_marker);
        println!("linux_boot_exit_vs_firecracker_{where_}={:.3}", shoal_exit / fc_exit);
    }
    ExitCode::SUCCESS
}
