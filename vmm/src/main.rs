//! The `shoal-vmm` binary: parse the command line, build the microVM, run it, and turn the
//! result into an exit status. Errors are printed once, here, as one line with their causes.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use vmm_sys_util::terminal::Terminal;

use shoal_vmm::api::VmConfig;
use shoal_vmm::seccomp::Seccomp;
use shoal_vmm::{builder, runner, snapshot, EXIT_GUEST_FAULT, EXIT_OK, EXIT_SETUP_ERROR};

const AFTER_HELP: &str = "\
Exit status: 0 when the guest resets (e.g. `reboot` in Linux, 0xFE to port 0x64) or powers off;
1 when the VM cannot be started (bad kernel, initrd, config or KVM); 2 when the guest crashes
(triple fault, KVM internal or emulation error). The guest's serial console (COM1) is this
process's stdout; when stdin is a terminal it is put in raw mode and forwarded to the guest.";

/// Boot one microVM on KVM.
#[derive(Debug, Parser)]
#[command(name = "shoal-vmm", version, about, after_help = AFTER_HELP)]
struct Cli {
    /// Guest kernel: ELF vmlinux (PVH entry used when the ELF has the note) or bzImage.
    #[arg(long, value_name = "PATH", required_unless_present_any = ["config", "api_sock", "restore", "merge"])]
    kernel: Option<PathBuf>,
    /// Initial RAM disk loaded high in guest memory.
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Kernel command line (at most 2047 bytes).
    #[arg(long, value_name = "STR", default_value = shoal_vmm::api::config::DEFAULT_CMDLINE)]
    cmdline: String,
    /// Number of vCPUs (1 to 254, and no more than KVM allows).
    #[arg(long, value_name = "N", default_value_t = shoal_vmm::api::config::DEFAULT_VCPUS)]
    vcpus: u32,
    /// Guest memory in MiB.
    #[arg(long, value_name = "M", default_value_t = shoal_vmm::api::config::DEFAULT_MEM_MIB)]
    mem_mib: u64,
    /// Describe the machine to the guest with ACPI tables, with a VM Generation ID device that
    /// every restore changes (a Linux guest reseeds its RNG). The guest kernel needs
    /// CONFIG_ACPI: it finds its virtio devices in the DSDT, not on the command line.
    #[arg(long)]
    acpi: bool,
    /// A virtio-blk disk: `path=FILE[,ro][,id=ID][,rate=bw=BYTES/MS[+BURST][;ops=N/MS[+BURST]]]`.
    /// Repeatable; the first is /dev/vda in a Linux guest.
    #[arg(long, value_name = "SPEC", value_parser = shoal_vmm::api::config::DiskConfig::parse)]
    disk: Vec<shoal_vmm::api::config::DiskConfig>,
    /// A virtio-net interface on an existing tap: `tap=NAME[,mac=aa:bb:cc:dd:ee:ff]`.
    /// Repeatable; the first is eth0 in a Linux guest.
    #[arg(long, value_name = "SPEC", value_parser = shoal_vmm::api::config::NetConfig::parse)]
    net: Vec<shoal_vmm::api::config::NetConfig>,
    /// A virtio-rng entropy device fed from the host's getrandom.
    #[arg(long)]
    rng: bool,
    /// Rate limit for the rng (bytes and requests), as for --disk's rate=.
    #[arg(long, value_name = "RATE", requires = "rng", value_parser = shoal_vmm::devices::rate_limiter::RateLimitConfig::parse)]
    rng_rate: Option<shoal_vmm::devices::rate_limiter::RateLimitConfig>,
    /// A virtio-vsock device: `cid=N,uds=PATH`. Host programs connect to PATH and send
    /// `CONNECT <port>\n`; guest connections to host port P reach PATH_P. With --restore,
    /// replaces the snapshot's vsock CID and socket (clones need their own).
    #[arg(long, value_name = "SPEC", value_parser = shoal_vmm::api::config::VsockConfig::parse)]
    vsock: Option<shoal_vmm::api::config::VsockConfig>,
    /// A virtio-balloon device: `mib=N[,deflate-on-oom][,stats=SECONDS]` (target size, whether
    /// the guest may deflate it under memory pressure, statistics interval).
    #[arg(long, value_name = "SPEC", value_parser = shoal_vmm::devices::virtio::balloon::BalloonConfig::parse)]
    balloon: Option<shoal_vmm::devices::virtio::balloon::BalloonConfig>,
    /// JSON file with the fields kernel, initrd, cmdline, vcpus, mem_mib (instead of the flags),
    /// or a Firecracker --config-file (boot-source, machine-config).
    #[arg(long, value_name = "FILE.json", conflicts_with_all = ["kernel", "initrd", "cmdline", "vcpus", "mem_mib", "acpi", "disk", "net", "rng", "rng_rate", "vsock", "balloon"])]
    config: Option<PathBuf>,
    /// Serve the Firecracker-compatible control API on this Unix socket and wait for
    /// PUT /machine-config, PUT /boot-source and PUT /actions {"action_type": "InstanceStart"}
    /// (instead of the VM flags). The socket must not exist; it is removed at exit.
    #[arg(long, value_name = "PATH", conflicts_with_all = ["kernel", "initrd", "cmdline", "vcpus", "mem_mib", "acpi", "config"])]
    api_sock: Option<PathBuf>,
    /// Seconds between automatic flushes to the metrics file set by PUT /metrics (Firecracker
    /// flushes every 60 s); 0 flushes only on the FlushMetrics action.
    #[arg(long, value_name = "SECONDS", default_value_t = 60, requires = "api_sock")]
    metrics_flush_secs: u64,
    /// Start from the snapshot in DIR (files `state` and `memory`, as PUT /snapshot/create
    /// writes them when given those names) instead of booting a kernel. With it, `--vsock`
    /// gives the guest another CID and socket and `--net id=ID,tap=NAME[,mac=MAC]` moves
    /// interface ID (eth0 if no id) to another tap, with another MAC if given.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["kernel", "initrd", "cmdline", "vcpus", "mem_mib", "acpi", "config", "api_sock", "disk", "rng"])]
    restore: Option<PathBuf>,
    /// Merge the diff snapshot in this DIR into the snapshot in --into DIR (its memory file is
    /// updated in place and its state replaced by the diff's), then exit.
    #[arg(long, value_name = "DIFF_DIR", requires = "into", conflicts_with_all = ["kernel", "config", "api_sock", "restore"])]
    merge: Option<PathBuf>,
    /// The base snapshot DIR for --merge.
    #[arg(long, value_name = "BASE_DIR", requires = "merge")]
    into: Option<PathBuf>,
    /// Run without the per-thread seccomp filters (for debugging; see vmm/seccomp/README.md).
    #[arg(long)]
    no_seccomp: bool,
    /// When the VM ends, print run statistics (peak RSS, resident guest memory, vCPU exits) as
    /// one JSON line on stderr.
    #[arg(long)]
    stats: bool,
    /// Confine the VMM before anything else: new PID, mount, IPC and UTS namespaces rooted at
    /// DIR (created if missing; the host filesystem is not visible, /dev holds only kvm and
    /// net/tun), cgroups, rlimits, no_new_privs, running as --uid/--gid. Needs root. Every
    /// other path (kernel, disks, sockets, snapshots) is then resolved inside DIR.
    #[arg(long, value_name = "DIR", requires_all = ["uid", "gid"], conflicts_with_all = ["merge"])]
    jail: Option<PathBuf>,
    /// The unprivileged user the jailed VMM runs as.
    #[arg(long, value_name = "UID", requires = "jail")]
    uid: Option<u32>,
    /// The group the jailed VMM runs as.
    #[arg(long, value_name = "GID", requires = "jail")]
    gid: Option<u32>,
    /// The jail's name: its cgroup is shoal-vmm/ID and its hostname ID (default: vm-<pid>).
    #[arg(long, value_name = "ID", requires = "jail")]
    jail_id: Option<String>,
    /// cgroup limits for the jailed VMM: `cpus=N,mem-mib=M,pids=P` (any subset; pids defaults
    /// to 256). cgroup v2 where the host has it, v1 controllers otherwise.
    #[arg(long, value_name = "SPEC", requires = "jail", value_parser = shoal_vmm::jail::CgroupLimits::parse)]
    cgroup: Option<shoal_vmm::jail::CgroupLimits>,
    /// An existing network namespace for the jailed VMM (e.g. /var/run/netns/NAME), where its
    /// taps live.
    #[arg(long, value_name = "PATH", requires = "jail")]
    netns: Option<PathBuf>,
    /// JSON object to start the MMDS data store with (Firecracker's --metadata); the API's
    /// PUT/PATCH /mmds change it later.
    #[arg(long, value_name = "FILE.json")]
    metadata: Option<PathBuf>,
    /// Log level on stderr: error, warn, info, debug or trace.
    #[arg(long, value_name = "LEVEL", default_value = "warn")]
    log_level: tracing::Level,
}

use shoal_vmm::api::error_chain;
use shoal_vmm::devices::virtio::net::mmds::SharedStore;

/// The MMDS data store, filled from `--metadata` if given.
fn mmds_store(metadata: Option<&std::path::Path>) -> Result<SharedStore, String> {
    use shoal_vmm::devices::virtio::net::mmds::store::{MmdsStore, DEFAULT_SIZE_LIMIT};
    let mut store = MmdsStore::new(DEFAULT_SIZE_LIMIT);
    if let Some(path) = metadata {
        let text =
            std::fs::read_to_string(path).map_err(|e| format!("cannot read --metadata {}: {e}", path.display()))?;
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| format!("--metadata {}: {e}", path.display()))?;
        store.put(value).map_err(|e| format!("--metadata {}: {e}", path.display()))?;
    }
    Ok(std::sync::Arc::new(std::sync::Mutex::new(store)))
}

/// Serves the API until an InstanceStart builds a microVM; a failed start is answered with its
/// error and the API keeps waiting. The API thread keeps serving after the start.
fn start_from_api(
    sock: &std::path::Path,
    seccomp: Seccomp,
    metrics_flush_secs: u64,
    mmds: &SharedStore,
) -> Result<(shoal_vmm::builder::MicroVm, runner::Control), String> {
    use shoal_vmm::api::server::{self, VmmLink};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
    let listener = server::bind(sock).map_err(|e| error_chain(&e))?;
    let (tx, rx) = std::sync::mpsc::channel();
    let wake = EventFd::new(EFD_NONBLOCK).map_err(|e| format!("cannot create an eventfd: {e}"))?;
    let link_wake = wake.try_clone().map_err(|e| format!("cannot create an eventfd: {e}"))?;
    server::spawn(listener, VmmLink { tx, wake: link_wake }, seccomp, mmds.clone()).map_err(|e| error_chain(&e))?;
    let mut controller = shoal_vmm::controller::Controller::new(mmds.clone());
    loop {
        let Ok(request) = rx.recv() else { return Err("the API thread stopped".into()) };
        if let Some(vm) = controller.handle(request) {
            let metrics_flush_every =
                (metrics_flush_secs > 0).then(|| std::time::Duration::from_secs(metrics_flush_secs));
            return Ok((vm, runner::Control { requests: rx, wake, controller, metrics_flush_every }));
        }
    }
}

/// Prints one line on stderr; a closed stderr must not turn an error into a panic.
fn report(msg: impl std::fmt::Display) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "shoal-vmm: {msg}");
}

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    report(msg);
    ExitCode::from(EXIT_SETUP_ERROR as u8)
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if matches!(e.kind(), clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion) => {
            e.exit()
        }
        Err(e) => {
            // One line: clap's message up to its usage block, without its "error: " prefix
            // (a list of missing arguments is on the lines after the first).
            let text = e.to_string();
            let message: Vec<&str> = text.lines().take_while(|l| !l.trim().is_empty()).map(str::trim).collect();
            let first = if message.is_empty() { "invalid arguments".to_string() } else { message.join(" ") };
            return fail(format!("{} (see --help)", first.trim_start_matches("error: ")));
        }
    };
    if let Some(root) = &cli.jail {
        let mut limits = cli.cgroup.clone().unwrap_or_default();
        limits.pids.get_or_insert(256);
        let cfg = shoal_vmm::jail::JailConfig {
            root: root.clone(),
            uid: cli.uid.unwrap_or(u32::MAX),
            gid: cli.gid.unwrap_or(u32::MAX),
            id: cli.jail_id.clone().unwrap_or_else(|| format!("vm-{}", std::process::id())),
            limits,
            netns: cli.netns.clone(),
        };
        match shoal_vmm::jail::enter(&cfg) {
            Ok(shoal_vmm::jail::Entered::Jailed) => {}
            Ok(shoal_vmm::jail::Entered::ParentDone(code)) => return ExitCode::from(code.clamp(0, 255) as u8),
            Err(e) => return fail(format!("jail: {e}")),
        }
    }
    shoal_vmm::logging::init(cli.log_level);

    if let (Some(diff), Some(base)) = (&cli.merge, &cli.into) {
        return match snapshot::merge_dirs(diff, base) {
            Ok(()) => ExitCode::from(EXIT_OK as u8),
            Err(e) => fail(error_chain(&e)),
        };
    }

    let seccomp = if cli.no_seccomp { Seccomp::Off } else { Seccomp::On };
    let mmds = match mmds_store(cli.metadata.as_deref()) {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    let mut control = None;
    let vm = match (&cli.api_sock, &cli.restore) {
        (None, Some(dir)) => {
            let vsock_override = cli
                .vsock
                .as_ref()
                .map(|v| snapshot::VsockOverride { guest_cid: Some(v.guest_cid), uds_path: Some(v.uds_path.clone()) });
            // --net id=ID,tap=NAME[,mac=MAC] gives the snapshot's interface ID another tap (and MAC).
            let net_overrides = cli
                .net
                .iter()
                .map(|n| snapshot::NetOverride {
                    iface_id: n.id.clone().unwrap_or_else(|| "eth0".into()),
                    host_dev_name: n.tap.clone(),
                    guest_mac: n.mac.clone(),
                })
                .collect();
            let options = snapshot::RestoreOptions {
                resume: true,
                track_dirty_pages: false,
                vsock_override,
                net_overrides,
                mmds_store: Some(mmds.clone()),
            };
            match snapshot::restore(
                &dir.join(snapshot::STATE_FILE),
                &dir.join(snapshot::MEMORY_FILE),
                Box::new(std::io::stdout()),
                options,
            ) {
                Ok(vm) => vm,
                Err(e) => return fail(error_chain(&e)),
            }
        }
        (sock, _) => match sock {
            Some(sock) => match start_from_api(sock, seccomp, cli.metrics_flush_secs, &mmds) {
                Ok((vm, c)) => {
                    control = Some(c);
                    vm
                }
                Err(e) => return fail(e),
            },
            None => {
                let config = match &cli.config {
                    Some(path) => match shoal_vmm::api::config::from_file(path) {
                        Ok(c) => c,
                        Err(e) => return fail(error_chain(&e)),
                    },
                    None => VmConfig {
                        // clap guarantees --kernel when neither --config nor --api-sock is given.
                        kernel: cli.kernel.clone().unwrap_or_default(),
                        initrd: cli.initrd.clone(),
                        cmdline: cli.cmdline.clone(),
                        vcpus: cli.vcpus,
                        mem_mib: cli.mem_mib,
                        track_dirty_pages: false,
                        acpi: cli.acpi,
                        disks: cli.disk.clone(),
                        nets: cli.net.clone(),
                        rng: cli.rng,
                        rng_rate_limiter: cli.rng_rate,
                        vsock: cli.vsock.clone(),
                        balloon: cli.balloon,
                        mmds: None,
                    },
                };
                match builder::build_microvm(&config, Box::new(std::io::stdout()), &mmds) {
                    Ok(vm) => vm,
                    Err(e) => return fail(error_chain(&e)),
                }
            }
        },
    };

    let stdin = std::io::stdin();
    let interactive = stdin.is_terminal();
    if interactive {
        if let Err(e) = stdin.lock().set_raw_mode() {
            tracing::warn!(error = %e, "cannot put the terminal in raw mode");
        }
    }
    let mem = vm.mem.clone();
    // vCPU threads may still hold the devices when main returns, so the vsock socket is
    // removed here rather than left to the device's Drop.
    let vsock_sockets: Vec<PathBuf> = vm
        .virtio
        .iter()
        .filter_map(|s| if let builder::DeviceSpec::Vsock(v) = &s.spec { Some(v.uds_path.clone()) } else { None })
        .collect();
    let counters: Vec<_> = vm.vcpus.iter().map(|v| v.counters.clone()).collect();
    let result = runner::run(vm, interactive, control, seccomp);
    if interactive {
        let _ = stdin.lock().set_canon_mode();
    }
    for p in &vsock_sockets {
        let _ = std::fs::remove_file(p);
    }
    if cli.stats {
        let stats = shoal_vmm::stats::collect(&mem, &counters);
        if let Ok(line) = serde_json::to_string(&stats) {
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "{line}");
        }
    }
    if let Some(sock) = &cli.api_sock {
        let _ = std::fs::remove_file(sock);
    }
    match result {
        Ok(why) if why.is_clean() => ExitCode::from(EXIT_OK as u8),
        Ok(why) => {
            report(&why);
            ExitCode::from(EXIT_GUEST_FAULT as u8)
        }
        Err(e) => fail(error_chain(&e)),
    }
}
