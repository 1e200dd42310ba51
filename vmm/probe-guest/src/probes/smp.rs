//! SMP probe: the boot CPU reads the vCPU list from the MP table, starts every AP with
//! INIT-SIPI-SIPI (x2APIC ICR), and each AP, once in long mode, prints its APIC id.
#![no_std]
#![no_main]

mod common;

use core::sync::atomic::{AtomicU32, Ordering};

/// Real-mode trampoline page: SIPI vector 3.
const TRAMPOLINE: u64 = 0x3000;
const SIPI_VECTOR: u64 = TRAMPOLINE >> 12;
const AP_STACK_SIZE: usize = 16 * 1024;
const MAX_CPUS: usize = 64;

#[no_mangle]
static mut AP_STACKS: [u8; AP_STACK_SIZE * MAX_CPUS] = [0; AP_STACK_SIZE * MAX_CPUS];
static ONLINE: AtomicU32 = AtomicU32::new(0);

core::arch::global_asm!(
    ".section .text.trampoline, \"ax\"",
    ".balign 16",
    ".set TB, 0x3000",
    ".global ap_tramp_start",
    "ap_tramp_start:",
    ".code16",
    "cli",
    "xorw %ax, %ax",
    "movw %ax, %ds",
    "lgdtl (TB + tramp_gdtr - ap_tramp_start)",
    "movl %cr4, %eax",
    "orl $0x620, %eax", // PAE | OSFXSR | OSXMMEXCPT
    "movl %eax, %cr4",
    "movl (TB + tramp_cr3 - ap_tramp_start), %eax",
    "movl %eax, %cr3",
    "movl $0xc0000080, %ecx",
    "rdmsr",
    "orl $0x100, %eax", // EFER.LME
    "wrmsr",
    "movl %cr0, %eax",
    "andl $0xfffffffb, %eax", // EM off
    "orl $0x80000003, %eax",  // PG | MP | PE
    "movl %eax, %cr0",
    "ljmpl $0x08, $(TB + tramp_long - ap_tramp_start)",
    ".code64",
    "tramp_long:",
    "movw $0x10, %ax",
    "movw %ax, %ds",
    "movw %ax, %es",
    "movw %ax, %ss",
    "movl $1, %edi",
    "lock xaddl %edi, (TB + tramp_count - ap_tramp_start)",
    "movq (TB + tramp_stacks - ap_tramp_start), %rsp",
    "movl %edi, %eax",
    "incq %rax",
    "shlq $14, %rax", // AP_STACK_SIZE
    "addq %rax, %rsp",
    "movq (TB + tramp_entry - ap_tramp_start), %rax",
    "callq *%rax",
    "1: cli",
    "hlt",
    "jmp 1b",
    ".balign 8",
    ".global tramp_cr3",
    "tramp_cr3: .quad 0",
    "tramp_entry: .quad 0",
    "tramp_stacks: .quad 0",
    "tramp_count: .long 0",
    ".balign 8",
    "tramp_gdt:",
    ".quad 0",
    ".quad 0x00af9a000000ffff",
    ".quad 0x00cf92000000ffff",
    "tramp_gdtr:",
    ".word 23",
    ".long TB + tramp_gdt - ap_tramp_start",
    ".global ap_tramp_end",
    "ap_tramp_end:",
    options(att_syntax),
);

extern "C" {
    static ap_tramp_start: u8;
    static ap_tramp_end: u8;
    static tramp_cr3: u8;
}

#[no_mangle]
pub extern "C" fn ap_main(index: u32) -> ! {
    let (_, ebx, _, _) = common::cpuid(1, 0);
    say!("ap: apic_id=", ebx >> 24, " index=", index);
    ONLINE.fetch_add(1, Ordering::SeqCst);
    loop {
        // SAFETY: an AP with nothing left to do halts with interrupts off.
        unsafe { core::arch::asm!("cli; hlt", options(nomem, nostack)) };
    }
}

/// The APIC ids of the processors in the VMM's MP table, and which one is the BSP.
fn mp_table_cpus(out: &mut [(u8, bool); MAX_CPUS]) -> usize {
    let mut mpf = None;
    'scan: for (start, end) in [(0x9fc00u64, 0xa0000u64), (0xf0000, 0x100000)] {
        let mut a = start;
        while a + 16 <= end {
            if common::read_phys::<[u8; 4]>(a) == *b"_MP_" {
                mpf = Some(a);
                break 'scan;
            }
            a += 16;
        }
    }
    let Some(mpf) = mpf else { return 0 };
    let config = u64::from(common::read_phys::<u32>(mpf + 4));
    if common::read_phys::<[u8; 4]>(config) != *b"PCMP" {
        return 0;
    }
    let count = common::read_phys::<u16>(config + 34);
    let mut p = config + 44;
    let mut n = 0;
    for _ in 0..count {
        let kind = common::read_phys::<u8>(p);
        if kind == 0 {
            if n < MAX_CPUS {
                out[n] = (common::read_phys::<u8>(p + 1), common::read_phys::<u8>(p + 3) & 2 != 0);
                n += 1;
            }
            p += 20;
        } else {
            p += 8;
        }
    }
    n
}

#[no_mangle]
pub extern "C" fn probe_main(_boot_params: u64) -> ! {
    say!("SHOAL-PROBE smp: start");
    let mut cpus = [(0u8, false); MAX_CPUS];
    let n = mp_table_cpus(&mut cpus);
    say!("smp: mp table lists ", n, " cpus");
    if !common::enable_x2apic() {
        say!("smp: no x2apic");
        common::reset();
    }
    let my_id = common::rdmsr(0x802) as u32;
    say!("cpu: apic_id=", my_id, " bsp");

    // SAFETY: the trampoline's bytes are copied to a free low page (nothing of the boot
    // protocol lives at 0x3000) and its data slots are filled in before any AP is started.
    unsafe {
        let start = &ap_tramp_start as *const u8;
        let len = (&ap_tramp_end as *const u8).offset_from(start) as usize;
        core::ptr::copy_nonoverlapping(start, TRAMPOLINE as *mut u8, len);
        let slot = |sym: *const u8| (TRAMPOLINE + (sym as u64 - start as u64)) as *mut u64;
        let cr3: u64;
        core::arch::asm!("mov {}, cr3", out(reg) cr3, options(nomem, nostack));
        let cr3_slot = slot(&tramp_cr3 as *const u8);
        cr3_slot.write_volatile(cr3);
        cr3_slot.add(1).write_volatile(ap_main as *const () as u64);
        cr3_slot.add(2).write_volatile(core::ptr::addr_of!(AP_STACKS) as u64);
    }

    let mut started = 0u32;
    for &(id, bsp) in &cpus[..n] {
        if bsp || u32::from(id) == my_id {
            continue;
        }
        let dest = u64::from(id) << 32;
        common::wrmsr(0x830, dest | 0x4500); // INIT, assert
        common::wrmsr(0x830, dest | 0x4600 | SIPI_VECTOR); // STARTUP
        common::wrmsr(0x830, dest | 0x4600 | SIPI_VECTOR);
        started += 1;
    }
    // Bounded wait (guest code is slow under nested KVM; this is seconds, not forever).
    let mut spins = 0u64;
    while ONLINE.load(Ordering::SeqCst) < started && spins < 50_000_000 {
        core::hint::spin_loop();
        spins += 1;
    }
    say!("smp: ", ONLINE.load(Ordering::SeqCst) + 1, " of ", n, " cpus online");
    common::reset()
}
