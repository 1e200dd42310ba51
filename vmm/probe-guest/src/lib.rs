//! Paths of the probe guests built by this crate's build script: tiny freestanding x86_64 ELF
//! programs that the VMM boots exactly as it boots a Linux vmlinux (64-bit entry, boot_params
//! in RSI). Each prints its results on COM1 and ends with an i8042 reset (0xFE to port 0x64).
//! They exist because the KVM on the development machines cannot run Linux to user space.

use std::path::Path;

/// Prints a marker line and the command line read from boot_params, then resets.
pub const BOOT: &str = env!("SHOAL_PROBE_BOOT");
/// Starts every AP with INIT-SIPI-SIPI; each AP prints its APIC id.
pub const SMP: &str = env!("SHOAL_PROBE_SMP");
/// Counts PIT (through the PIC) and LAPIC timer interrupts.
pub const TIMER: &str = env!("SHOAL_PROBE_TIMER");

/// Triple-faults on purpose (empty IDT, then a divide error).
pub const FAULT: &str = env!("SHOAL_PROBE_FAULT");

/// Prints Linux's panic line, then resets (as a guest with `panic=1` does).
pub const PANIC: &str = env!("SHOAL_PROBE_PANIC");

/// Prints `count=N` every 10 PIT ticks (100 Hz), forever.
pub const COUNTER: &str = env!("SHOAL_PROBE_COUNTER");

/// Prints `spin=N` in a tight loop, forever.
pub const SPIN: &str = env!("SHOAL_PROBE_SPIN");

/// A minimal virtio-mmio driver: block write/read-back and rng through every device found.
pub const VIRTIO: &str = env!("SHOAL_PROBE_VIRTIO");

/// Prints its command line, then `tick=N` twice a second until Ctrl+Alt+Del, then resets.
pub const WORKLOAD: &str = env!("SHOAL_PROBE_WORKLOAD");

/// Opens a vsock stream to the host, then resets the vsock device (a driver unbinding).
pub const VSOCKRESET: &str = env!("SHOAL_PROBE_VSOCKRESET");

/// A virtio-balloon driver: touches 32 MiB, inflates them when told, reports statistics.
pub const BALLOON: &str = env!("SHOAL_PROBE_BALLOON");

/// Every probe by name.
pub const ALL: &[(&str, &str)] = &[
    ("boot", BOOT),
    ("smp", SMP),
    ("timer", TIMER),
    ("fault", FAULT),
    ("panic", PANIC),
    ("counter", COUNTER),
    ("spin", SPIN),
    ("virtio", VIRTIO),
    ("workload", WORKLOAD),
    ("vsockreset", VSOCKRESET),
    ("balloon", BALLOON),
];

/// The path of a probe by name.
pub fn path(name: &str) -> Option<&'static Path> {
    ALL.iter().find(|(n, _)| *n == name).map(|(_, p)| Path::new(*p))
}
