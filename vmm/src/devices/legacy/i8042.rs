//! The i8042 keyboard controller, kept for one job: a guest writing 0xFE (pulse reset line) to
//! port 0x64 asks for a reset, which stops the microVM (the process then exits 0).

use crate::devices::bus::BusDevice;
use crate::devices::EventFdTrigger;

pub const I8042_BASE: u64 = 0x60;
pub const I8042_LEN: u64 = 5;

/// The controller at ports 0x60 (data) and 0x64 (command/status).
pub struct I8042(vm_superio::I8042Device<EventFdTrigger>);

impl std::fmt::Debug for I8042 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("I8042")
    }
}

impl I8042 {
    pub fn new(reset: EventFdTrigger) -> Self {
        I8042(vm_superio::I8042Device::new(reset))
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() != 1 {
            data.fill(0);
            return;
        }
        data[0] = self.0.read(offset as u8);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() != 1 {
            return;
        }
        // The only error is a failed eventfd write; the guest would then simply not reset.
        if let Err(e) = self.0.write(offset as u8, data[0]) {
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
        let mut dev = I8042::new(EventFdTrigger(evt.try_clone().unwrap()));
        dev.write(0, &[0xfe]); // data port: not a command
        dev.write(4, &[0xaa]);
        assert!(evt.read().is_err(), "no reset yet");
        dev.write(4, &[0xfe]);
        assert_eq!(evt.read().unwrap(), 1);
    }
}
