//! Counter probe: counts PIT ticks (100 Hz through the PIC) forever and prints `count=N` every
//! 10 ticks. Tests pause and resume the VM and check the count stops and continues (and, with
//! snapshots, that it carries on after a restore).
#![no_std]
#![no_main]

mod common;

use core::sync::atomic::{AtomicU64, Ordering};

const PIT_VECTOR: usize = 0x20;
const LAPIC_VECTOR: usize = 0x30;

#[no_mangle]
static PIT_TICKS: AtomicU64 = AtomicU64::new(0);
#[no_mangle]
static LAPIC_TICKS: AtomicU64 = AtomicU64::new(0);
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
    say!("counter: unexpected exception or interrupt");
    loop {
        // SAFETY: halting only stops this CPU.
        unsafe { core::arch::asm!("cli; hlt", options(nomem, nostack)) };
    }
}

fn gate(handler: u64, cs: u16) -> [u64; 2] {
    let lo = (handler & 0xffff) | (u64::from(cs) << 16) | (0x8e00u64 << 32) | (((handler >> 16) & 0xffff) << 48);
    [lo, handler >> 32]
}

fn setup_idt() {
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

#[no_mangle]
pub extern "C" fn probe_main(_boot_params: u64) -> ! {
    say!("SHOAL-PROBE counter: start");
    setup_idt();
    for (port, v) in [(0x20, 0x11), (0xa0, 0x11), (0x21, 0x20), (0xa1, 0x28), (0x21, 0x04), (0xa1, 0x02), (0x21, 0x01), (0xa1, 0x01), (0x21, 0xfe), (0xa1, 0xff)] {
        common::outb(port, v);
    }
    common::outb(0x43, 0x34);
    common::outb(0x40, 0x9c);
    common::outb(0x40, 0x2e);
    let mut count = 0u64;
    loop {
        let target = PIT_TICKS.load(Ordering::SeqCst) + 10;
        while PIT_TICKS.load(Ordering::SeqCst) < target {
            // SAFETY: sti; hlt sleeps until the next interrupt, which the IDT handles.
            unsafe { core::arch::asm!("sti; hlt; cli", options(nomem, nostack)) };
        }
        count += 1;
        say!("count=", count);
    }
}
