//! Initial CPU state of the boot vCPU: general registers, segment registers with the GDT they
//! come from, identity-mapped page tables and the FPU. Linux's 64-bit entry and PVH's 32-bit
//! entry need different states; both are built here from plain data.

use crate::vstate::memory::GuestMemoryMmap;
use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress};

use super::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PDE_START, PDPTE_START, PML4_START, PVH_INFO_START,
    ZERO_PAGE_START,
};

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// Errors while writing boot structures.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    #[error("cannot write the {0} to guest memory")]
    Write(&'static str, #[source] vm_memory::GuestMemoryError),
}

/// Which entry the kernel is started at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryMode {
    /// Linux 64-bit boot protocol: long mode, paging on, RSI = zero page.
    Linux64,
    /// PVH: 32-bit protected mode, paging off, EBX = hvm_start_info.
    Pvh,
}

/// Builds a GDT entry from its flags, base and limit (the classic packing).
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// Decodes a GDT entry into the segment KVM loads for selector `index * 8`.
pub fn segment_from_gdt(entry: u64, index: u8) -> kvm_segment {
    let base = ((entry & 0xff00_0000_0000_0000) >> 32) | ((entry & 0x0000_00ff_ffff_0000) >> 16);
    let raw_limit = (((entry & 0x000f_0000_0000_0000) >> 32) | (entry & 0xffff)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base,
        limit: if g == 0 { raw_limit } else { (raw_limit << 12) | 0xfff },
        selector: u16::from(index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// The boot GDT for an entry mode: null, code, data, TSS.
pub fn boot_gdt(mode: EntryMode) -> [u64; 4] {
    let code_flags = match mode {
        EntryMode::Linux64 => 0xa09b, // 64-bit code, present, granular
        EntryMode::Pvh => 0xc09b,     // 32-bit code
    };
    [
        gdt_entry(0, 0, 0),
        gdt_entry(code_flags, 0, 0xfffff),
        gdt_entry(0xc093, 0, 0xfffff),
        gdt_entry(0x808b, 0, 0xfffff),
    ]
}

/// Writes identity page tables mapping the first GiB with 2 MiB pages.
pub fn write_page_tables(mem: &GuestMemoryMmap) -> Result<(), RegsError> {
    let err = |e| RegsError::Write("page tables", e);
    mem.write_obj(PDPTE_START | 0x03, GuestAddress(PML4_START)).map_err(err)?;
    mem.write_obj(PDE_START | 0x03, GuestAddress(PDPTE_START)).map_err(err)?;
    let mut pd = [0u8; 512 * 8];
    for (i, slot) in pd.chunks_exact_mut(8).enumerate() {
        // Present, writable, 2 MiB page.
        slot.copy_from_slice(&(((i as u64) << 21) | 0x83).to_le_bytes());
    }
    mem.write_slice(&pd, GuestAddress(PDE_START)).map_err(err)
}

/// Writes the GDT and an empty IDT, and fills `sregs` for the entry mode.
pub fn setup_sregs(mem: &GuestMemoryMmap, mode: EntryMode, sregs: &mut kvm_sregs) -> Result<(), RegsError> {
    let gdt = boot_gdt(mode);
    let mut bytes = [0u8; 32];
    for (slot, e) in bytes.chunks_exact_mut(8).zip(gdt) {
        slot.copy_from_slice(&e.to_le_bytes());
    }
    mem.write_slice(&bytes, GuestAddress(BOOT_GDT_START)).map_err(|e| RegsError::Write("GDT", e))?;
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START)).map_err(|e| RegsError::Write("IDT", e))?;

    let code = segment_from_gdt(gdt[1], 1);
    let data = segment_from_gdt(gdt[2], 2);
    let tss = segment_from_gdt(gdt[3], 3);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (bytes.len() - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    match mode {
        EntryMode::Linux64 => {
            write_page_tables(mem)?;
            sregs.cr0 |= X86_CR0_PE | X86_CR0_PG;
            sregs.cr3 = PML4_START;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
        EntryMode::Pvh => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
    }
    Ok(())
}

/// General registers at kernel entry.
pub fn boot_regs(mode: EntryMode, entry: u64) -> kvm_regs {
    match mode {
        EntryMode::Linux64 => kvm_regs {
            rflags: 0x2,
            rip: entry,
            rsp: BOOT_STACK_POINTER,
            rbp: BOOT_STACK_POINTER,
            rsi: ZERO_PAGE_START,
            ..Default::default()
        },
        EntryMode::Pvh => kvm_regs { rflags: 0x2, rip: entry, rbx: PVH_INFO_START, ..Default::default() },
    }
}

/// FPU state at entry: x87 control word and MXCSR at their reset values.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    #[test]
    fn page_tables_identity_map_the_first_gib() {
        let m = mem();
        write_page_tables(&m).unwrap();
        let pml4: u64 = m.read_obj(GuestAddress(PML4_START)).unwrap();
        let pdpt: u64 = m.read_obj(GuestAddress(PDPTE_START)).unwrap();
        assert_eq!(pml4, PDPTE_START | 3);
        assert_eq!(pdpt, PDE_START | 3);
        for i in [0u64, 1, 255, 511] {
            let pde: u64 = m.read_obj(GuestAddress(PDE_START + i * 8)).unwrap();
            assert_eq!(pde, (i << 21) | 0x83, "PD entry {i}");
        }
    }

    #[test]
    fn gdt_entries_decode_to_the_segments_long_mode_needs() {
        let gdt = boot_gdt(EntryMode::Linux64);
        assert_eq!(gdt[1], 0x00af_9b00_0000_ffff);
        assert_eq!(gdt[2], 0x00cf_9300_0000_ffff);
        let code = segment_from_gdt(gdt[1], 1);
        assert_eq!((code.selector, code.l, code.db, code.present, code.s, code.type_), (8, 1, 0, 1, 1, 0xb));
        assert_eq!(code.limit, 0xffff_ffff);
        let tss = segment_from_gdt(gdt[3], 3);
        assert_eq!((tss.selector, tss.s, tss.type_), (0x18, 0, 0xb));
        let null = segment_from_gdt(gdt[0], 0);
        assert_eq!(null.unusable, 1);
    }

    #[test]
    fn long_mode_sregs_enable_paging_and_pvh_sregs_do_not() {
        let m = mem();
        let mut s = kvm_sregs::default();
        setup_sregs(&m, EntryMode::Linux64, &mut s).unwrap();
        assert_eq!(s.cr0 & (X86_CR0_PE | X86_CR0_PG), X86_CR0_PE | X86_CR0_PG);
        assert_eq!(
            (s.cr3, s.cr4 & X86_CR4_PAE, s.efer & (EFER_LME | EFER_LMA)),
            (PML4_START, X86_CR4_PAE, EFER_LME | EFER_LMA)
        );
        assert_eq!((s.cs.selector, s.ds.selector, s.tr.selector), (0x08, 0x10, 0x18));
        let gdt0: u64 = m.read_obj(GuestAddress(BOOT_GDT_START + 8)).unwrap();
        assert_eq!(gdt0, boot_gdt(EntryMode::Linux64)[1]);

        let mut p = kvm_sregs::default();
        setup_sregs(&m, EntryMode::Pvh, &mut p).unwrap();
        assert_eq!(p.cr0 & X86_CR0_PG, 0);
        assert_eq!((p.cs.l, p.cs.db), (0, 1));
        assert_eq!(boot_regs(EntryMode::Pvh, 0x100_0000).rbx, PVH_INFO_START);
        assert_eq!(boot_regs(EntryMode::Linux64, 0x100_0000).rsi, ZERO_PAGE_START);
    }
}
