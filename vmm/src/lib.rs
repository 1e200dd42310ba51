//! shoal-vmm: one KVM microVM per process.
//!
//! The configuration types and their checks are the `shoal_vmm_config` crate's. `api` serves
//! the control API and reads configuration files, `builder` turns a configuration into a
//! `MicroVm` (memory, kernel, devices, vCPUs), `snapshot` saves one and builds one back from a
//! snapshot, `controller` decides every API request before and after the boot, and `runner`
//! runs the machine to its end; `jail` confines the process first when asked. `arch` and
//! `devices` hold the pieces, testable without KVM; `vstate` wraps the KVM file descriptors.
//! Dependencies point one way: api -> config <- builder <- snapshot, and controller -> all.

pub mod api;
pub mod arch;
pub mod builder;
pub mod controller;
pub mod devices;
pub mod jail;
pub mod logging;
pub mod metrics;
pub mod runner;
pub mod seccomp;
pub mod snapshot;
pub mod stats;
pub mod vstate;

/// Process exit status when the guest reset or powered off.
pub const EXIT_OK: i32 = 0;
/// Process exit status when the VMM could not start the guest (bad input, KVM refused).
pub const EXIT_SETUP_ERROR: i32 = 1;
/// Process exit status when the guest crashed (triple fault, KVM emulation failure...).
pub const EXIT_GUEST_FAULT: i32 = 2;

/// An error and its causes on one line (each cause once).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        cause = c.source();
    }
    s
}
