//! Runs a built microVM: starts the vCPU threads and drives the VMM's event loop on the calling
//! thread until the guest stops. The loop owns its event sources: the stop signals (i8042
//! reset, a vCPU that stopped), stdin forwarded to the serial port when it is a terminal, and
//! the control API's requests (pause, resume, snapshot) when an API serves this VM.

use std::cell::RefCell;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use vmm_sys_util::signal::Killable;

use crate::api::routes::DevicePatch;
use crate::api::server::ApiRequest;
use crate::builder::{DeviceSpec, MicroVm, VirtioSlot};
use crate::devices::bus::Bus;
use crate::devices::legacy::{SerialConsole, I8042};
use crate::devices::virtio::mmio::MmioTransport;
use crate::metrics::{DeviceMetrics, MetricsSnapshot, VcpuMetrics};
use crate::seccomp::{Seccomp, SeccompError, ThreadKind};
use crate::snapshot::{self, MachineState, SnapshotKind, SnapshotSource};
use crate::vstate::memory::GuestMemoryMmap;
use crate::vstate::memory::MemoryBacking;
use crate::vstate::vcpu::{
    register_kick_handler, vcpu_kick_signal, VcpuCommand, VcpuCounters, VcpuError, VcpuState, VcpuStop,
};
use crate::vstate::vm::Vm;
use vmm_sys_util::timerfd::TimerFd;

/// How long a vCPU may take to acknowledge a pause or resume.
const VCPU_ACK_TIMEOUT: Duration = Duration::from_secs(2);

/// The control API's side of a running VM: its requests and the eventfd that announces them.
#[derive(Debug)]
pub struct Control {
    pub requests: Receiver<ApiRequest>,
    pub wake: EventFd,
    /// Firecracker's metrics file, if `PUT /metrics` named one before the start.
    pub metrics_file: Option<std::fs::File>,
    /// How often the metrics are appended to the metrics file without being asked.
    pub metrics_flush_every: Option<Duration>,
}

/// Appends one JSON line of `m` to Firecracker's metrics file.
pub fn flush_metrics(file: Option<&mut std::fs::File>, m: &MetricsSnapshot) -> Result<(), String> {
    use std::io::Write;
    let file = file.ok_or("Metrics are not configured (PUT /metrics first).")?;
    writeln!(file, "{}", m.to_json()).map_err(|e| format!("Cannot write the metrics file: {e}"))
}

/// A running vCPU thread and its command channel.
struct VcpuHandle {
    thread: std::thread::JoinHandle<()>,
    commands: Sender<VcpuCommand>,
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
struct ControlHandler {
    control: Control,
    vcpus: Vec<VcpuHandle>,
    paused: bool,
    /// Each virtio device's spec and transport, in MMIO order.
    devices: Vec<(DeviceSpec, Arc<Mutex<MmioTransport>>)>,
    vm: Vm,
    mem: GuestMemoryMmap,
    backing: MemoryBacking,
    serial: Arc<Mutex<SerialConsole>>,
    machine: MachineState,
    generation: u64,
    mmds: Option<crate::devices::virtio::net::mmds::store::MmdsConfig>,
    vcpu_counters: Vec<Arc<VcpuCounters>>,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    i8042: Arc<Mutex<I8042>>,
    /// Fires every `metrics_flush_every`, when a metrics file is set.
    flush_timer: Option<TimerFd>,
}

impl ControlHandler {
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

impl ControlHandler {
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

impl ControlHandler {
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

impl MutEventSubscriber for ControlHandler {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.control.wake, EventSet::IN)) {
            tracing::error!(error = ?e, "cannot watch the control API");
        }
        if let Some(timer) = &self.flush_timer {
            if let Err(e) = ops.add(Events::new(timer, EventSet::IN)) {
                tracing::error!(error = ?e, "cannot watch the metrics flush timer");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if let Some(timer) = self.flush_timer.as_mut().filter(|t| t.as_raw_fd() == events.fd()) {
            let _ = timer.wait();
            let m = self.metrics();
            if let Err(e) = flush_metrics(self.control.metrics_file.as_mut(), &m) {
                tracing::warn!(error = %e, "periodic metrics flush failed");
            }
            return;
        }
        let _ = self.control.wake.read();
        while let Ok(request) = self.control.requests.try_recv() {
            match request {
                ApiRequest::SetPaused { paused, reply } => {
                    let make: fn(Sender<u8>) -> VcpuCommand =
                        if paused { |ack| VcpuCommand::Pause { ack } } else { |ack| VcpuCommand::Resume { ack } };
                    let result = command_all(&self.vcpus, make);
                    if result.is_ok() {
                        self.paused = paused;
                    }
                    tracing::info!(paused, ok = result.is_ok(), "vm state change");
                    let _ = reply.send(result);
                }
                ApiRequest::CreateSnapshot { kind, state_path, mem_path, reply } => {
                    let _ = reply.send(self.create_snapshot(kind, &state_path, &mem_path));
                }
                ApiRequest::Metrics { reply } => {
                    let _ = reply.send(self.metrics());
                }
                ApiRequest::Logger { level, path, reply } => {
                    let _ = reply.send(crate::logging::configure(level, path.as_deref()));
                }
                ApiRequest::FlushMetrics { reply } => {
                    let m = self.metrics();
                    let _ = reply.send(flush_metrics(self.control.metrics_file.as_mut(), &m));
                }
                ApiRequest::SendCtrlAltDel { reply } => {
                    let result = self.i8042.lock().unwrap_or_else(|p| p.into_inner()).send_ctrl_alt_del();
                    tracing::info!(ok = result.is_ok(), "ctrl-alt-del sent to the guest");
                    let _ = reply.send(result.map_err(|e| format!("Cannot send Ctrl+Alt+Del: {e}.")));
                }
                ApiRequest::MetricsFile { reply, .. } => {
                    let _ =
                        reply.send(Err("The requested operation is not supported after starting the microVM.".into()));
                }
                ApiRequest::BalloonStats { reply } => {
                    let _ = reply.send(self.balloon_stats());
                }
                ApiRequest::PatchDevice { patch, reply } => {
                    let result = self.patch_device(&patch);
                    tracing::info!(?patch, ok = result.is_ok(), "device updated");
                    let _ = reply.send(result);
                }
                ApiRequest::Start { reply, .. } | ApiRequest::LoadSnapshot { reply, .. } => {
                    let _ = reply.send(Err("The microVM is already running.".into()));
                }
            }
        }
    }
}

/// Errors while running.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot set up the event loop")]
    EventLoop(#[source] event_manager::Error),
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
}

type Outcome = Rc<RefCell<Option<VcpuStop>>>;

/// Watches the i8042 reset line and the vCPUs' stop reports; the first one decides the outcome.
struct StopWatcher {
    reset_evt: EventFd,
    wake: EventFd,
    stopped: Receiver<(u8, VcpuStop)>,
    outcome: Outcome,
}

impl MutEventSubscriber for StopWatcher {
    fn init(&mut self, ops: &mut EventOps) {
        for fd in [&self.reset_evt, &self.wake] {
            if let Err(e) = ops.add(Events::new(fd, EventSet::IN)) {
                tracing::error!(error = ?e, "cannot watch a stop signal");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let mut outcome = self.outcome.borrow_mut();
        if events.fd() == self.reset_evt.as_raw_fd() {
            let _ = self.reset_evt.read();
            tracing::info!("guest reset through the i8042");
            outcome.get_or_insert(VcpuStop::Reset);
        } else if events.fd() == self.wake.as_raw_fd() {
            let _ = self.wake.read();
            while let Ok((index, why)) = self.stopped.try_recv() {
                // The binary reports the outcome; this is the per-vCPU detail.
                tracing::info!(vcpu = index, reason = %why, "vcpu stopped");
                outcome.get_or_insert(why);
            }
        }
    }
}

/// Serves one virtio device's queue notifications (ioeventfds KVM signals) on the event loop,
/// does the device work its driver's register writes deferred (activation, reset), and re-runs
/// a rate-limited device's queues when its limiter has room again.
struct VirtioQueues {
    slot: VirtioSlot,
    timer: Option<TimerFd>,
    /// The device's host descriptor (a tap), if it has one.
    backend: Option<std::os::fd::RawFd>,
}

impl VirtioQueues {
    fn process(&mut self, queues: impl Iterator<Item = usize>) {
        let mut t = self.slot.transport.lock().unwrap_or_else(|p| p.into_inner());
        for q in queues {
            t.notify(q);
        }
        let wait = [t.device().throttled_for(), t.device().wakeup_in()].into_iter().flatten().min();
        if let (Some(wait), Some(timer)) = (wait, self.timer.as_mut()) {
            // A zero duration would disarm the timer instead of firing it.
            if let Err(e) = timer.reset(wait.max(std::time::Duration::from_micros(1)), None) {
                tracing::warn!(error = %e, device = %self.slot.name, "cannot arm the device's timer");
            }
        } else if t.device().has_more_work() {
            // Come back after the loop's other events: the queues' own eventfds say "again".
            for evt in &self.slot.queue_evts {
                if let Err(e) = evt.write(1) {
                    tracing::warn!(error = %e, device = %self.slot.name, "cannot requeue the device's work");
                }
            }
        }
    }
}

impl MutEventSubscriber for VirtioQueues {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.slot.wake, EventSet::IN)) {
            tracing::error!(error = ?e, device = %self.slot.name, "cannot watch the device's deferred work");
        }
        for evt in &self.slot.queue_evts {
            if let Err(e) = ops.add(Events::new(evt, EventSet::IN)) {
                tracing::error!(error = ?e, device = %self.slot.name, "cannot watch a virtio queue");
            }
        }
        let backend = self.slot.transport.lock().unwrap_or_else(|p| p.into_inner()).device().backend_fd();
        if let Some(fd) = backend {
            self.backend = Some(fd);
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN | EventSet::EDGE_TRIGGERED)) {
                tracing::error!(error = ?e, device = %self.slot.name, "cannot watch the device's backend");
            }
        }
        if let Some(timer) = &self.timer {
            if let Err(e) = ops.add(Events::new(timer, EventSet::IN)) {
                tracing::error!(error = ?e, device = %self.slot.name, "cannot watch the rate limiter timer");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if self.slot.wake.as_raw_fd() == events.fd() {
            let _ = self.slot.wake.read();
            self.slot.transport.lock().unwrap_or_else(|p| p.into_inner()).run_deferred();
            self.process(std::iter::empty());
            return;
        }
        if self.backend == Some(events.fd()) {
            self.slot.transport.lock().unwrap_or_else(|p| p.into_inner()).backend_ready();
            return;
        }
        if self.timer.as_ref().is_some_and(|t| t.as_raw_fd() == events.fd()) {
            if let Some(t) = self.timer.as_mut() {
                let _ = t.wait();
            }
            let all = 0..self.slot.queue_evts.len();
            self.process(all);
            return;
        }
        let Some(q) = self.slot.queue_evts.iter().position(|e| e.as_raw_fd() == events.fd()) else { return };
        let _ = self.slot.queue_evts[q].read();
        self.process(std::iter::once(q));
    }
}

/// Forwards bytes typed on the host terminal to the guest's serial port.
struct StdinForwarder {
    serial: Arc<Mutex<SerialConsole>>,
    stdin: std::io::Stdin,
}

impl MutEventSubscriber for StdinForwarder {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.stdin, EventSet::IN)) {
            tracing::warn!(error = ?e, "cannot watch stdin; the console is output only");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let mut buf = [0u8; 64];
        // SAFETY: reading into a stack buffer of the length given.
        let n = unsafe { libc::read(self.stdin.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 || events.event_set().contains(EventSet::HANG_UP) {
            // End of input or an error: stop watching rather than spin.
            let _ = ops.remove(events);
            return;
        }
        let mut serial = self.serial.lock().unwrap_or_else(|p| p.into_inner());
        serial.enqueue_input(&buf[..n as usize]);
    }
}

/// Runs `vm` until the guest stops and returns why. `forward_stdin` feeds the host's stdin to
/// the guest's serial port; `control` connects the control API.
pub fn run(vm: MicroVm, forward_stdin: bool, control: Option<Control>, seccomp: Seccomp) -> Result<VcpuStop, RunError> {
    let MicroVm {
        vm,
        mem,
        vcpus,
        serial,
        reset_evt,
        guest_panicked,
        reset_requested,
        i8042,
        machine,
        backing,
        generation,
        mmds,
        virtio,
        pio,
        mmio,
        ..
    } = vm;
    let vcpu_counters: Vec<_> = vcpus.iter().map(|v| v.counters.clone()).collect();
    let devices: Vec<_> = virtio.iter().map(|s| (s.spec.clone(), s.transport.clone())).collect();
    let start_paused = vcpus.iter().any(|v| v.start_paused);
    let mut em: EventManager<Box<dyn MutEventSubscriber>> = EventManager::new().map_err(RunError::EventLoop)?;
    let (tx, rx) = channel();
    let wake = EventFd::new(EFD_NONBLOCK).map_err(RunError::EventFd)?;
    let outcome: Outcome = Rc::new(RefCell::new(None));
    em.add_subscriber(Box::new(StopWatcher {
        reset_evt,
        wake: wake.try_clone().map_err(RunError::EventFd)?,
        stopped: rx,
        outcome: outcome.clone(),
    }));
    for slot in virtio {
        // Only a device with a rate limiter needs a timer; a failure to make one only loses
        // the limiter's wake-up (the next notification still serves the queue).
        let timer = TimerFd::new().ok();
        em.add_subscriber(Box::new(VirtioQueues { slot, timer, backend: None }));
    }
    if forward_stdin {
        em.add_subscriber(Box::new(StdinForwarder { serial: serial.clone(), stdin: std::io::stdin() }));
    }
    register_kick_handler()?;
    let mut handles = Vec::with_capacity(vcpus.len());
    for vcpu in vcpus {
        let (commands, command_rx) = channel();
        // The threads are not joined: the process ends when the VM stops, vCPUs included.
        let thread = vcpu.start(tx.clone(), wake.try_clone().map_err(RunError::EventFd)?, command_rx, seccomp)?;
        handles.push(VcpuHandle { thread, commands });
    }
    // Let the vCPU threads run first. A new thread starts on its parent's CPU, and where the
    // scheduler packs threads onto few CPUs (this dev machine's VM does) it only runs once
    // this thread blocks: after the rest of the setup and the seccomp filter below, about
    // 0.3-0.9 ms later (make bench-snapshot, spawn to first output at 2 GiB: 4.1-4.3 ms before,
    // 3.3-3.7 ms after).
    // Until the event loop starts this thread serves no guest request, so nothing the guest
    // does reaches it before its own filter is in place. With an idle CPU at hand this
    // returns at once.
    std::thread::yield_now();
    drop(tx);
    // Guest memory and the VM stay alive until the process ends, with or without an API.
    let _kept;
    match control {
        Some(control) => {
            // A timer only where there is a file to flush to; failing to make one loses only the
            // periodic flush (FlushMetrics still works).
            let flush_timer = match (&control.metrics_file, control.metrics_flush_every) {
                (Some(_), Some(every)) => {
                    TimerFd::new().ok().and_then(|mut t| t.reset(every, Some(every)).ok().map(|_| t))
                }
                _ => None,
            };
            em.add_subscriber(Box::new(ControlHandler {
                control,
                vcpus: handles,
                paused: start_paused,
                devices,
                vm,
                mem,
                backing,
                serial,
                machine,
                generation,
                mmds,
                vcpu_counters,
                pio,
                mmio,
                i8042,
                flush_timer,
            }));
        }
        None => {
            drop(handles);
            _kept = (vm, mem, backing);
        }
    }
    // The vCPU threads are started (each installed its own filter); this thread's loop next.
    crate::seccomp::install(ThreadKind::Vmm, seccomp)?;
    loop {
        em.run().map_err(RunError::EventLoop)?;
        if let Some(why) = outcome.borrow_mut().take() {
            // A reset that follows a kernel panic is the panic's doing, not a clean reboot.
            if why.is_clean() && guest_panicked.load(std::sync::atomic::Ordering::SeqCst) {
                return Ok(VcpuStop::GuestPanic);
            }
            // Once the guest has asked for a reset, what its other vCPUs do next is not a
            // crash: one of them may fault before the resetting vCPU's report is read.
            if !why.is_clean() && reset_requested.load(std::sync::atomic::Ordering::SeqCst) {
                tracing::info!(reason = %why, "vcpu stopped after the guest asked for a reset");
                return Ok(VcpuStop::Reset);
            }
            return Ok(why);
        }
    }
}
