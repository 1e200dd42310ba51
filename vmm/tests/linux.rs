//! The project's Linux guest kernel under shoal-vmm on this machine's KVM. Linux cannot reach
//! user space on the development machines' nested KVM (../shared/ENVIRONMENT.md), so these
//! check what can be checked here: early boot on the serial console, and that a real bzImage's
//! setup header is honoured in the zero page. Full boots run in hardware-tests/.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use linux_loader::loader::bootparam::boot_params;
use shoal_vmm::api::VmConfig;
use shoal_vmm::arch::x86_64::layout::{CMDLINE_START, ZERO_PAGE_START};
use shoal_vmm::arch::x86_64::regs::EntryMode;
use shoal_vmm::builder::{load_initrd, load_kernel, write_boot_info};
use shoal_vmm::vstate::memory::create_guest_memory;
use vm_memory::{Bytes, GuestAddress};

use common::{guest_file, kvm_available, spawn_vmm};

#[test]
fn vmlinux_early_boot_prints_version_and_the_exact_command_line() {
    if !kvm_available() {
        return;
    }
    let vmlinux = guest_file("vmlinux");
    let nonce = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
    let cmdline = format!("earlyprintk=ttyS0 console=ttyS0 shoal.marker={nonce}");
    let vm = spawn_vmm(&["--kernel", vmlinux.to_str().unwrap(), "--cmdline", &cmdline]);
    let want = format!("Command line: {cmdline}");
    let (ok, seen) = vm.wait_for(Duration::from_secs(30), |lines| {
        lines.iter().any(|l| l.contains("Linux version 6.1")) && lines.iter().any(|l| l.ends_with(&want))
    });
    assert!(ok, "within 30 s, wanted `Linux version` and `{want}`; the console showed:\n{}", seen.join("\n"));
}

/// The setup header fields as the bzImage file holds them.
struct FileHeader {
    setup_sects: u8,
    version: u16,
    loadflags: u8,
    code32_start: u32,
    initrd_addr_max: u32,
    cmdline_size: u32,
    xloadflags: u16,
}

fn file_header(bz: &[u8]) -> FileHeader {
    let u16_at = |o: usize| u16::from_le_bytes([bz[o], bz[o + 1]]);
    let u32_at = |o: usize| u32::from_le_bytes(bz[o..o + 4].try_into().unwrap());
    assert_eq!(&bz[0x202..0x206], b"HdrS", "not a bzImage");
    FileHeader {
        setup_sects: bz[0x1f1],
        version: u16_at(0x206),
        loadflags: bz[0x211],
        code32_start: u32_at(0x214),
        initrd_addr_max: u32_at(0x22c),
        cmdline_size: u32_at(0x238),
        xloadflags: u16_at(0x236),
    }
}

#[test]
fn bzimage_setup_header_is_honoured_in_boot_params() {
    let bzimage = guest_file("bzImage");
    let initrd = guest_file("initramfs.cpio.gz");
    let bz = std::fs::read(&bzimage).unwrap();
    let initrd_bytes = std::fs::read(&initrd).unwrap();
    let hdr = file_header(&bz);
    assert!(hdr.version >= 0x020c, "guest kernel speaks boot protocol {:#x}", hdr.version);

    let config = VmConfig {
        initrd: Some(initrd.clone()),
        cmdline: "console=ttyS0 bz-test".into(),
        mem_mib: 256,
        ..VmConfig::new(&bzimage)
    };
    let mem = create_guest_memory(config.mem_bytes()).unwrap();
    let kernel = load_kernel(&mem, &bzimage).unwrap();
    let (initrd_addr, initrd_size) = load_initrd(&mem, &initrd, &kernel, config.mem_bytes()).unwrap();
    write_boot_info(&mem, &config, &kernel, Some((initrd_addr, initrd_size))).unwrap();
    let params: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
    let p = params.hdr;

    // Protocol version, flags and the kernel's own limits come from the image, unchanged.
    assert_eq!({ p.version }, hdr.version);
    assert_eq!({ p.loadflags }, hdr.loadflags);
    assert_eq!({ p.xloadflags }, hdr.xloadflags);
    assert_eq!({ p.setup_sects }, hdr.setup_sects);
    assert_eq!({ p.cmdline_size }, hdr.cmdline_size);
    assert_eq!({ p.initrd_addr_max }, hdr.initrd_addr_max);
    // Load address: the protected-mode kernel sits at code32_start, byte for byte.
    assert_eq!({ p.code32_start }, hdr.code32_start);
    let setup_len = (usize::from(hdr.setup_sects) + 1) * 512;
    let mut loaded = vec![0u8; 4096];
    mem.read_slice(&mut loaded, GuestAddress(u64::from(hdr.code32_start))).unwrap();
    assert_eq!(loaded, bz[setup_len..setup_len + 4096]);
    assert_eq!(kernel.entry.mode, EntryMode::Linux64);
    assert_eq!(kernel.entry.address, u64::from(hdr.code32_start) + 0x200, "64-bit entry is startup_64");
    // What the loader fills in.
    assert_eq!({ p.type_of_loader }, 0xff);
    assert_eq!(u64::from(p.cmd_line_ptr), CMDLINE_START);
    let mut cmd = vec![0u8; config.cmdline.len() + 1];
    mem.read_slice(&mut cmd, GuestAddress(CMDLINE_START)).unwrap();
    assert_eq!(&cmd[..config.cmdline.len()], config.cmdline.as_bytes());
    assert_eq!(cmd[config.cmdline.len()], 0);
    assert_eq!(u64::from(p.ramdisk_image), initrd_addr);
    assert_eq!(u64::from(p.ramdisk_size), initrd_bytes.len() as u64);
    assert!(initrd_addr + initrd_size <= u64::from(hdr.initrd_addr_max) + 1, "initrd below initrd_addr_max");
    assert!(initrd_addr >= kernel.end, "initrd above the kernel");
    let mut head = vec![0u8; 512];
    mem.read_slice(&mut head, GuestAddress(initrd_addr)).unwrap();
    assert_eq!(head, initrd_bytes[..512]);
    assert!(params.e820_entries >= 2);
}

#[test]
fn vmlinux_with_a_pvh_note_is_entered_through_it() {
    let vmlinux = guest_file("vmlinux");
    let mem = create_guest_memory(128 << 20).unwrap();
    let kernel = load_kernel(&mem, &vmlinux).unwrap();
    // Our guest config has CONFIG_PVH=y, so the ELF carries XEN_ELFNOTE_PHYS32_ENTRY.
    assert_eq!(kernel.entry.mode, EntryMode::Pvh);
    assert!(kernel.entry.address >= 0x100_0000 && kernel.entry.address < 0x1_0000_0000, "{:#x}", kernel.entry.address);
}
