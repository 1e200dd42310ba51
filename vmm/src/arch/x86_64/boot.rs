//! The two ways a kernel learns about its machine at entry: the Linux zero page
//! (`boot_params`, 64-bit boot protocol) and the PVH `hvm_start_info`. Also where the
//! command line and initrd go. Pure data building plus guest-memory writes; no KVM.

use crate::vstate::memory::GuestMemoryMmap;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info};
use vm_memory::GuestAddress;

use super::layout::{CMDLINE_MAX_SIZE, PVH_INFO_START, PVH_MEMMAP_START, ZERO_PAGE_START};
use super::{low_memory_end, E820Entry};

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
/// Boot protocol 2.12 is the first with a documented 64-bit entry (`xloadflags`).
const MIN_BZIMAGE_PROTOCOL: u16 = 0x020c;
const XLF_KERNEL_64: u16 = 1 << 0;
const PVH_START_MAGIC: u32 = 0x336e_c578;
const PAGE_SIZE: u64 = 4096;

/// Errors while laying out the boot information.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("command line is {len} bytes; at most {max} are allowed")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("command line contains a NUL byte")]
    CmdlineNul,
    #[error(
        "initrd of {size} bytes does not fit in guest memory ({room} bytes free between the kernel and {ceiling:#x})"
    )]
    InitrdTooLarge { size: u64, room: u64, ceiling: u64 },
    #[error("bzImage uses boot protocol {0:#06x}; 2.12 (0x020c) or later is needed for a 64-bit entry")]
    BzImageTooOld(u16),
    #[error("bzImage has no 64-bit entry point (XLF_KERNEL_64 is not set)")]
    BzImageNo64BitEntry,
    #[error("the guest memory map has {0} entries; at most {max} fit in the zero page", max = MAX_E820_ENTRIES)]
    TooManyE820Entries(usize),
    #[error("cannot write the boot information to guest memory")]
    Configure(#[source] linux_loader::configurator::Error),
}

const MAX_E820_ENTRIES: usize = 128;

/// The longest command line, in bytes without its NUL, that the kernel accepts.
pub const fn cmdline_max_len() -> usize {
    CMDLINE_MAX_SIZE - 1
}

/// Checks a command line against the x86 limit before anything is loaded.
pub fn check_cmdline(cmdline: &str) -> Result<(), BootError> {
    use shoal_vmm_config::limits::CmdlineError;
    shoal_vmm_config::limits::check_cmdline(cmdline).map_err(|e| match e {
        CmdlineError::Nul => BootError::CmdlineNul,
        CmdlineError::TooLong { len, max } => BootError::CmdlineTooLong { len, max },
    })
}

/// Checks that a bzImage's setup header allows the 64-bit entry we use.
pub fn check_bzimage_header(hdr: &setup_header) -> Result<(), BootError> {
    let version = hdr.version;
    if version < MIN_BZIMAGE_PROTOCOL {
        return Err(BootError::BzImageTooOld(version));
    }
    let xloadflags = hdr.xloadflags;
    if xloadflags & XLF_KERNEL_64 == 0 {
        return Err(BootError::BzImageNo64BitEntry);
    }
    Ok(())
}

/// Chooses the initrd's guest address: the highest page-aligned place below both the end of
/// low memory and the kernel's `initrd_addr_max`, above the kernel image (as Firecracker and
/// the bootloaders do, so the kernel's own decompression never runs over it).
pub fn place_initrd(size: u64, kernel_end: u64, mem_size: u64, initrd_addr_max: Option<u32>) -> Result<u64, BootError> {
    let mut ceiling = low_memory_end(mem_size);
    if let Some(max) = initrd_addr_max {
        ceiling = ceiling.min(u64::from(max).saturating_add(1));
    }
    let room = ceiling.saturating_sub(kernel_end);
    let addr = ceiling.checked_sub(size).map(|a| a & !(PAGE_SIZE - 1));
    match addr {
        Some(a) if a >= kernel_end => Ok(a),
        _ => Err(BootError::InitrdTooLarge { size, room, ceiling }),
    }
}

/// What goes into the zero page.
#[derive(Debug)]
pub struct BootInfo<'a> {
    /// The bzImage's own setup header (honoured as the base of ours), or None for an ELF.
    pub setup_header: Option<setup_header>,
    pub cmdline_addr: u64,
    /// Length without the terminating NUL.
    pub cmdline_len: usize,
    pub initrd: Option<(u64, u64)>,
    pub e820: &'a [E820Entry],
}

/// Builds the Linux zero page.
pub fn build_boot_params(info: &BootInfo<'_>) -> Result<boot_params, BootError> {
    if info.e820.len() > MAX_E820_ENTRIES {
        return Err(BootError::TooManyE820Entries(info.e820.len()));
    }
    let mut params = boot_params::default();
    match info.setup_header {
        Some(hdr) => params.hdr = hdr,
        None => {
            params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
            params.hdr.header = KERNEL_HDR_MAGIC;
            params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
        }
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.cmd_line_ptr = info.cmdline_addr as u32;
    params.ext_cmd_line_ptr = (info.cmdline_addr >> 32) as u32;
    if info.setup_header.is_none() {
        // For a bzImage this field is the kernel's to state (its limit), not ours.
        params.hdr.cmdline_size = (info.cmdline_len + 1) as u32;
    }
    if let Some((addr, size)) = info.initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.ext_ramdisk_image = (addr >> 32) as u32;
        params.hdr.ramdisk_size = size as u32;
        params.ext_ramdisk_size = (size >> 32) as u32;
    }
    for (slot, e) in params.e820_table.iter_mut().zip(info.e820) {
        *slot = boot_e820_entry { addr: e.addr, size: e.size, r#type: e.kind };
    }
    params.e820_entries = info.e820.len() as u8;
    Ok(params)
}

/// Writes the zero page to its place in guest memory.
pub fn write_boot_params(mem: &GuestMemoryMmap, params: &boot_params) -> Result<(), BootError> {
    let bp = BootParams::new::<boot_params>(params, GuestAddress(ZERO_PAGE_START));
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(&bp, mem).map_err(BootError::Configure)
}

/// Builds and writes the PVH start info (with its memory map and the initrd as module 0).
pub fn write_pvh_start_info(
    mem: &GuestMemoryMmap,
    cmdline_addr: u64,
    initrd: Option<(u64, u64)>,
    e820: &[E820Entry],
) -> Result<(), BootError> {
    let mut start_info = hvm_start_info {
        magic: PVH_START_MAGIC,
        version: 1,
        cmdline_paddr: cmdline_addr,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: e820.len() as u32,
        ..Default::default()
    };
    let memmap: Vec<hvm_memmap_table_entry> = e820
        .iter()
        .map(|e| hvm_memmap_table_entry { addr: e.addr, size: e.size, type_: e.kind, reserved: 0 })
        .collect();
    // The module list goes right after the memory map.
    let modlist_addr = PVH_MEMMAP_START + (memmap.len() * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
    let modules: Vec<hvm_modlist_entry> =
        initrd.map(|(paddr, size)| hvm_modlist_entry { paddr, size, ..Default::default() }).into_iter().collect();
    if !modules.is_empty() {
        start_info.nr_modules = modules.len() as u32;
        start_info.modlist_paddr = modlist_addr;
    }
    let mut bp = BootParams::new::<hvm_start_info>(&start_info, GuestAddress(PVH_INFO_START));
    bp.set_sections::<hvm_memmap_table_entry>(&memmap, GuestAddress(PVH_MEMMAP_START));
    if !modules.is_empty() {
        bp.set_modules::<hvm_modlist_entry>(&modules, GuestAddress(modlist_addr));
    }
    PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&bp, mem).map_err(BootError::Configure)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::{e820_map, layout::CMDLINE_START};
    use vm_memory::Bytes;

    #[test]
    fn cmdline_limit_is_the_kernels() {
        assert!(check_cmdline("console=ttyS0").is_ok());
        assert!(check_cmdline(&"a".repeat(2047)).is_ok());
        let err = check_cmdline(&"a".repeat(2048)).unwrap_err();
        assert_eq!(err.to_string(), "command line is 2048 bytes; at most 2047 are allowed");
        assert!(matches!(check_cmdline("a\0b"), Err(BootError::CmdlineNul)));
    }

    #[test]
    fn elf_zero_page_has_loader_fields_cmdline_initrd_and_e820() {
        let e820 = e820_map(128 << 20);
        let params = build_boot_params(&BootInfo {
            setup_header: None,
            cmdline_addr: CMDLINE_START,
            cmdline_len: 11,
            initrd: Some((0x700_0000, 0x1234)),
            e820: &e820,
        })
        .unwrap();
        let hdr = params.hdr;
        assert_eq!({ hdr.boot_flag }, 0xaa55);
        assert_eq!({ hdr.header }, 0x5372_6448);
        assert_eq!({ hdr.type_of_loader }, 0xff);
        assert_eq!({ hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ hdr.cmdline_size }, 12);
        assert_eq!({ hdr.ramdisk_image }, 0x700_0000);
        assert_eq!({ hdr.ramdisk_size }, 0x1234);
        assert_eq!(params.e820_entries, 2);
        let second = params.e820_table[1];
        assert_eq!(({ second.addr }, { second.size }, { second.r#type }), (0x10_0000, (128 << 20) - 0x10_0000, 1));
    }

    #[test]
    fn bzimage_header_is_kept_and_only_loader_fields_change() {
        let mut hdr = setup_header {
            version: 0x020f,
            xloadflags: 0x7f,
            loadflags: 0x01,
            code32_start: 0x10_0000,
            cmdline_size: 2047,
            ..Default::default()
        };
        hdr.header = KERNEL_HDR_MAGIC;
        check_bzimage_header(&hdr).unwrap();
        let e820 = e820_map(64 << 20);
        let params = build_boot_params(&BootInfo {
            setup_header: Some(hdr),
            cmdline_addr: CMDLINE_START,
            cmdline_len: 5,
            initrd: None,
            e820: &e820,
        })
        .unwrap();
        assert_eq!({ params.hdr.version }, 0x020f);
        assert_eq!({ params.hdr.loadflags }, 0x01);
        assert_eq!({ params.hdr.code32_start }, 0x10_0000);
        assert_eq!({ params.hdr.cmdline_size }, 2047, "the kernel's limit is not ours to overwrite");
        assert_eq!({ params.hdr.type_of_loader }, 0xff);
        assert_eq!({ params.hdr.ramdisk_image }, 0);
    }

    #[test]
    fn old_or_32_bit_only_bzimages_are_refused() {
        let old = setup_header { version: 0x020a, xloadflags: 1, ..Default::default() };
        assert!(matches!(check_bzimage_header(&old), Err(BootError::BzImageTooOld(0x020a))));
        let no64 = setup_header { version: 0x020f, xloadflags: 0, ..Default::default() };
        assert!(matches!(check_bzimage_header(&no64), Err(BootError::BzImageNo64BitEntry)));
    }

    #[test]
    fn initrd_goes_high_page_aligned_and_never_over_the_kernel() {
        let mem = 128u64 << 20;
        let addr = place_initrd(10_000, 0x200_0000, mem, None).unwrap();
        assert_eq!(addr % 4096, 0);
        assert!(addr + 10_000 <= mem && addr >= mem - 16384);
        let capped = place_initrd(4096, 0x200_0000, mem, Some(0x3fff_ffff >> 2)).unwrap();
        assert!(capped + 4096 <= 0x1000_0000);
        let err = place_initrd(mem, 0x200_0000, mem, None).unwrap_err();
        assert!(err.to_string().starts_with("initrd of 134217728 bytes does not fit"), "{err}");
        assert!(place_initrd(mem - 0x200_0000 + 1, 0x200_0000, mem, None).is_err());
    }

    #[test]
    fn zero_page_and_pvh_info_land_in_guest_memory() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let e820 = e820_map(2 << 20);
        let params = build_boot_params(&BootInfo {
            setup_header: None,
            cmdline_addr: CMDLINE_START,
            cmdline_len: 3,
            initrd: None,
            e820: &e820,
        })
        .unwrap();
        write_boot_params(&mem, &params).unwrap();
        let magic: u32 = mem.read_obj(GuestAddress(ZERO_PAGE_START + 0x202)).unwrap();
        assert_eq!(magic, KERNEL_HDR_MAGIC);
        let cmd_ptr: u32 = mem.read_obj(GuestAddress(ZERO_PAGE_START + 0x228)).unwrap();
        assert_eq!(u64::from(cmd_ptr), CMDLINE_START);

        write_pvh_start_info(&mem, CMDLINE_START, Some((0x10_0000, 77)), &e820).unwrap();
        let info: hvm_start_info = mem.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(info.magic, PVH_START_MAGIC);
        assert_eq!(info.memmap_entries, 2);
        assert_eq!(info.nr_modules, 1);
        let module: hvm_modlist_entry = mem.read_obj(GuestAddress(info.modlist_paddr)).unwrap();
        assert_eq!((module.paddr, module.size), (0x10_0000, 77));
    }
}
