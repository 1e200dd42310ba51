//! `shoal-node` as PID 1 of the host image: it mounts what a node needs, loads its kernel
//! modules, finds (and on first boot formats) the data disk, brings up the uplink through
//! netstack (DHCP or `ip=`), then runs the agent (`shoal-node agent`, a child it restarts if it
//! dies) and reaps every orphan. It never exits: SIGTERM and SIGINT (Ctrl+Alt+Del) reboot after
//! an ordered shutdown, SIGUSR2 and SIGPWR power off, and a fatal error is logged, synced and
//! followed by a reboot after a countdown. The ordered shutdown first has the agent hand over
//! (SIGUSR1: its instances are replaced on other nodes, another node leads, its microVMs are
//! stopped), then ends what is left, syncs and unmounts.
//!
//! Boot runs as named phases; each is printed on the console (`shoal: phase NAME: ...`) and
//! written to `/run/shoal/phase`.

pub mod boot_count;
pub mod cmdline;
pub mod console;
pub mod disk;
pub mod maintenance;
pub mod modules;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use cmdline::{BootConfig, API_PORT};

/// Where the data disk is mounted.
pub const DATA_MOUNT: &str = "/var/lib/shoal";
/// The data directory of a node without a data disk (lost at every reboot).
pub const RAM_DATA: &str = "/run/shoal/ram";
/// The boot configuration stored on the data disk.
pub const BOOT_FILE: &str = "boot.json";
/// Where the image keeps mke2fs.
const MKE2FS: &str = "/sbin/mke2fs";
/// How long the agent must have run for a boot to count as good (its boot entry blessed).
const BOOT_GOOD_AFTER: Duration = Duration::from_secs(15);
/// How long the agent has to stop when asked before it is killed.
const AGENT_STOP_WAIT: Duration = Duration::from_secs(10);
/// How long an agent has to hand over and stop when the node shuts down (it gives up on
/// the hand-over after 25 s).
const NODE_STOP_WAIT: Duration = Duration::from_secs(30);
/// Seconds between a fatal error and the reboot.
const FATAL_COUNTDOWN: u64 = 10;

pub(crate) fn say(msg: &str) {
    // The console is stderr (fds 0-2 are /dev/console); the kernel log gets it too when the
    // console is not watched.
    eprintln!("shoal: {msg}");
}

/// Every phase of this boot so far: name, detail, seconds since the kernel started.
static PHASES: std::sync::Mutex<Vec<(String, String, f64)>> = std::sync::Mutex::new(Vec::new());
/// The boot's phases as JSON, for the agent's API (`boot_phases` in `/v1/cluster/status`).
pub const PHASES_FILE: &str = "/run/shoal/phases.json";

/// Enters a boot phase: printed, and written where the agent and console can read it.
pub fn phase(name: &str, detail: &str) {
    say(&format!("phase {name}: {detail}"));
    let uptime = std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|u| u.split_whitespace().next().and_then(|s| s.parse().ok()))
        .unwrap_or(0.0);
    let mut phases = PHASES.lock().unwrap_or_else(|e| e.into_inner());
    phases.push((name.to_string(), detail.to_string(), uptime));
    let json: Vec<_> = phases.iter().map(|(n, d, t)| serde_json::json!({"phase": n, "detail": d, "at_s": t})).collect();
    let _ = std::fs::create_dir_all("/run/shoal");
    let _ = std::fs::write("/run/shoal/phase", format!("{name}\n{detail}\n"));
    let _ = std::fs::write(PHASES_FILE, serde_json::to_vec(&json).unwrap_or_default());
}

/// The phase the boot is in (or ended in), with its detail.
pub fn current_phase() -> (String, String) {
    let phases = PHASES.lock().unwrap_or_else(|e| e.into_inner());
    phases.last().map(|(n, d, _)| (n.clone(), d.clone())).unwrap_or_default()
}

pub(crate) fn c(s: &str) -> std::ffi::CString {
    std::ffi::CString::new(s).unwrap_or_default()
}

pub(crate) fn mount(src: &str, target: &str, fstype: &str, flags: libc::c_ulong, data: &str) -> std::io::Result<()> {
    let _ = std::fs::create_dir_all(target);
    let (src, target, fstype, data) = (c(src), c(target), c(fstype), c(data));
    // SAFETY: every pointer is a NUL-terminated string that outlives the call.
    let r = unsafe {
        libc::mount(src.as_ptr(), target.as_ptr(), fstype.as_ptr(), flags, data.as_ptr() as *const libc::c_void)
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The early mounts. A failure is fatal: nothing else works without them.
fn early_mounts() -> Result<(), String> {
    let nosuid = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    for (src, target, fstype, flags, data) in [
        ("proc", "/proc", "proc", nosuid, ""),
        ("sysfs", "/sys", "sysfs", nosuid, ""),
        ("devtmpfs", "/dev", "devtmpfs", libc::MS_NOSUID, "mode=0755"),
        ("devpts", "/dev/pts", "devpts", libc::MS_NOSUID | libc::MS_NOEXEC, "gid=5,mode=0620,ptmxmode=0666"),
        ("tmpfs", "/dev/shm", "tmpfs", libc::MS_NOSUID | libc::MS_NODEV, "mode=1777"),
        ("tmpfs", "/run", "tmpfs", libc::MS_NOSUID | libc::MS_NODEV, "mode=0755"),
        ("tmpfs", "/tmp", "tmpfs", libc::MS_NOSUID | libc::MS_NODEV, "mode=1777"),
        ("cgroup2", "/sys/fs/cgroup", "cgroup2", nosuid, "nsdelegate"),
    ] {
        match mount(src, target, fstype, flags, data) {
            Ok(()) => {}
            // The kernel mounts devtmpfs itself with CONFIG_DEVTMPFS_MOUNT.
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
            Err(e) => return Err(format!("mount {fstype} on {target}: {e}")),
        }
    }
    // The controllers the jail limits microVMs with, for the children of the root.
    let _ = std::fs::write("/sys/fs/cgroup/cgroup.subtree_control", "+cpu +memory +pids");
    Ok(())
}

/// Makes fds 0, 1 and 2 the console (the kernel opens it for init only when the initramfs
/// has /dev/console; devtmpfs has it now).
fn open_console() {
    let Ok(f) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/console") else { return };
    let fd = std::os::fd::IntoRawFd::into_raw_fd(f);
    for target in 0..3 {
        // SAFETY: dup2 on a descriptor this process owns; replacing 0-2 is the intent.
        unsafe { libc::dup2(fd, target) };
    }
    if fd > 2 {
        // SAFETY: fd is ours and no longer used.
        unsafe { libc::close(fd) };
    }
}

pub(crate) fn sync() {
    // SAFETY: sync takes no arguments and cannot fail.
    unsafe { libc::sync() };
}

fn reboot(cmd: libc::c_int) {
    // SAFETY: reboot with one of the kernel's LINUX_REBOOT_CMD values; it returns only on error.
    unsafe { libc::reboot(cmd) };
}

/// Logs a fatal error, syncs, counts down on the console and reboots. PID 1 never exits (the
/// kernel would panic).
pub fn fatal(msg: &str) -> ! {
    phase("failed", msg);
    sync();
    for left in (1..=FATAL_COUNTDOWN).rev() {
        say(&format!("rebooting in {left} s"));
        std::thread::sleep(Duration::from_secs(1));
    }
    reboot(libc::RB_AUTOBOOT);
    // Only without CAP_SYS_BOOT; there is nothing left to do but wait.
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Starts `cmd`'s process with no signal blocked. PID 1 blocks the signals it waits for with
/// sigtimedwait, a blocked mask is inherited across fork and exec, and std's `Command` keeps
/// it: an agent started without this never sees SIGTERM or SIGUSR1 (it is killed at the end of
/// its wait instead), and nor do the VMMs it starts.
pub(crate) fn unblocked_signals(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the hook runs in the child between fork and exec and only calls sigemptyset and
    // pthread_sigmask on a local set, which are async-signal-safe and allocate nothing.
    unsafe {
        cmd.pre_exec(|| {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::pthread_sigmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
            Ok(())
        });
    }
}

/// The signals PID 1 waits for (blocked everywhere, taken with sigtimedwait).
fn signal_set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset and sigaddset initialise it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGCHLD, libc::SIGTERM, libc::SIGINT, libc::SIGUSR1, libc::SIGUSR2, libc::SIGPWR, libc::SIGHUP]
        {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

/// Set while a thread of PID 1 waits for a child of its own (mke2fs): the main loop's
/// `waitpid(-1)` must not take that child's status first.
static OWN_WAIT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Runs `f` (which spawns and waits for a child) with the orphan reaper paused.
fn waiting_for_own_child<T>(f: impl FnOnce() -> T) -> T {
    use std::sync::atomic::Ordering;
    OWN_WAIT.fetch_add(1, Ordering::SeqCst);
    let r = f();
    OWN_WAIT.fetch_sub(1, Ordering::SeqCst);
    r
}

/// Reaps every exited child; returns the pids with their raw wait status.
fn reap() -> Vec<(i32, i32)> {
    let mut out = Vec::new();
    if OWN_WAIT.load(std::sync::atomic::Ordering::SeqCst) > 0 {
        return out;
    }
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes the status into a local.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid <= 0 {
            return out;
        }
        out.push((pid, status));
    }
}

/// What the boot thread hands the main loop once the node can run its agent.
#[derive(Debug, Clone)]
pub struct AgentPlan {
    pub data_dir: PathBuf,
    pub listen: std::net::SocketAddr,
    pub config: BootConfig,
    pub secret_file: Option<PathBuf>,
}

impl AgentPlan {
    /// `shoal-node agent`'s arguments.
    pub fn args(&self) -> Vec<String> {
        let mut a = vec![
            "agent".to_string(),
            "--data-dir".into(),
            self.data_dir.join("node").display().to_string(),
            "--listen".into(),
            self.listen.to_string(),
            "--min-voters".into(),
            self.config.min_voters.unwrap_or(3).to_string(),
        ];
        for s in &self.config.seeds {
            a.extend(["--seed".into(), s.clone()]);
        }
        // No seed: find the other servers on the LAN (a rack booted from one PXE script).
        if self.config.seeds.is_empty() {
            a.push("--discover".into());
        }
        if let Some(l) = &self.config.labels {
            a.extend(["--labels".into(), l.clone()]);
        }
        if let Some(f) = &self.secret_file {
            a.extend(["--secret-file".into(), f.display().to_string()]);
        }
        a
    }
}

/// The data disk: mounted at [`DATA_MOUNT`], or the RAM directory with the reason.
fn data_disk(cfg: &BootConfig) -> PathBuf {
    let ram = |why: &str| {
        phase("data", &format!("{why}: running from RAM ({RAM_DATA}); nothing survives a reboot"));
        let _ = std::fs::create_dir_all(RAM_DATA);
        PathBuf::from(RAM_DATA)
    };
    let dev = match cfg.data.as_deref() {
        Some("ram") => return ram("shoal.data=ram"),
        Some(d) => PathBuf::from(d),
        None => match disk::find_by_label(Path::new("/sys"), disk::DATA_LABEL) {
            Some(d) => d,
            None => return ram(&format!("no partition labelled {}", disk::DATA_LABEL)),
        },
    };
    match disk::probe(&dev) {
        Ok(disk::Contents::Ext4) => {}
        Ok(disk::Contents::Blank) => {
            phase("data", &format!("{} is blank: formatting it (first boot)", dev.display()));
            if let Err(e) = waiting_for_own_child(|| disk::format(Path::new(MKE2FS), &dev)) {
                return ram(&e);
            }
        }
        Ok(disk::Contents::Unknown) => {
            let why = format!(
                "{} holds something that is not ext4 (left as it is; clear it to let the node format it)",
                dev.display()
            );
            return ram(&why);
        }
        Err(e) => return ram(&format!("cannot read {}: {e}", dev.display())),
    }
    if let Err(e) = mount(&dev.display().to_string(), DATA_MOUNT, "ext4", libc::MS_NOSUID | libc::MS_NODEV, "") {
        return ram(&format!("cannot mount {} (ext4): {e} (the file system may be damaged)", dev.display()));
    }
    phase("data", &format!("{} mounted on {DATA_MOUNT}", dev.display()));
    PathBuf::from(DATA_MOUNT)
}

/// Stores the boot configuration on the data disk (or the RAM directory) for later boots.
fn store(data: &Path, config: &BootConfig) {
    let json = serde_json::to_vec_pretty(config).unwrap_or_default();
    if let Err(e) = crate::durable::write_private(&data.join(BOOT_FILE), &json) {
        say(&format!("cannot store the boot configuration: {e}"));
    }
}

/// Fetches the cluster secret from `url` (`http://HOST[:PORT]/PATH`, a provisioning server on
/// the boot network, as iPXE fetched the kernel), retrying for a minute while it does not answer.
async fn fetch_secret(url: &str) -> Result<String, String> {
    let rest = url.strip_prefix("http://").ok_or("only http:// URLs are fetched (a server on the boot network)")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let target = if authority.contains(':') { authority.to_string() } else { format!("{authority}:80") };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let attempt = tokio::time::timeout(Duration::from_secs(10), http_get(&target, authority, path)).await;
        let why = match attempt {
            Ok(Ok(body)) => {
                let secret = String::from_utf8(body).map_err(|_| "the answer is not text".to_string())?;
                crate::cluster::secret::check_strength(&secret)?;
                return Ok(secret.trim().to_string());
            }
            Ok(Err(e)) => e,
            Err(_) => "no answer within 10 s".into(),
        };
        if Instant::now() > deadline {
            return Err(why);
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// One HTTP/1.0 GET; the body of a 200 answer (at most 64 KiB).
async fn http_get(target: &str, host: &str, path: &str) -> Result<Vec<u8>, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(target).await.map_err(|e| format!("connecting to {target}: {e}"))?;
    let req = format!("GET {path} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: shoal-node\r\nConnection: close\r\n\r\n");
    conn.write_all(req.as_bytes()).await.map_err(|e| e.to_string())?;
    let mut answer = Vec::new();
    conn.take(64 << 10).read_to_end(&mut answer).await.map_err(|e| e.to_string())?;
    let split = answer.windows(4).position(|w| w == b"\r\n\r\n").ok_or("the answer is not HTTP")?;
    let head = String::from_utf8_lossy(&answer[..split]).into_owned();
    let status = head.lines().next().unwrap_or("");
    if status.split_whitespace().nth(1) != Some("200") {
        return Err(format!("the server answered {status:?}"));
    }
    Ok(answer[split + 4..].to_vec())
}

/// Mixes the seed an earlier boot saved into the kernel's pool and saves a new one.
fn seed_rng(data: &Path) {
    let file = data.join("random-seed");
    if let Ok(old) = std::fs::read(&file) {
        let _ = std::fs::write("/dev/urandom", old);
    }
    let mut fresh = [0u8; 512];
    if std::fs::File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut fresh)).is_ok() {
        let _ = crate::durable::write_private(&file, &fresh);
    }
}

fn set_hostname(name: &str) {
    let _ = std::fs::write("/proc/sys/kernel/hostname", name);
    let _ = std::fs::create_dir_all("/etc");
    let _ = std::fs::write("/etc/hostname", format!("{name}\n"));
}

/// The uplink: up, addressed (DHCP, kept renewed by this thread, or static), and its address.
async fn network(cfg: &BootConfig) -> Result<(Ipv4Addr, Option<[u8; 6]>), String> {
    use shoal_netstack::dhcp;
    let nl = shoal_netstack::netlink::Netlink::connect().map_err(|e| e.to_string())?;
    let links = nl.links().await.map_err(|e| e.to_string())?;
    if let Some(lo) = links.iter().find(|l| l.name == "lo") {
        nl.set(lo.index, None, None, true).await.map_err(|e| format!("bringing up lo: {e}"))?;
    }
    let uplink = dhcp::parse_ip_arg(cfg.ip.as_deref().unwrap_or("dhcp")).map_err(|e| e.to_string())?;
    let wanted = match &uplink {
        dhcp::Uplink::Off => return Ok((Ipv4Addr::LOCALHOST, None)),
        dhcp::Uplink::Dhcp { device } | dhcp::Uplink::Static { device, .. } => device.clone(),
    };
    // Every Ethernet link up, then the named one or the first with a carrier.
    let ethernet: Vec<_> = links.iter().filter(|l| l.name != "lo" && l.mac.is_some() && l.kind.is_none()).collect();
    for l in &ethernet {
        let _ = nl.set(l.index, None, None, true).await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let device = loop {
        let now = nl.links().await.map_err(|e| e.to_string())?;
        let pick = match &wanted {
            Some(name) => now.iter().find(|l| &l.name == name).cloned(),
            None => now
                .iter()
                .filter(|l| ethernet.iter().any(|e| e.index == l.index))
                .find(|l| l.carrier)
                .cloned()
                .or_else(|| (Instant::now() > deadline).then(|| ethernet.first().map(|l| (*l).clone())).flatten()),
        };
        if let Some(l) = pick {
            break l;
        }
        if Instant::now() > deadline + Duration::from_secs(20) {
            return Err(match &wanted {
                Some(n) => format!("no network link named {n}"),
                None => "no Ethernet link found".into(),
            });
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    if let dhcp::Uplink::Static { address, prefix, gateway, dns, .. } = &uplink {
        nl.set(device.index, None, None, true).await.map_err(|e| e.to_string())?;
        nl.add_address(device.index, *address, *prefix).await.map_err(|e| e.to_string())?;
        if let Some(g) = gateway {
            nl.add_default_route(*g, device.index).await.map_err(|e| e.to_string())?;
        }
        let resolv: String = dns.iter().map(|d| format!("nameserver {d}\n")).collect();
        let _ = std::fs::write("/etc/resolv.conf", resolv);
        phase("network", &format!("{} has {address}/{prefix} (ip= on the command line)", device.name));
        return Ok((*address, device.mac));
    }
    phase("network", &format!("asking for a DHCP lease on {}", device.name));
    let mut client_cfg = dhcp::Config::new(&device.name);
    client_cfg.hostname = cfg.hostname.clone();
    let mut client = dhcp::Client::new(nl.clone(), client_cfg).await.map_err(|e| e.to_string())?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let name = device.name.clone();
    tokio::spawn(async move {
        let r = client
            .run(std::future::pending::<()>(), |e| match e {
                dhcp::Event::Bound(l) => {
                    let _ = std::fs::write("/etc/resolv.conf", l.resolv_conf());
                    say(&format!("{name}: leased {}/{} from {}", l.address, l.prefix, l.server));
                    let _ = tx.send(l.address);
                }
                dhcp::Event::Expired(l) => say(&format!("{name}: the lease of {} ran out", l.address)),
                dhcp::Event::Nak { server, .. } => say(&format!("{name}: {server} refused our address")),
                dhcp::Event::LinkDown => say(&format!("{name}: link down")),
                _ => {}
            })
            .await;
        if let Err(e) = r {
            say(&format!("the DHCP client on {name} stopped: {e}"));
        }
    });
    let address = rx.recv().await.ok_or_else(|| format!("the DHCP client on {} stopped", device.name))?;
    phase("network", &format!("{} has {address} (DHCP)", device.name));
    Ok((address, device.mac))
}

/// The boot, after the early mounts: modules, data disk, configuration, network. Sends the
/// agent's plan, then keeps the uplink's lease renewed.
fn boot(tx: mpsc::Sender<AgentPlan>) -> Result<(), String> {
    phase("modules", "loading the node's kernel modules");
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let dir = Path::new("/lib/modules").join(release.trim());
    match modules::load_node_modules(&dir, &modules::node_modules()) {
        Ok(l) => {
            for (name, e) in &l.failed {
                say(&format!("module {name}: {e}"));
            }
            phase(
                "modules",
                &format!(
                    "{} loaded, {} failed ({} drivers for hardware this server lacks not loaded)",
                    l.loaded,
                    l.failed.len(),
                    l.skipped
                ),
            );
        }
        Err(e) => phase("modules", &format!("no module list in {} ({e}): using what is built in", dir.display())),
    }
    let given = cmdline::parse(&std::fs::read_to_string("/proc/cmdline").unwrap_or_default());
    for k in &given.unknown {
        say(&format!("unknown key {k} on the kernel command line (ignored)"));
    }
    for e in &given.errors {
        say(e);
    }
    phase("data", "looking for the data disk");
    let data = data_disk(&given);
    seed_rng(&data);
    let stored: BootConfig =
        std::fs::read(data.join(BOOT_FILE)).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
    let mut config = given.over(&stored);
    if config != stored {
        store(&data, &config);
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    phase("network", "bringing up the uplink");
    let (address, mac) = rt.block_on(network(&config))?;
    let hostname = config.hostname.clone().unwrap_or_else(|| match mac {
        Some(m) => format!("shoal-{:02x}{:02x}{:02x}", m[3], m[4], m[5]),
        None => "shoal".into(),
    });
    set_hostname(&hostname);
    // shoal.secret_url= on this boot's command line (without shoal.secret=) is fetched, and wins
    // over a stored secret; a stored URL whose secret never came is tried again. When the
    // server does not answer, the stored secret (if any) is used.
    let fetch = given.secret.is_none() && (given.secret_url.is_some() || config.secret.is_none());
    if let Some(url) = config.secret_url.clone().filter(|_| fetch) {
        phase("secret", &format!("fetching the cluster secret from {url}"));
        match rt.block_on(fetch_secret(&url)) {
            Ok(secret) => {
                config.secret = Some(secret);
                store(&data, &config);
                phase("secret", &format!("fetched from {url} and stored with the boot configuration"));
            }
            Err(e) => say(&format!("cannot fetch the cluster secret from {url}: {e}")),
        }
    }
    // No secret and no cluster: wait to be told (shoalctl node configure).
    if config.secret.is_none() && !data.join("node/tls/ca.crt").exists() {
        let listen = std::net::SocketAddr::new(address.into(), API_PORT);
        let token = maintenance::new_token();
        let how = format!(
            "shoalctl node configure --endpoint {listen} --token {} --secret-file FILE [--seed HOST]",
            maintenance::shown(&token)
        );
        *console::MAINTENANCE.lock().unwrap_or_else(|e| e.into_inner()) = Some(how.clone());
        phase("maintenance", &format!("no cluster secret: waiting to be configured on https://{listen}"));
        say(&format!(
            "maintenance token {} (the node's one-time token; from a client: {how})",
            maintenance::shown(&token)
        ));
        let asked = rt.block_on(maintenance::serve(listen, &token, &hostname));
        *console::MAINTENANCE.lock().unwrap_or_else(|e| e.into_inner()) = None;
        config = asked?.over(&config);
        store(&data, &config);
        if let Some(h) = &config.hostname {
            set_hostname(h);
        }
        phase("maintenance", "configured: the configuration is stored; starting the agent with it");
    }
    let hostname = config.hostname.clone().unwrap_or(hostname);
    let secret_file = match &config.secret {
        Some(s) => {
            let f = PathBuf::from("/run/shoal/secret");
            crate::durable::write_private(&f, s.as_bytes()).map_err(|e| format!("writing {}: {e}", f.display()))?;
            Some(f)
        }
        None => None,
    };
    let plan =
        AgentPlan { data_dir: data, listen: std::net::SocketAddr::new(address.into(), API_PORT), config, secret_file };
    phase("agent", &format!("starting the agent ({hostname}, API on https://{})", plan.listen));
    tx.send(plan).map_err(|_| "the main loop is gone".to_string())?;
    // The DHCP client's task runs on this runtime: keep it turning.
    rt.block_on(std::future::pending::<()>());
    Ok(())
}

/// The agent child and when to restart it.
struct Agent {
    plan: Option<AgentPlan>,
    pid: Option<i32>,
    restarts: u32,
    next_start: Instant,
    /// Stopped on purpose to restart with a new plan (the console's `join`).
    replacing: bool,
    /// When it was asked to stop for that (it is killed if it lingers).
    replacing_since: Instant,
    /// When the running agent was started.
    started_at: Instant,
}

impl Agent {
    fn start(&mut self) {
        let Some(plan) = &self.plan else { return };
        let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/init"));
        // The console is the management console's: the agent's output goes to its log.
        let mut cmd = std::process::Command::new(exe);
        unblocked_signals(&mut cmd);
        let spawned = cmd
            .args(plan.args())
            .env("SHOAL_VMM", "/bin/shoal-vmm")
            .env("SHOAL_BOOT_PHASES", PHASES_FILE)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn();
        match spawned {
            Ok(mut child) => {
                self.pid = Some(child.id() as i32);
                self.started_at = Instant::now();
                if let Some(out) = child.stdout.take() {
                    console::collect_log(out);
                }
                if let Some(err) = child.stderr.take() {
                    console::collect_log(err);
                }
                // Reaped by the main loop's waitpid, not through the handle.
                drop(child);
            }
            Err(e) => {
                say(&format!("cannot start the agent: {e}"));
                self.exited();
            }
        }
    }

    fn exited(&mut self) {
        self.pid = None;
        if std::mem::take(&mut self.replacing) {
            // Stopped to take a new plan: start again at once.
            self.restarts = 0;
            self.next_start = Instant::now();
            return;
        }
        self.restarts += 1;
        let backoff = Duration::from_secs(1u64 << self.restarts.min(5));
        self.next_start = Instant::now() + backoff;
        // What went wrong stays on the status screen until the agent runs well again.
        let why = console::agent_last_error().unwrap_or_else(|| "it printed nothing".into());
        say(&format!("the agent stopped: {why}; starting it again in {} s", backoff.as_secs()));
        *console::AGENT_STOPPED.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
    }
}

/// Stops everything in order and reboots (or powers off).
fn shutdown(agent: &mut Agent, cmd: libc::c_int) -> ! {
    let what = if cmd == libc::RB_POWER_OFF { "powering off" } else { "rebooting" };
    phase("stopping", &format!("{what}: moving this node's microVMs and leadership to other nodes"));
    let wait_children = |limit: Duration, agent_pid: Option<i32>| {
        let deadline = Instant::now() + limit;
        let mut agent_alive = agent_pid.is_some();
        while Instant::now() < deadline {
            // Reaps what has exited; stops at 0 (children left, none exited) or -1 (ECHILD:
            // no children at all).
            let none = loop {
                // SAFETY: waitpid with WNOHANG writes nothing we read.
                let pid = unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) };
                if pid <= 0 {
                    break pid < 0;
                }
                if Some(pid) == agent_pid {
                    agent_alive = false;
                }
            };
            if none || (agent_pid.is_some() && !agent_alive) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    if let Some(pid) = agent.pid {
        // SIGUSR1: the node goes down; the agent hands its microVMs and leadership over to
        // other nodes and stops its microVMs before it exits (SIGTERM would stop it alone).
        // SAFETY: a signal to our own child.
        unsafe { libc::kill(pid, libc::SIGUSR1) };
        wait_children(NODE_STOP_WAIT, Some(pid));
    }
    phase("stopping", "stopping what is left");
    // SAFETY: kill(-1) signals every process but this one.
    unsafe { libc::kill(-1, libc::SIGTERM) };
    wait_children(Duration::from_secs(5), None);
    // SAFETY: as above.
    unsafe { libc::kill(-1, libc::SIGKILL) };
    wait_children(Duration::from_secs(2), None);
    phase("stopping", "syncing and unmounting");
    sync();
    let target = c(DATA_MOUNT);
    // SAFETY: a NUL-terminated path; a failure (not mounted) is harmless.
    unsafe { libc::umount2(target.as_ptr(), 0) };
    sync();
    say(what);
    reboot(cmd);
    fatal("the kernel refused to reboot")
}

/// PID 1's entry point.
pub fn main() -> ! {
    std::panic::set_hook(Box::new(|info| {
        eprintln!("shoal: PID 1 panicked: {info}");
        sync();
        std::thread::sleep(Duration::from_secs(FATAL_COUNTDOWN));
        reboot(libc::RB_AUTOBOOT);
    }));
    let set = signal_set();
    // SAFETY: blocking signals for this thread (and the threads it starts) with a valid set.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if let Err(e) = early_mounts() {
        open_console();
        fatal(&e);
    }
    open_console();
    // Ctrl+Alt+Del sends SIGINT to init instead of resetting at once.
    reboot(libc::RB_DISABLE_CAD);
    phase("init", &format!("shoal-node {} as PID 1", env!("CARGO_PKG_VERSION")));
    let (tx, rx) = mpsc::channel();
    console::start(tx.clone());
    let booting = std::thread::Builder::new().name("boot".into()).spawn(move || {
        if let Err(e) = boot(tx) {
            phase("failed", &format!("{e} (the node stays up on its console; fix and reboot)"));
        }
    });
    if let Err(e) = booting {
        fatal(&format!("cannot start the boot thread: {e}"));
    }
    let mut agent = Agent {
        plan: None,
        pid: None,
        restarts: 0,
        next_start: Instant::now(),
        replacing: false,
        replacing_since: Instant::now(),
        started_at: Instant::now(),
    };
    let mut blessed = false;
    let timeout = libc::timespec { tv_sec: 1, tv_nsec: 0 };
    loop {
        // SAFETY: sigtimedwait with a valid set and timeout; no siginfo is asked for.
        let sig = unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &timeout) };
        match sig {
            libc::SIGTERM | libc::SIGINT => shutdown(&mut agent, libc::RB_AUTOBOOT),
            libc::SIGUSR2 | libc::SIGPWR => shutdown(&mut agent, libc::RB_POWER_OFF),
            _ => {}
        }
        for (pid, _) in reap() {
            if Some(pid) == agent.pid {
                agent.exited();
            }
        }
        // The boot's plan, or a new one from the console: the agent restarts with it.
        if let Ok(plan) = rx.try_recv() {
            *console::PLAN.lock().unwrap_or_else(|e| e.into_inner()) = Some(plan.clone());
            agent.plan = Some(plan);
            if let Some(pid) = agent.pid {
                agent.replacing = true;
                agent.replacing_since = Instant::now();
                // SAFETY: a signal to our own child.
                unsafe { libc::kill(pid, libc::SIGTERM) };
            }
        }
        // An agent that does not stop within 10 s of being asked is killed.
        if let Some(pid) = agent.pid.filter(|_| agent.replacing && agent.replacing_since.elapsed() > AGENT_STOP_WAIT) {
            say("the agent did not stop within 10 s: killing it");
            // SAFETY: a signal to our own child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            agent.replacing_since = Instant::now();
        }
        if agent.plan.is_some() && agent.pid.is_none() && Instant::now() >= agent.next_start {
            agent.start();
        }
        let running_well = agent.pid.is_some() && agent.started_at.elapsed() >= BOOT_GOOD_AFTER;
        if running_well {
            console::AGENT_STOPPED.lock().unwrap_or_else(|e| e.into_inner()).take();
        }
        // A boot that got this far and kept its agent running is a good one: bless its entry.
        if !blessed && running_well {
            blessed = true;
            let _ = std::thread::Builder::new().name("bless".into()).spawn(|| match boot_count::bless() {
                Ok(Some(what)) => phase("boot", &format!("booted well: blessed {what}")),
                Ok(None) => {}
                Err(e) => say(&format!("cannot bless this boot's entry: {e}")),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn children_start_with_no_signal_blocked_although_pid_1_blocks_them() {
        let status = |unblock: bool| {
            // A thread of its own: the mask is per thread and the child takes the spawner's.
            std::thread::spawn(move || {
                let set = super::signal_set();
                // SAFETY: blocking signals for this thread only, with a valid set.
                unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
                let mut cmd = std::process::Command::new("grep");
                cmd.args(["SigBlk", "/proc/self/status"]);
                if unblock {
                    super::unblocked_signals(&mut cmd);
                }
                String::from_utf8_lossy(&cmd.output().expect("grep runs").stdout).trim().to_string()
            })
            .join()
            .expect("the thread")
        };
        assert_ne!(status(false), "SigBlk:\t0000000000000000", "the blocked mask is inherited without the hook");
        assert_eq!(status(true), "SigBlk:\t0000000000000000");
    }
}
