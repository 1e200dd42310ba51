//! Where things live in guest physical memory at boot. One table, so that the boot
//! protocol, the page tables and the MP table cannot disagree about a byte.

/// GDT written by the VMM for the 64-bit entry.
pub const BOOT_GDT_START: u64 = 0x500;
/// An empty IDT: the kernel installs its own before it enables interrupts.
pub const BOOT_IDT_START: u64 = 0x520;
/// Linux zero page (`struct boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer of the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity page tables: PML4, PDPT and one PD of 2 MiB pages mapping the first GiB.
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// PVH `hvm_start_info` and its memory map.
pub const PVH_INFO_START: u64 = 0x6000;
pub const PVH_MEMMAP_START: u64 = 0x6040;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Longest command line accepted, NUL included (x86 COMMAND_LINE_SIZE).
pub use shoal_vmm_config::limits::CMDLINE_MAX_SIZE;
/// Start of the extended BIOS data area, where the MP table goes.
pub const EBDA_START: u64 = 0x9fc00;
/// First byte of memory above the legacy hole: kernels load here or higher.
pub const HIMEM_START: u64 = 0x10_0000;
/// The 32-bit MMIO gap below 4 GiB (LAPIC, IOAPIC, later virtio-mmio devices).
pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// IOAPIC and LAPIC default bases.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const APIC_DEFAULT_PHYS_BASE: u32 = 0xfee0_0000;
/// Addresses KVM needs for its own use on Intel (TSS and identity map), inside the gap.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;
/// virtio-mmio devices: one 4 KiB window each from VIRTIO_MMIO_BASE, in the MMIO gap, on
/// IOAPIC lines from VIRTIO_FIRST_IRQ, at most VIRTIO_MAX_DEVICES of them (the configuration
/// names them on the guest's command line, so they are the configuration crate's constants).
pub use shoal_vmm_config::limits::{VIRTIO_FIRST_IRQ, VIRTIO_MAX_DEVICES, VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE};
