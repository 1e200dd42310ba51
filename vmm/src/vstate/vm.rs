//! The KVM VM: creation with the in-kernel irqchip (PIC, IOAPIC, LAPICs) and PIT, guest memory
//! slots, and irqfds for device interrupt lines.

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::layout::{KVM_IDENTITY_MAP_ADDRESS, KVM_TSS_ADDRESS};

/// Errors creating or configuring the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm")]
    Kvm(#[source] kvm_ioctls::Error),
    #[error("KVM API version {0} is not supported (12 is)")]
    ApiVersion(i32),
    #[error("KVM lacks a required capability: {0}")]
    Capability(&'static str),
    #[error("cannot {0}")]
    Ioctl(&'static str, #[source] kvm_ioctls::Error),
}

/// A VM and the KVM handle it came from.
#[derive(Debug)]
pub struct Vm {
    pub kvm: Kvm,
    pub fd: VmFd,
}

impl Vm {
    /// Opens KVM and creates an empty VM. Register guest memory next, then `setup_irqchip`:
    /// on the development machines' KVM a memory slot added after the irqchip exists costs
    /// 5 ms (the VM then has readers to wait for), before it 0.25 ms.
    pub fn new() -> Result<Vm, VmError> {
        let kvm = Kvm::new().map_err(VmError::Kvm)?;
        let api = kvm.get_api_version();
        if api != 12 {
            return Err(VmError::ApiVersion(api));
        }
        for (cap, name) in [
            (kvm_ioctls::Cap::Irqchip, "irqchip"),
            (kvm_ioctls::Cap::UserMemory, "user memory"),
            (kvm_ioctls::Cap::SetTssAddr, "TSS address"),
            (kvm_ioctls::Cap::Pit2, "PIT2"),
            (kvm_ioctls::Cap::Irqfd, "irqfd"),
            (kvm_ioctls::Cap::ExtCpuid, "CPUID2"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(VmError::Capability(name));
            }
        }
        let fd = kvm.create_vm().map_err(|e| VmError::Ioctl("create the VM", e))?;
        Ok(Vm { kvm, fd })
    }

    /// Creates the in-kernel irqchip (PIC, IOAPIC, LAPICs) and PIT, after memory is registered.
    pub fn setup_irqchip(&self) -> Result<(), VmError> {
        let fd = &self.fd;
        fd.set_tss_address(KVM_TSS_ADDRESS as usize).map_err(|e| VmError::Ioctl("set the TSS address", e))?;
        fd.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS).map_err(|e| VmError::Ioctl("set the identity map address", e))?;
        fd.create_irq_chip().map_err(|e| VmError::Ioctl("create the in-kernel irqchip", e))?;
        // The PC speaker port is a no-op rather than an exit to user space.
        let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
        fd.create_pit2(pit).map_err(|e| VmError::Ioctl("create the in-kernel PIT", e))?;
        Ok(())
    }

    /// The most vCPUs KVM will create for one VM.
    pub fn max_vcpus(kvm: &Kvm) -> usize {
        kvm.get_max_vcpus()
    }

    /// Registers every guest memory region as a KVM memory slot.
    pub fn register_memory(&self, mem: &GuestMemoryMmap) -> Result<(), VmError> {
        for (slot, region) in mem.iter().enumerate() {
            let host = mem.get_host_address(region.start_addr()).map_err(|_| VmError::Capability("host address of guest memory"))?;
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
                flags: 0,
            };
            // SAFETY: the region's host mapping stays valid for the life of the process (guest
            // memory is never unmapped) and no two slots overlap (regions are disjoint).
            unsafe { self.fd.set_user_memory_region(r) }.map_err(|e| VmError::Ioctl("register guest memory", e))?;
        }
        Ok(())
    }

    /// Wires `evt` to interrupt line `gsi`.
    pub fn register_irq(&self, evt: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.fd.register_irqfd(evt, gsi).map_err(|e| VmError::Ioctl("register an irqfd", e))
    }
}
