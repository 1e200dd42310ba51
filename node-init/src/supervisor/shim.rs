//! `shoal-node shim`: the small process between the agent and one `shoal-vmm` (conmon's role for
//! containers). The agent starts it; it detaches at once into its own session, so the microVM
//! outlives the agent (a restarted agent finds it again through the instance directory), and:
//! - starts `shoal-vmm` with the given arguments, its stdin a pseudo-terminal (shoal-vmm forwards
//!   a terminal's input to the guest's serial port) fed from `console.sock`: whatever a client
//!   writes there is typed on the guest's console;
//! - copies the guest's console (shoal-vmm's stdout) into the bounded `console.log` and
//!   shoal-vmm's own messages (stderr) into `vmm.log`;
//! - records both pids with their start times, and how shoal-vmm ended in `exit.json`.
//!
//! It runs before any thread exists in its process (it forks), so `main` calls it before the
//! async runtime starts.

use std::io::{Read as _, Write as _};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::process::{Command, Stdio};

use super::layout::{BoundedLog, ExitRecord, InstanceDir, ProcessId, CONSOLE_FILE_MAX, VMM_LOG_MAX};
use crate::state::time::now_ms;

/// Detaches and supervises one shoal-vmm. Returns (in the process the agent started) once the
/// detached shim has recorded its pid; the exit status is that of this first process.
pub fn run(dir: &Path, vmm: &Path, args: &[String]) -> i32 {
    let inst = InstanceDir { path: dir.to_path_buf() };
    // SAFETY: called from `main` before any other thread exists; the child continues with
    // ordinary code of this single-threaded process.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        eprintln!("shoal-node shim: fork: {}", std::io::Error::last_os_error());
        return 1;
    }
    if pid > 0 {
        // The parent: record the detached child, then let the agent go on.
        return match ProcessId::of(pid).map(|p| inst.set_shim(&p)) {
            Some(Ok(())) => 0,
            _ => {
                eprintln!("shoal-node shim: cannot record the shim's pid in {}", dir.display());
                1
            }
        };
    }
    // SAFETY: setsid has no preconditions; it gives the shim its own session, out of reach of
    // signals sent to the agent's process group or terminal.
    unsafe { libc::setsid() };
    for sig in [libc::SIGHUP, libc::SIGPIPE, libc::SIGINT] {
        // SAFETY: ignoring a signal installs no handler code.
        unsafe { libc::signal(sig, libc::SIG_IGN) };
    }
    quiet_stdio();
    let code = supervise(&inst, vmm, args);
    std::process::exit(code)
}

/// Points stdin, stdout and stderr at /dev/null: the shim's terminal (if any) is the agent's.
fn quiet_stdio() {
    if let Ok(null) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/null") {
        use std::os::fd::AsRawFd;
        for fd in 0..3 {
            // SAFETY: dup2 onto the standard descriptors of this process.
            unsafe { libc::dup2(null.as_raw_fd(), fd) };
        }
    }
}

fn supervise(inst: &InstanceDir, vmm: &Path, args: &[String]) -> i32 {
    let mut vmm_log = BoundedLog::open(&inst.vmm_log(), None, VMM_LOG_MAX).ok();
    let note = |log: &mut Option<BoundedLog>, msg: &str| {
        if let Some(l) = log.as_mut() {
            let _ = l.write(format!("shoal-node shim: {msg}\n").as_bytes());
        }
    };
    let mut cmd = Command::new(vmm);
    cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    // The console's input: a terminal for shoal-vmm's stdin, fed from console.sock. Without one
    // the console is output only.
    let master = match open_pty() {
        Ok((master, slave)) => {
            cmd.stdin(Stdio::from(slave));
            Some(master)
        }
        Err(e) => {
            note(&mut vmm_log, &format!("no terminal for the console's input: {e}"));
            cmd.stdin(Stdio::null());
            None
        }
    };
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            note(&mut vmm_log, &format!("cannot start {}: {e}", vmm.display()));
            let _ = inst.set_exit(&ExitRecord { code: 127, at: now_ms() });
            return 0;
        }
    };
    drop(cmd); // Closes this process's copy of the terminal's slave side.
    if let Some(p) = ProcessId::of(child.id() as i32) {
        if let Err(e) = inst.set_vmm(&p) {
            note(&mut vmm_log, &format!("cannot record the VMM's pid: {e}"));
        }
    }
    if let Some(master) = master {
        if let Err(e) = serve_console_input(inst, master) {
            note(&mut vmm_log, &format!("no console input: {e}"));
        }
    }
    let console = BoundedLog::open(&inst.console(), Some(&inst.console_previous()), CONSOLE_FILE_MAX).ok();
    let out = child.stdout.take().map(|s| pump(s, console));
    let err = child.stderr.take().map(|s| pump(s, vmm_log.take()));
    let code = match child.wait() {
        Ok(status) => {
            use std::os::unix::process::ExitStatusExt;
            status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
        }
        Err(_) => 255,
    };
    for t in [out, err].into_iter().flatten() {
        let _ = t.join();
    }
    let _ = std::fs::remove_file(inst.console_input());
    let _ = inst.set_exit(&ExitRecord { code, at: now_ms() });
    0
}

/// A pseudo-terminal: (master, slave), the master not inherited by children.
fn open_pty() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let (mut master, mut slave) = (-1, -1);
    // SAFETY: openpty writes two descriptors into the given integers; the other arguments may be null.
    let r = unsafe { libc::openpty(&mut master, &mut slave, std::ptr::null_mut(), std::ptr::null(), std::ptr::null()) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: openpty succeeded: both are open descriptors this process now owns.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    // SAFETY: fcntl on a descriptor this process owns.
    unsafe { libc::fcntl(master.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    Ok((master, slave))
}

/// Types what clients write to `console.sock` on the terminal shoal-vmm reads its input from,
/// and reads (and drops) what the terminal sends back, so it never fills up.
fn serve_console_input(inst: &InstanceDir, master: OwnedFd) -> std::io::Result<()> {
    // Bound by a short relative name: socket paths are limited to 107 bytes.
    std::env::set_current_dir(&inst.path)?;
    let name = inst.console_input();
    let _ = std::fs::remove_file(&name);
    let listener = std::os::unix::net::UnixListener::bind(name.file_name().unwrap_or_default())?;
    let mut writer = std::fs::File::from(master.try_clone()?);
    let mut drain = std::fs::File::from(master);
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while matches!(drain.read(&mut buf), Ok(n) if n > 0) {}
    });
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut buf = [0u8; 4096];
            loop {
                match conn.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if writer.write_all(&buf[..n]).is_err() {
                            return;
                        }
                    }
                }
            }
        }
    });
    Ok(())
}

/// Copies a pipe into a log until the writer closes it.
fn pump(mut from: impl std::io::Read + Send + 'static, mut to: Option<BoundedLog>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 16 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    if let Some(log) = to.as_mut() {
                        if log.write(&buf[..n]).is_err() {
                            to = None; // A full disk must not stall the guest's console.
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    })
}
