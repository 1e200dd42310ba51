//! Runs a built microVM: starts the vCPU threads and drives the VMM's event loop on the calling
//! thread until the guest stops. The loop owns its event sources: the stop signals (i8042
//! reset, a vCPU that stopped), stdin forwarded to the serial port when it is a terminal, and
//! the control API's requests (pause, resume, snapshot) when an API serves this VM.

use std::cell::RefCell;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::api::request::VmmRequest;
use crate::builder::{MicroVm, VirtioSlot};
use crate::controller::{Controller, Running, VcpuHandle};
use crate::devices::legacy::SerialConsole;
use crate::seccomp::{Seccomp, SeccompError, ThreadKind};
use crate::vstate::vcpu::{register_kick_handler, VcpuError, VcpuStop};
use vmm_sys_util::timerfd::TimerFd;

/// The control API's side of a running VM: its requests, the eventfd that announces them,
/// and the controller that decides them (it built this VM).
#[derive(Debug)]
pub struct Control {
    pub requests: Receiver<VmmRequest>,
    pub wake: EventFd,
    pub controller: Controller,
    /// How often the metrics are appended to the metrics file without being asked.
    pub metrics_flush_every: Option<Duration>,
}

/// The control API's requests in the event loop, answered by the controller.
struct ControlHandler {
    control: Control,
    /// Fires every `metrics_flush_every`, when a metrics file is set.
    flush_timer: Option<TimerFd>,
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
            self.control.controller.flush_periodic();
            return;
        }
        let _ = self.control.wake.read();
        while let Ok(request) = self.control.requests.try_recv() {
            // The machine is attached: no request builds another one.
            let _ = self.control.controller.handle(request);
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
        Some(mut control) => {
            // A timer only where there is a file to flush to; failing to make one loses only the
            // periodic flush (FlushMetrics still works).
            let flush_timer = match (control.controller.has_metrics_file(), control.metrics_flush_every) {
                (true, Some(every)) => {
                    TimerFd::new().ok().and_then(|mut t| t.reset(every, Some(every)).ok().map(|_| t))
                }
                _ => None,
            };
            control.controller.attach(Running {
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
            });
            em.add_subscriber(Box::new(ControlHandler { control, flush_timer }));
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
