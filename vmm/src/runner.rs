//! Runs a built microVM: starts the vCPU threads and drives the VMM's event loop on the calling
//! thread until the guest stops. The loop owns two event sources: the stop signals (i8042
//! reset, a vCPU that stopped) and, when it is a terminal, stdin forwarded to the serial port.

use std::cell::RefCell;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::builder::MicroVm;
use crate::devices::legacy::SerialConsole;
use crate::vstate::vcpu::{VcpuError, VcpuStop};

/// Errors while running.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot set up the event loop")]
    EventLoop(#[source] event_manager::Error),
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
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
/// the guest's serial port.
pub fn run(vm: MicroVm, forward_stdin: bool) -> Result<VcpuStop, RunError> {
    let MicroVm { vm: _vm, mem: _mem, vcpus, serial, reset_evt, guest_panicked, .. } = vm;
    let mut em: EventManager<Box<dyn MutEventSubscriber>> = EventManager::new().map_err(RunError::EventLoop)?;
    let (tx, rx) = channel();
    let wake = EventFd::new(EFD_NONBLOCK).map_err(RunError::EventFd)?;
    let outcome: Outcome = Rc::new(RefCell::new(None));
    em.add_subscriber(Box::new(StopWatcher { reset_evt, wake: wake.try_clone().map_err(RunError::EventFd)?, stopped: rx, outcome: outcome.clone() }));
    if forward_stdin {
        em.add_subscriber(Box::new(StdinForwarder { serial, stdin: std::io::stdin() }));
    }
    for vcpu in vcpus {
        // The threads are detached: the process ends when the VM stops, vCPUs included.
        vcpu.start(tx.clone(), wake.try_clone().map_err(RunError::EventFd)?)?;
    }
    drop(tx);
    loop {
        em.run().map_err(RunError::EventLoop)?;
        if let Some(why) = outcome.borrow_mut().take() {
            // A reset that follows a kernel panic is the panic's doing, not a clean reboot.
            if why.is_clean() && guest_panicked.load(std::sync::atomic::Ordering::SeqCst) {
                return Ok(VcpuStop::GuestPanic);
            }
            return Ok(why);
        }
    }
}
