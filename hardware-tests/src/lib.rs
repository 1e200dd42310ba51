//! Harness for full-Linux tests of `shoal-vmm`. A test hands over a job script and the files it
//! needs; the harness runs the job in the *emulated server* (QEMU under TCG with an AMD CPU
//! model, so that the Debian cloud kernel inside has a working KVM; see
//! ../shared/ENVIRONMENT.md) or, on a host whose CPU shows vmx/svm, directly on the host. Either
//! way it returns the console lines with the time each arrived.
//!
//! Jobs report with lines `SHOAL-HWTEST <case> exit=<code>`; `run_case` in `job-lib.sh`
//! prints them and prefixes each line of a case's output with `[<case>] `.

pub mod server;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::channel;
use std::time::{Duration, Instant};

/// Where a job runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Inside QEMU TCG with `-cpu EPYC` (nested SVM emulated), KVM modules loaded by /init.
    Emulated,
    /// On this host, which has hardware virtualization and /dev/kvm.
    Direct,
}

impl Mode {
    /// Direct where the CPU shows vmx or svm (unless SHOAL_HWTEST_MODE=emulated), else emulated.
    pub fn detect() -> Mode {
        if std::env::var("SHOAL_HWTEST_MODE").as_deref() == Ok("emulated") {
            return Mode::Emulated;
        }
        let flags = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let hw = flags
            .lines()
            .filter(|l| l.starts_with("flags"))
            .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
        if hw && Path::new("/dev/kvm").exists() {
            Mode::Direct
        } else {
            Mode::Emulated
        }
    }
}

/// One console line and when it arrived, from the start of the run.
#[derive(Debug, Clone)]
pub struct Line {
    pub at: Duration,
    pub text: String,
}

/// The console of one run.
#[derive(Debug)]
pub struct Run {
    pub mode: Mode,
    pub lines: Vec<Line>,
    pub finished: bool,
}

/// The outcome of one case of a job.
#[derive(Debug, Clone)]
pub struct Case {
    pub name: String,
    pub exit: Option<i32>,
    pub output: Vec<String>,
}

impl Run {
    /// The case called `name`: its exit line and its prefixed output.
    pub fn case(&self, name: &str) -> Case {
        let prefix = format!("[{name}] ");
        let exit_prefix = format!("SHOAL-HWTEST {name} exit=");
        let output =
            self.lines.iter().filter_map(|l| l.text.strip_prefix(&prefix).map(|s| s.trim_end().to_string())).collect();
        let exit =
            self.lines.iter().find_map(|l| l.text.strip_prefix(&exit_prefix).and_then(|v| v.trim().parse().ok()));
        Case { name: name.to_string(), exit, output }
    }

    pub fn text(&self) -> String {
        self.lines.iter().map(|l| format!("[{:8.3}] {}", l.at.as_secs_f64(), l.text)).collect::<Vec<_>>().join("\n")
    }
}

impl Case {
    pub fn has_line(&self, want: &str) -> bool {
        self.output.iter().any(|l| l == want)
    }
    pub fn has(&self, part: &str) -> bool {
        self.output.iter().any(|l| l.contains(part))
    }
}

/// Errors preparing or running a job.
#[derive(Debug)]
pub struct HarnessError(pub String);

impl std::fmt::Display for HarnessError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for HarnessError {}

fn err(msg: impl Into<String>) -> HarnessError {
    HarnessError(msg.into())
}

/// A file of the project's Linux guest (`$SHOAL_GUEST_DIR`, else target/guest, where `make
/// guest-kernel` puts it); panics saying how to build it when it is missing.
pub fn guest_file(name: &str) -> PathBuf {
    let dir =
        std::env::var_os("SHOAL_GUEST_DIR").map(PathBuf::from).unwrap_or_else(|| repo_root().join("target/guest"));
    let p = dir.join(name);
    assert!(p.exists(), "{} is missing: run `make guest-kernel`", p.display());
    p
}

/// The repository root (this crate lives in hardware-tests/).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn run_script(script: &Path, args: &[&str]) -> Result<String, HarnessError> {
    let out = Command::new("bash")
        .arg(script)
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| err(format!("cannot run {}: {e}", script.display())))?;
    if !out.status.success() {
        return Err(err(format!("{} failed ({})", script.display(), out.status)));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// A job: a shell script run as `sh job.sh` in a directory holding `files`.
#[derive(Debug)]
pub struct Job {
    pub script: String,
    /// (source, name in the job directory)
    pub files: Vec<(PathBuf, String)>,
    /// Wall-clock limit for the whole run (QEMU boot included).
    pub limit: Duration,
    /// Give the job the caller's terminal (for `make run`); no output is captured.
    pub interactive: bool,
}

/// Lines of `hardware-tests/emulated-server/job-lib.sh`, prepended to every job.
fn job_lib() -> Result<String, HarnessError> {
    let p = repo_root().join("hardware-tests/emulated-server/job-lib.sh");
    std::fs::read_to_string(&p).map_err(|e| err(format!("cannot read {}: {e}", p.display())))
}

fn stage(job: &Job) -> Result<PathBuf, HarnessError> {
    let dir = std::env::temp_dir().join(format!(
        "shoal-hwtest-{}-{}",
        std::process::id(),
        Instant::now().elapsed().as_nanos()
    ));
    let payload = dir.join("payload");
    std::fs::create_dir_all(&payload).map_err(|e| err(format!("cannot create {}: {e}", payload.display())))?;
    for (src, name) in &job.files {
        std::fs::copy(src, payload.join(name)).map_err(|e| err(format!("cannot stage {}: {e}", src.display())))?;
    }
    std::fs::write(payload.join("job.sh"), format!("{}\n{}\n", job_lib()?, job.script))
        .map_err(|e| err(format!("cannot write job.sh: {e}")))?;
    if !job.interactive {
        // Tells the emulated server's /init to print a heartbeat line the watchdog listens for.
        std::fs::write(payload.join("heartbeat"), "")
            .map_err(|e| err(format!("cannot write the heartbeat flag: {e}")))?;
    }
    Ok(dir)
}

/// Runs `job` where `mode` says and collects its console.
pub fn run(job: &Job, mode: Mode) -> Result<Run, HarnessError> {
    let dir = stage(job)?;
    let payload = dir.join("payload");
    let mut cmd = match mode {
        Mode::Direct => {
            let mut c = Command::new("sh");
            c.arg("job.sh").current_dir(&payload);
            c
        }
        Mode::Emulated => {
            let server = repo_root().join("hardware-tests/emulated-server");
            let kernel_dir = run_script(&server.join("fetch-kernel.sh"), &[])?;
            let initrd = dir.join("server.cpio.gz");
            run_script(
                &server.join("mkinitramfs.sh"),
                &[&kernel_dir, payload.to_str().unwrap_or_default(), initrd.to_str().unwrap_or_default()],
            )?;
            let mut c = Command::new("qemu-system-x86_64");
            // One CPU. In loops of guest boots and snapshot restores, guests hit QEMU's AMD-V
            // emulation fault (see outer-init) 3 times in about 330 runs with two server CPUs
            // and never in about 280 with one, which ran them as fast; the server itself
            // stalled in long loops either way (the retry below covers that).
            c.args(["-machine", "q35", "-accel", "tcg,thread=multi", "-cpu", "EPYC", "-smp", "1", "-m", "1536"])
                .arg("-kernel")
                .arg(Path::new(&kernel_dir).join("vmlinuz"))
                .arg("-initrd")
                .arg(&initrd)
                .args([
                    "-append",
                    "console=ttyS0 quiet panic=-1",
                    "-nographic",
                    "-no-reboot",
                    "-monitor",
                    "none",
                    "-nodefaults",
                    "-serial",
                    "stdio",
                ]);
            c
        }
    };
    if job.interactive {
        let status = cmd.status().map_err(|e| err(format!("cannot start the job: {e}")))?;
        let _ = std::fs::remove_dir_all(&dir);
        return Ok(Run { mode, lines: vec![], finished: status.success() });
    }
    let deadline = Instant::now() + job.limit;
    let mut notes = Vec::new();
    let mut attempt = 1;
    let result = loop {
        let outcome = run_once(&mut cmd, deadline, mode)?;
        match outcome.stalled {
            Some(why)
                if mode == Mode::Emulated
                    && attempt < MAX_ATTEMPTS
                    && Instant::now() + Duration::from_secs(120) < deadline =>
            {
                // The emulated server (QEMU TCG running a nested KVM) now and then hangs or
                // resets as a whole; the job is run again in a fresh server, and the console
                // says so.
                notes.push(Line {
                    at: Duration::ZERO,
                    text: format!("SHOAL-HARNESS attempt {attempt} abandoned: {why}; its last lines:"),
                });
                let tail = outcome.lines.len().saturating_sub(8);
                notes.extend(
                    outcome.lines[tail..]
                        .iter()
                        .map(|l| Line { at: l.at, text: format!("SHOAL-HARNESS (attempt {attempt}) {}", l.text) }),
                );
                attempt += 1;
            }
            _ => break outcome,
        }
    };
    let _ = std::fs::remove_dir_all(&dir);
    let mut lines = notes;
    lines.extend(result.lines);
    Ok(Run { mode, lines, finished: result.finished })
}

/// An emulated server whose data disks outlive it: booted again and again, and cut off mid-run
/// as a power cut would cut it (QEMU killed: the server's page cache and whatever it had not yet
/// written to its disks are gone; what it wrote stays, as on a disk without a volatile cache).
/// Each boot runs the same job; the kernel command line tells it which boot it is. (With no
/// disks, it is also how a test boots a server once and reads its console as it goes.)
#[derive(Debug)]
pub struct PowerCutServer {
    dir: PathBuf,
    kernel: PathBuf,
    initrd: PathBuf,
    disks: Vec<PathBuf>,
    /// Whether the job's server prints a heartbeat (non-interactive jobs).
    heartbeat: bool,
}

impl PowerCutServer {
    /// Stages `job` and `disks` blank ext4 disks of `disk_mib` MiB each (`/dev/vda`, ...).
    pub fn new(job: &Job, disks: usize, disk_mib: u64) -> Result<Self, HarnessError> {
        let dir = stage(job)?;
        let server = repo_root().join("hardware-tests/emulated-server");
        let kernel_dir = PathBuf::from(run_script(&server.join("fetch-kernel.sh"), &[])?);
        let initrd = dir.join("server.cpio.gz");
        let payload = dir.join("payload");
        run_script(
            &server.join("mkinitramfs.sh"),
            &[
                kernel_dir.to_str().unwrap_or_default(),
                payload.to_str().unwrap_or_default(),
                initrd.to_str().unwrap_or_default(),
            ],
        )?;
        let mut paths = Vec::new();
        for i in 0..disks {
            let disk = dir.join(format!("disk{i}.img"));
            let f = std::fs::File::create(&disk).map_err(|e| err(format!("cannot create {}: {e}", disk.display())))?;
            f.set_len(disk_mib << 20).map_err(|e| err(format!("cannot size {}: {e}", disk.display())))?;
            let out = Command::new("mkfs.ext4")
                .args(["-q", "-F"])
                .arg(&disk)
                .output()
                .map_err(|e| err(format!("cannot run mkfs.ext4 (package e2fsprogs): {e}")))?;
            if !out.status.success() {
                return Err(err(format!("mkfs.ext4 failed: {}", String::from_utf8_lossy(&out.stderr))));
            }
            paths.push(disk);
        }
        Ok(PowerCutServer {
            dir,
            kernel: kernel_dir.join("vmlinuz"),
            initrd,
            disks: paths,
            heartbeat: !job.interactive,
        })
    }

    /// Boots the server with `cmdline` appended to its kernel command line.
    pub fn boot(&self, cmdline: &str) -> Result<Boot, HarnessError> {
        // Two CPUs: no guest runs inside this server, so the AMD-V emulation fault that keeps
        // the other jobs on one does not arise.
        self.boot_with(cmdline, &BootOptions { cpus: 2, nic: None })
    }

    /// Boots the server as `opts` say, with `cmdline` appended to its kernel command line.
    pub fn boot_with(&self, cmdline: &str, opts: &BootOptions) -> Result<Boot, HarnessError> {
        let mut c = Command::new("qemu-system-x86_64");
        let cpus = opts.cpus.to_string();
        c.args(["-machine", "q35", "-accel", "tcg,thread=multi", "-cpu", "EPYC", "-smp", &cpus, "-m", "1536"])
            .arg("-kernel")
            .arg(&self.kernel)
            .arg("-initrd")
            .arg(&self.initrd)
            .arg("-append")
            .arg(format!("console=ttyS0 quiet panic=-1 {cmdline}"))
            .args(["-nographic", "-no-reboot", "-monitor", "none", "-nodefaults", "-serial", "stdio"]);
        for d in &self.disks {
            c.arg("-drive").arg(format!("file={},format=raw,if=virtio,cache=writeback", d.display()));
        }
        let _netns = if let Some(nic) = &opts.nic {
            let mac = nic.mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":");
            c.args(["-netdev", &format!("tap,id=n0,ifname={},script=no,downscript=no", nic.tap)])
                .args(["-device", &format!("virtio-net-pci,netdev=n0,mac={mac}")]);
            let netns = std::fs::File::open(&nic.netns)
                .map_err(|e| err(format!("cannot open the network namespace {}: {e}", nic.netns.display())))?;
            let fd = std::os::fd::AsRawFd::as_raw_fd(&netns);
            // SAFETY: setns is async-signal-safe; it runs in the child between fork and exec,
            // on a descriptor the parent keeps open until spawn returns (`_netns` below).
            unsafe {
                std::os::unix::process::CommandExt::pre_exec(&mut c, move || {
                    if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            Some(netns)
        } else {
            None
        };
        let child = c
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| err(format!("cannot start qemu-system-x86_64: {e}")))?;
        Ok(self.watch(child))
    }

    fn watch(&self, mut child: std::process::Child) -> Boot {
        let rx = console_lines(&mut child);
        Boot { child, rx, lines: Vec::new(), watch: self.heartbeat, last_sign: Instant::now(), stalled: false }
    }
}

/// How a [`PowerCutServer`] boots.
#[derive(Debug, Clone)]
pub struct BootOptions {
    /// One where microVMs run inside (see [`run`] on QEMU's AMD-V emulation fault).
    pub cpus: u32,
    /// A network card on a tap of the host's.
    pub nic: Option<Nic>,
}

/// The server's network card: a virtio-net on `tap`, which QEMU opens in `netns`
/// (`/run/netns/NAME`), where a test puts it on a bridge with other servers'.
#[derive(Debug, Clone)]
pub struct Nic {
    pub netns: PathBuf,
    pub tap: String,
    pub mac: [u8; 6],
}

impl Drop for PowerCutServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One boot of a [`PowerCutServer`].
#[derive(Debug)]
pub struct Boot {
    child: std::process::Child,
    rx: std::sync::mpsc::Receiver<Line>,
    /// Every console line so far.
    pub lines: Vec<Line>,
    /// Whether silence counts as a stall (the server prints a heartbeat).
    watch: bool,
    /// When the server last printed anything, heartbeats included.
    last_sign: Instant,
    stalled: bool,
}

impl Boot {
    /// The next console line (heartbeats aside) within `timeout`; None if none came, the
    /// server ended, or it went silent (see [`Boot::stalled`]).
    pub fn next_line(&mut self, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let now = Instant::now();
            let left = deadline.checked_duration_since(now)?;
            // A job with a heartbeat prints something every 20 s; silence means the server
            // as a whole is stuck (QEMU TCG now and then stalls), not the job.
            let silence_left = if self.watch {
                let Some(l) = SILENCE_LIMIT.checked_sub(now - self.last_sign) else {
                    self.stalled = true;
                    return None;
                };
                l
            } else {
                left
            };
            let line = match self.rx.recv_timeout(left.min(silence_left)) {
                Ok(line) => line,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => continue,
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return None,
            };
            self.last_sign = Instant::now();
            if line.text.contains(HEARTBEAT) {
                continue;
            }
            let text = line.text.clone();
            self.lines.push(line);
            return Some(text);
        }
    }

    /// Whether the server printed nothing, not even its heartbeat, for 75 s: its kernel (or
    /// QEMU's emulation of it) is stuck.
    pub fn stalled(&self) -> bool {
        self.stalled
    }

    /// Cuts the power: QEMU is killed at once.
    pub fn cut_power(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The console so far, with times.
    pub fn text(&self) -> String {
        self.lines.iter().map(|l| format!("[{:8.3}] {}", l.at.as_secs_f64(), l.text)).collect::<Vec<_>>().join("\n")
    }
}

impl Drop for Boot {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The lines `child` prints (stdout and stderr), each with when it arrived, from now on.
fn console_lines(child: &mut std::process::Child) -> std::sync::mpsc::Receiver<Line> {
    let start = Instant::now();
    let (tx, rx) = channel();
    for stream in [
        child.stdout.take().map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        child.stderr.take().map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).split(b'\n') {
                let Ok(line) = line else { break };
                let text = String::from_utf8_lossy(&line).trim_end_matches('\r').to_string();
                if tx.send(Line { at: start.elapsed(), text }).is_err() {
                    break;
                }
            }
        });
    }
    rx
}

/// How many times a job is started in a fresh emulated server when the server stalls.
const MAX_ATTEMPTS: u32 = 3;
/// The emulated server prints a heartbeat every 20 s (outer-init); this much silence means its
/// kernel is stuck.
const SILENCE_LIMIT: Duration = Duration::from_secs(75);
/// No job line (heartbeats aside) for this long means a case is stuck beyond `run_case`'s own
/// timeout and retry (2 × 180 s).
const PROGRESS_LIMIT: Duration = Duration::from_secs(450);
const HEARTBEAT: &str = "SHOAL-SERVER-ALIVE";
/// outer-init's last line, once the job has run.
const SERVER_DONE: &str = "SHOAL-SERVER done";

struct Attempt {
    lines: Vec<Line>,
    finished: bool,
    /// Why the attempt was abandoned as stalled, if it was.
    stalled: Option<String>,
}

fn run_once(cmd: &mut Command, deadline: Instant, mode: Mode) -> Result<Attempt, HarnessError> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| err(format!("cannot start the job: {e}")))?;
    let rx = console_lines(&mut child);
    let mut lines = Vec::new();
    let mut finished = false;
    let mut stalled = None;
    let (mut last_line, mut last_progress) = (Instant::now(), Instant::now());
    let watch = mode == Mode::Emulated;
    loop {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        if watch && now - last_line > SILENCE_LIMIT {
            stalled = Some(format!("the server printed nothing for {} s", SILENCE_LIMIT.as_secs()));
            break;
        }
        if watch && now - last_progress > PROGRESS_LIMIT {
            stalled = Some(format!("no job output for {} s", PROGRESS_LIMIT.as_secs()));
            break;
        }
        match rx.recv_timeout((deadline - now).min(Duration::from_secs(1))) {
            Ok(line) => {
                last_line = Instant::now();
                if line.text.contains(HEARTBEAT) {
                    continue;
                }
                last_progress = last_line;
                let lockup = watch && line.text.contains("soft lockup");
                lines.push(line);
                if lockup {
                    stalled = Some("the server's kernel reported a soft lockup".to_string());
                    break;
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                // QEMU runs with -no-reboot: a server that reset (its kernel triple-faulted,
                // which QEMU's emulation of AMD-V now and then makes it do) ends QEMU before
                // /init's last line.
                finished = !watch || lines.iter().any(|l: &Line| l.text.contains(SERVER_DONE));
                if !finished {
                    stalled = Some("the server ended without finishing the job (its kernel reset)".to_string());
                }
                break;
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    Ok(Attempt { lines, finished, stalled })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `script` after job-lib.sh with a fake fault trace file; returns its output.
    fn job_lib_run(script: &str) -> String {
        let dir = std::env::temp_dir().join(format!("shoal-joblib-{}-{}", std::process::id(), script.len()));
        std::fs::create_dir_all(&dir).unwrap();
        let trace = dir.join("trace");
        std::fs::write(&trace, "").unwrap();
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!("{}\n{script}", job_lib().unwrap()))
            .env("SHOAL_EMULATOR_FAULT_TRACE", &trace)
            .current_dir(&dir)
            .output()
            .unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    #[test]
    fn a_case_that_failed_after_an_emulator_fault_is_run_again_and_only_the_second_run_counts() {
        // First run: the "server" records a guest exit at a host address, the case fails.
        let out = job_lib_run(
            r#"run_case flaky sh -c 'if [ -e ran ]; then echo second; else touch ran; echo "vcpu0 kvm_exit: reason npf rip 0xffffffffc03f9dcc" >> "$SHOAL_EMULATOR_FAULT_TRACE"; echo first; exit 2; fi'"#,
        );
        assert!(
            out.contains("SHOAL-HWTEST-RETRY flaky (the emulator ran a guest at a host address: vcpu0 kvm_exit"),
            "{out}"
        );
        assert!(out.contains("[flaky] second") && !out.contains("[flaky] first"), "{out}");
        assert!(out.contains("SHOAL-HWTEST flaky exit=0"), "{out}");
    }

    #[test]
    fn a_case_that_failed_without_an_emulator_fault_is_not_run_again() {
        let out = job_lib_run("run_case broken sh -c 'echo once >> runs; exit 2'; cat runs");
        assert!(!out.contains("SHOAL-HWTEST-RETRY"), "{out}");
        assert!(out.contains("SHOAL-HWTEST broken exit=2"), "{out}");
        assert_eq!(out.matches("once").count(), 1, "{out}");
    }

    #[test]
    fn a_server_that_ends_before_its_last_line_counts_as_reset_not_finished() {
        let deadline = Instant::now() + Duration::from_secs(30);
        let reset =
            run_once(Command::new("sh").args(["-c", "echo SHOAL-SERVER kvm=yes"]), deadline, Mode::Emulated).unwrap();
        assert!(!reset.finished);
        assert!(reset.stalled.is_some_and(|why| why.contains("reset")));
        let done =
            run_once(Command::new("sh").args(["-c", "echo job; echo 'SHOAL-SERVER done'"]), deadline, Mode::Emulated)
                .unwrap();
        assert!(done.finished && done.stalled.is_none());
        // On a VMX/SVM host the job is job.sh itself, which has no such line.
        let direct = run_once(Command::new("sh").args(["-c", "echo job"]), deadline, Mode::Direct).unwrap();
        assert!(direct.finished && direct.stalled.is_none());
    }
}
