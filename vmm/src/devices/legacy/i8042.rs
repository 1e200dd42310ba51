//! The i8042 keyboard controller, kept for one job: a guest writing 0xFE (pulse reset line) to
//! port 0x64 asks for a reset, which stops the microVM (the process then exits 0).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::devices::bus::BusDevice;
use crate::devices::EventFdTrigger;

pub const I8042_BASE: u64 = 0x60;
pub const I8042_LEN: u64 = 5;
/// "Pulse the reset line" on the command port.
const CMD_RESET_CPU: u8 = 0xfe;

/// The controller at ports 0x60 (data) and 0x64 (command/status).
pub struct I8042 {
    dev: vm_superio::I8042Device<EventFdTrigger>,
    /// Set on a reset request, so the vCPU that made it stops at once instead of running the
    /// guest further (it would only halt and wait to be killed).
    reset_requested: Arc<AtomicBool>,
}

impl std::fmt::Debug for I8042 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("I8042")
    }
}

impl I8042 {
    pub fn new(reset: EventFdTrigger, reset_requested: Arc<AtomicBool>) -> Self {
        I8042 { dev: vm_superio::I8042Device::new(reset), reset_requested }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() != 1 {
            data.fill(0);
            return;
        }
        data[0] = self.dev.read(offset as u8);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() != 1 {
            return;
        }
        if offset == 4 && data[0] == CMD_RESET_CPU {
            self.reset_requested.store(true, Ordering::SeqCst);
        }
        // The only error is a failed eventfd write; the vCPU still stops on the flag.
        if let Err(e) = self.dev.write(offset as u8, data[0]) {
            tracing::error!(error = %e, "i8042 reset signal failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    #[test]
    fn reset_command_signals_and_other_writes_do_not() {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let flag = Arc::new(AtomicBool::new(false));
        let mut dev = I8042::new(EventFdTrigger(evt.try_clone().unwrap()), flag.clone());
        dev.write(0, &[0xfe]); // data port: not a command
        dev.write(4, &[0xaa]);
        assert!(evt.read().is_err(), "no reset yet");
        assert!(!flag.load(Ordering::SeqCst));
        dev.write(4, &[0xfe]);
        assert_eq!(evt.read().unwrap(), 1);
        assert!(flag.load(Ordering::SeqCst));
    }
}
