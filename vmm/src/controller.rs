//! The one place every control request is decided, before the boot and after:
//! `Controller::handle` takes a `VmmAction` from the API thread and answers it. Before the
//! boot it builds the microVM (from a configuration or a snapshot) and keeps the metrics
//! file; once `runner` has started the vCPUs it is given the running machine (`Running`) and
//! pauses, resumes, snapshots and patches it. What an action needs that is not there (a
//! snapshot of a VM not yet built, a second start) is refused here, in one match.

use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vmm_sys_util::signal::Killable;

use crate::api::error_chain;
use crate::api::request::{DevicePatch, Restored, VmmAction, VmmData, VmmReply, VmmRequest};
use crate::builder;
use crate::builder::{DeviceSpec, MachineState, MicroVm};
use crate::devices::bus::Bus;
use crate::devices::legacy::{SerialConsole, I8042};
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::net::mmds::SharedStore;
use crate::metrics::{DeviceMetrics, MetricsSnapshot, VcpuMetrics};
use crate::snapshot::{self, SnapshotKind, SnapshotSource};
use crate::vstate::memory::{GuestMemoryMmap, MemoryBacking};
use crate::vstate::vcpu::{vcpu_kick_signal, VcpuCommand, VcpuCounters, VcpuState};
use crate::vstate::vm::Vm;

const NOT_RUNNING: &str = "The microVM is not running.";
const NOT_AFTER_START: &str = "The requested operation is not supported after starting the microVM.";

/// How long a vCPU may take to acknowledge a pause or resume.
const VCPU_ACK_TIMEOUT: Duration = Duration::from_secs(2);

/// Appends one JSON line of `m` to Firecracker's metrics file.
pub fn flush_metrics(file: Option<&mut std::fs::File>, m: &MetricsSnapshot) -> Result<(), String> {
    use std::io::Write;
    let file = file.ok_or("Metrics are not configured (PUT /metrics first).")?;
    writeln!(file, "{}", m.to_json()).map_err(|e| format!("Cannot write the metrics file: {e}"))
}

/// A running vCPU thread and its command channel.
#[derive(Debug)]
pub struct VcpuHandle {
    pub thread: std::thread::JoinHandle<()>,
    pub commands: Sender<VcpuCommand>,
}

/// Sends a command to every vCPU, kicks each out of KVM_RUN, and waits for every ack.
fn command_all(vcpus: &[VcpuHandle], make: fn(Sender<u8>) -> VcpuCommand) -> Result<(), String> {
    let (ack, acks) = channel();
    for (index, v) in vcpus.iter().enumerate() {
        if v.commands.send(make(ack.clone())).is_err() {
            return Err(format!("vCPU {index} is not running"));
        }
        if let Err(e) = v.thread.kill(vcpu_kick_signal()) {
            return Err(format!("cannot signal vCPU {index}: {e}"));
        }
    }
    for _ in vcpus {
        acks.recv_timeout(VCPU_ACK_TIMEOUT).map_err(|_| "a vCPU did not answer in time".to_string())?;
    }
    Ok(())
}

/// Reads every vCPU's state (they must be paused).
fn save_all(vcpus: &[VcpuHandle]) -> Result<Vec<VcpuState>, String> {
    let mut states = Vec::with_capacity(vcpus.len());
    for (index, v) in vcpus.iter().enumerate() {
        let (reply, answer) = channel();
        v.commands.send(VcpuCommand::Save { reply }).map_err(|_| format!("vCPU {index} is not running"))?;
        states
            .push(answer.recv_timeout(VCPU_ACK_TIMEOUT).map_err(|_| format!("vCPU {index} did not answer in time"))??);
    }
    Ok(states)
}
/// What the VMM thread keeps of a running microVM to answer the control API.
pub struct Running {
    pub vcpus: Vec<VcpuHandle>,
    pub paused: bool,
    /// Each virtio device's spec and transport, in MMIO order.
    pub devices: Vec<(DeviceSpec, Arc<Mutex<MmioTransport>>)>,
    pub vm: Vm,
    pub mem: GuestMemoryMmap,
    pub backing: MemoryBacking,
    pub serial: Arc<Mutex<SerialConsole>>,
    pub machine: MachineState,
    pub generation: u64,
    pub mmds: Option<crate::devices::virtio::net::mmds::store::MmdsConfig>,
    pub vcpu_counters: Vec<Arc<VcpuCounters>>,
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub i8042: Arc<Mutex<I8042>>,
}

impl Running {
    fn metrics(&self) -> MetricsSnapshot {
        let load = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        MetricsSnapshot {
            utc_timestamp_ms: MetricsSnapshot::now_ms(),
            vcpus: self
                .vcpu_counters
                .iter()
                .map(|c| VcpuMetrics {
                    exits: load(&c.exits),
                    io_in: load(&c.io_in),
                    io_out: load(&c.io_out),
                    mmio: load(&c.mmio),
                })
                .collect(),
            devices: self
                .devices
                .iter()
                .map(|(spec, t)| {
                    let t = t.lock().unwrap_or_else(|p| p.into_inner());
                    let c = t.device().counters();
                    let name = match spec {
                        DeviceSpec::Block(d) => format!("block {}", d.id.as_deref().unwrap_or("")),
                        DeviceSpec::Net(n) => format!("net {}", n.tap),
                        DeviceSpec::Rng(_) => "rng".into(),
                        DeviceSpec::Vsock(v) => format!("vsock {}", v.cid),
                        DeviceSpec::Balloon(_) => "balloon".into(),
                    };
                    DeviceMetrics {
                        name,
                        requests: load(&c.requests),
                        bytes: load(&c.bytes),
                        errors: load(&c.errors),
                        spurious: load(&c.spurious),
                        throttled: load(&c.throttled),
                    }
                })
                .collect(),
            serial_errors: load(&self.serial.lock().unwrap_or_else(|p| p.into_inner()).errors),
            pio_unclaimed: load(&self.pio.unclaimed),
            mmio_unclaimed: load(&self.mmio.unclaimed),
        }
    }

    fn create_snapshot(
        &self,
        kind: SnapshotKind,
        state_path: &std::path::Path,
        mem_path: &std::path::Path,
    ) -> Result<(), String> {
        if !self.paused {
            return Err("Cannot create a snapshot: the microVM is not paused.".into());
        }
        let started = std::time::Instant::now();
        let vcpus = save_all(&self.vcpus)?;
        let devices = self
            .devices
            .iter()
            .map(|(spec, t)| (spec.clone(), t.lock().unwrap_or_else(|p| p.into_inner()).save()))
            .collect();
        let source = SnapshotSource {
            vm: &self.vm,
            mmds: self.mmds.as_ref(),
            devices,
            mem: &self.mem,
            backing: &self.backing,
            serial: &self.serial,
            machine: &self.machine,
            generation: self.generation,
        };
        snapshot::create(&source, vcpus, kind, state_path, mem_path)
            .map_err(|e| format!("Cannot create a snapshot: {}", crate::api::error_chain(&e)))?;
        tracing::info!(?kind, elapsed_us = started.elapsed().as_micros() as u64, state = %state_path.display(), "snapshot created");
        Ok(())
    }
}

impl Running {
    /// `PATCH /drives/{id}` and `PATCH /network-interfaces/{id}` on the running VM: the
    /// device changes, then its spec, so a later snapshot reopens what the device now uses.
    /// A failure (a file that does not open) leaves the device and spec as they were.
    fn patch_device(&mut self, patch: &DevicePatch) -> Result<(), String> {
        use crate::devices::rate_limiter::RateLimitConfig;
        use crate::devices::virtio::DeviceUpdate;
        match patch {
            DevicePatch::Drive(p) => {
                let found = self.devices.iter_mut().find_map(|(spec, t)| match spec {
                    DeviceSpec::Block(d) if d.id.as_deref() == Some(p.drive_id.as_str()) => Some((d, t)),
                    _ => None,
                });
                let Some((d, t)) = found else { return Err(format!("Invalid drive ID: {}.", p.drive_id)) };
                let limiter = p.rate_limiter.as_ref().map(|r| RateLimitConfig::patched(d.rate_limiter, r));
                let disk = match &p.path_on_host {
                    None => None,
                    Some(path) => {
                        let opened = std::fs::OpenOptions::new()
                            .read(true)
                            .write(!d.read_only)
                            .open(path)
                            .and_then(crate::devices::virtio::block::handler::FileDisk::new)
                            .map_err(|e| format!("Cannot open the drive's new backing file {path}: {e}."))?;
                        Some(Box::new(opened) as Box<dyn crate::devices::virtio::block::handler::DiskBackend>)
                    }
                };
                t.lock().unwrap_or_else(|p| p.into_inner()).update_device(DeviceUpdate::Block { disk, limiter })?;
                if let Some(path) = &p.path_on_host {
                    d.path = path.into();
                }
                if let Some(l) = limiter {
                    d.rate_limiter = l;
                }
            }
            DevicePatch::Balloon { amount_mib, stats_polling_interval_s } => {
                let found = self.devices.iter_mut().find_map(|(spec, t)| match spec {
                    DeviceSpec::Balloon(b) => Some((b, t)),
                    _ => None,
                });
                let Some((b, t)) = found else { return Err("No balloon device configured.".into()) };
                if let Some(m) = amount_mib {
                    shoal_vmm_config::check_balloon_amount(*m, self.machine.mem_mib)?;
                }
                let update = DeviceUpdate::Balloon {
                    amount_mib: *amount_mib,
                    stats_polling_interval_s: *stats_polling_interval_s,
                };
                t.lock().unwrap_or_else(|p| p.into_inner()).update_device(update)?;
                b.amount_mib = amount_mib.unwrap_or(b.amount_mib);
                b.stats_polling_interval_s = stats_polling_interval_s.unwrap_or(b.stats_polling_interval_s);
            }
            DevicePatch::Net(p) => {
                let found = self.devices.iter_mut().find_map(|(spec, t)| match spec {
                    DeviceSpec::Net(n) if n.id == p.iface_id => Some((n, t)),
                    _ => None,
                });
                let Some((n, t)) = found else {
                    return Err(format!("Invalid network interface ID: {}.", p.iface_id));
                };
                let rx = p.rx_rate_limiter.as_ref().map(|r| RateLimitConfig::patched(n.rx_rate_limiter, r));
                let tx = p.tx_rate_limiter.as_ref().map(|r| RateLimitConfig::patched(n.tx_rate_limiter, r));
                t.lock().unwrap_or_else(|p| p.into_inner()).update_device(DeviceUpdate::Net { rx, tx })?;
                if let Some(rx) = rx {
                    n.rx_rate_limiter = rx;
                }
                if let Some(tx) = tx {
                    n.tx_rate_limiter = tx;
                }
            }
        }
        Ok(())
    }
}

impl Running {
    /// `GET /balloon/statistics`: Firecracker's BalloonStats object.
    fn balloon_stats(&self) -> Result<String, String> {
        let status = self
            .devices
            .iter()
            .find_map(|(_, t)| t.lock().unwrap_or_else(|p| p.into_inner()).device().balloon_status())
            .ok_or("No balloon device configured.")?;
        let mib = |pages: u32| pages / crate::devices::virtio::balloon::pages_of(1).max(1);
        let mut v = serde_json::json!({
            "target_pages": status.target_pages,
            "actual_pages": status.actual_pages,
            "target_mib": mib(status.target_pages),
            "actual_mib": mib(status.actual_pages),
        });
        if let (Some(stats), Some(obj)) = (status.stats, v.as_object_mut()) {
            if let Ok(serde_json::Value::Object(fields)) = serde_json::to_value(stats) {
                obj.extend(fields);
            }
        }
        Ok(v.to_string())
    }
}
impl Running {
    fn set_paused(&mut self, paused: bool) -> Result<(), String> {
        let make: fn(Sender<u8>) -> VcpuCommand =
            if paused { |ack| VcpuCommand::Pause { ack } } else { |ack| VcpuCommand::Resume { ack } };
        let result = command_all(&self.vcpus, make);
        if result.is_ok() {
            self.paused = paused;
        }
        tracing::info!(paused, ok = result.is_ok(), "vm state change");
        result
    }

    fn send_ctrl_alt_del(&self) -> Result<(), String> {
        let result = self.i8042.lock().unwrap_or_else(|p| p.into_inner()).send_ctrl_alt_del();
        tracing::info!(ok = result.is_ok(), "ctrl-alt-del sent to the guest");
        result.map_err(|e| format!("Cannot send Ctrl+Alt+Del: {e}."))
    }
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running")
            .field("vcpus", &self.vcpus.len())
            .field("paused", &self.paused)
            .field("devices", &self.devices.len())
            .field("machine", &self.machine)
            .finish_non_exhaustive()
    }
}

/// Decides every control request: before the boot (`running` is None) and after.
#[derive(Debug)]
pub struct Controller {
    /// Firecracker's metrics file, once `PUT /metrics` opened it.
    metrics_file: Option<std::fs::File>,
    /// The MMDS data store the API fills and the built machine's network devices serve.
    mmds: SharedStore,
    running: Option<Running>,
}

impl Controller {
    pub fn new(mmds: SharedStore) -> Controller {
        Controller { metrics_file: None, mmds, running: None }
    }

    /// Whether a metrics file is open (the runner flushes to it periodically).
    pub fn has_metrics_file(&self) -> bool {
        self.metrics_file.is_some()
    }

    /// Hands over the running machine: from now on actions act on it.
    pub fn attach(&mut self, running: Running) {
        self.running = Some(running);
    }

    /// Decides one request and answers it. Before the boot, a start or snapshot load that
    /// builds a machine returns it, answered with `VmmData::Started` (and waits, at most 2 s,
    /// until the API thread has written its 204); the caller runs it and attaches it.
    pub fn handle(&mut self, request: VmmRequest) -> Option<MicroVm> {
        let VmmRequest { action, reply } = request;
        if self.running.is_none() {
            let restoring = matches!(action, VmmAction::LoadSnapshot(_));
            let built = match action {
                VmmAction::Start(config) => builder::build_microvm(&config, Box::new(std::io::stdout()), &self.mmds)
                    .map_err(|e| error_chain(&e)),
                VmmAction::LoadSnapshot(load) => {
                    let options = snapshot::RestoreOptions {
                        resume: load.resume,
                        track_dirty_pages: load.track_dirty_pages,
                        vsock_override: load.vsock_override,
                        net_overrides: load.net_overrides,
                        mmds_store: Some(self.mmds.clone()),
                    };
                    snapshot::restore(&load.state_path, &load.mem_path, Box::new(std::io::stdout()), options)
                        .map_err(|e| format!("Cannot load the snapshot: {}", error_chain(&e)))
                }
                other => {
                    let _ = reply.send(self.decide(other));
                    return None;
                }
            };
            return match built {
                Ok(vm) => {
                    let (written_tx, written_rx) = channel();
                    let restored = restoring.then(|| Box::new(restored_config(&vm)));
                    if reply.send(Ok(VmmData::Started { written: written_tx, restored })).is_ok() {
                        let _ = written_rx.recv_timeout(Duration::from_secs(2));
                    }
                    Some(vm)
                }
                Err(e) => {
                    let _ = reply.send(Err(e));
                    None
                }
            };
        }
        let _ = reply.send(self.decide(action));
        None
    }

    /// Everything but a start or load before the boot.
    fn decide(&mut self, action: VmmAction) -> VmmReply {
        let done = |r: Result<(), String>| r.map(|()| VmmData::Done);
        match (action, self.running.as_mut()) {
            (VmmAction::Start(_) | VmmAction::LoadSnapshot(_), _) => Err("The microVM is already running.".into()),
            (VmmAction::Logger { level, path }, _) => done(crate::logging::configure(level, path.as_deref())),
            (VmmAction::Metrics { .. }, running) => Ok(VmmData::Metrics(metrics_of(running.as_deref()))),
            (VmmAction::FlushMetrics, running) => {
                let m = metrics_of(running.as_deref());
                done(flush_metrics(self.metrics_file.as_mut(), &m))
            }
            (VmmAction::MetricsFile(_), Some(_)) => Err(NOT_AFTER_START.into()),
            (VmmAction::MetricsFile(path), None) => {
                let opened = std::fs::OpenOptions::new().create(true).append(true).open(&path);
                match opened {
                    Ok(f) => {
                        self.metrics_file = Some(f);
                        Ok(VmmData::Done)
                    }
                    Err(e) => Err(format!("Cannot open the metrics file {}: {e}", path.display())),
                }
            }
            (
                VmmAction::SetPaused(_)
                | VmmAction::SendCtrlAltDel
                | VmmAction::CreateSnapshot { .. }
                | VmmAction::PatchDevice(_)
                | VmmAction::BalloonStats,
                None,
            ) => Err(NOT_RUNNING.into()),
            (VmmAction::SetPaused(paused), Some(r)) => done(r.set_paused(paused)),
            (VmmAction::SendCtrlAltDel, Some(r)) => done(r.send_ctrl_alt_del()),
            (VmmAction::CreateSnapshot { kind, state_path, mem_path }, Some(r)) => {
                let kind = match kind {
                    shoal_vmm_config::SnapshotTypeName::Full => SnapshotKind::Full,
                    shoal_vmm_config::SnapshotTypeName::Diff => SnapshotKind::Diff,
                };
                done(r.create_snapshot(kind, &state_path, &mem_path))
            }
            (VmmAction::PatchDevice(patch), Some(r)) => {
                let result = r.patch_device(&patch);
                tracing::info!(?patch, ok = result.is_ok(), "device updated");
                done(result)
            }
            (VmmAction::BalloonStats, Some(r)) => r.balloon_stats().map(VmmData::Json),
        }
    }

    /// The periodic metrics flush (a timer in the runner's loop).
    pub fn flush_periodic(&mut self) {
        let m = metrics_of(self.running.as_ref());
        if let Err(e) = flush_metrics(self.metrics_file.as_mut(), &m) {
            tracing::warn!(error = %e, "periodic metrics flush failed");
        }
    }
}

/// A restored machine's configuration as the API shows it: its shape and its devices' specs.
fn restored_config(vm: &MicroVm) -> Restored {
    let mut r = Restored {
        machine: shoal_vmm_config::MachineConfig {
            vcpu_count: vm.machine.vcpus,
            mem_size_mib: vm.machine.mem_mib,
            smt: false,
            track_dirty_pages: vm.machine.track_dirty_pages,
            acpi: vm.machine.acpi,
        },
        mmds: vm.mmds.clone(),
        ..Restored::default()
    };
    for (i, slot) in vm.virtio.iter().enumerate() {
        match &slot.spec {
            DeviceSpec::Block(d) => r.drives.push(shoal_vmm_config::FirecrackerDrive {
                drive_id: d.id.clone().unwrap_or_else(|| format!("drive{i}")),
                path_on_host: d.path.display().to_string(),
                // The snapshot keeps no root flag: the guest's command line named its root.
                is_root_device: false,
                is_read_only: d.read_only,
                rate_limiter: d.rate_limiter,
                cache_type: None,
                io_engine: None,
                partuuid: None,
            }),
            DeviceSpec::Net(n) => r.nets.push(shoal_vmm_config::FirecrackerNet {
                iface_id: n.id.clone(),
                host_dev_name: n.tap.clone(),
                guest_mac: Some(shoal_vmm_config::format_mac(&n.mac)),
                rx_rate_limiter: n.rx_rate_limiter,
                tx_rate_limiter: n.tx_rate_limiter,
            }),
            DeviceSpec::Rng(rng) => r.entropy = Some(rng.rate_limiter),
            DeviceSpec::Vsock(v) => {
                r.vsock = Some(shoal_vmm_config::VsockConfig {
                    guest_cid: v.cid,
                    uds_path: v.uds_path.clone(),
                    vsock_id: None,
                })
            }
            DeviceSpec::Balloon(b) => r.balloon = Some(*b),
        }
    }
    r
}

/// The running machine's counters, or empty ones before the boot.
fn metrics_of(running: Option<&Running>) -> MetricsSnapshot {
    match running {
        Some(r) => r.metrics(),
        None => MetricsSnapshot { utc_timestamp_ms: MetricsSnapshot::now_ms(), ..MetricsSnapshot::default() },
    }
}
