//! The control API's resources, with Firecracker's paths, field names, status codes and error
//! body, for what Shoal implements so far: instance info, machine configuration, boot source,
//! and starting the instance. Pure request handling over `ApiState`; the server thread does
//! the I/O and hands a start to the VMM thread.

use serde::Deserialize;
pub use shoal_vmm_config::{
    check_balloon_amount, ActionType, BalloonStatsUpdate, BalloonUpdate, BootSource, EntropyConfig, InstanceAction,
    LoggerConfig, MachineConfig, MemBackend, MemBackendType, MetricsConfig, PartialDrive, PartialNet,
    SnapshotCreateParams, SnapshotLoadParams, SnapshotTypeName, VmStateName, VmStateRequest, FIRECRACKER_API_VERSION,
};

use super::config::{FirecrackerDrive, FirecrackerNet};
use super::http::{Request, Response};
pub use super::request::{DevicePatch, SnapshotLoad};
use super::request::{Restored, VmmAction};
use super::VmConfig;

const NOT_AFTER_START: &str = "The requested operation is not supported after starting the microVM.";
const NOT_BEFORE_START: &str = "The requested operation is not supported before starting the microVM.";
const NO_BALLOON: &str = "No balloon device configured.";

/// Checks a `PUT /snapshot/load` body and resolves its memory file.
fn check_load(params: SnapshotLoadParams) -> Result<SnapshotLoad, String> {
    let p = params;
    {
        let mem_path = match (p.mem_file_path, p.mem_backend) {
            (Some(_), Some(_)) => return Err("Only one of mem_file_path and mem_backend may be given.".into()),
            (None, None) => return Err("Missing mem_backend (or mem_file_path).".into()),
            (Some(path), None)
            | (None, Some(MemBackend { backend_type: MemBackendType::File, backend_path: path })) => path,
            (None, Some(MemBackend { backend_type: MemBackendType::Uffd, .. })) => {
                return Err("The Uffd memory backend is not supported by shoal-vmm; use File.".into())
            }
        };
        if p.snapshot_path.is_empty() || mem_path.is_empty() {
            return Err("snapshot_path and the memory file path must not be empty.".into());
        }
        for o in &p.network_overrides {
            if let Some(mac) = &o.guest_mac {
                crate::devices::virtio::net::parse_mac(mac)
                    .map_err(|e| format!("network_overrides `{}`: {e}", o.iface_id))?;
            }
        }
        Ok(SnapshotLoad {
            state_path: p.snapshot_path.into(),
            mem_path: mem_path.into(),
            resume: p.resume_vm,
            track_dirty_pages: p.track_dirty_pages || p.enable_diff_snapshots,
            vsock_override: p.vsock_override,
            net_overrides: p.network_overrides,
        })
    }
}

/// Where the instance is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstanceState {
    NotStarted,
    Running,
    Paused,
}

impl InstanceState {
    fn as_str(self) -> &'static str {
        match self {
            InstanceState::NotStarted => "Not started",
            InstanceState::Running => "Running",
            InstanceState::Paused => "Paused",
        }
    }
}

/// What the API knows: the configuration being assembled, and the instance state.
#[derive(Debug, Clone)]
pub struct ApiState {
    pub id: String,
    pub machine: MachineConfig,
    pub boot: Option<BootSource>,
    pub state: InstanceState,
    /// A boot resource was configured, which rules out loading a snapshot (as in Firecracker).
    pub configured: bool,
    /// `PUT /drives/{id}`, in the order first put.
    pub drives: Vec<FirecrackerDrive>,
    /// `PUT /network-interfaces/{id}`, in the order first put.
    pub nets: Vec<FirecrackerNet>,
    /// `PUT /entropy` was called.
    pub entropy: bool,
    pub entropy_rate_limiter: Option<crate::devices::rate_limiter::RateLimitConfig>,
    /// `PUT /vsock`.
    pub vsock: Option<crate::api::config::VsockConfig>,
    /// `PUT /logger` and `PUT /metrics` as last accepted, for `GET /vm/config`.
    pub logger: Option<LoggerConfig>,
    pub metrics: Option<MetricsConfig>,
    /// `PUT /balloon`, with later patches applied.
    pub balloon: Option<crate::devices::virtio::balloon::BalloonConfig>,
    /// `PUT /mmds/config`.
    pub mmds_config: Option<crate::devices::virtio::net::mmds::store::MmdsConfig>,
    /// The MMDS data store (`PUT/PATCH/GET /mmds`), shared with the devices that serve it.
    pub mmds: crate::devices::virtio::net::mmds::SharedStore,
}

impl Default for ApiState {
    fn default() -> Self {
        ApiState {
            id: "anonymous-instance".into(),
            machine: MachineConfig::default(),
            boot: None,
            state: InstanceState::NotStarted,
            configured: false,
            drives: Vec::new(),
            nets: Vec::new(),
            entropy: false,
            entropy_rate_limiter: None,
            vsock: None,
            logger: None,
            metrics: None,
            balloon: None,
            mmds_config: None,
            mmds: std::sync::Arc::new(std::sync::Mutex::new(crate::devices::virtio::net::mmds::store::MmdsStore::new(
                crate::devices::virtio::net::mmds::store::DEFAULT_SIZE_LIMIT,
            ))),
        }
    }
}

/// What the server must do after answering.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Send this response.
    Reply(Response),
    /// Ask the VMM thread (`controller::Controller`) to do this; reply with its answer, and
    /// record what it did with `succeeded`.
    Ask(VmmAction),
}

fn parse_body<T: for<'de> Deserialize<'de>>(req: &Request) -> Result<T, Response> {
    serde_json::from_slice(&req.body).map_err(|e| Response::fault(400, format!("Invalid request body: {e}")))
}

impl ApiState {
    /// The configuration the instance would start with now.
    pub fn vm_config(&self) -> Result<VmConfig, Response> {
        let boot = self
            .boot
            .as_ref()
            .ok_or_else(|| Response::fault(400, "Cannot start microvm without kernel configuration."))?;
        let mut config = VmConfig::new(&boot.kernel_image_path);
        config.initrd = boot.initrd_path.as_ref().map(Into::into);
        if let Some(args) = &boot.boot_args {
            config.cmdline = args.clone();
        }
        config.set_machine(&self.machine);
        config.rng = self.entropy;
        config.rng_rate_limiter = self.entropy_rate_limiter;
        config.vsock = self.vsock.clone();
        config.balloon = self.balloon;
        config.mmds = self.mmds_config.clone();
        config.nets = self.nets.iter().cloned().map(crate::api::config::NetConfig::from).collect();
        config.set_firecracker_drives(self.drives.clone()).map_err(|e| Response::fault(400, e))?;
        config.validate().map_err(|e| Response::fault(400, super::error_chain(&e)))?;
        Ok(config)
    }

    /// `GET /vm/config`: the configuration as this API has it (Firecracker's
    /// FullVmConfiguration), with running devices' patches applied.
    pub fn full_config(&self) -> serde_json::Value {
        serde_json::json!({
            "boot-source": self.boot,
            "machine-config": self.machine,
            "drives": self.drives,
            "network-interfaces": self.nets,
            "vsock": self.vsock,
            "entropy": self.entropy.then_some(EntropyConfig { rate_limiter: self.entropy_rate_limiter }),
            "logger": self.logger,
            "metrics": self.metrics,
            "balloon": self.balloon,
            "mmds-config": self.mmds_config,
        })
    }

    /// Records what the VMM thread did: the instance's state, and patches applied to running
    /// devices (so `GET /vm/config` shows them).
    pub fn succeeded(&mut self, action: &VmmAction) {
        match action {
            VmmAction::Start(_) => self.state = InstanceState::Running,
            VmmAction::LoadSnapshot(load) => {
                self.state = if load.resume { InstanceState::Running } else { InstanceState::Paused }
            }
            VmmAction::SetPaused(paused) => {
                self.state = if *paused { InstanceState::Paused } else { InstanceState::Running }
            }
            VmmAction::PatchDevice(patch) => self.applied(patch),
            _ => {}
        }
    }

    /// Takes the configuration of a machine restored from a snapshot, so that `GET /vm/config`,
    /// `GET /machine-config`, `GET /balloon` and later patches see what runs.
    pub fn restored(&mut self, r: Restored) {
        self.machine = r.machine;
        self.drives = r.drives;
        self.nets = r.nets;
        self.vsock = r.vsock;
        self.entropy = r.entropy.is_some();
        self.entropy_rate_limiter = r.entropy.flatten();
        self.balloon = r.balloon;
        self.mmds_config = r.mmds;
    }

    fn applied(&mut self, patch: &DevicePatch) {
        use crate::devices::rate_limiter::RateLimitConfig;
        match patch {
            DevicePatch::Balloon { amount_mib, stats_polling_interval_s } => {
                if let Some(b) = self.balloon.as_mut() {
                    b.amount_mib = amount_mib.unwrap_or(b.amount_mib);
                    b.stats_polling_interval_s = stats_polling_interval_s.unwrap_or(b.stats_polling_interval_s);
                }
            }
            DevicePatch::Drive(p) => {
                if let Some(d) = self.drives.iter_mut().find(|d| d.drive_id == p.drive_id) {
                    if let Some(path) = &p.path_on_host {
                        d.path_on_host = path.clone();
                    }
                    if let Some(r) = &p.rate_limiter {
                        d.rate_limiter = RateLimitConfig::patched(d.rate_limiter, r);
                    }
                }
            }
            DevicePatch::Net(p) => {
                if let Some(n) = self.nets.iter_mut().find(|n| n.iface_id == p.iface_id) {
                    if let Some(r) = &p.rx_rate_limiter {
                        n.rx_rate_limiter = RateLimitConfig::patched(n.rx_rate_limiter, r);
                    }
                    if let Some(r) = &p.tx_rate_limiter {
                        n.tx_rate_limiter = RateLimitConfig::patched(n.tx_rate_limiter, r);
                    }
                }
            }
        }
    }

    /// Handles one request.
    pub fn handle(&mut self, req: &Request) -> Outcome {
        let started = self.state != InstanceState::NotStarted;
        let reply = match (req.method.as_str(), req.path.as_str()) {
            ("GET", "/") => {
                let info = serde_json::json!({
                    "id": self.id,
                    "state": self.state.as_str(),
                    "vmm_version": env!("CARGO_PKG_VERSION"),
                    "app_name": "shoal-vmm",
                });
                Response::json(200, info.to_string())
            }
            ("GET", "/version") => Response::json(
                200,
                serde_json::json!({
                    "firecracker_version": FIRECRACKER_API_VERSION,
                    "shoal_vmm_version": env!("CARGO_PKG_VERSION"),
                })
                .to_string(),
            ),
            ("GET", "/vm/config") => Response::json(200, self.full_config().to_string()),
            ("GET", "/machine-config") => Response::json(200, serde_json::to_string(&self.machine).unwrap_or_default()),
            ("PUT", "/machine-config") if started => Response::fault(400, NOT_AFTER_START),
            ("PUT", "/machine-config") => match parse_body::<MachineConfig>(req) {
                Ok(m) if m.vcpu_count == 0 || m.vcpu_count > 254 => {
                    Response::fault(400, format!("Invalid vCPU count: {} (1 to 254)", m.vcpu_count))
                }
                Ok(m) if m.mem_size_mib == 0 => Response::fault(400, "Invalid memory size: 0 MiB"),
                Ok(m) if m.smt => Response::fault(400, "Simultaneous multithreading is not supported by shoal-vmm."),
                Ok(m) => {
                    self.machine = m;
                    self.configured = true;
                    Response::no_content()
                }
                Err(r) => r,
            },
            ("PUT", "/boot-source") if started => Response::fault(400, NOT_AFTER_START),
            ("PUT", "/boot-source") => match parse_body::<BootSource>(req) {
                Ok(b) => match b.boot_args.as_deref().map(crate::arch::x86_64::boot::check_cmdline) {
                    Some(Err(e)) => Response::fault(400, format!("Invalid boot arguments: {e}")),
                    _ => {
                        self.boot = Some(b);
                        self.configured = true;
                        Response::no_content()
                    }
                },
                Err(r) => r,
            },
            ("PUT", "/actions") => match parse_body::<InstanceAction>(req) {
                Ok(InstanceAction { action_type: ActionType::InstanceStart }) if started => {
                    Response::fault(400, "The microVM is already running.")
                }
                Ok(InstanceAction { action_type: ActionType::InstanceStart }) => match self.vm_config() {
                    Ok(config) => return Outcome::Ask(VmmAction::Start(Box::new(config))),
                    Err(r) => r,
                },
                Ok(InstanceAction { action_type: ActionType::FlushMetrics }) => {
                    return Outcome::Ask(VmmAction::FlushMetrics)
                }
                Ok(InstanceAction { action_type: ActionType::SendCtrlAltDel }) if !started => {
                    Response::fault(400, "The microVM is not running.")
                }
                Ok(InstanceAction { action_type: ActionType::SendCtrlAltDel }) => {
                    return Outcome::Ask(VmmAction::SendCtrlAltDel)
                }
                Err(r) => r,
            },
            ("PATCH", "/vm") => match parse_body::<VmStateRequest>(req) {
                Ok(_) if !started => Response::fault(400, "The microVM is not running."),
                Ok(VmStateRequest { state: VmStateName::Paused }) => return Outcome::Ask(VmmAction::SetPaused(true)),
                Ok(VmStateRequest { state: VmStateName::Resumed }) => return Outcome::Ask(VmmAction::SetPaused(false)),
                Err(r) => r,
            },
            ("PATCH", p) if p.starts_with("/drives/") && !started => Response::fault(400, NOT_BEFORE_START),
            ("PATCH", p) if p.starts_with("/drives/") => match parse_body::<PartialDrive>(req) {
                Ok(d) if d.drive_id != p["/drives/".len()..] => {
                    Response::fault(400, "The id from the path does not match the id from the body!")
                }
                Ok(d) if d.path_on_host.as_deref() == Some("") => {
                    Response::fault(400, "path_on_host must not be empty.")
                }
                Ok(d) if d.path_on_host.is_none() && d.rate_limiter.is_none() => {
                    Response::fault(400, "Nothing to update: give path_on_host and/or rate_limiter.")
                }
                Ok(d) if patch_error(d.rate_limiter.as_ref()).is_some() => Response::fault(
                    400,
                    format!("Invalid rate limiter: {}.", patch_error(d.rate_limiter.as_ref()).unwrap_or_default()),
                ),
                Ok(d) => return Outcome::Ask(VmmAction::PatchDevice(DevicePatch::Drive(d))),
                Err(r) => r,
            },
            ("PATCH", p) if p.starts_with("/network-interfaces/") && !started => Response::fault(400, NOT_BEFORE_START),
            ("PATCH", p) if p.starts_with("/network-interfaces/") => match parse_body::<PartialNet>(req) {
                Ok(n) if n.iface_id != p["/network-interfaces/".len()..] => {
                    Response::fault(400, "The id from the path does not match the id from the body!")
                }
                Ok(n) if n.rx_rate_limiter.is_none() && n.tx_rate_limiter.is_none() => {
                    Response::fault(400, "Nothing to update: give rx_rate_limiter and/or tx_rate_limiter.")
                }
                Ok(n)
                    if patch_error(n.rx_rate_limiter.as_ref())
                        .or(patch_error(n.tx_rate_limiter.as_ref()))
                        .is_some() =>
                {
                    let e = patch_error(n.rx_rate_limiter.as_ref()).or(patch_error(n.tx_rate_limiter.as_ref()));
                    Response::fault(400, format!("Invalid rate limiter: {}.", e.unwrap_or_default()))
                }
                Ok(n) => return Outcome::Ask(VmmAction::PatchDevice(DevicePatch::Net(n))),
                Err(r) => r,
            },
            ("PUT", p) if p.starts_with("/drives/") && started => Response::fault(400, NOT_AFTER_START),
            ("PUT", p) if p.starts_with("/drives/") => match parse_body::<FirecrackerDrive>(req) {
                Ok(d) if d.drive_id != p["/drives/".len()..] => {
                    Response::fault(400, "The id from the path does not match the id from the body!")
                }
                Ok(d) if d.drive_id.is_empty() || d.path_on_host.is_empty() => {
                    Response::fault(400, "drive_id and path_on_host must not be empty.")
                }
                Ok(d) if rate_limit_error(d.rate_limiter.as_ref()).is_some() => {
                    let e = rate_limit_error(d.rate_limiter.as_ref()).unwrap_or_default();
                    Response::fault(400, format!("Invalid rate limiter: {e}."))
                }
                Ok(d)
                    if d.is_root_device && self.drives.iter().any(|o| o.is_root_device && o.drive_id != d.drive_id) =>
                {
                    Response::fault(400, "A root block device already exists!")
                }
                Ok(d) => {
                    match self.drives.iter_mut().find(|o| o.drive_id == d.drive_id) {
                        Some(o) => *o = d,
                        None => self.drives.push(d),
                    }
                    self.configured = true;
                    Response::no_content()
                }
                Err(r) => r,
            },
            ("PUT", "/mmds/config") if started => Response::fault(400, NOT_AFTER_START),
            ("PUT", "/mmds/config") => match parse_body::<crate::devices::virtio::net::mmds::store::MmdsConfig>(req) {
                Ok(c) => {
                    let ids: Vec<&str> = self.nets.iter().map(|n| n.iface_id.as_str()).collect();
                    match c.check(&ids) {
                        Err(e) => Response::fault(400, format!("Invalid MMDS configuration: {e}.")),
                        Ok(()) => {
                            self.mmds_config = Some(c);
                            self.configured = true;
                            Response::no_content()
                        }
                    }
                }
                Err(r) => r,
            },
            ("GET", "/mmds/config") => match &self.mmds_config {
                Some(c) => Response::json(200, serde_json::to_string(c).unwrap_or_default()),
                None => Response::fault(400, "MMDS is not configured."),
            },
            ("PUT", "/mmds") | ("PATCH", "/mmds") => match serde_json::from_slice::<serde_json::Value>(&req.body) {
                Err(e) => Response::fault(400, format!("Invalid request body: {e}")),
                Ok(v) => {
                    let mut store = self.mmds.lock().unwrap_or_else(|p| p.into_inner());
                    let result = if req.method == "PUT" { store.put(v) } else { store.patch(&v) };
                    match result {
                        Ok(()) => Response::no_content(),
                        Err(e) => Response::fault(400, e),
                    }
                }
            },
            ("GET", "/mmds") => {
                let store = self.mmds.lock().unwrap_or_else(|p| p.into_inner());
                Response::json(200, store.data().to_string())
            }
            ("PUT", "/balloon") if started => Response::fault(400, NOT_AFTER_START),
            ("PUT", "/balloon") => match parse_body::<crate::devices::virtio::balloon::BalloonConfig>(req) {
                Ok(b) => match check_balloon_amount(b.amount_mib, self.machine.mem_size_mib) {
                    Err(e) => Response::fault(400, format!("{e}.")),
                    Ok(()) => {
                        self.balloon = Some(b);
                        self.configured = true;
                        Response::no_content()
                    }
                },
                Err(r) => r,
            },
            ("GET", "/balloon") => match &self.balloon {
                Some(b) => Response::json(200, serde_json::to_string(b).unwrap_or_default()),
                None => Response::fault(400, NO_BALLOON),
            },
            ("PATCH", "/balloon") => match (parse_body::<BalloonUpdate>(req), self.balloon.as_mut()) {
                (Err(r), _) => r,
                (Ok(_), None) => Response::fault(400, NO_BALLOON),
                (Ok(u), Some(b)) => match check_balloon_amount(u.amount_mib, self.machine.mem_size_mib) {
                    Err(e) => Response::fault(400, format!("{e}.")),
                    Ok(()) if started => {
                        return Outcome::Ask(VmmAction::PatchDevice(DevicePatch::Balloon {
                            amount_mib: Some(u.amount_mib),
                            stats_polling_interval_s: None,
                        }))
                    }
                    Ok(()) => {
                        b.amount_mib = u.amount_mib;
                        Response::no_content()
                    }
                },
            },
            ("GET", "/balloon/statistics") => match &self.balloon {
                None => Response::fault(400, NO_BALLOON),
                Some(b) if b.stats_polling_interval_s == 0 => {
                    Response::fault(400, "Statistics for the balloon device are not enabled.")
                }
                Some(_) if !started => Response::fault(400, NOT_BEFORE_START),
                Some(_) => return Outcome::Ask(VmmAction::BalloonStats),
            },
            ("PATCH", "/balloon/statistics") => match (parse_body::<BalloonStatsUpdate>(req), self.balloon.as_mut()) {
                (Err(r), _) => r,
                (Ok(_), None) => Response::fault(400, NO_BALLOON),
                (Ok(u), Some(_)) if started => {
                    return Outcome::Ask(VmmAction::PatchDevice(DevicePatch::Balloon {
                        amount_mib: None,
                        stats_polling_interval_s: Some(u.stats_polling_interval_s),
                    }))
                }
                (Ok(u), Some(b)) => {
                    b.stats_polling_interval_s = u.stats_polling_interval_s;
                    Response::no_content()
                }
            },
            ("PUT", "/logger") => match parse_body::<LoggerConfig>(req) {
                Ok(c) => match c.level.as_deref().map(crate::logging::parse_level).transpose() {
                    Ok(level) => {
                        let path = c.log_path.clone().filter(|p| !p.is_empty()).map(Into::into);
                        self.logger = Some(c);
                        return Outcome::Ask(VmmAction::Logger { level, path });
                    }
                    Err(e) => Response::fault(400, e),
                },
                Err(r) => r,
            },
            ("GET", "/shoal/metrics") => return Outcome::Ask(VmmAction::Metrics { prometheus: true }),
            ("GET", "/shoal/metrics.json") => return Outcome::Ask(VmmAction::Metrics { prometheus: false }),
            ("PUT", "/metrics") if started => Response::fault(400, NOT_AFTER_START),
            ("PUT", "/metrics") => match parse_body::<MetricsConfig>(req) {
                Ok(m) if m.metrics_path.is_empty() => Response::fault(400, "metrics_path must not be empty."),
                Ok(m) => {
                    let path = m.metrics_path.clone().into();
                    self.metrics = Some(m);
                    return Outcome::Ask(VmmAction::MetricsFile(path));
                }
                Err(r) => r,
            },
            ("PUT", p) if p.starts_with("/network-interfaces/") && started => Response::fault(400, NOT_AFTER_START),
            ("PUT", p) if p.starts_with("/network-interfaces/") => match parse_body::<FirecrackerNet>(req) {
                Ok(n) if n.iface_id != p["/network-interfaces/".len()..] => {
                    Response::fault(400, "The id from the path does not match the id from the body!")
                }
                Ok(n) if n.iface_id.is_empty() || n.host_dev_name.is_empty() => {
                    Response::fault(400, "iface_id and host_dev_name must not be empty.")
                }
                Ok(n)
                    if n.guest_mac
                        .as_deref()
                        .map(crate::devices::virtio::net::parse_mac)
                        .is_some_and(|r| r.is_err()) =>
                {
                    Response::fault(400, format!("Invalid guest_mac: {}", n.guest_mac.as_deref().unwrap_or("")))
                }
                Ok(n) => {
                    match self.nets.iter_mut().find(|o| o.iface_id == n.iface_id) {
                        Some(o) => *o = n,
                        None => self.nets.push(n),
                    }
                    self.configured = true;
                    Response::no_content()
                }
                Err(r) => r,
            },
            ("PUT", "/vsock") if started => Response::fault(400, NOT_AFTER_START),
            ("PUT", "/vsock") => match parse_body::<crate::api::config::VsockConfig>(req) {
                Ok(v) => match crate::devices::virtio::vsock::check_cid(v.guest_cid) {
                    Err(e) => Response::fault(400, format!("Invalid vsock configuration: {e}")),
                    Ok(()) if v.uds_path.as_os_str().is_empty() => {
                        Response::fault(400, "Invalid vsock configuration: uds_path is empty")
                    }
                    Ok(()) => {
                        self.vsock = Some(v);
                        self.configured = true;
                        Response::no_content()
                    }
                },
                Err(r) => r,
            },
            ("PUT", "/entropy") if started => Response::fault(400, NOT_AFTER_START),
            ("PUT", "/entropy") => match parse_body::<EntropyConfig>(req) {
                Ok(e) => {
                    self.entropy = true;
                    self.entropy_rate_limiter = e.rate_limiter;
                    self.configured = true;
                    Response::no_content()
                }
                Err(r) => r,
            },
            ("PUT", "/snapshot/create") => match parse_body::<SnapshotCreateParams>(req) {
                Ok(_) if self.state != InstanceState::Paused => {
                    Response::fault(400, "Cannot create a snapshot: the microVM is not paused.")
                }
                Ok(p) if p.snapshot_path.is_empty() || p.mem_file_path.is_empty() => {
                    Response::fault(400, "snapshot_path and mem_file_path must not be empty.")
                }
                Ok(p) => {
                    return Outcome::Ask(VmmAction::CreateSnapshot {
                        kind: p.snapshot_type,
                        state_path: p.snapshot_path.into(),
                        mem_path: p.mem_file_path.into(),
                    })
                }
                Err(r) => r,
            },
            ("PUT", "/snapshot/load") if started => {
                Response::fault(400, "Loading a microVM snapshot not allowed after starting the microVM.")
            }
            ("PUT", "/snapshot/load") if self.configured => Response::fault(
                400,
                "Loading a microVM snapshot not allowed after configuring boot-specific resources.",
            ),
            ("PUT", "/snapshot/load") => match parse_body::<SnapshotLoadParams>(req) {
                Ok(p) => match check_load(p) {
                    Ok(load) => return Outcome::Ask(VmmAction::LoadSnapshot(load)),
                    Err(message) => Response::fault(400, message),
                },
                Err(r) => r,
            },
            (_, "/" | "/machine-config" | "/boot-source" | "/actions") => {
                Response::fault(400, format!("Invalid request method and/or path: {} {}.", req.method, req.path))
            }
            _ => Response::fault(400, format!("Invalid request method and/or path: {} {}.", req.method, req.path)),
        };
        Outcome::Reply(reply)
    }
}

/// Why a rate limiter patch is refused, if it is.
fn patch_error(r: Option<&crate::devices::rate_limiter::RateLimitConfig>) -> Option<String> {
    r.and_then(|r| r.validate_patch().err())
}

/// Why a rate limiter's settings are refused, if they are.
fn rate_limit_error(r: Option<&crate::devices::rate_limiter::RateLimitConfig>) -> Option<String> {
    r.iter().flat_map(|r| r.bandwidth.iter().chain(r.ops.iter())).find_map(|b| b.validate().err())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(method: &str, path: &str, body: &str) -> Request {
        Request { method: method.into(), path: path.into(), body: body.as_bytes().to_vec(), close: false }
    }

    fn reply(state: &mut ApiState, method: &str, path: &str, body: &str) -> Response {
        match state.handle(&req(method, path, body)) {
            Outcome::Reply(r) => r,
            other => panic!("unexpected {other:?}"),
        }
    }

    fn fault(r: &Response) -> String {
        let v: serde_json::Value = serde_json::from_str(r.body.as_deref().unwrap()).unwrap();
        v["fault_message"].as_str().unwrap().to_string()
    }

    #[test]
    fn firecracker_getting_started_sequence_starts_the_instance() {
        let mut s = ApiState::default();
        let info = reply(&mut s, "GET", "/", "");
        assert!(info.body.unwrap().contains("\"state\":\"Not started\""));
        let r = reply(
            &mut s,
            "PUT",
            "/boot-source",
            r#"{"kernel_image_path": "/k/vmlinux", "boot_args": "console=ttyS0 reboot=k panic=1 pci=off"}"#,
        );
        assert_eq!(r.status, 204);
        assert_eq!(
            reply(&mut s, "PUT", "/machine-config", r#"{"vcpu_count": 2, "mem_size_mib": 1024, "smt": false}"#).status,
            204
        );
        match s.handle(&req("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#)) {
            Outcome::Ask(VmmAction::Start(c)) => {
                assert_eq!(
                    (c.vcpus, c.mem_mib, c.cmdline.as_str()),
                    (2, 1024, "console=ttyS0 reboot=k panic=1 pci=off")
                );
                assert_eq!(c.kernel.to_str(), Some("/k/vmlinux"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_bodies_get_400_with_a_fault_message() {
        let mut s = ApiState::default();
        let cases = [
            ("PUT", "/machine-config", "{not json"),
            ("PUT", "/machine-config", r#"{"vcpu_count": 2}"#),
            ("PUT", "/machine-config", r#"{"vcpu_count": 2, "mem_size_mib": 64, "bogus": 1}"#),
            ("PUT", "/machine-config", r#"{"vcpu_count": 0, "mem_size_mib": 64}"#),
            ("PUT", "/machine-config", r#"{"vcpu_count": -1, "mem_size_mib": 64}"#),
            ("PUT", "/machine-config", r#"{"vcpu_count": 300, "mem_size_mib": 64}"#),
            ("PUT", "/machine-config", r#"{"vcpu_count": 1, "mem_size_mib": 0}"#),
            ("PUT", "/boot-source", r#"{"boot_args": "x"}"#),
            ("PUT", "/actions", r#"{"action_type": "Explode"}"#),
            ("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#),
            ("DELETE", "/machine-config", ""),
            ("GET", "/nope", ""),
        ];
        for (m, p, b) in cases {
            let r = reply(&mut s, m, p, b);
            assert_eq!(r.status, 400, "{m} {p} {b}");
            assert!(!fault(&r).is_empty());
        }
        let long = format!(r#"{{"kernel_image_path": "/k", "boot_args": "{}"}}"#, "a".repeat(3000));
        assert!(fault(&reply(&mut s, "PUT", "/boot-source", &long)).contains("at most 2047"));
        assert_eq!(s.machine, MachineConfig::default(), "refused requests change nothing");
        assert!(s.boot.is_none());
    }

    #[test]
    fn after_start_configuration_is_frozen_and_start_is_refused() {
        let mut s = ApiState { state: InstanceState::Running, ..ApiState::default() };
        for (p, b) in [
            ("/machine-config", r#"{"vcpu_count": 2, "mem_size_mib": 64}"#),
            ("/boot-source", r#"{"kernel_image_path": "/k"}"#),
        ] {
            let r = reply(&mut s, "PUT", p, b);
            assert_eq!((r.status, fault(&r).as_str()), (400, NOT_AFTER_START));
        }
        let r = reply(&mut s, "PUT", "/actions", r#"{"action_type": "InstanceStart"}"#);
        assert_eq!(r.status, 400);
        assert!(reply(&mut s, "GET", "/", "").body.unwrap().contains("\"state\":\"Running\""));
        assert_eq!(s.handle(&req("PATCH", "/vm", r#"{"state": "Paused"}"#)), Outcome::Ask(VmmAction::SetPaused(true)));
        assert_eq!(
            s.handle(&req("PATCH", "/vm", r#"{"state": "Resumed"}"#)),
            Outcome::Ask(VmmAction::SetPaused(false))
        );
        assert_eq!(reply(&mut s, "PATCH", "/vm", r#"{"state": "Frozen"}"#).status, 400);
    }

    #[test]
    fn snapshot_create_needs_a_paused_vm_and_valid_paths() {
        let body = r#"{"snapshot_type": "Full", "snapshot_path": "./snapshot_file", "mem_file_path": "./mem_file"}"#;
        let mut s = ApiState::default();
        assert_eq!(reply(&mut s, "PUT", "/snapshot/create", body).status, 400, "not started");
        s.state = InstanceState::Running;
        assert!(fault(&reply(&mut s, "PUT", "/snapshot/create", body)).contains("not paused"));
        s.state = InstanceState::Paused;
        assert_eq!(
            s.handle(&req("PUT", "/snapshot/create", body)),
            Outcome::Ask(VmmAction::CreateSnapshot {
                kind: SnapshotTypeName::Full,
                state_path: "./snapshot_file".into(),
                mem_path: "./mem_file".into()
            })
        );
        let diff = r#"{"snapshot_type": "Diff", "snapshot_path": "s", "mem_file_path": "m", "version": "1.0.0"}"#;
        assert!(matches!(
            s.handle(&req("PUT", "/snapshot/create", diff)),
            Outcome::Ask(VmmAction::CreateSnapshot { kind: SnapshotTypeName::Diff, .. })
        ));
        for bad in [
            r#"{"snapshot_type": "Partial", "snapshot_path": "s", "mem_file_path": "m"}"#,
            r#"{"snapshot_path": "s"}"#,
            r#"{"snapshot_path": "", "mem_file_path": "m"}"#,
            r#"{"snapshot_path": "s", "mem_file_path": "m", "extra": true}"#,
        ] {
            assert_eq!(reply(&mut s, "PUT", "/snapshot/create", bad).status, 400, "{bad}");
        }
    }

    #[test]
    fn snapshot_load_only_on_a_fresh_vmm_with_one_file_backend() {
        let mut s = ApiState::default();
        let body = r#"{"snapshot_path": "./snapshot_file", "mem_backend": {"backend_path": "./mem_file", "backend_type": "File"}, "enable_diff_snapshots": true, "resume_vm": false}"#;
        assert_eq!(
            s.handle(&req("PUT", "/snapshot/load", body)),
            Outcome::Ask(VmmAction::LoadSnapshot(SnapshotLoad {
                state_path: "./snapshot_file".into(),
                mem_path: "./mem_file".into(),
                resume: false,
                track_dirty_pages: true,
                vsock_override: None,
                net_overrides: vec![]
            }))
        );
        let old = r#"{"snapshot_path": "s", "mem_file_path": "m", "resume_vm": true}"#;
        assert!(matches!(
            s.handle(&req("PUT", "/snapshot/load", old)),
            Outcome::Ask(VmmAction::LoadSnapshot(SnapshotLoad { resume: true, .. }))
        ));
        for bad in [
            r#"{"snapshot_path": "s"}"#,
            r#"{"snapshot_path": "s", "mem_file_path": "m", "mem_backend": {"backend_path": "m", "backend_type": "File"}}"#,
            r#"{"snapshot_path": "s", "mem_backend": {"backend_path": "/uffd.sock", "backend_type": "Uffd"}}"#,
            r#"{"snapshot_path": "s", "mem_file_path": "m", "network_overrides": [{"iface_id": "eth0"}]}"#,
        ] {
            assert_eq!(reply(&mut s, "PUT", "/snapshot/load", bad).status, 400, "{bad}");
        }
        let moved = r#"{"snapshot_path": "s", "mem_file_path": "m", "network_overrides": [{"iface_id": "eth0", "host_dev_name": "tap1"}]}"#;
        match s.handle(&req("PUT", "/snapshot/load", moved)) {
            Outcome::Ask(VmmAction::LoadSnapshot(l)) => assert_eq!(
                l.net_overrides,
                [shoal_vmm_config::NetOverride {
                    iface_id: "eth0".into(),
                    host_dev_name: "tap1".into(),
                    guest_mac: None
                }]
            ),
            _ => panic!("network_overrides accepted"),
        }
        let new_mac = r#"{"snapshot_path": "s", "mem_file_path": "m", "network_overrides": [{"iface_id": "eth0", "host_dev_name": "tap1", "guest_mac": "02:00:00:00:00:12"}]}"#;
        match s.handle(&req("PUT", "/snapshot/load", new_mac)) {
            Outcome::Ask(VmmAction::LoadSnapshot(l)) => {
                assert_eq!(l.net_overrides[0].guest_mac.as_deref(), Some("02:00:00:00:00:12"))
            }
            _ => panic!("a guest_mac override accepted"),
        }
        let bad_mac = r#"{"snapshot_path": "s", "mem_file_path": "m", "network_overrides": [{"iface_id": "eth0", "host_dev_name": "tap1", "guest_mac": "03:00:00:00:00:12"}]}"#;
        assert!(fault(&reply(&mut s, "PUT", "/snapshot/load", bad_mac)).contains("network_overrides `eth0`"));
        // After configuring boot resources, or after a start, loading is refused.
        let mut configured = ApiState::default();
        assert_eq!(
            reply(&mut configured, "PUT", "/machine-config", r#"{"vcpu_count": 1, "mem_size_mib": 64}"#).status,
            204
        );
        assert!(fault(&reply(&mut configured, "PUT", "/snapshot/load", old)).contains("after configuring"));
        let mut running = ApiState { state: InstanceState::Running, ..ApiState::default() };
        assert!(fault(&reply(&mut running, "PUT", "/snapshot/load", old)).contains("after starting"));
    }

    #[test]
    fn drives_and_entropy_from_firecracker_requests_become_disks_and_an_rng() {
        let mut s = ApiState::default();
        let rootfs = r#"{"drive_id": "rootfs", "path_on_host": "/img/rootfs.ext4", "is_root_device": true, "is_read_only": false}"#;
        let data = r#"{"drive_id": "data", "path_on_host": "/img/data.raw", "is_root_device": false, "is_read_only": true,
            "rate_limiter": {"bandwidth": {"size": 1048576, "refill_time": 1000}}}"#;
        assert_eq!(reply(&mut s, "PUT", "/drives/data", data).status, 204);
        assert_eq!(reply(&mut s, "PUT", "/drives/rootfs", rootfs).status, 204);
        assert_eq!(reply(&mut s, "PUT", "/entropy", "{}").status, 204);
        assert_eq!(
            reply(&mut s, "PUT", "/boot-source", r#"{"kernel_image_path": "/k", "boot_args": "console=ttyS0"}"#).status,
            204
        );
        let Outcome::Ask(VmmAction::Start(c)) =
            s.handle(&req("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#))
        else {
            panic!()
        };
        assert_eq!(c.cmdline, "console=ttyS0 root=/dev/vda rw");
        assert_eq!(c.disks.iter().map(|d| d.id.as_deref().unwrap()).collect::<Vec<_>>(), ["rootfs", "data"]);
        assert!(c.disks[1].read_only && c.disks[1].rate_limiter.is_some() && c.rng);
        let mut n = ApiState::default();
        let multicast = r#"{"iface_id": "eth0", "guest_mac": "AB:FC:00:00:00:01", "host_dev_name": "tap0"}"#;
        assert_eq!(reply(&mut n, "PUT", "/network-interfaces/eth0", multicast).status, 400, "AB: is a multicast MAC");
        let eth0 = r#"{"iface_id": "eth0", "guest_mac": "06:00:AC:10:00:02", "host_dev_name": "tap0"}"#;
        assert_eq!(reply(&mut n, "PUT", "/network-interfaces/eth0", eth0).status, 204);
        assert_eq!(reply(&mut n, "PUT", "/network-interfaces/eth1", eth0).status, 400, "path and body ids differ");
        assert_eq!(reply(&mut n, "PUT", "/boot-source", r#"{"kernel_image_path": "/k"}"#).status, 204);
        let Outcome::Ask(VmmAction::Start(c)) =
            n.handle(&req("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#))
        else {
            panic!()
        };
        assert_eq!((c.nets[0].tap.as_str(), c.nets[0].mac.as_deref()), ("tap0", Some("06:00:AC:10:00:02")));
        for (path, body) in [
            ("/drives/other", rootfs),
            ("/drives/second-root", r#"{"drive_id": "second-root", "path_on_host": "/x", "is_root_device": true}"#),
            (
                "/drives/x",
                r#"{"drive_id": "x", "path_on_host": "/x", "is_root_device": false, "rate_limiter": {"ops": {"size": 0, "refill_time": 100}}}"#,
            ),
            (
                "/drives/x",
                r#"{"drive_id": "x", "path_on_host": "/x", "is_root_device": false, "rate_limiter": {"bandwidth": {"size": 1, "refill_time": 18446744073709551615}}}"#,
            ),
            ("/drives/x", r#"{"drive_id": "x", "path_on_host": "/x"}"#),
            ("/entropy", r#"{"bogus": 1}"#),
        ] {
            assert_eq!(reply(&mut s, "PUT", path, body).status, 400, "{path} {body}");
        }
    }

    #[test]
    fn drives_and_interfaces_are_patched_only_while_running_and_the_config_shows_it() {
        let mut s = ApiState::default();
        let drive = r#"{"drive_id": "data", "path_on_host": "/a.img", "is_root_device": false}"#;
        assert_eq!(reply(&mut s, "PUT", "/drives/data", drive).status, 204);
        let net = r#"{"iface_id": "eth0", "host_dev_name": "tap0"}"#;
        assert_eq!(reply(&mut s, "PUT", "/network-interfaces/eth0", net).status, 204);
        let patch = r#"{"drive_id": "data", "path_on_host": "/b.img"}"#;
        let r = reply(&mut s, "PATCH", "/drives/data", patch);
        assert_eq!((r.status, fault(&r).as_str()), (400, NOT_BEFORE_START));
        s.state = InstanceState::Running;
        for (path, body) in [
            ("/drives/other", patch),
            ("/drives/data", r#"{"drive_id": "data"}"#),
            ("/drives/data", r#"{"drive_id": "data", "path_on_host": ""}"#),
            ("/drives/data", r#"{"drive_id": "data", "is_read_only": true}"#),
            (
                "/drives/data",
                r#"{"drive_id": "data", "rate_limiter": {"ops": {"size": 1, "refill_time": 18446744073709551615}}}"#,
            ),
            ("/network-interfaces/eth0", r#"{"iface_id": "eth0"}"#),
            ("/network-interfaces/eth1", r#"{"iface_id": "eth0", "rx_rate_limiter": {}}"#),
            ("/network-interfaces/eth0", r#"{"iface_id": "eth0", "host_dev_name": "tap9"}"#),
        ] {
            assert_eq!(reply(&mut s, "PATCH", path, body).status, 400, "{path} {body}");
        }
        let Outcome::Ask(a) = s.handle(&req("PATCH", "/drives/data", patch)) else { panic!() };
        s.succeeded(&a);
        let limit = r#"{"iface_id": "eth0", "tx_rate_limiter": {"bandwidth": {"size": 1000, "refill_time": 10}}}"#;
        let Outcome::Ask(a) = s.handle(&req("PATCH", "/network-interfaces/eth0", limit)) else { panic!() };
        s.succeeded(&a);
        let config: serde_json::Value =
            serde_json::from_str(reply(&mut s, "GET", "/vm/config", "").body.as_deref().unwrap()).unwrap();
        assert_eq!(config["drives"][0]["path_on_host"], "/b.img");
        assert_eq!(config["network-interfaces"][0]["tx_rate_limiter"]["bandwidth"]["size"], 1000);
        assert_eq!(config["machine-config"]["mem_size_mib"], 128);
        assert!(config["vsock"].is_null() && config["boot-source"].is_null());
        // A bucket of size 0 removes that limit.
        let off = r#"{"iface_id": "eth0", "tx_rate_limiter": {"bandwidth": {"size": 0, "refill_time": 0}}}"#;
        let Outcome::Ask(a) = s.handle(&req("PATCH", "/network-interfaces/eth0", off)) else { panic!() };
        s.succeeded(&a);
        assert_eq!(s.nets[0].tx_rate_limiter, None);
    }

    #[test]
    fn mmds_and_balloon_requests_are_checked_and_kept() {
        use crate::devices::virtio::net::mmds::store::MmdsVersion;
        let mut s = ApiState::default();
        // MMDS on an interface that does not exist, a bad address, no interfaces: refused.
        for body in [
            r#"{"network_interfaces": ["eth0"]}"#,
            r#"{"network_interfaces": []}"#,
            r#"{"network_interfaces": ["eth0"], "ipv4_address": "224.0.0.9"}"#,
            r#"{"network_interfaces": ["eth0"], "version": "V3"}"#,
        ] {
            assert_eq!(reply(&mut s, "PUT", "/mmds/config", body).status, 400, "{body}");
        }
        let net = r#"{"iface_id": "eth0", "host_dev_name": "tap0"}"#;
        assert_eq!(reply(&mut s, "PUT", "/network-interfaces/eth0", net).status, 204);
        assert_eq!(
            reply(&mut s, "PUT", "/mmds/config", r#"{"version": "V2", "network_interfaces": ["eth0"]}"#).status,
            204
        );
        s.boot = Some(BootSource { kernel_image_path: "/k".into(), boot_args: None, initrd_path: None });
        let mmds = s.vm_config().unwrap().mmds.unwrap();
        assert_eq!((mmds.version, mmds.network_interfaces), (MmdsVersion::V2, vec!["eth0".to_string()]));
        // The data store: an object only, merged by PATCH, read back by GET.
        assert_eq!(reply(&mut s, "PUT", "/mmds", "[1]").status, 400);
        assert_eq!(reply(&mut s, "PUT", "/mmds", "not json").status, 400);
        assert_eq!(reply(&mut s, "PUT", "/mmds", r#"{"a": {"b": 1}}"#).status, 204);
        assert_eq!(reply(&mut s, "PATCH", "/mmds", r#"{"a": {"c": 2}}"#).status, 204);
        let got = reply(&mut s, "GET", "/mmds", "");
        assert_eq!(got.body.as_deref(), Some(r#"{"a":{"b":1,"c":2}}"#));
        // The balloon: bigger than the guest's memory refused, statistics only after the start.
        let r = reply(&mut s, "PUT", "/balloon", r#"{"amount_mib": 4096, "deflate_on_oom": false}"#);
        assert!(r.status == 400 && fault(&r).contains("too large"), "{:?}", r.body);
        assert_eq!(reply(&mut s, "GET", "/balloon", "").status, 400);
        let balloon = r#"{"amount_mib": 16, "deflate_on_oom": true, "stats_polling_interval_s": 1}"#;
        assert_eq!(reply(&mut s, "PUT", "/balloon", balloon).status, 204);
        assert_eq!(reply(&mut s, "PATCH", "/balloon", r#"{"amount_mib": 32}"#).status, 204);
        assert!(reply(&mut s, "GET", "/balloon", "").body.unwrap_or_default().contains("\"amount_mib\":32"));
        let r = reply(&mut s, "GET", "/balloon/statistics", "");
        assert_eq!((r.status, fault(&r).as_str()), (400, NOT_BEFORE_START));
        s.state = InstanceState::Running;
        assert_eq!(reply(&mut s, "PUT", "/mmds/config", r#"{"network_interfaces": ["eth0"]}"#).status, 400);
        assert_eq!(reply(&mut s, "PUT", "/balloon", balloon).status, 400);
        assert_eq!(s.handle(&req("GET", "/balloon/statistics", "")), Outcome::Ask(VmmAction::BalloonStats));
    }

    #[test]
    fn the_version_names_the_firecracker_api_followed() {
        let r = reply(&mut ApiState::default(), "GET", "/version", "");
        let v: serde_json::Value = serde_json::from_str(r.body.as_deref().unwrap()).unwrap();
        assert_eq!((r.status, v["firecracker_version"].as_str()), (200, Some(FIRECRACKER_API_VERSION)));
        assert_eq!(v["shoal_vmm_version"], env!("CARGO_PKG_VERSION"));
    }

    #[test]
    fn pause_before_start_is_refused() {
        let mut s = ApiState::default();
        let r = reply(&mut s, "PATCH", "/vm", r#"{"state": "Paused"}"#);
        assert_eq!((r.status, fault(&r).as_str()), (400, "The microVM is not running."));
    }
}
