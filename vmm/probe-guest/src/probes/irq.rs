//! Interrupts for the probes that need them: an IDT with handlers that count PIT ticks (vector
//! 0x20, through the 8259 PIC) and LAPIC timer ticks (vector 0x30, x2APIC EOI), and the PIC
//! and PIT programming. Any other exception prints a line and halts.
#![allow(dead_code)]

use core::sync::atomic::{AtomicU64, Ordering};

pub const PIT_VECTOR: usize = 0x20;
pub const LAPIC_VECTOR: usize = 0x30;

#[no_mangle]
pub static PIT_TICKS: AtomicU64 = AtomicU64::new(0);
#[no_mangle]
pub static LAPIC_TICKS: AtomicU64 = AtomicU64::new(0);
static mut IDT: [[u64; 2]; 256] = [[0; 2]; 256];

core::arch::global_asm!(
    ".global isr_pit",
    "isr_pit:",
    "push rax",
    "lock inc qword ptr [rip + PIT_TICKS]",
    "mov al, 0x20",
    "out 0x20, al",
    "pop rax",
    "iretq",
    ".global isr_pic_other",
    "isr_pic_other:",
    "push rax",
    "mov al, 0x20",
    "out 0xa0, al",
    "out 0x20, al",
    "pop rax",
    "iretq",
    ".global isr_lapic",
    "isr_lapic:",
    "push rax",
    "push rcx",
    "push rdx",
    "lock inc qword ptr [rip + LAPIC_TICKS]",
    "mov ecx, 0x80b",
    "xor eax, eax",
    "xor edx, edx",
    "wrmsr",
    "pop rdx",
    "pop rcx",
    "pop rax",
    "iretq",
    ".global isr_spurious",
    "isr_spurious:",
    "iretq",
    ".global isr_unexpected",
    "isr_unexpected:",
    "and rsp, -16",
    "call unexpected_interrupt",
);

extern "C" {
    fn isr_pit();
    fn isr_pic_other();
    fn isr_lapic();
    fn isr_spurious();
    fn isr_unexpected();
}

#[no_mangle]
pub extern "C" fn unexpected_interrupt() -> ! {
    crate::say!("probe: unexpected exception or interrupt");
    loop {
        // SAFETY: halting only stops this CPU.
        unsafe { core::arch::asm!("cli; hlt", options(nomem, nostack)) };
    }
}

fn gate(handler: u64, cs: u16) -> [u64; 2] {
    let lo = (handler & 0xffff) | (u64::from(cs) << 16) | (0x8e00u64 << 32) | (((handler >> 16) & 0xffff) << 48);
    [lo, handler >> 32]
}

pub fn setup_idt() {
    let cs: u16;
    // SAFETY: reading CS has no side effects.
    unsafe { core::arch::asm!("mov {0:x}, cs", out(reg) cs, options(nomem, nostack)) };
    // SAFETY: the IDT is written once here, on the only CPU running, before interrupts are on.
    unsafe {
        let idt = &mut *core::ptr::addr_of_mut!(IDT);
        for (v, slot) in idt.iter_mut().enumerate() {
            let handler = match v {
                PIT_VECTOR => isr_pit as *const () as usize,
                0x21..=0x2f => isr_pic_other as *const () as usize,
                LAPIC_VECTOR => isr_lapic as *const () as usize,
                0xff => isr_spurious as *const () as usize,
                _ => isr_unexpected as *const () as usize,
            };
            *slot = gate(handler as u64, cs);
        }
        let base = idt.as_ptr() as u64;
        let desc: [u16; 5] = [(256 * 16 - 1) as u16, base as u16, (base >> 16) as u16, (base >> 32) as u16, (base >> 48) as u16];
        core::arch::asm!("lidt [{}]", in(reg) desc.as_ptr(), options(readonly, nostack));
    }
}

/// 8259 PIC remapped to vectors 0x20/0x28 with only IRQ 0 unmasked; PIT channel 0 at 100 Hz.
pub fn start_pit_100hz() {
    for (port, v) in [(0x20, 0x11), (0xa0, 0x11), (0x21, 0x20), (0xa1, 0x28), (0x21, 0x04), (0xa1, 0x02), (0x21, 0x01), (0xa1, 0x01), (0x21, 0xfe), (0xa1, 0xff)] {
        crate::common::outb(port, v);
    }
    // Rate generator, divisor 11932.
    crate::common::outb(0x43, 0x34);
    crate::common::outb(0x40, 0x9c);
    crate::common::outb(0x40, 0x2e);
}

/// Sleeps (sti; hlt) until `counter` reaches `target`.
pub fn wait_until(counter: &AtomicU64, target: u64) {
    while counter.load(Ordering::SeqCst) < target {
        // SAFETY: sti; hlt sleeps until the next interrupt, which the IDT handles.
        unsafe { core::arch::asm!("sti; hlt; cli", options(nomem, nostack)) };
    }
}
