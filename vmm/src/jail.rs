//! The jail: what `shoal-vmm --jail DIR --uid U --gid G` does before anything else, so that a
//! guest that takes over the VMM process finds itself unprivileged, alone, and with almost
//! nothing to see (Firecracker's jailer, built in).
//!
//! The process (root) sets up cgroups, then forks into a new PID namespace. The parent stays
//! outside, waits, removes the cgroups and exits with the child's status. The child is PID 1
//! of its namespace and:
//! 1. joins the VM's cgroups (cpu, memory, pids: cgroup v2 where the host has it, v1
//!    controllers otherwise), and optionally an existing network namespace;
//! 2. enters new mount, IPC and UTS namespaces, makes every mount private, and pivots into DIR
//!    (bind-mounted onto itself): the host filesystem is gone; DIR/dev is a fresh tmpfs holding
//!    only /dev/kvm and /dev/net/tun (owned by U:G), DIR/proc a proc of the new PID namespace;
//! 3. sets rlimits (open files, no core dumps), closes every inherited descriptor above stderr,
//!    drops to U:G with no supplementary groups, sets no_new_privs, and dies with its parent.
//!
//! Paths in the rest of the command line (kernel, initrd, disks, sockets, snapshots) are then
//! resolved inside DIR, as with Firecracker's jailer: put the files the VM needs there.

use std::ffi::CString;
use std::io;
use std::path::{Path, PathBuf};

/// What to confine the VMM in.
#[derive(Debug, Clone)]
pub struct JailConfig {
    /// The new root; created if missing.
    pub root: PathBuf,
    pub uid: u32,
    pub gid: u32,
    /// Names the VM's cgroup (`shoal-vmm/<id>`) and is the jail's hostname.
    pub id: String,
    pub limits: CgroupLimits,
    /// An existing network namespace to join (e.g. /var/run/netns/NAME).
    pub netns: Option<PathBuf>,
}

/// cgroup limits; absent fields are not limited.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CgroupLimits {
    /// CPU time as a number of CPUs (1.5 = 150 ms per 100 ms).
    pub cpus: Option<f64>,
    pub mem_mib: Option<u64>,
    pub pids: Option<u64>,
}

impl CgroupLimits {
    /// Parses `cpus=1.5,mem-mib=256,pids=64` (any subset).
    pub fn parse(spec: &str) -> Result<CgroupLimits, String> {
        let mut l = CgroupLimits::default();
        for part in spec.split(',').filter(|p| !p.is_empty()) {
            let bad = || format!("--cgroup: bad value in `{part}`");
            match part.split_once('=') {
                Some(("cpus", v)) => {
                    l.cpus = Some(
                        v.parse::<f64>()
                            .ok()
                            .filter(|c| c.is_finite() && *c >= 0.01 && *c <= 1024.0)
                            .ok_or_else(bad)?,
                    )
                }
                Some(("mem-mib", v)) => {
                    l.mem_mib = Some(v.parse::<u64>().ok().filter(|m| (1..=1 << 24).contains(m)).ok_or_else(bad)?)
                }
                Some(("pids", v)) => {
                    l.pids = Some(v.parse::<u64>().ok().filter(|p| (1..=1 << 22).contains(p)).ok_or_else(bad)?)
                }
                _ => return Err(format!("--cgroup: unknown part `{part}` (cpus=N, mem-mib=M, pids=P)")),
            }
        }
        Ok(l)
    }
}

/// Why the jail could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("the jail needs root (it creates namespaces, device nodes and cgroups)")]
    NotRoot,
    #[error("jail id `{0}` must be 1-64 letters, digits, '-' or '_'")]
    BadId(String),
    #[error("cannot {what}: {source}")]
    Sys { what: String, source: io::Error },
}

fn sys(what: impl Into<String>) -> impl FnOnce(io::Error) -> JailError {
    let what = what.into();
    move |source| JailError::Sys { what, source }
}

/// Turns a libc return value into a Result.
fn check(ret: libc::c_int, what: &str) -> Result<(), JailError> {
    if ret < 0 {
        return Err(JailError::Sys { what: what.to_string(), source: io::Error::last_os_error() });
    }
    Ok(())
}

fn cstr(p: &Path) -> Result<CString, JailError> {
    use std::os::unix::ffi::OsStrExt;
    CString::new(p.as_os_str().as_bytes()).map_err(|_| JailError::Sys {
        what: format!("use path {}", p.display()),
        source: io::ErrorKind::InvalidInput.into(),
    })
}

fn mount(
    src: Option<&str>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<(), JailError> {
    let owned = |s: Option<&str>| s.map(|s| CString::new(s).unwrap_or_default());
    let (src_c, fs_c, data_c, target_c) = (owned(src), owned(fstype), owned(data), cstr(target)?);
    let ptr = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: every pointer is null or a NUL-terminated string that outlives the call.
    let ret =
        unsafe { libc::mount(ptr(&src_c), target_c.as_ptr(), ptr(&fs_c), flags, ptr(&data_c) as *const libc::c_void) };
    check(ret, &format!("mount {} on {}", src.or(fstype).unwrap_or("?"), target.display()))
}

// ---- cgroups ------------------------------------------------------------------------------

/// The VM's cgroup directories and how to write limits into them.
#[derive(Debug)]
pub struct Cgroups {
    /// (controller or "" for v2, directory)
    dirs: Vec<(&'static str, PathBuf)>,
    v2: bool,
}

impl Cgroups {
    /// Where the host has cgroup v2 with the needed controllers, one directory there;
    /// otherwise one per v1 controller (cpu, memory, pids) that is mounted.
    fn create(id: &str, limits: &CgroupLimits) -> Result<Cgroups, JailError> {
        let root = Path::new("/sys/fs/cgroup");
        let v2_root = [root.to_path_buf(), root.join("unified")].into_iter().find(|r| {
            std::fs::read_to_string(r.join("cgroup.controllers"))
                .is_ok_and(|c| ["cpu", "memory", "pids"].iter().all(|w| c.split_whitespace().any(|x| x == *w)))
        });
        let cg = match v2_root {
            Some(r) => {
                // Best effort: the root may already delegate these controllers.
                let _ = std::fs::write(r.join("cgroup.subtree_control"), "+cpu +memory +pids");
                let parent = r.join("shoal-vmm");
                std::fs::create_dir_all(&parent).map_err(sys(format!("create {}", parent.display())))?;
                std::fs::write(parent.join("cgroup.subtree_control"), "+cpu +memory +pids")
                    .map_err(sys("enable cgroup controllers"))?;
                Cgroups { dirs: vec![("", parent.join(id))], v2: true }
            }
            None => {
                let dirs = ["cpu", "memory", "pids"]
                    .into_iter()
                    .filter(|c| root.join(c).join("cgroup.procs").exists())
                    .map(|c| (c, root.join(c).join("shoal-vmm").join(id)))
                    .collect();
                Cgroups { dirs, v2: false }
            }
        };
        for (_, d) in &cg.dirs {
            std::fs::create_dir_all(d).map_err(sys(format!("create cgroup {}", d.display())))?;
        }
        if let Err(e) = cg.set_limits(limits) {
            cg.remove();
            return Err(e);
        }
        Ok(cg)
    }

    fn write(&self, controller: &str, file: &str, value: &str) -> Result<(), JailError> {
        for (c, d) in &self.dirs {
            if c.is_empty() || *c == controller {
                let p = d.join(file);
                std::fs::write(&p, value).map_err(sys(format!("write {value} to {}", p.display())))?;
                return Ok(());
            }
        }
        Err(JailError::Sys {
            what: format!("limit {controller}"),
            source: io::Error::other(format!("the {controller} cgroup controller is not available on this host")),
        })
    }

    fn set_limits(&self, l: &CgroupLimits) -> Result<(), JailError> {
        const PERIOD: u64 = 100_000;
        if let Some(cpus) = l.cpus {
            let quota = ((cpus * PERIOD as f64) as u64).max(1000);
            if self.v2 {
                self.write("cpu", "cpu.max", &format!("{quota} {PERIOD}"))?;
            } else {
                self.write("cpu", "cpu.cfs_period_us", &PERIOD.to_string())?;
                self.write("cpu", "cpu.cfs_quota_us", &quota.to_string())?;
            }
        }
        if let Some(m) = l.mem_mib {
            self.write("memory", if self.v2 { "memory.max" } else { "memory.limit_in_bytes" }, &(m << 20).to_string())?;
        }
        if let Some(p) = l.pids {
            self.write("pids", "pids.max", &p.to_string())?;
        }
        Ok(())
    }

    /// Moves the calling process into every directory.
    fn join(&self) -> Result<(), JailError> {
        for (_, d) in &self.dirs {
            std::fs::write(d.join("cgroup.procs"), "0").map_err(sys(format!("join cgroup {}", d.display())))?;
        }
        Ok(())
    }

    /// Removes the directories (once no process is left in them).
    pub fn remove(&self) {
        for (_, d) in &self.dirs {
            let _ = std::fs::remove_dir(d);
        }
    }
}

// ---- entering the jail --------------------------------------------------------------------

/// What `enter` returns in the process that goes on to run the VM.
#[derive(Debug)]
pub enum Entered {
    /// This is the jailed child: continue.
    Jailed,
    /// This is the parent outside: the child exited with this code; exit with it.
    ParentDone(i32),
}

fn valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Sets up the jail. Must run before the process starts threads or opens anything it must not
/// keep. Returns in the jailed child (`Jailed`) and, when the child is gone, in the parent.
pub fn enter(cfg: &JailConfig) -> Result<Entered, JailError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(JailError::NotRoot);
    }
    if !valid_id(&cfg.id) {
        return Err(JailError::BadId(cfg.id.clone()));
    }
    std::fs::create_dir_all(&cfg.root).map_err(sys(format!("create {}", cfg.root.display())))?;
    let root = cfg.root.canonicalize().map_err(sys(format!("resolve {}", cfg.root.display())))?;
    let cgroups = Cgroups::create(&cfg.id, &cfg.limits)?;
    // SAFETY: unshare with namespace flags only changes this process's namespaces.
    if let Err(e) = check(unsafe { libc::unshare(libc::CLONE_NEWPID) }, "create a PID namespace") {
        cgroups.remove();
        return Err(e);
    }
    // SAFETY: fork in a single-threaded process (callers run this before starting threads);
    // the child only continues this function's straight-line setup.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        cgroups.remove();
        return Err(JailError::Sys { what: "fork into the jail".into(), source: io::Error::last_os_error() });
    }
    if pid > 0 {
        let code = wait_for_child(pid);
        cgroups.remove();
        return Ok(Entered::ParentDone(code));
    }
    match confine(cfg, &root, &cgroups) {
        Ok(()) => Ok(Entered::Jailed),
        Err(e) => {
            let _ = std::io::Write::write_all(&mut std::io::stderr(), format!("shoal-vmm: jail: {e}\n").as_bytes());
            // SAFETY: _exit ends the child without running the parent's atexit handlers.
            unsafe { libc::_exit(1) }
        }
    }
}

/// Waits for the jailed child, ending it on SIGTERM/SIGINT/SIGHUP; returns its exit code (128 +
/// the signal if it was killed).
fn wait_for_child(pid: libc::pid_t) -> i32 {
    CHILD.store(pid, std::sync::atomic::Ordering::SeqCst);
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        // SAFETY: the handler only calls kill, which is async-signal-safe.
        unsafe { libc::signal(sig, forward as *const () as libc::sighandler_t) };
    }
    loop {
        let mut status = 0;
        // SAFETY: status is a valid out pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            if libc::WIFEXITED(status) {
                return libc::WEXITSTATUS(status);
            }
            if libc::WIFSIGNALED(status) {
                let forwarded = FORWARDED.load(std::sync::atomic::Ordering::SeqCst);
                return 128 + if forwarded != 0 { forwarded } else { libc::WTERMSIG(status) };
            }
        } else if r < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return 1;
        }
    }
}

static CHILD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);
/// The signal the parent passed on, if any.
static FORWARDED: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

/// The child is PID 1 of its namespace, which ignores signals it has no handler for when they
/// come from outside; so a stop request ends it with SIGKILL (the VMM has no orderly shutdown
/// to lose) and the parent reports the signal it received.
extern "C" fn forward(sig: libc::c_int) {
    let pid = CHILD.load(std::sync::atomic::Ordering::SeqCst);
    if pid > 0 {
        FORWARDED.store(sig, std::sync::atomic::Ordering::SeqCst);
        // SAFETY: kill is async-signal-safe; pid is our child.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// The child's side: everything after the fork.
fn confine(cfg: &JailConfig, root: &Path, cgroups: &Cgroups) -> Result<(), JailError> {
    die_with_parent()?;
    cgroups.join()?;
    if let Some(ns) = &cfg.netns {
        let f = std::fs::File::open(ns).map_err(sys(format!("open network namespace {}", ns.display())))?;
        // SAFETY: f is an open namespace file.
        let joined = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
        check(joined, "join the network namespace")?;
    }
    // SAFETY: unshare with namespace flags only changes this process's namespaces.
    let unshared = unsafe { libc::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS) };
    check(unshared, "create mount, IPC and UTS namespaces")?;
    mount(None, Path::new("/"), None, libc::MS_REC | libc::MS_PRIVATE, None)?;
    mount(Some(&root.to_string_lossy()), root, None, libc::MS_BIND | libc::MS_REC, None)?;
    populate(root, cfg.uid, cfg.gid)?;
    pivot(root)?;
    let host = CString::new(cfg.id.as_str()).unwrap_or_default();
    // SAFETY: host is a valid buffer of the given length.
    check(unsafe { libc::sethostname(host.as_ptr(), cfg.id.len()) }, "set the hostname")?;
    set_rlimit(libc::RLIMIT_NOFILE, 4096)?;
    set_rlimit(libc::RLIMIT_CORE, 0)?;
    close_inherited_fds();
    drop_privileges(cfg.uid, cfg.gid)?;
    // SAFETY: prctl with PR_SET_NO_NEW_PRIVS takes integer arguments only.
    check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) }, "set no_new_privs")?;
    // Changing credentials cleared the parent-death signal.
    die_with_parent()
}

fn die_with_parent() -> Result<(), JailError> {
    // SAFETY: prctl with PR_SET_PDEATHSIG takes integer arguments only.
    check(unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) }, "set the parent-death signal")
}

/// DIR/dev: a tmpfs with /dev/kvm and /dev/net/tun owned by the VM's user; DIR/proc: a proc
/// of the new PID namespace (snapshots read /proc/self/pagemap).
fn populate(root: &Path, uid: u32, gid: u32) -> Result<(), JailError> {
    let dev = root.join("dev");
    std::fs::create_dir_all(&dev).map_err(sys(format!("create {}", dev.display())))?;
    mount(None, &dev, Some("tmpfs"), libc::MS_NOSUID | libc::MS_NOEXEC, Some("mode=0755,size=64k"))?;
    std::fs::create_dir_all(dev.join("net")).map_err(sys("create dev/net"))?;
    for (path, major, minor) in [(dev.join("kvm"), 10, 232), (dev.join("net/tun"), 10, 200)] {
        let c = cstr(&path)?;
        // SAFETY: c is a NUL-terminated path; makedev only packs numbers.
        let made = unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o660, libc::makedev(major, minor)) };
        check(made, &format!("create {}", path.display()))?;
        // SAFETY: as above.
        check(unsafe { libc::chown(c.as_ptr(), uid, gid) }, &format!("chown {}", path.display()))?;
    }
    let proc_dir = root.join("proc");
    std::fs::create_dir_all(&proc_dir).map_err(sys(format!("create {}", proc_dir.display())))?;
    mount(Some("proc"), &proc_dir, Some("proc"), libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC, None)
}

/// pivot_root into `root` and detach the old root.
fn pivot(root: &Path) -> Result<(), JailError> {
    std::env::set_current_dir(root).map_err(sys(format!("enter {}", root.display())))?;
    let old = CString::new(".").unwrap_or_default();
    // SAFETY: pivot_root(".", ".") stacks the old root under the new one (no directory
    // needed); both arguments are NUL-terminated strings.
    let pivoted = unsafe { libc::syscall(libc::SYS_pivot_root, old.as_ptr(), old.as_ptr()) } as libc::c_int;
    if pivoted < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
        return move_root();
    }
    check(pivoted, "pivot_root into the jail")?;
    // SAFETY: "." now holds the old root stacked on the new one; detaching it unmounts it.
    check(unsafe { libc::umount2(old.as_ptr(), libc::MNT_DETACH) }, "detach the host's root")?;
    std::env::set_current_dir("/").map_err(sys("enter the jail's root"))
}

/// A host running from its initramfs (a PXE-booted node) has rootfs as its root, which
/// pivot_root refuses. There the jail directory (the current directory) is moved over / and the
/// process chroots into it, as switch_root and runc's no-pivot mode do. The host's files stay
/// mounted underneath, out of reach: leaving a chroot takes CAP_SYS_CHROOT, which the uid drop
/// removes, and the mount namespace is the jail's own.
fn move_root() -> Result<(), JailError> {
    mount(Some("."), Path::new("/"), None, libc::MS_MOVE, None)?;
    let dot = CString::new(".").unwrap_or_default();
    // SAFETY: dot is a NUL-terminated path.
    check(unsafe { libc::chroot(dot.as_ptr()) }, "chroot into the jail")?;
    std::env::set_current_dir("/").map_err(sys("enter the jail's root"))
}

fn set_rlimit(resource: libc::__rlimit_resource_t, value: u64) -> Result<(), JailError> {
    let r = libc::rlimit { rlim_cur: value, rlim_max: value };
    // SAFETY: r is a valid rlimit.
    check(unsafe { libc::setrlimit(resource, &r) }, "set an rlimit")
}

/// Closes every descriptor above stderr that the process inherited.
fn close_inherited_fds() {
    // SAFETY: close_range on descriptors this process owns; nothing else holds them yet.
    let r = unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    if r < 0 {
        for fd in 3..4096 {
            // SAFETY: closing an unused number fails harmlessly.
            unsafe { libc::close(fd) };
        }
    }
}

fn drop_privileges(uid: u32, gid: u32) -> Result<(), JailError> {
    let groups = [gid];
    // SAFETY: groups is a valid array of one gid.
    check(unsafe { libc::setgroups(1, groups.as_ptr()) }, "drop supplementary groups")?;
    // SAFETY: integer arguments only.
    check(unsafe { libc::setresgid(gid, gid, gid) }, "switch to the jail's gid")?;
    // SAFETY: integer arguments only.
    check(unsafe { libc::setresuid(uid, uid, uid) }, "switch to the jail's uid")?;
    // Root must be unreachable now.
    // SAFETY: setuid(0) only checks that it fails.
    if uid != 0 && unsafe { libc::setuid(0) } == 0 {
        return Err(JailError::Sys { what: "drop root".into(), source: io::Error::other("setuid(0) still works") });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_limits_parse_and_refuse_nonsense() {
        assert_eq!(
            CgroupLimits::parse("cpus=1.5,mem-mib=256,pids=64"),
            Ok(CgroupLimits { cpus: Some(1.5), mem_mib: Some(256), pids: Some(64) })
        );
        assert_eq!(CgroupLimits::parse(""), Ok(CgroupLimits::default()));
        for bad in ["cpus=0", "cpus=nan", "mem-mib=0", "pids=-1", "disk=5", "cpus"] {
            assert!(CgroupLimits::parse(bad).is_err(), "{bad}");
        }
        assert!(valid_id("vm-1_a") && !valid_id("../x") && !valid_id(""));
    }
}
