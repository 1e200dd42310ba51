//! What every probe shares: the entry point (stack, SSE), port I/O, COM1 output, the i8042
//! reset, and reading boot_params. The VMM enters `_start` in 64-bit mode with the Linux boot
//! protocol state: identity-mapped first GiB, RSI = boot_params, interrupts off.
#![allow(dead_code)]

use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicBool, Ordering};

pub const STACK_SIZE: usize = 64 * 1024;

#[no_mangle]
static mut BSP_STACK: [u8; STACK_SIZE] = [0; STACK_SIZE];

global_asm!(
    ".section .text._start, \"ax\"",
    ".global _start",
    "_start:",
    "cli",
    "lea rsp, [rip + BSP_STACK + {stack}]",
    // The VMM sets only what Linux needs; Rust code may use SSE, so enable it here.
    "mov rax, cr0",
    "and rax, ~(1 << 2)", // EM off
    "or rax, (1 << 1)",   // MP on
    "mov cr0, rax",
    "mov rax, cr4",
    "or rax, (3 << 9)", // OSFXSR | OSXMMEXCPT
    "mov cr4, rax",
    "mov rdi, rsi",
    "call probe_main",
    "2: hlt",
    "jmp 2b",
    stack = const STACK_SIZE,
);

#[inline(always)]
pub fn outb(port: u16, v: u8) {
    // SAFETY: port I/O has no memory effects in this guest; the VMM handles the exit.
    unsafe { asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack, preserves_flags)) };
}

#[inline(always)]
pub fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: as for `outb`.
    unsafe { asm!("in al, dx", out("al") v, in("dx") port, options(nomem, nostack, preserves_flags)) };
    v
}

const COM1: u16 = 0x3f8;
static CONSOLE_LOCK: AtomicBool = AtomicBool::new(false);

/// Holds the console for one whole line, so lines from several CPUs do not interleave.
pub struct ConsoleGuard;

impl ConsoleGuard {
    pub fn lock() -> ConsoleGuard {
        while CONSOLE_LOCK.compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed).is_err() {
            core::hint::spin_loop();
        }
        ConsoleGuard
    }
}

impl Drop for ConsoleGuard {
    fn drop(&mut self) {
        CONSOLE_LOCK.store(false, Ordering::Release);
    }
}

/// Something the console can print without `core::fmt`: the precompiled `core` formats
/// numbers with SSE, which the nested KVM of the development machines cannot run in guest
/// supervisor mode (the probes themselves are built without SSE for the same reason).
pub trait Say {
    fn say(&self);
}

impl Say for &str {
    fn say(&self) {
        for b in self.bytes() {
            // The VMM's UART is always ready to transmit, so no LSR polling: one exit a byte.
            outb(COM1, b);
        }
    }
}

impl Say for &[u8] {
    fn say(&self) {
        for b in self.iter() {
            outb(COM1, *b);
        }
    }
}

impl Say for u64 {
    fn say(&self) {
        let mut digits = [0u8; 20];
        let mut n = *self;
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        for b in &digits[i..] {
            outb(COM1, *b);
        }
    }
}

impl Say for u32 {
    fn say(&self) {
        u64::from(*self).say()
    }
}

impl Say for u8 {
    fn say(&self) {
        u64::from(*self).say()
    }
}

impl Say for usize {
    fn say(&self) {
        (*self as u64).say()
    }
}

/// Prints its arguments and a newline as one line: `say!("ticks=", n)`.
#[macro_export]
macro_rules! say {
    ($($arg:expr),* $(,)?) => {{
        use $crate::common::Say as _;
        let _guard = $crate::common::ConsoleGuard::lock();
        $( ($arg).say(); )*
        "\n".say();
    }};
}

/// Asks for a reset through the i8042 (what `reboot=k` Linux does). The VMM exits 0.
pub fn reset() -> ! {
    outb(0x64, 0xfe);
    loop {
        // SAFETY: halting with interrupts off only stops this CPU.
        unsafe { asm!("cli; hlt", options(nomem, nostack)) };
    }
}

/// Reads a value of type T at a guest physical (= identity-mapped virtual) address.
pub fn read_phys<T: Copy>(addr: u64) -> T {
    // SAFETY: the probes read only boot structures the VMM placed in identity-mapped RAM.
    unsafe { core::ptr::read_unaligned(addr as *const T) }
}

/// The NUL-terminated command line pointed to by boot_params, as bytes.
pub fn cmdline(boot_params: u64) -> &'static [u8] {
    let lo: u32 = read_phys(boot_params + 0x228);
    let hi: u32 = read_phys(boot_params + 0xc8);
    let ptr = (u64::from(hi) << 32) | u64::from(lo);
    if ptr == 0 {
        return &[];
    }
    let mut len = 0usize;
    while len < 4096 && read_phys::<u8>(ptr + len as u64) != 0 {
        len += 1;
    }
    // SAFETY: `len` bytes from `ptr` were just read one by one from identity-mapped RAM.
    unsafe { core::slice::from_raw_parts(ptr as *const u8, len) }
}

/// Total RAM in the E820 map of boot_params, in KiB.
pub fn e820_ram_kib(boot_params: u64) -> (u8, u64) {
    let entries: u8 = read_phys(boot_params + 0x1e8);
    let mut total = 0u64;
    for i in 0..u64::from(entries.min(128)) {
        let e = boot_params + 0x2d0 + i * 20;
        let size: u64 = read_phys(e + 8);
        let kind: u32 = read_phys(e + 16);
        if kind == 1 {
            total += size;
        }
    }
    (entries, total / 1024)
}

pub fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: reading an architectural MSR the probe knows exists.
    unsafe { asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) };
    (u64::from(hi) << 32) | u64::from(lo)
}

pub fn wrmsr(msr: u32, v: u64) {
    // SAFETY: writing an architectural MSR with a value the probe has chosen deliberately.
    unsafe { asm!("wrmsr", in("ecx") msr, in("eax") v as u32, in("edx") (v >> 32) as u32, options(nostack, preserves_flags)) };
}

pub fn cpuid(leaf: u32, sub: u32) -> (u32, u32, u32, u32) {
    let r = core::arch::x86_64::__cpuid_count(leaf, sub);
    (r.eax, r.ebx, r.ecx, r.edx)
}

/// x2APIC mode: the LAPIC through MSRs, so no MMIO mapping of 0xFEE00000 is needed.
pub fn enable_x2apic() -> bool {
    let (_, _, ecx, _) = cpuid(1, 0);
    if ecx & (1 << 21) == 0 {
        return false;
    }
    let base = rdmsr(0x1b);
    wrmsr(0x1b, base | (1 << 11) | (1 << 10));
    // Software-enable the LAPIC (spurious vector register, vector 0xff).
    wrmsr(0x80f, 0x1ff);
    true
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    let (file, line) = info.location().map(|l| (l.file(), l.line())).unwrap_or(("?", 0));
    say!("PROBE PANIC at ", file, ":", line);
    // A panicking probe must not look like a clean run: halt without resetting, so the test
    // waiting for the probe's result times out and reports the output above.
    loop {
        // SAFETY: halting only stops this CPU.
        unsafe { asm!("cli; hlt", options(nomem, nostack)) };
    }
}

/// The precompiled `core` refers to this symbol even with panic=abort.
#[no_mangle]
pub extern "C" fn rust_eh_personality() {}

// The host target's `compiler_builtins` leaves these to libc, which a probe does not have.

/// # Safety
/// Same contract as C's memcpy: `n` bytes valid at both, not overlapping.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller upholds memcpy's contract; rep movsb copies exactly n bytes forward.
    unsafe { asm!("rep movsb", inout("rcx") n => _, inout("rdi") dst => _, inout("rsi") src => _, options(nostack, preserves_flags)) };
    dst
}

/// # Safety
/// Same contract as C's memmove.
#[no_mangle]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize) <= (src as usize) || (dst as usize) >= (src as usize).wrapping_add(n) {
        // SAFETY: a forward copy is safe when dst does not start inside src.
        return unsafe { memcpy(dst, src, n) };
    }
    let mut i = n;
    while i > 0 {
        i -= 1;
        // SAFETY: i < n, within both buffers per the caller's contract; copying backwards.
        unsafe { core::ptr::write_volatile(dst.add(i), core::ptr::read_volatile(src.add(i))) };
    }
    dst
}

/// # Safety
/// Same contract as C's memset.
#[no_mangle]
pub unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees n writable bytes at dst.
    unsafe { asm!("rep stosb", inout("rcx") n => _, inout("rdi") dst => _, in("al") c as u8, options(nostack, preserves_flags)) };
    dst
}

/// # Safety
/// Same contract as C's memcmp.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    for i in 0..n {
        // SAFETY: i < n, readable per the caller's contract.
        let (x, y) = unsafe { (core::ptr::read_volatile(a.add(i)), core::ptr::read_volatile(b.add(i))) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
    }
    0
}

/// # Safety
/// Same contract as C's bcmp.
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: forwarded with the same contract.
    unsafe { memcmp(a, b, n) }
}
