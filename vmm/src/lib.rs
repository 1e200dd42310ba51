//! shoal-vmm: one KVM microVM per process.
//!
//! `api` holds the configuration types, `builder` turns a configuration into a `MicroVm`
//! (memory, kernel, devices, vCPUs), `snapshot` saves one and builds one back from a
//! snapshot, and `runner` runs it to its end; `jail` confines the process first when asked. `arch` and `devices`
//! hold the pieces, testable without KVM; `vstate` wraps the KVM file descriptors.

pub mod api;
pub mod arch;
pub mod builder;
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
