//! The KVM VM: creation with the in-kernel irqchip (PIC, IOAPIC, LAPICs) and PIT, guest memory
//! slots, and irqfds for device interrupt lines.

use crate::vstate::memory::GuestMemoryMmap;
use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_config, kvm_pit_state2, kvm_userspace_memory_region, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use serde::{Deserialize, Serialize};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
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

/// The VM-wide state a snapshot keeps: the in-kernel irqchip (both PICs and the IOAPIC), the
/// PIT, and the KVM clock.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
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
        fd.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
            .map_err(|e| VmError::Ioctl("set the identity map address", e))?;
        fd.create_irq_chip().map_err(|e| VmError::Ioctl("create the in-kernel irqchip", e))?;
        // The PC speaker port is a no-op rather than an exit to user space.
        let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
        fd.create_pit2(pit).map_err(|e| VmError::Ioctl("create the in-kernel PIT", e))?;
        Ok(())
    }

    /// The MSRs KVM says a VMM must save and restore to move a vCPU.
    pub fn msrs_to_save(&self) -> Result<Vec<u32>, VmError> {
        let list = self.kvm.get_msr_index_list().map_err(|e| VmError::Ioctl("read the MSR list", e))?;
        Ok(list.as_slice().to_vec())
    }

    /// The most vCPUs KVM will create for one VM.
    pub fn max_vcpus(kvm: &Kvm) -> usize {
        kvm.get_max_vcpus()
    }

    /// Reads the VM-wide state (the vCPUs must be paused).
    pub fn save_state(&self) -> Result<VmState, VmError> {
        let chip = |id| {
            let mut c = kvm_irqchip { chip_id: id, ..Default::default() };
            self.fd.get_irqchip(&mut c).map(|_| c).map_err(|e| VmError::Ioctl("read the irqchip", e))
        };
        Ok(VmState {
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
            pit: self.fd.get_pit2().map_err(|e| VmError::Ioctl("read the PIT", e))?,
            clock: self.fd.get_clock().map_err(|e| VmError::Ioctl("read the KVM clock", e))?,
        })
    }

    /// Puts back the state `save_state` read, after `setup_irqchip`.
    pub fn restore_state(&self, state: &VmState) -> Result<(), VmError> {
        self.fd.set_pit2(&state.pit).map_err(|e| VmError::Ioctl("restore the PIT", e))?;
        // KVM refuses flags it reports but does not take (e.g. KVM_CLOCK_TSC_STABLE).
        let clock = kvm_clock_data { flags: 0, ..state.clock };
        self.fd.set_clock(&clock).map_err(|e| VmError::Ioctl("restore the KVM clock", e))?;
        for (chip, id) in [
            (&state.pic_master, KVM_IRQCHIP_PIC_MASTER),
            (&state.pic_slave, KVM_IRQCHIP_PIC_SLAVE),
            (&state.ioapic, KVM_IRQCHIP_IOAPIC),
        ] {
            let chip = kvm_irqchip { chip_id: id, ..*chip };
            self.fd.set_irqchip(&chip).map_err(|e| VmError::Ioctl("restore the irqchip", e))?;
        }
        Ok(())
    }

    /// The pages of each memory slot the guest wrote since the last call (or since the slot
    /// was registered with dirty logging), one bit per 4 KiB page; reading clears the log.
    pub fn take_dirty_log(&self, mem: &GuestMemoryMmap) -> Result<Vec<Vec<u64>>, VmError> {
        mem.iter()
            .enumerate()
            .map(|(slot, region)| {
                let len = usize::try_from(region.len()).map_err(|_| VmError::Capability("dirty log of a huge slot"))?;
                self.fd.get_dirty_log(slot as u32, len).map_err(|e| VmError::Ioctl("read the dirty page log", e))
            })
            .collect()
    }

    /// Registers every guest memory region as a KVM memory slot, with dirty page logging when
    /// `track_dirty` (needed for diff snapshots; it costs a fault per first write to a page).
    pub fn register_memory(&self, mem: &GuestMemoryMmap, track_dirty: bool) -> Result<(), VmError> {
        for (slot, region) in mem.iter().enumerate() {
            let host = mem
                .get_host_address(region.start_addr())
                .map_err(|_| VmError::Capability("host address of guest memory"))?;
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
                flags: if track_dirty { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
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
