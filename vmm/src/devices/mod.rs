//! Emulated devices. Legacy PIO devices live in `legacy/`; the bus maps guest port ranges to
//! them. Devices never touch KVM: interrupts go out through `EventFdTrigger`s that the VM
//! builder has registered as irqfds.

pub mod bus;
pub mod legacy;
pub mod rate_limiter;
pub mod virtio;

use vmm_sys_util::eventfd::EventFd;

/// An interrupt line or a notification, raised by writing to an eventfd.
#[derive(Debug)]
pub struct EventFdTrigger(pub EventFd);

impl vm_superio::Trigger for EventFdTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

impl EventFdTrigger {
    pub fn try_clone(&self) -> std::io::Result<Self> {
        Ok(EventFdTrigger(self.0.try_clone()?))
    }
}
