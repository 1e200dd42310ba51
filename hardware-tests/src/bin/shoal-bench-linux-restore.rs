//! `shoal-bench-linux-restore SHOAL_VMM GUEST_DIR [RESTORES]`: in the emulated server (or
//! directly on a VMX/SVM host), runs `shoal-snapshot-job`: the Linux guest counting in a shell
//! loop (256 MiB) is snapshotted once and restored RESTORES times (default 20). Prints the
//! median from spawning the restoring shoal-vmm to the guest's next console output (which
//! includes what is left of the guest's 50 ms sleep), and the snapshot create time. Timings in
//! the emulated server are emulated: compare them only with another VMM measured the same way.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use shoal_hardware_tests::{run, Job, Mode};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(vmm), Some(guest)) = (args.first(), args.get(1)) else {
        eprintln!("usage: shoal-bench-linux-restore SHOAL_VMM GUEST_DIR [RESTORES]");
        return ExitCode::from(2);
    };
    let restores: usize = args.get(2).and_then(|r| r.parse().ok()).unwrap_or(20).max(1);
    let guest = PathBuf::from(guest);
    let job_bin = std::env::current_exe().ok().and_then(|p| p.parent().map(|d| d.join("shoal-snapshot-job")));
    let Some(job_bin) = job_bin.filter(|t| t.exists()) else {
        eprintln!("shoal-bench-linux-restore: shoal-snapshot-job not found beside this binary");
        return ExitCode::from(1);
    };
    let job = Job {
        script: format!("CASE_TIMEOUT=1200 run_case restore ./shoal-snapshot-job ./shoal-vmm vmlinux initramfs.cpio /tmp/snapshot {restores}\n"),
        files: vec![
            (PathBuf::from(vmm), "shoal-vmm".into()),
            (job_bin, "shoal-snapshot-job".into()),
            (guest.join("vmlinux"), "vmlinux".into()),
            (guest.join("initramfs.cpio"), "initramfs.cpio".into()),
        ],
        limit: Duration::from_secs(30 * 60),
        interactive: false,
    };
    let mode = Mode::detect();
    let result = match run(&job, mode) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("shoal-bench-linux-restore: {e}");
            return ExitCode::from(1);
        }
    };
    let case = result.case("restore");
    let figure = |key: &str| {
        case.output.iter().find_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix(key).map(str::to_string)))
    };
    let (Some(restore), Some(create), true) = (
        figure("restore_spawn_to_output_ms_median="),
        figure("snapshot_create_ms="),
        case.has_line("snapshot_job result=ok"),
    ) else {
        eprintln!("shoal-bench-linux-restore: the job failed:\n{}", result.text());
        return ExitCode::from(1);
    };
    let where_ = if mode == Mode::Emulated { "emulated" } else { "direct" };
    println!("linux guest (vmlinux, 1 vCPU, 256 MiB, shell loop), {restores} restores ({where_}): spawn to next output median {restore} ms; snapshot create {create} ms");
    println!("linux_restore_spawn_to_output_ms_median_{where_}={restore}");
    println!("linux_snapshot_create_ms_{where_}={create}");
    ExitCode::SUCCESS
}
